"""Sinks: ``watch(..., sinks=[...])`` streams the step scalars and per-symmetry charges to
TensorBoard and W&B at each flush, and ``export --format tensorboard`` replays a stored run.

TensorBoard is read back with its own event-file reader (``EventAccumulator``). It stores a
scalar as a protobuf ``float`` (IEEE binary32), so a value reads back as the stored float64
rounded to the nearest float32: the checks compare with ``np.float32(stored)`` exactly (both
sides round to nearest, so there is no tolerance to choose). A W&B run receives Python floats:
its values equal the store's float64 exactly.
"""

from __future__ import annotations

import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import noether_dyn as nd
from noether_dyn.records import CHARGE_COLUMNS, STEP_COLUMNS
from noether_dyn.sinks import SinkFailure, SinkSet, TensorBoardSink, WandbSink, scalar_rows

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import (  # noqa: E402
    EventAccumulator,
)

STEPS, FLUSH, SKIPPED_LOSS = 7, 3, 2
VALUE_COLUMNS = [c for c in STEP_COLUMNS if c != "step"]


class Recorder:
    """A sink that keeps every call."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, dict[str, float]]] = []
        self.flushes: list[int] = []  # rows written before each flush
        self.closed = False

    def write(self, step, scalars):
        self.rows.append((step, dict(scalars)))

    def flush(self):
        self.flushes.append(len(self.rows))

    def close(self):
        self.closed = True


class FakeWandbRun:
    """What WandbSink uses of a W&B run: ``log(dict, step=)`` and ``define_metric``."""

    def __init__(self) -> None:
        self.logged: list[tuple[dict, int | None]] = []
        self.defined: list[tuple[str, str | None]] = []

    def log(self, data, step=None):
        self.logged.append((dict(data), step))

    def define_metric(self, name, step_metric=None):
        self.defined.append((name, step_metric))


def _model() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    return model, torch.randn(32, 6), torch.randint(0, 4, (32,))


def _train(run_dir: Path, sinks: list, steps: int = STEPS, every: int = 1, **kw) -> nd.Monitor:
    """SGD with momentum and weight decay; the loss logged on every step but SKIPPED_LOSS."""
    model, x, y = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    loss_fn = nn.functional.cross_entropy
    with nd.watch(model, opt, run_dir, every, inputs=x, targets=y, loss_fn=loss_fn,
                  flush_every=FLUSH, sinks=sinks, **kw) as monitor:  # fmt: skip
        for i in range(steps):
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            if i != SKIPPED_LOSS:
                monitor.log_loss(loss)
            opt.step()
    return monitor


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One run streamed to TensorBoard, a recording sink and a fake W&B run."""
    root = tmp_path_factory.mktemp("sinks")
    recorder, wandb_run = Recorder(), FakeWandbRun()
    monitor = _train(root / "run", [TensorBoardSink(root / "tb"), recorder, wandb_run])
    return root, nd.load_run(root / "run"), recorder, wandb_run, monitor


def _read_tb(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _expected(run) -> dict[str, list[tuple[int, float]]]:
    """Every (step, value) the run's tables hold, by tag, NaN left out."""
    out: dict[str, list[tuple[int, float]]] = {}
    for c in VALUE_COLUMNS:
        out[f"noether/{c}"] = [
            (int(s), float(v)) for s, v in zip(run.steps["step"], run.steps[c]) if not math.isnan(v)
        ]
    for name in run.symmetries["symmetry"]:
        rows = run.charge(name)
        for c in CHARGE_COLUMNS:
            pts = [(int(s), float(v)) for s, v in rows[c].items() if not math.isnan(v)]
            if pts:
                out[f"noether/{c}/{name}"] = pts
    return out


def _assert_tb_equals_run(log_dir: Path, run) -> None:
    got, want = _read_tb(log_dir), _expected(run)
    assert set(got) == set(want)
    for tag, points in want.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in points], tag
        # float32 rounding of the float64 store value, exactly (see the module docstring)
        np.testing.assert_array_equal(
            np.array([v for _, v in got[tag]], dtype=np.float32),
            np.array([v for _, v in points]).astype(np.float32),
            err_msg=tag,
        )


def test_tensorboard_holds_every_step_scalar_and_charge(trained):
    root, run, *_ = trained
    assert list(run.steps["step"]) == list(range(STEPS))
    kinds = set(run.symmetries["kind"])
    assert {"scale", "rescale", "translation"} <= kinds  # charges of every kind are streamed
    _assert_tb_equals_run(root / "tb", run)
    tb = _read_tb(root / "tb")
    # a loss that was not logged is left out, not written as NaN
    assert SKIPPED_LOSS not in [s for s, _ in tb["noether/loss"]]
    assert len(tb["noether/kinetic"]) == STEPS
    # scale-only columns exist for the scale symmetry and not for the others
    assert "noether/effective_lr/scale:0" in tb
    assert not any(t.startswith("noether/effective_lr/translation") for t in tb)


def test_tensorboard_values_are_the_stores_not_a_float32_copy(trained):
    """The check above is not vacuous: charges are float64 values that float32 changes."""
    _, run, *_ = trained
    charges = run.charges["charge"].to_numpy()
    assert np.any(charges.astype(np.float32).astype(np.float64) != charges)


def test_sinks_receive_rows_only_at_flushes(trained):
    """Rows arrive in batches of ``flush_every`` (and the rest at close): no per-step call."""
    _, run, recorder, *_ = trained
    assert recorder.flushes == [3, 6, 7]
    assert [s for s, _ in recorder.rows] == list(range(STEPS))
    assert recorder.closed  # closed with the monitor


def test_wandb_run_gets_one_log_per_step_with_the_stores_float64(trained):
    _, run, recorder, wandb_run, _ = trained
    assert [step for _, step in wandb_run.logged] == list(range(STEPS))
    want = _expected(run)
    for data, step in wandb_run.logged:
        expected = {tag: v for tag, pts in want.items() for s, v in pts if s == step}
        assert data == expected  # exact: floats pass through unrounded
    assert [d for d, _ in wandb_run.logged] == [r for _, r in recorder.rows]


def test_wandb_step_metric_declares_the_axis_and_logs_without_step():
    run = FakeWandbRun()
    sink = WandbSink(run, step_metric="noether/step")
    assert run.defined == [("noether/step", None), ("noether/*", "noether/step")]
    sink.write(5, {"noether/loss": 0.25})
    assert run.logged == [({"noether/step": 5, "noether/loss": 0.25}, None)]


def test_wandb_without_wandb_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(ImportError, match=r"noether-dyn\[wandb\]"):
        WandbSink()


def test_wandb_without_an_active_run_says_to_init(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", type(sys)("wandb"))
    sys.modules["wandb"].run = None
    with pytest.raises(ValueError, match=r"wandb\.init"):
        WandbSink()


class LogSpy:
    """Wraps a run's bound ``log``: keeps each call, then forwards it unchanged."""

    def __init__(self, log) -> None:
        self.forward, self.calls = log, []

    def __call__(self, data, step=None, **kw):
        self.calls.append((dict(data), step))
        return self.forward(data, step=step, **kw)


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """The real wandb (skipped where it is not installed: CI does not install it), offline, its
    files under a temporary WANDB_DIR; yields the module with no run active."""
    wandb = pytest.importorskip(
        "wandb",
        reason="wandb is not installed (CI does not install it; pip install 'noether-dyn[wandb]' "
        "runs WandbSink against the real library)",
    )
    for key, value in {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path / "wandb"),
        "WANDB_SILENT": "true",
        "WANDB_DISABLE_GIT": "true",
        "WANDB_CONSOLE": "off",
    }.items():
        monkeypatch.setenv(key, value)
    (tmp_path / "wandb").mkdir()
    yield wandb
    if wandb.run is not None:
        wandb.run.finish()


def test_wandb_sink_against_the_real_library_offline(offline_wandb, tmp_path, monkeypatch):
    """The default WandbSink() logs to the real active run; every call reaches the real
    ``Run.log`` (a spy forwards it) with the store's float64 values, and the run's own summary
    (its public record of the latest value of every key) holds the store's last values."""
    wandb = offline_wandb
    run = wandb.init(project="noether-dyn-test", dir=str(tmp_path / "wandb"), mode="offline")
    spy = LogSpy(run.log)
    monkeypatch.setattr(run, "log", spy)  # on this run object only; forwards to the real log
    sink = WandbSink()
    assert sink.run is run and sink.run is wandb.run
    _train(tmp_path / "run", [sink])
    stored = nd.load_run(tmp_path / "run")
    want = _expected(stored)
    assert [step for _, step in spy.calls] == list(range(STEPS))
    for data, step in spy.calls:
        assert data == {tag: v for tag, pts in want.items() for s, v in pts if s == step}
    # W&B commits a step's row when a later step arrives: one more step commits the last one.
    run.log({"test/end": 1.0}, step=STEPS)
    summary = {key: run.summary[key] for key in run.summary.keys()}
    for tag, points in want.items():
        assert summary[tag] == points[-1][1], tag  # exact: float64 in, float64 recorded
    assert summary["_step"] == STEPS - 1  # the sink's last row is committed; test/end is not
    assert "test/end" not in summary
    run.finish()
    assert list((tmp_path / "wandb").rglob("run-*.wandb")), "no offline run file was written"


def test_wandb_step_metric_with_the_real_library(offline_wandb, tmp_path, monkeypatch):
    """``step_metric=`` uses the real ``define_metric`` and logs without ``step=``."""
    wandb = offline_wandb
    run = wandb.init(project="noether-dyn-test", dir=str(tmp_path / "wandb"), mode="offline")
    spy = LogSpy(run.log)
    monkeypatch.setattr(run, "log", spy)
    sink = WandbSink(step_metric="noether/step", charge_columns="charge")
    sink.write(4, {"noether/loss": 0.25})
    sink.write(5, {"noether/loss": 0.125})
    assert spy.calls == [
        ({"noether/step": 4, "noether/loss": 0.25}, None),
        ({"noether/step": 5, "noether/loss": 0.125}, None),
    ]
    run.log({"test/end": 1.0})  # commits the last row (no step=: W&B's own counter)
    assert run.summary["noether/loss"] == 0.125 and run.summary["noether/step"] == 5
    run.finish()


class Failing(Recorder):
    def __init__(self, fail_at_flush: int) -> None:
        super().__init__()
        self.fail_at_flush, self.calls = fail_at_flush, 0

    def flush(self):
        super().flush()
        if len(self.flushes) == self.fail_at_flush:
            raise OSError("disk full")


def test_a_failing_sink_warns_once_is_dropped_and_training_goes_on(tmp_path):
    bad, good = Failing(fail_at_flush=1), Recorder()
    with pytest.warns(SinkFailure, match="Failing failed while writing .*disk full") as caught:
        _train(tmp_path / "run", [bad, good])
    assert len([w for w in caught if w.category is SinkFailure]) == 1
    assert bad.flushes == [3] and not bad.closed  # never called again, not even close()
    assert good.flushes == [3, 6, 7]
    assert list(nd.load_run(tmp_path / "run").steps["step"]) == list(range(STEPS))


def test_a_sink_failing_on_close_warns_and_the_store_closes(tmp_path):
    class BadClose(Recorder):
        def close(self):
            raise RuntimeError("gone")

    with pytest.warns(SinkFailure, match="while closing"):
        _train(tmp_path / "run", [BadClose()], steps=2)
    assert len(nd.load_run(tmp_path / "run").steps) == 2


def test_every_logs_only_the_logged_steps(tmp_path):
    rec = Recorder()
    _train(tmp_path / "run", [rec], steps=6, every=2)
    assert [s for s, _ in rec.rows] == [0, 2, 4]


def test_a_bad_sink_is_refused_before_a_store_exists(tmp_path):
    with pytest.raises(TypeError, match="sinks: int is not a sink"):
        _train(tmp_path / "run", [3])
    with pytest.raises(TypeError, match="sinks must be a list"):
        _train(tmp_path / "run", "tb")
    assert not (tmp_path / "run").exists()


def test_a_summary_writer_of_yours_is_flushed_not_closed(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "tb"))
    _train(tmp_path / "run", [writer], steps=2)
    writer.add_scalar("mine", 1.0, 0)  # still open
    writer.close()
    tb = _read_tb(tmp_path / "tb")
    assert tb["mine"] == [(0, 1.0)] and len(tb["noether/loss"]) == 2


def test_scalar_rows_tags_order_and_nan():
    names = ["a", "b"]
    steps = np.full((2, len(STEP_COLUMNS)), np.nan)
    steps[:, STEP_COLUMNS.index("step")] = [4, 2]
    steps[:, STEP_COLUMNS.index("kinetic")] = [0.5, np.inf]
    charges = np.full((1, 2, len(CHARGE_COLUMNS)), np.nan)
    charges[0, 1, CHARGE_COLUMNS.index("charge")] = -1.5
    rows = scalar_rows(steps, np.array([4]), charges, names)
    assert rows == [
        (2, {"noether/kinetic": math.inf}),
        (4, {"noether/kinetic": 0.5, "noether/charge/b": -1.5}),
    ]


def test_an_empty_sink_set_does_nothing():
    SinkSet(None, []).emit(np.zeros((0, len(STEP_COLUMNS))), np.zeros(0), np.zeros((0, 0, 0)))


def test_export_tensorboard_replays_the_run(trained, tmp_path):
    root, run, *_ = trained
    out = tmp_path / "tb-export"
    for _ in range(2):  # the second export replaces the first's event file
        cmd = ["export", str(root / "run"), "--format", "tensorboard", "-o", str(out)]
        proc = subprocess.run(
            [sys.executable, "-m", "noether_dyn.cli", *cmd],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr
    events = list(out.glob("events.out.tfevents.*"))
    assert len(events) == 1 and proc.stdout.strip() == str(events[0])
    _assert_tb_equals_run(out, run)


def test_export_tensorboard_equals_the_live_stream(trained, tmp_path):
    """Replay and live streaming give the same tags, steps and values."""
    from noether_dyn.export import export_run

    root, run, *_ = trained
    export_run(run, tmp_path / "replay", format="tensorboard")
    assert _read_tb(tmp_path / "replay") == _read_tb(root / "tb")


def test_lightning_callback_forwards_sinks(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from noether_dyn.integrations.lightning import NoetherCallback

    class Lit(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(
        torch.randn(32, 6, generator=g), torch.randint(0, 4, (32,), generator=g)
    )
    head = nd.Symmetry("translation:head", "translation", ("net.2.weight", "net.2.bias"))
    rec = Recorder()
    callback = NoetherCallback(tmp_path / "run", symmetries=[head], sinks=[rec])
    trainer = pl.Trainer(max_steps=4, callbacks=[callback], accelerator="cpu", devices=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)  # fmt: skip
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(Lit(), torch.utils.data.DataLoader(data, batch_size=8))
    run = nd.load_run(tmp_path / "run")
    assert [s for s, _ in rec.rows] == list(range(4)) and rec.closed
    for (step, scalars), loss in zip(rec.rows, run.steps["loss"]):
        assert scalars["noether/loss"] == loss
        assert scalars["noether/charge/translation:head"] == float(
            run.charge("translation:head").loc[step, "charge"]
        )


def test_charge_columns_limit_what_a_sink_receives(trained, tmp_path):
    """Two sinks with different selections, fed from one SinkSet, each get exactly theirs."""
    root, run, *_ = trained
    few = TensorBoardSink(tmp_path / "few", charge_columns=("charge", "ksb"))
    all_of_them, wandb_run = Recorder(), FakeWandbRun()
    from noether_dyn.export import replay

    replay(run, [few, all_of_them, WandbSink(wandb_run, charge_columns="charge")])
    names = list(run.symmetries["symmetry"])
    tb = _read_tb(tmp_path / "few")
    charge_tags = {t for t in tb if t.count("/") == 2}
    assert charge_tags == {f"noether/{c}/{n}" for c in ("charge", "ksb") for n in names}
    assert all(len(tb[f"noether/{c}"]) == STEPS for c in ("kinetic", "lr"))
    logged = {k for d, _ in wandb_run.logged for k in d if k.count("/") == 2}
    assert logged == {f"noether/charge/{n}" for n in names}
    assert any(k.startswith("noether/decay/") for _, d in all_of_them.rows for k in d)


def test_an_unknown_charge_column_is_named():
    with pytest.raises(ValueError, match=r"unknown column\(s\) \['charges'\]; choose from charge"):
        WandbSink(FakeWandbRun(), charge_columns=["charges"])


def test_a_writer_with_add_scalar_only_gets_one_call_per_scalar(trained):
    """Any writer with add_scalar works (the per-tag path), with the exact float64 values."""
    _, run, recorder, *_ = trained

    class Writer:
        def __init__(self) -> None:
            self.calls: list[tuple[str, float, int]] = []

        def add_scalar(self, tag, value, global_step=None):
            self.calls.append((tag, value, global_step))

        def flush(self):
            pass

    writer = Writer()
    from noether_dyn.export import replay

    replay(run, [writer])
    want = [(tag, v, step) for step, d in recorder.rows for tag, v in d.items()]
    assert writer.calls == want


def test_importing_the_package_imports_neither_tensorboard_nor_wandb():
    code = (
        "import sys, noether_dyn, noether_dyn.sinks; noether_dyn.watch\n"
        "names = ('tensorboard', 'torch.utils.tensorboard', 'wandb')\n"
        "bad = [m for m in names if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_a_tensorboard_sink_that_never_writes_leaves_no_file(tmp_path):
    """As on a rank other than 0: the sink is made and closed, nothing is streamed."""
    sinks = SinkSet([TensorBoardSink(tmp_path / "tb")], ["a"])
    sinks.close()
    assert not (tmp_path / "tb").exists()


def test_tensorboard_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match=r"noether-dyn\[tensorboard\]"):
        TensorBoardSink("tb")


def test_export_tensorboard_without_tensorboard_names_the_extra(trained, monkeypatch, tmp_path):
    from noether_dyn.export import export_run

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ValueError, match=r"noether-dyn\[tensorboard\]"):
        export_run(trained[1], tmp_path / "out", format="tensorboard")


def test_replay_raises_a_sinks_error(trained):
    from noether_dyn.export import replay

    with warnings.catch_warnings():
        warnings.simplefilter("error", SinkFailure)  # raised as itself, not as a warning
        with pytest.raises(OSError, match="disk full"):
            replay(trained[0] / "run", [Failing(fail_at_flush=1)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_streaming_adds_no_sync_between_flushes_on_cuda(tmp_path):
    """Steps between flushes run under sync_debug_mode("error") with a TensorBoard sink
    attached; the sink sees nothing until the flush, then every step."""
    torch.manual_seed(0)
    device = torch.device("cuda")
    model, x, y = _model()
    model, x, y = model.to(device), x.to(device), y.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rec = Recorder()
    scale = nd.Symmetry("scale:0", "scale", ("0.weight", "0.bias"))
    mon = nd.watch(model, opt, tmp_path / "run", symmetries=[scale], flush_every=10_000,
                   flush_seconds=3600, sinks=[rec, TensorBoardSink(tmp_path / "tb")])  # fmt: skip

    def step():
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        mon.log_loss(loss)
        opt.step()

    step()  # the first step allocates the optimizer's state (its own syncs)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert rec.rows == []
    mon.close()
    assert [s for s, _ in rec.rows] == list(range(6))
    _assert_tb_equals_run(tmp_path / "tb", nd.load_run(tmp_path / "run"))
