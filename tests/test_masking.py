"""The mask math on hand-made gradients whose invariant channels are known."""

import pytest
import torch

from adi_lightning.masking import (
    CHANGE_BASIS_RTOL,
    change_basis_update,
    channel_mask,
    check_threshold,
    kept_energy_fraction,
    kept_fraction_per_layer,
    masked_update,
    relative_difference,
)

D = 8
# Channels 0-3: the gradient survives a context change (action channels).
# Channels 2-5: the gradient survives an action change (context channels).
G_A = torch.arange(1.0, D + 1).reshape(1, D)
G_C = G_A + torch.tensor([[0.0, 0.0, 0.0, 0.0, 5.0, 6.0, 7.0, 8.0]])
G_D = G_A + torch.tensor([[9.0, 8.0, 0.0, 0.0, 0.0, 0.0, 7.0, 6.0]])


def as_set(mask: torch.Tensor) -> set[int]:
    return set(torch.nonzero(mask[0]).flatten().tolist())


def test_each_combine_mode_keeps_the_expected_channels():
    # beta = 0.5: keep_c = the 4 smallest |g_a - g_c| = {0,1,2,3};
    # keep_d = the 4 largest |g_a - g_d| = {0,1,6,7} (context channels 2-5 are blocked).
    assert as_set(channel_mask(G_A, G_C, G_D, 0.5, "context_only")) == {0, 1, 2, 3}
    assert as_set(channel_mask(G_A, G_C, G_D, 0.5, "action_only")) == {0, 1, 6, 7}
    assert as_set(channel_mask(G_A, G_C, G_D, 0.5, "and")) == {0, 1}
    assert as_set(channel_mask(G_A, G_C, G_D, 0.5, "or")) == {0, 1, 2, 3, 6, 7}


def test_threshold_one_keeps_every_channel():
    for combine in ("and", "or", "context_only", "action_only"):
        assert channel_mask(G_A, G_C, G_D, 1.0, combine).all()


def test_quantiles_are_per_row():
    # Row 1 is row 0 scaled by 1000: a global quantile would keep only row 0's channels.
    g_a = torch.cat([G_A, G_A * 1000])
    g_c = torch.cat([G_C, G_C * 1000])
    g_d = torch.cat([G_D, G_D * 1000])
    mask = channel_mask(g_a, g_c, g_d, 0.5, "and")
    assert torch.equal(mask[0], mask[1])
    assert mask.sum(-1).tolist() == [2, 2]


@pytest.mark.parametrize("bad", [-0.1, 1.01, float("nan"), "0.5", True])
def test_threshold_out_of_range_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="mask_threshold"):
        check_threshold(bad)
    with pytest.raises(ValueError, match="mask_threshold"):
        channel_mask(G_A, G_C, G_D, bad)


@pytest.mark.parametrize("statistic", ["absolute", "relative"])
def test_a_quantile_statistic_refuses_beta_zero_by_name(statistic):
    # A 0-quantile keeps no channel: refused, where the blending statistics take 0 as their full update.
    with pytest.raises(ValueError, match=f"model.mask_threshold=0 under model.mask_statistic={statistic}"):
        check_threshold(0.0, statistic)
    with pytest.raises(ValueError, match="model.mask_threshold=0"):
        masked_update(torch.stack([G_A, G_C, G_D]).unsqueeze(0), 0.0, statistic=statistic)
    assert check_threshold(0.0, "projection") == check_threshold(0.0, "sign") == 0.0


def test_unknown_combine_and_update_from_are_errors():
    grads = torch.stack([G_A, G_C, G_D]).unsqueeze(0)
    with pytest.raises(ValueError, match="mask_combine"):
        masked_update(grads, 0.5, "xor")
    with pytest.raises(ValueError, match="update_from"):
        masked_update(grads, 0.5, "and", "context")


def test_update_is_the_mean_of_masked_anchor_gradients_per_triple():
    # Two triples with different invariant channels: each gets its own mask.
    t1 = torch.stack([G_A, G_C, G_D])  # [3, 1, D]
    t2 = torch.stack([G_A.flip(-1), G_C.flip(-1), G_D.flip(-1)])
    update, masks, _ = masked_update(torch.stack([t1, t2]), 0.5, "and", "anchor")
    assert as_set(masks[0]) == {0, 1}
    assert as_set(masks[1]) == {6, 7}
    expected = (G_A * masks[0] + G_A.flip(-1) * masks[1]) / 2
    assert torch.equal(update, expected)

    update_ac = masked_update(torch.stack([t1, t2]), 0.5, "and", "anchor_and_context").update
    expected_ac = (0.5 * (G_A + G_C) * masks[0] + 0.5 * (G_A + G_C).flip(-1) * masks[1]) / 2
    assert torch.allclose(update_ac, expected_ac)


def test_masking_off_is_the_plain_mean_gradient():
    grads = torch.randn(4, 3, 5, D)
    update, masks, _ = masked_update(grads, 1.0)
    assert masks.all()
    assert torch.allclose(update, grads[:, 0].mean(0))


def test_kept_fraction_per_layer():
    masks = torch.zeros(2, 3, 4, dtype=torch.bool)
    masks[0, 1, :2] = True
    masks[1, 1, :] = True
    assert kept_fraction_per_layer(masks).tolist() == [0.0, 0.75, 0.0]


# Two channels that separate the statistics (context test only):
#   channel 0: g_a = 10, g_c = 9   -- large but nearly invariant (relative 0.05, absolute 1.0)
#   channel 1: g_a = 0.1, g_c = -0.1 -- tiny but flips sign (relative 1.0, absolute 0.2)
SEP_A = torch.tensor([[10.0, 0.1]])
SEP_C = torch.tensor([[9.0, -0.1]])
SEP_D = torch.zeros(1, 2)


def test_statistics_disagree_where_they_should():
    absolute = channel_mask(SEP_A, SEP_C, SEP_D, 0.5, "context_only", "absolute")
    relative = channel_mask(SEP_A, SEP_C, SEP_D, 0.5, "context_only", "relative")
    sign = channel_mask(SEP_A, SEP_C, SEP_D, 0.5, "context_only", "sign")
    assert absolute.tolist() == [[False, True]]  # keeps the small, sign-flipping gradient
    assert relative.tolist() == [[True, False]]  # keeps the large, invariant one
    assert sign.tolist() == [[True, False]]
    assert relative_difference(SEP_A, SEP_C)[0].tolist() == pytest.approx([1 / 19, 1.0])


def test_sign_test_keeps_agreeing_context_and_disagreeing_action_channels():
    g_a = torch.tensor([[1.0, 1.0, -2.0, 3.0]])
    g_c = torch.tensor([[2.0, -1.0, -1.0, 1.0]])  # agrees on 0, 2, 3
    g_d = torch.tensor([[-1.0, -1.0, -3.0, 0.0]])  # disagrees on 0, 1, 3 (zero counts as disagreeing)
    assert as_set(channel_mask(g_a, g_c, g_d, 0.5, "and", "sign")) == {0, 3}
    assert as_set(channel_mask(g_a, g_c, g_d, 0.2, "and", "sign")) == {0, 3}  # β is not a quantile here
    assert channel_mask(g_a, g_c, g_d, 1.0, "and", "sign").all()


def test_unknown_statistic_is_an_error():
    with pytest.raises(ValueError, match="model.mask_statistic"):
        channel_mask(G_A, G_C, G_D, 0.5, "and", "cosine")


def test_kept_energy_differs_from_kept_fraction():
    grads = torch.tensor([[[3.0, 1.0, 1.0, 1.0]]])
    masks = torch.tensor([[[False, True, True, True]]])
    assert kept_fraction_per_layer(masks).item() == 0.75
    assert kept_energy_fraction(grads * masks, grads).item() == pytest.approx(3 / 12)


def test_projection_keeps_the_action_change_and_drops_the_context_change():
    # Row of D = 3: the anchor gradient has an action part (axis 0), a context part (axis 1) and
    # a part shared by all three roles (axis 2); neither part is channel-aligned after a rotation.
    rotation = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0)))[0]
    action, context, shared = rotation
    g_a = (2 * action + 3 * context + shared).reshape(1, 1, 1, 3)
    g_c = (0 * action + 0 * context + shared).reshape(1, 1, 1, 3) + 2 * action.reshape(1, 1, 1, 3)  # same action
    g_d = (3 * context + shared).reshape(1, 1, 1, 3)  # same context, no action
    grads = torch.cat([g_a, g_c, g_d], dim=1)  # [1, 3, 1, 3]
    update, masks, _ = masked_update(grads, 0.0, "action_only", statistic="projection")
    assert torch.allclose(update[0], 2 * action, atol=1e-5)
    update = masked_update(grads, 0.0, "context_only", statistic="projection").update
    assert torch.allclose(update[0], 2 * action + shared, atol=1e-5)
    assert masks.all()
    assert torch.equal(masked_update(grads, 1.0, statistic="projection")[0], g_a[0, 0])


# ------------------------------------------------------------------ β under the blending statistics
def _rotated_triple():
    """One triple, one row of D = 3 (as above): ``g_a = 2 action + 3 context + shared``, the context
    partner shares the action, the action-different partner shares the context."""
    action, context, shared = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0)))[0]
    g_a, g_c, g_d = 2 * action + 3 * context + shared, 2 * action + shared, 3 * context + shared
    return torch.stack([g_a, g_c, g_d]).reshape(1, 3, 1, 3), action, context, shared


@pytest.mark.parametrize("beta", [0.3, 0.7])
def test_projection_beta_blends_the_raw_gradient_back_in(beta):
    grads, action, context, shared = _rotated_triple()
    g_a = grads[0, 0, 0]
    # action_only: P(g) = 2 action; context_only: P(g) = 2 action + shared.
    update = masked_update(grads, beta, "action_only", statistic="projection").update[0]
    assert torch.allclose(update, beta * g_a + (1 - beta) * 2 * action, atol=1e-5)
    update = masked_update(grads, beta, "context_only", statistic="projection").update[0]
    assert torch.allclose(update, beta * g_a + (1 - beta) * (2 * action + shared), atol=1e-5)
    # The context direction is kept in proportion β: what separates the blend from the full projection.
    assert float(update @ context) == pytest.approx(3 * beta, abs=1e-5)


def test_projection_ends_are_the_full_projection_and_the_raw_gradient_exactly():
    from adi_lightning.masking import project_update

    grads, *_ = _rotated_triple()
    g_a, g_c, g_d = grads.unbind(1)
    for combine in ("and", "or", "context_only", "action_only"):
        full = project_update(g_a, g_a - g_c, g_a - g_d, combine)  # the update before β had a meaning
        assert torch.equal(masked_update(grads, 0.0, combine, statistic="projection").update, full[0])
        assert torch.equal(masked_update(grads, 1.0, combine, statistic="projection").update, g_a[0])
    updates = {b: masked_update(grads, b, "and", statistic="projection").update for b in (0.0, 0.3, 0.7, 1.0)}
    assert all(not torch.allclose(updates[a], updates[b]) for a in updates for b in updates if a < b)


def test_sign_beta_lets_the_dropped_channels_through_in_proportion():
    g_a = torch.tensor([[1.0, 1.0, -2.0, 3.0]])
    g_c = torch.tensor([[2.0, -1.0, -1.0, 1.0]])
    g_d = torch.tensor([[-1.0, -1.0, -3.0, 0.0]])  # the sign mask ("and") keeps {0, 3}, see above
    grads = torch.stack([g_a, g_c, g_d]).unsqueeze(0)
    full = masked_update(grads, 0.0, statistic="sign")
    assert full.update.tolist() == [[1.0, 0.0, 0.0, 3.0]] and as_set(full.masks[0]) == {0, 3}
    for beta in (0.3, 0.7):
        blended = masked_update(grads, beta, statistic="sign")
        assert blended.update[0].tolist() == pytest.approx([1.0, beta * 1.0, beta * -2.0, 3.0])
        assert blended.masks.all()  # no channel is held: nothing is restored after the step
    # The quantile statistics at the same β keep whole channels, never a fraction of one.
    for statistic in ("absolute", "relative"):
        update = masked_update(grads, 0.7, statistic=statistic).update
        assert all(u in (0.0, g) for u, g in zip(update[0].tolist(), g_a[0].tolist()))


# ------------------------------------------------------------------ change_basis: the channel tests in a rotated basis
def _oblique_triple():
    """One row of D = 4 where the action change is NOT orthogonal to the context change, so that
    ``change_basis`` and ``projection`` part ways: context change 2 e0, action change e0 + e1."""
    g_a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    g_c = g_a - torch.tensor([2.0, 0.0, 0.0, 0.0])
    g_d = g_a - torch.tensor([1.0, 1.0, 0.0, 0.0])
    return torch.stack([g_a, g_c, g_d]).reshape(1, 3, 1, 4), g_a


def test_change_basis_keeps_the_coordinates_of_the_axes_that_pass_each_test():
    grads, g_a = _oblique_triple()
    # basis: u_c = e0 (the context change), u_a = e1 (the action change's part orthogonal to it); the rest e2, e3
    update = masked_update(grads, 0.0, "and", statistic="change_basis")
    assert torch.equal(update.update, torch.tensor([[0.0, 2.0, 0.0, 0.0]]))  # u_a alone
    assert update.masks.all()  # no channel of the token embedding is held
    assert torch.equal(masked_update(grads, 0.0, "context_only", statistic="change_basis").update,
                       torch.tensor([[0.0, 2.0, 3.0, 4.0]]))  # every axis but u_c
    assert torch.equal(masked_update(grads, 0.0, "action_only", statistic="change_basis").update,
                       torch.tensor([[1.0, 2.0, 0.0, 0.0]]))  # u_c and u_a
    # projection along the same direction has another length: (g·â) sin θ = (3/√2)(1/√2) = 1.5, not g·u_a = 2
    assert torch.allclose(masked_update(grads, 0.0, "and", statistic="projection").update,
                          torch.tensor([[0.0, 1.5, 0.0, 0.0]]))


def test_change_basis_is_rotation_equivariant_where_a_channel_mask_is_not():
    grads, _ = _oblique_triple()
    rotation = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(3)))[0]
    rotated = grads @ rotation.T
    for statistic in ("change_basis", "relative"):
        plain = masked_update(grads, 0.5 if statistic == "relative" else 0.0, "and", statistic=statistic).update
        turned = masked_update(rotated, 0.5 if statistic == "relative" else 0.0, "and", statistic=statistic).update
        same = torch.allclose(turned, plain @ rotation.T, atol=1e-5)
        assert same == (statistic == "change_basis"), statistic


@pytest.mark.parametrize("beta", [0.3, 0.7])
def test_change_basis_beta_blends_the_raw_gradient_back_in_and_its_ends_are_exact(beta):
    grads, g_a = _oblique_triple()
    full = torch.tensor([0.0, 2.0, 0.0, 0.0])
    assert torch.allclose(masked_update(grads, beta, statistic="change_basis").update[0], beta * g_a + (1 - beta) * full)
    assert torch.equal(masked_update(grads, 1.0, statistic="change_basis").update[0], g_a)


def test_change_basis_refuses_or_and_survives_a_zero_change():
    grads, g_a = _oblique_triple()
    with pytest.raises(ValueError, match="mask_combine=or under model.mask_statistic=change_basis keeps every axis"):
        masked_update(grads, 0.0, "or", statistic="change_basis")
    same = torch.stack([g_a, g_a, g_a]).reshape(1, 3, 1, 4)  # no change at all: nothing passes the action test
    assert torch.equal(masked_update(same, 0.0, statistic="change_basis").update, torch.zeros(1, 4))


def _changes(relative_residual: float, d: int = 768):
    """fp32 ``(g, context change c, action change a = 3 c + r)`` of one row, ``[1, 1, d]``, with ``r``
    orthogonal to ``c`` and ``|r| = relative_residual * |3 c|``."""
    gen = torch.Generator().manual_seed(5)
    g, c, r = (torch.randn(d, generator=gen) for _ in range(3))
    r = r - (r @ c) / (c @ c) * c
    r = r / r.norm() * relative_residual * (3 * c).norm()
    return g.reshape(1, 1, d), c.reshape(1, 1, d), (3 * c + r).reshape(1, 1, d)


@pytest.mark.parametrize("relative_residual", [1e-7, 0.1 * CHANGE_BASIS_RTOL])
def test_change_basis_drops_u_a_when_the_action_change_is_parallel_to_the_context_change_up_to_rounding(
        relative_residual):
    """A residual of fp32 rounding's size (1e-7: its direction is noise), or one tenth of the tolerance, drops u_a."""
    g, c, a = _changes(relative_residual)
    assert torch.equal(change_basis_update(g, c, a, "and"), torch.zeros_like(g))
    u_c = c / c.norm()
    torch.testing.assert_close(change_basis_update(g, c, a, "action_only"), (g * u_c).sum(-1, keepdim=True) * u_c)
    torch.testing.assert_close(change_basis_update(g, c, a, "context_only"), g - (g * u_c).sum(-1, keepdim=True) * u_c)


@pytest.mark.parametrize("relative_residual", [10 * CHANGE_BASIS_RTOL, 100 * CHANGE_BASIS_RTOL, 1.0])
def test_change_basis_keeps_u_a_of_a_genuinely_oblique_action_change(relative_residual):
    g, c, a = _changes(relative_residual)
    g64, c64, a64 = g.double(), c.double(), a.double()
    residual = a64 - (a64 * c64).sum(-1, keepdim=True) / (c64 * c64).sum(-1, keepdim=True) * c64
    u_a = residual / residual.norm(dim=-1, keepdim=True)
    expected = ((g64 * u_a).sum(-1, keepdim=True) * u_a).float()
    update = change_basis_update(g, c, a, "and")
    assert update.norm() > 0.01 * g.norm()
    torch.testing.assert_close(update, expected, rtol=1e-3, atol=1e-5)


def test_check_model_settings_refuses_or_under_change_basis_by_name():
    from adi_lightning.checks import check_model_settings

    with pytest.raises(ValueError, match="model.mask_combine=or under model.mask_statistic=change_basis"):
        check_model_settings(0.0, "or", "change_basis", "anchor", "importance", 0.02, 0.01, 25)
    check_model_settings(1.0, "or", "change_basis", "anchor", "importance", 0.02, 0.01, 25)  # masking off: inert, not wrong


def test_the_channel_preset_keeps_or_drops_whole_axes_of_its_basis():
    """configs/model/adi_channel.yaml is a per-axis keep/drop decision in the basis of the triple's changes:
    the update is the anchor gradient's coordinate on the kept axis u_a (here e1) and nothing else."""
    from pathlib import Path

    import yaml

    preset = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "model" / "adi_channel.yaml").read_text())
    assert preset["mask_statistic"] == "change_basis" and preset["mask_threshold"] == 0.0
    grads, g_a = _oblique_triple()
    update = masked_update(grads, preset["mask_threshold"], preset["mask_combine"], preset["update_from"],
                           preset["mask_statistic"]).update
    assert torch.equal(update, torch.tensor([[0.0, float(g_a[1]), 0.0, 0.0]]))
