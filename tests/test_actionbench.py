"""ActionBench-toy v2's pure helpers and the presets it trains with (no training here)."""

from __future__ import annotations

import argparse
import inspect
import math
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import actionbench_toy as bench  # noqa: E402


def record(method, action, seed, folder, beta=None, **metrics):
    return {"spec": bench.spec(method, action, folder, seed, 300, 4, beta), "metrics": metrics}


def args(**over):
    base = dict(actions=["jumping", "kicking", "squatting"], seeds=[3, 4, 5], folders=["shared", "diverse"],
                methods=list(bench.MAIN_METHODS), steps=300, test_seeds=4, ablations=list(bench.ABLATIONS),
                ablation_action="jumping", ablation_folder="shared", curve_betas=None,
                curve_methods=["adi", "adi_channel"], curve_actions=["jumping"], curve_folder="shared",
                curve_seeds=[3])
    return argparse.Namespace(**{**base, **over})


# ------------------------------------------------------------------ bootstrap
def test_bootstrap_of_constant_differences_is_a_point():
    assert bench.bootstrap_ci([0.25] * 9) == (0.25, 0.25, 0.25)


def test_bootstrap_of_zero_and_one_spans_both():
    # resampled means of [0, 1] are 0, 0.5, 1 with probability 1/4, 1/2, 1/4: the 2.5% and 97.5%
    # percentiles are 0 and 1.
    assert bench.bootstrap_ci([0.0, 1.0]) == (0.5, 0.0, 1.0)


def test_bootstrap_interval_is_deterministic_and_brackets_the_mean():
    values = [0.1, 0.3, -0.2, 0.4, 0.0, 0.25, 0.05, 0.15, 0.2]
    mean, lo, hi = bench.bootstrap_ci(values)
    assert mean == pytest.approx(sum(values) / len(values))
    assert lo < mean < hi and -0.2 <= lo and hi <= 0.4
    assert bench.bootstrap_ci(values) == (mean, lo, hi)  # fixed RNG seed
    assert bench.bootstrap_ci(values, seed=1) != (mean, lo, hi)
    # all positive differences: the interval excludes 0; a wider level gives a wider interval
    pos = [0.1, 0.2, 0.3, 0.15, 0.25]
    _, lo95, hi95 = bench.bootstrap_ci(pos)
    _, lo50, hi50 = bench.bootstrap_ci(pos, level=0.5)
    assert 0 < lo95 <= lo50 < hi50 <= hi95


def test_bootstrap_interval_is_the_percentile_interval():
    # 0..19: mean 9.5, standard error sqrt(33.25 / 20) = 1.29, so the 95% interval is about 9.5 ± 2.5
    # (not the min / max of the resampled means, about 9.5 ± 4.2)
    mean, lo, hi = bench.bootstrap_ci([float(v) for v in range(20)])
    assert mean == 9.5
    assert 6.6 < lo < 7.4 and 11.6 < hi < 12.4


def test_bootstrap_drops_nan_and_handles_empty():
    assert bench.bootstrap_ci([0.5, math.nan, 0.5]) == (0.5, 0.5, 0.5)
    assert all(math.isnan(x) for x in bench.bootstrap_ci([math.nan]))


# ------------------------------------------------------------------ aggregation
def test_summarize_mean_sample_std_and_nan():
    runs = [record("adi", "jumping", s, "shared", action_acc=v, leak_colour=lc)
            for s, v, lc in ((3, 0.2, math.nan), (4, 0.4, 0.5), (5, 0.6, math.nan))]
    out = bench.summarize(runs, ["action_acc", "leak_colour", "absent"])
    assert out["action_acc"]["mean"] == pytest.approx(0.4)
    assert out["action_acc"]["std"] == pytest.approx(0.2)  # sample std (n - 1)
    assert out["leak_colour"] == {"mean": 0.5, "std": 0.0, "n": 1}
    assert out["absent"]["n"] == 0 and math.isnan(out["absent"]["mean"])


def test_paired_differences_match_by_action_seed_folder():
    runs = [
        record("adi", "jumping", 3, "shared", action_acc=0.5), record("pplus", "jumping", 3, "shared", action_acc=0.25),
        record("adi", "kicking", 3, "shared", action_acc=0.5), record("pplus", "kicking", 3, "shared", action_acc=0.5),
        record("adi", "jumping", 3, "diverse", action_acc=1.0),
        record("pplus", "jumping", 3, "diverse", action_acc=0.0),
        record("adi", "jumping", 4, "diverse", action_acc=1.0),  # no P+ partner: not paired
        record("adi", "jumping", 3, "shared", beta=0.1, action_acc=0.0),  # a curve run: never paired
    ]
    out = bench.paired(runs, "adi", "pplus", ["action_acc"], ["shared", "diverse"])
    assert out["shared"]["action_acc"]["n"] == 2
    assert out["shared"]["action_acc"]["mean"] == pytest.approx(0.125)
    assert out["diverse"]["action_acc"] == {"mean": 1.0, "lo": 1.0, "hi": 1.0, "n": 1}
    assert out["all"]["action_acc"]["n"] == 3
    assert out["all"]["action_acc"]["mean"] == pytest.approx((0.25 + 0 + 1) / 3)


def test_metric_order_and_leak_names_come_from_the_runs():
    # the metrics JSON has its keys sorted; tables list them in the evaluation's report order
    names = ["action_acc", "appearance_leak", "appearance_leak_excess", "appearance_leak_untrained", "both_correct",
             "clean_both_correct", "leak_colour", "leak_colour_excess", "leak_colour_untrained", "leak_subject",
             "leak_subject_excess", "leak_subject_untrained", "subject_acc"]
    order = bench.metric_order([record("adi", "jumping", 3, "shared", **dict.fromkeys(names, 0.0))])
    assert order == ["action_acc", "subject_acc", "both_correct", "clean_both_correct",
                     "leak_subject", "leak_colour", "appearance_leak",
                     "leak_subject_untrained", "leak_colour_untrained", "appearance_leak_untrained",
                     "leak_subject_excess", "leak_colour_excess", "appearance_leak_excess"]
    assert [n for n in order if bench.is_leak(n)] == ["leak_subject", "leak_colour", "appearance_leak",
                                                      "leak_subject_excess", "leak_colour_excess",
                                                      "appearance_leak_excess"]


def test_format_table_lines_up_and_marks_missing():
    text = bench.format_table("t", {"adi": {"a": {"mean": 0.5, "std": 0.1}}, "ti": {}}, ["a"], bench.mean_std)
    header, rule, row = text.splitlines()
    assert len(header) == len(rule) == len(row)
    assert "0.500±0.100" in row and row.endswith("-")


def test_json_safe_turns_nan_into_null():
    assert bench.json_safe({"a": [math.nan, 1.0], 2: {"b": math.nan}}) == {"a": [None, 1.0], "2": {"b": None}}


# ------------------------------------------------------------------ plan
def test_default_plan_sizes_and_shared_runs():
    plan = bench.make_plan(args(), preset_betas={"adi": 0.0, "adi_channel": 0.0})
    assert len(plan["main"]) == 5 * 3 * 3 * 2
    assert len(plan["ablations"]) == 5 * 3 and len(plan["curve"]) == 6 + 6
    runs = bench.unique_runs(plan)
    # ADI and the channel preset on (jumping, shared, seed 3) are in the main table; each curve's point at
    # its preset's β is that same run, and its point at 1.0 is P+'s (bit for bit the same training)
    assert len(runs) == 90 + 12 + 4 + 4
    curve_keys = {bench.run_key(c[-1]) for c in plan["curve"]}
    assert bench.run_key(bench.spec("pplus", "jumping", "shared", 3, 300, 4)) in curve_keys
    assert bench.run_key(bench.spec("adi_channel", "jumping", "shared", 3, 300, 4)) in curve_keys
    assert bench.run_key(bench.spec("adi", "jumping", "shared", 3, 300, 4)) in curve_keys


def test_curve_betas_are_each_methods_unless_given():
    assert bench.curve_betas(args(), "adi") == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0] == bench.curve_betas(args(), "adi_channel")
    assert bench.curve_betas(args(curve_betas=[0.5, 1.0]), "adi") == [0.5, 1.0]
    plan = bench.make_plan(args(curve_betas=[], curve_methods=["adi"]), preset_betas={"adi": 0.0})
    assert plan["curve"] == []


def test_a_beta_a_presets_statistic_refuses_is_refused_before_any_run(tmp_path, monkeypatch, capsys):
    presets = tmp_path / "presets"  # a channel preset with a quantile statistic, where β = 0 keeps no channel
    presets.mkdir()
    (presets / "adi_channel.yaml").write_text("mask_statistic: relative\nmask_threshold: 0.5\n")
    (presets / "toy.yaml").write_text((bench.PRESETS / "toy.yaml").read_text())
    monkeypatch.setattr(bench, "PRESETS", presets)
    monkeypatch.setattr(sys, "argv", ["actionbench_toy.py", "--curve-methods", "adi_channel", "--curve-betas", "0",
                                      "1", "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit):
        bench.main()
    err = capsys.readouterr().err
    assert "--curve-betas (adi_channel)=0" in err and "keep no channel" in err
    assert not (tmp_path / "out").exists()


def test_quick_plan_is_three_runs():
    plan = bench.make_plan(args(actions=["jumping"], seeds=[3], folders=["shared"], methods=["init", "pplus", "adi"],
                                steps=20, test_seeds=1, ablations=[], curve_methods=[]), preset_betas={})
    assert len(bench.unique_runs(plan)) == 3


def test_run_keys_tell_runs_apart():
    a = bench.spec("adi", "jumping", "shared", 3, 300, 4)
    specs = (a, {**a, "seed": 4}, {**a, "folder": "diverse"}, {**a, "steps": 20}, {**a, "test_seeds": 1},
             {**a, "beta": 0.3}, {**a, "beta": 0.1}, {**a, "method": "pplus"}, {**a, "starts": 8})
    keys = {bench.run_key(s) for s in specs}
    assert len(keys) == len(specs)
    assert not any("." in k for k in keys)  # <key>.json / .csv / .png never clash


def test_load_result_reuses_only_the_same_spec(tmp_path):
    from adi_lightning.io import atomic_write_json

    s = bench.spec("adi", "jumping", "shared", 3, 300, 4)
    path = tmp_path / "run.json"
    assert bench.load_result(path, s) is None
    atomic_write_json(path, {"spec": s, "metrics": {"action_acc": 0.5, "leak_subject": None}})
    got = bench.load_result(path, s)
    assert got["metrics"]["action_acc"] == 0.5 and math.isnan(got["metrics"]["leak_subject"])
    assert bench.load_result(path, {**s, "steps": 20}) is None
    assert bench.load_result(path, {**s, "starts": 8}) is None
    old = {k: v for k, v in s.items() if k != "starts"}  # a record from before multi-start: one start
    atomic_write_json(path, {"spec": old, "metrics": {"action_acc": 0.5}})
    assert bench.load_result(path, s) is not None and bench.load_result(path, {**s, "starts": 8}) is None


def test_a_record_made_with_other_model_settings_is_not_reused(tmp_path):
    """A changed default or preset (here: the subject words) reruns the runs it changes; records made before
    the settings were kept are not reused by a plan that keeps them."""
    from adi_lightning.io import atomic_write_json

    adi = bench.model_settings("adi")
    s = bench.spec("adi", "jumping", "shared", 3, 300, 4, model=adi)
    path = tmp_path / "run.json"
    atomic_write_json(path, {"spec": s, "metrics": {"action_acc": 1.0}})
    assert bench.load_result(path, s) is not None
    assert bench.load_result(path, {**s, "model": {**adi, "subject_words": []}}) is None
    atomic_write_json(path, {"spec": {k: v for k, v in s.items() if k != "model"}, "metrics": {"action_acc": 1.0}})
    assert bench.load_result(path, s) is None
    plan = bench.make_plan(args(), preset_betas={"adi": 0.0, "adi_channel": 0.0})
    assert all(s["model"] == bench.model_settings(s["method"]) for s in bench.unique_runs(plan).values())


def test_model_settings_layer_the_preset_over_the_toy_config():
    toy, adi = load("toy"), bench.model_settings("adi")
    assert adi["subject_words"] == toy["subject_words"] == ["person", "man", "woman", "child"]  # every method's
    assert bench.model_settings("ti")["subject_words"] == toy["subject_words"]
    assert bench.model_settings("adi_no_subject_words")["subject_words"] == []
    assert bench.model_settings("ti")["layerwise"] is False and adi["layerwise"] is True
    assert bench.model_settings("init") == bench.model_settings("ti")  # the untrained identifier: TI's preset
    sd3 = bench.model_settings("adi", "toy_sd3")
    assert sd3["pretrained_model_name_or_path"] == load("toy_sd3")["pretrained_model_name_or_path"]


@pytest.mark.parametrize("method", ["init", "adi", "adi_no_subject_words"])
def test_model_settings_are_what_the_cli_parses_for_a_run(method, tmp_path):
    """The settings a record keeps are the model keys the run's own command line resolves to (printed by
    LightningCLI's --print_config, which exits before anything is built)."""
    import contextlib
    import io
    from unittest import mock

    from adi_lightning.cli import ADICLI
    from adi_lightning.module import ADIModule

    argv = bench.cli_args("jumping", method, 3, 20, 1, tmp_path, [f"--data.root={tmp_path / 'data'}"])
    printed = io.StringIO()
    with mock.patch.object(sys, "argv", sys.argv[:1]), contextlib.redirect_stdout(printed), \
            pytest.raises(SystemExit):
        ADICLI(args=[*argv, "--print_config"], run=False)
    parsed = yaml.safe_load(printed.getvalue())["model"]
    settings = bench.model_settings(method)
    assert parsed.pop("judge")["class_path"] == settings.pop("judge")["class_path"]
    assert {k: parsed[k] for k in settings} == settings
    # and nothing the configs set is missing from the settings: every other key is the module's default
    # (or the benchmark's own flag, init's identifier_path)
    defaults = {k: p.default for k, p in inspect.signature(ADIModule).parameters.items()}
    assert {k for k, v in parsed.items() if k not in settings and v != defaults.get(k)} <= {"identifier_path"}


def test_a_backbone_gets_its_own_runs_and_the_default_keeps_old_records(tmp_path):
    from adi_lightning.io import atomic_write_json

    toy = bench.spec("adi", "jumping", "shared", 3, 300, 4)
    sd3 = bench.spec("adi", "jumping", "shared", 3, 300, 4, backbone="toy_sd3")
    assert "backbone" not in toy  # records written before --backbone existed stay this spec
    assert bench.run_key(sd3) != bench.run_key(toy) and bench.run_key(sd3).startswith("toy_sd3-")
    path = tmp_path / "run.json"
    atomic_write_json(path, {"spec": toy, "metrics": {"action_acc": 1.0}})
    assert bench.load_result(path, toy) is not None and bench.load_result(path, sd3) is None
    plan = bench.make_plan(args(backbone="toy_sd3"), preset_betas={"adi": 0.0, "adi_channel": 0.0})
    every = [*plan["main"], *plan["ablations"], *(c[-1] for c in plan["curve"])]
    assert {s.get("backbone") for s in every} == {"toy_sd3"}


def test_the_backbone_config_sits_between_the_experiment_and_the_method_preset(tmp_path):
    argv = bench.cli_args("kicking", "pplus", 3, 300, 4, tmp_path, ["--data.root=x"], backbone="toy_sd3")
    models = [argv[i + 1] for i, a in enumerate(argv) if a == "--model"]
    assert models == [str(bench.PRESETS / "toy_sd3.yaml"), str(bench.PRESETS / "pplus.yaml")]
    assert argv.index("--config") < argv.index("--model") and argv[-1] == "--data.root=x"
    assert [a for a in bench.cli_args("kicking", "pplus", 3, 300, 4, tmp_path, []) if a == "--model"] == ["--model"]
    for backbone in bench.BACKBONES:  # each names a pipeline and keeps the toy judge
        config = load(backbone)
        assert config["pretrained_model_name_or_path"].startswith("adi_lightning/toy/assets/")
        assert config["judge"]["class_path"] == "adi_lightning.evaluation.ToyJudge"


def test_a_backbone_not_built_is_refused_before_any_run(tmp_path, monkeypatch, capsys):
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "toy_sd3.yaml").write_text("pretrained_model_name_or_path: adi_lightning/toy/assets/not_built\n")
    monkeypatch.setattr(bench, "PRESETS", presets)
    monkeypatch.setattr(sys, "argv", ["actionbench_toy.py", "--backbone", "toy_sd3", "--curve-methods",
                                      "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit):
        bench.main()
    assert "--backbone toy_sd3: adi_lightning/toy/assets/not_built is not built" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ presets
def load(name):
    return yaml.safe_load((REPO / "configs" / "model" / f"{name}.yaml").read_text()) or {}


def test_every_benchmarked_method_has_a_preset():
    for method in (*bench.MAIN_METHODS, *bench.ABLATIONS, *bench.OPTIONAL_METHODS):
        assert (bench.PRESETS / f"{bench.PRESET_OF.get(method, method)}.yaml").is_file(), method


def test_adi_paper_is_adi_with_the_absolute_statistic():
    adi, paper = load("adi"), load("adi_paper")
    assert paper.pop("mask_statistic") == "absolute"
    assert paper.pop("mask_threshold") == 0.5  # a quantile: half of each row's channels per test
    adi.pop("mask_statistic", None)
    adi.pop("mask_threshold")
    assert paper == adi


def test_ablations_follow_the_adi_statistic():
    """Each ablation changes one thing of ADI: applied on the same base, it must score channels with
    the statistic adi.yaml does (restated when adi.yaml sets one, absent when it does not)."""
    statistic = load("adi").get("mask_statistic")
    for name in bench.ABLATIONS:
        assert load(name).get("mask_statistic") == statistic, name


# ------------------------------------------------------------------ orchestration, with fake runs
def test_main_runs_the_plan_writes_tables_and_resumes(tmp_path, monkeypatch, capsys):
    import json

    import adi_lightning.toy.export as export
    from adi_lightning.io import atomic_write_json

    launched = []

    def fake_launch(s, out, data_dir):  # what a worker leaves behind: the run's record
        launched.append(bench.run_key(s))
        if s["method"] == "init" and s["seed"] == 4:
            return 1, 0.1  # a failed run: reported, left out of the tables, run again next time
        value = {"init": 0.0, "pplus": 0.25, "adi": 0.5}[s["method"]] + s["seed"] / 100
        atomic_write_json(out / "runs" / f"{bench.run_key(s)}.json",
                          {"spec": s, "metrics": {"action_acc": value, "clean_both_correct": value,
                                                  "leak_colour": None, "leak_colour_excess": 0.0}})
        return 0, 0.1

    monkeypatch.setattr(bench, "launch", fake_launch)
    monkeypatch.setattr(export, "ensure_action_folder", lambda *a, **k: None)
    argv = ["actionbench_toy.py", "--methods", "init", "pplus", "adi", "--actions", "jumping", "--folders", "shared",
            "--seeds", "3", "4", "--ablations", "--curve-methods", "--out", str(tmp_path / "out"),
            "--data-dir", str(tmp_path / "data")]
    monkeypatch.setattr(sys, "argv", argv)
    assert bench.main() == 1  # one run failed
    printed = capsys.readouterr()
    assert len(launched) == 6 and "1 runs failed: init-jumping-shared-seed4-500steps-8starts-4ts" in printed.err
    assert "6 to run" in printed.out and "[6/6]" in printed.out and "ETA" in printed.out
    table = json.loads((tmp_path / "out" / "table.json").read_text())
    assert table["main"]["shared"]["adi"]["action_acc"]["mean"] == pytest.approx(0.535)
    assert table["main"]["shared"]["init"]["action_acc"]["n"] == 1
    assert table["main"]["shared"]["adi"]["leak_colour"]["mean"] is None  # NaN is written as null
    assert table["paired"]["adi-pplus"]["all"]["clean_both_correct"] == pytest.approx(
        {"mean": 0.25, "lo": 0.25, "hi": 0.25, "n": 2})
    assert "adi-ti" not in table["paired"]
    for name in ("table.txt", "table.md"):  # each says which commits made the runs and which command wrote it
        text = (tmp_path / "out" / name).read_text()
        assert text.startswith("ActionBench-toy v2") and "- **Runs made at commits**: " in text, name
        assert "- **Tables written by**: `OMP_NUM_THREADS=1 python benchmarks/actionbench_toy.py " in text, name
    launched.clear()
    assert bench.main() == 1  # resumed: only the failed run is launched again
    assert launched == ["init-jumping-shared-seed4-500steps-8starts-4ts"]


# ------------------------------------------------------------------ intervals over judged images
import _images  # noqa: E402


def image(prompt, seed, **flags):
    return {"prompt_index": str(prompt), "seed_index": str(seed), **{k: str(v) for k, v in flags.items()}}


def test_image_interval_of_constant_flags_is_a_point_and_excess_subtracts_the_reference():
    runs = [([image(p, s, action_correct=True, leak_colour=True) for p in range(7) for s in range(4)],
             {"leak_colour_word": 0.25, "leak_colour_untrained": 0.5})] * 3
    assert _images.run_interval(runs, "action_acc") == (1.0, 1.0, 1.0)
    assert _images.run_interval(runs, "leak_colour_word_excess") == (0.75, 0.75, 0.75)
    assert _images.run_interval(runs, "leak_colour_excess") == (0.5, 0.5, 0.5)
    assert all(math.isnan(x) for x in _images.run_interval(runs, "leak_pattern"))  # no such flag


def test_image_interval_is_stratified_by_run_and_brackets_the_mean():
    ones = [image(p, 0, action_correct=True) for p in range(20)]
    zeros = [image(p, 0, action_correct=False) for p in range(20)]
    mixed = [image(p, 0, action_correct=p % 2 == 0) for p in range(20)]
    # runs of all-ones and all-zeros: every resample keeps each run's mean, so the interval is a point
    assert _images.run_interval([(ones, {}), (zeros, {})], "action_acc") == (0.5, 0.5, 0.5)
    mean, lo, hi = _images.run_interval([(mixed, {})], "action_acc")
    assert mean == 0.5 and lo < 0.5 < hi


def test_paired_image_interval_matches_images_by_prompt_and_seed():
    a = [image(p, s, action_correct=(p == 0)) for p in range(2) for s in range(2)]
    b = [image(p, s, action_correct=True) for p in reversed(range(2)) for s in range(2)]  # other order
    assert _images.paired_interval([(a, b)], "action_acc") == (-0.5, -1.0, 0.0, 4)
    same = _images.paired_interval([(a, a)], "action_acc")
    assert same == (0.0, 0.0, 0.0, 4)


def test_figures_are_written(tmp_path):
    point = {"action_acc": (0.5, 0.4, 0.6), "leak_colour_word_excess": (0.1, 0.0, 0.2)}
    curve = _images.curve_figure({"adi": {0.0: point, 1.0: point}}, list(point), tmp_path / "c.png", "t")
    bars = _images.bars_figure({"adi": point, "pplus": point}, list(point), tmp_path / "b.png", "t")
    assert curve.read_bytes()[:4] == bars.read_bytes()[:4] == b"\x89PNG"


def test_bars_name_finished_runs_skip_empty_columns_and_use_the_whole_look_on_diverse(tmp_path, monkeypatch):
    drawn = {}
    monkeypatch.setattr(bench._images, "bars_figure",
                        lambda cols, metrics, path, title: drawn.setdefault(path.name, (cols, metrics)) and path)
    stat = {"mean": 0.5, "lo": 0.4, "hi": 0.6, "n": 2}
    full = {m: stat for m in (*bench.FIGURE_METRICS, *bench.DIVERSE_FIGURE_METRICS)}
    empty = {m: {"mean": None, "n": 0} for m in full}
    data = {"main": {f: {"adi": full, "pplus": full, "adi_paper": empty} for f in ("shared", "diverse")}, "curve": {}}
    args = argparse.Namespace(actions=["jumping", "kicking"], seeds=[3, 4, 5], curve_actions=[], curve_folder="shared",
                              curve_seeds=[3, 4, 5])
    bench.write_figures(data, list(full), args, tmp_path)
    cols, metrics = drawn["bars_shared.png"]
    assert list(cols) == ["adi (2/6 runs)", "pplus (2/6 runs)"]  # the run-less column is left out
    assert "leak_colour_word_excess" in metrics and "appearance_leak_word_excess" not in metrics
    assert drawn["bars_diverse.png"][1] == [*bench.DIVERSE_FIGURE_METRICS]


def test_curves_of_both_methods_get_tables_and_one_figure_per_action(tmp_path, monkeypatch):
    import json

    import adi_lightning.toy.export as export
    from adi_lightning.io import atomic_write_json

    launched = []

    def fake_launch(s, out, data_dir):
        launched.append(bench.run_key(s))
        value = {"pplus": 0.1, "adi": 0.9, "adi_channel": 0.8}[s["method"]] - (s["beta"] or 0.0) / 2
        atomic_write_json(out / "runs" / f"{bench.run_key(s)}.json",
                          {"spec": s, "metrics": {"action_acc": value, "clean_both_correct": value}})
        return 0, 0.1

    monkeypatch.setattr(bench, "launch", fake_launch)
    monkeypatch.setattr(export, "ensure_action_folder", lambda *a, **k: None)
    monkeypatch.setattr(sys, "argv", [
        "actionbench_toy.py", "--methods", "pplus", "adi", "adi_channel", "--actions", "jumping", "kicking",
        "--folders", "shared", "--seeds", "3", "--ablations", "--curve-actions", "jumping", "kicking",
        "--curve-seeds", "3", "--curve-betas", "0.5", "1", "--out", str(tmp_path / "out"),
        "--data-dir", str(tmp_path / "data")])
    assert bench.main() == 0
    # main: 3 methods x 2 actions; curves: adi and adi_channel at 0.5 (1.0 is P+'s run for both)
    assert len(launched) == 6 + 2 + 2 and len(set(launched)) == len(launched)
    table = json.loads((tmp_path / "out" / "table.json").read_text())
    assert list(table["curve"]) == ["adi, jumping", "adi, kicking", "adi_channel, jumping", "adi_channel, kicking"]
    assert table["curve"]["adi_channel, kicking"]["beta=0.5"]["action_acc"]["mean"] == pytest.approx(0.55)
    assert table["curve"]["adi, jumping"]["beta=1"]["action_acc"]["mean"] == pytest.approx(0.1)  # P+'s run
    assert "adi_channel-pplus" in table["paired"]
    for action in ("jumping", "kicking"):
        assert (tmp_path / "out" / f"curve_{action}_shared.png").stat().st_size > 0
    markdown = (tmp_path / "out" / "table.md").read_text()
    assert "- **Tables written by**: `OMP_NUM_THREADS=1 python benchmarks/actionbench_toy.py --methods pplus" in markdown
    assert "**curve (adi_channel, kicking, shared): over seeds [3]**" in markdown
    assert "| action_acc | 0.550±0.000 | 0.100±0.000 |" in markdown  # adi_channel at β 0.5, P+ at 1.0
    assert "| runs (pairs) | 1 | 1 |" in markdown
    runs = [line for line in markdown.splitlines() if line.startswith("| adi_channel | kicking |")]
    assert runs == ["| adi_channel | kicking | shared | 3 | preset | 0.80 | - | - | - | - | - | - | ? |",
                    "| adi_channel | kicking | shared | 3 | 0.5 | 0.55 | - | - | - | - | - | - | ? |"]


def test_the_default_backbone_keeps_the_v2_header_and_another_is_named_with_its_estimate_labelled():
    """The tables' header names the backbone only when not the default (the committed v2 tables' header is
    reproduced), and the plan's estimate, from the toy UNet's timings, says so for another backbone."""
    table = bench.REPO / "benchmarks" / "results" / "actionbench_toy_v2" / "table.txt"
    committed = table.read_text().splitlines()[0]
    assert bench.header_text(args(backbone="toy", jobs=2), 99, 99, 10.9) == committed
    assert bench.header_text(args(backbone="toy_sd3", jobs=2), 99, 99, 10.9) == committed.replace(
        "ActionBench-toy v2:", "ActionBench-toy v2 on the toy_sd3 backbone:")
    assert bench.estimate_text(600, "toy") == "estimate 10 min"
    assert bench.estimate_text(600, "toy_sd3") == "estimate 10 min (UNet timings; the ETA corrects it)"


@pytest.mark.parametrize("in_cache", [False, True])
def test_the_worker_names_the_folder_difficulty_only_where_it_is_in_force(in_cache, tmp_path, monkeypatch):
    """data.toy_difficulty is inert for a folder outside the project's cache (the CLI refuses it typed), and in
    the cache it decides how a missing or damaged folder is exported again: there the worker must type it."""
    import json

    monkeypatch.setenv("ADI_LIGHTNING_CACHE", str(tmp_path / "cache"))
    root = (tmp_path / "cache" if in_cache else tmp_path / "data") / "diverse" / "jumping"
    seen = {}

    def fake_run_one(action, method, seed, steps, test_seeds, tmp, extra, keep=None, backbone=None):
        seen["extra"] = extra
        return {"action_acc": 1.0}

    monkeypatch.setattr(bench, "run_one", fake_run_one)
    s = bench.spec("adi", "jumping", "diverse", 3, 20, 1)
    payload = {"spec": s, "result": str(tmp_path / "runs" / "r.json"), "data_root": str(root)}
    (tmp_path / "runs").mkdir()
    assert bench.worker(json.dumps(payload)) == 0
    assert f"--data.root={root}" in seen["extra"]
    assert ("--data.toy_difficulty=diverse" in seen["extra"]) is in_cache


def test_short_revisions_keep_the_dirty_mark():
    assert bench.short_revision("0123456789abcdef0123456789abcdef01234567") == "0123456"
    assert bench.short_revision("0123456789abcdef0123456789abcdef01234567-dirty") == "0123456-dirty"
    assert bench.short_revision("?") == "?"
