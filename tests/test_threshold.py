"""β (``model.mask_threshold``) on the tiny pipeline: every statistic gives it a meaning that changes
training, its P+ end is P+ bit for bit, and the shipped default trains as before β had a meaning."""

from __future__ import annotations

import inspect
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from adi_lightning.data import ActionTripleDataModule
from adi_lightning.masking import MASK_STATISTICS

REPO = Path(__file__).resolve().parents[1]
STEPS = 2


def preset(name: str) -> dict:
    return yaml.safe_load((REPO / "configs" / "model" / f"{name}.yaml").read_text())


def train(make_module, tiny_data, tmp_path: Path, **model) -> torch.Tensor:
    """The identifier after ``STEPS`` optimizer steps, the data linked to β as the CLI links it."""
    L.seed_everything(0)
    module = make_module(learning_rate=0.05, **model)
    dm = ActionTripleDataModule(root=tiny_data, action="jumping", resolution=32, batch_size=2, repeats=4, seed=1,
                                with_partners=module.masking_enabled)
    trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        limit_val_batches=0)
    trainer.fit(module, dm)
    assert trainer.global_step == STEPS
    return module.identifier.embedding.detach().clone()


@pytest.mark.e2e
@pytest.mark.parametrize("statistic", MASK_STATISTICS)
def test_beta_changes_the_identifier_under_every_statistic(statistic, make_module, tiny_data, tmp_path):
    low = train(make_module, tiny_data, tmp_path / "low", mask_threshold=0.3, mask_statistic=statistic)
    high = train(make_module, tiny_data, tmp_path / "high", mask_threshold=0.7, mask_statistic=statistic)
    assert torch.isfinite(low).all() and torch.isfinite(high).all()
    assert not torch.equal(low, high), f"model.mask_threshold is inert under mask_statistic={statistic}"


@pytest.mark.e2e
def test_the_p_plus_end_is_p_plus_bit_for_bit(make_module, tiny_data, tmp_path):
    adi, pplus = preset("adi"), preset("pplus")
    p_plus = train(make_module, tiny_data, tmp_path / "pplus", **pplus)
    end = train(make_module, tiny_data, tmp_path / "end", **{**adi, "mask_threshold": 1.0})
    near = train(make_module, tiny_data, tmp_path / "near", **{**adi, "mask_threshold": 0.9})
    full = train(make_module, tiny_data, tmp_path / "full", **adi)
    assert torch.equal(end, p_plus)
    # Just below the end the update is 0.9 g + 0.1 P(g): neither P+ nor the full projection.
    assert not torch.equal(near, p_plus) and not torch.equal(near, full)


@pytest.mark.e2e
def test_the_shipped_default_trains_exactly_as_the_full_projection(make_module, tiny_data, tmp_path, monkeypatch):
    """The default β reproduces the training of the shipped method from before β had a meaning under
    ``projection``: the update was ``project_update(g_a, g_a - g_c, g_a - g_d, combine)``, whatever β < 1."""
    import adi_lightning.callbacks.gradient_mask as gradient_mask
    from adi_lightning.masking import MaskedUpdate, kept_energy_fraction, project_update
    from adi_lightning.module import ADIModule

    toy = yaml.safe_load((REPO / "configs" / "model" / "toy.yaml").read_text())
    default = inspect.signature(ADIModule).parameters["mask_threshold"].default  # agrees with the presets
    assert preset("adi")["mask_threshold"] == toy["mask_threshold"] == default == 0.0
    assert preset("adi")["mask_statistic"] == toy["mask_statistic"] == "projection"

    shipped = train(make_module, tiny_data, tmp_path / "shipped")  # the module's defaults: projection, β 0.0

    def before_beta(role_grads, threshold, combine="and", update_from="anchor", statistic="absolute"):
        assert statistic == "projection" and threshold < 1.0
        g_a, g_c, g_d = role_grads.unbind(1)
        updates = project_update(g_a, g_a - g_c, g_a - g_d, combine)
        return MaskedUpdate(updates.mean(dim=0), torch.ones_like(g_a, dtype=torch.bool),
                            kept_energy_fraction(updates, g_a))

    monkeypatch.setattr(gradient_mask, "masked_update", before_beta)
    reference = train(make_module, tiny_data, tmp_path / "reference")
    assert torch.equal(shipped, reference)


def test_inert_settings_name_each_key_the_other_settings_make_inert():
    from adi_lightning.checks import inert_settings

    shipped = {"mask_threshold": 0.0, "starts": 8, "large_t_steps": 0, "row_groups": None}
    data = {"action_different": "require", "eval_subjects": ["cat"], "root": None, "export_toy_if_missing": True}
    assert set(inert_settings(shipped, data)) == {f"data.{k}" for k in (
        "generate_actions", "generate_per_anchor", "generate_strength", "generate_steps", "generate_guidance",
        "cache_dir", "validation_prompts")}
    off = inert_settings({**shipped, "mask_threshold": 1.0, "starts": 1, "row_groups": "shared"},
                         {**data, "eval_subjects": [], "export_toy_if_missing": False})
    assert {"model.mask_combine", "model.mask_statistic", "model.update_from", "model.share_text_encoding",
            "data.action_different", "data.context_partners", "model.start_steps", "model.large_t_min",
            "model.layerwise", "data.eval_template", "data.toy_difficulty"} <= set(off)
    assert "model.mask_threshold" not in off  # β is the switch itself, never inert
    assert "model.large_t_min" not in inert_settings({**shipped, "starts": 1, "large_t_steps": 10})
    assert "data.generate_steps" not in inert_settings(shipped, {**data, "action_different": "generate"})
    # one test alone leaves the other's partner unread by the update, but its keys still decide what loads
    for combine in ("context_only", "action_only"):
        assert not {"data.action_different", "data.context_partners"} & set(
            inert_settings({**shipped, "mask_combine": combine}, data))


def test_the_toy_export_keys_are_inert_for_a_folder_outside_the_cache(tmp_path, monkeypatch):
    from adi_lightning.checks import inert_settings
    from adi_lightning.paths import toy_cache_dir

    monkeypatch.setenv("ADI_LIGHTNING_CACHE", str(tmp_path / "cache"))
    model = {"mask_threshold": 0.0}
    toy = {"export_toy_if_missing": True, "toy_difficulty": "diverse"}
    outside = inert_settings(model, {**toy, "root": str(tmp_path / "mine")})
    assert {"data.toy_difficulty", "data.export_toy_if_missing"} <= set(outside)
    for root in (None, str(toy_cache_dir("diverse", "jumping"))):  # the cache folder: exported there if missing
        assert not {"data.toy_difficulty", "data.export_toy_if_missing"} & set(inert_settings(model, {**toy, "root": root}))
