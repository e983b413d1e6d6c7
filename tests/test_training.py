"""Training-loop behaviour: NaN stops the run, the last good identifier survives."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from adi_lightning.data import ActionTripleDataModule
from adi_lightning.identifier import read_identifier

pytestmark = pytest.mark.e2e  # runs the CLI or a Trainer (pyproject markers)


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


def test_a_subclass_optimizer_with_other_settings_is_refused_not_overwritten(tiny_pipeline, tiny_data, tmp_path):
    """The optimizer's lr and weight decay come from model.learning_rate / model.weight_decay only: a
    subclass's own optimizer with another lr is refused by name at fit start; one built from them trains."""
    from adi_lightning.module import ADIModule

    class SGDModule(ADIModule):
        lr = 0.1

        def configure_optimizers(self):
            return torch.optim.SGD([self.identifier.embedding], lr=self.lr)

    def fit(module):
        dm = ActionTripleDataModule(root=tiny_data, action="jumping", resolution=32, batch_size=1, repeats=1)
        trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                            limit_val_batches=0)
        trainer.fit(module, dm)
        return trainer

    module = SGDModule(pretrained_model_name_or_path=tiny_pipeline, learning_rate=0.005, num_inference_steps=2)
    with pytest.raises(ValueError, match=r"configure_optimizers built SGD with lr=0.1, weight_decay=0, but "
                                         r"model.learning_rate=0.005, model.weight_decay=0.0"):
        fit(module)
    module.lr = 0.005  # from the key: accepted, and kept
    (optimizer,) = fit(module).optimizers
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["lr"] == 0.005
