"""Server optimizers over aggregated LoRA states (the FedOpt family): pure numpy, no torch.

After an aggregation rule has turned the round's updates into a new global state, a server
optimizer decides how far the global state actually moves. The difference between the
aggregate and the previous global state is treated as a pseudo-gradient ``delta`` (Reddi et
al., "Adaptive Federated Optimization", ICLR 2021):

* ``none`` (FedAvg): the global state becomes the aggregate.
* ``momentum`` (FedAvgM, Hsu et al. 2019): ``m = beta1 * m + delta``;
  ``x = x_prev + lr * m``.
* ``adam`` (FedAdam): ``m = beta1 * m + (1 - beta1) * delta``,
  ``v = beta2 * v + (1 - beta2) * delta**2`` (both bias-corrected by the number of steps);
  ``x = x_prev + lr * m_hat / (sqrt(v_hat) + tau)``.

Why it matters here: under strong label skew, local AdamW gives a device that holds a single
label an update as large as an informative device's (Adam normalises each parameter's step),
so averaged updates swing toward whichever labels the round sampled. Local SGD keeps each
device's update proportional to what it learned, and server Adam restores the per-parameter
scale invariance once, on the average. ``tau`` bounds the step of parameters whose
pseudo-gradients are tiny.

Which parameters move (``lazy``). With heterogeneous plans a round trains only some layers
and rank slots: a slot beyond every participant's rank, a layer below every participant's
depth. FedOpt as published steps every parameter every round, so a slot nobody trained keeps
moving on its momentum (its ``delta`` is zero). Under Adam that is not a decay but an
amplifier: a slot trained once after quiet rounds has ``|m_hat| ~ sqrt(v_hat)``, a full
``lr`` step in the sign of its delta, and then keeps stepping at ``lr * 0.9^k / 0.995^k``,
about ten such steps in all, from a single round's evidence. With ``lazy = True`` (the
default) the optimizer steps only what the round trained (:func:`trained_slots` of the
accepted updates) and leaves the rest, values and moments, as they are; Adam's bias
correction counts, per parameter, the rounds that trained it (as sparse or "lazy" Adam
does for embeddings). When every participant trains every slot (uniform plans) both
variants are the same optimizer. ``lazy = False`` is the published, dense FedOpt.

The optimizer's state is an :class:`OptimizerState`, checkpointed with every round so that a
resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from legend.federation.adapters import AdapterState, ClientUpdate, Key
from legend.federation.errors import FederationInputError
from legend.federation.job import SERVER_OPTIMIZERS

__all__ = [
    "MOMENTS",
    "SERVER_OPTIMIZERS",
    "OptimizerState",
    "ServerOptimizer",
    "ServerOptimizerError",
    "trained_slots",
]

# the arrays an OptimizerState may hold, each a state shaped like the global adapter
MOMENTS = ("m", "v", "count")


class ServerOptimizerError(FederationInputError):
    """Bad server optimizer settings or a state that does not fit the global adapter."""


@dataclass(frozen=True, kw_only=True)
class OptimizerState:
    """Moments of a server optimizer, shaped like the global state: ``m``, for Adam ``v``,
    and for lazy Adam ``count``, the rounds that trained each parameter (``None``: every
    parameter every round, as in checkpoints of the dense optimizer)."""

    step: int
    m: AdapterState | None = None
    v: AdapterState | None = None
    count: AdapterState | None = None

    def save(self, directory: str | os.PathLike[str], stem: str) -> dict[str, object]:
        """Write the moments next to a checkpoint; returns the JSON entry that names them."""
        directory = Path(directory)
        entry: dict[str, object] = {"step": self.step}
        for name in MOMENTS:
            moment: AdapterState | None = getattr(self, name)
            if moment is not None:
                path = directory / f"{stem}_{name}.npz"
                moment.to_npz(path)
                entry[name] = path.name
        return entry

    @classmethod
    def load(cls, directory: str | os.PathLike[str], entry: object) -> OptimizerState:
        """Read what :meth:`save` wrote (``entry`` is its JSON entry)."""
        if not isinstance(entry, dict) or not isinstance(entry.get("step"), int):
            raise ServerOptimizerError(
                f"server optimizer checkpoint entry {json.dumps(entry)} has no integer `step`"
            )
        directory = Path(directory)
        moments = {
            name: AdapterState.from_npz(directory / str(entry[name]))
            for name in MOMENTS
            if entry.get(name)
        }
        return cls(step=int(entry["step"]), **moments)


Array = np.ndarray


def _zip(fn: Callable[..., Array], x: AdapterState, *others: AdapterState | None) -> AdapterState:
    """``fn(x_arr, *other_arrs)`` for every array of ``x``; a missing state passes ``None``."""

    def factor(state: AdapterState | None, key: Key, i: int) -> Array | None:
        return None if state is None else state.factors[key][i]

    def head(state: AdapterState | None, name: str) -> Array | None:
        return None if state is None else state.head[name]

    return AdapterState(
        factors={
            key: (
                fn(a, *(factor(o, key, 0) for o in others)),
                fn(b, *(factor(o, key, 1) for o in others)),
            )
            for key, (a, b) in x.factors.items()
        },
        head={name: fn(v, *(head(o, name) for o in others)) for name, v in x.head.items()},
    )


def trained_slots(updates: Iterable[ClientUpdate]) -> dict[Key, int]:
    """Per ``(layer, module)``, the largest rank any of ``updates`` trained it at: the rank
    slots ``0 .. r - 1`` of that module moved this round (a module nobody trained is absent)."""
    out: dict[Key, int] = {}
    for update in updates:
        for key, (a, _) in update.state.factors.items():
            out[key] = max(out.get(key, 0), int(a.shape[0]))
    return out


def _mask(like: AdapterState, trained: Mapping[Key, int]) -> AdapterState:
    """1.0 on the parameters of ``like`` the round trained, else 0.0: rows ``:r`` of ``A``,
    columns ``:r`` of ``B`` for ``r = trained[key]``, and the head (every reply carries it)."""
    factors = {}
    for key, (a, b) in like.factors.items():
        r = trained.get(key, 0)
        ma, mb = np.zeros(a.shape), np.zeros(b.shape)
        ma[:r, :] = 1.0
        mb[:, :r] = 1.0
        factors[key] = (ma, mb)
    return AdapterState(factors=factors, head={k: np.ones(v.shape) for k, v in like.head.items()})


@dataclass(frozen=True, kw_only=True)
class ServerOptimizer:
    """How the server moves the global state toward each round's aggregate.

    Parameters
    ----------
    kind
        ``"none"`` (FedAvg, default), ``"momentum"`` (FedAvgM) or ``"adam"`` (FedAdam).
    lr
        Server learning rate (``1.0`` with ``none`` means "take the aggregate").
    beta1, beta2
        Momentum and (Adam) second-moment decay, in ``[0, 1)``.
    tau
        Adam's adaptivity floor, ``> 0``.
    lazy
        Step only the parameters the round trained, and count Adam's bias correction per
        parameter (module docstring); ``False`` steps every parameter every round.
    """

    kind: str = "none"
    lr: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    lazy: bool = True

    def __post_init__(self) -> None:
        if self.kind not in SERVER_OPTIMIZERS:
            raise ServerOptimizerError(
                f"`server_optimizer` must be one of {', '.join(SERVER_OPTIMIZERS)}, "
                f"got {self.kind!r}"
            )
        if not self.lr > 0:
            raise ServerOptimizerError(f"`server_lr` must be > 0, got {self.lr!r}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise ServerOptimizerError(f"`server_{name}` must be in [0, 1), got {value!r}")
        if not self.tau > 0:
            raise ServerOptimizerError(f"`server_tau` must be > 0, got {self.tau!r}")

    def step(
        self,
        previous: AdapterState,
        aggregate: AdapterState,
        state: OptimizerState | None,
        trained: Mapping[Key, int] | None = None,
    ) -> tuple[AdapterState, OptimizerState | None]:
        """The new global state and optimizer state after one round.

        ``previous`` is the global state the round started from, ``aggregate`` what the
        aggregation rule returned; neither is modified. ``trained`` (:func:`trained_slots`
        of the round's accepted updates) says what the round trained; with ``lazy`` only
        that moves. ``None`` means everything was trained.
        """
        if self.kind == "none":
            return aggregate, None
        t = (state.step if state is not None else 0) + 1
        m_prev = state.m if state is not None else None
        mask = _mask(previous, trained) if self.lazy and trained is not None else None
        # 1 where the parameter moves this round (dense: everywhere)
        on = mask if mask is not None else _zip(np.ones_like, previous)
        delta = _zip(lambda a, p: a.astype(np.float64) - p, aggregate, previous)
        b1, lr = self.beta1, self.lr
        if self.kind == "momentum":
            m = _zip(
                lambda d, mp, k: np.where(k > 0, d if mp is None else b1 * mp + d, _or0(mp)),
                delta,
                m_prev,
                on,
            )
            new = _zip(lambda p, mm, k: (p + lr * k * mm).astype(np.float32), previous, m, on)
            return new, OptimizerState(step=t, m=_as32(m))
        b2, tau = self.beta2, self.tau
        v_prev = state.v if state is not None else None
        # per parameter, the rounds that trained it (a dense checkpoint's: all of them)
        if state is not None and state.count is not None:
            count_prev: AdapterState = state.count
        else:
            count_prev = _zip(lambda p: np.full(p.shape, t - 1, dtype=np.float64), previous)
        count = _zip(lambda c, k: c + k, count_prev, on)
        m = _zip(
            lambda d, mp, k: np.where(k > 0, (1 - b1) * d + b1 * _or0(mp), _or0(mp)),
            delta,
            m_prev,
            on,
        )
        v = _zip(
            lambda d, vp, k: np.where(k > 0, (1 - b2) * d * d + b2 * _or0(vp), _or0(vp)),
            delta,
            v_prev,
            on,
        )

        def adam(p: Array, mm: Array, vv: Array, n: Array, k: Array) -> Array:
            n = np.maximum(n, 1.0)  # never trained: m = v = 0 and k = 0, no step
            step = (mm / (1 - b1**n)) / (np.sqrt(vv / (1 - b2**n)) + tau)
            return (p + lr * k * step).astype(np.float32)

        new = _zip(adam, previous, m, v, count, on)
        return new, OptimizerState(
            step=t, m=_as32(m), v=_as32(v), count=_as32(count) if self.lazy else None
        )


def _or0(x: Array | None) -> Array | float:
    return 0.0 if x is None else x


def _as32(state: AdapterState) -> AdapterState:
    return _zip(lambda x: np.asarray(x, dtype=np.float32), state)
