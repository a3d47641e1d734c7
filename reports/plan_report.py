"""The plan report: what one round of a plan costs, who waits and which constraints bind.

:func:`build_plan_report` turns a :class:`~legend.planner.plan.Plan` (and, when given, the
fleet it was planned for) into a :class:`~legend.reports.render.Report`:

- headline numbers and the solver's name, version, status, MIP gap and solve time;
- a fleet summary by device class;
- the per-device configuration table (depth, layers, ranks, predicted time, bytes, memory);
- a depth-and-rank heatmap (devices x layers), a round timeline (download, compute, upload
  and idle per device, sorted by finish time), memory use vs capacity and bytes per device;
- which constraints bind for which devices.

Per-device plots switch to one row per device class (or per distinct configuration, or per
finish-time bucket when the fleet has no classes) above ``per_device_limit`` devices, so a
1,000-device report stays readable; the CSV tables always have one row per device.

"Which constraint binds" for a device: its deadline slack (round time minus its time), its
memory slack (capacity minus predicted memory), whether it sits at the deepest depth or the
largest rank, and, when the job's cost model is known (the fleet is given and the plan's
predictions are reproduced), what stops it from taking the next larger configuration: every
one-step move (one more layer at the lowest rank, or one layer one rank up) would exceed
the time it may use (the round time, or the deadline under objective ``deadline``:
``deadline``), its memory (``memory``) or the server link's capacity over the round
(``server link``, when the plan has ``server_mbps``); several names joined by ``+`` when
every move breaks each of them, by ``/`` when different moves break different ones;
``largest config`` when no move exists. At an exact optimum of objective ``deadline`` no
device is left with a move that fits.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from legend.models.errors import LegendError
from legend.models.spec import get_model_spec
from legend.planner.costs import ConfigCost, CostModel
from legend.planner.diagnose import config_blocks
from legend.planner.greedy import larger_configurations
from legend.planner.plan import SCHEMA_VERSION, DevicePlan, Plan
from legend.planner.profiles import DeviceProfile, Fleet, JobParams
from legend.planner.topology import Topology, link_times
from legend.reports.errors import ReportInputError
from legend.reports.links import (
    MAX_REPLANS,
    Replanner,
    binding_links,
    link_figure,
    link_frame,
    options_from_plan,
)
from legend.reports.render import (
    Figure,
    KeyValues,
    Paragraph,
    Report,
    Section,
    Table,
    figure_png,
    format_value,
    new_figure,
    short_list,
)

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "PER_DEVICE_LIMIT",
    "PlanContext",
    "build_plan_report",
    "device_frame",
    "load_job_params",
    "load_plan",
    "resolve_cost_model",
]

PER_DEVICE_LIMIT = 60
MB = 1e6
GB = 1e9
# Colours of the timeline phases.
PHASE_COLOURS = {
    "download": "#4c8bf5",
    "compute": "#f29d38",
    "upload": "#34a853",
    "idle": "#e4e7ee",
}


@dataclass(frozen=True, kw_only=True)
class PlanContext:
    """A plan with what a report can know about it.

    ``costs`` is the cost model that reproduces the plan's predictions (``None`` when the
    fleet or the job is unknown); ``cost_note`` says where it came from.
    """

    plan: Plan
    fleet: Fleet | None = None
    costs: CostModel | None = None
    cost_note: str = ""
    source: str = ""
    topology: Topology | None = None


# -- loading -----------------------------------------------------------------------------


def load_plan(path: str | Path) -> tuple[Plan, dict[str, Any]]:
    """Read a plan file; every problem names the file and what to do.

    Returns the plan and its raw JSON object (which may carry fields a newer planner adds,
    such as ``job``).
    """
    path = Path(path)
    if not path.is_file():
        raise ReportInputError(
            f"plan file {path} does not exist; create one with `legend plan --out {path}`"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportInputError(f"plan file {path} is not readable JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ReportInputError(f"plan file {path} must hold a JSON object (a legend plan)")
    version = raw.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ReportInputError(
            f"plan file {path} has `schema_version` {version!r}; this legend reads plan "
            f"schema version {SCHEMA_VERSION}; re-create the plan with `legend plan`"
        )
    try:
        plan = Plan.from_dict(raw, source=str(path))
    except LegendError as exc:
        raise ReportInputError(str(exc)) from None
    except (TypeError, ValueError, KeyError) as exc:
        raise ReportInputError(f"plan file {path} is not a legend plan: {exc}") from None
    if not plan.devices:
        raise ReportInputError(f"plan file {path} lists no devices; nothing to report")
    return plan, raw


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value >= 0


def check_plan_values(plan: Plan, source: str) -> None:
    """What every plan must satisfy whatever its fleet: finite non-negative times, bytes and
    memory, a known model with the plan's ``num_layers``, layers and ranks inside the model
    and the grid, every device once. Raises :class:`ReportInputError` naming the field."""
    problems: list[str] = []
    for name in ("round_time_s", "objective_value", "utility", "solve_time_s"):
        if not _finite(getattr(plan, name)):
            problems.append(f"`{name}` = {getattr(plan, name)!r} (must be finite and >= 0)")
    try:
        num_layers = get_model_spec(plan.model).num_layers if plan.model else plan.num_layers
    except LegendError:
        raise ReportInputError(
            f"plan file {source}: `model` = {plan.model!r} is not a known model; pass the "
            "plan of a model legend knows (or its directory) or re-create the plan"
        ) from None
    if plan.num_layers != num_layers:
        problems.append(
            f"`num_layers` = {plan.num_layers} but model {plan.model!r} has {num_layers}"
        )
    grid = set(plan.ranks)
    seen: set[str] = set()
    for dp in plan.devices:
        where = f"device {dp.device_id!r}"
        if dp.device_id in seen:
            problems.append(f"{where} appears more than once")
        seen.add(dp.device_id)
        for name in (
            "predicted_time_s",
            "predicted_upload_bytes",
            "predicted_download_bytes",
            "predicted_memory_bytes",
        ):
            value = getattr(dp, name, 0.0)
            if not _finite(value):
                problems.append(f"{where}: `{name}` = {value!r} (must be finite and >= 0)")
        outside = [layer for layer in dp.layers if not 0 <= layer < num_layers]
        if outside:
            problems.append(f"{where}: layers {outside} outside 0..{num_layers - 1}")
        off = sorted(set(dp.ranks) - grid)
        if off:
            problems.append(f"{where}: ranks {off} not in the plan's grid {sorted(grid)}")
        if len(problems) >= 5:
            break
    if problems:
        raise ReportInputError(
            f"plan file {source} is not a valid plan: " + "; ".join(problems[:5])
        )


def check_plan_inputs(
    plan: Plan,
    fleet: Fleet,
    source: str,
    *,
    job: JobParams | None = None,
    raw: Mapping[str, Any] | None = None,
    model: str | None = None,
    topology: Topology | None = None,
) -> list[str]:
    """Validate ``plan`` against the fleet it is reported with (``validate_plan``) and its
    recorded inputs digest; raise :class:`ReportInputError` naming every violation, return
    warnings for what cannot be decided (a plan made with a calibration)."""
    from legend.planner.api import PlannerOptions, PlanningProblem
    from legend.planner.plan import validate_plan

    check_fleet(plan, fleet, source)
    costs, _ = resolve_cost_model(plan, fleet, job=job, raw=raw, model=model)
    if costs is None:
        return []
    reproduces = _reproduces(plan, fleet, costs)
    # the plan's own options (keys of older versions, such as bucketing, are left out)
    try:
        planner_options = options_from_plan(plan) if plan.options else PlannerOptions()
    except ReportInputError as exc:
        raise ReportInputError(f"plan file {source}: `options` are not valid: {exc}") from None
    violations = validate_plan(
        plan,
        fleet,
        costs.spec,
        costs.job,
        monotone_ranks=planner_options.monotone_ranks,
        min_depth=planner_options.min_depth,
        require_all=not planner_options.allow_dropping,
        server_mbps=planner_options.server_mbps,
        cost_model=costs,
        topology=topology,
    )
    if not reproduces:
        violations = [v for v in violations if v.constraint != "prediction"]
    if violations:
        shown = "; ".join(
            f"{v.device_id + ': ' if v.device_id else ''}{v.constraint}: {v.detail}"
            for v in violations[:5]
        )
        more = f" (and {len(violations) - 5} more)" if len(violations) > 5 else ""
        raise ReportInputError(
            f"plan file {source} does not hold for fleet {fleet.source}: {shown}{more}; "
            "re-plan with `legend plan` or give the fleet the plan was made for"
        )
    if not plan.inputs_digest:
        return []
    try:
        digest = PlanningProblem.create(
            fleet, costs.spec, costs.job, planner_options, topology=topology
        ).digest()
    except LegendError:
        return []
    if digest == plan.inputs_digest:
        return []
    retired = sorted(set(plan.options or {}) - set(PlannerOptions.__dataclass_fields__))
    if retired:
        # options of an older legend enter its digest: the digest cannot be reproduced
        return [
            f"plan file {source} was made by an older legend (options "
            f"{', '.join(retired)}); its inputs digest cannot be checked, the plan was "
            "validated against the fleet"
        ]
    message = (
        f"fleet {fleet.source} (or the job, model or options) is not what plan file {source} "
        f"was computed from: inputs digest {digest} != {plan.inputs_digest} recorded in the plan"
    )
    if reproduces:
        raise ReportInputError(
            message + "; re-plan with `legend plan` or give the fleet the plan was made for"
        )
    return [message + " (a plan made with a calibration cannot be checked)"]


def load_job_params(path: str | Path) -> JobParams:
    """Job parameters from a ``.toml`` or ``.json`` file: top level, or the ``[job]`` and
    ``[train]`` tables of a ``legend run`` job file (a run directory's ``config.toml``)."""
    import tomllib

    path = Path(path)
    if not path.is_file():
        raise ReportInputError(f"job file {path} does not exist")
    text = path.read_text(encoding="utf-8-sig")
    try:
        data = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ReportInputError(f"job file {path} is not valid: {exc}") from None
    if not isinstance(data, dict):
        raise ReportInputError(f"job file {path} must hold a table of job parameters")
    if "job" in data or "train" in data:
        # A `legend run` job file (or its run directory's config.toml): parameters live in
        # [train], a few may sit in [job].
        merged: dict[str, Any] = {}
        for section in ("job", "train"):
            table = data.get(section, {})
            if isinstance(table, dict):
                merged.update(table)
        data = merged
    if not set(data) & set(JobParams.__dataclass_fields__):
        raise ReportInputError(
            f"job file {path} has no job parameters; expected some of "
            f"{', '.join(JobParams.__dataclass_fields__)} (top level, [job] or [train])"
        )
    return job_from_mapping(data, str(path))


def job_from_mapping(data: Any, source: str) -> JobParams:
    if not isinstance(data, Mapping):
        raise ReportInputError(f"{source}: job parameters must be a table/object")
    allowed = set(JobParams.__dataclass_fields__)
    fields = {k: v for k, v in data.items() if k in allowed}
    if isinstance(fields.get("target_modules"), list):
        fields["target_modules"] = tuple(fields["target_modules"])
    if isinstance(fields.get("ranks"), list):
        fields["ranks"] = tuple(fields["ranks"])
    try:
        return JobParams(**fields)
    except LegendError as exc:
        raise ReportInputError(f"{source}: {exc}") from None
    except TypeError as exc:
        raise ReportInputError(f"{source}: bad job parameters: {exc}") from None


def check_fleet(plan: Plan, fleet: Fleet, plan_source: str) -> None:
    """The fleet must hold every device of the plan."""
    fleet_ids = set(fleet.device_ids)
    missing = [d.device_id for d in plan.devices if d.device_id not in fleet_ids]
    if missing:
        raise ReportInputError(
            f"fleet {fleet.source} lacks {len(missing)} device(s) of plan {plan_source}: "
            f"{short_list(missing)}; give the fleet the plan was made for"
        )


def _reproduces(plan: Plan, fleet: Fleet, costs: CostModel) -> bool:
    for dp in plan.participants:
        cost = costs.evaluate(fleet[dp.device_id], dp.layers, dp.ranks)
        for predicted, actual in (
            (dp.predicted_time_s, cost.time_s),
            (dp.predicted_upload_bytes, cost.upload_bytes),
            (dp.predicted_memory_bytes, cost.memory_bytes),
        ):
            if abs(predicted - actual) > 1e-6 * max(abs(actual), 1e-9):
                return False
    return True


def resolve_cost_model(
    plan: Plan,
    fleet: Fleet | None,
    *,
    job: JobParams | None = None,
    raw: Mapping[str, Any] | None = None,
    model: str | None = None,
) -> tuple[CostModel | None, str]:
    """The cost model behind a plan, and a note saying where it came from.

    Candidates in order: ``job`` (given explicitly, used even if it does not reproduce the
    plan, with a note); a ``job`` object in the plan file; the default job with the plan's
    rank grid and each target-module preset. An inferred candidate is used only if it
    reproduces every participant's predicted time, bytes and memory.
    """
    if fleet is None:
        return None, "no fleet given: capacities, slacks against memory and moves unknown"
    model_name = model or plan.model
    if not model_name:
        return None, "the plan names no model and none was given (--model)"

    def make(candidate: JobParams) -> CostModel:
        return CostModel(
            get_model_spec(model_name, target_modules=candidate.target_modules), candidate
        )

    if job is not None:
        try:
            costs = make(job)
        except LegendError as exc:
            raise ReportInputError(f"job parameters do not fit model {model_name}: {exc}") from None
        if _reproduces(plan, fleet, costs):
            return costs, "cost model from the given job file (reproduces the plan)"
        return costs, (
            "cost model from the given job file; it does NOT reproduce the plan's predictions "
            "(different job or calibration?): move analysis uses it anyway"
        )
    candidates: list[tuple[str, JobParams]] = []
    if raw is not None and isinstance(raw.get("job"), Mapping):
        candidates.append(("the plan's `job`", job_from_mapping(raw["job"], "plan `job`")))
    ranks = plan.ranks or JobParams().ranks
    for preset in ("qv", "attention", "all"):
        try:
            candidates.append(
                (
                    f"default job, target modules {preset!r}",
                    JobParams(ranks=ranks, target_modules=preset),
                )
            )
        except LegendError:
            continue
    for label, candidate in candidates:
        try:
            costs = make(candidate)
        except LegendError:
            continue
        if _reproduces(plan, fleet, costs):
            return costs, f"cost model: {label} (reproduces every prediction of the plan)"
    return None, (
        "no job reproduces the plan's predictions (calibrated or non-default job): pass "
        "--job JOB.toml to analyse moves; slacks below come from the plan alone"
    )


# -- per-device data -----------------------------------------------------------------------


def _layers_text(layers: Sequence[int]) -> str:
    if not layers:
        return "-"
    if list(layers) == list(range(layers[0], layers[-1] + 1)) and len(layers) > 1:
        return f"{layers[0]}-{layers[-1]}"
    return " ".join(str(v) for v in layers)


def _deadline_of(plan: Plan) -> float:
    """The time a device may use: the deadline under objective ``deadline``, else the round
    time (growing past it would lengthen the round)."""
    options = plan.options or {}
    deadline = options.get("deadline_s")
    if plan.objective == "deadline" and isinstance(deadline, (int, float)) and deadline > 0:
        return max(float(deadline), plan.round_time_s)
    return plan.round_time_s


def _link_bytes_per_s(plan: Plan) -> float | None:
    """The server link's capacity (C7), bytes per second; ``None`` if unlimited."""
    mbps = plan.options.get("server_mbps") if plan.options else None
    return float(mbps) * 1e6 / 8 if mbps else None


@dataclass(frozen=True, kw_only=True)
class _Contention:
    """The participants' costs on a topology, to test a move against the shared-link rows."""

    topology: Topology
    fleet: Fleet
    costs: Mapping[str, ConfigCost]

    def over(self, device_id: str, cost: ConfigCost, limit_s: float) -> list[str]:
        """Links on the device's route whose rows would exceed ``limit_s`` with ``cost``."""
        route = set(self.topology.routes[device_id])
        times = link_times(self.topology, self.fleet, {**self.costs, device_id: cost})
        return [self.topology.links[k].name for k, t in times.items() if k in route and t > limit_s]


def _limit(
    dp: DevicePlan,
    device: DeviceProfile,
    costs: CostModel,
    plan: Plan,
    contention: _Contention | None = None,
) -> str:
    grid = plan.ranks or costs.job.ranks
    moves = larger_configurations(
        dp.layers, dp.ranks, tuple(grid), plan.num_layers or costs.spec.num_layers
    )
    if not moves:
        return "largest config"
    # C7: the round lasts as long as the server link needs for its bytes; a move whose bytes
    # would push that past the time a device may use is held back by the link.
    link_bps = _link_bytes_per_s(plan)
    total = plan.total_upload_bytes + plan.total_download_bytes
    current = dp.predicted_upload_bytes + dp.predicted_download_bytes
    blocked: dict[str, int] = {"deadline": 0, "memory": 0, "server link": 0, "link": 0}
    links: list[str] = []
    tol_t = _deadline_of(plan) * (1 + 1e-9) + 1e-12
    for layers, ranks in moves:
        cost = costs.evaluate(device, layers, ranks)
        over = contention.over(dp.device_id, cost, tol_t) if contention is not None else []
        links += [name for name in over if name not in links]
        breaks = {b.constraint for b in config_blocks(cost, device, tol_t, rel_tol=1e-9)}
        hits = {
            "deadline": "deadline" in breaks,
            "memory": "memory" in breaks,
            "server link": link_bps is not None
            and total - current + cost.upload_bytes + cost.download_bytes > link_bps * tol_t,
            "link": bool(over),
        }
        if not any(hits.values()):
            return "none (a larger config fits)"
        for name, hit in hits.items():
            blocked[name] += hit
    names = {name: name for name in blocked}
    names["link"] = "link " + ", ".join(links)
    every = [names[name] for name, count in blocked.items() if count == len(moves)]
    if every:
        return "+".join(every)
    return "/".join(names[name] for name, count in blocked.items() if count)


def device_frame(ctx: PlanContext) -> pd.DataFrame:
    """One row per device of the plan, sorted by predicted finish time (slowest first)."""
    import pandas as pd

    plan, fleet, costs = ctx.plan, ctx.fleet, ctx.costs
    contention = None
    if ctx.topology is not None and fleet is not None and costs is not None:
        contention = _Contention(
            topology=ctx.topology,
            fleet=fleet,
            costs={
                d.device_id: costs.evaluate(fleet[d.device_id], d.layers, d.ranks)
                for d in plan.participants
            },
        )
    T = plan.round_time_s
    L = plan.num_layers
    max_rank = max(plan.ranks) if plan.ranks else None
    rows: list[dict[str, Any]] = []
    for dp in plan.devices:
        device = fleet[dp.device_id] if fleet is not None else None
        row: dict[str, Any] = {
            "device_id": dp.device_id,
            "device_class": (device.device_class if device and device.device_class else "-"),
            "depth": dp.depth,
            "layers": _layers_text(dp.layers),
            "ranks": " ".join(str(r) for r in dp.ranks) or "-",
            "time_s": dp.predicted_time_s,
            "download_s": dp.predicted_download_s,
            "compute_s": dp.predicted_compute_s,
            "upload_s": dp.predicted_upload_s,
            "waiting_s": (T - dp.predicted_time_s) if dp.participates else None,
            "down_MB": dp.predicted_download_bytes / MB,
            "up_MB": dp.predicted_upload_bytes / MB,
            "memory_GB": dp.predicted_memory_bytes / GB,
        }
        if device is not None:
            row["capacity_GB"] = device.memory_gb
            row["memory_slack_GB"] = device.memory_gb - dp.predicted_memory_bytes / GB
            row["memory_use_pct"] = 100.0 * dp.predicted_memory_bytes / device.memory_bytes
        row["deadline_slack_s"] = (
            _deadline_of(plan) - dp.predicted_time_s if dp.participates else None
        )
        row["at_max_depth"] = bool(L and dp.depth == L)
        row["at_max_rank"] = bool(max_rank is not None and dp.ranks and max(dp.ranks) == max_rank)
        row["utility"] = dp.utility
        if not dp.participates:
            row["limited_by"] = "not participating"
        elif costs is not None and device is not None:
            row["limited_by"] = _limit(dp, device, costs, plan, contention)
        else:
            row["limited_by"] = _limit_from_slack(row, T)
        if dp.participates and T > 0 and dp.predicted_time_s >= T * (1 - 1e-9):
            row["limited_by"] = f"sets round time; {row['limited_by']}"
        rows.append(row)
    frame = pd.DataFrame(rows)
    return frame.sort_values(
        ["time_s", "device_id"], ascending=[False, True], kind="stable"
    ).reset_index(drop=True)


def _limit_from_slack(row: Mapping[str, Any], T: float) -> str:
    parts = []
    if row.get("at_max_depth") and row.get("at_max_rank"):
        parts.append("largest depth and rank")
    if row["waiting_s"] is not None and T > 0 and row["waiting_s"] <= 0.01 * T:
        parts.append("deadline (slack < 1%)")
    if "memory_use_pct" in row and row["memory_use_pct"] >= 99.0:
        parts.append("memory (use >= 99%)")
    return ", ".join(parts) or "unknown without the job's cost model"


# -- grouping ------------------------------------------------------------------------------


def _groups(frame: pd.DataFrame, limit: int) -> tuple[str, pd.Series]:
    """A label per device for aggregated plots: the class, or a finish-time bucket."""
    import numpy as np
    import pandas as pd

    classes = frame["device_class"]
    if (classes != "-").all() and classes.nunique() <= limit:
        return "device class", classes.astype(str)
    n = len(frame)
    buckets = min(20, limit)
    order = np.argsort(-frame["time_s"].to_numpy(), kind="stable")
    labels = np.empty(n, dtype=object)
    edges = np.linspace(0, n, buckets + 1).astype(int)
    for b in range(buckets):
        lo, hi = edges[b], edges[b + 1]
        if hi > lo:
            labels[order[lo:hi]] = f"slowest {lo + 1}-{hi}"
    return "finish-time bucket", pd.Series(labels, index=frame.index)


# -- figures -------------------------------------------------------------------------------


def _heatmap(ctx: PlanContext, frame: pd.DataFrame, limit: int) -> Figure:
    import numpy as np
    from matplotlib.colors import BoundaryNorm, ListedColormap

    plan = ctx.plan
    L = plan.num_layers or max((max(d.layers) + 1 for d in plan.participants), default=1)
    grid = list(plan.ranks) or sorted({r for d in plan.devices for r in d.ranks})
    by_id = {d.device_id: d for d in plan.devices}
    if len(frame) <= limit:
        rows = [(str(device_id), by_id[device_id]) for device_id in frame["device_id"]]
        mode = "one row per device, slowest first"
        labels = [r[0] for r in rows]
        configs = [(r[1].layers, r[1].ranks) for r in rows]
    else:
        counts: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
        for d in plan.devices:
            key = (d.layers, d.ranks)
            counts[key] = counts.get(key, 0) + 1
        ordered = sorted(counts.items(), key=lambda kv: (-kv[1], -len(kv[0][0])))
        shown = ordered[:limit]
        configs = [k for k, _ in shown]
        labels = [f"{v:,} devices" for _, v in shown]
        rest = sum(v for _, v in ordered[limit:])
        mode = f"one row per distinct configuration ({len(ordered)} for {len(frame):,} devices)"
        if rest:
            mode += f"; {rest:,} devices in rarer configurations not shown"
    matrix = np.zeros((len(configs), L))
    for i, (layers, ranks) in enumerate(configs):
        for layer, rank in zip(layers, ranks, strict=True):
            if 0 <= layer < L:
                matrix[i, layer] = rank
    levels = [0, *grid]
    from matplotlib import colormaps

    blues = colormaps["Blues"]
    steps = max(len(grid) - 1, 1)
    cmap = ListedColormap(["#f3f4f7"] + [blues(0.3 + 0.7 * k / steps) for k in range(len(grid))])
    bounds = [-0.5] + [(a + b) / 2 for a, b in itertools.pairwise(levels)] + [levels[-1] + 1]
    norm = BoundaryNorm(bounds, cmap.N)
    height = min(14.0, max(2.2, 0.28 * len(configs) + 1.4))
    fig = new_figure(min(12.0, max(6.0, 0.55 * L + 4.0)), height)
    ax = fig.add_subplot()
    image = ax.imshow(matrix, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    ax.set_xticks(range(L))
    ax.set_xlabel("layer (0 = next to the embeddings, right = output)")
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=8 if len(labels) > 25 else 9)
    if len(configs) * L <= 800:
        for i in range(len(configs)):
            for j in range(L):
                if matrix[i, j]:
                    ax.text(
                        j,
                        i,
                        f"{int(matrix[i, j])}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if matrix[i, j] >= grid[len(grid) // 2] else "black",
                    )
    bar = fig.colorbar(image, ax=ax, ticks=levels, shrink=0.8)
    bar.set_label("LoRA rank (0 = no LoRA)")
    ax.set_title("LoRA depth and rank per layer")
    return Figure(
        name="depth_rank_heatmap",
        title="Depth and rank (devices x layers)",
        png=figure_png(fig),
        caption=f"Rank of each adapted layer; {mode}.",
    )


def _timeline(ctx: PlanContext, frame: pd.DataFrame, limit: int) -> Figure:
    T = ctx.plan.round_time_s
    part = frame[frame["depth"] > 0]
    if len(part) <= limit:
        data = part.sort_values("time_s", ascending=True, kind="stable")
        labels = [str(v) for v in data["device_id"]]
        down = data["download_s"].to_numpy()
        comp = data["compute_s"].to_numpy()
        up = data["upload_s"].to_numpy()
        lo = hi = None
        mode = "one bar per device, sorted by finish time (the slowest at the top)"
    else:
        kind, groups = _groups(part, limit)
        agg = (
            part.assign(group=groups)
            .groupby("group", sort=False)
            .agg(
                n=("device_id", "size"),
                download_s=("download_s", "mean"),
                compute_s=("compute_s", "mean"),
                upload_s=("upload_s", "mean"),
                t_min=("time_s", "min"),
                t_max=("time_s", "max"),
                t_mean=("time_s", "mean"),
            )
        )
        agg = agg.sort_values("t_mean", ascending=True, kind="stable")
        labels = [f"{g} (n={n:,})" for g, n in zip(agg.index, agg["n"], strict=True)]
        down = agg["download_s"].to_numpy()
        comp = agg["compute_s"].to_numpy()
        up = agg["upload_s"].to_numpy()
        lo, hi = agg["t_min"].to_numpy(), agg["t_max"].to_numpy()
        mode = (
            f"one bar per {kind}: mean phases, whiskers from the fastest to the slowest "
            "device of the group"
        )
    import numpy as np

    y = np.arange(len(labels))
    fig = new_figure(10.0, min(14.0, max(2.4, 0.3 * len(labels) + 1.5)))
    ax = fig.add_subplot()
    finish = down + comp + up
    ax.barh(y, down, color=PHASE_COLOURS["download"], label="download")
    ax.barh(y, comp, left=down, color=PHASE_COLOURS["compute"], label="compute")
    ax.barh(y, up, left=down + comp, color=PHASE_COLOURS["upload"], label="upload")
    ax.barh(
        y,
        np.maximum(T - finish, 0),
        left=finish,
        color=PHASE_COLOURS["idle"],
        hatch="//",
        edgecolor="#b7bccb",
        linewidth=0,
        label="idle (waiting)",
    )
    if lo is not None and hi is not None:
        ax.hlines(y, lo, hi, color="black", linewidth=1.0)
        ax.plot(lo, y, "|", color="black")
        ax.plot(hi, y, "|", color="black")
    ax.axvline(T, color="#c0392b", linestyle="--", linewidth=1.2, label=f"round time {T:.3g} s")
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=8 if len(labels) > 25 else 9)
    ax.set_xlabel("seconds from the start of the round (predicted)")
    fig.legend(loc="outside upper center", fontsize=8, ncols=5, frameon=False)
    return Figure(
        name="round_timeline",
        title="Round timeline (Gantt)",
        png=figure_png(fig),
        caption=f"Download, compute, upload and idle time; {mode}.",
    )


def _memory(ctx: PlanContext, frame: pd.DataFrame, limit: int) -> Figure:
    import numpy as np

    has_cap = "capacity_GB" in frame.columns
    part = frame[frame["depth"] > 0]
    if len(part) <= limit:
        data = part.sort_values("memory_GB", ascending=True, kind="stable")
        y = np.arange(len(data))
        fig = new_figure(10.0, min(14.0, max(2.4, 0.3 * len(data) + 1.5)))
        ax = fig.add_subplot()
        if has_cap:
            ax.barh(y, data["capacity_GB"], color="#e4e7ee", label="capacity")
        ax.barh(y, data["memory_GB"], height=0.5, color="#7b61ff", label="predicted use")
        ax.set_yticks(y)
        ax.set_yticklabels([str(v) for v in data["device_id"]], fontsize=8 if len(data) > 25 else 9)
        ax.set_xlabel("GB")
        ax.legend(loc="lower right", fontsize=8)
        mode = "one bar per device"
    else:
        kind, groups = _groups(part, limit)
        col = "memory_use_pct" if has_cap else "memory_GB"
        data = part.assign(group=groups)
        order = data.groupby("group", sort=False)[col].median().sort_values().index
        values = [data.loc[data["group"] == g, col].to_numpy() for g in order]
        fig = new_figure(10.0, min(14.0, max(2.4, 0.3 * len(order) + 1.5)))
        ax = fig.add_subplot()
        ax.boxplot(values, orientation="horizontal", whis=(0, 100))
        ax.set_yticks(range(1, len(order) + 1))
        ax.set_yticklabels(
            [f"{g} (n={len(v):,})" for g, v in zip(order, values, strict=True)], fontsize=8
        )
        top = max((float(v.max()) for v in values if len(v)), default=1.0)
        for i, v in enumerate(values, start=1):
            if len(v):
                ax.annotate(f" max {v.max():.3g}", (float(v.max()), i), fontsize=8, va="center")
        if has_cap and top >= 50:
            ax.axvline(100, color="#c0392b", linestyle="--", linewidth=1.0, label="capacity")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_xlim(0, max(top * 1.25, 1e-9))
        ax.set_xlabel("memory use, % of capacity" if has_cap else "predicted memory, GB")
        mode = f"distribution per {kind} (whiskers: min to max)"
    ax.set_title(
        "Memory use vs capacity" if has_cap else "Predicted memory (no fleet: capacity unknown)"
    )
    return Figure(
        name="memory",
        title="Memory use vs capacity",
        png=figure_png(fig),
        caption=f"Predicted training memory; {mode}.",
    )


def _bytes(ctx: PlanContext, frame: pd.DataFrame, limit: int) -> Figure:
    import numpy as np

    part = frame[frame["depth"] > 0]
    if len(part) <= limit:
        data = part.sort_values("up_MB", ascending=True, kind="stable")
        labels = [str(v) for v in data["device_id"]]
        down = data["down_MB"].to_numpy()
        up = data["up_MB"].to_numpy()
        mode = "per device"
        xlabel = "MB per round"
    else:
        kind, groups = _groups(part, limit)
        agg = (
            part.assign(group=groups)
            .groupby("group", sort=False)
            .agg(n=("device_id", "size"), down_MB=("down_MB", "sum"), up_MB=("up_MB", "sum"))
        )
        agg = agg.sort_values("up_MB", kind="stable")
        labels = [f"{g} (n={n:,})" for g, n in zip(agg.index, agg["n"], strict=True)]
        down = agg["down_MB"].to_numpy()
        up = agg["up_MB"].to_numpy()
        mode = f"total per {kind}"
        xlabel = "MB per round (sum over the group)"
    y = np.arange(len(labels))
    fig = new_figure(10.0, min(14.0, max(2.4, 0.3 * len(labels) + 1.5)))
    ax = fig.add_subplot()
    ax.barh(y, down, color=PHASE_COLOURS["download"], label="download")
    ax.barh(y, up, left=down, color=PHASE_COLOURS["upload"], label="upload")
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=8 if len(labels) > 25 else 9)
    ax.set_xlabel(xlabel)
    ax.set_title("Bytes per round")
    ax.legend(loc="lower right", fontsize=8)
    return Figure(
        name="bytes",
        title="Bytes per device",
        png=figure_png(fig),
        caption=f"LoRA slice down and update up, {mode}.",
    )


# -- tables --------------------------------------------------------------------------------


def _class_frame(ctx: PlanContext, frame: pd.DataFrame) -> pd.DataFrame:
    import pandas as pd

    fleet = ctx.fleet
    data = frame.copy()
    data["participates"] = data["depth"] > 0
    data["total_MB"] = data["down_MB"] + data["up_MB"]
    out = data.groupby("device_class", sort=True).agg(
        devices=("device_id", "size"),
        participants=("participates", "sum"),
        depth_min=("depth", "min"),
        depth_mean=("depth", "mean"),
        depth_max=("depth", "max"),
        time_mean_s=("time_s", "mean"),
        time_max_s=("time_s", "max"),
        waiting_mean_s=("waiting_s", "mean"),
        total_MB=("total_MB", "sum"),
    )
    if "memory_use_pct" in data.columns:
        out["memory_use_max_pct"] = data.groupby("device_class")["memory_use_pct"].max()
    if fleet is not None:
        profiles = pd.DataFrame(fleet.to_records())
        profiles["device_class"] = profiles["device_class"].fillna("-")
        prof = profiles.groupby("device_class").agg(
            tflops=("tflops", "median"),
            memory_gb=("memory_gb", "median"),
            uplink_mbps=("uplink_mbps", "median"),
            downlink_mbps=("downlink_mbps", "median"),
            samples=("num_samples", "sum"),
        )
        out = prof.join(out, how="right")
    return out.reset_index()


def _binding_summary(frame: pd.DataFrame) -> pd.DataFrame:
    import pandas as pd

    rows = []
    for limit, group in frame.groupby("limited_by", sort=True):
        ids = [str(v) for v in group["device_id"]]
        rows.append({"limited_by": limit, "devices": len(group), "examples": short_list(ids, 4)})
    return pd.DataFrame(rows).sort_values("devices", ascending=False, kind="stable")


def _server_link(plan: Plan) -> tuple[str, str] | None:
    mbps = plan.options.get("server_mbps") if plan.options else None
    total = plan.total_upload_bytes + plan.total_download_bytes
    if not mbps or plan.round_time_s <= 0:
        return None
    capacity = float(mbps) * 1e6 / 8 * plan.round_time_s
    share = total / capacity
    verdict = "binds" if share >= 0.99 else "does not bind"
    return (
        "Server link",
        f"{verdict}: {total / MB:,.1f} MB in the round = {100 * share:.1f}% of "
        f"{float(mbps):g} Mbit/s x round time {plan.round_time_s:.3g} s",
    )


def _links_section(ctx: PlanContext, limit: int, max_replans: int) -> Section:
    plan, topology, fleet = ctx.plan, ctx.topology, ctx.fleet
    assert topology is not None and fleet is not None
    replanner = Replanner.for_plan(plan, fleet, ctx.costs) if ctx.costs is not None else None
    verdict = binding_links(plan, topology, fleet, replanner, max_replans=max_replans)
    frame = link_frame(plan, topology, fleet, verdict.binding)
    names = verdict.names(topology)
    busiest = frame.iloc[0]
    peak = max(busiest["utilisation_up"], busiest["utilisation_down"])
    return Section(
        title="Links",
        blocks=(
            KeyValues(
                items=(
                    ("Links", f"{len(frame):,}"),
                    ("Congested", f"{int(frame['congested'].sum()):,}"),
                    ("Binding", ", ".join(names) if names else "none"),
                    ("Busiest", f"{busiest['link']} ({100 * peak:.1f}%)"),
                )
            ),
            Paragraph(
                text="Utilisation is the round's bytes through the link (the plan's "
                "predictions for the devices routed through it) / (capacity x round time "
                f"{format_value(plan.round_time_s)} s). A link is congested when its devices "
                "could together send faster than its capacity (only those add rows to the "
                "program). " + verdict.note
            ),
            Table(
                name="links",
                title="Shared links",
                frame=frame,
                caption="Busiest first. routed: devices whose route to the server uses the "
                "link; up_MB/down_MB: this round's bytes; up_mbps/down_mbps: capacity.",
                max_rows=limit,
            ),
            link_figure(frame, name="link_utilisation", title="Link utilisation", limit=limit),
        ),
    )


# -- the report ------------------------------------------------------------------------------


def build_plan_report(
    plan: Plan,
    *,
    fleet: Fleet | None = None,
    job: JobParams | None = None,
    model: str | None = None,
    raw: Mapping[str, Any] | None = None,
    source: str = "",
    per_device_limit: int = PER_DEVICE_LIMIT,
    topology: Topology | None = None,
    max_replans: int = MAX_REPLANS,
) -> Report:
    """Build the plan report.

    Parameters
    ----------
    plan
        The round's plan (``Plan.load`` or ``plan_round``).
    fleet
        The fleet it was planned for: adds device classes, capacities and memory slack.
    job, model, raw
        To recompute costs (see :func:`resolve_cost_model`); ``raw`` is the plan file's JSON.
    per_device_limit
        Above this many devices, plots aggregate by class (or bucket) and tables show
        their first rows (the CSVs keep every row).
    topology
        The links the fleet shares (:func:`~legend.planner.topology.load_topology` for
        ``fleet``): adds the "Links" section (see :mod:`legend.reports.links`) and names a
        link in ``limited_by`` when its contention rows stop a device's larger configuration.
    max_replans
        Above this many congested links, which link binds is decided on the fair-sharing
        clock instead of by re-planning.
    """
    if fleet is not None:
        check_fleet(plan, fleet, source or "<plan>")
    elif topology is not None:
        raise ReportInputError("a topology needs the fleet it routes: pass --fleet with --topology")
    costs, note = resolve_cost_model(plan, fleet, job=job, raw=raw, model=model)
    ctx = PlanContext(
        plan=plan, fleet=fleet, costs=costs, cost_note=note, source=source, topology=topology
    )
    frame = device_frame(ctx)
    n = len(frame)
    participants = int((frame["depth"] > 0).sum())
    part = frame[frame["depth"] > 0]
    T = plan.round_time_s
    total_bytes = plan.total_upload_bytes + plan.total_download_bytes
    slowest = part["device_id"].iloc[0] if len(part) else "-"
    headline = KeyValues(
        items=(
            ("Round time", f"{format_value(T)} s"),
            ("Devices", f"{n:,}"),
            ("Participants", f"{participants:,}"),
            ("Bytes (up + down)", f"{total_bytes / MB:,.1f} MB"),
            (
                "Mean waiting",
                f"{format_value(float(part['waiting_s'].mean()) if len(part) else 0.0)} s",
            ),
            (
                "Mean depth",
                f"{float(part['depth'].mean()) if len(part) else 0.0:.2f} / {plan.num_layers}",
            ),
            ("Slowest device", str(slowest)),
            ("Solver", f"{plan.solver} ({plan.status})"),
        )
    )
    gap = "-" if plan.mip_gap is None else f"{100 * plan.mip_gap:.3g}%"
    solver_items = [
        ("Solver", f"{plan.solver} {plan.solver_version}".strip()),
        ("Status", plan.status),
        ("MIP gap", gap),
        ("Solve time", f"{plan.solve_time_s:.3g} s"),
        ("Objective", f"{plan.objective} = {format_value(plan.objective_value)}"),
        ("Utility", format_value(plan.utility)),
        ("Inputs digest", plan.inputs_digest or "-"),
    ]
    if plan.round is not None:
        solver_items.append(("Round", str(plan.round)))
    link = _server_link(plan)
    import pandas as pd

    options_frame = pd.DataFrame(
        [
            {"option": k, "value": json.dumps(v) if isinstance(v, (list, dict)) else v}
            for k, v in sorted(plan.options.items())
        ]
        or [{"option": "-", "value": "-"}]
    )
    options_frame["value"] = options_frame["value"].map(format_value)

    aggregated = n > per_device_limit
    sections: list[Section] = [
        Section(
            title="Summary",
            blocks=(
                headline,
                Paragraph(
                    text=(
                        f"Plan for {plan.model or 'an unnamed model'} "
                        f"({plan.num_layers} layers, rank grid {list(plan.ranks)}), "
                        f"{n:,} devices. "
                        + (
                            "Plots aggregate by device class or finish-time bucket above "
                            f"{per_device_limit} devices. "
                            if aggregated
                            else ""
                        )
                        + (
                            "Fleet: " + fleet.source + ". "
                            if fleet is not None
                            else "No fleet given: capacities and device classes are unknown. "
                        )
                    )
                ),
            ),
        ),
        Section(
            title="Fleet by device class",
            blocks=(
                Table(
                    name="fleet_classes",
                    title="Fleet summary by device class",
                    frame=_class_frame(ctx, frame),
                    caption="Profiles are medians over the class; plan figures are per device.",
                ),
            ),
        ),
        Section(
            title="Configurations",
            blocks=(
                Table(
                    name="devices",
                    title="Per-device configuration",
                    frame=frame,
                    caption="Sorted by predicted time, slowest first. Layers count from 0 "
                    "(next to the embeddings); ranks are listed bottom to top.",
                    max_rows=per_device_limit,
                ),
                _heatmap(ctx, frame, per_device_limit if not aggregated else 40),
            ),
        ),
        Section(title="Round timeline", blocks=(_timeline(ctx, frame, per_device_limit),)),
        Section(
            title="Resources",
            blocks=(_memory(ctx, frame, per_device_limit), _bytes(ctx, frame, per_device_limit)),
        ),
        *(
            (_links_section(ctx, per_device_limit, max_replans),)
            if ctx.topology is not None
            else ()
        ),
        Section(
            title="Binding constraints",
            blocks=(
                Paragraph(text=note[0].upper() + note[1:] + "."),
                *((KeyValues(items=(link,)),) if link else ()),
                Table(
                    name="binding_summary",
                    title="What limits each device",
                    frame=_binding_summary(frame),
                    caption="'deadline': every one-step larger configuration would exceed the "
                    "round time; 'memory': would exceed memory; 'link NAME': would make the "
                    "shared link's contention exceed the round time; 'sets round time': the "
                    "device is the straggler that defines the round time.",
                ),
                Table(
                    name="binding",
                    title="Slack per device",
                    frame=frame[
                        [
                            c
                            for c in (
                                "device_id",
                                "device_class",
                                "deadline_slack_s",
                                "memory_slack_GB",
                                "memory_use_pct",
                                "at_max_depth",
                                "at_max_rank",
                                "limited_by",
                            )
                            if c in frame.columns
                        ]
                    ],
                    max_rows=per_device_limit,
                ),
            ),
        ),
        Section(
            title="Solver",
            blocks=(
                KeyValues(items=tuple(solver_items)),
                Table(name="options", title="Planner options", frame=options_frame),
            ),
        ),
    ]
    return Report(
        kind="plan",
        title=f"Plan report: {plan.model or 'plan'}, {n:,} devices",
        subtitle=(source + " | " if source else "") + f"{plan.solver} {plan.status}, "
        f"round time {format_value(T)} s",
        sections=tuple(sections),
        meta={"devices": n, "participants": participants, "aggregated": aggregated},
    )
