"""EvaluationCallback: judge the validation / test images and report ActionBench metrics.

Active when the model has a judge (``model.judge``) and the data module prompts evaluation
subjects (``data.eval_subjects``). Every (prompt, seed) is also generated and judged, in the same
batch hook, with two references: the untrained identifier (``identifier.initial``), and the action
word itself in place of ``<A>`` (``data.action``, e.g. "a photo of a cat jumping", no identifier).
So every leak rate comes with its untrained rate and excess, and its word rate and excess
(definitions: ``adi_lightning.evaluation.metrics``). Reference judgements are cached here by
(prompt, seed): a fit that validates N times generates them once (Lightning makes a new callback
for each fit / validate / test call, hence a new cache).
Metrics are logged as ``<stage>/<name>`` (the names sweeps optimise, e.g.
``val/clean_both_correct_word``) and written beside the grid as JSON and CSV, atomically.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import weakref

import lightning as L

from adi_lightning.callbacks.image_log import gather_objects
from adi_lightning.evaluation import ActionBenchMetric, clean_against, judge_rows, with_untrained, with_word
from adi_lightning.evaluation.judges import ACTION_AND_SUBJECT
from adi_lightning.io import atomic_write_json, atomic_write_text
from adi_lightning.prompts import replace_placeholder

log = logging.getLogger(__name__)
STAGE_NAMES = {"validation": "val", "test": "test"}


class EvaluationCallback(L.Callback):
    def __init__(self) -> None:
        self.rows: list[dict] = []
        # (prompt, seed) -> what the judge saw in the untrained identifier's image; valid for one module.
        self.untrained: dict[tuple[str, int], dict[str, str]] = {}
        # (prompt with the action word, seed) -> what the judge saw in the word's own image; same lifetime.
        self.word: dict[tuple[str, int], dict[str, str]] = {}
        self._untrained_owner = None

    def on_validation_epoch_start(self, trainer, pl_module):
        self.rows = []

    def on_test_epoch_start(self, trainer, pl_module):
        self.rows = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._judge(trainer, pl_module, outputs)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._judge(trainer, pl_module, outputs)

    def on_validation_epoch_end(self, trainer, pl_module):
        self._report(trainer, pl_module, "validation")

    def on_test_epoch_end(self, trainer, pl_module):
        self._report(trainer, pl_module, "test")

    def _judge(self, trainer, pl_module, outputs) -> None:
        judge = getattr(pl_module, "judge", None)
        if trainer.sanity_checking or judge is None or not outputs or not outputs.get("subject"):
            return
        judged = judge.judge(outputs["image"]).rows()
        untrained = self._judge_untrained(pl_module, judge, outputs["prompt"], outputs["seed"],
                                          outputs.get("untrained_image"))
        word = self._judge_word(trainer, pl_module, judge, outputs["prompt"], outputs["seed"])
        # Each image's verdict, for the grid (ImageGridCallback runs after this callback).
        outputs["verdict"], outputs["untrained_verdict"] = judged, untrained
        for i, prompt in enumerate(outputs["prompt"]):
            self.rows.append({
                "prompt_index": outputs["prompt_index"][i], "seed_index": outputs["seed_index"][i],
                "prompt": prompt, "seed": outputs["seed"][i], "subject": outputs["subject"][i],
                "judged": judged[i], "untrained": untrained[i], "word": word[i],
            })

    def _own_caches(self, pl_module) -> None:
        """The reference caches hold one module's judgements: a new module starts them afresh."""
        if self._untrained_owner is None or self._untrained_owner() is not pl_module:
            self.untrained, self.word, self._untrained_owner = {}, {}, weakref.ref(pl_module)

    def _judge_untrained(self, pl_module, judge, prompts: list[str], seeds: list[int],
                         images: list | None = None) -> list[dict[str, str]]:
        """The judged untrained image of each (prompt, seed): judged once (per module); ``images`` are
        those of the step's outputs (:meth:`ADIModule.untrained_images`), else they are generated."""
        self._own_caches(pl_module)
        given = dict(zip(zip(prompts, seeds), images)) if images is not None else {}
        missing = list(dict.fromkeys(k for k in zip(prompts, seeds) if k not in self.untrained))
        if missing:
            images = ([given[k] for k in missing] if given else
                      pl_module.generate([p for p, _ in missing], [s for _, s in missing],
                                         table=pl_module.identifier.initial))
            self.untrained.update(zip(missing, judge.judge(images).rows()))
        return [self.untrained[key] for key in zip(prompts, seeds)]

    def _judge_word(self, trainer, pl_module, judge, prompts: list[str], seeds: list[int]) -> list[dict[str, str]]:
        """The judged image of each prompt with the action word (``data.action``) in place of the
        placeholder, same seed, no identifier: generated and judged once per (prompt, seed) and module.
        None per image when the data names no action."""
        self._own_caches(pl_module)
        action = trainer.datamodule.action
        if not action:
            return [None] * len(prompts)
        keys = [(replace_placeholder(p, pl_module.hparams.placeholder_token, action), s) for p, s in zip(prompts, seeds)]
        missing = list(dict.fromkeys(k for k in keys if k not in self.word))
        if missing:
            images = pl_module.generate([p for p, _ in missing], [s for _, s in missing])
            self.word.update(zip(missing, judge.judge(images).rows()))
        return [self.word[key] for key in keys]

    def _report(self, trainer, pl_module, stage: str) -> None:
        if trainer.sanity_checking or getattr(pl_module, "judge", None) is None or not trainer.datamodule.eval_subjects:
            return
        # Judged rows from every rank, once each (padded samplers repeat some (prompt, seed)),
        # scored identically on every rank.
        rows = gather_objects(self.rows, key=lambda r: (r["prompt_index"], r["seed_index"]))
        if not rows:  # nothing generated (a validation skipped inside multi-start): nothing to report
            return
        rows.sort(key=lambda r: (r["prompt_index"], r["seed_index"]))
        dm = trainer.datamodule
        exemplars = dm.exemplar_attributes  # one dict of known attributes per exemplar image
        pool = dm.pool_attributes  # and per context-pool image
        factors = [k for k in rows[0]["judged"] if k not in ACTION_AND_SUBJECT] if rows else []
        subjects = [r["subject"] for r in rows]
        rates, flags_of = {}, {}
        with_word_rows = bool(rows) and all(r["word"] is not None for r in rows)
        for which in ("judged", "untrained", "word") if with_word_rows else ("judged", "untrained"):
            flags_of[which] = judge_rows([r[which] for r in rows], dm.action, subjects, exemplars, factors, pool)
            # Used as a calculator on the gathered rows: no cross-rank sync of its own.
            metric = ActionBenchMetric(factors, sync_on_compute=False)
            metric.update_flags(flags_of[which])
            rates[which] = {k: float(v) for k, v in metric.compute().items()}
        values = with_untrained(rates["judged"], rates["untrained"])
        clean_word = clean_against(flags_of["judged"], flags_of["word"]) if with_word_rows else [None] * len(rows)
        if with_word_rows:
            values = with_word(values, rates["word"], clean_word)
        flags = flags_of["judged"]
        self.rows = [{**{k: r[k] for k in ("prompt_index", "seed_index", "prompt", "seed", "subject")},
                      **{f"pred_{k}": v for k, v in r["judged"].items()}, **f, "clean_both_correct_word": c,
                      **{f"untrained_{k}": v for k, v in r["untrained"].items()},
                      **{f"word_{k}": v for k, v in (r["word"] or {}).items()}} for r, f, c in zip(rows, flags, clean_word)]
        prefix = STAGE_NAMES[stage]
        # Every rank scored the same gathered rows: every rank logs the same values. Synced with max, which
        # returns that value exactly (a mean over 3 ranks might round it).
        pl_module.log_dict({f"{prefix}/{k}": v for k, v in values.items() if not math.isnan(v)},
                           sync_dist=True, reduce_fx="max")
        if not trainer.is_global_zero:
            return
        name = f"{stage}_step{trainer.global_step:06d}"
        folder = pl_module.run_dir / "metrics"
        atomic_write_json(folder / f"{name}.json", {
            "stage": stage, "global_step": trainer.global_step, "action": dm.action,
            "metrics": {k: (None if math.isnan(v) else v) for k, v in values.items()},
            "images": len(self.rows), "judge": type(pl_module.judge).__name__, "exemplars": exemplars,
        })
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(self.rows[0]) if self.rows else ["prompt"])
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(folder / f"{name}.csv", buffer.getvalue())
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger" and self.rows:
                columns = list(self.rows[0])
                logger.log_table(key=f"{prefix}/judgements", columns=columns,
                                 data=[[row[c] for c in columns] for row in self.rows], step=trainer.global_step)
        log.info("%s metrics: %s", stage, ", ".join(f"{k}={v:.3f}" for k, v in values.items()
                                                    if not math.isnan(v) and not k.endswith(("_untrained", "_word"))))
