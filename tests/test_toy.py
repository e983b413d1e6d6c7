"""The toy world, its shipped pipeline and judges, the pretraining command (data export: test_toy_export.py)."""

import json
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import CLIPTokenizer  # noqa: E402

from adi_lightning.toy import DEFAULT_GUIDANCE_SCALE, toy_judges_path, toy_pipeline_path  # noqa: E402
from adi_lightning.toy.__main__ import main  # noqa: E402
from adi_lightning.toy.world import (  # noqa: E402
    ACTIONS, ANIMALS, HUMANS, SUBJECTS, WORDS, Spec, ToyActionWorld, caption, parse_caption, render, sample_spec,
)


def test_world_is_rich_enough():
    assert len(ACTIONS) >= 8 and len(SUBJECTS) >= 10
    assert {"standing", "jumping", "raising", "squatting", "kicking", "waving", "lying", "handstand"} <= set(ACTIONS)
    assert len(HUMANS) >= 4 and len(ANIMALS) >= 4


def test_every_pair_renders_deterministically():
    rng = random.Random(0)
    for subject in SUBJECTS:
        for action in ACTIONS:
            spec = sample_spec(rng, subject=subject, action=action)
            a, b = np.asarray(render(spec)), np.asarray(render(spec))
            assert a.shape == (32, 32, 3) and (a == b).all(), (subject, action)
            assert a.std() > 10, (subject, action)
    # another pose changes the figure only: the top-left sky pixel is kept
    spec = Spec("man", "jumping", background="beach", x=0.1, seed=3)
    a, b = np.asarray(render(spec)), np.asarray(render(spec.with_action("squatting")))
    assert (a[0, 0] == b[0, 0]).all() and not (a == b).all()


def test_world_sampler_is_seeded_and_holds_out():
    w1, w2 = ToyActionWorld(seed=5), ToyActionWorld(seed=5)
    s1, s2 = [w1.sample_spec() for _ in range(50)], [w2.sample_spec() for _ in range(50)]
    assert s1 == s2
    world = ToyActionWorld(seed=1)
    assert not any((s.subject, s.action) in world.held_out for s in (world.sample_spec() for _ in range(2000)))


def test_captions_parse_back():
    rng = random.Random(1)
    for _ in range(300):
        spec = sample_spec(rng)
        parsed = parse_caption(caption(spec, rng))
        assert parsed["action"] == spec.action
        assert parsed["subject"] == spec.subject or (parsed["subject"] == "person" and spec.subject in HUMANS)
        for key in ("colour", "pattern", "background"):
            assert parsed[key] in (None, getattr(spec, key))
    spec = Spec("cat", "jumping", colour="yellow", pattern="striped", background="beach")
    assert caption(spec) == "a photo of a striped yellow cat jumping on the beach"
    assert parse_caption("a photo of a yellow cat jumping") == dict(
        pattern=None, colour="yellow", subject="cat", action="jumping", background=None)
    with pytest.raises(ValueError):
        parse_caption("a photo of a zebra jumping")


@pytest.fixture(scope="module")
def toy_pipe():
    from adi_lightning.backbone import load_pipeline

    return load_pipeline(str(toy_pipeline_path()))


def test_shipped_assets_are_small_and_safetensors():
    root = toy_pipeline_path().parent
    files = [p for p in root.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 30 * 2**20
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".ckpt")]
    assert (toy_judges_path() / "judges.safetensors").is_file()


def test_shipped_tokenizer_has_single_token_words():
    tok = CLIPTokenizer.from_pretrained(toy_pipeline_path() / "tokenizer")
    for word in (*WORDS, "person", "cropped", "one"):
        assert tok.tokenize(word) == [word + "</w>"], word


def test_shipped_pipeline_loads_and_generates(toy_pipe):
    from adi_lightning.backbone import describe_pipeline

    info = describe_pipeline(toy_pipe, str(toy_pipeline_path()))
    assert info.num_cross_attention_layers == 16
    held = json.loads((toy_pipeline_path() / "toy_pretrain.json").read_text())["held_out"]
    assert held and all(len(p) == 2 for p in held)
    out = toy_pipe(prompt=["a photo of a cat jumping", "a photo of a man lying"], num_inference_steps=3,
                   guidance_scale=DEFAULT_GUIDANCE_SCALE, generator=torch.Generator().manual_seed(0),
                   output_type="np")
    assert out.images.shape == (2, 32, 32, 3) and np.isfinite(out.images).all()


def test_judges_are_accurate_on_fresh_renders():
    from adi_lightning.toy.judges import ToyJudges, judge_accuracy

    judges = ToyJudges()
    acc = judge_accuracy(judges, n=300, seed=4242)
    for head in ("action", "subject", "background", "pattern"):
        assert acc[head] >= 0.98, acc
    pred = judges.predict([render(Spec("dog", "handstand", colour="blue", background="night"))])
    assert set(pred) >= {"action", "subject", "background", "pattern"} and len(pred["action"]) == 1


def test_judges_read_each_shipped_vaes_round_trips_and_not_a_vae_that_loses_the_image():
    from types import SimpleNamespace

    from adi_lightning.backbone import load_pipeline
    from adi_lightning.toy import toy_sd3_pipeline_path
    from adi_lightning.toy.evaluate import judges_on_round_trips
    from adi_lightning.toy.judges import ToyJudges

    judges = ToyJudges()
    for folder in (toy_pipeline_path(), toy_sd3_pipeline_path()):  # 4- and 16-channel VAEs
        acc = judges_on_round_trips(judges, load_pipeline(str(folder)).vae, n=100)
        assert acc["action"] >= 0.95 and acc["subject"] >= 0.95, (folder.name, acc)

    class GreyVAE:  # every image decodes to mid-grey
        def encode(self, x):
            return SimpleNamespace(latent_dist=SimpleNamespace(sample=lambda generator: x))

        def decode(self, z):
            return SimpleNamespace(sample=torch.zeros_like(z))

    acc = judges_on_round_trips(judges, GreyVAE(), n=100)
    assert acc["subject"] < 0.5 and acc["action"] < 0.5, acc


def test_short_pretrain_writes_loadable_pipeline(tmp_path):
    from adi_lightning.backbone import load_pipeline

    out = tmp_path / "pipe"
    main(["pretrain", "--out", str(out), "--steps", "3", "--vae-steps", "2", "--num-images", "48",
          "--batch-size", "4", "--unet-channels", "8", "16", "16", "16", "--text-dim", "32",
          "--layers-per-block", "1", "--log-every", "1"])
    info = json.loads((out / "toy_pretrain.json").read_text())
    assert info["steps"] == 3 and info["final"]
    pipe = load_pipeline(str(out))
    img = pipe(prompt="a photo of a dog waving", num_inference_steps=2, output_type="np").images
    assert img.shape == (1, 32, 32, 3)
    assert not list(tmp_path.glob(".pipe*")), "temp folders left behind"
