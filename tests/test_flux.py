"""FLUX on the same training path as SD and SD3 (issue 25): a tiny FluxPipeline (2 double-stream and 2
single-stream blocks, guidance embedding; CLIP-L 32 wide for the pooled vector, T5 48 for the stream)
through the same module, Trainer and ``install_identifier``, with block-wise rows in T5
(adi_lightning.blockwise) and flow matching with FLUX's dynamic shift."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import adi_lightning
from adi_lightning.backbone import load_backbone
from adi_lightning.blockwise import blockwise_block_to_row
from adi_lightning.families import FluxFamily
from adi_lightning.families.flux import latent_image_ids, pack_latents, unpack_latents

D1, D3 = 32, 48  # CLIP-L (pooled only), T5 (the stream)
BLOCKS, S = 4, 512
PATHS = ["transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0", "single_transformer_blocks.1"]


@pytest.fixture()
def flux_module(tiny_flux_pipeline, make_module):
    def make(**overrides):
        return make_module(pretrained_model_name_or_path=tiny_flux_pipeline, **overrides)

    return make


def test_packing_is_flux_pipelines_and_inverts():
    from diffusers import FluxPipeline

    latents = torch.randn(2, 16, 6, 8, generator=torch.Generator().manual_seed(0))
    packed = pack_latents(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 16, 6, 8))
    assert torch.equal(unpack_latents(packed, 6, 8), latents)
    assert torch.equal(unpack_latents(packed, 6, 8), FluxPipeline._unpack_latents(packed, 6, 8, 1))
    assert torch.equal(latent_image_ids(6, 8), FluxPipeline._prepare_latent_image_ids(2, 3, 4, None, torch.float32))
    with pytest.raises(ValueError, match="2x2 patches: 5x8 is not even"):
        pack_latents(torch.zeros(1, 16, 5, 8))


def test_flux_folder_loads_as_the_flux_family_through_the_project_loader(tiny_flux_pipeline, flux_module):
    family = load_backbone(tiny_flux_pipeline)
    assert isinstance(family, FluxFamily) and type(family.pipe).__name__ == "FluxPipeline"
    assert family.text_dims == [D1, D3] and family.pooled_layer == 2
    module = flux_module()
    assert module.info.family == "flux" and module.info.layer_kind == "double- and single-stream blocks"
    assert module.info.prediction_type == "flow" and module.info.num_cross_attention_layers == BLOCKS
    assert module.identifier.layer_paths == PATHS and module.identifier.embedding.shape == (BLOCKS, D1 + D3)
    assert module.transformer is module.denoiser and not hasattr(module, "unet")
    assert torch.equal(blockwise_block_to_row(module.transformer), torch.arange(BLOCKS))
    assert module.objective.dynamic and module.objective.timestep_scale == 1.0
    row = module.identifier.embedding[0]
    for tokenizer, encoder, part in zip(module.family.tokenizers, module.family.text_encoders,
                                        module.family.split_rows(row)):
        (word,) = tokenizer.encode("standing", add_special_tokens=False)
        assert torch.equal(part, encoder.get_input_embeddings().weight[word].float())
    with pytest.raises(ValueError, match=r"row_groups=resolution has no meaning for an MMDiT \(FLUX\): its 4 "
                                         "double- and single-stream blocks"):
        flux_module(row_groups="resolution")


@torch.no_grad()
def test_encodings_are_the_stock_encode_prompt_per_block(tiny_flux_pipeline, flux_module, stock_pipeline):
    """Plain prompts and the untrained identifier (each part the embedding of "standing") are exactly
    FluxPipeline.encode_prompt's T5 stream, once per block, and its CLIP-L pooled vector; FLUX gets no negative."""
    module = flux_module()
    pipe = stock_pipeline(tiny_flux_pipeline)
    embeds, pooled, text_ids = pipe.encode_prompt("a photo of a dog", None, device="cpu")
    assert embeds.shape == (1, S, D3) and pooled.shape == (1, D1) and torch.equal(text_ids, torch.zeros(S, 3))
    inputs = module.family.prompt_inputs(["a photo of a dog"], None, BLOCKS, torch.float32)
    assert sorted(inputs) == ["pooled_prompt_embeds", "prompt_embeds"]
    torch.testing.assert_close(inputs["prompt_embeds"], embeds.repeat(1, BLOCKS, 1), rtol=0, atol=1e-6)
    torch.testing.assert_close(inputs["pooled_prompt_embeds"], pooled, rtol=0, atol=1e-6)
    with_identifier = module.prompt_embeddings(["a photo of a person <A>"], module.identifier.initial)
    word, word_pooled, _ = pipe.encode_prompt("a photo of a person standing", None, device="cpu")
    torch.testing.assert_close(with_identifier["prompt_embeds"], word.repeat(1, BLOCKS, 1), rtol=0, atol=1e-5)
    torch.testing.assert_close(with_identifier["pooled_prompt_embeds"], word_pooled, rtol=0, atol=1e-5)


@torch.no_grad()
def test_row_b_t5_part_reaches_only_chunk_b_and_the_middle_rows_clip_part_only_the_pooled_vector(flux_module):
    module = flux_module()
    family = module.family
    ids = family.tokenize(["a photo of a person <A>"])
    table = module.identifier.embedding.detach().clone()
    base, base_pooled = family.encode_text(ids, table[None], BLOCKS)
    assert base.shape == (1, BLOCKS * S, D3) and base_pooled.shape == (1, D1)
    for block in range(BLOCKS):
        for part, (start, stop) in enumerate([(0, D1), (D1, D1 + D3)]):
            perturbed = table.clone()
            perturbed[block, start:stop] += 1.0
            context, pooled = family.encode_text(ids, perturbed[None], BLOCKS)
            changed = [b for b in range(BLOCKS) if not torch.equal(context[:, b * S:(b + 1) * S],
                                                                   base[:, b * S:(b + 1) * S])]
            assert changed == ([] if part == 0 else [block]), (block, part)
            assert torch.equal(pooled, base_pooled) != (part == 0 and block == family.pooled_layer), (block, part)


def test_equal_rows_are_textual_inversion_bit_for_bit_in_the_training_forward(flux_module,
                                                                              equal_rows_training_forward):
    """Every block's row equal: the training forward (B equal T5 chunks through the block-wise hooks, the
    pooled vector from the same row) is the stock FLUX forward on ONE plain encoding, bit for bit."""
    args, kwargs = equal_rows_training_forward(flux_module, S)
    assert kwargs["guidance"].tolist() == [3.5] * args[0].shape[0]


def test_the_flow_matching_objective_with_the_dynamic_shift_drives_the_loss(flux_module, tiny_batch):
    """Packed noisy latents, timestep = sigma (not sigma * 1000), sigma shifted by exp(mu) of the packed
    image's 8*8 tokens, and the velocity target unpacked."""
    import math

    from adi_lightning import flow_matching

    module = flux_module(mask_threshold=1.0, cache_latents=False, timestep_sampling="logit_normal")
    batch = tiny_batch(with_partners=False, batch_size=1)
    seen = {}
    hook = module.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: seen.update(noisy=args[0], timestep=kwargs["timestep"], img_ids=kwargs["img_ids"]),
        with_kwargs=True)
    try:
        with torch.no_grad():
            module.compute_loss(batch, draw_step=4)
    finally:
        hook.remove()
    latents = module._latents(batch, batch["pixel_values"])
    assert latents.shape[1:] == (16, 16, 16)
    shift = math.exp(flow_matching.dynamic_shift_mu(64))
    noise, sigmas = flow_matching.keyed_noise_and_sigmas(batch["key"].tolist(), 4, 1, latents, "logit_normal", shift)
    assert torch.equal(seen["timestep"], sigmas)
    assert torch.equal(seen["noisy"], pack_latents(flow_matching.flow_noisy_latents(latents, noise, sigmas)))
    assert torch.equal(seen["img_ids"], latent_image_ids(16, 16))


def test_per_sample_gradients_under_masking_equal_per_sample_autograd(flux_module, tiny_batch):
    batch = tiny_batch()
    module = flux_module(mask_threshold=0.5, cache_latents=False)
    loss, per_sample = module.compute_loss(batch)
    table = module.identifier.embedding
    expected = torch.stack([torch.autograd.grad(l, table, retain_graph=True)[0] for l in per_sample])
    module.pop_role_grads()
    loss.backward()
    recorded = torch.cat(module.pop_role_grads())
    assert recorded.shape == (2, 3, BLOCKS, D1 + D3)
    assert (recorded.flatten(0, 1) - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert not torch.allclose(recorded[:, 0], recorded[:, 2])
    clip, t5 = module.family.split_rows(expected.abs().sum(0))
    assert (t5.sum(-1) > 0).all()  # every block's T5 part trains
    assert [bool(v > 0) for v in clip.sum(-1)] == [b == module.family.pooled_layer for b in range(BLOCKS)]


@pytest.mark.e2e
@pytest.mark.parametrize("method", ["adi", "pplus", "ti"])
def test_a_few_training_steps_change_only_the_identifier(method, flux_module, two_steps_change_only_the_identifier):
    after = two_steps_change_only_the_identifier(flux_module, method)
    assert after.shape == (1 if method == "ti" else BLOCKS, D1 + D3)


@torch.no_grad()
def test_generate_and_install_identifier_draw_the_same_images_and_remove_restores_exactly(
        tiny_flux_pipeline, flux_module, stock_pipeline, random_identifier, tmp_path):
    """module.generate (the stock FluxPipeline with block-wise prompt_embeds) and install_identifier on a
    stock FluxPipeline (its encode_prompt shadowed) draw the same images; removing it restores the stock
    pipeline's images bit for bit."""
    module = flux_module(image_size=32)
    path, _ = random_identifier(module, tmp_path / "rows.safetensors")
    prompt = "a photo of a cat <A>"
    ours = module.generate([prompt], [1])
    assert ours[0].size == (32, 32)
    pipe = stock_pipeline(tiny_flux_pipeline)
    kwargs = dict(num_inference_steps=2, guidance_scale=2.0, height=32, width=32, output_type="np")
    before = pipe("a photo of a cat", generator=torch.Generator().manual_seed(1), **kwargs).images
    adi_lightning.install_identifier(pipe, path)
    installed = pipe(prompt, generator=torch.Generator().manual_seed(1), **kwargs).images
    installed_pil = pipe(prompt, generator=torch.Generator().manual_seed(1), **{**kwargs, "output_type": "pil"})
    assert np.array_equal(np.asarray(installed_pil.images[0]), np.asarray(ours[0]))
    plain_installed = pipe("a photo of a cat", generator=torch.Generator().manual_seed(1), **kwargs).images
    np.testing.assert_allclose(plain_installed, before, rtol=0, atol=1e-6)  # no placeholder: TI-equal chunks
    assert not np.allclose(installed, before, atol=1e-4)
    with pytest.raises(ValueError, match="prompt_2 differs from prompt"):
        pipe(prompt, prompt_2="a dog", generator=torch.Generator().manual_seed(1), **kwargs)
    with pytest.raises(ValueError, match="max_sequence_length=256: the installed identifier's block-wise routing "
                                         "reads 512 T5 tokens"):
        pipe(prompt, max_sequence_length=256, generator=torch.Generator().manual_seed(1), **kwargs)
    adi_lightning.remove_identifier(pipe)
    assert "encode_prompt" not in pipe.__dict__ and blockwise_block_to_row(pipe.transformer) is None
    assert np.array_equal(pipe("a photo of a cat", generator=torch.Generator().manual_seed(1), **kwargs).images,
                          before)


def test_the_guidance_scale_defaults_to_the_family_s_and_a_typed_one_is_honoured(flux_module, make_module,
                                                                                 monkeypatch):
    """Unset, FLUX generates at the embedded guidance its training forward gives the transformer (3.5), an
    SD backbone at 7.5 as before; the value in force is in the hparams and reaches the stock pipeline; a
    typed value wins."""
    from adi_lightning import generation

    used = []
    monkeypatch.setattr(generation, "run_seeded", lambda pipe, inputs, seeds, **kwargs: used.append(kwargs))
    unset = flux_module(guidance_scale=None, image_size=32)
    features = (torch.zeros(2, BLOCKS * S, D3), torch.zeros(2, D1))
    trained = unset.family.denoiser_inputs(features, torch.float32, (32, 32))["guidance"].tolist()
    for module, expected in [(unset, 3.5), (flux_module(guidance_scale=5.0, image_size=32), 5.0),
                             (make_module(guidance_scale=None), 7.5)]:
        assert module.hparams.guidance_scale == module.hparams_initial.guidance_scale == expected  # logged too
        module.generate(["a photo of a cat <A>"], [1])
        assert used.pop()["guidance_scale"] == expected
    assert trained == [unset.hparams.guidance_scale] * 2


@torch.no_grad()
def test_a_textual_inversion_flux_identifier_exports_losslessly_as_clip_l_t5xxl(
        tiny_flux_pipeline, flux_module, stock_pipeline, random_identifier, tmp_path, capsys):
    """--format flux writes a one-row FLUX identifier as clip_l + t5xxl, exactly its row split by text
    encoder; each key set into its stock encoder's token embedding draws, in the stock FluxPipeline,
    exactly what install_identifier draws."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from adi_lightning.export import WRITTEN_BY, main as export_main

    path, table = random_identifier(flux_module(layerwise=False), tmp_path / "ti.safetensors")
    out = tmp_path / "corgi_jump.safetensors"
    # Nothing to distill: a measurement flag typed is refused by name, not ignored.
    assert export_main(["--identifier", str(path), "--format", "flux", "--out", str(out), "--pipeline",
                        str(tiny_flux_pipeline)]) == 1
    assert f"error: --pipeline: the identifier {path} has one row, nothing to distill" in capsys.readouterr().err
    assert not out.exists()
    assert export_main(["--identifier", str(path), "--format", "flux", "--out", str(out)]) == 0
    assert "lossless" in capsys.readouterr().out
    parts = load_file(str(out))
    assert sorted(parts) == ["clip_l", "t5xxl"]
    assert torch.equal(torch.cat([parts["clip_l"], parts["t5xxl"]], dim=-1), table)
    with safe_open(str(out), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["written_by"] == WRITTEN_BY and meta["method"] == "lossless" and meta["token"] == "<A>"

    kwargs = dict(num_inference_steps=2, guidance_scale=3.5, height=32, width=32, output_type="np")
    installed = stock_pipeline(tiny_flux_pipeline)
    adi_lightning.install_identifier(installed, path)
    expected = installed("a photo of a cat <A>", generator=torch.Generator().manual_seed(1), **kwargs).images
    stock = stock_pipeline(tiny_flux_pipeline)
    for key, tokenizer, encoder in zip(["clip_l", "t5xxl"], [stock.tokenizer, stock.tokenizer_2],
                                       [stock.text_encoder, stock.text_encoder_2]):
        tokenizer.add_tokens(["<A>"])
        encoder.resize_token_embeddings(len(tokenizer))
        encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids("<A>")] = parts[key][0]
    drawn = stock("a photo of a cat <A>", generator=torch.Generator().manual_seed(1), **kwargs).images
    assert np.array_equal(drawn, expected)


def test_a_block_wise_flux_identifier_is_refused_by_name_and_the_formats_refuse_other_families(
        flux_module, make_module, random_identifier, tmp_path):
    from adi_lightning.export import export_identifier

    rows, _ = random_identifier(flux_module(), tmp_path / "rows.safetensors")
    out = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match=r"block-wise FLUX identifier \(4 different rows\): --format flux writes "
                                         r"one-row .* distillation does not run on FLUX yet"):
        export_identifier(rows, out, "flux")
    flux_file, _ = random_identifier(flux_module(layerwise=False), tmp_path / "flux.safetensors")
    for fmt in ("ti", "webui", "sdxl", "sd3"):
        with pytest.raises(ValueError, match=r"flux\.safetensors was trained on a flux backbone: .*--format flux"):
            export_identifier(flux_file, out, fmt)
    sd_file = make_module(layerwise=False).save_identifier(tmp_path / "sd.safetensors")
    with pytest.raises(ValueError, match=r"--format flux needs a FLUX identifier; .*sd\.safetensors was trained on a "
                                         r"sd backbone: use --format ti or webui"):
        export_identifier(sd_file, out, "flux")
    assert not out.exists()


# ------------------------------------------------------------------ generated partners, resume, multi-start
def test_img2img_partners_are_the_stock_flux_img2img_pipeline_at_the_image_s_size_and_embedded_guidance(
        tiny_flux_pipeline, flux_module, img2img_is_the_stock_pipeline):
    """module.img2img (what data.action_different=generate calls) runs FluxImg2ImgPipeline over the family's
    components with the plain-prompt inputs (B equal T5 chunks, no negatives) at the input image's size (the
    stock pipeline resizes it to its default size unless given height and width) and hands ``guidance`` to
    the transformer as FLUX's embedded guidance: it draws what the stock img2img pipeline, loaded as a user
    would, draws from the prompt string at that size and guidance_scale. Unset, the guidance is FLUX's 3.5."""
    from PIL import Image

    from adi_lightning.families.flux import TRAINING_GUIDANCE

    module = flux_module()
    assert type(module.family.stock_pipeline(img2img=True)).__name__ == "FluxImg2ImgPipeline"
    guidance = []
    hook = module.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: guidance.append(kwargs["guidance"]), with_kwargs=True)
    try:
        stock = img2img_is_the_stock_pipeline(module, tiny_flux_pipeline, 2.0, height=32, width=32)
        assert guidance and set(torch.cat(guidance).tolist()) == {2.0}
        guidance.clear()
        (image,) = module.img2img([Image.new("RGB", (32, 32))], ["a photo of a person sitting"], [0], steps=2)
        assert guidance and set(torch.cat(guidance).tolist()) == {TRAINING_GUIDANCE} and image.size == (32, 32)
    finally:
        hook.remove()
    assert type(stock).__name__ == "FluxImg2ImgPipeline"


@pytest.mark.e2e
def test_an_exemplar_only_folder_trains_on_flux_with_partners_generated_at_the_embedded_guidance(
        flux_module, fit_on_generated_partners):
    """data.action_different=generate on FLUX: prepare_data makes the 32 px partners with the frozen backbone's
    FluxImg2ImgPipeline at data.generate_guidance's default, FLUX's embedded 3.5 (the guidance it trains
    with), one anchor per transformer call, and a masked fit trains on them."""
    from adi_lightning.families.flux import TRAINING_GUIDANCE

    module = flux_module(mask_threshold=0.5)
    calls = []
    hook = module.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append(((args[0] if args else kwargs["hidden_states"]).shape[0],
                                              kwargs["guidance"])), with_kwargs=True)
    try:
        fit_on_generated_partners(module)
    finally:
        hook.remove()
    assert sum(rows == 1 for rows, _ in calls) >= 4  # img2img: each of the 4 anchors, alone
    assert {rows for rows, _ in calls} == {1, 6}  # and the training forward: 2 triples
    assert set(torch.cat([guidance for _, guidance in calls]).tolist()) == {TRAINING_GUIDANCE}


@pytest.mark.e2e
def test_resume_on_flux_is_bit_identical_to_an_uninterrupted_fit(tiny_flux_pipeline, resumed_fit_is_the_straight_fit):
    """A masked ADI fit on FLUX stopped at its step-2 checkpoint (mid-epoch) and resumed gives the uninterrupted
    4-step fit's identifier bit for bit (the keyed flow-time draws under the dynamic shift, the noise, the
    sampler position and AdamW state all restored)."""
    straight, trainer = resumed_fit_is_the_straight_fit(tiny_flux_pipeline, 2, steps=4)
    assert straight.shape == (BLOCKS, D1 + D3) and trainer.lightning_module.family.name == "flux"


def test_the_large_t_score_draws_flow_times_in_the_large_t_band_then_the_dynamic_shift(
        flux_module, large_t_score_draws_shifted_flow_times):
    """Multi-start's score on FLUX draws flow time u uniform in [large_t_min, 1), then the dynamic shift of the
    32 px anchors' 8*8 packed tokens, exp(mu(64)), not the scheduler config's static shift; the transformer
    gets timestep = sigma."""
    import math

    from adi_lightning import flow_matching

    module = flux_module(mask_threshold=0.5, large_t_min=0.6, timestep_sampling="logit_normal")
    shift = math.exp(flow_matching.dynamic_shift_mu(64))
    assert shift != module.family.pipe.scheduler.config.shift  # the config's static shift, which FLUX does not use
    large_t_score_draws_shifted_flow_times(module, shift, 1.0)


@pytest.mark.e2e
def test_multi_start_scores_each_start_and_continues_the_lowest_on_flux(flux_module, multi_start_continues_the_lowest):
    """model.starts=2 on FLUX (T5 rows per double- and single-stream block, the dynamic shift): both starts
    begin at the initial rows, each is scored by the real large-t anchor loss (fewer draws), the lower is
    continued and recorded."""
    multi_start_continues_the_lowest(flux_module(mask_threshold=0.5, learning_rate=0.05, starts=2, start_steps=1))
