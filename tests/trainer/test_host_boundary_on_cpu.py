"""What a worker returns reaches the driver in host memory (``trainer/host_boundary.py``): every public method of the
actor classes goes through the boundary, a policy that answers with device tensors (meta here, standing in for
CUDA) cannot leak them, and the cluster refuses a non-host tensor naming the method."""

import dataclasses
import inspect

import pytest
import torch

from mmupt_megatron.engines.rollout import Rollout
from mmupt_megatron.trainer.host_boundary import assert_on_host, to_host
from mmupt_megatron.trainer.workers import PolicyWorker, RolloutWorker


@pytest.mark.parametrize("cls", [PolicyWorker, RolloutWorker])
def test_every_public_worker_method_returns_through_the_host_boundary(cls):
    public = [name for name, attr in vars(cls).items() if not name.startswith("_") and inspect.isfunction(attr)]
    assert {"logprobs", "train", "refit"} <= set(public) or {"generate", "prompt_logprobs"} <= set(public)
    assert [name for name in public if not getattr(vars(cls)[name], "__host_boundary__", False)] == []
    # the wrapper keeps the signature Ray reads for its remote methods
    assert "reference" in inspect.signature(PolicyWorker.logprobs).parameters


class _DevicePolicy:
    """A policy whose outputs live on a device (``meta``: no CUDA here)."""

    def compute_logprobs(self, batch, *, temperature=None):  # noqa: ANN001, ARG002
        return torch.empty(2, 5, device="meta")

    def train_step(self, batch, **_):  # noqa: ANN001, ARG002
        return {"loss": 0.5}


def _worker(policy) -> PolicyWorker:  # noqa: ANN001
    worker = object.__new__(PolicyWorker)  # no Megatron: only the boundary is under test
    worker.policy, worker.reference = policy, None
    return worker


def test_a_policy_answering_with_device_tensors_cannot_leak_them_to_the_driver():
    worker = _worker(_DevicePolicy())
    try:
        out = worker.logprobs(batch=None)
    except RuntimeError as error:  # meta has no data to copy: the boundary says so, naming the method
        assert "PolicyWorker.logprobs returned a tensor on the meta device (shape (2, 5))" in str(error)
    else:
        assert out.device.type == "cpu", f"PolicyWorker.logprobs returned a tensor on {out.device}"
    assert worker.train(batch=None, global_num_tokens=1.0, global_num_seqs=1.0) == {"loss": 0.5}


def test_host_tensors_pass_detached_and_nested_values_keep_their_shape():
    leaf = torch.ones(3, requires_grad=True)
    rollout = Rollout(group_id=0, prompt_index=0, sample_index=0, prompt_token_ids=[1, 2], response_token_ids=[3],
                      response_logprobs=[-0.5], text="x", finish_reason="stop")
    out = to_host({"a": [leaf * 2, (leaf,)], "r": [rollout], "n": 3})
    assert not out["a"][0].requires_grad and torch.equal(out["a"][1][0], leaf.detach())
    assert out["r"][0] is rollout and out["n"] == 3  # nothing to move: the same objects

    @dataclasses.dataclass
    class Stats:
        logprobs: torch.Tensor

    moved = to_host(Stats(torch.zeros(2, requires_grad=True)))
    assert isinstance(moved, Stats) and not moved.logprobs.requires_grad


def test_the_cluster_refuses_a_device_tensor_naming_the_method():
    results = [torch.zeros(2), {"lp": torch.empty(4, 7, device="meta")}]
    with pytest.raises(RuntimeError, match=r"PolicyWorker\.logprobs returned a tensor on meta \(shape \(4, 7\)\)"):
        assert_on_host(results, where="PolicyWorker.logprobs")
    assert assert_on_host([torch.zeros(1)], where="x")[0].shape == (1,)
