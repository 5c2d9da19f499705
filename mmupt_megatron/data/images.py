"""Images for Qwen2.5-VL: decoding, pixel limits, and ``pixel_values`` / ``image_grid_thw``.

- ``load_image`` decodes PNG/JPEG bytes, a path (relative paths resolve against ``base_dir``, the data
  file's folder) or a PIL image, to RGB. A hard cap on the *decoded* pixel count (``max_decode_pixels``)
  guards against decompression bombs; it is separate from the resize limit.
- ``smart_resize`` is Qwen's rule: both sides become multiples of ``factor`` = patch 14 x merge 2 = 28,
  with the area brought inside [min_pixels, max_pixels]. ``fit_image`` applies it, so the image that
  vLLM receives and the one the trainer encodes are the same pixels.
- ``ImageEncoder`` wraps transformers' PIL-backed ``Qwen2VLImageProcessor`` (no torchvision needed);
  ``patchify`` is an exact numpy equivalent for images already at a multiple of 28 (fast path used by
  the demo; a test checks it against the processor). A model sees prod(grid_thw) / 4 merged tokens.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
FACTOR = PATCH_SIZE * MERGE_SIZE
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280
DEFAULT_MAX_DECODE_PIXELS = 64_000_000


MAX_ASPECT_RATIO = 200
"""Qwen2-VL's limit on the long side / short side of an image."""


class ImageError(ValueError):
    """An image that cannot be used (missing, corrupt, too large); the message says why."""


class ImageMissing(ImageError):
    """The image file does not exist."""


class ImageTooLarge(ImageError):
    """Over the hard decoded-pixel cap, or refused by PIL's decompression-bomb guard."""


class ImageShapeError(ImageError):
    """An aspect ratio the model cannot take (over ``MAX_ASPECT_RATIO``)."""


def check_aspect_ratio(width: int, height: int) -> None:
    """ImageError for an image without pixels, ImageShapeError for one longer than 200:1."""
    if height <= 0 or width <= 0:
        raise ImageError(f"image has no pixels ({width}x{height})")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ImageShapeError(f"aspect ratio of a {width}x{height} image exceeds {MAX_ASPECT_RATIO}")


def smart_resize(
    height: int, width: int, *, factor: int = FACTOR, min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[int, int]:
    """Qwen2-VL's resize target: multiples of ``factor`` with area within [min_pixels, max_pixels]."""
    check_aspect_ratio(width, height)
    if min_pixels > max_pixels:
        raise ValueError(f"min_pixels ({min_pixels}) must not exceed max_pixels ({max_pixels})")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def load_image(
    source: bytes | str | Path | Image.Image,
    *,
    base_dir: str | Path | None = None,
    max_decode_pixels: int = DEFAULT_MAX_DECODE_PIXELS,
) -> Image.Image:
    """Decode to an RGB PIL image; ``ImageError`` (a ValueError) says what is wrong."""
    if isinstance(source, Image.Image):
        image = source
    else:
        if isinstance(source, bytes | bytearray):
            if not source:
                raise ImageError("image bytes are empty")
            handle: io.BytesIO | Path = io.BytesIO(source)
            where = f"{len(source)} bytes"
        elif isinstance(source, str | Path):
            path = Path(source)
            if not path.is_absolute() and base_dir is not None:
                path = Path(base_dir) / path
            if not path.is_file():
                raise ImageMissing(f"image file not found: {path}")
            handle, where = path, str(path)
        else:
            raise ImageError(f"unsupported image source of type {type(source).__name__}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(handle)
                width, height = image.size
                if width * height > max_decode_pixels:
                    raise ImageTooLarge(
                        f"image ({where}) is {width}x{height} = {width * height} pixels, over the hard cap "
                        f"max_decode_pixels={max_decode_pixels}"
                    )
                image.load()
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageTooLarge(f"image ({where}) refused by the decompression-bomb guard: {e}") from e
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageError(f"cannot decode image ({where}): {type(e).__name__}: {e}") from e
    width, height = image.size
    if width * height > max_decode_pixels:
        raise ImageTooLarge(f"image is {width}x{height}, over the hard cap max_decode_pixels={max_decode_pixels}")
    return image if image.mode == "RGB" else image.convert("RGB")


def fit_image(image: Image.Image, *, min_pixels: int, max_pixels: int) -> Image.Image:
    """Resize (bicubic) to ``smart_resize``'s target; unchanged when already there."""
    height, width = smart_resize(image.height, image.width, min_pixels=min_pixels, max_pixels=max_pixels)
    if (width, height) == image.size:
        return image
    return image.resize((width, height), Image.Resampling.BICUBIC)


def patchify(image: Image.Image | np.ndarray) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """``pixel_values`` [num_patches, 3*2*14*14] and grid (1, h/14, w/14) of an image whose sides are
    multiples of 28 — the same numbers as ``Qwen2VLImageProcessor`` (rescale, normalise, patch order)."""
    pixels = np.asarray(image, dtype=np.float32)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ImageError(f"patchify needs an RGB image, got an array of shape {pixels.shape}")
    height, width = pixels.shape[:2]
    if height % FACTOR or width % FACTOR:
        raise ImageError(f"patchify needs sides that are multiples of {FACTOR}, got {width}x{height}; use fit_image")
    mean = np.asarray(IMAGE_MEAN, dtype=np.float32)
    std = np.asarray(IMAGE_STD, dtype=np.float32)
    chw = ((pixels * np.float32(1 / 255) - mean) / std).transpose(2, 0, 1)
    grid_h, grid_w = height // PATCH_SIZE, width // PATCH_SIZE
    frames = np.broadcast_to(chw[None], (TEMPORAL_PATCH_SIZE, *chw.shape))
    patches = frames.reshape(
        1, TEMPORAL_PATCH_SIZE, 3, grid_h // MERGE_SIZE, MERGE_SIZE, PATCH_SIZE, grid_w // MERGE_SIZE, MERGE_SIZE, PATCH_SIZE
    ).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    flat = patches.reshape(grid_h * grid_w, 3 * TEMPORAL_PATCH_SIZE * PATCH_SIZE * PATCH_SIZE)
    return torch.from_numpy(np.ascontiguousarray(flat)), (1, grid_h, grid_w)


@dataclass(frozen=True, kw_only=True)
class ImageEncoder:
    """Pixel limits plus the processor: images in, ``pixel_values`` and ``image_grid_thw`` out."""

    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {self.min_pixels} and {self.max_pixels}")

    def processor(self):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        return Qwen2VLImageProcessorPil(min_pixels=self.min_pixels, max_pixels=self.max_pixels)

    def fit(self, image: Image.Image) -> Image.Image:
        return fit_image(image, min_pixels=self.min_pixels, max_pixels=self.max_pixels)

    def encode(self, images: list[Image.Image], *, fast: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Concatenated ``pixel_values`` [sum patches, 1176] and ``image_grid_thw`` [num_images, 3]."""
        fitted = [self.fit(image) for image in images]
        if fast:
            pieces = [patchify(image) for image in fitted]
            return torch.cat([p for p, _ in pieces]), torch.tensor([g for _, g in pieces], dtype=torch.long)
        out = self.processor()(images=fitted, return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"]

    def save_config(self, folder: str | Path) -> None:
        """Write ``preprocessor_config.json`` (what vLLM and transformers load the processor from)."""
        self.processor().save_pretrained(str(folder))
