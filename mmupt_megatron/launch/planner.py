"""``mmupt plan``: per-GPU memory, refit bytes and time, FLOPs and a step-time range of a recipe on H100s,
for the layout the code builds.

Layout: the policy has TP x PP x DP ranks, one GPU each; rollout runs on ``cfg.num_engines()`` vLLM engines
(rollout.num_engines; auto = one per rollout.tensor_parallel_size policy GPUs when colocated, else 1) of
rollout.tensor_parallel_size GPUs each. Colocated (trainer.colocate), the engines share the policy's GPUs and
the memory schedule alternates: during rollout the policy's weights, gradients, optimizer state and the
reference model are offloaded to CPU and the engine's weights + KV cache hold the GPU; the engine then
sleeps (weights to CPU, KV cache freed) while the policy onloads, computes old / reference log-probs (the
reference is resident only then), and trains. Not colocated, the engines have GPUs of their own (TP x PP x DP
+ engines x engine TP in all) and the policy stays resident.

Memory per GPU (GiB), on the fuller of the first and last pipeline stage:
  stage params P = layers/PP x layer/TP + embedding/TP (first) | lm_head/TP (last) + the ViT (first; the vision
  tower is replicated on every TP rank). weights 2P (bf16), grads 4P (fp32 main grads), optimizer 12P / DP
  (fp32 master + Adam m, v; Megatron's distributed optimizer shards them over DP), FP8 weight copies 1P.
  Log-prob phase: the weights (colocated: gradients and optimizer state come back only before training, not
  colocated they stay) + the reference policy 2P (when algorithm.loss.kl_coef > 0) + forward-only logits.
  Training phase: those + activations (the reference is offloaded).
  Checkpoint phase (a save or a load): weights + optimizer state, no gradients; colocated, the engines sleep
  meanwhile (``trainer/schedule.around_checkpoint``). Each phase must fit the GPU, else the plan names it.
  Activations per micro-batch (bf16; flash attention: no s^2 term; the residual stream is whole on every TP rank
  unless parallel.sequence_parallel splits its 8h bytes over TP), per token and layer:
  attention 4h + (4h + 4kv)/TP bytes (norm in, QKV in | Q, K/V, attention out) + MLP 4h + 6f/TP bytes (norm
  in, fc1 in | gate/up out, SwiGLU out); with model.gradient_checkpointing only the
  layer input (2h) stays, plus one layer being recomputed. The first stage holds min(PP, micro-batches)
  micro-batches (1F1B). Tokens per micro-batch = micro_batch_size x (max_prompt_length + max_new_tokens) (the
  padded worst case), or trainer.max_tokens_per_micro_batch. The ViT (not TP-sharded) adds (16v + 6f_v) bytes per
  patch and layer (2v with recomputation), patches = micro_batch_size x data.max_pixels / 14^2 (with a token
  budget: 4 per token, its worst case: every token an image's, each image distinct). The last stage's backward peaks with
  the logits: tokens x vocab/TP x 5.5 bytes (measured 5.0-6.1: the output layer's bf16 [T, B, V] logits,
  their [B, T, V] copy, and more) + the output layer's bf16 weight gradient (2 x vocab/TP x h) before it is added to its
  fp32 main grad; with recomputation, whichever is larger of that and one recomputed layer. Plus 4 GiB (CUDA context, NCCL buffers, allocator fragmentation). Checked against the real
  code built at full size on fake tensors: ``mmupt_megatron/launch/fake_rank.py``.
Rollout phase (engine GPUs): 4 GiB + vLLM's pool (rollout.gpu_memory_utilization x 80 GiB), which holds the
engine's weights (2 bytes x params / rollout TP), 2 GiB of activations, and the KV cache; colocated, the
policy's memory is on CPU then; not colocated, engine GPUs hold only the engine.
Refit: every engine receives 2 bytes x params from the closest DP replica of the policy, all replicas at once
(``engines/refit_routes.py``), by the transport ``rollout.refit_transport=auto`` picks there: CUDA IPC when every
engine sits on its replica's GPU (colocated, policy and engines TP 1, PP 1: device-memcpy rate), host shared
memory for other colocated layouts (a tensor-parallel engine shares the sending GPU, which NCCL cannot hold twice,
and Ray shows each actor only its own GPU, so an IPC handle does not open on another: host-copy rate, the slow
path of TP > 1 recipes), NCCL broadcast for engines on GPUs of their own (NVLink within one node, the network
across nodes) and for engines on another node than the sender (a replica that spans nodes: shared memory to its
node's engines, then NCCL to the others', priced as the sum).
Step time: rollout = prefill (2 x params x prompt tokens, once per prompt, compute-bound at the MFU range)
+ decode, memory-bandwidth bound: each decode step of an engine reads its weight shard and the KV cache of
its running sequences from HBM (3.35 TB/s on H100 SXM, at 50-80% efficiency), one token per running
sequence per step, running sequences = min(the engine's share, vLLM's max_num_seqs 256, what the KV cache
holds at mean length); the step's longest response (rollout.max_new_tokens) adds its tail beyond the mean. Log-prob forwards 2 x params x trained tokens (old policy unless the step is one
on-policy update, and reference when KL is on) + training 6 x params x trained tokens x ppo_epochs at MFU 16-23% of 989 TFLOP/s (EasyR1's measured
actor MFU on 8xH100), recomputation and attention-score FLOPs excluded. + refit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mmupt_megatron.config import Config
from mmupt_megatron.launch.arch import QwenVLArch

GIB = 2**30
LOGIT_BYTES = 5.5
"""Bytes per logit entry at the backward's peak, measured on the real code (fake_rank.py): the output layer's
bf16 [T, B, V] logits and their [B, T, V] copy (4) plus 1.0 (3B: TP 1, tied embeddings) to 2.1 (7B: TP 2,
untied); their gradients replace them."""


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
    refit_gb_per_s: dict[str, tuple[float, float]] = field(default_factory=lambda: {
        "cuda_ipc": (600.0, 1500.0), "nccl_nvlink": (100.0, 300.0), "nccl": (25.0, 50.0), "shm": (2.0, 10.0)})
    """Refit bandwidth (GB/s, low-high) per transport: CUDA IPC ~ a device-to-device copy (H100 ~3 TB/s HBM,
    read + write), NCCL broadcast within a node ~ NVLink (450 GB/s per direction on H100 SXM; a broadcast reaches
    a fraction), across nodes ~ the network (400 Gb/s InfiniBand per GPU = 50 GB/s; NeMo-RL moves Qwen3-4B, ~8 GB,
    in 0.21-0.34 s: 25-40 GB/s), host shared memory ~ pageable device-host copies each way."""
    gpus_per_node: int = 8
    hbm_gb_per_s: float = 3350.0
    """H100 SXM HBM3 bandwidth: decode is bound by it."""
    decode_efficiency: tuple[float, float] = (0.5, 0.8)
    """Share of the HBM bandwidth a decode step achieves (low-high)."""
    max_num_seqs: int = 256
    """vLLM's default cap on running sequences per engine."""
    overhead_gib: float = 4.0
    """CUDA context, NCCL buffers, allocator fragmentation."""
    vllm_activation_gib: float = 2.0
    """vLLM's activations / CUDA graphs inside its pool."""


def refit_transport_of(cfg: Config, a: PlanAssumptions) -> str:
    """What ``refit_routes.refit_transports`` picks on GPUs for this recipe's layout (module docstring); ``+``
    joins the transports of a replica that spans nodes (its stages reach their own node's engines by shared memory
    and the other nodes' by NCCL, one after the other: the senders take turns, ``refit_routes.refit_waves``)."""
    p, r = cfg.parallel, cfg.rollout
    if cfg.trainer.colocate:
        same_gpu = r.tensor_parallel_size == 1 and p.tensor_parallel_size == 1 and p.pipeline_parallel_size == 1
        spans_nodes = p.tensor_parallel_size * p.pipeline_parallel_size > a.gpus_per_node
        return "cuda_ipc" if same_gpu else ("shm+nccl" if spans_nodes else "shm")
    one_node = p.world_size + cfg.num_engines() * r.tensor_parallel_size <= a.gpus_per_node
    return "nccl_nvlink" if one_node else "nccl"


@dataclass(kw_only=True)
class Plan:
    arch: QwenVLArch
    num_gpus: int
    train_gib: dict[str, float] = field(default_factory=dict)
    rollout_gib: dict[str, float] = field(default_factory=dict)
    kv_sequences: float = 0.0
    logprob_gib: dict[str, float] = field(default_factory=dict)
    checkpoint_gib: dict[str, float] = field(default_factory=dict)
    """A checkpoint's save or load: weights + optimizer state, no gradients; colocated engines asleep."""
    activation_parts: dict[str, float] = field(default_factory=dict)
    """The first stage's activation GiB by part: language model, vision tower, logits."""
    num_engines: int = 1
    colocated: bool = True
    refit_transport: str = "cuda_ipc"
    refit_gb: float = 0.0
    refit_s: tuple[float, float] = (0.0, 0.0)
    rollout_s: tuple[float, float] = (0.0, 0.0)
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


def _tokens(cfg: Config) -> int:
    """Tokens of one micro-batch at full length (the padded worst case), or the token budget."""
    if cfg.trainer.max_tokens_per_micro_batch is not None:
        return cfg.trainer.max_tokens_per_micro_batch
    return cfg.trainer.micro_batch_size * (cfg.rollout.max_prompt_length + cfg.rollout.max_new_tokens)


def _activation_gib(cfg: Config, arch: QwenVLArch) -> tuple[float, float, dict[str, float]]:
    """Activation GiB of the first and the last pipeline stage (equal objects when PP = 1), and the first
    stage's parts: language model (what the in-flight micro-batches keep for the backward), vision tower, and
    the backward's peak on top of them (the logits stage: logits + the largest weight's bf16 gradient before it
    reaches its fp32 main grad; or one recomputed layer, whichever is larger)."""
    p, r, t = cfg.parallel, cfg.rollout, cfg.trainer
    tp, pp, gc = p.tensor_parallel_size, p.pipeline_parallel_size, cfg.model.gradient_checkpointing
    tokens = _tokens(cfg)
    h, kv, f = arch.hidden, arch.kv_dim, arch.ffn
    full_layer = 8 * h / (tp if p.sequence_parallel else 1) + (4 * h + 4 * kv + 6 * f) / tp
    saved_layer = 2 * h if gc else full_layer
    layers = arch.layers / pp
    sequences = max(1, tokens // (r.max_prompt_length + r.max_new_tokens))  # per micro-batch (budget: at full length)
    microbatches = max(1, t.prompts_per_update * r.n // p.data_parallel_size // sequences)
    inflight = min(pp, microbatches)
    lm_saved = tokens * layers * saved_layer
    recompute = tokens * full_layer if gc else 0.0
    v, vf = arch.vit_hidden, arch.vit_ffn
    patches = (4 * tokens if t.max_tokens_per_micro_batch is not None
               else t.micro_batch_size * cfg.data.max_pixels / arch.vit_patch**2)
    vit_full = 16 * v + 6 * vf
    vit = patches * (arch.vit_layers * (2 * v if gc else vit_full) + (vit_full if gc else 0))
    head_peak = tokens * arch.vocab / tp * LOGIT_BYTES + 2 * arch.vocab / tp * h
    first_peak = max(recompute, head_peak) if pp == 1 else recompute
    first = inflight * (lm_saved + vit) + first_peak
    last = lm_saved + max(recompute, head_peak)
    parts = {"language model": inflight * lm_saved, "vision tower": inflight * vit, "backward peak": first_peak}
    return first / GIB, last / GIB, {k: v / GIB for k, v in parts.items()}


def plan(cfg: Config, arch: QwenVLArch, *, assumptions: PlanAssumptions = PlanAssumptions(), num_gpus: int = 0) -> Plan:
    """The estimates for ``cfg`` on ``num_gpus`` H100s (default: TP x PP x DP, plus the engines' GPUs when not
    colocated); ``problems`` lists shortfalls."""
    a, p, r, t = assumptions, cfg.parallel, cfg.rollout, cfg.trainer
    gpus = num_gpus or p.world_size
    out = Plan(arch=arch, num_gpus=gpus, problems=_topology_problems(cfg, arch))
    first, last = _stage_params(cfg, arch)
    act_first, act_last, out.activation_parts = _activation_gib(cfg, arch)
    stages = [(first, act_first)]
    if p.pipeline_parallel_size > 1:
        stages.append((last, act_last))
    logits = _tokens(cfg) * arch.vocab / p.tensor_parallel_size / GIB
    dp_shards = p.data_parallel_size if p.distributed_optimizer else 1

    def state_rows(params: float) -> dict[str, float]:
        rows = {"weights (bf16)": 2 * params, "grads (fp32)": 4 * params, "optimizer (fp32 x3 / DP)": 12 * params / dp_shards}
        if cfg.model.fp8:
            rows["fp8 weight copies"] = params
        return {k: v / GIB for k, v in rows.items()}

    out.train_gib = max(
        (state_rows(params) | {"activations": act, "overhead": a.overhead_gib} for params, act in stages),
        key=lambda rows: sum(rows.values()),
    )
    forward_logits = logits * 2 * 2  # forward only: bf16 logits and their [B, T, V] copy
    without_training_state = (  # colocated, grads and optimizer state come back only before training
        lambda rows: {k: v for k, v in rows.items() if not k.startswith(("grads", "optimizer"))} if t.colocate else rows)
    out.logprob_gib = max(
        (without_training_state(state_rows(params))
         | ({"reference (bf16)": 2 * params / GIB} if cfg.algorithm.loss.kl_coef > 0 else {})
         | {"forward logits": forward_logits, "overhead": a.overhead_gib} for params, _ in stages),
        key=lambda rows: sum(rows.values()),
    )
    out.checkpoint_gib = max(
        ({k: v for k, v in state_rows(params).items() if not k.startswith("grads")} | {"overhead": a.overhead_gib}
         for params, _ in stages),
        key=lambda rows: sum(rows.values()),
    )
    out.colocated = t.colocate
    out.num_engines = cfg.num_engines()
    if not num_gpus:
        gpus = p.world_size if t.colocate else p.world_size + out.num_engines * r.tensor_parallel_size
        out.num_gpus = gpus
    seq_len = r.max_prompt_length + r.max_new_tokens
    engine_weights = 2 * arch.total_params / r.tensor_parallel_size / GIB
    pool = r.gpu_memory_utilization * a.gpu_memory_gib
    kv_gib = pool - engine_weights - a.vllm_activation_gib
    kv_token = arch.kv_bytes_per_token(tp=r.tensor_parallel_size)
    out.kv_sequences = kv_gib * GIB / (kv_token * seq_len)
    out.rollout_gib = {"overhead": a.overhead_gib, "vLLM weights": engine_weights,
                       "vLLM activations": a.vllm_activation_gib, "vLLM KV cache": kv_gib}
    out.refit_gb = 2 * arch.total_params / 1e9
    out.refit_transport = refit_transport_of(cfg, a)
    kinds = out.refit_transport.split("+")  # every engine its full copy, replicas at once, a mix in turn
    out.refit_s = (sum(out.refit_gb / a.refit_gb_per_s[k][1] for k in kinds),
                   sum(out.refit_gb / a.refit_gb_per_s[k][0] for k in kinds))

    n_params, seqs = arch.total_params, t.prompts_per_step * r.n
    prompt_tokens, response_tokens = min(a.mean_prompt_tokens, r.max_prompt_length), min(a.mean_response_tokens, r.max_new_tokens)
    trained = seqs * (prompt_tokens + response_tokens)
    passes = (not cfg.on_policy()) + (cfg.algorithm.loss.kl_coef > 0)
    out.flops = {
        "rollout": 2 * n_params * (seqs * response_tokens + t.prompts_per_step * prompt_tokens),
        "log-prob forwards": 2 * n_params * trained * passes,
        "training": 6 * n_params * trained * cfg.algorithm.ppo_epochs,
    }
    # Decode: memory-bandwidth bound. Per engine, `running` sequences advance one token per step; a step reads
    # the engine's weight shard and the running sequences' KV cache (mean context: prompt + half the response).
    per_engine = math.ceil(seqs / out.num_engines)
    mean_context = prompt_tokens + response_tokens / 2
    fits = max(1, int(kv_gib * GIB / (kv_token * (prompt_tokens + response_tokens)))) if kv_gib > 0 else 1
    running = max(1, min(per_engine, a.max_num_seqs, fits))
    step_bytes = 2 * n_params / r.tensor_parallel_size + running * mean_context * kv_token
    # continuous batching keeps `running` sequences busy until the last ones, and the step ends with its longest
    # response (up to max_new_tokens): the tail beyond the mean runs at the same per-step cost
    steps = math.ceil(per_engine * response_tokens / running) + (r.max_new_tokens - response_tokens)
    decode = [steps * step_bytes / (a.hbm_gb_per_s * 1e9 * eff) for eff in a.decode_efficiency]
    engine_gpus = out.num_engines * r.tensor_parallel_size
    prefill_flops = 2 * n_params * t.prompts_per_step * prompt_tokens
    prefill = [prefill_flops / (engine_gpus * a.peak_tflops * 1e12 * mfu) for mfu in a.mfu]
    out.rollout_s = (decode[1] + prefill[1], decode[0] + prefill[0])
    policy_rate = p.world_size * a.peak_tflops * 1e12
    train_flops = out.flops["log-prob forwards"] + out.flops["training"]
    out.step_s = (out.rollout_s[0] + train_flops / (policy_rate * a.mfu[1]) + out.refit_s[0],
                  out.rollout_s[1] + train_flops / (policy_rate * a.mfu[0]) + out.refit_s[1])

    cap = a.gpu_memory_gib
    if out.train_total > cap:
        rows = ", ".join(f"{k} {v:.1f}" for k, v in out.train_gib.items())
        out.problems.append(
            f"training phase needs {out.train_total:.1f} GiB per GPU > {cap:g} GiB ({out.train_total - cap:.1f} GiB short: "
            f"{rows}); raise parallel.tensor/pipeline/data_parallel_size, set model.gradient_checkpointing=true or "
            "lower trainer.micro_batch_size"
        )
    logprob_total = sum(out.logprob_gib.values())
    if logprob_total > cap:
        rows = ", ".join(f"{k} {v:.1f}" for k, v in out.logprob_gib.items())
        out.problems.append(f"log-prob phase needs {logprob_total:.1f} GiB per GPU > {cap:g} GiB ({rows})")
    checkpoint_total = sum(out.checkpoint_gib.values())
    if checkpoint_total > cap:
        rows = ", ".join(f"{k} {v:.1f}" for k, v in out.checkpoint_gib.items())
        out.problems.append(f"checkpoint phase needs {checkpoint_total:.1f} GiB per GPU > {cap:g} GiB ({rows})")
    if out.rollout_total > cap + 1e-9:
        out.problems.append(
            f"rollout phase needs {out.rollout_total:.1f} GiB per GPU > {cap:g} GiB: overhead {a.overhead_gib:g} + "
            f"vLLM pool {pool:.1f} (rollout.gpu_memory_utilization={r.gpu_memory_utilization}); lower "
            "rollout.gpu_memory_utilization"
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
