"""The tiny offline SD3 pipeline (issue 25): both variants (with and without T5) load through the stock
``StableDiffusion3Pipeline.from_pretrained`` and generate with CFG; the three text encoders have
distinct widths laid out as ``encode_prompt`` expects; SD3.5's dual-attention blocks carry an
image-only ``attn2``."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from adi_lightning.conditioning import cross_attention_layers  # noqa: E402
from adi_lightning.tiny import DEFAULT_WORDS, build_t5_tokenizer, build_tiny_sd3_pipeline  # noqa: E402

D1, D2, P1, P2, D3 = 32, 48, 24, 40, 96  # CLIP-L, CLIP-G widths, their projections, T5 width
NO_T5 = {"text_encoder_3": None, "tokenizer_3": None}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3")
    return {"t5": build_tiny_sd3_pipeline(root / "sd3"),
            "no_t5": build_tiny_sd3_pipeline(root / "sd3_no_t5", with_t5=False)}


def _load(folder, **kwargs):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(folder, low_cpu_mem_usage=False, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipes(folders):
    return {"t5": _load(folders["t5"]), "no_t5": _load(folders["no_t5"], **NO_T5)}


@pytest.mark.parametrize("variant", ["t5", "no_t5"])
def test_both_variants_load_and_generate_with_cfg(variant, pipes):
    pipe = pipes[variant]
    assert (pipe.text_encoder_3 is None) == (variant == "no_t5") and (pipe.tokenizer_3 is None) == (variant == "no_t5")
    calls = []
    hook = pipe.transformer.register_forward_hook(
        lambda module, args, kwargs, output: calls.append((kwargs["hidden_states"].shape[0], kwargs["timestep"])),
        with_kwargs=True)
    try:
        image = pipe("a photo of a person jumping", num_inference_steps=2, guidance_scale=3.0, height=32, width=32,
                     generator=torch.Generator().manual_seed(0)).images[0]
    finally:
        hook.remove()
    assert image.size == (32, 32)
    # Two steps, each on the negative and the positive prompt (CFG), at the float timesteps sigma * 1000.
    assert [batch for batch, _ in calls] == [2, 2]
    assert [t[0].item() for _, t in calls] == pipe.scheduler.timesteps.tolist() and calls[0][1][0] == 1000.0


def test_the_no_t5_folder_lists_t5_as_null_and_stock_diffusers_needs_it_passed_as_none(folders):
    from diffusers import StableDiffusion3Pipeline

    index = json.loads((folders["no_t5"] / "model_index.json").read_text())
    assert index["text_encoder_3"] == [None, None] and index["tokenizer_3"] == [None, None]
    assert not (folders["no_t5"] / "text_encoder_3").exists()
    # What the SD3 family's loader must do: pass text_encoder_3=None, tokenizer_3=None for such a folder.
    with pytest.raises(ValueError, match="text_encoder_3"):
        StableDiffusion3Pipeline.from_pretrained(folders["no_t5"], low_cpu_mem_usage=False)
    t5 = json.loads((folders["t5"] / "model_index.json").read_text())
    assert t5["_class_name"] == "StableDiffusion3Pipeline"
    assert t5["text_encoder_3"] == ["transformers", "T5EncoderModel"]


def test_sd3_shapes_scheduler_and_vae(pipes):
    pipe = pipes["t5"]
    cfg = pipe.transformer.config
    assert (cfg.joint_attention_dim, cfg.pooled_projection_dim, cfg.in_channels) == (D3, P1 + P2, 16)
    assert cfg.caption_projection_dim == cfg.num_attention_heads * cfg.attention_head_dim == 20
    assert [type(e).__name__ for e in (pipe.text_encoder, pipe.text_encoder_2)] == ["CLIPTextModelWithProjection"] * 2
    assert pipe.scheduler.config.shift == 3.0 and type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    vae = pipe.vae.config
    assert (vae.latent_channels, vae.scaling_factor, vae.shift_factor) == (16, 1.5305, 0.0609)
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.pad_token != "!"
    # Both variants share the transformer and CLIP weights of one seed: dropping T5 changes nothing else.
    other = pipes["no_t5"]
    for name in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        a, b = getattr(pipe, name).state_dict(), getattr(other, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@torch.no_grad()
@pytest.mark.parametrize("variant", ["t5", "no_t5"])
def test_encode_prompt_lays_out_clip_l_clip_g_and_t5_at_their_own_widths(variant, pipes):
    pipe = pipes[variant]
    prompt = "a photo of a dog"
    embeds, _, pooled, _ = pipe.encode_prompt(prompt, prompt, prompt, device="cpu", do_classifier_free_guidance=False,
                                              max_sequence_length=16)
    assert embeds.shape == (1, 77 + 16, D3) and pooled.shape == (1, P1 + P2)
    parts = []
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        ids = tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
        parts.append(encoder(ids, output_hidden_states=True))
    torch.testing.assert_close(embeds[:, :77, :D1], parts[0].hidden_states[-2])
    torch.testing.assert_close(embeds[:, :77, D1:D1 + D2], parts[1].hidden_states[-2])
    assert not embeds[:, :77, D1 + D2:].any()  # zero-padded to the T5 width
    torch.testing.assert_close(pooled, torch.cat([parts[0].text_embeds, parts[1].text_embeds], -1))
    if variant == "t5":
        ids = pipe.tokenizer_3(prompt, padding="max_length", max_length=16, return_tensors="pt").input_ids
        torch.testing.assert_close(embeds[:, 77:], pipe.text_encoder_3(ids)[0])
        assert embeds[:, 77:].abs().sum() > 0
    else:
        assert not embeds[:, 77:].any()  # the pipeline feeds zeros in T5's place


def test_encoder_widths_differ_so_a_mixed_up_row_fails_on_a_shape(pipes):
    pipe = pipes["t5"]
    tables = [e.get_input_embeddings().weight for e in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3)]
    assert [t.shape[1] for t in tables] == [D1, D2, D3]
    with torch.no_grad():
        for i, j in ((0, 1), (1, 0), (1, 2)):
            with pytest.raises(RuntimeError):
                tables[j][5] = tables[i][5]


def test_t5_tokenizer_gives_one_id_per_word_and_appends_eos(pipes, tmp_path):
    tok = pipes["t5"].tokenizer_3
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2) and tok.model_max_length == 512
    ids = tok("a photo of a person jumping").input_ids
    assert len(ids) == 7 and ids[-1] == tok.eos_token_id and ids[0] == ids[3]
    assert tok.tokenize("jumping") == ["\u2581jumping"]
    assert tok.unk_token_id not in tok("a Zebra <A> close-up").input_ids  # printable ASCII never falls to <unk>
    assert len(tok.tokenize("zebra")) > 1 and len(tok) == 3 + 1 + len(DEFAULT_WORDS) + 94
    with pytest.raises(ValueError, match="whitespace"):
        build_t5_tokenizer(["close up"], tmp_path)


def test_dual_attention_blocks_carry_an_image_only_attn2(tmp_path):
    from diffusers import SD3Transformer2DModel

    out = build_tiny_sd3_pipeline(tmp_path / "sd35", with_t5=False, dual_attention_layers=(0, 1), qk_norm="rms_norm")
    transformer = SD3Transformer2DModel.from_pretrained(out / "transformer", low_cpu_mem_usage=False)
    blocks = transformer.transformer_blocks
    assert [b.attn2 is not None for b in blocks] == [True, True, False]
    for block in blocks[:2]:
        attn2 = block.attn2
        assert not attn2.is_cross_attention and attn2.add_k_proj is None  # no text projections at all
    # The UNet families' "*attn2 = cross-attention" discovery would wrongly take them: an SD3 family must not use it.
    assert list(cross_attention_layers(transformer)) == ["transformer_blocks.0.attn2", "transformer_blocks.1.attn2"]
    seen = []
    blocks[0].attn2.register_forward_hook(
        lambda module, args, kwargs, output: seen.append(
            (kwargs["hidden_states"].shape, kwargs.get("encoder_hidden_states"))),
        with_kwargs=True)
    with torch.no_grad():
        transformer(hidden_states=torch.zeros(1, 16, 16, 16), encoder_hidden_states=torch.zeros(1, 9, D3),
                    pooled_projections=torch.zeros(1, P1 + P2), timestep=torch.tensor([500.0]))
    assert seen == [(torch.Size([1, 64, 20]), None)]  # the 8 x 8 image patches alone, no text tokens


def test_widths_that_do_not_fit_are_refused(tmp_path):
    with pytest.raises(ValueError, match="joint_attention_dim"):
        build_tiny_sd3_pipeline(tmp_path / "a", t5_width=64)
    with pytest.raises(ValueError, match="patch size"):
        build_tiny_sd3_pipeline(tmp_path / "b", sample_size=34)
    with pytest.raises(ValueError, match="dual_attention_layers"):
        build_tiny_sd3_pipeline(tmp_path / "c", dual_attention_layers=(3,))
