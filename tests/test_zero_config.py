"""Zero-config ``watch(model, optimizer, run_dir)``: no sample batch, no loss function.

The model's first real forward call is the sample; the symmetries are detected at the first
optimizer step (before its update) with the model's own ``output.loss``, checked on that step's
real gradients and tracked from there. On tiny Hugging Face models built from configs (random
weights, train mode: dropout on) the tracked set must equal the hand-derived truth of
tests/test_symmetries_hf.py (recall and precision), every tracked symmetry's defect on the first
real step must obey the drop rule, and the training must be bit-identical to the same loop without
the monitor (detection disturbs no gradient, buffer, RNG state or mode).
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import noether_dyn as nd
from noether_dyn.capture.sample import FirstForward, as_inputs, detect_at_step
from noether_dyn.symmetries.engine import EPS_TOL, clear_cache
from noether_dyn.symmetries.verify import DEFAULT_TOL
from tests.conftest import batch, bn_mlp
from tests.test_symmetries_hf import (
    bert,
    bert_truth,
    gpt2,
    gpt2_truth,
    key_of,
    llama,
    llama_truth,
    resnet,
    resnet_truth,
)

pytest.importorskip("transformers")

STEPS = 3
TOL32 = DEFAULT_TOL[torch.float32]
"""An exact symmetry's defect on float32 training gradients is rounding only (verify.py: at
most 2e-7 measured, tolerance 1e-5); an eps-approximate one is at most EPS_TOL."""

HF = {
    "llama": (lambda: llama(False), lambda: llama_truth(False)),
    "gpt2-dropout": (lambda: gpt2(True), lambda: gpt2_truth(True)),
    "bert": (bert, bert_truth),
    "resnet": (resnet, resnet_truth),
}


def _train(model: nn.Module, inputs: dict, monitor_dir=None, steps: int = STEPS):
    """``steps`` AdamW steps on the model's own loss, seeded (dropout masks), optionally with the
    one-line zero-config monitor; returns the monitor (closed) or None."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    torch.manual_seed(123)
    mon = nd.watch(model, opt, monitor_dir) if monitor_dir is not None else None
    for _ in range(steps):
        opt.zero_grad()
        out = model(**inputs)
        out.loss.backward()
        if mon is not None:
            mon.log_loss(out.loss)
        opt.step()
    if mon is not None:
        mon.close()
    return mon


@pytest.fixture(scope="module", params=list(HF))
def zero_config_run(request, tmp_path_factory):
    build, truth = HF[request.param]
    torch.manual_seed(0)
    model, inputs = build()
    model.train()
    twin = copy.deepcopy(model)
    clear_cache()
    run_dir = tmp_path_factory.mktemp(request.param) / "run"
    _train(model, inputs, run_dir)
    _train(twin, inputs)
    return request.param, model, twin, nd.load_run(run_dir), *truth()


def test_tracks_exactly_the_hand_derived_symmetries(zero_config_run) -> None:
    name, _, _, run, truth, _ = zero_config_run
    tracked = {key_of(s): s for s in _symmetries(run)}
    missing = [sorted(k[1]) for k in truth if k not in tracked]
    extra = [s.name for k, s in tracked.items() if k not in truth]
    assert not missing, f"{name}: not tracked {missing}"
    assert not extra, f"{name}: tracked beyond the hand-derived truth: {extra}"
    for k, s in tracked.items():
        assert s.exactness == truth[k], f"{name}: {s.name} is {truth[k]}, got {s.exactness}"
    assert run.meta["symmetries_from_step"] == 0


def test_every_tracked_symmetry_passes_the_rule_on_the_first_real_step(zero_config_run) -> None:
    name, _, _, run, _, broken = zero_config_run
    for s in _symmetries(run):
        limit = TOL32 if s.exactness == "exact" else EPS_TOL
        assert s.verified is True and s.defect <= limit, f"{name}: {s.name} defect {s.defect}"
    dropped = {key_of(s) for s in _symmetries(run, run.dropped)}
    for k in broken:  # the negative controls never reach the charges
        assert k not in {key_of(s) for s in _symmetries(run)}
    assert run.dropped["rule"].str.len().gt(0).all()
    assert dropped, f"{name}: candidates were dropped but none is listed"


def test_charges_are_stored_for_every_tracked_symmetry_from_the_first_step(
    zero_config_run,
) -> None:
    _, _, _, run, _, _ = zero_config_run
    charges = run.charges
    assert set(charges["symmetry"]) == set(run.symmetries["symmetry"])
    assert sorted(set(charges["step"])) == list(range(STEPS))
    assert np.isfinite(run.steps["loss"]).all()


def test_training_is_bit_identical_with_and_without_the_monitor(zero_config_run) -> None:
    name, model, twin, _, _, _ = zero_config_run
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.equal(p, q), f"{name}: parameter {n} differs after {STEPS} steps"
    for (n, b), (_, c) in zip(model.named_buffers(), twin.named_buffers()):
        assert torch.equal(b, c), f"{name}: buffer {n} differs after {STEPS} steps"


def _symmetries(run, frame=None) -> list[nd.Symmetry]:
    frame = run.symmetries if frame is None else frame
    out = []
    for r in frame.itertuples():
        verified = getattr(r, "verified", None)
        defect = None if r.defect != r.defect else float(r.defect)
        out.append(
            nd.Symmetry(
                r.symmetry, r.kind, tuple(r.params), tuple(r.signs),
                verified=None if verified is None else bool(verified), defect=defect,
                exactness=getattr(r, "exactness", ""),
            )
        )  # fmt: skip
    return out


# ------------------------------------------------------------- detection disturbs nothing


class _Net(nn.Module):
    """Dropout (RNG), BatchNorm (buffers), an eval-mode submodule (modes) and a keyword."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.bn, self.drop = nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Dropout(0.2)
        self.fc2 = nn.Linear(16, 4)
        self.frozen_mode = nn.Dropout(0.5).eval()

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        h = self.drop(torch.relu(self.bn(self.fc1(x))))
        return self.fc2(self.frozen_mode(h)) * scale


def test_detection_leaves_grads_buffers_rng_and_modes_as_they_were() -> None:
    torch.manual_seed(0)
    model = _Net()
    x, y = batch(dtype=torch.float32)
    F.cross_entropy(model(x), y).backward()
    names, params = zip(*model.named_parameters())
    grads = [p.grad for p in params]
    grad_values = [g.clone() for g in grads]
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    modes = {n: m.training for n, m in model.named_modules()}
    rng = torch.get_rng_state()
    seen = []  # a user's forward hook: detection's passes are not training forwards
    model.fc1.register_forward_hook(lambda *_: seen.append(1))
    clear_cache()
    found = detect_at_step(model, x, list(names), list(params))
    assert not seen and len(model.fc1._forward_hooks) == 1
    assert found.symmetries, "the net has symmetries to find"
    assert all(p.grad is g for p, g in zip(params, grads))
    assert all(torch.equal(p.grad, v) for p, v in zip(params, grad_values))
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert torch.equal(torch.get_rng_state(), rng)


def test_first_forward_keeps_positional_keyword_and_mixed_calls() -> None:
    model = _Net()
    x = torch.randn(4, 6)
    sample = FirstForward(model)
    with torch.no_grad():
        model(x * 3)  # an evaluation pass is not the sample
    assert sample.inputs is None
    model(x)
    model(x * 2)  # later calls are not kept: the hook removed itself
    assert sample.inputs is x and not model._forward_pre_hooks
    assert as_inputs(model, (x,), {"scale": 2.0}) == {"x": x, "scale": 2.0}
    assert as_inputs(model, (), {"x": x}) == {"x": x}
    assert as_inputs(model, (x, 2.0), {}) == (x, 2.0)


# --------------------------------------------------------------- the rule on real gradients


class _Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 12), nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _loop(model, opt, mon, loss_fn, steps: int = 3) -> None:
    x, y = batch(dtype=torch.float32)
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        mon.log_loss(loss)
        opt.step()


def test_a_candidate_the_real_gradients_break_is_dropped_before_any_row(tmp_path) -> None:
    """Without a loss in the model, the logits translation waits for the training gradients:
    kept under cross-entropy, dropped (with its defect and rule) under a squared error."""
    for loss_fn, kept in ((F.cross_entropy, True), (_mse, False)):
        torch.manual_seed(0)
        model = _Head()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        clear_cache()
        run_dir = tmp_path / f"run-{kept}"
        with nd.watch(model, opt, run_dir) as mon:
            _loop(model, opt, mon, loss_fn)
        run = nd.load_run(run_dir)
        names = set(run.symmetries["symmetry"])
        assert "rescale:fc1" in names and "scale:fc1" not in names
        shift = "translation:fc2"
        assert (shift in names) is kept
        assert set(run.charges["symmetry"]) == names
        if not kept:
            rows = run.dropped[run.dropped["symmetry"] == shift]
            # its other tensors' alternatives are dropped at detection (one record per layer)
            (judged,) = [r for _, r in rows.iterrows() if "training gradients" in r["rule"]]
            assert judged["defect"] > TOL32
        else:
            assert bool(run.symmetries.set_index("symmetry").loc[shift, "verified"])


def _mse(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(logits, F.one_hot(y, 4).float())


def test_closure_training_detects_inside_the_closure_and_tracks_from_the_next_step(
    tmp_path,
) -> None:
    """``step(closure)`` runs the forward after the pre-hook: detection runs when the closure
    returns (real gradients, before the update) and charges start at the next step."""
    torch.manual_seed(0)
    model = _Head()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = batch(dtype=torch.float32)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with nd.watch(model, opt, tmp_path / "run"):
        for _ in range(3):
            opt.step(closure)
    run = nd.load_run(tmp_path / "run")
    assert run.meta["symmetries_from_step"] == 1
    assert {"rescale:fc1", "translation:fc2"} <= set(run.symmetries["symmetry"])
    assert sorted(set(run.charges["step"])) == [1, 2]
    assert run.steps["step"].tolist() == [0, 1, 2] and np.isfinite(run.steps["loss"]).all()
    assert not model._forward_pre_hooks


def test_no_forward_before_the_first_step_warns_and_records_an_event(tmp_path) -> None:
    torch.manual_seed(0)
    model = _Head()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = batch(dtype=torch.float32)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()  # a forward, but before watch(): not seen
    mon = nd.watch(model, opt, tmp_path / "run")
    with pytest.warns(UserWarning, match="saw no forward call of the model"):
        opt.step()
    mon.close()
    run = nd.load_run(tmp_path / "run")
    assert len(run.symmetries) == 0 and run.meta["symmetries_from_step"] == 0
    assert "no_symmetries" in set(run.events["kind"])
    assert not model._forward_pre_hooks


def test_a_child_called_instead_of_the_model_is_the_sample(tmp_path) -> None:
    """A wrapper whose training step calls ``wrapper.net(x)``: detection runs on ``net`` and
    the symmetries carry the wrapper's parameter names."""
    torch.manual_seed(0)
    wrapper = nn.Module()
    wrapper.net = _Head()
    opt = torch.optim.SGD(wrapper.parameters(), lr=0.1)
    with nd.watch(wrapper, opt, tmp_path / "run") as mon:
        _loop(wrapper.net, opt, mon, F.cross_entropy)
    run = nd.load_run(tmp_path / "run")
    assert {"rescale:net.fc1", "translation:net.fc2"} <= set(run.symmetries["symmetry"])
    assert "child 'net'" in run.meta["symmetry_note"]
    assert set(run.charges["symmetry"]) == set(run.symmetries["symmetry"])


def test_empty_symmetries_means_no_detection(tmp_path) -> None:
    model = _Head()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with nd.watch(model, opt, tmp_path / "run", symmetries=[]) as mon:
        assert not model._forward_pre_hooks
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _loop(model, opt, mon, F.cross_entropy)
    run = nd.load_run(tmp_path / "run")
    assert len(run.symmetries) == 0 and "symmetries_from_step" not in run.meta


def test_a_resumed_zero_config_run_tracks_the_stored_symmetries(tmp_path) -> None:
    torch.manual_seed(0)
    model = bn_mlp(dtype=torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with nd.watch(model, opt, tmp_path / "run") as mon:
        _loop(model, opt, mon, F.cross_entropy, steps=2)
        state = mon.state_dict()
    first = list(nd.load_run(tmp_path / "run").symmetries["symmetry"])
    assert first
    with nd.watch(model, opt, tmp_path / "run", resume=True) as mon:
        assert [s.name for s in mon.symmetries] == first and mon.step == state["step"]
        _loop(model, opt, mon, F.cross_entropy, steps=2)
    run = nd.load_run(tmp_path / "run")
    assert sorted(set(run.charges["step"])) == [0, 1, 2, 3]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the CUDA RNG state)")
def test_bit_identical_on_cuda_with_dropout(tmp_path) -> None:
    """Dropout on CUDA draws from the CUDA generator: detection must fork it too."""
    torch.manual_seed(0)
    model, inputs = gpt2(True)
    model = model.cuda().train()
    inputs = {k: v.cuda() for k, v in inputs.items()}
    twin = copy.deepcopy(model)
    clear_cache()
    _train(model, inputs, tmp_path / "run")
    _train(twin, inputs)
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.equal(p, q), f"parameter {n} differs after {STEPS} steps"
    assert len(nd.load_run(tmp_path / "run").symmetries) > 0
