"""Per-request visual budgets: how many pixels (so how many tokens) each image may become.

`image_url.detail` picks a budget per image: `low` a small fixed one (`LOW_DETAIL_TOKENS`), `high`
the model's maximum, `auto` (or none) the request's `mm_processor_kwargs` `min_pixels` /
`max_pixels`, else the model's own. The gateway plans each image's size by Qwen's rule under its
budget, from its header alone, and ships the size with the compressed bytes; the encode worker
resizes to exactly that size, a fixed point of the rule under the model's own budget, so the prompt's
pads and the encoder's grid cannot disagree. Each budgeted image is its own content: the
encode and prefix caches key it apart from the same picture at another budget. Videos keep the
model's video budget.
"""

from __future__ import annotations

from dataclasses import dataclass

from serving.api.errors import APIError, invalid_value
from serving.engine.image_processor import ImageProcessorConfig, smart_resize

# `detail: "low"`: 64 tokens (about a 224×224 image), or a quarter of a small model's maximum.
LOW_DETAIL_TOKENS = 64


@dataclass(frozen=True)
class PixelBudget:
    min_pixels: int
    max_pixels: int


def request_budget(cfg: ImageProcessorConfig, min_pixels: int | None, max_pixels: int | None) -> PixelBudget:
    """The request's `mm_processor_kwargs` budget, inside the model's range (400 outside it)."""
    low, high = cfg.min_pixels, cfg.max_pixels
    lo = low if min_pixels is None else min_pixels
    hi = high if max_pixels is None else max_pixels
    for name, value in (("min_pixels", lo), ("max_pixels", hi)):
        if not low <= value <= high:
            raise invalid_value(
                f"mm_processor_kwargs.{name}", f"must be between {low} and {high} for this model"
            )
    if lo > hi:
        raise invalid_value("mm_processor_kwargs.min_pixels", "must not exceed max_pixels")
    return PixelBudget(lo, hi)


def detail_budget(cfg: ImageProcessorConfig, detail: str | None, default: PixelBudget) -> PixelBudget:
    unit = (cfg.patch_size * cfg.merge_size) ** 2
    if detail == "low":
        cap = max(min(LOW_DETAIL_TOKENS * unit, cfg.max_pixels // 4), cfg.min_pixels)
        return PixelBudget(min(default.min_pixels, cap), cap)
    if detail == "high":
        return PixelBudget(cfg.min_pixels, cfg.max_pixels)
    return default


def fitted_size(height: int, width: int, cfg: ImageProcessorConfig, budget: PixelBudget) -> tuple[int, int]:
    """(height, width) Qwen's rule gives an image under `budget`. The rule can round a small budget
    below the model's minimum; the model's own rule then applies again, as the encode worker would
    apply it, so the size planned is the size encoded."""
    factor = cfg.patch_size * cfg.merge_size
    h, w = smart_resize(height, width, factor, budget.min_pixels, budget.max_pixels)
    return smart_resize(h, w, factor, cfg.min_pixels, cfg.max_pixels)


def check_visual_tokens(tokens: int, limit: int | None) -> None:
    if limit is not None and tokens > limit:
        message = (
            f"The request's images and videos come to {tokens} visual tokens; the server accepts {limit}."
        )
        raise APIError(400, message, "messages", "too_many_visual_tokens")
