"""Measured priors of the progress model, stored with the model presets.

The planner's ``progress`` objective (docs/planner.md, "The progress model") values a
configuration by how much of a round's learning it carries: a gain per layer ``g_l`` and
a response per rank ``phi(r)``. A federated run estimates both from its own updates every
round; before the first round it starts from the prior stored here, which was *measured*
by ``benchmarks/progress_prior.py`` (one local fine-tuning of every layer at the largest
rank on the model's default data, read off the update it produced) and never set by hand.

``progress_priors.json`` maps a model preset's name to

``layer_gains``
    one non-negative number per layer (input to output), normalised to mean 1;
``rank_response``
    ``{rank: phi(rank)}`` over the measured rank grid, non-decreasing, ``phi(r_max) = 1``;
``source``
    how and on what it was measured (the command that reproduces it);
``coverage_response`` (optional)
    ``{"sizes": [...], "response": [...], "source": ...}``: how the loss decrease a
    round's server step buys on the global model grows with the number of mean-sized
    devices that train a rank slot (``benchmarks/attribution.py`` measures it from a
    finished run's ``coverage.csv``; the planner's
    saturating progress model, :mod:`legend.planner.saturation`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cache
from importlib import resources
from itertools import pairwise
from typing import Any

from legend.models.errors import ModelInputError

__all__ = ["ProgressPrior", "interpolate_response", "progress_prior"]

PRIORS_FILE = "progress_priors.json"


@dataclass(frozen=True, kw_only=True)
class ProgressPrior:
    """A measured prior: per-layer gains and the rank response (see the module docstring)."""

    model: str
    layer_gains: tuple[float, ...]
    rank_response: tuple[tuple[int, float], ...]
    source: str = ""
    # (mean-sized devices, relative decrease) points of the coverage response, if measured
    coverage_response: tuple[tuple[float, float], ...] | None = None

    def response_at(self, ranks: tuple[int, ...]) -> tuple[float, ...]:
        """``phi(r)`` at each rank of ``ranks`` (interpolated in ``log r`` between the
        measured ranks, held at the ends)."""
        return interpolate_response(self.rank_response, ranks)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "layer_gains": list(self.layer_gains),
            "rank_response": {str(r): v for r, v in self.rank_response},
            "source": self.source,
        }
        if self.coverage_response is not None:
            out["coverage_response"] = {
                "sizes": [c for c, _ in self.coverage_response],
                "response": [h for _, h in self.coverage_response],
            }
        return out


def interpolate_response(
    points: tuple[tuple[int, float], ...], ranks: tuple[int, ...]
) -> tuple[float, ...]:
    """Piecewise-linear interpolation of ``phi`` in ``log r`` (constant beyond the ends)."""
    xs = [math.log(r) for r, _ in points]
    ys = [v for _, v in points]
    out = []
    for r in ranks:
        x = math.log(r)
        if x <= xs[0]:
            out.append(ys[0])
        elif x >= xs[-1]:
            out.append(ys[-1])
        else:
            k = next(i for i in range(1, len(xs)) if xs[i] >= x)
            f = (x - xs[k - 1]) / (xs[k] - xs[k - 1])
            out.append(ys[k - 1] + f * (ys[k] - ys[k - 1]))
    return tuple(out)


def _parse(model: str, raw: Any) -> ProgressPrior:
    where = f"{PRIORS_FILE} entry {model!r}"
    try:
        gains = tuple(float(v) for v in raw["layer_gains"])
        response = tuple(sorted((int(r), float(v)) for r, v in raw["rank_response"].items()))
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelInputError(
            f"{where} is malformed ({exc}); rerun benchmarks/progress_prior.py"
        ) from exc
    if not gains or any(not (math.isfinite(g) and g >= 0) for g in gains):
        raise ModelInputError(f"{where}: `layer_gains` must be finite and >= 0, got {gains}")
    values = [v for _, v in response]
    if not response or any(not (math.isfinite(v) and v > 0) for v in values):
        raise ModelInputError(f"{where}: `rank_response` must be finite and > 0, got {values}")
    if any(b < a - 1e-12 for a, b in pairwise(values)):
        raise ModelInputError(f"{where}: `rank_response` must not decrease, got {values}")
    coverage = None
    if raw.get("coverage_response") is not None:
        try:
            cr = raw["coverage_response"]
            coverage = tuple(
                (float(c), float(h)) for c, h in zip(cr["sizes"], cr["response"], strict=True)
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelInputError(
                f"{where}: `coverage_response` is malformed ({exc}); it needs lists "
                "`sizes` and `response` of equal length"
            ) from exc
        if not coverage or any(
            not (math.isfinite(c) and c > 0 and math.isfinite(h)) for c, h in coverage
        ):
            raise ModelInputError(
                f"{where}: `coverage_response` needs finite sizes > 0 and finite responses, "
                f"got {list(coverage)}"
            )
    return ProgressPrior(
        model=model,
        layer_gains=gains,
        rank_response=response,
        source=str(raw.get("source", "")),
        coverage_response=coverage,
    )


@cache
def _all() -> dict[str, Any]:
    text = resources.files("legend.models").joinpath(PRIORS_FILE).read_text(encoding="utf-8")
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ModelInputError(f"{PRIORS_FILE} must hold an object keyed by model name")
    return data


def progress_prior(model: str, num_layers: int | None = None) -> ProgressPrior | None:
    """The measured prior of ``model`` (a preset name), or ``None`` if none was measured.

    ``num_layers`` (when given) must match the prior's layer count, so a prior is never
    applied to a model of another shape.
    """
    raw = _all().get(model)
    if raw is None:
        return None
    prior = _parse(model, raw)
    if num_layers is not None and len(prior.layer_gains) != num_layers:
        raise ModelInputError(
            f"{PRIORS_FILE} entry {model!r} has {len(prior.layer_gains)} layer gains; the "
            f"model has {num_layers} layers. Rerun benchmarks/progress_prior.py for it"
        )
    return prior
