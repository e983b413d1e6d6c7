"""Judges: one small CNN with a head per factor (action, subject, background, pattern, colour).

Why: the toy world's ground truth is exact, so a generated image can be scored exactly: does it
show the prompted action (action accuracy), the prompted subject (subject accuracy), and does it
carry the exemplars' background / clothing pattern / colour (context leak)? The judges are
trained on fresh renders with augmentations that mimic the tiny pipeline's output (a round trip
through its VAE, blur, noise, colour shifts, small shifts), so that they judge generated images
by what they show, not by rendering artefacts. One shared trunk keeps training cheap on a CPU.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from ..io import atomic_save_safetensors, atomic_write_json
from .world import ACTIONS, BACKGROUNDS, COLOURS, PATTERNS, SUBJECTS, ToyActionWorld, render

HEADS = {"action": ACTIONS, "subject": SUBJECTS, "background": tuple(BACKGROUNDS),
         "pattern": PATTERNS, "colour": tuple(COLOURS)}
JUDGES_FILE = "judges.safetensors"
SIZE = 32


class JudgeNet(nn.Module):
    """Conv trunk (32 px -> 4x4) + global average pool + one linear head per factor."""

    def __init__(self, heads: dict[str, int], width: int = 32):
        super().__init__()

        def block(cin, cout, n):
            layers = []
            for i in range(n):
                layers += [nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
            return layers + [nn.MaxPool2d(2)]

        self.trunk = nn.Sequential(*block(3, width, 1), *block(width, 2 * width, 2), *block(2 * width, 4 * width, 2),
                                   nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.1))
        self.heads = nn.ModuleDict({k: nn.Linear(4 * width, n) for k, n in heads.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(x)
        return {k: head(h) for k, head in self.heads.items()}


def images_to_tensor(images, size: int = SIZE) -> torch.Tensor:
    """PIL images -> ``[N, 3, size, size]`` in [-1, 1] (bicubic resize when needed)."""
    arrs = []
    for im in images:
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BICUBIC)
        arrs.append(np.asarray(im, dtype=np.float32))
    return torch.from_numpy(np.stack(arrs) / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous().float()


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = 2
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).to(x)
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


@torch.no_grad()
def vae_round_trip(x: torch.Tensor, vae, gen: torch.Generator, batch: int = 250) -> torch.Tensor:
    """Encode (posterior sample) and decode: the blur and colour drift of the pipeline's VAE."""
    outs = []
    for i in range(0, len(x), batch):
        post = vae.encode(x[i:i + batch]).latent_dist
        outs.append(vae.decode(post.sample(generator=gen)).sample.clamp(-1, 1))
    return torch.cat(outs)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """What the pipeline does to images besides the VAE: blur, noise, colour and position shifts."""
    n = len(x)
    x = x.clone()
    if torch.rand(1, generator=gen).item() < 0.5:
        half = n // 2
        x[:half] = _gaussian_blur(x[:half], 0.3 + 0.7 * torch.rand(1, generator=gen).item())
    flip = torch.rand(n, generator=gen) < 0.5
    x[flip] = x[flip].flip(-1)
    shift = torch.randint(-2, 3, (2,), generator=gen).tolist()
    x = torch.roll(F.pad(x, (2, 2, 2, 2), mode="replicate"), shifts=shift, dims=(2, 3))[:, :, 2:-2, 2:-2]
    contrast = 1 + 0.15 * (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1)
    offset = 0.08 * (torch.rand(n, 3, 1, 1, generator=gen) * 2 - 1)
    x = x * contrast + offset
    x = x + torch.randn(x.shape, generator=gen) * 0.08 * torch.rand(n, 1, 1, 1, generator=gen)
    return x.clamp(-1, 1)


def render_labelled(n: int, seed: int, size: int = SIZE) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``n`` renders of every subject x action (none held out) with their factor labels."""
    world = ToyActionWorld(size, seed=seed, held_out=())
    specs = [world.sample_spec() for _ in range(n)]
    x = images_to_tensor([render(s, size) for s in specs], size)
    labels = {k: torch.tensor([names.index(getattr(s, k)) for s in specs]) for k, names in HEADS.items()}
    return x, labels


@torch.no_grad()
def accuracy(net: nn.Module, x: torch.Tensor, labels: dict[str, torch.Tensor], batch: int = 500) -> dict[str, float]:
    net.eval()
    outs = [net(x[i:i + batch]) for i in range(0, len(x), batch)]
    return {k: float((torch.cat([o[k] for o in outs]).argmax(1) == labels[k]).float().mean()) for k in HEADS}


def train_judges(out: str | Path, pipeline: str | Path | None = None, steps: int = 3000, seed: int = 0,
                 minutes: float = 15.0, num_images: int = 20000, batch: int = 128, lr: float = 2e-3,
                 eval_images: int = 2000, vae_fraction: float = 0.3) -> dict:
    """Train, evaluate on fresh renders (new seeds), write ``out/judges.safetensors`` + ``judges.json``."""
    t0 = time.time()

    def log(msg):
        print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True)

    torch.manual_seed(seed)
    vae = None
    if pipeline is not None:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(Path(pipeline) / "vae").eval().requires_grad_(False)
    x, labels = render_labelled(num_images, seed=10_000 + seed)
    log(f"rendered {num_images} training images")
    gen = torch.Generator().manual_seed(seed)
    if vae is not None:  # a pool of VAE round trips (cheaper than one per step)
        k = int(num_images * vae_fraction)
        x = torch.cat([x, vae_round_trip(x[:k], vae, gen)])
        labels = {h: torch.cat([v, v[:k]]) for h, v in labels.items()}
        log(f"added {k} VAE round trips")
    net = JudgeNet({k: len(v) for k, v in HEADS.items()})
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    step = 0
    while step < steps and time.time() - t0 < minutes * 60:
        step += 1
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, step / 100) * (0.05 + 0.95 * (1 - min(1.0, max(step / steps, (time.time() - t0) / (minutes * 60)))))
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        net.train()
        logits = net(augment(x[idx], gen))
        loss = sum(F.cross_entropy(logits[k], labels[k][idx], label_smoothing=0.05) for k in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0:
            log(f"judges step {step} loss {loss.item():.3f}")
    xe, le = render_labelled(eval_images, seed=20_000 + seed)
    clean = accuracy(net, xe, le)
    report = {"steps": step, "minutes": round((time.time() - t0) / 60, 2), "eval_images": eval_images,
              "eval_seed": 20_000 + seed, "accuracy_fresh_renders": clean}
    if vae is not None:
        report["accuracy_fresh_renders_vae_roundtrip"] = accuracy(net, vae_round_trip(xe, vae, torch.Generator().manual_seed(1)), le)
    log(f"fresh-render accuracy: {json.dumps(report['accuracy_fresh_renders'])}")
    out = Path(out)
    meta = {"heads": json.dumps({k: list(v) for k, v in HEADS.items()}), "size": str(SIZE), "width": "32",
            "report": json.dumps(report)}
    atomic_save_safetensors({k: v.contiguous() for k, v in net.state_dict().items()}, out / JUDGES_FILE, meta)
    atomic_write_json(out / "judges.json", report)
    for f in (out / JUDGES_FILE, out / "judges.json"):
        f.chmod(0o644)  # temp files are created 0600; shipped assets must be world-readable
    log(f"wrote {out / JUDGES_FILE}")
    return report


class ToyJudges:
    """Load the shipped judges and label images: ``predict(images) -> {"action": [...], ...}``."""

    def __init__(self, path: str | Path | None = None):
        from safetensors import safe_open
        from safetensors.torch import load_file

        from . import toy_judges_path

        path = Path(path or toy_judges_path())
        file = path / JUDGES_FILE if path.is_dir() else path
        with safe_open(str(file), "pt") as f:
            meta = f.metadata()
        self.heads: dict[str, list[str]] = json.loads(meta["heads"])
        self.size = int(meta["size"])
        self.report = json.loads(meta.get("report", "{}"))
        self.net = JudgeNet({k: len(v) for k, v in self.heads.items()}, width=int(meta["width"]))
        self.net.load_state_dict(load_file(str(file)))
        self.net.eval()

    @torch.no_grad()
    def logits(self, images) -> dict[str, torch.Tensor]:
        x = images_to_tensor(images, self.size)
        outs = [self.net(x[i:i + 256]) for i in range(0, len(x), 256)]
        return {k: torch.cat([o[k] for o in outs]) for k in self.heads}

    def predict(self, images) -> dict[str, list[str]]:
        """One label per image and factor (action, subject, background, pattern, colour)."""
        return {k: [self.heads[k][i] for i in v.argmax(1).tolist()] for k, v in self.logits(images).items()}


def judge_accuracy(judges: ToyJudges, n: int = 200, seed: int = 99) -> dict[str, float]:
    """Accuracy of ``judges`` on ``n`` fresh renders (a seed the judges never trained on)."""
    world = ToyActionWorld(judges.size, seed=seed, held_out=())
    rng = random.Random(seed)
    specs = [world.sample_spec() for _ in range(n)]
    rng.shuffle(specs)
    pred = judges.predict([render(s, judges.size) for s in specs])
    return {k: float(np.mean([p == getattr(s, k) for p, s in zip(pred[k], specs)])) for k in judges.heads}
