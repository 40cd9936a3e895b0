"""Store schema version 2: ``symmetries.exactness``, the ``dropped`` table and the depth
stability columns ``h_max`` and ``max_real``; version-1 stores still read (new columns empty) and
are migrated in place when a run resumes."""

from __future__ import annotations

import sqlite3

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

import noether_dyn as nd
from noether_dyn.store.schema import SCHEMA_VERSION, STORE_FILENAME
from noether_dyn.store.writer import RunWriter
from noether_dyn.symmetries.engine import Dropped
from tests.conftest import batch, bn_mlp, train


def _run(run_dir, steps: int = 3) -> torch.nn.Module:
    model = bn_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with nd.watch(model, opt, run_dir) as mon:  # zero-config: detected with exactness
        train(model, opt, mon, steps=steps)
    return model


def _downgrade_to_v1(run_dir) -> None:
    """What a version-1 writer left: no exactness, h_max, max_real columns, no dropped table."""
    con = sqlite3.connect(run_dir / STORE_FILENAME)
    with con:
        con.execute("ALTER TABLE symmetries DROP COLUMN exactness")
        con.execute("ALTER TABLE depth_profile DROP COLUMN h_max")
        con.execute("ALTER TABLE depth_profile DROP COLUMN max_real")
        con.execute("DROP TABLE dropped")
        con.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    con.execute("PRAGMA user_version = 1")
    con.close()


def test_exactness_and_dropped_candidates_are_stored(tmp_path) -> None:
    _run(tmp_path / "run")
    run = nd.load_run(tmp_path / "run")
    assert SCHEMA_VERSION == 2 and run.meta["schema_version"] == 2
    assert set(run.symmetries["exactness"]) <= {"exact", "approximate"}
    assert (run.symmetries["exactness"] == "exact").any()
    assert len(run.dropped) > 0 and run.dropped["rule"].str.len().gt(0).all()
    writer = RunWriter(tmp_path / "other", "new")  # a store with no charge rows yet
    dropped = [Dropped("scale:0", "scale", ("0.weight",), (1.0,), 3e-2, "defect 3.0e-02 > tol")]
    writer.set_symmetries([], dropped)
    writer.close()
    run = nd.load_run(tmp_path / "other")
    assert run.dropped.to_dict("records") == [
        {"symmetry": "scale:0", "kind": "scale", "params": ("0.weight",), "signs": (1.0,),
         "defect": 3e-2, "rule": "defect 3.0e-02 > tol"}
    ]  # fmt: skip


def test_depth_profile_keeps_h_max_and_max_real(tmp_path) -> None:
    model = bn_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    profile = pd.DataFrame(
        {"layer": [0, 1], "sigma_max": [1.5, 1.2], "sigma_min": [0.5, 0.8], "defect": [0.1, 0.2],
         "transmission": [1.0, 0.9], "h_max": [0.25, 0.5], "max_real": [-2.0, -1.0]}
    )  # fmt: skip
    with nd.watch(model, opt, tmp_path / "run", symmetries=[]) as mon:
        mon.log_depth_profile(profile)
    stored = nd.load_run(tmp_path / "run").depth_profile
    np.testing.assert_array_equal(stored["h_max"], [0.25, 0.5])
    np.testing.assert_array_equal(stored["max_real"], [-2.0, -1.0])
    assert stored["stability"].isna().all()


def test_a_version_1_store_reads_with_empty_new_columns(tmp_path) -> None:
    _run(tmp_path / "run")
    _downgrade_to_v1(tmp_path / "run")
    run = nd.load_run(tmp_path / "run")
    assert len(run.symmetries) > 0 and (run.symmetries["exactness"] == "").all()
    assert len(run.dropped) == 0 and list(run.dropped.columns)[-1] == "rule"
    assert {"h_max", "max_real"} <= set(run.depth_profile.columns)


def test_a_version_1_store_is_migrated_when_resumed(tmp_path) -> None:
    model = _run(tmp_path / "run", steps=3)
    _downgrade_to_v1(tmp_path / "run")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = batch()
    declared = nd.load_run(tmp_path / "run").symmetries
    symmetries = [
        nd.Symmetry(r.symmetry, r.kind, tuple(r.params), tuple(r.signs))
        for r in declared.itertuples()
    ]
    with nd.watch(model, opt, tmp_path / "run", resume=True, symmetries=symmetries) as mon:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        mon.log_loss(loss)
        opt.step()
    con = sqlite3.connect(tmp_path / "run" / STORE_FILENAME)
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    columns = {r[1] for r in con.execute("PRAGMA table_info(depth_profile)")}
    con.close()
    assert {"h_max", "max_real"} <= columns
    run = nd.load_run(tmp_path / "run")
    assert run.meta["schema_version"] == SCHEMA_VERSION
    assert run.steps["step"].tolist() == [0, 1, 2, 3]
    assert sorted(set(run.charges["step"])) == [0, 1, 2, 3]
