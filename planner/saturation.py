r"""The saturating progress of a round: a rank slot buys less with every device that trains it.

The additive progress model values a plan by ``sum_i n_i sum_l g_l phi(r_il)``: ten devices
training a layer buy ten times what one buys. Under a normalising server optimizer
(FedAdam) the global model's step on a slot has about the server rate's size whoever trained
it, and more devices can only make its direction better, so a slot's value may saturate
after a few devices. The saturating model values a plan by

.. math::

    P = \bar n \sum_{l, k} G_{lk} \, H(c_{lk}), \qquad
    c_{lk} = \sum_{i \text{ trains slot } k \text{ of layer } l} n_i / \bar n,

``G_lk = g_l (phi(r_k) - phi(r_{k-1}))`` the gain of slot group ``k`` of layer ``l`` (the
ranks of the grid ``r_1 < r_2 < ...``; a device at rank ``r_k`` trains groups ``1..k``),
``c_lk`` how many mean-sized devices (``n_bar``, the mean sample count of the devices
planned) train it, and ``H`` the *coverage response*: concave, non-decreasing,
piecewise linear, ``H(c) = c`` up to its first breakpoint, flat beyond its last.
With ``H(c) = c`` it is the additive model. ``H`` comes from a measured response stored
with the model preset (:mod:`legend.models.priors`, ``coverage_response``; none is stored
yet: docs/planner.md says why) or the ``saturation`` option. ``benchmarks/attribution.py``
measures the response of a finished run (``coverage.csv``).

In the MILP (:mod:`legend.planner.formulation`) ``H`` is a sum of segments
``z_lks in [0, w_s]`` with slopes ``a_1 > a_2 > ...`` and one row per slot,
``sum_s z_lks <= c_lk``: since the slopes fall the program fills them in order, so the
linear program is exact for a concave ``H`` without binaries.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from legend.planner.errors import PlannerInputError

__all__ = [
    "Saturation",
    "column_slots",
    "plan_progress",
    "saturation_curve",
    "slot_gains",
]


@dataclass(frozen=True)
class Saturation:
    """``H`` as segments: ``widths[s]`` (mean-sized devices) at ``slopes[s]`` (falling)."""

    widths: np.ndarray
    slopes: np.ndarray

    def __call__(self, coverage: np.ndarray | float) -> np.ndarray:
        c = np.asarray(coverage, dtype=float)
        out = np.zeros_like(c)
        left = c.copy()
        for w, a in zip(self.widths, self.slopes, strict=True):
            take = np.clip(left, 0.0, w)
            out = out + a * take
            left = left - take
        return out

    @property
    def saturates_at(self) -> float:
        """Coverage beyond which a slot buys nothing more."""
        return float(self.widths.sum())


def saturation_curve(points: Sequence[tuple[float, float]]) -> Saturation:
    """``H`` from measured points ``(c, h)``: the least concave majorant of ``(0, 0)`` and
    the points, cut where it stops rising, scaled so that its first slope is 1.

    Raises :class:`PlannerInputError` when no point has ``c > 0`` and ``h > 0``.
    """
    pts = sorted((float(c), float(h)) for c, h in points if math.isfinite(c) and math.isfinite(h))
    pts = [(c, h) for c, h in pts if c > 0]
    if not any(h > 0 for _, h in pts):
        raise PlannerInputError(
            f"the coverage response needs a point with coverage > 0 and response > 0, got "
            f"{list(points)}"
        )
    hull: list[tuple[float, float]] = [(0.0, 0.0)]
    for c, h in pts:
        if c <= hull[-1][0]:
            if h > hull[-1][1] and len(hull) > 1:
                hull[-1] = (c, h)
            else:
                continue
        else:
            hull.append((c, h))
        # keep the chain concave: drop a middle point under the chord of its neighbours
        while len(hull) >= 3:
            (x0, y0), (x1, y1), (x2, y2) = hull[-3:]
            if (y1 - y0) * (x2 - x0) <= (y2 - y0) * (x1 - x0):
                del hull[-2]
            else:
                break
    xs = np.asarray([c for c, _ in hull])
    ys = np.asarray([h for _, h in hull])
    widths = np.diff(xs)
    slopes = np.diff(ys) / widths
    rising = slopes > 1e-12 * max(1.0, float(slopes.max()))
    # a concave chain falls in slope: once flat or falling it stays so
    n = int(np.argmin(rising)) if not rising.all() else len(slopes)
    widths, slopes = widths[:n], slopes[:n]
    return Saturation(widths=widths, slopes=slopes / slopes[0])


def slot_gains(layer_weights: Sequence[float], rank_gains: Sequence[float]) -> np.ndarray:
    """``G[l, k] = g_l (phi(r_k) - phi(r_{k-1}))`` with ``phi(r_0) = 0``."""
    phi = np.asarray(rank_gains, dtype=float)
    steps = np.diff(np.concatenate(([0.0], phi)))
    return np.outer(np.asarray(layer_weights, dtype=float), steps)


def column_slots(
    ranks: Sequence[Sequence[int]], num_layers: int, grid: Sequence[int]
) -> np.ndarray:
    """``A[j, l * K + k] = 1`` when column ``j`` (ranks from its lowest layer up to the output
    layer) trains slot group ``k`` of layer ``l``."""
    g = np.asarray(grid, dtype=np.int64)
    K = len(g)
    out = np.zeros((len(ranks), num_layers * K))
    for j, vec in enumerate(ranks):
        first = num_layers - len(vec)
        for offset, r in enumerate(vec):
            layer = first + offset
            out[j, layer * K : layer * K + K] = (g <= int(r)).astype(float)
    return out


def plan_progress(
    configs: Sequence[tuple[tuple[int, ...], tuple[int, ...]]],
    samples: Sequence[float],
    gains: np.ndarray,
    grid: Sequence[int],
    curve: Saturation,
) -> float:
    """``P`` of per-device configurations ``(layers, ranks)`` (``((), ())``: out), with
    ``n_bar`` the mean of ``samples`` (every device of the problem, taking part or not)."""
    L, K = gains.shape
    n = np.asarray(samples, dtype=float)
    if not len(n):
        return 0.0
    n_bar = float(n.mean())
    if n_bar <= 0:
        return 0.0
    # by the layers each device trains (a baseline's need not be a top block)
    g = np.asarray(grid, dtype=np.int64)
    cover = np.zeros((L, K))
    for (layers, ranks), n_i in zip(configs, n, strict=True):
        for layer, r in zip(layers, ranks, strict=True):
            cover[layer] += (g <= int(r)) * (n_i / n_bar)
    return n_bar * float((gains * curve(cover)).sum())
