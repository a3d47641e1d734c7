"""Aggregation rules for heterogeneous LoRA: pure functions over numpy adapter states.

The server keeps one global LoRA pair per ``(layer, module)`` at rank ``r_max``; device
``i`` trains the first ``r_il`` slots of the layers in its plan and returns a
:class:`~legend.federation.adapters.ClientUpdate`. Every rule here has the signature::

    rule(global_state: AdapterState, updates: Sequence[ClientUpdate]) -> AdapterState

returns a new global state at the same ranks (inputs are never modified), and keeps the
previous global value of every layer that no update trained. Updates must have passed
:func:`~legend.federation.adapters.check_update` (the round core leaves out those that do
not); a rule still refuses updates that do not fit the global state (unknown keys, a rank
above ``r_max``, wrong dimensions, non-finite values) with :class:`AggregationInputError`.

"Exact" below means: the aggregate's ``B @ A`` equals the sample-weighted average of the
clients' ``B_i @ A_i`` (each client's product over the slots it trained). For the rules
that keep untrained slots (slot-wise, HetLoRA, FFA) the comparison is over the slots the
clients trained; a slot nobody trained keeps its previous value and adds its previous
product. Averaging ``A`` and ``B`` separately is not exact in general, since
``mean(B) @ mean(A) != mean(B @ A)``.

Weights are ``num_samples`` normalised over the updates that hold the ``(layer, module)``
in question (so a layer trained by few devices is averaged among those devices). The head
is averaged the same way in every rule (FedAvg over the updates that carry each head weight).
Sums run in float64 and results are stored as float32. See ``docs/aggregation.md``.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence

import numpy as np

from legend.federation.adapters import AdapterState, ClientUpdate, Key
from legend.federation.errors import FederationInputError

__all__ = [
    "AGGREGATORS",
    "DEFAULT_AGGREGATOR",
    "AggregationInputError",
    "Aggregator",
    "aggregate_ffa",
    "aggregate_flexlora",
    "aggregate_hetlora",
    "aggregate_slotwise",
    "get_aggregator",
]

Aggregator = Callable[[AdapterState, Sequence[ClientUpdate]], AdapterState]
_Holders = list[tuple[float, np.ndarray, np.ndarray]]
_Pair = tuple[np.ndarray, np.ndarray]


class AggregationInputError(FederationInputError):
    """Updates that cannot be aggregated into the global state, or an unknown rule name."""


# -- shared helpers ---------------------------------------------------------------------


def _check_fits(global_state: AdapterState, updates: Sequence[ClientUpdate]) -> None:
    """Refuse updates that do not fit the global state (structure and finiteness)."""
    problems: list[str] = []
    seen: set[str] = set()
    for update in updates:
        who = f"device {update.device_id!r}"
        if update.device_id in seen:
            problems.append(f"{who}: more than one update in the round")
        seen.add(update.device_id)
        for key, (a, b) in update.state.factors.items():
            where = f"{who}: layer {key[0]} `{key[1]}`"
            if key not in global_state.factors:
                problems.append(f"{where}: not in the global state")
                continue
            ga, gb = global_state.factors[key]
            r = a.shape[0]
            if b.shape[1] != r or r < 1 or r > ga.shape[0]:
                problems.append(
                    f"{where}: A {a.shape} and B {b.shape} need a common rank in 1..{ga.shape[0]}"
                )
            elif a.shape[1] != ga.shape[1] or b.shape[0] != gb.shape[0]:
                problems.append(
                    f"{where}: A {a.shape} and B {b.shape} do not match the global "
                    f"A {ga.shape} and B {gb.shape}"
                )
            if not (np.isfinite(a).all() and np.isfinite(b).all()):
                problems.append(f"{where}: non-finite values")
        for name, value in update.state.head.items():
            if name not in global_state.head:
                problems.append(f"{who}: head weight {name!r} is not in the global state")
            elif value.shape != global_state.head[name].shape:
                problems.append(
                    f"{who}: head weight {name!r} has shape {value.shape}, "
                    f"expected {global_state.head[name].shape}"
                )
            elif not np.isfinite(value).all():
                problems.append(f"{who}: head weight {name!r} has non-finite values")
    if problems:
        raise AggregationInputError(
            "updates do not fit the global adapter state (run check_update first and leave "
            "out the updates it flags):\n  " + "\n  ".join(problems)
        )


def _holders(key: Key, updates: Sequence[ClientUpdate]) -> _Holders:
    """``(num_samples, A, B)`` of every update that trained ``key``, in update order."""
    return [
        (float(u.num_samples), *u.state.factors[key]) for u in updates if key in u.state.factors
    ]


def _fedavg_head(
    global_state: AdapterState, updates: Sequence[ClientUpdate]
) -> dict[str, np.ndarray]:
    """Sample-weighted mean of each head weight over the updates that carry it."""
    head: dict[str, np.ndarray] = {}
    for name, previous in global_state.head.items():
        total = np.zeros(previous.shape, dtype=np.float64)
        weight = 0.0
        for u in updates:
            if name in u.state.head:
                total += u.num_samples * u.state.head[name].astype(np.float64)
                weight += u.num_samples
        head[name] = (total / weight).astype(np.float32) if weight > 0 else previous.copy()
    return head


def _slot_average(
    previous: np.ndarray, parts: Sequence[tuple[float, np.ndarray]], axis: int
) -> np.ndarray:
    """Average rank slots along ``axis`` over the parts that hold each slot; keep the rest.

    ``parts`` are ``(weight, factor)`` with the factor's rank (its size along ``axis``) at
    most ``previous``'s; slot ``k`` is averaged over the parts with rank ``> k``.
    """
    total = np.zeros(previous.shape, dtype=np.float64)
    weight = np.zeros(previous.shape[axis], dtype=np.float64)
    for w, factor in parts:
        r = factor.shape[axis]
        index = (slice(0, r), slice(None)) if axis == 0 else (slice(None), slice(0, r))
        total[index] += w * factor.astype(np.float64)
        weight[:r] += w
    shape = (-1, 1) if axis == 0 else (1, -1)
    trained = (weight > 0).reshape(shape)
    mean = total / np.where(trained, weight.reshape(shape), 1.0)
    return np.where(trained, mean, previous).astype(np.float32)


def _padded_sum(
    previous: np.ndarray, parts: Sequence[tuple[float, np.ndarray]], axis: int
) -> np.ndarray:
    """``sum_i w_i pad(factor_i)`` with zero padding to ``previous``'s rank along ``axis``;
    slots no part holds keep ``previous``. The weights must already sum to one."""
    total = np.zeros(previous.shape, dtype=np.float64)
    held = 0
    for w, factor in parts:
        r = factor.shape[axis]
        index = (slice(0, r), slice(None)) if axis == 0 else (slice(None), slice(0, r))
        total[index] += w * factor.astype(np.float64)
        held = max(held, r)
    out = previous.copy()
    if axis == 0:
        out[:held, :] = total[:held, :]
    else:
        out[:, :held] = total[:, :held]
    return out.astype(np.float32)


def _per_module(
    global_state: AdapterState,
    updates: Sequence[ClientUpdate],
    combine: Callable[[Key, np.ndarray, np.ndarray, _Holders], _Pair],
) -> AdapterState:
    """Apply a rule's ``combine(key, A, B, holders)`` to every trained ``(layer, module)``.

    Checks the updates first; a module nobody trained keeps its previous value, and the head
    is averaged with :func:`_fedavg_head`.
    """
    _check_fits(global_state, updates)
    factors: dict[Key, tuple[np.ndarray, np.ndarray]] = {}
    for key, (ga, gb) in global_state.factors.items():
        holders = _holders(key, updates)
        factors[key] = combine(key, ga, gb, holders) if holders else (ga.copy(), gb.copy())
    return AdapterState(factors=factors, head=_fedavg_head(global_state, updates))


# -- the rules --------------------------------------------------------------------------


def aggregate_slotwise(global_state: AdapterState, updates: Sequence[ClientUpdate]) -> AdapterState:
    """Rank-slot-wise FedAvg (the default rule).

    For each ``(layer, module)`` and rank slot ``k``, ``A[k, :]`` and ``B[:, k]`` become the
    sample-weighted mean of the clients that trained slot ``k`` of that module::

        A[k] = sum_{i: r_i > k} n_i A_i[k] / sum_{i: r_i > k} n_i     (B[:, k] likewise)

    Layers or slots that nobody trained keep their previous global value. With a uniform
    plan (every client the same layers and ranks) this is plain FedAvg of ``A`` and ``B``.

    Exactness: **not exact**. ``A`` and ``B`` are averaged separately, so ``B @ A`` is not
    the weighted mean of ``B_i @ A_i`` unless the clients agree on ``A`` (or on ``B``) in
    every shared slot; identical updates aggregate to themselves.
    """

    def combine(key: Key, ga: np.ndarray, gb: np.ndarray, holders: _Holders) -> _Pair:
        a = _slot_average(ga, [(n, a_i) for n, a_i, _ in holders], axis=0)
        b = _slot_average(gb, [(n, b_i) for n, _, b_i in holders], axis=1)
        return a, b

    return _per_module(global_state, updates, combine)


def _product_fro_norm(a: np.ndarray, b: np.ndarray) -> float:
    """``||B @ A||_F`` through ``r x r`` Gram matrices: ``trace((B^T B)(A A^T))``."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    value = float(np.sum((b64.T @ b64) * (a64 @ a64.T)))
    return float(np.sqrt(max(value, 0.0)))


def aggregate_hetlora(global_state: AdapterState, updates: Sequence[ClientUpdate]) -> AdapterState:
    """HetLoRA-style (after Cho et al. 2024): zero-padding with norm-based weights.

    Every client's factors are zero-padded to ``r_max`` and averaged with, per
    ``(layer, module)``, weights proportional to the Frobenius norm of the client's update
    ``||B_i A_i||_F`` times its samples::

        p_i = n_i ||B_i A_i||_F / sum_j n_j ||B_j A_j||_F
        A = sum_i p_i pad(A_i),   B = sum_i p_i pad(B_i)

    so a slot trained by few clients shrinks toward zero, and clients with larger updates
    count more. The norm is computed from ``r x r`` Gram matrices (no dense product). When
    every norm is zero (e.g. ``B = 0`` everywhere), the weights fall back to ``n_i``.
    Slots beyond every client's rank, and layers nobody trained, keep their previous value.

    This is legend's variant of the paper's sparsity-weighted aggregation, which weights a
    client by ``||B_i A_i||_F`` alone: legend also multiplies by the samples (every rule
    here is sample-weighted) and takes the norm per module. With equal ``n_i`` the weights
    are the paper's.

    Exactness: **not exact** (separate averaging of zero-padded ``A`` and ``B``).
    """

    def combine(key: Key, ga: np.ndarray, gb: np.ndarray, holders: _Holders) -> _Pair:
        raw = np.array([n * _product_fro_norm(a_i, b_i) for n, a_i, b_i in holders])
        if not raw.sum() > 0:
            raw = np.array([n for n, _, _ in holders])
        weights = raw / raw.sum()
        a = _padded_sum(
            ga, [(w, a_i) for w, (_, a_i, _) in zip(weights, holders, strict=True)], axis=0
        )
        b = _padded_sum(
            gb, [(w, b_i) for w, (_, _, b_i) in zip(weights, holders, strict=True)], axis=1
        )
        return a, b

    return _per_module(global_state, updates, combine)


def _low_rank_sum(
    parts: Sequence[tuple[float, np.ndarray, np.ndarray]], rank: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Truncated SVD of ``sum_i w_i B_i A_i`` from stacked factors, never forming it.

    ``B_cat = [w_1 B_1, ..., w_n B_n] = Q_B R_B`` and ``A_cat^T = [A_1; ...; A_n]^T = Q_A R_A``,
    so ``B_cat A_cat = Q_B (R_B R_A^T) Q_A^T``; the SVD ``R_B R_A^T = U S V^T`` of the small
    core (at most ``sum r_i`` square) gives the SVD of the sum. Returns
    ``(Q_B U_k, S_k, V_k^T Q_A^T)`` for ``k = min(rank, size of the core)``. Memory is
    ``O((out + in) sum r_i)``.
    """
    b_cat = np.concatenate([w * b.astype(np.float64) for w, _, b in parts], axis=1)
    a_cat = np.concatenate([a.astype(np.float64) for _, a, _ in parts], axis=0)
    q_b, r_b = np.linalg.qr(b_cat, mode="reduced")  # out x k1, k1 x R
    q_a, r_a = np.linalg.qr(a_cat.T, mode="reduced")  # in x k2, k2 x R
    u, s, vt = np.linalg.svd(r_b @ r_a.T, full_matrices=False)
    k = min(rank, s.shape[0])
    return q_b @ u[:, :k], s[:k], vt[:k, :] @ q_a.T


def _live_rows(previous: np.ndarray, live: np.ndarray, seed: int) -> np.ndarray:
    """Rows for the slots past the numerical rank of FlexLoRA's sum: the previous rows.

    A previous row that is numerically zero could never learn again (its ``B`` column is
    zero too), so it is replaced by a unit row orthogonal to ``live`` (the orthonormal rows
    of the kept right singular vectors) and to the other replacement rows, drawn with a
    fixed ``seed``: the same inputs give the same global state.
    """
    out = previous.astype(np.float64, copy=True)
    dead = np.linalg.norm(out, axis=1) <= _DEAD_ROW_NORM
    if not dead.any():
        return out
    rng = np.random.default_rng(seed)
    basis = live.astype(np.float64)
    for slot in np.flatnonzero(dead):
        row: np.ndarray = rng.normal(size=(out.shape[1],))
        for _ in range(2):  # two Gram-Schmidt passes keep it orthogonal in float64
            row -= basis.T @ (basis @ row)
        row /= np.linalg.norm(row)
        out[slot] = row
        basis = np.vstack([basis, row])
    return out


_DEAD_ROW_NORM = 1e-12
_RANK_RTOL = 1e-6
"""Singular values below this fraction of the largest count as zero in ``flexlora``."""


def aggregate_flexlora(global_state: AdapterState, updates: Sequence[ClientUpdate]) -> AdapterState:
    """FlexLoRA (Bai et al. 2024): truncated SVD of the weighted sum of the clients' products.

    Per ``(layer, module)``, with ``w_i = n_i / sum_j n_j`` over the clients that trained it::

        Delta = sum_i w_i B_i A_i = U S V^T,   B = U_k sqrt(S_k),   A = sqrt(S_k) V_k^T

    with ``k = min(r_max, numerical rank of Delta)`` (singular values split evenly between
    the factors; a singular value below ``1e-6`` times the largest counts as zero).
    ``Delta`` is never formed: the SVD comes from QR factorisations of the stacked factors
    ``[w_1 B_1, ..., w_n B_n]`` and ``[A_1; ...; A_n]^T`` and an SVD of the small
    ``R_B R_A^T`` core, so memory and time grow with ``(out + in) * sum r_i``, not
    ``out * in``. The whole layer is replaced (the clients' products define it).

    The slots ``k..r_max`` (the sum has rank below ``r_max``, e.g. ``sum_i r_i < r_max`` or
    clients that agree) get ``B = 0`` and keep the previous ``A`` rows, like a fresh LoRA
    initialisation: they add nothing to ``B @ A`` but their ``B`` columns receive gradient,
    so a device of higher rank can still train them. A previous row that is numerically
    zero is replaced by a unit row orthogonal to the kept directions. Layers nobody trained
    keep their previous value.

    Exactness: **exact** (up to float rounding) when ``sum_i r_i <= r_max`` (more generally
    when the rank of ``Delta`` is at most ``r_max``); otherwise ``B @ A`` is the best rank
    ``r_max`` approximation of ``Delta`` in Frobenius and spectral norm (Eckart-Young).
    """

    def combine(key: Key, ga: np.ndarray, gb: np.ndarray, holders: _Holders) -> _Pair:
        held = sum(n for n, _, _ in holders)
        parts = [(n / held, a_i, b_i) for n, a_i, b_i in holders]
        left, s, right = _low_rank_sum(parts, ga.shape[0])
        k = int(np.count_nonzero(s > _RANK_RTOL * s[0])) if s.size and s[0] > 0 else 0
        root = np.sqrt(s[:k])
        a = np.empty(ga.shape, dtype=np.float64)
        a[:k, :] = root[:, None] * right[:k]
        a[k:, :] = _live_rows(ga[k:], right[:k], seed=zlib.crc32(repr(key).encode()))
        b = np.zeros(gb.shape, dtype=np.float64)
        b[:, :k] = left[:, :k] * root[None, :]
        return a.astype(np.float32), b.astype(np.float32)

    return _per_module(global_state, updates, combine)


def aggregate_ffa(global_state: AdapterState, updates: Sequence[ClientUpdate]) -> AdapterState:
    """FFA-LoRA (Sun et al. 2024): ``A`` frozen at its global value, ``B`` averaged slot-wise.

    Devices train only ``B`` (``freeze_a=True`` when the model is built). The rule keeps the
    global ``A`` and **ignores** the ``A`` the clients send; call
    :func:`~legend.federation.adapters.check_update` with ``frozen_a=True`` to flag a client
    whose ``A`` changed. ``B[:, k]`` is the sample-weighted mean over the clients that trained
    slot ``k``; untrained slots and layers keep their previous value.

    Exactness: **exact** when every client that trained a ``(layer, module)`` used the same
    rank for it (then ``B @ A = sum_i w_i B_i A``, since ``A`` is shared). With mixed ranks a
    slot is averaged over its own trainers only, which weighs a high-rank client's extra
    slots more than the zero-padded average would; the product is then not exact.
    """

    def combine(key: Key, ga: np.ndarray, gb: np.ndarray, holders: _Holders) -> _Pair:
        return ga.copy(), _slot_average(gb, [(n, b_i) for n, _, b_i in holders], axis=1)

    return _per_module(global_state, updates, combine)


AGGREGATORS: dict[str, Aggregator] = {
    "slotwise": aggregate_slotwise,
    "hetlora": aggregate_hetlora,
    "flexlora": aggregate_flexlora,
    "ffa": aggregate_ffa,
}
"""Aggregation rules by name; every one has the signature of :data:`Aggregator`."""

DEFAULT_AGGREGATOR = "slotwise"


def get_aggregator(name: str) -> Aggregator:
    """The rule registered under ``name`` in :data:`AGGREGATORS`."""
    try:
        return AGGREGATORS[name]
    except KeyError:
        raise AggregationInputError(
            f"`aggregation` {name!r} is unknown; expected one of {sorted(AGGREGATORS)}"
        ) from None
