"""Time and bytes to a target accuracy: the seven methods side by side on one fleet.

all-MiniLM-L6-v2 (real pretrained weights) is fine-tuned with LoRA on Rotten Tomatoes
sentences over the 50-device fleet ``benchmarks/fleet50.csv`` (five device classes, compute
spread 33x, link spreads over 40x), Dirichlet label skew ``alpha = 0.5``. For every seed the
model, the data split and the partition are loaded once and shared by all methods, so every
method sees the same data, the same devices sampled each round, the same round budget and the
same local workload; only the per-round LoRA configurations differ.

Clocks: **simulated device time** comes from the cost model (analytic FLOPs and the device
profiles, with the seeded log-normal jitter of ``federation.jitter``): it is deterministic
given the seed and independent of how busy this host is. **Host time** is what this machine
spent training and evaluating, reported only to size the benchmark.

Targets: a fixed ``--target`` accuracy (default 0.75, about what frozen MiniLM embeddings
plus logistic regression reach, so reaching it needs fine-tuning), and per seed a
*common target*, the lowest final accuracy among the methods (every method reaches it).

Writes into ``--out`` (default ``runs/bench/time_to_accuracy``): one run directory per seed
and method (``seed<S>/<method>``, readable by ``legend report run``), ``runs.csv`` (one row
per seed and method), ``summary.csv`` (per method, mean and spread over seeds),
``goals.csv``, ``time_to_accuracy.md`` and ``report_seed<S>/`` (the run report with figures).
Run directories that already finished are reused and unfinished ones resumed, so an
interrupted benchmark continues where it stopped.

``--smoke`` runs the pipeline in seconds on a tiny random-initialised BERT and the 6-device
``examples/tiny_fleet.csv`` (numbers meaningless, for CI).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    FLEET50,
    REPO_ROOT,
    markdown_table,
    read_csv,
    reproduce_command,
    set_offline_env,
    spread,
    write_csv,
    write_markdown,
)

METHODS = ("exact", "greedy", "uniform", "hetlora", "fedra", "depth-only", "rank-only")

RUN_COLUMNS = (
    "seed",
    "method",
    "rounds",
    "final_accuracy",
    "best_accuracy",
    "target",
    "reached",
    "rounds_to_target",
    "time_to_target_s",
    "bytes_to_target",
    "common_target",
    "time_to_common_s",
    "bytes_to_common",
    "sim_time_s",
    "total_bytes",
    "round_time_mean_s",
    "waiting_mean_s",
    "host_time_s",
)
SUMMARY_COLUMNS = (
    "method",
    "seeds",
    "reached",
    "time_to_target_s",
    "speedup_vs_uniform",
    "bytes_to_target_MB",
    "bytes_saved_vs_uniform_pct",
    "time_to_common_s",
    "speedup_common_vs_uniform",
    "bytes_to_common_MB",
    "final_accuracy_pct",
    "round_time_mean_s",
    "waiting_mean_s",
    "host_time_s",
)


def build_config(args: argparse.Namespace, method: str, seed: int) -> Any:
    """The job of one method and seed; everything but the method is shared."""
    from legend.federation.job import (
        DataSection,
        FederationSection,
        JobConfig,
        JobSection,
        PlannerSection,
        TrainSection,
    )

    return JobConfig(
        job=JobSection(
            name=f"time-to-accuracy-{method}-s{seed}",
            model=args.model,
            fleet=str(Path(args.fleet).resolve()),
            method=method,
            rounds=args.rounds,
            seed=seed,
            devices_per_round=args.devices_per_round,
            target_accuracy=args.target,
        ),
        train=TrainSection(
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            local_steps=args.local_steps,
            learning_rate=args.learning_rate,
            target_modules="qv",
            ranks=tuple(args.ranks),
            uniform_rank=args.uniform_rank,
            threads=args.threads,
            loss=args.loss,
            optimizer=args.optimizer,
        ),
        data=DataSection(
            dataset="rotten_tomatoes",
            max_train=args.max_train,
            max_test=args.max_test,
            alpha=args.alpha,
            samples_from_fleet=True,
        ),
        planner=PlannerSection(
            solver=args.solver, objective="rate", time_limit_s=10.0, calibration="none"
        ),
        federation=FederationSection(
            jitter=args.jitter,
            eval_every=1,
            server_optimizer=args.server_optimizer,
            server_lr=args.server_lr,
        ),
    )


def _finished(run_dir: Path, rounds: int) -> bool:
    path = run_dir / "summary.json"
    if not path.is_file():
        return False
    summary = json.loads(path.read_text())
    return bool(summary.get("finished")) and int(summary.get("rounds", 0)) >= rounds


def run_seed(args: argparse.Namespace, seed: int, out: Path) -> None:
    """Run every method of one seed, sharing one loaded model, data split and partition."""
    from legend.federation.runner import prepare, run_job

    todo = [m for m in args.methods if not _finished(out / f"seed{seed}" / m, args.rounds)]
    if not todo:
        return
    prepared = None
    for method in todo:
        cfg = build_config(args, method, seed)
        if prepared is None:
            prepared = prepare(cfg, calibration=None)
        else:
            # Same model, data and partition by construction; only the method differs.
            prepared.cfg = cfg
        run_dir = out / f"seed{seed}" / method
        resume = (run_dir / "checkpoints" / "state.json").is_file()
        started = time.perf_counter()
        result = run_job(cfg, run_dir, resume=resume, prepared=prepared, show_progress=False)
        print(
            f"seed {seed} {method:>10}: final accuracy {result.final_accuracy:.3f}, "
            f"simulated {result.summary['sim_time_s']:.0f} s, "
            f"host {time.perf_counter() - started:.0f} s",
            flush=True,
        )


def _first_reaching(rounds: Sequence[Mapping[str, str]], target: float) -> Mapping[str, str] | None:
    for r in rounds:
        acc = _num(r.get("accuracy"))
        if not math.isnan(acc) and acc >= target - 1e-12:
            return r
    return None


def _num(value: Any) -> float:
    try:
        return float(value) if value not in (None, "") else math.nan
    except (TypeError, ValueError):
        return math.nan


def collect(args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    """One row per seed and method from the run directories."""
    rows: list[dict[str, Any]] = []
    for seed in args.seeds:
        per_method: dict[str, list[dict[str, str]]] = {}
        for method in args.methods:
            run_dir = out / f"seed{seed}" / method
            per_method[method] = read_csv(run_dir / "rounds.csv")
        finals = {
            m: next(
                (_num(r["accuracy"]) for r in reversed(rs) if not math.isnan(_num(r["accuracy"]))),
                math.nan,
            )
            for m, rs in per_method.items()
        }
        common_target = min(v for v in finals.values() if not math.isnan(v))
        for method, rounds in per_method.items():
            last = rounds[-1]
            hit = _first_reaching(rounds, args.target)
            hit_common = _first_reaching(rounds, common_target)
            accs = [_num(r["accuracy"]) for r in rounds]
            rows.append(
                {
                    "seed": seed,
                    "method": method,
                    "rounds": len(rounds),
                    "final_accuracy": finals[method],
                    "best_accuracy": max(a for a in accs if not math.isnan(a)),
                    "target": args.target,
                    "reached": hit is not None,
                    "rounds_to_target": int(hit["round"]) if hit else None,
                    "time_to_target_s": _num(hit["sim_clock_s"]) if hit else math.nan,
                    "bytes_to_target": _num(hit["cum_bytes"]) if hit else math.nan,
                    "common_target": common_target,
                    "time_to_common_s": _num(hit_common["sim_clock_s"]) if hit_common else math.nan,
                    "bytes_to_common": _num(hit_common["cum_bytes"]) if hit_common else math.nan,
                    "sim_time_s": _num(last["sim_clock_s"]),
                    "total_bytes": _num(last["cum_bytes"]),
                    "round_time_mean_s": _num(last["sim_clock_s"]) / len(rounds),
                    "waiting_mean_s": float(
                        sum(_num(r["waiting_mean_s"]) for r in rounds) / len(rounds)
                    ),
                    "host_time_s": _num(last["host_clock_s"]),
                }
            )
    return rows


def _ratios(rows: Sequence[Mapping[str, Any]], method: str, base: str, key: str) -> list[float]:
    """Per seed ``base[key] / method[key]`` (only seeds where both are finite)."""
    out = []
    by = {(r["seed"], r["method"]): r for r in rows}
    for seed in sorted({r["seed"] for r in rows}):
        a, b = by.get((seed, method)), by.get((seed, base))
        if a is None or b is None:
            continue
        va, vb = _num(a[key]), _num(b[key])
        if math.isfinite(va) and math.isfinite(vb) and va > 0:
            out.append(vb / va)
    return out


def summarise(rows: Sequence[Mapping[str, Any]], methods: Sequence[str]) -> list[dict[str, Any]]:
    out = []
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        saved = [
            100.0 * (1.0 - 1.0 / x) for x in _ratios(rows, method, "uniform", "bytes_to_target")
        ]
        out.append(
            {
                "method": method,
                "seeds": len(mine),
                "reached": f"{sum(bool(r['reached']) for r in mine)}/{len(mine)}",
                "time_to_target_s": spread(r["time_to_target_s"] for r in mine).fmt(".0f"),
                "speedup_vs_uniform": spread(
                    _ratios(rows, method, "uniform", "time_to_target_s")
                ).fmt(".2f", unit="x"),
                "bytes_to_target_MB": spread(r["bytes_to_target"] / 1e6 for r in mine).fmt(".1f"),
                "bytes_saved_vs_uniform_pct": spread(saved).fmt(".1f", unit="%"),
                "time_to_common_s": spread(r["time_to_common_s"] for r in mine).fmt(".0f"),
                "speedup_common_vs_uniform": spread(
                    _ratios(rows, method, "uniform", "time_to_common_s")
                ).fmt(".2f", unit="x"),
                "bytes_to_common_MB": spread(r["bytes_to_common"] / 1e6 for r in mine).fmt(".1f"),
                "final_accuracy_pct": spread(100 * r["final_accuracy"] for r in mine).fmt(".1f"),
                "round_time_mean_s": spread(r["round_time_mean_s"] for r in mine).fmt(".1f"),
                "waiting_mean_s": spread(r["waiting_mean_s"] for r in mine).fmt(".1f"),
                "host_time_s": spread(r["host_time_s"] for r in mine).fmt(".0f"),
            }
        )
    return out


def goals(rows: Sequence[Mapping[str, Any]], methods: Sequence[str]) -> list[dict[str, Any]]:
    """The issue's goals for ``exact``, checked per seed and on the means."""
    if not {"exact", "uniform"} <= set(methods):
        return []
    out: list[dict[str, Any]] = []
    speed = spread(_ratios(rows, "exact", "uniform", "time_to_target_s"))
    out.append(
        {
            "goal": "exact reaches the target >= 2.8x sooner than uniform (simulated time)",
            "measured": speed.fmt(".2f", unit="x") + f" (seeds {speed.n})",
            "met": speed.n > 0 and speed.mean >= 2.8,
        }
    )
    saved = spread(
        100.0 * (1.0 - 1.0 / x) for x in _ratios(rows, "exact", "uniform", "bytes_to_target")
    )
    out.append(
        {
            "goal": "exact uses >= 42% fewer bytes to the target than uniform",
            "measured": saved.fmt(".1f", unit="%") + f" (seeds {saved.n})",
            "met": saved.n > 0 and saved.mean >= 42.0,
        }
    )
    if "greedy" in methods:
        vs_greedy = spread(_ratios(rows, "exact", "greedy", "time_to_target_s"))
        out.append(
            {
                "goal": "exact reaches the target no later than greedy (greedy / exact time >= 1)",
                "measured": vs_greedy.fmt(".2f", unit="x") + f" (seeds {vs_greedy.n})",
                "met": vs_greedy.n > 0 and vs_greedy.lo >= 1.0 - 1e-9,
            }
        )
    gaps = []
    for seed in sorted({r["seed"] for r in rows}):
        finals = {r["method"]: r["final_accuracy"] for r in rows if r["seed"] == seed}
        if "exact" in finals:
            gaps.append(100.0 * (max(finals.values()) - finals["exact"]))
    gap = spread(gaps)
    out.append(
        {
            "goal": "exact's final accuracy within 0.5 points of the best method",
            "measured": gap.fmt(".2f", unit=" points below the best") + f" (seeds {gap.n})",
            "met": gap.n > 0 and gap.hi <= 0.5 + 1e-9,
        }
    )
    return out


def write_reports(args: argparse.Namespace, out: Path) -> list[Path]:
    """``legend report run`` of every seed's runs (figures: accuracy vs time and bytes)."""
    from legend.reports.render import write_report
    from legend.reports.run_report import build_run_report, load_run

    written = []
    for seed in args.seeds:
        runs = [load_run(out / f"seed{seed}" / m) for m in args.methods]
        report = build_run_report(runs, target=args.target)
        written.append(write_report(report, out / f"report_seed{seed}").markdown)
    return written


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model and fleet, seconds")
    parser.add_argument("--out", type=Path, default=None, help="output directory")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--target", type=float, default=None, help="target accuracy")
    parser.add_argument("--devices-per-round", type=int, default=None)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=0.5, help="local learning rate")
    parser.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw"))
    parser.add_argument(
        "--loss", default="logit-adjusted", choices=("logit-adjusted", "cross-entropy")
    )
    parser.add_argument("--server-optimizer", default="adam", choices=("adam", "momentum", "none"))
    parser.add_argument("--server-lr", type=float, default=0.03)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--uniform-rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label skew")
    parser.add_argument("--jitter", type=float, default=0.1)
    parser.add_argument("--max-train", type=int, default=0)
    parser.add_argument("--max-test", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--solver", default="pulp-highs")
    parser.add_argument("--no-report", action="store_true", help="skip the HTML/PNG run reports")
    args = parser.parse_args(argv)
    if args.smoke:
        args.model = "tiny-bert"
        args.fleet = str(REPO_ROOT / "examples" / "tiny_fleet.csv")
        args.seeds = args.seeds or [0]
        args.rounds = args.rounds or 2
        args.target = 0.5 if args.target is None else args.target
        args.devices_per_round = args.devices_per_round or 0
        args.local_steps, args.batch_size, args.seq_len = 2, 8, 32
        args.ranks, args.uniform_rank = [2, 4, 8], 4
        args.max_train, args.max_test = 600, 100
        args.out = args.out or REPO_ROOT / "runs" / "bench" / "time_to_accuracy_smoke"
    else:
        args.model = "all-MiniLM-L6-v2"
        args.fleet = str(FLEET50)
        args.seeds = args.seeds or [0, 1, 2]
        args.rounds = args.rounds or 12
        args.target = 0.65 if args.target is None else args.target
        args.devices_per_round = 10 if args.devices_per_round is None else args.devices_per_round
        args.out = args.out or REPO_ROOT / "runs" / "bench" / "time_to_accuracy"
    if not 0 < args.target <= 1:
        parser.error(f"--target must be an accuracy in (0, 1], got {args.target}")
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    return args


def _fmt_pct(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    set_offline_env()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    command = reproduce_command("time_to_accuracy.py", argv)
    started = time.perf_counter()
    for seed in args.seeds:
        run_seed(args, seed, out)
    wall = time.perf_counter() - started
    rows = collect(args, out)
    summary = summarise(rows, args.methods)
    checks = goals(rows, args.methods)
    write_csv(out / "runs.csv", rows, RUN_COLUMNS)
    write_csv(out / "summary.csv", summary, SUMMARY_COLUMNS)
    write_csv(out / "goals.csv", checks, ("goal", "measured", "met"))
    reports = [] if args.no_report else write_reports(args, out)

    setting = (
        f"{args.model}, fleet `{Path(args.fleet).name}`, seeds {args.seeds}, {args.rounds} "
        f"rounds, {args.devices_per_round or 'all'} devices per round, {args.local_steps} local "
        f"steps of batch {args.batch_size} x {args.seq_len} tokens, ranks {args.ranks} "
        f"(uniform/fedra/depth-only rank {args.uniform_rank}), local {args.optimizer} at "
        f"learning rate {args.learning_rate} with the {args.loss} loss, server optimizer "
        f"{args.server_optimizer} at {args.server_lr}, Dirichlet alpha {args.alpha}, "
        f"test examples {args.max_test}, jitter {args.jitter}. Target accuracy {args.target}; "
        "common target: per seed, the lowest final accuracy among the methods. Times are "
        "**simulated device seconds** (cost model); host time is this machine's wall clock. "
        f"This invocation took {wall:.0f} host seconds (finished runs are reused)."
    )
    summary_md = markdown_table(
        summary,
        SUMMARY_COLUMNS,
        headers={
            "time_to_target_s": "sim. time to target (s)",
            "speedup_vs_uniform": "speed-up vs uniform",
            "bytes_to_target_MB": "MB to target",
            "bytes_saved_vs_uniform_pct": "bytes saved vs uniform",
            "time_to_common_s": "sim. time to common target (s)",
            "speedup_common_vs_uniform": "speed-up vs uniform (common)",
            "bytes_to_common_MB": "MB to common target",
            "final_accuracy_pct": "final accuracy (%)",
            "round_time_mean_s": "sim. round (s)",
            "waiting_mean_s": "sim. waiting (s)",
            "host_time_s": "host time (s)",
        },
    )
    runs_md = markdown_table(
        rows,
        (
            "seed",
            "method",
            "final_accuracy",
            "rounds_to_target",
            "time_to_target_s",
            "bytes_to_target",
            "common_target",
            "time_to_common_s",
            "waiting_mean_s",
            "host_time_s",
        ),
        formats={
            "final_accuracy": _fmt_pct,
            "common_target": _fmt_pct,
            "time_to_target_s": lambda v: "not reached" if math.isnan(v) else f"{v:.0f}",
            "time_to_common_s": lambda v: "-" if math.isnan(v) else f"{v:.0f}",
            "bytes_to_target": lambda v: "-" if math.isnan(v) else f"{v / 1e6:.1f} MB",
            "waiting_mean_s": lambda v: f"{v:.1f}",
            "host_time_s": lambda v: f"{v:.0f}",
        },
    )
    blocks = [
        setting,
        "## Per method (mean ± standard deviation over seeds)\n\n" + summary_md,
        "## Goals\n\n" + markdown_table(checks, ("goal", "measured", "met")) if checks else "",
        "## Per seed\n\n" + runs_md,
    ]
    if reports:
        blocks.append(
            "Run reports (figures): " + ", ".join(str(p.relative_to(out)) for p in reports)
        )
    md = write_markdown(out / "time_to_accuracy.md", "Time and bytes to accuracy", blocks, command)
    print(summary_md)
    if checks:
        print(markdown_table(checks, ("goal", "measured", "met")))
    print(f"wrote {out / 'runs.csv'}, {out / 'summary.csv'}, {md}")
    print(f"reproduce: {command}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
