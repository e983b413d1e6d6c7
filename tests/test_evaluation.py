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
from adi_lightning.evaluation import ActionBenchMetric, CLIPJudge, Judge, Judgement


def test_metric_on_hand_made_judgements():
    metric = ActionBenchMetric()
    # 4 images prompted as "cat", "cat", "dog", "dog"; exemplars were "red" and "blue".
    metric.update(pred_action=["jumping", "jumping", "standing", "jumping"],
                  pred_subject=["cat", "red", "dog", "cat"],
                  target_action="jumping", target_subject=["cat", "cat", "dog", "dog"],
                  exemplar_subjects={"red", "blue"},
                  pred_context=["park", "room", "park", "beach"], exemplar_contexts={"park"})
    metric.update(pred_action=["jumping"], pred_subject=["dog"], target_action="jumping", target_subject=["dog"],
                  exemplar_subjects={"red", "blue"}, pred_context=["room"], exemplar_contexts={"park"})
    values = {k: float(v) for k, v in metric.compute().items()}
    expected = {"action_acc": 4 / 5, "subject_acc": 3 / 5, "both_correct": 2 / 5, "leak": 1 / 5, "context_leak": 2 / 5}
    assert values == pytest.approx(expected, abs=1e-7)


def test_context_leak_is_nan_without_a_context_judge():
    metric = ActionBenchMetric()
    metric.update(["a"], ["s"], "a", ["s"], set())
    assert math.isnan(float(metric.compute()["context_leak"]))
    with pytest.raises(ValueError):
        metric.update(["a", "b"], ["s"], "a", ["s"], set())


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


def test_clip_judge_picks_candidates_from_a_local_folder(tiny_clip):
    judge = CLIPJudge(tiny_clip, actions=["jumping", "standing"], subjects=["cat", "dog", "man"], contexts=["park", "beach"])
    images = [Image.new("RGB", (48, 48), (40 * i, 200 - 30 * i, 90)) for i in range(4)]
    verdict = judge.judge(images)
    assert len(verdict.action) == 4 and set(verdict.action) <= {"jumping", "standing"}
    assert set(verdict.subject) <= {"cat", "dog", "man"} and set(verdict.context) <= {"park", "beach"}
    scores = judge.scores(images, ["a photo of a cat", "a photo of a dog"])
    assert scores.shape == (4, 2) and (scores >= 0).all() and (scores <= 100).all()
    assert judge.judge(images) == verdict  # deterministic


class FixedJudge(Judge):
    """Says every image shows the anchor's first subject jumping in the park."""

    def judge(self, images):
        n = len(images)
        return Judgement(["jumping"] * n, ["red"] * n, ["park"] * n)


def test_validate_with_a_judge_logs_and_writes_metrics(make_module, tiny_data, tmp_path):
    module = make_module(judge=FixedJudge())
    dm = ActionTripleDataModule(root=tiny_data, action="jumping", resolution=32, eval_subjects=["cat", "dog"],
                                validation_seeds=[0, 1], test_seeds=[0, 1, 2])
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    (logged,) = trainer.validate(module, dm)
    assert logged["val/action_acc"] == 1.0 and logged["val/subject_acc"] == 0.0 and logged["val/leak"] == 1.0
    (report,) = tmp_path.glob("metrics/validation_step*.json")
    data = json.loads(report.read_text())
    assert data["images"] == 4 and data["metrics"]["both_correct"] == 0.0 and data["metrics"]["context_leak"] == 1.0
    rows = list(csv.DictReader(open(report.with_suffix(".csv"))))
    assert [r["subject"] for r in rows] == ["cat", "cat", "dog", "dog"] and rows[0]["pred_subject"] == "red"
    (logged,) = trainer.test(module, dm)
    assert json.loads(next(tmp_path.glob("metrics/test_step*.json")).read_text())["images"] == 6
    assert (tmp_path / "images").is_dir()


def test_toy_experiment_test_writes_judged_metrics_and_grid(tmp_path, monkeypatch):
    """The shipped toy backbone and exact ToyJudge, through the CLI: fit a trained identifier, then
    ``test`` it; the metrics file covers every (unseen subject, seed) and the grid is written."""
    from adi_lightning.cli import RUN_DIR_ENV, main

    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("sys.argv", ["adi_lightning"])
    experiment = Path(__file__).resolve().parents[1] / "experiments" / "toy_kicking.yaml"
    common = ["--config", str(experiment), f"--data.root={tmp_path / 'data'}", f"--trainer.default_root_dir={tmp_path}",
              "--trainer.enable_progress_bar=false", "--trainer.logger=false", "--model.num_inference_steps=3",
              "--data.eval_subjects=[cat, robot]", "--data.test_seeds=[0, 1, 2]"]
    main(args=["fit", *common, "--trainer.max_steps=2", "--trainer.limit_val_batches=0", "--trainer.callbacks=[]"])
    (identifier,) = tmp_path.glob("*/identifier.safetensors")
    main(args=["test", *common, f"--model.identifier_path={identifier}"])
    (report,) = tmp_path.glob("*/metrics/test_step*.json")
    data = json.loads(report.read_text())
    assert data["judge"] == "ToyJudge" and data["action"] == "kicking" and data["images"] == 6
    assert set(data["metrics"]) == {"action_acc", "subject_acc", "both_correct", "leak", "context_leak"}
    assert all(0.0 <= v <= 1.0 for v in data["metrics"].values())
    rows = list(csv.DictReader(open(report.with_suffix(".csv"))))
    assert [(r["subject"], r["seed"]) for r in rows] == [(s, str(i)) for s in ("cat", "robot") for i in range(3)]
    (grid,) = report.parent.parent.glob("images/test_step*.png")
    assert Image.open(grid).size[0] > 3 * 32  # three seed columns of 32 px images plus the label column
