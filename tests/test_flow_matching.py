"""Rectified-flow training noise (adi_lightning.flow_matching): the interpolation and velocity target by
hand, the time shift against FlowMatchEulerDiscreteScheduler, the flow time densities against diffusers'
compute_density_for_timestep_sampling, and keyed draws shared by a triple's roles."""

import math
from statistics import NormalDist

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from adi_lightning.diffusion import TIMESTEP_SAMPLINGS
from adi_lightning.flow_matching import (
    FLOW_ONLY_SAMPLINGS,
    FLOW_TIME_SAMPLINGS,
    flow_loss_weighting,
    flow_matching_target,
    flow_noisy_latents,
    flow_timesteps,
    importance_inverse_cdf,
    keyed_noise_and_sigmas,
    sample_flow_time,
    scheduler_shift,
    shift_sigma,
)


def draws(kind, n=4000, large_t=None, seed=0, **kwargs):
    gen = torch.Generator().manual_seed(seed)
    return torch.cat([sample_flow_time(gen, kind, large_t, **kwargs) for _ in range(n)])


def test_noisy_latents_and_velocity_target_by_hand():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [-2.0, 0.5]]).view(3, 1, 2, 1)
    n = torch.tensor([[0.0, 4.0], [1.0, -1.0], [6.0, 8.0]]).view(3, 1, 2, 1)
    sigmas = torch.tensor([0.0, 0.25, 1.0])
    noisy = flow_noisy_latents(x, n, sigmas)
    # sigma 0: the data; 0.25: 0.75 x + 0.25 n; 1: the noise.
    assert noisy.flatten(1).tolist() == [[1.0, 2.0], [2.5, 2.75], [6.0, 8.0]]
    assert flow_matching_target(x, n).flatten(1).tolist() == [[-1.0, 2.0], [-2.0, -5.0], [8.0, 7.5]]
    assert noisy.shape == x.shape and noisy.dtype == torch.float32


def test_the_velocity_round_trips_to_data_and_noise():
    gen = torch.Generator().manual_seed(3)
    x, n = torch.randn(5, 16, 4, 4, generator=gen), torch.randn(5, 16, 4, 4, generator=gen)
    sigmas = torch.tensor([0.0, 0.1, 0.5, 0.93, 1.0])
    noisy, v = flow_noisy_latents(x, n, sigmas), flow_matching_target(x, n)
    s = sigmas.view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy - s * v, x, rtol=0, atol=1e-6)
    torch.testing.assert_close(noisy + (1 - s) * v, n, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shift", [1.0, 3.0, 6.0])
def test_shift_matches_the_schedulers_own_sigmas_and_timesteps(shift):
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    assert scheduler_shift(scheduler.config) == shift
    u = torch.linspace(1, 1000, 1000, dtype=torch.float64).flip(0) / 1000  # its unshifted table
    sigmas = shift_sigma(u, shift)
    torch.testing.assert_close(sigmas.float(), scheduler.sigmas[:1000], rtol=0, atol=1e-6)
    torch.testing.assert_close(flow_timesteps(sigmas, 1000).float(), scheduler.timesteps, rtol=0, atol=1e-3)
    # And the noisy latents of scale_noise at those table entries.
    gen = torch.Generator().manual_seed(0)
    x, n = torch.randn(3, 16, 2, 2, generator=gen), torch.randn(3, 16, 2, 2, generator=gen)
    index = torch.tensor([0, 400, 999])
    stock = scheduler.scale_noise(x, scheduler.timesteps[index], n)
    torch.testing.assert_close(flow_noisy_latents(x, n, scheduler.sigmas[index]), stock, rtol=0, atol=1e-6)


def test_shift_is_monotone_keeps_the_ends_and_moves_towards_noise():
    u = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert torch.equal(shift_sigma(u, 1.0), u)
    shifted = shift_sigma(u, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and (shifted.diff() > 0).all() and (shifted[1:-1] > u[1:-1]).all()
    assert shift_sigma(torch.tensor(0.5), 3.0) == 0.75
    with pytest.raises(ValueError, match="shift must be > 0"):
        shift_sigma(u, 0.0)
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        scheduler_shift(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config)
    assert scheduler_shift({"shift": 3.0}) == 3.0 and scheduler_shift({}) == 1.0


def test_logit_normal_repeats_diffusers_draw_per_item_and_has_its_distribution():
    ours = draws("logit_normal", n=200)
    gen = torch.Generator().manual_seed(0)
    stock = torch.cat([compute_density_for_timestep_sampling("logit_normal", 1, 0.0, 1.0, generator=gen)
                       for _ in range(200)])
    torch.testing.assert_close(ours, stock.double(), rtol=0, atol=1e-6)
    # Distribution: quantiles of sigmoid(N(0, 1)) and a two-sample KS distance to diffusers' batched draw.
    u = draws("logit_normal", seed=1)
    assert u.median().item() == pytest.approx(0.5, abs=0.03)
    for q in (0.1, 0.25, 0.75, 0.9):
        exact = 1 / (1 + math.exp(-NormalDist().inv_cdf(q)))
        assert torch.quantile(u, q).item() == pytest.approx(exact, abs=0.03), q
    batched = compute_density_for_timestep_sampling("logit_normal", 4000, 0.0, 1.0,
                                                    generator=torch.Generator().manual_seed(2)).double()
    grid = torch.linspace(0, 1, 201, dtype=torch.float64)
    ks = ((u[:, None] <= grid).double().mean(0) - (batched[:, None] <= grid).double().mean(0)).abs().max()
    assert ks < 0.05  # 5 % critical value for n = m = 4000 is 0.030
    # A shifted mean moves the median to sigmoid(mean).
    shifted_mean = draws("logit_normal", n=1000, logit_mean=1.0)
    assert shifted_mean.median().item() == pytest.approx(1 / (1 + math.exp(-1)), abs=0.03)


def test_uniform_repeats_diffusers_draw_and_every_kind_stays_in_range():
    gen = torch.Generator().manual_seed(0)
    stock = compute_density_for_timestep_sampling("none", 50, generator=gen)
    assert torch.equal(draws("uniform", n=50), stock.double())  # rand(1) x 50 = rand(50) on the CPU
    for kind in FLOW_TIME_SAMPLINGS:
        u = draws(kind, n=1000)
        assert u.dtype == torch.float64 and u.shape == (1000,) and 0 <= u.min() and u.max() < 1, kind


def test_importance_and_cubic_favour_large_u_as_the_ddpm_samplings_favour_large_t():
    share = {kind: (draws(kind) >= 0.8).double().mean().item() for kind in ("uniform", "importance", "cubic")}
    # Shares of u >= 0.8: uniform 0.2; importance 0.2 + sin(0.8 pi) / (2 pi) = 0.294; cubic 0.2^(1/3) = 0.585
    assert share["uniform"] == pytest.approx(0.20, abs=0.03)
    assert share["importance"] == pytest.approx(0.2 + math.sin(0.8 * math.pi) / (2 * math.pi), abs=0.03)
    assert share["cubic"] == pytest.approx(0.2 ** (1 / 3), abs=0.03)
    # The inverse CDF inverts F(u) = u - sin(pi u) / (2 pi), and the density's ends are 0.5 and 1.5.
    v = torch.rand(10000, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    u = importance_inverse_cdf(v)
    torch.testing.assert_close(u - torch.sin(math.pi * u) / (2 * math.pi), v, rtol=0, atol=1e-12)
    low, high = (u < 0.05).double().mean().item(), (u >= 0.95).double().mean().item()
    assert high / low == pytest.approx(3.0, rel=0.2)


def test_large_t_phase_is_uniform_in_its_band_before_the_shift():
    for kind in FLOW_TIME_SAMPLINGS:
        u = draws(kind, n=2000, large_t=0.8)
        assert u.min() >= 0.8 and u.max() < 1 and u.std().item() == pytest.approx(0.2 / math.sqrt(12), rel=0.1)
    with pytest.raises(ValueError, match=r"large_t must be in \[0, 1\)"):
        draws("uniform", n=1, large_t=1.0)
    with pytest.raises(ValueError, match="logit_normal"):
        draws("lognorm", n=1)


def test_keyed_draws_are_shared_by_roles_rank_independent_and_shifted():
    latents = torch.zeros(3 * 64, 16, 2, 2)
    keys = list(range(64))
    for step in (0, 24):
        _, s = keyed_noise_and_sigmas(keys, step, 3, latents, "logit_normal", 3.0, large_t_steps=25)
        assert s.min() >= shift_sigma(torch.tensor(0.8), 3.0) - 1e-6  # the band [0.8, 1) shifted: [0.923, 1)
    noise, s = keyed_noise_and_sigmas(keys, 25, 3, latents, "logit_normal", 3.0, large_t_steps=25)
    assert s.dtype == torch.float32 and s.shape == (192,) and s.min() < 0.9 and noise.shape == latents.shape
    # A triple's members share sigma and noise; the draw is a function of (key, step) only.
    assert torch.equal(s.view(64, 3), s.view(64, 3)[:, :1].expand(64, 3))
    assert torch.equal(noise.view(64, 3, -1)[:, 0], noise.view(64, 3, -1)[:, 2])
    again, s_again = keyed_noise_and_sigmas(keys[::-1], 25, 3, latents, "logit_normal", 3.0, large_t_steps=25)
    assert torch.equal(s_again.view(64, 3).flip(0), s.view(64, 3))
    assert torch.equal(again.view(64, 3, -1).flip(0), noise.view(64, 3, -1))
    halves = [keyed_noise_and_sigmas(part, 25, 3, latents[:96], "logit_normal", 3.0) for part in (keys[:32], keys[32:])]
    assert torch.equal(torch.cat([h[1] for h in halves]), s) and torch.equal(torch.cat([h[0] for h in halves]), noise)
    # The sigma is the shifted flow time of the same generator's first draw; another step draws anew.
    from adi_lightning.data.triples import triple_key

    u = sample_flow_time(torch.Generator().manual_seed(triple_key(5, 25)), "logit_normal")
    assert s[15].item() == pytest.approx(shift_sigma(u, 3.0).item(), abs=1e-7)
    _, other = keyed_noise_and_sigmas(keys, 26, 3, latents, "logit_normal", 3.0)
    assert not torch.equal(other, s)


@pytest.mark.parametrize("scheme", ["none", "sigma_sqrt", "cosmap"])
def test_loss_weighting_matches_diffusers(scheme):
    sigmas = torch.tensor([0.05, 0.3, 0.5, 0.77, 1.0])
    stock = compute_loss_weighting_for_sd3("logit_normal" if scheme == "none" else scheme, sigmas)
    torch.testing.assert_close(flow_loss_weighting(sigmas, scheme), stock.float())


def test_loss_weighting_refuses_unknown_schemes_and_ddpm_samplings_exist_in_flow_time():
    with pytest.raises(ValueError, match="cosmap"):
        flow_loss_weighting(torch.ones(2), "mode")
    assert set(TIMESTEP_SAMPLINGS) <= set(FLOW_TIME_SAMPLINGS)
    assert set(FLOW_TIME_SAMPLINGS) - set(TIMESTEP_SAMPLINGS) == set(FLOW_ONLY_SAMPLINGS) == {"logit_normal"}


@pytest.mark.parametrize("time_shift_type", ["exponential", "linear"])
@pytest.mark.parametrize("image_seq_len", [64, 256, 1024, 4096])
def test_the_dynamic_shift_is_the_flux_schedulers_mu_time_shift(time_shift_type, image_seq_len):
    """FLUX's scheduler shifts by mu (FluxPipeline's calculate_shift of the packed image tokens): its
    set_timesteps(sigmas=u, mu=mu) table is shift_sigma(u, scheduler_shift(config, image_seq_len))."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from adi_lightning.flow_matching import dynamic_shift_mu
    from adi_lightning.tiny.flux import FLUX_SCHEDULER

    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER, time_shift_type=time_shift_type)
    mu = calculate_shift(image_seq_len)
    assert dynamic_shift_mu(image_seq_len) == pytest.approx(mu, abs=1e-12)
    u = torch.linspace(1.0, 0.05, 12, dtype=torch.float64)
    scheduler.set_timesteps(sigmas=u.tolist(), mu=mu)
    shift = scheduler_shift(scheduler.config, image_seq_len)
    assert shift == pytest.approx(math.exp(mu) if time_shift_type == "exponential" else mu)
    torch.testing.assert_close(scheduler.sigmas[:-1].double(), shift_sigma(u, shift), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="use_dynamic_shifting.*pass image_seq_len"):
        scheduler_shift(scheduler.config)


def test_the_flow_matching_objective_shifts_by_the_latents_size_when_dynamic():
    from adi_lightning.objective import FlowMatchingObjective
    from adi_lightning.tiny.flux import FLUX_SCHEDULER

    flux = FlowMatchingObjective(FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER).config, timestep_scale=1.0,
                                 patch_size=2)
    sd3 = FlowMatchingObjective(FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    assert flux.shift is None and sd3.shift == 3.0 and sd3.shift_for(None) == 3.0
    small, large = torch.zeros(2, 16, 32, 32), torch.zeros(2, 16, 128, 128)  # 256 and 4096 packed tokens
    assert flux.shift_for(small) == pytest.approx(math.exp(0.5)) and flux.shift_for(large) == pytest.approx(
        math.exp(1.15))
    noise, sigmas = flux.draw([3, 4], 7, 1, small, "logit_normal")
    expected = keyed_noise_and_sigmas([3, 4], 7, 1, small, "logit_normal", math.exp(0.5))
    assert torch.equal(noise, expected[0]) and torch.equal(sigmas, expected[1])
    assert not torch.equal(flux.draw([3, 4], 7, 1, large, "logit_normal")[1], sigmas)
    assert torch.equal(flux.model_timesteps(sigmas), sigmas) and torch.equal(sd3.model_timesteps(sigmas), sigmas * 1000)
    with pytest.raises(ValueError, match="pass image_seq_len"):
        flux.sample_time(torch.Generator().manual_seed(0), "uniform")
    assert flux.sample_time(torch.Generator().manual_seed(0), "uniform", small).shape == (1,)
