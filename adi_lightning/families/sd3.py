"""Stable Diffusion 3 (diffusers ``StableDiffusion3Pipeline``): an MMDiT with CLIP-L, CLIP-G and optional T5.

As ``StableDiffusion3Pipeline.encode_prompt``: CLIP-L (``text_encoder``) and CLIP-G (``text_encoder_2``)
each give their penultimate hidden state (``hidden_states[-2]``, ``[N, 77, D_i]``); both concatenated on
channels and zero-padded to the transformer's ``joint_attention_dim`` J are followed along the token
axis by T5's last hidden state (``text_encoder_3``, ``[N, S, J]``, S = ``max_sequence_length``, 256 as the
pipeline's default), or by zeros of that shape when T5 is not loaded: one encoding ``[N, T, J]``,
T = 77 + S. The pooled embedding is both CLIPs' projected ``text_embeds`` concatenated, ``[N, P1 + P2]``.
The unconditional embedding is the encoding of ``""`` (SD3 does not force zeros). Latents are
``(mode - shift_factor) * scaling_factor`` of the 16-channel VAE. Training is flow matching
(:class:`~adi_lightning.objective.FlowMatchingObjective`).

Block-wise (ADI / P+, :mod:`adi_lightning.blockwise`): an identifier row is one vector per loaded text
encoder, ``[D1 + D2]`` or ``[D1 + D2 + D3]`` with T5 (each encoder's placeholder embedding); the
identifier's layers are the joint blocks (``transformer_blocks.<b>``). Each row's FULL encoding (its
CLIP tokens, then its T5 tokens) is one ``[T, J]`` chunk; block ``b``'s chunk is its row's, and the
B chunks travel along the token axis, ``[N, B*T, J]`` (blocks that share a row carry equal chunks, so
the telescoping term between them is exactly zero). The block-wise hooks are installed with one
chunk per block (``block_to_row`` = identity), whatever ``model.row_groups`` is, so a file of another
grouping needs no reinstall. The pooled embedding is one vector: it is encoded with the row of the
middle joint block, ``B // 2`` (:func:`~adi_lightning.families.sdxl.pooled_layer_index`, as SDXL uses
its mid-block layer's row); that row trains through its blocks' chunks and the pooled embedding.

``install_identifier`` on a stock ``StableDiffusion3Pipeline``: the stock ``encode_prompt`` puts all CLIP
tokens before all T5 tokens, so text-encoder stand-ins returning B encodings each would interleave
wrongly. Instead :meth:`StableDiffusion3Family.install_text` shadows the pipeline's ``encode_prompt``
with an instance attribute that encodes the prompt block-wise (as :meth:`prompt_inputs`) and lets the
stock method encode the negative prompt, repeated over the blocks; removing the attribute restores the
stock method. What SD3 shares with FLUX (the block-wise routing, ``install_text``) is
:mod:`adi_lightning.families.mmdit`'s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adi_lightning.conditioning import call_with_rows, count_layers, layer_rows, spread_over_layers
from adi_lightning.families.base import Features
from adi_lightning.families.mmdit import BlockwiseEncodePrompt, MMDiTFamily
from adi_lightning.identifier import get_token_embedding
from adi_lightning.objective import FlowMatchingObjective
from adi_lightning.prompts import tokenize

#: T5 tokens of one encoding: ``StableDiffusion3Pipeline``'s default ``max_sequence_length``.
MAX_SEQUENCE_LENGTH = 256


class _SD3EncodePrompt(BlockwiseEncodePrompt):
    """``StableDiffusion3Pipeline.encode_prompt`` while an identifier is installed: the prompt encoded
    block-wise, ``[N, B*T, J]``; the negative prompt by the stock method (plain ``[N, T, J]``), then
    repeated over the B blocks (equal chunks: no block-wise term). ``prompt_2`` / ``prompt_3`` other
    than ``prompt``, ``clip_skip`` and another ``max_sequence_length`` are refused (ValueError) for
    prompts the block-wise encoder makes."""

    other_prompts = ("prompt_2", "prompt_3")

    def check_call(self, call: dict) -> None:
        if call["clip_skip"] is not None:
            raise ValueError("clip_skip is not supported with a block-wise identifier")

    def finish(self, outputs: tuple, copies: int) -> tuple:
        positive, negative, pooled, negative_pooled = outputs
        positive = positive.repeat_interleave(copies, dim=0)
        pooled = pooled.repeat_interleave(copies, dim=0)
        if negative is not None and negative.shape[1] != positive.shape[1]:
            negative = negative.repeat(1, positive.shape[1] // negative.shape[1], 1)
        return positive, negative, pooled, negative_pooled


class StableDiffusion3Family(MMDiTFamily):
    """SD3: features are ``(context [N, B*T, J], pooled [N, P1 + P2])``; the MMDiT gets
    ``encoder_hidden_states`` and ``pooled_projections``. ``text_parts`` are CLIP-L and CLIP-G, plus
    T5 (``text_encoder_3``) when the pipeline has it."""

    pipeline_class_name = "StableDiffusion3Pipeline"
    img2img_class_name = "StableDiffusion3Img2ImgPipeline"
    name = "sd3"
    #: The parts every SD3 folder has; T5 joins them per pipeline (see ``__init__``).
    text_parts = ("text_encoder", "text_encoder_2")
    tokenizer_parts = ("tokenizer", "tokenizer_2")
    layer_kind = "joint blocks"
    max_sequence_length = MAX_SEQUENCE_LENGTH
    encode_prompt_class = _SD3EncodePrompt

    def __init__(self, pipe):
        super().__init__(pipe)
        if getattr(pipe, "text_encoder_3", None) is not None:
            self.text_parts = (*type(self).text_parts, "text_encoder_3")
            self.tokenizer_parts = (*type(self).tokenizer_parts, "tokenizer_3")

    @classmethod
    def folder_load_kwargs(cls, index: dict) -> dict:
        """``text_encoder_3=None, tokenizer_3=None`` for a folder saved without T5 (``model_index.json``
        lists them as null): stock diffusers loads such a folder only when told."""
        absent = [part for part in ("text_encoder_3", "tokenizer_3") if index.get(part, [None])[0] is None]
        return {part: None for part in absent}

    @property
    def has_t5(self) -> bool:
        return len(self.text_parts) == 3

    @property
    def tokens_per_prompt(self) -> int:
        """T: the tokens of one encoding (77 CLIP + :attr:`max_sequence_length` T5, zeros without T5)."""
        return self.tokenizer.model_max_length + self.max_sequence_length

    # ---------------------------------------------------------------- denoiser
    def training_objective(self):
        return FlowMatchingObjective(self.pipe.scheduler.config)

    # --------------------------------------------------------------- encoding
    def tokenize(self, prompts: list[str], device: torch.device | None = None) -> torch.Tensor:
        """``[N, 77 + 77 (+ S)]``: CLIP-L, CLIP-G (and T5, padded to :attr:`max_sequence_length`) ids,
        concatenated along the last axis (T5's ids include its end token ``</s>``, as the pipeline's)."""
        ids = [tokenize(tokenizer, prompts, device) for tokenizer in self.tokenizers[:2]]
        if self.has_t5:
            t5 = self.tokenizers[2](list(prompts), padding="max_length", max_length=self.max_sequence_length,
                                    truncation=True, add_special_tokens=True, return_tensors="pt").input_ids
            ids.append(t5 if device is None else t5.to(device))
        return torch.cat(ids, dim=1)

    def _split_ids(self, ids: torch.Tensor) -> list[torch.Tensor]:
        clip = self.tokenizer.model_max_length
        sizes = [clip, clip] + ([ids.shape[1] - 2 * clip] if self.has_t5 else [])
        return list(ids.split(sizes, dim=1))

    def encode_text(self, ids: torch.Tensor, rows: torch.Tensor | None, layers: int | torch.Tensor) -> Features:
        """``(context [N, B*T, J], pooled [N, P1 + P2])`` (see the module docstring): each row's
        encoding made as ``StableDiffusion3Pipeline.encode_prompt`` makes one, spread over the blocks."""
        parts = self.split_rows(rows) if rows is not None else (None,) * len(self.text_parts)
        part_ids = self._split_ids(ids)
        n, r = ids.shape[0], 1 if rows is None else rows.shape[1]
        if rows is not None:
            layer_rows(layers, r)  # the rows fit the blocks
        hidden, pooled = [], []
        for encoder, encoder_ids, part_rows in zip(self.text_encoders[:2], part_ids, parts):
            if part_rows is None:
                output = encoder(encoder_ids, output_hidden_states=True)
            else:
                output, _ = call_with_rows(encoder, get_token_embedding(encoder), encoder_ids, part_rows, layers,
                                           output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
            pooled.append(output.text_embeds)
        dtype = self.text_encoders[0].dtype
        joint = self.denoiser.config.joint_attention_dim
        clip = torch.cat(hidden, dim=-1).to(dtype)
        clip = F.pad(clip, (0, joint - clip.shape[-1]))
        if self.has_t5:
            encoder = self.text_encoders[2]
            if parts[2] is None:
                t5 = encoder(part_ids[2])[0]
            else:
                t5 = call_with_rows(encoder, get_token_embedding(encoder), part_ids[2], parts[2], layers)[0][0]
            t5 = t5.to(encoder.dtype)
        else:
            t5 = torch.zeros(clip.shape[0], self.max_sequence_length, joint, dtype=dtype, device=clip.device)
        encoding = torch.cat([clip, t5], dim=1)  # [N*R, T, J]: each row's full encoding
        context = spread_over_layers(encoding, r, layers if rows is not None else count_layers(layers))
        pooled = torch.cat(pooled, dim=-1).reshape(n, r, -1)
        row = int(layer_rows(layers, r)[self.pooled_layer]) if rows is not None else 0
        return context, pooled[:, row]

    def denoiser_inputs(self, features: Features, dtype: torch.dtype, size: tuple[int, int]) -> dict:
        """``encoder_hidden_states`` (block-wise context) and ``pooled_projections``."""
        context, pooled = features
        return {"encoder_hidden_states": context.to(dtype), "pooled_projections": pooled.to(dtype)}

    def pipeline_inputs(self, features: Features, negative: Features, dtype: torch.dtype) -> dict:
        return {"prompt_embeds": features[0].to(dtype), "negative_prompt_embeds": negative[0].to(dtype),
                "pooled_prompt_embeds": features[1].to(dtype), "negative_pooled_prompt_embeds": negative[1].to(dtype)}
