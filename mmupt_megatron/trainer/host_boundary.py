"""Everything a worker returns to the driver is in host memory.

Ray pickles a tensor with torch's own reducer, which rebuilds a CUDA tensor on the same device index in the
receiving process: the driver would hold (or, without a GPU, fail to make) GPU memory of a device it does not
own, and then mix it with host tensors. So the actor classes the cluster starts (``workers.py``) pass every
public method's result through ``to_host`` (``@host_results``), and the cluster checks what arrives
(``assert_on_host``), naming the method that broke the rule.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, TypeVar

import torch

T = TypeVar("T")


_SCALARS = (int, float, str, bytes, bool, type(None))


def _walk(value: Any, fn: Any) -> Any:
    """``value`` with ``fn`` applied to every tensor inside lists, tuples, dicts and dataclasses. A sequence whose
    first item is a plain scalar is taken as all scalars (token ids, log-probs: not walked item by item)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, _SCALARS) or (isinstance(value, (list, tuple)) and value and isinstance(value[0], _SCALARS)):
        return value
    if isinstance(value, list):
        return [_walk(v, fn) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_walk(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _walk(v, fn) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: _walk(getattr(value, f.name), fn) for f in dataclasses.fields(value) if f.init}
        moved = {k: v for k, v in changes.items() if v is not getattr(value, k)}
        return dataclasses.replace(value, **moved) if moved else value
    return value


def to_host(value: T, *, where: str = "a worker") -> T:
    """``value`` with every tensor in it on the host (CPU) — detached, so no autograd graph travels."""

    def move(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type == "cpu":
            return tensor.detach() if tensor.requires_grad else tensor
        if tensor.device.type == "meta":
            raise RuntimeError(f"{where} returned a tensor on the meta device (shape {tuple(tensor.shape)}): it has "
                               "no data to bring to host memory")
        return tensor.detach().to("cpu")

    return _walk(value, move)


def assert_on_host(value: T, *, where: str) -> T:
    """``value`` unchanged if every tensor in it is in host memory, else RuntimeError naming ``where`` (the worker
    method) and the device."""

    def check(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type != "cpu":
            raise RuntimeError(f"{where} returned a tensor on {tensor.device} (shape {tuple(tensor.shape)}); workers "
                               "must return host tensors (trainer/host_boundary.py)")
        return tensor

    _walk(value, check)
    return value


def _through_host(method: Any, where: str) -> Any:
    @functools.wraps(method)
    def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
        return to_host(method(self, *args, **kwargs), where=where)

    wrapped.__host_boundary__ = True  # type: ignore[attr-defined]
    return wrapped


def host_results(cls: type[T]) -> type[T]:
    """Class decorator: each public method of ``cls`` returns its result through ``to_host``."""
    for name, attr in list(vars(cls).items()):
        if name.startswith("_") or isinstance(attr, (staticmethod, classmethod, property, type)) or not callable(attr):
            continue
        setattr(cls, name, _through_host(attr, f"{cls.__name__}.{name}"))
    return cls


__all__ = ["assert_on_host", "host_results", "to_host"]
