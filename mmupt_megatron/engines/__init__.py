"""Engines: the Megatron policy, vLLM rollout, parallel setup and the CPU compat patches (one module)."""
