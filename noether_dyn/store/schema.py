"""The run store's schema, version 2: one SQLite file, ``<run_dir>/run.sqlite``.

Tables (all numbers float64 unless said; a step is the 0-based count of optimizer steps; row n
holds quantities at the parameters *before* update n and the kinetic energy *of* update n):

``meta(key TEXT PRIMARY KEY, value TEXT)``
    JSON values: ``schema_version``, ``noether_dyn_version``, ``torch_version``, ``started``
    (ISO 8601, UTC), ``command``, ``model`` (summary), ``parameters`` (name, shape, group),
    ``optimizer`` (class, adapter, metric, ``metric_fallback``, param-group hyperparameters),
    ``every``, ``monitor_state`` (what a resume continues from), ``block_generation`` (written
    by the store: how many times stored blocks were rewritten).
``steps(step INTEGER PRIMARY KEY, ...)``
    ``time`` (t_n = sum of the rates of steps before n), ``lr`` (group 0), ``loss`` (the logged
    loss, NaN when none), ``l2`` (coupled weight-decay term sum (lambda/2)|q|^2), ``potential``
    (loss + l2), ``kinetic`` (T of update n summed over groups), ``log_prefactor`` (t/tau, group
    0), ``param_norm``, ``grad_norm``, ``update_norm`` (Euclidean norms over all parameters),
    ``wall_time`` (seconds since the run started).
``groups(step, grp, lr, momentum, weight_decay, mass, kinetic, l2, log_prefactor)``
    the same per param group.
``symmetries(idx INTEGER PRIMARY KEY, symmetry TEXT UNIQUE, kind, params, signs, verified,
defect, note, exactness)``
    ``params`` and ``signs`` are JSON lists; ``verified`` is 1, 0 or NULL (not checked);
    ``exactness`` is ``"exact"``, ``"approximate"`` (broken only by a normalization's eps) or
    ``""`` (not verified; version-1 stores: NULL, read as ``""``).
    Optional columns (:data:`UNIT_COLUMNS`, added without a version bump; a store without them
    reads ``""`` and ``[]``): ``parent``, the layer-level symmetry a per-unit one refines
    (``""`` for a layer-level one), and ``slices``, a JSON list with one ``null`` (whole
    tensor) or ``[dim, index]`` per parameter (``[]``: every tensor whole).
``dropped(idx INTEGER PRIMARY KEY, symmetry, kind, params, signs, defect, rule)``
    (version 2) the detected candidates that were not tracked: ``defect`` (NULL when the
    gradient vanished) and the ``rule`` that dropped them.
``charge_blocks(first_step INTEGER PRIMARY KEY, n_steps, steps BLOB, data BLOB)``
    per flush, the charge table of ``n_steps`` logged steps as raw little-endian arrays: ``steps``
    int64 of shape (n_steps,), ``data`` float64 of shape (n_steps, n_symmetries, n_columns), the
    columns being :data:`CHARGE_COLUMNS` and the symmetries ordered by ``idx``. ``load_run``
    turns these into the long table ``run.charges``.
``tensor_blocks(first_step INTEGER PRIMARY KEY, n_steps, steps BLOB, data BLOB)``
    the same per parameter tensor (ordered as ``meta["parameters"]``), columns
    :data:`TENSOR_COLUMNS`: ``sq_norm`` |q|^2, ``grad_sq`` |g|^2, ``update_sq`` |dq|^2,
    ``metric_update_sq`` dq^T G dq, ``inv_metric`` the mean of 1/G_ii over the tensor (1 for G = I),
    so that lr * inv_metric is the tensor's mean per-coordinate rate eta/G_ii (for Adam and
    RMSprop, eta/(sqrt(v)+eps)). ``load_run`` turns these into ``run.tensors``.
``events(step, kind, message)``
    things a reader must know: non-finite values, resumes, fallbacks.
``depth_profile(step, layer, sigma_max, sigma_min, defect, transmission, stability, h_max,
max_real)``
    optional: per-layer depth diagnostics (``noether_dyn.depth.profile``) recorded with
    ``Monitor.log_depth_profile``; empty for most runs. ``h_max`` (largest stable step) and
    ``max_real`` (max Re lambda, 1/time) are ``noether_dyn.depth.stability``'s (version 2;
    NaN when not given).

``matrix_charges(step, symmetry, i, j, charge, first_order, kinetic, decay)``
    optional, created by the first flush of a run watched with ``matrix_charges=`` (absent
    otherwise; a store without it reads as before, with no schema version change): per logged
    step n, GL record (named as in ``meta["matrix_symmetries"]``) and upper-triangle entry
    i <= j, the entry of ``C_n = L_n L_n^T - R_n R_n^T`` and of the exact split
    ``C_{n+1} - C_n = first_order + kinetic``; ``decay`` is ``-2 eta lambda C_n``: weight
    decay's whole part of ``first_order`` for SGD without momentum and for decoupled decay,
    the instantaneous term only under SGD with momentum, NaN under a preconditioner with
    coupled L2 (per param group in ``meta["matrix_decay"]``; ``noether_dyn.capture.matrix``).

Version-1 stores are read as version 2 with the new columns empty (NaN / ``""``) and no
dropped candidates; a resumed version-1 store is migrated in place (:data:`MIGRATION_V2`).
"""

from __future__ import annotations

from noether_dyn.records import CHARGE_COLUMNS, GROUP_COLUMNS, STEP_COLUMNS, TENSOR_COLUMNS

SCHEMA_VERSION = 2
"""2: the charge table gained ``predicted_ode`` (12 columns); 11-column blocks (version 1, and
the blocks a migrated version-1 store kept) are still read, with ``predicted_ode`` NaN."""
LEGACY_CHARGE_COLUMNS = {1: tuple(c for c in CHARGE_COLUMNS if c != "predicted_ode")}
"""The charge columns of older schema versions, by version."""
STORE_FILENAME = "run.sqlite"
# meta key (an integer, absent until the first rewrite): how many times stored blocks were
# rewritten (truncated or replaced), so that a reader holding a block index sees it is stale.
GENERATION_KEY = "block_generation"

__all__ = [
    "CHARGE_COLUMNS",
    "GROUP_COLUMNS",
    "STEP_COLUMNS",
    "TENSOR_COLUMNS",
]

DEPTH_COLUMNS = (
    "step", "layer", "sigma_max", "sigma_min", "defect", "transmission", "stability", "h_max",
    "max_real",
)  # fmt: skip
SYMMETRY_COLUMNS = (
    "symmetry", "kind", "params", "signs", "verified", "defect", "note", "exactness",
    "parent", "slices",
)  # fmt: skip
UNIT_COLUMNS = ("parent TEXT", "slices TEXT")
"""Optional columns of ``symmetries`` for per-unit symmetries (``Symmetry.parent``,
``Symmetry.slices``): in every new store; added to an older one when it first stores a unit."""
DROPPED_COLUMNS = ("symmetry", "kind", "params", "signs", "defect", "rule")
MATRIX_CHARGE_COLUMNS = (
    "step", "symmetry", "i", "j", "charge", "first_order", "kinetic", "decay",
)  # fmt: skip
MATRIX_CHARGE_DDL = """
CREATE TABLE IF NOT EXISTS matrix_charges (
    step INTEGER NOT NULL, symmetry TEXT NOT NULL, i INTEGER NOT NULL, j INTEGER NOT NULL,
    charge REAL, first_order REAL, kinetic REAL, decay REAL,
    PRIMARY KEY (step, symmetry, i, j)
) WITHOUT ROWID
"""
"""The optional table of matrix-valued charges: created by its first write, not by :data:`DDL`
(clustered on its key, ``WITHOUT ROWID``: a third smaller and 1.5x faster to fill, measured on
169k rows of 32 records)."""

DDL = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS steps (
    step INTEGER PRIMARY KEY, {", ".join(c + " REAL" for c in STEP_COLUMNS[1:])}
);
CREATE TABLE IF NOT EXISTS groups (
    step INTEGER NOT NULL, grp INTEGER NOT NULL,
    {", ".join(c + " REAL" for c in GROUP_COLUMNS[2:])},
    PRIMARY KEY (step, grp)
);
CREATE TABLE IF NOT EXISTS symmetries (
    idx INTEGER PRIMARY KEY, symmetry TEXT NOT NULL UNIQUE, kind TEXT NOT NULL,
    params TEXT NOT NULL, signs TEXT NOT NULL, verified INTEGER, defect REAL, note TEXT,
    exactness TEXT, {", ".join(UNIT_COLUMNS)}
);
CREATE TABLE IF NOT EXISTS dropped (
    idx INTEGER PRIMARY KEY, symmetry TEXT NOT NULL, kind TEXT NOT NULL, params TEXT NOT NULL,
    signs TEXT NOT NULL, defect REAL, rule TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS charge_blocks (
    first_step INTEGER PRIMARY KEY, n_steps INTEGER NOT NULL, steps BLOB NOT NULL,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS tensor_blocks (
    first_step INTEGER PRIMARY KEY, n_steps INTEGER NOT NULL, steps BLOB NOT NULL,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS events (step INTEGER, kind TEXT NOT NULL, message TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS depth_profile (
    step INTEGER NOT NULL, layer INTEGER NOT NULL,
    {", ".join(c + " REAL" for c in DEPTH_COLUMNS[2:])},
    PRIMARY KEY (step, layer)
);
PRAGMA user_version = {SCHEMA_VERSION};
"""

MIGRATION_V2 = {
    "symmetries": ("exactness TEXT",),
    "depth_profile": ("h_max REAL", "max_real REAL"),
}
"""Columns a version-1 store lacks, per table (``ALTER TABLE ... ADD COLUMN``); the ``dropped``
table is created by :data:`DDL`'s ``IF NOT EXISTS``."""

BLOCK_TABLES = ("charge_blocks", "tensor_blocks")
REQUIRED_TABLES = frozenset(
    {
        "meta",
        "steps",
        "groups",
        "symmetries",
        "charge_blocks",
        "tensor_blocks",
        "events",
        "depth_profile",
    }
)
