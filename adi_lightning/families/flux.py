"""FLUX.1 (``FluxPipeline``: ``FluxTransformer2DModel``, CLIP-L pooled + T5, guidance embedding).

As ``FluxPipeline.encode_prompt`` makes it, the token stream is T5 alone: T5's last hidden state
(``text_encoder_2``, ``[N, S, J]``, S = ``max_sequence_length``, 512 as the pipeline's default), with
text position ids ``txt_ids`` of zeros ``[S, 3]``; CLIP-L (``text_encoder``, a ``CLIPTextModel``) reaches
the transformer only through its pooled output, ``[N, P]`` (``pooled_projections``, added to the timestep
and guidance embedding that modulates every block). There is no unconditional prompt: FLUX.1-dev is
guidance-distilled (the ``guidance`` scale is an input of the transformer, ``guidance_embeds``), so
:meth:`FluxFamily.pipeline_inputs` passes no negative embeddings (the stock pipeline reads them only for
``true_cfg_scale > 1``). The transformer reads latents ``(mode - shift_factor) * scaling_factor`` of the
16-channel VAE packed into 2x2 patches (:func:`pack_latents`), image position ids ``img_ids``, and
``timestep`` = sigma (it multiplies by 1000 itself, as it does ``guidance``). Training is flow matching
with the scheduler's dynamic shift: ``mu`` of the packed image's token count
(:class:`~adi_lightning.objective.FlowMatchingObjective`); the embedded guidance during training is
:attr:`FluxFamily.training_guidance` (3.5, diffusers' FLUX DreamBooth scripts' default).

Block-wise (ADI / P+, :mod:`adi_lightning.blockwise`): the identifier's layers are every block that carries
the text stream, the double-stream blocks (``transformer_blocks.<b>``) then the single-stream blocks
(``single_transformer_blocks.<s>``): B = 19 + 38 for FLUX.1. Single-stream blocks get their terms on the
text part of their stream like the double-stream ones (telescoping, exactly zero for equal rows), so a
row per block reaches every block, as P+ rows reach every ``attn2`` of a UNet. An identifier row is
``[D1 + D3]``: the CLIP-L placeholder embedding then the T5 one. Each row's T5 encoding is one ``[S, J]``
chunk; the B chunks travel along the token axis, ``[N, B*S, J]``. The pooled vector is one per prompt: it
is encoded with the CLIP-L part of the middle block's row, ``B // 2``
(:func:`~adi_lightning.families.sdxl.pooled_layer_index`, as SD3 and SDXL do). So only that row's CLIP-L
part is read; the other rows' CLIP-L parts get no gradient and stay unused. The row keeps a CLIP-L part
(rather than the pooled vector reading no identifier) so that a one-row identifier is a textual inversion
in both encoders, the pair ``clip_l`` + ``t5xxl`` that FLUX textual-inversion files hold, and so that the
identifier can steer the global modulation, as it does in SD3 and SDXL.

``install_identifier`` on a stock ``FluxPipeline``: :meth:`FluxFamily.install_text` shadows the pipeline's
``encode_prompt`` with an instance attribute that encodes a prompt block-wise (as :meth:`prompt_inputs`);
removing the attribute restores the stock method. What FLUX shares with SD3 (the block-wise routing,
``install_text``) is :mod:`adi_lightning.families.mmdit`'s.
"""

from __future__ import annotations

import torch

from adi_lightning.conditioning import call_with_rows, count_layers, layer_rows, spread_over_layers
from adi_lightning.families.base import Features
from adi_lightning.families.mmdit import BlockwiseEncodePrompt, MMDiTFamily
from adi_lightning.identifier import get_token_embedding
from adi_lightning.objective import FlowMatchingObjective
from adi_lightning.prompts import tokenize

#: T5 tokens of one encoding: ``FluxPipeline``'s default ``max_sequence_length``.
MAX_SEQUENCE_LENGTH = 512
#: The embedded guidance scale of the training forward (diffusers' ``train_dreambooth_lora_flux.py`` default).
TRAINING_GUIDANCE = 3.5


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``[N, C, h, w]`` -> ``[N, (h/2)*(w/2), 4C]``: 2x2 patches, row-major, each ``C x 2 x 2`` flattened
    (``FluxPipeline._pack_latents``). ValueError for an odd ``h`` or ``w``."""
    n, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX packs latents into 2x2 patches: {h}x{w} is not even")
    patches = latents.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(n, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents`: ``[N, (h/2)*(w/2), 4C]`` -> ``[N, C, h, w]`` for latents
    ``height x width`` (``h``, ``w``)."""
    n, _, channels = packed.shape
    patches = packed.reshape(n, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(n, channels // 4, height, width)


def latent_image_ids(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """``img_ids`` ``[(h/2)*(w/2), 3]`` of latents ``height x width``: ``(0, row, column)`` of each packed
    patch (``FluxPipeline._prepare_latent_image_ids``)."""
    rows = torch.arange(height // 2, dtype=torch.float32)[:, None].expand(height // 2, width // 2)
    columns = torch.arange(width // 2, dtype=torch.float32)[None, :].expand(height // 2, width // 2)
    ids = torch.stack([torch.zeros_like(rows), rows, columns], dim=-1)
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class _FluxEncodePrompt(BlockwiseEncodePrompt):
    """``FluxPipeline.encode_prompt`` while an identifier is installed: a prompt (with or without the
    placeholder) encoded block-wise by the family, ``([N, B*S, J], [N, P], txt_ids [B*S, 3])``; the
    block-wise routing cuts ``txt_ids`` to S. ``prompt_2`` other than ``prompt`` and another
    ``max_sequence_length`` are refused (ValueError)."""

    other_prompts = ("prompt_2",)

    def finish(self, outputs: tuple, copies: int) -> tuple:
        embeds, pooled, text_ids = outputs
        return embeds.repeat_interleave(copies, dim=0), pooled.repeat_interleave(copies, dim=0), text_ids


class FluxFamily(MMDiTFamily):
    """FLUX.1: features are ``(context [N, B*S, J], pooled [N, P])``; the transformer gets packed latents,
    ``encoder_hidden_states``, ``pooled_projections``, ``img_ids``, ``txt_ids`` and ``guidance``.
    ``text_parts`` are CLIP-L (pooled only) and T5 (the stream)."""

    pipeline_class_name = "FluxPipeline"
    img2img_class_name = "FluxImg2ImgPipeline"
    name = "flux"
    text_parts = ("text_encoder", "text_encoder_2")
    tokenizer_parts = ("tokenizer", "tokenizer_2")
    layer_kind = "double- and single-stream blocks"
    max_sequence_length = MAX_SEQUENCE_LENGTH
    training_guidance = TRAINING_GUIDANCE
    #: Generation uses the embedded guidance the identifier was trained with (also ``FluxPipeline``'s default).
    default_guidance_scale = TRAINING_GUIDANCE
    encode_prompt_class = _FluxEncodePrompt

    @property
    def tokens_per_prompt(self) -> int:
        """T = S: one encoding is T5's :attr:`max_sequence_length` tokens (CLIP-L only makes the pooled vector)."""
        return self.max_sequence_length

    # ---------------------------------------------------------------- denoiser
    def training_objective(self):
        """Flow matching with the scheduler's dynamic shift over 2x2-packed latents; ``timestep`` = sigma."""
        return FlowMatchingObjective(self.pipe.scheduler.config, timestep_scale=1.0, patch_size=2)

    def predict(self, denoiser, noisy: torch.Tensor, timestep: torch.Tensor, conditioning: dict) -> torch.Tensor:
        """The velocity ``[N, C, h, w]`` for ``noisy`` ``[N, C, h, w]``: packed in, unpacked out."""
        height, width = noisy.shape[-2:]
        packed = denoiser(pack_latents(noisy), timestep=timestep, **conditioning).sample
        return unpack_latents(packed, height, width)

    # --------------------------------------------------------------- encoding
    def tokenize(self, prompts: list[str], device: torch.device | None = None) -> torch.Tensor:
        """``[N, 77 + S]``: CLIP-L ids, then T5 ids padded to :attr:`max_sequence_length` (with ``</s>``,
        as the pipeline's)."""
        clip = tokenize(self.tokenizers[0], prompts, device)
        t5 = self.tokenizers[1](list(prompts), padding="max_length", max_length=self.max_sequence_length,
                                truncation=True, return_tensors="pt").input_ids
        return torch.cat([clip, t5 if device is None else t5.to(device)], dim=1)

    def encode_text(self, ids: torch.Tensor, rows: torch.Tensor | None, layers: int | torch.Tensor) -> Features:
        """``(context [N, B*S, J], pooled [N, P])`` (see the module docstring)."""
        clip_ids, t5_ids = ids.split([self.tokenizer.model_max_length, ids.shape[1] - self.tokenizer.model_max_length],
                                     dim=1)
        clip, t5 = self.text_encoders
        if rows is None:
            pooled = clip(clip_ids).pooler_output
            encoding = t5(t5_ids)[0]
            context = spread_over_layers(encoding.to(t5.dtype), 1, count_layers(layers))
            return context, pooled.to(clip.dtype)
        clip_rows, t5_rows = self.split_rows(rows)
        r = rows.shape[1]
        row = int(layer_rows(layers, r)[self.pooled_layer])
        output, _ = call_with_rows(clip, get_token_embedding(clip), clip_ids, clip_rows[:, row:row + 1], 1)
        encoding = call_with_rows(t5, get_token_embedding(t5), t5_ids, t5_rows, layers)[0][0]  # [N*R, S, J]
        return spread_over_layers(encoding.to(t5.dtype), r, layers), output.pooler_output.to(clip.dtype)

    def denoiser_inputs(self, features: Features, dtype: torch.dtype, size: tuple[int, int]) -> dict:
        """``encoder_hidden_states``, ``pooled_projections``, ``img_ids`` for images of ``size`` px,
        ``txt_ids`` (zeros, one encoding's S) and ``guidance`` (:attr:`training_guidance`, when the
        transformer embeds guidance)."""
        context, pooled = features
        scale = self.pipe.vae_scale_factor
        height, width = size[0] // scale, size[1] // scale
        inputs = {"encoder_hidden_states": context.to(dtype), "pooled_projections": pooled.to(dtype),
                  "img_ids": latent_image_ids(height, width, context.device, dtype),
                  "txt_ids": torch.zeros(self.max_sequence_length, 3, device=context.device, dtype=dtype)}
        if self.denoiser.config.guidance_embeds:
            inputs["guidance"] = torch.full((context.shape[0],), self.training_guidance, device=context.device,
                                            dtype=torch.float32)
        return inputs

    def pipeline_inputs(self, features: Features, negative: Features, dtype: torch.dtype) -> dict:
        """``prompt_embeds`` and ``pooled_prompt_embeds`` (no negatives: FLUX.1 is guidance-distilled)."""
        return {"prompt_embeds": features[0].to(dtype), "pooled_prompt_embeds": features[1].to(dtype)}
