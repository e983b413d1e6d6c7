"""Channel masks from per-role identifier gradients (ADI Part 2).

Pure tensor functions: no Lightning, no model, so the math is testable by hand.
Shapes: a role gradient is ``[..., L, D]`` (L identifier rows, D embedding channels);
quantiles are taken per row, over the D channels.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, get_args

import torch

MaskCombine = Literal["and", "or", "context_only", "action_only"]
MaskStatistic = Literal["absolute", "relative", "sign", "projection", "change_basis"]
UpdateFrom = Literal["anchor", "anchor_and_context"]
MASK_COMBINES: tuple[str, ...] = get_args(MaskCombine)
MASK_STATISTICS: tuple[str, ...] = get_args(MaskStatistic)
UPDATE_FROMS: tuple[str, ...] = get_args(UpdateFrom)
EPS = 1e-12
#: :func:`change_basis_update` drops the ``u_a`` axis when the action change's part orthogonal to the
#: context change is at most this fraction of the action change's norm (an angle of about 1e-4 rad
#: between the two). The changes are fp32 (unit roundoff 2^-24, about 6e-8): removing the component
#: along ``u_c`` of a parallel change leaves a rounding residual of at most order sqrt(D) * 2^-24 of its
#: norm (below 4e-6 up to D = 4096), whose direction is noise; 1e-4 stays above that with margin and far
#: below any genuinely oblique change. The changes are differences of gradients, so their own rounding is
#: relative to the gradients: a change smaller than about 1e-3 of them carries noise near this tolerance.
CHANGE_BASIS_RTOL = 1e-4


QUANTILE_STATISTICS: tuple[str, ...] = ("absolute", "relative")  # β is a per-row quantile
BLEND_STATISTICS: tuple[str, ...] = ("sign", "projection", "change_basis")  # β blends the raw gradient back in


def check_threshold(threshold: float, statistic: str = "projection", key: str = "model.mask_threshold") -> float:
    """Validate β for ``statistic``: a number in [0, 1]; 1.0 is masking off (P+) for every statistic.

    Under a quantile statistic (``absolute``, ``relative``) β is the share of channels each test keeps
    and must be > 0; under ``sign``, ``projection`` and ``change_basis`` 0 is the statistic's full update (see
    :func:`blend_with_gradient`). ValueError names ``key``.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise ValueError(f"{key} must be a number in [0, 1], got {threshold!r}")
    if math.isnan(threshold) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"{key} must be in [0, 1] (1.0 = masking off, P+), got {threshold!r}")
    if threshold == 0.0 and statistic in QUANTILE_STATISTICS:
        raise ValueError(f"{key}=0 under model.mask_statistic={statistic} would keep no channel (β is the per-row "
                         "quantile each test keeps): give a value in (0, 1]")
    return float(threshold)


def blend_with_gradient(g: torch.Tensor, update: torch.Tensor, threshold: float) -> torch.Tensor:
    """``β·g + (1 − β)·update`` (any shape, ``g`` and ``update`` alike): β of the raw gradient blended
    back into a statistic's update. Exactly ``update`` at β = 0 (the statistic at full strength) and
    exactly ``g`` at β = 1 (no disentangling: P+'s gradient)."""
    if threshold <= 0.0:
        return update
    if threshold >= 1.0:
        return g
    return threshold * g + (1.0 - threshold) * update


def _row_quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """Quantile over the last dim, kept for broadcasting; computed in fp32."""
    return torch.quantile(x.float(), q, dim=-1, keepdim=True)


def absolute_difference(g: torch.Tensor, g_other: torch.Tensor) -> torch.Tensor:
    """``|g - g_other|`` per channel (the paper read literally), same shape as ``g``.

    Scales with the gradients themselves, so a quantile test on it selects channels by gradient size
    as much as by invariance (docs/method.md, "The statistic").
    """
    return (g - g_other).abs()


def relative_difference(g: torch.Tensor, g_other: torch.Tensor) -> torch.Tensor:
    """``|g - g_other| / (|g| + |g_other|)`` per channel, in [0, 1], same shape as ``g``.

    Scale-free: 0 when the two gradients agree exactly, 1 when they have opposite signs (or one is
    zero), whatever their size. A channel with ``g = 10, g_other = 9`` scores 0.05, one with
    ``g = 0.1, g_other = -0.1`` scores 1 (the absolute difference ranks them the other way).
    """
    return (g - g_other).abs() / (g.abs() + g_other.abs() + EPS)


def sign_disagreement(g: torch.Tensor, g_other: torch.Tensor) -> torch.Tensor:
    """1.0 where ``g`` and ``g_other`` point in opposite directions (or either is 0), else 0.0.

    A sign test: "invariant" means only "pushes the channel the same way". β is no quantile here
    (a quantile of a 0/1 score is not a threshold): the context test keeps channels whose
    anchor and context gradients agree in sign, the action test those whose anchor and
    action-different gradients disagree, and :func:`triple_updates` blends β of the raw gradient
    back in (:func:`blend_with_gradient`).
    """
    return ((g * g_other) <= 0).to(g.dtype)


STATISTICS = {"absolute": absolute_difference, "relative": relative_difference, "sign": sign_disagreement}


def channel_mask(
    g_anchor: torch.Tensor,
    g_context: torch.Tensor,
    g_action: torch.Tensor,
    threshold: float,
    combine: MaskCombine = "and",
    statistic: MaskStatistic = "absolute",
) -> torch.Tensor:
    """Boolean keep-mask ``[..., L, D]`` of the identifier channels for each triple.

    ``Δc = diff(g_a, g_c)`` is small on action channels (the gradient survives a context
    change): keep ``Δc <= quantile_β(Δc)``. ``Δd = diff(g_a, g_d)`` is small on context
    channels (the gradient survives an action change): keep ``Δd >= quantile_{1-β}(Δd)``.
    ``diff`` is the ``statistic``: :func:`absolute_difference` (the paper read literally),
    :func:`relative_difference` (scale-free) or :func:`sign_disagreement` (keep ``Δc == 0``
    and ``Δd == 1``, no quantile: β below 1 does not change the mask). With β = 1 every channel
    is kept, whatever the statistic. A quantile statistic refuses β = 0 (:func:`check_threshold`).
    Source of the two tests: Huang et al., CVPR 2024 ("gradient invariance from sample triples").
    """
    if combine not in MASK_COMBINES:
        raise ValueError(f"model.mask_combine must be one of {MASK_COMBINES}, got {combine!r}")
    if statistic not in MASK_STATISTICS:
        raise ValueError(f"model.mask_statistic must be one of {MASK_STATISTICS}, got {statistic!r}")
    check_threshold(threshold, statistic)
    if not (g_anchor.shape == g_context.shape == g_action.shape):
        raise ValueError(
            "role gradients must share one shape, got "
            f"{tuple(g_anchor.shape)}, {tuple(g_context.shape)}, {tuple(g_action.shape)}"
        )
    if threshold >= 1.0:
        return torch.ones_like(g_anchor, dtype=torch.bool)
    if statistic not in STATISTICS:
        raise ValueError(f"model.mask_statistic={statistic} makes no channel mask in the embedding's channels below "
                         "β = 1.0 (its update: triple_updates)")
    diff = STATISTICS[statistic]
    delta_c, delta_d = diff(g_anchor, g_context), diff(g_anchor, g_action)
    if statistic == "sign":
        keep_c, keep_d = delta_c == 0, delta_d == 1
    else:
        keep_c = delta_c <= _row_quantile(delta_c, threshold)
        keep_d = delta_d >= _row_quantile(delta_d, 1.0 - threshold)
    if combine == "and":
        return keep_c & keep_d
    if combine == "or":
        return keep_c | keep_d
    if combine == "context_only":
        return keep_c
    return keep_d


def triple_updates(
    role_grads: torch.Tensor,
    threshold: float,
    combine: MaskCombine = "and",
    update_from: UpdateFrom = "anchor",
    statistic: MaskStatistic = "absolute",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each triple's masked (or projected) update from its role gradients.

    What β (``threshold``) means depends on the statistic, and every value changes the update:

    - ``absolute``, ``relative`` (quantile statistics): each test keeps the β-quantile of a row's
      channels (:func:`channel_mask`); β in (0, 1]; ``update = mask ⊙ g``.
    - ``projection``, ``change_basis``, ``sign`` (no quantile): ``update = β·g + (1 − β)·U(g)``
      (:func:`blend_with_gradient`), ``U`` the statistic's full update (:func:`project_update`,
      :func:`change_basis_update`, or
      ``mask ⊙ g`` with the sign mask); β in [0, 1]; β = 0 is ``U`` itself (the shipped default).

    β = 1 is P+ for every statistic: ``update = g`` (and the model loads no triples at all).

    Args:
        role_grads: ``[N, 3, L, D]``: for each of N triples, the gradients of its
            anchor, context-different and action-different losses w.r.t. the identifier.
        threshold, combine, statistic: as above and in :func:`channel_mask`.
        update_from: ``anchor`` uses ``g_a``; ``anchor_and_context`` the mean of ``g_a`` and ``g_c``.
            The action-different sample only ever shapes the mask.

    Returns:
        ``(updates [N, L, D], masks [N, L, D] bool)``; ``masks`` marks the channels the update may
        move (False: held at zero, restored after the step). ``projection`` and a blend with β > 0
        hold no channel: all True.
    """
    if role_grads.ndim != 4 or role_grads.shape[1] != 3:
        raise ValueError(f"role_grads must be [N, 3, L, D], got {tuple(role_grads.shape)}")
    if update_from not in UPDATE_FROMS:
        raise ValueError(f"model.update_from must be one of {UPDATE_FROMS}, got {update_from!r}")
    g_a, g_c, g_d = role_grads.unbind(1)
    source = g_a if update_from == "anchor" else 0.5 * (g_a + g_c)
    if statistic in ("projection", "change_basis"):
        check_threshold(threshold, statistic)
        masks = channel_mask(g_a, g_c, g_d, 1.0, combine, statistic)  # validates combine; keeps every channel
        if threshold >= 1.0:
            return source, masks
        update = (project_update if statistic == "projection" else change_basis_update)(source, g_a - g_c, g_a - g_d,
                                                                                        combine)
        return blend_with_gradient(source, update, threshold), masks
    masks = channel_mask(g_a, g_c, g_d, threshold, combine, statistic)
    if statistic == "sign" and 0.0 < threshold < 1.0:
        return blend_with_gradient(source, source * masks, threshold), torch.ones_like(masks)
    return source * masks, masks


class MaskedUpdate(NamedTuple):
    """What one optimizer step's masking made: ``update [L, D]`` (the mean over triples of
    :func:`triple_updates`), the per-triple ``masks [N, L, D]`` and ``kept_energy`` (a scalar,
    :func:`kept_energy_fraction` against the anchors' gradients)."""

    update: torch.Tensor
    masks: torch.Tensor
    kept_energy: torch.Tensor


def masked_update(
    role_grads: torch.Tensor,
    threshold: float,
    combine: MaskCombine = "and",
    update_from: UpdateFrom = "anchor",
    statistic: MaskStatistic = "absolute",
) -> MaskedUpdate:
    """The identifier's update from ``role_grads [N, 3, L, D]`` (arguments as :func:`triple_updates`)."""
    updates, masks = triple_updates(role_grads, threshold, combine, update_from, statistic)
    return MaskedUpdate(updates.mean(dim=0), masks, kept_energy_fraction(updates, role_grads[:, 0]))


def kept_fraction_per_layer(masks: torch.Tensor) -> torch.Tensor:
    """Fraction of channels kept per identifier row, averaged over triples: ``[L]``."""
    return masks.float().mean(dim=-1).reshape(-1, masks.shape[-2]).mean(dim=0)


def _along(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The component of ``x`` along ``u``, per row (last dim): ``(x·u / |u|^2) u``; 0 where u = 0."""
    return (x * u).sum(-1, keepdim=True) / u.pow(2).sum(-1, keepdim=True).clamp_min(EPS) * u


def project_update(g: torch.Tensor, context_change: torch.Tensor, action_change: torch.Tensor,
                   combine: MaskCombine = "and") -> torch.Tensor:
    """The ``projection`` statistic: directions instead of channels (beyond the paper).

    Per identifier row, the action test keeps the component of ``g`` along the action change
    ``g_a - g_d`` (anchor and action-different partner share appearance, noise and timestep, so
    their difference is the pose's), and the context test removes the component along the context
    change ``g_a - g_c``. ``and`` does both (keep, then remove), ``or`` averages the two results,
    ``context_only`` / ``action_only`` one each. Channel masks assume features are axis-aligned in
    the embedding; they are not, least at small D (docs/method.md, "The statistic"). All tensors ``[N, L, D]``.
    """
    keep_action = _along(g, action_change)
    drop_context = g - _along(g, context_change)
    if combine == "action_only":
        return keep_action
    if combine == "context_only":
        return drop_context
    if combine == "or":
        return 0.5 * (keep_action + drop_context)
    return keep_action - _along(keep_action, context_change)


def change_basis_update(g: torch.Tensor, context_change: torch.Tensor, action_change: torch.Tensor,
                        combine: MaskCombine = "and") -> torch.Tensor:
    """The ``change_basis`` statistic: the paper's two channel tests in a basis that follows the changes.

    Per identifier row, an orthonormal basis whose first axis ``u_c`` is the context change
    ``g_a - g_c`` and whose second ``u_a`` is the part of the action change ``g_a - g_d`` orthogonal to
    it (Gram-Schmidt; the other D - 2 axes complete the basis). In this basis the context change is
    nonzero on ``u_c`` alone and the action change on ``u_c`` and ``u_a`` alone, so the tests are
    keep/drop decisions per axis: the context test drops ``u_c`` (the gradient changes with the
    context there), the action test keeps ``u_c`` and ``u_a`` (it changes with the action there).
    ``and`` keeps ``u_a`` alone: ``(g · u_a) u_a``; ``context_only`` drops ``u_c``; ``action_only``
    keeps ``u_c`` and ``u_a``. ``or`` would keep every axis (P+) and is refused. An axis whose change
    is zero is left out of the basis (its coordinate is dropped): ``u_c`` when the context change's norm
    is at most :data:`EPS`, ``u_a`` when the residual's norm is at most :data:`EPS` or at most
    :data:`CHANGE_BASIS_RTOL` times the action change's norm (an action change parallel to the context
    change up to rounding, whose residual's direction is noise). All tensors ``[N, L, D]``.

    On the same axis as :func:`project_update`'s ``and`` (both lie along ``u_a``), with another signed
    length: the coordinate ``g · u_a`` instead of ``(g · â) sin θ`` (θ the angle between the two changes;
    the two can differ in sign).
    """
    if combine == "or":
        raise ValueError("model.mask_combine=or under model.mask_statistic=change_basis keeps every axis (P+): "
                         "use and, context_only or action_only")

    def unit(x: torch.Tensor, floor: torch.Tensor | float = EPS) -> torch.Tensor:
        """``x`` normalised along D; zero where its norm is at most ``floor`` (or :data:`EPS`)."""
        norm = x.norm(dim=-1, keepdim=True)
        return torch.where((norm > EPS) & (norm > floor), x / norm.clamp_min(EPS), torch.zeros_like(x))

    u_c = unit(context_change)
    u_a = unit(action_change - (action_change * u_c).sum(-1, keepdim=True) * u_c,
               CHANGE_BASIS_RTOL * action_change.norm(dim=-1, keepdim=True))
    along_c = (g * u_c).sum(-1, keepdim=True) * u_c
    along_a = (g * u_a).sum(-1, keepdim=True) * u_a
    if combine == "context_only":
        return g - along_c
    if combine == "action_only":
        return along_c + along_a
    return along_a


def kept_energy_fraction(updates: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Share of the gradient energy that reaches the update: ``sum(u^2) / sum(g^2)``, a scalar.

    ``updates`` (from :func:`triple_updates`) and ``grads`` (the anchors') ``[N, L, D]``. The kept
    *fraction* of channels can look healthy while the kept energy is tiny (a mask that keeps the
    smallest gradients), so both are logged.
    """
    return updates.float().pow(2).sum() / grads.float().pow(2).sum().clamp_min(EPS)
