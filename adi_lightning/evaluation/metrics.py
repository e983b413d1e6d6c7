"""ActionBench metrics: does ``<A>`` carry the action to a new subject without the exemplars?

Per generated image the judge names an action, a subject and (optionally) a context. Against
the prompt's target action and subject and the exemplars' subjects and contexts this gives:
action accuracy, subject accuracy, both-correct, appearance leak (the judge sees an exemplar's
subject) and context leak (the judge sees an exemplar's context). Counts are torchmetrics states,
so they sum over batches and DDP ranks.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch
from torchmetrics import Metric

METRIC_NAMES = ("action_acc", "subject_acc", "both_correct", "leak", "context_leak")


class ActionBenchMetric(Metric):
    full_state_update = False
    higher_is_better = None

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for name in ("total", "action", "subject", "both", "leak", "context_total", "context_leak"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self,
        pred_action: Sequence[str],
        pred_subject: Sequence[str],
        target_action: str,
        target_subject: Sequence[str],
        exemplar_subjects: Collection[str] = (),
        pred_context: Sequence[str] | None = None,
        exemplar_contexts: Collection[str] = (),
    ) -> None:
        if not (len(pred_action) == len(pred_subject) == len(target_subject)):
            raise ValueError("pred_action, pred_subject and target_subject must have one entry per image")
        action = torch.tensor([a == target_action for a in pred_action], dtype=torch.bool)
        subject = torch.tensor([p == t for p, t in zip(pred_subject, target_subject)], dtype=torch.bool)
        leak = torch.tensor([p in exemplar_subjects and p != t for p, t in zip(pred_subject, target_subject)], dtype=torch.bool)
        self.total += len(pred_action)
        self.action += action.sum()
        self.subject += subject.sum()
        self.both += (action & subject).sum()
        self.leak += leak.sum()
        if pred_context is not None and exemplar_contexts:
            self.context_total += len(pred_context)
            self.context_leak += sum(c in exemplar_contexts for c in pred_context)

    def compute(self) -> dict[str, torch.Tensor]:
        total = self.total.clamp(min=1).float()
        context_total = self.context_total.float()
        return {
            "action_acc": self.action / total,
            "subject_acc": self.subject / total,
            "both_correct": self.both / total,
            "leak": self.leak / total,
            "context_leak": self.context_leak / context_total if self.context_total > 0 else torch.tensor(float("nan")),
        }
