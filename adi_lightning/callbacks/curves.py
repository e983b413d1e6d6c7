"""CurvesCallback: the run's curves as PNG plots in ``<run dir>/plots/`` (matplotlib, no display needed).

Recorded during ``fit`` (and kept in checkpoints, so a resumed run plots its whole history):

- ``loss.png``: the training loss by role (``train/loss_anchor``, ``_context``, ``_action``) against step;
- ``judged.png``: every judged metric of the validations (action, subject, clean both-correct, each
  leak) against step, each beside its untrained rate (dashed); validations skipped inside the
  multi-start phase have no point;
- ``mask_energy.png``: the share of gradient energy the mask kept (``mask/kept_energy``) against step
  (masking runs only);
- ``multi_start.png``: each start's large-t anchor loss, the chosen start marked (``model.starts`` > 1).

The same values reach every configured logger through ``self.log`` (W&B draws them as its own
charts); these files are the local view. Written by rank zero after each judged validation and at
the end of training, atomically; a plot with nothing recorded is not written.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import lightning as L

from adi_lightning.io import atomic_path

log = logging.getLogger(__name__)
ROLES = ("anchor", "context", "action")
JUDGED_FIRST = ("action_acc", "subject_acc", "clean_both_correct")
PLOTS = ("loss.png", "judged.png", "mask_energy.png", "multi_start.png")


def _number(value) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def judged_names(names) -> list[str]:
    """The judged metrics a plot shows, in report order: the three rates, then every leak."""
    leaks = [n for n in names if (n.startswith("leak_") or n == "appearance_leak")
             and not n.endswith(("_untrained", "_excess", "_word"))]
    return [n for n in JUDGED_FIRST if n in names] + leaks


class CurvesCallback(L.Callback):
    def __init__(self) -> None:
        self.train: dict[int, dict[str, float]] = {}  # step -> {"loss_anchor": ..., "kept_energy": ...}
        self.judged: dict[int, dict[str, float]] = {}  # step -> {"action_acc": ..., "action_acc_untrained": ...}

    def state_dict(self) -> dict:
        return {"train": dict(self.train), "judged": dict(self.judged)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.train, self.judged = dict(state_dict["train"]), dict(state_dict["judged"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        metrics = trainer.callback_metrics
        row = {f"loss_{r}": _number(metrics[f"train/loss_{r}"]) for r in ROLES if f"train/loss_{r}" in metrics}
        if "mask/kept_energy" in metrics:
            row["kept_energy"] = _number(metrics["mask/kept_energy"])
        if row:
            self.train[trainer.global_step] = row

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn != "fit" or trainer.sanity_checking or getattr(pl_module, "skip_generation", False):
            return
        values = {k[len("val/"):]: _number(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if values:
            self.judged[trainer.global_step] = values
            self.write(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.write(trainer, pl_module)

    def write(self, trainer, pl_module) -> list[Path]:
        """Write every plot that has data (rank zero); returns the paths written."""
        if not trainer.is_global_zero:
            return []
        folder = pl_module.run_dir / "plots"
        written = []
        for name, draw in (("loss.png", self._loss), ("judged.png", self._judged),
                           ("mask_energy.png", self._mask_energy),
                           ("multi_start.png", lambda fig: self._multi_start(fig, pl_module))):
            from matplotlib.figure import Figure

            fig = Figure(figsize=(7, 4), dpi=100)
            if not draw(fig):
                continue
            fig.tight_layout()
            with atomic_path(folder / name) as tmp:
                fig.savefig(tmp, format="png")
            written.append(folder / name)
        if written:
            log.info("plots written to %s", folder)
        return written

    def _loss(self, fig) -> bool:
        steps = sorted(self.train)
        ax = fig.add_subplot()
        drawn = False
        for role in ROLES:
            points = [(s, self.train[s].get(f"loss_{role}")) for s in steps]
            points = [(s, v) for s, v in points if v is not None]
            if points:
                ax.plot(*zip(*points), label=role, linewidth=0.8)
                drawn = True
        ax.set(xlabel="step", ylabel="denoising loss", title="training loss by role")
        if drawn:
            ax.legend()
        return drawn

    def _judged(self, fig) -> bool:
        if not self.judged:
            return False
        steps = sorted(self.judged)
        names = judged_names(list(dict.fromkeys(k for s in steps for k in self.judged[s])))
        if not names:
            return False
        cols = 3
        rows = -(-len(names) // cols)
        fig.set_size_inches(4 * cols, 2.6 * rows)
        for i, name in enumerate(names):
            ax = fig.add_subplot(rows, cols, i + 1)
            for key, style, label in ((name, "o-", "trained"), (f"{name}_untrained", "s--", "untrained")):
                points = [(s, self.judged[s].get(key)) for s in steps]
                points = [(s, v) for s, v in points if v is not None]
                if points:
                    ax.plot(*zip(*points), style, label=label, markersize=3)
            ax.set(title=name, xlabel="step", ylim=(-0.05, 1.05))
            if i == 0:
                ax.legend(fontsize="small")
        return True

    def _mask_energy(self, fig) -> bool:
        points = [(s, r["kept_energy"]) for s, r in sorted(self.train.items()) if r.get("kept_energy") is not None]
        if not points:
            return False
        ax = fig.add_subplot()
        ax.plot(*zip(*points), linewidth=0.8)
        ax.set(xlabel="step", ylabel="kept share of gradient energy", title="mask: kept energy", ylim=(0, 1.05))
        return True

    def _multi_start(self, fig, pl_module) -> bool:
        selection = getattr(pl_module, "start_selection", None) or {}
        losses = selection.get("large_t_losses")
        if not losses:
            return False
        ax = fig.add_subplot()
        starts = range(1, len(losses) + 1)
        colours = ["tab:orange" if k == selection.get("chosen") else "tab:blue" for k in starts]
        ax.bar(list(starts), losses, color=colours)
        ax.set(xlabel="start (orange: chosen)", ylabel="large-t anchor loss", title="multi-start scores",
               xticks=list(starts))
        low, high = min(losses), max(losses)
        pad = (high - low) * 0.2 or abs(high) * 0.05 or 1e-3
        ax.set_ylim(low - pad, high + pad)
        return True
