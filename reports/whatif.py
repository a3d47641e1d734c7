"""What-if sweeps for capacity planning, computed with the planner.

:func:`run_whatif` plans the same round under changed conditions and records, per point,
the round time, bytes, participation, depth and rank:

- **bandwidth**: every device's uplink and downlink scaled (x0.25 ... x4);
- **fleet size**: the fleet scaled per device class (x0.5 keeps half of each class, x2
  adds a copy of every device), so the class mix stays the same;
- **deadline**: the deadline-vs-utility trade-off (objective ``deadline`` at deadlines
  spaced geometrically from the smallest deadline every device can meet to the time of the
  slowest device's largest configuration) and its Pareto front;
- **model**: the same fleet and job with another model's shape (e.g. MiniLM vs
  roberta-large vs llama-2-7b);
- **double a link** (with a topology): each named link at twice its capacity, re-planned,
  against the baseline: round time, objective, bytes, the devices whose configuration
  changed and which links bind afterwards (:mod:`legend.reports.links`).

With a topology every point is planned with it (an exact solver is needed), except the
fleet-size sweep, which is skipped: the copies of devices it adds have no route.

A point the planner cannot satisfy (a device's smallest configuration misses memory or
the deadline) is kept as a row with status ``INFEASIBLE`` and the planner's reason, so the
report shows where the fleet stops coping. The default solver is the greedy, which plans a
1,000-device fleet in a fraction of a second; any registered solver can be used (give an
exact one a short ``time_limit_s``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from legend.models.errors import LegendError
from legend.models.spec import ModelSpec, get_model_spec
from legend.planner.api import PlannerOptions, plan_round
from legend.planner.costs import CostModel
from legend.planner.errors import InfeasibleError
from legend.planner.plan import Plan
from legend.planner.profiles import DeviceProfile, Fleet, JobParams
from legend.planner.topology import Topology, predicted_round_time
from legend.reports.errors import ReportInputError
from legend.reports.links import (
    Replanner,
    binding_links,
    changed_devices,
    double_link,
    resolve_links,
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
    "DEFAULT_MODELS",
    "WhatIfResult",
    "WhatIfSettings",
    "build_whatif_report",
    "deadline_range",
    "pareto_front",
    "run_whatif",
    "scale_bandwidth",
    "scale_fleet",
]

DEFAULT_MODELS = ("all-MiniLM-L6-v2", "roberta-large", "llama-2-7b")
MB = 1e6


@dataclass(frozen=True, kw_only=True)
class WhatIfSettings:
    """Which sweeps to run and at which points (an empty tuple or 0 skips a sweep)."""

    bandwidth_scales: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
    fleet_scales: tuple[float, ...] = (0.5, 1.0, 2.0)
    deadline_points: int = 8
    models: tuple[str, ...] = DEFAULT_MODELS
    double_links: tuple[str, ...] = ()  # link names (or "all") to double, with a topology

    def __post_init__(self) -> None:
        for name in ("bandwidth_scales", "fleet_scales"):
            values = tuple(float(v) for v in getattr(self, name))
            bad = [v for v in values if not (math.isfinite(v) and v > 0)]
            if bad:
                raise ReportInputError(f"`{name}` must be positive numbers, got {bad[0]!r}")
            object.__setattr__(self, name, values)
        if not isinstance(self.deadline_points, int) or not 0 <= self.deadline_points <= 200:
            raise ReportInputError(
                f"`deadline_points` must be an integer in 0..200, got {self.deadline_points!r}"
            )
        object.__setattr__(self, "models", tuple(self.models))
        object.__setattr__(self, "double_links", tuple(self.double_links))

    @property
    def num_points(self) -> int:
        return (
            1
            + len(self.bandwidth_scales)
            + len(self.fleet_scales)
            + self.deadline_points
            + len(self.models)
            + len(self.double_links)
        )


@dataclass(frozen=True, kw_only=True, eq=False)
class WhatIfResult:
    """The baseline plan and one DataFrame per sweep (one row per point)."""

    fleet: Fleet
    spec: ModelSpec
    job: JobParams
    options: PlannerOptions
    baseline: Plan
    bandwidth: pd.DataFrame
    fleet_size: pd.DataFrame
    deadline: pd.DataFrame
    models: pd.DataFrame
    links: pd.DataFrame
    elapsed_s: float
    topology: Topology | None = None
    notes: tuple[str, ...] = ()


# -- transforms ----------------------------------------------------------------------------


def scale_bandwidth(fleet: Fleet, factor: float) -> Fleet:
    """Every device's uplink and downlink multiplied by ``factor``."""
    return Fleet(
        devices=tuple(
            replace(d, uplink_mbps=d.uplink_mbps * factor, downlink_mbps=d.downlink_mbps * factor)
            for d in fleet.devices
        ),
        source=f"{fleet.source} (bandwidth x{factor:g})",
    )


def scale_fleet(fleet: Fleet, factor: float) -> Fleet:
    """The fleet with ``round(n_c * factor)`` devices (at least one) of each class ``c``.

    Devices beyond a class's original count are copies with ids ``ID~2``, ``ID~3``, ...
    (cycling through the class); below it, the first devices of the class are kept.
    """
    by_class: dict[str | None, list[DeviceProfile]] = {}
    for d in fleet.devices:
        by_class.setdefault(d.device_class, []).append(d)
    devices: list[DeviceProfile] = []
    for members in by_class.values():
        count = max(1, round(len(members) * factor))
        for j in range(count):
            base = members[j % len(members)]
            copy = j // len(members)
            devices.append(
                base if copy == 0 else replace(base, device_id=f"{base.device_id}~{copy + 1}")
            )
    return Fleet(devices=tuple(devices), source=f"{fleet.source} (size x{factor:g})")


def deadline_range(
    fleet: Fleet, costs: CostModel, min_depth: int = 1, topology: Topology | None = None
) -> tuple[float, float]:
    """``(smallest deadline every device meets, slowest device's largest configuration)``.

    Below the first, some device cannot even train its smallest configuration; beyond the
    second, no device can use more time. With a ``topology`` both include the contention
    of every device on the shared links at that configuration.
    """
    L = costs.spec.num_layers
    low = costs.job.ranks[0]
    high = costs.job.ranks[-1]
    small = tuple(range(L - min_depth, L))
    full = tuple(range(L))
    t_min = max(costs.evaluate(d, small, (low,) * len(small)).time_s for d in fleet.devices)
    t_max = max(costs.evaluate(d, full, (high,) * L).time_s for d in fleet.devices)
    if topology is not None:
        ids = fleet.device_ids
        t_min = predicted_round_time(
            topology, fleet, costs, dict.fromkeys(ids, (small, (low,) * len(small)))
        )
        t_max = predicted_round_time(
            topology, fleet, costs, dict.fromkeys(ids, (full, (high,) * L))
        )
    return t_min, max(t_max, t_min)


def pareto_front(times: Sequence[float], utilities: Sequence[float]) -> list[bool]:
    """Which points are Pareto-efficient (no other point has less time and more utility)."""
    flags = []
    for i, (t, u) in enumerate(zip(times, utilities, strict=True)):
        dominated = any(
            (t2 <= t and u2 >= u) and (t2 < t or u2 > u)
            for j, (t2, u2) in enumerate(zip(times, utilities, strict=True))
            if j != i and not (math.isnan(t2) or math.isnan(u2))
        )
        flags.append(not dominated and not (math.isnan(t) or math.isnan(u)))
    return flags


# -- one point -----------------------------------------------------------------------------


def _reason(exc: LegendError) -> str:
    reasons = getattr(exc, "reasons", ())
    first = str(exc).splitlines()[0]
    if reasons:
        more = f" (+{len(reasons) - 1} more)" if len(reasons) > 1 else ""
        return f"{first}: {reasons[0]}{more}"
    return first


def _row(plan: Plan | None, fleet: Fleet, error: str = "") -> dict[str, Any]:
    if plan is None:
        return {
            "status": "INFEASIBLE" if error else "ERROR",
            "devices": len(fleet),
            "participants": 0,
            "participation_pct": 0.0,
            "round_time_s": math.nan,
            "total_MB": math.nan,
            "MB_per_device": math.nan,
            "depth_mean": math.nan,
            "depth_min": math.nan,
            "depth_max": math.nan,
            "rank_mean": math.nan,
            "utility": math.nan,
            "utility_per_s": math.nan,
            "solve_time_s": math.nan,
            "note": error,
        }
    part = plan.participants
    depths = [d.depth for d in part]
    ranks = [r for d in part for r in d.ranks]
    total = plan.total_upload_bytes + plan.total_download_bytes
    T = plan.round_time_s
    return {
        "status": plan.status,
        "devices": len(plan.devices),
        "participants": len(part),
        "participation_pct": 100.0 * len(part) / max(len(plan.devices), 1),
        "round_time_s": T,
        "total_MB": total / MB,
        "MB_per_device": total / MB / max(len(part), 1),
        "depth_mean": sum(depths) / len(depths) if depths else 0.0,
        "depth_min": min(depths, default=0),
        "depth_max": max(depths, default=0),
        "rank_mean": sum(ranks) / len(ranks) if ranks else 0.0,
        "utility": plan.utility,
        "utility_per_s": plan.utility / T if T > 0 else 0.0,
        "solve_time_s": plan.solve_time_s,
        "note": "",
    }


def _plan(
    fleet: Fleet,
    spec: ModelSpec,
    job: JobParams,
    options: PlannerOptions,
    topology: Topology | None = None,
) -> tuple[Plan | None, str]:
    try:
        return plan_round(fleet, spec, job, options, topology=topology), ""
    except InfeasibleError as exc:
        return None, _reason(exc)
    except LegendError as exc:
        # Solver failures (e.g. a time limit without a feasible plan) are results too.
        return None, f"{type(exc).__name__}: {_reason(exc)}"


# -- the sweeps ----------------------------------------------------------------------------


def run_whatif(
    fleet: Fleet,
    spec: ModelSpec,
    job: JobParams | None = None,
    options: PlannerOptions | None = None,
    settings: WhatIfSettings | None = None,
    *,
    progress: bool | Callable[[str], None] = False,
    topology: Topology | None = None,
) -> WhatIfResult:
    """Run every sweep; ``progress=True`` shows a progress bar on stderr.

    With a ``topology`` (loaded for ``fleet``) every point is planned with it and
    ``settings.double_links`` names the links to double one at a time.

    Raises
    ------
    ReportInputError
        The baseline (the fleet as given) cannot be planned: nothing to compare against;
        a link to double without a topology, or one the topology does not have; a solver
        that does not model a topology.
    """
    import pandas as pd

    job = job or JobParams()
    options = options or PlannerOptions(solver="greedy" if topology is None else "auto")
    settings = settings or WhatIfSettings()
    notes: list[str] = []
    doubled_links: tuple[int, ...] = ()
    replanner: Replanner | None = None
    if topology is None and settings.double_links:
        raise ReportInputError(
            "`--double-link` needs the network topology: pass --topology TOPOLOGY.toml"
        )
    if topology is not None:
        replanner = Replanner(fleet=fleet, spec=spec, job=job, options=options)
        if not replanner.models_topology:
            raise ReportInputError(
                f"solver {options.solver!r} does not model a topology; with --topology use "
                "--solver auto, highs, pulp-highs, pulp-cbc or cvxpy-highs"
            )
        doubled_links = resolve_links(topology, settings.double_links, "--double-link")
        if settings.fleet_scales:
            notes.append(
                "The fleet-size sweep is skipped with a topology: the devices it adds have "
                "no route."
            )
            settings = replace(settings, fleet_scales=())
    start = time.perf_counter()
    bar: Any = None
    if progress is True:
        from tqdm import tqdm

        total = settings.num_points - len(settings.double_links) + len(doubled_links)
        bar = tqdm(total=total, desc="what-if", unit="plan", leave=False)

    def tick(label: str) -> None:
        if bar is not None:
            bar.set_postfix_str(label, refresh=False)
            bar.update(1)
        elif callable(progress):
            progress(label)

    try:
        baseline, error = _plan(fleet, spec, job, options, topology)
        tick("baseline")
        if baseline is None:
            raise ReportInputError(
                f"the baseline fleet {fleet.source} cannot be planned for {spec.name}: {error}"
            )

        bandwidth = []
        for s in settings.bandwidth_scales:
            scaled = scale_bandwidth(fleet, s)
            plan, error = (
                (baseline, "") if s == 1.0 else _plan(scaled, spec, job, options, topology)
            )
            bandwidth.append({"bandwidth_scale": s, **_row(plan, scaled, error)})
            tick(f"bandwidth x{s:g}")

        sizes = []
        for s in settings.fleet_scales:
            scaled = scale_fleet(fleet, s) if s != 1.0 else fleet
            plan, error = (baseline, "") if s == 1.0 else _plan(scaled, spec, job, options)
            sizes.append({"fleet_scale": s, **_row(plan, scaled, error)})
            tick(f"fleet x{s:g}")

        deadlines = []
        if settings.deadline_points:
            costs = CostModel(spec, job)
            t_min, t_max = deadline_range(fleet, costs, options.min_depth, topology)
            n = settings.deadline_points
            points = (
                [t_min * (t_max / t_min) ** (k / (n - 1)) for k in range(n)] if n > 1 else [t_min]
            )
            for k, d in enumerate(points):
                # The smallest point sits a hair above t_min so rounding cannot make it fail.
                deadline = d * (1 + 1e-9) if k == 0 else d
                dl_options = options.with_(objective="deadline", deadline_s=deadline)
                plan, error = _plan(fleet, spec, job, dl_options, topology)
                deadlines.append({"deadline_s": deadline, **_row(plan, fleet, error)})
                tick(f"deadline {deadline:.3g} s")
        deadline_frame = pd.DataFrame(deadlines)
        if len(deadline_frame):
            deadline_frame.insert(
                1,
                "pareto",
                pareto_front(list(deadline_frame["round_time_s"]), list(deadline_frame["utility"])),
            )

        models = []
        for name in settings.models:
            try:
                other = get_model_spec(name, target_modules=job.target_modules)
            except LegendError as exc:
                raise ReportInputError(f"what-if model {name!r}: {exc}") from None
            plan, error = (
                (baseline, "")
                if other.name == spec.name
                else _plan(fleet, other, job, options, topology)
            )
            models.append(
                {"model": other.name, "layers": other.num_layers, **_row(plan, fleet, error)}
            )
            tick(f"model {other.name}")

        links = []
        if replanner is not None and topology is not None and doubled_links:
            links = _link_sweep(replanner, topology, baseline, doubled_links, tick)
    finally:
        if bar is not None:
            bar.close()

    return WhatIfResult(
        fleet=fleet,
        spec=spec,
        job=job,
        options=options,
        baseline=baseline,
        bandwidth=pd.DataFrame(bandwidth),
        fleet_size=pd.DataFrame(sizes),
        deadline=deadline_frame,
        models=pd.DataFrame(models),
        links=pd.DataFrame(links),
        elapsed_s=time.perf_counter() - start,
        topology=topology,
        notes=tuple(notes),
    )


def _link_sweep(
    replanner: Replanner,
    topology: Topology,
    baseline: Plan,
    doubled_links: tuple[int, ...],
    tick: Callable[[str], None],
) -> list[dict[str, Any]]:
    """The baseline, then each link doubled and re-planned; which links bind in each."""
    fleet = replanner.fleet
    congested = {k for k, _up, _down in topology.congested(fleet)}
    base_verdict = binding_links(baseline, topology, fleet, replanner, reference=baseline)

    def row(scenario: str, link: str, plan: Plan | None, error: str, binds: str) -> dict[str, Any]:
        out: dict[str, Any] = {"scenario": scenario, "link": link, **_row(plan, fleet, error)}
        out["objective"] = plan.objective_value if plan is not None else math.nan
        for key, new, old in (
            ("round_time_change_pct", out["round_time_s"], baseline.round_time_s),
            ("objective_change_pct", out["objective"], baseline.objective_value),
        ):
            out[key] = 100.0 * (new - old) / old if old else math.nan
        changed = changed_devices(baseline, plan) if plan is not None else []
        out["changed_devices"] = len(changed)
        out["changed"] = short_list(changed, 4) or "-"
        out["binding_links"] = binds
        return out

    rows = [row("baseline", "-", baseline, "", ", ".join(base_verdict.names(topology)) or "none")]
    for k in doubled_links:
        name = topology.links[k].name
        try:
            doubled, plan = double_link(replanner, topology, k, baseline)
        except LegendError as exc:
            rows.append(row(f"x2 {name}", name, None, _reason(exc), "-"))
            tick(f"x2 {name}")
            continue
        verdict = (
            base_verdict
            if plan is baseline
            else binding_links(plan, doubled, fleet, replanner, reference=plan)
        )
        entry = row(f"x2 {name}", name, plan, "", ", ".join(verdict.names(doubled)) or "none")
        if k not in congested:
            entry["note"] = "not congested: the program and the plan are unchanged"
        rows.append(entry)
        tick(f"x2 {name}")
    return rows


# -- figures -------------------------------------------------------------------------------

_PANELS = (
    ("round_time_s", "round time (s)"),
    ("total_MB", "bytes per round (MB, up + down)"),
    ("participation_pct", "participation (%)"),
    ("depth_mean", "mean LoRA depth (layers)"),
)


def _panel_figure(frame: pd.DataFrame, x: str, xlabel: str, title: str, *, log2x: bool) -> bytes:
    fig = new_figure(10.0, 6.2)
    axes = fig.subplots(2, 2)
    feasible = frame[frame["status"].isin(("OPTIMAL", "FEASIBLE"))]
    failed = frame[~frame["status"].isin(("OPTIMAL", "FEASIBLE"))]
    for ax, (column, label) in zip(axes.flat, _PANELS, strict=True):
        ax.plot(feasible[x], feasible[column], "o-", color="#2f6fdf")
        if column == "depth_mean" and len(feasible):
            ax.fill_between(
                feasible[x],
                feasible["depth_min"],
                feasible["depth_max"],
                color="#2f6fdf",
                alpha=0.15,
                label="min-max",
            )
            ax.legend(fontsize=8)
        for xv in failed[x]:
            ax.axvline(xv, color="#c0392b", linestyle=":", linewidth=1)
        ax.set_ylabel(label, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=9)
        if log2x:
            ax.set_xscale("log", base=2)
            ax.set_xticks(list(frame[x]))
            ax.set_xticklabels([f"{v:g}" for v in frame[x]])
        ax.grid(alpha=0.3)
    fig.suptitle(title + (" (dotted red: infeasible)" if len(failed) else ""))
    return figure_png(fig)


def _pareto_figure(frame: pd.DataFrame, baseline: Plan, objective: str) -> bytes:
    fig = new_figure(10.0, 4.4)
    ax, ax2 = fig.subplots(1, 2)
    ok = frame[frame["status"].isin(("OPTIMAL", "FEASIBLE"))]
    front = ok[ok["pareto"]].sort_values("round_time_s")
    ax.scatter(ok["round_time_s"], ok["utility"], color="#9aa5b8", label="planned points", zorder=2)
    ax.step(
        front["round_time_s"],
        front["utility"],
        where="post",
        color="#2f6fdf",
        label="Pareto front",
        zorder=3,
    )
    ax.scatter(front["round_time_s"], front["utility"], color="#2f6fdf", zorder=4)
    ax.scatter(
        [baseline.round_time_s],
        [baseline.utility],
        marker="*",
        s=180,
        color="#f29d38",
        label=f"baseline ({objective})",
        zorder=5,
    )
    ax.set_xlabel("round time (s)")
    ax.set_ylabel("utility U")
    ax.set_title("Deadline vs utility")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax2.plot(ok["deadline_s"], ok["depth_mean"], "o-", color="#2f6fdf", label="mean depth")
    ax2.plot(ok["deadline_s"], ok["rank_mean"], "s--", color="#34a853", label="mean rank")
    ax2.set_xscale("log")
    ax2.set_xlabel("deadline (s)")
    ax2.set_title("What a longer round buys")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    return figure_png(fig)


def _model_figure(frame: pd.DataFrame) -> bytes:
    import numpy as np

    fig = new_figure(10.0, 3.8)
    axes = fig.subplots(1, 3)
    names = list(frame["model"])
    x = np.arange(len(names))
    ok = frame["status"].isin(("OPTIMAL", "FEASIBLE")).to_numpy()
    specs = (
        ("round_time_s", "round time (s)", True),
        ("total_MB", "bytes per round (MB)", True),
        ("depth_mean", "mean depth / layers", False),
    )
    for ax, (column, label, log) in zip(axes, specs, strict=True):
        values = frame[column].to_numpy(dtype=float)
        if column == "depth_mean":
            values = values / frame["layers"].to_numpy(dtype=float)
        heights = np.where(ok, values, 0.0)
        ax.bar(x, heights, color=["#2f6fdf" if k else "#e4e7ee" for k in ok])
        for i, k in enumerate(ok):
            if not k:
                ax.text(
                    i,
                    0.04,
                    "infeasible",
                    rotation=90,
                    ha="center",
                    va="bottom",
                    color="#c0392b",
                    fontsize=9,
                    transform=ax.get_xaxis_transform(),
                )
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
        ax.set_title(label, fontsize=10)
        if log and ok.any():
            ax.set_yscale("log")
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("Model swapped, same fleet and job")
    return figure_png(fig)


def _links_figure(frame: pd.DataFrame) -> bytes:
    import numpy as np

    fig = new_figure(10.0, min(12.0, max(3.0, 0.32 * len(frame) + 1.8)))
    axes = fig.subplots(1, 2, sharey=True)
    y = np.arange(len(frame))[::-1]
    colours = ["#9aa5b8" if s == "baseline" else "#2f6fdf" for s in frame["scenario"]]
    for ax, (column, label) in zip(
        axes, (("round_time_s", "round time (s)"), ("objective", "objective")), strict=True
    ):
        values = frame[column].to_numpy(dtype=float)
        ax.barh(y, np.nan_to_num(values), color=colours)
        ax.axvline(values[0], color="#555", linestyle="--", linewidth=1, label="baseline")
        for yi, v in zip(y, values, strict=True):
            if np.isfinite(v):
                ax.annotate(" " + format_value(v), (v, yi), fontsize=8, va="center")
        ax.set_xlabel(label)
        ax.set_xlim(0, max(float(np.nanmax(values)), 1e-12) * 1.2)
        ax.grid(alpha=0.3, axis="x")
    axes[0].set_yticks(y)
    axes[0].set_yticklabels(
        [
            f"{s} (binds: {b})"
            for s, b in zip(frame["scenario"], frame["binding_links"], strict=True)
        ],
        fontsize=8,
    )
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle("Each link at twice its capacity, re-planned")
    return figure_png(fig)


# -- the report ----------------------------------------------------------------------------

_COLUMNS = (
    "status",
    "devices",
    "participants",
    "participation_pct",
    "round_time_s",
    "total_MB",
    "MB_per_device",
    "depth_mean",
    "depth_min",
    "depth_max",
    "rank_mean",
    "utility",
    "utility_per_s",
    "solve_time_s",
    "note",
)


def build_whatif_report(result: WhatIfResult) -> Report:
    """The what-if report: one section per sweep, a table and a figure each."""
    base = result.baseline
    n = len(result.fleet)
    classes = sorted({d.device_class or "-" for d in result.fleet.devices})
    headline = KeyValues(
        items=(
            ("Model", result.spec.name),
            ("Devices", f"{n:,}"),
            ("Classes", f"{len(classes)}"),
            ("Solver", result.options.solver),
            ("Baseline round time", f"{format_value(base.round_time_s)} s"),
            (
                "Baseline bytes",
                f"{(base.total_upload_bytes + base.total_download_bytes) / MB:,.1f} MB",
            ),
            ("Sweep time", f"{result.elapsed_s:.1f} s"),
            *(
                (
                    (
                        "Topology",
                        f"{len(result.topology.links):,} links, "
                        f"{len(result.topology.congested(result.fleet)):,} congested",
                    ),
                )
                if result.topology is not None
                else ()
            ),
        )
    )
    sections = [
        Section(
            title="Summary",
            blocks=(
                headline,
                Paragraph(
                    text=(
                        f"Fleet {result.fleet.source}; job: batch {result.job.batch_size}, "
                        f"sequence {result.job.seq_len}, {result.job.local_steps} local steps, "
                        f"rank grid {list(result.job.ranks)}, target modules "
                        f"{result.job.target_modules!r}; objective {result.options.objective}. "
                        "Every point is a plan computed by the planner; infeasible points "
                        "keep the planner's reason in the `note` column."
                        + (
                            " Every point is planned on the network topology."
                            if result.topology is not None
                            else ""
                        )
                        + "".join(" " + note for note in result.notes)
                    )
                ),
            ),
        )
    ]

    def table(frame: pd.DataFrame, key: str, name: str, title: str) -> Table:
        cols = [key, *(["pareto"] if "pareto" in frame.columns else []), *_COLUMNS]
        if "layers" in frame.columns:
            cols.insert(1, "layers")
        return Table(name=name, title=title, frame=frame[[c for c in cols if c in frame.columns]])

    def sweep(
        section: str,
        frame: pd.DataFrame,
        key: str,
        name: str,
        title: str,
        panel: tuple[str, str, str, bool],
    ) -> Section:
        """A sweep's section: its table and its panel figure (``panel``: the figure's x
        column, x label, title and whether x is on a log2 scale)."""
        x, xlabel, note, log2x = panel
        png = _panel_figure(frame, x, xlabel, note, log2x=log2x)
        return Section(
            title=section,
            blocks=(
                table(frame, key, name, title),
                Figure(name=name, title=title, png=png),
            ),
        )

    if len(result.bandwidth):
        sections.append(
            sweep(
                "Bandwidth",
                result.bandwidth,
                "bandwidth_scale",
                "bandwidth",
                "Bandwidth scaled",
                panel=(
                    "bandwidth_scale",
                    "bandwidth scale (x)",
                    "Every device's uplink and downlink scaled",
                    True,
                ),
            )
        )
    if len(result.fleet_size):
        sections.append(
            sweep(
                "Fleet size",
                result.fleet_size,
                "fleet_scale",
                "fleet_size",
                "Fleet size scaled",
                panel=(
                    "devices",
                    "devices",
                    "Fleet scaled per device class (same class mix)",
                    False,
                ),
            )
        )
    if len(result.deadline):
        sections.append(
            Section(
                title="Deadline vs utility",
                blocks=(
                    Paragraph(
                        text="Objective 'deadline' (maximise utility within the deadline) at "
                        "deadlines from the smallest every device can meet to the time of the "
                        "slowest device's largest configuration. `pareto` marks the points "
                        "no other point beats on both round time and utility."
                    ),
                    table(result.deadline, "deadline_s", "deadline", "Deadline sweep"),
                    Figure(
                        name="pareto",
                        title="Deadline vs utility (Pareto front)",
                        png=_pareto_figure(result.deadline, base, result.options.objective),
                    ),
                ),
            )
        )
    if len(result.models):
        sections.append(
            Section(
                title="Model swapped",
                blocks=(
                    table(result.models, "model", "models", "Model swapped"),
                    Figure(name="models", title="Model swapped", png=_model_figure(result.models)),
                ),
            )
        )
    if len(result.links):
        sections.append(
            Section(
                title="Links doubled",
                blocks=(
                    Paragraph(
                        text="Each link at twice its capacity (up and down), the round "
                        "re-planned with the same solver and options, against the baseline. "
                        "changed: devices whose configuration (layers, ranks) differs from "
                        "the baseline; binding_links: the links that bind in that plan "
                        "(doubling one of them again gives a better objective or a shorter "
                        "round). A link that is not congested adds no row to the program, so "
                        "doubling it changes nothing."
                    ),
                    Table(
                        name="links",
                        title="Links doubled",
                        frame=result.links[
                            [
                                "scenario",
                                "status",
                                "round_time_s",
                                "round_time_change_pct",
                                "objective",
                                "objective_change_pct",
                                "total_MB",
                                "utility",
                                "changed_devices",
                                "changed",
                                "binding_links",
                                "note",
                            ]
                        ],
                    ),
                    Figure(
                        name="links_doubled",
                        title="Round time and objective with each link doubled",
                        png=_links_figure(result.links),
                    ),
                ),
            )
        )
    return Report(
        kind="whatif",
        title=f"What-if report: {result.spec.name}, {n:,} devices",
        subtitle=f"{result.fleet.source} | solver {result.options.solver}",
        sections=tuple(sections),
        meta={
            "devices": n,
            "points": int(
                len(result.bandwidth)
                + len(result.fleet_size)
                + len(result.deadline)
                + len(result.models)
                + len(result.links)
            ),
        },
    )
