"""mmupt-megatron: unsupervised post-training (MM-UPT) of multimodal LLMs on Megatron-Core, vLLM and Ray."""

__version__ = "0.1.0"
