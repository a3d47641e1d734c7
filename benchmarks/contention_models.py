"""How well each contention model predicts the fair-sharing clock, on the plans of finished runs.

For every round of each run directory given (a federated run with a topology, such as the
setting-B runs of ``time_to_accuracy.py``), the round time the ``"together"`` and the
``"staggered"`` contention models (:mod:`legend.planner.topology`) give the round's plan,
divided by the devices' part of the simulated round (``sim_time_s - server_time_s`` of
``rounds.csv``: the fair-sharing clock of the run). Both predictions use the analytic cost
model of the run's job with every device's frozen-prefix features already computed, so
rounds in which a device computes them (the first rounds of a run with
``train.cache_prefix``) are reported apart: ``--skip-rounds`` leaves out the first rounds.

Usage::

    .venv/bin/python benchmarks/contention_models.py RUN_DIR [RUN_DIR ...] \
        [--skip-rounds 5] [--out runs/bench/contention_models]

Writes ``contention_models.csv`` (per run and round) and ``contention_models.md`` (per run:
mean, spread and range of each model's ratio).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import load_run_config, markdown_table, reproduce_command, write_csv, write_markdown

MODELS = ("together", "staggered")


def run_ratios(run_dir: Path, skip_rounds: int) -> list[dict[str, object]]:
    """Per round of ``run_dir`` (after the first ``skip_rounds``): each model's predicted
    round time over the simulated one."""
    from legend.models.spec import get_model_spec
    from legend.planner.costs import CostModel
    from legend.planner.profiles import load_fleet
    from legend.planner.topology import load_topology, predicted_round_time

    cfg = load_run_config(run_dir)
    if not cfg.job.topology:
        raise SystemExit(f"{run_dir}: the run has no topology (job.topology is empty)")
    fleet = load_fleet(cfg.job.fleet)
    topology = load_topology(cfg.job.topology, fleet)
    costs = CostModel(get_model_spec(cfg.job.model), cfg.job_params)
    out = []
    with (run_dir / "rounds.csv").open(encoding="utf-8") as f:
        rounds = list(csv.DictReader(f))
    for row in rounds[skip_rounds:]:
        k = int(row["round"])
        plan = json.loads((run_dir / "plans" / f"round_{k:04d}.json").read_text(encoding="utf-8"))
        cfgs = {d["device_id"]: (tuple(d["layers"]), tuple(d["ranks"])) for d in plan["devices"]}
        clock = float(row["sim_time_s"]) - float(row.get("server_time_s") or 0.0)
        if clock <= 0:
            continue
        entry: dict[str, object] = {"run": str(run_dir), "round": k, "clock_s": clock}
        for model in MODELS:
            topo = dataclasses.replace(topology, contention=model)
            entry[model] = predicted_round_time(topo, fleet, costs, cfgs) / clock
        out.append(entry)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories with a topology")
    parser.add_argument("--skip-rounds", type=int, default=5, help="first rounds left out")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/contention_models"))
    args = parser.parse_args(argv)
    rows = [r for run in args.runs for r in run_ratios(run, args.skip_rounds)]
    write_csv(args.out / "contention_models.csv", rows, ("run", "round", "clock_s", *MODELS))
    table = []
    for run in args.runs:
        mine = [r for r in rows if r["run"] == str(run)]
        line: dict[str, object] = {"run": str(run), "rounds": len(mine)}
        for model in MODELS:
            v = [float(r[model]) for r in mine]  # type: ignore[arg-type]
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            line[f"{model}_mean"] = f"{statistics.mean(v):.3f} ± {sd:.3f}"
            line[f"{model}_range"] = f"{min(v):.3f}-{max(v):.3f}"
        table.append(line)
    columns = ("run", "rounds", *(f"{m}_{k}" for m in MODELS for k in ("mean", "range")))
    text = markdown_table(table, columns)
    command = reproduce_command("contention_models.py", argv)
    write_markdown(
        args.out / "contention_models.md",
        "Contention models against the fair-sharing clock",
        [
            "Predicted round time / simulated round (devices' part), per round after the "
            f"first {args.skip_rounds}; mean ± sd and range per run.",
            text,
        ],
        command,
    )
    print(text)


if __name__ == "__main__":
    main()
