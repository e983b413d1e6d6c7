"""Training objectives: how a backbone family's denoiser is trained, as one object the module calls.

:class:`~adi_lightning.module.ADIModule` draws per-triple noise and timesteps, makes the noisy
latents, feeds the denoiser its timestep and regresses a target; what those are depends on how the
backbone was trained, and the family picks it
(:meth:`~adi_lightning.families.BackboneFamily.training_objective`):

- :class:`DDPMObjective` (UNet families, SD 1.x/2.x and SDXL): integer timesteps, the scheduler's
  ``add_noise``, the noise (or the velocity for ``v_prediction``) as target
  (:mod:`adi_lightning.diffusion`);
- :class:`FlowMatchingObjective` (MMDiT families, SD3 and FLUX): rectified flow, shifted sigmas
  (FLUX: by the image's size), the velocity ``n - x`` as target, timestep ``sigma * num_train_timesteps``
  (FLUX: ``sigma``)
  (:mod:`adi_lightning.flow_matching`).

Both draw from the same keyed generators (one draw per triple, shared by its roles), so results do
not depend on how triples are spread over ranks; ``sample_time`` draws one time from a caller's
generator (the one-vector distillation, :mod:`adi_lightning.distill`). Shapes: latents and noise ``[N, C, h, w]``,
``t`` ``[N]`` (the objective's own time: DDPM timesteps int64, flow sigmas float32).
"""

from __future__ import annotations

import torch

from adi_lightning import diffusion, flow_matching


class DDPMObjective:
    """Denoising diffusion (DDPM) training, as SD 1.x/2.x and SDXL were trained.

    ``scheduler_config``: the pipeline scheduler's config; a ``DDPMScheduler`` is built from it
    (:attr:`scheduler`), so ``beta`` schedule and ``prediction_type`` are the backbone's.
    """

    name = "ddpm"
    #: ``model.timestep_sampling`` values this objective draws.
    timestep_samplings: tuple[str, ...] = diffusion.TIMESTEP_SAMPLINGS

    def __init__(self, scheduler_config):
        from diffusers import DDPMScheduler

        self.scheduler = DDPMScheduler.from_config(scheduler_config)

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.get("prediction_type", "epsilon")

    def draw(self, keys: list[int], step: int, roles: int, latents: torch.Tensor, kind: str,
             large_t_steps: int = 0, large_t_min: float = 0.8) -> tuple[torch.Tensor, torch.Tensor]:
        """``(noise [B*roles, C, h, w], t [B*roles] int64)``:
        :func:`adi_lightning.diffusion.keyed_noise_and_timesteps`."""
        return diffusion.keyed_noise_and_timesteps(keys, step, roles, latents,
                                                   self.scheduler.config.num_train_timesteps, kind,
                                                   large_t_steps, large_t_min)

    def sample_time(self, generator: torch.Generator, kind: str) -> torch.Tensor:
        """One timestep ``[1]`` int64 drawn by ``kind`` from ``generator``
        (:func:`adi_lightning.diffusion.sample_timestep`): draws apart from the keyed training draws
        (e.g. :mod:`adi_lightning.distill`)."""
        return diffusion.sample_timestep(generator, self.scheduler.config.num_train_timesteps, kind)

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The scheduler's ``add_noise``: ``sqrt(abar_t) x + sqrt(1 - abar_t) n``."""
        return self.scheduler.add_noise(latents, noise, t)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """:func:`adi_lightning.diffusion.training_target` (noise, or velocity for ``v_prediction``)."""
        return diffusion.training_target(self.scheduler, latents, noise, t)

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The UNet's ``timestep`` input: ``t`` itself."""
        return t


class FlowMatchingObjective:
    """Rectified-flow (flow matching) training, as SD3 and FLUX were trained (Esser et al. 2024).

    ``scheduler_config``: the pipeline's ``FlowMatchEulerDiscreteScheduler`` config. Its shift moves the
    drawn flow times towards noise (:func:`~adi_lightning.flow_matching.shift_sigma`): a static ``shift``
    (SD3; :attr:`shift`), or with ``use_dynamic_shifting`` (FLUX) the shift of the latents' size,
    ``(h / patch_size) * (w / patch_size)`` transformer tokens (:meth:`shift_for`; :attr:`shift` is then
    None). ``timestep_scale``: the transformer's ``timestep`` is ``sigma * timestep_scale`` (None: the
    scheduler's ``num_train_timesteps``, SD3's convention; FLUX's transformer takes ``sigma``: 1). The loss
    weight is 1 (diffusers' SD3 and FLUX scripts with their default ``logit_normal`` density), so
    :meth:`target` is all the module needs.
    """

    name = "flow_matching"
    timestep_samplings: tuple[str, ...] = flow_matching.FLOW_TIME_SAMPLINGS
    prediction_type = "flow"

    def __init__(self, scheduler_config, timestep_scale: float | None = None, patch_size: int = 1):
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        self.dynamic = bool(self.scheduler.config.get("use_dynamic_shifting", False))
        self.shift = None if self.dynamic else flow_matching.scheduler_shift(self.scheduler.config)
        self.timestep_scale = float(self.scheduler.config.num_train_timesteps if timestep_scale is None
                                    else timestep_scale)
        self.patch_size = patch_size

    def shift_for(self, latents: torch.Tensor | None) -> float:
        """The time shift for ``latents`` ``[N, C, h, w]`` (:func:`~adi_lightning.flow_matching.scheduler_shift`;
        a static shift needs no latents). ValueError for a dynamic shift without latents."""
        if not self.dynamic:
            return self.shift
        tokens = None if latents is None else (latents.shape[-2] // self.patch_size) * (latents.shape[-1] //
                                                                                        self.patch_size)
        return flow_matching.scheduler_shift(self.scheduler.config, tokens)

    def draw(self, keys: list[int], step: int, roles: int, latents: torch.Tensor, kind: str,
             large_t_steps: int = 0, large_t_min: float = 0.8) -> tuple[torch.Tensor, torch.Tensor]:
        """``(noise [B*roles, C, h, w], sigmas [B*roles] float32)``, shifted (:meth:`shift_for` ``latents``):
        :func:`adi_lightning.flow_matching.keyed_noise_and_sigmas`."""
        return flow_matching.keyed_noise_and_sigmas(keys, step, roles, latents, kind, self.shift_for(latents),
                                                    large_t_steps, large_t_min)

    def sample_time(self, generator: torch.Generator, kind: str, latents: torch.Tensor | None = None) -> torch.Tensor:
        """One shifted sigma ``[1]`` float32: flow time ``u`` drawn by ``kind`` from ``generator``
        (:func:`~adi_lightning.flow_matching.sample_flow_time`), then the scheduler's shift for ``latents``
        (:meth:`shift_for`; needed only for a dynamic shift)."""
        u = flow_matching.sample_flow_time(generator, kind)
        return flow_matching.shift_sigma(u, self.shift_for(latents)).float()

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``(1 - sigma) x + sigma n`` (:func:`~adi_lightning.flow_matching.flow_noisy_latents`)."""
        return flow_matching.flow_noisy_latents(latents, noise, t)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The velocity ``n - x`` (:func:`~adi_lightning.flow_matching.flow_matching_target`)."""
        return flow_matching.flow_matching_target(latents, noise)

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The transformer's ``timestep``: ``sigma * timestep_scale`` (a float, as at inference: SD3's
        ``sigma * 1000``, FLUX's ``sigma``, which ``FluxPipeline`` passes as ``timestep / 1000``)."""
        return flow_matching.flow_timesteps(t, self.timestep_scale)
