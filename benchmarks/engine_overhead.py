#!/usr/bin/env python
"""Engine overhead: the same jobs in-process, on Flower's simulation runtime and on a Flower
deployment on loopback, side by side on this machine.

For each job and engine it runs ``legend run`` in a fresh process (so start-up is counted
the same way for all), reads the run's ``rounds.csv`` and reports:

- host time per round (the server's wall time from planning to the checkpoint, central
  evaluation included), for round 1 and for the later rounds (steady state);
- the overhead of each engine relative to the in-process engine for the same job;
- the wall time of the whole command, and for the deployment the time to start the local
  SuperLink and SuperNodes (``scripts/flower_local.py``'s ``start_local_federation``);
- whether the final global adapter equals the in-process one (max absolute difference).

Usage::

    python benchmarks/engine_overhead.py --rounds 4 --out benchmarks/results/engine_overhead

Jobs: ``tiny`` is ``examples/tiny.toml``; ``minilm`` is the same job with the pretrained
all-MiniLM-L6-v2 (22.7 M parameters, offline) and ``seq_len`` 64. Both use the 6-device
``examples/tiny_fleet.csv``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny.toml"
ENGINES = ("inprocess", "flower-sim", "flower-deploy")
JOBS = ("tiny", "minilm")


def _job_file(name: str, workdir: Path) -> Path:
    if name == "tiny":
        return TINY
    text = TINY.read_text()
    text = text.replace('model = "tiny-bert"', 'model = "all-MiniLM-L6-v2"')
    text = text.replace('name = "tiny"', 'name = "minilm"')
    text = text.replace("seq_len = 32", "seq_len = 64")
    text = text.replace(
        'fleet = "tiny_fleet.csv"', f'fleet = "{ROOT / "examples" / "tiny_fleet.csv"}"'
    )
    path = workdir / "minilm.toml"
    path.write_text(text)
    return path


def _rounds(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "rounds.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def _final_state(run_dir: Path) -> Any:
    from legend.federation.adapters import AdapterState

    state = json.loads((run_dir / "checkpoints" / "state.json").read_text())
    return AdapterState.from_npz(run_dir / "checkpoints" / state["global_state"])


def _max_diff(a: Any, b: Any) -> float:
    out = 0.0
    for key, (x, y) in a.factors.items():
        u, v = b.factors[key]
        out = max(out, float(np.abs(x - u).max()), float(np.abs(y - v).max()))
    for key, x in a.head.items():
        out = max(out, float(np.abs(x - b.head[key]).max()))
    return out


def _run(job: Path, engine: str, rounds: int, out: Path, superlink: str | None) -> float:
    from legend.federation.flower_engine import flower_env

    cmd = [sys.executable, "-m", "legend.federation.cli", "run", str(job), "--engine", engine]
    cmd += ["--rounds", str(rounds), "--out", str(out), "--quiet"]
    if superlink:
        cmd += ["--superlink", superlink]
    start = time.perf_counter()
    proc = subprocess.run(
        cmd, env=flower_env(), capture_output=True, text=True, timeout=1800, check=False
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{engine} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall


def measure(job_name: str, engines: list[str], rounds: int, workdir: Path) -> list[dict[str, Any]]:
    from legend.federation.flower_engine import start_local_federation
    from legend.federation.job import load_job
    from legend.planner.profiles import load_fleet

    job = _job_file(job_name, workdir)
    results: list[dict[str, Any]] = []
    for engine in engines:
        out = workdir / f"{job_name}-{engine}"
        fed = None
        startup = 0.0
        try:
            if engine == "flower-deploy":
                ids = list(load_fleet(load_job(job).job.fleet).device_ids)
                t0 = time.perf_counter()
                fed = start_local_federation(ids, state_dir=workdir / f"fed-{job_name}")
                startup = time.perf_counter() - t0
            wall = _run(job, engine, rounds, out, fed.address if fed else None)
        finally:
            if fed is not None:
                fed.stop()
        rows = _rounds(out)
        host = [float(r["host_time_s"]) for r in rows]
        results.append(
            {
                "job": job_name,
                "engine": engine,
                "rounds": len(rows),
                "round1_host_s": host[0],
                "steady_host_s": statistics.mean(host[1:]) if len(host) > 1 else host[0],
                "mean_host_s": statistics.mean(host),
                "command_wall_s": wall,
                "federation_start_s": startup,
                "accuracy": rows[-1]["accuracy"],
                "out": str(out),
            }
        )
    base = next((r for r in results if r["engine"] == "inprocess"), None)
    for r in results:
        if base is None:
            continue
        r["overhead_steady"] = r["steady_host_s"] / base["steady_host_s"] - 1
        r["overhead_mean"] = r["mean_host_s"] / base["mean_host_s"] - 1
        r["max_abs_diff_vs_inprocess"] = _max_diff(
            _final_state(Path(r["out"])), _final_state(Path(base["out"]))
        )
    return results


def _table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| job | engine | round 1 host (s) | later rounds host (s/round) | overhead vs "
        "in-process (later rounds) | command wall (s) | federation start (s) | max abs diff "
        "vs in-process |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        over = r.get("overhead_steady")
        lines.append(
            f"| {r['job']} | {r['engine']} | {r['round1_host_s']:.2f} | {r['steady_host_s']:.2f}"
            f" | {'-' if over is None or r['engine'] == 'inprocess' else f'{over:+.0%}'}"
            f" | {r['command_wall_s']:.1f} | "
            f"{r['federation_start_s']:.1f} | {r.get('max_abs_diff_vs_inprocess', 0.0):.1e} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", default="tiny,minilm", help="comma-separated: tiny, minilm")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", default=None, help="directory for runs and results.json")
    args = parser.parse_args(argv)
    for key, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}.items():
        os.environ.setdefault(key, value)
    jobs = [j for j in args.jobs.split(",") if j]
    engines = [e for e in args.engines.split(",") if e]
    for j in jobs:
        if j not in JOBS:
            parser.error(f"unknown job {j!r}; use {', '.join(JOBS)}")
    for e in engines:
        if e not in ENGINES:
            parser.error(f"unknown engine {e!r}; use {', '.join(ENGINES)}")
    if args.rounds < 2:
        parser.error("--rounds must be >= 2 (round 1 and later rounds are reported apart)")
    workdir = Path(args.out or tempfile.mkdtemp(prefix="legend-engine-overhead-")).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    for job in jobs:
        results += measure(job, engines, args.rounds, workdir)
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    print(_table(results))
    print(f"\nresults: {workdir / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
