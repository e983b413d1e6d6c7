"""Training timesteps: the samplings, the large-t phase and their refusals (adi_lightning.diffusion)."""

import pytest
import torch

from adi_lightning.checks import check_model_settings
from adi_lightning.diffusion import keyed_noise_and_timesteps, sample_timestep

T = 1000


def draws(kind, n=2000, large_t=None):
    gen = torch.Generator().manual_seed(0)
    return torch.cat([sample_timestep(gen, T, kind, large_t) for _ in range(n)])


@pytest.mark.parametrize("kind", ["uniform", "importance", "cubic"])
def test_each_sampling_stays_in_range_and_large_t_overrides_it(kind):
    t = draws(kind)
    assert t.dtype == torch.int64 and 0 <= t.min() and t.max() < T
    late = draws(kind, large_t=0.8)
    assert late.min() >= 800 and late.max() < T and late.float().std() > 40  # uniform over [800, 1000)


def test_importance_and_cubic_favour_large_t_over_uniform():
    share = {kind: (draws(kind) >= 800).float().mean().item() for kind in ("uniform", "importance", "cubic")}
    # Shares of t >= 0.8 T: uniform 0.2; importance 0.2 + sin(0.8 pi) / (2 pi) = 0.29; cubic 0.2^(1/3) = 0.58
    assert share["uniform"] == pytest.approx(0.20, abs=0.03)
    assert share["importance"] == pytest.approx(0.29, abs=0.03)
    assert share["cubic"] == pytest.approx(0.58, abs=0.03)


def test_large_t_phase_ends_after_large_t_steps_and_roles_share_draws():
    latents = torch.zeros(3 * 64, 4, 2, 2)
    keys = list(range(64))
    for step in (0, 24):
        _, t = keyed_noise_and_timesteps(keys, step, 3, latents, T, "uniform", large_t_steps=25, large_t_min=0.8)
        assert t.min() >= 800
    noise, t = keyed_noise_and_timesteps(keys, 25, 3, latents, T, "uniform", large_t_steps=25, large_t_min=0.8)
    assert t.min() < 800  # 64 uniform draws: P(all >= 800) = 0.2^64
    # A triple's members share timestep and noise; the draw is a function of (key, step) only.
    assert torch.equal(t.view(64, 3), t.view(64, 3)[:, :1].expand(64, 3))
    assert torch.equal(noise.view(64, 3, -1)[:, 0], noise.view(64, 3, -1)[:, 2])
    again, t_again = keyed_noise_and_timesteps(keys[::-1], 25, 3, latents, T, "uniform", 25, 0.8)
    assert torch.equal(t_again.view(64, 3).flip(0), t.view(64, 3))
    # Off (0 steps): step 0 samples the configured kind, so small t appear.
    _, t0 = keyed_noise_and_timesteps(keys, 0, 1, latents[:64], T, "uniform", large_t_steps=0)
    assert t0.min() < 800


@pytest.mark.parametrize("steps, low, message", [
    (-1, 0.8, "model.large_t_steps must be an integer >= 0"),
    (2.5, 0.8, "model.large_t_steps must be an integer >= 0"),
    (True, 0.8, "model.large_t_steps must be an integer >= 0"),
    (25, 1.0, r"model.large_t_min must be in \[0, 1\)"),
    (25, -0.1, r"model.large_t_min must be in \[0, 1\)"),
])
def test_large_t_settings_out_of_range_are_refused_by_key(steps, low, message):
    with pytest.raises(ValueError, match=message):
        check_model_settings(0.5, "and", "projection", "anchor", "importance", 0.02, 0.0, 25, steps, low)
