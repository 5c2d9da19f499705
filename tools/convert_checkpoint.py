"""Convert Qwen2 / Qwen2.5-VL checkpoints between Hugging Face and Megatron-Core (dist-checkpointing).

    python tools/convert_checkpoint.py hf-to-megatron --hf HF_DIR --out CKPT_DIR --tp 2 --pp 1
    python tools/convert_checkpoint.py megatron-to-hf --ckpt CKPT_DIR --out HF_DIR [--force]

Spawns tp*pp gloo worker processes on CPU; each streams one layer at a time (peak memory about one
shard plus one layer). The Megatron checkpoint loads at any TP/PP. Thin wrapper over
``mmupt_megatron.models.convert`` (also mounted as ``mmupt convert ...``).
"""

import sys

from mmupt_megatron.models.convert_cli import main

if __name__ == "__main__":  # required: workers are spawned and dist-checkpoint saving starts a process
    sys.exit(main())
