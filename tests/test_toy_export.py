"""``make-data``: toy action folders at graded difficulty (shared + context pool, diverse, shared_no_pool)."""

import hashlib
import json
import os
from collections import Counter

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from adi_lightning.toy.__main__ import main  # noqa: E402
from adi_lightning.toy.export import (  # noqa: E402
    DIFFICULTIES, FOLDER_INFO, ensure_action_folder, exemplar_specs, folder_difficulty, make_action_folder,
)
from adi_lightning.toy.world import HUMANS, PATTERNS  # noqa: E402

FACTORS = ("colour", "pattern", "background")


def _rows(root):
    return [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]


def _look(row):
    return tuple(row["attributes"][k] for k in FACTORS)


def _check_common(root, action, num_exemplars):
    """Every line: today's keys + attributes matching the spec; exemplars paired with partners."""
    rows = _rows(root)
    assert len({r["file_name"] for r in rows}) == len(rows)
    for r in rows:
        keys = {"file_name", "action", "subject", "context", "pair_id", "caption", "role", "spec", "attributes"}
        assert keys <= set(r)
        assert r["attributes"] == {k: r["spec"][k] for k in FACTORS} and r["context"] == r["spec"]["background"]
        assert all(isinstance(v, str) for v in r["attributes"].values())
        assert (root / r["file_name"]).is_file() and r["subject"] in HUMANS
    exemplars = [r for r in rows if r["role"] == "exemplar"]
    partners = [r for r in rows if r["role"] == "action_different"]
    assert len(exemplars) == len(partners) == num_exemplars
    for ex in exemplars:
        assert ex["action"] == action and not ex.get("context_pool")
        (partner,) = [p for p in rows if p["pair_id"] == ex["pair_id"] and p is not ex]
        assert partner["role"] == "action_different" and partner["action"] != action and not partner.get("context_pool")
        assert {k: v for k, v in partner["spec"].items() if k != "action"} == \
            {k: v for k, v in ex["spec"].items() if k != "action"}
    return rows, exemplars


def test_shared_adds_a_context_pool_of_other_looks(tmp_path):
    root = make_action_folder(tmp_path / "j", action="jumping", seed=0, difficulty="shared")
    rows, exemplars = _check_common(root, "jumping", 6)
    (shared_look,) = {_look(r) for r in exemplars}
    pool = [r for r in rows if r["role"] == "context_pool"]
    assert len(pool) == 6 and len(rows) == 18
    assert all(r.get("context_pool") is True for r in pool)
    assert not [r for r in rows if r.get("context_pool") and r["role"] != "context_pool"]
    # context partners only: same action, own unique pair_id, nothing else shares it (no partner)
    pair_ids = Counter(r["pair_id"] for r in rows)
    for r in pool:
        assert r["action"] == "jumping" and pair_ids[r["pair_id"]] == 1
        colour, pattern, background = _look(r)
        assert colour != shared_look[0] and background != shared_look[2]
        assert pattern == "plain" != shared_look[1]
    assert [r["subject"] for r in pool] == ["man", "woman", "child"] * 2
    # the pool is itself diverse: no colour or background more than twice in 6 (4 values left each)
    for k in ("colour", "background"):
        assert max(Counter(r["attributes"][k] for r in pool).values()) <= 2
    assert len({_look(r) for r in pool}) == 6
    info = json.loads((root / FOLDER_INFO).read_text())
    assert info == {"action": "jumping", "difficulty": "shared", "seed": 0, "num_exemplars": 6, "num_pool": 6,
                    "subjects": ["man", "woman", "child"], "size": 32}


def test_pool_takes_the_other_pattern_when_exemplars_are_plain(tmp_path):
    root = make_action_folder(tmp_path / "w", action="waving", seed=2, pattern="plain", colour="blue",
                              background="park", num_pool=9)
    rows = _rows(root)
    pool = [r for r in rows if r.get("context_pool")]
    assert len(pool) == 9 and {_look(r)[1] for r in pool} == {"striped"}
    assert not {r["attributes"]["colour"] for r in pool} & {"blue"}
    assert not {r["attributes"]["background"] for r in pool} & {"park"}
    assert {_look(r) for r in rows if r["role"] == "exemplar"} == {("blue", "plain", "park")}


def test_shared_no_pool_is_the_old_folder_and_shares_exemplars_with_shared(tmp_path):
    a = make_action_folder(tmp_path / "a", action="jumping", seed=0, difficulty="shared_no_pool")
    b = make_action_folder(tmp_path / "b", action="jumping", seed=0, difficulty="shared")
    rows_a, ex_a = _check_common(a, "jumping", 6)
    rows_b, _ = _check_common(b, "jumping", 6)
    assert len(rows_a) == 12 and not [r for r in rows_a if r.get("context_pool") or r["role"] == "context_pool"]
    assert len({_look(r) for r in ex_a}) == 1
    assert rows_a == [r for r in rows_b if not r.get("context_pool")]  # pool drawn from its own RNG stream
    for r in rows_a:
        assert (a / r["file_name"]).read_bytes() == (b / r["file_name"]).read_bytes()
    # the exemplar specs of the code before difficulties (seed 0, jumping): old results stay comparable
    pairs = exemplar_specs("jumping", 6, ["man", "woman", "child"], 0)
    blob = json.dumps([[s.as_dict() for s in p] for p in pairs], sort_keys=True).encode()
    assert hashlib.sha256(blob).hexdigest() == "2d3777523aa2e4d1ca4572bf67109c3e708a1c6d15625f17380a1935b74d37c4"
    assert [[r["spec"] for r in rows_a[i:i + 2]] for i in range(0, 12, 2)] == [[s.as_dict() for s in p] for p in pairs]
    assert json.loads((a / FOLDER_INFO).read_text())["num_pool"] == 0


def test_diverse_exemplars_have_distinct_spread_looks(tmp_path):
    root = make_action_folder(tmp_path / "d", action="kicking", seed=1, difficulty="diverse")
    rows, exemplars = _check_common(root, "kicking", 6)
    assert len(rows) == 12 and not [r for r in rows if r.get("context_pool")]
    looks = [_look(r) for r in exemplars]
    assert len(set(looks)) == 6
    # 5 colours, 2 patterns, 5 backgrounds over 6 exemplars: no value used more than necessary
    for i, (k, limit) in enumerate((("colour", 2), ("pattern", 3), ("background", 2))):
        counts = Counter(look[i] for look in looks)
        assert max(counts.values()) == limit
        assert sum(1 for c in counts.values() if c == limit) == (2 if k == "pattern" else 1)
    assert {look[1] for look in looks} == set(PATTERNS)
    # only the appearance changed: positions and pose jitter are those of the shared folder
    shared = _rows(make_action_folder(tmp_path / "s", action="kicking", seed=1, difficulty="shared_no_pool"))
    strip = lambda r: {k: v for k, v in r["spec"].items() if k not in FACTORS}  # noqa: E731
    assert [strip(r) for r in rows] == [strip(r) for r in shared]
    with pytest.raises(ValueError, match="diverse"):
        make_action_folder(tmp_path / "x", difficulty="diverse", colour="red")


def test_unknown_difficulty_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown difficulty 'hard'"):
        make_action_folder(tmp_path / "x", difficulty="hard")
    assert not (tmp_path / "x").exists()


def test_ensure_refuses_a_cached_folder_of_another_difficulty(tmp_path):
    root = tmp_path / "j"
    assert ensure_action_folder(root, "jumping", difficulty="diverse", seed=4) == root
    assert folder_difficulty(root) == "diverse"
    assert ensure_action_folder(root, "jumping", difficulty="diverse") == root  # reused, same difficulty
    with pytest.raises(ValueError) as err:
        ensure_action_folder(root, "jumping", difficulty="shared")
    assert str(root) in str(err.value) and "'diverse'" in str(err.value) and "'shared'" in str(err.value)
    with pytest.raises(ValueError, match="'diverse'.*'shared'"):
        ensure_action_folder(root, "jumping")  # the default is shared
    # a folder written before difficulties (no toy_folder.json) counts as shared_no_pool
    (root / FOLDER_INFO).unlink()
    assert folder_difficulty(root) == "shared_no_pool"
    assert ensure_action_folder(root, "jumping", difficulty="shared_no_pool") == root
    with pytest.raises(ValueError, match="'shared_no_pool'"):
        ensure_action_folder(root, "jumping", difficulty="shared")
    # a fresh folder gets the asked difficulty, shared by default (with its pool)
    fresh = ensure_action_folder(tmp_path / "f", "waving", num_exemplars=3, num_pool=2)
    assert folder_difficulty(fresh) == "shared" and len(_rows(fresh)) == 3 * 2 + 2


def test_cli_difficulty_flag(tmp_path, capsys):
    for difficulty in DIFFICULTIES:
        root = tmp_path / difficulty
        main(["make-data", "--action", "raising", "--out", str(root), "--num-exemplars", "4", "--seed", "5",
              "--difficulty", difficulty, "--num-pool", "3"])
        assert folder_difficulty(root) == difficulty
        rows, _ = _check_common(root, "raising", 4)
        assert len([r for r in rows if r.get("context_pool")]) == (3 if difficulty == "shared" else 0)
    main(["make-data", "--out", str(tmp_path / "default"), "--num-exemplars", "2"])
    assert folder_difficulty(tmp_path / "default") == "shared" and len(_rows(tmp_path / "default")) == 4 + 6
    with pytest.raises(SystemExit):
        main(["make-data", "--out", str(tmp_path / "bad"), "--difficulty", "hard"])
    assert "invalid choice" in capsys.readouterr().err


def test_make_data_layout_is_accepted(tmp_path):
    from adi_lightning.data import ActionTripleDataModule
    from adi_lightning.data.layout import read_action_folder

    root = tmp_path / "jumping"
    main(["make-data", "--action", "jumping", "--out", str(root), "--num-exemplars", "4", "--seed", "3",
          "--difficulty", "shared_no_pool"])
    rows = _rows(root)
    exemplars = [r for r in rows if r["action"] == "jumping"]
    partners = [r for r in rows if r["action"] != "jumping"]
    assert len(exemplars) == len(partners) == 4
    assert all(r["subject"] in HUMANS for r in rows)
    # the hard case: one co-occurring context for every exemplar
    assert len({(r["spec"]["background"], r["spec"]["colour"], r["spec"]["pattern"]) for r in exemplars}) == 1
    for ex in exemplars:
        (partner,) = [p for p in partners if p["pair_id"] == ex["pair_id"]]
        assert {k: v for k, v in partner["spec"].items() if k != "action"} == \
            {k: v for k, v in ex["spec"].items() if k != "action"}
    dm = ActionTripleDataModule(root=str(root), action="jumping", resolution=32)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert len(dm.train_dataset.anchors) == 4 and batch is not None
    with pytest.raises(FileExistsError):
        main(["make-data", "--action", "jumping", "--out", str(root)])
    # every difficulty is a valid layout (the extra keys are optional metadata)
    for difficulty in ("shared", "diverse"):
        other = tmp_path / difficulty
        main(["make-data", "--out", str(other), "--num-exemplars", "3", "--difficulty", difficulty])
        assert len(read_action_folder(other)) == len(_rows(other))
    # the pool is read as context partners only: anchors stay the exemplars
    dm = ActionTripleDataModule(root=str(tmp_path / "shared"), action="jumping", resolution=32)
    dm.setup("fit")
    ds = dm.train_dataset
    assert len(ds.anchors) == 3 and not any(a.context_pool for a in ds.anchors) and ds.context_source == "pool"
    assert all(c.context_pool for cands in ds.context_candidates for c in cands)
