"""Model provider: Qwen2.5-VL (or text-only Qwen2) as a Megatron-Core GPTModel plus the HF vision tower.

- The language model is a ``GPTModel`` (RMSNorm, SwiGLU, QKV bias, GQA, ``mrope`` rotary embeddings with
  the checkpoint's ``mrope_section`` and 3-D position ids, tied or untied embeddings). Text-only Qwen2
  uses the same mrope path with every section on the temporal axis, which equals 1-D RoPE.
- The vision tower is transformers' ``Qwen2_5_VisionTransformerPretrainedModel`` (megatron-core has no
  Qwen2.5-VL encoder), replicated on every TP rank of the first pipeline stage; its merged features
  replace the embeddings at the ``<|image_pad|>`` positions.
- ``select_layer_spec`` is the single place that picks Transformer Engine (GPU, FP8 on Hopper) or
  Megatron's local torch layers (CPU; their attention takes packed ``thd`` rows too: ``models/packed_attention.py``);
  ``fp8_problems`` / ``check_fp8`` refuse ``model.fp8`` where it cannot run (no TE, no Hopper), and
  ``sequence_multiple`` is the padding FP8 and sequence parallelism need.
- Sequence parallelism (``parallel.sequence_parallel``): the embeddings are computed whole (images merged in),
  then scattered along the sequence over the TP ranks; Megatron's layers take it from there.
- Images: each distinct image goes through the vision tower once; ``image_order`` (rows of ``image_grid_thw``
  in the order of the image-pad runs, repeats allowed) deals its features to every sample that uses it.
- Forward returns the vocab-parallel logits shard [B, T, V_local] on the last pipeline stage (padded
  vocabulary entries masked to the dtype minimum); ``gather_logits`` assembles full logits for tests.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mmupt_megatron.config import token_multiples
from mmupt_megatron.distributed.parallel import ParallelGroups
from mmupt_megatron.models.hf_config import LMArch
from mmupt_megatron.models.mapping import MEG_LM_PREFIX, padded_vocab_size

_TE_NORM_KEYS = {  # TE fuses the norms into the next linear; checkpoints always use the local names.
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


FP8_MIN_CAPABILITY = {"delayed": (9, 0), "tensorwise": (9, 0), "blockwise": (9, 0), "mxfp8": (10, 0)}
"""Oldest GPU (CUDA compute capability) each ``model.fp8_recipe`` runs on: Hopper, or Blackwell for MX."""



def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except (ImportError, RuntimeError):
        return False
    return True


def _transformer_engine_importable() -> bool:
    return _importable("transformer_engine")


def _transformer_engine_available() -> bool:
    return torch.cuda.is_available() and _transformer_engine_importable()


def fp8_problems(fp8: bool, recipe: str = "delayed") -> list[str]:
    """Why ``model.fp8`` cannot run here ([] when it can or is off). Cheap: checked before any model loads."""
    if not fp8:
        return []
    if recipe not in FP8_MIN_CAPABILITY:
        return [f"model.fp8_recipe must be one of {', '.join(FP8_MIN_CAPABILITY)}, got {recipe!r}"]
    out = []
    if not torch.cuda.is_available():
        out.append("model.fp8=true needs a CUDA GPU (Hopper or newer) but none is visible; set model.fp8=false")
    else:
        need, have = FP8_MIN_CAPABILITY[recipe], torch.cuda.get_device_capability()
        if tuple(have) < need:
            out.append(
                f"model.fp8=true with model.fp8_recipe={recipe} needs compute capability >= {need[0]}.{need[1]} but "
                f"{torch.cuda.get_device_name()} has {have[0]}.{have[1]}; set model.fp8=false"
            )
    if not _transformer_engine_importable():
        out.append("model.fp8=true needs Transformer Engine, which does not import here (pip install -e .[gpu])")
    return out


def check_fp8(fp8: bool, recipe: str = "delayed") -> None:
    """ValueError naming ``model.fp8`` when FP8 was asked for and this machine cannot run it."""
    problems = fp8_problems(fp8, recipe)
    if problems:
        raise ValueError("; ".join(problems))


def _token_multiples(config: Any) -> tuple[int, int]:
    return token_multiples(tp=config.tensor_model_parallel_size, sequence_parallel=bool(config.sequence_parallel),
                           fp8=bool(config.fp8), fp8_recipe=str(config.fp8_recipe))


def sequence_multiple(config: Any) -> int:
    """What a Megatron TransformerConfig needs sequence lengths (a packed row's length) to be a multiple of:
    ``config.token_multiples`` (FP8's 16 x TP, sequence parallelism's TP, else 1)."""
    return _token_multiples(config)[0]


def packed_sequence_multiple(config: Any) -> int:
    """What each sequence of a packed row is padded to a multiple of (sequence parallelism: TP, else 1)."""
    return _token_multiples(config)[1]


def select_layer_spec(*, fp8: bool = False, fp8_recipe: str = "delayed", layer_spec: str = "auto") -> tuple[Any, str | None]:
    """(layer spec, fp8 mode). ``layer_spec``: auto (Transformer Engine when a GPU and TE are present,
    Megatron's local torch spec otherwise), te or local. FP8 ("hybrid": E4M3 forward, E5M2 backward) when
    asked, else None. FP8 where it cannot run (no TE, no Hopper) is a ValueError naming model.fp8, not a
    silent fallback."""
    from megatron.core.models.gpt import gpt_layer_specs

    if layer_spec not in ("auto", "te", "local"):
        raise ValueError(f"layer_spec must be auto, te or local, got {layer_spec!r}")
    check_fp8(fp8, fp8_recipe)
    te = _transformer_engine_available() if layer_spec == "auto" else layer_spec == "te"
    if te and not _transformer_engine_available():
        raise ValueError("layer_spec=te needs a CUDA GPU and Transformer Engine")
    if fp8 and not te:
        raise ValueError("model.fp8=true needs the Transformer Engine layer spec, not the local one")
    if te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(), "hybrid" if fp8 else None
    from mmupt_megatron.models.packed_attention import PackedDotProductAttention

    spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = PackedDotProductAttention  # packed rows (thd) too
    return spec, None


def default_dtype() -> torch.dtype:
    """bf16 on GPU, fp32 on CPU."""
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def uses_te_spec(spec: Any) -> bool:
    return "transformer_engine" in repr(spec)


def transformer_config(arch: LMArch, groups: ParallelGroups, *, dtype: torch.dtype, fp8_mode: str | None,
                       init_weights: bool, fp8_recipe: str = "delayed", recompute: bool = False,
                       sequence_parallel: bool = False, deterministic: bool = False) -> Any:
    """Megatron's config for ``arch``; ``recompute`` (model.gradient_checkpointing) keeps only each layer's
    input for the backward and recomputes the layer (full, uniform, one layer per checkpoint);
    ``sequence_parallel`` (parallel.sequence_parallel, TP > 1) splits norms and dropout along the sequence."""
    if sequence_parallel and groups.dims.tp < 2:
        raise ValueError(f"parallel.sequence_parallel=true needs parallel.tensor_parallel_size > 1, got {groups.dims.tp}")
    from megatron.core.transformer.transformer_config import TransformerConfig

    cpu = not torch.cuda.is_available()
    mrope = list(arch.mrope_section) if arch.mrope_section else [arch.head_dim // 2, 0, 0]
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        ffn_hidden_size=arch.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        mrope_section=mrope,
        tensor_model_parallel_size=groups.dims.tp,
        sequence_parallel=sequence_parallel,
        pipeline_model_parallel_size=groups.dims.pp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        fp8=fp8_mode,
        fp8_recipe=fp8_recipe,
        use_cpu_initialization=cpu,
        perform_initialization=init_weights,
        # Fusions need CUDA kernels; off on CPU (STACK.md item 4).
        bias_activation_fusion=not cpu,
        # Megatron's fused softmax needs its compiled kernel (apex / megatron's build), absent from plain pip
        # installs: with the kernel missing, shapes it accepts would fail at `import scaled_masked_softmax_cuda`.
        masked_softmax_fusion=not cpu and _importable("scaled_masked_softmax_cuda"),
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        bias_dropout_fusion=not cpu,
        persist_layer_norm=False,
        recompute_granularity="full" if recompute else None,
        recompute_method="uniform" if recompute else None,
        recompute_num_layers=1 if recompute else None,
        deterministic_mode=deterministic,  # trainer.deterministic: the embedding's deterministic backward
    )


class Qwen2_5_VLModel(torch.nn.Module):
    """Megatron GPTModel language model + (first stage) HF vision tower. Not a GPTModel subclass: it
    composes one, so checkpoints carry ``language_model.*`` and ``vision_model.*`` keys."""

    def __init__(self, arch: LMArch, groups: ParallelGroups, *, dtype: torch.dtype | None = None,
                 init_weights: bool = True, fp8: bool = False, fp8_recipe: str = "delayed",
                 layer_spec: str = "auto", recompute: bool = False, sequence_parallel: bool = False,
                 deterministic: bool = False) -> None:
        from megatron.core.enums import ModelType
        from megatron.core.models.gpt import GPTModel

        super().__init__()
        dtype = dtype or default_dtype()
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's schedules
        groups.dims.validate(
            world_size=groups.world_size, num_attention_heads=arch.num_attention_heads,
            num_kv_heads=arch.num_kv_heads, num_layers=arch.num_layers,
        )
        spec, fp8_mode = select_layer_spec(fp8=fp8, fp8_recipe=fp8_recipe, layer_spec=layer_spec)
        self.te_spec = uses_te_spec(spec)
        self.arch = arch
        self.groups = groups
        self.config = transformer_config(arch, groups, dtype=dtype, fp8_mode=fp8_mode, init_weights=init_weights,
                                         fp8_recipe=fp8_recipe, recompute=recompute, sequence_parallel=sequence_parallel,
                                         deterministic=deterministic)
        self.padded_vocab = padded_vocab_size(arch.vocab_size, tp=groups.dims.tp)
        self.pre_process = groups.is_first_stage
        self.post_process = groups.is_last_stage
        self.language_model = GPTModel(
            config=self.config,
            transformer_layer_spec=spec,
            vocab_size=self.padded_vocab,
            max_sequence_length=arch.max_position_embeddings,
            pre_process=self.pre_process,
            post_process=self.post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=arch.tie_word_embeddings,
            position_embedding_type="mrope",
            scatter_embedding_sequence_parallel=False,  # forward() scatters after merging the image features
            rotary_base=arch.rope_theta,
            pg_collection=groups.megatron_pgs,
        )
        if not init_weights:
            _mark_tensor_parallel_weights(self.language_model)
        self.vision_model = None
        if arch.is_multimodal and self.pre_process:
            self.vision_model = build_vision_tower(arch, dtype=dtype)

    # -- plumbing read by megatron's schedules and finalize_model_grads (tied embeddings under PP)
    def set_input_tensor(self, input_tensor: Any) -> None:
        self.language_model.set_input_tensor(input_tensor)

    @property
    def share_embeddings_and_output_weights(self) -> bool:
        return self.language_model.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self) -> torch.Tensor:
        return self.language_model.shared_embedding_or_output_weight()

    def forward(
        self,
        input_ids_BT: torch.Tensor,
        position_ids_3BT: torch.Tensor,
        attention_mask_B1TT: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        image_order: torch.Tensor | None = None,
        packed_seq_params: Any = None,
    ) -> torch.Tensor:
        """Local logits [B, T, V_local] on the last stage; hidden states [T, B, H] on the others (sequence
        parallel: [T/TP, B, H]). ``image_order``: rows of ``image_grid_thw`` in the order of the image-pad runs
        (None: the rows as given). Packed sequences: ``input_ids_BT`` is one row [1, T], ``packed_seq_params`` (thd)
        its sequences' bounds, ``attention_mask_B1TT`` None."""
        decoder_input = None
        if self.pre_process:
            decoder_input = self.language_model.embedding(input_ids=input_ids_BT, position_ids=None)
            if pixel_values is not None:
                decoder_input = self._merge_image_features(decoder_input, input_ids_BT, pixel_values, image_grid_thw,
                                                           image_order)
            if self.config.sequence_parallel:
                from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region

                decoder_input = scatter_to_sequence_parallel_region(decoder_input, group=self.groups.tp_group)
        out = self.language_model(
            input_ids=input_ids_BT,
            position_ids=position_ids_3BT,
            attention_mask=attention_mask_B1TT,
            decoder_input=decoder_input,
            packed_seq_params=packed_seq_params,
        )
        if not self.post_process:
            return out
        return self._mask_vocab_padding(out)

    def _merge_image_features(self, embeds_TBH, input_ids_BT, pixel_values, image_grid_thw,
                              image_order=None) -> torch.Tensor:
        if self.vision_model is None:
            raise ValueError(f"pixel_values given but the checkpoint ({self.arch.model_type}) has no vision tower")
        if image_grid_thw is None:
            raise ValueError("pixel_values given without image_grid_thw")
        features_NH = self.vision_model(pixel_values.to(embeds_TBH.dtype), grid_thw=image_grid_thw).pooler_output
        if image_order is not None:  # each distinct image's features, dealt out in pad-run order
            sizes = (image_grid_thw.prod(dim=-1) // self.arch.spatial_merge_size**2).tolist()
            starts = [sum(sizes[:r]) for r in range(len(sizes))]
            index = torch.cat([torch.arange(starts[r], starts[r] + sizes[r]) for r in image_order.tolist()])
            features_NH = features_NH.index_select(0, index.to(features_NH.device))
        # Features come image by image, i.e. sample-major; the embeddings are [T, B, H]. Index the pads in
        # sample-major order (nonzero of a [B, T] mask is row-major) so sample b gets its own image's features
        # (a masked_scatter over the [T, B] layout would deal them out position-major across the batch).
        rows_B, cols_T = (input_ids_BT == self.arch.image_token_id).nonzero(as_tuple=True)
        if rows_B.numel() != features_NH.shape[0]:
            raise ValueError(
                f"{rows_B.numel()} <|image_pad|> tokens but the images give {features_NH.shape[0]} features "
                f"(image_grid_thw={image_grid_thw.tolist()})"
            )
        merged_TBH = embeds_TBH.clone()
        merged_TBH[cols_T, rows_B] = features_NH.to(embeds_TBH.dtype)
        return merged_TBH

    def _mask_vocab_padding(self, logits_BTV: torch.Tensor) -> torch.Tensor:
        local = logits_BTV.shape[-1]
        start = self.groups.tp_rank * local
        num_pad = start + local - self.arch.vocab_size
        if num_pad <= 0:
            return logits_BTV
        keep_V = torch.arange(start, start + local, device=logits_BTV.device) < self.arch.vocab_size
        return logits_BTV.masked_fill(~keep_V, torch.finfo(logits_BTV.dtype).min)

    def vocab_start(self) -> int:
        return self.groups.tp_rank * (self.padded_vocab // self.groups.dims.tp)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """Megatron's sharded state dict with spec-independent keys (TE norm names -> local names)."""
        from megatron.core.transformer.utils import sharded_state_dict_default

        sharded = self.language_model.sharded_state_dict(prefix=f"{prefix}{MEG_LM_PREFIX}", metadata=metadata)
        if self.vision_model is not None:
            sharded.update(
                sharded_state_dict_default(
                    self.vision_model, f"{prefix}vision_model.", sharded_offsets, metadata, tp_group=self.groups.tp_group
                )
            )
        if self.te_spec:
            for value in sharded.values():
                for te_name, local_name in _TE_NORM_KEYS.items():
                    if hasattr(value, "key") and value.key.endswith(te_name):
                        value.key = value.key[: -len(te_name)] + local_name
        return sharded


def _mark_tensor_parallel_weights(module: torch.nn.Module) -> None:
    """With ``perform_initialization=False`` megatron-core 0.16.1 allocates the weights of its parallel
    linears / embedding without ``set_tensor_model_parallel_attributes`` (only the init helpers set them),
    so the optimizer would treat TP-sharded weights as replicas (wrong grad norm under TP). Set them here."""
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    for sub in module.modules():
        kind = type(sub).__name__
        weight = getattr(sub, "weight", None)
        if not isinstance(weight, torch.nn.Parameter) or getattr(weight, "tensor_model_parallel", False):
            continue
        if "VocabParallelEmbedding" in kind or "ColumnParallel" in kind:
            set_tensor_model_parallel_attributes(weight, True, 0, 1)
        elif "RowParallel" in kind:
            set_tensor_model_parallel_attributes(weight, True, 1, 1)


def build_vision_tower(arch: LMArch, *, dtype: torch.dtype) -> torch.nn.Module:
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    assert arch.vision_config is not None
    config = Qwen2_5_VLVisionConfig(**{k: v for k, v in arch.vision_config.items() if k != "model_type"})
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    # Built in place in its dtype and on its device, as transformers' from_pretrained does (buffers created
    # with an explicit fp32 dtype, the rotary inv_freq, stay fp32); no .to(), which fake tensors cannot take.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return Qwen2_5_VisionTransformerPretrainedModel(config)
    finally:
        torch.set_default_dtype(previous)


def gather_logits(local_logits_BTV: torch.Tensor, groups: ParallelGroups, *, vocab_size: int) -> torch.Tensor:
    """Full-vocabulary logits from the TP shards (all-gather; padding stripped). For tests / eval."""
    if groups.dims.tp == 1:
        return local_logits_BTV[..., :vocab_size]
    parts = [torch.empty_like(local_logits_BTV) for _ in range(groups.dims.tp)]
    dist.all_gather(parts, local_logits_BTV.contiguous(), group=groups.tp_group)
    return torch.cat(parts, dim=-1)[..., :vocab_size]
