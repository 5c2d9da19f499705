"""Process groups and the Megatron runtime (parallel layout, CPU compatibility): below models and engines."""
