"""SD3 on the same training path as SD 1.x and SDXL (issue 25): a tiny StableDiffusion3Pipeline (MMDiT with
3 joint blocks; CLIP-L 32, CLIP-G 48, T5 96 wide, or no T5) through the same module, Trainer and
``install_identifier``, with block-wise rows (adi_lightning.blockwise) and flow matching."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

import adi_lightning
from adi_lightning.backbone import load_backbone
from adi_lightning.blockwise import blockwise_block_to_row
from adi_lightning.data import ActionTripleDataModule
from adi_lightning.families import StableDiffusion3Family
from adi_lightning.identifier import IdentifierTokenEmbedding

D1, D2, D3, P = 32, 48, 96, 24 + 40  # CLIP-L, CLIP-G, T5 widths; pooled = both CLIP projections
BLOCKS, T = 3, 77 + 256
VARIANTS = ["t5", "no_t5"]


@pytest.fixture(scope="session")
def sd3_folders(tiny_sd3_pipeline, tiny_sd3_pipeline_no_t5):
    return {"t5": tiny_sd3_pipeline, "no_t5": tiny_sd3_pipeline_no_t5}


def _dim(variant: str) -> int:
    return D1 + D2 + (D3 if variant == "t5" else 0)


@pytest.fixture()
def sd3_module(sd3_folders, make_module):
    def make(variant="t5", **overrides):
        return make_module(pretrained_model_name_or_path=sd3_folders[variant], **overrides)

    return make


@pytest.mark.parametrize("variant", VARIANTS)
def test_sd3_folder_loads_as_the_sd3_family_through_the_project_loader(variant, sd3_folders, sd3_module):
    family = load_backbone(sd3_folders[variant])
    assert isinstance(family, StableDiffusion3Family) and type(family.pipe).__name__ == "StableDiffusion3Pipeline"
    assert family.has_t5 == (variant == "t5") and (family.pipe.text_encoder_3 is None) == (variant == "no_t5")
    assert family.text_dims == [D1, D2, D3][: 3 if variant == "t5" else 2]
    module = sd3_module(variant)
    assert module.info.family == "sd3" and module.info.layer_kind == "joint blocks"
    assert module.info.prediction_type == "flow" and module.info.num_cross_attention_layers == BLOCKS
    assert module.identifier.layer_paths == [f"transformer_blocks.{b}" for b in range(BLOCKS)]
    assert module.identifier.embedding.shape == (BLOCKS, _dim(variant))
    assert module.transformer is module.denoiser and not hasattr(module, "unet")
    assert torch.equal(blockwise_block_to_row(module.transformer), torch.arange(BLOCKS))  # routing installed
    # Each encoder's part of a row starts as that encoder's embedding of the initializer word (T5 included).
    row = module.identifier.embedding[0]
    for tokenizer, encoder, part in zip(module.family.tokenizers, module.family.text_encoders,
                                        module.family.split_rows(row)):
        (word,) = tokenizer.encode("standing", add_special_tokens=False)
        assert torch.equal(part, encoder.get_input_embeddings().weight[word].float())
    if variant == "t5":  # T5's overlay sits where its forward reads (encoder.embed_tokens); `shared` is untouched
        t5 = module.text_encoder_3
        assert isinstance(t5.encoder.embed_tokens, IdentifierTokenEmbedding) and isinstance(t5.shared, torch.nn.Embedding)


@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()  # as the pipeline's __call__ (CPU attention picks other kernels under autograd)
def test_encodings_are_the_stock_encode_prompt_per_block(variant, sd3_folders, sd3_module, stock_pipeline):
    """Plain prompts, the negative "" and the untrained identifier (each part the embedding of
    "standing") are exactly what StableDiffusion3Pipeline.encode_prompt makes, once per joint block."""
    module = sd3_module(variant)
    family = module.family
    pipe = stock_pipeline(sd3_folders[variant])
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt("a photo of a dog", None, None, device="cpu")
    assert embeds.shape == (1, T, D3)
    inputs = family.prompt_inputs(["a photo of a dog"], None, BLOCKS, torch.float32)
    torch.testing.assert_close(inputs["prompt_embeds"], embeds.repeat(1, BLOCKS, 1), rtol=0, atol=1e-6)
    torch.testing.assert_close(inputs["pooled_prompt_embeds"], pooled, rtol=0, atol=1e-6)
    # SD3 does not force zeros: the unconditional embedding is the encoding of "".
    torch.testing.assert_close(inputs["negative_prompt_embeds"], negative.repeat(1, BLOCKS, 1), rtol=0, atol=1e-6)
    torch.testing.assert_close(inputs["negative_pooled_prompt_embeds"], negative_pooled, rtol=0, atol=1e-6)
    assert negative.abs().sum() > 0 and negative_pooled.abs().sum() > 0
    with_identifier = module.prompt_embeddings(["a photo of a person <A>"], module.identifier.initial)
    word, _, word_pooled, _ = pipe.encode_prompt("a photo of a person standing", None, None, device="cpu")
    torch.testing.assert_close(with_identifier["prompt_embeds"], word.repeat(1, BLOCKS, 1), rtol=0, atol=1e-5)
    torch.testing.assert_close(with_identifier["pooled_prompt_embeds"], word_pooled, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_row_b_reaches_only_block_b_chunk_in_every_part_and_the_middle_row_the_pooled_embedding(
        variant, sd3_module):
    module = sd3_module(variant)
    family = module.family
    ids = family.tokenize(["a photo of a person <A>"])
    table = module.identifier.embedding.detach().clone()
    base, base_pooled = family.encode_text(ids, table[None], BLOCKS)
    assert base.shape == (1, BLOCKS * T, D3) and base_pooled.shape == (1, P) and family.pooled_layer == 1
    starts = np.cumsum([0, D1, D2, D3])
    for block in range(BLOCKS):
        for part in range(len(family.text_dims)):
            perturbed = table.clone()
            perturbed[block, starts[part]:starts[part + 1]] += 1.0
            context, pooled = family.encode_text(ids, perturbed[None], BLOCKS)
            changed = [b for b in range(BLOCKS)
                       if not torch.equal(context[:, b * T:(b + 1) * T], base[:, b * T:(b + 1) * T])]
            assert changed == [block], (block, part)
            chunk, before = context[0, block * T:(block + 1) * T], base[0, block * T:(block + 1) * T]
            clip_changed = not torch.equal(chunk[:77], before[:77])
            t5_changed = not torch.equal(chunk[77:], before[77:])
            assert (clip_changed, t5_changed) == ((True, False) if part < 2 else (False, True)), (block, part)
            assert torch.equal(pooled, base_pooled) != (part < 2 and block == family.pooled_layer), (block, part)


@pytest.mark.parametrize("variant", VARIANTS)
def test_equal_rows_are_textual_inversion_bit_for_bit_in_the_training_forward(variant, sd3_module,
                                                                              equal_rows_training_forward):
    """With every block's row equal, the training forward (B equal chunks through the block-wise hooks)
    is the stock MMDiT forward on ONE plain encoding, bit for bit; the loss equals the TI module's up to
    the text encoders' batch-size rounding (P+ encodes B rows per prompt in one call, TI one)."""
    equal_rows_training_forward(partial(sd3_module, variant), T)


def test_flow_matching_objective_drives_the_loss(sd3_module, tiny_batch):
    """The noisy latents, timestep and target are rectified flow's (sigma shifted by the scheduler's 3.0)."""
    from adi_lightning import flow_matching

    module = sd3_module("no_t5", mask_threshold=1.0, cache_latents=False, timestep_sampling="logit_normal")
    assert module.objective.name == "flow_matching" and module.objective.shift == 3.0
    batch = tiny_batch(with_partners=False, batch_size=1)
    seen = {}
    hook = module.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: seen.update(noisy=args[0], timestep=kwargs["timestep"]), with_kwargs=True)
    try:
        with torch.no_grad():
            module.compute_loss(batch, draw_step=4)
    finally:
        hook.remove()
    latents = module._latents(batch, batch["pixel_values"])
    noise, sigmas = flow_matching.keyed_noise_and_sigmas(batch["key"].tolist(), 4, 1, latents, "logit_normal", 3.0)
    assert torch.equal(seen["timestep"], sigmas * 1000)
    assert torch.equal(seen["noisy"], flow_matching.flow_noisy_latents(latents, noise, sigmas))


@pytest.mark.parametrize("variant", VARIANTS)
def test_per_sample_gradients_under_masking_equal_per_sample_autograd(variant, sd3_module, tiny_batch):
    batch = tiny_batch()
    for share in (False, True):
        module = sd3_module(variant, mask_threshold=0.5, share_text_encoding=share, cache_latents=False)
        loss, per_sample = module.compute_loss(batch)
        table = module.identifier.embedding
        expected = torch.stack([torch.autograd.grad(l, table, retain_graph=True)[0] for l in per_sample])
        module.pop_role_grads()
        loss.backward()
        recorded = torch.cat(module.pop_role_grads())
        assert recorded.shape == (2, 3, BLOCKS, _dim(variant))
        assert (recorded.flatten(0, 1) - expected).abs().max() <= 1e-5 * expected.abs().max()
        assert not torch.allclose(recorded[:, 0], recorded[:, 2])  # the roles' images differ
        # Every block's row and every encoder's part gets a gradient (T5's through its tokens only).
        for part in module.family.split_rows(expected.abs().sum(0)):
            assert (part.sum(-1) > 0).all(), share


@pytest.mark.e2e
@pytest.mark.parametrize("variant,method", [("t5", "adi"), ("no_t5", "adi"), ("t5", "pplus"), ("no_t5", "ti")])
def test_a_few_training_steps_change_only_the_identifier(variant, method, sd3_module,
                                                          two_steps_change_only_the_identifier):
    after = two_steps_change_only_the_identifier(partial(sd3_module, variant), method)
    assert after.shape == (1 if method == "ti" else BLOCKS, _dim(variant))


@pytest.mark.parametrize("row_groups,rows", [("layer", BLOCKS), ("attention", BLOCKS), ("shared", 1)])
def test_row_groups_over_joint_blocks(row_groups, rows, sd3_module):
    module = sd3_module("no_t5", row_groups=row_groups)
    assert module.identifier.num_rows == rows
    expected = torch.arange(BLOCKS) if rows == BLOCKS else torch.zeros(BLOCKS, dtype=torch.int64)
    assert torch.equal(module.identifier.layer_to_row(), expected)


def test_contiguous_groups_of_blocks_share_a_chunk_and_resolution_is_refused(sd3_module, tmp_path):
    from adi_lightning.blockwise import group_blocks

    module = sd3_module("no_t5")
    family = module.family
    layers = group_blocks(BLOCKS, 2)  # [0, 0, 1]
    rows = torch.randn(1, 2, D1 + D2, generator=torch.Generator().manual_seed(0))
    context, _ = family.encode_text(family.tokenize(["a photo of a cat <A>"]), rows, layers)
    chunks = context.split(T, dim=1)
    assert torch.equal(chunks[0], chunks[1]) and not torch.equal(chunks[1], chunks[2])
    with pytest.raises(ValueError, match="model.row_groups=resolution has no meaning for an MMDiT"):
        sd3_module("no_t5", row_groups="resolution")


def test_logit_normal_is_refused_for_a_ddpm_family_by_name(make_module):
    with pytest.raises(ValueError, match=r"model.timestep_sampling=logit_normal is not available for this backbone "
                                         r"\(sd, trained as DDPM\)"):
        make_module(timestep_sampling="logit_normal")


@pytest.mark.e2e
def test_validate_and_predict_generate_through_the_stock_pipeline(sd3_module, tiny_data, tmp_path):
    from torch.utils.data import DataLoader

    from adi_lightning.data import PromptSeedDataset

    module = sd3_module("t5", identifier_path="untrained", image_size=32)
    images = module.generate(["a photo of a cat <A>", "a photo of a dog <A>"], [0, 1])
    assert [image.size for image in images] == [(32, 32), (32, 32)]
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    (out,) = trainer.predict(module, DataLoader(PromptSeedDataset(["a photo of a cat <A>"], [0]), batch_size=1))
    np.testing.assert_array_equal(np.asarray(out["image"][0]), np.asarray(images[0]))
    dm = ActionTripleDataModule(root=tiny_data, action="jumping", resolution=32, batch_size=1,
                                validation_prompts=["a photo of a dog <A>"], validation_seeds=[1])
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path / "validate")
    trainer.validate(module, dm)
    assert list((tmp_path / "validate").rglob("*.png"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_install_identifier_draws_what_the_module_draws_and_remove_restores_the_pipeline(
        variant, sd3_folders, sd3_module, stock_pipeline, random_identifier, tmp_path):
    module = sd3_module(variant, image_size=32, guidance_scale=3.0)
    path, _ = random_identifier(module, tmp_path / "sd3.safetensors")
    pipe = stock_pipeline(sd3_folders[variant])

    def draw(prompt, **kwargs):
        return pipe(prompt, num_inference_steps=2, guidance_scale=3.0, height=32, width=32, output_type="np",
                    generator=torch.Generator().manual_seed(1), **kwargs).images

    before = draw("a photo of a cat")
    tokenizers = [pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3]
    adi_lightning.install_identifier(pipe, path)
    assert "encode_prompt" in pipe.__dict__
    installed = draw("a photo of a cat <A>")
    expected = module.generate(["a photo of a cat <A>"], [1])[0]
    np.testing.assert_array_equal((installed[0] * 255).round().astype(np.uint8), np.asarray(expected))
    assert (installed != draw("a photo of a cat")).any()
    two = pipe("a photo of a cat <A>", num_inference_steps=2, guidance_scale=3.0, height=32, width=32,
               num_images_per_prompt=2, output_type="np", generator=torch.Generator().manual_seed(1)).images
    assert two.shape == (2, 32, 32, 3)
    for bad, message in ((dict(prompt_3="a dog"), "prompt_3 differs from prompt"),
                         (dict(clip_skip=1), "clip_skip is not supported with a block-wise identifier"),
                         (dict(max_sequence_length=128), "max_sequence_length=128: the installed identifier's "
                                                         "block-wise routing reads 256 T5 tokens")):
        with pytest.raises(ValueError, match=message):
            pipe.encode_prompt("a photo of a cat <A>", **{"prompt_2": None, "prompt_3": None, "device": "cpu", **bad})
    adi_lightning.remove_identifier(pipe)
    assert "encode_prompt" not in pipe.__dict__ and blockwise_block_to_row(pipe.transformer) is None
    assert [pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3] == tokenizers and "<A>" not in pipe.tokenizer.get_vocab()
    assert not any(isinstance(m, IdentifierTokenEmbedding) for enc in (pipe.text_encoder, pipe.text_encoder_2,
                                                                        pipe.text_encoder_3) if enc is not None
                   for m in enc.modules())
    assert not pipe.transformer._forward_pre_hooks and not pipe.transformer.context_embedder._forward_hooks
    assert (draw("a photo of a cat") == before).all()


@torch.no_grad()
def test_equal_rows_generate_what_one_shared_row_generates(sd3_folders, sd3_module, stock_pipeline, tmp_path):
    """An installed one-row (TI) identifier draws, bit for bit, what the stock pipeline draws from ONE
    plain encoding of the prompt with that vector (textual inversion); a row per block, all equal, draws
    the same up to the text encoders' batch-size rounding (its B rows are encoded in one call)."""
    vector = torch.randn(_dim("t5"), generator=torch.Generator().manual_seed(2))
    paths = []
    for layerwise in (True, False):
        module = sd3_module("t5", layerwise=layerwise)
        module.identifier.embedding.copy_(vector.expand_as(module.identifier.embedding))
        paths.append(module.save_identifier(tmp_path / f"{layerwise}.safetensors"))
    kwargs = dict(num_inference_steps=2, guidance_scale=3.0, height=32, width=32, output_type="np")
    images = []
    for path in paths:
        pipe = stock_pipeline(sd3_folders["t5"])
        adi_lightning.install_identifier(pipe, path)
        images.append(pipe("a photo of a dog <A>", generator=torch.Generator().manual_seed(3), **kwargs).images)
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt("a photo of a dog <A>", None, None, device="cpu")
    chunks = embeds.split(T, dim=1)
    assert len(chunks) == BLOCKS and all(torch.equal(c, chunks[0]) for c in chunks)
    adi_lightning.remove_identifier(pipe)
    stock = pipe(prompt_embeds=chunks[0], negative_prompt_embeds=negative[:, :T], pooled_prompt_embeds=pooled,
                 negative_pooled_prompt_embeds=negative_pooled, generator=torch.Generator().manual_seed(3),
                 **kwargs).images
    assert np.array_equal(images[1], stock)  # the one-row file: the TI forward exactly
    assert np.abs(images[0] - images[1]).max() <= 1e-5


@pytest.mark.e2e
def test_the_cli_fits_sd3_with_logit_normal_and_refuses_it_for_sd(sd3_folders, tiny_pipeline, tiny_data, tmp_path,
                                                                    capsys):
    from adi_lightning.cli import main
    from adi_lightning.identifier import read_identifier

    common = ["--config", str(Path(__file__).resolve().parents[1] / "experiments" / "tiny.yaml"),
              "--model.num_inference_steps=2", "--trainer.enable_progress_bar=false",
              "--trainer.enable_model_summary=false", "--model.timestep_sampling=logit_normal",
              f"--data.root={tiny_data}", "--trainer.max_steps=2"]
    main(args=["fit", *common, f"--model.pretrained_model_name_or_path={sd3_folders['no_t5']}",
               f"--trainer.default_root_dir={tmp_path / 'sd3'}"])
    (run,) = (tmp_path / "sd3").iterdir()
    table, meta = read_identifier(run / "identifier.safetensors")
    assert table.shape == (BLOCKS, D1 + D2) and json.loads(meta["text_dims"]) == [D1, D2]
    assert json.loads((run / "run_info.json").read_text())["backbone"]["family"] == "sd3"
    with pytest.raises(SystemExit) as err:
        main(args=["fit", *common, f"--model.pretrained_model_name_or_path={tiny_pipeline}",
                   f"--trainer.default_root_dir={tmp_path / 'sd'}"])
    assert err.value.code == 1
    assert ("adi_lightning: error: model.timestep_sampling=logit_normal is not available for this backbone (sd, "
            "trained as DDPM)") in capsys.readouterr().err


# ------------------------------------------------------------------ multi-start, resume, partners, export
def test_the_large_t_score_draws_flow_times_in_the_large_t_band_then_shifts_them(
        sd3_module, large_t_score_draws_shifted_flow_times):
    """Multi-start's score on SD3 (large_t_anchor_loss) draws flow time u uniform in [large_t_min, 1),
    then the scheduler's shift (3.0): sigma in [shift(large_t_min), 1), never the unshifted band nor
    model.timestep_sampling's density (docs/method.md, "Flow matching"); the MMDiT gets sigma * 1000."""
    module = sd3_module("no_t5", mask_threshold=0.5, large_t_min=0.6, timestep_sampling="logit_normal")
    large_t_score_draws_shifted_flow_times(module, 3.0, 1000.0)


@pytest.mark.e2e
def test_multi_start_scores_each_start_and_continues_the_lowest_on_sd3(sd3_module, multi_start_continues_the_lowest):
    """model.starts=2 on SD3 (rows with T5 parts, flow matching): both starts begin at the initial rows,
    each is scored by the real large-t anchor loss (fewer draws), the lower is continued and recorded."""
    multi_start_continues_the_lowest(sd3_module("t5", mask_threshold=0.5, learning_rate=0.05, starts=2,
                                                start_steps=1))


@pytest.mark.e2e
@pytest.mark.parametrize("variant,stop_at", [("t5", 2), ("no_t5", 3)])
def test_resume_on_sd3_is_bit_identical_to_an_uninterrupted_fit(variant, stop_at, sd3_folders,
                                                                 resumed_fit_is_the_straight_fit):
    """A masked ADI fit on SD3 stopped at a checkpoint and resumed gives the uninterrupted fit's identifier,
    bit for bit (the keyed flow-time and noise draws, the sampler position and AdamW state all restored);
    4 batches an epoch, so stop_at=3 resumes mid-epoch and 5 steps cross an epoch."""
    straight, trainer = resumed_fit_is_the_straight_fit(sd3_folders[variant], stop_at, steps=5)
    assert straight.shape == (BLOCKS, _dim(variant)) and trainer.lightning_module.family.name == "sd3"


@pytest.mark.parametrize("variant", VARIANTS)
def test_img2img_partners_are_the_stock_sd3_img2img_pipeline_with_plain_prompts(variant, sd3_folders, sd3_module,
                                                                                 img2img_is_the_stock_pipeline):
    """module.img2img (what data.action_different=generate calls) runs StableDiffusion3Img2ImgPipeline over
    the family's components with the family's plain-prompt inputs (B equal block-wise chunks through the
    routing hooks) at the input image's size, here 64 px where the folder's default is 32 px (the stock
    pipeline resizes the image to its default size unless given height and width), and draws what the stock
    img2img pipeline, loaded as a user would, draws from the prompt string at that size. A size off the
    4 px image-token grid (2x VAE, 2x2 patches) is rounded down to it (the stock pipeline refuses it)."""
    from PIL import Image

    module = sd3_module(variant)
    assert type(module.family.stock_pipeline(img2img=True)).__name__ == "StableDiffusion3Img2ImgPipeline"
    assert module.generation_size == 32
    stock = img2img_is_the_stock_pipeline(module, sd3_folders[variant], 3.0, size=64, height=64, width=64)
    assert type(stock).__name__ == "StableDiffusion3Img2ImgPipeline"
    (image,) = module.img2img([Image.new("RGB", (50, 47))], ["a photo of a person sitting"], [0], steps=2)
    assert image.size == (48, 44)


@pytest.mark.e2e
def test_an_exemplar_only_folder_trains_on_sd3_with_generated_partners(sd3_module, fit_on_generated_partners):
    """data.action_different=generate on SD3: prepare_data makes the partners with the frozen SD3 backbone's
    img2img (StableDiffusion3Img2ImgPipeline), and a masked fit trains on them."""
    fit_on_generated_partners(sd3_module("no_t5", mask_threshold=0.5))


QUICK_DISTILL = dict(batch_size=4, images_per_prompt=1, sample_steps=4, eval_draws=8, learning_rate=0.05)


def _sd3_teacher(folder: str, rows_of, steps: int = 6):
    """A distillation teacher (adi_lightning.distill) on an SD3 folder: block-wise rows, flow-matching draws."""
    from adi_lightning import distill

    family = load_backbone(folder)
    distill.prepare(family, "<A>")
    blocks = len(family.identifier_layers())
    rows = rows_of(blocks, family.identifier_dim)
    prompts = distill.action_prompts("<A>", ("dog", "cat"), ("a photo of",))
    return distill.Teacher(family, rows, torch.arange(blocks), prompts,
                           distill.DistillSettings(steps=steps, **QUICK_DISTILL)), rows


def test_sd3_distillation_draws_flow_matching_times_and_identical_rows_distil_to_that_row(sd3_folders):
    """The seam makes distill family-agnostic: on SD3 the teacher's draws are shifted flow-matching sigmas
    fed to the MMDiT as sigma * 1000, and with a row per block all equal the student (the vector in every
    row: textual inversion) is the teacher bit for bit, so nothing moves."""
    from adi_lightning import distill, flow_matching

    row = torch.randn(1, _dim("t5"), generator=torch.Generator().manual_seed(1))
    teacher, rows = _sd3_teacher(sd3_folders["t5"], lambda blocks, dim: row.repeat(blocks, 1))
    assert teacher.objective.name == "flow_matching" and teacher.x0.shape[1] == 16
    seen = []
    hook = teacher.denoiser.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["timestep"].clone()), with_kwargs=True)
    try:
        noisy, sigmas, _ = teacher.draw(4, torch.Generator().manual_seed(0))
        teacher.predict(noisy, sigmas, torch.zeros(4, dtype=torch.int64))
    finally:
        hook.remove()
    generator = torch.Generator().manual_seed(0)
    generator_draws = []
    torch.randint(0, len(teacher.x0), (4,), generator=generator)
    for _ in range(4):
        u = flow_matching.sample_flow_time(generator, "importance")
        generator_draws.append(flow_matching.shift_sigma(u, 3.0).float())
    assert torch.equal(sigmas, torch.cat(generator_draws)) and torch.equal(seen[0], sigmas * 1000)
    vector, losses = distill.distill(teacher, rows[:1])
    assert torch.equal(vector, row) and max(losses) == 0.0
    assert distill.residual(teacher, vector, torch.zeros_like(row)) < 1e-6


def test_the_sd3_student_loss_decreases(sd3_folders):
    from adi_lightning import distill

    def random_rows(blocks, dim):
        return torch.randn(blocks, dim, generator=torch.Generator().manual_seed(0))

    teacher, rows = _sd3_teacher(sd3_folders["no_t5"], random_rows)
    mean = rows.mean(0, keepdim=True)
    vector, losses = distill.distill(teacher, mean)
    untrained = torch.zeros_like(mean)
    assert len(losses) == 6 and not torch.equal(vector, mean)
    assert distill.residual(teacher, vector, untrained) < distill.residual(teacher, mean, untrained)


@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_a_textual_inversion_sd3_identifier_exports_losslessly_as_clip_l_clip_g_t5xxl(
        variant, sd3_folders, sd3_module, stock_pipeline, random_identifier, tmp_path, capsys):
    """--format sd3 writes a one-row SD3 identifier as ComfyUI's SD3 keys (clip_l, clip_g, and t5xxl with
    T5), exactly its row split by text encoder, with the written_by marker; each key set into its stock
    encoder's token embedding (plain transformers: SD3 pipelines have no load_textual_inversion) draws,
    in the stock StableDiffusion3Pipeline, exactly what install_identifier draws."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from adi_lightning.export import WRITTEN_BY, main as export_main

    path, table = random_identifier(sd3_module(variant, layerwise=False), tmp_path / "ti.safetensors")
    out = tmp_path / "corgi_jump.safetensors"
    assert export_main(["--identifier", str(path), "--format", "sd3", "--out", str(out)]) == 0
    assert "lossless" in capsys.readouterr().out
    parts = load_file(str(out))
    keys = ["clip_l", "clip_g", "t5xxl"][: 3 if variant == "t5" else 2]
    assert sorted(parts) == sorted(keys)
    assert torch.equal(torch.cat([parts[k] for k in keys], dim=-1), table)
    with safe_open(str(out), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["written_by"] == WRITTEN_BY and meta["method"] == "lossless" and meta["token"] == "<A>"

    kwargs = dict(num_inference_steps=2, guidance_scale=3.0, height=32, width=32, output_type="np")
    installed = stock_pipeline(sd3_folders[variant])
    adi_lightning.install_identifier(installed, path)
    expected = installed("a photo of a cat <A>", generator=torch.Generator().manual_seed(1), **kwargs).images
    stock = stock_pipeline(sd3_folders[variant])
    for key, tokenizer, encoder in zip(keys, [stock.tokenizer, stock.tokenizer_2, stock.tokenizer_3],
                                       [stock.text_encoder, stock.text_encoder_2, stock.text_encoder_3]):
        tokenizer.add_tokens(["<A>"])
        encoder.resize_token_embeddings(len(tokenizer))
        encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids("<A>")] = parts[key][0]
    drawn = stock("a photo of a cat <A>", generator=torch.Generator().manual_seed(1), **kwargs).images
    assert np.array_equal(drawn, expected)
    # The overwrite rules of every format: refused without --overwrite, replaced with it (an earlier export).
    assert export_main(["--identifier", str(path), "--format", "sd3", "--out", str(out)]) == 1
    assert "already exists (an earlier export: add --overwrite" in capsys.readouterr().err
    assert export_main(["--identifier", str(path), "--format", "sd3", "--out", str(out), "--overwrite"]) == 0
    foreign = tmp_path / "foreign.safetensors"
    foreign.write_bytes(b"not ours")
    assert export_main(["--identifier", str(path), "--format", "sd3", "--out", str(foreign), "--overwrite"]) == 1
    assert foreign.read_bytes() == b"not ours"


def test_a_block_wise_sd3_identifier_exports_one_distilled_vector_measured_on_sd3(sd3_module, random_identifier,
                                                                                    tmp_path):
    """A row per joint block has no token-embedding form; --format sd3 writes the one vector that the
    distillation fits on the SD3 pipeline (the textual-inversion student against the block-wise teacher),
    with its residual measured and gated like every multi-row export."""
    from safetensors.torch import load_file

    from adi_lightning import distill
    from adi_lightning.export import LossyExport, export_identifier

    path, table = random_identifier(sd3_module("t5"), tmp_path / "rows.safetensors")
    assert table.shape == (BLOCKS, _dim("t5"))
    out = tmp_path / "distilled.safetensors"
    settings = distill.DistillSettings(steps=3, **QUICK_DISTILL)
    report = export_identifier(path, out, "sd3", lossy=True, subjects=("dog",), settings=settings, log=lambda *_: None)
    parts = load_file(str(out))
    assert report.method == "distill" and len(report.losses) == 3
    assert report.residual is not None and report.mean_residual is not None
    assert [parts[k].shape for k in ("clip_l", "clip_g", "t5xxl")] == [(1, D1), (1, D2), (1, D3)]
    assert not torch.allclose(torch.cat([parts["clip_l"], parts["clip_g"], parts["t5xxl"]], -1), table.mean(0))
    with pytest.raises(LossyExport, match="loses the action: residual"):  # random rows: the mean loses them
        export_identifier(path, tmp_path / "mean.safetensors", "sd3", method="mean", subjects=("dog",),
                          settings=settings, log=lambda *_: None)
    assert not (tmp_path / "mean.safetensors").exists()


def test_each_format_refuses_the_other_families_by_name(sd3_module, make_module, random_identifier, tmp_path):
    from adi_lightning.export import export_identifier

    sd3_file, _ = random_identifier(sd3_module("no_t5", layerwise=False), tmp_path / "sd3.safetensors")
    sd_file = make_module(layerwise=False).save_identifier(tmp_path / "sd.safetensors")
    out = tmp_path / "x.safetensors"
    for fmt in ("ti", "webui", "sdxl"):  # a no-T5 SD3 file has two widths, as an SDXL one
        with pytest.raises(ValueError, match=rf"sd3\.safetensors was trained on a sd3 backbone: one-vector exports in "
                                             rf"--format {fmt} .*--format sd3 writes"):
            export_identifier(sd3_file, out, fmt)
    with pytest.raises(ValueError, match=r"--format sd3 needs an SD3 identifier; .*sd\.safetensors was trained on a sd "
                                         r"backbone: use --format ti or webui"):
        export_identifier(sd_file, out, "sd3")
    assert not out.exists()


@pytest.mark.e2e
def test_the_cli_resumes_an_sd3_run_and_refuses_its_checkpoint_on_another_backbone(sd3_folders, short_fit, tmp_path,
                                                                                     capsys):
    """`fit --ckpt_path=<run folder>` on SD3 continues from the newest checkpoint with the run's settings and
    writes what the uninterrupted CLI fit writes; the checkpoint on the SD pipeline is refused by name."""
    from adi_lightning.cli import main
    from adi_lightning.identifier import read_identifier

    sd3 = sd3_folders["no_t5"]
    flags = ("--trainer.val_check_interval=100", "--model.learning_rate=0.05")
    straight = short_fit(tmp_path / "straight", *flags, steps=4, pipeline=sd3)
    first = short_fit(tmp_path / "first", *flags, steps=2, pipeline=sd3)
    resumed = short_fit(tmp_path / "resumed", "--trainer.val_check_interval=100", f"--ckpt_path={first}", steps=4,
                        pipeline=sd3)
    (table, meta), (expected, _) = (read_identifier(run / "identifier.safetensors") for run in (resumed, straight))
    assert meta["global_step"] == "4" and meta["family"] == "sd3"
    assert torch.equal(table, expected)
    assert not torch.equal(read_identifier(first / "identifier.safetensors")[0], expected)
    with pytest.raises(SystemExit) as err:
        main(args=short_fit.args(tmp_path / "sd", f"--ckpt_path={first}", steps=4))  # the tiny SD pipeline
    assert err.value.code == 1
    assert ("checkpoint was made for a pipeline with different cross-attention layers or joint blocks (its "
            "identifier's 3 layers begin 'transformer_blocks.0'") in capsys.readouterr().err
