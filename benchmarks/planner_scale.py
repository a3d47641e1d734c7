"""How the exact planner scales with fleet size and model depth, against the greedy.

For fleets of 10 to 10,000 devices and models of 6 to 32 layers (rank grid 2,4,8,16,32),
plan one round with the default objective (``rate``, ``max U / T``) and report the solve
time (host wall clock, formulation included), the objective, the proven MIP gap and the
greedy's objective and time for comparison. Two kinds of fleet, both seeded:

``classes``
    8 device types (phone to workstation), devices drawn at random among them; planned with
    exact device classes.
``distinct``
    every device has its own random profile; fleets up to ``--max-device-level`` devices are
    planned per device, larger ones with conservative bucketing
    (``class_bucket_ratio``, profiles rounded down to ``ratio**k``, default 2).

Run ``python benchmarks/planner_scale.py --quick`` for a smoke run (under a minute);
without ``--quick`` the full grid runs (over ten minutes on a 2-core machine, mostly the
10,000-device distinct fleets). ``--csv PATH`` writes the rows. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from legend.models.spec import get_model_spec
from legend.planner.api import SOLVERS, PlannerOptions, PlanningProblem, plan_round
from legend.planner.errors import PlannerError
from legend.planner.plan import Plan, validate_plan
from legend.planner.profiles import DeviceProfile, Fleet, JobParams

MODELS = ("all-MiniLM-L6-v2", "bert-base-uncased", "roberta-large", "llama-2-7b")
SIZES = (10, 100, 1000, 10000)
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
    devices = []
    for i in range(n):
        devices.append(
            DeviceProfile(
                device_id=f"d{i}",
                tflops=float(np.exp(rng.uniform(math.log(0.3), math.log(60.0)))),
                memory_gb=float(rng.uniform(4.0, 80.0)),
                uplink_mbps=float(np.exp(rng.uniform(math.log(5.0), math.log(500.0)))),
                downlink_mbps=float(np.exp(rng.uniform(math.log(20.0), math.log(1000.0)))),
                num_samples=int(rng.integers(100, 2000)),
            )
        )
    return Fleet(devices=tuple(devices))


@dataclass
class Row:
    fleet: str
    devices: int
    model: str
    layers: int
    method: str
    classes: int
    ip_time_s: float
    ip_objective: float
    ip_status: str
    ip_gap: float | None
    greedy_time_s: float | None
    greedy_objective: float | None
    valid: bool

    def ratio(self) -> float | None:
        if self.greedy_objective is None or self.ip_objective <= 0:
            return None
        return self.greedy_objective / self.ip_objective


def run_one(fleet_kind: str, n: int, model: str, args: argparse.Namespace) -> Iterator[Row]:
    spec = get_model_spec(model)
    job = job_for(model)
    fleet = class_fleet(n, args.seed) if fleet_kind == "classes" else distinct_fleet(n, args.seed)
    base = PlannerOptions(solver=args.solver, time_limit_s=args.time_limit_s, mip_gap=args.mip_gap)
    if fleet_kind == "classes":
        options = base.with_(use_classes=True)
        method = "classes"
    elif n <= args.max_device_level:
        options = base.with_(use_classes=False)
        method = "per-device"
    else:
        options = base.with_(class_bucket_ratio=args.bucket_ratio)
        method = f"bucketed {args.bucket_ratio:g}"
    problem = PlanningProblem.create(fleet, spec, job, options)
    n_classes = (
        len(group_devices(problem, bucket_ratio=options.class_bucket_ratio))
        if options.use_classes is not False
        else n
    )
    start = time.perf_counter()
    try:
        plan: Plan = plan_round(fleet, spec, job, options)
    except PlannerError as exc:
        print(f"  {fleet_kind} n={n} {model}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return
    ip_time = time.perf_counter() - start
    violations = validate_plan(plan, fleet, spec, job, cost_model=problem.costs)
    g_time = g_obj = None
    if "greedy" in SOLVERS:
        start = time.perf_counter()
        gplan = plan_round(fleet, spec, job, options.with_(solver="greedy"))
        g_time = time.perf_counter() - start
        g_obj = gplan.objective_value
    yield Row(
        fleet=fleet_kind,
        devices=n,
        model=model,
        layers=spec.num_layers,
        method=method,
        classes=n_classes,
        ip_time_s=ip_time,
        ip_objective=plan.objective_value,
        ip_status=plan.status,
        ip_gap=plan.mip_gap,
        greedy_time_s=g_time,
        greedy_objective=g_obj,
        valid=not violations,
    )


def fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small fleets, 2 models")
    parser.add_argument("--sizes", type=int, nargs="*", default=None)
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--fleets", nargs="*", default=["classes", "distinct"])
    parser.add_argument("--solver", default="pulp-highs")
    parser.add_argument("--time-limit-s", type=float, default=30.0)
    parser.add_argument("--mip-gap", type=float, default=1e-4)
    parser.add_argument("--bucket-ratio", type=float, default=2.0)
    parser.add_argument("--max-device-level", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    args = parser.parse_args(argv)
    sizes = args.sizes or ((10, 100) if args.quick else SIZES)
    models = args.models or (("all-MiniLM-L6-v2", "roberta-large") if args.quick else MODELS)
    load_backends()

    rows: list[Row] = []
    print(
        "| fleet | devices | model (layers) | method | classes | IP time (s) | IP objective "
        "| status | proven gap | greedy time (s) | greedy / IP objective | IP / greedy time "
        "| valid |"
    )
    print("|---|---:|---|---|---:|---:|---:|---|---:|---:|---:|---:|---|")
    for fleet_kind in args.fleets:
        for model in models:
            for n in sizes:
                for row in run_one(fleet_kind, n, model, args):
                    rows.append(row)
                    time_ratio = row.ip_time_s / row.greedy_time_s if row.greedy_time_s else None
                    print(
                        f"| {row.fleet} | {row.devices:,} | {row.model} ({row.layers}) "
                        f"| {row.method} | {row.classes:,} | {row.ip_time_s:.2f} "
                        f"| {row.ip_objective:.6g} | {row.ip_status} "
                        f"| {fmt(None if row.ip_gap is None else 100 * row.ip_gap, '.3f')}% "
                        f"| {fmt(row.greedy_time_s, '.3f')} | {fmt(row.ratio(), '.4f')} "
                        f"| {fmt(time_ratio, '.1f')} | {'yes' if row.valid else 'NO'} |",
                        flush=True,
                    )
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(
                [
                    "fleet",
                    "devices",
                    "model",
                    "layers",
                    "method",
                    "classes",
                    "ip_time_s",
                    "ip_objective",
                    "ip_status",
                    "ip_gap",
                    "greedy_time_s",
                    "greedy_objective",
                    "valid",
                ]
            )
            for r in rows:
                writer.writerow(
                    [
                        r.fleet,
                        r.devices,
                        r.model,
                        r.layers,
                        r.method,
                        r.classes,
                        f"{r.ip_time_s:.4f}",
                        r.ip_objective,
                        r.ip_status,
                        r.ip_gap,
                        r.greedy_time_s,
                        r.greedy_objective,
                        r.valid,
                    ]
                )
    return 0 if all(r.valid for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
