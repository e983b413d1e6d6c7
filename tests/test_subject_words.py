"""Subject words: the identifier's change from its untrained table stays orthogonal to the subject words'
token embeddings after every optimizer step (projected gradient descent), and bad word lists are refused."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from adi_lightning.data import ActionTripleDataModule
from adi_lightning.identifier import read_identifier
from adi_lightning.word_directions import without_directions, word_basis

WORDS = ["person", "man", "woman", "child"]


# ------------------------------------------------------------------ the pure functions
def test_projection_removes_exactly_the_span_and_is_idempotent():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(3, 10, generator=g)
    basis = word_basis(rows)
    assert basis.shape == (10, 3)
    assert torch.allclose(basis.T @ basis, torch.eye(3, dtype=basis.dtype), atol=1e-12)
    delta = torch.randn(5, 10, generator=g)
    out = without_directions(delta, basis)
    assert out.dtype == delta.dtype and out.shape == delta.shape
    assert torch.allclose(out @ rows.T, torch.zeros(5, 3), atol=1e-5)  # nothing along any word
    removed = delta - out  # what was removed lies in the words' span: rows' least squares reproduce it
    coef = torch.linalg.lstsq(rows.T.double(), removed.T.double()).solution
    assert torch.allclose(rows.T.double() @ coef, removed.T.double(), atol=1e-5)
    assert torch.allclose(without_directions(out, basis), out, atol=1e-6)  # idempotent
    # A vector orthogonal to every word is left as it is.
    orthogonal = out[:1]
    assert torch.allclose(without_directions(orthogonal, basis), orthogonal, atol=1e-6)
    # A word's own direction is removed entirely.
    assert torch.allclose(without_directions(rows[:1], basis), torch.zeros(1, 10), atol=1e-6)


def test_dependent_rows_add_no_direction_and_lose_no_span():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 8, generator=g)
    # A dependent row before an independent one: the span of {a, b} is kept whole.
    rows = torch.stack([a, 2 * a, b, a - 3 * b])
    basis = word_basis(rows)
    assert basis.shape == (8, 2)
    assert torch.allclose(without_directions(torch.stack([a, b]), basis), torch.zeros(2, 8), atol=1e-6)


def test_all_zero_or_empty_rows_are_refused():
    with pytest.raises(ValueError, match="all zero"):
        word_basis(torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"\[K, D\]"):
        word_basis(torch.zeros(0, 4))


# ------------------------------------------------------------------ refusals at construction
@pytest.mark.parametrize("words, message", [
    (["man", "Man"], "more than once"),
    (["man", "<A>"], "contains the placeholder"),
    (["man", "dogcat"], "model.subject_words 'dogcat' must be a single token"),
])
def test_bad_word_lists_are_refused_by_name(make_module, words, message):
    with pytest.raises(ValueError, match=message):
        make_module(subject_words=words)


def test_unset_is_off_and_recorded_empty(make_module):
    module = make_module()
    assert module.subject_basis is None
    assert json.loads(module.identifier_metadata()["subject_words"]) == []


# ------------------------------------------------------------------ training
def _change_along_words(module) -> torch.Tensor:
    """``[R, K]``: (E − E0) @ word rows for each subject word."""
    words = torch.stack([module.family.initializer_row(w) for w in module.hparams.subject_words])
    return (module.identifier.embedding.detach() - module.identifier.initial) @ words.T


@pytest.mark.e2e
def test_fit_keeps_the_change_orthogonal_to_the_words_after_the_masks_restore(make_module, tiny_data, tmp_path):
    # A channel statistic at β = 0.5 leaves channels no triple kept, so the mask's restore runs each step:
    # the projection must come after it for the change to stay orthogonal.
    module = make_module(subject_words=WORDS, mask_threshold=0.5, mask_statistic="absolute", learning_rate=0.05)
    projected_after = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            projected_after.append(_change_along_words(pl_module).abs().max().item())

    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        limit_val_batches=0, callbacks=[Spy()])
    trainer.fit(module, ActionTripleDataModule(root=tiny_data, action="jumping", resolution=32, batch_size=1,
                                               repeats=2))
    assert len(projected_after) == 3 and max(projected_after) < 1e-5  # after every step
    assert not torch.equal(module.identifier.embedding.detach(), module.identifier.initial)  # it did train
    assert module.hparams.subject_words == WORDS  # checkpoints' hparams carry it
    table, meta = read_identifier(tmp_path / "identifier.safetensors")
    assert json.loads(meta["subject_words"]) == WORDS
    words = torch.stack([module.family.initializer_row(w) for w in WORDS])
    assert torch.allclose((table - module.identifier.initial) @ words.T, torch.zeros(len(table), len(WORDS)), atol=1e-5)


@pytest.mark.e2e
def test_without_the_words_the_change_has_a_component_along_them(make_module, tiny_data, tmp_path):
    """The control: the same fit without ``subject_words`` moves along the words (so the test above could fail)."""
    module = make_module(mask_threshold=0.5, mask_statistic="absolute", learning_rate=0.05)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        limit_val_batches=0)
    trainer.fit(module, ActionTripleDataModule(root=tiny_data, action="jumping", resolution=32, batch_size=1,
                                               repeats=2))
    words = torch.stack([module.family.initializer_row(w) for w in WORDS])
    change = (module.identifier.embedding.detach() - module.identifier.initial) @ words.T
    assert change.abs().max() > 1e-3


@pytest.mark.e2e
def test_multi_start_with_subject_words(make_module, multi_start_continues_the_lowest):
    """Multi-start's restarts and its choice still work, and the continued rows obey the projection."""
    module = make_module(starts=2, start_steps=1, subject_words=WORDS)
    multi_start_continues_the_lowest(module)
    assert _change_along_words(module).abs().max() < 1e-5
    assert not torch.equal(module.identifier.embedding.detach(), module.identifier.initial)
