"""Loaded at interpreter start-up by every process that has this folder on PYTHONPATH (vLLM's own
subprocesses included: its model registry inspects architectures in a child process).

Only when torchvision is absent (our CPU machines: PyPI's torchvision breaks ``import transformers`` against
torch 2.13.0+cpu), two transformers modules that vLLM's Qwen2-VL / Qwen2.5-VL support imports are
redirected:
- ``transformers.models.qwen2_vl.image_processing_qwen2_vl`` (torchvision backend) resolves to the PIL
  implementation in ``image_processing_pil_qwen2_vl`` (vLLM imports ``smart_resize`` and
  ``Qwen2VLImageProcessor`` from it);
- ``transformers.models.qwen2_vl.video_processing_qwen2_vl`` resolves to a video processor that can be
  built (the combined processor needs one) but refuses videos; right after
  ``transformers.models.auto.video_processing_auto`` is imported, that class is registered for the
  Qwen2-VL / Qwen2.5-VL configs (without torchvision, transformers maps them to a placeholder that raises).
Nothing is imported until those modules are first requested, so start-up cost is nil.
"""

import importlib.abc
import importlib.machinery
import importlib.util
import sys

_IMAGE = "transformers.models.qwen2_vl.image_processing_qwen2_vl"
_VIDEO = "transformers.models.qwen2_vl.video_processing_qwen2_vl"
_AUTO_VIDEO = "transformers.models.auto.video_processing_auto"


class _RegisterAfterImport(importlib.abc.Loader):
    """Runs the real module, then registers the stand-in video processor for Qwen2(.5)-VL configs."""

    def __init__(self, real_loader):
        self.real_loader = real_loader

    def create_module(self, spec):
        return self.real_loader.create_module(spec)

    def exec_module(self, module):
        self.real_loader.exec_module(module)
        _register_video_processor(module)


def _register_video_processor(auto_module):
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    video_processor = importlib.import_module(_VIDEO).Qwen2VLVideoProcessor
    for config_class in (Qwen2VLConfig, Qwen2_5_VLConfig):
        auto_module.AutoVideoProcessor.register(config_class, video_processor, exist_ok=True)


class _Redirect(importlib.abc.Loader):
    def create_module(self, spec):
        return None

    def exec_module(self, module):
        if module.__name__ == _IMAGE:
            pil = importlib.import_module("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
            module.__dict__.update({k: v for k, v in vars(pil).items() if not k.startswith("__")})
            module.Qwen2VLImageProcessor = pil.Qwen2VLImageProcessorPil
            return
        import transformers
        from transformers.image_processing_utils import BaseImageProcessor

        class VideoProcessorMixin:
            """Without torchvision transformers lacks this base class, which processors type-check against."""

        if not hasattr(transformers, "VideoProcessorMixin"):
            transformers.VideoProcessorMixin = VideoProcessorMixin

        class Qwen2VLVideoProcessor(BaseImageProcessor, transformers.VideoProcessorMixin):
            """Stands in for the torchvision-only video processor: constructible, refuses videos."""

            model_input_names = ["pixel_values_videos", "video_grid_thw"]
            patch_size, temporal_patch_size, merge_size = 14, 2, 2
            min_pixels, max_pixels = 128 * 28 * 28, 768 * 28 * 28

            def __init__(self, **kwargs):
                for key in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels"):
                    if key in kwargs:
                        setattr(self, key, kwargs.pop(key))
                super().__init__(**kwargs)

            def __call__(self, *args, **kwargs):
                raise NotImplementedError("video input is not supported on CPU machines without torchvision")

            preprocess = __call__

        module.Qwen2VLVideoProcessor = Qwen2VLVideoProcessor
        module.smart_resize = importlib.import_module(
            "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl"
        ).smart_resize


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in (_IMAGE, _VIDEO):
            return importlib.util.spec_from_loader(fullname, _Redirect())
        if fullname == _AUTO_VIDEO:
            spec = importlib.machinery.PathFinder.find_spec(fullname, path)
            if spec is not None:
                spec.loader = _RegisterAfterImport(spec.loader)
            return spec
        return None


if importlib.util.find_spec("torchvision") is None and not any(isinstance(f, _Finder) for f in sys.meta_path):
    sys.meta_path.insert(0, _Finder())
    if _AUTO_VIDEO in sys.modules:  # executed late, in a process that already imported it
        _register_video_processor(sys.modules[_AUTO_VIDEO])
