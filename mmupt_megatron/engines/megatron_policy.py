"""The Megatron policy: token log-probs and GRPO optimizer steps on a (TP/PP/DP-sharded) Qwen2.5-VL.

One ``train_step`` = zero grads -> Megatron's forward/backward schedule over micro-batches (1F1B under
PP) -> ``finalize_model_grads`` (DP reduction, tied-embedding sync across stages) -> optimizer step
(Megatron's distributed optimizer when DP > 1 with Adam). fp32 on CPU, bf16 on GPU.

Loss scaling: ``grpo_policy_loss`` already divides by the *global* token / sequence counts, so the sum
of micro-batch losses over all DP ranks is the full-batch loss. We therefore run Megatron with
``calculate_per_token_loss=True`` (no division by the number of micro-batches, DP grads summed rather
than averaged) and finalize the grads without a token count.

Log-prob convention: ``logprobs_BT[b, t]`` = log p(ids[b, t+1] | ids[b, :t+1]) (shape [B, T-1]), of the
distribution ``softmax(logits / temperature)`` (``PolicyOptimConfig.temperature``: the rollout's sampling
temperature, so the GRPO ratio, the KL and the engine comparison are all taken at the distribution that
generated the samples). Log-probs and metrics exist on the last pipeline stage; other stages get None / {}.

On-policy shortcut: a batch without ``old_logprobs_BT`` trains with the new log-probs, detached, as the old
ones (ratio exactly 1: the same loss and gradient as a separate old-log-prob pass before an update that has
not happened yet), which saves that forward when a step makes exactly one update (one mini-batch, one
epoch). With ``engine_logprobs_BT`` too, that training forward also reports the engine gap ``logprob_gap_mean``
/ ``logprob_gap_max`` (|policy - engine| on the trained tokens, before the update), which the old-log-prob pass
would otherwise have given.

FP8 (Transformer Engine) needs sequence lengths divisible by 16 x TP, sequence parallelism by TP: ``_run`` pads
every unpacked batch with ``pad_sequences`` (attention 0, loss mask 0) to ``seq_multiple``, and log-probs are cut
back to [B, T-1]; a packed row is padded to it as a whole (each sequence in it to TP under sequence parallelism).

Micro-batches (``engines/micro_batching.py``, ``MicroBatchLayout``): ``micro_batch_size`` sequences each, all padded
to the batch's longest; or, with ``max_tokens_per_micro_batch``, sequences sorted by length and grouped under that
many tokens (padding counted), each micro-batch cut to its own longest (a multiple of ``seq_multiple``); log-probs
come back in the batch's order. Under PP the stages then exchange each micro-batch's shape (Megatron's
variable_seq_lengths).

Packed sequences (``sequence_packing``; by default on when the model runs Transformer Engine layers): each
micro-batch's sequences are laid end to end in one row [1, T] (``engines/sequence_packing.py``: first fit under the
token budget, or ``micro_batch_size`` sequences), Megatron runs it as ``PackedSeqParams(qkv_format="thd")`` with
``cu_seqlens`` at the sequences' bounds (TE's THD attention on GPU; ``models/packed_attention.py`` on the local
spec), mrope position ids per token, and the row's log-probs are unpacked to the micro-batch's [B, T-1] before the
loss, which is unchanged. Needs right-padded samples (what ``trainer/batching.pack_rollouts`` builds).
Images travel once per prompt (``PolicyBatch.image_index_B``); the vision tower sees each distinct image of a
micro-batch once and its features go to every sample that uses it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mmupt_megatron.algorithms.logprobs import check_temperature, vocab_parallel_token_logprobs
from mmupt_megatron.algorithms.lr_schedule import lr_at
from mmupt_megatron.algorithms.loss import (
    PolicyLossConfig,
    check_rollout_is_cap,
    grpo_policy_loss,
    logprob_gap,
)
from mmupt_megatron.distributed.cpu_compat import cuda_type_names
from mmupt_megatron.distributed.parallel import ParallelGroups
from mmupt_megatron.engines.micro_batching import (
    MicroBatchLayout,
    image_order,
    image_rows,
    select_samples,
    sequence_lengths,
)
from mmupt_megatron.engines.sequence_packing import check_right_padded, pack_values, unpack_logprobs
from mmupt_megatron.models.qwen2_5_vl import packed_sequence_multiple, sequence_multiple
from mmupt_megatron.models.rope_index import causal_attention_mask, mrope_position_ids


@dataclass(kw_only=True, frozen=True)
class PolicyOptimConfig:
    lr: float = 1e-6
    """Peak learning rate (``lr_schedule`` shapes it per update)."""
    lr_schedule: str = "constant"
    """``algorithms/lr_schedule``: constant, linear or cosine after ``warmup_updates``, over ``total_updates``."""
    warmup_updates: int = 0
    total_updates: int = 0
    min_lr: float = 0.0
    optimizer: str = "adam"
    """``adam`` (AdamW, decoupled weight decay) or ``sgd``."""
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    sgd_momentum: float = 0.0
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables it."""
    micro_batch_size: int = 1
    """Sequences per forward/backward micro-batch on each DP rank (when ``max_tokens_per_micro_batch`` is None)."""
    max_tokens_per_micro_batch: int | None = None
    """Token budget per micro-batch (padding counted; sequences grouped by length); None: ``micro_batch_size``."""
    sequence_packing: bool | None = None
    """Each micro-batch's sequences end to end in one row (thd); None: when the model runs Transformer Engine layers."""
    freeze_vision: bool = False
    """Keep the vision tower fixed (no grads, no optimizer state)."""
    temperature: float = 1.0
    """Log-probs are those of softmax(logits / temperature): the trainer sets rollout.temperature."""
    distributed_optimizer: bool = True
    """Megatron's distributed optimizer (state sharded over DP) when DP > 1 and the optimizer is Adam."""
    grad_reduce_in_fp32: bool = True
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    rollout_is_cap: float | None = None
    """Truncated importance sampling against the engine's log-probs (algorithm.rollout_is_cap); None: off."""
    loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)

    def __post_init__(self) -> None:
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {self.micro_batch_size}")
        if self.max_tokens_per_micro_batch is not None and self.max_tokens_per_micro_batch < 1:
            raise ValueError(f"max_tokens_per_micro_batch must be >= 1 or None, got {self.max_tokens_per_micro_batch}")
        if self.lr < 0 or self.grad_clip < 0:
            raise ValueError(f"lr ({self.lr}) and grad_clip ({self.grad_clip}) must be >= 0")
        check_temperature(self.temperature)
        problems = check_rollout_is_cap(self.rollout_is_cap)
        if problems:
            raise ValueError(problems[0])
        self.loss.check()


@dataclass(kw_only=True)
class PolicyBatch:
    """This DP rank's slice of a batch. ``pixel_values`` stacks the patches of every image and ``image_grid_thw``
    has one row per image; sample b's images (one per run of <|image_pad|>) are rows ``image_index_B[b]``,
    ``image_index_B[b] + 1``, ... (-1: none), so a prompt's image is carried once for all its samples. Without
    ``image_index_B`` the images are in sample order, one copy per sample."""

    input_ids_BT: torch.Tensor
    attention_mask_BT: torch.Tensor | None = None
    loss_mask_BT: torch.Tensor | None = None
    """[B, T-1]: 1 where the token at t+1 is a response token to train on."""
    old_logprobs_BT: torch.Tensor | None = None
    """None in ``train_step``: on policy, the new log-probs (detached) are the old ones."""
    ref_logprobs_BT: torch.Tensor | None = None
    engine_logprobs_BT: torch.Tensor | None = None
    """[B, T-1]: the rollout engine's log-probs of the sampled tokens (TIS; the engine gap), 0 elsewhere."""
    advantages_B: torch.Tensor | None = None
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    image_index_B: torch.Tensor | None = None


def pad_sequences(batch: PolicyBatch, multiple: int, *, pad_id: int = 0) -> PolicyBatch:
    """``batch`` with its sequence length rounded up to a multiple of ``multiple`` (FP8 needs 16 x TP).
    New positions (at the end) hold ``pad_id`` with attention 0, loss mask 0 and log-probs 0, so they take
    no part in attention or the loss; the same ``batch`` back when nothing is added."""
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    extra = -batch.input_ids_BT.shape[1] % multiple
    if extra == 0:
        return batch
    attention = batch.attention_mask_BT if batch.attention_mask_BT is not None else torch.ones_like(batch.input_ids_BT)

    def pad(tensor: torch.Tensor | None, value: float) -> torch.Tensor | None:
        return None if tensor is None else F.pad(tensor, (0, extra), value=value)

    return replace(
        batch, input_ids_BT=pad(batch.input_ids_BT, pad_id), attention_mask_BT=pad(attention, 0),
        loss_mask_BT=pad(batch.loss_mask_BT, 0), old_logprobs_BT=pad(batch.old_logprobs_BT, 0),
        ref_logprobs_BT=pad(batch.ref_logprobs_BT, 0), engine_logprobs_BT=pad(batch.engine_logprobs_BT, 0),
    )


def _micro_batches(batch: PolicyBatch, layout: MicroBatchLayout, *,
                   image_token_id: int | None) -> tuple[list[dict], list[list[int]]]:
    """(micro-batches as dicts, the batch's sample indices in each), planned by ``layout``, each cut to its width
    and carrying only the images its samples use; packed ones also carry their row (``pack``)."""
    lengths = sequence_lengths(batch)
    plan = layout.plan(lengths)
    widths = layout.widths(lengths, plan, width=batch.input_ids_BT.shape[1])
    rows = image_rows(batch, image_token_id)
    mbs = []
    for indices, w in zip(plan, widths):
        mb = vars(select_samples(batch, indices, image_token_id=image_token_id, width=w, rows=rows))
        mb["image_order"] = image_order(rows, indices)  # grid rows in the order of the image-pad runs
        mb["pack"] = layout.pack([lengths[i] for i in indices]) if layout.packed else None
        mbs.append(mb)
    return mbs, plan


class MegatronPolicy:
    """Wraps a ``Qwen2_5_VLModel`` with Megatron DDP and optimizer; see the module docstring."""

    @property
    def distributed_optimizer(self) -> bool:
        """Megatron's distributed optimizer (sharded state over DP) is in use: it supports only Adam, and DP > 1."""
        return self.cfg.distributed_optimizer and self.groups.dims.dp > 1 and self.cfg.optimizer == "adam"

    def __init__(self, model: torch.nn.Module, groups: ParallelGroups, cfg: PolicyOptimConfig) -> None:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        self.cfg, self.groups, self.model = cfg, groups, model
        if cfg.freeze_vision and model.vision_model is not None:
            model.vision_model.requires_grad_(False)
        config = model.config
        config.calculate_per_token_loss = True
        distributed = self.distributed_optimizer
        self.ddp = DistributedDataParallel(
            config=config,
            ddp_config=DistributedDataParallelConfig(
                grad_reduce_in_fp32=cfg.grad_reduce_in_fp32, overlap_grad_reduce=cfg.overlap_grad_reduce,
                overlap_param_gather=cfg.overlap_param_gather and distributed, use_distributed_optimizer=distributed,
            ),
            module=model,
            pg_collection=groups.megatron_pgs,
        )
        with cuda_type_names():  # CPU: megatron's optimizers check param.type() for CUDA names
            self.optimizer = get_megatron_optimizer(
                OptimizerConfig(
                    optimizer=cfg.optimizer, lr=cfg.lr, min_lr=cfg.lr, weight_decay=cfg.weight_decay,
                    adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps,
                    sgd_momentum=cfg.sgd_momentum, clip_grad=cfg.grad_clip, bf16=config.bf16,
                    params_dtype=config.params_dtype, use_distributed_optimizer=distributed,
                ),
                [self.ddp],
                use_gloo_process_groups=False,
                pg_collection=groups.megatron_pgs,
            )
        config.no_sync_func = self.ddp.no_sync
        self.updates = 0
        """Optimizer updates taken over the run (the learning-rate schedule's position; saved with the optimizer)."""
        self._stash = None  # what offload() moved to host memory
        self.p2p = None
        if groups.dims.pp > 1:
            from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

            self.p2p = P2PCommunicator(pp_group=groups.pp_group, config=config)
        config.finalize_model_grads_func = self._finalize_grads
        self.seq_multiple = sequence_multiple(config)
        """Sequences are padded to a multiple of this before the forward (FP8: 16 x TP; sequence parallel: TP)."""
        self.layout = MicroBatchLayout(
            micro_batch_size=cfg.micro_batch_size, max_tokens=cfg.max_tokens_per_micro_batch,
            multiple=self.seq_multiple, sequence_multiple=packed_sequence_multiple(config),
            packed=model.te_spec if cfg.sequence_packing is None else cfg.sequence_packing)
        if self.layout.packed or self.layout.max_tokens is not None:
            config.variable_seq_lengths = True  # micro-batches differ in shape: PP stages exchange them first

    # ------------------------------------------------------------------ collectives for the loss
    def _all_reduce(self, tensor: torch.Tensor, op) -> torch.Tensor:
        if self.groups.dims.tp > 1:
            dist.all_reduce(tensor, op=op, group=self.groups.tp_group)
        return tensor

    def _finalize_grads(self, model, num_tokens=None, pg_collection=None, **kwargs) -> None:
        from megatron.core.distributed import finalize_model_grads

        finalize_model_grads(model, None, pg_collection=self.groups.megatron_pgs)

    def _logprobs(self, mb: dict, local_logits_BTV: torch.Tensor, temperature: float | None = None) -> torch.Tensor:
        """[B, T-1] log-probs of the micro-batch's tokens (a packed row's unpacked to its samples)."""
        ids_BT = mb["input_ids_BT"] if mb["pack"] is None else mb["row_ids"]
        logprobs = vocab_parallel_token_logprobs(
            local_logits_BTV[:, :-1],
            ids_BT[:, 1:],
            vocab_start=self.model.vocab_start(),
            all_reduce_max=partial(self._all_reduce, op=dist.ReduceOp.MAX),
            all_reduce_sum=partial(self._all_reduce, op=dist.ReduceOp.SUM),
            temperature=self.cfg.temperature if temperature is None else temperature,
        )
        if mb["pack"] is None:
            return logprobs
        return unpack_logprobs(logprobs, mb["pack"], width=mb["input_ids_BT"].shape[1])

    # ------------------------------------------------------------------ schedule plumbing
    def _forward_step(self, data_iterator: Iterator[dict], model, *, loss_fn):
        device = next(self.model.parameters()).device
        mb = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in next(data_iterator).items()}
        arch = self.model.arch
        ids_BT = mb["input_ids_BT"]
        position_ids = mrope_position_ids(
            ids_BT, image_token_id=arch.image_token_id,
            image_grid_thw=None if mb["image_grid_thw"] is None else mb["image_grid_thw"][mb["image_order"]],
            spatial_merge_size=arch.spatial_merge_size if arch.is_multimodal else 2,
            attention_mask_BT=mb["attention_mask_BT"],
        )
        pixels = mb["pixel_values"]
        if pixels is not None and self.model.config.params_dtype != pixels.dtype:
            pixels = pixels.to(self.model.config.params_dtype)
        packed = None
        if mb["pack"] is None:
            mask = causal_attention_mask(ids_BT.shape[1], mb["attention_mask_BT"], device=ids_BT.device)
        else:  # one row [1, T]; the sequences' bounds replace the mask
            packed, mask = _packed_seq_params(mb["pack"], device=ids_BT.device), None
            ids_BT, position_ids = pack_values(ids_BT, mb["pack"]), pack_values(position_ids, mb["pack"], fill=1)
            mb["row_ids"] = ids_BT  # the loss reads its targets from the same row
        output = model(ids_BT, position_ids, mask, pixels, mb["image_grid_thw"], image_order=mb["image_order"],
                       packed_seq_params=packed)
        return output, partial(loss_fn, mb)

    def _run(self, batch: PolicyBatch, loss_fn, *, forward_only: bool) -> list:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        if self.layout.packed:  # each row is padded by its own rule
            check_right_padded(batch.attention_mask_BT)
        else:
            batch = pad_sequences(batch, self.seq_multiple)
        mbs, plan = _micro_batches(batch, self.layout, image_token_id=self.model.arch.image_token_id)
        outputs = get_forward_backward_func(pp_size=self.groups.dims.pp)(
            forward_step_func=partial(self._forward_step, loss_fn=loss_fn),
            data_iterator=iter(mbs),
            model=[self.ddp],
            num_microbatches=len(mbs),
            seq_length=batch.input_ids_BT.shape[1],
            micro_batch_size=1 if self.layout.packed else max(len(indices) for indices in plan),
            forward_only=forward_only,
            pg_collection=self.groups.megatron_pgs,
            **({"p2p_communicator": self.p2p} if self.p2p is not None else {}),
        )
        return outputs, plan

    def _grads_finite(self) -> bool:
        """Whether every rank's gradients are finite (one all-reduce over the whole world)."""
        grads = [getattr(p, "main_grad", None) if getattr(p, "main_grad", None) is not None else p.grad
                 for p in self.model.parameters() if p.requires_grad]
        flag = torch.tensor([0.0 if _all_finite(grads) else 1.0])
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return float(flag) == 0.0

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def compute_logprobs(self, batch: PolicyBatch, *, temperature: float | None = None) -> torch.Tensor | None:
        """fp32 [B, T-1] log-probs of the batch's own tokens (last stage; None on other stages), at the
        config's temperature unless ``temperature`` says otherwise (refit checks compare at 1)."""

        def collect(mb: dict, logits_BTV: torch.Tensor):
            logprobs = self._logprobs(mb, logits_BTV, temperature)
            return torch.zeros((), requires_grad=False), torch.zeros((), dtype=torch.int), {"logprobs": logprobs}

        self.ddp.eval()
        outputs, plan = self._run(batch, collect, forward_only=True)
        self.ddp.train()
        if not self.groups.is_last_stage:
            return None
        num, width = batch.input_ids_BT.shape
        out_BT = torch.zeros((num, width - 1), dtype=torch.float32, device=outputs[0]["logprobs"].device)
        for out, indices in zip(outputs, plan, strict=True):  # back to the batch's order; padding stays 0
            logprobs = out["logprobs"][:, : width - 1]
            out_BT[torch.tensor(indices), : logprobs.shape[1]] = logprobs.to(out_BT.device, out_BT.dtype)
        return out_BT

    def train_step(self, batch: PolicyBatch, *, global_num_tokens: float | None = None,
                   global_num_seqs: float | None = None) -> dict[str, float]:
        """One optimizer step on this rank's batch. Global counts default to the DP-all-reduced sums of
        ``loss_mask_BT`` and of the batch size. Without ``old_logprobs_BT``: on policy (module docstring)."""
        if batch.loss_mask_BT is None or batch.advantages_B is None:
            raise ValueError("train_step needs loss_mask_BT and advantages_B")
        if self.cfg.rollout_is_cap is not None and batch.engine_logprobs_BT is None:
            raise ValueError("rollout_is_cap is set but the batch has no engine_logprobs_BT")
        expected = (batch.input_ids_BT.shape[0], batch.input_ids_BT.shape[1] - 1)
        if tuple(batch.loss_mask_BT.shape) != expected:
            raise ValueError(f"loss_mask_BT has shape {tuple(batch.loss_mask_BT.shape)}, expected {expected} (T-1)")
        if global_num_tokens is None or global_num_seqs is None:
            counts = torch.tensor([float(batch.loss_mask_BT.sum()), float(batch.input_ids_BT.shape[0])])
            if self.groups.dims.dp > 1:
                dist.all_reduce(counts, group=self.groups.dp_group)
            global_num_tokens = int(counts[0]) if global_num_tokens is None else global_num_tokens
            global_num_seqs = int(counts[1]) if global_num_seqs is None else global_num_seqs
        loss_cfg = self.cfg.loss

        def loss_fn(mb: dict, logits_BTV: torch.Tensor):
            logprobs = self._logprobs(mb, logits_BTV)
            old = mb["old_logprobs_BT"] if mb["old_logprobs_BT"] is not None else logprobs.detach()
            engine = mb["engine_logprobs_BT"]
            loss, metrics = grpo_policy_loss(
                logprobs, old, mb["advantages_B"], mb["loss_mask_BT"], cfg=loss_cfg,
                global_num_tokens=global_num_tokens, global_num_seqs=global_num_seqs,
                ref_logprobs_BT=mb["ref_logprobs_BT"], engine_logprobs_BT=engine,
                rollout_is_cap=self.cfg.rollout_is_cap,
            )
            metrics = {key: value.detach() for key, value in metrics.items()}
            if engine is not None and mb["old_logprobs_BT"] is None:  # on policy: these are the old log-probs
                metrics.update(logprob_gap(logprobs.detach(), engine, mb["loss_mask_BT"]))
            metrics["loss"] = loss.detach()
            return loss, torch.zeros((), dtype=torch.int), metrics

        self.ddp.train()
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs, _ = self._run(batch, loss_fn, forward_only=False)
        merged = _merge_micro_batch_metrics(outputs)
        gap = {key: value for key, value in merged.items() if key.startswith("logprob_gap")}  # before any update
        lr = self._schedule_lr()
        if not self._grads_finite():
            # fp32 Megatron optimizers apply NaN/inf gradients as they are: skip the update on every rank
            self.ddp.zero_grad_buffer()
            self.optimizer.zero_grad()
            return {"skipped": 1.0, "loss": float("nan"), "grad_norm": float("nan"), "lr": lr, **gap}
        updated, grad_norm, _ = self.optimizer.step()
        if not updated:
            return {"skipped": 1.0, "loss": float("nan"), "grad_norm": float("nan"), "lr": lr, **gap}
        self.updates += 1
        return {"grad_norm": float(grad_norm) if grad_norm is not None else float("nan"), "skipped": 0.0, "lr": lr,
                **merged}

    def _schedule_lr(self) -> float:
        """Set the learning rate of update ``self.updates`` (the run's count: restored with the optimizer's
        checkpoint) on every parameter group, as Megatron's scheduler does (times a group's ``lr_mult``)."""
        c = self.cfg
        lr = lr_at(self.updates, lr=c.lr, kind=c.lr_schedule, warmup=c.warmup_updates, total=c.total_updates,
                   min_lr=c.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        return lr

    # ------------------------------------------------------------------ memory (the colocated schedule)
    def _inner_optimizers(self) -> list:
        inner = [getattr(o, "optimizer", None) for o in getattr(self.optimizer, "chained_optimizers", [self.optimizer])]
        return [o for o in inner if o is not None]  # a frozen model (the reference) has no torch optimizer

    def _optimizer_tensors(self) -> list[torch.Tensor]:
        """Optimizer state (Adam moments, step) and main parameters that are not the model's own storage
        (the fp32 copies of bf16 weights); with fp32 weights the optimizer updates the model's storage."""
        weights = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        out = []
        for inner in self._inner_optimizers():
            out += [v for state in inner.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
            out += [p for group in inner.param_groups for p in group["params"]
                    if p.untyped_storage().data_ptr() not in weights]
        return out

    def offload(self, *, weights: bool = False) -> int:
        """Free this rank's device memory for the engine: gradients (dropped: every step zeroes them),
        optimizer state and main parameters (copied to host memory) and, with ``weights``, the parameters.
        ``onload`` restores them bit-exactly; returns the bytes moved off the device so far."""
        from mmupt_megatron.engines.offload import HostStash, stash

        self._stash = self._stash or HostStash()
        buffers = self.ddp.buffers + self.ddp.expert_parallel_buffers
        stash([b.grad_data for b in buffers], keep=False, into=self._stash)
        stash(self._optimizer_tensors(), into=self._stash)
        if weights:
            stash([*self.model.parameters(), *(b.param_data for b in buffers)], into=self._stash)
        return self._stash.nbytes

    def onload(self, *, grads: bool = True) -> None:
        """Undo ``offload`` (no-op when nothing is off the device). ``grads=False`` leaves the gradient buffers off
        (a checkpoint needs the weights and the optimizer's state, never the gradients: 4 bytes a parameter)."""
        if self._stash is not None:
            self._stash.restore(dropped=grads)
            if not self._stash.moved:
                self._stash = None


def _packed_seq_params(pack, *, device: torch.device):
    """Megatron's description of a packed row: every bound counts its slot's padding (``cu_seqlens_*_padded`` equal
    to ``cu_seqlens_*``, as NeMo-RL passes them), so the row's length is the last bound (THD RoPE reads per-token
    positions only then) and each slot's padding, after its real tokens, is attended causally by nothing real."""
    from megatron.core.packed_seq_params import PackedSeqParams

    bounds = torch.tensor(pack.cu_seqlens, dtype=torch.int32, device=device)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=bounds, cu_seqlens_kv=bounds, cu_seqlens_q_padded=bounds,
                           cu_seqlens_kv_padded=bounds, max_seqlen_q=pack.max_seqlen, max_seqlen_kv=pack.max_seqlen)


def _merge_micro_batch_metrics(outputs: list[dict]) -> dict[str, float]:
    """One dict from the micro-batches' metrics: ``loss`` summed (each is a share of the global loss), ``*_max``
    maximised, the others averaged weighted by their tokens; {} off the last pipeline stage."""
    if not outputs:
        return {}
    weights = [float(out["num_tokens"]) for out in outputs]
    total = max(sum(weights), 1.0)
    result = {}
    for key in outputs[0]:
        if key == "loss":
            result[key] = sum(float(out[key]) for out in outputs)
        elif key == "num_tokens":
            result[key] = total
        elif key.endswith("_max"):
            result[key] = max(float(out[key]) for out in outputs)
        else:
            result[key] = sum(float(out[key]) * w for out, w in zip(outputs, weights)) / total
    return result


def _all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t is not None)


def with_loss(cfg: PolicyOptimConfig, **loss_overrides) -> PolicyOptimConfig:
    """A copy of ``cfg`` whose loss config has ``loss_overrides`` applied."""
    return replace(cfg, loss=replace(cfg.loss, **loss_overrides))
