"""The identifier outside Lightning: stock pipeline, one-vector exports, low-precision backbones."""

import pytest
import torch
from diffusers import StableDiffusionPipeline

import adi_lightning
from adi_lightning.export import export_identifier, main as export_main
from adi_lightning.identifier import read_identifier


def _pipe(path):
    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture()
def trained_identifier(make_module, tmp_path):
    module = make_module()
    with torch.no_grad():
        module.identifier.embedding.add_(torch.randn(16, 32, generator=torch.Generator().manual_seed(0)))
    return module.save_identifier(tmp_path / "identifier.safetensors")


def test_stock_pipeline_matches_our_predict_and_removal_restores_it(tiny_pipeline, trained_identifier, make_module):
    pipe = _pipe(tiny_pipeline)
    kwargs = dict(num_inference_steps=3, guidance_scale=2.0, output_type="np")
    before = pipe("a photo of a dog", generator=torch.Generator().manual_seed(4), **kwargs).images

    adi_lightning.install_identifier(pipe, trained_identifier)
    ours = pipe("a photo of a dog <A>", generator=torch.Generator().manual_seed(4),
                **dict(kwargs, output_type="pil")).images[0]
    module = make_module(identifier_path=str(trained_identifier), num_inference_steps=3, guidance_scale=2.0)
    reference = module.generate(["a photo of a dog <A>"], [4])[0]
    assert ours.tobytes() == reference.tobytes()

    adi_lightning.remove_identifier(pipe)
    after = pipe("a photo of a dog", generator=torch.Generator().manual_seed(4), **kwargs).images
    assert (after == before).all()
    assert "<A>" not in pipe.tokenizer.get_vocab()


def test_mismatching_pipeline_is_a_clear_error(tmp_path, trained_identifier):
    from adi_lightning.tiny import build_tiny_pipeline

    pipe = _pipe(str(build_tiny_pipeline(tmp_path / "ten_layers", layers_per_block=1)))
    with pytest.raises(ValueError, match="module paths differ"):
        adi_lightning.install_identifier(pipe, trained_identifier)
    assert pipe.text_encoder.__class__.__name__ == "CLIPTextModel"  # nothing half-installed


@pytest.mark.parametrize("fmt,suffix", [("ti", "safetensors"), ("webui", "pt")])
def test_exported_single_vector_loads_with_load_textual_inversion(tiny_pipeline, trained_identifier, tmp_path, fmt, suffix):
    out = tmp_path / f"exported.{suffix}"
    assert export_main(["--identifier", str(trained_identifier), "--format", fmt, "--out", str(out),
                        "--method", "mean", "--lossy"]) == 0
    pipe = _pipe(tiny_pipeline)
    pipe.load_textual_inversion(str(out), token="<X>")
    token_id = pipe.tokenizer.convert_tokens_to_ids("<X>")
    table, _ = read_identifier(trained_identifier)
    loaded = pipe.text_encoder.get_input_embeddings().weight[token_id]
    assert torch.allclose(loaded, table.mean(0))
    image = pipe("a photo of a dog <X>", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 32, 32, 3)


def test_export_row_and_errors(trained_identifier, tmp_path):
    path = export_identifier(trained_identifier, tmp_path / "row6.safetensors", "ti", row=6, lossy=True).path
    from safetensors.torch import load_file

    table, _ = read_identifier(trained_identifier)
    assert torch.equal(load_file(str(path))["<A>"], table[6:7])
    assert export_main(["--identifier", str(trained_identifier), "--out", str(tmp_path / "x"), "--row", "99"]) == 1
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("fmt,suffix", [("ti", "safetensors"), ("webui", "pt")])
def test_export_replaces_an_earlier_export_only_with_overwrite(trained_identifier, tmp_path, capsys, fmt, suffix):
    out = tmp_path / f"exported.{suffix}"
    args = ["--identifier", str(trained_identifier), "--format", fmt, "--out", str(out), "--lossy"]
    assert export_main(args + ["--row", "0"]) == 0
    first = out.read_bytes()
    assert export_main(args + ["--method", "mean"]) == 1  # exists: refused by name, the file untouched
    assert f"adi_lightning: error: --out {out} already exists (an earlier export: add --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == first
    assert export_main(args + ["--method", "mean", "--overwrite"]) == 0
    assert out.read_bytes() != first and not list(tmp_path.glob(".*.tmp"))


def test_bf16_backbone_trains_an_fp32_identifier(make_module, tiny_data):
    from adi_lightning.data import ActionTripleDataModule

    module = make_module(weight_dtype="bfloat16", mask_threshold=0.5)
    assert module.unet.dtype == torch.bfloat16 and module.text_encoder.dtype == torch.bfloat16
    dm = ActionTripleDataModule(root=tiny_data, action="jumping", resolution=32, batch_size=1, repeats=1)
    dm.setup("fit")
    loss, _ = module.compute_loss(next(iter(dm.train_dataloader())))
    loss.backward()
    table = module.identifier.embedding
    assert table.dtype == torch.float32 and table.grad.dtype == torch.float32
    recorded = torch.cat(module.pop_role_grads())
    assert recorded.dtype == torch.float32 and torch.isfinite(recorded).all() and recorded.abs().sum() > 0


def test_an_sd3_identifier_is_refused_by_export_before_anything_is_written(trained_identifier, tmp_path):
    """The family recorded in the file decides: SD3 rows live in the transformer's text stream, and
    a no-T5 SD3 file has two text widths like SDXL, so without the check --format sdxl would take it."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    assert read_identifier(trained_identifier)[1]["family"] == "sd"
    with safe_open(str(trained_identifier), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        meta = dict(handle.metadata(), family="sd3")
    sd3_file = tmp_path / "sd3.safetensors"
    save_file(tensors, str(sd3_file), metadata=meta)
    out = tmp_path / "exported.safetensors"
    for fmt in ("ti", "sdxl"):
        with pytest.raises(ValueError, match=r"sd3\.safetensors was trained on a sd3 backbone: one-vector exports"):
            export_identifier(sd3_file, out, fmt)
    assert not out.exists()
