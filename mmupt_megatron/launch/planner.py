"""``mmupt plan``: per-GPU memory, refit bytes and FLOPs per step of a recipe on H100s, and a step-time range.

Layout assumed (the colocated schedule of NeMo-RL / verl): the Megatron policy and the vLLM engines share every
GPU. While vLLM generates, Megatron keeps its bf16 weights (the refit source) and has its gradients, optimizer
and reference model offloaded; while Megatron trains, vLLM sleeps (weights offloaded, KV cache freed).

Memory per GPU (GiB), training phase, on the fuller of the first and last pipeline stage:
  stage params P = layers/PP x layer/TP + embedding/TP (first) | lm_head/TP (last) + the ViT (first; the vision
  tower is replicated on every TP rank). weights 2P (bf16), grads 4P (fp32 main grads), optimizer 12P / DP
  (fp32 master + Adam m, v; Megatron's distributed optimizer shards them over DP), FP8 weight copies 1P, the
  reference policy 2P (when algorithm.loss.kl_coef > 0).
  Activations per micro-batch (bf16, tensor + sequence parallel, flash attention: no s^2 term), per token and
  layer: attention 8h + 4kv bytes (norm in, QKV in, Q/K/V, attention out) + MLP 4h + 6f bytes (norm in, fc1 in,
  gate/up out, SwiGLU out) = (12h + 4kv + 6f) / TP; with model.gradient_checkpointing only the layer input
  (2h / TP) stays, plus one layer being recomputed. The first stage holds min(PP, micro-batches) micro-batches
  (1F1B). Tokens per micro-batch = micro_batch_size x (max_prompt_length + max_new_tokens) (the padded worst
  case). The ViT (not TP-sharded) adds (16v + 6f_v) bytes per patch and layer (2v with recomputation), patches =
  micro_batch_size x data.max_pixels / 14^2. The last stage holds logits: tokens x vocab/TP x 6 bytes (bf16
  logits + fp32 log-softmax). Plus 4 GiB (CUDA context, NCCL buffers, allocator fragmentation).
Rollout phase: Megatron's bf16 weights + 4 GiB + vLLM's pool (rollout.gpu_memory_utilization x 80 GiB), which
holds the engine's weights (2 bytes x params / rollout TP), 2 GiB of activations, and the KV cache.
FLOPs per step: rollout 2 x params x (generated tokens + prompt tokens, prefilled once per prompt) + log-prob
forwards 2 x params x trained tokens (old policy, and reference when KL is on) + training 6 x params x trained
tokens x ppo_epochs (recomputation and attention-score FLOPs excluded, as in MFU accounting). Step time =
FLOPs / (GPUs x 989 TFLOP/s (H100 SXM bf16 dense) x MFU) + refit, MFU 16-23% (EasyR1's measured actor MFU on
8xH100) unless given.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mmupt_megatron.config import Config
from mmupt_megatron.launch.arch import QwenVLArch

GIB = 2**30


@dataclass(frozen=True, kw_only=True)
class PlanAssumptions:
    gpu_memory_gib: float = 80.0
    """H100 SXM memory."""
    peak_tflops: float = 989.0
    """H100 SXM bf16 dense peak (datasheet); MFU is relative to it."""
    mfu: tuple[float, float] = (0.16, 0.23)
    """MFU range: EasyR1's actor MFU for Qwen2.5-VL-7B on 8xH100 (/work/shared/STACK.md)."""
    mean_prompt_tokens: int = 512
    """Mean prompt length (image tokens included) for FLOPs; memory uses rollout.max_prompt_length."""
    mean_response_tokens: int = 512
    """Mean response length for FLOPs; memory uses rollout.max_new_tokens."""
    refit_gb_per_s: tuple[float, float] = (25.0, 40.0)
    """Effective refit bandwidth: NeMo-RL moves Qwen3-4B (~8 GB bf16) in 0.21-0.34 s."""
    overhead_gib: float = 4.0
    """CUDA context, NCCL buffers, allocator fragmentation."""
    vllm_activation_gib: float = 2.0
    """vLLM's activations / CUDA graphs inside its pool."""


@dataclass(kw_only=True)
class Plan:
    arch: QwenVLArch
    num_gpus: int
    train_gib: dict[str, float] = field(default_factory=dict)
    rollout_gib: dict[str, float] = field(default_factory=dict)
    kv_sequences: float = 0.0
    refit_gb: float = 0.0
    refit_s: tuple[float, float] = (0.0, 0.0)
    flops: dict[str, float] = field(default_factory=dict)
    step_s: tuple[float, float] = (0.0, 0.0)
    problems: list[str] = field(default_factory=list)

    @property
    def train_total(self) -> float:
        return sum(self.train_gib.values())

    @property
    def rollout_total(self) -> float:
        return sum(self.rollout_gib.values())


def _topology_problems(cfg: Config, arch: QwenVLArch) -> list[str]:
    p, r, out = cfg.parallel, cfg.rollout, []
    tp, pp = p.tensor_parallel_size, p.pipeline_parallel_size
    if arch.heads % tp or arch.kv_heads % tp:
        out.append(f"parallel.tensor_parallel_size={tp} must divide {arch.name}'s {arch.heads} heads and {arch.kv_heads} KV heads")
    if arch.layers % pp:
        out.append(f"parallel.pipeline_parallel_size={pp} must divide {arch.name}'s {arch.layers} layers")
    if arch.heads % r.tensor_parallel_size:
        out.append(f"rollout.tensor_parallel_size={r.tensor_parallel_size} must divide {arch.name}'s {arch.heads} heads")
    if p.world_size % r.tensor_parallel_size:
        out.append(f"rollout.tensor_parallel_size={r.tensor_parallel_size} must divide the {p.world_size} GPUs")
    return out


def _stage_params(cfg: Config, arch: QwenVLArch) -> tuple[float, float]:
    """Parameters on one GPU of the first and of the last pipeline stage."""
    tp, pp = cfg.parallel.tensor_parallel_size, cfg.parallel.pipeline_parallel_size
    layers = arch.layers / pp * arch.layer_params / tp
    lm_head = (arch.embedding_params if arch.tied_embeddings else arch.lm_head_params) / tp
    first = layers + arch.embedding_params / tp + arch.vision_params
    last = layers + lm_head + arch.hidden
    if pp == 1:
        return first + last - layers - (lm_head if arch.tied_embeddings else 0), 0.0
    return first, last


def _activation_gib(cfg: Config, arch: QwenVLArch) -> tuple[float, float, float]:
    """(first-stage LM + ViT, last-stage LM, logits) activation GiB for the in-flight micro-batches."""
    p, r, t = cfg.parallel, cfg.rollout, cfg.trainer
    tp, pp, gc = p.tensor_parallel_size, p.pipeline_parallel_size, cfg.model.gradient_checkpointing
    tokens = t.micro_batch_size * (r.max_prompt_length + r.max_new_tokens)
    h, kv, f = arch.hidden, arch.kv_dim, arch.ffn
    full_layer = (12 * h + 4 * kv + 6 * f) / tp
    saved_layer = 2 * h / tp if gc else full_layer
    layers = arch.layers / pp
    microbatches = max(1, t.prompts_per_update * r.n // p.data_parallel_size // t.micro_batch_size)
    inflight = min(pp, microbatches)
    lm_one = tokens * (layers * saved_layer + (full_layer if gc else 0))
    v, vf = arch.vit_hidden, arch.vit_ffn
    patches = t.micro_batch_size * cfg.data.max_pixels / arch.vit_patch**2
    vit_full = 16 * v + 6 * vf
    vit = patches * (arch.vit_layers * (2 * v if gc else vit_full) + (vit_full if gc else 0))
    logits = tokens * arch.vocab / tp * 6
    return (inflight * (lm_one + vit)) / GIB, lm_one / GIB, logits / GIB


def plan(cfg: Config, arch: QwenVLArch, *, assumptions: PlanAssumptions = PlanAssumptions(), num_gpus: int = 0) -> Plan:
    """The estimates for ``cfg`` on ``num_gpus`` (default TP x PP x DP) H100s; ``problems`` lists shortfalls."""
    a, p, r, t = assumptions, cfg.parallel, cfg.rollout, cfg.trainer
    gpus = num_gpus or p.world_size
    out = Plan(arch=arch, num_gpus=gpus, problems=_topology_problems(cfg, arch))
    first, last = _stage_params(cfg, arch)
    act_first, act_last, logits = _activation_gib(cfg, arch)
    stages = [(first, act_first + (logits if p.pipeline_parallel_size == 1 else 0))]
    if p.pipeline_parallel_size > 1:
        stages.append((last, act_last + logits))
    dp_shards = p.data_parallel_size if p.distributed_optimizer else 1

    def train_rows(params: float, activations: float) -> dict[str, float]:
        rows = {"weights (bf16)": 2 * params, "grads (fp32)": 4 * params, "optimizer (fp32 x3 / DP)": 12 * params / dp_shards}
        if cfg.model.fp8:
            rows["fp8 weight copies"] = params
        if cfg.algorithm.loss.kl_coef > 0:
            rows["reference (bf16)"] = 2 * params
        rows = {k: v / GIB for k, v in rows.items()}
        return rows | {"activations": activations, "overhead": a.overhead_gib}

    out.train_gib = max((train_rows(*s) for s in stages), key=lambda rows: sum(rows.values()))
    params_gpu = max(first, last)
    seq_len = r.max_prompt_length + r.max_new_tokens
    engine_weights = 2 * arch.total_params / r.tensor_parallel_size / GIB
    pool = r.gpu_memory_utilization * a.gpu_memory_gib
    kv_gib = pool - engine_weights - a.vllm_activation_gib
    out.kv_sequences = kv_gib * GIB / (arch.kv_bytes_per_token(tp=r.tensor_parallel_size) * seq_len)
    out.rollout_gib = {"policy weights (bf16)": 2 * params_gpu / GIB, "overhead": a.overhead_gib,
                       "vLLM weights": engine_weights, "vLLM activations": a.vllm_activation_gib, "vLLM KV cache": kv_gib}
    out.refit_gb = 2 * arch.total_params / 1e9
    out.refit_s = (out.refit_gb / a.refit_gb_per_s[1], out.refit_gb / a.refit_gb_per_s[0])

    n_params, seqs = arch.total_params, t.prompts_per_step * r.n
    prompt_tokens, response_tokens = min(a.mean_prompt_tokens, r.max_prompt_length), min(a.mean_response_tokens, r.max_new_tokens)
    trained = seqs * (prompt_tokens + response_tokens)
    passes = 1 + (cfg.algorithm.loss.kl_coef > 0)
    out.flops = {
        "rollout": 2 * n_params * (seqs * response_tokens + t.prompts_per_step * prompt_tokens),
        "log-prob forwards": 2 * n_params * trained * passes,
        "training": 6 * n_params * trained * cfg.algorithm.ppo_epochs,
    }
    rate = gpus * a.peak_tflops * 1e12
    total = sum(out.flops.values())
    out.step_s = (total / (rate * a.mfu[1]) + out.refit_s[0], total / (rate * a.mfu[0]) + out.refit_s[1])

    cap = a.gpu_memory_gib
    if out.train_total > cap:
        rows = ", ".join(f"{k} {v:.1f}" for k, v in out.train_gib.items())
        out.problems.append(
            f"training phase needs {out.train_total:.1f} GiB per GPU > {cap:g} GiB ({out.train_total - cap:.1f} GiB short: "
            f"{rows}); raise parallel.tensor/pipeline/data_parallel_size, set model.gradient_checkpointing=true or "
            "lower trainer.micro_batch_size"
        )
    if out.rollout_total > cap + 1e-9:
        out.problems.append(
            f"rollout phase needs {out.rollout_total:.1f} GiB per GPU > {cap:g} GiB: policy weights "
            f"{2 * params_gpu / GIB:.1f} + overhead {a.overhead_gib:g} + vLLM pool {pool:.1f} "
            f"(rollout.gpu_memory_utilization={r.gpu_memory_utilization}); lower rollout.gpu_memory_utilization"
        )
    if out.kv_sequences < 1:
        out.problems.append(
            f"vLLM pool of {pool:.1f} GiB (rollout.gpu_memory_utilization={r.gpu_memory_utilization}) holds weights "
            f"{engine_weights:.1f} + activations {a.vllm_activation_gib:g} GiB but not one {seq_len}-token sequence "
            f"of KV cache; raise rollout.tensor_parallel_size or rollout.gpu_memory_utilization"
        )
    return out


def check_fits(plan_: Plan, *, recipe: str) -> None:
    """ValueError naming every shortfall of a plan."""
    if plan_.problems:
        raise ValueError(f"{recipe} cannot run on {plan_.num_gpus} x {plan_.arch.name} H100 GPUs:\n  - " + "\n  - ".join(plan_.problems))
