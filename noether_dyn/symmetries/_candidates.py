"""Candidate symmetries proposed from a recorded dataflow (a ``_trace.Flow``). Proposing is
cheap and generous: nothing is reported before the numerical check of
:mod:`noether_dyn.symmetries.engine`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from noether_dyn.symmetries._trace import Flow


@dataclass(frozen=True)
class Candidate:
    """A proposed symmetry: generator signs per tensor and why it was proposed."""

    name: str
    kind: str
    params: tuple[str, ...]
    signs: tuple[float, ...]
    why: str
    family: str = ""
    """Candidates of one family (the scale of one layer: all its tensors, its weights, each
    tensor; its translation: all its tensors, its biases, each tensor) are alternatives, proposed
    largest first: the first one verified is reported, the others are dropped, so a layer has at
    most one record per kind (:mod:`noether_dyn.symmetries.engine`)."""


def propose(flow: Flow) -> list[Candidate]:
    """Every candidate the flow suggests (see the module docstring), unique by generator."""
    found: dict[tuple, Candidate] = {}
    units = flow.units

    def add(
        name: str,
        kind: str,
        plus: Sequence[str],
        minus: Sequence[str],
        why: str,
        family: str = "",
    ) -> None:
        coef: dict[str, int] = {}
        for n in plus:
            coef[n] = coef.get(n, 0) + 1
        for n in minus:
            coef[n] = coef.get(n, 0) - 1
        if any(abs(v) > 1 for v in coef.values()):
            return
        coef = {n: v for n, v in coef.items() if v}
        if not coef:
            return
        params = tuple(coef)
        signs = tuple(float(coef[n]) for n in params)
        if kind != "translation":  # compensating terms may cancel: the signs say the kind
            kind = "scale" if all(s > 0 for s in signs) else "rescale"
            name = kind + name[name.index(":") :]
        key = (kind == "translation", tuple(sorted(coef.items())))
        # one name per candidate, but for the alternatives of one layer's translation, which all
        # report as translation:<layer> (at most one of them is kept)
        taken = any(c.name == name and not (family and c.family == family) for c in found.values())
        if key in found or taken:
            return
        found[key] = Candidate(name, kind, params, signs, why, family)

    for path, u in units.items():
        family = f"scale:{path}"
        add(family, "scale", u.params, (), f"{path} alone", family)
        if u.gains != u.params and u.gains:
            add(f"{family}:weight", "scale", u.gains, (), f"the weight of {path} alone", family)
        if len(u.params) > 1:  # e.g. the direction of a weight-normalized layer
            for n in u.params:
                add(f"scale:{n}", "scale", (n,), (), f"{n} alone", family)
        # layer level: one translation:<layer>, on the largest set of its tensors that shifts
        # symmetrically, proposed largest first: the weight and bias together (a softmax head,
        # Kunin et al., §3), its biases alone (before a mean-centering norm: BatchNorm in train
        # mode removes a per-channel constant, not W -> W + c 1; a weight-normalized head), each
        # tensor alone (a weight reading a zero-sum input). The split into columns and bias is
        # the per-unit granularity (symmetries/units.py).
        shift = f"translation:{path}"
        add(shift, "translation", u.params, (), f"all of {path} shifted", shift)
        biases = tuple(n for n in u.params if n not in u.gains)
        if biases and u.gains:
            add(shift, "translation", biases, (), f"the bias of {path} shifted alone", shift)
        if len(u.params) > 1:
            for n in u.params:
                add(shift, "translation", (n,), (), f"{n} shifted alone", shift)
    for src, readers in flow.consumers.items():
        if src.startswith("stream:") or src not in units:
            continue
        gains = [n for r in readers for n in units[r].gains]
        add(
            f"rescale:{src}", "rescale", units[src].params, gains,
            f"the output of {src} feeds {', '.join(readers)}",
        )  # fmt: skip
        if len(readers) > 1:
            for dst in readers:
                add(
                    f"rescale:{src}>{dst}", "rescale", units[src].params, units[dst].gains,
                    f"{dst} reads the output of {src}",
                )  # fmt: skip
    for a, b in sorted(flow.meets):
        if a in units and b in units:
            why = f"the outputs of {a} and {b} meet in a product"
            add(f"rescale:{a}~{b}", "rescale", units[a].params, units[b].params, why)
            add(f"rescale:{a}~{b}:weight", "rescale", units[a].gains, units[b].gains, why)
    last_norm = flow.norms[-1] if flow.norms else None
    for stream in flow.streams:
        writers = [w for w in stream.writers if w in units]
        if len(writers) < 2:
            continue
        plus = [n for w in writers for n in units[w].params]
        name = f"scale:stream@{writers[0]}"
        why = f"the sum of {', '.join(writers)}"
        add(name, "scale", plus, (), why)
        if last_norm is not None and last_norm not in writers:
            add(
                f"rescale:stream@{writers[0]}>{last_norm}", "rescale", plus,
                units[last_norm].params, f"{why}, with {last_norm} compensating",
            )  # fmt: skip
        others = [r for r in dict.fromkeys(stream.readers) if r in units and not units[r].norm]
        if others:
            add(
                f"rescale:stream@{writers[0]}>*", "rescale", plus,
                [n for r in others for n in units[r].gains],
                f"{why}, with its readers {', '.join(others)} compensating",
            )  # fmt: skip
    return list(found.values())
