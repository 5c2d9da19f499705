"""Host copies of nested state (an optimizer's state dict) and their comparison, for the GPU suite's round trips.

A state dict holds *references* to the optimizer's live tensors (the same objects that offload / onload and a
checkpoint load write into), so comparing a state dict taken before a round trip with one taken after compares
those tensors with themselves: ``snapshot`` copies every tensor to the host at the time it is called."""

from __future__ import annotations

import torch


def tensors(obj) -> list[torch.Tensor]:
    """Every tensor inside nested dicts / lists / tuples."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for value in obj.values() for t in tensors(value)]
    if isinstance(obj, (list, tuple)):
        return [t for value in obj for t in tensors(value)]
    return []


def snapshot(obj):
    """``obj`` with every tensor replaced by a host copy of it (containers rebuilt, other values kept)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {key: snapshot(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(value) for value in obj)
    return obj


def equal_nested(a, b) -> bool:
    """Same structure (dicts compared by key, in any order), same values, tensors bit-equal on the host."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu())
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal_nested(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(equal_nested(x, y) for x, y in zip(a, b))
    return a == b
