"""The colocated memory schedule, in one place: the rollout engines and the policy take turns on the devices.

One step, colocated (``trainer.colocate=true``); every phase name is appended to ``MemorySchedule.log``:

| phase               | engines                          | policy (each rank)                                  |
|---------------------|----------------------------------|-----------------------------------------------------|
| rollout             | weights + KV cache on the device | weights only (grads, optimizer state, reference off)|
| ``after_rollout``   | sleep: weights and KV cache off  | weights only (the log-prob passes need no more)     |
| ``reference()``     | asleep                           | reference model on the device for its log-probs only|
| ``before_train``    | asleep                           | onload: optimizer state back, gradients allocated   |
| train               | asleep                           | weights, gradients, optimizer state                 |
| ``before_refit``    | wake their weights               | offload: gradients (dropped), optimizer state, ref  |
| refit               | weights                          | weights (the source)                                |
| ``after_refit``     | wake their KV cache              | weights only                                        |

| ``around_checkpoint`` | asleep (weights to host memory)  | weights + optimizer state (no gradients)         |

Not colocated, every phase is a no-op (the engines have devices of their own). ``around_checkpoint`` puts the
engines to sleep, brings the optimizer state back for a save or load (never the gradients: the save does not
read them), takes it off again and wakes the engines: on a 1x8 H100 7B recipe the engines' pool (39.8 GiB)
beside weights, gradients and optimizer state (8.4 + 16.7 + 12.5 GiB) would have filled the card at the first
save; the planner prices this phase (``launch/planner.py``). ``DeviceOps`` is whatever moves the memory: the
Ray cluster's fan-out to its actors, or an in-process policy in tests; on GPU each move ends with
``torch.cuda.empty_cache()`` in the process that made it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol


class DeviceOps(Protocol):
    def engines_sleep(self) -> None: ...

    def engines_wake(self, tags: tuple[str, ...]) -> None:
        """Wake what ``tags`` names ("weights", "kv_cache")."""

    def policy_offload(self) -> None:
        """Gradients, optimizer state and the reference model off the device (weights stay: refit reads them)."""

    def policy_onload(self, *, grads: bool = True) -> None:
        """Gradients and optimizer state back on the device (the reference stays off); without ``grads`` the
        optimizer state only."""

    def reference_onload(self) -> None: ...

    def reference_offload(self) -> None: ...


class MemorySchedule:
    def __init__(self, ops: DeviceOps, *, colocated: bool) -> None:
        self.ops, self.colocated = ops, colocated
        self.log: list[str] = []
        self._training = False  # the step's training state is on the device (set by before_train)

    def _phase(self, name: str) -> bool:
        if self.colocated:
            self.log.append(name)
        return self.colocated

    def before_first_rollout(self) -> None:
        """At start-up, before the engines measure their free memory: the policy keeps only its weights."""
        if self._phase("before_first_rollout"):
            self.ops.policy_offload()

    def after_rollout(self) -> None:
        if self._phase("after_rollout"):
            self.ops.engines_sleep()
        self._training = False

    def before_train(self) -> None:
        """Before each optimizer update; the first of a step brings the gradients and optimizer state back (the
        old- and reference-log-prob passes before it ran without them)."""
        if not self._training and self._phase("before_train"):
            self.ops.policy_onload()
        self._training = True

    @contextmanager
    def reference(self) -> Iterator[None]:
        """The reference model is on the device only inside this block."""
        if self._phase("reference_onload"):
            self.ops.reference_onload()
        try:
            yield
        finally:
            if self._phase("reference_offload"):
                self.ops.reference_offload()

    def before_refit(self) -> None:
        self._training = False
        if self._phase("before_refit"):
            self.ops.policy_offload()
            self.ops.engines_wake(("weights",))

    def after_refit(self) -> None:
        if self._phase("after_refit"):
            self.ops.engines_wake(("kv_cache",))

    @contextmanager
    def around_checkpoint(self) -> Iterator[None]:
        """Optimizer state on the device while a checkpoint is saved or loaded, the engines asleep meanwhile (they
        sleep between steps' refits otherwise awake); gradients stay off."""
        if self._phase("checkpoint_onload"):
            self.ops.engines_sleep()
            self.ops.policy_onload(grads=False)
        try:
            yield
        finally:
            if self._phase("checkpoint_offload"):
                self.ops.policy_offload()
                self.ops.engines_wake(("weights", "kv_cache"))
