"""Check the planner against the real code: build one policy rank of a recipe at full size on fake tensors.

``measure_rank(cfg, arch)`` initialises a *fake* process group of the recipe's world size (torch's ``fake``
backend: this process is rank 0, collectives do nothing), builds the policy exactly as a training worker does
(``build_model`` in bf16 without initialisation, ``MegatronPolicy``: Megatron DDP with fp32 main grads and
Megatron's (distributed) optimizer; the reference copy when KL is on) under ``FakeTensorMode`` (shapes and
dtypes, no memory), runs one forward/backward of a full-length micro-batch through the DDP model, and reports
the bytes rank 0 holds. Activations are the peak of live tensors created during forward/backward, tracked by
storage; the attention-score tensors [.., T, T] that Megatron's local (torch) attention materialises are
counted apart, since the GPU path (Transformer Engine, flash attention) never holds them. The forward is
text-only at the full token count: the vision tower's parameters are built and counted, its activations are
not measured (the planner's ViT term is reported next to the measurement).

Fake tensors live on the CPU device here (this torch build cannot initialise "cuda" tensors, and bytes do not
depend on the device). Run it in a fresh process (it owns the global process group):

    .venv/bin/python -m mmupt_megatron.launch.fake_rank qwen2_5_vl_7b_1n8g_tp2 [key=value ...]
"""

from __future__ import annotations

import contextlib
import gc
import sys
import weakref
from dataclasses import dataclass

import torch

from mmupt_megatron.config import Config
from mmupt_megatron.launch.arch import QwenVLArch
from mmupt_megatron.models.hf_config import LMArch

VISION_HEADS = 16
FULL_ATTENTION_BLOCKS = [7, 15, 23, 31]


def lm_arch(arch: QwenVLArch) -> LMArch:
    """The model code's architecture record for a planner table entry (the values of its config.json)."""
    return LMArch(
        model_type="qwen2_5_vl", hidden_size=arch.hidden, num_layers=arch.layers, num_attention_heads=arch.heads,
        num_kv_heads=arch.kv_heads, head_dim=arch.head_dim, ffn_hidden_size=arch.ffn, vocab_size=arch.vocab,
        rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=arch.tied_embeddings, qkv_bias=True,
        mrope_section=(16, 24, 24), max_position_embeddings=128000, image_token_id=151655, video_token_id=151656,
        vision_start_token_id=151652,
        vision_config={"depth": arch.vit_layers, "hidden_size": arch.vit_hidden, "intermediate_size": arch.vit_ffn,
                       "num_heads": VISION_HEADS, "out_hidden_size": arch.hidden, "patch_size": arch.vit_patch,
                       "spatial_merge_size": arch.vit_merge, "temporal_patch_size": 2, "in_channels": 3,
                       "window_size": 112, "fullatt_block_indexes": FULL_ATTENTION_BLOCKS, "hidden_act": "silu"},
    )


class _LiveBytes:
    """A dispatch mode counting the bytes of storages created under it while they are alive (peak kept);
    storages whose tensor ends in [T, T] go to ``scores`` (attention scores / probabilities / masks)."""

    def __init__(self, seq_len: int) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker.saw(out)
                return out

        self.mode, self.seq_len = Mode(), seq_len
        self.live: dict[int, tuple[int, bool]] = {}
        self.known: set[int] = set()
        self.current = {False: 0, True: 0}
        self.peak = {False: 0, True: 0}
        self.peak_total = 0

    def saw(self, out) -> None:
        from torch.utils._pytree import tree_flatten

        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage._cdata
            if key in self.live or key in self.known:
                continue
            scores = tensor.dim() >= 2 and tuple(tensor.shape[-2:]) == (self.seq_len, self.seq_len)
            self.live[key] = (storage.nbytes(), scores)
            self.current[scores] += storage.nbytes()
            self.peak[scores] = max(self.peak[scores], self.current[scores])
            self.peak_total = max(self.peak_total, sum(self.current.values()))
            weakref.finalize(storage, self._free, key)

    def ignore(self, tensors) -> None:
        """Storages that existed before (parameters, grad buffers, optimizer state): views of them are not new."""
        self.known.update(t.untyped_storage()._cdata for t in tensors if isinstance(t, torch.Tensor))

    def _free(self, key: int) -> None:
        size, scores = self.live.pop(key)
        self.current[scores] -= size


@dataclass(kw_only=True)
class RankBytes:
    weights: int
    grads: int
    optimizer: int
    reference: int
    activations: int
    """Peak bytes of forward/backward tensors other than [T, T] attention scores."""
    attention_scores: int
    """Peak bytes of [T, T] tensors (the local spec's non-flash attention; zero on the GPU path)."""
    tokens: int
    forward_peak: int = 0
    """Peak of the same during the forward alone."""
    saved_after_forward: int = 0
    """What the forward leaves alive for the backward (saved tensors, log-probs)."""


def measure_rank(cfg: Config, arch: QwenVLArch) -> RankBytes:
    """Bytes held by rank 0 of ``cfg``'s policy (first pipeline stage). Call once per fresh process."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from mmupt_megatron.algorithms.logprobs import vocab_parallel_token_logprobs
    from mmupt_megatron.distributed.parallel import ParallelDims, init_parallel
    from mmupt_megatron.engines.megatron_policy import MegatronPolicy, PolicyOptimConfig
    from mmupt_megatron.models.convert import build_model
    from mmupt_megatron.models.rope_index import causal_attention_mask

    p, t, r = cfg.parallel, cfg.trainer, cfg.rollout
    if p.pipeline_parallel_size != 1:
        raise ValueError("measure_rank covers parallel.pipeline_parallel_size=1 recipes (one stage holds everything)")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=p.world_size)
    new_group = dist.new_group

    def fake_new_group(*args, **kwargs):
        kwargs.pop("backend", None)
        return new_group(*args, **kwargs)

    dist.new_group = fake_new_group
    try:
        groups = init_parallel(ParallelDims(tp=p.tensor_parallel_size, pp=1, dp=p.data_parallel_size))
    finally:
        dist.new_group = new_group
    model_arch = lm_arch(arch)
    batch, seq_len = t.micro_batch_size, r.max_prompt_length + r.max_new_tokens
    ids_BT = torch.zeros(batch, seq_len, dtype=torch.long)
    positions_3BT = torch.arange(seq_len).expand(3, batch, seq_len).contiguous()
    mask = causal_attention_mask(seq_len)
    optim = PolicyOptimConfig(lr=t.lr, weight_decay=t.weight_decay, grad_clip=t.grad_clip, micro_batch_size=batch)
    all_gather_object = dist.all_gather_object

    def same_everywhere(out: list, obj, group=None) -> None:
        out[:] = [obj] * len(out)  # every rank builds the same modules: its object is everyone's

    dist.all_gather_object = same_everywhere  # the real one pickles through tensors it then reads back
    # The RNG tracker compares RNG states with .item(), which fake tensors cannot answer; dropout is 0 and
    # random numbers take no memory, so its fork does nothing here.
    get_cuda_rng_tracker().fork = lambda *args, **kwargs: contextlib.nullcontext()
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = build_model(model_arch, groups, dtype=torch.bfloat16, recompute=cfg.model.gradient_checkpointing)
        policy = MegatronPolicy(model, groups, optim)
        weights = sum(q.numel() * q.element_size() for q in model.parameters())
        grads = sum(b.grad_data.numel() * b.grad_data.element_size() for b in policy.ddp.buffers)
        optimizer = _optimizer_bytes(policy.optimizer)
        reference = 0
        if cfg.algorithm.loss.kl_coef > 0:
            ref_model = build_model(model_arch, groups, dtype=torch.bfloat16)
            reference = sum(q.numel() * q.element_size() for q in ref_model.parameters())
        tracker = _LiveBytes(seq_len)
        tracker.ignore([*model.parameters(), *model.buffers(), *(b.grad_data for b in policy.ddp.buffers),
                        *(b.param_data for b in policy.ddp.buffers if b.param_data is not None),
                        *(q for opt in getattr(policy.optimizer, "chained_optimizers", None) or [policy.optimizer]
                          for group in opt.optimizer.param_groups for q in group["params"])])
        with tracker.mode:
            logits = policy.ddp(ids_BT, positions_3BT, mask)
            logprobs = vocab_parallel_token_logprobs(
                logits[:, :-1], ids_BT[:, 1:], vocab_start=model.vocab_start(),
                all_reduce_max=lambda x: x, all_reduce_sum=lambda x: x, check_finite=False,
            )
            forward_peak, saved = tracker.peak[False], tracker.current[False]
            del logits
            logprobs.sum().backward()
            del logprobs
            gc.collect()
    dist.all_gather_object = all_gather_object
    return RankBytes(weights=weights, grads=grads, optimizer=optimizer, reference=reference,
                     activations=tracker.peak[False], attention_scores=tracker.peak[True], tokens=batch * seq_len,
                     forward_peak=forward_peak, saved_after_forward=saved)


def _optimizer_bytes(optimizer) -> int:
    """fp32 master parameters of this rank (the DP shard under the distributed optimizer) and the two Adam
    moments that torch's Adam allocates like them (``exp_avg``, ``exp_avg_sq``) at the first step."""
    inner = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    master = sum(q.numel() * 4 for opt in inner for group in opt.optimizer.param_groups for q in group["params"])
    return 3 * master


def main(argv: list[str]) -> None:
    from mmupt_megatron.config_loading import load_config
    from mmupt_megatron.launch.arch import arch_for

    cfg = load_config(argv[0], argv[1:])
    print(measure_rank(cfg, arch_for(model_path=cfg.model.path)))


if __name__ == "__main__":
    main(sys.argv[1:])
