r"""The progress model: what a device's configuration contributes to a round's learning.

The planner's ``progress`` objective (docs/planner.md) values a device ``i`` training the
top layers ``l`` at ranks ``r_l`` by

.. math::

    p_i = n_i \sum_l g_l \, \phi(r_l),

``n_i`` its samples, ``g_l`` a gain per layer and ``\phi`` a response per rank. This module
estimates ``g`` and ``phi`` from the run itself, every round, from the updates the devices
return (docs/planner.md, "The progress model", gives the reasoning):

rank response ``phi``
    What a layer's adapter buys at rank ``r`` relative to the largest rank of the grid: the
    devices' per-layer loss decreases (below) follow ``log d = device + layer + log phi(r)
    + noise``, so ranks are compared within a device and within a layer. A round's records
    give evidence on ``log phi`` (:func:`rank_evidence`: the normal equations of the rank
    effects once the device and layer effects are projected out, scaled by the fit's noise
    variance), which is weak where a plan ties ranks to layers and absent for ranks nobody
    trained. The estimate is the posterior mean of a Gaussian prior centred on the measured
    prior (standard deviation ``rank_prior_sd`` in ``log phi``) and the evidence of the
    rounds so far, older rounds discounted by ``smoothing`` each round; so a rank no longer
    planned drifts back to the prior instead of keeping a noisy value, and a poorly
    identified round moves ``phi`` little. With the LoRA scale held constant a higher rank
    takes larger steps, so this is not the shape of the update. Where no device reported
    decreases, the shape stands in: the singular values ``s_k`` of ``dW = B A - B0 A0`` of
    updates trained at the largest rank give ``phi(r) = sum_{k<=r} s_k^2 / sum_k s_k^2``,
    entered as evidence of one record per rank.
layer gains ``g``
    Each device measures, while it trains, the first-order decrease of its training loss
    that each layer's adapter bought: ``<g_t, theta_t - theta_{t+1}>`` over the layer's LoRA
    factors, per step (``lr ||g_l||^2`` under SGD; :class:`~legend.federation.training.\
LayerDecrease`). Divided by ``phi`` at the rank the device trained (its full-rank
    equivalent), averaged over the devices that trained the layer and normalised to mean 1
    over the layers, it is the round's gain estimate. Where no device reported it (replies
    of an older node), the energy ``||dW||_F^2`` of the returned updates stands in, the same
    way divided by ``phi``.
validation
    The server evaluates the global model on a validation split it holds out of the training
    data (never the test split); the drop of its loss each round is compared with the
    predicted progress of the round's plan: ``loss_per_progress`` (an exponential average of
    the ratio) turns progress into expected loss decrease, and every round records both so
    the prediction can be checked (``legend report run``).

Before the first round the model is the *measured* prior stored with the model preset
(:mod:`legend.models.priors`); each round's layer gains enter by an exponential moving
average of weight ``1 - smoothing``, its rank evidence as described above. Layers no device
trained keep their previous gain.
Everything is deterministic given the updates, and the state round-trips through the run's
checkpoint (:meth:`ProgressModel.to_dict`), so a resumed run plans as an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from legend.federation.adapters import AdapterState, ClientUpdate
from legend.models.priors import ProgressPrior, progress_prior
from legend.models.spec import ModelSpec

__all__ = ["ProgressModel", "RoundSignals", "rank_evidence", "rank_ratios", "update_spectrum"]

# weight of the previous estimate in the exponential moving average of every round
DEFAULT_SMOOTHING = 0.5
# standard deviation of the prior on log phi(r) (a factor of about 1.65 either way)
DEFAULT_RANK_PRIOR_SD = 0.5
# the noise of log decreases assumed before a round's residuals say otherwise, and how many
# records' worth that assumption counts (the residual variance is shrunk towards it)
_NOISE_SD = 0.5
_NOISE_WEIGHT = 2.0
# evidence of the spectral fallback: one record of this noise per rank
_SHARE_SD = 0.5
_EPS = 1e-30


def update_spectrum(a: np.ndarray, b: np.ndarray, a0: np.ndarray, b0: np.ndarray) -> np.ndarray:
    """Singular values of ``B A - B0 A0`` (descending), without forming the matrix.

    ``[B, -B0] [A; A0]``: orthonormalise both factors (QR) and take the SVD of the small
    core ``R_B R_A^T``, of side ``r + r0``.
    """
    left = np.concatenate([b, -b0], axis=1).astype(np.float64)
    right = np.concatenate([a, a0], axis=0).astype(np.float64)
    _, r_b = np.linalg.qr(left)
    _, r_a = np.linalg.qr(right.T)
    return np.linalg.svd(r_b @ r_a.T, compute_uv=False)


@dataclass(frozen=True, kw_only=True)
class RoundSignals:
    """What one round's updates said: per layer the mean full-rank-equivalent energy and
    first-order loss decrease (NaN where no device trained or reported it) and per grid rank
    the energy share (NaN where unobserved)."""

    layer_energy: tuple[float, ...]
    rank_share: tuple[float, ...]
    devices: int
    layer_decrease: tuple[float, ...] = ()
    # per grid rank, the loss decrease a layer trained at that rank bought relative to the
    # largest rank seen (NaN where unseen; empty when the round cannot tell ranks apart)
    rank_decrease: tuple[float, ...] = ()
    # the round's evidence on log phi of the grid ranks but the largest (rank_evidence)
    rank_information: tuple[tuple[float, ...], ...] = ()
    rank_score: tuple[float, ...] = ()

    @property
    def layer_measure(self) -> tuple[float, ...]:
        """What the layer gains are fitted from: the measured loss decreases where the
        devices reported them, otherwise the update energies."""
        return self.layer_decrease or self.layer_energy


def _design(
    records: Sequence[tuple[int, int, int, float]], rank_order: Sequence[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The regression of ``log decrease`` on ``(device, layer, rank, decrease)`` records: the
    device and layer indicators (the first layer as the reference), one indicator per rank
    of ``rank_order`` (ranks not in it are the reference), and ``log decrease``."""
    devices = sorted({i for i, _, _, _ in records})
    layers = sorted({ly for _, ly, _, _ in records})
    dev_col = {i: k for k, i in enumerate(devices)}
    layer_col = {ly: len(devices) + k for k, ly in enumerate(layers[1:])}
    rank_col = {r: k for k, r in enumerate(rank_order)}
    nuisance = np.zeros((len(records), len(devices) + len(layers) - 1))
    x = np.zeros((len(records), len(rank_order)))
    y = np.empty(len(records))
    for row, (i, ly, r, d) in enumerate(records):
        nuisance[row, dev_col[i]] = 1.0
        if ly in layer_col:
            nuisance[row, layer_col[ly]] = 1.0
        if r in rank_col:
            x[row, rank_col[r]] = 1.0
        y[row] = math.log(d)
    return nuisance, x, y


def rank_ratios(
    records: Sequence[tuple[int, int, int, float]], ranks: Sequence[int]
) -> tuple[float, ...]:
    """Per grid rank, the loss decrease a layer's adapter buys at that rank relative to the
    largest rank observed, from ``(device, layer, rank, decrease)`` records.

    ``log decrease = device effect + layer effect + rank effect + noise`` is fitted by least
    squares (devices differ in data, samples and learning rate; layers in what they can
    learn), so a rank's effect is read from contrasts within a device and a layer. Returns
    NaN for ranks not observed, and ``()`` when fewer than two ranks were observed or the
    records cannot separate ranks from devices and layers (a plan whose ranks go with its
    layers, the same on every device).
    """
    seen_ranks = sorted({r for _, _, r, _ in records})
    if len(seen_ranks) < 2:
        return ()
    nuisance, indicators, y = _design(records, seen_ranks[:-1])
    x = np.column_stack([nuisance, indicators])
    if np.linalg.matrix_rank(x) < x.shape[1]:
        return ()
    beta, *_ = np.linalg.lstsq(x, y, rcond=None)
    rank_col = {r: nuisance.shape[1] + k for k, r in enumerate(seen_ranks[:-1])}
    out = []
    for r in ranks:
        if r == seen_ranks[-1]:
            out.append(1.0)
        elif r in rank_col:
            out.append(float(math.exp(beta[rank_col[r]])))
        else:
            out.append(math.nan)
    return tuple(out)


def rank_evidence(
    records: Sequence[tuple[int, int, int, float]], ranks: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """What ``(device, layer, rank, decrease)`` records say of ``log phi`` at the grid ranks
    but the largest (which is 1): the information matrix ``I`` and score ``h`` of the rank
    effects in ``log decrease = device + layer + log phi(rank) + noise``.

    The device and layer effects are projected out (so only contrasts within a device and
    within a layer count) and the rest scaled by the noise variance, estimated from the
    fit's residuals shrunk towards ``_NOISE_SD``: the least-squares estimate is ``I^-1 h``
    where ``I`` is invertible, and a Gaussian prior of mean ``m`` and precision ``P`` has the
    posterior mean ``(P + I)^-1 (P m + h)`` whatever the plan left unidentified (ranks tied
    to layers, ranks nobody trained: zero rows). Records of ranks off the grid and of
    non-positive decreases are ignored.
    """
    k = len(ranks) - 1
    info, score = np.zeros((k, k)), np.zeros(k)
    rows = [(i, ly, int(r), d) for i, ly, r, d in records if int(r) in ranks and d > 0]
    if k == 0 or len({r for _, _, r, _ in rows}) < 2:
        return info, score
    nuisance, x, y = _design(rows, [int(r) for r in ranks[:-1]])
    # residuals of the rank columns and of y on the device and layer effects
    both = np.column_stack([x, y])
    coef, *_ = np.linalg.lstsq(nuisance, both, rcond=None)
    resid = both - nuisance @ coef
    x_perp, y_perp = resid[:, :k], resid[:, k]
    x_perp[np.abs(x_perp) < 1e-9] = 0.0  # round-off of columns the effects explain fully
    beta, *_ = np.linalg.lstsq(x_perp, y_perp, rcond=None)
    rss = float(np.sum((y_perp - x_perp @ beta) ** 2))
    dof = len(rows) - np.linalg.matrix_rank(np.column_stack([nuisance, x]))
    variance = (rss + _NOISE_WEIGHT * _NOISE_SD**2) / (max(dof, 0) + _NOISE_WEIGHT)
    return x_perp.T @ x_perp / variance, x_perp.T @ y_perp / variance


class ProgressModel:
    """Layer gains and rank response of a run (see the module docstring).

    Parameters
    ----------
    spec
        The model's shape.
    ranks
        The job's rank grid.
    prior
        The measured prior; ``None`` looks it up by the model's name
        (:func:`~legend.models.priors.progress_prior`). A model without a stored prior
        starts from ``g_l = 1`` and ``phi(r) = r / r_max`` until the first round's updates
        replace them, and says so in :attr:`source`.
    smoothing
        Weight of the previous estimate in each round's average of the layer gains, and of
        the previous rounds' rank evidence (0: only the last round).
    rank_prior_sd
        Standard deviation of the prior on ``log phi(r)`` (see the module docstring).
    """

    def __init__(
        self,
        spec: ModelSpec,
        ranks: Sequence[int],
        *,
        prior: ProgressPrior | None = None,
        smoothing: float = DEFAULT_SMOOTHING,
        rank_prior_sd: float = DEFAULT_RANK_PRIOR_SD,
    ) -> None:
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"`smoothing` must be in [0, 1), got {smoothing!r}")
        if not (math.isfinite(rank_prior_sd) and rank_prior_sd > 0):
            raise ValueError(f"`rank_prior_sd` must be > 0, got {rank_prior_sd!r}")
        self.rank_prior_sd = float(rank_prior_sd)
        self.spec = spec
        self.ranks = tuple(int(r) for r in ranks)
        self.smoothing = smoothing
        prior = prior if prior is not None else progress_prior(spec.name, spec.num_layers)
        if prior is not None:
            self.layer_gains = np.asarray(prior.layer_gains, dtype=np.float64)
            self.rank_response = np.asarray(prior.response_at(self.ranks), dtype=np.float64)
            self.source = f"prior ({prior.model})"
        else:
            self.layer_gains = np.ones(spec.num_layers)
            self.rank_response = np.asarray(self.ranks, dtype=np.float64) / max(self.ranks)
            self.source = "no stored prior: uniform gains, linear response"
        # relative to the largest rank of the grid, whose response is 1
        self.rank_response = self.rank_response / self.rank_response[-1]
        # prior mean of log phi at the grid ranks but the largest, and the rounds' evidence
        self.rank_prior_log = np.log(np.maximum(self.rank_response[:-1], 1e-6))
        k = len(self.ranks) - 1
        self.rank_information = np.zeros((k, k))
        self.rank_score = np.zeros(k)
        self.rounds_observed = 0
        self.loss_per_progress: float | None = None

    # -- what the planner reads ---------------------------------------------------------
    def planner_changes(self) -> dict[str, Any]:
        """``PlannerOptions`` fields that make the planner value plans by this model."""
        gains = np.maximum(self.layer_gains, 0.0)
        if not gains.any():
            gains = np.ones_like(gains)
        response = np.maximum.accumulate(np.maximum(self.rank_response, 1e-6))
        return {
            "layer_weights": tuple(float(g) for g in gains),
            "rank_gains": tuple(float(v) for v in response),
        }

    def predicted(
        self, configurations: Sequence[tuple[Sequence[int], Sequence[int], int]]
    ) -> float:
        """Predicted progress ``sum_i n_i sum_l g_l phi(r_l)`` of ``(layers, ranks, n_i)``
        triples, per sample of the round (so rounds of different sizes compare)."""
        phi = dict(zip(self.ranks, self.rank_response, strict=True))
        total = 0.0
        samples = 0
        for layers, ranks, n in configurations:
            if not layers:
                continue
            total += n * sum(
                float(self.layer_gains[ly]) * float(phi[int(r)])
                for ly, r in zip(layers, ranks, strict=True)
            )
            samples += n
        return total / samples if samples else 0.0

    # -- what a round says -----------------------------------------------------------------
    def signals(
        self,
        global_before: AdapterState,
        updates: Sequence[ClientUpdate],
        decreases: Sequence[Sequence[float]] | None = None,
    ) -> RoundSignals:
        """Per-layer energies and per-rank energy shares of ``updates`` against the slices
        of ``global_before`` they were trained from, and the per-layer loss decreases the
        devices measured (``decreases[k]`` of ``updates[k]``, one value per model layer)."""
        L = self.spec.num_layers
        r_max = max(self.ranks)
        energy_sum = np.zeros(L)
        energy_count = np.zeros(L)
        decrease_sum = np.zeros(L)
        decrease_count = np.zeros(L)
        if decreases is not None and len(decreases) != len(updates):
            raise ValueError(
                f"{len(decreases)} loss decreases for {len(updates)} updates; give one per update"
            )
        share_sum = np.zeros(len(self.ranks))
        share_weight = np.zeros(len(self.ranks))
        phi = dict(zip(self.ranks, self.rank_response, strict=True))
        records: list[tuple[int, int, int, float]] = []
        for index, update in enumerate(updates):
            per_layer: dict[int, float] = {}
            rank_of: dict[int, int] = {}
            for (layer, module), (a, b) in update.state.factors.items():
                a_full, b_full = global_before.factors[(layer, module)]
                r = a.shape[0]
                s = update_spectrum(a, b, a_full[:r], b_full[:, :r])
                per_layer[layer] = per_layer.get(layer, 0.0) + float(s @ s)
                rank_of[layer] = r
                if r == r_max and s @ s > _EPS:
                    cum = np.cumsum(s * s) / float(s @ s)
                    for k, rk in enumerate(self.ranks):
                        # energy a rank-rk adapter can hold (at most the first rk values)
                        share_sum[k] += float(cum[min(rk, len(cum)) - 1]) * float(s @ s)
                        share_weight[k] += float(s @ s)
            measured = decreases[index] if decreases is not None else ()
            for layer, e in per_layer.items():
                r = rank_of[layer]
                response = max(phi.get(r, r / r_max), 1e-6)
                energy_sum[layer] += e / response
                energy_count[layer] += 1
                d = float(measured[layer]) if layer < len(measured) else math.nan
                if math.isfinite(d):
                    decrease_sum[layer] += d / response
                    decrease_count[layer] += 1
                    if d > 0:
                        records.append((index, layer, r, d))
        info, score = rank_evidence(records, self.ranks)
        with np.errstate(invalid="ignore", divide="ignore"):
            energy = np.where(energy_count > 0, energy_sum / np.maximum(energy_count, 1), np.nan)
            decrease = np.where(
                decrease_count > 0, decrease_sum / np.maximum(decrease_count, 1), np.nan
            )
            share = np.where(share_weight > 0, share_sum / np.maximum(share_weight, _EPS), np.nan)
        return RoundSignals(
            layer_energy=tuple(float(v) for v in energy),
            rank_share=tuple(float(v) for v in share),
            devices=len(updates),
            layer_decrease=tuple(float(v) for v in decrease) if decrease_count.any() else (),
            rank_decrease=rank_ratios(records, self.ranks),
            # no reported decreases: empty, and the spectral shares stand in
            rank_information=tuple(tuple(float(v) for v in row) for row in info) if records else (),
            rank_score=tuple(float(v) for v in score) if records else (),
        )

    def observe(self, signals: RoundSignals) -> None:
        """Fold one round's signals into the estimate (moving average, see the module)."""
        w = self.smoothing if self.rounds_observed > 0 else 0.0
        # the measured loss decreases where the devices reported them, else the energies
        energy = np.asarray(signals.layer_measure, dtype=np.float64)
        seen = np.isfinite(energy) & (energy > 0)
        if seen.any():
            # measured gains, scaled so the layers seen keep their current mean
            current = self.layer_gains[seen]
            scale = float(current.mean()) / float(energy[seen].mean())
            measured = energy[seen] * scale
            self.layer_gains[seen] = w * current + (1 - w) * measured
            self.layer_gains /= max(float(self.layer_gains.mean()), _EPS)
        info, score = self._rank_evidence_of(signals)
        self.rank_information = self.smoothing * self.rank_information + info
        self.rank_score = self.smoothing * self.rank_score + score
        self._refresh_response()
        if seen.any() or info.any():
            self.rounds_observed += 1
            if not self.source.endswith("+ run"):
                self.source = f"{self.source} + run"

    def _rank_evidence_of(self, signals: RoundSignals) -> tuple[np.ndarray, np.ndarray]:
        """The round's evidence on log phi: the measured decreases' where given, else the
        spectral shares' (one record of noise ``_SHARE_SD`` per rank seen)."""
        k = len(self.ranks) - 1
        if signals.rank_information:
            info = np.asarray(signals.rank_information, dtype=np.float64).reshape(k, k)
            return info, np.asarray(signals.rank_score, dtype=np.float64)
        info, score = np.zeros((k, k)), np.zeros(k)
        share = np.asarray(signals.rank_share, dtype=np.float64)
        if len(share) == len(self.ranks) and math.isfinite(share[-1]) and share[-1] > 0:
            for j in range(k):
                if math.isfinite(share[j]) and share[j] > 0:
                    info[j, j] = 1.0 / _SHARE_SD**2
                    score[j] = math.log(share[j] / share[-1]) / _SHARE_SD**2
        return info, score

    def _refresh_response(self) -> None:
        """``rank_response``: the posterior mean of log phi (prior and evidence), made
        non-decreasing and at most 1 (the largest rank's)."""
        k = len(self.ranks) - 1
        if k == 0:
            return
        precision = np.eye(k) / self.rank_prior_sd**2
        mean = np.linalg.solve(
            precision + self.rank_information,
            precision @ self.rank_prior_log + self.rank_score,
        )
        phi = np.append(np.exp(mean), 1.0)
        self.rank_response = np.clip(np.maximum.accumulate(phi), 1e-6, 1.0)

    def observe_validation(self, loss_drop: float, predicted: float) -> None:
        """Fold one round's validation-loss drop per unit of predicted progress."""
        if not (math.isfinite(loss_drop) and math.isfinite(predicted) and predicted > 0):
            return
        ratio = loss_drop / predicted
        if self.loss_per_progress is None:
            self.loss_per_progress = ratio
        else:
            w = self.smoothing
            self.loss_per_progress = w * self.loss_per_progress + (1 - w) * ratio

    # -- persistence -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "layer_gains": [float(v) for v in self.layer_gains],
            "rank_response": {
                str(r): float(v) for r, v in zip(self.ranks, self.rank_response, strict=True)
            },
            "rounds_observed": self.rounds_observed,
            "loss_per_progress": self.loss_per_progress,
            "source": self.source,
            "smoothing": self.smoothing,
            "rank_prior_sd": self.rank_prior_sd,
            "rank_prior_log": [float(v) for v in self.rank_prior_log],
            "rank_information": [[float(v) for v in row] for row in self.rank_information],
            "rank_score": [float(v) for v in self.rank_score],
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Load :meth:`to_dict`'s output (a checkpoint's); raises ``ValueError`` when it
        does not fit this model's layers and ranks."""
        gains = [float(v) for v in state["layer_gains"]]
        response = {int(k): float(v) for k, v in state["rank_response"].items()}
        if len(gains) != self.spec.num_layers or sorted(response) != sorted(self.ranks):
            raise ValueError(
                "the progress model's state does not match the model's layers or the ranks"
            )
        self.layer_gains = np.asarray(gains)
        self.rank_response = np.asarray([response[r] for r in self.ranks])
        self.rounds_observed = int(state["rounds_observed"])
        lpp = state.get("loss_per_progress")
        self.loss_per_progress = None if lpp is None else float(lpp)
        self.source = str(state.get("source", self.source))
        k = len(self.ranks) - 1
        if "rank_information" in state:
            self.rank_prior_sd = float(state.get("rank_prior_sd", self.rank_prior_sd))
            self.rank_prior_log = np.asarray(state["rank_prior_log"], dtype=np.float64)
            self.rank_information = np.asarray(state["rank_information"], dtype=np.float64)
            self.rank_score = np.asarray(state["rank_score"], dtype=np.float64)
            if (
                self.rank_prior_log.shape != (k,)
                or self.rank_information.shape != (k, k)
                or self.rank_score.shape != (k,)
            ):
                raise ValueError(
                    "the progress model's rank evidence does not match the ranks of the job"
                )
        else:
            # a checkpoint of an earlier version: its response becomes the prior
            top = max(float(self.rank_response[-1]), 1e-6)
            self.rank_response = self.rank_response / top
            self.rank_prior_log = np.log(np.maximum(self.rank_response[:-1], 1e-6))
            self.rank_information, self.rank_score = np.zeros((k, k)), np.zeros(k)
