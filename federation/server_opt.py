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

Every parameter of the state (LoRA factors at ``r_max`` and the head) is stepped, slots that
nobody trained included (their ``delta`` is zero and their momentum decays), as in FedOpt.
The optimizer's state is an :class:`OptimizerState`, checkpointed with every round so that a
resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from legend.federation.adapters import AdapterState, Key
from legend.federation.errors import FederationInputError
from legend.federation.job import SERVER_OPTIMIZERS

__all__ = [
    "SERVER_OPTIMIZERS",
    "OptimizerState",
    "ServerOptimizer",
    "ServerOptimizerError",
]


class ServerOptimizerError(FederationInputError):
    """Bad server optimizer settings or a state that does not fit the global adapter."""


@dataclass(frozen=True, kw_only=True)
class OptimizerState:
    """Moments of a server optimizer: ``m`` (and ``v`` for Adam) shaped like the global state."""

    step: int
    m: AdapterState | None = None
    v: AdapterState | None = None

    def save(self, directory: str | os.PathLike[str], stem: str) -> dict[str, object]:
        """Write the moments next to a checkpoint; returns the JSON entry that names them."""
        directory = Path(directory)
        entry: dict[str, object] = {"step": self.step}
        for name in ("m", "v"):
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
            for name in ("m", "v")
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
    """

    kind: str = "none"
    lr: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

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
    ) -> tuple[AdapterState, OptimizerState | None]:
        """The new global state and optimizer state after one round.

        ``previous`` is the global state the round started from, ``aggregate`` what the
        aggregation rule returned; neither is modified.
        """
        if self.kind == "none":
            return aggregate, None
        t = (state.step if state is not None else 0) + 1
        m_prev = state.m if state is not None else None
        delta = _zip(lambda a, p: a.astype(np.float64) - p, aggregate, previous)
        b1, lr = self.beta1, self.lr
        if self.kind == "momentum":
            m = _zip(lambda d, mp: d if mp is None else b1 * mp + d, delta, m_prev)
            new = _zip(lambda p, mm: (p + lr * mm).astype(np.float32), previous, m)
            return new, OptimizerState(step=t, m=_as32(m))
        b2, tau = self.beta2, self.tau
        v_prev = state.v if state is not None else None
        m = _zip(lambda d, mp: (1 - b1) * d + (0 if mp is None else b1 * mp), delta, m_prev)
        v = _zip(lambda d, vp: (1 - b2) * d * d + (0 if vp is None else b2 * vp), delta, v_prev)
        c1, c2 = 1 - b1**t, 1 - b2**t
        new = _zip(
            lambda p, mm, vv: (p + lr * (mm / c1) / (np.sqrt(vv / c2) + tau)).astype(np.float32),
            previous,
            m,
            v,
        )
        return new, OptimizerState(step=t, m=_as32(m), v=_as32(v))


def _as32(state: AdapterState) -> AdapterState:
    return _zip(lambda x: np.asarray(x, dtype=np.float32), state)
