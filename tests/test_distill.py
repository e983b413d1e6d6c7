"""One-vector exports that keep the action: the distillation (adi_lightning.distill) and the export gate."""

import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from adi_lightning import distill
from adi_lightning.backbone import load_backbone
from adi_lightning.conditioning import cross_attention_layers
from adi_lightning.export import MAX_RESIDUAL, export_identifier, main as export_main
from adi_lightning.identifier import read_identifier

# A short budget: the mechanics, not the figures (docs/report.md "One-vector exports" has those).
QUICK = dict(batch_size=4, images_per_prompt=1, sample_steps=4, eval_draws=8, learning_rate=0.05)
TRAINED_TOY = Path(__file__).parent / "assets" / "toy_jumping_identifier.safetensors"


def _teacher(pipeline: str, rows_of, steps: int = 10):
    family = load_backbone(pipeline)
    distill.prepare(family, "<A>")
    layers = len(cross_attention_layers(family.unet))
    rows = rows_of(layers, family.identifier_dim)
    prompts = distill.action_prompts("<A>", ("dog", "cat"), ("a photo of",))
    return distill.Teacher(family, rows, torch.arange(layers), prompts,
                           distill.DistillSettings(steps=steps, **QUICK)), rows


def _random_rows(layers, dim):
    return torch.randn(layers, dim, generator=torch.Generator().manual_seed(0))


def test_the_student_loss_decreases(tiny_pipeline):
    teacher, rows = _teacher(tiny_pipeline, _random_rows, steps=15)
    mean = rows.mean(0, keepdim=True)
    untrained = torch.zeros_like(mean)
    vector, losses = distill.distill(teacher, mean)
    assert len(losses) == 15 and vector.shape == mean.shape and not torch.equal(vector, mean)
    # The same fixed draws before and after: the distilled vector is closer to the identifier.
    assert distill.residual(teacher, vector, untrained) < distill.residual(teacher, mean, untrained)


def test_identical_rows_distil_to_that_row(tiny_pipeline):
    row = torch.randn(1, 32, generator=torch.Generator().manual_seed(1))
    teacher, rows = _teacher(tiny_pipeline, lambda layers, dim: row.repeat(layers, 1))
    vector, losses = distill.distill(teacher, rows[:1])  # the student's path is the teacher's: no gradient
    assert torch.equal(vector, row) and max(losses) == 0.0
    assert distill.residual(teacher, vector, torch.zeros_like(row)) < 1e-6


def test_the_sdxl_student_loss_decreases(tiny_sdxl_pipeline):
    teacher, rows = _teacher(tiny_sdxl_pipeline, _random_rows, steps=10)
    mean = rows.mean(0, keepdim=True)
    vector, _ = distill.distill(teacher, mean)
    untrained = torch.zeros_like(mean)
    assert distill.residual(teacher, vector, untrained) < distill.residual(teacher, mean, untrained)


def _lossy_identifier(make_module, tmp_path, **kwargs):
    module = make_module(**kwargs)
    with torch.no_grad():
        module.identifier.embedding.add_(torch.randn(module.identifier.embedding.shape,
                                                     generator=torch.Generator().manual_seed(0)))
    return module.save_identifier(tmp_path / "identifier.safetensors")


def test_an_export_that_loses_the_action_asks_for_lossy(make_module, tmp_path, capsys):
    identifier = _lossy_identifier(make_module, tmp_path)
    out = tmp_path / "mean.safetensors"
    args = ["--identifier", str(identifier), "--out", str(out), "--method", "mean", "--subjects", "dog"]
    assert export_main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the pipeline's loading bars
    assert err.startswith("adi_lightning: error: the one vector (mean of 16 rows) loses the action: residual")
    assert "add --lossy" in err and not out.exists()
    assert export_main(args + ["--lossy"]) == 0
    with safe_open(str(out), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["method"] == "mean" and float(meta["residual"]) > MAX_RESIDUAL and meta["kept"].endswith("(lossy)")


@pytest.mark.parametrize("argv,message", [
    (["--method", "row"], "--method row needs --row N"),
    (["--method", "distill", "--row", "3"], "--row 3 keeps one row: it goes with --method row"),
    (["--method", "mean", "--steps", "5"], "--steps is a setting of --method distill, not of --method mean"),
    (["--row", "2", "--seed", "1"], "--seed is a setting of --method distill, not of --method row"),
    (["--steps", "0"], "--steps must be at least 1"),
])
def test_export_flags_that_do_not_go_together_are_refused(make_module, tmp_path, capsys, argv, message):
    identifier = _lossy_identifier(make_module, tmp_path)
    out = tmp_path / "x.safetensors"
    assert export_main(["--identifier", str(identifier), "--out", str(out), *argv]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"adi_lightning: error: {message}")
    assert not out.exists()


def test_a_one_row_identifier_refuses_the_distillation_flags_typed_and_only_those(make_module, tmp_path, capsys):
    """Nothing is distilled, measured or lost for one row: each measurement flag typed, and --lossy, is
    refused by name (a distillation setting typed at its default value as --steps/--seed); left out, the
    export writes the row as it is."""
    identifier = make_module(layerwise=False).save_identifier(tmp_path / "ti.safetensors")
    out = tmp_path / "x.safetensors"
    base = ["--identifier", str(identifier), "--out", str(out)]
    capsys.readouterr()  # the pipeline's loading bars
    for argv, named in [(["--seed", "3"], "--seed"), (["--pipeline", "elsewhere", "--device", "cpu"],
                                                       "--pipeline, --device"),
                        (["--subjects", "dog", "--steps", "50"], "--steps, --subjects"), (["--lossy"], "--lossy"),
                        (["--seed", "0"], "--steps/--seed")]:
        assert export_main(base + argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"adi_lightning: error: {named}: the identifier {identifier} has "
                                                   "one row, nothing to distill or measure"), err
        assert not out.exists()
    assert export_main(base + ["--method", "distill"]) == 0  # the default method: reported, nothing to refuse
    assert "--method distill has nothing to do" in capsys.readouterr().out
    assert torch.equal(load_file(str(out))["<A>"], read_identifier(identifier)[0])


@pytest.mark.parametrize("given, named", [(dict(pipeline="elsewhere"), "--pipeline"), (dict(device="cpu"), "--device"),
                                          (dict(subjects=("dog",)), "--subjects"), (dict(lossy=True), "--lossy"),
                                          (dict(settings=distill.DistillSettings(steps=5, batch_size=2)),
                                           "--steps, settings.batch_size"),
                                          (dict(settings=distill.DistillSettings()), "--steps/--seed")])
def test_a_one_row_identifier_refuses_measurement_arguments_given_in_python(make_module, tmp_path, given, named):
    """export_identifier itself refuses, by name, what a Python caller gives for a one-row identifier (not
    only the command line): pipeline, device, subjects, settings (None: not given) and lossy."""
    identifier = make_module(layerwise=False).save_identifier(tmp_path / "ti.safetensors")
    out = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match=rf"^{re.escape(named)}: the identifier .* has one row, nothing to distill"):
        export_identifier(identifier, out, **given)
    assert not out.exists()
    assert export_identifier(identifier, out, log=lambda *_: None).method == "lossless"


def test_sdxl_distilled_export_splits_the_distilled_vector(make_module, tiny_sdxl_pipeline, tmp_path):
    identifier = _lossy_identifier(make_module, tmp_path, pretrained_model_name_or_path=tiny_sdxl_pipeline)
    out = tmp_path / "xl.safetensors"
    report = export_identifier(identifier, out, "sdxl", lossy=True, subjects=("dog",),
                               settings=distill.DistillSettings(steps=3, **QUICK), log=lambda *_: None)
    parts = load_file(str(out))
    assert report.method == "distill" and len(report.losses) == 3
    assert parts["clip_l"].shape == (1, 32) and parts["clip_g"].shape == (1, 48)
    assert not torch.allclose(torch.cat([parts["clip_l"], parts["clip_g"]], -1), read_identifier(identifier)[0].mean(0))


def test_the_distilled_export_of_a_trained_toy_identifier_keeps_the_action_in_stock_diffusers(tmp_path):
    """The main job's identifier (jump.yaml, tests/assets), exported by default and loaded with the
    stock load_textual_inversion, still draws its action on unseen subjects (the mean of the rows did not)."""
    from diffusers import StableDiffusionPipeline

    from adi_lightning.toy import DEFAULT_GUIDANCE_SCALE, toy_judges_path, toy_pipeline_path
    from adi_lightning.toy.judges import ToyJudges

    out = tmp_path / "jump.safetensors"
    budget = distill.DistillSettings(steps=30, batch_size=6, images_per_prompt=1, sample_steps=10, eval_draws=12)
    report = export_identifier(TRAINED_TOY, out, subjects=("person", "man"), settings=budget, log=lambda *_: None)
    assert report.method == "distill" and report.residual <= MAX_RESIDUAL < report.mean_residual
    pipe = StableDiffusionPipeline.from_pretrained(str(toy_pipeline_path()), safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(str(out), token="<A>")
    subjects = ["cat", "dog", "bear", "robot"]
    images = [pipe(f"a photo of a {s} <A>", generator=torch.Generator().manual_seed(seed), num_inference_steps=10,
                   guidance_scale=DEFAULT_GUIDANCE_SCALE).images[0] for s in subjects for seed in (0, 1)]
    actions = ToyJudges(toy_judges_path()).predict(images)["action"]
    assert actions.count("jumping") >= 6, actions
