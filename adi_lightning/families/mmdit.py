"""What the MMDiT families (:mod:`~adi_lightning.families.sd3`, :mod:`~adi_lightning.families.flux`) share.

Both carry the text as a stream from block to block and get identifier rows through the block-wise hooks
(:mod:`adi_lightning.blockwise`): one ``[T, J]`` encoding chunk per block along the token axis, T
:attr:`MMDiTFamily.tokens_per_prompt`. Both read one pooled vector, encoded with the middle block's row
(:func:`~adi_lightning.families.sdxl.pooled_layer_index`), and latents ``(mode - shift_factor) *
scaling_factor`` of a 16-channel VAE. ``install_identifier`` on a stock pipeline shadows its
``encode_prompt`` with an instance attribute (:class:`BlockwiseEncodePrompt`, one subclass per family)
that encodes a prompt block-wise; removing the attribute restores the stock method.
"""

from __future__ import annotations

import inspect
from typing import ClassVar

import torch

from adi_lightning.blockwise import install_blockwise_routing, remove_blockwise_routing, stream_blocks
from adi_lightning.families.base import BackboneFamily
from adi_lightning.families.sdxl import pooled_layer_index
from adi_lightning.identifier import install_overlay
from adi_lightning.prompts import check_identifier_prompts


def group_stream_blocks(blocks: int, row_groups: str, backbone: str, kind: str) -> torch.Tensor:
    """``layer_to_row`` ``[B]`` over an MMDiT's ``blocks`` stream blocks for ``model.row_groups``: ``layer`` and
    ``attention`` one row per block, ``shared`` one row; ValueError for ``resolution`` (every block of an MMDiT
    runs at one resolution), naming the ``backbone`` and its block ``kind``."""
    if row_groups in ("layer", "attention"):
        return torch.arange(blocks)
    if row_groups == "shared":
        return torch.zeros(blocks, dtype=torch.int64)
    raise ValueError(f"model.row_groups={row_groups} has no meaning for an MMDiT ({backbone}): its {blocks} {kind} "
                     "run at one resolution; use layer (one row per block), attention (the same) or shared")


def _prompt_list(prompt) -> list[str]:
    return [prompt] if isinstance(prompt, str) else list(prompt)


class BlockwiseEncodePrompt:
    """The pipeline's ``encode_prompt`` while an identifier is installed: a prompt (with or without the
    placeholder) encoded block-wise by the family, ``[N, B*T, J]``, then handed to the stock method as
    ``prompt_embeds`` / ``pooled_prompt_embeds``; its outputs repeated for ``num_images_per_prompt``
    (:meth:`finish`). ValueError for one of :attr:`other_prompts` other than ``prompt``, for another
    ``max_sequence_length`` and for what :meth:`check_call` refuses.

    Args:
        family: The MMDiT family over the pipeline. rows: ``[R, D]`` fp32 identifier rows. layers: B, or the
            ``[B]`` row index of each block. token: The placeholder. placeholder_id: Its id in the first tokenizer.
    """

    #: The stock method's prompt arguments for the other text encoders: each must be None or equal ``prompt``.
    other_prompts: ClassVar[tuple[str, ...]] = ()

    def __init__(self, family: MMDiTFamily, rows: torch.Tensor, layers, token: str, placeholder_id: int):
        self.family, self.rows, self.layers = family, rows, layers
        self.token, self.placeholder_id = token, placeholder_id
        self.stock = type(family.pipe).encode_prompt.__get__(family.pipe)
        self.signature = inspect.signature(self.stock)

    def check_call(self, call: dict) -> None:
        """Refuse (ValueError) a stock argument in ``call`` that the block-wise encoding cannot honour."""

    def finish(self, outputs: tuple, copies: int) -> tuple:
        """The stock method's ``outputs`` with the prompt's encodings repeated ``copies`` times along the batch."""
        raise NotImplementedError

    def __call__(self, *args, **kwargs):
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        call = dict(bound.arguments)
        copies = 1
        if call["prompt_embeds"] is None:
            prompts = _prompt_list(call["prompt"])
            for key in self.other_prompts:
                if call[key] is not None and _prompt_list(call[key]) != prompts:
                    raise ValueError(f"{key} differs from prompt: with an adi-lightning identifier installed, every "
                                     "text encoder reads the same prompt")
            self.check_call(call)
            family = self.family
            if call["max_sequence_length"] != family.max_sequence_length:
                raise ValueError(f"max_sequence_length={call['max_sequence_length']}: the installed identifier's "
                                 f"block-wise routing reads {family.max_sequence_length} T5 tokens per encoding")
            device = call["device"] or family.pipe._execution_device
            carrying = check_identifier_prompts(family.tokenizer, self.token, self.placeholder_id, prompts, "prompt")
            table = self.rows.to(device)
            rows = table.unsqueeze(0).expand(len(prompts), *table.shape) if carrying else None
            context, pooled = family.encode_text(family.tokenize(prompts, device), rows, self.layers)
            call.update(prompt=None, **dict.fromkeys(self.other_prompts), prompt_embeds=context,
                        pooled_prompt_embeds=pooled)
            copies = call["num_images_per_prompt"]
        return self.finish(self.stock(**call), copies)


class MMDiTFamily(BackboneFamily):
    """A family whose denoiser is an MMDiT (``transformer``): its identifier layers are the blocks that carry
    the text stream (:func:`~adi_lightning.blockwise.stream_blocks`), each reading one ``[T, J]`` chunk through
    the block-wise hooks. Subclasses set :attr:`max_sequence_length`, :attr:`encode_prompt_class` and
    :attr:`tokens_per_prompt` besides what :class:`BackboneFamily` asks."""

    denoiser_part = "transformer"
    #: T5 tokens of one encoding (the stock pipeline's default ``max_sequence_length``).
    max_sequence_length: ClassVar[int]
    #: The pipeline's ``encode_prompt`` while an identifier is installed (:meth:`install_text`).
    encode_prompt_class: ClassVar[type[BlockwiseEncodePrompt]]
    #: The side, in latent pixels, of one image token: SD3's ``patch_size``, FLUX's 2x2 packing.
    latent_patch: ClassVar[int] = 2

    @property
    def tokens_per_prompt(self) -> int:
        """T: the tokens of one encoding, one block's chunk."""
        raise NotImplementedError

    # ---------------------------------------------------------------- denoiser
    def identifier_layers(self) -> list[str]:
        """The blocks that carry the text stream (:func:`~adi_lightning.blockwise.stream_blocks`)."""
        return stream_blocks(self.denoiser)

    def group_identifier_layers(self, layer_paths: list[str], row_groups: str) -> torch.Tensor:
        """``layer`` / ``attention``: one row per block; ``shared``: one row (Textual Inversion);
        ``resolution`` is refused (ValueError, naming the family and its :attr:`layer_kind`): an MMDiT
        runs every block at one resolution."""
        return group_stream_blocks(len(layer_paths), row_groups, self.name.upper(), self.layer_kind)

    def install_routing(self):
        """Block-wise hooks on the transformer (:func:`~adi_lightning.blockwise.install_blockwise_routing`),
        one ``[T, J]`` chunk per block."""
        return install_blockwise_routing(self.denoiser, self.tokens_per_prompt)

    def remove_routing(self, handle) -> None:
        remove_blockwise_routing(self.denoiser)

    @property
    def pooled_layer(self) -> int:
        """The block whose row the pooled vector sees: the middle one, ``B // 2``."""
        return pooled_layer_index(self.identifier_layers())

    # --------------------------------------------------------------- encoding
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(mode - shift_factor) * scaling_factor`` fp32 ``[N, 16, h, w]`` (the inverse of the pipeline's
        decoding)."""
        latents = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.mode().float()
        return (latents - self.vae.config.shift_factor) * self.vae.config.scaling_factor

    # -------------------------------------------------------------- pipelines
    def img2img_inputs(self, image) -> dict:
        """The ``image`` (PIL) with its ``height`` and ``width`` rounded down to the image-token grid
        (``vae_scale_factor * latent_patch`` px): without them the stock MMDiT img2img pipelines
        (``StableDiffusion3Img2ImgPipeline``, ``FluxImg2ImgPipeline``) resize the image to their default
        size (1024 px for SD3 and FLUX.1) and draw at that size; SD3's refuses a size off that grid."""
        grid = self.pipe.vae_scale_factor * self.latent_patch
        return {"image": image, "height": image.height // grid * grid, "width": image.width // grid * grid}

    def install_text(self, rows: torch.Tensor, token: str, layers: int | torch.Tensor) -> dict:
        """A copy of each tokenizer with ``token``, the overlay in each text encoder, and the pipeline's
        ``encode_prompt`` shadowed by :attr:`encode_prompt_class` over ``rows`` ``[R, D]``. Returns what
        :meth:`remove_text` restores."""
        saved, tokenizers, ids = self._placeholder_tokenizers(token)
        for tokenizer_name, tokenizer, placeholder_id, encoder_name in zip(
                self.tokenizer_parts, tokenizers, ids, self.text_parts):
            install_overlay(saved[encoder_name], placeholder_id)
            setattr(self.pipe, tokenizer_name, tokenizer)
        self.pipe.encode_prompt = self.encode_prompt_class(self, rows.detach().float().clone(), layers, token, ids[0])
        return saved

    def remove_text(self, saved: dict) -> None:
        self.pipe.__dict__.pop("encode_prompt", None)
        super().remove_text(saved)
