"""Speed switches of :class:`~adi_lightning.module.ADIModule`, each exact by construction.

- :class:`LatentCache`: the VAE latents of the exemplars, encoded once per (image, flip).
  ``latent_dist.mode()`` is deterministic, so a cached latent is the latent the uncached path
  would compute; a cache hit only skips the VAE encoder.
- :func:`encode_shared`: the three members of a triple share one prompt and (by value)
  one identifier table, so their L layer-wise encodings are equal. The encoder runs ONCE per
  triple (B*L prompts instead of 3B*L), and the backward pass runs one vector-Jacobian product per
  role through that single forward graph: each sample's identifier gradient is exactly the one the
  unshared path computes (same Jacobian, its own cotangent), so the per-sample hook that ADI's
  masking reads stays exact. It saves the 2/3 of the text-encoder forward passes (and their
  activation memory) that the unshared path spends on identical inputs.
- :func:`enable_gradient_checkpointing`: diffusers' / transformers' own checkpointing switches
  (non-reentrant), so the recomputed forward routes by module exactly as the first one.
- :func:`compile_unet`: ``torch.compile`` of the UNet for the training forward only; the per-layer
  processors route by module, so a compiled graph feeds every layer its own row.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class LatentCache:
    """VAE latents keyed by ``(image key, flipped)``, kept on the device they were made on.

    One entry is ``C x H/f x W/f`` fp32 (64 KiB per image for SD 1.x at 512 px). It lives in the
    module (each DDP rank fills its own from the keys in its batches), not in the data workers.
    """

    def __init__(self) -> None:
        self._store: dict[tuple[int, bool], torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        self._store.clear()
        self.hits = self.misses = 0

    def latents(
        self,
        pixels: torch.Tensor,
        keys: torch.Tensor,
        flips: torch.Tensor,
        encode: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """Latents ``[N, C, h, w]`` of ``pixels`` ``[N, 3, H, W]``; ``keys`` ``[N]``, ``flips`` ``[N]``.

        Images not in the cache are encoded one per ``encode`` call (each distinct image once): a
        convolution's last bits can depend on the batch it runs in, and a latent must not depend
        on which images happened to share its first batch (a resumed run meets them in others).
        """
        ids = list(zip((int(k) for k in keys.reshape(-1).tolist()), (bool(f) for f in flips.reshape(-1).tolist())))
        if len(ids) != pixels.shape[0]:
            raise ValueError(f"{pixels.shape[0]} images but {len(ids)} latent-cache keys")
        first = {}
        for position, ident in enumerate(ids):
            first.setdefault(ident, position)
        missing = [ident for ident in first if ident not in self._store]
        if missing:
            for ident in missing:
                position = first[ident]
                self._store[ident] = encode(pixels[position:position + 1])[0].detach().clone()
        self.misses += len(missing)
        self.hits += len(ids) - len(missing)
        return torch.stack([self._store[ident] for ident in ids]).to(pixels.device)


class _SharedEncoding(torch.autograd.Function):
    """Encode each triple's prompt once; backward: one VJP per role through that one graph.

    Input ``rows`` is the per-sample identifier view ``[B*roles, R, D]`` (the tensor ADI's hook
    watches); members of a triple hold the same values, so the encoding of member 0 is the
    encoding of all. The returned gradient for sample ``(b, r)`` is ``J_b^T g_{b,r}``: exactly what
    the unshared path computes for that sample. ``encode(ids, rows)`` returns a tuple of tensors
    (a family's text features, :meth:`~adi_lightning.families.BackboneFamily.encode_text`).
    """

    @staticmethod
    def forward(ctx, rows, encode, input_ids, roles):
        batch = rows.shape[0] // roles
        with torch.enable_grad():
            leaf = rows.detach()[::roles].clone().requires_grad_(True)
            features = encode(input_ids[::roles], leaf)
        ctx.leaf, ctx.features, ctx.roles, ctx.batch = leaf, features, roles, batch
        return tuple(f.detach().repeat_interleave(roles, dim=0) for f in features)

    @staticmethod
    def backward(ctx, *grad_outs):
        roles, batch = ctx.roles, ctx.batch
        grad_outs = [g.reshape(batch, roles, *g.shape[1:]) for g in grad_outs]
        grads = []
        # The inner graph is retained: the outer graph may be walked again (retain_graph=True, as in
        # per-sample autograd.grad checks); it is freed with this node when the step's graph goes.
        for role in range(roles):
            cotangents = [g[:, role].to(f.dtype) for g, f in zip(grad_outs, ctx.features)]
            (grad,) = torch.autograd.grad(ctx.features, ctx.leaf, cotangents, retain_graph=True)
            grads.append(grad)
        return torch.stack(grads, dim=1).flatten(0, 1), None, None, None


def encode_shared(
    encode: Callable[[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, ...]],
    input_ids: torch.Tensor,
    rows: torch.Tensor | None,
    roles: int,
) -> tuple[torch.Tensor, ...]:
    """``encode(input_ids, rows)`` for ``B*roles`` prompts whose consecutive groups of ``roles`` are
    identical (ids ``[B*roles, ...]`` and row values ``[B*roles, R, D]``), with one encoder forward
    per group. Without gradients, or with ``roles == 1``, it is the plain call."""
    if roles == 1 or rows is None or not (torch.is_grad_enabled() and rows.requires_grad):
        if roles > 1:
            features = encode(input_ids[::roles], None if rows is None else rows[::roles])
            return tuple(f.repeat_interleave(roles, dim=0) for f in features)
        return encode(input_ids, rows)
    if rows.shape[0] % roles or input_ids.shape[0] != rows.shape[0]:
        raise ValueError(f"{input_ids.shape[0]} prompts / {rows.shape[0]} row sets are not groups of {roles}")
    return _SharedEncoding.apply(rows, encode, input_ids, roles)


def enable_gradient_checkpointing(unet: nn.Module, *text_encoders: nn.Module) -> None:
    """Non-reentrant activation checkpointing through the libraries' own switches.

    diffusers checkpoints whenever gradients are on; transformers only in ``training`` mode, so
    the caller puts the checkpointed text-encoder layers in training mode (see
    :func:`checkpointed_text_layers`); that requires attention dropout 0 (CLIP's default), so the
    frozen encoder computes exactly what it computes in eval mode. A T5 encoder (SD3's ``text_encoder_3``)
    has dropout in every layer (``dropout_rate``) and is not checkpointed (it stays in eval mode).
    ``unet``: the denoiser (a UNet or an MMDiT: diffusers' switch is the same).
    """
    unet.enable_gradient_checkpointing()
    text_encoders = tuple(e for e in text_encoders
                          if not float(getattr(getattr(e, "config", None), "dropout_rate", 0.0) or 0.0))
    for text_encoder in text_encoders:
        dropout = float(getattr(getattr(text_encoder, "config", None), "attention_dropout", 0.0) or 0.0)
        if dropout:
            raise ValueError(
                f"model.gradient_checkpointing needs the text encoder's attention_dropout to be 0 (got {dropout}): "
                "transformers checkpoints only layers in training mode, where dropout would change the encoding"
            )
    for text_encoder in text_encoders:
        enable = getattr(text_encoder, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:  # transformers < 5
            text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def checkpointed_text_layers(*text_encoders: nn.Module) -> list[nn.Module]:
    """The text-encoder layers transformers checkpoints (its ``GradientCheckpointingLayer`` s, switched on)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for text_encoder in text_encoders for m in text_encoder.modules()
            if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]


def compile_unet(unet: nn.Module, **kwargs) -> Callable:
    """``torch.compile`` of the UNet's forward, for training calls (the module itself is untouched)."""
    return torch.compile(unet, **kwargs)
