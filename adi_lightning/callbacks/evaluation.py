"""EvaluationCallback: judge the validation / test images and report ActionBench metrics.

Active when the model has a judge (``model.judge``) and the data module prompts evaluation
subjects (``data.eval_subjects``). Metrics are logged as ``<stage>/<name>`` (the names sweeps
optimise, e.g. ``val/both_correct``) and written beside the grid as JSON and CSV, atomically.
"""

from __future__ import annotations

import csv
import io
import logging
import math

import lightning as L

from adi_lightning.callbacks.image_log import gather_objects
from adi_lightning.evaluation import METRIC_NAMES, ActionBenchMetric
from adi_lightning.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)
STAGE_NAMES = {"validation": "val", "test": "test"}


class EvaluationCallback(L.Callback):
    def __init__(self) -> None:
        # Used as a calculator on the gathered rows: no cross-rank sync of its own.
        self.metric = ActionBenchMetric(sync_on_compute=False)
        self.rows: list[dict] = []

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
        verdict = judge.judge(outputs["image"])
        for i, prompt in enumerate(outputs["prompt"]):
            self.rows.append({
                "prompt_index": outputs["prompt_index"][i], "seed_index": outputs["seed_index"][i],
                "prompt": prompt, "seed": outputs["seed"][i], "subject": outputs["subject"][i],
                "pred_action": verdict.action[i], "pred_subject": verdict.subject[i],
                "pred_context": verdict.context[i] if verdict.context else None,
            })

    def _report(self, trainer, pl_module, stage: str) -> None:
        if trainer.sanity_checking or getattr(pl_module, "judge", None) is None or not trainer.datamodule.eval_subjects:
            return
        # Judged rows from every rank, once each (padded samplers repeat some (prompt, seed)),
        # scored identically on every rank.
        rows = gather_objects(self.rows, key=lambda r: (r["prompt_index"], r["seed_index"]))
        rows.sort(key=lambda r: (r["prompt_index"], r["seed_index"]))
        dm = trainer.datamodule
        self.metric.reset()
        if rows:
            contexts = [r["pred_context"] for r in rows]
            self.metric.update([r["pred_action"] for r in rows], [r["pred_subject"] for r in rows], dm.action,
                               [r["subject"] for r in rows], dm.exemplar_subjects,
                               None if None in contexts else contexts, dm.exemplar_contexts)
        values = {k: float(v) for k, v in self.metric.compute().items()}
        for r in rows:
            r["action_correct"] = r["pred_action"] == dm.action
            r["subject_correct"] = r["pred_subject"] == r["subject"]
            r["leak"] = r["pred_subject"] in dm.exemplar_subjects and r["pred_subject"] != r["subject"]
        self.rows = rows
        prefix = STAGE_NAMES[stage]
        # Every rank scored the same gathered rows: every rank logs the same values.
        pl_module.log_dict({f"{prefix}/{k}": v for k, v in values.items() if not math.isnan(v)})
        if not trainer.is_global_zero:
            return
        name = f"{stage}_step{trainer.global_step:06d}"
        folder = pl_module.run_dir / "metrics"
        atomic_write_json(folder / f"{name}.json", {
            "stage": stage, "global_step": trainer.global_step, "action": trainer.datamodule.action,
            "metrics": {k: (None if math.isnan(v) else v) for k, v in values.items()},
            "images": len(self.rows), "judge": type(pl_module.judge).__name__,
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
        log.info("%s metrics: %s", stage, ", ".join(f"{k}={values[k]:.3f}" for k in METRIC_NAMES))
