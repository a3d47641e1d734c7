"""Time and bytes to a target accuracy: the methods side by side on one fleet, one recipe.

all-MiniLM-L6-v2 (real pretrained weights) is fine-tuned with LoRA on Rotten Tomatoes
sentences over the 50-device fleet ``benchmarks/fleet50.csv`` (five device classes, compute
spread 33x, link spreads over 40x). For every seed the model, the data split and the
partition are loaded once and shared by all methods, so every method sees the same data,
the same devices sampled each round, the same round budget and the same local workload;
only the per-round LoRA configurations differ.

Settings (``--setting``):

A
    fleet50 with private links, Dirichlet label skew ``alpha = 0.5``;
B
    setting A behind shared access points with a capped server link
    (``benchmarks/fleet50_ap.toml``: five access points of ten devices each, every one
    mixing the five classes; see :func:`common.fleet50_ap_topology_toml`); the simulated
    clock shares the links fairly, the exact planner models them, the greedy cannot;
C
    setting A at ``alpha = 0.1`` (or, with ``--dataset imdb``, IMDB reviews truncated to
    ``--seq-len`` tokens).

The recipe, the same for every method and setting:

- evaluation after every round on ``--max-test`` (default 2,000) held-out sentences (the
  split holds out ``--test-fraction`` = 25% of the corpus, 2,132 Rotten Tomatoes sentences);
- a method's **accuracy** is the mean of its last ``--window`` (3) rounds;
- **time (bytes) to a target** is the simulated clock (cumulative bytes) at the first round
  whose trailing ``--window``-round moving average reaches the target (a single lucky round
  does not count);
- ``--seeds`` defaults to five seeds and ``--rounds`` to 45 (at server rate 0.01 every
  method still gained 1-3 points between rounds 30 and 45); each run reports its **late
  gain**, the mean of its last ``--flat-window`` (5) rounds minus the mean of the 5 before,
  so a curve that has not flattened shows (rerun with more rounds; three-round windows
  swung by 2-3 points on flat curves).

Clocks: **simulated device time** comes from the cost model (analytic FLOPs and the device
profiles, with the seeded log-normal jitter of ``federation.jitter``): it is deterministic
given the seed and independent of how busy this host is. **Host time** is what this machine
spent training and evaluating, reported only to size the benchmark.

Targets: a fixed ``--target`` accuracy (default 0.65), and per seed a *common target*, the
lowest accuracy (last-window mean) among the methods, which every method's moving average
reaches by its last round.

Methods are data: :data:`METHODS` maps a benchmark label to the job's method and planner
objective; an ablation is one more entry. :data:`PENDING_METHODS` names ablations that need
planner features not built yet, so that asking for one says why it cannot run.

Writes into ``--out`` (default ``runs/bench/time_to_accuracy`` for setting A,
``..._B``/``..._C`` otherwise): one run directory per seed and method (``seed<S>/<method>``,
readable by ``legend report run``), ``runs.csv`` (one row per seed and method),
``summary.csv`` (per method, mean and spread over seeds), ``goals.csv``,
``time_to_accuracy.md`` and ``report_seed<S>/`` (the run report with figures). Run
directories that already finished are reused and unfinished ones resumed, so an interrupted
benchmark continues where it stopped.

``--smoke`` runs the pipeline in seconds on a tiny random-initialised BERT and the 6-device
``examples/tiny_fleet.csv`` (3 rounds, a 2-round window; numbers meaningless, for CI).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    FLEET50,
    FLEET50_AP,
    REPO_ROOT,
    markdown_table,
    read_csv,
    reproduce_command,
    set_offline_env,
    spread,
    write_csv,
    write_markdown,
)

# Benchmark label -> the job's method and the planner objective it plans with. Every method
# runs the same recipe; an ablation is one more entry here. ``exact`` plans with the default
# objective (``progress``: the run's progress model, bytes priced at the default
# ``seconds_per_mb = "auto"``); ``greedy`` is the LEGEND baseline on its fixed utility; the
# ablations ``greedy-learned`` (the greedy's moves on the progress model) and
# ``exact-rate`` (the exact planner on the fixed utility ``U / T``) separate what the model
# buys from what exactness buys; ``exact-drop`` (the exact planner free to leave sampled
# devices out, ``allow_dropping = true``) shows what choosing the participants would buy and
# cost;
# ``exact-drop75`` and ``greedy-drop75`` may leave devices out only while the participants
# hold at least 75% of the round's sampled data (``min_sample_share = 0.75``, C9s; one value
# for both planners, set before any run and not swept). The ``exact-price*`` entries price
# traffic at fixed numbers of seconds per MB instead of the default ``"auto"`` (the median
# uplink of each round's participants): 0.008 (a 1 Gbit/s link; the default before
# ``"auto"``), 0.08 (a 100 Mbit/s link) and 0.45 (the median uplink of ``fleet50.csv``,
# 17.6 Mbit/s); ``exact-price-auto`` writes the default out (it plans as ``exact``).
# ``exact-probe`` is the default with the server's probe of every layer on its 256
# validation examples (``federation.probe_examples``; docs/planner.md).
METHODS: dict[str, dict[str, Any]] = {
    "exact": {"method": "exact", "objective": "progress"},
    "greedy": {"method": "greedy", "objective": "progress"},
    "greedy-learned": {"method": "greedy-learned", "objective": "progress"},
    "exact-rate": {"method": "exact", "objective": "rate"},
    "uniform": {"method": "uniform", "objective": "progress"},
    "hetlora": {"method": "hetlora", "objective": "progress"},
    "fedra": {"method": "fedra", "objective": "progress"},
    "depth-only": {"method": "depth-only", "objective": "progress"},
    "rank-only": {"method": "rank-only", "objective": "progress"},
    "exact-drop": {"method": "exact", "objective": "progress", "allow_dropping": True},
    "exact-price0.008": {"method": "exact", "objective": "progress", "seconds_per_mb": 0.008},
    "exact-price0.08": {"method": "exact", "objective": "progress", "seconds_per_mb": 0.08},
    "exact-price0.45": {"method": "exact", "objective": "progress", "seconds_per_mb": 0.45},
    "exact-price-auto": {"method": "exact", "objective": "progress", "seconds_per_mb": "auto"},
    "exact-probe": {"method": "exact", "objective": "progress", "probe_examples": 256},
    "exact-drop75": {
        "method": "exact",
        "objective": "progress",
        "allow_dropping": True,
        "min_sample_share": 0.75,
    },
    "greedy-drop75": {
        "method": "greedy",
        "objective": "progress",
        "allow_dropping": True,
        "min_sample_share": 0.75,
    },
}
# Ablations the benchmark is meant to run once the planner supports them (none pending).
PENDING_METHODS: dict[str, str] = {}

# Settings of the benchmark: what differs from setting A.
SETTINGS: dict[str, dict[str, Any]] = {
    "A": {"alpha": 0.5, "topology": "", "dataset": "rotten_tomatoes"},
    "B": {"alpha": 0.5, "topology": str(FLEET50_AP), "dataset": "rotten_tomatoes"},
    "C": {"alpha": 0.1, "topology": "", "dataset": "rotten_tomatoes"},
}
DEFAULT_ROUNDS = 45
DEFAULT_SEEDS = (0, 1, 2, 3, 4)

RUN_COLUMNS = (
    "seed",
    "method",
    "rounds",
    "accuracy",
    "last_round_accuracy",
    "late_gain_pts",
    "best_accuracy",
    "target",
    "reached",
    "rounds_to_target",
    "time_to_target_s",
    "device_time_to_target_s",
    "bytes_to_target",
    "common_target",
    "time_to_common_s",
    "device_time_to_common_s",
    "bytes_to_common",
    "sim_time_s",
    "total_bytes",
    "round_time_mean_s",
    "server_time_mean_s",
    "waiting_mean_s",
    "progress_vs_val_corr",
    "progress_vs_test_corr",
    "contention_rows_vs_clock",
    "host_time_s",
)
SUMMARY_COLUMNS = (
    "method",
    "seeds",
    "reached",
    "time_to_target_s",
    "speedup_vs_uniform",
    "speedup_vs_greedy",
    "device_speedup_vs_uniform",
    "device_speedup_vs_greedy",
    "bytes_to_target_MB",
    "bytes_saved_vs_uniform_pct",
    "time_to_common_s",
    "speedup_common_vs_uniform",
    "device_speedup_common_vs_uniform",
    "device_speedup_common_vs_greedy",
    "bytes_to_common_MB",
    "accuracy_pct",
    "late_gain_pts",
    "round_time_mean_s",
    "server_time_mean_s",
    "waiting_mean_s",
    "progress_vs_val_corr",
    "progress_vs_test_corr",
    "contention_rows_vs_clock",
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

    spec = METHODS[method]
    return JobConfig(
        job=JobSection(
            name=f"time-to-accuracy-{method}-s{seed}",
            model=args.model,
            fleet=str(Path(args.fleet).resolve()),
            topology=str(Path(args.topology).resolve()) if args.topology else "",
            method=spec["method"],
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
            device=args.device,
            loss=args.loss,
            optimizer=args.optimizer,
            cache_prefix=args.cache_prefix,
        ),
        data=DataSection(
            dataset=args.dataset,
            test_fraction=args.test_fraction,
            max_train=args.max_train,
            max_test=args.max_test,
            alpha=args.alpha,
            samples_from_fleet=True,
        ),
        planner=PlannerSection(
            solver=args.solver,
            objective=spec["objective"],
            allow_dropping=bool(spec.get("allow_dropping", False)),
            min_sample_share=float(spec.get("min_sample_share", 0.0)),
            seconds_per_mb=spec.get("seconds_per_mb", PlannerSection.seconds_per_mb),
            time_limit_s=10.0,
            calibration="none",
        ),
        federation=FederationSection(
            jitter=args.jitter,
            eval_every=1,
            server_optimizer=args.server_optimizer,
            server_lr=args.server_lr,
            probe_examples=int(spec.get("probe_examples", FederationSection.probe_examples)),
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
    from legend.federation.errors import FederationInputError
    from legend.federation.runner import prepare, run_job
    from legend.federation.session import check_run_dir

    todo = [m for m in args.methods if not _finished(out / f"seed{seed}" / m, args.rounds)]
    if not todo:
        return
    for method in todo:
        # every run this seed continues is checked before any trains, so that a run that
        # cannot be continued stops the benchmark at once, not after the others' hours
        run_dir = out / f"seed{seed}" / method
        try:
            check_run_dir(
                build_config(args, method, seed),
                run_dir,
                (run_dir / "checkpoints" / "state.json").is_file(),
            )
        except FederationInputError as exc:
            raise SystemExit(f"error: {exc}") from None
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
            f"seed {seed} {method:>10}: last-round accuracy {result.final_accuracy:.3f}, "
            f"simulated {result.summary['sim_time_s']:.0f} s, "
            f"host {time.perf_counter() - started:.0f} s",
            flush=True,
        )


def moving_average(accuracies: Sequence[float], window: int) -> list[float]:
    """Trailing ``window``-round means; NaN until ``window`` rounds exist (or where a round
    in the window has no accuracy)."""
    out = []
    for i in range(len(accuracies)):
        if i + 1 < window:
            out.append(math.nan)
            continue
        chunk = accuracies[i + 1 - window : i + 1]
        out.append(math.nan if any(math.isnan(a) for a in chunk) else sum(chunk) / window)
    return out


def first_reaching(
    rounds: Sequence[Mapping[str, str]], target: float, window: int
) -> Mapping[str, str] | None:
    """The first round whose trailing ``window``-round moving average reaches ``target``."""
    averages = moving_average([_num(r.get("accuracy")) for r in rounds], window)
    for r, avg in zip(rounds, averages, strict=True):
        if not math.isnan(avg) and avg >= target - 1e-12:
            return r
    return None


def _num(value: Any) -> float:
    try:
        return float(value) if value not in (None, "") else math.nan
    except (TypeError, ValueError):
        return math.nan


def progress_correlations(rounds: Sequence[Mapping[str, str]]) -> tuple[float, float]:
    """How well the plans' predicted progress per sample tracked learning, round by round:
    Pearson's correlation with the drop of the server's validation loss (what the progress
    model sees) and with the drop of the test loss (2,000 sentences, less noisy; measured
    only to check the model, never fed to it). NaN with fewer than 3 usable rounds."""
    predicted = [_num(r.get("predicted_progress")) for r in rounds]
    val_drop = [_num(r.get("val_loss_drop")) for r in rounds]
    test = [_num(r.get("test_loss")) for r in rounds]
    test_drop = [math.nan] + [b - a for a, b in zip(test[1:], test[:-1], strict=True)]
    return _corr(predicted, val_drop), _corr(predicted, test_drop)


def contention_inputs(cfg: Any) -> tuple[Any, Any, Any] | None:
    """What :func:`contention_rows_vs_clock` prices plans with: the job's topology, fleet and
    analytic cost model (``cfg`` is a job of :func:`build_config`; ``None`` without a
    topology). The same for every method and seed of a setting, so built once."""
    from legend.models.spec import get_model_spec
    from legend.planner.costs import CostModel
    from legend.planner.profiles import load_fleet
    from legend.planner.topology import load_topology

    if not cfg.job.topology:
        return None
    fleet = load_fleet(cfg.job.fleet)
    return (
        load_topology(cfg.job.topology, fleet),
        fleet,
        CostModel(get_model_spec(cfg.job.model), cfg.job_params),
    )


def contention_rows_vs_clock(
    inputs: tuple[Any, Any, Any] | None, run_dir: Path, rounds: Sequence[Mapping[str, str]]
) -> float:
    """With a topology: the mean over rounds of the round time the exact planner's
    contention rows give the run's plans (:func:`legend.planner.topology.\
predicted_round_time`, every participant of a congested link waiting for all of its bytes)
    over the devices' part of the simulated round (links shared max-min fairly). Above 1 the
    rows overrate what the plans cost; NaN without a topology (``inputs`` from
    :func:`contention_inputs`)."""
    from legend.planner.topology import predicted_round_time

    if inputs is None:
        return math.nan
    topology, fleet, costs = inputs
    ratios = []
    for row in rounds:
        plan = json.loads((run_dir / "plans" / f"round_{int(row['round']):04d}.json").read_text())
        configurations = {
            d["device_id"]: (tuple(d["layers"]), tuple(d["ranks"])) for d in plan["devices"]
        }
        clock = _num(row["sim_time_s"]) - _num(row.get("server_time_s"))
        if clock > 0:
            ratios.append(predicted_round_time(topology, fleet, costs, configurations) / clock)
    return _mean(ratios)


def _corr(xs: Sequence[float], ys: Sequence[float]) -> float:
    pairs = [(x, y) for x, y in zip(xs, ys, strict=True) if math.isfinite(x + y)]
    xs, ys = [x for x, _ in pairs], [y for _, y in pairs]
    # a series constant up to round-off (uniform plans the same every round) says nothing
    if len(pairs) < 3 or any(max(v) - min(v) <= 1e-6 * max(map(abs, v)) for v in (xs, ys)):
        return math.nan
    return statistics.correlation(xs, ys)


def _device_clock(hit: Mapping[str, str] | None, rounds: Sequence[Mapping[str, str]]) -> float:
    """The simulated clock at round ``hit`` without the server's part of the rounds."""
    if hit is None:
        return math.nan
    return _num(hit["sim_clock_s"]) - int(hit["round"]) * _num(rounds[0].get("server_time_s"))


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def collect(args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    """One row per seed and method from the run directories."""
    window = args.window
    rows: list[dict[str, Any]] = []
    contention = contention_inputs(build_config(args, args.methods[0], args.seeds[0]))
    for seed in args.seeds:
        per_method: dict[str, list[dict[str, str]]] = {}
        for method in args.methods:
            run_dir = out / f"seed{seed}" / method
            # a run longer than --rounds is read to --rounds: the same recipe at that length
            per_method[method] = read_csv(run_dir / "rounds.csv")[: args.rounds]
        # A method's accuracy: the mean of its last `window` rounds.
        accuracy = {
            m: _mean([_num(r["accuracy"]) for r in rs[-window:]]) for m, rs in per_method.items()
        }
        common_target = min(v for v in accuracy.values() if not math.isnan(v))
        for method, rounds in per_method.items():
            last = rounds[-1]
            accs = [_num(r["accuracy"]) for r in rounds]
            hit = first_reaching(rounds, args.target, window)
            hit_common = first_reaching(rounds, common_target, window)
            flat = args.flat_window
            before = accs[-2 * flat : -flat] if len(accs) >= 2 * flat else []
            late = _mean(accs[-flat:])
            val_corr, test_corr = progress_correlations(rounds)
            rows.append(
                {
                    "seed": seed,
                    "method": method,
                    "rounds": len(rounds),
                    "accuracy": accuracy[method],
                    "last_round_accuracy": next(
                        (a for a in reversed(accs) if not math.isnan(a)), math.nan
                    ),
                    "late_gain_pts": 100 * (late - _mean(before)) if before else math.nan,
                    "best_accuracy": max(a for a in accs if not math.isnan(a)),
                    "target": args.target,
                    "reached": hit is not None,
                    "rounds_to_target": int(hit["round"]) if hit else None,
                    "time_to_target_s": _num(hit["sim_clock_s"]) if hit else math.nan,
                    # the same without the server's part (measured on this host, so it
                    # carries the host's load at the moment of measurement)
                    "device_time_to_target_s": _device_clock(hit, rounds),
                    "bytes_to_target": _num(hit["cum_bytes"]) if hit else math.nan,
                    "common_target": common_target,
                    "time_to_common_s": _num(hit_common["sim_clock_s"]) if hit_common else math.nan,
                    "device_time_to_common_s": _device_clock(hit_common, rounds),
                    "bytes_to_common": _num(hit_common["cum_bytes"]) if hit_common else math.nan,
                    "sim_time_s": _num(last["sim_clock_s"]),
                    "total_bytes": _num(last["cum_bytes"]),
                    "round_time_mean_s": _num(last["sim_clock_s"]) / len(rounds),
                    "server_time_mean_s": _mean([_num(r.get("server_time_s")) for r in rounds]),
                    "waiting_mean_s": float(
                        sum(_num(r["waiting_mean_s"]) for r in rounds) / len(rounds)
                    ),
                    "progress_vs_val_corr": val_corr,
                    "progress_vs_test_corr": test_corr,
                    "contention_rows_vs_clock": contention_rows_vs_clock(
                        contention, out / f"seed{seed}" / method, rounds
                    ),
                    "host_time_s": _num(last["host_clock_s"]),
                }
            )
    return rows


def accuracy_by_round(
    out: Path, seeds: Sequence[int], methods: Sequence[str], rounds: int, every: int = 5
) -> list[dict[str, Any]]:
    """Per method, the mean over seeds of the test accuracy (%) at every ``every``-th round
    and the last: what a round learns, whatever it costs (time-to-target tables mix it with
    the round's time)."""
    marks = sorted({*range(every, rounds + 1, every), rounds})
    out_rows = []
    for method in methods:
        curves = [
            [_num(r["accuracy"]) for r in read_csv(out / f"seed{s}" / method / "rounds.csv")]
            for s in seeds
        ]
        row: dict[str, Any] = {"method": method}
        for k in marks:
            row[f"round {k}"] = 100 * _mean([c[k - 1] for c in curves if len(c) >= k])
        out_rows.append(row)
    return out_rows


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

        def speedup(base: str, key: str, method: str = method) -> str:
            return spread(_ratios(rows, method, base, key)).fmt(".2f", unit="x")

        saved = [
            100.0 * (1.0 - 1.0 / x) for x in _ratios(rows, method, "uniform", "bytes_to_target")
        ]
        out.append(
            {
                "method": method,
                "seeds": len(mine),
                "reached": f"{sum(bool(r['reached']) for r in mine)}/{len(mine)}",
                "time_to_target_s": spread(r["time_to_target_s"] for r in mine).fmt(".0f"),
                "speedup_vs_uniform": speedup("uniform", "time_to_target_s"),
                "speedup_vs_greedy": speedup("greedy", "time_to_target_s"),
                "device_speedup_vs_uniform": speedup("uniform", "device_time_to_target_s"),
                "device_speedup_vs_greedy": speedup("greedy", "device_time_to_target_s"),
                "bytes_to_target_MB": spread(r["bytes_to_target"] / 1e6 for r in mine).fmt(".1f"),
                "bytes_saved_vs_uniform_pct": spread(saved).fmt(".1f", unit="%"),
                "time_to_common_s": spread(r["time_to_common_s"] for r in mine).fmt(".0f"),
                "speedup_common_vs_uniform": speedup("uniform", "time_to_common_s"),
                "device_speedup_common_vs_uniform": speedup("uniform", "device_time_to_common_s"),
                "device_speedup_common_vs_greedy": speedup("greedy", "device_time_to_common_s"),
                "bytes_to_common_MB": spread(r["bytes_to_common"] / 1e6 for r in mine).fmt(".1f"),
                "accuracy_pct": spread(100 * r["accuracy"] for r in mine).fmt(".1f"),
                "late_gain_pts": spread(r["late_gain_pts"] for r in mine).fmt(".1f"),
                "round_time_mean_s": spread(r["round_time_mean_s"] for r in mine).fmt(".1f"),
                "server_time_mean_s": spread(r["server_time_mean_s"] for r in mine).fmt(".2f"),
                "waiting_mean_s": spread(r["waiting_mean_s"] for r in mine).fmt(".1f"),
                "progress_vs_val_corr": spread(r["progress_vs_val_corr"] for r in mine).fmt(".2f"),
                "progress_vs_test_corr": spread(r["progress_vs_test_corr"] for r in mine).fmt(
                    ".2f"
                ),
                "contention_rows_vs_clock": spread(r["contention_rows_vs_clock"] for r in mine).fmt(
                    ".2f"
                ),
                "host_time_s": spread(r["host_time_s"] for r in mine).fmt(".0f"),
            }
        )
    return out


# The goals for `exact` per setting: minimum speed-up against uniform, minimum bytes saved
# against uniform (percent), minimum speed-up against greedy (1.0: not later).
GOALS: dict[str, dict[str, float]] = {
    "A": {"vs_uniform": 3.0, "bytes_saved_pct": 50.0, "vs_greedy": 1.0, "accuracy_pts": 1.0},
    "B": {"vs_uniform": 3.0, "bytes_saved_pct": 50.0, "vs_greedy": 1.3, "accuracy_pts": 1.0},
    "C": {"vs_uniform": 2.5, "vs_greedy": 1.0},
}


def _seeds_meeting(values: Sequence[float], threshold: float) -> int:
    return sum(v >= threshold - 1e-9 for v in values)


def goals(
    rows: Sequence[Mapping[str, Any]],
    methods: Sequence[str],
    setting: str = "A",
    subject: str = "exact",
) -> list[dict[str, Any]]:
    """The goals for ``exact`` in ``setting``, checked on the mean over seeds and on at
    least all but one seed (with five seeds: four of five). ``subject``: the method label
    checked against them (``exact``, or an ablation of it such as ``exact-price-auto``)."""
    if not {subject, "uniform"} <= set(methods):
        return []
    goal = GOALS[setting]
    out: list[dict[str, Any]] = []

    def needed(n: int) -> int:
        return max(1, n - 1)

    speed = _ratios(rows, subject, "uniform", "time_to_target_s")
    s = spread(speed)
    hits = _seeds_meeting(speed, goal["vs_uniform"])
    out.append(
        {
            "goal": f"{subject} reaches the target >= {goal['vs_uniform']:.1f}x sooner than "
            "uniform",
            "measured": s.fmt(".2f", unit="x") + f" (met on {hits} of {s.n} seeds)",
            "met": s.n > 0 and s.mean >= goal["vs_uniform"] and hits >= needed(s.n),
        }
    )
    if "bytes_saved_pct" in goal:
        saved = [
            100.0 * (1.0 - 1.0 / x) for x in _ratios(rows, subject, "uniform", "bytes_to_target")
        ]
        b = spread(saved)
        hits = _seeds_meeting(saved, goal["bytes_saved_pct"])
        out.append(
            {
                "goal": f"{subject} moves >= {goal['bytes_saved_pct']:.0f}% fewer bytes to the "
                "target than uniform",
                "measured": b.fmt(".1f", unit="%") + f" (met on {hits} of {b.n} seeds)",
                "met": b.n > 0 and b.mean >= goal["bytes_saved_pct"] and hits >= needed(b.n),
            }
        )
    if "greedy" in methods:
        vs = _ratios(rows, subject, "greedy", "time_to_target_s")
        g = spread(vs)
        hits = _seeds_meeting(vs, goal["vs_greedy"])
        what = (
            "no later than greedy"
            if goal["vs_greedy"] == 1.0
            else f">= {goal['vs_greedy']:.1f}x sooner than greedy"
        )
        out.append(
            {
                "goal": f"{subject} reaches the target {what} (greedy time / {subject} time)",
                "measured": g.fmt(".2f", unit="x") + f" (met on {hits} of {g.n} seeds)",
                "met": g.n > 0 and g.mean >= goal["vs_greedy"] - 1e-9 and hits >= needed(g.n),
            }
        )
    if "accuracy_pts" in goal:
        gaps = []
        for seed in sorted({r["seed"] for r in rows}):
            accs = {r["method"]: r["accuracy"] for r in rows if r["seed"] == seed}
            if subject in accs:
                gaps.append(100.0 * (max(accs.values()) - accs[subject]))
        gap = spread(gaps)
        out.append(
            {
                "goal": f"{subject}'s accuracy (last-rounds mean) within "
                f"{goal['accuracy_pts']:.0f} point of the best method",
                "measured": gap.fmt(".2f", unit=" points below the best") + f" (seeds {gap.n})",
                "met": gap.n > 0 and gap.mean <= goal["accuracy_pts"] + 1e-9,
            }
        )
    per_method = {
        m: _mean([_num(r["late_gain_pts"]) for r in rows if r["method"] == m]) for m in methods
    }
    if any(not math.isnan(v) for v in per_method.values()):
        worst = max(
            per_method, key=lambda m: -math.inf if math.isnan(per_method[m]) else per_method[m]
        )
        out.append(
            {
                "goal": "every method's curve has flattened: mean late gain (last "
                "--flat-window rounds vs the ones before) below 1 point",
                "measured": f"largest: {worst} {per_method[worst]:+.1f} points",
                "met": all(v < 1.0 for v in per_method.values()),
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
    parser.add_argument("--setting", default="A", choices=sorted(SETTINGS), help="A, B or C")
    parser.add_argument("--out", type=Path, default=None, help="output directory")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        choices=[*METHODS, *PENDING_METHODS],
        help="benchmark methods (METHODS in this script)",
    )
    parser.add_argument(
        "--goals-for",
        default="exact",
        choices=list(METHODS),
        help="the method checked against the setting's goals for exact (default exact; an "
        "ablation of it, such as exact-price-auto, to check that variant)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help=f"rounds per run (default {DEFAULT_ROUNDS}); longer finished runs are read to "
        "this many rounds",
    )
    parser.add_argument(
        "--window", type=int, default=None, help="rounds averaged for accuracy and target"
    )
    parser.add_argument(
        "--flat-window",
        type=int,
        default=None,
        help="rounds averaged on each side of the late gain (default 5)",
    )
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
    parser.add_argument("--server-lr", type=float, default=0.01, help="server optimizer rate")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--uniform-rank", type=int, default=8)
    parser.add_argument(
        "--alpha", type=float, default=None, help="Dirichlet label skew (default: the setting's)"
    )
    parser.add_argument(
        "--dataset", default=None, help="rotten_tomatoes or imdb (default: the setting's)"
    )
    parser.add_argument(
        "--topology", default=None, help="topology file (default: the setting's; '' for none)"
    )
    parser.add_argument(
        "--cache-prefix",
        action="store_true",
        help="every method's devices keep their frozen-prefix features (train.cache_prefix)",
    )
    parser.add_argument("--jitter", type=float, default=0.1)
    parser.add_argument("--max-train", type=int, default=0)
    parser.add_argument("--max-test", type=int, default=2000, help="held-out sentences")
    parser.add_argument("--test-fraction", type=float, default=0.25, help="held-out share")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument(
        "--collect-only",
        action="store_true",
        help="train nothing: tabulate the seeds whose runs (every method) are finished",
    )
    parser.add_argument(
        "--device", default="cpu", choices=("cpu", "cuda", "auto"), help="host torch device"
    )
    parser.add_argument("--solver", default="auto")
    parser.add_argument("--no-report", action="store_true", help="skip the HTML/PNG run reports")
    args = parser.parse_args(argv)
    pending = [m for m in args.methods if m in PENDING_METHODS]
    if pending:
        parser.error("; ".join(f"{m}: {PENDING_METHODS[m]}" for m in pending))
    if args.goals_for != "exact" and not {args.goals_for, "uniform"} <= set(args.methods):
        parser.error(
            f"--goals-for {args.goals_for} needs {args.goals_for} and uniform in --methods"
        )
    setting = SETTINGS[args.setting]
    args.alpha = setting["alpha"] if args.alpha is None else args.alpha
    args.dataset = args.dataset or setting["dataset"]
    args.topology = setting["topology"] if args.topology is None else args.topology
    if args.smoke:
        args.model = "tiny-bert"
        args.fleet = str(REPO_ROOT / "examples" / "tiny_fleet.csv")
        if args.topology:
            parser.error("--smoke runs the 6-device tiny fleet, which has no topology file")
        args.seeds = args.seeds or [0]
        args.rounds = args.rounds or 3
        args.window = args.window or 2
        args.flat_window = args.flat_window or 1
        args.target = 0.5 if args.target is None else args.target
        args.devices_per_round = args.devices_per_round or 0
        args.local_steps, args.batch_size, args.seq_len = 2, 8, 32
        args.ranks, args.uniform_rank = [2, 4, 8], 4
        args.max_train, args.max_test = 600, 100
        args.out = args.out or REPO_ROOT / "runs" / "bench" / "time_to_accuracy_smoke"
    else:
        args.model = "all-MiniLM-L6-v2"
        args.fleet = str(FLEET50)
        args.seeds = args.seeds or list(DEFAULT_SEEDS)
        args.rounds = args.rounds or DEFAULT_ROUNDS
        args.window = args.window or 3
        args.flat_window = args.flat_window or 5
        args.target = 0.65 if args.target is None else args.target
        args.devices_per_round = 10 if args.devices_per_round is None else args.devices_per_round
        suffix = "" if args.setting == "A" else f"_{args.setting}"
        args.out = args.out or REPO_ROOT / "runs" / "bench" / f"time_to_accuracy{suffix}"
    if not 0 < args.target <= 1:
        parser.error(f"--target must be an accuracy in (0, 1], got {args.target}")
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if not 1 <= args.window <= args.rounds:
        parser.error(f"--window must be in 1..rounds ({args.rounds}), got {args.window}")
    if args.flat_window < 1:
        parser.error(f"--flat-window must be at least 1, got {args.flat_window}")
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
    if args.collect_only:
        # tables from the runs already on disk: seeds with every method finished
        done = [
            s
            for s in args.seeds
            if all(_finished(out / f"seed{s}" / m, args.rounds) for m in args.methods)
        ]
        print(f"collecting finished seeds {done} of {args.seeds}")
        if not done:
            raise SystemExit(f"error: no seed in {out} has every method finished")
        args.seeds = done
    else:
        for seed in args.seeds:
            run_seed(args, seed, out)
    wall = time.perf_counter() - started
    rows = collect(args, out)
    summary = summarise(rows, args.methods)
    checks = goals(rows, args.methods, args.setting, subject=args.goals_for)
    write_csv(out / "runs.csv", rows, RUN_COLUMNS)
    write_csv(out / "summary.csv", summary, SUMMARY_COLUMNS)
    write_csv(out / "goals.csv", checks, ("goal", "measured", "met"))
    reports = [] if args.no_report else write_reports(args, out)

    topology = f", topology `{Path(args.topology).name}`" if args.topology else ""
    setting = (
        f"Setting {args.setting}: {args.model}, fleet `{Path(args.fleet).name}`{topology}, "
        f"{args.dataset}, seeds {args.seeds}, {args.rounds} rounds, "
        f"{args.devices_per_round or 'all'} devices per round, {args.local_steps} local "
        f"steps of batch {args.batch_size} x {args.seq_len} tokens, ranks {args.ranks} "
        f"(uniform/fedra/depth-only rank {args.uniform_rank}), local {args.optimizer} at "
        f"learning rate {args.learning_rate} with the {args.loss} loss, server optimizer "
        f"{args.server_optimizer} at {args.server_lr}, Dirichlet alpha {args.alpha}, "
        f"{args.max_test} held-out test examples evaluated after every round, jitter "
        f"{args.jitter}"
        + (
            "; every device keeps its frozen-prefix features (train.cache_prefix; each pays "
            "for computing them in its first round that reads them)"
            if args.cache_prefix
            else ""
        )
        + f". Accuracy: the mean of the last {args.window} rounds; time and bytes "
        f"to a target: at the first round whose {args.window}-round moving average reaches "
        f"it. Target accuracy {args.target}; common target: per seed, the lowest accuracy "
        f"among the methods. Late gain: the mean of the last {args.flat_window} rounds minus "
        f"that of the {args.flat_window} before (points). Correlations: per run, over its "
        "rounds, of the plan's predicted progress "
        "per sample with the drop of the server's validation loss and of the test loss. "
        "Device-time speed-ups leave out the server's part of every round (its planning and "
        "aggregation time, measured on this host in the first round). "
        "Times are **simulated device seconds** (cost model); host time is this "
        f"machine's wall clock. This invocation took {wall:.0f} host seconds (finished runs "
        "are reused)."
    )
    summary_md = markdown_table(
        summary,
        SUMMARY_COLUMNS,
        headers={
            "time_to_target_s": "sim. time to target (s)",
            "speedup_vs_uniform": "speed-up vs uniform",
            "speedup_vs_greedy": "speed-up vs greedy",
            "device_speedup_vs_uniform": "device-time speed-up vs uniform",
            "device_speedup_vs_greedy": "device-time speed-up vs greedy",
            "bytes_to_target_MB": "MB to target",
            "bytes_saved_vs_uniform_pct": "bytes saved vs uniform",
            "time_to_common_s": "sim. time to common target (s)",
            "speedup_common_vs_uniform": "speed-up vs uniform (common)",
            "device_speedup_common_vs_uniform": "device-time speed-up vs uniform (common)",
            "device_speedup_common_vs_greedy": "device-time speed-up vs greedy (common)",
            "bytes_to_common_MB": "MB to common target",
            "accuracy_pct": f"accuracy, last {args.window} rounds (%)",
            "late_gain_pts": "late gain (points)",
            "round_time_mean_s": "sim. round (s)",
            "server_time_mean_s": "of which server (s)",
            "waiting_mean_s": "sim. waiting (s)",
            "progress_vs_val_corr": "corr. predicted progress / val. loss drop",
            "progress_vs_test_corr": "corr. predicted progress / test loss drop",
            "contention_rows_vs_clock": "contention rows / simulated round",
            "host_time_s": "host time (s)",
        },
    )
    runs_md = markdown_table(
        rows,
        (
            "seed",
            "method",
            "accuracy",
            "late_gain_pts",
            "rounds_to_target",
            "time_to_target_s",
            "bytes_to_target",
            "common_target",
            "time_to_common_s",
            "waiting_mean_s",
            "host_time_s",
        ),
        formats={
            "accuracy": _fmt_pct,
            "late_gain_pts": lambda v: "-" if math.isnan(v) else f"{v:+.1f}",
            "common_target": _fmt_pct,
            "time_to_target_s": lambda v: "not reached" if math.isnan(v) else f"{v:.0f}",
            "time_to_common_s": lambda v: "-" if math.isnan(v) else f"{v:.0f}",
            "bytes_to_target": lambda v: "-" if math.isnan(v) else f"{v / 1e6:.1f} MB",
            "waiting_mean_s": lambda v: f"{v:.1f}",
            "host_time_s": lambda v: f"{v:.0f}",
        },
    )
    by_round = accuracy_by_round(out, args.seeds, args.methods, args.rounds)
    by_round_md = markdown_table(
        by_round,
        tuple(by_round[0]),
        formats={
            k: (lambda v: "-" if math.isnan(v) else f"{v:.1f}")
            for k in by_round[0]
            if k != "method"
        },
    )
    blocks = [
        setting,
        "## Per method (mean ± standard deviation over seeds)\n\n" + summary_md,
        "## Goals\n\n" + markdown_table(checks, ("goal", "measured", "met")) if checks else "",
        "## Per seed\n\n" + runs_md,
        "## Accuracy by round (%, mean over seeds)\n\nWhat a round learns, whatever its "
        "time: the test accuracy after the round.\n\n" + by_round_md,
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
