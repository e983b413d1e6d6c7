"""Resuming from a checkpoint reproduces the uninterrupted run bit for bit (CPU)."""

import warnings

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from adi_lightning.data import GlobalBatchSampler

pytestmark = pytest.mark.e2e  # runs the CLI or a Trainer (pyproject markers)


def _every_step(root):
    """Keeps a checkpoint of every step in ``root / "ckpt"``: the interruption points."""
    return ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_top_k=-1)


@pytest.fixture(scope="module")
def straight_run(short_fit, tmp_path_factory):
    """One uninterrupted 6-step run; its checkpoints serve as the interruption points.
    4 anchors x 2 repeats = 8 items, batch 2: 4 batches per epoch, so 6 steps cross an epoch."""
    root = tmp_path_factory.mktemp("straight")
    table, _ = short_fit.trainer(root, 6, callbacks=[_every_step(root)])
    return table, root / "ckpt"


# Mid-epoch 0, exactly at the epoch boundary, and mid-epoch 1 with loader workers (which draw
# indices before Lightning sets the sampler's epoch).
@pytest.mark.parametrize("stop_at,workers", [(3, 0), (4, 0), (5, 2)])
def test_resume_is_bit_identical_to_an_uninterrupted_run(short_fit, tmp_path, stop_at, workers, straight_run):
    straight, checkpoints = straight_run
    ckpt = next(checkpoints.glob(f"*step={stop_at}.ckpt"))
    resumed, trainer = short_fit.trainer(tmp_path, 6, callbacks=[_every_step(tmp_path)], ckpt_path=str(ckpt),
                                         num_workers=workers)
    assert trainer.global_step == 6
    assert torch.equal(resumed, straight)


# Multi-start (3 starts x 2 steps, then the best): inside a start, at a start boundary, and after the choice.
# Start 1 scores best, so the run resumed at step 4 must take its rows from the checkpoint's callback state.
@pytest.mark.parametrize("stop_at", [1, 4, 7])
def test_resume_inside_multi_start_is_bit_identical(short_fit, tmp_path, stop_at, monkeypatch):
    from adi_lightning.callbacks import multi_start

    monkeypatch.setattr(multi_start, "large_t_anchor_loss", lambda module, *a, **k: {2: 1.0, 4: 3.0, 6: 2.0}[module.global_step])
    starts = dict(starts=3, start_steps=2)
    straight, _ = short_fit.trainer(tmp_path / "straight", 8, callbacks=[_every_step(tmp_path / "straight")], **starts)
    ckpt = next((tmp_path / "straight" / "ckpt").glob(f"*step={stop_at}.ckpt"))
    resumed, trainer = short_fit.trainer(tmp_path / "resumed", 8, callbacks=[_every_step(tmp_path / "resumed")],
                                         ckpt_path=str(ckpt), **starts)
    assert trainer.global_step == 8
    assert torch.equal(resumed, straight)
    assert trainer.lightning_module.start_selection == {"chosen": 1, "large_t_losses": [1.0, 3.0, 2.0]}


def test_resuming_a_one_start_checkpoint_with_starts_is_refused(short_fit, tmp_path, straight_run):
    ckpt = next(straight_run[1].glob("*step=3.ckpt"))
    with pytest.raises(ValueError, match=r"model.starts=3 x model.start_steps=2, but the checkpoint \(step 3\) was trained "
                                         "without these starts"):
        short_fit.trainer(tmp_path, 8, callbacks=[_every_step(tmp_path)], ckpt_path=str(ckpt), starts=3, start_steps=2)


def test_checkpoint_carries_optimizer_and_rng_state(straight_run):
    ckpt = torch.load(next(straight_run[1].glob("*step=2.ckpt")), weights_only=True)
    assert set(ckpt["state_dict"]) == {"identifier.embedding"}
    assert ckpt["optimizer_states"][0]["state"]  # AdamW moments
    assert {"torch", "numpy", "python"} <= set(ckpt["adi_rng_states"])


def test_global_batches_do_not_depend_on_the_number_of_ranks():
    one = GlobalBatchSampler(10, batch_size=4, num_replicas=1, rank=0, seed=3)
    two = [GlobalBatchSampler(10, batch_size=2, num_replicas=2, rank=r, seed=3) for r in (0, 1)]
    for sampler in (one, *two):
        sampler.set_epoch(1)
    single = list(one)
    per_rank = [list(s) for s in two]
    assert len(single) == 12 and all(len(p) == 6 for p in per_rank)  # padded by wrapping, not dropped
    for step in range(3):
        assert single[4 * step : 4 * step + 4] == per_rank[0][2 * step : 2 * step + 2] + per_rank[1][2 * step : 2 * step + 2]
    assert sorted(set(single)) == list(range(10, 20))  # epoch 1 emits 10 + i
    one.set_epoch(2)
    assert [i - 20 for i in one] != [i - 10 for i in single]  # a new permutation each epoch


def test_sampler_starts_at_the_consumed_batch_of_the_stream():
    consumed = 0
    sampler = GlobalBatchSampler(8, batch_size=2, seed=1, position=lambda: consumed)
    full = list(sampler)
    consumed = 3  # mid-epoch 0
    assert list(sampler) == full[6:]
    consumed = 4 + 1  # epoch 1, batch 1, whatever epoch Lightning set
    sampler.set_epoch(7)
    plain = GlobalBatchSampler(8, batch_size=2, seed=1)
    plain.set_epoch(1)
    assert list(sampler) == list(plain)[2:]
    assert len(sampler) == 8
    assert sampler.state_dict()["consumed_batches"] == 5 and sampler.state_dict()["epoch"] == 1

RESUMED_STEPS = 7


@pytest.fixture(scope="module")
def longer_runs(short_fit, tmp_path_factory):
    """Uninterrupted RESUMED_STEPS-step runs, one per epoch length (2 and 4 batches): 4 anchors x
    ``repeats`` items in batches of 2, so an epoch is 2 x repeats batches."""
    runs = {}

    def get(repeats: int) -> torch.Tensor:
        if repeats not in runs:
            root = tmp_path_factory.mktemp(f"longer{repeats}")
            runs[repeats] = short_fit.trainer(root, RESUMED_STEPS, callbacks=[ModelCheckpoint(dirpath=root / "ckpt")],
                                              repeats=repeats)[0]
        return runs[repeats]

    return get


# (first run's max_steps, ModelCheckpoint every_n_train_steps (None: Lightning's once per epoch),
#  data.repeats (epoch = 2 x repeats batches), loader workers). Every checkpoint the first run
# writes is resumed, last.ckpt included: mid-epoch and epoch-end step checkpoints, the per-epoch
# checkpoint Lightning writes when max_steps stops it mid-epoch (it marks that epoch complete), and
# the last.ckpt of on_train_end when no step checkpoint was due.
EVERY_CHECKPOINT = [
    (5, 2, 2, 0),     # max_steps neither a multiple of the interval nor of the epoch (4)
    (6, 3, 2, 0),     # max_steps a multiple of the interval, mid-epoch
    (3, None, 1, 0),  # per-epoch checkpoints: epoch end (step 2) and max_steps mid-epoch (step 3)
    (5, None, 2, 2),  # the same with loader workers, which draw indices before the epoch is set
    (3, 5, 1, 0),     # interval beyond max_steps: only on_train_end's last.ckpt
]


@pytest.mark.parametrize("first_steps,interval,repeats,workers", EVERY_CHECKPOINT)
def test_every_checkpoint_resumes_bit_identically(short_fit, tmp_path, longer_runs,
                                                  first_steps, interval, repeats, workers):
    first = tmp_path / "first"
    short_fit.trainer(first, first_steps, repeats=repeats, callbacks=[
        ModelCheckpoint(dirpath=first / "ckpt", every_n_train_steps=interval, save_top_k=-1, save_last=True)])
    checkpoints = sorted((first / "ckpt").glob("*.ckpt"))
    assert any(c.name == "last.ckpt" for c in checkpoints), checkpoints
    straight = longer_runs(repeats)
    for ckpt in checkpoints:
        root = tmp_path / f"resumed-{ckpt.stem}"
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*dataloader is\\s+not resumable.*")
            resumed, trainer = short_fit.trainer(root, RESUMED_STEPS, callbacks=[ModelCheckpoint(dirpath=root / "ckpt")],
                                                 repeats=repeats, ckpt_path=str(ckpt), num_workers=workers)
        assert trainer.global_step == RESUMED_STEPS, ckpt.name
        assert torch.equal(resumed, straight), f"resuming from {ckpt.name} diverged from the uninterrupted run"
