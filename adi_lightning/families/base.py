"""The seam between the method and a backbone family (docs/architecture.md, "The family seam").

What differs between backbone families is small and local: the tokenizers and text encoders, how
a prompt and the identifier become denoiser conditioning, the added conditions, the stock pipeline
class, where the token-embedding overlay goes, and, on the denoiser's side, which layers get
identifier rows and how the rows reach them (UNet: a processor on each ``attn2``; MMDiT: block-wise
hooks) and the training objective (DDPM or flow matching, :mod:`adi_lightning.objective`).
:class:`BackboneFamily` holds exactly that, over one loaded diffusers pipeline; :mod:`adi_lightning.families` picks the
implementation from the pipeline folder's ``model_index.json`` (``_class_name``).
:class:`~adi_lightning.module.ADIModule`, the callbacks, the data and the masking math never ask
which family they hold.

Shapes used throughout: ``N`` prompts, ``L`` cross-attention layers, ``R`` identifier rows (one per
group of layers, ``model.row_groups``; ``layers`` arguments are the ``layer_to_row`` ``[L]`` or L),
``T`` tokens per prompt, ``D`` the identifier's row width (the sum of the text encoders' widths:
one vector per text encoder per row, in :attr:`BackboneFamily.text_parts` order).
"""

from __future__ import annotations

import copy
import json
from functools import partial
from typing import ClassVar

import torch
from torch import nn

from adi_lightning.conditioning import (cross_attention_layers, group_layers, install_layerwise_processors,
                                        remove_layerwise_processors)
from adi_lightning.identifier import (
    get_token_embedding,
    initializer_embedding,
    install_overlay,
    remove_overlay,
    token_embedding_owner,
)
from adi_lightning.objective import DDPMObjective
from adi_lightning.prompts import add_placeholder_token, check_identifier_prompts

Features = tuple[torch.Tensor, ...]


class TextEncoderStandIn(nn.Module):
    """What a stock pipeline reads from ``pipe.text_encoder`` besides calling it (``config``,
    ``dtype``, ``device``), for the families' layer-wise stand-ins, which own ``forward``.

    Args:
        text_encoder: The frozen encoder it wraps. table: ``[R, D_i]`` identifier rows (this
            encoder's part), kept as an fp32 buffer. placeholder_id: The placeholder's token id.
        layers: L, or the ``[L]`` row index of each layer (row groups).
    """

    def __init__(self, text_encoder: nn.Module, table: torch.Tensor, placeholder_id: int, layers: int | torch.Tensor):
        super().__init__()
        self.text_encoder = text_encoder
        self.register_buffer("table", table.detach().float().clone(), persistent=False)
        self.placeholder_id = placeholder_id
        self.layers = layers

    @property
    def config(self):
        return self.text_encoder.config

    @property
    def dtype(self) -> torch.dtype:
        return self.text_encoder.dtype

    @property
    def device(self) -> torch.device:
        return self.text_encoder.device


class BackboneFamily:
    """One backbone family's text side, added conditions and stock pipeline, over ``pipe``.

    Subclasses set the class attributes and implement :meth:`tokenize`, :meth:`encode_text`,
    :meth:`denoiser_inputs`, :meth:`pipeline_inputs` and :meth:`layerwise_text_encoder`. The
    denoiser-side methods (:meth:`identifier_layers`, :meth:`group_identifier_layers`,
    :meth:`install_routing`, :meth:`remove_routing`, :meth:`training_objective`) default to a
    UNet with ``attn2`` layers trained as DDPM. Constructing one changes nothing in ``pipe``.
    """

    #: ``_class_name`` of the pipeline in ``model_index.json`` (a diffusers class name).
    pipeline_class_name: ClassVar[str]
    #: The diffusers class for image-to-image with the same components.
    img2img_class_name: ClassVar[str]
    #: Short name recorded in ``run_info.json``.
    name: ClassVar[str]
    #: Component names of the text encoders and of their tokenizers, in identifier-row order.
    text_parts: ClassVar[tuple[str, ...]]
    tokenizer_parts: ClassVar[tuple[str, ...]]
    #: Extra keyword arguments of ``from_pretrained`` and of the constructor (e.g. no safety checker).
    load_kwargs: ClassVar[dict] = {}
    #: Component name of the denoiser (``unet``; ``transformer`` for an MMDiT).
    denoiser_part: ClassVar[str] = "unet"
    #: What the identifier's layers are, for messages and ``run_info.json``.
    layer_kind: ClassVar[str] = "cross-attention layers"
    #: The guidance scale of generated images when ``model.guidance_scale`` is unset: classifier-free
    #: guidance for the SD 1.x/2.x, SDXL and SD3 families.
    default_guidance_scale: ClassVar[float] = 7.5

    def __init__(self, pipe):
        self.pipe = pipe

    @classmethod
    def guidance(cls, value: float | None) -> float:
        """The guidance scale in force for ``value`` as set (``model.guidance_scale``,
        ``data.generate_guidance``, ``module.img2img``'s ``guidance``): :attr:`default_guidance_scale` when
        None (unset), else ``value``."""
        return cls.default_guidance_scale if value is None else float(value)

    @classmethod
    def folder_load_kwargs(cls, index: dict) -> dict:
        """Keyword arguments of ``from_pretrained`` that a folder's ``model_index.json`` (``index``) calls
        for, beyond :attr:`load_kwargs` (e.g. an optional text encoder saved as null)."""
        return {}

    @classmethod
    def pipeline_class(cls, img2img: bool = False):
        import diffusers

        return getattr(diffusers, cls.img2img_class_name if img2img else cls.pipeline_class_name)

    # ------------------------------------------------------------------ parts
    @property
    def denoiser(self) -> nn.Module:
        """The network that predicts the noise / velocity: the UNet or the MMDiT (``denoiser_part``)."""
        return getattr(self.pipe, self.denoiser_part)

    @property
    def unet(self) -> nn.Module:
        """The UNet of a UNet family (the scripts and tools that are UNet-only use it)."""
        return self.pipe.unet

    @property
    def vae(self) -> nn.Module:
        return self.pipe.vae

    @property
    def text_encoders(self) -> list[nn.Module]:
        return [getattr(self.pipe, name) for name in self.text_parts]

    @property
    def tokenizers(self) -> list:
        return [getattr(self.pipe, name) for name in self.tokenizer_parts]

    @property
    def tokenizer(self):
        """The first tokenizer: prompt checks (placeholder position, token limit) use it; every
        tokenizer of a family shares its vocabulary and length."""
        return self.tokenizers[0]

    @property
    def overlay(self):
        """The identifier overlay in the first text encoder (see :meth:`add_placeholder`)."""
        return token_embedding_owner(self.text_encoders[0]).token_embedding

    @property
    def text_dims(self) -> list[int]:
        """Width of each text encoder's part of an identifier row (``text_parts`` order)."""
        return [encoder.config.hidden_size for encoder in self.text_encoders]

    @property
    def identifier_dim(self) -> int:
        """``D``: the width of one identifier row."""
        return sum(self.text_dims)

    def modules(self) -> dict[str, nn.Module]:
        """The frozen ``nn.Module`` parts by diffusers component name (the LightningModule
        registers them under these names, so state-dict prefixes are diffusers')."""
        return {**dict(zip(self.text_parts, self.text_encoders)), "vae": self.vae, self.denoiser_part: self.denoiser}

    # ---------------------------------------------------------------- denoiser
    def identifier_layers(self) -> list[str]:
        """The module paths of the layers that get identifier rows, in data-flow order (UNet: every
        ``attn2``, :func:`~adi_lightning.conditioning.cross_attention_layers`)."""
        return list(cross_attention_layers(self.denoiser))

    def group_identifier_layers(self, layer_paths: list[str], row_groups: str) -> torch.Tensor:
        """``layer_to_row`` ``[L]`` for ``model.row_groups`` (:func:`~adi_lightning.conditioning.group_layers`)."""
        return group_layers(layer_paths, row_groups, len(self.denoiser.config.block_out_channels))

    def install_routing(self):
        """Make the denoiser read the L layer-wise encodings along the token axis (UNet: a
        :class:`~adi_lightning.conditioning.LayerwiseCrossAttnProcessor` on each ``attn2``); returns
        what :meth:`remove_routing` needs."""
        return install_layerwise_processors(self.denoiser)

    def remove_routing(self, handle) -> None:
        """Undo :meth:`install_routing`."""
        remove_layerwise_processors(self.denoiser, handle)

    def predict(self, denoiser, noisy: torch.Tensor, timestep: torch.Tensor, conditioning: dict) -> torch.Tensor:
        """The denoiser's prediction ``[N, C, h, w]`` for ``noisy`` latents ``[N, C, h, w]`` at the denoiser's
        ``timestep`` with :meth:`denoiser_inputs` ``conditioning``. ``denoiser``: :attr:`denoiser` or a
        compiled wrapper of it. A family whose denoiser reads another latent layout (FLUX: 2x2 packed) converts
        here."""
        return denoiser(noisy, timestep=timestep, **conditioning).sample

    def training_objective(self):
        """The objective the denoiser was trained with (:class:`~adi_lightning.objective.DDPMObjective`
        from the pipeline scheduler's config)."""
        return DDPMObjective(self.pipe.scheduler.config)

    # ------------------------------------------------------------- identifier
    def add_placeholder(self, token: str, templates: list[str] = ()) -> int:
        """Add ``token`` to every tokenizer (:func:`~adi_lightning.prompts.add_placeholder_token`)
        and put the identifier overlay into every text encoder; returns the first tokenizer's id."""
        ids = [add_placeholder_token(tokenizer, token, templates) for tokenizer in self.tokenizers]
        for encoder, placeholder_id in zip(self.text_encoders, ids):
            install_overlay(encoder, placeholder_id)
        return ids[0]

    def initializer_row(self, word: str, key: str = "model.initializer_token") -> torch.Tensor:
        """``[D]`` fp32: each text encoder's frozen embedding of the single-token ``word``, concatenated;
        ValueError naming ``key`` (the setting the word came from) when a tokenizer splits it."""
        return torch.cat([initializer_embedding(tokenizer, get_token_embedding(encoder), word, key)
                          for tokenizer, encoder in zip(self.tokenizers, self.text_encoders)])

    def identifier_metadata(self) -> dict[str, str]:
        """What an identifier file records of the backbone: ``family`` (:attr:`name`; export refuses the
        families a format cannot hold) and ``text_dims`` (JSON, each text encoder's part of a row)."""
        return {"family": self.name, "text_dims": json.dumps(self.text_dims)}

    def split_rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``rows [..., D]`` -> one ``[..., D_i]`` view per text encoder."""
        return rows.split(self.text_dims, dim=-1)

    # --------------------------------------------------------------- encoding
    def tokenize(self, prompts: list[str], device: torch.device | None = None) -> torch.Tensor:
        """Token ids ``[N, ...]`` of every tokenizer, padded to ``model_max_length``."""
        raise NotImplementedError

    def encode_text(self, ids: torch.Tensor, rows: torch.Tensor | None, layers: int | torch.Tensor) -> Features:
        """Text features of :meth:`tokenize` ids with the identifier ``rows`` ``[N, R, D]`` at the
        placeholder (None: plain prompts), each layer-wise (the L encodings along the token axis)."""
        raise NotImplementedError

    def encode(self, ids: torch.Tensor, rows: torch.Tensor | None, layers: int | torch.Tensor, roles: int = 1) -> Features:
        """:meth:`encode_text`; with ``roles > 1``, consecutive groups of ``roles`` prompts are equal
        (a triple's members) and are encoded once (:func:`adi_lightning.speed.encode_shared`, exact)."""
        from adi_lightning import speed

        encode = partial(self.encode_text, layers=layers)
        return speed.encode_shared(encode, ids, rows, roles) if roles > 1 else encode(ids, rows)

    def negative(self, count: int, layers: int | torch.Tensor, device: torch.device | None = None) -> Features:
        """Features of the unconditional (empty) prompt, as the stock pipeline makes them."""
        return self.encode_text(self.tokenize([""] * count, device), None, layers)

    def denoiser_inputs(self, features: Features, dtype: torch.dtype, size: tuple[int, int]) -> dict:
        """Keyword arguments of the denoiser's ``forward`` besides the latents and ``timestep``
        (``UNet2DConditionModel``: ``encoder_hidden_states``, ...) for training images of ``size`` px."""
        raise NotImplementedError

    def pipeline_inputs(self, features: Features, negative: Features, dtype: torch.dtype) -> dict:
        """``prompt_embeds``-style keyword arguments of the stock pipeline's ``__call__``."""
        raise NotImplementedError

    def prompt_inputs(self, prompts: list[str], rows: torch.Tensor | None, layers: int | torch.Tensor, dtype: torch.dtype) -> dict:
        """Stock-pipeline inputs (each ``[N, ...]``) for ``prompts`` with the identifier ``rows``
        ``[N, R, D]`` (None: plain prompts) and the family's unconditional prompt. Raises ValueError for
        a prompt whose identifier would be cut off or is joined to a word
        (:func:`adi_lightning.prompts.check_identifier_prompts`)."""
        device = self.text_encoders[0].device
        if rows is not None:
            placeholder_id = self.overlay.placeholder_id
            token = self.tokenizer.convert_ids_to_tokens(placeholder_id)
            check_identifier_prompts(self.tokenizer, token, placeholder_id, prompts, "prompt")
        features = self.encode_text(self.tokenize(prompts, device), rows, layers)
        return self.pipeline_inputs(features, self.negative(len(prompts), layers, device), dtype)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Scaled VAE latents ``[N, C, h, w]`` of ``pixels`` ``[N, 3, H, W]`` in [-1, 1] (the
        deterministic ``latent_dist.mode()``), fp32."""
        latents = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.mode()
        return latents.float() * self.vae.config.scaling_factor

    # -------------------------------------------------------------- pipelines
    def stock_pipeline(self, img2img: bool = False):
        """The loaded stock pipeline itself, or its image-to-image sibling over the same components."""
        if not img2img:
            return self.pipe
        pipe = self.pipeline_class(img2img=True)(**{**self.pipe.components, **self.load_kwargs})
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def img2img_inputs(self, image) -> dict:
        """Keyword arguments of one call of the image-to-image pipeline (:meth:`stock_pipeline`) for one input
        ``image`` (PIL): the image itself; the stock UNet img2img pipelines draw at its size (rounded down to
        their latent grid). The MMDiT families add ``height`` and ``width``
        (:meth:`~adi_lightning.families.mmdit.MMDiTFamily.img2img_inputs`)."""
        return {"image": image}

    def layerwise_text_encoder(self, index: int, encoder: nn.Module, rows: torch.Tensor, placeholder_id: int,
                               layers: int | torch.Tensor) -> nn.Module:
        """A stand-in for text encoder ``index`` of a stock pipeline that turns placeholder prompts
        into layer-wise features, with ``rows`` ``[R, D_index]`` its part of the identifier."""
        raise NotImplementedError

    def _placeholder_tokenizers(self, token: str) -> tuple[dict, list, list[int]]:
        """``(saved, tokenizers, ids)``: the pipeline's tokenizers and text encoders as they are (what
        :meth:`remove_text` restores), a copy of each tokenizer with ``token`` added (the originals stay
        untouched; all added before anything changes) and the placeholder id in each copy."""
        saved = {name: getattr(self.pipe, name) for name in (*self.tokenizer_parts, *self.text_parts)}
        tokenizers = [copy.deepcopy(saved[name]) for name in self.tokenizer_parts]
        return saved, tokenizers, [add_placeholder_token(tokenizer, token) for tokenizer in tokenizers]

    def install_text(self, rows: torch.Tensor, token: str, layers: int | torch.Tensor) -> dict:
        """Install the identifier ``rows`` ``[R, D]`` into ``self.pipe``'s text side: a copy of each
        tokenizer with ``token`` added, the overlay, and each text encoder replaced by
        :meth:`layerwise_text_encoder`. Returns what :meth:`remove_text` restores."""
        saved, tokenizers, ids = self._placeholder_tokenizers(token)
        parts = zip(self.tokenizer_parts, tokenizers, ids, self.text_parts, self.split_rows(rows))
        for index, (tokenizer_name, tokenizer, placeholder_id, encoder_name, part_rows) in enumerate(parts):
            encoder = saved[encoder_name]
            install_overlay(encoder, placeholder_id)
            setattr(self.pipe, tokenizer_name, tokenizer)
            setattr(self.pipe, encoder_name, self.layerwise_text_encoder(
                index, encoder, part_rows.to(encoder.device), placeholder_id, layers))
        return saved

    def remove_text(self, saved: dict) -> None:
        """Undo :meth:`install_text`."""
        for name in self.text_parts:
            remove_overlay(saved[name])
        for name, part in saved.items():
            setattr(self.pipe, name, part)
