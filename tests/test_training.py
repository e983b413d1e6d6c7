"""Training-loop behaviour: NaN stops the run, the last good identifier survives."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from adi_lightning.data import ActionTripleDataModule
from adi_lightning.identifier import read_identifier


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_identifier(make_module, tiny_data, tmp_path):
    module = make_module(mask_threshold=0.5)
    real_loss = module.compute_loss

    def poisoned(batch):
        loss, per_sample = real_loss(batch)
        if module.global_step == 2:
            return loss * float("nan"), per_sample
        return loss, per_sample

    module.compute_loss = poisoned
    dm = ActionTripleDataModule(root=tiny_data, action="jumping", resolution=32, batch_size=1, repeats=4)
    trainer = L.Trainer(max_steps=5, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=0,
                        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)])
    with pytest.raises(FloatingPointError, match="global step 2"):
        trainer.fit(module, dm)
    table, meta = read_identifier(tmp_path / "identifier.safetensors")
    assert torch.isfinite(table).all()
    assert meta["global_step"] == "2"  # written with the step-2 checkpoint, before the NaN
    assert not list(tmp_path.glob(".*.tmp"))
