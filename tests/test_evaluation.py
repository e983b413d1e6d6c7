"""ActionBench metrics, the judge interface, and evaluation through validate/test."""

import csv
import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image

from adi_lightning.data import ActionTripleDataModule
from adi_lightning.evaluation import (
    ActionBenchMetric,
    CLIPJudge,
    Judge,
    Judgement,
    clean_against,
    judge_rows,
    metric_names,
    with_untrained,
    with_word,
)


def judged(*rows: str) -> list[dict[str, str]]:
    """``"action subject colour pattern background"`` strings -> judged rows (``Judgement.rows()``)."""
    keys = ("action", "subject", "colour", "pattern", "background")
    return [dict(zip(keys, row.split())) for row in rows]


FACTORS = ("colour", "pattern", "background")
# The hard case: every exemplar shares one appearance.
SHARED = [{"subject": s, "context": "beach", "colour": "yellow", "pattern": "striped", "background": "beach"}
          for s in ("man", "woman")]


def rates(rows, subjects, exemplars, factors=FACTORS, action="jumping") -> dict[str, float]:
    metric = ActionBenchMetric(factors)
    metric.update(rows, action, subjects, exemplars)
    return {k: float(v) for k, v in metric.compute().items()}


def test_judgement_rows_and_lengths():
    verdict = Judgement(["jumping", "standing"], ["cat", "man"], {"colour": ["red", "blue"]})
    assert verdict.rows() == [{"action": "jumping", "subject": "cat", "colour": "red"},
                              {"action": "standing", "subject": "man", "colour": "blue"}]
    with pytest.raises(ValueError):
        Judgement(["jumping"], ["cat"], {"colour": ["red", "blue"]}).rows()


def test_metric_on_hand_made_judgements_sums_over_batches():
    metric = ActionBenchMetric(FACTORS)
    # 5 images prompted as cat, cat, dog, dog | dog.
    metric.update(judged("jumping cat yellow striped beach", "jumping man red dotted park",
                         "standing dog blue striped park", "jumping cat red plain night"),
                  "jumping", ["cat", "cat", "dog", "dog"], SHARED)
    metric.update(judged("jumping dog red plain park"), "jumping", ["dog"], SHARED)
    values = {k: float(v) for k, v in metric.compute().items()}
    assert math.isnan(values.pop("leak_pool_appearance"))  # no context pool given
    assert values == pytest.approx({
        "action_acc": 4 / 5, "subject_acc": 3 / 5, "both_correct": 2 / 5,
        "clean_both_correct": 1 / 5,  # image 1 is right but wears the exemplars' whole look
        "leak_subject": 1 / 5, "leak_colour": 1 / 5, "leak_pattern": 2 / 5, "leak_background": 1 / 5,
        "appearance_leak": 1 / 5,
    }, abs=1e-7)
    assert [*values, "leak_pool_appearance"] == [n for n in metric_names(FACTORS)
                                                 if not n.endswith(("_untrained", "_excess", "_word"))]


def test_attribute_leaks_and_their_excess_over_the_untrained_identifier():
    subjects = ["cat", "cat", "dog", "dog"]
    trained = rates(judged("jumping man yellow striped beach", "jumping cat yellow plain park",
                           "jumping dog yellow striped park", "jumping woman red plain night"), subjects, SHARED)
    untrained = rates(judged("standing cat yellow plain park", "standing cat red plain park",
                             "standing dog red plain park", "standing man red plain beach"), subjects, SHARED)
    values = with_untrained(trained, untrained)
    expected = {  # name: (trained, untrained)
        "leak_subject": (2 / 4, 1 / 4), "leak_colour": (3 / 4, 1 / 4), "leak_pattern": (2 / 4, 0.0),
        "leak_background": (1 / 4, 1 / 4), "appearance_leak": (1 / 4, 0.0),
    }
    for name, (now, before) in expected.items():
        assert values[name] == pytest.approx(now)
        assert values[f"{name}_untrained"] == pytest.approx(before)
        assert values[f"{name}_excess"] == pytest.approx(now - before)
    assert set(values) == {n for n in metric_names(FACTORS) if "_word" not in n}  # the word's: with_word
    assert "action_acc_excess" not in values and values["action_acc"] == 1.0  # excess is for leaks only


def test_appearance_leak_needs_one_exemplars_whole_look():
    """A 'diverse' folder: every single colour / pattern / background is some exemplar's, but no image
    wears the (colour, pattern, background) of one exemplar: single leaks 1, the tuple leak 0."""
    diverse = [{"subject": "man", "colour": "red", "pattern": "striped", "background": "beach"},
               {"subject": "woman", "colour": "blue", "pattern": "plain", "background": "park"},
               {"subject": "child", "colour": "green", "pattern": "dotted", "background": "night"}]
    rows = judged("jumping cat red plain night", "jumping cat blue dotted beach", "jumping dog green striped park")
    values = rates(rows, ["cat", "cat", "dog"], diverse)
    assert (values["leak_colour"], values["leak_pattern"], values["leak_background"]) == (1.0, 1.0, 1.0)
    assert values["appearance_leak"] == 0.0 and values["clean_both_correct"] == values["both_correct"] == 1.0
    rows[1] = dict(rows[1], pattern="plain", background="park")  # now exactly the woman's look
    flags = judge_rows(rows, "jumping", ["cat", "cat", "dog"], diverse, FACTORS)
    assert [f["appearance_leak"] for f in flags] == [False, True, False]
    assert [f["clean_both_correct"] for f in flags] == [True, False, True]


def test_clean_both_correct_on_a_hand_made_case():
    rows = judged("jumping cat yellow striped beach",  # right, but the exemplars' look: not clean
                  "jumping cat yellow striped park",  # right; colour and pattern leak, not the whole look
                  "jumping man red plain park",  # subject leak: not both correct
                  "standing dog red plain park",  # wrong action
                  "jumping dog red plain park")  # clean
    values = rates(rows, ["cat", "cat", "dog", "dog", "dog"], SHARED)
    assert values["both_correct"] == pytest.approx(3 / 5) and values["clean_both_correct"] == pytest.approx(2 / 5)
    # No appearance factor known (the exemplars only name subjects): clean_both_correct == both_correct.
    subjects_only = [{"subject": "man"}, {"subject": "woman"}]
    values = rates(rows, ["cat", "cat", "dog", "dog", "dog"], subjects_only)
    assert values["clean_both_correct"] == values["both_correct"] == pytest.approx(3 / 5)
    assert math.isnan(values["appearance_leak"]) and math.isnan(values["leak_colour"])
    assert values["leak_subject"] == pytest.approx(1 / 5)


def test_pool_appearance_leak_counts_the_context_pools_looks_not_the_exemplars():
    """ADI's context partners come from a pool of other looks: an image wearing one pool image's
    whole look (and no exemplar's) is a pool leak; without a pool the rate is unknown (NaN)."""
    pool = [{"subject": "man", "colour": "red", "pattern": "plain", "background": "park"},
            {"subject": "woman", "colour": "purple", "pattern": "plain", "background": "night"},
            {"subject": "child", "colour": "yellow", "pattern": "striped", "background": "beach"}]  # = exemplars' look
    rows = judged("jumping cat red plain park",  # the first pool image's look
                  "jumping cat purple plain park",  # a mix: no single pool image
                  "jumping dog yellow striped beach",  # the exemplars' look: an appearance leak, not a pool leak
                  "jumping dog blue dotted street")  # nobody's
    flags = judge_rows(rows, "jumping", ["cat", "cat", "dog", "dog"], SHARED, FACTORS, pool)
    assert [f["leak_pool_appearance"] for f in flags] == [True, False, False, False]
    assert [f["appearance_leak"] for f in flags] == [False, False, True, False]
    metric = ActionBenchMetric(FACTORS)
    metric.update(rows, "jumping", ["cat", "cat", "dog", "dog"], SHARED, pool)
    assert float(metric.compute()["leak_pool_appearance"]) == pytest.approx(1 / 4)
    assert math.isnan(rates(rows, ["cat", "cat", "dog", "dog"], SHARED)["leak_pool_appearance"])


def test_leaks_are_nan_when_unknown_and_lengths_must_match():
    values = rates([{"action": "a", "subject": "s"}], ["s"], [], factors=(), action="a")
    assert values["action_acc"] == 1.0 and values["clean_both_correct"] == 1.0
    assert math.isnan(values["appearance_leak"]) and math.isnan(values["leak_subject"])
    with pytest.raises(ValueError):
        ActionBenchMetric().update(judged("a s", "b s"), "a", ["s"], [])


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random tiny CLIP saved locally (no hub): mechanics only."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor as ImageProcessor
    from adi_lightning.tiny import build_clip_tokenizer

    root = tmp_path_factory.mktemp("clip")
    words = ["a", "photo", "of", "someone", "taken", "in", "jumping", "standing", "cat", "dog", "man", "park", "beach"]
    tokenizer = build_clip_tokenizer(words, root / "tokenizer")
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, image_size=32, patch_size=8)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    processor = CLIPProcessor(image_processor=ImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    model.save_pretrained(root / "clip")
    processor.save_pretrained(root / "clip")
    return str(root / "clip")


def test_clip_judge_picks_candidates_from_a_local_folder(tiny_clip, monkeypatch):
    judge = CLIPJudge(tiny_clip, actions=["jumping", "standing"], subjects=["cat", "dog", "man"], contexts=["park", "beach"])
    images = [Image.new("RGB", (48, 48), (40 * i, 200 - 30 * i, 90)) for i in range(4)]
    verdict = judge.judge(images)
    assert len(verdict.action) == 4 and set(verdict.action) <= {"jumping", "standing"}
    assert set(verdict.subject) <= {"cat", "dog", "man"} and list(verdict.factors) == ["context"]
    assert set(verdict.factors["context"]) <= {"park", "beach"}
    scores = judge.scores(images, ["a photo of a cat", "a photo of a dog", "a photo of a man"])
    assert scores.shape == (4, 3) and (scores >= 0).all() and (scores <= 100).all()
    assert verdict.subject == [["cat", "dog", "man"][i] for i in scores.argmax(dim=1).tolist()]  # cache == fresh
    monkeypatch.setattr(judge, "encode_texts", lambda texts: pytest.fail("judge() re-encoded the candidate texts"))
    assert judge.judge(images) == verdict  # deterministic, from the cached text features
    assert CLIPJudge(tiny_clip, actions=["jumping"], subjects=["cat"]).judge(images[:1]).factors == {}


class FixedJudge(Judge):
    """Says a generated image shows the exemplar "red" jumping in the park, and an image of the
    untrained identifier (all black, see ``count_untrained``) a cat standing in no known place."""

    def judge(self, images):
        untrained = [im.getextrema() == ((0, 0),) * 3 for im in images]
        return Judgement(["standing" if u else "jumping" for u in untrained],
                         ["cat" if u else "red" for u in untrained],
                         {"context": ["nowhere" if u else "park" for u in untrained]})


def count_untrained(module) -> list[int]:
    """Make ``module.generate`` draw black images for the untrained table; returns the count of those."""
    generate, count = module.generate, [0]

    def counted(prompts, seeds, table=None):
        if table is None:
            return generate(prompts, seeds)
        assert table is module.identifier.initial
        count[0] += len(prompts)
        return [Image.new("RGB", (32, 32)) for _ in prompts]

    module.generate = counted
    return count


@pytest.mark.e2e
def test_validate_with_a_judge_logs_and_writes_metrics(make_module, tiny_data, tmp_path):
    module = make_module(judge=FixedJudge(), identifier_path="untrained")  # refused unless asked for
    untrained = count_untrained(module)
    dm = ActionTripleDataModule(root=tiny_data, action="jumping", resolution=32, eval_subjects=["cat", "dog"],
                                validation_seeds=[0, 1], test_seeds=[0, 1, 2])
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    (logged,) = trainer.validate(module, dm)
    assert untrained[0] == 4  # every (prompt, seed) once
    assert logged["val/action_acc"] == 1.0 and logged["val/subject_acc"] == 0.0 and logged["val/leak_subject"] == 1.0
    assert logged["val/leak_subject_untrained"] == 0.0 and logged["val/leak_subject_excess"] == 1.0
    assert logged["val/appearance_leak"] == 1.0 and logged["val/clean_both_correct"] == 0.0
    assert "val/clean_both_correct_word" in logged  # what the sweeps optimise
    (report,) = tmp_path.glob("metrics/validation_step*.json")
    data = json.loads(report.read_text())
    assert data["images"] == 4 and data["metrics"]["both_correct"] == 0.0
    assert data["metrics"]["leak_context"] == 1.0 and data["metrics"]["leak_context_untrained"] == 0.0
    rows = list(csv.DictReader(open(report.with_suffix(".csv"))))
    assert [r["subject"] for r in rows] == ["cat", "cat", "dog", "dog"]
    assert (rows[0]["pred_subject"], rows[0]["pred_context"], rows[0]["untrained_subject"]) == ("red", "park", "cat")
    assert (rows[0]["leak_subject"], rows[0]["leak_context"], rows[0]["appearance_leak"]) == ("True",) * 3
    assert rows[0]["clean_both_correct"] == "False" and rows[0]["untrained_context"] == "nowhere"
    (logged,) = trainer.test(module, dm)
    assert untrained[0] == 4 + 6 and logged["test/leak_context_excess"] == 1.0
    assert json.loads(next(tmp_path.glob("metrics/test_step*.json")).read_text())["images"] == 6
    assert (tmp_path / "images").is_dir()


def _fit_validating_twice(module, tiny_data, root) -> None:
    """Two steps on the tiny folder, validating (cat, dog x seeds 0, 1) after each."""
    dm = ActionTripleDataModule(root=tiny_data, action="jumping", resolution=32, eval_subjects=["cat", "dog"],
                                validation_seeds=[0, 1], repeats=1)
    trainer = L.Trainer(max_steps=2, val_check_interval=1, num_sanity_val_steps=0, accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        default_root_dir=root)
    trainer.fit(module, dm)


@pytest.mark.e2e
def test_a_fit_that_validates_twice_generates_the_untrained_images_once(make_module, tiny_data, tmp_path):
    module = make_module(judge=FixedJudge())
    untrained = count_untrained(module)
    _fit_validating_twice(module, tiny_data, tmp_path)
    reports = sorted(tmp_path.glob("metrics/validation_step*.json"))
    assert [r.stem for r in reports] == ["validation_step000001", "validation_step000002"]
    assert untrained[0] == 4  # 2 prompts x 2 seeds, judged once for both validations
    for report in reports:
        metrics = json.loads(report.read_text())["metrics"]
        assert metrics["leak_subject_untrained"] == 0.0 and metrics["leak_subject_excess"] == 1.0


def test_clean_both_correct_against_the_word_excuses_only_the_looks_the_word_draws_too():
    subjects = ["cat", "cat", "dog"]
    trained = judge_rows(judged("jumping cat yellow striped beach", "jumping cat yellow striped beach",
                                "jumping dog red plain park"), "jumping", subjects, SHARED, FACTORS)
    # The word's own images: image 1 wears the exemplars' whole look too, image 2 does not.
    word = judge_rows(judged("jumping cat yellow striped beach", "jumping cat red plain park",
                             "standing dog red plain park"), "jumping", subjects, SHARED, FACTORS)
    assert [f["clean_both_correct"] for f in trained] == [False, False, True]
    assert clean_against(trained, word) == [True, False, True]
    values = with_word({"leak_colour": 2 / 3, "leak_colour_untrained": 0.0, "leak_colour_excess": 2 / 3},
                       {"leak_colour": 1 / 3}, clean_against(trained, word))
    assert values["leak_colour_word"] == pytest.approx(1 / 3) and values["leak_colour_word_excess"] == pytest.approx(1 / 3)
    assert values["clean_both_correct_word"] == pytest.approx(2 / 3)
    assert "leak_colour_untrained_word" not in values


@pytest.mark.e2e
def test_the_action_word_reference_uses_the_word_and_is_generated_once(make_module, tiny_data, tmp_path):
    """Every validation prompt is also drawn with data.action in place of <A> (same seeds, no
    identifier), judged once per run (two validations, one set of word images), and reported."""
    module = make_module(judge=FixedJudge())
    untrained = count_untrained(module)
    drawn, generate = [], module.generate

    def recording(prompts, seeds, table=None):
        if table is None and not any("<A>" in p for p in prompts):  # the word's own images
            drawn.extend(zip(prompts, seeds))
        return generate(prompts, seeds, table)

    module.generate = recording
    _fit_validating_twice(module, tiny_data, tmp_path)
    assert sorted(drawn) == [(f"a photo of a {s} jumping", i) for s in ("cat", "dog") for i in (0, 1)]
    assert untrained[0] == 4
    for report in sorted(tmp_path.glob("metrics/validation_step*.json")):
        metrics = json.loads(report.read_text())["metrics"]
        # FixedJudge sees the word's images as it sees trained ones: "red" in the park, jumping.
        assert metrics["leak_context_word"] == 1.0 and metrics["leak_context_word_excess"] == 0.0
        assert metrics["leak_context_untrained"] == 0.0 and metrics["leak_context_excess"] == 1.0
        assert metrics["clean_both_correct_word"] == 0.0  # the subject is wrong: not both correct
        rows = list(csv.DictReader(open(report.with_suffix(".csv"))))
        assert [r["word_context"] for r in rows] == ["park"] * 4


@pytest.mark.e2e
def test_toy_experiment_test_writes_judged_metrics_and_grid(tmp_path, monkeypatch):
    """The shipped toy backbone and exact ToyJudge, through the CLI: fit a trained identifier, then
    ``test`` it; the metrics file covers every (unseen subject, seed) and the grid is written."""
    from adi_lightning.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    experiment = Path(__file__).resolve().parents[1] / "experiments" / "toy_kicking.yaml"
    common = ["--config", str(experiment), f"--trainer.default_root_dir={tmp_path}",
              "--trainer.enable_progress_bar=false", "--trainer.logger=false", "--model.num_inference_steps=3",
              "--data.eval_subjects=[cat, robot]", "--data.test_seeds=[0, 1, 2]"]
    # "person" is a noun of the toy templates ("a photo of a person {}"): the run warns about it.
    with pytest.warns(UserWarning, match="initializer_token='person' is a word of data.prompt_templates"):
        main(args=["fit", *common, "--trainer.max_steps=2", "--model.starts=1", "--trainer.limit_val_batches=0", "--trainer.callbacks=[]",
                   "--model.initializer_token=person"])
    (identifier,) = tmp_path.glob("*/identifier.safetensors")
    from adi_lightning.identifier import read_identifier

    meta = read_identifier(identifier)[1]  # the masking settings travel with the identifier
    assert (meta["mask_statistic"], meta["initializer_token"], meta["timestep_sampling"], meta["large_t_steps"]) == (
        "projection", "person", "importance", "0")
    main(args=["test", *common, f"--model.identifier_path={identifier}"])
    (report,) = tmp_path.glob("*/metrics/test_step*.json")
    data = json.loads(report.read_text())
    assert data["judge"] == "ToyJudge" and data["action"] == "kicking" and data["images"] == 6
    metrics = data["metrics"]
    assert set(metrics) == set(metric_names(("background", "pattern", "colour")))
    assert None not in metrics.values(), "the toy folder names every exemplar's colour, pattern and background"
    assert all(-1.0 <= v <= 1.0 if k.endswith("_excess") else 0.0 <= v <= 1.0 for k, v in metrics.items())
    assert metrics["leak_colour_excess"] == pytest.approx(metrics["leak_colour"] - metrics["leak_colour_untrained"])
    rows = list(csv.DictReader(open(report.with_suffix(".csv"))))
    assert [(r["subject"], r["seed"]) for r in rows] == [(s, str(i)) for s in ("cat", "robot") for i in range(3)]
    (grid,) = report.parent.parent.glob("images/test_step*.png")
    assert Image.open(grid).size[0] > 3 * 32  # three seed columns of 32 px images plus the label column
