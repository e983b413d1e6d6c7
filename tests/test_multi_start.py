"""Multi-start: K starts from the initial rows, the one with the lowest large-t anchor loss continued."""

import lightning as L
import pytest
import torch

from adi_lightning.callbacks import multi_start
from adi_lightning.checks import check_model_settings
from adi_lightning.data import ActionTripleDataModule


def _trainer(root, max_steps, *callbacks):
    return L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, default_root_dir=root,
                     limit_val_batches=0, callbacks=list(callbacks))


def _data(tiny_data):
    return ActionTripleDataModule(root=tiny_data, action="jumping", resolution=32, batch_size=2, repeats=4, seed=1)


class _Spy(L.Callback):
    """The rows and AdamW step count each optimizer step starts from (after any start switch)."""

    def __init__(self):
        self.tables, self.adam_steps = {}, {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.tables[trainer.global_step] = pl_module.identifier.embedding.detach().clone()
        state = optimizer.state.get(pl_module.identifier.embedding, {})
        self.adam_steps[trainer.global_step] = int(state["step"]) if "step" in state else 0


@pytest.mark.e2e
def test_each_start_begins_at_the_initial_rows_and_the_lowest_scored_start_is_continued(
        make_module, tiny_data, tmp_path, monkeypatch):
    scores, scored_tables = iter([3.0, 1.0, 2.0]), []

    def fake_loss(pl_module, dataset, *args, **kwargs):
        scored_tables.append(pl_module.identifier.embedding.detach().clone())
        return next(scores)

    monkeypatch.setattr(multi_start, "large_t_anchor_loss", fake_loss)
    module = make_module(mask_threshold=0.5, learning_rate=0.05, starts=3, start_steps=2)
    initial = module.identifier.embedding.detach().clone()
    spy = _Spy()
    _trainer(tmp_path, 8, spy).fit(module, _data(tiny_data))

    assert len(scored_tables) == 3  # scored at steps 2, 4 and 6, never again
    for step in (0, 2, 4):  # every start from the initial rows, with fresh AdamW moments
        assert torch.equal(spy.tables[step], initial) and spy.adam_steps[step] == 0
    assert not torch.equal(scored_tables[1], initial)
    # Step 6 goes on from start 2 (score 1.0): its rows and its AdamW state (2 steps taken).
    assert torch.equal(spy.tables[6], scored_tables[1]) and spy.adam_steps[6] == 2
    assert module.start_selection == {"chosen": 2, "large_t_losses": [3.0, 1.0, 2.0]}  # counted from 1
    assert '"chosen": 2' in module.identifier_metadata()["starts"]


@pytest.mark.e2e
def test_gradient_accumulation_scores_each_start_once(make_module, tiny_data, tmp_path, monkeypatch):
    scored = []
    monkeypatch.setattr(multi_start, "large_t_anchor_loss", lambda module, *a, **k: scored.append(module.global_step) or 1.0)
    module = make_module(mask_threshold=0.5, starts=2, start_steps=1)
    trainer = L.Trainer(max_steps=3, accumulate_grad_batches=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path, limit_val_batches=0)
    trainer.fit(module, _data(tiny_data))
    assert scored == [1, 2]  # at the first micro-batch of steps 1 and 2, never again
    assert module.start_selection == {"chosen": 1, "large_t_losses": [1.0, 1.0]}  # a tie keeps the earlier start


def test_large_t_anchor_loss_is_a_fixed_draw_score_of_the_current_rows(make_module, tiny_data):
    module = make_module(mask_threshold=0.5)
    data = _data(tiny_data)
    data.setup("fit")
    first = multi_start.large_t_anchor_loss(module, data.train_dataset, draws=8, batch_size=3)
    assert first == pytest.approx(multi_start.large_t_anchor_loss(module, data.train_dataset, draws=8, batch_size=8), rel=1e-6)
    with torch.no_grad():
        module.identifier.embedding.mul_(3.0)
    assert multi_start.large_t_anchor_loss(module, data.train_dataset, draws=8) != first


@pytest.mark.e2e
def test_starts_that_leave_no_steps_are_refused_by_key(make_module, tiny_data, tmp_path):
    module = make_module(mask_threshold=0.5, starts=3, start_steps=2)
    with pytest.raises(ValueError, match=r"model.starts=3 x model.start_steps=2 = 6 .*trainer.max_steps"):
        _trainer(tmp_path, 6).fit(module, _data(tiny_data))


@pytest.mark.parametrize("starts, steps, key", [(0, 100, "starts"), (2.5, 100, "starts"), (True, 100, "starts"),
                                                (3, 0, "start_steps")])
def test_bad_multi_start_settings_are_refused_by_key(starts, steps, key):
    with pytest.raises(ValueError, match=f"model.{key} must be an integer >= 1"):
        check_model_settings(0.5, "and", "projection", "anchor", "importance", 0.02, 0.0, 25, 0, 0.8, starts, steps)
