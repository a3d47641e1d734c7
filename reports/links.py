"""Shared links in the reports: each link's load in a plan, which links bind, doubling one.

A topology (:mod:`legend.planner.topology`) routes devices through links they share. For a
plan, :func:`link_frame` gives per link the devices routed through it, the round's bytes each
way (the plan's predictions), its capacity and its utilisation
``bytes / (capacity x round time)``.

**Which link binds.** A link *binds* when doubling its capacity
(:meth:`~legend.planner.topology.Topology.with_capacity`, factor 2) and re-planning with the
plan's own solver and options gives a strictly better objective or a shorter round
(:func:`binding_links`). Only congested links are re-planned: an uncongested link adds no
row to the program and stays uncongested when doubled, so the program and its plan are
unchanged. The reference is the plan itself when it was made with this topology (its inputs
digest matches), otherwise a re-plan with the topology. When re-planning is not possible (the
job's cost model is unknown, or the plan's solver does not model a topology) or more than
``max_replans`` links are congested, the rule of a federated run's ``links.csv`` applies
instead: a link binds when doubling it ends the round sooner on the fair-sharing clock
(:func:`~legend.planner.topology.simulate_round`), here fed with the plan's predicted compute
times and bytes. On that clock too, an uncongested link never slows a transfer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from legend.models.errors import LegendError
from legend.models.spec import ModelSpec
from legend.planner.api import TOPOLOGY_BLIND_SOLVERS, PlannerOptions, PlanningProblem, plan_round
from legend.planner.costs import Calibration, CostModel
from legend.planner.plan import Plan
from legend.planner.profiles import Fleet, JobParams
from legend.planner.topology import Topology, TopologyError, simulate_round
from legend.reports.errors import ReportInputError
from legend.reports.render import Figure, figure_png, new_figure, short_list

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "ALL_LINKS",
    "MAX_REPLANS",
    "LinkVerdict",
    "Replanner",
    "binding_links",
    "changed_devices",
    "double_link",
    "link_figure",
    "link_frame",
    "options_from_plan",
    "resolve_links",
]

ALL_LINKS = "all"
MAX_REPLANS = 16
MB = 1e6
# A re-plan counts as better only beyond this relative margin (solver round-off).
_REL_TOL = 1e-6
BINDING_COLOUR = "#c0392b"
UP_COLOUR = "#34a853"
DOWN_COLOUR = "#4c8bf5"


def options_from_plan(plan: Plan) -> PlannerOptions:
    """The planner options a plan was made with (its ``options``), as :class:`PlannerOptions`."""
    allowed = set(PlannerOptions.__dataclass_fields__)
    values = {k: v for k, v in (plan.options or {}).items() if k in allowed}
    for key in ("layer_weights", "rank_gains", "saturation"):
        if isinstance(values.get(key), list):
            values[key] = tuple(values[key])
    values.setdefault("solver", plan.solver)
    values.setdefault("objective", plan.objective)
    try:
        return PlannerOptions(**values)
    except LegendError as exc:
        raise ReportInputError(f"the plan's planner options cannot be re-used: {exc}") from None


@dataclass(frozen=True, kw_only=True)
class Replanner:
    """A plan's inputs, to plan the same round again on another topology."""

    fleet: Fleet
    spec: ModelSpec
    job: JobParams
    options: PlannerOptions
    calibration: Calibration | None = None

    @classmethod
    def for_plan(cls, plan: Plan, fleet: Fleet, costs: CostModel) -> Replanner:
        """Re-plan ``plan`` with the cost model that reproduces it and the plan's options."""
        return cls(
            fleet=fleet,
            spec=costs.spec,
            job=costs.job,
            options=options_from_plan(plan),
            calibration=costs.calibration,
        )

    @property
    def models_topology(self) -> bool:
        return self.options.solver not in TOPOLOGY_BLIND_SOLVERS

    def plan(self, topology: Topology) -> Plan:
        return plan_round(*self._inputs, calibration=self.calibration, topology=topology)

    def digest(self, topology: Topology) -> str:
        """The inputs digest a plan of this round on ``topology`` carries."""
        problem = PlanningProblem.create(
            *self._inputs, calibration=self.calibration, topology=topology
        )
        return problem.digest()

    @property
    def _inputs(self) -> tuple[Fleet, ModelSpec, JobParams, PlannerOptions]:
        return self.fleet, self.spec, self.job, self.options

    def reference(self, plan: Plan, topology: Topology) -> Plan:
        """``plan`` when it was made with these inputs on ``topology``, else a re-plan."""
        return plan if plan.inputs_digest == self.digest(topology) else self.plan(topology)


def resolve_links(topology: Topology, names: Sequence[str], option: str) -> tuple[int, ...]:
    """Link indices for ``names`` (``all``: every link that carries a device), in order.

    Raises
    ------
    ReportInputError
        A name that is no link of the topology; the message lists the valid names.
    """
    carrying = [k for k in range(len(topology.links)) if topology.devices_on(k)]
    out: list[int] = []
    for name in names:
        if name.strip().lower() == ALL_LINKS:
            picked = carrying
        else:
            try:
                picked = [topology.link_index(name.strip())]
            except TopologyError:
                valid = [topology.links[k].name for k in carrying]
                raise ReportInputError(
                    f"`{option}` {name!r}: the topology has no link named {name!r}; links: "
                    f"{short_list(valid, 20)} (or `{ALL_LINKS}` for each in turn)"
                ) from None
        out.extend(k for k in picked if k not in out)
    return tuple(out)


def _better(candidate: Plan, reference: Plan) -> bool:
    """A strictly better objective or a shorter round."""
    new, old = candidate.objective_value, reference.objective_value
    margin = _REL_TOL * max(abs(old), 1e-12)
    better = new < old - margin if reference.objective == "min-time" else new > old + margin
    shorter = candidate.round_time_s < reference.round_time_s * (1 - _REL_TOL)
    return better or shorter


def double_link(
    replanner: Replanner, topology: Topology, link: int, reference: Plan
) -> tuple[Topology, Plan]:
    """``topology`` with ``link`` at twice its capacity and the round re-planned on it.

    An uncongested link stays uncongested and adds no row, so ``reference`` is returned.
    """
    doubled = topology.with_capacity(link, factor=2.0)
    congested = {k for k, _up, _down in topology.congested(replanner.fleet)}
    if link not in congested:
        return doubled, reference
    return doubled, replanner.plan(doubled)


@dataclass(frozen=True, kw_only=True)
class LinkVerdict:
    """Which links bind (one flag per link of the topology) and how that was decided.

    ``rule`` is ``"re-plan"`` or ``"clock"``; ``doubled`` holds the re-plan with each
    congested link doubled (re-plan rule only).
    """

    binding: tuple[bool, ...]
    rule: str
    note: str
    doubled: Mapping[int, Plan] = field(default_factory=dict)

    def names(self, topology: Topology) -> list[str]:
        return [lk.name for lk, b in zip(topology.links, self.binding, strict=True) if b]


def _clock_round_s(plan: Plan, topology: Topology, fleet: Fleet) -> float:
    """The plan's round on the fair-sharing clock (predicted compute times and bytes)."""
    part = plan.participants
    finish = simulate_round(
        topology,
        [fleet[d.device_id] for d in part],
        [d.predicted_compute_s for d in part],
        [max(d.predicted_upload_bytes, d.predicted_download_bytes) for d in part],
    )
    return max(finish, default=0.0)


def binding_links(
    plan: Plan,
    topology: Topology,
    fleet: Fleet,
    replanner: Replanner | None = None,
    *,
    max_replans: int = MAX_REPLANS,
    reference: Plan | None = None,
) -> LinkVerdict:
    """Which links of ``topology`` bind ``plan`` (see the module docstring).

    ``reference`` is the plan re-plans are compared with (default:
    :meth:`Replanner.reference`).
    """
    congested = [k for k, _up, _down in topology.congested(fleet)]
    flags = [False] * len(topology.links)
    why = ""
    if replanner is None:
        why = "the job's cost model behind the plan is unknown"
    elif not replanner.models_topology:
        why = f"solver {replanner.options.solver!r} does not model a topology"
    elif len(congested) > max_replans:
        why = f"{len(congested)} links are congested (re-planning stops at {max_replans})"
    if replanner is not None and not why:
        base = reference if reference is not None else replanner.reference(plan, topology)
        doubled: dict[int, Plan] = {}
        failed: list[str] = []
        for k in congested:
            try:
                _, doubled[k] = double_link(replanner, topology, k, base)
            except LegendError as exc:
                failed.append(f"{topology.links[k].name} ({str(exc).splitlines()[0]})")
                continue
            flags[k] = _better(doubled[k], base)
        solver, objective = replanner.options.solver, replanner.options.objective
        note = (
            f"Binding: doubling the link's capacity and re-planning with {solver} "
            f"(objective {objective}) gives a better objective or a shorter "
            f"round than {'the plan' if base is plan else 'a re-plan on this topology'}; "
            f"{len(congested)} congested link(s) re-planned, uncongested links cannot bind."
        )
        if failed:
            note += f" Re-planning failed for {short_list(failed, 3)}: counted as not binding."
        return LinkVerdict(binding=tuple(flags), rule="re-plan", note=note, doubled=doubled)
    round_s = _clock_round_s(plan, topology, fleet)
    for k in congested:
        wider = _clock_round_s(plan, topology.with_capacity(k, factor=2.0), fleet)
        flags[k] = round_s > 0 and wider < round_s * (1 - 1e-9)
    note = (
        f"Not re-planned ({why}). Binding: doubling the link's capacity ends the round sooner "
        "on the fair-sharing clock with the plan's predicted compute times and bytes (the rule "
        "of a federated run's links.csv)."
    )
    return LinkVerdict(binding=tuple(flags), rule="clock", note=note)


def link_frame(
    plan: Plan, topology: Topology, fleet: Fleet, binding: Sequence[bool]
) -> pd.DataFrame:
    """One row per link: devices routed through it, the plan's bytes, capacity, utilisation.

    Sorted by the higher of the two utilisations, busiest first.
    """
    import pandas as pd

    by_id = {d.device_id: d for d in plan.devices}
    congested = {k for k, _up, _down in topology.congested(fleet)}
    T = plan.round_time_s
    rows: list[dict[str, Any]] = []
    for k, link in enumerate(topology.links):
        on = topology.devices_on(k)
        part = [by_id[d] for d in on if d in by_id and by_id[d].participates]
        up = sum(d.predicted_upload_bytes for d in part)
        down = sum(d.predicted_download_bytes for d in part)
        rows.append(
            {
                "link": link.name,
                "devices": len(on),
                "participants": len(part),
                "routed": short_list(list(on), 3) or "-",
                "up_MB": up / MB,
                "down_MB": down / MB,
                "up_mbps": link.up_mbps,
                "down_mbps": link.down_mbps,
                "utilisation_up": up * 8 / (link.up_mbps * MB * T) if T > 0 else 0.0,
                "utilisation_down": down * 8 / (link.down_mbps * MB * T) if T > 0 else 0.0,
                "congested": k in congested,
                "binding": bool(binding[k]),
            }
        )
    frame = pd.DataFrame(rows)
    busiest = frame[["utilisation_up", "utilisation_down"]].max(axis=1)
    order = busiest.sort_values(ascending=False, kind="stable").index
    return frame.loc[order].reset_index(drop=True)


def link_figure(frame: pd.DataFrame, *, name: str, title: str, limit: int) -> Figure:
    """Utilisation per link, up and down; binding links in red. The ``limit`` busiest shown."""
    import numpy as np

    data = frame.head(limit).iloc[::-1]
    y = np.arange(len(data))
    fig = new_figure(10.0, min(14.0, max(2.4, 0.36 * len(data) + 1.6)))
    ax = fig.add_subplot()
    binding = data["binding"].to_numpy(dtype=bool)
    edge = [BINDING_COLOUR if b else "none" for b in binding]
    up = 100 * data["utilisation_up"].to_numpy(dtype=float)
    down = 100 * data["utilisation_down"].to_numpy(dtype=float)
    ax.barh(y + 0.2, up, height=0.4, color=UP_COLOUR, edgecolor=edge, linewidth=2, label="up")
    ax.barh(y - 0.2, down, height=0.4, color=DOWN_COLOUR, edgecolor=edge, linewidth=2, label="down")
    ax.axvline(100, color="#555", linestyle="--", linewidth=1, label="capacity x round time")
    ax.set_yticks(y)
    labels = [f"{n} (binding)" if b else str(n) for n, b in zip(data["link"], binding, strict=True)]
    ax.set_yticklabels(labels, fontsize=8 if len(labels) > 25 else 9)
    for tick, b in zip(ax.get_yticklabels(), binding, strict=True):
        if b:
            tick.set_color(BINDING_COLOUR)
            tick.set_fontweight("bold")
    top = max(float(np.nanmax(np.concatenate([up, down]))) if len(data) else 0.0, 100.0)
    ax.set_xlim(0, top * 1.08 if math.isfinite(top) else 110)
    ax.set_xlabel("utilisation, % of capacity x round time")
    ax.legend(loc="lower right", fontsize=8)
    shown = (
        f"the {len(data)} busiest of {len(frame):,} links"
        if len(frame) > len(data)
        else "every link"
    )
    return Figure(
        name=name,
        title=title,
        png=figure_png(fig),
        caption=f"Bytes through each link / (capacity x round time), {shown}; binding links "
        "outlined and labelled in red.",
    )


def changed_devices(before: Plan, after: Plan) -> list[str]:
    """Devices whose configuration (layers, ranks) differs between two plans."""
    old = {d.device_id: (d.layers, d.ranks) for d in before.devices}
    return [d.device_id for d in after.devices if old.get(d.device_id) != (d.layers, d.ranks)]
