"""One vector that draws what the layer-wise identifier draws: distillation for one-vector exports.

Stock tools (diffusers' ``load_textual_inversion``, AUTOMATIC1111, ComfyUI) give every
cross-attention layer the same token embedding. A layer-wise identifier (``[R, D]``, one row per
group of layers) must become one vector ``v`` ``[1, D]`` for them. Averaging the rows (or keeping
one) loses the action (docs/report.md, "One-vector exports"); here ``v`` is fitted instead:

* teacher: the frozen pipeline with the layer-wise identifier; student: the same pipeline with
  ``v`` in every row (exactly plain Textual Inversion with ``v``, what the stock tools compute);
* prompts: :func:`action_prompts` (the placeholder after a subject, several subjects);
* ``x0``: the teacher's own images of those prompts (latents from the stock pipeline), so the
  noisy latents are the ones the student meets when it draws; then per draw a time, a noise and
  the noisy latents, by the backbone's training objective
  (:meth:`~adi_lightning.families.BackboneFamily.training_objective`: a DDPM timestep and
  ``add_noise`` for SD 1.x/2.x and SDXL; a shifted flow-matching sigma and ``(1 - sigma) x0 + sigma n``
  for SD3);
* loss: MSE between the student's and the teacher's denoiser predictions (UNet noise, MMDiT
  velocity; ``v`` initialised at the mean of the rows; Adam with a cosine-decayed rate; fp32;
  seeded, one generator for every draw).

Nothing here asks which family it holds: the denoiser, its routing (``attn2`` processors or SD3's
block-wise hooks) and the objective come from the family (docs/architecture.md, "The family seam").
For SD3 the student (``v`` in every joint block's row and in the pooled embedding) is exactly the
textual-inversion forward a stock loader computes with ``v``'s CLIP-L / CLIP-G (/ T5) parts in
each text encoder's token embedding.

The negative prompt has no placeholder, so it is the same for both: matching the conditional
prediction matches the classifier-free-guided one.

:func:`residual` measures how much of the identifier a vector loses, on fixed draws apart from
the training draws: ``E|eps_v - eps_A|^2 / E|eps_0 - eps_A|^2``, where ``eps_A`` is the teacher's
prediction and ``eps_0`` the untrained identifier's (the initializer word in every row): 0 when
``v`` draws what the identifier draws, 1 when it is as far off as the untrained identifier.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from adi_lightning.diffusion import TimestepSampling

#: The subjects of :func:`action_prompts` by default: people, the subject class the exemplars of a
#: typical identifier show (none of them is one of the toy benchmark's unseen test subjects).
DEFAULT_SUBJECTS = ("person", "man", "woman", "child")
#: The prompt openings (the toy data's caption openings; common in Textual Inversion templates).
DEFAULT_PREFIXES = ("a photo of", "a picture of", "a rendering of")


def action_prompts(token: str, subjects=DEFAULT_SUBJECTS, prefixes=DEFAULT_PREFIXES) -> list[str]:
    """``"<prefix> a <subject> <token>"`` for every prefix x subject (``an`` before a vowel)."""
    return [f"{prefix} {'an' if s[0] in 'aeiou' else 'a'} {s} {token}" for s in subjects for prefix in prefixes]


@dataclass
class DistillSettings:
    """The distillation budget. ``steps``: optimizer steps of ``batch_size`` draws; ``learning_rate``:
    Adam's; ``images_per_prompt``: teacher images (``x0``) per prompt, drawn with ``sample_steps``
    inference steps at ``guidance_scale``; ``eval_draws``: the fixed draws of :func:`residual`;
    ``seed``: every draw (teacher images, timesteps, noise, batches) comes from it."""

    steps: int = 200
    batch_size: int = 8
    learning_rate: float = 5e-3
    images_per_prompt: int = 2
    sample_steps: int = 20
    guidance_scale: float = 4.0
    eval_draws: int = 48
    timestep_sampling: TimestepSampling = "importance"
    seed: int = 0


@dataclass
class DistillResult:
    """``vector`` ``[1, D]`` fp32; ``losses``: the training loss of every step; ``residual`` /
    ``start_residual``: :func:`residual` of the vector and of the start (the mean of the rows)."""

    vector: torch.Tensor
    losses: list[float] = field(default_factory=list)
    residual: float = float("nan")
    start_residual: float = float("nan")


class Teacher:
    """The frozen pipeline of a loaded family (placeholder added, routing installed, :func:`prepare`)
    with the identifier ``rows`` ``[R, D]`` / ``layer_to_row`` ``[L]``, on ``prompts``.

    It holds the teacher's features of every prompt, its ``x0`` images and the draw machinery
    (the family's training objective); :meth:`predict` gives one vector's or the identifier's
    denoiser predictions on the same draws.
    """

    def __init__(self, family, rows: torch.Tensor, layer_to_row: torch.Tensor, prompts: list[str],
                 settings: DistillSettings):
        self.family, self.settings, self.prompts = family, settings, list(prompts)
        self.denoiser = family.denoiser
        self.device = self.denoiser.device
        self.dtype = next(self.denoiser.parameters()).dtype
        self.rows = rows.float().to(self.device)
        self.layer_to_row = layer_to_row
        self.ids = family.tokenize(self.prompts, self.device)
        self.objective = family.training_objective()
        self.generator = torch.Generator().manual_seed(settings.seed)
        with torch.no_grad():
            self.features = self.encode(self.rows, layer_to_row)
            self.x0, self.x0_prompt = self._teacher_images()

    def encode(self, rows: torch.Tensor, layer_to_row: torch.Tensor, index: torch.Tensor | None = None):
        """The family's features of the prompts (``index``: a subset) with ``rows`` ``[R, D]``."""
        ids = self.ids if index is None else self.ids[index.to(self.ids.device)]
        return self.family.encode_text(ids, rows.unsqueeze(0).expand(ids.shape[0], *rows.shape), layer_to_row)

    @torch.no_grad()
    def _teacher_images(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x0 [P*k, C, h, w], prompt index [P*k])``: k = ``images_per_prompt`` teacher latents per prompt."""
        s, n = self.settings, len(self.prompts)
        index = torch.arange(n).repeat_interleave(s.images_per_prompt)
        negative = self.family.negative(len(index), self.layer_to_row, self.device)
        inputs = self.family.pipeline_inputs(tuple(f[index.to(f.device)] for f in self.features), negative, self.dtype)
        seeds = torch.randint(0, 2**31 - 1, (len(index),), generator=self.generator).tolist()
        generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
        latents = self.family.pipe(**inputs, generator=generators, num_inference_steps=s.sample_steps,
                                   guidance_scale=s.guidance_scale, output_type="latent").images
        return latents.float(), index

    def draw(self, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_t [count, C, h, w], t [count], prompt index [count])``: teacher images picked at random,
        a time (``settings.timestep_sampling``; the objective's own time: DDPM timesteps, flow sigmas)
        and a noise each, from ``generator``."""
        pick = torch.randint(0, len(self.x0), (count,), generator=generator)
        kind = self.settings.timestep_sampling
        timesteps = torch.cat([self.objective.sample_time(generator, kind) for _ in range(count)])
        noise = torch.randn((count, *self.x0.shape[1:]), generator=generator)
        x0 = self.x0[pick.to(self.x0.device)]
        noisy = self.objective.noisy(x0, noise.to(x0), timesteps.to(x0.device))
        return noisy, timesteps.to(self.device), self.x0_prompt[pick]

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, prompt: torch.Tensor,
                vector: torch.Tensor | None = None) -> torch.Tensor:
        """The denoiser's prediction ``[B, C, h, w]`` fp32 with the identifier (``vector`` None) or with
        ``vector`` ``[1, D]`` in every row (differentiable in ``vector``)."""
        if vector is None:
            features = tuple(f[prompt.to(f.device)] for f in self.features)
        else:
            # v in every row: plain Textual Inversion, computed exactly as the teacher's path computes
            # it (same shapes), so identical rows give the teacher's predictions bit for bit.
            features = self.encode(vector.reshape(1, -1).float().expand(len(self.rows), -1), self.layer_to_row, prompt)
        size = tuple(int(x) * self.family.pipe.vae_scale_factor for x in noisy.shape[-2:])
        conditioning = self.family.denoiser_inputs(features, self.dtype, size)
        return self.family.predict(self.denoiser, noisy.to(self.dtype), self.objective.model_timesteps(timesteps),
                                   conditioning).float()


def prepare(family, token: str) -> int:
    """Add ``token`` to ``family``'s tokenizers with the overlay and install the family's routing
    (:meth:`~adi_lightning.families.BackboneFamily.install_routing`: processors on every ``attn2`` of a
    UNet, block-wise hooks on an MMDiT; as :class:`~adi_lightning.module.ADIModule` does); returns the
    token's id."""
    placeholder_id = family.add_placeholder(token)
    family.install_routing()
    return placeholder_id


@torch.no_grad()
def residual(teacher: Teacher, vector: torch.Tensor, untrained: torch.Tensor) -> float:
    """``E|eps_v - eps_A|^2 / E|eps_0 - eps_A|^2`` on ``settings.eval_draws`` fixed draws (their own
    seed, apart from the training draws): ``vector`` ``[1, D]`` against the identifier, relative to
    the ``untrained`` ``[1, D]`` vector (the initializer word). 0: no loss; 1: as far off as untrained."""
    generator = torch.Generator().manual_seed(teacher.settings.seed + 1_000_003)
    lost = reference = 0.0
    left = teacher.settings.eval_draws
    while left > 0:
        count = min(left, teacher.settings.batch_size)
        noisy, timesteps, prompt = teacher.draw(count, generator)
        target = teacher.predict(noisy, timesteps, prompt)
        lost += F.mse_loss(teacher.predict(noisy, timesteps, prompt, vector), target, reduction="sum").item()
        reference += F.mse_loss(teacher.predict(noisy, timesteps, prompt, untrained), target, reduction="sum").item()
        left -= count
    return lost / reference if reference > 0 else 0.0


def distill(teacher: Teacher, start: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """Fit ``v`` ``[1, D]`` from ``start`` so the student's predictions match the teacher's
    (``settings.steps`` Adam steps, the rate decayed to 0 on a cosine); returns ``(v fp32 on the CPU, the loss of every step)``.
    FloatingPointError on a non-finite loss."""
    s = teacher.settings
    vector = torch.nn.Parameter(start.detach().float().reshape(1, -1).clone().to(teacher.device))
    optimizer = torch.optim.Adam([vector], lr=s.learning_rate)
    # Cosine decay to 0: Adam's steps are about the learning rate however small the gradient, so the
    # rate must shrink for the last steps to settle.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 0.5 * (1 + math.cos(math.pi * k / s.steps)))
    losses = []
    for step in range(s.steps):
        noisy, timesteps, prompt = teacher.draw(s.batch_size, teacher.generator)
        with torch.no_grad():
            target = teacher.predict(noisy, timesteps, prompt)
        loss = F.mse_loss(teacher.predict(noisy, timesteps, prompt, vector), target)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite distillation loss ({loss.item()}) at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return vector.detach().cpu(), losses
