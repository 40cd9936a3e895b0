"""The formulas the report shows, each built once with :mod:`noether_dyn.report.mathml` and
cited where it comes from (THEORY.md sections; Tanaka & Kunin 2021 NLD, Kunin et al. 2021 NM,
Wan et al. 2021 SMD, Kosson et al. 2024 RE)."""

from __future__ import annotations

from noether_dyn.report.mathml import frac, m, paren, sqrt, sub, sup, words

Q_N = sub("Q", "n")
Q_NEXT = sub("Q", "n+1")
ETA_EFF = sub("η", "eff")
RHO_EFF = sub("ρ", "eff")

SPLIT = m(Q_NEXT, " − ", Q_N, " = ", words("decay + rule + ksb"))
"""Exact per-step split of a charge's change (docs/theory.md §3.1; NLD)."""

DECAY_TERM = m(words("decay"), " = −2 η λ ", Q_N)
KSB_TERM = m(words("ksb"), " = ", sup(m("|", sub("dq", "n"), "|"), "2"))

SGD_RECURSION = m(
    Q_NEXT,
    " = ",
    sup(paren("1 − η λ"), "2"),
    " ",
    Q_N,
    " + ",
    sup("η", "2"),
    " ",
    sup(m("|", sub("g", "A"), "|"), "2"),
)
"""Exact recursion of a scale charge under SGD without momentum (docs/theory.md §3.2)."""

MOMENTUM_ODE = m("Q″ + 2 γ Q′ + ", sup("ω", "2"), " Q = 2 ", sup(m("|", sub("q′", "A"), "|"), "2"))
"""Damped-oscillator prediction with momentum (docs/theory.md §3.3; NM)."""

MOMENTUM_RECURSION = m(
    Q_NEXT,
    " = (1 + ρ − 2 c) ",
    Q_N,
    " − ρ ",
    sub("Q", "n−1"),
    " + ",
    sup(m("|", sub("dq", "n"), "|"), "2"),
    " + ρ ",
    sup(m("|", sub("dq", "n−1"), "|"), "2"),
)
"""Exact two-step recurrence of a scale charge under SGD with momentum (docs/theory.md §3.2b):
rho = beta eta_n / eta_{n-1}, c = (1 - d) eta lambda."""

FLOW = m("Q(t) = ", sup("e", "−2 λ t"), " Q(0)")
"""What gradient flow conserves, up to weight decay (docs/theory.md §3; NM)."""

RELATIVE_RESIDUAL = m(
    words("relative residual"),
    " = ",
    frac(
        m(sub("Q", words("measured")), " − ", sub("Q", words("predicted"))),
        m("max(|", sub("Q", words("predicted")), "|, |", sub("Q", "0"), "|)"),
    ),
)

LAGRANGIAN = m(
    "L = ",
    sup("e", m("t/τ")),
    " (T − V),  T = ",
    frac("m", "2"),
    " ",
    sup("q′", "T"),
    " G q′,  m = ",
    frac(m("η (1 + β)"), "2"),
    ",  τ = ",
    frac("m", "1 − β"),
)
"""The Lagrangian of a learning rule (docs/theory.md §2; NLD)."""

POTENTIAL = m("V = ", words("loss"), " + ", frac("λ", "2"), " ", sup("|q|", "2"))

EFFECTIVE_RATE = m(ETA_EFF, " = ", frac("η", m(paren("1 − β"), " ", sup("r", "2"))))
"""Effective rate of a normalized layer's direction under SGD(M) (docs/theory.md §4; NLD §4)."""

IMPLIED_DECAY = m(RHO_EFF, " = 1 − ", frac("4 η λ", "1 − β"))
"""Per-step decay of the implied r⁴ accumulator (docs/theory.md §4; NLD §4)."""

ANGLE_SGD = m("θ* = ", sqrt(frac("2 η λ", "1 + β")))
"""Equilibrium angular update per step, SGD(M) with L2 decay (Wan et al. 2021 SMD)."""

ANGLE_ADAMW = m("θ* = ", sqrt(frac(m("2 η λ (1 − ", sub("β", "1"), ")"), m("1 + ", sub("β", "1")))))
"""Equilibrium angular update per step, AdamW (Kosson et al. 2024 RE)."""

RADIUS_NOISE = m(sup("r*", "4"), " = ", frac(m("η E", sup("|ĝ|", "2")), m("2 λ (1 − β)")))
"""Noise-dominated equilibrium norm (SMD, RE)."""
