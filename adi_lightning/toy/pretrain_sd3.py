"""Pretrain a toy Stable Diffusion 3 pipeline (MMDiT, CLIP-L + CLIP-G, no T5) on ToyActionWorld renders.

The SD3 counterpart of :mod:`adi_lightning.toy.pretrain` (same world, renders, held-out pairs,
captions, EMA, budget, atomic checkpoints and ``toy_pretrain.json``), for the same reason: ADI learns
against a frozen backbone that must already draw every toy subject doing every toy action. Recipe:

1. render ``num_images`` world samples once (held-out subject x action pairs never appear);
2. a NEW 16-channel VAE (SD3's latent width; the shipped toy VAE has 4 channels, which an
   ``SD3Transformer2DModel`` of SD3's shape cannot read), trained as the UNet recipe's
   (:func:`~adi_lightning.toy.pretrain.train_vae`); every render is encoded once, and SD3's two latent
   constants are set from the cached posterior means: ``shift_factor`` = their mean, ``scaling_factor``
   = 1 / their std after the shift (SD3 decodes ``latents / scaling_factor + shift_factor``);
3. MMDiT and both CLIP encoders trained jointly by rectified flow (Esser et al. 2024):
   ``z = (1 - sigma) x + sigma n``, target ``n - x``, flow time drawn by ``time_sampling``
   (SD3's ``logit_normal`` by default, or the project's densities, :mod:`adi_lightning.flow_matching`),
   shifted by the scheduler's ``shift`` (saved in the scheduler, so training and sampling agree; 1.0 for
   this toy, :data:`TOY_SHIFT`), loss
   weight ``loss_weighting`` (1 by default); 10% empty captions (encoded, as SD3 encodes ``""``), AdamW,
   warmup + cosine decay over the wall-time or step budget, EMA weights saved.

No T5: it alone would be most of the size budget (issue 25: 15 MB of safetensors for this folder),
SD3 runs without it (``text_encoder_3=None``: the pipeline feeds 256 zero tokens in its place), and
ToyActionWorld's short captions need no long-prompt encoder. The saved folder lists ``text_encoder_3``
and ``tokenizer_3`` as null; :func:`adi_lightning.backbone.load_backbone` passes them as None.

Those 256 zero tokens are identical at every layer (the ``context_embedder`` maps each to its bias, no
position is added to the text stream, every op on it is per token), so attending to them equals
attending to ONE such token whose attention logit is raised by ``log 256``. Training uses that
(:class:`CollapsedPadJointAttnProcessor`): 77 + 1 context tokens instead of 77 + 256, exactly the
function the stock pipeline computes, at a fraction of the cost.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..families.sd3 import MAX_SEQUENCE_LENGTH
from ..flow_matching import (
    FLOW_LOSS_WEIGHTINGS, FLOW_TIME_SAMPLINGS, flow_loss_weighting, flow_matching_target, flow_noisy_latents,
    flow_timesteps, sample_flow_time, shift_sigma,
)
from ..tiny.sd3 import build_tiny_sd3_pipeline
from .pretrain import TOY_WORDS, _EMA, _log, _to_tensor, encode_all, save_pipeline_atomic, train_vae
from .world import HELD_OUT, ToyActionWorld, caption, render

#: Issue 25's budget for this folder's safetensors (fp32 weights), in bytes.
MAX_ASSET_BYTES = 15 * 10**6
NUM_TRAIN_TIMESTEPS = 1000
#: The toy's flow-time shift. SD3's 3.0 is set for 1024 px images (4096 image tokens); the shift that suits
#: an image grows with its token count (FLUX computes it from the count), and this toy has 64. Under
#: logit-normal times, shift 3.0 puts 2.6% of the training draws below sigma 0.3, where a figure's details
#: form, and shift 1.0 puts 20% there (docs/method.md "A toy SD3 backbone" has what each drew).
TOY_SHIFT = 1.0
PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2")


@dataclass
class PretrainSD3Config:
    """Every knob of a toy SD3 pretraining run (saved into ``toy_pretrain.json``)."""

    size: int = 32
    seed: int = 0
    num_images: int = 16000
    minutes: float = 100.0  # wall-time budget of the transformer phase (the run stops at whichever comes first)
    steps: int = 100000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 200
    p_uncond: float = 0.1
    time_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    loss_weighting: str = "none"
    shift: float = TOY_SHIFT  # the scheduler's static time shift, saved with it
    ema: float = 0.998
    vae_steps: int = 500
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_channels: tuple = (32, 64)  # 2x down: a 16 x 16 x 16 latent at 32 px, 8 x 8 = 64 image tokens (patch 2)
    joint_blocks: int = 6
    heads: int = 4
    head_dim: int = 24  # MMDiT stream width = heads * head_dim
    clip_widths: tuple = (64, 96)  # CLIP-L, CLIP-G (projection widths equal, as SD3's)
    text_layers: int = 2
    text_heads: int = 4
    zero_init: bool = True  # adaLN-Zero (zero_init_adaln) for a fresh MMDiT
    log_every: int = 50
    checkpoint_minutes: float = 10.0
    max_asset_bytes: int = MAX_ASSET_BYTES
    held_out: list = field(default_factory=lambda: [list(p) for p in HELD_OUT])
    init: str | None = None  # continue from this toy SD3 folder (its VAE constants kept when vae_steps == 0)

    def __post_init__(self):
        if self.time_sampling not in FLOW_TIME_SAMPLINGS:
            raise ValueError(f"time_sampling must be one of {', '.join(FLOW_TIME_SAMPLINGS)}, "
                             f"got {self.time_sampling!r}")
        if self.loss_weighting not in FLOW_LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting must be one of {', '.join(FLOW_LOSS_WEIGHTINGS)}, "
                             f"got {self.loss_weighting!r}")


class CollapsedPadJointAttnProcessor:
    """SD3's joint attention (as diffusers' ``JointAttnProcessor2_0``) where the LAST context token
    stands for ``count`` identical tokens: its key's attention logit gets ``+ log(count)``, so every
    query weighs it as ``count`` copies (softmax: ``count * e^s = e^(s + log count)``).

    Exact for SD3 without T5: its 256 zero T5 tokens stay identical through every joint block (see the
    module docstring). Shapes: ``hidden_states [N, L, W]``, ``encoder_hidden_states [N, S, W]`` (the
    collapsed token last); an image-only attention (``encoder_hidden_states`` None) is plain attention.
    """

    def __init__(self, count: int = MAX_SEQUENCE_LENGTH):
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        self.log_count = math.log(count)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        n, length = hidden_states.shape[:2]

        def heads(x):
            return x.view(n, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        query, key, value = (heads(proj(hidden_states)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        bias = None
        if encoder_hidden_states is not None:
            c_query = heads(attn.add_q_proj(encoder_hidden_states))
            c_key = heads(attn.add_k_proj(encoder_hidden_states))
            c_value = heads(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                c_query = attn.norm_added_q(c_query)
            if attn.norm_added_k is not None:
                c_key = attn.norm_added_k(c_key)
            query, key, value = (torch.cat(pair, dim=2) for pair in ((query, c_query), (key, c_key), (value, c_value)))
            bias = torch.zeros(1, key.shape[2], dtype=query.dtype, device=query.device)  # [queries (bcast), keys]
            bias[:, -1] = self.log_count
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(n, -1, attn.heads * out.shape[-1]).to(query.dtype)
        if encoder_hidden_states is None:
            return attn.to_out[1](attn.to_out[0](out))
        out, context = out[:, :length], out[:, length:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        return attn.to_out[1](attn.to_out[0](out)), context


def clip_context(text_encoder, text_encoder_2, ids: torch.Tensor, ids_2: torch.Tensor,
                 joint_attention_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The CLIP part of ``StableDiffusion3Pipeline.encode_prompt``: ``(context [N, 77, J], pooled [N, P1 + P2])``
    from CLIP-L / CLIP-G ids ``[N, 77]``: penultimate hidden states concatenated on channels, zero-padded
    to ``joint_attention_dim`` J; both projected ``text_embeds`` concatenated. ValueError when the CLIP
    widths exceed J."""
    out = text_encoder(ids, output_hidden_states=True)
    out_2 = text_encoder_2(ids_2, output_hidden_states=True)
    clip = torch.cat([out.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
    if clip.shape[-1] > joint_attention_dim:
        raise ValueError(f"CLIP widths {clip.shape[-1]} exceed joint_attention_dim {joint_attention_dim}")
    return F.pad(clip, (0, joint_attention_dim - clip.shape[-1])), torch.cat([out.text_embeds, out_2.text_embeds], -1)


def with_collapsed_pad(context: torch.Tensor) -> torch.Tensor:
    """``[N, 77, J]`` -> ``[N, 78, J]``: one zero token standing for the pipeline's 256 zero T5 tokens
    (read by :class:`CollapsedPadJointAttnProcessor`)."""
    return torch.cat([context, context.new_zeros(context.shape[0], 1, context.shape[2])], dim=1)


def zero_init_adaln(transformer) -> None:
    """adaLN-Zero (Peebles & Xie 2023, DiT): zero every joint block's ``AdaLayerNormZero`` modulation
    (so its gates start at 0 and each block starts as the identity), the output modulation
    (``norm_out.linear``) and ``proj_out`` (so the first prediction is 0). In place."""
    from diffusers.models.normalization import AdaLayerNormZero

    layers = [m.linear for m in transformer.modules() if isinstance(m, AdaLayerNormZero)]
    for layer in (*layers, transformer.norm_out.linear, transformer.proj_out):
        torch.nn.init.zeros_(layer.weight)
        if layer.bias is not None:
            torch.nn.init.zeros_(layer.bias)


def _build_pipeline(cfg: PretrainSD3Config, scratch: Path):
    from diffusers import StableDiffusion3Pipeline

    width = cfg.heads * cfg.head_dim
    build_tiny_sd3_pipeline(
        scratch, words=TOY_WORDS, seed=cfg.seed, with_t5=False, text_widths=tuple(cfg.clip_widths),
        projection_dims=tuple(cfg.clip_widths), t5_width=sum(cfg.clip_widths), sample_size=cfg.size,
        num_layers=cfg.joint_blocks, attention_heads=cfg.heads, attention_head_dim=cfg.head_dim,
        vae_channels=cfg.vae_channels, text_layers=cfg.text_layers, text_heads=cfg.text_heads, shift=cfg.shift,
    )
    pipe = StableDiffusion3Pipeline.from_pretrained(scratch, text_encoder_3=None, tokenizer_3=None,
                                                    low_cpu_mem_usage=False)
    assert pipe.transformer.config.caption_projection_dim == width
    if cfg.zero_init:
        zero_init_adaln(pipe.transformer)
    return pipe


def parameter_counts(pipe) -> dict[str, int]:
    """Parameters of each saved part (``transformer``, ``vae``, ``text_encoder``, ``text_encoder_2``)."""
    return {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in PARTS}


def asset_bytes(pipe) -> int:
    """Bytes of the saved parts' state dicts (parameters and persistent buffers such as the MMDiT's
    position table): what ``save_pretrained`` writes as safetensors, less a few KB of headers."""
    return sum(t.numel() * t.element_size() for name in PARTS for t in getattr(pipe, name).state_dict().values())


def estimate(cfg: PretrainSD3Config | None = None) -> dict:
    """``{"parameters": {part: count}, "bytes": weight bytes, "max_bytes": cfg.max_asset_bytes}`` of the
    pipeline ``cfg`` builds (built in a temp folder, then removed)."""
    cfg = cfg or PretrainSD3Config()
    with tempfile.TemporaryDirectory(prefix="toy-sd3-estimate-") as tmp:
        pipe = _build_pipeline(cfg, Path(tmp) / "pipe")
        return {"parameters": parameter_counts(pipe), "bytes": asset_bytes(pipe), "max_bytes": cfg.max_asset_bytes}


def pretrain_sd3(out: str | Path, cfg: PretrainSD3Config | None = None) -> Path:
    """Run the whole recipe and write a ``StableDiffusion3Pipeline`` folder (no T5) at ``out``; returns it.

    ValueError before any training when the weights would exceed ``cfg.max_asset_bytes``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    cfg = cfg or PretrainSD3Config()
    out = Path(out)
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    if cfg.init:
        pipe = StableDiffusion3Pipeline.from_pretrained(cfg.init, text_encoder_3=None, tokenizer_3=None,
                                                        low_cpu_mem_usage=False)
    else:
        scratch = out.with_name(f".{out.name}.init-{time.time_ns()}")
        try:
            pipe = _build_pipeline(cfg, scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    counts = parameter_counts(pipe)
    size = asset_bytes(pipe)
    _log(t0, "built: " + ", ".join(f"{k} {v / 1e6:.3f}M" for k, v in counts.items())
         + f" params; {size / 1e6:.2f} MB of safetensors (budget {cfg.max_asset_bytes / 1e6:.1f} MB)")
    if size > cfg.max_asset_bytes:
        raise ValueError(f"the toy SD3 weights would take {size / 1e6:.2f} MB, over the "
                         f"{cfg.max_asset_bytes / 1e6:.1f} MB budget (issue 25): use fewer joint blocks or narrower "
                         "widths, or raise max_asset_bytes")
    tok, tok_2, vae = pipe.tokenizer, pipe.tokenizer_2, pipe.vae
    transformer, text_encoder, text_encoder_2 = pipe.transformer, pipe.text_encoder, pipe.text_encoder_2

    world = ToyActionWorld(cfg.size, seed=cfg.seed, held_out=[tuple(p) for p in cfg.held_out])
    specs = [world.sample_spec() for _ in range(cfg.num_images)]
    images = _to_tensor(render(s, cfg.size) for s in specs)
    _log(t0, f"rendered {len(specs)} images ({len(world.combos)} seen subject x action pairs, "
             f"{len(world.held_out)} held out)")
    if cfg.vae_steps > 0:
        train_vae(vae, images, cfg, t0)
    vae.eval().requires_grad_(False)
    means, stds = encode_all(vae, images)
    if cfg.init and cfg.vae_steps == 0:  # the transformer was trained with these
        shift_factor, scaling = float(vae.config.shift_factor), float(vae.config.scaling_factor)
    else:
        shift_factor = float(means.float().mean())
        scaling = float(1.0 / (means.float() - shift_factor).std())
    vae.register_to_config(shift_factor=shift_factor, scaling_factor=scaling)
    _log(t0, f"encoded latents {tuple(means.shape)}, shift_factor {shift_factor:.4f}, scaling_factor {scaling:.4f}")
    del images

    info = dict(config={k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()},
                family="sd3", held_out=cfg.held_out, steps=0, parameters=counts, weight_bytes=size,
                vae_shift_factor=shift_factor, vae_scaling_factor=scaling, history=[])
    if cfg.init and (Path(cfg.init) / "toy_pretrain.json").is_file():  # keep the provenance chain
        before = json.loads((Path(cfg.init) / "toy_pretrain.json").read_text())
        info["history"] = before.pop("history", []) + [before]

    ema = {name: _EMA(module, cfg.ema) for name, module in
           (("transformer", transformer), ("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2))}

    def checkpoint(step: int, losses: list[float], final: bool = False) -> None:
        info.update(steps=step, minutes=round((time.time() - t0) / 60, 2), final=final,
                    loss_last_500=float(np.mean(losses[-500:])) if losses else None)
        ckpt = StableDiffusion3Pipeline(
            transformer=ema["transformer"].shadow, vae=vae,
            scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=cfg.shift),
            text_encoder=ema["text_encoder"].shadow, tokenizer=tok,
            text_encoder_2=ema["text_encoder_2"].shadow, tokenizer_2=tok_2, text_encoder_3=None, tokenizer_3=None)
        save_pipeline_atomic(ckpt, out, info)
        _log(t0, f"saved {'final' if final else 'checkpoint'} pipeline at step {step} -> {out}")

    checkpoint(0, [])
    last_ckpt = [time.time()]

    def after_step(step: int, losses: list[float]) -> None:
        ema["transformer"].update(transformer, step)
        ema["text_encoder"].update(text_encoder, step)
        ema["text_encoder_2"].update(text_encoder_2, step)
        if time.time() - last_ckpt[0] > cfg.checkpoint_minutes * 60:
            checkpoint(step, losses)
            last_ckpt[0] = time.time()

    step, losses = train_transformer(cfg, pipe, means, stds, specs, shift_factor, scaling, t0, after_step)
    checkpoint(step, losses, final=True)
    return out


def train_transformer(cfg: PretrainSD3Config, pipe, means, stds, specs, shift_factor: float, scaling: float,
                      t0: float, after_step) -> tuple[int, list[float]]:
    """The rectified-flow phase: MMDiT and both CLIP encoders, until ``cfg.steps`` or ``cfg.minutes``.

    ``means``/``stds``: cached VAE posterior ``[num_images, 16, h, w]`` (fp16); ``after_step(step, losses)``
    runs after each optimizer step (EMA, checkpoints). Returns ``(steps done, per-step losses)``.
    """
    tok, tok_2 = pipe.tokenizer, pipe.tokenizer_2
    transformer, text_encoder, text_encoder_2 = pipe.transformer, pipe.text_encoder, pipe.text_encoder_2
    joint = transformer.config.joint_attention_dim
    processors = transformer.attn_processors
    transformer.set_attn_processor(CollapsedPadJointAttnProcessor(MAX_SEQUENCE_LENGTH))
    modules = (transformer, text_encoder, text_encoder_2)
    for module in modules:
        module.train().requires_grad_(True)
    params = [p for module in modules for p in module.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    cap_rng = random.Random(cfg.seed + 3)
    budget = cfg.minutes * 60
    t_start = time.time()
    losses: list[float] = []
    step = 0
    try:
        while step < cfg.steps and time.time() - t_start < budget:
            step += 1
            progress = max(step / cfg.steps, (time.time() - t_start) / budget)
            cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
            lr = cfg.lr * min(1.0, step / cfg.warmup) * (0.05 + 0.95 * cosine)
            for g in opt.param_groups:
                g["lr"] = lr
            idx = torch.randint(0, len(specs), (cfg.batch_size,), generator=gen)
            sample = means[idx].float() + stds[idx].float() * torch.randn(means[idx].shape, generator=gen)
            latents = (sample - shift_factor) * scaling
            texts = ["" if cap_rng.random() < cfg.p_uncond else caption(specs[i], cap_rng) for i in idx.tolist()]
            ids, ids_2 = (t(texts, padding="max_length", max_length=t.model_max_length, truncation=True,
                            return_tensors="pt").input_ids for t in (tok, tok_2))
            context, pooled = clip_context(text_encoder, text_encoder_2, ids, ids_2, joint)
            u = torch.cat([sample_flow_time(gen, cfg.time_sampling, None, cfg.logit_mean, cfg.logit_std)
                           for _ in range(cfg.batch_size)])
            sigmas = shift_sigma(u, cfg.shift).float()
            noise = torch.randn(latents.shape, generator=gen)
            pred = transformer(hidden_states=flow_noisy_latents(latents, noise, sigmas),
                               encoder_hidden_states=with_collapsed_pad(context), pooled_projections=pooled,
                               timestep=flow_timesteps(sigmas, NUM_TRAIN_TIMESTEPS)).sample
            per_sample = (pred - flow_matching_target(latents, noise)).pow(2).mean(dim=(1, 2, 3))
            loss = (flow_loss_weighting(sigmas, cfg.loss_weighting) * per_sample).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(loss.item())
            after_step(step, losses)
            if step % cfg.log_every == 0:
                elapsed = time.time() - t_start
                done = max(step / cfg.steps, elapsed / budget)
                _log(t0, f"step {step} loss {np.mean(losses[-cfg.log_every:]):.4f} lr {lr:.2e} "
                         f"({step / elapsed:.2f} it/s x batch {cfg.batch_size}; "
                         f"ETA {elapsed * (1 - done) / max(done, 1e-9) / 60:.1f} min)")
    finally:
        transformer.set_attn_processor(processors)
        for module in modules:
            module.eval().requires_grad_(False)
    return step, losses
