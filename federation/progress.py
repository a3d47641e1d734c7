r"""The progress model: what a device's configuration contributes to a round's learning.

The planner's ``progress`` objective (docs/planner.md) values a device ``i`` training the
top layers ``l`` at ranks ``r_l`` by

.. math::

    p_i = n_i \sum_l g_l \, \phi(r_l),

``n_i`` its samples, ``g_l`` a gain per layer and ``\phi`` a response per rank. This module
estimates ``g`` and ``phi`` from the run itself, every round, from what the devices return
(docs/planner.md, "The progress model", gives the reasoning and the evidence):

the measurement
    Each device measures, while it trains, the first-order decrease of its training loss
    that each layer's adapter bought: ``<g_t, theta_t - theta_{t+1}>`` over the layer's LoRA
    factors, per step (``lr ||g_l||^2`` under SGD; :class:`~legend.federation.training.\
LayerDecrease`), and sends it with its update.
the model of a measurement
    ``log d_il = a_i + log g_l + log phi(r_il) + noise``: a device effect ``a_i`` (devices
    differ in data, samples and learning rate by orders of magnitude), the layer's gain and
    the response of the rank it was trained at. With the LoRA scale held constant a higher
    rank takes larger steps, so ``phi`` is not the shape of the update.
the estimate
    A round's records give evidence on ``theta = (log g_l / g_last, log phi(r) / phi(r_max))``
    (:func:`decrease_evidence`: the normal equations once each device's mean is taken out,
    scaled by the fit's noise variance). It is weak where a plan ties ranks to layers and
    absent for layers and ranks nobody trained, and since only contrasts within a device
    count, which devices a plan gives deep or high-rank adapters does not bias it. The
    model is the posterior mean of a Gaussian prior centred on the measured prior (standard
    deviation ``prior_sd`` in ``theta``) and the evidence of the rounds so far, older
    rounds' discounted by ``smoothing`` a round: a poorly identified round moves it little,
    and a layer or rank the plans stop training drifts back to the prior instead of keeping
    one noisy round's value (which a plan would then never test again).
fallback
    Replies without decreases (a node of an older version) leave the update energies
    ``||dW||_F^2`` of ``dW = B A - B0 A0`` per layer (divided by ``phi`` at the trained rank)
    and, of updates trained at the largest rank, the share of the singular-value energy
    within the top ``r`` directions per rank; each enters as one observation.
validation
    The server evaluates the global model on a validation split it holds out of the training
    data (never the test split); the drop of its loss each round is compared with the
    predicted progress of the round's plan: ``loss_per_progress`` (an exponential average of
    the ratio) turns progress into expected loss decrease, and every round records both so
    the prediction can be checked (``legend report run``).

Before the first round the model is the *measured* prior stored with the model preset
(:mod:`legend.models.priors`). Everything is deterministic given the updates, and the state
(prior, evidence) round-trips through the run's checkpoint (:meth:`ProgressModel.to_dict`),
so a resumed run plans as an uninterrupted one.
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

__all__ = [
    "ProgressModel",
    "RoundSignals",
    "decrease_evidence",
    "rank_ratios",
    "update_spectrum",
]

# weight of the previous estimate in the exponential moving average of every round
DEFAULT_SMOOTHING = 0.5
# standard deviation of the prior on log g and log phi (a factor of about 1.65 either way)
DEFAULT_PRIOR_SD = 0.5
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
    core ``R_B R_A^T``, of side ``r + r0``. The factorisations run in torch, under the
    run's torch thread count (``train.threads``): NumPy's multithreaded LAPACK took 20 times
    longer on these small matrices on a loaded 2-core host (73 ms against 3 ms a call), and
    the server's time is part of every round's simulated clock.
    """
    import torch

    left = torch.from_numpy(np.concatenate([b, -b0], axis=1).astype(np.float64))
    right = torch.from_numpy(np.concatenate([a, a0], axis=0).astype(np.float64))
    r_b = torch.linalg.qr(left, mode="r").R
    r_a = torch.linalg.qr(right.T, mode="r").R
    return torch.linalg.svdvals(r_b @ r_a.T).numpy()


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
    # the round's evidence on the model's parameters (decrease_evidence); empty where no
    # device reported decreases
    information: tuple[tuple[float, ...], ...] = ()
    score: tuple[float, ...] = ()

    @property
    def layer_measure(self) -> tuple[float, ...]:
        """What the layer gains are fitted from: the measured loss decreases where the
        devices reported them, otherwise the update energies."""
        return self.layer_decrease or self.layer_energy


def rank_ratios(
    records: Sequence[tuple[int, int, int, float]], ranks: Sequence[int]
) -> tuple[float, ...]:
    """Per grid rank, the loss decrease a layer's adapter buys at that rank relative to the
    largest rank observed, from ``(device, layer, rank, decrease)`` records: the
    least-squares fit of :func:`decrease_evidence` over the layers and ranks the records
    hold. Returns NaN for ranks not observed, and ``()`` when fewer than two ranks were
    observed or the records cannot separate ranks from devices and layers (a plan whose
    ranks go with its layers, the same on every device).
    """
    seen_ranks = sorted({int(r) for _, _, r, _ in records})
    if len(seen_ranks) < 2:
        return ()
    layers = {ly: k for k, ly in enumerate(sorted({ly for _, ly, _, _ in records}))}
    info, score = decrease_evidence(
        [(i, layers[ly], r, d) for i, ly, r, d in records], seen_ranks, len(layers)
    )
    if np.linalg.matrix_rank(info) < len(info):
        return ()
    theta = np.linalg.solve(info, score)[len(layers) - 1 :]
    ratio = dict(zip(seen_ranks, [*np.exp(theta), 1.0], strict=True))
    return tuple(float(ratio.get(int(r), math.nan)) for r in ranks)


def decrease_evidence(
    records: Sequence[tuple[int, int, int, float]], ranks: Sequence[int], num_layers: int
) -> tuple[np.ndarray, np.ndarray]:
    """What ``(device, layer, rank, decrease)`` records say of the progress model's
    parameters ``theta``: ``log g_l`` of the layers but the last (relative to it), then
    ``log phi(r)`` of the grid ranks but the largest (relative to it), in
    ``log decrease = device + log g_layer + log phi(rank) + noise``.

    Returns the information matrix ``I`` and score ``h``: each device's mean is taken out
    (so only contrasts within a device count: devices differ in data, samples and learning
    rate by orders of magnitude, and which devices train which layers is the plan's choice,
    not chance), and the rest is divided by the noise variance, estimated from the fit's
    residuals shrunk towards ``_NOISE_SD``. The least-squares estimate is ``I^-1 h`` where
    ``I`` is invertible; a Gaussian prior of mean ``m`` and precision ``P`` has the
    posterior mean ``(P + I)^-1 (P m + h)`` whatever the plan left unidentified (ranks tied
    to layers on every device, a layer or rank nobody trained, one-layer devices: zero
    rows). Records of other ranks or layers and of non-positive decreases are ignored.
    """
    top = num_layers - 1
    rank_col = {int(r): top + j for j, r in enumerate(ranks[:-1])}
    n = top + len(rank_col)
    info, score = np.zeros((n, n)), np.zeros(n)
    rows = [
        (i, ly, int(r), d)
        for i, ly, r, d in records
        if int(r) in ranks and 0 <= ly < num_layers and d > 0
    ]
    if not rows:
        return info, score
    x = np.zeros((len(rows), n))
    y = np.empty(len(rows))
    device = np.empty(len(rows), dtype=np.int64)
    index = {i: k for k, i in enumerate(sorted({i for i, _, _, _ in rows}))}
    for row, (i, ly, r, d) in enumerate(rows):
        if ly < top:
            x[row, ly] = 1.0
        if r in rank_col:
            x[row, rank_col[r]] = 1.0
        y[row] = math.log(d)
        device[row] = index[i]
    # take each device's mean out (the projection off the device effects)
    both = np.column_stack([x, y])
    counts = np.bincount(device, minlength=len(index)).astype(np.float64)
    means = np.zeros((len(index), n + 1))
    np.add.at(means, device, both)
    resid = both - (means / counts[:, None])[device]
    x_perp, y_perp = resid[:, :n], resid[:, n]
    x_perp[np.abs(x_perp) < 1e-9] = 0.0  # round-off of columns the devices explain fully
    beta, *_ = np.linalg.lstsq(x_perp, y_perp, rcond=None)
    rss = float(np.sum((y_perp - x_perp @ beta) ** 2))
    dof = len(rows) - len(index) - int(np.linalg.matrix_rank(x_perp)) if x_perp.any() else 0
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
        Weight of the previous rounds' evidence, each round (0: only the last round).
    prior_sd
        Standard deviation of the prior on ``log g`` and ``log phi`` (module docstring).
    """

    def __init__(
        self,
        spec: ModelSpec,
        ranks: Sequence[int],
        *,
        prior: ProgressPrior | None = None,
        smoothing: float = DEFAULT_SMOOTHING,
        prior_sd: float = DEFAULT_PRIOR_SD,
    ) -> None:
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"`smoothing` must be in [0, 1), got {smoothing!r}")
        if not (math.isfinite(prior_sd) and prior_sd > 0):
            raise ValueError(f"`prior_sd` must be > 0, got {prior_sd!r}")
        self.prior_sd = float(prior_sd)
        self.spec = spec
        self.ranks = tuple(int(r) for r in ranks)
        self.smoothing = smoothing
        prior = prior if prior is not None else progress_prior(spec.name, spec.num_layers)
        if prior is not None:
            gains = np.asarray(prior.layer_gains, dtype=np.float64)
            response = np.asarray(prior.response_at(self.ranks), dtype=np.float64)
            self.source = f"prior ({prior.model})"
        else:
            gains = np.ones(spec.num_layers)
            response = np.asarray(self.ranks, dtype=np.float64) / max(self.ranks)
            self.source = "no stored prior: uniform gains, linear response"
        self._set_prior(gains, response)
        self.rounds_observed = 0
        self.loss_per_progress: float | None = None

    def _set_prior(self, gains: np.ndarray, response: np.ndarray) -> None:
        """Centre the prior on ``gains`` and ``response`` and forget all evidence."""
        # log g relative to the last layer (gains of 0 held at a thousandth of the largest)
        g = np.maximum(gains, 1e-3 * max(float(gains.max()), _EPS))
        phi = np.maximum(response, 1e-6)
        self.prior_log = np.concatenate([np.log(g[:-1] / g[-1]), np.log(phi[:-1] / phi[-1])])
        n = len(self.prior_log)
        self.information = np.zeros((n, n))
        self.score = np.zeros(n)
        self._refresh()

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
        probe: Sequence[float] | None = None,
    ) -> RoundSignals:
        """Per-layer energies and per-rank energy shares of ``updates`` against the slices
        of ``global_before`` they were trained from, and the per-layer loss decreases the
        devices measured (``decreases[k]`` of ``updates[k]``, one value per model layer).

        ``probe`` is the server's probe of ``global_before`` (one value per model layer,
        every layer at the largest rank; :func:`~legend.federation.training.probe_layer_decrease`):
        it enters the fit as one more device, whose contrasts reach the layers no device
        trained."""
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
        if probe is not None:
            if len(probe) != L:
                raise ValueError(
                    f"a probe of {len(probe)} layers for a model of {L}; give one per layer"
                )
            records.extend(
                (len(updates), layer, r_max, float(d))
                for layer, d in enumerate(probe)
                if math.isfinite(d) and d > 0
            )
        info, score = decrease_evidence(records, self.ranks, L)
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
            information=tuple(tuple(float(v) for v in row) for row in info) if records else (),
            score=tuple(float(v) for v in score) if records else (),
        )

    def observe(self, signals: RoundSignals) -> None:
        """Fold one round's evidence in (older rounds' discounted by ``smoothing``)."""
        info, score = self._evidence_of(signals)
        self.information = self.smoothing * self.information + info
        self.score = self.smoothing * self.score + score
        self._refresh()
        if info.any():
            self.rounds_observed += 1
            if not self.source.endswith("+ run"):
                self.source = f"{self.source} + run"

    def _evidence_of(self, signals: RoundSignals) -> tuple[np.ndarray, np.ndarray]:
        """The round's evidence: the measured decreases' where devices reported them, else
        the update energies (per layer, against the last layer) and the spectral shares
        (per rank, against the largest), each a single observation of noise ``_SHARE_SD``."""
        top = self.spec.num_layers - 1
        n = len(self.prior_log)
        if signals.information:
            info = np.asarray(signals.information, dtype=np.float64).reshape(n, n)
            return info, np.asarray(signals.score, dtype=np.float64)
        info, score = np.zeros((n, n)), np.zeros(n)
        for offset, values in ((0, signals.layer_energy), (top, signals.rank_share)):
            v = np.asarray(values, dtype=np.float64)
            if not len(v) or not (math.isfinite(v[-1]) and v[-1] > 0):
                continue
            for j in range(len(v) - 1):
                if math.isfinite(v[j]) and v[j] > 0:
                    info[offset + j, offset + j] = 1.0 / _SHARE_SD**2
                    score[offset + j] = math.log(v[j] / v[-1]) / _SHARE_SD**2
        return info, score

    def _refresh(self) -> None:
        """``layer_gains`` and ``rank_response`` from the posterior mean of ``theta`` (prior
        and evidence): gains normalised to mean 1, the response non-decreasing and 1 at the
        largest rank."""
        n = len(self.prior_log)
        top = self.spec.num_layers - 1
        precision = np.eye(n) / self.prior_sd**2
        theta = np.linalg.solve(
            precision + self.information, precision @ self.prior_log + self.score
        )
        gains = np.append(np.exp(theta[:top]), 1.0)
        self.layer_gains = gains / gains.mean()
        phi = np.append(np.exp(theta[top:]), 1.0)
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
            "prior_sd": self.prior_sd,
            "prior_log": [float(v) for v in self.prior_log],
            "information": [[float(v) for v in row] for row in self.information],
            "score": [float(v) for v in self.score],
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
        self.rounds_observed = int(state["rounds_observed"])
        lpp = state.get("loss_per_progress")
        self.loss_per_progress = None if lpp is None else float(lpp)
        self.source = str(state.get("source", self.source))
        if "information" not in state:
            # a checkpoint of an earlier version: its estimate becomes the prior
            self._set_prior(np.asarray(gains), np.asarray([response[r] for r in self.ranks]))
            return
        n = len(self.prior_log)
        prior_log = np.asarray(state["prior_log"], dtype=np.float64)
        information = np.asarray(state["information"], dtype=np.float64)
        score = np.asarray(state["score"], dtype=np.float64)
        if prior_log.shape != (n,) or information.shape != (n, n) or score.shape != (n,):
            raise ValueError("the progress model's evidence does not match the layers or ranks")
        if not all(np.isfinite(a).all() for a in (prior_log, information, score)):
            raise ValueError("the progress model's evidence holds non-finite numbers")
        self.prior_sd = float(state.get("prior_sd", self.prior_sd))
        self.prior_log, self.information, self.score = prior_log, information, score
        self._refresh()
