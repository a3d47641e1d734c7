"""The Plan: an immutable, versioned, JSON-serialisable per-round configuration.

A :class:`Plan` holds one :class:`DevicePlan` per device of the round (devices the program
left out have ``layers == ()``), the solver's name, version, status, MIP gap and solve time,
and a digest of the inputs it was computed from. :func:`validate_plan` re-checks a plan
against the fleet and cost model without using any code of the formulation.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from legend.models.spec import ModelSpec
from legend.planner.costs import ConfigCost, CostModel
from legend.planner.errors import PlannerInputError
from legend.planner.profiles import Fleet, JobParams

__all__ = [
    "SCHEMA_VERSION",
    "STATUSES",
    "DevicePlan",
    "Plan",
    "PlanViolation",
    "inputs_digest",
    "validate_plan",
]

SCHEMA_VERSION = 1
# Our solver statuses; a Plan exists only for OPTIMAL or FEASIBLE.
STATUSES = ("OPTIMAL", "FEASIBLE", "INFEASIBLE", "UNBOUNDED", "NOT_SOLVED", "ERROR")


@dataclass(frozen=True, kw_only=True)
class DevicePlan:
    """One device's configuration for a round and its predicted costs.

    ``layers`` are 0-based, ascending, 0 next to the embeddings; ``ranks`` has one entry per
    layer. An empty ``layers`` means the device sits the round out.
    """

    device_id: str
    layers: tuple[int, ...]
    ranks: tuple[int, ...]
    predicted_time_s: float = 0.0
    predicted_compute_s: float = 0.0
    predicted_download_s: float = 0.0
    predicted_upload_s: float = 0.0
    predicted_upload_bytes: float = 0.0
    predicted_download_bytes: float = 0.0
    predicted_memory_bytes: float = 0.0
    trainable_params: int = 0
    utility: float = 0.0

    def __post_init__(self) -> None:
        for name in ("layers", "ranks"):
            value = getattr(self, name)
            if type(value) is not tuple or not all(type(v) is int for v in value):
                object.__setattr__(self, name, tuple(int(v) for v in value))

    @property
    def participates(self) -> bool:
        return bool(self.layers)

    @property
    def depth(self) -> int:
        return len(self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "layers": list(self.layers),
            "ranks": list(self.ranks),
            "predicted_time_s": self.predicted_time_s,
            "predicted_compute_s": self.predicted_compute_s,
            "predicted_download_s": self.predicted_download_s,
            "predicted_upload_s": self.predicted_upload_s,
            "predicted_upload_bytes": self.predicted_upload_bytes,
            "predicted_download_bytes": self.predicted_download_bytes,
            "predicted_memory_bytes": self.predicted_memory_bytes,
            "trainable_params": self.trainable_params,
            "utility": self.utility,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DevicePlan:
        return cls(**{k: data[k] for k in data if k in cls.__dataclass_fields__})


@dataclass(frozen=True, kw_only=True)
class Plan:
    """A round's plan. Serialise with :meth:`to_json`, read back with :meth:`from_json`."""

    devices: tuple[DevicePlan, ...]
    status: str
    solver: str
    objective: str
    objective_value: float
    round_time_s: float
    utility: float = 0.0
    mip_gap: float | None = None
    objective_bound: float | None = None
    solver_version: str = ""
    solve_time_s: float = 0.0
    model: str = ""
    num_layers: int = 0
    ranks: tuple[int, ...] = ()
    inputs_digest: str = ""
    round: int | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    job: Mapping[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise PlannerInputError(f"plan `status` must be one of {STATUSES}, got {self.status!r}")
        object.__setattr__(self, "devices", tuple(self.devices))
        object.__setattr__(self, "ranks", tuple(self.ranks))

    # -- access -------------------------------------------------------------------------
    def device(self, device_id: str) -> DevicePlan:
        for d in self.devices:
            if d.device_id == device_id:
                return d
        raise KeyError(device_id)

    @property
    def participants(self) -> tuple[DevicePlan, ...]:
        return tuple(d for d in self.devices if d.participates)

    @property
    def total_upload_bytes(self) -> float:
        return sum(d.predicted_upload_bytes for d in self.devices)

    @property
    def total_download_bytes(self) -> float:
        return sum(d.predicted_download_bytes for d in self.devices)

    # -- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "status": self.status,
            "solver": self.solver,
            "solver_version": self.solver_version,
            "objective": self.objective,
            "objective_value": self.objective_value,
            "round_time_s": self.round_time_s,
            "utility": self.utility,
            "mip_gap": self.mip_gap,
            "objective_bound": self.objective_bound,
            "solve_time_s": self.solve_time_s,
            "model": self.model,
            "num_layers": self.num_layers,
            "ranks": list(self.ranks),
            "inputs_digest": self.inputs_digest,
            "round": self.round,
            "options": dict(self.options),
            "job": dict(self.job),
            "devices": [d.to_dict() for d in self.devices],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(self.to_json() + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<plan>") -> Plan:
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise PlannerInputError(
                f"{source}: plan `schema_version` is {version!r}, this legend reads version "
                f"{SCHEMA_VERSION}; re-create the plan with `legend plan`"
            )
        required = ("status", "solver", "objective", "objective_value", "round_time_s", "devices")
        for key in required:
            if key not in data:
                raise PlannerInputError(f"{source}: plan is missing the field `{key}`")
        fields = {k: data[k] for k in data if k in cls.__dataclass_fields__ and k != "devices"}
        fields["ranks"] = tuple(data.get("ranks", ()))
        fields["options"] = dict(data.get("options") or {})
        fields["job"] = dict(data.get("job") or {})
        devices = tuple(DevicePlan.from_dict(d) for d in data["devices"])
        return cls(devices=devices, **fields)

    @classmethod
    def from_json(cls, text: str, source: str = "<plan>") -> Plan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlannerInputError(f"{source}: plan is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise PlannerInputError(f"{source}: plan must be a JSON object")
        return cls.from_dict(data, source=source)

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        path = Path(path)
        if not path.is_file():
            raise PlannerInputError(f"plan file {path} does not exist")
        return cls.from_json(path.read_text(), source=str(path))


def inputs_digest(*parts: Any) -> str:
    """A short SHA-256 of JSON-serialisable inputs (fleet records, model, job, options)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True, kw_only=True)
class PlanViolation:
    device_id: str | None
    constraint: str
    detail: str

    def __str__(self) -> str:
        who = f"device {self.device_id!r}" if self.device_id else "plan"
        return f"{who}: {self.constraint}: {self.detail}"


def validate_plan(
    plan: Plan,
    fleet: Fleet,
    spec: ModelSpec,
    job: JobParams,
    *,
    deadline_s: float | None = None,
    monotone_ranks: bool = True,
    min_depth: int = 1,
    require_all: bool = True,
    server_mbps: float | None = None,
    cost_model: CostModel | None = None,
    rel_tol: float = 1e-6,
    topology: Any = None,
) -> list[PlanViolation]:
    """Check a plan independently of the formulation; return every violation (empty: valid).

    Checks: every device of the fleet appears once; layers are ascending, contiguous and end
    at the last layer; ranks come from the grid and (by default) do not decrease toward the
    output; memory fits; every participant finishes within ``deadline_s`` (default: the
    plan's ``round_time_s``); predictions match a fresh evaluation of the cost model; the
    server link (``server_mbps``) carries the round's bytes within the round time.

    With a ``topology``: every link carries the round's bytes each way within the round
    time, and every participant behind a congested link (one whose devices could together
    send faster than its capacity, in a direction) finishes within ``deadline_s`` (and the
    plan's ``round_time_s``) while sharing it: its compute time plus, in each congested
    direction, all of the link's bytes at the link's capacity, in the other its own
    transfer (docs/topology.md).
    """
    costs = cost_model or CostModel(spec, job)
    out: list[PlanViolation] = []

    def bad(device_id: str | None, constraint: str, detail: str) -> None:
        out.append(PlanViolation(device_id=device_id, constraint=constraint, detail=detail))

    if plan.status not in ("OPTIMAL", "FEASIBLE"):
        bad(None, "status", f"a plan must be OPTIMAL or FEASIBLE, got {plan.status}")
    ids = [d.device_id for d in plan.devices]
    fleet_ids = set(fleet.device_ids)
    by_id = {d.device_id: d for d in fleet.devices}
    for dup in sorted(i for i, n in Counter(ids).items() if n > 1):
        bad(dup, "unique", "appears more than once")
    for extra in sorted(set(ids) - fleet_ids):
        bad(extra, "fleet", "is not in the fleet")
    for missing in sorted(fleet_ids - set(ids)):
        bad(missing, "fleet", "has no entry in the plan")
    limit = plan.round_time_s if deadline_s is None else deadline_s
    grid = set(job.ranks)
    L = spec.num_layers
    total_bytes = 0.0
    evaluated: dict[str, ConfigCost] = {}
    for dp in plan.devices:
        if dp.device_id not in fleet_ids:
            continue
        device = by_id[dp.device_id]
        if not dp.layers:
            if require_all:
                bad(dp.device_id, "participation", "every device must participate")
            continue
        if len(dp.layers) != len(dp.ranks):
            bad(dp.device_id, "shape", f"{len(dp.layers)} layers but {len(dp.ranks)} ranks")
            continue
        expected = tuple(range(L - len(dp.layers), L))
        if dp.layers != expected:
            bad(
                dp.device_id,
                "contiguous",
                f"layers {list(dp.layers)} must be the top block {list(expected)}",
            )
            continue
        if len(dp.layers) < min_depth:
            bad(dp.device_id, "min_depth", f"depth {len(dp.layers)} < {min_depth}")
        off_grid = [r for r in dp.ranks if r not in grid]
        if off_grid:
            bad(dp.device_id, "rank_grid", f"ranks {off_grid} not in {sorted(grid)}")
            continue
        if monotone_ranks and any(b < a for a, b in zip(dp.ranks, dp.ranks[1:], strict=False)):
            bad(dp.device_id, "monotone", f"ranks {list(dp.ranks)} decrease toward the output")
        cost = costs.evaluate(device, dp.layers, dp.ranks)
        evaluated[dp.device_id] = cost
        total_bytes += cost.upload_bytes + cost.download_bytes
        if cost.memory_bytes > device.memory_bytes * (1 + rel_tol):
            bad(
                dp.device_id,
                "memory",
                f"needs {cost.memory_bytes / 1e9:.3f} GB > {device.memory_gb:.3f} GB",
            )
        if cost.time_s > limit * (1 + rel_tol) + 1e-9:
            bad(dp.device_id, "deadline", f"takes {cost.time_s:.3f} s > {limit:.3f} s")
        for name, predicted, actual in (
            ("predicted_time_s", dp.predicted_time_s, cost.time_s),
            ("predicted_upload_bytes", dp.predicted_upload_bytes, cost.upload_bytes),
            ("predicted_memory_bytes", dp.predicted_memory_bytes, cost.memory_bytes),
        ):
            if not math.isclose(predicted, actual, rel_tol=1e-6, abs_tol=1e-9):
                bad(dp.device_id, "prediction", f"{name} {predicted} != cost model {actual}")
    participants_time = [d.predicted_time_s for d in plan.devices if d.layers]
    if participants_time and plan.round_time_s + 1e-9 < max(participants_time) * (1 - rel_tol):
        bad(None, "round_time", f"round_time_s {plan.round_time_s} < slowest device")
    if topology is not None:
        _check_links(plan, fleet, topology, evaluated, limit, rel_tol, bad)
    if server_mbps is not None and plan.round_time_s > 0:
        capacity = server_mbps * 1e6 / 8 * plan.round_time_s
        if total_bytes > capacity * (1 + rel_tol):
            bad(None, "server_link", f"{total_bytes:.0f} bytes > {capacity:.0f} in the round")
        if deadline_s is not None and plan.round_time_s > deadline_s * (1 + rel_tol) + 1e-9:
            bad(
                None,
                "server_link",
                f"round_time_s {plan.round_time_s:.3f} with the server link > deadline "
                f"{deadline_s:.3f} s",
            )
    return out


def _check_links(
    plan: Plan,
    fleet: Fleet,
    topology: Any,
    evaluated: Mapping[str, ConfigCost],
    limit: float,
    rel_tol: float,
    bad: Callable[[str | None, str, str], None],
) -> None:
    """The topology's part of :func:`validate_plan`, from the links and the profiles alone."""
    fleet_ids = set(fleet.device_ids)
    slowest = 0.0
    for k, link in enumerate(topology.links):
        behind = [d for d in topology.devices_on(k) if d in fleet_ids]
        users = [d for d in behind if d in evaluated]
        if not users:
            continue
        up = sum(evaluated[d].upload_bytes for d in users)
        down = sum(evaluated[d].download_bytes for d in users)
        if plan.round_time_s > 0:
            # every link carries the round's bytes each way within the round time
            for way, nbytes, mbps in (("up", up, link.up_mbps), ("down", down, link.down_mbps)):
                cap = mbps * 1e6 / 8 * plan.round_time_s
                if nbytes > cap * (1 + rel_tol):
                    bad(None, f"link {link.name} {way}", f"{nbytes:.0f} bytes > {cap:.0f}")
        up_congested = sum(fleet[d].uplink_mbps for d in behind) > link.up_mbps * (1 + 1e-12)
        down_congested = sum(fleet[d].downlink_mbps for d in behind) > link.down_mbps * (1 + 1e-12)
        if not (up_congested or down_congested):
            continue
        up_s, down_s = up * 8 / (link.up_mbps * 1e6), down * 8 / (link.down_mbps * 1e6)
        staggered = topology.contention == "staggered"
        jobs = []
        for d in users:
            c = evaluated[d]
            if staggered:
                # uploads released when the device's compute ends; they share the link
                release = (down_s if down_congested else c.download_s) + c.compute_s
                jobs.append((release, c.upload_bytes, min(fleet[d].uplink_mbps, link.up_mbps)))
                t = release + c.upload_s
            else:
                t = (
                    c.compute_s
                    + (down_s if down_congested else c.download_s)
                    + (up_s if up_congested else c.upload_s)
                )
            slowest = max(slowest, t)
            if t > limit * (1 + rel_tol) + 1e-9:
                bad(d, "contention", f"takes {t:.3f} s sharing {link.name} > {limit:.3f} s")
        if staggered and up_congested and jobs:
            # every moment theta: the bytes still to send need the link's capacity
            cap = link.up_mbps * 1e6 / 8
            thetas = [r for r, _, _ in jobs] + [r + b * 8 / (m * 1e6) for r, b, m in jobs]
            t = max(
                th
                + sum(min(b, max(0.0, b - max(0.0, th - r) * m * 1e6 / 8)) for r, b, m in jobs)
                / cap
                for th in thetas
            )
            slowest = max(slowest, t)
            if t > limit * (1 + rel_tol) + 1e-9:
                bad(
                    None,
                    "contention",
                    f"uploads through {link.name} take {t:.3f} s > {limit:.3f} s",
                )
    if limit != plan.round_time_s and slowest > plan.round_time_s * (1 + rel_tol) + 1e-9:
        bad(
            None,
            "round_time",
            f"round_time_s {plan.round_time_s} < {slowest:.3f} s with link contention",
        )
