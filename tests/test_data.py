"""Tests for adi_lightning.data: folder validation, triple rules, determinism, DataModule."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adi_lightning.data import (
    ActionTripleDataModule,
    ActionTripleDataset,
    DataLayoutError,
    PromptSeedDataset,
    read_action_folder,
    triple_key,
)

RES = 8


def _png(path: Path, value: int, size=(16, 16)) -> None:
    """A left/right asymmetric image, unique per ``value``, so flips and identities show."""
    w, h = size
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[:, : w // 2] = (value * 37) % 256
    arr[:, w // 2 :] = 255 - (value * 37) % 256
    arr[..., 1] = value % 256
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def make_folder(root: Path, rows: list[dict], images: bool = True, size=(16, 16)) -> Path:
    """Write ``metadata.jsonl`` (one row per line) and a PNG for each row's file_name."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "metadata.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    if images:
        for i, row in enumerate(rows):
            _png(root / row["file_name"], i + 1, size)
    return root


def rec(name, action, subject, **kw) -> dict:
    return {"file_name": name, "action": action, "subject": subject, **kw}


# A folder where every anchor has a strict action-different partner.
PAIRED = [
    rec("jump/alice.png", "jump", "alice", pair_id="a1", context="beach"),
    rec("jump/bob.png", "jump", "bob", pair_id="b1", context="park"),
    rec("jump/carol.png", "jump", "carol", context="room"),
    rec("sit/alice.png", "sit", "alice", pair_id="a1", context="beach"),
    rec("sit/alice2.png", "sit", "alice", pair_id="a2", context="beach"),
    rec("sit/bob.png", "sit", "bob", pair_id="b1", context="park"),
    rec("sit/carol_room.png", "sit", "carol", context="room"),
    rec("sit/carol_park.png", "sit", "carol", context="park"),
]


def dataset(root, action="jump", **kw) -> ActionTripleDataset:
    args = dict(resolution=RES, action_different="require", with_partners=True, repeats=2,
                flip_p=0.5, prompt_templates=["a photo of {}", "a picture of {}"], seed=0)
    args.update(kw)
    return ActionTripleDataset(read_action_folder(root), action, **args)


def names(records) -> set[str]:
    return {r.file_name for r in records}


# --------------------------------------------------------------------------- layout errors

def test_read_records(tmp_path):
    root = make_folder(tmp_path / "d", PAIRED)
    with open(root / "metadata.jsonl", "a") as f:
        f.write("\n   \n")  # blank lines are ignored
    records = read_action_folder(root)
    assert len(records) == len(PAIRED)
    r = records[2]
    assert (r.file_name, r.action, r.subject, r.context, r.pair_id, r.caption, r.line) == (
        "jump/carol.png", "jump", "carol", "room", None, None, 3)
    assert r.path.is_absolute() and r.path.is_file()


def test_root_missing_or_not_dir(tmp_path):
    with pytest.raises(DataLayoutError, match="does not exist"):
        read_action_folder(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataLayoutError, match="not a directory"):
        read_action_folder(tmp_path / "file")


def test_no_metadata(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(DataLayoutError, match="metadata.jsonl"):
        read_action_folder(tmp_path / "d")


@pytest.mark.parametrize(
    "line, expected",
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"file_name": "x.png", "subject": "s"}), "'action'"),
        (json.dumps({"file_name": "x.png", "action": "", "subject": "s"}), "'action' must be"),
        (json.dumps({"file_name": "x.png", "action": "jump", "subject": 3}), "'subject' must be"),
        (json.dumps(rec("jump/alice.png", "jump", "bob")), "duplicate file_name"),
        (json.dumps(rec("missing.png", "jump", "bob")), "not found"),
        (json.dumps(rec("../escape.png", "jump", "bob")), "inside the folder"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, line, expected):
    root = make_folder(tmp_path / "d", PAIRED[:2])
    with open(root / "metadata.jsonl", "a") as f:
        f.write("\n" + line + "\n")  # blank line 3, bad line 4
    with pytest.raises(DataLayoutError, match=expected) as info:
        read_action_folder(root)
    assert "metadata.jsonl:4" in str(info.value)


def test_empty_metadata(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    (root / "metadata.jsonl").write_text("\n\n")
    with pytest.raises(DataLayoutError, match="metadata.jsonl.*no records"):
        read_action_folder(root)


def test_corrupt_image_fails_at_construction(tmp_path):
    root = make_folder(tmp_path / "d", PAIRED)
    (root / "jump/bob.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataLayoutError, match="jump/bob.png.*corrupt") as info:
        dataset(root)
    assert "metadata.jsonl:2" in str(info.value)


def test_truncated_image_fails(tmp_path):
    root = make_folder(tmp_path / "d", PAIRED)
    data = (root / "sit/alice.png").read_bytes()
    (root / "sit/alice.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataLayoutError, match="sit/alice.png"):
        dataset(root)
    # Anchor-only training does not use other actions, so their images are not decoded.
    assert len(dataset(root, with_partners=False)) == 3 * 2


def test_action_not_present_lists_actions(tmp_path):
    root = make_folder(tmp_path / "d", PAIRED)
    with pytest.raises(DataLayoutError, match=r"metadata.jsonl.*'wave'.*'jump', 'sit'"):
        dataset(root, action="wave")


def test_single_image_needs_partner(tmp_path):
    root = make_folder(tmp_path / "d", [rec("a.png", "jump", "alice"), rec("b.png", "sit", "alice")])
    with pytest.raises(DataLayoutError, match="metadata.jsonl:1.*only 1 exemplar"):
        dataset(root)
    assert len(dataset(root, with_partners=False)) == 2


def test_require_missing_partner_names_anchor_and_search(tmp_path):
    rows = PAIRED[:3] + [PAIRED[4], PAIRED[5], PAIRED[6]]  # drop alice's a1 sit image
    root = make_folder(tmp_path / "d", rows)
    with pytest.raises(DataLayoutError) as info:
        dataset(root)
    msg = str(info.value)
    assert "metadata.jsonl:1" in msg and "jump/alice.png" in msg
    assert "subject='alice'" in msg and "pair_id='a1'" in msg
    # other_action falls back to any image of another action for that anchor only.
    ds = dataset(root, action_different="other_action")
    assert names(ds.action_candidates[0]) == {"sit/alice2.png", "sit/bob.png", "sit/carol_room.png"}
    assert names(ds.action_candidates[1]) == {"sit/bob.png"}


def test_require_context_search_is_named(tmp_path):
    rows = [rec("a.png", "jump", "carol", context="room"), rec("b.png", "jump", "bob"),
            rec("c.png", "sit", "carol", context="park"), rec("d.png", "sit", "bob")]
    root = make_folder(tmp_path / "d", rows)
    with pytest.raises(DataLayoutError, match="subject='carol', context='room'"):
        dataset(root)


def test_other_action_needs_some_other_action(tmp_path):
    root = make_folder(tmp_path / "d", PAIRED[:3])
    with pytest.raises(DataLayoutError, match="no image of an action other than 'jump'"):
        dataset(root, action_different="other_action")
    ds = dataset(root, with_partners=False)  # only the target action: fine without partners
    item = ds[0]
    assert item["pixel_values"].shape == (1, 3, RES, RES)


# --------------------------------------------------------------------------- partner rules

def test_require_uses_pair_id_then_context(tmp_path):
    ds = dataset(make_folder(tmp_path / "d", PAIRED))
    assert [a.file_name for a in ds.anchors] == ["jump/alice.png", "jump/bob.png", "jump/carol.png"]
    assert names(ds.action_candidates[0]) == {"sit/alice.png"}  # same pair_id, not a2
    assert names(ds.action_candidates[1]) == {"sit/bob.png"}
    assert names(ds.action_candidates[2]) == {"sit/carol_room.png"}  # no pair_id: same context
    for i in range(len(ds)):
        plan = ds.plan(i)
        anchor, ctx, act = plan.records
        assert anchor is ds.anchors[i % 3] and ctx.action == "jump" and ctx is not anchor
        assert act.action == "sit" and act.subject == anchor.subject


def test_context_partner_prefers_other_subject(tmp_path):
    rows = [rec("a1.png", "jump", "alice", context="x"), rec("a2.png", "jump", "alice", context="y"),
            rec("b1.png", "jump", "bob", context="x"), rec("b2.png", "jump", "bob", context="z")]
    # Context partners only need the target action; add one other-action image for partners.
    rows.append(rec("s.png", "sit", "alice"))
    ds = dataset(make_folder(tmp_path / "e", rows), action_different="other_action")
    assert names(ds.context_candidates[0]) == {"b2.png"}  # other subject and other context
    assert names(ds.context_candidates[1]) == {"b1.png", "b2.png"}
    rows_same = [rec("a1.png", "jump", "alice"), rec("a2.png", "jump", "alice"),
                 rec("s.png", "sit", "alice")]
    ds = dataset(make_folder(tmp_path / "f", rows_same))
    assert names(ds.context_candidates[0]) == {"a2.png"}  # only the same subject: allowed


# --------------------------------------------------------------------------- items

def test_item_shape_range_and_fields(tmp_path):
    ds = dataset(make_folder(tmp_path / "d", PAIRED, size=(16, 12)))
    assert len(ds) == 3 * 2
    item = ds[4]
    px = item["pixel_values"]
    assert px.shape == (3, 3, RES, RES) and px.dtype == torch.float32
    assert px.min() >= -1.0 and px.max() <= 1.0 and px.min() < 0 < px.max()
    assert item["template"] in ("a photo of {}", "a picture of {}")
    assert item["index"] == 4 and item["key"] == triple_key(0, 4)
    with pytest.raises(IndexError):
        ds[-1]
    # Index len + i is item i in the next epoch: the same anchor, its own key.
    later = ds.plan(len(ds) + 4)
    assert later.records[0] == ds.plan(4).records[0] and later.key == triple_key(0, len(ds) + 4)


def test_triple_key():
    keys = {triple_key(s, i) for s in (0, 1, -1, 2**40) for i in range(50)}
    assert len(keys) == 200 and all(0 <= k < 2**62 for k in keys)
    assert triple_key(3, 7) == triple_key(3, 7)
    assert triple_key(0, 0) == 3008887562355236763  # fixed across processes and versions


def test_determinism(tmp_path):
    root = make_folder(tmp_path / "d", PAIRED)
    a, b = dataset(root, seed=5), dataset(root, seed=5)
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert torch.equal(x["pixel_values"], y["pixel_values"]) and x["template"] == y["template"]
    c = dataset(root, seed=6)
    def choice(ds, i):
        plan = ds.plan(i)
        return plan.records, plan.flip, plan.template_index

    assert any(choice(a, i) != choice(c, i) for i in range(len(a)))


def test_flip_applies_to_all_roles(tmp_path):
    root = make_folder(tmp_path / "d", PAIRED)
    plain, flipped = dataset(root, flip_p=0.0), dataset(root, flip_p=1.0)
    for i in range(len(plain)):
        assert plain.plan(i).records == flipped.plan(i).records
        p, f = plain[i]["pixel_values"], flipped[i]["pixel_values"]
        assert not torch.equal(p, f) and torch.equal(p.flip(-1), f)


def test_prompt_seed_dataset():
    ds = PromptSeedDataset(["p0", "p1"], [3, 4, 5])
    assert len(ds) == 6
    assert ds[4] == {"prompt": "p1", "seed": 4, "prompt_index": 1, "seed_index": 1}


# --------------------------------------------------------------------------- datamodule

def test_datamodule_fit_batch(tmp_path):
    root = make_folder(tmp_path / "d", PAIRED)
    dm = ActionTripleDataModule(root=str(root), action="jump", resolution=RES, batch_size=2,
                                repeats=2, prompt_templates=["a {} photo"])
    assert dm.prompt_templates == ["a {} photo"]
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (2, 3, 3, RES, RES)
    assert batch["template"] == ["a {} photo"] * 2
    assert batch["index"].shape == (2,) and batch["key"].dtype == torch.int64
    order = [b["index"].tolist() for b in dm.train_dataloader()]
    assert order == [b["index"].tolist() for b in dm.train_dataloader()]  # seeded shuffle
    assert len(next(iter(dm.val_dataloader()))["prompt"]) == 1
    assert len(dm.val_dataloader()) == 2 and len(dm.test_dataloader()) == 2


def test_datamodule_fit_needs_root_and_action(tmp_path):
    with pytest.raises(ValueError, match="data.root"):
        ActionTripleDataModule(action="jump").setup("fit")
    with pytest.raises(ValueError, match="data.action"):
        ActionTripleDataModule(root=str(tmp_path)).setup("fit")


def test_datamodule_predict_without_root():
    dm = ActionTripleDataModule(predict_prompts=["x <A>", "y <A>"], predict_seeds=[7, 8])
    dm.setup("predict")
    items = list(dm.predict_dataloader())
    assert [(b["prompt"][0], int(b["seed"])) for b in items] == [
        ("x <A>", 7), ("x <A>", 8), ("y <A>", 7), ("y <A>", 8)]
    assert len(ActionTripleDataModule().prompt_templates) >= 2


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"resolution": 4}, "data.resolution"),
        ({"batch_size": 0}, "data.batch_size"),
        ({"repeats": 0}, "data.repeats"),
        ({"flip_p": 1.5}, "data.flip_p"),
        ({"prompt_templates": ["no placeholder"]}, "data.prompt_templates"),
        ({"prompt_templates": ["two {} {}"]}, "data.prompt_templates"),
        ({"prompt_templates": ["a {0} {}"]}, "data.prompt_templates"),
    ],
)
def test_datamodule_rejects_bad_args(kwargs, key):
    with pytest.raises(ValueError, match=key):
        ActionTripleDataModule(**kwargs)


# PAIRED plus a context pool of two jumpers that are partners only (no action-different partner).
POOL = [rec("pool/dave.png", "jump", "dave", context="night", context_pool=True,
            attributes={"colour": "blue"}),
        rec("pool/erin.png", "jump", "erin", context="street", context_pool=True)]


def test_context_pool_images_are_partners_never_anchors(tmp_path):
    root = make_folder(tmp_path / "d", PAIRED + POOL)
    ds = dataset(root)  # auto: the pool, because the action has one
    assert ds.context_source == "pool"
    assert names(ds.anchors) == {"jump/alice.png", "jump/bob.png", "jump/carol.png"}
    contexts = {ds.plan(i).records[1].file_name for i in range(40)}
    assert contexts == {"pool/dave.png", "pool/erin.png"}
    assert not any(ds.plan(i).records[0].context_pool for i in range(40))
    # TI / P+ (anchors only) never see a pool image either.
    plain = dataset(root, with_partners=False)
    assert {plain.plan(i).records[0].file_name for i in range(len(plain))} == names(ds.anchors)
    assert read_action_folder(root)[-2].attributes == {"colour": "blue"}


def test_context_partner_sources(tmp_path):
    root = make_folder(tmp_path / "d", PAIRED + POOL)
    from_exemplars = {dataset(root, context_partners="exemplars").plan(i).records[1].file_name for i in range(40)}
    assert from_exemplars <= {"jump/alice.png", "jump/bob.png", "jump/carol.png"}
    both = {dataset(root, context_partners="pool_and_exemplars").plan(i).records[1].file_name for i in range(60)}
    assert {"pool/dave.png", "pool/erin.png"} < both and len(both) > 2
    plain = make_folder(tmp_path / "p", PAIRED)
    assert dataset(plain).context_source == "exemplars"
    with pytest.raises(DataLayoutError, match="context_partners='pool'.*no context-pool image"):
        dataset(plain, context_partners="pool")


def test_missing_pool_image_names_the_file(tmp_path):
    root = make_folder(tmp_path / "d", PAIRED + POOL)
    (root / "pool" / "erin.png").unlink()
    with pytest.raises(DataLayoutError, match=r"metadata.jsonl:10.*'pool/erin.png' not found"):
        dataset(root)


@pytest.mark.parametrize("key, value, message", [
    ("context_pool", "yes", "'context_pool' must be true or false"),
    ("attributes", {"colour": 3}, "'attributes' must be an object of strings"),
])
def test_bad_pool_keys_name_the_line(tmp_path, key, value, message):
    root = make_folder(tmp_path / "d", PAIRED[:1] + [rec("x.png", "jump", "x", **{key: value})])
    with pytest.raises(DataLayoutError, match=f"metadata.jsonl:2: optional key {message}"):
        read_action_folder(root)
