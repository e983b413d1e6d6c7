"""What a researcher sees of a run: judged curves during fit (periodic validation that changes nothing
it should not), the run folder's plots, and an end-of-run summary that hides no leak."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from adi_lightning.console import run_summary
from adi_lightning.identifier import read_identifier
from adi_lightning.module import ADIModule

REPO = Path(__file__).resolve().parents[1]


def test_summary_names_every_leak_with_its_untrained_rate(tmp_path):
    metrics = {"action_acc": 1.0, "action_acc_untrained": 0.0, "subject_acc": 0.93, "subject_acc_untrained": 1.0,
               "clean_both_correct": 0.93, "clean_both_correct_untrained": 0.0, "clean_both_correct_word": 0.5,
               "leak_subject": 0.0, "leak_subject_untrained": 0.0, "leak_colour": 0.21, "leak_colour_untrained": 0.86,
               "leak_pattern": 0.79, "leak_pattern_untrained": 0.07, "leak_pattern_excess": 0.72,
               "leak_pattern_word": 0.5, "leak_background": 0.1, "leak_background_untrained": 0.2,
               "appearance_leak": 0.0, "appearance_leak_untrained": 0.0, "leak_pool_appearance": None}
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "validation_step000500.json").write_text(json.dumps(
        {"stage": "validation", "global_step": 500, "images": 14, "metrics": metrics}))
    text = "\n".join(run_summary("fit", tmp_path, 1.0))
    for line in ("action_acc 1.00 (untrained 0.00)", "subject_acc 0.93 (untrained 1.00)",
                 "clean_both_correct 0.93 (untrained 0.00)", "leak_subject 0.00 (untrained 0.00)",
                 "leak_colour 0.21 (untrained 0.86)", "leak_pattern 0.79 (untrained 0.07, word 0.50)",
                 "leak_background 0.10 (untrained 0.20)", "appearance_leak 0.00 (untrained 0.00)"):
        assert line in text, text
    assert "leak_pool_appearance" not in text and "_excess" not in text  # unknown rates, derived figures


def _fit(short_fit, root: Path, every: int) -> Path:
    return short_fit(root, "--model.num_inference_steps=2", "--model.starts=2", "--model.start_steps=2",
                     f"--trainer.val_check_interval={every}", "--trainer.log_every_n_steps=1", steps=7)


def test_periodic_validation_judges_after_the_starts_and_leaves_the_identifier_bit_identical(
        short_fit, tmp_path, monkeypatch):
    """Validation every 2 steps of a 7-step run with 2 starts of 2 steps: those at steps 2 and 4 (inside
    the starts) are skipped, step 6 is judged and so is the last step, 7, though 7 is not a multiple
    of 2. Generation here draws from torch's global RNG on purpose: validation must give the training
    its RNG streams back, so the identifier (and the RNG state at every training step) is bit for bit
    that of a run that never validates. The run folder gets its plots."""
    generate, training_step = ADIModule.generate, ADIModule.training_step
    states: dict[str, list[str]] = {}

    def drawing_generate(self, *args, **kwargs):
        torch.rand(1)  # a pipeline that consumes the global RNG
        return generate(self, *args, **kwargs)

    def recording_step(self, batch, batch_idx):
        states.setdefault(self.run_dir.parent.name, []).append(hashlib.sha256(
            torch.get_rng_state().numpy().tobytes()).hexdigest())
        return training_step(self, batch, batch_idx)

    monkeypatch.setattr(ADIModule, "generate", drawing_generate)
    monkeypatch.setattr(ADIModule, "training_step", recording_step)
    validated = _fit(short_fit, tmp_path / "validated", every=2)
    never = _fit(short_fit, tmp_path / "never", every=100)

    grids = sorted(p.name for p in (validated / "images").glob("validation_step*.png"))
    assert grids == ["validation_step000006.png", "validation_step000007.png"]
    assert not (never / "images").exists() or not list((never / "images").glob("*.png"))
    assert states["validated"] == states["never"] and len(states["never"]) == 7
    trained, _ = read_identifier(validated / "identifier.safetensors")
    assert torch.equal(trained, read_identifier(never / "identifier.safetensors")[0])

    # tiny.yaml masks (β 0.5) and has no judge: loss by role, kept energy and the starts' scores
    plots = sorted(p.name for p in (validated / "plots").glob("*.png"))
    assert plots == ["loss.png", "mask_energy.png", "multi_start.png"], plots
    assert all((validated / "plots" / p).stat().st_size > 1000 for p in plots)


def test_judged_plot_shows_each_metric_beside_its_untrained_rate(tmp_path):
    from types import SimpleNamespace

    from adi_lightning.callbacks import CurvesCallback

    curves = CurvesCallback()
    curves.judged = {450: {"action_acc": 0.9, "action_acc_untrained": 0.0, "leak_pattern": 0.8,
                           "leak_pattern_untrained": 0.07, "leak_pattern_excess": 0.73},
                     500: {"action_acc": 1.0, "action_acc_untrained": 0.0, "leak_pattern": 0.79,
                           "leak_pattern_untrained": 0.07, "leak_pattern_excess": 0.72}}
    module = SimpleNamespace(run_dir=tmp_path, start_selection=None)
    written = curves.write(SimpleNamespace(is_global_zero=True), module)
    assert [p.name for p in written] == ["judged.png"]
    from matplotlib.figure import Figure

    fig = Figure()
    curves._judged(fig)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["action_acc", "leak_pattern"]  # no derived figure (excess) gets a panel
    assert [[line.get_label() for line in ax.get_lines()] for ax in fig.axes] == [["trained", "untrained"]] * 2


def test_progress_bar_counts_the_runs_steps_and_names_the_chosen_start(tiny_pipeline, tiny_data, tmp_path):
    """One bar over the run: total = trainer.max_steps (not the epoch's batches), completed = the global
    step; its description ends on the multi-start phase ("start k of K chosen")."""
    from adi_lightning.cli import ADICLI
    from adi_lightning.console import StepRichProgressBar

    cli = ADICLI(args=["--config", str(REPO / "experiments" / "tiny.yaml"),
                       f"--model.pretrained_model_name_or_path={tiny_pipeline}", f"--data.root={tiny_data}",
                       f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_model_summary=false",
                       "--model.starts=2", "--model.start_steps=1", "--trainer.max_steps=3",
                       "--trainer.val_check_interval=100", "--trainer.logger=false"], run=False)
    cli.trainer.fit(cli.model, cli.datamodule)
    bar = cli.trainer.progress_bar_callback
    assert isinstance(bar, StepRichProgressBar)
    task = bar.progress.tasks[bar.train_progress_bar_id]
    assert (task.total, task.completed) == (3, 3) and cli.trainer.num_training_batches > 3
    assert task.description.endswith("train, start 2 of 2 chosen") or "start 1 of 2 chosen" in task.description
