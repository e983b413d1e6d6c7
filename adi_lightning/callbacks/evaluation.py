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

from adi_lightning.evaluation import METRIC_NAMES, ActionBenchMetric
from adi_lightning.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)
STAGE_NAMES = {"validation": "val", "test": "test"}


class EvaluationCallback(L.Callback):
    def __init__(self) -> None:
        self.metric = ActionBenchMetric()
        self.rows: list[dict] = []

    def _reset(self) -> None:
        self.metric.reset()
        self.rows = []

    def on_validation_epoch_start(self, trainer, pl_module):
        self._reset()

    def on_test_epoch_start(self, trainer, pl_module):
        self._reset()

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
        if judge is None or not outputs or not outputs.get("subject"):
            return
        dm = trainer.datamodule
        verdict = judge.judge(outputs["image"])
        exemplar_subjects, exemplar_contexts = dm.exemplar_subjects, dm.exemplar_contexts
        self.metric.update(verdict.action, verdict.subject, dm.action, outputs["subject"],
                           exemplar_subjects, verdict.context, exemplar_contexts)
        for i, prompt in enumerate(outputs["prompt"]):
            subject = outputs["subject"][i]
            self.rows.append({
                "prompt": prompt, "seed": outputs["seed"][i], "subject": subject,
                "pred_action": verdict.action[i], "pred_subject": verdict.subject[i],
                "pred_context": verdict.context[i] if verdict.context else "",
                "action_correct": verdict.action[i] == dm.action,
                "subject_correct": verdict.subject[i] == subject,
                "leak": verdict.subject[i] in exemplar_subjects and verdict.subject[i] != subject,
            })

    def _report(self, trainer, pl_module, stage: str) -> None:
        if trainer.sanity_checking or getattr(pl_module, "judge", None) is None or not trainer.datamodule.eval_subjects:
            return
        values = {k: float(v) for k, v in self.metric.compute().items()}
        prefix = STAGE_NAMES[stage]
        # compute() already summed the counts over ranks: every rank logs the same values.
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
