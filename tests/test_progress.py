"""The progress model: its estimator on constructed updates, its prior, and what the planner
does with it."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from strategies import TINY, tiny_job

from legend.federation.adapters import AdapterState, ClientUpdate, init_global
from legend.federation.progress import (
    ProgressModel,
    RoundSignals,
    decrease_evidence,
    rank_ratios,
    update_spectrum,
)
from legend.models.errors import ModelInputError
from legend.models.priors import interpolate_response, progress_prior
from legend.planner.api import PlannerOptions, PlanningProblem, plan_round
from legend.planner.errors import PlannerInputError
from legend.planner.profiles import DeviceProfile, Fleet

RANKS = (2, 4, 8)
R_MAX = max(RANKS)


def _global(seed: int = 0) -> AdapterState:
    return init_global(TINY, R_MAX, {}, seed=seed)


def _update(
    start: AdapterState, layer_scale: dict[int, float], directions: int, rank: int = R_MAX
) -> ClientUpdate:
    """An update whose ``dW`` on each listed layer is ``scale`` times a sum of
    ``directions`` orthonormal rank-one terms of equal weight (the other slots unchanged)."""
    rng = np.random.default_rng(1)
    factors = {}
    for (layer, module), (a, b) in start.factors.items():
        if layer not in layer_scale:
            continue
        a_r, b_r = a[:rank].astype(np.float64), b[:, :rank].astype(np.float64)
        q_out, _ = np.linalg.qr(rng.standard_normal((b.shape[0], directions)))
        # input directions inside A's row space, so that B' A = B A + dW exactly
        q_in, _ = np.linalg.qr(a_r.T @ rng.standard_normal((rank, directions)))
        dw = layer_scale[layer] * q_out @ q_in.T
        coef = dw @ np.linalg.pinv(a_r)
        factors[(layer, module)] = (a_r.astype(np.float32), (b_r + coef).astype(np.float32))
    return ClientUpdate(device_id="d", num_samples=10, state=AdapterState(factors=factors, head={}))


def test_update_spectrum_is_the_svd_of_the_difference() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((4, 30)), rng.standard_normal((20, 4))
    a0, b0 = rng.standard_normal((4, 30)), rng.standard_normal((20, 4))
    want = np.linalg.svd(b @ a - b0 @ a0, compute_uv=False)[:8]
    assert np.allclose(update_spectrum(a, b, a0, b0), want, rtol=1e-9, atol=1e-9)


def test_spectral_shares_enter_as_evidence_against_the_prior() -> None:
    """Without reported decreases the update's energy shares stand in: one record per rank,
    weighed against the prior (here ``r / 8``) like any evidence."""
    start = _global()
    model = ProgressModel(TINY, RANKS, smoothing=0.0)
    assert model.rank_response == pytest.approx((0.25, 0.5, 1.0))
    # energy spread evenly over 4 directions: rank 2 holds half, rank 4 and 8 all of it
    signals = model.signals(start, [_update(start, {3: 1.0}, directions=4)])
    assert signals.rank_share == pytest.approx((0.5, 1.0, 1.0), abs=1e-4)
    assert signals.information == ()  # no decreases were reported
    model.observe(signals)
    # equal weights (prior sd = share sd = 0.5 in log phi): the geometric means
    want = (np.sqrt(0.25 * 0.5), np.sqrt(0.5 * 1.0), 1.0)
    assert model.planner_changes()["rank_gains"] == pytest.approx(want, abs=1e-3)
    # a weak prior leaves the shares
    loose = ProgressModel(TINY, RANKS, smoothing=0.0, prior_sd=100.0)
    loose.observe(signals)
    assert loose.rank_response == pytest.approx((0.5, 1.0, 1.0), abs=1e-3)


def test_layer_gains_follow_the_update_energy() -> None:
    """Without reported decreases (weak prior, so the observation shows)."""
    start = _global()
    model = ProgressModel(TINY, RANKS, smoothing=0.0, prior_sd=100.0)
    # layer 3's update has twice the norm (4x the energy) of layer 2's; layers 0-1 untrained
    signals = model.signals(start, [_update(start, {2: 1.0, 3: 2.0}, directions=1)])
    assert np.isnan(signals.layer_energy[0]) and np.isnan(signals.layer_energy[1])
    assert signals.layer_energy[3] == pytest.approx(4 * signals.layer_energy[2], rel=1e-4)
    before = model.layer_gains.copy()
    model.observe(signals)
    gains = model.layer_gains
    assert gains.mean() == pytest.approx(1.0)
    assert gains[3] / gains[2] == pytest.approx(4.0, rel=1e-4)
    # untrained layers keep their gains relative to each other
    assert gains[0] / gains[1] == pytest.approx(before[0] / before[1])


def test_moving_average_and_checkpoint_round_trip() -> None:
    start = _global()
    model = ProgressModel(TINY, RANKS, smoothing=0.5, prior_sd=100.0)
    model.observe(model.signals(start, [_update(start, {3: 1.0}, directions=1)]))
    model.observe(model.signals(start, [_update(start, {3: 1.0}, directions=4)]))
    # one round said phi(2) = 1, the next 0.5 (weight 0.5 on the first): the weighted
    # geometric mean 2^(-1/1.5)
    assert model.rank_response[0] == pytest.approx(2 ** (-1 / 1.5), abs=1e-3)
    model.observe_validation(0.2, 0.1)
    model.observe_validation(0.4, 0.1)
    assert model.loss_per_progress == pytest.approx(3.0)
    again = ProgressModel(TINY, RANKS, smoothing=0.5)
    again.restore(model.to_dict())
    assert again.to_dict() == model.to_dict()
    assert again.rank_response == pytest.approx(model.rank_response)
    with pytest.raises(ValueError, match="does not match"):
        ProgressModel(TINY, (2, 4), smoothing=0.5).restore(model.to_dict())
    # a checkpoint of an earlier version (no evidence): its estimate becomes the prior
    old = {
        k: v
        for k, v in model.to_dict().items()
        if k not in ("prior_sd", "prior_log", "information", "score")
    }
    older = ProgressModel(TINY, RANKS)
    older.restore(old)
    assert older.rank_response == pytest.approx(model.rank_response)
    assert older.layer_gains == pytest.approx(model.layer_gains)
    assert not older.information.any()


def test_prediction_is_per_sample_and_grows_with_rank_and_depth() -> None:
    model = ProgressModel(TINY, RANKS)
    shallow = model.predicted([((3,), (2,), 10)])
    deeper = model.predicted([((2, 3), (2, 2), 10)])
    higher = model.predicted([((3,), (8,), 10)])
    assert 0 < shallow < deeper and shallow <= higher
    # the same configuration on twice the samples predicts the same per-sample progress
    assert model.predicted([((3,), (2,), 20)]) == pytest.approx(shallow)


def test_minilm_prior_is_stored_and_checked() -> None:
    prior = progress_prior("all-MiniLM-L6-v2", 6)
    assert prior is not None and len(prior.layer_gains) == 6
    assert np.mean(prior.layer_gains) == pytest.approx(1.0, abs=1e-3)
    response = prior.response_at((2, 4, 8, 16, 32))
    assert all(b >= a for a, b in itertools.pairwise(response))
    assert response[-1] == pytest.approx(1.0, abs=1e-3)
    with pytest.raises(ModelInputError, match="layer gains"):
        progress_prior("all-MiniLM-L6-v2", 12)
    assert progress_prior("no-such-model") is None


def test_interpolation_in_log_rank() -> None:
    points = ((2, 0.5), (8, 1.0))
    assert interpolate_response(points, (1, 2, 4, 8, 16)) == pytest.approx(
        (0.5, 0.5, 0.75, 1.0, 1.0)
    )


def _fleet() -> Fleet:
    return Fleet(
        devices=tuple(
            DeviceProfile(
                device_id=f"d{i}",
                tflops=0.05 * (i + 1),
                memory_gb=4.0,
                uplink_mbps=5.0,
                downlink_mbps=20.0,
                num_samples=100,
            )
            for i in range(3)
        )
    )


def test_a_flat_rank_response_makes_the_planner_choose_low_ranks() -> None:
    """When the model says a rank-2 adapter holds all the progress a rank-8 one does, the
    progress objective plans rank 2 everywhere (less time and fewer bytes for the same
    progress); the fixed log2 utility plans higher ranks on the same fleet."""
    job = tiny_job(RANKS)
    flat = plan_round(_fleet(), TINY, job, PlannerOptions(rank_gains=(1.0, 1.0, 1.0)))
    assert all(set(d.ranks) == {2} for d in flat.devices if d.participates)
    fixed = plan_round(_fleet(), TINY, job, PlannerOptions(objective="rate"))
    assert any(max(d.ranks) > 2 for d in fixed.devices if d.participates)


def test_rank_gains_are_validated_against_the_grid() -> None:
    with pytest.raises(PlannerInputError, match="must not decrease"):
        PlannerOptions(rank_gains=(1.0, 0.5, 1.0))
    with pytest.raises(PlannerInputError, match="rank grid"):
        PlanningProblem.create(_fleet(), TINY, tiny_job(RANKS), PlannerOptions(rank_gains=(1.0,)))
    with pytest.raises(PlannerInputError, match="no progress prior"):
        PlanningProblem.create(_fleet(), TINY, tiny_job(RANKS), PlannerOptions(rank_gains="prior"))


def test_measured_loss_decreases_set_the_layer_gains() -> None:
    """Where devices report their per-layer loss decreases, the gains follow those (divided
    by the rank response), not the update energies."""
    start = _global()
    model = ProgressModel(TINY, RANKS, smoothing=0.0, prior_sd=100.0)
    L = TINY.num_layers
    # equal energy on layers 2 and 3, but layer 3 bought four times the loss decrease
    update = _update(start, {2: 1.0, 3: 1.0}, directions=1)
    decrease = [float("nan")] * L
    decrease[2], decrease[3] = 0.01, 0.04
    signals = model.signals(start, [update], [tuple(decrease)])
    assert signals.layer_energy[2] == pytest.approx(signals.layer_energy[3], rel=1e-6)
    assert signals.layer_decrease[3] == pytest.approx(4 * signals.layer_decrease[2])
    assert np.isnan(signals.layer_decrease[0])
    model.observe(signals)
    assert model.layer_gains[3] == pytest.approx(4 * model.layer_gains[2], rel=1e-3)
    # without reports the energies stand in
    plain = ProgressModel(TINY, RANKS, smoothing=0.0, prior_sd=100.0)
    plain.observe(plain.signals(start, [update]))
    assert plain.layer_gains[3] == pytest.approx(plain.layer_gains[2], rel=1e-6)
    with pytest.raises(ValueError, match="one per update"):
        model.signals(start, [update], [])


def test_rank_ratios_separate_ranks_from_devices_and_layers() -> None:
    """Decreases built as device x layer x rank effects with noise: the fit recovers the
    rank effects relative to the largest rank seen, whatever the devices and layers add."""
    rng = np.random.default_rng(3)
    true = {2: 0.2, 4: 0.45, 8: 1.0}
    records = []
    for device in range(6):
        scale = rng.uniform(0.5, 5.0)
        for layer in range(4):
            r = (2, 4, 8)[(device + layer) % 3]
            d = scale * (layer + 1) * true[r] * float(np.exp(rng.normal(0, 0.02)))
            records.append((device, layer, r, d))
    got = rank_ratios(records, (2, 4, 8, 16))
    assert got[:3] == pytest.approx((0.2, 0.45, 1.0), rel=0.05)
    assert np.isnan(got[3])  # rank 16 was not trained
    # ranks that go with layers on every device cannot be told apart from the layers
    tied = [(dev, ly, 2 if ly < 2 else 4, 1.0 + ly) for dev in range(3) for ly in range(4)]
    assert rank_ratios(tied, (2, 4, 8)) == ()
    assert rank_ratios(records[:1], (2, 4, 8)) == ()  # one rank: nothing to compare


def _records(
    true: dict[int, float], *, devices: int = 8, noise: float = 0.02, seed: int = 3
) -> list[tuple[int, int, int, float]]:
    """Decreases as device x layer x rank effects with log-normal noise, the ranks of
    ``true`` cycled across devices and layers (every contrast identified)."""
    rng = np.random.default_rng(seed)
    grid = sorted(true)
    out = []
    for device in range(devices):
        scale = rng.uniform(0.5, 5.0)
        for layer in range(4):
            r = grid[(device + layer) % len(grid)]
            d = scale * (layer + 1) * true[r] * float(np.exp(rng.normal(0, noise)))
            out.append((device, layer, r, d))
    return out


def test_decrease_evidence_is_the_least_squares_fit_where_identified() -> None:
    true = {2: 0.2, 4: 0.45, 8: 1.0}
    L = TINY.num_layers
    info, score = decrease_evidence(_records(true), RANKS, L)
    theta = np.linalg.solve(info, score)
    # layer effects (layer + 1) relative to the last layer, then the rank effects
    want = [(ly + 1) / L for ly in range(L - 1)] + [0.2, 0.45]
    assert np.exp(theta) == pytest.approx(want, rel=0.03)
    # ranks tied to layers on every device: a layer's gain and its rank's response cannot
    # be told apart (the information is singular)
    tied = [(dev, ly, 2 if ly < 2 else 8, 1.0 + ly) for dev in range(3) for ly in range(4)]
    info, _ = decrease_evidence(tied, RANKS, L)
    assert np.linalg.matrix_rank(info) < len(info)
    # a rank nobody trained has a zero row: the prior decides it
    info, _ = decrease_evidence(_records({4: 0.45, 8: 1.0}), RANKS, L)
    assert not info[L - 1].any() and info[L, L] > 0
    # one-layer devices say nothing of layers or ranks
    info, score = decrease_evidence([(d, 3, 2 + 2 * (d % 2), 1.0) for d in range(4)], RANKS, L)
    assert not info.any() and not score.any()


def test_which_devices_train_which_layers_does_not_bias_the_gains() -> None:
    """Devices whose decreases are 1,000x larger train every layer, the others only the
    last two (what a plan does with fast and slow devices): the per-layer mean of the
    decreases overrates the lower layers twofold, the fit within devices does not."""
    L = TINY.num_layers
    gains = [0.1, 0.2, 1.0, 2.0]
    records = []
    for dev in range(8):
        big = dev < 4
        for ly in range(L) if big else (2, 3):
            records.append((dev, ly, 8, (1000.0 if big else 1.0) * gains[ly]))
    model = ProgressModel(TINY, RANKS, smoothing=0.0, prior_sd=100.0)
    model.observe(_signals(*decrease_evidence(records, RANKS, L)))
    want = np.asarray(gains) / np.mean(gains)
    assert model.layer_gains == pytest.approx(want, rel=1e-3)
    naive = [np.mean([d for _, ly, _, d in records if ly == k]) for k in range(L)]
    assert naive[0] / naive[3] > 1.9 * gains[0] / gains[3]


def test_measured_rank_decreases_replace_the_spectral_shares() -> None:
    model = ProgressModel(TINY, RANKS, smoothing=0.0)
    L = TINY.num_layers
    info, score = decrease_evidence(_records({2: 0.2, 4: 0.45, 8: 1.0}), RANKS, L)
    model.observe(
        RoundSignals(
            layer_energy=(1.0,) * L,
            rank_share=(0.99, 1.0, 1.0),
            devices=8,
            information=tuple(tuple(row) for row in info),
            score=tuple(score),
        )
    )
    # precise evidence outweighs the prior (r / 8, equal gains); shares and energies unused
    assert model.rank_response == pytest.approx((0.2, 0.45, 1.0), rel=0.03)
    want = np.arange(1, L + 1) / np.mean(np.arange(1, L + 1))
    assert model.layer_gains == pytest.approx(want, rel=0.03)


def test_a_rank_no_longer_trained_returns_to_the_prior() -> None:
    """Evidence fades by ``smoothing`` a round: once a plan stops training the largest
    rank, the contrasts against it fade and the prior takes them back, instead of a noisy
    round's value staying for good (a plan that then never tries the rank again)."""
    L = TINY.num_layers
    model = ProgressModel(TINY, RANKS, smoothing=0.5)
    flat = decrease_evidence(_records({2: 1.0, 4: 1.0, 8: 1.0}), RANKS, L)
    model.observe(_signals(*flat))
    assert model.rank_response == pytest.approx((1.0, 1.0, 1.0), abs=0.05)
    # later rounds train ranks 2 and 4 only, rank 4 twice as good as rank 2
    later = decrease_evidence(_records({2: 0.5, 4: 1.0}), RANKS, L)
    for _ in range(12):
        model.observe(_signals(*later))
    # the contrast seen is followed, the one no longer seen is the prior's again (r / 8)
    assert model.rank_response[0] / model.rank_response[1] == pytest.approx(0.5, rel=0.05)
    assert model.rank_response[1] == pytest.approx(0.5, rel=0.05)


def _signals(info: np.ndarray, score: np.ndarray) -> RoundSignals:
    return RoundSignals(
        layer_energy=(float("nan"),) * TINY.num_layers,
        rank_share=(float("nan"),) * len(RANKS),
        devices=1,
        information=tuple(tuple(float(v) for v in row) for row in info),
        score=tuple(float(v) for v in score),
    )


def test_the_servers_probe_reaches_the_layers_no_device_trains() -> None:
    """Devices that train only the top two layers say nothing of the lower ones; the
    server's probe (every layer at the largest rank, one more device in the fit) does: the
    gains move from the prior to the probe's ratios, on the layers the devices trained
    as well as on the others."""
    start = _global()
    L = TINY.num_layers
    top = (L - 2, L - 1)
    update = _update(start, dict.fromkeys(top, 1.0), directions=1)
    decrease = [float("nan")] * L
    decrease[top[0]], decrease[top[1]] = 0.02, 0.04
    blind = ProgressModel(TINY, RANKS, smoothing=0.0, prior_sd=100.0)
    blind.observe(blind.signals(start, [update], [tuple(decrease)]))
    # nothing identifies the lower layers: they stay where the prior put them (g = 1 each)
    assert blind.layer_gains[0] == pytest.approx(blind.layer_gains[-1])
    probe = (0.03, 0.01, 0.02, 0.04)[:L]
    probed = ProgressModel(TINY, RANKS, smoothing=0.0, prior_sd=100.0)
    signals = probed.signals(start, [update], [tuple(decrease)], probe)
    info = np.asarray(signals.information)
    assert all(info[ly, ly] > 0 for ly in range(L - 1))  # evidence on every layer
    probed.observe(signals)
    gains = probed.layer_gains
    # the probe alone speaks of layers 0 and 1: its ratios to the last layer
    assert gains[0] / gains[-1] == pytest.approx(probe[0] / probe[-1], rel=0.05)
    assert gains[1] / gains[-1] == pytest.approx(probe[1] / probe[-1], rel=0.05)
    # layer 2: the device (1/2) and the probe (1/2) agree
    assert gains[2] / gains[-1] == pytest.approx(0.5, rel=0.05)
    with pytest.raises(ValueError, match="one per layer"):
        probed.signals(start, [update], [tuple(decrease)], probe[:-1])


def test_the_probe_measures_the_gradient_energy_of_every_layer() -> None:
    """``probe_layer_decrease`` is, per layer, the inner product of the mean loss's
    gradients over the two halves of the examples (batching does not change it), NaN for a
    layer without factors; unlike the squared gradient of one batch it does not grow with
    the sampling noise: on pure-noise labels it is near zero on average while the squared
    norm is not."""
    import torch

    from legend.federation.training import TokenizedSplit, probe_layer_decrease

    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Linear(3, 3)
            self.b = torch.nn.Linear(3, 2)

        def logits(self, x):
            return self.b(torch.tanh(self.a(x.float())))

        def forward(self, input_ids, labels):
            logits = self.logits(input_ids)
            loss = torch.nn.functional.cross_entropy(logits, labels)
            return type("Out", (), {"loss": loss, "logits": logits})

    net = Net()
    x, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
    split = TokenizedSplit(tensors={"input_ids": x}, labels=y)
    layers = {0: [net.a.weight], 1: [net.b.weight, net.b.bias]}
    whole = probe_layer_decrease(net, split, layers, 3, batch_size=10)
    batched = probe_layer_decrease(net, split, layers, 3, batch_size=2)
    assert batched[:2] == pytest.approx(whole[:2], rel=1e-5)
    assert np.isnan(whole[2])
    grads = []
    for half in (slice(0, 5), slice(5, 10)):
        net.zero_grad()
        torch.nn.functional.cross_entropy(net.logits(x[half]), y[half]).backward()
        grads.append(net.a.weight.grad.clone())
    assert whole[0] == pytest.approx(float((grads[0] * grads[1]).sum()), rel=1e-5)
    # labels that carry nothing: the squared half-gradient stays, the cross product averages out
    cross, square = [], []
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        noise = TokenizedSplit(
            tensors={"input_ids": torch.randn(64, 3, generator=g)},
            labels=torch.randint(0, 2, (64,), generator=g),
        )
        cross.append(probe_layer_decrease(net, noise, layers, 3)[1])
        net.zero_grad()
        torch.nn.functional.cross_entropy(
            net.logits(noise.tensors["input_ids"][:32]), noise.labels[:32]
        ).backward()
        square.append(float((net.b.weight.grad**2).sum() + (net.b.bias.grad**2).sum()))
    assert abs(np.mean(cross)) < 0.25 * np.mean(square)
