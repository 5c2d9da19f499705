"""Model providers (Qwen2.5-VL: Megatron GPTModel + replicated HF vision tower), HF <-> Megatron mappings
and checkpoint conversion, tiny offline checkpoints for tests."""
