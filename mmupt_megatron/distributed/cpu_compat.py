"""Every patch that megatron-core 0.16.1 needs to run on a CPU-only torch build, in one place.

``apply_cpu_compat()`` is idempotent and does nothing when CUDA is available. No other module of this
project patches megatron or torch. What each patch works around (measured in /work/shared/STACK.md,
"megatron-core 0.16.1 on CPU"):

1. ``torch.cuda.current_device()`` is used as a ``device=`` argument all over megatron
   (``GlobalMemoryBuffer.get_tensor`` called by ``DotProductAttention.forward``,
   ``MultimodalRotaryEmbedding.__init__``, ``_ParamAndGradBuffer``): it returns the CPU device.
   ``torch.cuda.synchronize`` (``p2p_communication``, dist-checkpointing) becomes a no-op and
   ``torch.cuda.current_stream`` a dummy stream.
2. The RNG tracker (``tensor_parallel.random``: ``_get_cuda_rng_state`` / ``_set_cuda_rng_state`` and
   ``torch.cuda.get_rng_state / set_rng_state / manual_seed`` in ``CudaRNGStatesTracker.add`` and
   ``model_parallel_cuda_manual_seed``) uses the CPU generator.
3. Hard-coded ``device="cuda"`` allocations: ``total_num_tokens`` in ``pipeline_parallel.schedules``,
   ``found_inf`` / ``_scale`` in ``optimizer.optimizer``, ``dummy_overflow_buf`` in
   ``optimizer.clip_grads``, ``tmp_warmup_tensor`` in ``distributed.param_and_grad_buffer``,
   ``local_multi_tensor_l2_norm`` in ``megatron.core.utils``, ``get_default_causal_mask`` in
   ``transformer.utils``. Those modules see a ``torch`` whose tensor factories map ``"cuda"`` to CPU.
4. ``clip_grad_by_total_norm_fp32`` asserts ``param.grad.type() == 'torch.cuda.FloatTensor'``: replaced
   by an equivalent that scales the gradients in place on any device.
6. (scoped, ``cuda_type_names()``) ``DistributedOptimizer._build_model_and_main_param_groups`` and
   ``Float16OptimizerWithFloat16Params.__init__`` accept only parameters whose ``param.type()`` is a
   ``'torch.cuda.*Tensor'`` name: while the optimizer is built, CPU tensors report those names.
5. ``LanguageModule.setup_embeddings_and_output_layer`` moves the tied output weight with
   ``weight.data.cuda()`` under pipeline parallelism: ``Tensor.cuda`` returns the tensor itself (on a
   CPU-only build it could only raise).
7. Sequence parallelism: without apex the local layer spec's norm is ``WrappedTorchNorm``, which asserts
   ``not config.sequence_parallel``. A torch RMSNorm is exact on a sequence shard, so it is built as usual and
   its weights are marked ``sequence_parallel`` (as Megatron's fused norm does), so that
   ``finalize_model_grads`` all-reduces their gradients over the TP group. gloo itself has the collectives
   sequence parallelism uses (``all_gather_into_tensor``, ``reduce_scatter_tensor``: torch 2.13).
Model-config settings that CPU also needs (``use_cpu_initialization``, fusions off, fp32) live in
``mmupt_megatron.models.qwen2_5_vl``; the ``__main__`` guard that dist-checkpoint saving needs is the
caller's.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import types
from collections.abc import Iterator
from typing import Any

import torch

_APPLIED = False
_CPU = torch.device("cpu")

# Modules whose hard-coded device="cuda" allocations are redirected (patch 3).
_CUDA_DEVICE_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.utils",
    "megatron.core.transformer.utils",
)
_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like", "ones_like", "empty_like")


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.startswith("cuda")


def _cpu_factory(factory):
    def wrapped(*args, **kwargs):
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = _CPU
        kwargs.pop("pin_memory", None)
        return factory(*args, **kwargs)

    wrapped.__name__ = factory.__name__
    return wrapped


class _CpuTorch(types.ModuleType):
    """Stands in for ``torch`` inside the modules of patch 3: everything is torch's own, except that the
    tensor factories place ``device="cuda"`` tensors on the CPU."""

    def __init__(self) -> None:
        super().__init__("torch")
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


class _DummyStream:
    """What ``torch.cuda.current_stream()`` returns on CPU: every stream operation is a no-op."""

    def wait_stream(self, stream: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, event: Any = None) -> None:
        return None


def _clip_grad_by_total_norm(parameters, max_norm, total_norm, use_decoupled_grad: bool = False) -> None:
    """``megatron.core.optimizer.clip_grads.clip_grad_by_total_norm_fp32`` without the CUDA type assert."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff >= 1.0:
        return
    for param in parameters:
        grad = getattr(param, "decoupled_grad", None) if use_decoupled_grad else param.grad
        if grad is not None:
            grad.detach().mul_(clip_coeff)


def _tensor_cuda(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return self


def _sequence_parallel_torch_norm(original):
    """``WrappedTorchNorm.__new__`` that accepts ``config.sequence_parallel`` (patch 7)."""

    def new(cls, config, hidden_size, *args, **kwargs):
        if not config.sequence_parallel:
            return original(cls, config, hidden_size, *args, **kwargs)
        plain = copy.copy(config)
        plain.sequence_parallel = False
        norm = original(cls, plain, hidden_size, *args, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm

    return staticmethod(new)


def apply_cpu_compat() -> bool:
    """Patch megatron-core for CPU (see the module docstring); returns whether patches are in force."""
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True

    # 1. current device, synchronize, streams.
    torch.cuda.current_device = lambda: _CPU
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.current_stream = lambda device=None: _DummyStream()
    torch.cuda.default_stream = lambda device=None: _DummyStream()

    # 2. RNG: the "CUDA" generator is the CPU generator.
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    # (torch.manual_seed itself calls torch.cuda.manual_seed_all, which stays torch's lazy no-op.)
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    random_mod = importlib.import_module("megatron.core.tensor_parallel.random")
    random_mod._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    random_mod._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)

    # 3. device="cuda" allocations in specific modules.
    cpu_torch = _CpuTorch()
    for name in _CUDA_DEVICE_MODULES:
        module = importlib.import_module(name)
        assert getattr(module, "torch", None) is torch, f"{name} no longer imports torch as a module global"
        module.torch = cpu_torch

    # 4. clip_grad_by_total_norm_fp32's CUDA type assert (imported by name into optimizer.optimizer).
    for name in ("megatron.core.optimizer.clip_grads", "megatron.core.optimizer.optimizer"):
        importlib.import_module(name).clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm

    # 5. Tensor.cuda() in LanguageModule.setup_embeddings_and_output_layer (tied embeddings under PP).
    torch.Tensor.cuda = _tensor_cuda

    # 7. The local spec's torch norm under sequence parallelism.
    norm_cls = importlib.import_module("megatron.core.transformer.torch_norm").WrappedTorchNorm
    norm_cls.__new__ = _sequence_parallel_torch_norm(norm_cls.__new__)

    _APPLIED = True
    return True


@contextlib.contextmanager
def cuda_type_names() -> Iterator[None]:
    """Patch 6, only for the duration of the ``with`` block (megatron optimizer construction)."""
    if torch.cuda.is_available():
        yield
        return
    original = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu":
            return original(self).replace("torch.", "torch.cuda.", 1)
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = original
