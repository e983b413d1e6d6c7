"""Resuming from a checkpoint reproduces the uninterrupted run bit for bit (CPU)."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from adi_lightning.data import ActionTripleDataModule, GlobalBatchSampler
from adi_lightning.module import ADIModule


def _fit(tiny_pipeline, tiny_data, root, max_steps, ckpt_path=None, num_workers=0):
    L.seed_everything(0)
    module = ADIModule(tiny_pipeline, mask_threshold=0.5, weight_decay=0.01, learning_rate=0.05)
    # 4 anchors x 2 repeats = 8 items, batch 2: 4 batches per epoch, so 6 steps cross an epoch.
    dm = ActionTripleDataModule(root=tiny_data, action="jumping", resolution=32, batch_size=2, repeats=2, seed=5,
                                num_workers=num_workers)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root, limit_val_batches=0,
                        callbacks=[ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_top_k=-1)])
    trainer.fit(module, dm, ckpt_path=ckpt_path)
    return module.identifier.embedding.detach().clone(), trainer


@pytest.fixture(scope="module")
def straight_run(tiny_pipeline, tiny_data, tmp_path_factory):
    """One uninterrupted 6-step run; its checkpoints serve as the interruption points."""
    root = tmp_path_factory.mktemp("straight")
    table, _ = _fit(tiny_pipeline, tiny_data, root, 6)
    return table, root / "ckpt"


# Mid-epoch 0, exactly at the epoch boundary, and mid-epoch 1 with loader workers (which draw
# indices before Lightning sets the sampler's epoch).
@pytest.mark.parametrize("stop_at,workers", [(3, 0), (4, 0), (5, 2)])
def test_resume_is_bit_identical_to_an_uninterrupted_run(tiny_pipeline, tiny_data, tmp_path, stop_at, workers, straight_run):
    straight, checkpoints = straight_run
    ckpt = next(checkpoints.glob(f"*step={stop_at}.ckpt"))
    resumed, trainer = _fit(tiny_pipeline, tiny_data, tmp_path, 6, ckpt_path=str(ckpt), num_workers=workers)
    assert trainer.global_step == 6
    assert torch.equal(resumed, straight)


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


def test_sampler_skips_consumed_batches_once():
    sampler = GlobalBatchSampler(8, batch_size=2, seed=1)
    full = list(sampler)
    sampler.start_batch = 3
    assert list(sampler) == full[6:]
    assert list(sampler) == full
    assert len(sampler) == 8
