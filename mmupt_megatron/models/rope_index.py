"""3-D (temporal, height, width) mrope position ids for Qwen2.5-VL inputs and the attention mask.

Follows transformers' ``Qwen2_5_VLModel.get_rope_index`` for images: text tokens advance all three axes
by one; an image of merged grid (t, h, w) placed at position p gets ids (p + t_i, p + h_i, p + w_i), and
the text after it resumes at p + max(h, w) (merged grid). Padding (attention_mask == 0) positions get id 1, like HF
generation does; they never influence valid tokens.
"""

from __future__ import annotations

import torch


def image_runs(is_image_T: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each maximal run of image-pad tokens."""
    runs, start = [], None
    for index, flag in enumerate(is_image_T.tolist() + [False]):
        if flag and start is None:
            start = index
        elif not flag and start is not None:
            runs.append((start, index))
            start = None
    return runs


def mrope_position_ids(
    input_ids_BT: torch.Tensor,
    *,
    image_token_id: int | None,
    spatial_merge_size: int = 2,
    image_grid_thw: torch.Tensor | None = None,
    attention_mask_BT: torch.Tensor | None = None,
) -> torch.Tensor:
    """Position ids [3, B, T] (long). Images are consumed from ``image_grid_thw`` in order across the
    batch, one per run of ``image_token_id`` tokens."""
    batch, seq = input_ids_BT.shape
    position_ids = torch.ones(3, batch, seq, dtype=torch.long)
    grids = iter(image_grid_thw.tolist()) if image_grid_thw is not None else iter(())
    for b in range(batch):
        valid_T = attention_mask_BT[b].bool() if attention_mask_BT is not None else torch.ones(seq, dtype=torch.bool)
        ids_T = input_ids_BT[b][valid_T].cpu()
        is_image = ids_T == image_token_id if image_token_id is not None else torch.zeros_like(ids_T, dtype=torch.bool)
        pieces, cursor, current = [], 0, 0
        for start, end in image_runs(is_image):
            if start > cursor:
                pieces.append(torch.arange(start - cursor).expand(3, -1) + current)
                current += start - cursor
            try:
                t, h, w = next(grids)
            except StopIteration:
                raise ValueError(f"sample {b} has more <|image_pad|> runs than image_grid_thw rows") from None
            gh, gw = h // spatial_merge_size, w // spatial_merge_size
            if t * gh * gw != end - start:
                raise ValueError(
                    f"sample {b}: an <|image_pad|> run of {end - start} tokens does not match grid "
                    f"{[t, h, w]} (expects {t * gh * gw} = t*h*w/{spatial_merge_size ** 2})"
                )
            tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
            pieces.append(torch.stack([tt, hh, ww]).reshape(3, -1) + current)
            current += max(gh, gw)
            cursor = end
        if cursor < len(ids_T):
            pieces.append(torch.arange(len(ids_T) - cursor).expand(3, -1) + current)
        position_ids[:, b, valid_T] = torch.cat(pieces, dim=1) if pieces else position_ids[:, b, valid_T]
    if next(grids, None) is not None:
        raise ValueError("image_grid_thw has more rows than <|image_pad|> runs in input_ids")
    return position_ids.to(input_ids_BT.device)


def causal_attention_mask(num_tokens: int, attention_mask_BT: torch.Tensor | None = None, *,
                          device: torch.device | None = None) -> torch.Tensor:
    """Megatron's boolean mask (True = masked): causal, plus padded keys when ``attention_mask_BT`` is
    given. Shape [B or 1, 1, T, T]."""
    causal_TT = torch.ones(num_tokens, num_tokens, dtype=torch.bool, device=device).triu(diagonal=1)
    if attention_mask_BT is None:
        return causal_TT[None, None]
    padded_keys_B11T = ~attention_mask_BT.bool()[:, None, None, :]
    return causal_TT[None, None] | padded_keys_B11T
