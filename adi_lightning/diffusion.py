"""Pure functions of the training noise: timestep sampling, per-triple noise, the loss target.

No model and no Lightning here: tensors and generators in, tensors out.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from adi_lightning.data.triples import triple_key

TimestepSampling = Literal["uniform", "importance", "cubic"]
TIMESTEP_SAMPLINGS = ("uniform", "importance", "cubic")


def sample_timestep(generator: torch.Generator, num_train_timesteps: int, kind: TimestepSampling) -> torch.Tensor:
    """One training timestep ``[1]`` (int64) in ``[0, num_train_timesteps)``.

    ``uniform``; ``importance``: weights ``1 - 0.5 cos(pi t / T)`` (ReVersion, Huang et al. 2023),
    favouring large t; ``cubic``: ``t = (1 - u^3) T`` for uniform u (diffusers' SDXL LoRA scripts).
    """
    steps = num_train_timesteps
    if kind == "uniform":
        return torch.randint(0, steps, (1,), generator=generator)
    if kind == "cubic":
        u = torch.rand((1,), generator=generator, dtype=torch.float64)
        return ((1.0 - u**3) * steps).long().clamp(0, steps - 1)
    t = torch.arange(steps, dtype=torch.float64)
    weights = 1.0 - 0.5 * torch.cos(math.pi * t / steps)
    return torch.multinomial(weights, 1, generator=generator)


def keyed_noise_and_timesteps(keys: list[int], step: int, roles: int, latents: torch.Tensor, num_train_timesteps: int,
                              kind: TimestepSampling) -> tuple[torch.Tensor, torch.Tensor]:
    """``(noise [B*roles, C, h, w], timesteps [B*roles] int64)`` like and beside ``latents``
    ``[B*roles, C, h, w]``.

    Item ``b`` draws its timestep, then its noise, on the CPU from a generator seeded with
    :func:`~adi_lightning.data.triples.triple_key` ``(keys[b], step)``; its ``roles`` members share
    both, so only the image differs between them, and no result depends on the rank an item is on.
    """
    noise, timesteps = [], []
    for key in keys:
        gen = torch.Generator().manual_seed(triple_key(key, step))
        timesteps.append(sample_timestep(gen, num_train_timesteps, kind).repeat(roles))
        noise.append(torch.randn((1, *latents.shape[1:]), generator=gen).repeat(roles, 1, 1, 1))
    return torch.cat(noise).to(latents), torch.cat(timesteps).to(latents.device)


def training_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet must predict: the noise, or the velocity for a ``v_prediction`` scheduler
    (``DDPMScheduler.get_velocity``)."""
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise
