"""Per-sample gradients from one batched pass, and what an optimizer step may move."""

import lightning as L
import pytest
import torch

from adi_lightning.callbacks import GradientMaskCallback
from adi_lightning.data import ActionTripleDataModule


def test_recorded_role_gradients_equal_per_sample_autograd(make_module, tiny_batch):
    module = make_module(mask_threshold=0.5)
    batch = tiny_batch()
    loss, per_sample = module.compute_loss(batch)
    table = module.identifier.embedding
    expected = torch.stack([torch.autograd.grad(l, table, retain_graph=True)[0] for l in per_sample])
    module.pop_role_grads()  # the hook also saw those six autograd.grad calls
    loss.backward()
    recorded = torch.cat(module.pop_role_grads())
    assert recorded.shape == (2, 3, 16, 32)
    scale = expected.abs().max()
    assert (recorded.flatten(0, 1) - expected).abs().max() <= 1e-5 * scale
    assert recorded.abs().sum() > 0
    # The roles really differ: only the image differs, so the gradients do too.
    assert not torch.allclose(recorded[:, 0], recorded[:, 2])


def test_batched_pass_equals_three_separate_backward_passes(make_module, tiny_batch):
    batch = tiny_batch()
    module = make_module(mask_threshold=0.5)
    loss, _ = module.compute_loss(batch)
    loss.backward()
    recorded = torch.cat(module.pop_role_grads())

    separate = make_module(mask_threshold=1.0)  # masking off: plain autograd on E
    for role in range(3):
        separate.identifier.embedding.grad = None
        one_role = dict(batch, pixel_values=batch["pixel_values"][:, role : role + 1])
        role_loss, _ = separate.compute_loss(one_role)
        role_loss.backward()
        grad = separate.identifier.embedding.grad
        assert (recorded[:, role].mean(0) - grad).abs().max() <= 1e-5 * grad.abs().max()


def test_masking_off_leaves_the_plain_gradient_alone(make_module, tiny_batch):
    module = make_module(mask_threshold=1.0, layerwise=False)
    batch = tiny_batch(with_partners=False)
    loss, _ = module.compute_loss(batch)
    loss.backward()
    assert module.pop_role_grads() == []  # no per-sample bookkeeping for TI / P+
    grad = module.identifier.embedding.grad.clone()
    GradientMaskCallback().on_before_optimizer_step(None, module, None)
    assert torch.equal(module.identifier.embedding.grad, grad)


class StepProbe(L.Callback):
    def __init__(self):
        self.steps = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # The restore hook of the previous step is gone: nothing is left on the optimizer.
        assert len(trainer.optimizers[0]._optimizer_step_post_hooks) == 0
        self.before = pl_module.identifier.embedding.detach().clone()
        self.vocab = pl_module.overlay.base.weight.detach().clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        masker = next(c for c in trainer.callbacks if isinstance(c, GradientMaskCallback))
        after = pl_module.identifier.embedding.detach().clone()
        vocab_same = torch.equal(self.vocab, pl_module.overlay.base.weight)
        self.steps.append((self.before, after, masker.last_masks.clone(), vocab_same))


@pytest.mark.e2e
@pytest.mark.parametrize("layerwise", [True, False])
def test_masked_channels_are_bit_identical_after_an_adamw_step(make_module, tiny_data, tmp_path, layerwise):
    # A channel statistic (projection keeps every channel and restores none).
    module = make_module(mask_threshold=0.3, mask_combine="context_only", weight_decay=0.5, learning_rate=0.05,
                         layerwise=layerwise, mask_statistic="absolute")
    dm = ActionTripleDataModule(root=tiny_data, action="jumping", resolution=32, batch_size=2, repeats=4)
    probe = StepProbe()
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[probe],
                        default_root_dir=tmp_path, limit_val_batches=0)
    trainer.fit(module, dm)
    assert len(probe.steps) == 3
    for before, after, masks, vocab_same in probe.steps:
        never_kept = ~masks.any(dim=0)
        assert never_kept.any(), "beta=0.3 should leave some channels masked in every triple"
        assert torch.equal(after[never_kept], before[never_kept])
        assert (~never_kept).any()
        moved = (after != before)[~never_kept]
        assert moved.float().mean() > 0.9
        assert vocab_same
    assert (tmp_path / "identifier.safetensors").is_file()


def test_amp_scale_is_divided_out_and_inf_skips_the_step(make_module):
    from adi_lightning.masking import masked_update

    module = make_module(mask_threshold=0.5)
    grads = torch.randn(3, 3, 16, 32, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([module.identifier.embedding], lr=0.1)
    callback = GradientMaskCallback()
    result = callback.apply(module, grads * 1024.0, optimizer, scale=1024.0)
    expected, expected_masks, kept_energy = masked_update(grads, 0.5, statistic=module.hparams.mask_statistic)
    assert torch.equal(result.masks, expected_masks) and torch.allclose(result.kept_energy, kept_energy)
    assert torch.allclose(module.identifier.embedding.grad, expected)

    module.identifier.embedding.grad = torch.full((16, 32), float("inf"))
    grads[1, 0, 3, 3] = float("inf")
    assert callback.apply(module, grads, optimizer, scale=1024.0) is None  # the scaler will skip
    assert torch.isinf(module.identifier.embedding.grad).all()
    with pytest.raises(FloatingPointError, match="global step 7"):
        callback.apply(module, grads, optimizer, scale=None, step=7)


@pytest.mark.e2e
def test_gradient_accumulation_masks_every_triple_of_the_global_step(tiny_pipeline, tiny_data, tmp_path):
    """E.grad at the first step (2 micro-batches) equals the masked mean over both micro-batches'
    per-sample gradients, computed independently with autograd.grad."""
    from adi_lightning.masking import masked_update
    from adi_lightning.module import ADIModule

    class Capturing(ADIModule):
        def training_step(self, batch, batch_idx):
            if self.global_step == 0:
                self.seen = [*getattr(self, "seen", []), batch]
            return super().training_step(batch, batch_idx)

        def on_before_optimizer_step(self, optimizer):  # runs after the callbacks' hook
            if self.global_step == 0:
                self.first_grad = self.identifier.embedding.grad.clone()

    # Which triples meet in a step does not depend on the statistic; the channel test keeps the
    # comparison tight (projection divides by |g_a - g_d|^2 and magnifies the two gradient paths'
    # float differences, about 5e-5 relative here).
    module = Capturing(tiny_pipeline, mask_threshold=0.4, learning_rate=0.01, mask_statistic="absolute")
    start = module.identifier.embedding.detach().clone()
    dm = ActionTripleDataModule(root=tiny_data, action="jumping", resolution=32, batch_size=2, repeats=4)
    trainer = L.Trainer(max_steps=1, accumulate_grad_batches=2, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, limit_val_batches=0)
    trainer.fit(module, dm)
    assert len(module.seen) == 2

    reference = ADIModule(tiny_pipeline, mask_threshold=0.4, mask_statistic="absolute")
    with torch.no_grad():
        reference.identifier.embedding.copy_(start)
    table = reference.identifier.embedding
    per_triple = []
    for batch in module.seen:
        _, per_sample = reference.compute_loss(batch)
        grads = torch.stack([torch.autograd.grad(l, table, retain_graph=True)[0] for l in per_sample])
        per_triple.append(grads.reshape(2, 3, *table.shape))
    expected = masked_update(torch.cat(per_triple), 0.4, statistic=module.hparams.mask_statistic).update
    assert (module.first_grad - expected).abs().max() <= 1e-5 * expected.abs().max()
