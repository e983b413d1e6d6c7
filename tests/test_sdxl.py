"""SDXL on the same path (issue 15): a tiny SDXL-shaped pipeline (two text encoders of widths 32
and 48, pooled projection 24, ``text_time`` added conditions) through the same module, CLI and
``install_identifier`` as SD 1.x."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import adi_lightning
from adi_lightning.cli import main
from adi_lightning.conditioning import cross_attention_layers
from adi_lightning.families import StableDiffusionXLFamily
from adi_lightning.identifier import read_identifier

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "experiments" / "tiny.yaml"
D1, D2, P = 32, 48, 24
METHODS = {"adi": [], "pplus": ["--model.mask_threshold=1.0"],
           "ti": ["--model.mask_threshold=1.0", "--model.layerwise=false"]}


def _stock(path: str):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(path, low_cpu_mem_usage=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sdxl_folder_loads_as_the_sdxl_family(tiny_sdxl_pipeline, make_module):
    module = make_module(pretrained_model_name_or_path=tiny_sdxl_pipeline)
    family = module.family
    assert isinstance(family, StableDiffusionXLFamily) and module.info.family == "sdxl"
    paths = module.identifier.layer_paths
    assert len(paths) == len(cross_attention_layers(module.unet)) == 17  # read from the UNet
    assert family.text_dims == [D1, D2] and module.identifier.embedding.shape == (17, D1 + D2)
    assert paths[family.pooled_layer] == "mid_block.attentions.0.transformer_blocks.0.attn2"
    # Each encoder's part of a row starts as that encoder's embedding of the initializer word.
    row = module.identifier.embedding[0]
    for tokenizer, encoder, part in zip(family.tokenizers, family.text_encoders, family.split_rows(row)):
        word = tokenizer.convert_tokens_to_ids("standing</w>")
        assert torch.equal(part, encoder.get_input_embeddings().weight[word].float())
    assert module.text_encoder_2 is family.text_encoders[1]  # registered under diffusers' name


@torch.no_grad()
def test_each_text_encoder_gets_its_own_depth_heads_and_activation(tmp_path):
    """As SDXL's CLIP ViT-L (quick_gelu) and OpenCLIP bigG (gelu), which step_time.py builds at real size."""
    from transformers import CLIPTextConfig

    from adi_lightning.tiny import build_tiny_sdxl_pipeline

    out = build_tiny_sdxl_pipeline(tmp_path / "xl", text_layers=(1, 3), text_heads=(2, 4),
                                   text_acts=("quick_gelu", "gelu"))
    configs = [CLIPTextConfig.from_pretrained(out / part) for part in ("text_encoder", "text_encoder_2")]
    assert [(c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size, c.hidden_act)
            for c in configs] == [(D1, 1, 2, 4 * D1, "quick_gelu"), (D2, 3, 4, 4 * D2, "gelu")]
    unet = json.loads((out / "unet" / "config.json").read_text())
    assert unet["cross_attention_dim"] == D1 + D2
    assert unet["projection_class_embeddings_input_dim"] == 6 * unet["addition_time_embed_dim"] + P


def test_row_l_reaches_only_layer_l_in_both_encoders_parts_and_the_pooled_row_only_the_pooled_embedding(
        tiny_sdxl_pipeline, make_module, record_contexts):
    module = make_module(pretrained_model_name_or_path=tiny_sdxl_pipeline)
    family, layers = module.family, module.identifier.num_layers
    recorders = record_contexts(module)
    ids = family.tokenize(["a photo of a person <A>"])
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))

    def seen(table):
        features = family.encode_text(ids, table.unsqueeze(0), layers)
        module.unet(latents, torch.tensor([500]), **family.denoiser_inputs(features, torch.float32, (32, 32)))
        return [r.context for r in recorders], features[1]

    table = module.identifier.embedding.detach().clone()
    base, base_pooled = seen(table)
    assert all(c.shape == (1, 77, D1 + D2) for c in base)
    for layer in range(layers):
        for part, channels in ((0, slice(0, D1)), (1, slice(D1, D1 + D2))):
            perturbed = table.clone()
            perturbed[layer, channels] += 1.0
            after, pooled = seen(perturbed)
            assert [i for i in range(layers) if not torch.equal(base[i], after[i])] == [layer], (layer, part)
            other = slice(D1, D1 + D2) if part == 0 else slice(0, D1)
            assert not torch.equal(base[layer][..., channels], after[layer][..., channels])
            assert torch.equal(base[layer][..., other], after[layer][..., other])  # one vector per encoder
            assert torch.equal(pooled, base_pooled) != (part == 1 and layer == family.pooled_layer), (layer, part)


def test_conditioning_matches_the_stock_pipeline(tiny_sdxl_pipeline, make_module):
    module = make_module(pretrained_model_name_or_path=tiny_sdxl_pipeline)
    family, layers = module.family, module.identifier.num_layers
    # Plain prompts: exactly StableDiffusionXLPipeline.encode_prompt, repeated for every layer.
    pipe = _stock(tiny_sdxl_pipeline)
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt("a photo of a dog", device="cpu")
    inputs = family.prompt_inputs(["a photo of a dog"], None, layers, torch.float32)
    torch.testing.assert_close(inputs["prompt_embeds"], embeds.repeat(1, layers, 1), rtol=0, atol=1e-6)
    torch.testing.assert_close(inputs["pooled_prompt_embeds"], pooled, rtol=0, atol=1e-6)
    # force_zeros_for_empty_prompt: the unconditional context and pooled embedding are zeros.
    assert not inputs["negative_prompt_embeds"].any() and not inputs["negative_pooled_prompt_embeds"].any()
    assert inputs["negative_prompt_embeds"].shape == (1, layers * 77, D1 + D2) and negative_pooled.shape == (1, P)
    # Time ids: the stock pipeline's for an H x W image, (H, W, 0, 0, H, W).
    stock_ids = pipe._get_add_time_ids((32, 32), (0, 0), (32, 32), torch.float32, text_encoder_projection_dim=P)
    features = family.encode_text(family.tokenize(["a photo of a dog <A>"] * 2), module.identifier.embedding[None].expand(2, -1, -1), layers)
    added = family.denoiser_inputs(features, torch.float32, (32, 32))["added_cond_kwargs"]
    assert torch.equal(added["time_ids"], stock_ids.repeat(2, 1)) and added["text_embeds"].shape == (2, P)


def test_float16_vae_encodes_in_float32_as_force_upcast_asks(tiny_sdxl_pipeline):
    from adi_lightning.backbone import load_backbone

    family = load_backbone(tiny_sdxl_pipeline, "float16")
    assert family.vae.dtype == torch.float16 and family.vae.config.force_upcast
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = family.encode_images(pixels)
    assert family.vae.dtype == torch.float16  # put back
    reference = family.vae.float().encode(pixels).latent_dist.mode() * family.vae.config.scaling_factor
    assert latents.dtype == torch.float32 and torch.equal(latents, reference)


@pytest.mark.e2e
@pytest.mark.parametrize("method", list(METHODS))
def test_fit_predict_and_install_identifier_give_the_same_pixels(method, tiny_sdxl_pipeline, tiny_data, tmp_path):
    common = ["--config", str(TINY), f"--model.pretrained_model_name_or_path={tiny_sdxl_pipeline}",
              "--model.num_inference_steps=2", "--trainer.enable_progress_bar=false",
              "--trainer.enable_model_summary=false", *METHODS[method]]
    main(args=["fit", *common, f"--data.root={tiny_data}", f"--trainer.default_root_dir={tmp_path / 'fit'}",
               "--trainer.max_steps=2", "--trainer.limit_val_batches=0"])
    (run,) = (tmp_path / "fit").iterdir()
    identifier = run / "identifier.safetensors"
    table, meta = read_identifier(identifier)
    assert table.shape == ((17 if method != "ti" else 1), D1 + D2) and json.loads(meta["text_dims"]) == [D1, D2]
    assert json.loads((run / "run_info.json").read_text())["backbone"]["family"] == "sdxl"

    main(args=["predict", *common, "--data.root=null", f"--trainer.default_root_dir={tmp_path / 'predict'}",
               f"--model.identifier_path={identifier}"])
    (out,) = (tmp_path / "predict").iterdir()
    singles = sorted((out / "images" / "predict").glob("*.png"))
    assert singles
    pipe = _stock(tiny_sdxl_pipeline)
    before = pipe("a photo of a cat", num_inference_steps=2, guidance_scale=3.0, output_type="np",
                  generator=torch.Generator().manual_seed(1)).images
    adi_lightning.install_identifier(pipe, identifier)
    prompts = ["a photo of a person <A>", "a photo of a cat <A>"]  # configs/data/tiny.yaml predict_prompts
    for single in singles:
        index, seed = single.stem.split("_seed")
        image = pipe(prompts[int(index)], num_inference_steps=2, guidance_scale=3.0,
                     generator=torch.Generator().manual_seed(int(seed))).images[0]
        with Image.open(single) as saved:
            np.testing.assert_array_equal(np.asarray(saved.convert("RGB")), np.asarray(image), err_msg=single.name)
    adi_lightning.remove_identifier(pipe)
    after = pipe("a photo of a cat", num_inference_steps=2, guidance_scale=3.0, output_type="np",
                 generator=torch.Generator().manual_seed(1)).images
    assert (after == before).all() and "<A>" not in pipe.tokenizer_2.get_vocab()
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"


def test_an_sd_identifier_does_not_fit_sdxl(make_module, tiny_sdxl_pipeline, tmp_path):
    path = make_module().save_identifier(tmp_path / "sd.safetensors")
    with pytest.raises(ValueError, match="D=32 but the pipeline's text encoder width is 80"):
        adi_lightning.install_identifier(_stock(tiny_sdxl_pipeline), path)


def test_per_sample_gradients_stay_exact_with_every_speed_switch(tiny_sdxl_pipeline, make_module, tiny_data):
    """The shared text encoding carries SDXL's two features (context and pooled) through one VJP
    per member; checkpointing covers both text encoders."""
    from adi_lightning.data import ActionTripleDataModule

    dm = ActionTripleDataModule(root=tiny_data, action="jumping", resolution=32, batch_size=2, with_partners=True,
                                repeats=2, seed=3)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    reference = make_module(pretrained_model_name_or_path=tiny_sdxl_pipeline, share_text_encoding=False,
                            cache_latents=False)
    loss, per_sample = reference.compute_loss(batch)
    table = reference.identifier.embedding
    expected = torch.stack([torch.autograd.grad(l, table, retain_graph=True)[0] for l in per_sample])
    module = make_module(pretrained_model_name_or_path=tiny_sdxl_pipeline, share_text_encoding=True,
                         gradient_checkpointing=True, channels_last=True)
    module.train()
    from adi_lightning import speed

    assert len(speed.checkpointed_text_layers(module.text_encoder_2)) == 2
    loss, _ = module.compute_loss(batch)
    loss.backward()
    recorded = torch.cat(module.pop_role_grads()).flatten(0, 1)
    assert recorded.shape == expected.shape == (6, 17, D1 + D2)
    assert (recorded - expected).abs().max() <= 1e-5 * expected.abs().max()
    pooled_row = module.family.pooled_layer
    assert expected[:, pooled_row].abs().sum() > 0 and expected[:, :, D1:].abs().sum() > 0


@pytest.fixture()
def trained_sdxl_identifier(tiny_sdxl_pipeline, make_module, tmp_path) -> Path:
    """A 17-row SDXL identifier whose rows differ (random steps away from the initializer)."""
    module = make_module(pretrained_model_name_or_path=tiny_sdxl_pipeline)
    with torch.no_grad():
        module.identifier.embedding.add_(torch.randn(17, D1 + D2, generator=torch.Generator().manual_seed(0)))
    return module.save_identifier(tmp_path / "xl.safetensors")


def test_clip_l_clip_g_export_loads_through_load_textual_inversion_as_install_identifier_draws_it(
        tiny_sdxl_pipeline, make_module, trained_sdxl_identifier, tmp_path):
    """The snippet in docs/inference.md ("SDXL"): ``load_file`` then one ``load_textual_inversion`` per key, on the stock
    pipeline, draws what ``install_identifier`` draws from a one-row identifier holding the same
    vector (within 1/255 per pixel)."""
    from safetensors.torch import load_file

    from adi_lightning.export import main as export_main

    out = tmp_path / "xl_action.safetensors"
    assert export_main(["--identifier", str(trained_sdxl_identifier), "--format", "sdxl", "--out", str(out),
                        "--method", "mean", "--lossy"]) == 0
    state_dict = load_file(out)
    table, _ = read_identifier(trained_sdxl_identifier)
    assert set(state_dict) == {"clip_l", "clip_g"}  # tiny widths here; SDXL base: [1, 768] and [1, 1280]
    assert torch.equal(torch.cat([state_dict["clip_l"], state_dict["clip_g"]], dim=-1), table.mean(0, keepdim=True))
    assert state_dict["clip_l"].shape == (1, D1) and state_dict["clip_g"].shape == (1, D2)

    one_row = make_module(pretrained_model_name_or_path=tiny_sdxl_pipeline, layerwise=False)
    with torch.no_grad():
        one_row.identifier.embedding.copy_(table.mean(0, keepdim=True))
    installed = _stock(tiny_sdxl_pipeline)
    adi_lightning.install_identifier(installed, one_row.save_identifier(tmp_path / "one_row.safetensors"))
    pipe = _stock(tiny_sdxl_pipeline)
    pipe.load_textual_inversion(state_dict["clip_l"], token="<A>", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state_dict["clip_g"], token="<A>", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    for encoder, part in ((pipe.text_encoder, "clip_l"), (pipe.text_encoder_2, "clip_g")):
        assert torch.equal(encoder.get_input_embeddings().weight[-1], state_dict[part][0])

    def draw(p, prompt):
        return p(prompt, num_inference_steps=2, guidance_scale=3.0, output_type="np",
                 generator=torch.Generator().manual_seed(1)).images

    for prompt in ("a photo of a dog <A>", "a photo of a cat <A>"):
        loaded = draw(pipe, prompt)
        assert np.abs(loaded - draw(installed, prompt)).max() <= 1 / 255, prompt
        assert (loaded != draw(pipe, prompt.replace(" <A>", ""))).any()  # the vector is used


def test_sdxl_export_keeps_one_row_and_each_format_refuses_the_other_family(
        trained_sdxl_identifier, make_module, tmp_path):
    from safetensors.torch import load_file

    from adi_lightning.export import export_identifier, main as export_main

    table, _ = read_identifier(trained_sdxl_identifier)
    row = load_file(export_identifier(trained_sdxl_identifier, tmp_path / "row6.safetensors", "sdxl", row=6,
                                      lossy=True).path)
    assert torch.equal(row["clip_l"], table[6:7, :D1]) and torch.equal(row["clip_g"], table[6:7, D1:])
    # ti / webui would write one [1, D1 + D2] vector that no SDXL loader reads; sdxl needs two encoders.
    for fmt in ("ti", "webui"):
        with pytest.raises(ValueError, match="use --format sdxl"):
            export_identifier(trained_sdxl_identifier, tmp_path / "x", fmt)
    sd_identifier = make_module().save_identifier(tmp_path / "sd.safetensors")
    with pytest.raises(ValueError, match="use --format ti or webui"):
        export_identifier(sd_identifier, tmp_path / "x", "sdxl")
    assert export_main(["--identifier", str(trained_sdxl_identifier), "--out", str(tmp_path / "x")]) == 1
    assert not (tmp_path / "x").exists()
