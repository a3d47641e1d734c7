"""Planner quality: the exact planner's objective and solve time against the greedy's.

For fleets of 10 to 1,000 devices, plan one round of all-MiniLM-L6-v2 (query+value LoRA,
ranks 2,4,8,16, batch 16 x 48 tokens, 5 local steps: the settings of
``time_to_accuracy.py``) with the default objective (``progress``: the progress model's
measured prior per priced second; ``--objective rate`` for the fixed utility per second
``U / T``) twice, with the exact planner (``--solver``) and with the LEGEND-style greedy,
and report both objectives, their ratio, the round time ``T`` and utility ``U`` of each
plan, the proven MIP gap and both solve times (host wall clock, formulation included).
Two kinds of fleet, each drawn with several seeds:

``fleet50``
    devices drawn with replacement from the 50 profiles of ``benchmarks/fleet50.csv``
    (at most 50 distinct profiles);
``distinct``
    every device its own random profile (``planner_scale.distinct_fleet``: 0.3-60
    TFLOP/s, 5-500 Mbit/s up).

Both are planned with the default solver (``auto``: the exact sweep, since no coupling row
is active; the ``method`` column records which path solved each plan).

``--saturation H1 H2 ...`` plans the saturating progress model instead (the coverage
response ``H`` at 1, 2, ... mean-sized devices; :mod:`legend.planner.saturation`): a
coupled program, solved by the MILP over every configuration to ``--mip-gap``. The
greedy's moves stay per device; both plans are valued on the saturating model.

Every plan is checked by the independent validator. ``--smoke`` runs fleets of 10 and 30
devices with one seed in seconds.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    FLEET50,
    REPO_ROOT,
    markdown_table,
    reproduce_command,
    spread,
    write_csv,
    write_markdown,
)
from planner_scale import distinct_fleet

from legend.models.spec import get_model_spec
from legend.planner.api import PlannerOptions, PlanningProblem, plan_round
from legend.planner.plan import validate_plan
from legend.planner.profiles import Fleet, JobParams, load_fleet

COLUMNS = (
    "fleet",
    "devices",
    "seed",
    "method",
    "ip_status",
    "ip_gap",
    "ip_objective",
    "greedy_objective",
    "greedy_over_ip",
    "ip_round_time_s",
    "greedy_round_time_s",
    "ip_utility",
    "greedy_utility",
    "ip_time_s",
    "greedy_time_s",
    "valid",
)
SUMMARY_COLUMNS = (
    "fleet",
    "devices",
    "seeds",
    "method",
    "greedy_over_ip",
    "greedy_over_ip_min",
    "ip_time_s",
    "greedy_time_s",
    "ip_gap_max_pct",
    "all_valid",
)


def fleet50_sample(n: int, seed: int) -> Fleet:
    """``n`` devices drawn with replacement from ``fleet50.csv`` (ids made unique)."""
    base = load_fleet(FLEET50).devices
    rng = np.random.default_rng([seed, n, 50])
    picks = rng.integers(0, len(base), size=n)
    return Fleet(
        devices=tuple(
            replace(base[int(k)], device_id=f"{base[int(k)].device_id}#{i}")
            for i, k in enumerate(picks)
        )
    )


def job_params() -> JobParams:
    return JobParams(
        batch_size=16, seq_len=48, local_steps=5, target_modules="qv", ranks=(2, 4, 8, 16)
    )


def run_one(kind: str, n: int, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    spec = get_model_spec("all-MiniLM-L6-v2", target_modules="qv")
    job = job_params()
    fleet = fleet50_sample(n, seed) if kind == "fleet50" else distinct_fleet(n, seed)
    options = PlannerOptions(
        objective=args.objective,
        solver=args.solver,
        time_limit_s=args.time_limit_s,
        mip_gap=args.mip_gap,
        saturation=tuple(args.saturation) if args.saturation else "none",
    )
    start = time.perf_counter()
    plan = plan_round(fleet, spec, job, options)
    ip_time = time.perf_counter() - start
    method = plan.solver
    start = time.perf_counter()
    gplan = plan_round(fleet, spec, job, options.with_(solver="greedy"))
    g_time = time.perf_counter() - start
    costs = PlanningProblem.create(fleet, spec, job, options).costs
    valid = not validate_plan(plan, fleet, spec, job, cost_model=costs) and not validate_plan(
        gplan, fleet, spec, job, cost_model=costs
    )
    return {
        "fleet": kind,
        "devices": n,
        "seed": seed,
        "method": method,
        "ip_status": plan.status,
        "ip_gap": plan.mip_gap,
        "ip_objective": plan.objective_value,
        "greedy_objective": gplan.objective_value,
        "greedy_over_ip": gplan.objective_value / plan.objective_value,
        "ip_round_time_s": plan.round_time_s,
        "greedy_round_time_s": gplan.round_time_s,
        "ip_utility": plan.utility,
        "greedy_utility": gplan.utility,
        "ip_time_s": ip_time,
        "greedy_time_s": g_time,
        "valid": valid,
    }


def summarise(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    keys = sorted({(r["fleet"], r["devices"]) for r in rows}, key=lambda k: (k[0], k[1]))
    for kind, n in keys:
        mine = [r for r in rows if r["fleet"] == kind and r["devices"] == n]
        ratio = spread(r["greedy_over_ip"] for r in mine)
        gaps = [100 * r["ip_gap"] for r in mine if r["ip_gap"] is not None]
        out.append(
            {
                "fleet": kind,
                "devices": n,
                "seeds": len(mine),
                "method": mine[0]["method"],
                "greedy_over_ip": ratio.fmt(".4f"),
                "greedy_over_ip_min": ratio.lo,
                "ip_time_s": spread(r["ip_time_s"] for r in mine).fmt(".2f"),
                "greedy_time_s": spread(r["greedy_time_s"] for r in mine).fmt(".3f"),
                "ip_gap_max_pct": max(gaps) if gaps else None,
                "all_valid": all(r["valid"] for r in mine),
            }
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="fleets of 10 and 30, one seed")
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument(
        "--fleets", nargs="+", default=["fleet50", "distinct"], choices=["fleet50", "distinct"]
    )
    parser.add_argument("--solver", default="auto")
    parser.add_argument("--objective", default="progress", choices=["progress", "rate"])
    parser.add_argument("--saturation", type=float, nargs="+", default=None)
    parser.add_argument("--mip-gap", type=float, default=1e-4)
    parser.add_argument("--time-limit-s", type=float, default=60.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.saturation and args.objective != "progress":
        parser.error("--saturation applies to --objective progress only")
    if not 0 <= args.mip_gap < 1:
        parser.error(f"--mip-gap must be in [0, 1), got {args.mip_gap}")
    sizes = args.sizes or ([10, 30] if args.smoke else [10, 30, 100, 300, 1000])
    seeds = args.seeds or ([0] if args.smoke else [0, 1, 2])
    default_out = "planner_quality_smoke" if args.smoke else "planner_quality"
    out: Path = args.out or REPO_ROOT / "runs" / "bench" / default_out
    command = reproduce_command("planner_quality.py", argv)

    rows = []
    for kind in args.fleets:
        for n in sizes:
            for seed in seeds:
                row = run_one(kind, n, seed, args)
                rows.append(row)
                print(
                    f"{kind:>8} n={n:>5} seed {seed}: greedy/IP {row['greedy_over_ip']:.4f}  "
                    f"IP {row['ip_time_s']:.2f} s ({row['ip_status']})  "
                    f"greedy {row['greedy_time_s']:.3f} s  valid {row['valid']}",
                    flush=True,
                )
    summary = summarise(rows)
    write_csv(out / "planner_quality.csv", rows, COLUMNS)
    write_csv(out / "planner_quality_summary.csv", summary, SUMMARY_COLUMNS)
    summary_md = markdown_table(
        summary,
        SUMMARY_COLUMNS,
        headers={
            "greedy_over_ip": "greedy / exact objective",
            "greedy_over_ip_min": "worst seed",
            "ip_time_s": "exact solve (host s)",
            "greedy_time_s": "greedy (host s)",
            "ip_gap_max_pct": "max proven gap (%)",
        },
        formats={"greedy_over_ip_min": lambda v: f"{v:.4f}"},
    )
    md = write_markdown(
        out / "planner_quality.md",
        "Planner quality: exact vs greedy",
        [
            f"Objective `{args.objective}`"
            + (f", saturation {args.saturation}" if args.saturation else "")
            + f", solver {args.solver}, MIP gap {args.mip_gap:g}, time limit "
            f"{args.time_limit_s} s, seeds {seeds}. Solve times are host wall clock "
            "(formulation included).",
            summary_md,
            "## Every instance\n\n"
            + markdown_table(
                rows,
                COLUMNS,
                formats={
                    "ip_time_s": lambda v: f"{v:.2f}",
                    "greedy_time_s": lambda v: f"{v:.3f}",
                    "greedy_over_ip": lambda v: f"{v:.4f}",
                    "ip_round_time_s": lambda v: f"{v:.2f}",
                    "greedy_round_time_s": lambda v: f"{v:.2f}",
                },
            ),
        ],
        command,
    )
    print(summary_md)
    print(f"wrote {out / 'planner_quality.csv'}, {md}")
    print(f"reproduce: {command}")
    return 0 if all(r["valid"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
