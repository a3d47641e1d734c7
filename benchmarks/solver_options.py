"""HiGHS options on the exact planner's real planning problems: solve time and objective.

The planning problems of finished ``exact`` runs (such as those of ``time_to_accuracy.py``)
are rebuilt round by round from each run directory: the round's participants and planner
options from its plan file, the job's model, fleet file, topology (restricted to the
participants) and workload from ``config.toml``, the previous round's plan as the warm
start, and which devices already hold their frozen-prefix features (with
``train.cache_prefix``: those whose plan in an earlier round started above layer 0). The
profiles are the fleet file's (a run plans with its running estimates of them, so the
problems are the run's up to those estimates). Each problem is then planned once per HiGHS
configuration (``legend.planner.backends.HIGHS_OPTIONS``), configurations interleaved round
by round so that host load hits them alike; the wall time of each plan (host time) and its
objective are recorded.

Usage::

    .venv/bin/python benchmarks/solver_options.py RUN_DIR [RUN_DIR ...] [--rounds 10] \\
        [--repeats 3] [--contention staggered] [--out runs/bench/solver_options]
    .venv/bin/python benchmarks/solver_options.py --saturating 1 2 2.5 2.75 \\
        [--saturating-devices 10] [--saturating-seeds 0 1 2 3]

``--saturating`` adds programs that are not a run's: the saturating progress model over
devices drawn from ``fleet50.csv`` (one program per seed, no warm start). ``--smoke``: one
such program of four devices.

Writes ``solver_options.csv`` (per run, round, configuration and repeat) and
``solver_options.md``: per configuration and run, the median and total plan time, the
ratio of total time to the default's, and the largest relative objective difference from
the default's plan (the planner's ``mip_gap`` bounds what may differ).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import load_run_config, markdown_table, reproduce_command, write_csv, write_markdown

#: The configurations compared: HiGHS defaults, and the options the profiles of slow plans
#: pointed at (root restarts after presolve reductions; presolve itself).
CONFIGS: dict[str, dict[str, Any]] = {
    "highs-defaults": {},
    "no-restart": {"mip_allow_restart": False},
    "no-presolve": {"presolve": "off"},
    "no-restart-no-presolve": {"mip_allow_restart": False, "presolve": "off"},
    # the sub-MIP heuristics RINS and RENS (most of a slow staggered plan's time)
    "no-restart-no-rins-rens": {
        "mip_allow_restart": False,
        "mip_heuristic_run_rins": False,
        "mip_heuristic_run_rens": False,
    },
}


def problems(
    run_dir: Path, rounds: int, contention: str | None = None, *, any_method: bool = False
) -> list[dict[str, Any]]:
    """The first ``rounds`` planning problems of the ``exact`` run at ``run_dir``
    (``contention``: the topology's contention model instead of its own; ``any_method``: a
    run of any method, whose plans' options need not be the exact planner's)."""
    from legend.federation.core import restrict_topology
    from legend.models.spec import get_model_spec
    from legend.planner.plan import Plan
    from legend.planner.profiles import load_fleet
    from legend.planner.topology import load_topology
    from legend.reports.links import options_from_plan

    cfg = load_run_config(run_dir)
    if cfg.job.method != "exact" and not any_method:
        raise SystemExit(f"{run_dir}: a run of `exact` is needed, not {cfg.job.method!r}")
    fleet = load_fleet(cfg.job.fleet)
    topology = load_topology(cfg.job.topology, fleet) if cfg.job.topology else None
    if topology is not None and contention is not None:
        topology = dataclasses.replace(topology, contention=contention)
    spec = get_model_spec(cfg.job.model)
    job = cfg.job_params
    built: set[str] = set()
    previous = None
    out = []
    for k in range(1, rounds + 1):
        path = run_dir / "plans" / f"round_{k:04d}.json"
        if not path.exists():
            break
        plan = Plan.from_json(path.read_text(encoding="utf-8"), source=str(path))
        ids = [d.device_id for d in plan.devices]
        sub = fleet.subset(ids)
        if job.cache_prefix:
            sub = dataclasses.replace(
                sub,
                devices=tuple(
                    dataclasses.replace(d, prefix_built=d.device_id in built) for d in sub.devices
                ),
            )
        out.append(
            {
                "round": k,
                "fleet": sub,
                "spec": spec,
                "job": job,
                "options": options_from_plan(plan) if not any_method else None,
                "topology": restrict_topology(topology, ids) if topology is not None else None,
                "warm_start": previous,
                "plan": plan,
            }
        )
        built |= {d.device_id for d in plan.devices if d.layers and d.layers[0] > 0}
        previous = plan
    return out


def saturating_problems(
    response: tuple[float, ...], devices: int, seeds: Sequence[int]
) -> list[dict[str, Any]]:
    """Saturating programs (:mod:`legend.planner.saturation`) over ``devices`` devices drawn
    from ``fleet50.csv`` per seed, with the workload of ``planner_quality.py``; each is one
    "round" (its seed) of the source."""
    from planner_quality import fleet50_sample, job_params

    from legend.models.spec import get_model_spec
    from legend.planner.types import PlannerOptions

    spec = get_model_spec("all-MiniLM-L6-v2", target_modules="qv")
    options = PlannerOptions(saturation=response, solver="highs")
    return [
        {
            "round": seed,
            "fleet": fleet50_sample(devices, seed),
            "spec": spec,
            "job": job_params(),
            "options": options,
            "topology": None,
            "warm_start": None,
        }
        for seed in seeds
    ]


def main(argv: Sequence[str] | None = None) -> None:
    from legend.planner import backends
    from legend.planner.api import plan_round

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*", type=Path, help="run directories of `exact`")
    parser.add_argument("--rounds", type=int, default=10, help="first rounds of each run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument(
        "--contention",
        choices=("together", "staggered"),
        default=None,
        help="plan with this contention model of the runs' topology instead of its own",
    )
    parser.add_argument(
        "--saturating",
        type=float,
        nargs="+",
        default=None,
        metavar="H",
        help="also plan saturating programs (coverage response H at 1, 2, ... devices) over "
        "--saturating-devices devices drawn from fleet50.csv, one per --saturating-seeds seed",
    )
    parser.add_argument("--saturating-devices", type=int, default=10)
    parser.add_argument("--saturating-seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="one saturating program of 4 devices (response 1, 2), one repeat: seconds",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench/solver_options"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.saturating = args.saturating or [1.0, 2.0]
        args.saturating_devices, args.saturating_seeds, args.repeats = 4, [0], 1
    if not args.runs and not args.saturating:
        parser.error("give run directories, --saturating, or both")
    sources: list[tuple[str, list[dict[str, Any]]]] = [
        (str(run), problems(run, args.rounds, args.contention)) for run in args.runs
    ]
    if args.saturating:
        sources.append(
            (
                f"saturating, {args.saturating_devices} devices of fleet50.csv",
                saturating_problems(
                    tuple(args.saturating), args.saturating_devices, args.saturating_seeds
                ),
            )
        )
    rows: list[dict[str, Any]] = []
    for run, probs in sources:
        for prob in probs:
            for rep in range(args.repeats):
                for name in args.configs:
                    backends.HIGHS_OPTIONS.clear()
                    backends.HIGHS_OPTIONS.update(CONFIGS[name])
                    t0 = time.perf_counter()
                    plan = plan_round(
                        prob["fleet"],
                        prob["spec"],
                        prob["job"],
                        prob["options"],
                        topology=prob["topology"],
                        warm_start=prob["warm_start"],
                    )
                    rows.append(
                        {
                            "run": str(run),
                            "round": prob["round"],
                            "config": name,
                            "repeat": rep,
                            "plan_s": time.perf_counter() - t0,
                            "objective": plan.objective_value,
                            "status": plan.status,
                        }
                    )
                    print(
                        f"{run} round {prob['round']} {name}: {rows[-1]['plan_s']:.3f} s",
                        flush=True,
                    )
    backends.HIGHS_OPTIONS.clear()
    write_csv(
        args.out / "solver_options.csv",
        rows,
        ("run", "round", "config", "repeat", "plan_s", "objective", "status"),
    )
    table = []
    for run, _ in sources:
        mine = [r for r in rows if r["run"] == run]
        best = {}  # per round and config: the fastest repeat (host load only slows a plan)
        for r in mine:
            key = (r["round"], r["config"])
            if key not in best or r["plan_s"] < best[key]["plan_s"]:
                best[key] = r
        base_total = sum(r["plan_s"] for (_, c), r in best.items() if c == args.configs[0])
        for name in args.configs:
            times = [r["plan_s"] for (_, c), r in best.items() if c == name]
            diffs = [
                abs(r["objective"] - best[(k, args.configs[0])]["objective"])
                / max(abs(best[(k, args.configs[0])]["objective"]), 1e-12)
                for (k, c), r in best.items()
                if c == name
            ]
            table.append(
                {
                    "run": run,
                    "config": name,
                    "rounds": len(times),
                    "median_s": f"{statistics.median(times):.3f}",
                    "total_s": f"{sum(times):.2f}",
                    "vs_default": f"{sum(times) / base_total:.2f}x",
                    "max_objective_diff": f"{max(diffs):.1e}",
                }
            )
    columns = ("run", "config", "rounds", "median_s", "total_s", "vs_default", "max_objective_diff")
    text = markdown_table(table, columns)
    write_markdown(
        args.out / "solver_options.md",
        "HiGHS options on the exact planner's planning problems",
        [
            "Wall time of each plan (host time), the fastest of "
            f"{args.repeats} repeats per round and configuration; objective difference "
            f"relative to the first configuration's plan ({args.configs[0]}).",
            text,
        ],
        reproduce_command("solver_options.py", argv),
    )
    print(text)
    print(f"reproduce: {reproduce_command('solver_options.py', argv)}")


if __name__ == "__main__":
    main()
