"""How the exact planner scales: whole-process wall time on fleets of distinct devices.

Every case plans one round (objective ``rate``, ``max U / T``, or with ``--objective
progress`` the default objective, bytes priced; rank grid 2, 4, 8, 16, 32)
for a fleet in which every device has its own random profile (``distinct_fleet``: 0.3-60
TFLOP/s, 4-80 GB, 5-500 Mbit/s up, 20-1000 Mbit/s down, 100-2000 samples), with the
default solver (``auto``) and, for comparison, the LEGEND-style greedy. Each plan runs in
a fresh Python process, timed from the outside: the wall time includes the interpreter's
start, the imports, building the fleet, planning and building the Plan. The process reports
its own peak resident memory, the plan's path (``sweep``, ``lagrangian``, ``highs``), its
status, proven gap and objective, and whether ``validate_plan`` accepts it.

Cases (``--cases``; the default is all of them):

``bert-10k``, ``bert-100k``, ``llama-10k``
    independent devices (no coupling row): bert-base-uncased (12 layers) with 10,000 and
    100,000 devices, llama-2-7b (32 layers, 4-bit weights) with 10,000.
``coupled-10k``
    bert-base-uncased, 10,000 devices, the server link at half of the bytes per second the
    program without it moves (so it binds), and coverage of the top 2 layers at 50%.
``ap-10k``
    bert-base-uncased, 1,000 access points with 10 devices each; each access point's
    uplink and downlink carry 40% of what its devices could send together (so every one
    is congested), written as a topology file. The greedy does not model topologies: it
    plans blind to the shared links, and its objective is evaluated on the round time the
    shared links then imply (the same round time the exact plan is held to; ``rate`` only).
``classes-10k``
    bert-base-uncased, 10,000 devices drawn from 8 device types (repeated profiles).

``--repeats`` runs every exact case that many times (the greedy once); the table reports
the median and the range. ``--smoke`` runs small versions of every case in seconds.
Results and the command: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from legend.models.spec import get_model_spec
from legend.planner.profiles import DeviceProfile, Fleet, JobParams

RANKS = (2, 4, 8, 16, 32)

# tflops, memory_gb, uplink_mbps, downlink_mbps, num_samples
DEVICE_TYPES = (
    (0.3, 4.0, 5.0, 20.0, 200),  # low-end phone
    (0.8, 6.0, 10.0, 50.0, 300),  # phone
    (1.5, 8.0, 20.0, 100.0, 400),  # high-end phone
    (2.5, 8.0, 20.0, 100.0, 500),  # tablet
    (5.0, 16.0, 50.0, 200.0, 800),  # laptop
    (10.0, 24.0, 100.0, 300.0, 1000),  # laptop with GPU
    (20.0, 32.0, 100.0, 500.0, 1500),  # desktop GPU
    (60.0, 80.0, 500.0, 1000.0, 2000),  # workstation
)


@dataclass(frozen=True)
class Case:
    name: str
    model: str
    devices: int
    fleet: str = "distinct"  # or "classes"
    coupled: bool = False
    access_points: int = 0


CASES = {
    c.name: c
    for c in (
        Case("bert-10k", "bert-base-uncased", 10_000),
        Case("bert-100k", "bert-base-uncased", 100_000),
        Case("llama-10k", "llama-2-7b", 10_000),
        Case("coupled-10k", "bert-base-uncased", 10_000, coupled=True),
        Case("ap-10k", "bert-base-uncased", 10_000, access_points=1_000),
        Case("classes-10k", "bert-base-uncased", 10_000, fleet="classes"),
    )
}
SMOKE = {
    "bert-10k": 300,
    "bert-100k": 1_000,
    "llama-10k": 200,
    "coupled-10k": 300,
    "ap-10k": 60,
    "classes-10k": 300,
}


def job_for(model: str) -> JobParams:
    # A 7B model only fits edge devices with 4-bit weights and short sequences.
    if model == "llama-2-7b":
        return JobParams(ranks=RANKS, weight_precision="4bit", batch_size=4, seq_len=128)
    return JobParams(ranks=RANKS)


def class_fleet(n: int, seed: int) -> Fleet:
    rng = np.random.default_rng(seed)
    kinds = rng.integers(0, len(DEVICE_TYPES), size=n)
    devices = []
    for i, k in enumerate(kinds):
        tf, mem, up, down, samples = DEVICE_TYPES[int(k)]
        devices.append(
            DeviceProfile(
                device_id=f"d{i}",
                tflops=tf,
                memory_gb=mem,
                uplink_mbps=up,
                downlink_mbps=down,
                num_samples=samples,
                device_class=f"type{int(k)}",
            )
        )
    return Fleet(devices=tuple(devices))


def distinct_fleet(n: int, seed: int) -> Fleet:
    rng = np.random.default_rng(seed)
    tflops = np.exp(rng.uniform(math.log(0.3), math.log(60.0), n))
    memory = rng.uniform(4.0, 80.0, n)
    up = np.exp(rng.uniform(math.log(5.0), math.log(500.0), n))
    down = np.exp(rng.uniform(math.log(20.0), math.log(1000.0), n))
    samples = rng.integers(100, 2000, n)
    return Fleet(
        devices=tuple(
            DeviceProfile(
                device_id=f"d{i}",
                tflops=float(tflops[i]),
                memory_gb=float(memory[i]),
                uplink_mbps=float(up[i]),
                downlink_mbps=float(down[i]),
                num_samples=int(samples[i]),
            )
            for i in range(n)
        )
    )


def topology_file(fleet: Fleet, access_points: int, path: Path) -> Path:
    """Devices in order, ``len(fleet) / access_points`` per access point; each access
    point's link carries 40% of what its devices could send together each way."""
    per = len(fleet) // access_points
    lines = []
    for a in range(access_points):
        devs = fleet.devices[a * per : (a + 1) * per]
        lines += ["[[nodes]]", f'id = "ap-{a}"', 'kind = "access_point"', ""]
        lines += [
            "[[links]]",
            f'a = "ap-{a}"',
            'b = "server"',
            f"up_mbps = {0.4 * sum(d.uplink_mbps for d in devs):.6f}",
            f"down_mbps = {0.4 * sum(d.downlink_mbps for d in devs):.6f}",
            "",
        ]
        for d in devs:
            lines += [
                "[[links]]",
                f'a = "{d.device_id}"',
                f'b = "ap-{a}"',
                f"up_mbps = {d.uplink_mbps:.6f}",
                f"down_mbps = {d.downlink_mbps:.6f}",
                "",
            ]
    path.write_text("\n".join(lines))
    return path


# -- one plan in this process (what the outer process times) --------------------------------


def inner(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model")
    p.add_argument("--devices", type=int)
    p.add_argument("--fleet")
    p.add_argument("--solver")
    p.add_argument("--server-mbps", type=float, default=None)
    p.add_argument("--coverage", action="store_true")
    p.add_argument("--topology", default=None)
    p.add_argument("--time-limit-s", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--objective", default="rate")
    a = p.parse_args(argv)
    from legend.planner.api import PlannerOptions, plan_round
    from legend.planner.errors import PlannerError
    from legend.planner.plan import validate_plan

    spec = get_model_spec(a.model)
    job = job_for(a.model)
    fleet = (class_fleet if a.fleet == "classes" else distinct_fleet)(a.devices, a.seed)
    topo = None
    if a.topology:
        from legend.planner.topology import load_topology

        topo = load_topology(a.topology, fleet)
    options = PlannerOptions(
        objective=a.objective,
        solver=a.solver,
        time_limit_s=a.time_limit_s,
        server_mbps=a.server_mbps,
        coverage_layers=2 if a.coverage else 0,
        coverage_share=0.5 if a.coverage else 0.0,
    )
    # The greedy cannot see shared links: it plans blind and is judged on the true round time.
    blind = topo is not None and a.solver == "greedy"
    start = time.perf_counter()
    try:
        plan = plan_round(fleet, spec, job, options, topology=None if blind else topo)
    except PlannerError as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {str(exc)[:300]}"}))
        return 0
    plan_s = time.perf_counter() - start
    valid = not validate_plan(
        plan, fleet, spec, job, server_mbps=a.server_mbps, topology=None if blind else topo
    )
    objective, round_time = plan.objective_value, plan.round_time_s
    if blind:
        from legend.planner.costs import CostModel
        from legend.planner.topology import predicted_round_time

        configurations = {dp.device_id: (dp.layers, dp.ranks) for dp in plan.devices}
        assert topo is not None
        round_time = predicted_round_time(topo, fleet, CostModel(spec, job), configurations)
        # rate = utility / round time; other objectives are not re-evaluated here
        objective = (
            objective * plan.round_time_s / round_time
            if a.objective == "rate" and objective is not None and round_time > 0
            else None
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        json.dumps(
            {
                "path": plan.solver,
                "status": plan.status,
                "gap": plan.mip_gap,
                "objective": objective,
                "bound": plan.objective_bound,
                "round_time_s": round_time,
                "plan_s": plan_s,
                "peak_bytes": peak,
                "valid": valid,
            }
        )
    )
    return 0


def run_case(case: Case, devices: int, solver: str, args: argparse.Namespace, extra: list[str]):
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--inner",
        "--model", case.model,
        "--devices", str(devices),
        "--fleet", case.fleet,
        "--solver", solver,
        "--time-limit-s", str(args.time_limit_s),
        "--objective", args.objective,
        *extra,
    ]  # fmt: skip
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=args.timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        return {"error": f"no answer within {args.timeout_s:g} s", "wall_s": args.timeout_s}
    wall = time.perf_counter() - start
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": proc.stderr.strip().splitlines()[-1:] or ["failed"], "wall_s": wall}
    out: dict[str, Any] = json.loads(lines[-1])
    out["wall_s"] = wall
    return out


def free_server_mbps(case: Case, devices: int, objective: str) -> float:
    """Half of the bytes per second the program without the server link moves."""
    from legend.planner.api import PlannerOptions, plan_round

    fleet = distinct_fleet(devices, 0)
    options = PlannerOptions(objective=objective)
    plan = plan_round(fleet, get_model_spec(case.model), job_for(case.model), options)
    moved = plan.total_upload_bytes + plan.total_download_bytes
    return 0.5 * moved * 8 / 1e6 / plan.round_time_s


def fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--inner":
        return inner(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--time-limit-s", type=float, default=60.0)
    parser.add_argument("--timeout-s", type=float, default=600.0)
    parser.add_argument("--no-greedy", action="store_true")
    parser.add_argument(
        "--objective",
        default="rate",
        choices=("rate", "progress"),
        help="rate (U / T, the cases' reference) or progress (bytes priced, measured prior)",
    )
    parser.add_argument("--smoke", action="store_true", help="small fleets, one repeat")
    parser.add_argument("--out", default=None, help="directory for planner_scale.json")
    args = parser.parse_args(argv)
    repeats = 1 if args.smoke else args.repeats
    load = os.getloadavg()
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {os.cpu_count()} cores")
    print(
        "| case | devices | method | path | status | proven gap | wall s (median, range) "
        "| peak memory | exact / greedy objective | valid |"
    )
    print("|---|---:|---|---|---|---:|---|---:|---:|---|")
    results = []
    ok = True
    for name in args.cases:
        case = CASES[name]
        devices = SMOKE[name] if args.smoke else case.devices
        extra: list[str] = []
        tmp = None
        if case.coupled:
            mbps = free_server_mbps(case, devices, args.objective)
            extra += ["--server-mbps", f"{mbps:.6f}", "--coverage"]
        if case.access_points:
            tmp = tempfile.TemporaryDirectory()
            aps = max(1, case.access_points * devices // case.devices)
            path = topology_file(distinct_fleet(devices, 0), aps, Path(tmp.name) / "topo.toml")
            extra += ["--topology", str(path)]
        runs = {"exact": [run_case(case, devices, "auto", args, extra) for _ in range(repeats)]}
        if not args.no_greedy:
            runs["greedy"] = [run_case(case, devices, "greedy", args, extra)]
        if tmp is not None:
            tmp.cleanup()
        g = runs.get("greedy", [{}])[0]
        for method, rs in runs.items():
            good = [r for r in rs if "error" not in r]
            if not good:
                print(f"| {name} | {devices:,} | {method} | - | {rs[0]['error']} | | | | | |")
                ok = False
                continue
            r = good[0]
            walls = [x["wall_s"] for x in good]
            ratio = (
                r["objective"] / g["objective"]
                if method == "exact" and "objective" in g and g["objective"]
                else None
            )
            wall = f"{statistics.median(walls):.2f} ({min(walls):.2f}-{max(walls):.2f})"
            peak = max(x["peak_bytes"] for x in good) / 2**20
            gap = "-" if r["gap"] is None else f"{100 * r['gap']:.4f}%"
            print(
                f"| {name} | {devices:,} | {method} | {r['path']} | {r['status']} "
                f"| {gap} | {wall} | {peak:,.0f} MiB | {fmt(ratio, '.4f')} "
                f"| {'yes' if all(x['valid'] for x in good) else 'NO'} |",
                flush=True,
            )
            ok &= all(x["valid"] for x in good)
            results.append({"case": name, "devices": devices, "method": method, "runs": good})
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "planner_scale.json").write_text(json.dumps(results, indent=2))
    cmd = " ".join([".venv/bin/python", "benchmarks/planner_scale.py", *argv])
    print(f"reproduce: {cmd}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
