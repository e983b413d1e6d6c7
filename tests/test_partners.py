"""Generated action-different partners: cached with a manifest, reused, regenerated on change."""

import json
import os
import shutil
from types import SimpleNamespace

import pytest
from PIL import Image

from adi_lightning.data import ActionTripleDataModule, read_action_folder, records_of_action
from adi_lightning.data.partners import MANIFEST, MANIFEST_FORMAT, PartnerSettings, ensure_partners, partner_prompt
from adi_lightning.families.flux import FluxFamily
from adi_lightning.families.sd import StableDiffusionFamily


class CountingGenerator:
    def __init__(self):
        self.calls = 0

    def __call__(self, images, prompts, seeds):
        self.calls += len(images)
        return [Image.new("RGB", img.size, (seed % 256, 0, 0)) for img, seed in zip(images, seeds)]


def settings(**overrides):
    values = dict(actions=("standing", "sitting"), per_anchor=2, strength=0.6, steps=4, guidance=3.0,
                  resolution=32, seed=0, backbone="tiny")
    values.update(overrides)
    return PartnerSettings(**values)


def test_partners_are_cached_reused_and_regenerated_on_change(exemplar_only, tiny_dir, tmp_path):
    folder = exemplar_only(tmp_path / "exemplars")
    anchors = records_of_action(read_action_folder(folder), "jumping")
    gen = CountingGenerator()
    out, made = ensure_partners(anchors, "jumping", settings(), tmp_path / "cache", gen)
    assert made and gen.calls == 8
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["settings"]["strength"] == 0.6 and len(manifest["images"]) == 8
    assert {"anchor", "prompt", "seed", "anchor_sha256"} <= set(manifest["images"][0])
    partners = read_action_folder(out)
    assert {r.action for r in partners} == {"standing", "sitting"}
    assert all(r.subject == next(a.subject for a in anchors if r.file_name.startswith(a.file_name[:-4])) for r in partners)

    _, made = ensure_partners(anchors, "jumping", settings(), tmp_path / "cache", gen)
    assert not made and gen.calls == 8  # reused

    _, made = ensure_partners(anchors, "jumping", settings(strength=0.8), tmp_path / "cache", gen)
    assert made and gen.calls == 16  # regenerated
    assert json.loads((out / MANIFEST).read_text())["settings"]["strength"] == 0.8
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["partners-jumping"]  # no temp folders left


def test_bad_generate_settings_are_clear_errors(tiny_dir, tmp_path):
    anchors = records_of_action(read_action_folder(tiny_dir / "data"), "jumping")
    with pytest.raises(ValueError, match="target action"):
        ensure_partners(anchors, "jumping", settings(actions=("jumping",)), tmp_path, CountingGenerator())


def test_prompt_swaps_the_action_word_in_the_caption(tiny_dir):
    anchor = records_of_action(read_action_folder(tiny_dir / "data"), "jumping")[0]
    assert partner_prompt(anchor, "sitting") == anchor.caption.replace("jumping", "sitting")


@pytest.mark.e2e
def test_exemplar_only_folder_trains_with_masking_on(make_module, fit_on_generated_partners):
    fit_on_generated_partners(make_module(mask_threshold=0.5))


def _generating_datamodule(folder, pipeline, family=StableDiffusionFamily, generate_guidance=None, **hparams):
    """A datamodule that generates partners, attached to a stand-in module: the backbone's
    hyperparameters, its ``family`` (a BackboneFamily class: its guidance default) and a counting img2img
    that records the guidance it was called with (prepare_data reads nothing else of the module)."""
    gen = CountingGenerator()

    def img2img(images, prompts, seeds, guidance, **_):
        gen.guidance = guidance
        return gen(images, prompts, seeds)

    module = SimpleNamespace(img2img=img2img, family=family,
                             hparams=SimpleNamespace(pretrained_model_name_or_path=str(pipeline), variant=None,
                                                     revision=None, weight_dtype="float32", **hparams))
    dm = ActionTripleDataModule(root=str(folder), action="jumping", resolution=32, action_different="generate",
                                generate_steps=2, generate_per_anchor=1, generate_guidance=generate_guidance)
    dm.trainer = SimpleNamespace(lightning_module=module)
    return dm, module, gen


def test_partners_are_regenerated_for_another_weight_dtype_or_new_weights(exemplar_only, tiny_dir, tmp_path, capsys):
    """The cache key holds the backbone's identity (model files' sizes and mtimes) and the dtype:
    the same path with another ``model.weight_dtype``, or new weights there, never reuses it."""
    folder = exemplar_only(tmp_path / "exemplars")
    pipeline = shutil.copytree(tiny_dir / "pipeline", tmp_path / "pipeline")
    dm, module, gen = _generating_datamodule(folder, pipeline)
    dm.prepare_data()
    dm.prepare_data()
    assert gen.calls == 4  # made once, then reused
    module.hparams.weight_dtype = "bfloat16"
    dm.prepare_data()
    assert gen.calls == 8
    assert "were made with other settings (weight_dtype); generating them again" in capsys.readouterr().err
    weights = next(pipeline.glob("unet/*.safetensors"))
    weights.write_bytes(weights.read_bytes())  # new weights at the same path: a new mtime
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    dm.prepare_data()
    assert gen.calls == 12
    assert "(backbone_identity)" in capsys.readouterr().err


def test_a_partner_cache_without_the_manifest_format_is_regenerated(exemplar_only, tiny_dir, tmp_path, capsys):
    """A cache written before the manifest had a format (SD3 and FLUX partners then came out at the img2img
    pipeline's default size) is never reused: it is made again, with the note naming the manifest format."""
    folder = exemplar_only(tmp_path / "exemplars")
    dm, _, gen = _generating_datamodule(folder, tiny_dir / "pipeline")
    dm.prepare_data()
    cache = folder / ".adi_cache" / "partners-jumping"
    manifest = json.loads((cache / MANIFEST).read_text())
    assert manifest["format"] == MANIFEST_FORMAT
    del manifest["format"]
    (cache / MANIFEST).write_text(json.dumps(manifest))
    dm.prepare_data()
    assert gen.calls == 8 and json.loads((cache / MANIFEST).read_text())["format"] == MANIFEST_FORMAT
    assert (f"the generated partners in {cache} were made with other settings (manifest format); generating them "
            "again") in capsys.readouterr().err
    dm.prepare_data()
    assert gen.calls == 8  # then reused


def test_a_damaged_partner_cache_is_rebuilt(exemplar_only, tiny_dir, tmp_path, capsys):
    folder = exemplar_only(tmp_path / "exemplars")
    dm, _, gen = _generating_datamodule(folder, tiny_dir / "pipeline")
    dm.prepare_data()
    cache = folder / ".adi_cache" / "partners-jumping"
    next(cache.glob("*.png")).unlink()
    dm.prepare_data()
    assert gen.calls == 8 and len(list(cache.glob("*.png"))) == 4
    assert f"the generated partners in {cache} are damaged (" in capsys.readouterr().err
    (cache / MANIFEST).write_text("{not json")
    dm.prepare_data()
    assert gen.calls == 12 and json.loads((cache / MANIFEST).read_text())["settings"]["weight_dtype"] == "float32"


@pytest.mark.parametrize("typed, family, used", [(None, StableDiffusionFamily, 7.5), (None, FluxFamily, 3.5),
                                                 (5.0, FluxFamily, 5.0)])
def test_partner_guidance_is_the_familys_unless_typed(exemplar_only, tiny_dir, tmp_path, typed, family, used):
    """data.generate_guidance unset takes the backbone family's default (FLUX: its embedded 3.5), as
    model.guidance_scale does; a typed value is used as typed; the manifest records the value in force."""
    folder = exemplar_only(tmp_path / "exemplars")
    dm, _, gen = _generating_datamodule(folder, tiny_dir / "pipeline", family=family, generate_guidance=typed)
    dm.prepare_data()
    manifest = json.loads((folder / ".adi_cache" / "partners-jumping" / MANIFEST).read_text())
    assert gen.guidance == used and manifest["settings"]["guidance"] == used
