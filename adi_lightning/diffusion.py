"""Pure functions of the training noise: timestep sampling, per-triple noise, the loss target.

No model and no Lightning here: tensors and generators in, tensors out.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch

from adi_lightning.data.triples import triple_key

TimestepSampling = Literal["uniform", "importance", "cubic"]
TIMESTEP_SAMPLINGS: tuple[str, ...] = get_args(TimestepSampling)


def sample_timestep(generator: torch.Generator, num_train_timesteps: int, kind: TimestepSampling,
                    large_t: float | None = None) -> torch.Tensor:
    """One training timestep ``[1]`` (int64) in ``[0, num_train_timesteps)``.

    ``uniform``; ``importance``: weights ``1 - 0.5 cos(pi t / T)`` (ReVersion, Huang et al. 2023),
    favouring large t; ``cubic``: ``t = (1 - u^3) T`` for uniform u (diffusers' SDXL LoRA scripts).
    ``large_t`` (a fraction f of T) overrides ``kind``: uniform in ``[f T, T)``, the large-t phase.
    """
    steps = num_train_timesteps
    if large_t is not None:
        return torch.randint(min(int(large_t * steps), steps - 1), steps, (1,), generator=generator)
    if kind == "uniform":
        return torch.randint(0, steps, (1,), generator=generator)
    if kind == "cubic":
        u = torch.rand((1,), generator=generator, dtype=torch.float64)
        return ((1.0 - u**3) * steps).long().clamp(0, steps - 1)
    t = torch.arange(steps, dtype=torch.float64)
    weights = 1.0 - 0.5 * torch.cos(math.pi * t / steps)
    return torch.multinomial(weights, 1, generator=generator)


def keyed_noise_and_timesteps(keys: list[int], step: int, roles: int, latents: torch.Tensor, num_train_timesteps: int,
                              kind: TimestepSampling, large_t_steps: int = 0,
                              large_t_min: float = 0.8) -> tuple[torch.Tensor, torch.Tensor]:
    """``(noise [B*roles, C, h, w], timesteps [B*roles] int64)`` like and beside ``latents``
    ``[B*roles, C, h, w]``.

    Item ``b`` draws its timestep, then its noise, on the CPU from a generator seeded with
    :func:`~adi_lightning.data.triples.triple_key` ``(keys[b], step)``; its ``roles`` members share
    both, so only the image differs between them, and no result depends on the rank an item is on.
    While ``step < large_t_steps`` timesteps are uniform in ``[large_t_min T, T)`` (the large-t phase:
    the pose forms there, so it is fitted before texture; docs/method.md "Timesteps"), then ``kind``.
    """
    noise, timesteps = [], []
    large_t = large_t_min if step < large_t_steps else None
    for key in keys:
        gen = torch.Generator().manual_seed(triple_key(key, step))
        timesteps.append(sample_timestep(gen, num_train_timesteps, kind, large_t).repeat(roles))
        noise.append(torch.randn((1, *latents.shape[1:]), generator=gen).repeat(roles, 1, 1, 1))
    return torch.cat(noise).to(latents), torch.cat(timesteps).to(latents.device)


def training_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet must predict: the noise, or the velocity for a ``v_prediction`` scheduler
    (``DDPMScheduler.get_velocity``)."""
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise
