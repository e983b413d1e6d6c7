"""ADIModule: a frozen diffusion backbone + the trainable layer-wise identifier.

The module owns the loss; :class:`~adi_lightning.callbacks.GradientMaskCallback` owns the
masking and :class:`~adi_lightning.callbacks.ImageGridCallback` the image grids. What differs
between backbone families (text encoders, conditioning, stock pipeline, the denoiser: a UNet or an
MMDiT, the layers that get identifier rows and how rows reach them, and the training objective: DDPM
or flow matching) is behind ``self.family`` (:class:`~adi_lightning.families.BackboneFamily`); the
module never asks which.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

import lightning as L
from lightning.fabric.utilities.seed import _set_rng_states
import torch
import torch.nn.functional as F

from adi_lightning import backbone as bb
from adi_lightning import generation
from adi_lightning.conditioning import RowGroups, resolve_row_groups
from adi_lightning.checks import (check_data_fits_model, check_identifier_chosen, check_identifier_grouping,
                                  check_model_settings, check_subject_words, check_timestep_sampling, inert_settings)
from adi_lightning.flow_matching import FlowTimeSampling
from adi_lightning.identifier import UNTRAINED, LayerwiseIdentifier, check_initializer_word
from adi_lightning.evaluation import Judge
from adi_lightning.io import atomic_write_json, git_revision, package_versions
from adi_lightning.prompts import check_run_prompts
from adi_lightning.masking import MaskCombine, MaskStatistic, UpdateFrom
from adi_lightning.resume import check_identifier_fits, rng_states_for_checkpoint
from adi_lightning import speed
from adi_lightning.word_directions import word_basis

log = logging.getLogger(__name__)
IDENTIFIER_FILE = "identifier.safetensors"


#: The method's callbacks in :mod:`adi_lightning.callbacks`, in order (PreemptionCallback last: it
#: saves after the others' ``on_train_batch_end``); :meth:`ADIModule.configure_callbacks` adds them.
# In this order: EvaluationCallback before ImageGridCallback (it adds each image's verdict to the
# step's outputs); PreemptionCallback last (it saves after the others' on_train_batch_end).
# SubjectWordsCallback after GradientMaskCallback: its projection follows the mask's restore after each step.
METHOD_CALLBACKS = ("MultiStartCallback", "GradientMaskCallback", "SubjectWordsCallback", "EvaluationCallback",
                    "ImageGridCallback",
                    "RankConsistencyCallback", "CurvesCallback", "LastGoodIdentifierCallback",
                    "OptimizerSettingsCallback", "ValidationScheduleCallback", "PreemptionCallback")


class ADIModule(L.LightningModule):
    """Learn an action identifier ``<A>`` with ADI (layer-wise tokens + gradient masking).

    Args:
        pretrained_model_name_or_path: A local diffusers pipeline folder or a hub id (hub ids need
            the weights in the local cache when offline); its ``model_index.json`` picks the backbone
            family (:mod:`adi_lightning.families`: ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``,
            ``StableDiffusion3Pipeline``).
        placeholder_token: The identifier string used in prompts; not in the vocabulary nor a template word.
        initializer_token: A single-token word every identifier row starts from: an action-neutral
            word ("standing"), never a subject noun ("person" makes ``"a cat <A>"`` start as "a cat
            person", a human; a warning names such words at setup).
        layerwise: One row per cross-attention layer (P+ / ADI). False: an alias of ``row_groups: shared``
            (Textual Inversion), refused with any other ``row_groups``.
        row_groups: How the identifier's layers (UNet: ``attn2`` layers; MMDiT: joint blocks) share rows (one text
            encoding per row, :meth:`~adi_lightning.families.BackboneFamily.group_identifier_layers`): ``layer``,
            ``attention`` (per attention module), ``resolution`` (per UNet level) or ``shared`` (TI). None
            (default): ``layer``, or ``shared`` with ``layerwise: false``.
        mask_threshold: β in [0, 1], the strength of the disentangling, from the full update at 0 (or a small
            quantile) to P+ at 1.0, which turns masking off (then no triples are drawn and only the target action's
            images are needed; below 1.0 every step draws triples with action-different partners). Under
            ``projection``, ``change_basis`` and ``sign`` the update is ``β·g + (1 − β)·U(g)`` (``U`` the statistic's update; 0, the
            default, is ``U`` alone); under ``absolute`` and ``relative`` β in (0, 1] is the per-row quantile of
            channels each test keeps (:func:`adi_lightning.masking.triple_updates`).
        mask_combine: How the context test and the action test combine into the mask.
        mask_statistic: How each test scores a channel's change between two role gradients (:mod:`adi_lightning.
            masking`): ``absolute`` ``|g_a - g_x|`` (the paper read literally; selects small gradients), ``relative``
            ``|g_a - g_x| / (|g_a| + |g_x|)`` (scale-free), ``sign`` (sign agreement) or ``projection`` (default,
            measured best on the toy world, docs/report.md: directions, not channels; :func:`adi_lightning.masking.project_update`)
            or ``change_basis`` (the two tests per axis of a basis that follows the changes; :func:`adi_lightning.masking.
            change_basis_update`).
        update_from: Whose gradient passes through the mask: the anchor's, or the mean of the anchor's and the
            context-different sample's.
        learning_rate: AdamW learning rate of the identifier.
        weight_decay: AdamW weight decay (masked channels are restored, so it cannot move them).
        timestep_sampling: ``importance`` (default: ReVersion's weight 1 - 0.5 cos(pi t / T), Huang et al.
            2023, favours large t, where layout and pose form), ``uniform``, or ``cubic`` (t = (1 - u^3) T,
            diffusers' SDXL LoRA scripts). :func:`adi_lightning.diffusion.sample_timestep`; docs/method.md "Timesteps".
            Flow-matching families (SD3) draw the same densities on flow time and also ``logit_normal``
            (:func:`adi_lightning.flow_matching.sample_flow_time`); a DDPM family refuses ``logit_normal``.
        large_t_steps: The first ``large_t_steps`` optimizer steps draw t uniformly from ``[large_t_min T, T)`` (the
            pose first), then ``timestep_sampling``. 0 (default) is off: on the toy jump it moved which seeds fail.
        large_t_min: The large-t band's lower edge, a fraction of T: of the large-t phase and of multi-start's score.
        starts: Multi-start (random restarts with selection): ``starts`` runs of ``start_steps`` steps from the
            initial rows (fresh AdamW state, the data stream going on), then the one with the lowest anchor loss at
            t >= ``large_t_min`` T is continued (:class:`~adi_lightning.callbacks.MultiStartCallback`); ``trainer.
            max_steps`` counts every step. 1 (default) is off; the toy experiments use 8 (docs/method.md "Multi-start").
        start_steps: Optimizer steps per start when ``starts`` > 1 (toy experiments: 50).
        subject_words: Single-token words naming the exemplars' subjects (e.g. ``[person, man, woman, child]``);
            after every optimizer step the identifier's change from its untrained table is projected orthogonal
            to their token embeddings (:class:`~adi_lightning.callbacks.SubjectWordsCallback`; docs/method.md
            "Subject words"). Empty (default): off. Refused: a word of several tokens, a repeated word, the
            placeholder, a word of ``data.eval_subjects``.
        weight_dtype: dtype of the frozen backbone weights (float32, bfloat16, float16); the identifier and its
            gradients stay fp32.
        variant: Weight file variant of the pipeline folder (e.g. ``fp16``).
        revision: Hub revision of the pipeline.
        local_files_only: Never reach a hub; None follows ``HF_HUB_OFFLINE``.
        identifier_path: An identifier file to start from (fit) or to use (validate/test/predict). validate, test
            and predict without it (and without ``--ckpt_path``) are refused, unless it is ``untrained``: the
            untrained identifier, every row the initializer word, on purpose (a baseline; as null in fit). The
            word is never read as a file (write ``./untrained`` for a file of that name).
        guidance_scale: Guidance scale of generated images: classifier-free guidance (SD 1.x/2.x, SDXL, SD3), or
            FLUX's embedded guidance. None (default) is the backbone family's default
            (``BackboneFamily.default_guidance_scale``: 7.5, and for FLUX 3.5, the guidance it trains with); the
            value in force is what the run's hparams and image grids record.
        num_inference_steps: Denoising steps for generated images.
        image_size: Side of generated images in pixels; None = the denoiser's native size.
        judge: Names the action, subject and every appearance factor it sees in validation / test images (e.g.
            ``adi_lightning.evaluation.ToyJudge``, or ``CLIPJudge`` for real data); with ``data.eval_subjects``
            this gives action / subject accuracy and leak rates.
        cache_latents: Encode each exemplar (per image and flip) with the VAE once and reuse the latent (exact:
            each image alone, with the deterministic ``latent_dist.mode()``). The cache lives in the module, keyed by
            the batch's ``image_key``/``flip`` (works with DDP and DataLoader workers); about 64 KiB per image at
            512 px (SD 1.x), on the training device.
        share_text_encoding: Encode each triple's prompt once instead of once per member (the three share
            prompt and identifier), with one backward VJP per member, so the per-sample identifier gradients
            stay exact. Saves 2/3 of ADI's text-encoder forwards; no effect on TI / P+ (one image per item).
        channels_last: The denoiser (the UNet, or an MMDiT) and its inputs in channels-last memory format (faster
            on tensor-core GPUs).
        compile_unet: ``torch.compile`` the denoiser (the UNet, or an MMDiT; the key keeps its name) for training
            forwards (GPU); routing is by module, so it keeps rows.
        gradient_checkpointing: Activation checkpointing in the denoiser and the text encoders (the libraries'
            own, non-reentrant): less memory, about one more forward per step; the same identifier gradient.
    """

    def __init__(
        self,
        pretrained_model_name_or_path: str,
        placeholder_token: str = "<A>", initializer_token: str = "standing",
        layerwise: bool = True, row_groups: RowGroups | None = None,
        mask_threshold: float = 0.0, mask_combine: MaskCombine = "and",
        mask_statistic: MaskStatistic = "projection",
        update_from: UpdateFrom = "anchor",
        learning_rate: float = 5e-3, weight_decay: float = 0.0,
        timestep_sampling: FlowTimeSampling = "importance",
        large_t_steps: int = 0, large_t_min: float = 0.8,
        starts: int = 1, start_steps: int = 100, subject_words: list[str] = [],
        weight_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        variant: str | None = None, revision: str | None = None, local_files_only: bool | None = None,
        identifier_path: str | None = None,
        guidance_scale: float | None = None, num_inference_steps: int = 50, image_size: int | None = None,
        judge: Judge | None = None,
        cache_latents: bool = True, share_text_encoding: bool = True,
        channels_last: bool = False, compile_unet: bool = False, gradient_checkpointing: bool = False,
    ):
        super().__init__()
        check_model_settings(mask_threshold, mask_combine, mask_statistic, update_from, timestep_sampling,
                             learning_rate, weight_decay, num_inference_steps, large_t_steps, large_t_min,
                             starts, start_steps)
        check_subject_words(subject_words, placeholder_token)
        self.family = bb.load_backbone(pretrained_model_name_or_path, weight_dtype, variant, revision, local_files_only)
        guidance_scale = self.family.guidance(guidance_scale)  # the hparams (saved next, from the locals) record it
        self.save_hyperparameters(ignore=["judge"])  # a judge holds models: not a hyperparameter
        self.judge = judge
        self.strict_loading = False  # checkpoints hold the identifier only, not the frozen backbone

        self.info = bb.describe_pipeline(self.family.pipe, pretrained_model_name_or_path)
        log.info(self.info.describe())
        for name, part in self.family.modules().items():  # unet / transformer, vae, text_encoder(s): diffusers' names
            self.add_module(name, part)
        self.inference_scheduler = self.family.pipe.scheduler
        self.objective = self.family.training_objective()  # DDPM or flow matching
        check_timestep_sampling(timestep_sampling, self.objective.timestep_samplings, self.info.family)
        self.noise_scheduler = self.objective.scheduler

        self.placeholder_id = self.family.add_placeholder(placeholder_token)
        self.family.install_routing()
        layer_paths, self.row_groups = self.family.identifier_layers(), resolve_row_groups(
            layerwise, row_groups)  # the configured grouping; a loaded file's may differ (checked at fit)
        self.identifier = LayerwiseIdentifier(self.family.initializer_row(initializer_token), layer_paths,
                                              self.family.group_identifier_layers(layer_paths, self.row_groups),
                                              self.row_groups)
        if identifier_path and identifier_path != UNTRAINED:
            self.load_identifier(identifier_path)
        # [D, K] orthonormal basis of the subject words' embeddings (None: off); not saved (recomputed from hparams).
        self.register_buffer("subject_basis", word_basis(torch.stack(
            [self.family.initializer_row(w, "model.subject_words") for w in subject_words])) if subject_words else None,
            persistent=False)
        self._role_grads: list[torch.Tensor] = []
        self.start_selection: dict | None = None  # set by MultiStartCallback when it has chosen a start
        # Set by ValidationScheduleCallback for a validation inside the multi-start phase: no images.
        self.skip_generation = False

        self.latent_cache = speed.LatentCache()
        if channels_last:
            self.denoiser.to(memory_format=torch.channels_last)
        if gradient_checkpointing:
            speed.enable_gradient_checkpointing(self.denoiser, *self.family.text_encoders)
        # Not a registered submodule (it wraps the denoiser): the state dict and summary stay as they are.
        self.__dict__["_train_unet"] = speed.compile_unet(self.denoiser) if compile_unet else self.denoiser

    # ----------------------------------------------------------------- setup
    @property
    def denoiser(self):
        """The family's denoiser (the UNet, or an MMDiT), registered under its diffusers name."""
        return self.family.denoiser

    @property
    def tokenizer(self):
        """The backbone's (first) tokenizer, with the placeholder added."""
        return self.family.tokenizer

    @property
    def overlay(self):
        """The identifier overlay inside the (first) text encoder (not registered twice as a submodule)."""
        return self.family.overlay

    @property
    def masking_enabled(self) -> bool:
        return self.hparams.mask_threshold < 1.0

    @property
    def run_dir(self) -> Path:
        """This run's own output folder (the CLI makes ``trainer.default_root_dir`` unique)."""
        return Path(self.trainer.default_root_dir)

    def train(self, mode: bool = True):
        """Lightning calls ``train()`` on the whole module; the backbone must stay in eval mode."""
        super().train(mode)
        for part in self.family.modules().values():
            part.eval()
        if mode and self.hparams.gradient_checkpointing:
            # transformers checkpoints only layers in training mode; attention dropout is 0 (checked).
            for layer in speed.checkpointed_text_layers(*self.family.text_encoders):
                layer.train()
        return self

    def configure_callbacks(self):
        """The method's callbacks (:data:`METHOD_CALLBACKS`), in every command: Lightning appends them
        to ``trainer.callbacks``, so a user's own callbacks run beside them (and one of the same type
        is replaced). They read their settings from ``model.*``; config files list them in a header."""
        from adi_lightning import callbacks

        return [getattr(callbacks, name)() for name in METHOD_CALLBACKS]

    def setup(self, stage: str) -> None:
        self.__dict__["_untrained_images"] = {}  # drawn afresh by each fit / validate / test call (its precision)
        datamodule = getattr(self.trainer, "datamodule", None)
        templates = list(getattr(datamodule, "prompt_templates", []) or [])
        self.family.add_placeholder(self.hparams.placeholder_token, templates)
        check_data_fits_model(datamodule, stage, self.hparams.mask_threshold, self.hparams.update_from,
                              self.hparams.mask_combine)
        check_identifier_grouping(stage, self.identifier, self.row_groups)
        if datamodule is not None:
            check_run_prompts(datamodule, stage, self.tokenizer, self.hparams.placeholder_token, self.placeholder_id)
            subjects = [*getattr(datamodule, "exemplar_subjects", ()), *getattr(datamodule, "eval_subjects", ()),
                        *getattr(self.judge, "subjects", ())]
            check_initializer_word(self.hparams.initializer_token, templates, subjects)
            check_subject_words(self.hparams.subject_words, self.hparams.placeholder_token,
                                getattr(datamodule, "eval_subjects", ()))
        if self.trainer.is_global_zero:
            atomic_write_json(self.run_dir / "run_info.json", {
                "stage": stage,
                "backbone": vars(self.info),
                "identifier": {"rows": self.identifier.num_rows, "dim": self.identifier.dim,
                               "row_groups": self.identifier.row_groups, "layer_paths": self.identifier.layer_paths,
                               "layer_to_row": self.identifier.layer_to_row().tolist()},
                "packages": package_versions(),
                "git_revision": git_revision(),
            })

    def on_generation_start(self) -> None:
        """Before validate / test / predict generate (after a checkpoint is restored): refuse to draw the
        untrained identifier unless asked (:func:`~adi_lightning.checks.check_identifier_chosen`)."""
        check_identifier_chosen(self.trainer.state.fn.value, self.hparams.identifier_path, self.trainer.ckpt_path,
                                torch.equal(self.identifier.embedding, self.identifier.initial))

    on_validation_start = on_test_start = on_predict_start = on_generation_start

    def on_fit_start(self) -> None:
        self.latent_cache.clear()  # latents made under another precision or run are not reused

    def configure_optimizers(self):
        return torch.optim.AdamW(
            [self.identifier.embedding], lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay
        )

    # ------------------------------------------------------------- identifier
    def identifier_metadata(self) -> dict[str, str]:
        """The identifier file's metadata: strings; a training setting that was not in force
        (:func:`~adi_lightning.checks.inert_settings`, e.g. ``mask_combine`` with masking off) is ``"null"``."""
        h = self.hparams
        inert = inert_settings(h)

        def in_force(key: str, value):
            return None if f"model.{key}" in inert else value

        def text(key: str) -> str:
            return json.dumps(None) if f"model.{key}" in inert else str(h[key])

        return {
            "placeholder_token": h.placeholder_token,
            "initializer_token": h.initializer_token,
            "base_model": h.pretrained_model_name_or_path,
            "mask_threshold": text("mask_threshold"),
            "mask_combine": text("mask_combine"),
            "mask_statistic": text("mask_statistic"),
            "update_from": text("update_from"),
            "timestep_sampling": text("timestep_sampling"),
            "large_t_steps": text("large_t_steps"), "large_t_min": text("large_t_min"),
            "subject_words": json.dumps(list(h.subject_words)),
            "starts": json.dumps({"starts": h.starts, "start_steps": in_force("start_steps", h.start_steps),
                                  **(self.start_selection or {})}),
            **self.family.identifier_metadata(),  # the family and each text encoder's part of a row
            "global_step": str(self.global_step if self._trainer else 0),
            "package_versions": json.dumps(package_versions()),
            "git_revision": git_revision(),
        }

    def save_identifier(self, path: str | Path | None = None) -> Path:
        path = Path(path) if path else self.run_dir / IDENTIFIER_FILE
        return self.identifier.save(path, self.identifier_metadata())

    def load_identifier(self, path: str | Path) -> None:
        self.identifier.load(path, self.family.identifier_dim)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep only the identifier (the backbone is frozen and reloadable), and refresh the
        identifier file, so a crash later leaves the last good identifier on disk."""
        if self.trainer.is_global_zero and self.trainer.state.fn == "fit":
            self.save_identifier()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("identifier.")}
        checkpoint["adi_identifier"] = {"layer_paths": self.identifier.layer_paths, "rows": self.identifier.num_rows}
        checkpoint["adi_rng_states"] = rng_states_for_checkpoint()  # Lightning does not save them itself

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_identifier_fits(checkpoint, self.identifier)
        if "adi_rng_states" in checkpoint:
            _set_rng_states(checkpoint["adi_rng_states"])

    def on_train_end(self) -> None:
        if self.trainer.is_global_zero:
            path = self.save_identifier()
            log.info("identifier written to %s", path)

    # ---------------------------------------------------------------- training
    def _record_role_grads(self, batch_size: int, roles: int):
        """Tensor hook on the per-sample identifier view: one gradient per sample, exactly."""
        samples = batch_size * roles
        accumulate = self.trainer.accumulate_grad_batches if self._trainer else 1

        def hook(grad: torch.Tensor) -> None:
            # Undo the loss mean (1/samples) and Lightning's 1/accumulate; AMP scale is the callback's.
            self._role_grads.append(grad.detach().float().reshape(batch_size, roles, *grad.shape[1:]) * (samples * accumulate))

        return hook

    def compute_loss(self, batch: dict, draw_step: int | None = None,
                     large_t_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, per-sample losses [B*R])`` for a batch of triples (R = 3) or anchors (R = 1).

        All members of a triple share one prompt, timestep and noise tensor, drawn from a generator keyed
        by (triple key, ``draw_step``, default the global step): only the image differs, and results do not
        depend on how triples are spread over ranks. ``large_t_only`` draws t from ``[large_t_min T, T)``
        (multi-start's score). With masking on, a hook on the per-sample view of the identifier records
        every sample's gradient in this one backward.
        """
        pixels = batch["pixel_values"]
        batch_size, roles = pixels.shape[:2]
        if self.masking_enabled and roles != 3 and torch.is_grad_enabled():
            raise ValueError(f"masking needs (anchor, context, action) triples, got {roles} images per item")
        samples = batch_size * roles
        latents = self._latents(batch, pixels)
        h = self.hparams
        step = self.global_step if draw_step is None else draw_step
        noise, timesteps = self.objective.draw(batch["key"].tolist(), step, roles, latents, h.timestep_sampling,
                                               step + 1 if large_t_only else h.large_t_steps, h.large_t_min)
        noisy = self.objective.noisy(latents, noise, timesteps)
        if self.hparams.channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)

        prompts = [t.format(self.hparams.placeholder_token) for t in batch["template"] for _ in range(roles)]
        table = self.identifier.embedding
        per_sample = table.unsqueeze(0).expand(samples, *table.shape)
        if self.masking_enabled and torch.is_grad_enabled():
            per_sample.register_hook(self._record_role_grads(batch_size, roles))
        shared = roles if self.hparams.share_text_encoding else 1
        features = self.family.encode(self.family.tokenize(prompts, latents.device), per_sample,
                                      self.identifier.layer_to_row(), shared)
        # Not self.denoiser.dtype: diffusers' dtype property walks every submodule on every call.
        dtype = next(self.denoiser.parameters()).dtype
        conditioning = self.family.denoiser_inputs(features, dtype, tuple(pixels.shape[-2:]))
        pred = self.family.predict(self._train_unet, noisy.to(dtype), self.objective.model_timesteps(timesteps),
                                   conditioning)
        target = self.objective.target(latents, noise, timesteps)
        per_sample_loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        return per_sample_loss.mean(), per_sample_loss

    def _encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.family.encode_images(pixels)

    def _latents(self, batch: dict, pixels: torch.Tensor) -> torch.Tensor:
        """Scaled VAE latents ``[B*R, C, h, w]``; from the cache when the batch names its images."""
        flat = pixels.flatten(0, 1)
        keys, flips = batch.get("image_key"), batch.get("flip")
        if not self.hparams.cache_latents or keys is None or flips is None or tuple(keys.shape) != tuple(pixels.shape[:2]):
            return self._encode_images(flat)  # e.g. a batch sliced by hand: no trustworthy keys
        flips = torch.as_tensor(flips).reshape(-1, 1).expand(keys.shape)
        return self.latent_cache.latents(flat, keys, flips, self._encode_images)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, per_sample_loss = self.compute_loss(batch)
        batch_size, roles = batch["pixel_values"].shape[:2]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss ({loss.item()}) at global step {self.global_step}; "
                                     "no non-finite identifier is saved")
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        by_role = per_sample_loss.detach().reshape(batch_size, roles).mean(0)
        for name, value in zip(("anchor", "context", "action"), by_role):
            self.log(f"train/loss_{name}", value, batch_size=batch_size)
        return loss

    def pop_role_grads(self) -> list[torch.Tensor]:
        """Per-triple role gradients recorded since the last optimizer step, one ``[b, 3, R, D]``
        tensor per micro-batch (the callback orders them across ranks)."""
        grads, self._role_grads = self._role_grads, []
        return grads

    # -------------------------------------------------------------- generation
    @property
    def generation_size(self) -> int:
        if self.hparams.image_size:
            return self.hparams.image_size
        return self.denoiser.config.sample_size * self.info.vae_scale_factor

    @torch.no_grad()
    def prompt_embeddings(self, prompts: list[str], table: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The stock pipeline's prompt inputs (``prompt_embeds``, ``negative_prompt_embeds``, ...; each
        ``[N, ...]``, :meth:`~adi_lightning.families.BackboneFamily.prompt_inputs`). ``table`` ``[R, D]``
        replaces the learned identifier (e.g. ``identifier.initial``, the untrained one)."""
        table = self.identifier.embedding if table is None else table
        return self.family.prompt_inputs(prompts, table.unsqueeze(0).expand(len(prompts), *table.shape),
                                         self.identifier.layer_to_row(), self.denoiser.dtype)

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int], table: torch.Tensor | None = None):
        """One seeded image per (prompt, seed) through the family's stock pipeline;
        ``table`` as in :meth:`prompt_embeddings` (``self.identifier.initial``: the untrained identifier)."""
        return generation.run_seeded(self.family.stock_pipeline(), self.prompt_embeddings(prompts, table), seeds,
                                     num_inference_steps=self.hparams.num_inference_steps,
                                     guidance_scale=self.hparams.guidance_scale,
                                     height=self.generation_size, width=self.generation_size)

    @torch.no_grad()
    def img2img(self, images, prompts: list[str], seeds: list[int], strength: float = 0.6,
                steps: int = 30, guidance: float | None = None):
        """Image-to-image with the frozen backbone and plain prompts (no identifier): used to
        make action-different partners that keep the anchor's context. One PIL image per (image, prompt,
        seed), drawn at the input image's size (rounded down to the pipeline's latent grid; the family's
        ``img2img_inputs`` passes that size where the pipeline would draw at its default size: SD3, FLUX);
        ``guidance`` is the stock img2img pipeline's ``guidance_scale`` (FLUX: the embedded guidance); ``None``:
        the family's ``default_guidance_scale``."""
        if self._trainer is not None:
            self.to(self.trainer.strategy.root_device)  # prepare_data runs before the model is placed
        inputs = self.family.prompt_inputs(prompts, None, self.identifier.num_layers, self.denoiser.dtype)
        return generation.run_seeded(self.family.stock_pipeline(img2img=True), inputs, seeds,
                                     per_seed=[self.family.img2img_inputs(image) for image in images],
                                     strength=strength, num_inference_steps=steps,
                                     guidance_scale=self.family.guidance(guidance))

    def generation_step(self, batch: dict, batch_idx: int = 0, dataloader_idx: int = 0) -> dict | None:
        """Seeded images of a prompt-seed batch (validate, test and predict alike); callbacks judge and save them.
        None (nothing generated) while :attr:`skip_generation` is set."""
        if self.skip_generation:
            return None
        prompts, seeds = list(batch["prompt"]), [int(s) for s in batch["seed"]]
        out = {"prompt": prompts, "seed": seeds, "image": self.generate(prompts, seeds),
               "prompt_index": [int(i) for i in batch["prompt_index"]],
               "seed_index": [int(i) for i in batch["seed_index"]],
               "subject": list(batch.get("subject", []))}
        if self._trainer is not None and (self.trainer.validating or self.trainer.testing
                                          or self.trainer.state.fn == "fit"):
            out["untrained_image"] = self.untrained_images(prompts, seeds)
        return out

    def untrained_images(self, prompts: list[str], seeds: list[int]) -> list:
        """The untrained identifier's image of each (prompt, seed) (``identifier.initial``): generated
        once per (prompt, seed) and trainer call (fit, validate, test), then reused: a fit that validates
        N times draws them once."""
        cache = self.__dict__.setdefault("_untrained_images", {})
        missing = list(dict.fromkeys(k for k in zip(prompts, seeds) if k not in cache))
        if missing:
            images = self.generate([p for p, _ in missing], [s for _, s in missing], table=self.identifier.initial)
            cache.update(zip(missing, images))
        return [cache[key] for key in zip(prompts, seeds)]

    validation_step = test_step = predict_step = generation_step
