"""30 phones on one access point: topology-aware vs topology-blind plans in federated runs.

The fleet ``examples/fleet_ap30.csv`` (30 phones, 0.3 TFLOPS, 20/50 Mbit/s) sits behind
``examples/topology_ap30.toml`` (one access point, 100/200 Mbit/s backhaul). Two short
federated runs of ``exact`` on all-MiniLM-L6-v2 (rotten_tomatoes, analytic cost model) use the
same topology on the simulated clock (fair sharing of the backhaul); one plans with it
(``planner.use_topology = true``), the other plans blind to it. From each run's
``rounds.csv``: the plan's predicted round time (``planned_round_time_s``) and the simulated
devices' round time (``sim_time_s - server_time_s``); from ``links.csv`` the backhaul's
utilisation.

Full run: the default job (batch 16, seq_len 64, 10 local steps, ranks 2/4/8/16), 2 rounds.
``--smoke``: batch 8, seq_len 32, 3 local steps, 1 round, fewer samples.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    REPO_ROOT,
    markdown_table,
    reproduce_command,
    set_offline_env,
    write_csv,
    write_markdown,
)

FLEET = REPO_ROOT / "examples" / "fleet_ap30.csv"
TOPOLOGY = REPO_ROOT / "examples" / "topology_ap30.toml"
JOB = REPO_ROOT / "examples" / "tiny.toml"
COLUMNS = (
    "plan",
    "round",
    "predicted_s",
    "simulated_s",
    "error",
    "backhaul_up_util",
    "configurations",
)


def job_overrides(*, smoke: bool, rounds: int | None = None) -> dict[str, Any]:
    """The job of the benchmark (and of its test) as ``load_job`` overrides of tiny.toml."""
    common: dict[str, Any] = {
        "job__model": "all-MiniLM-L6-v2",
        "job__fleet": str(FLEET),
        "job__topology": str(TOPOLOGY),
        "job__method": "exact",
        "train__ranks": [2, 4, 8, 16],
        "train__uniform_rank": 8,
        "train__learning_rate": 1e-3,
        "planner__calibration": "none",
        "planner__solver": "auto",
    }
    if smoke:
        return {
            **common,
            "job__rounds": rounds or 1,
            "train__batch_size": 8,
            "train__seq_len": 32,
            "train__local_steps": 3,
            "data__max_train": 300,
            "data__max_test": 100,
        }
    return {
        **common,
        "job__rounds": rounds or 2,
        "train__batch_size": 16,
        "train__seq_len": 64,
        "train__local_steps": 10,
        "data__max_train": 1200,
        "data__max_test": 300,
    }


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def compare(run_dir: Path, plan_name: str) -> list[dict[str, Any]]:
    """Predicted vs simulated round time per round of one run directory."""
    links = _rows(run_dir / "links.csv")
    devices = _rows(run_dir / "devices.csv")
    out = []
    for r in _rows(run_dir / "rounds.csv"):
        t = r["round"]
        predicted = float(r["planned_round_time_s"])
        simulated = float(r["sim_time_s"]) - float(r["server_time_s"])
        backhaul = [x for x in links if x["round"] == t and x["link"] == "ap-1--server"]
        configs = sorted(
            {(d["depth"], d["ranks"]) for d in devices if d["round"] == t and d["status"] == "ok"}
        )
        out.append(
            {
                "plan": plan_name,
                "round": int(t),
                "predicted_s": predicted,
                "simulated_s": simulated,
                "error": simulated / predicted - 1,
                "backhaul_up_util": float(backhaul[0]["utilisation_up"]) if backhaul else 0.0,
                "configurations": "; ".join(f"depth {d} ranks {k}" for d, k in configs),
            }
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="small workload, 1 round")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    set_offline_env()
    from legend.federation.job import load_job
    from legend.federation.runner import prepare, run_job

    out: Path = args.out or REPO_ROOT / "runs" / "bench" / (
        "topology_contention_smoke" if args.smoke else "topology_contention"
    )
    command = reproduce_command("topology_contention.py", argv)
    cfg = load_job(JOB, **job_overrides(smoke=args.smoke, rounds=args.rounds))
    prepared = prepare(cfg, calibration=None)
    rows: list[dict[str, Any]] = []
    for name, aware in (("topology-aware", True), ("topology-blind", False)):
        run_dir = out / name
        shutil.rmtree(run_dir, ignore_errors=True)
        run_job(
            cfg.override("planner", use_topology=aware),
            run_dir,
            prepared=prepared,
            show_progress=False,
        )
        for row in compare(run_dir, name):
            rows.append(row)
            print(
                f"{name}: round {row['round']}: predicted {row['predicted_s']:.3f} s, "
                f"simulated {row['simulated_s']:.3f} s ({100 * row['error']:+.1f}%), "
                f"backhaul up {100 * row['backhaul_up_util']:.0f}% used",
                flush=True,
            )
    write_csv(out / "topology_contention.csv", rows, COLUMNS)
    formats = {
        "predicted_s": lambda v: f"{v:.3f} s",
        "simulated_s": lambda v: f"{v:.3f} s",
        "error": lambda v: f"{100 * v:+.1f}%",
        "backhaul_up_util": lambda v: f"{100 * v:.0f}%",
    }
    table = markdown_table(rows, COLUMNS, formats=formats)
    write_markdown(out / "topology_contention.md", "Topology contention (ap30)", [table], command)
    print(table)
    print(command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
