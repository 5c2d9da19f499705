"""Image decoding, the decompression-bomb cap, smart_resize, and the fast patchify vs the HF processor."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from mmupt_megatron.data.images import ImageEncoder, ImageError, fit_image, load_image, patchify, smart_resize


def _png(width: int = 40, height: int = 30, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_load_from_bytes_path_and_relative_path(tmp_path):
    data = _png()
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(data)
    from_bytes = load_image(data)
    from_path = load_image(tmp_path / "imgs" / "a.png")
    from_relative = load_image("imgs/a.png", base_dir=tmp_path)
    assert from_bytes.size == (40, 30) and from_bytes.mode == "RGB"
    assert np.array_equal(np.asarray(from_bytes), np.asarray(from_path))
    assert np.array_equal(np.asarray(from_bytes), np.asarray(from_relative))


def test_jpeg_and_grayscale_become_rgb():
    image = Image.new("L", (20, 20), 100)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    assert load_image(buffer.getvalue()).mode == "RGB"


@pytest.mark.parametrize(
    "source, message",
    [(b"", "empty"), (b"not an image at all", "cannot decode"), ("missing.png", "not found")],
)
def test_bad_images_raise_clear_errors(tmp_path, source, message):
    with pytest.raises(ImageError, match=message):
        load_image(source, base_dir=tmp_path)


def test_truncated_png_is_rejected():
    with pytest.raises(ImageError, match="cannot decode"):
        load_image(_png()[:60])


def test_hard_pixel_cap_rejects_before_full_decode():
    with pytest.raises(ImageError, match="max_decode_pixels=1000"):
        load_image(_png(40, 30), max_decode_pixels=1000)
    assert load_image(_png(40, 30), max_decode_pixels=1200).size == (40, 30)


@pytest.mark.parametrize(
    "hw, limits, expected",
    [
        ((84, 84), (28 * 28, 84 * 84), (84, 84)),
        ((100, 250), (28 * 28, 84 * 84), (28, 112)),
        ((10, 10), (56 * 56, 28 * 28 * 1280), (56, 56)),
        ((1000, 2000), (56 * 56, 200_000), (308, 616)),
    ],
)
def test_smart_resize_matches_qwen_rule(hw, limits, expected):
    h, w = smart_resize(*hw, min_pixels=limits[0], max_pixels=limits[1])
    assert (h, w) == expected
    assert h % 28 == 0 and w % 28 == 0 and limits[0] <= h * w <= max(limits[1], 28 * 28)


def test_smart_resize_rejects_extreme_aspect_and_bad_limits():
    with pytest.raises(ImageError, match="aspect"):
        smart_resize(10, 3000)
    with pytest.raises(ValueError, match="min_pixels"):
        smart_resize(100, 100, min_pixels=10_000, max_pixels=100)


@pytest.mark.parametrize("size", [(84, 84), (100, 250), (37, 61)])
def test_fast_patchify_equals_hf_processor(size):
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    encoder = ImageEncoder(min_pixels=28 * 28, max_pixels=84 * 84)
    fast_pv, fast_grid = encoder.encode([image, image], fast=True)
    hf_pv, hf_grid = encoder.encode([image, image], fast=False)
    assert torch.equal(fast_grid, hf_grid)
    assert fast_pv.shape == hf_pv.shape == (int(hf_grid.prod(-1).sum()), 3 * 2 * 14 * 14)
    assert torch.allclose(fast_pv, hf_pv, atol=1e-5)


def test_patchify_needs_multiple_of_28_and_fit_is_identity_when_aligned():
    image = Image.new("RGB", (84, 56))
    assert fit_image(image, min_pixels=28 * 28, max_pixels=84 * 84) is image
    with pytest.raises(ImageError, match="multiples of 28"):
        patchify(Image.new("RGB", (50, 56)))


def test_encoder_validates_limits_and_saves_config(tmp_path):
    with pytest.raises(ValueError, match="min_pixels"):
        ImageEncoder(min_pixels=100, max_pixels=10)
    ImageEncoder(min_pixels=784, max_pixels=7056).save_config(tmp_path)
    text = (tmp_path / "preprocessor_config.json").read_text()
    assert "7056" in text and "Qwen2VLImageProcessor" in text
