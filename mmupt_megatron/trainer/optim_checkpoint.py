"""The optimizer's state in a training checkpoint, as a megatron-core dist-checkpoint.

Every rank saves its own shard of the Adam moments and fp32 main parameters (Megatron's distributed
optimizer keeps them out of ``state_dict()``), each piece keyed by the model parameter it belongs to
(``fully_sharded_model_space``), so a checkpoint loads at another data-parallel size as well. Collective.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from mmupt_megatron.models.safe_files import check_dist_checkpoint

SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}


def _sharded_state(policy, *, is_loading: bool) -> dict:  # noqa: ANN001 - MegatronPolicy
    # the parameters themselves (not checkpoint_state's aliases): the optimizer finds its state by them
    model_state = policy.model.sharded_state_dict()
    return policy.optimizer.sharded_state_dict(model_state, is_loading=is_loading, metadata=SHARDING)


def save_optimizer(policy, folder: str | Path) -> None:  # noqa: ANN001 - MegatronPolicy
    from megatron.core import dist_checkpointing

    Path(folder).mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(_sharded_state(policy, is_loading=False), str(folder))


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


def load_optimizer(policy, folder: str | Path) -> None:  # noqa: ANN001 - MegatronPolicy
    from megatron.core import dist_checkpointing

    check_dist_checkpoint(folder)
    _fill_empty_adam_state(policy)
    state = dist_checkpointing.load(_sharded_state(policy, is_loading=True), str(folder))
    with _steps_kept(policy):
        policy.optimizer.load_state_dict(state)


@contextmanager
def _steps_kept(policy):  # noqa: ANN001 - MegatronPolicy
    """Without apex / TE the distributed optimizer keeps Adam's step in each parameter's state, sets it from the
    checkpoint's param groups, then copies every state entry from the loaded per-parameter tensors, which have
    no step (KeyError 'step'): supply each parameter's already-restored step."""
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
