"""The toy SD3 pretraining path (adi_lightning.toy.pretrain_sd3, issue 25): the collapsed-T5-pad attention
is the stock attention over 256 zero tokens, the CLIP context is the pipeline's, the default sizes fit the
15 MB budget, and a short ``pretrain-sd3`` writes a folder the project's loader, the stock pipeline and a
2-step ADI fit accept. (The pretrained folder itself is not built here: docs/method.md, "A toy SD3 backbone".)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adi_lightning.families.sd3 import MAX_SEQUENCE_LENGTH
from adi_lightning.toy.pretrain_sd3 import (
    MAX_ASSET_BYTES, TOY_SHIFT, CollapsedPadJointAttnProcessor, PretrainSD3Config, clip_context, estimate,
    pretrain_sd3, with_collapsed_pad, zero_init_adaln,
)

J = 24  # joint_attention_dim of the tiny transformers below
SMALL = ["--joint-blocks", "2", "--heads", "2", "--head-dim", "8", "--clip-widths", "16", "24",
         "--vae-channels", "8", "16", "--num-images", "48", "--batch-size", "4", "--vae-steps", "2"]


def _transformer(qk_norm=None, dual=()):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=3,
                                 attention_head_dim=8, num_attention_heads=2, joint_attention_dim=J,
                                 caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=8,
                                 qk_norm=qk_norm, dual_attention_layers=dual).eval()


def _inputs(n=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 16, 8, 8, generator=gen), torch.randn(n, 77, J, generator=gen),
            torch.randn(n, 16, generator=gen), torch.rand(n, generator=gen) * 1000)


@pytest.mark.parametrize("qk_norm,dual", [(None, ()), ("rms_norm", (0,))], ids=["sd3", "sd3.5"])
@torch.no_grad()
def test_collapsed_pad_equals_the_stock_attention_over_256_zero_tokens(qk_norm, dual):
    """77 CLIP tokens + ONE zero token weighted log 256 is what the stock transformer computes on 77 CLIP
    tokens + the pipeline's 256 zero T5 tokens; without the weight (count 1) it is not."""
    transformer = _transformer(qk_norm, dual)
    latents, clip, pooled, t = _inputs()
    full = torch.cat([clip, torch.zeros(2, MAX_SEQUENCE_LENGTH, J)], dim=1)
    stock = transformer(latents, full, pooled, t).sample
    transformer.set_attn_processor(CollapsedPadJointAttnProcessor(MAX_SEQUENCE_LENGTH))
    collapsed = transformer(latents, with_collapsed_pad(clip), pooled, t).sample
    torch.testing.assert_close(collapsed, stock, rtol=0, atol=1e-5)
    transformer.set_attn_processor(CollapsedPadJointAttnProcessor(1))
    assert (transformer(latents, with_collapsed_pad(clip), pooled, t).sample - stock).abs().max() > 1e-3


@torch.no_grad()
def test_clip_context_is_encode_prompt_without_t5(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from adi_lightning.tiny import build_tiny_sd3_pipeline

    folder = build_tiny_sd3_pipeline(tmp_path / "sd3", with_t5=False)  # CLIP 32 + 48 padded to 96
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None,
                                                    low_cpu_mem_usage=False)
    prompts = ["a photo of a dog jumping", ""]
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device="cpu", do_classifier_free_guidance=False)
    ids, ids_2 = (t(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
                  for t in (pipe.tokenizer, pipe.tokenizer_2))
    context, ours_pooled = clip_context(pipe.text_encoder, pipe.text_encoder_2, ids, ids_2,
                                        pipe.transformer.config.joint_attention_dim)
    assert embeds.shape == (2, 77 + MAX_SEQUENCE_LENGTH, 96)
    torch.testing.assert_close(context, embeds[:, :77], rtol=0, atol=1e-6)
    assert not embeds[:, 77:].any()  # what with_collapsed_pad's one zero token stands for
    torch.testing.assert_close(ours_pooled, pooled, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="exceed joint_attention_dim"):
        clip_context(pipe.text_encoder, pipe.text_encoder_2, ids, ids_2, 64)


@torch.no_grad()
def test_adaln_zero_starts_every_block_as_the_identity_and_predicts_zero():
    transformer = _transformer()
    zero_init_adaln(transformer)
    latents, clip, pooled, t = _inputs()
    assert not transformer(latents, with_collapsed_pad(clip), pooled, t).sample.any()


def test_default_toy_sd3_fits_the_15_mb_budget():
    """Issue 25: the toy SD3 folder's safetensors <= 15 MB (fp32), with an MMDiT of 6 joint blocks."""
    est = estimate()
    assert est["max_bytes"] == MAX_ASSET_BYTES == 15 * 10**6
    assert 4 * sum(est["parameters"].values()) <= est["bytes"] <= MAX_ASSET_BYTES  # fp32 parameters + buffers
    assert est["parameters"]["transformer"] > est["parameters"]["vae"] > 0


def test_over_budget_sizes_are_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "pipe"
    with pytest.raises(ValueError, match=r"over the 0.1 MB budget"):
        pretrain_sd3(out, PretrainSD3Config(max_asset_bytes=10**5, num_images=8, steps=1))
    assert not out.exists() and not list(tmp_path.iterdir())


def test_unknown_time_sampling_is_refused_by_name():
    with pytest.raises(ValueError, match="time_sampling must be one of uniform, importance, cubic, logit_normal"):
        PretrainSD3Config(time_sampling="lognorm")


@pytest.mark.e2e
def test_short_pretrain_sd3_writes_a_folder_the_loader_the_pipeline_and_a_fit_accept(tmp_path, short_fit):
    from adi_lightning.backbone import load_backbone
    from adi_lightning.families import StableDiffusion3Family
    from adi_lightning.toy.__main__ import main

    out = tmp_path / "pipe_sd3"
    main(["pretrain-sd3", "--out", str(out), "--steps", "3", "--log-every", "1", *SMALL])
    info = json.loads((out / "toy_pretrain.json").read_text())
    assert info["steps"] == 3 and info["final"] and info["family"] == "sd3"
    assert info["config"]["time_sampling"] == "logit_normal" and info["held_out"]
    weights = sum(f.stat().st_size for f in out.rglob("*.safetensors"))
    assert 0 <= weights - info["weight_bytes"] < 40_000  # the estimate is what is written, less the headers
    assert not list(tmp_path.glob(".pipe_sd3*")), "temp folders left behind"
    index = json.loads((out / "model_index.json").read_text())
    assert index["text_encoder_3"] == [None, None] and not (out / "text_encoder_3").exists()
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["shift"] == TOY_SHIFT == 1.0
    vae = json.loads((out / "vae" / "config.json").read_text())
    assert vae["latent_channels"] == 16
    assert (vae["shift_factor"], vae["scaling_factor"]) == (info["vae_shift_factor"], info["vae_scaling_factor"])

    family = load_backbone(str(out))  # the project's loader: text_encoder_3=None
    assert isinstance(family, StableDiffusion3Family) and not family.has_t5
    image = family.pipe(prompt="a photo of a dog waving", num_inference_steps=2, output_type="np",
                        generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3)

    run = short_fit(tmp_path / "runs", "--model.num_inference_steps=2", pipeline=str(out), steps=2)
    assert json.loads((run / "run_info.json").read_text())["backbone"]["family"] == "sd3"
    assert (run / "identifier.safetensors").is_file()

    # --init continues from the folder: its VAE constants kept, the provenance chained.
    again = tmp_path / "pipe_sd3_more"
    main(["pretrain-sd3", "--out", str(again), "--init", str(out), "--steps", "1", *SMALL[:-2], "--vae-steps", "0"])
    more = json.loads((again / "toy_pretrain.json").read_text())
    assert more["vae_scaling_factor"] == info["vae_scaling_factor"] and more["history"][-1]["steps"] == 3


def test_the_package_toy_assets_fit_their_budgets():
    """Issue 25: the package's toy assets <= 35 MB in all, the toy SD3 folder's weights <= 15 MB when built."""
    from adi_lightning.toy import ASSETS, toy_sd3_pipeline_path

    total = sum(f.stat().st_size for f in ASSETS.rglob("*") if f.is_file())
    assert total <= 35 * 10**6, f"toy assets {total / 1e6:.1f} MB"
    sd3 = toy_sd3_pipeline_path()
    if sd3.is_dir():
        assert sum(f.stat().st_size for f in sd3.rglob("*.safetensors")) <= MAX_ASSET_BYTES
