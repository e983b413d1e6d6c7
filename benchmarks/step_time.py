"""Optimizer-step time of TI, P+ and ADI on the same pipeline and the same images per step.

Each method trains through the real path: ``ADIModule`` (+ its ``GradientMaskCallback``) and
AdamW, driven by a ``lightning.Trainer`` on an ``ActionTripleDataModule``; a timing callback
takes the time from ``on_train_batch_start`` to ``on_train_batch_end`` (forward, backward, mask,
optimizer step; the batch is already loaded) after ``--warmup`` steps. Every method runs in its
own subprocess, so peak memory is its own (CPU: peak RSS of that process; CUDA: max allocated).

Images per step are equal: ADI with ``--batch B`` triples sees 3B images; TI and P+ see 3B
anchor images. The text-encoder share is measured beside the step: the text-encoder forward and
backward of the same batch shape, timed alone.

    python benchmarks/step_time.py                       # tiny test pipeline (built in a temp dir)
    python benchmarks/step_time.py --pipeline adi_lightning/toy/assets/pipeline --resolution 64
    python benchmarks/step_time.py --sd15-shaped --resolution 64 --steps 3
    python benchmarks/step_time.py --device cuda --sd15-shaped --resolution 512 --precision bf16-mixed
    python benchmarks/step_time.py --sdxl-shaped --steps 3 --rounds 1   # TI, and P+ / ADI per row grouping
    python benchmarks/step_time.py --sdxl-shaped --text-encoders real --sdxl-dir .cache/sdxl-real --steps 2
    python benchmarks/step_time.py --pipeline <tiny SD3 folder> --resolution 32   # an MMDiT, on CPU
    python benchmarks/step_time.py --device cuda --sd15-shaped --sd3-shaped --resolution 512 --precision bf16-mixed

``--sdxl-shaped`` builds an SDXL-topology pipeline (:func:`build_sdxl_shaped`: a small UNet of SDXL
base's topology; with ``--text-encoders small`` two small text encoders, with ``real`` SDXL's
CLIP ViT-L and OpenCLIP bigG at their real sizes: up to 70 s per step and 12 GB on one CPU
thread) and runs TI and, for each ``model.row_groups`` in
``--row-groups`` (on CPU only groupings of at most 16 rows), P+ and ADI. The printed title names
the text encoders that ran, read from the pipeline folder.

``--sd3-shaped`` builds a random-weight ``StableDiffusion3Pipeline`` with SD3 Medium's config values
(:func:`build_sd3_shaped`, :data:`SD3_MEDIUM`): the MMDiT (24 joint blocks, 24 heads of 64), CLIP-L and
CLIP-G at real size, the 16-channel VAE, shift 3; T5-XXL only with ``--sd3-t5`` (4.76e9 parameters;
without it the pipeline feeds zeros in T5's place, as SD3 runs without T5). About 2.93e9 parameters
without T5 (11.7 GB in fp32, on disk and in memory), 7.69e9 with it (30.8 GB): refused on ``--device cpu``
unless ``--allow-cpu-real-size``. ``--sd15-shaped --sd3-shaped`` times both, one after the other, and
prints their step times side by side.

The last line is machine readable: ``adi_over_pplus_step_time=<ratio>`` (the first grouping's with
``--sdxl-shaped``, the first pipeline's with several).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _inputs import fill_default_inputs, native_resolution  # noqa: E402  (benchmarks/ is the script's folder)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

METHODS = {
    # name: (model overrides, images per item)
    "ti": (dict(layerwise=False, mask_threshold=1.0), 1),
    "pplus": (dict(layerwise=True, mask_threshold=1.0), 1),
    "adi": (dict(layerwise=True, mask_threshold=0.0), 3),
    "adi_unshared": (dict(layerwise=True, mask_threshold=0.0, share_text_encoding=False), 3),
}
LABELS = {"ti": "TI", "pplus": "P+", "adi": "ADI", "adi_unshared": "ADI (unshared text enc.)"}
# SDXL base topology (stabilityai/stable-diffusion-xl-base-1.0 unet: 70 attn2 layers in 3 levels) at
# tiny widths, with one of two pairs of text encoders (--text-encoders):
SDXL_SHAPED = dict(transformer_layers_per_block=(1, 2, 10), layers_per_block=2, unet_channels=(32, 64, 128),
                   sample_size=64)
SDXL_TEXT_ENCODERS = {
    # 1/8 of CLIP ViT-L (768) / OpenCLIP bigG (1280) wide and 4 layers deep: seconds per step on CPU.
    "small": dict(text_widths=(96, 160), projection_dim=160, text_layers=4, text_heads=4),
    # SDXL base's text_encoder (CLIP ViT-L/14) and text_encoder_2 (OpenCLIP bigG/14, with projection).
    "real": dict(text_widths=(768, 1280), projection_dim=1280, text_layers=(12, 32), text_heads=(12, 20),
                 text_acts=("quick_gelu", "gelu")),
}
CPU_MAX_ROWS = 16


def method_spec(name: str) -> tuple[dict, int, str]:
    """``(model overrides, images per item, label)`` of ``METHOD`` or ``METHOD:ROW_GROUPS``."""
    method, _, row_groups = name.partition(":")
    overrides, roles = METHODS[method]
    if not row_groups:
        return overrides, roles, LABELS[method]
    return {**overrides, "layerwise": True, "row_groups": row_groups}, roles, f"{LABELS[method]} [{row_groups}]"

# Stable Diffusion 1.5 config values (runwayml/stable-diffusion-v1-5: unet, vae, text_encoder).
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768,
    norm_num_groups=32, act_fn="silu", center_input_sample=False, downsample_padding=1,
    flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1, norm_eps=1e-5,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), norm_num_groups=32, act_fn="silu", scaling_factor=0.18215,
)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
# FLOPs per 512 px sample (UNet forward+backward-to-inputs) and per 77-token prompt (text encoder
# forward+backward), as stated in issue 7; used for the MFU estimate on GPU.
SD15_UNET_TFLOP_512 = 1.73
SD15_TEXT_TFLOP_PROMPT = 0.027


def build_sd15_shaped(out: Path) -> Path:
    """An SD-1.5-shaped pipeline folder with random weights (tiny vocabulary tokenizer)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from adi_lightning.tiny import DEFAULT_WORDS, build_clip_tokenizer
    from adi_lightning.tiny.pipeline import SD_SCHEDULER

    if (out / "model_index.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_clip_tokenizer(DEFAULT_WORDS, out / "tokenizer")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, **SD15_TEXT)).eval()
        vae = AutoencoderKL(**SD15_VAE).eval()
        unet = UNet2DConditionModel(**SD15_UNET).eval()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**SD_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def _build_recorded(out: Path, build, values: dict, record_name: str, built_as: str, dir_flag: str) -> Path:
    """``build(out, **values)`` with ``values`` recorded in ``out / record_name``; a folder built before is
    reused only if its record holds the same values (SystemExit naming ``built_as`` and ``dir_flag`` otherwise)."""
    from adi_lightning.io import atomic_write_json

    values = json.loads(json.dumps(values))  # tuples as lists, as the record reads back
    record = out / record_name
    if (out / "model_index.json").is_file():
        if not record.is_file() or json.loads(record.read_text()) != values:
            raise SystemExit(f"{out} was not built as {built_as}; give another {dir_flag} or remove it")
        return out
    build(out, **values)
    atomic_write_json(record, values)
    return out


def build_sdxl_shaped(out: Path, text_encoders: str = "small") -> Path:
    """An SDXL-topology pipeline folder with random weights (:data:`SDXL_SHAPED` and
    :data:`SDXL_TEXT_ENCODERS`); a folder built before is reused only if built with the same values."""
    from adi_lightning.tiny.sdxl import build_tiny_sdxl_pipeline

    return _build_recorded(out, build_tiny_sdxl_pipeline, {**SDXL_SHAPED, **SDXL_TEXT_ENCODERS[text_encoders]},
                           "sdxl_shaped.json", f"--text-encoders {text_encoders}", "--sdxl-dir")


# Stable Diffusion 3 Medium config values (stabilityai/stable-diffusion-3-medium-diffusers: transformer,
# text_encoder (CLIP ViT-L/14), text_encoder_2 (OpenCLIP bigG/14), text_encoder_3 (T5 v1.1 XXL encoder), vae,
# scheduler shift 3.0) as keyword arguments of build_tiny_sd3_pipeline; the tokenizers stay the tiny ones.
SD3_MEDIUM = dict(
    text_widths=(768, 1280), projection_dims=(768, 1280), text_layers=(12, 32), text_heads=(12, 20),
    text_acts=("quick_gelu", "gelu"), t5_width=4096, sample_size=1024, num_layers=24, attention_heads=24,
    attention_head_dim=64, pos_embed_max_size=192, vae_channels=(128, 256, 512, 512), vae_layers_per_block=2,
    vae_norm_groups=32,
)
SD3_T5_XXL = dict(t5_layers=24, t5_heads=64, t5_ff=10240, t5_buckets=(32, 128))
# Parameter counts of the parts above (from their configs, with CLIP's 49408-token vocabulary and T5's 32128).
SD3_MEDIUM_PARAMS = dict(transformer=2.028e9, text_encoder=0.124e9, text_encoder_2=0.695e9, vae=0.084e9)
SD3_T5_PARAMS = 4.762e9
H100_BF16_TFLOPS = 989.0  # H100 SXM dense bf16 peak, TFLOP/s


def build_sd3_shaped(out: Path, with_t5: bool = False) -> Path:
    """An SD3-Medium-shaped ``StableDiffusion3Pipeline`` folder with random weights (:data:`SD3_MEDIUM`,
    with ``with_t5`` also :data:`SD3_T5_XXL`) through :func:`~adi_lightning.tiny.build_tiny_sd3_pipeline`;
    a folder built before is reused only if built with the same values (SystemExit otherwise)."""
    from adi_lightning.tiny.sd3 import build_tiny_sd3_pipeline

    return _build_recorded(out, build_tiny_sd3_pipeline,
                           {**SD3_MEDIUM, **(SD3_T5_XXL if with_t5 else {}), "with_t5": with_t5}, "sd3_shaped.json",
                           f"--sd3-shaped{' --sd3-t5' if with_t5 else ''}", "--sd3-dir")


def sd3_real_size_bytes(with_t5: bool) -> float:
    """fp32 bytes of the ``--sd3-shaped`` weights (:data:`SD3_MEDIUM_PARAMS`, plus T5-XXL with ``with_t5``)."""
    return 4 * (sum(SD3_MEDIUM_PARAMS.values()) + (SD3_T5_PARAMS if with_t5 else 0))


def mmdit_forward_flops(config: dict, image_tokens: int, text_tokens: int,
                        context_chunks: int = 1) -> tuple[int, int]:
    """``(linear, attention)`` forward FLOPs of one sample through ``SD3Transformer2DModel`` with ``config``.

    A FLOP is a multiply or an add: a matmul ``[m, k] @ [k, n]`` is ``2 m k n``. With ``n`` image tokens
    (``(resolution / vae_factor / patch_size) ** 2``), ``t`` text tokens (SD3: 77 CLIP + 256 T5 or zeros =
    333), width ``d = num_attention_heads * attention_head_dim``, ``J = joint_attention_dim``,
    ``P = pooled_projection_dim``, ``C``/``C'`` latent channels in/out and patch ``p``:

    - linear = 2 x (weights of each linear or conv layer) x (tokens it runs on), summed:
      patch embedding ``2 n C p^2 d``; timestep and pooled embeddings ``2 (256 d + P d + 2 d^2)`` (one vector);
      ``context_embedder`` ``2 t J d`` per context chunk (block-wise routing projects each of its
      ``context_chunks`` ``[t, J]`` chunks, :mod:`adi_lightning.blockwise`; 1 for a plain prompt); per joint
      block the image stream's q, k, v, out and 4x MLP ``24 n d^2``, the text stream's the same ``24 t d^2``
      (the last block, ``context_pre_only``: q, k, v only, ``6 t d^2``), adaLN modulations ``2 d (6 d + 6 d)``
      (last block ``2 d (6 d + 2 d)``; a dual-attention block's image side ``9 d``), a dual-attention block
      (SD3.5) adds ``8 n d^2``; ``norm_out`` ``4 d^2`` and ``proj_out`` ``2 n d p^2 C'``.
    - attention = per joint block ``Q K^T`` and ``A V`` over the ``n + t`` joint tokens, ``4 (n + t)^2 d``,
      plus ``4 n^2 d`` for a dual-attention block's image-only ``attn2``.

    Matches ``torch.utils.flop_counter.FlopCounterMode`` on the stock model (``tests/test_speed.py``).
    """
    n, t = image_tokens, text_tokens
    d = config["num_attention_heads"] * config["attention_head_dim"]
    c = config["caption_projection_dim"]
    if c != d:
        raise ValueError(f"caption_projection_dim {c} != the stream width {d}: not an SD3 MMDiT")
    blocks, patch = config["num_layers"], config["patch_size"]
    dual = set(config.get("dual_attention_layers") or ())
    linear = 2 * n * config["in_channels"] * patch**2 * d
    linear += 2 * (256 * d + config["pooled_projection_dim"] * d + 2 * d * d)
    linear += 2 * context_chunks * t * config["joint_attention_dim"] * d
    attention = 0
    for b in range(blocks):
        last = b == blocks - 1
        linear += 24 * n * d * d + (6 if last else 24) * t * d * d
        linear += 2 * d * ((9 if b in dual else 6) * d + (2 if last else 6) * d)
        attention += 4 * (n + t) ** 2 * d
        if b in dual:
            linear += 8 * n * d * d
            attention += 4 * n * n * d
    linear += 4 * d * d + 2 * n * d * patch**2 * config["out_channels"]
    return linear, attention


def text_encoder_forward_flops(config: dict, tokens: int) -> tuple[int, int]:
    """``(linear, attention)`` forward FLOPs of one prompt of ``tokens`` through a CLIP text encoder or a
    T5 encoder with ``config`` (a transformers config as a dict); conventions as :func:`mmdit_forward_flops`.

    CLIP (``hidden_size`` d, ``intermediate_size`` f, L layers; ``projection_dim`` q when projected): linear
    ``2 tokens L (4 d^2 + 2 d f) + 2 d q`` (the projection runs on the pooled token); attention
    ``4 tokens^2 d L``. T5 (``d_model`` d, ``num_heads * d_kv`` = i, ``d_ff`` f, gated MLP: 3 matrices):
    linear ``2 tokens L (4 d i + 3 d f)``, attention ``4 tokens^2 i L``. Embedding look-ups are not FLOPs.
    """
    if "d_model" in config:
        d, f, layers = config["d_model"], config["d_ff"], config["num_layers"]
        inner = config["num_heads"] * config["d_kv"]
        mlp = 3 if config.get("feed_forward_proj", "relu").startswith("gated") else 2
        return 2 * tokens * layers * (4 * d * inner + mlp * d * f), 4 * tokens**2 * inner * layers
    d, f, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    projected = "CLIPTextModelWithProjection" in (config.get("architectures") or ())
    projection = 2 * d * config["projection_dim"] if projected else 0
    return 2 * tokens * layers * (4 * d * d + 2 * d * f) + projection, 4 * tokens**2 * d * layers


def frozen_train_flops(linear: int, attention: int) -> int:
    """Forward + backward FLOPs when every weight is frozen and only activations need gradients (the
    identifier's path): a linear layer's backward is one matmul (the input gradient, no weight gradient),
    so linear x 2; attention's two matmuls each need both operands' gradients, so attention x 3 (the
    recomputation inside a fused attention kernel's backward is not counted)."""
    return 2 * linear + 3 * attention


def sd3_step_flops(pipeline: str, resolution: int, images: int, rows: int, text_forwards: int) -> float:
    """FLOPs of one training step of the MMDiT pipeline folder ``pipeline``: ``images`` samples through the
    transformer (forward + backward, :func:`frozen_train_flops`) and ``images * rows`` prompt encodings'
    backward through every text encoder, of which ``text_forwards`` run forward (ADI's shared text encoding:
    one per triple). Block-wise routing projects one context chunk per joint block."""
    from adi_lightning.families.sd3 import MAX_SEQUENCE_LENGTH

    folder = Path(pipeline)
    config = json.loads((folder / "transformer" / "config.json").read_text())
    vae = json.loads((folder / "vae" / "config.json").read_text())
    side = resolution // 2 ** (len(vae["block_out_channels"]) - 1) // config["patch_size"]
    clip = json.loads((folder / "tokenizer" / "tokenizer_config.json").read_text())["model_max_length"]
    # StableDiffusion3Family's encoding: the CLIP tokens, then MAX_SEQUENCE_LENGTH T5 tokens (or zeros).
    text_tokens = clip + MAX_SEQUENCE_LENGTH
    flops = images * frozen_train_flops(*mmdit_forward_flops(config, side * side, text_tokens, config["num_layers"]))
    for part, tokens in (("text_encoder", clip), ("text_encoder_2", clip), ("text_encoder_3", MAX_SEQUENCE_LENGTH)):
        if (folder / part / "config.json").is_file():
            linear, attention = text_encoder_forward_flops(json.loads((folder / part / "config.json").read_text()),
                                                           tokens)
            # forward: linear + attention; backward to the inputs: linear + 2 x attention
            flops += text_forwards * (linear + attention) + images * rows * (linear + 2 * attention)
    return float(flops)


def describe_text_encoders(pipeline: str) -> str:
    """``text_encoder 12x768 quick_gelu, ...`` from the folder's configs: what actually ran (T5's
    ``text_encoder_3`` too, when the folder has one)."""
    parts = []
    for part in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        path = Path(pipeline) / part / "config.json"
        if not path.is_file():
            continue
        config = json.loads(path.read_text())
        if "d_model" in config:  # T5
            parts.append(f"{part} {config['num_layers']}x{config['d_model']} {config['feed_forward_proj']}")
        else:
            parts.append(f"{part} {config['num_hidden_layers']}x{config['hidden_size']} {config['hidden_act']}")
    return ", ".join(parts)


def groupings_that_fit(pipeline: str, groupings: list[str], device: str) -> list[str]:
    """``groupings`` whose row count fits the device (CPU: at most :data:`CPU_MAX_ROWS` rows)."""
    from diffusers import UNet2DConditionModel

    from adi_lightning.conditioning import cross_attention_layers, group_layers

    unet = UNet2DConditionModel.from_pretrained(pipeline, subfolder="unet")
    paths = list(cross_attention_layers(unet))
    rows = {g: int(group_layers(paths, g, len(unet.config.block_out_channels)).max()) + 1 for g in groupings}
    for g, r in rows.items():
        print(f"# row_groups={g}: {r} rows for {len(paths)} layers" + (
            f" (skipped on CPU: more than {CPU_MAX_ROWS})" if device == "cpu" and r > CPU_MAX_ROWS else ""))
    return [g for g in groupings if device != "cpu" or rows[g] <= CPU_MAX_ROWS]


# ------------------------------------------------------------------------------------ worker
def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _text_encoder_time(module, items: int, roles: int, precision: str, device: str, reps: int = 3) -> float:
    """Median seconds of the text-encoder forward+backward for this batch shape, alone."""
    import torch

    prompts = [f"a photo of a person {module.hparams.placeholder_token}"] * (items * roles)
    ids = module.family.tokenize(prompts, module.device)
    table = module.identifier.embedding
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision.startswith("bf16"))
    times = []
    for _ in range(reps + 1):
        table.grad = None
        _sync(device)
        start = time.perf_counter()
        with autocast:
            rows = table.unsqueeze(0).expand(len(prompts), *table.shape)
            if module.masking_enabled:
                rows.register_hook(lambda g: None)
            shared = roles if module.hparams.share_text_encoding else 1
            features = module.family.encode(ids, rows, module.identifier.layer_to_row(), shared)
        sum(f.float().square().mean() for f in features).backward()
        _sync(device)
        times.append(time.perf_counter() - start)
    table.grad = None
    return statistics.median(times[1:])


def worker(args) -> dict:
    import lightning as L
    import torch

    from adi_lightning.data import ActionTripleDataModule
    from adi_lightning.module import ADIModule

    overrides, roles, _ = method_spec(args.worker)
    items = args.batch if roles == 3 else 3 * args.batch  # the same images per step for every method
    torch.manual_seed(0)
    module = ADIModule(
        args.pipeline, cache_latents=not args.no_cache_latents, channels_last=args.channels_last,
        compile_unet=args.compile, gradient_checkpointing=args.gradient_checkpointing,
        weight_dtype=args.weight_dtype, **overrides,
    )
    data = ActionTripleDataModule(root=args.data, action=args.action, resolution=args.resolution, batch_size=items,
                                  with_partners=roles == 3, repeats=1000, num_workers=args.num_workers,
                                  action_different="other_action")

    class Timer(L.Callback):
        def __init__(self):
            self.step, self.wall, self._start, self._last = [], [], None, None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            _sync(args.device)
            now = time.perf_counter()
            if self._last is not None:
                self.wall.append(now - self._last)
            self._start = self._last = now
            if args.device == "cuda" and batch_idx == args.warmup:
                torch.cuda.reset_peak_memory_stats()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            _sync(args.device)
            self.step.append(time.perf_counter() - self._start)

    timer = Timer()
    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(
            accelerator="gpu" if args.device == "cuda" else "cpu", devices=1, precision=args.precision,
            max_steps=args.warmup + args.steps, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
            num_sanity_val_steps=0, default_root_dir=root, callbacks=[timer],
        )
        trainer.fit(module, data)
    steps = timer.step[args.warmup:]
    walls = timer.wall[args.warmup:]
    cuda_peak = torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else None
    module.to("cuda" if args.device == "cuda" else "cpu")  # Lightning's teardown moved it to the CPU
    text = _text_encoder_time(module, items, roles, args.precision, args.device, args.text_reps)
    result = {
        "method": args.worker, "rows": module.identifier.num_rows, "items_per_step": items, "images_per_step": items * roles,
        "step_s": steps, "wall_s": walls, "text_encoder_s": text,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cuda_max_alloc_mib": cuda_peak,
        "latent_cache": {"entries": len(module.latent_cache), "hits": module.latent_cache.hits,
                         "misses": module.latent_cache.misses},
        "threads": torch.get_num_threads(),
    }
    return result


# ------------------------------------------------------------------------------------ driver
def _stats(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def _prepare(args, work: Path) -> list[tuple[str, str | None, str]]:
    """``(kind, title, folder)`` of each pipeline to time, in order (``kind``: ``sdxl``, ``sd15``, ``sd3`` or
    ``given``; ``title`` None for a folder given or the tiny default); builds the shaped ones and fills
    ``--data`` (and ``--pipeline`` / ``--resolution`` with the first pipeline's, :func:`fill_default_inputs`).
    SystemExit for flags that do not go together and for real-size SD3 on the CPU without
    ``--allow-cpu-real-size``."""
    shaped = [flag for flag in ("sdxl_shaped", "sd15_shaped", "sd3_shaped") if getattr(args, flag)]
    if args.sdxl_shaped and len(shaped) > 1:
        raise SystemExit("--sdxl-shaped compares row groupings on its own; "
                         "give no --sd15-shaped / --sd3-shaped with it")
    if args.pipeline and shaped:
        raise SystemExit(f"--{shaped[0].replace('_', '-')} builds its own pipeline; give --pipeline or a shaped "
                         "pipeline, not both")
    if args.text_encoders != "small" and not args.sdxl_shaped:
        raise SystemExit("--text-encoders chooses the encoders of --sdxl-shaped; give --sdxl-shaped with it")
    if args.sd3_t5 and not args.sd3_shaped:
        raise SystemExit("--sd3-t5 adds T5-XXL to --sd3-shaped; give --sd3-shaped with it")
    if args.sd3_shaped and args.device == "cpu" and not args.allow_cpu_real_size:
        raise SystemExit(
            f"--sd3-shaped is SD3 Medium at real size: {sd3_real_size_bytes(args.sd3_t5) / 1e9:.1f} GB of fp32 "
            "weights on disk and again in each method's process, and minutes per step on a CPU. Run it with "
            "--device cuda, or give --allow-cpu-real-size; on the CPU time an MMDiT with a tiny SD3 folder "
            "(--pipeline, adi_lightning.tiny.build_tiny_sd3_pipeline).")
    def build(kind: str, what: str, build_in, detail: str = "") -> str:
        """Build the ``kind`` pipeline in ``--<kind>-dir`` (default: ``work / kind``), saying ``what`` it is."""
        given = getattr(args, f"{kind}_dir")
        out = Path(given) if given else work / kind
        print(f"# building an {what} random-weight pipeline{detail} in {out} ...", flush=True)
        return str(build_in(out))

    pipelines = []
    if args.sdxl_shaped:
        path = build("sdxl", "SDXL-shaped", lambda out: build_sdxl_shaped(out, args.text_encoders),
                     f" ({args.text_encoders} text encoders)")
        pipelines.append(("sdxl", f"SDXL-shaped UNet {SDXL_SHAPED}, {args.text_encoders} text encoders "
                                  f"({describe_text_encoders(path)})", path))
    if args.sd15_shaped:
        pipelines.append(("sd15", "SD-1.5-shaped", build("sd15", "SD-1.5-shaped", build_sd15_shaped)))
    if args.sd3_shaped:
        path = build("sd3", "SD3-Medium-shaped", lambda out: build_sd3_shaped(out, args.sd3_t5),
                     f" ({'with' if args.sd3_t5 else 'no'} T5)")
        mmdit = json.loads((Path(path) / "transformer" / "config.json").read_text())
        width = mmdit["num_attention_heads"] * mmdit["attention_head_dim"]
        pipelines.append(("sd3", f"SD3-Medium-shaped MMDiT {mmdit['num_layers']} joint blocks x {width}, "
                                 f"{describe_text_encoders(path)}{'' if args.sd3_t5 else ', no T5 (zeros)'}", path))
    if pipelines:
        args.pipeline = pipelines[0][2]
    fill_default_inputs(args, work)
    return pipelines or [("given", None, args.pipeline)]


def _time_methods(args, pipeline: str, resolution: int, methods: list[str], work: Path) -> dict[str, dict]:
    """Each method's worker results on ``pipeline``, ``--rounds`` times in alternating order, pooled."""
    results: dict[str, dict] = {}
    order = []
    for round_index in range(args.rounds):
        order += methods if round_index % 2 == 0 else methods[::-1]
    for run_index, method in enumerate(order):
        out = work / f"{method}-{run_index}.json"
        cmd = [sys.executable, __file__, "--worker", method, "--worker-out", str(out)]
        values = {**vars(args), "pipeline": pipeline, "resolution": resolution}
        for key in ("pipeline", "data", "action", "resolution", "batch", "precision", "weight_dtype", "steps",
                    "warmup", "num_workers", "device", "text_reps"):
            cmd += [f"--{key.replace('_', '-')}", str(values[key])]
        for flag in ("compile", "channels_last", "gradient_checkpointing", "no_cache_latents"):
            if getattr(args, flag):
                cmd.append(f"--{flag.replace('_', '-')}")
        print(f"# {method_spec(method)[2]} (run {run_index + 1}/{len(order)}) ...", flush=True)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            sys.stderr.write(done.stdout[-3000:] + done.stderr[-5000:])
            raise SystemExit(f"{method} failed (exit {done.returncode})")
        result = json.loads(out.read_text())
        if method in results:  # pool the steps of every round; memory: the largest
            pooled = results[method]
            for key in ("step_s", "wall_s"):
                pooled[key] += result[key]
            pooled["text_encoder_s"] = statistics.median([pooled["text_encoder_s"], result["text_encoder_s"]])
            for key in ("peak_rss_mib", "cuda_max_alloc_mib"):
                if result[key] is not None:
                    pooled[key] = max(pooled[key], result[key])
        else:
            results[method] = result
    return results


def _is_sd3(pipeline: str) -> bool:
    index = Path(pipeline) / "model_index.json"
    return index.is_file() and json.loads(index.read_text()).get("_class_name") == "StableDiffusion3Pipeline"


def _report(args, kind: str, title: str | None, pipeline: str, resolution: int, methods: list[str],
            results: dict[str, dict]) -> dict[str, float]:
    """Print one pipeline's table (and FLOP / MFU estimates); return each method's median step seconds."""
    import torch

    threads = results[methods[0]]["threads"]
    print()
    print(f"pipeline={f'{title} (random weights)' if title else pipeline} "
          f"resolution={resolution} batch={args.batch} triples (= {3 * args.batch} images/step) "
          f"precision={args.precision} compile={args.compile} channels_last={args.channels_last} "
          f"grad_ckpt={args.gradient_checkpointing} cache_latents={not args.no_cache_latents}")
    print(f"device={args.device} ({platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{threads} torch threads, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}) "
          f"load average={os.getloadavg()[0]:.2f} date={time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} "
          f"steps={args.steps} after {args.warmup} warm-up, x{args.rounds} rounds")
    memory_label = "CUDA max alloc MiB" if args.device == "cuda" else "peak RSS MiB"
    header = (f"{'method':<28}{'rows':>5}{'step median s':>14}{'min':>9}{'max':>9}{'images/s':>10}"
              f"{'text enc share':>16}{memory_label:>20}")
    print(header)
    print("-" * len(header))
    medians = {}
    for method in methods:
        r = results[method]
        median, low, high = _stats(r["step_s"])
        medians[method] = median
        memory = r["cuda_max_alloc_mib"] if args.device == "cuda" else r["peak_rss_mib"]
        share = r["text_encoder_s"] / median
        print(f"{method_spec(method)[2]:<28}{r['rows']:>5}{median:>14.4f}{low:>9.4f}{high:>9.4f}"
              f"{r['images_per_step'] / median:>10.2f}{share:>15.0%} {memory:>19.0f}")
    print()
    estimate = _flop_estimate(args.device, kind, pipeline, resolution, methods, results)
    if estimate is not None:
        what, digits, tflops = estimate
        for method, tflop in tflops.items():
            mfu = (f"-> {tflop / medians[method] / H100_BF16_TFLOPS:.1%} of {H100_BF16_TFLOPS:.0f} TFLOP/s "
                   "(H100 bf16 dense)" if args.device == "cuda" else "(MFU on --device cuda only)")
            print(f"{what} {method_spec(method)[2]}: {tflop:{digits}} TFLOP/step {mfu}")
    return medians


def _flop_estimate(device: str, kind: str, pipeline: str, resolution: int, methods: list[str],
                   results: dict[str, dict]) -> tuple[str, str, dict[str, float]] | None:
    """``(what is estimated, number format, TFLOP per step of each method)``, or None without an estimate:
    SD 1.5-shaped on CUDA from :data:`SD15_UNET_TFLOP_512` and :data:`SD15_TEXT_TFLOP_PROMPT`; an SD3 folder
    from its configs (:func:`sd3_step_flops`; its MFU on CUDA only). ``methods`` are ``METHOD`` or
    ``METHOD:ROW_GROUPS`` names (:func:`method_spec`)."""

    def counts(method: str) -> tuple[int, int, int, int]:
        """``(images, rows, prompt encodings, text-encoder forwards)`` of one step: a prompt per row and image
        (SD 1.5 layer-wise: 16; TI: 1); ADI's shared text encoding runs one forward per triple."""
        images, rows = results[method]["images_per_step"], results[method]["rows"]
        prompts = images * rows
        return images, rows, prompts, prompts // 3 if method.partition(":")[0] == "adi" else prompts

    if device == "cuda" and kind == "sd15":
        scale, tflops = (resolution / 512) ** 2, {}
        for method in methods:
            images, _, prompts, forwards = counts(method)
            # 0.027 TFLOP per prompt is forward + backward, about half each.
            tflops[method] = images * SD15_UNET_TFLOP_512 * scale + (forwards + prompts) / 2 * SD15_TEXT_TFLOP_PROMPT
        return "MFU estimate", ".3f", tflops
    if _is_sd3(pipeline):
        tflops = {}
        for method in methods:
            images, rows, _, forwards = counts(method)
            tflops[method] = sd3_step_flops(pipeline, resolution, images, rows, forwards) / 1e12
        return "FLOPs estimate (MMDiT + text encoders)", ".4g", tflops
    return None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline",
                        help="diffusers pipeline folder (default: the tiny test pipeline, built in a temp dir)")
    parser.add_argument("--sd15-shaped", action="store_true",
                        help="build an SD-1.5-shaped UNet/VAE/text encoder with random weights")
    parser.add_argument("--sd3-shaped", action="store_true",
                        help="build an SD3-Medium-shaped pipeline (MMDiT, CLIP-L, CLIP-G, VAE at real size; random "
                             "weights; no T5 unless --sd3-t5); with --sd15-shaped, both are timed side by side")
    parser.add_argument("--sd3-t5", action="store_true",
                        help="--sd3-shaped with T5-XXL (4.76e9 parameters, 19 GB in fp32); default: no T5, as SD3 "
                             "runs without it (zeros in its place)")
    parser.add_argument("--allow-cpu-real-size", action="store_true",
                        help="let --sd3-shaped run on --device cpu (11.7 GB of fp32 weights per process, 30.8 GB "
                             "with --sd3-t5)")
    parser.add_argument("--sdxl-shaped", action="store_true",
                        help="build an SDXL-topology pipeline (random weights, tiny widths) and compare row groupings")
    parser.add_argument("--row-groups", default="layer,attention,resolution,shared",
                        help="model.row_groups values for --sdxl-shaped (CPU: those of at most 16 rows)")
    parser.add_argument("--text-encoders", choices=tuple(SDXL_TEXT_ENCODERS), default="small",
                        help="--sdxl-shaped text encoders: small (1/8 wide, 4 layers) or real (CLIP ViT-L 12x768 "
                             "and OpenCLIP bigG 32x1280, about 2.9 GB on disk)")
    parser.add_argument("--sd15-dir", help="where --sd15-shaped builds (reused when it exists; default: a temp dir)")
    parser.add_argument("--sd3-dir", help="where --sd3-shaped builds (reused when built with the same values; "
                                          "default: a temp dir)")
    parser.add_argument("--sdxl-dir", help="where --sdxl-shaped builds (reused when built with the same values; "
                                           "default: a temp dir)")
    parser.add_argument("--data", help="action folder (default: the tiny action folder, built in a temp dir)")
    parser.add_argument("--action", default="jumping")
    parser.add_argument("--resolution", type=int, help="pixels (default: each pipeline's native size)")
    parser.add_argument("--batch", type=int, default=1, help="ADI triples per step; TI/P+ get 3x this many anchors")
    parser.add_argument("--precision", default="32-true", help="Lightning precision: 32-true, bf16-mixed, ...")
    parser.add_argument("--weight-dtype", default="float32", help="model.weight_dtype of the frozen backbone")
    parser.add_argument("--compile", action="store_true", help="model.compile_unet")
    parser.add_argument("--channels-last", action="store_true", help="model.channels_last")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="model.gradient_checkpointing")
    parser.add_argument("--no-cache-latents", action="store_true", help="model.cache_latents=false")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per method")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps (compile, caches)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="run the methods this many times in alternating order (ABC CBA ...) and pool the "
                             "timed steps, so drifting machine load hits every method alike")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--text-reps", type=int, default=3, help="timed text-encoder-alone passes (for its share)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--methods", default="ti,pplus,adi,adi_unshared", help=f"comma list of {list(METHODS)}")
    parser.add_argument("--json", help="also write all results to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        result = worker(args)
        Path(args.worker_out).write_text(json.dumps(result))
        return

    methods = list(dict.fromkeys(m.strip() for m in args.methods.split(",") if m.strip()))
    unknown = set(methods) - set(METHODS)
    if not args.sdxl_shaped and (unknown or not {"adi", "pplus"} <= set(methods)):
        raise SystemExit(f"--methods must name adi and pplus (and may name {list(METHODS)}); got {methods}")
    given_resolution = args.resolution
    runs = []  # (title, methods, medians) per pipeline
    all_results = {}
    with tempfile.TemporaryDirectory(prefix="adi-bench-") as tmp:
        work = Path(tmp)
        pipelines = _prepare(args, work)
        for kind, title, pipeline in pipelines:
            resolution = given_resolution or native_resolution(pipeline)
            if kind == "sdxl":  # P+ with one shared row is TI
                groupings = groupings_that_fit(pipeline, [g.strip() for g in args.row_groups.split(",")], args.device)
                methods = ["ti"] + [f"{m}:{g}" for g in groupings for m in ("pplus", "adi")
                                    if (m, g) != ("pplus", "shared")]
            if len(pipelines) > 1:
                print(f"# --- {title}", flush=True)
            results = _time_methods(args, pipeline, resolution, methods, work)
            medians = _report(args, kind, title, pipeline, resolution, methods, results)
            runs.append((title or pipeline, resolution, methods, medians))
            all_results[title or pipeline] = {"resolution": resolution, "results": results}

    if len(runs) > 1:
        print()
        print("side by side, step median s (images per step are equal within a method):")
        names = [f"{title.split(' ')[0]} @ {resolution}px" for title, resolution, _, _ in runs]
        print(f"{'method':<28}" + "".join(f"{name:>26}" for name in names) + f"{'ratio (2nd/1st)':>18}")
        for method in runs[0][2]:
            times = [medians.get(method) for _, _, _, medians in runs]
            ratio = times[1] / times[0] if None not in times[:2] else float("nan")
            print(f"{method_spec(method)[2]:<28}" + "".join(f"{t:>26.4f}" for t in times) + f"{ratio:>18.3f}")
    ratio = float("nan")
    for index, (name, _, methods, medians) in enumerate(runs):
        suffixes = [m.partition(":")[1:] for m in methods if m.startswith("adi:")] or [("", "")]
        pairs = [(f"adi{c}{g}", f"pplus{c}{g}") for c, g in suffixes if f"pplus{c}{g}" in medians]
        # No pair when no P+ ran beside an ADI (e.g. --row-groups shared: P+ with one shared row is TI).
        if len(runs) > 1:
            print(f"# {name}:")
        if "ti" in medians and pairs:
            print(f"ADI/TI step time = {medians[pairs[0][0]] / medians['ti']:.3f}")
        if "adi_unshared" in medians and "pplus" in medians:
            print(f"ADI (unshared text encoder)/P+ step time = {medians['adi_unshared'] / medians['pplus']:.3f}")
        for adi, pplus in pairs:
            print(f"{method_spec(adi)[2]}/P+ step time = {medians[adi] / medians[pplus]:.3f} (target <= 1.15)")
        if index == 0 and pairs:
            ratio = medians[pairs[0][0]] / medians[pairs[0][1]]
    if args.json:
        first = next(iter(all_results.values()))["results"]
        record = {"args": vars(args), "results": first, "pipelines": all_results}
        Path(args.json).write_text(json.dumps(record, indent=1))
    print(f"adi_over_pplus_step_time={ratio:.4f}")


if __name__ == "__main__":
    main()
