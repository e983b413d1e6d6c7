"""Channel masks from per-role identifier gradients (ADI Part 2).

Pure tensor functions: no Lightning, no model, so the math is testable by hand.
Shapes: a role gradient is ``[..., L, D]`` (L identifier rows, D embedding channels);
quantiles are taken per row, over the D channels.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

MaskCombine = Literal["and", "or", "context_only", "action_only"]
UpdateFrom = Literal["anchor", "anchor_and_context"]
MASK_COMBINES: tuple[str, ...] = ("and", "or", "context_only", "action_only")
UPDATE_FROMS: tuple[str, ...] = ("anchor", "anchor_and_context")


def check_threshold(threshold: float, key: str = "model.mask_threshold") -> float:
    """Validate β: it must lie in (0, 1]; 1.0 keeps every channel (masking off)."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise ValueError(f"{key} must be a number in (0, 1], got {threshold!r}")
    if math.isnan(threshold) or not 0.0 < threshold <= 1.0:
        raise ValueError(f"{key} must be in (0, 1] (1.0 = masking off), got {threshold!r}")
    return float(threshold)


def _row_quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """Quantile over the last dim, kept for broadcasting; computed in fp32."""
    return torch.quantile(x.float(), q, dim=-1, keepdim=True)


def channel_mask(
    g_anchor: torch.Tensor,
    g_context: torch.Tensor,
    g_action: torch.Tensor,
    threshold: float,
    combine: MaskCombine = "and",
) -> torch.Tensor:
    """Boolean keep-mask of the identifier channels for each triple.

    ``Δc = |g_a - g_c|`` is small on action channels (the gradient survives a context
    change): keep ``Δc <= quantile_β(Δc)``. ``Δd = |g_a - g_d|`` is small on context
    channels (the gradient survives an action change): keep ``Δd >= quantile_{1-β}(Δd)``.
    With β = 1 both tests keep every channel.
    """
    check_threshold(threshold)
    if combine not in MASK_COMBINES:
        raise ValueError(f"model.mask_combine must be one of {MASK_COMBINES}, got {combine!r}")
    if not (g_anchor.shape == g_context.shape == g_action.shape):
        raise ValueError(
            "role gradients must share one shape, got "
            f"{tuple(g_anchor.shape)}, {tuple(g_context.shape)}, {tuple(g_action.shape)}"
        )
    if threshold >= 1.0:
        return torch.ones_like(g_anchor, dtype=torch.bool)
    delta_c = (g_anchor - g_context).abs()
    delta_d = (g_anchor - g_action).abs()
    keep_c = delta_c <= _row_quantile(delta_c, threshold)
    keep_d = delta_d >= _row_quantile(delta_d, 1.0 - threshold)
    if combine == "and":
        return keep_c & keep_d
    if combine == "or":
        return keep_c | keep_d
    if combine == "context_only":
        return keep_c
    return keep_d


def masked_update(
    role_grads: torch.Tensor,
    threshold: float,
    combine: MaskCombine = "and",
    update_from: UpdateFrom = "anchor",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The identifier's update gradient from per-triple role gradients.

    Args:
        role_grads: ``[N, 3, L, D]``: for each of N triples, the gradients of its
            anchor, context-different and action-different losses w.r.t. the identifier.
        threshold, combine: see :func:`channel_mask`.
        update_from: ``anchor`` uses ``g_a``; ``anchor_and_context`` the mean of ``g_a`` and ``g_c``.
            The action-different sample only ever shapes the mask.

    Returns:
        ``(update [L, D], masks [N, L, D] bool)``: the update is the mean over triples of
        ``mask ⊙ g``.
    """
    if role_grads.ndim != 4 or role_grads.shape[1] != 3:
        raise ValueError(f"role_grads must be [N, 3, L, D], got {tuple(role_grads.shape)}")
    if update_from not in UPDATE_FROMS:
        raise ValueError(f"model.update_from must be one of {UPDATE_FROMS}, got {update_from!r}")
    g_a, g_c, g_d = role_grads.unbind(1)
    masks = channel_mask(g_a, g_c, g_d, threshold, combine)
    source = g_a if update_from == "anchor" else 0.5 * (g_a + g_c)
    update = (source * masks).mean(dim=0)
    return update, masks


def kept_fraction_per_layer(masks: torch.Tensor) -> torch.Tensor:
    """Fraction of channels kept per identifier row, averaged over triples: ``[L]``."""
    return masks.float().mean(dim=-1).reshape(-1, masks.shape[-2]).mean(dim=0)
