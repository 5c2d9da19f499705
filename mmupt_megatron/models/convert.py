"""HF <-> Megatron checkpoint conversion (dist-checkpointing on the Megatron side).

A Megatron checkpoint folder made here holds:
    megatron/                 megatron-core dist-checkpoint (torch_dist): loads at any TP/PP
    hf/                       the HF config, tokenizer and preprocessor files (no weights)
    mmupt_checkpoint.json     the TP/PP/dtype it was written with: written last, it marks the folder complete
An output folder must not be, contain or sit inside an input; ``force`` replaces only a folder an earlier
conversion wrote (``output_dirs``). An HF output gets its config.json last (after the weights), so a killed
conversion leaves neither a Megatron nor an HF checkpoint that tools would load.
``hf_to_megatron`` / ``megatron_to_hf`` spawn tp*pp gloo workers on CPU (``convert_on_cpu_workers``);
inside an already-initialised job use ``save_megatron_checkpoint`` / ``load_megatron_checkpoint`` /
``load_hf_weights`` / ``export_hf_weights`` directly. Each worker streams one layer at a time, and the
dist-checkpoint is written from and read into the parameters' own memory (``checkpoint_state``), so its
peak memory is about its model shard plus one layer. Entry scripts need a ``__main__`` guard (workers are
spawned, and dist-checkpoint saving starts a process).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from mmupt_megatron.distributed.parallel import ParallelDims, init_parallel, run_workers
from mmupt_megatron.models.hf_config import LMArch, load_arch, read_hf_config
from mmupt_megatron.models.safe_files import check_dist_checkpoint
from mmupt_megatron.models.safetensors_io import tensor_bytes
from mmupt_megatron.models.weights import export_hf_weights, load_hf_weights
from mmupt_megatron.output_dirs import check_apart, prepare_owned_dir

META_FILE = "mmupt_checkpoint.json"
MEGATRON_SUBDIR = "megatron"
DIST_CHECKPOINT_FILES = ("metadata.json", ".metadata")
"""Files every megatron-core torch_dist checkpoint has (its format and the tensor index)."""
HF_SUBDIR = "hf"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_WEIGHT_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def prepare_output_dir(out_dir: str | Path, *, force: bool, inputs: dict[str, str | Path], kind: str) -> Path:
    """Create ``out_dir`` (marked as ours). ValueError if it is, contains or sits inside one of ``inputs``,
    or is non-empty, unless ``force`` and an earlier conversion wrote it (then it is replaced)."""
    check_apart(out_dir, inputs, out_label="--out")
    return prepare_owned_dir(out_dir, kind=kind, force=force, out_label="--out")


def copy_hf_metadata(src: str | Path, dst: str | Path) -> None:
    """Copy config / tokenizer / preprocessor / chat-template files (everything but weights)."""
    for path in Path(src).iterdir():
        if path.is_file() and not path.name.endswith(_WEIGHT_SUFFIXES) and path.name not in _WEIGHT_NAMES:
            shutil.copy2(path, Path(dst) / path.name)


def hf_dtype(hf_dir: str | Path) -> torch.dtype:
    raw = read_hf_config(hf_dir)
    name = raw.get("dtype") or raw.get("torch_dtype") or (raw.get("text_config") or {}).get("dtype") or "float32"
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"{hf_dir}/config.json: unsupported dtype {name!r}")
    return getattr(torch, name)


def read_checkpoint_meta(ckpt_dir: str | Path) -> dict:
    """The checkpoint's metadata; ValueError unless ``ckpt_dir`` is a complete checkpoint made here."""
    path = Path(ckpt_dir) / META_FILE
    if not path.is_file():
        raise ValueError(f"{ckpt_dir} is not a complete mmupt Megatron checkpoint: {path} does not exist "
                         "(not a checkpoint, or its writing was interrupted)")
    data = Path(ckpt_dir) / MEGATRON_SUBDIR
    missing = [name for name in DIST_CHECKPOINT_FILES if not (data / name).is_file()]
    if missing:
        raise ValueError(f"{ckpt_dir} is an incomplete Megatron checkpoint: {data} lacks {missing}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is damaged: {error}") from None


def checkpoint_arch(ckpt_dir: str | Path) -> LMArch:
    read_checkpoint_meta(ckpt_dir)
    return load_arch(Path(ckpt_dir) / HF_SUBDIR, require_weights=False)


CHECKPOINT_BLOCK_BYTES = 32 << 20
"""Tensors larger than this are saved as row blocks of about this size (items the reader loads one by one)."""


def _alias(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s memory as a tensor whose storage is exactly those bytes. Checkpoint writers clone every
    view of a larger storage before writing (megatron-core clones all of them up front: every SwiGLU
    gate/up half, or a whole shard whose parameters live in one buffer); an alias is written as it is,
    and a load into it fills the parameter in place."""
    if tensor.device.type != "cpu" or tensor.numel() == 0 or tensor.untyped_storage().nbytes() == tensor.nbytes:
        return tensor
    assert tensor.is_contiguous(), "checkpoint tensors are contiguous slices of parameters"
    return torch.frombuffer(tensor_bytes(tensor), dtype=tensor.dtype).view(tensor.shape)


def _blocks(sh_ten, block_bytes: int) -> list:
    """A ShardedTensor as equal row blocks of at most ``block_bytes`` (the same global tensor, a finer grid),
    each an alias of its rows; unchanged (but aliased) if it is small or its rows do not split evenly."""
    from dataclasses import replace

    data = sh_ten.data
    if data is None or sh_ten.flattened_range is not None:
        return [sh_ten]
    axis, rows = sh_ten.prepend_axis_num, (sh_ten.local_shape[0] if sh_ten.local_shape else 0)
    parts = 1
    while data.nbytes // parts > block_bytes and rows % (2 * parts) == 0 and sh_ten.global_offset[axis] % rows == 0:
        parts *= 2
    if parts == 1:
        return [replace(sh_ten, data=_alias(data))]
    size = rows // parts
    blocks = []
    for index in range(parts):
        offset, grid = list(sh_ten.global_offset), list(sh_ten.axis_fragmentations)
        offset[axis] += index * size
        grid[axis] *= parts
        blocks.append(replace(sh_ten, data=_alias(data[index * size : (index + 1) * size]),
                              local_shape=(size, *sh_ten.local_shape[1:]), global_offset=tuple(offset),
                              axis_fragmentations=tuple(grid)))
    return blocks


def checkpoint_state(model: torch.nn.Module, *, block_bytes: int | None = None) -> dict:
    """``model.sharded_state_dict()`` ready to save or load with no copy of the model: factories applied
    (the SwiGLU gate/up split), every tensor an alias of its parameter's memory, large ones in row blocks
    (a reader holds one saved item at a time, so the largest item bounds its extra memory). A key whose
    value became a list of blocks is loaded in place."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    block_bytes = CHECKPOINT_BLOCK_BYTES if block_bytes is None else block_bytes
    state = model.sharded_state_dict()
    apply_factories(state)
    for key, value in state.items():
        items = value if isinstance(value, list) else [value]
        if all(isinstance(item, ShardedTensor) for item in items):
            blocks = [block for item in items for block in _blocks(item, block_bytes)]
            state[key] = blocks if isinstance(value, list) or len(blocks) > 1 else blocks[0]
    return state


def save_megatron_checkpoint(model: torch.nn.Module, ckpt_dir: str | Path, *, hf_meta_dir: str | Path | None) -> None:
    """Collective: save ``model`` (all ranks) into ``ckpt_dir``, which rank 0 has prepared."""
    from megatron.core import dist_checkpointing

    ckpt = Path(ckpt_dir)
    if dist.get_rank() == 0:
        (ckpt / MEGATRON_SUBDIR).mkdir(parents=True, exist_ok=True)
        (ckpt / HF_SUBDIR).mkdir(exist_ok=True)
        if hf_meta_dir is not None:
            copy_hf_metadata(hf_meta_dir, ckpt / HF_SUBDIR)
    dist.barrier()
    dist_checkpointing.save(checkpoint_state(model), str(ckpt / MEGATRON_SUBDIR))
    dist.barrier()
    if dist.get_rank() == 0:  # the completion marker, once every rank's data is written
        dims = model.groups.dims
        meta = {"tp": dims.tp, "pp": dims.pp, "dtype": str(model.config.params_dtype).removeprefix("torch."),
                "model_type": model.arch.model_type, "format": "megatron-core dist-checkpoint (torch_dist)"}
        (ckpt / META_FILE).write_text(json.dumps(meta, indent=2))
    dist.barrier()


def load_megatron_checkpoint(model: torch.nn.Module, ckpt_dir: str | Path) -> None:
    """Collective: fill ``model`` (any TP/PP) from the dist-checkpoint in ``ckpt_dir``. Tensors are read
    straight into the parameters (``checkpoint_state``); only non-tensor state goes through
    ``load_state_dict``."""
    from megatron.core import dist_checkpointing

    read_checkpoint_meta(ckpt_dir)
    check_dist_checkpoint(Path(ckpt_dir) / MEGATRON_SUBDIR)  # before megatron-core unpickles its index
    requested = checkpoint_state(model)
    targets = {key: [item.data for item in value] for key, value in requested.items() if isinstance(value, list)}
    state = dist_checkpointing.load(requested, str(Path(ckpt_dir) / MEGATRON_SUBDIR))
    in_place = {key for key, value in state.items() if isinstance(value, list)}
    for key in in_place:  # blocks are loaded into the parameters' memory; copy any the loader did not
        for loaded, target in zip(state[key], targets[key], strict=True):
            if loaded.data_ptr() != target.data_ptr():
                target.copy_(loaded)
    rest = {key: value for key, value in state.items() if key not in in_place}
    missing, unexpected = model.load_state_dict(rest, strict=False)
    missing = [key for key in missing if not key.endswith("_extra_state") and key not in in_place]
    if missing or unexpected:
        raise ValueError(f"{ckpt_dir}: checkpoint does not fit the model (missing {missing[:4]}, unexpected {unexpected[:4]})")


def build_model(arch: LMArch, groups, *, dtype: torch.dtype, init_weights: bool = False, fp8: bool = False,
                fp8_recipe: str = "delayed", recompute: bool = False, sequence_parallel: bool = False,
                deterministic: bool = False) -> torch.nn.Module:
    """The policy model; ``fp8`` / ``fp8_recipe`` / ``recompute`` / ``sequence_parallel`` / ``deterministic`` are
    model.fp8 / model.fp8_recipe / model.gradient_checkpointing / parallel.sequence_parallel / trainer.deterministic."""
    from mmupt_megatron.models.qwen2_5_vl import Qwen2_5_VLModel

    return Qwen2_5_VLModel(arch, groups, dtype=dtype, init_weights=init_weights, fp8=fp8, fp8_recipe=fp8_recipe,
                           recompute=recompute, sequence_parallel=sequence_parallel, deterministic=deterministic)


def _hf_to_megatron_worker(hf_dir: str, out_dir: str, tp: int, pp: int) -> None:
    arch = load_arch(hf_dir)
    groups = init_parallel(ParallelDims(tp=tp, pp=pp))
    model = build_model(arch, groups, dtype=hf_dtype(hf_dir))
    load_hf_weights(model, hf_dir)
    save_megatron_checkpoint(model, out_dir, hf_meta_dir=hf_dir)


def _megatron_to_hf_worker(ckpt_dir: str, out_dir: str, tp: int, pp: int) -> None:
    arch = checkpoint_arch(ckpt_dir)
    meta = read_checkpoint_meta(ckpt_dir)
    groups = init_parallel(ParallelDims(tp=tp, pp=pp))
    model = build_model(arch, groups, dtype=getattr(torch, meta["dtype"]))
    load_megatron_checkpoint(model, ckpt_dir)
    export_hf_weights(model, out_dir)
    if groups.rank == 0:
        copy_hf_metadata(Path(ckpt_dir) / HF_SUBDIR, out_dir)
    dist.barrier()


def _validate(arch: LMArch, tp: int, pp: int) -> None:
    ParallelDims(tp=tp, pp=pp).validate(
        world_size=tp * pp, num_attention_heads=arch.num_attention_heads, num_kv_heads=arch.num_kv_heads,
        num_layers=arch.num_layers,
    )


def convert_on_cpu_workers(worker, *, world_size: int, args: tuple) -> None:
    """Launcher: run a conversion worker on ``world_size`` spawned gloo processes."""
    run_workers(worker, world_size=world_size, args=args)


def hf_to_megatron(hf_dir: str | Path, out_dir: str | Path, *, tp: int = 1, pp: int = 1, force: bool = False) -> Path:
    """Convert an HF Qwen2 / Qwen2.5-VL folder into a Megatron dist-checkpoint at TP=tp, PP=pp."""
    arch = load_arch(hf_dir)
    _validate(arch, tp, pp)
    out = prepare_output_dir(out_dir, force=force, inputs={"--hf": hf_dir}, kind="convert hf-to-megatron")
    convert_on_cpu_workers(_hf_to_megatron_worker, world_size=tp * pp, args=(str(hf_dir), str(out), tp, pp))
    return out


def megatron_to_hf(ckpt_dir: str | Path, out_dir: str | Path, *, force: bool = False,
                   tp: int | None = None, pp: int | None = None) -> Path:
    """Convert a Megatron checkpoint made here into an HF folder that transformers loads. Runs at the
    checkpoint's own TP/PP unless ``tp`` / ``pp`` say otherwise."""
    meta = read_checkpoint_meta(ckpt_dir)
    check_dist_checkpoint(Path(ckpt_dir) / MEGATRON_SUBDIR)  # refused here, before any worker starts
    arch = checkpoint_arch(ckpt_dir)
    tp, pp = tp or meta["tp"], pp or meta["pp"]
    _validate(arch, tp, pp)
    out = prepare_output_dir(out_dir, force=force, inputs={"--ckpt": ckpt_dir}, kind="convert megatron-to-hf")
    convert_on_cpu_workers(_megatron_to_hf_worker, world_size=tp * pp, args=(str(ckpt_dir), str(out), tp, pp))
    return out
