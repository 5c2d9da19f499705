"""The optimizer's state in a training checkpoint, as a megatron-core dist-checkpoint.

Every rank saves its share of the Adam moments and fp32 main parameters (Megatron's distributed optimizer
keeps them out of ``state_dict()``), each tensor keyed by the model parameter it belongs to
(``fully_reshardable``: megatron-core 0.16 supports no flattened ranges, which ``fully_sharded_model_space``
needs), so the state of a distributed optimizer (DP > 1) loads at another TP/PP/DP with DP > 1. The plain
optimizer of DP = 1 stores another structure: a checkpoint loads only into the same kind (``KIND_FILE`` says
which; a mismatch is a clear error). Collective.

An optimizer that has not stepped yet (every step so far skipped: all groups unanimous with
``algorithm.drop_zero_advantage_groups``, or non-finite gradients) has no Adam moments to save: its
``KIND_FILE`` records ``"state": "none"`` and nothing else is written; loading such a checkpoint leaves the
optimizer fresh, its fp32 main parameters taken from the loaded weights, so the first update after the resume
is the first update of a run never interrupted.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

from mmupt_megatron.models.safe_files import check_dist_checkpoint

SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}


def _sharded_state(policy, *, is_loading: bool) -> dict:  # noqa: ANN001 - MegatronPolicy
    # the parameters themselves (not checkpoint_state's aliases): the optimizer finds its state by them
    model_state = policy.model.sharded_state_dict()
    return policy.optimizer.sharded_state_dict(model_state, is_loading=is_loading, metadata=SHARDING)


KIND_FILE = "mmupt_optimizer.json"


def _kind(policy) -> dict:  # noqa: ANN001 - MegatronPolicy
    dims = policy.groups.dims
    return {"distributed": policy.distributed_optimizer, "optimizer": policy.cfg.optimizer,
            "tp": dims.tp, "pp": dims.pp, "dp": dims.dp}


def _inner_optimizers(policy) -> list:  # noqa: ANN001 - MegatronPolicy
    """The torch (or apex / TE) optimizers under Megatron's wrappers."""
    chained = getattr(policy.optimizer, "chained_optimizers", [policy.optimizer])
    return [inner for inner in (getattr(o, "optimizer", None) for o in chained) if inner is not None]


def has_stepped(policy) -> bool:  # noqa: ANN001 - MegatronPolicy
    """Collective: whether the optimizer holds any state on any rank (an Adam that has stepped does; one whose
    every update was skipped does not)."""
    import torch
    import torch.distributed as dist

    local = any(state for inner in _inner_optimizers(policy) for state in inner.state.values())
    nccl = "nccl" in str(dist.get_backend())  # NCCL reduces device tensors only
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    flag = torch.tensor([1.0 if local else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)


def save_optimizer(policy, folder: str | Path) -> None:  # noqa: ANN001 - MegatronPolicy
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    Path(folder).mkdir(parents=True, exist_ok=True)
    kind = {**_kind(policy), "updates": policy.updates}  # the learning-rate schedule's position
    if has_stepped(policy) or policy.cfg.optimizer != "adam":
        dist_checkpointing.save(_sharded_state(policy, is_loading=False), str(folder))
    else:  # no update yet: no moments to save (Megatron's sharded state would ask for them)
        kind["state"] = "none"
    if dist.get_rank() == 0:
        (Path(folder) / KIND_FILE).write_text(json.dumps(kind) + "\n")
    dist.barrier()


def saved_without_state(folder: str | Path) -> bool:
    """Whether ``folder`` holds the state of an optimizer that had not stepped (its ``KIND_FILE`` says so)."""
    try:
        return json.loads((Path(folder) / KIND_FILE).read_text()).get("state") == "none"
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def _check_kind(policy, folder: str | Path) -> None:  # noqa: ANN001 - MegatronPolicy
    path = Path(folder) / KIND_FILE
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot be read ({error})") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: not the optimizer description this trainer writes")
    here = _kind(policy)
    if (saved.get("distributed"), saved.get("optimizer")) != (here["distributed"], here["optimizer"]):
        def name(kind: dict) -> str:
            what = "distributed " if kind.get("distributed") else ""
            return f"{what}{kind.get('optimizer')} optimizer (TP={kind.get('tp')} PP={kind.get('pp')} DP={kind.get('dp')})"

        raise ValueError(f"{folder}: optimizer state of a {name(saved)} does not load into a {name(here)}: resume "
                         "with parallel.data_parallel_size > 1 on both sides, or = 1 on both")


def _fill_empty_adam_state(policy) -> None:  # noqa: ANN001 - MegatronPolicy
    """Zero Adam state (step 0) for parameters that have none yet: without apex / Transformer Engine the
    distributed optimizer reads the step from the state, which a fresh optimizer lacks; loading replaces it."""
    import torch

    for megatron_optimizer in getattr(policy.optimizer, "chained_optimizers", [policy.optimizer]):
        inner = getattr(megatron_optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            continue
        for group in inner.param_groups:
            for param in group["params"]:
                if not inner.state[param]:
                    inner.state[param].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(param),
                                              exp_avg_sq=torch.zeros_like(param))


def saved_updates(folder: str | Path) -> int:
    """The optimizer updates the run had taken when ``folder`` was saved (0 for a checkpoint that predates the
    count: its learning-rate schedule starts over)."""
    try:
        saved = json.loads((Path(folder) / KIND_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return 0
    updates = saved.get("updates", 0) if isinstance(saved, dict) else 0
    if not isinstance(updates, int) or isinstance(updates, bool) or updates < 0:
        raise ValueError(f"{Path(folder) / KIND_FILE}: updates must be a count >= 0, got {updates!r}")
    return updates


def load_optimizer(policy, folder: str | Path) -> None:  # noqa: ANN001 - MegatronPolicy
    from megatron.core import dist_checkpointing

    policy.updates = saved_updates(folder)
    if saved_without_state(folder):  # saved before the first update: any layout, nothing to restore
        if has_stepped(policy):
            raise ValueError(f"{folder}: the optimizer state of a run that had not updated yet loads only into a "
                             "fresh optimizer, not into one that has stepped")
        policy.optimizer.reload_model_params()  # fp32 main params (mixed precision) from the loaded weights
        return
    check_dist_checkpoint(folder)
    _check_kind(policy, folder)
    _fill_empty_adam_state(policy)
    state = dist_checkpointing.load(_sharded_state(policy, is_loading=True), str(folder))
    with _steps_kept(policy):
        policy.optimizer.load_state_dict(state)


@contextmanager
def _steps_kept(policy):  # noqa: ANN001 - MegatronPolicy
    """Without apex / TE the distributed optimizer keeps Adam's step in each parameter's state, sets it from the
    checkpoint's param groups, then copies every state entry from the loaded per-parameter tensors, which have
    no step (KeyError 'step'): supply each parameter's already-restored step; afterwards give each parameter a
    step tensor of its own."""
    patched = []
    for megatron_optimizer in getattr(policy.optimizer, "chained_optimizers", [policy.optimizer]):
        original = getattr(megatron_optimizer, "_set_main_param_and_optimizer_states", None)
        if original is None:
            continue

        def set_states(model_param, tensors, *, _opt=megatron_optimizer, _original=original):
            group, order = _opt.model_param_group_index_map[model_param]
            state = _opt.optimizer.state[_opt.optimizer.param_groups[group]["params"][order]]
            if "step" in state and "step" not in tensors:
                tensors = {**tensors, "step": state["step"].clone()}
            return _original(model_param, tensors)

        megatron_optimizer._set_main_param_and_optimizer_states = set_states
        patched.append(megatron_optimizer)
    try:
        yield
    finally:
        for megatron_optimizer in patched:
            del megatron_optimizer._set_main_param_and_optimizer_states
    # it also puts ONE step tensor into every parameter's state, and Adam increments each parameter's step in
    # place: the shared counter would advance once per parameter per update (bias correction off). Unshare it.
    for megatron_optimizer in getattr(policy.optimizer, "chained_optimizers", [policy.optimizer]):
        for state in getattr(getattr(megatron_optimizer, "optimizer", None), "state", {}).values():
            if "step" in state:
                state["step"] = state["step"].clone()
