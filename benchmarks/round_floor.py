"""How far each method's rounds are from the shortest round any plan could have.

A round can be no shorter than its *floor*: the slowest participant on its cheapest
configuration (with a topology, the shortest round the contention rows allow). When a
method's rounds sit on the floor, no planner can make them shorter; being sooner to a
target then needs more learning per round at that length, or fewer participants.

For every round of each finished run (any method, such as those of
``time_to_accuracy.py``), the round's problem is rebuilt from the run directory (its
participants, the job's model, fleet, topology and workload, which devices already hold
their frozen-prefix features; ``solver_options.problems``), and compared:

- ``floor_s``: the exact planner's ``min-time`` plan with no utility floor, on the fleet
  file's profiles (the clock's);
- ``plan_s``: the round's plan priced on the same profiles (the run planned with its own
  running estimates of them, so the plan's own ``round_time_s`` is not comparable);
- ``clock_s``: the simulated device time of the round (``sim_time_s - server_time_s`` of
  ``rounds.csv``; jitter included, the server's part left out).

Usage::

    .venv/bin/python benchmarks/round_floor.py RUN_DIR [RUN_DIR ...] [--rounds 20] \\
        [--out runs/bench/round_floor]

Writes ``round_floor.csv`` (per run and round) and ``round_floor.md``: per run, the mean and
standard deviation over rounds of ``plan_s / floor_s`` and ``clock_s / floor_s``, and the
share of rounds whose plan is within 1% of the floor. Simulated seconds; the host time it
takes is a few seconds a run.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import markdown_table, reproduce_command, write_csv, write_markdown
from solver_options import problems

#: A plan within this share of the floor counts as on it.
ON_FLOOR = 0.01


def round_rows(run_dir: Path, rounds: int) -> list[dict[str, Any]]:
    """Per round of ``run_dir``: the floor, the plan priced on the fleet file's profiles and
    the clocked device time (simulated seconds)."""
    from legend.planner.api import PlannerOptions, PlanningProblem, plan_round
    from legend.planner.topology import predicted_round_time

    with (run_dir / "rounds.csv").open(encoding="utf-8") as f:
        clocked = {int(r["round"]): r for r in csv.DictReader(f)}
    floor_options = PlannerOptions(objective="min-time", utility_floor=1e-9, seconds_per_mb=0.0)
    out = []
    for prob in problems(run_dir, rounds, any_method=True):
        fleet, topology, plan = prob["fleet"], prob["topology"], prob["plan"]
        floor = plan_round(fleet, prob["spec"], prob["job"], floor_options, topology=topology)
        problem = PlanningProblem.create(fleet, prob["spec"], prob["job"], topology=topology)
        cfgs = {d.device_id: (d.layers, d.ranks) for d in plan.devices if d.layers}
        if topology is not None:
            plan_s = predicted_round_time(topology, fleet, problem.costs, cfgs)
        else:
            plan_s = max(problem.costs.evaluate(fleet[i], *c).time_s for i, c in cfgs.items())
        row = clocked[prob["round"]]
        out.append(
            {
                "run": str(run_dir),
                "round": prob["round"],
                "floor_s": floor.round_time_s,
                "plan_s": plan_s,
                "clock_s": float(row["sim_time_s"]) - float(row["server_time_s"]),
            }
        )
    return out


def summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    plan = [r["plan_s"] / r["floor_s"] for r in rows]
    clock = [r["clock_s"] / r["floor_s"] for r in rows]
    sd = statistics.stdev if len(rows) > 1 else (lambda _: 0.0)
    return {
        "rounds": len(rows),
        "plan_vs_floor": f"{statistics.mean(plan):.3f} ± {sd(plan):.3f}",
        "on_floor": f"{sum(p <= 1 + ON_FLOOR for p in plan)}/{len(plan)}",
        "clock_vs_floor": f"{statistics.mean(clock):.3f} ± {sd(clock):.3f}",
        "mean_floor_s": f"{statistics.mean(r['floor_s'] for r in rows):.3f}",
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories")
    parser.add_argument("--rounds", type=int, default=20, help="first rounds of each run")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/round_floor"))
    args = parser.parse_args(argv)
    rows: list[dict[str, Any]] = []
    table = []
    for run in args.runs:
        mine = round_rows(run, args.rounds)
        if not mine:
            raise SystemExit(f"{run}: no rounds with a plan (plans/round_0001.json missing)")
        rows.extend(mine)
        table.append({"run": str(run), **summary(mine)})
        print(table[-1], flush=True)
    write_csv(args.out / "round_floor.csv", rows, ("run", "round", "floor_s", "plan_s", "clock_s"))
    columns = ("run", "rounds", "plan_vs_floor", "on_floor", "clock_vs_floor", "mean_floor_s")
    text = markdown_table(table, columns)
    write_markdown(
        args.out / "round_floor.md",
        "Rounds against their floor (the slowest participant's cheapest configuration)",
        [
            "Mean ± standard deviation over rounds; plan and floor priced on the fleet file's "
            f"profiles; a plan within {ON_FLOOR:.0%} of the floor counts as on it; the clock "
            "is the simulated device time (jitter included, the server's part left out).",
            text,
        ],
        reproduce_command("round_floor.py", argv),
    )
    print(text)


if __name__ == "__main__":
    main()
