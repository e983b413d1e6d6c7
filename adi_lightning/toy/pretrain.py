"""Pretrain the toy Stable Diffusion pipeline on ToyActionWorld renders (CPU, under an hour).

Why: ADI learns an identifier against a *frozen* backbone, so the toy backbone must already
render every toy subject doing every toy action from text, with classifier-free guidance, like
real SD does. Recipe (chosen for a 2-core CPU budget):

1. render ``num_images`` world samples once (held-out subject x action pairs never appear);
2. train the small VAE briefly (reconstruction + tiny KL), encode every render once and set
   ``scaling_factor`` to 1 / latent std, so diffusion trains on cached latents (no VAE per step);
3. train UNet and text encoder jointly: epsilon MSE with min-SNR-5 weighting, 10% empty
   captions (so CFG works), AdamW, warmup + cosine decay over the wall-time or step budget,
   EMA weights saved. Captions are re-drawn every step (optional colour / pattern / scene words,
   ``person`` for human subjects), so the text pathway learns every word and their absence.

The folder is written atomically (temp sibling + rename) at every checkpoint and at the end, with
``toy_pretrain.json`` (config, held-out pairs, steps, wall time, losses) beside the weights.
"""

from __future__ import annotations

import copy
import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..io import atomic_dir
from ..tiny.pipeline import DEFAULT_WORDS, SD_SCHEDULER, build_tiny_pipeline
from .world import HELD_OUT, WORDS, ToyActionWorld, caption, render

TOY_WORDS = tuple(dict.fromkeys((*DEFAULT_WORDS, *WORDS)))  # ADI template words + world words


@dataclass
class PretrainConfig:
    """Every knob of a pretraining run (saved into ``toy_pretrain.json``)."""

    size: int = 32
    seed: int = 0
    num_images: int = 16000
    minutes: float = 45.0  # wall-time budget of the UNet phase (the run stops at whichever comes first)
    steps: int = 100000
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 200
    p_uncond: float = 0.1
    min_snr: float = 5.0
    ema: float = 0.998
    vae_steps: int = 500
    vae_batch: int = 32
    vae_lr: float = 1e-3
    unet_channels: tuple = (32, 64, 64, 64)
    vae_channels: tuple = (32, 64)
    text_dim: int = 64
    text_layers: int = 2
    attention_heads: int = 4
    layers_per_block: int = 2
    log_every: int = 50
    checkpoint_minutes: float = 10.0
    held_out: list = field(default_factory=lambda: [list(p) for p in HELD_OUT])
    init: str | None = None  # start from this pipeline folder (its VAE, tokenizer, UNet, text encoder)
    ranks: int = 1  # data-parallel CPU processes of one thread each (batch_size is per rank)


def _log(t0: float, msg: str) -> None:
    print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True)


def _to_tensor(images) -> torch.Tensor:
    arr = np.stack([np.asarray(im, dtype=np.uint8) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()  # uint8 [N, 3, H, W]


def to_unit(x_uint8: torch.Tensor) -> torch.Tensor:
    return x_uint8.float() / 127.5 - 1.0


def save_pipeline_atomic(pipe, out: Path, info: dict) -> None:
    """``save_pretrained`` into a temp sibling, then swap it into place (never a half folder)."""
    with atomic_dir(out, "toy pipeline") as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "toy_pretrain.json").write_text(json.dumps(info, indent=2) + "\n")


def _build_parts(cfg: PretrainConfig, scratch: Path):
    from diffusers import StableDiffusionPipeline

    build_tiny_pipeline(
        scratch, words=TOY_WORDS, seed=cfg.seed, cross_attention_dim=cfg.text_dim, sample_size=cfg.size,
        layers_per_block=cfg.layers_per_block, unet_channels=cfg.unet_channels, vae_channels=cfg.vae_channels,
        attention_heads=cfg.attention_heads, text_layers=cfg.text_layers, text_heads=4,
    )
    return StableDiffusionPipeline.from_pretrained(scratch, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False, low_cpu_mem_usage=False)


def train_vae(vae, images: torch.Tensor, cfg: PretrainConfig, t0: float) -> None:
    """Reconstruction (MSE + L1) with a tiny KL so latents stay smooth; a few hundred steps suffice at 32 px."""
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    for step in range(1, cfg.vae_steps + 1):
        idx = torch.randint(0, len(images), (cfg.vae_batch,), generator=gen)
        x = to_unit(images[idx])
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=gen)).sample
        loss = F.mse_loss(rec, x) + 0.1 * F.l1_loss(rec, x) + 1e-7 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % cfg.log_every == 0 or step == cfg.vae_steps:
            _log(t0, f"vae step {step}/{cfg.vae_steps} loss {loss.item():.4f}")
    vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_all(vae, images: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, len(images), batch):
        post = vae.encode(to_unit(images[i:i + batch])).latent_dist
        means.append(post.mean.half())
        stds.append(post.std.half())
    return torch.cat(means), torch.cat(stds)


class _EMA:
    def __init__(self, module, decay: float):
        self.decay = decay
        self.shadow = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for s, p in zip(self.shadow.parameters(), module.parameters()):
            s.lerp_(p.detach(), 1 - d)


def pretrain(out: str | Path, cfg: PretrainConfig | None = None) -> Path:
    """Run the whole recipe and write a diffusers pipeline folder at ``out``; returns it."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    cfg = cfg or PretrainConfig()
    out = Path(out)
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    if cfg.init:  # continue from a pipeline folder (e.g. a checkpoint): keeps its VAE scaling factor
        pipe = StableDiffusionPipeline.from_pretrained(cfg.init, safety_checker=None, feature_extractor=None,
                                                       requires_safety_checker=False, low_cpu_mem_usage=False)
    else:
        scratch = out.with_name(f".{out.name}.init-{time.time_ns()}")
        try:
            pipe = _build_parts(cfg, scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    tok, text_encoder, vae, unet = pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet
    n_unet = sum(p.numel() for p in unet.parameters())
    _log(t0, f"built: unet {n_unet / 1e6:.2f}M params, {len(tok)} tokens, D={cfg.text_dim}")

    world = ToyActionWorld(cfg.size, seed=cfg.seed, held_out=[tuple(p) for p in cfg.held_out])
    specs = [world.sample_spec() for _ in range(cfg.num_images)]
    images = _to_tensor(render(s, cfg.size) for s in specs)
    _log(t0, f"rendered {len(specs)} images ({len(world.combos)} seen subject x action pairs, "
             f"{len(world.held_out)} held out)")

    if cfg.vae_steps > 0:
        train_vae(vae, images, cfg, t0)
    vae.eval().requires_grad_(False)
    means, stds = encode_all(vae, images)
    scaling = float(1.0 / means.float().std())
    if cfg.init and cfg.vae_steps == 0:
        scaling = float(vae.config.scaling_factor)  # the UNet was trained with it
    vae.register_to_config(scaling_factor=scaling)
    _log(t0, f"encoded latents {tuple(means.shape)}, scaling_factor {scaling:.4f}")
    del images

    info = dict(config={k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()},
                held_out=cfg.held_out, steps=0, vae_scaling_factor=scaling, history=[])
    if cfg.init and (Path(cfg.init) / "toy_pretrain.json").is_file():  # keep the provenance chain
        before = json.loads((Path(cfg.init) / "toy_pretrain.json").read_text())
        info["history"] = before.pop("history", []) + [before]

    def checkpoint(step: int, losses: list[float], final: bool = False) -> None:
        info.update(steps=step, minutes=round((time.time() - t0) / 60, 2), final=final,
                    loss_last_500=float(np.mean(losses[-500:])) if losses else None)
        ckpt = StableDiffusionPipeline(vae=vae, text_encoder=ema_text.shadow, tokenizer=tok, unet=ema_unet.shadow,
                                       scheduler=DDIMScheduler(**SD_SCHEDULER), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        save_pipeline_atomic(ckpt, out, info)
        _log(t0, f"saved {'final' if final else 'checkpoint'} pipeline at step {step} -> {out}")

    ema_unet, ema_text = _EMA(unet, cfg.ema), _EMA(text_encoder, cfg.ema)
    checkpoint(0, [])  # also the folder the other ranks load their starting weights from
    workers = []
    if cfg.ranks > 1:
        import socket

        import torch.multiprocessing as mp

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        ctx = mp.get_context("spawn")
        for rank in range(1, cfg.ranks):
            w = ctx.Process(target=_worker, args=(rank, cfg, str(out), means, stds, specs, scaling, port, t0))
            w.start()
            workers.append(w)
        _init_dist(0, cfg.ranks, port)
    last_ckpt = [time.time()]

    def after_step(step: int, losses: list[float]) -> None:
        ema_unet.update(unet, step)
        ema_text.update(text_encoder, step)
        if time.time() - last_ckpt[0] > cfg.checkpoint_minutes * 60:
            checkpoint(step, losses)
            last_ckpt[0] = time.time()

    try:
        step, losses = train_unet(0, cfg, unet, text_encoder, tok, means, stds, specs, scaling, t0, after_step)
        checkpoint(step, losses, final=True)
    finally:
        if cfg.ranks > 1:
            torch.distributed.destroy_process_group()
        for w in workers:
            w.join(timeout=60)
    return out


def _init_dist(rank: int, world: int, port: int) -> None:
    from datetime import timedelta

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world, timeout=timedelta(minutes=5))


def _worker(rank, cfg, folder, means, stds, specs, scaling, port, t0) -> None:
    """Rank >= 1 of a data-parallel run: one thread each (no OpenMP barriers across busy cores)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    _init_dist(rank, cfg.ranks, port)
    folder = Path(folder)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")
    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    try:
        train_unet(rank, cfg, unet, text_encoder, tok, means, stds, specs, scaling, t0, None)
    finally:
        torch.distributed.destroy_process_group()


def train_unet(rank, cfg, unet, text_encoder, tok, means, stds, specs, scaling, t0, after_step):
    """The diffusion phase; with ``cfg.ranks > 1`` gradients are averaged over ranks (gloo), and
    rank 0 decides the schedule and when to stop (so every rank applies identical updates)."""
    from diffusers import DDPMScheduler

    world = cfg.ranks
    noise_sched = DDPMScheduler(**{k: v for k, v in SD_SCHEDULER.items() if k != "set_alpha_to_one"})
    alphas = noise_sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    weight = torch.clamp(snr, max=cfg.min_snr) / snr  # min-SNR-gamma for epsilon prediction
    unet.train().requires_grad_(True)
    text_encoder.train().requires_grad_(True)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    if world > 1:
        for p in params:
            torch.distributed.broadcast(p.data, 0)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(cfg.seed + 2 + 1000 * rank)
    cap_rng = random.Random(cfg.seed + 3 + 1000 * rank)
    budget = cfg.minutes * 60
    t_unet = time.time()
    losses: list[float] = []
    step = 0
    while True:
        ctrl = torch.tensor([float(step >= cfg.steps or time.time() - t_unet >= budget),
                             max((step + 1) / cfg.steps, (time.time() - t_unet) / budget)], dtype=torch.float64)
        if world > 1:
            torch.distributed.broadcast(ctrl, 0)
        if ctrl[0] > 0:
            break
        step += 1
        lr = cfg.lr * min(1.0, step / cfg.warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(float(ctrl[1]), 1.0))))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, len(specs), (cfg.batch_size,), generator=gen)
        lat = (means[idx].float() + stds[idx].float() * torch.randn(means[idx].shape, generator=gen)) * scaling
        texts = ["" if cap_rng.random() < cfg.p_uncond else caption(specs[i], cap_rng) for i in idx.tolist()]
        ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        noise = torch.randn(lat.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (cfg.batch_size,), generator=gen)
        noisy = noise_sched.add_noise(lat, noise, t)
        pred = unet(noisy, t, text_encoder(ids)[0]).sample
        loss = (weight[t] * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=False)
        loss.backward()
        if world > 1:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            grads = [p.grad for p in params]
            flat = torch.cat([g.reshape(-1) for g in grads])
            torch.distributed.all_reduce(flat)
            flat /= world
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if rank == 0:
            after_step(step, losses)
            if step % cfg.log_every == 0:
                rate = step / (time.time() - t_unet)
                _log(t0, f"step {step} loss {np.mean(losses[-cfg.log_every:]):.4f} lr {lr:.2e} "
                         f"({rate:.2f} it/s x {world} rank(s) x batch {cfg.batch_size})")
    return step, losses
