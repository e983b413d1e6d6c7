"""benchmarks/step_time.py: the SD3 FLOP estimate against torch's own FLOP counter, and its refusals.

The FLOPs are counted on the ``meta`` device: shapes only, no arithmetic, so SD3 Medium's real size
costs no time or memory.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import step_time  # noqa: E402

SD3_MEDIUM_TRANSFORMER = dict(  # stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192)
SD35_LIKE_TRANSFORMER = dict(  # tiny, with dual-attention blocks (SD3.5) and another latent width
    sample_size=8, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=8, num_attention_heads=2,
    joint_attention_dim=24, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
    pos_embed_max_size=8, dual_attention_layers=(0, 2))


def _flops(run) -> int:
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


@pytest.mark.parametrize("config, side, text_tokens", [(SD3_MEDIUM_TRANSFORMER, 32, 333),
                                                       (SD35_LIKE_TRANSFORMER, 4, 7)])
def test_mmdit_flops_are_the_flop_counters(config, side, text_tokens):
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        model = SD3Transformer2DModel(**config).requires_grad_(False)  # frozen, as in training
    latents = torch.zeros(1, config["in_channels"], 2 * side, 2 * side, device="meta")
    context = torch.zeros(1, text_tokens, config["joint_attention_dim"], device="meta", requires_grad=True)
    pooled = torch.zeros(1, config["pooled_projection_dim"], device="meta", requires_grad=True)
    out = {}

    def forward():
        out["sample"] = model(latents, context, pooled, torch.zeros(1, device="meta")).sample

    forward_flops = _flops(forward)
    backward_flops = _flops(lambda: out["sample"].sum().backward())
    linear, attention = step_time.mmdit_forward_flops(dict(model.config), side * side, text_tokens)
    assert linear + attention == forward_flops
    estimate = step_time.frozen_train_flops(linear, attention)
    assert estimate >= forward_flops + backward_flops >= 0.98 * estimate
    # Each extra context chunk (block-wise routing) is one more context_embedder pass over the text tokens.
    more, _ = step_time.mmdit_forward_flops(dict(model.config), side * side, text_tokens, context_chunks=3)
    assert more - linear == 2 * 2 * text_tokens * config["joint_attention_dim"] * config["caption_projection_dim"]


@pytest.mark.parametrize("kind", ["clip_projected", "clip", "t5"])
def test_text_encoder_flops_are_the_flop_counters(kind):
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config,
                              T5EncoderModel)

    if kind == "t5":
        config, model_class, tokens = T5Config(d_model=64, d_kv=8, d_ff=96, num_layers=2, num_heads=4,
                                               feed_forward_proj="gated-gelu"), T5EncoderModel, 256
    else:
        config = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                projection_dim=512, architectures=[
                                    "CLIPTextModelWithProjection" if kind == "clip_projected" else "CLIPTextModel"])
        model_class, tokens = (CLIPTextModelWithProjection if kind == "clip_projected" else CLIPTextModel), 77
    with torch.device("meta"):
        model = model_class(config)
    counted = _flops(lambda: model(torch.zeros(1, tokens, dtype=torch.long, device="meta")))
    assert sum(step_time.text_encoder_forward_flops(config.to_dict(), tokens)) == counted


def test_sd3_step_flops_add_the_text_encoders_per_row(tiny_sd3_pipeline):
    folder = str(tiny_sd3_pipeline)
    config = json.loads((Path(folder) / "transformer" / "config.json").read_text())
    mmdit = step_time.frozen_train_flops(*step_time.mmdit_forward_flops(config, 8 * 8, 77 + 256, config["num_layers"]))
    assert step_time.sd3_step_flops(folder, 32, images=3, rows=0, text_forwards=0) == 3 * mmdit
    one = step_time.sd3_step_flops(folder, 32, images=1, rows=1, text_forwards=1) - mmdit
    assert one > 0  # CLIP-L, CLIP-G and T5, forward and backward
    # ADI's shared text encoding: fewer forwards, the same backwards.
    shared = step_time.sd3_step_flops(folder, 32, images=3, rows=2, text_forwards=2)
    unshared = step_time.sd3_step_flops(folder, 32, images=3, rows=2, text_forwards=6)
    assert 3 * mmdit < shared < unshared < 3 * mmdit + 6 * one + 1


def test_native_resolution_reads_the_mmdit(tiny_sd3_pipeline_no_t5, tiny_pipeline):
    from _inputs import native_resolution

    assert native_resolution(tiny_sd3_pipeline_no_t5) == 32
    assert native_resolution(tiny_pipeline) == 32


@pytest.mark.parametrize("argv, message", [
    (["--sd3-shaped"], "--allow-cpu-real-size"),
    (["--sd3-shaped", "--sd3-t5"], "30.8 GB"),
    (["--sd3-t5"], "give --sd3-shaped with it"),
    (["--sd3-shaped", "--sdxl-shaped"], "compares row groupings on its own"),
    (["--sd3-shaped", "--pipeline", "x", "--device", "cuda"], "not both"),
])
def test_step_time_refuses_before_building(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as error:
        step_time.main([*argv, "--sd3-dir", str(tmp_path / "sd3")])
    assert message in str(error.value)
    assert not (tmp_path / "sd3").exists()


def test_sd15_flop_estimate_reads_method_and_row_groups_names_as_the_sd3_one_does():
    """The SD 1.5-shaped MFU estimate counts a prompt per row and image and, for ADI with any row grouping
    (``adi:<groups>``), one text-encoder forward per triple, as the SD3 estimate does; TI is one row."""
    results = {"ti": {"images_per_step": 3, "rows": 1}, "adi": {"images_per_step": 6, "rows": 16},
               "adi:resolution": {"images_per_step": 6, "rows": 3}, "adi_unshared": {"images_per_step": 6, "rows": 16}}
    what, digits, tflops = step_time._flop_estimate("cuda", "sd15", "unused", 512, list(results), results)
    unet, text = step_time.SD15_UNET_TFLOP_512, step_time.SD15_TEXT_TFLOP_PROMPT
    assert what == "MFU estimate" and digits == ".3f"
    assert tflops["ti"] == pytest.approx(3 * unet + 3 * text)
    assert tflops["adi"] == pytest.approx(6 * unet + (32 + 96) / 2 * text)  # 96 prompts, 32 forwards
    assert tflops["adi:resolution"] == pytest.approx(6 * unet + (6 + 18) / 2 * text)  # 18 prompts, 6 forwards
    assert tflops["adi_unshared"] == pytest.approx(6 * unet + 96 * text)  # no shared encoding
    assert step_time._flop_estimate("cpu", "sd15", "unused", 512, list(results), results) is None
    assert step_time.method_spec("adi:resolution")[2] == "ADI [resolution]"
