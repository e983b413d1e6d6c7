"""Pure functions of rectified-flow (flow matching) training noise, for MMDiT backbones (SD3, FLUX).

The flow-matching counterpart of :mod:`adi_lightning.diffusion`: flow time sampling, the scheduler's
time shift (static as SD3's, or FLUX's resolution-dependent ``mu``), per-triple noise and sigmas, the
noisy latents, the velocity target and the loss weight.
Rectified flow (Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image
Synthesis", SD3) interpolates on a straight line between the data ``x`` and the noise ``n``:

    z_sigma = (1 - sigma) x + sigma n,     v = dz/dsigma = n - x,

and the transformer predicts ``v`` at timestep ``sigma * num_train_timesteps`` (a float, as
``FlowMatchEulerDiscreteScheduler.timesteps``; FLUX's transformer takes ``sigma`` itself and multiplies
by 1000 inside). ``sigma = 1`` is pure noise, ``sigma = 0`` the data.

The flow time ``u`` in ``[0, 1)`` is drawn by ``kind`` (the ``model.timestep_sampling`` densities of
:mod:`adi_lightning.diffusion` on ``u = t / T``, plus SD3's ``logit_normal``), then shifted:
``sigma = s u / (1 + (s - 1) u)`` with the scheduler's ``shift`` s (SD3: 3.0), which moves the draws
towards noise as the scheduler's own sigma table does (diffusers' SD3 training scripts index that
table, so their training sigmas are shifted too). Those scripts index it from the noisy end
(``u = 0`` gives ``sigma = 1``): their ``logit_mean`` m is this module's -m; at m = 0 (SD3's
setting) the two agree, the logit-normal density being symmetric about 1/2.

No model and no Lightning here: tensors and generators in, tensors out.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch

from adi_lightning.data.triples import triple_key

FlowTimeSampling = Literal["uniform", "importance", "cubic", "logit_normal"]
FLOW_TIME_SAMPLINGS: tuple[str, ...] = get_args(FlowTimeSampling)
#: Timestep samplings that only flow matching has (a DDPM family must refuse them by name).
FLOW_ONLY_SAMPLINGS: tuple[str, ...] = ("logit_normal",)

FlowLossWeighting = Literal["none", "sigma_sqrt", "cosmap"]
FLOW_LOSS_WEIGHTINGS: tuple[str, ...] = get_args(FlowLossWeighting)

_BELOW_ONE = math.nextafter(1.0, 0.0)


def importance_inverse_cdf(v: torch.Tensor, iterations: int = 8) -> torch.Tensor:
    """``u`` in ``[0, 1)`` with ``F(u) = v`` for the density ``1 - 0.5 cos(pi u)`` on ``[0, 1)``.

    The density integrates to 1, so ``F(u) = u - sin(pi u) / (2 pi)``; ``F' >= 0.5`` and
    ``|F''| <= pi / 2`` make Newton's method from ``u = v`` converge in a few steps. ``v``: any
    shape, values in ``[0, 1)``; the result is float64 of the same shape.
    """
    v = v.double()
    u = v.clone()
    for _ in range(iterations):
        cdf = u - torch.sin(math.pi * u) / (2 * math.pi)
        u = (u - (cdf - v) / (1.0 - 0.5 * torch.cos(math.pi * u))).clamp(0.0, _BELOW_ONE)
    return u


def sample_flow_time(generator: torch.Generator, kind: FlowTimeSampling, large_t: float | None = None,
                     logit_mean: float = 0.0, logit_std: float = 1.0) -> torch.Tensor:
    """One flow time ``u`` ``[1]`` (float64) in ``[0, 1)``, before the scheduler's shift.

    ``uniform``; ``importance``: density ``1 - 0.5 cos(pi u)`` (ReVersion's weight, Huang et al. 2023, as
    :func:`adi_lightning.diffusion.sample_timestep` on ``t / T``), favouring large u; ``cubic``:
    ``u = 1 - v^3`` for uniform v (diffusers' SDXL LoRA scripts); ``logit_normal``: ``sigmoid(z)``,
    ``z ~ N(logit_mean, logit_std)`` (Esser et al. 2024, tailored SNR samplers: "lognorm(0.00, 1.00)" ranked
    best; diffusers' ``compute_density_for_timestep_sampling("logit_normal")``, whose draw it repeats for one item).
    ``large_t`` (a fraction f) overrides ``kind``: uniform in ``[f, 1)``, the large-t phase.
    Raises ValueError for another ``kind`` or a ``large_t`` outside ``[0, 1)``.
    """
    if large_t is not None:
        if not 0.0 <= large_t < 1.0:
            raise ValueError(f"large_t must be in [0, 1) (a fraction of flow time), got {large_t!r}")
        v = torch.rand((1,), generator=generator).double()
        return (large_t + (1.0 - large_t) * v).clamp(max=_BELOW_ONE)
    if kind == "uniform":
        return torch.rand((1,), generator=generator).double()
    if kind == "logit_normal":
        z = torch.normal(mean=logit_mean, std=logit_std, size=(1,), generator=generator)
        return torch.sigmoid(z.double()).clamp(max=_BELOW_ONE)
    if kind == "cubic":
        v = 1.0 - torch.rand((1,), generator=generator).double()  # (0, 1], so u stays below 1
        return 1.0 - v**3
    if kind == "importance":
        return importance_inverse_cdf(torch.rand((1,), generator=generator))
    raise ValueError(f"flow time sampling must be one of {', '.join(FLOW_TIME_SAMPLINGS)}, got {kind!r}")


def shift_sigma(u: torch.Tensor, shift: float) -> torch.Tensor:
    """The scheduler's time shift ``sigma = shift u / (1 + (shift - 1) u)`` of flow time ``u`` (any shape).

    As ``FlowMatchEulerDiscreteScheduler.__init__`` shifts its sigma table (Esser et al. 2024,
    resolution-dependent shifting of timestep schedules); ``shift = 1`` is the identity, ``shift > 1``
    moves sigma towards 1 (noise). Maps ``[0, 1]`` onto itself, monotone. ValueError for ``shift <= 0``.
    """
    if not shift > 0:
        raise ValueError(f"the flow-matching time shift must be > 0, got {shift!r}")
    return shift * u / (1.0 + (shift - 1.0) * u)


def dynamic_shift_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                     max_shift: float = 1.15) -> float:
    """FLUX's resolution-dependent shift parameter ``mu``: linear in the image's token count, ``base_shift``
    at ``base_seq_len`` tokens and ``max_shift`` at ``max_seq_len`` (extrapolated outside; diffusers'
    ``FluxPipeline`` ``calculate_shift``, the defaults FLUX.1's scheduler config). ``image_seq_len``: the
    transformer's image tokens (FLUX: the 2x2-packed latent, ``(h / 2) * (w / 2)``)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + base_shift - slope * base_seq_len


def scheduler_shift(config, image_seq_len: int | None = None) -> float:
    """The time shift ``s`` of :func:`shift_sigma` for a ``FlowMatchEulerDiscreteScheduler`` config (a mapping
    or config object).

    A static scheduler (SD3): its ``shift``. A dynamically shifting one (``use_dynamic_shifting``, FLUX): the
    shift for an image of ``image_seq_len`` transformer tokens, ``mu`` from :func:`dynamic_shift_mu` with the
    config's ``base_image_seq_len``, ``max_image_seq_len``, ``base_shift``, ``max_shift``, then
    ``s = exp(mu)`` for ``time_shift_type="exponential"`` (the default) or ``s = mu`` for ``"linear"``:
    the scheduler's ``time_shift(mu, 1, t)`` is ``shift_sigma(t, s)`` exactly, so training draws sigmas from
    the same shifted density as inference walks (as the FLUX trainers that shift by resolution do; diffusers'
    FLUX DreamBooth scripts index an unshifted table instead). ValueError for a dynamic scheduler without
    ``image_seq_len``, or another ``time_shift_type``.
    """
    get = config.get if hasattr(config, "get") else lambda key, default=None: getattr(config, key, default)
    if not get("use_dynamic_shifting", False):
        return float(get("shift", 1.0))
    if image_seq_len is None:
        raise ValueError("the scheduler shifts its timesteps dynamically (use_dynamic_shifting, FLUX-style): "
                         "its shift depends on the image's token count, so pass image_seq_len")
    mu = dynamic_shift_mu(image_seq_len, get("base_image_seq_len", 256), get("max_image_seq_len", 4096),
                          get("base_shift", 0.5), get("max_shift", 1.15))
    kind = get("time_shift_type", "exponential")
    if kind == "exponential":
        return math.exp(mu)
    if kind == "linear":
        return float(mu)
    raise ValueError(f"time_shift_type must be exponential or linear, got {kind!r}")


def flow_timesteps(sigmas: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """The transformer's ``timestep`` input: ``sigma * num_train_timesteps`` (float, any shape), as the
    scheduler's ``timesteps`` at inference."""
    return sigmas * num_train_timesteps


def keyed_noise_and_sigmas(keys: list[int], step: int, roles: int, latents: torch.Tensor, kind: FlowTimeSampling,
                           shift: float = 1.0, large_t_steps: int = 0, large_t_min: float = 0.8,
                           logit_mean: float = 0.0, logit_std: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(noise [B*roles, C, h, w], sigmas [B*roles] float32)`` like and beside ``latents``
    ``[B*roles, C, h, w]``; ``sigmas`` are shifted (:func:`shift_sigma`), in ``[0, 1)``.

    As :func:`adi_lightning.diffusion.keyed_noise_and_timesteps`: item ``b`` draws its flow time, then
    its noise, on the CPU from a generator seeded with :func:`~adi_lightning.data.triples.triple_key`
    ``(keys[b], step)``; its ``roles`` members share both, so only the image differs between them,
    and no result depends on the rank an item is on. While ``step < large_t_steps`` the flow time is
    uniform in ``[large_t_min, 1)`` before the shift (the large-t phase), then ``kind``.
    """
    noise, sigmas = [], []
    large_t = large_t_min if step < large_t_steps else None
    for key in keys:
        gen = torch.Generator().manual_seed(triple_key(key, step))
        u = sample_flow_time(gen, kind, large_t, logit_mean, logit_std)
        sigmas.append(shift_sigma(u, shift).repeat(roles))
        noise.append(torch.randn((1, *latents.shape[1:]), generator=gen).repeat(roles, 1, 1, 1))
    return torch.cat(noise).to(latents), torch.cat(sigmas).float().to(latents.device)


def _per_sample(sigmas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``sigmas [N]`` as ``[N, 1, ..., 1]`` in ``like``'s dtype and device, to broadcast over a sample."""
    return sigmas.to(like).reshape(-1, *([1] * (like.dim() - 1)))


def flow_noisy_latents(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """``z = (1 - sigma) x + sigma n`` ``[N, C, h, w]`` for latents x, noise n ``[N, C, h, w]`` and
    ``sigmas [N]`` (``FlowMatchEulerDiscreteScheduler.scale_noise`` without its table look-up)."""
    sigma = _per_sample(sigmas, latents)
    return (1.0 - sigma) * latents + sigma * noise


def flow_matching_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What the transformer must predict: the velocity ``n - x`` ``[N, C, h, w]`` (diffusers' SD3
    training scripts without ``precondition_outputs``). Then ``x = z - sigma v`` and ``n = z + (1 - sigma) v``."""
    return noise - latents


def flow_loss_weighting(sigmas: torch.Tensor, scheme: FlowLossWeighting = "none") -> torch.Tensor:
    """Per-sample loss weights ``[N]`` (float32) for shifted ``sigmas [N]``.

    ``none``: 1 (what diffusers' ``compute_loss_weighting_for_sd3`` gives its default ``logit_normal``
    and ``mode`` schemes: in Esser et al. 2024 the timestep density alone carries the weighting);
    ``sigma_sqrt``: ``sigma^-2``; ``cosmap``: ``2 / (pi (1 - 2 sigma + 2 sigma^2))`` (Esser et al.
    2024; diffusers' ``compute_loss_weighting_for_sd3`` of those names).
    ``sigma_sqrt`` is infinite at sigma = 0. ValueError for another ``scheme``.
    """
    sigmas = sigmas.float()
    if scheme == "none":
        return torch.ones_like(sigmas)
    if scheme == "sigma_sqrt":
        return sigmas**-2.0
    if scheme == "cosmap":
        return 2.0 / (math.pi * (1.0 - 2.0 * sigmas + 2.0 * sigmas**2))
    raise ValueError(f"flow-matching loss weighting must be one of {', '.join(FLOW_LOSS_WEIGHTINGS)}, got {scheme!r}")
