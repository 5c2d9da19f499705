"""The colocated memory schedule's checkpoint phase (``trainer/schedule.py``): a save or load runs with the engines
asleep and the policy's optimizer state on the device, never its gradients; not colocated, it moves nothing."""

from mmupt_megatron.trainer.schedule import MemorySchedule


class Ops:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def engines_sleep(self) -> None:
        self.calls.append(("engines_sleep",))

    def engines_wake(self, tags) -> None:  # noqa: ANN001
        self.calls.append(("engines_wake", *tags))

    def policy_offload(self) -> None:
        self.calls.append(("policy_offload",))

    def policy_onload(self, *, grads: bool = True) -> None:
        self.calls.append(("policy_onload", "grads" if grads else "no grads"))

    def reference_onload(self) -> None:
        self.calls.append(("reference_onload",))

    def reference_offload(self) -> None:
        self.calls.append(("reference_offload",))


def test_a_checkpoint_saves_with_the_engines_asleep_and_without_gradients():
    ops = Ops()
    schedule = MemorySchedule(ops, colocated=True)
    with schedule.around_checkpoint():
        ops.calls.append(("save",))
    # on 1x8 H100 (7B) the awake engines' pool beside weights, grads and Adam state would fill the card
    assert ops.calls == [("engines_sleep",), ("policy_onload", "no grads"), ("save",), ("policy_offload",),
                         ("engines_wake", "weights", "kv_cache")]
    assert schedule.log == ["checkpoint_onload", "checkpoint_offload"]


def test_a_failed_save_still_puts_memory_back_and_separate_devices_move_nothing():
    ops = Ops()
    schedule = MemorySchedule(ops, colocated=True)
    try:
        with schedule.around_checkpoint():
            raise OSError("disk full")
    except OSError:
        pass
    assert ops.calls[-2:] == [("policy_offload",), ("engines_wake", "weights", "kv_cache")]
    apart = Ops()
    with MemorySchedule(apart, colocated=False).around_checkpoint():
        pass
    assert apart.calls == []


def test_the_training_state_comes_back_before_the_first_update_only():
    ops = Ops()
    schedule = MemorySchedule(ops, colocated=True)
    schedule.after_rollout()
    with schedule.reference():
        pass
    for _ in range(3):  # three mini-batches: one onload
        schedule.before_train()
    schedule.before_refit()
    schedule.after_refit()
    assert ops.calls == [("engines_sleep",), ("reference_onload",), ("reference_offload",), ("policy_onload", "grads"),
                         ("policy_offload",), ("engines_wake", "weights"), ("engines_wake", "kv_cache")]
