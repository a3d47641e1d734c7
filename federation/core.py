"""The engine-neutral federated round: one server core and one client core.

Transports (the in-process runner, the Flower apps) only move :class:`ClientInstruction`
and :class:`ClientReply` objects between the two; the round logic lives here once.

Server side, per round ``t``:

1. :meth:`ServerCore.select` samples the round's devices (seeded by ``(seed, t)``);
2. :meth:`ServerCore.plan` plans them from the *estimated* fleet (EMA of observations);
3. :meth:`ServerCore.instructions` slices the global adapter for each device's plan and
   draws the round's injected faults (drop-outs, corrupt updates) deterministically;
4. :meth:`ServerCore.finish_round` checks each reply, excludes broken ones (logged),
   aggregates the rest with the run's rule, updates the capacity estimates and returns the
   round's records (simulated clock, bytes, waiting). With a network topology the clock
   is the fair-sharing one of :func:`round_clock`: transfers through a shared link slow
   each other down, and each link's utilisation is recorded.

Client side, :meth:`ClientCore.train` installs the device's adapter on the shared frozen
base model, trains ``local_steps`` steps on the device's data, and reports its update and
observations: host wall time, and the simulated device times its profile implies through
the (calibrated) cost model, with optional log-normal jitter.

All randomness is derived from ``(seed, round, device)``, never from state carried between
rounds, so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from legend.federation.adapters import (
    AdapterState,
    ClientUpdate,
    check_update,
    slice_for,
)
from legend.federation.aggregation import AGGREGATORS
from legend.federation.job import JobConfig
from legend.federation.methods import plan_for_method, with_estimates
from legend.federation.progress import ProgressModel
from legend.federation.server_opt import OptimizerState, ServerOptimizer, trained_slots
from legend.models.spec import ModelSpec
from legend.planner.costs import Calibration, CostModel
from legend.planner.plan import DevicePlan, Plan
from legend.planner.profiles import DeviceProfile, Fleet
from legend.planner.topology import Topology, simulate_round

__all__ = [
    "FAULT_KINDS",
    "LINK_COLUMNS",
    "ClientCore",
    "ClientInstruction",
    "ClientReply",
    "RoundResult",
    "ServerCore",
    "device_seed",
    "restrict_topology",
    "round_clock",
]

log = logging.getLogger("legend.federation")

FAULT_KINDS = ("nan", "inf", "shape", "rank", "keys")


def device_seed(seed: int, round_index: int, device_index: int, salt: int = 0) -> list[int]:
    """The seed sequence of one device in one round (independent of any other draw)."""
    return [int(seed), int(round_index), int(device_index), int(salt)]


# Columns of ``links.csv`` (the rows of :meth:`ServerCore._link_rows`), written by runs with a
# network topology and read by ``legend report run``.
LINK_COLUMNS = (
    "round",
    "link",
    "up_bytes",
    "down_bytes",
    "utilisation_up",
    "utilisation_down",
    "binding",
)


@dataclass(frozen=True, kw_only=True)
class ClientInstruction:
    """What the server sends one device for one round."""

    round: int
    device_id: str
    device_index: int
    layers: tuple[int, ...]
    ranks: tuple[int, ...]
    init_state: AdapterState
    local_steps: int
    batch_size: int
    learning_rate: float
    weight_decay: float
    freeze_a: bool
    seed: tuple[int, ...]
    fault: str | None = None  # injected: "drop" or one of FAULT_KINDS
    loss: str = "cross-entropy"  # the local loss (train.loss)
    optimizer: str = "adamw"  # the local optimizer (train.optimizer)
    # compute the frozen-prefix features first (train.cache_prefix; the device's first
    # round that reads them): the simulated clock charges it
    build_prefix: bool = False


@dataclass(frozen=True, kw_only=True)
class ClientReply:
    """What a device sends back: its update and its observations."""

    round: int
    device_id: str
    state: AdapterState | None
    num_samples: int
    train_loss: float
    steps: int
    host_time_s: float
    sim_compute_s: float
    sim_download_s: float
    sim_upload_s: float
    download_bytes: float
    upload_bytes: float
    memory_bytes: float
    dropped: bool = False
    # per model layer, the first-order training-loss decrease per local step that the
    # layer's adapter bought (NaN for layers the device did not train; empty if not measured)
    layer_decrease: tuple[float, ...] = ()

    @property
    def sim_time_s(self) -> float:
        return self.sim_compute_s + self.sim_download_s + self.sim_upload_s


@dataclass(frozen=True, kw_only=True)
class RoundResult:
    """A completed round: the new global state and the rows for ``rounds.csv``/``devices.csv``."""

    round: int
    plan: Plan
    global_state: AdapterState
    optimizer_state: OptimizerState | None
    round_row: Mapping[str, Any]
    device_rows: tuple[Mapping[str, Any], ...]
    estimates: Mapping[str, tuple[float, float, float]]
    rejected: Mapping[str, str] = field(default_factory=dict)
    link_rows: tuple[Mapping[str, Any], ...] = ()


class ServerCore:
    """Server logic of a run: plan, slice, aggregate, estimate capacities.

    Parameters
    ----------
    cfg
        The job.
    fleet
        The declared fleet (device profiles as registered).
    spec
        The model's shape.
    calibration
        Host timings for the cost model, or ``None`` for the analytic model.
    global_state
        The current global adapter (all layers at the largest rank) and head.
    estimates
        EMA capacity estimates ``device_id -> (tflops, uplink_mbps, downlink_mbps)``;
        defaults to the declared profiles.
    optimizer_state
        The server optimizer's moments (``federation.server_optimizer``) when resuming.
    topology
        The links the fleet shares (:func:`~legend.planner.topology.load_topology`), or
        ``None`` for a private link per device. It drives the simulated clock; planning
        sees it when ``cfg.planner.use_topology`` holds and the method's solver models it.
    """

    def __init__(
        self,
        cfg: JobConfig,
        fleet: Fleet,
        spec: ModelSpec,
        *,
        calibration: Calibration | None,
        global_state: AdapterState,
        estimates: Mapping[str, tuple[float, float, float]] | None = None,
        topology: Topology | None = None,
        optimizer_state: OptimizerState | None = None,
        prefix_built: Iterable[str] = (),
    ) -> None:
        self.cfg = cfg
        f = cfg.federation
        self.server_optimizer = ServerOptimizer(
            kind=f.server_optimizer,
            lr=f.server_lr,
            beta1=f.server_beta1,
            beta2=f.server_beta2,
            tau=f.server_tau,
            lazy=f.server_lazy,
        )
        self.optimizer_state = optimizer_state
        self.topology = topology
        self.fleet = fleet
        self.spec = spec
        self.calibration = calibration
        self.global_state = global_state
        self.estimates: dict[str, tuple[float, float, float]] = dict(estimates or {})
        for d in fleet.devices:
            self.estimates.setdefault(d.device_id, (d.tflops, d.uplink_mbps, d.downlink_mbps))
        self.costs = CostModel(spec, cfg.job_params, calibration)
        self.index = {d.device_id: i for i, d in enumerate(fleet.devices)}
        self.last_plan: Plan | None = None
        # what each configuration contributes to learning, estimated from the run
        self.progress_model = ProgressModel(spec, cfg.job_params.ranks)
        # devices that hold their frozen-prefix features (train.cache_prefix)
        self.prefix_built: set[str] = set(prefix_built)

    # -- 1. selection --------------------------------------------------------------------
    def select(self, round_index: int, available: Sequence[str] | None = None) -> tuple[str, ...]:
        """The devices of a round: all (or all available), or a seeded sample of them."""
        ids = [d for d in self.fleet.device_ids if available is None or d in set(available)]
        k = self.cfg.job.devices_per_round
        if k <= 0 or k >= len(ids):
            return tuple(ids)
        rng = np.random.default_rng([self.cfg.job.seed, round_index, 1])
        chosen = set(rng.choice(len(ids), size=k, replace=False).tolist())
        return tuple(d for i, d in enumerate(ids) if i in chosen)

    # -- 2. planning ---------------------------------------------------------------------
    def plan(self, round_index: int, device_ids: Sequence[str]) -> Plan:
        fleet = with_estimates(self.fleet.subset(device_ids), self.estimates)
        if self.cfg.train.cache_prefix:
            # who still has to compute its frozen-prefix features: the planner charges it
            fleet = Fleet(
                devices=tuple(
                    replace(d, prefix_built=d.device_id in self.prefix_built) for d in fleet.devices
                ),
                source=fleet.source,
            )
        plan = plan_for_method(
            self.cfg,
            fleet,
            self.spec,
            round_index=round_index,
            calibration=self.calibration,
            warm_start=self.last_plan,
            topology=(
                restrict_topology(self.topology, device_ids)
                if self.topology is not None and self.cfg.planner.use_topology
                else None
            ),
            learned=self.learned_options(),
        )
        self.last_plan = plan
        return plan

    def learned_options(self) -> dict[str, Any]:
        """Planner options the run has learned: the progress model's layer gains and rank
        response. (The server's own seconds per round are measured on the host, so they
        stay out of planning: a plan must not depend on how busy the host was.)"""
        return self.progress_model.planner_changes()

    def predicted_progress(self, plan: Plan) -> float:
        """The progress model's prediction for ``plan``, per sample of the round."""
        return self.progress_model.predicted(
            [
                (dp.layers, dp.ranks, self.fleet.devices[self.index[dp.device_id]].num_samples)
                for dp in plan.devices
                if dp.participates
            ]
        )

    # -- 3. instructions -----------------------------------------------------------------
    def instructions(self, round_index: int, plan: Plan) -> list[ClientInstruction]:
        cfg = self.cfg
        f = cfg.federation
        fault_rng = np.random.default_rng([cfg.job.seed, round_index, 2])
        out: list[ClientInstruction] = []
        for dp in plan.devices:
            u_drop, u_corrupt, u_kind = fault_rng.random(3)
            if not dp.participates:
                continue
            fault: str | None = None
            if u_drop < f.dropout_prob:
                fault = "drop"
            elif u_corrupt < f.corrupt_prob:
                fault = FAULT_KINDS[int(u_kind * len(FAULT_KINDS))]
            index = self.index[dp.device_id]
            out.append(
                ClientInstruction(
                    round=round_index,
                    device_id=dp.device_id,
                    device_index=index,
                    layers=dp.layers,
                    ranks=dp.ranks,
                    init_state=slice_for(self.global_state, dp.layers, dp.ranks),
                    local_steps=cfg.job_params.steps_for(self.fleet.devices[index]),
                    batch_size=cfg.train.batch_size,
                    learning_rate=cfg.train.learning_rate,
                    weight_decay=cfg.train.weight_decay,
                    loss=cfg.train.loss,
                    optimizer=cfg.train.optimizer,
                    build_prefix=self._builds_prefix(dp.device_id, dp.layers),
                    freeze_a=cfg.aggregation == "ffa",
                    seed=tuple(device_seed(cfg.job.seed, round_index, index)),
                    fault=fault,
                )
            )
        return out

    # -- 4. aggregation ------------------------------------------------------------------
    def _builds_prefix(self, device_id: str, layers: Sequence[int]) -> bool:
        """Whether a device computes its frozen-prefix features this round: the job caches
        them, it does not hold them yet, and its plan starts above layer 0 (reads them)."""
        return (
            self.cfg.train.cache_prefix
            and device_id not in self.prefix_built
            and min(layers, default=0) > 0
        )

    def finish_round(
        self,
        round_index: int,
        plan: Plan,
        replies: Sequence[ClientReply],
        *,
        missing: Sequence[str] = (),
        host_time_s: float = 0.0,
        server_time_s: float = 0.0,
        probe: Sequence[float] | None = None,
    ) -> RoundResult:
        """Check, aggregate and account one round.

        ``missing`` names devices that never replied (dropped out or timed out); the round
        then lasts until the server's timeout (``timeout_factor`` x the planned round time).
        ``probe`` is the server's probe of the global state the round started from (per
        layer; :meth:`ProgressModel.signals`), folded into the progress model with the
        devices' measurements.
        """
        f = self.cfg.federation
        accepted: list[ClientUpdate] = []
        decreases: list[tuple[float, ...]] = []
        rejected: dict[str, str] = {}
        by_id = {r.device_id: r for r in replies}
        dropped = set(missing) | {r.device_id for r in replies if r.dropped}
        for reply in replies:
            if reply.dropped:
                continue
            dp = plan.device(reply.device_id)
            problems = (
                ["no update"]
                if reply.state is None
                else check_update(
                    ClientUpdate(
                        device_id=reply.device_id,
                        num_samples=reply.num_samples,
                        state=reply.state,
                    ),
                    layers=dp.layers,
                    ranks=dp.ranks,
                    global_state=self.global_state,
                    frozen_a=self.cfg.aggregation == "ffa",
                )
            )
            if not math.isfinite(reply.train_loss) and not problems:
                problems = [f"training loss is {reply.train_loss}"]
            if problems:
                rejected[reply.device_id] = "; ".join(problems)
                log.warning(
                    "round %d: update of %s rejected: %s",
                    round_index,
                    reply.device_id,
                    rejected[reply.device_id],
                )
                continue
            assert reply.state is not None
            accepted.append(
                ClientUpdate(
                    device_id=reply.device_id, num_samples=reply.num_samples, state=reply.state
                )
            )
            decreases.append(reply.layer_decrease)
        for device_id in sorted(dropped):
            log.warning("round %d: device %s dropped out", round_index, device_id)
        predicted = self.predicted_progress(plan)
        if accepted:
            # what the updates say of layers and ranks, against the slices they started from
            self.progress_model.observe(
                self.progress_model.signals(self.global_state, accepted, decreases, probe)
            )
        rule = AGGREGATORS[self.cfg.aggregation]
        if accepted:
            self.global_state, self.optimizer_state = self.server_optimizer.step(
                self.global_state,
                rule(self.global_state, accepted),
                self.optimizer_state,
                trained=trained_slots(accepted),
            )
        else:
            log.warning("round %d: no valid update; the global adapter is unchanged", round_index)

        # Simulated clock: the slowest reply, or the timeout if someone never answered.
        answered = [r for r in replies if not r.dropped]
        finish = round_clock(self.topology, self.fleet, answered)
        slowest = max(finish.values(), default=0.0)
        if dropped:
            slowest = max(slowest, f.timeout_factor * plan.round_time_s)
        sim_round = slowest + server_time_s
        link_rows = (
            tuple(self._link_rows(round_index, answered, slowest))
            if self.topology is not None
            else ()
        )
        built = {
            r.device_id
            for r in answered
            if r.state is not None
            and self._builds_prefix(r.device_id, plan.device(r.device_id).layers)
        }
        self._update_estimates(replies, built)
        self.prefix_built |= built

        device_rows = []
        for dp in plan.devices:
            answer = by_id.get(dp.device_id)
            device = self.fleet[dp.device_id]
            if not dp.participates:
                status = "idle"
            elif dp.device_id in dropped:
                status = "dropped"
            elif dp.device_id in rejected:
                status = "rejected: " + rejected[dp.device_id]
            else:
                status = "ok"
            ok = answer is not None and not answer.dropped
            device_rows.append(
                {
                    "round": round_index,
                    "device_id": dp.device_id,
                    "device_class": device.device_class or "",
                    "status": status,
                    "layers": " ".join(map(str, dp.layers)),
                    "ranks": " ".join(map(str, dp.ranks)),
                    "depth": dp.depth,
                    "predicted_time_s": dp.predicted_time_s,
                    "observed_time_s": finish[dp.device_id] if ok else math.nan,
                    "predicted_compute_s": dp.predicted_compute_s,
                    "observed_compute_s": answer.sim_compute_s if ok and answer else math.nan,
                    "bytes_up": answer.upload_bytes if ok and answer else 0.0,
                    "bytes_down": dp.predicted_download_bytes if dp.participates else 0.0,
                    "memory_bytes": dp.predicted_memory_bytes,
                    "train_loss": answer.train_loss if ok and answer else math.nan,
                    "samples": answer.num_samples if ok and answer else 0,
                    "host_time_s": answer.host_time_s if answer else 0.0,
                    "waiting_s": (sim_round - finish[dp.device_id]) if ok else math.nan,
                }
            )
        waits = [
            r["waiting_s"]
            for r in device_rows
            if r["status"] == "ok" or r["status"].startswith("rejected")
        ]
        round_row = {
            "round": round_index,
            "sim_time_s": sim_round,
            "host_time_s": host_time_s,
            "bytes_up": sum(r["bytes_up"] for r in device_rows),
            "bytes_down": sum(r["bytes_down"] for r in device_rows),
            "participants": len(accepted),
            "planned": len(plan.participants),
            "dropped": len(dropped),
            "rejected": len(rejected),
            "waiting_mean_s": float(np.mean(waits)) if waits else 0.0,
            "waiting_max_s": float(np.max(waits)) if waits else 0.0,
            "planned_round_time_s": plan.round_time_s,
            "server_time_s": server_time_s,
            "predicted_progress": predicted,
            "solver_status": plan.status,
            "solve_time_s": plan.solve_time_s,
        }
        return RoundResult(
            round=round_index,
            plan=plan,
            global_state=self.global_state,
            optimizer_state=self.optimizer_state,
            round_row=round_row,
            device_rows=tuple(device_rows),
            estimates=dict(self.estimates),
            rejected=rejected,
            link_rows=link_rows,
        )

    def _link_rows(
        self, round_index: int, answered: Sequence[ClientReply], round_s: float
    ) -> list[dict[str, Any]]:
        """``links.csv`` rows: each link's bytes this round, utilisation and whether it binds.

        Utilisation is bytes through the link / (capacity x the devices' round time); a link
        *binds* when doubling its capacity would end the round sooner on the same clock.
        """
        topo = self.topology
        assert topo is not None
        by_link: dict[int, list[ClientReply]] = {}
        for r in answered:
            for e in topo.routes[r.device_id]:
                by_link.setdefault(e, []).append(r)
        rows = []
        for e, link in enumerate(topo.links):
            on = by_link.get(e)
            if not on:
                continue
            up = sum(r.upload_bytes for r in on)
            down = sum(r.download_bytes for r in on)
            binding = False
            if len(on) > 1 and round_s > 0:
                wider = round_clock(topo.with_capacity(e, factor=2.0), self.fleet, answered)
                binding = max(wider.values(), default=0.0) < round_s * (1 - 1e-9)
            rows.append(
                {
                    "round": round_index,
                    "link": link.name,
                    "up_bytes": up,
                    "down_bytes": down,
                    "utilisation_up": up * 8 / (link.up_mbps * 1e6 * round_s) if round_s else 0.0,
                    "utilisation_down": (
                        down * 8 / (link.down_mbps * 1e6 * round_s) if round_s else 0.0
                    ),
                    "binding": binding,
                }
            )
        return rows

    def _update_estimates(self, replies: Sequence[ClientReply], built: set[str]) -> None:
        """EMA capacity estimation from observed compute time and link throughput (``built``:
        the devices that also computed their frozen-prefix features)."""
        rho = self.cfg.federation.ema
        for reply in replies:
            if reply.dropped or reply.sim_compute_s <= 0:
                continue
            dp = self.last_plan.device(reply.device_id) if self.last_plan else None
            if dp is None or not dp.participates:
                continue
            device = self.fleet[reply.device_id]
            tflops, up, down = self.estimates[reply.device_id]
            flops = self.cfg.job_params.steps_for(device) * self.costs.step_flops(
                dp.layers, dp.ranks
            )
            if reply.device_id in built:
                flops += self.costs.prefix_build_flops(reply.num_samples)
            obs_tflops = flops / reply.sim_compute_s / 1e12
            obs_up = (
                reply.upload_bytes * 8 / reply.sim_upload_s / 1e6 if reply.sim_upload_s > 0 else up
            )
            obs_down = (
                reply.download_bytes * 8 / reply.sim_download_s / 1e6
                if reply.sim_download_s > 0
                else down
            )
            self.estimates[reply.device_id] = (
                rho * tflops + (1 - rho) * obs_tflops,
                rho * up + (1 - rho) * obs_up,
                rho * down + (1 - rho) * obs_down,
            )


def restrict_topology(topology: Topology, device_ids: Sequence[str]) -> Topology:
    """``topology`` with routes for ``device_ids`` only (a round's sample of the fleet)."""
    keep = set(device_ids)
    return replace(topology, routes={d: r for d, r in topology.routes.items() if d in keep})


def round_clock(
    topology: Topology | None, fleet: Fleet, replies: Sequence[ClientReply]
) -> dict[str, float]:
    """Each answering device's finish time in the round on the simulated clock.

    Without a topology a device finishes at its own ``sim_time_s`` (a private link).
    With one, the round runs on :func:`~legend.planner.topology.simulate_round`: every
    device downloads from time 0, computes for ``sim_compute_s``, then uploads; transfers
    through a shared link share it max-min fairly, each capped by the device's own rate in
    this round (``bytes / sim_*_s``, so jitter carries over).
    """
    if topology is None or not replies:
        return {r.device_id: r.sim_time_s for r in replies}
    devices = []
    for r in replies:
        base = fleet[r.device_id]
        up, down = base.uplink_mbps, base.downlink_mbps
        if r.sim_upload_s > 0 and r.upload_bytes > 0:
            up = r.upload_bytes * 8 / r.sim_upload_s / 1e6
        if r.sim_download_s > 0 and r.download_bytes > 0:
            down = r.download_bytes * 8 / r.sim_download_s / 1e6
        devices.append(replace(base, uplink_mbps=up, downlink_mbps=down))
    finish = simulate_round(
        restrict_topology(topology, [r.device_id for r in replies]),
        devices,
        [r.sim_compute_s for r in replies],
        [max(r.upload_bytes, r.download_bytes) for r in replies],
    )
    return {r.device_id: t for r, t in zip(replies, finish, strict=True)}


class ClientCore:
    """Client logic: train a device's plan on the shared base model and report.

    Parameters
    ----------
    host
        The :class:`~legend.federation.apply.AdapterHost` holding the frozen base model.
    costs
        The cost model the simulated clock uses (calibrated when the run is).
    jitter
        Sigma of the log-normal noise on simulated compute and link times.
    """

    def __init__(self, host: Any, costs: CostModel, *, jitter: float = 0.0) -> None:
        self.host = host
        self.costs = costs
        self.jitter = jitter

    def train(
        self,
        instruction: ClientInstruction,
        profile: DeviceProfile,
        batches: Any,
    ) -> ClientReply:
        """Train one round. ``batches`` is a :class:`~legend.federation.training.DeviceData`."""
        from legend.federation.training import LayerDecrease, train_steps

        ins = instruction
        dp = DevicePlan(device_id=ins.device_id, layers=ins.layers, ranks=ins.ranks)
        cost = self.costs.evaluate(profile, ins.layers, ins.ranks)
        rng = np.random.default_rng([*list(ins.seed), 3])
        noise = rng.lognormal(0.0, self.jitter, size=3) if self.jitter > 0 else np.ones(3)
        if ins.fault == "drop":
            return ClientReply(
                round=ins.round,
                device_id=ins.device_id,
                state=None,
                num_samples=0,
                train_loss=math.nan,
                steps=0,
                host_time_s=0.0,
                sim_compute_s=0.0,
                sim_download_s=0.0,
                sim_upload_s=0.0,
                download_bytes=cost.download_bytes,
                upload_bytes=0.0,
                memory_bytes=cost.memory_bytes,
                dropped=True,
            )
        compute_s = cost.compute_s
        if ins.build_prefix:
            compute_s += self.costs.prefix_build_s(profile, batches.num_samples)
        start = time.perf_counter()
        with self.host.activate(dp, ins.init_state, freeze_a=ins.freeze_a) as model:
            decrease = LayerDecrease(self.host.layer_parameters())
            loss = train_steps(
                model,
                batches,
                steps=ins.local_steps,
                batch_size=ins.batch_size,
                learning_rate=ins.learning_rate,
                weight_decay=ins.weight_decay,
                loss=ins.loss,
                optimizer=ins.optimizer,
                seed=ins.seed,
                decrease=decrease,
                # the frozen layers below the lowest adapted one come from the device's cache
                prefix_layers=min(ins.layers, default=0) if self.costs.job.cache_prefix else 0,
            )
            state = self.host.extract()
        host_time = time.perf_counter() - start
        if ins.fault is not None:
            state = corrupt(state, ins.fault)
        return ClientReply(
            round=ins.round,
            device_id=ins.device_id,
            state=state,
            num_samples=batches.num_samples,
            train_loss=loss,
            steps=ins.local_steps,
            host_time_s=host_time,
            sim_compute_s=compute_s * float(noise[0]),
            sim_download_s=cost.download_s * float(noise[1]),
            sim_upload_s=cost.upload_s * float(noise[2]),
            download_bytes=cost.download_bytes,
            upload_bytes=cost.upload_bytes,
            memory_bytes=cost.memory_bytes,
            layer_decrease=decrease.per_layer(self.costs.spec.num_layers),
        )


def corrupt(state: AdapterState, kind: str) -> AdapterState:
    """A broken copy of an update, for fault-injection runs and tests."""
    factors = {k: (a.copy(), b.copy()) for k, (a, b) in state.factors.items()}
    head = {k: v.copy() for k, v in state.head.items()}
    key = sorted(factors)[0]
    a, b = factors[key]
    if kind == "nan":
        a[0, 0] = np.nan
    elif kind == "inf":
        b[0, 0] = np.inf
    elif kind == "shape":
        factors[key] = (a[:, :-1].copy(), b)
    elif kind == "rank":
        factors[key] = (np.concatenate([a, a[:1]], axis=0), np.concatenate([b, b[:, :1]], axis=1))
    elif kind == "keys":
        del factors[key]
        factors[(key[0], "not_a_module")] = (a, b)
    else:
        raise ValueError(f"unknown fault kind {kind!r}; expected one of {FAULT_KINDS}")
    return AdapterState(factors=factors, head=head)
