"""The observation LEGEND builds on: top layers with high ranks vs all layers with low ranks.

At one trainable-parameter budget (query+value LoRA on all-MiniLM-L6-v2: 1,536 parameters
per unit rank and layer; budget ``6 x 4 x 1,536 = 36,864`` LoRA parameters, plus the
classification head, trained in every configuration), each configuration fine-tunes the
model on the Rotten Tomatoes train split (centralised, seeded batches, the same learning
rate, batch, sequence length and number of steps for all) and is then evaluated on held-out
test sentences:

=============  ===========  ======
configuration  layers       rank
=============  ===========  ======
top-1          5            24
top-2          4-5          12
top-3          3-5          8
all-6          0-5          4
bottom-3       0-2          8
=============  ===========  ======

Reported per configuration: test accuracy after the fixed number of steps (mean and spread
over seeds), the last training losses, the host step time (median, one torch thread; host
wall clock on a possibly shared machine), the measured peak training memory above the
loaded model (resident memory, see ``common.measure_configs``) and the cost model's
prediction of the device memory and of the step's FLOPs relative to ``all-6``.

``--smoke``: the tiny BERT (4 layers, budget ``4 x 2`` rank-layers: top-1 r8, top-2 r4,
all-4 r2, bottom-2 r4), 10 steps, in seconds.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    REPO_ROOT,
    markdown_table,
    measure_in_subprocess,
    reproduce_command,
    set_offline_env,
    spread,
    write_csv,
    write_markdown,
)

from legend.models.spec import get_model_spec
from legend.planner.costs import CostModel
from legend.planner.profiles import JobParams

# name -> (layers, rank); equal rank-layer products.
MINILM_CONFIGS: dict[str, tuple[tuple[int, ...], int]] = {
    "top-1": ((5,), 24),
    "top-2": ((4, 5), 12),
    "top-3": ((3, 4, 5), 8),
    "all-6": ((0, 1, 2, 3, 4, 5), 4),
    "bottom-3": ((0, 1, 2), 8),
}
TINY_CONFIGS: dict[str, tuple[tuple[int, ...], int]] = {
    "top-1": ((3,), 8),
    "top-2": ((2, 3), 4),
    "all-4": ((0, 1, 2, 3), 2),
    "bottom-2": ((0, 1), 4),
}

RUN_COLUMNS = (
    "seed",
    "config",
    "layers",
    "rank",
    "lora_params",
    "trainable_params",
    "accuracy",
    "test_loss",
    "train_loss_last",
    "step_median_s",
    "step_fastest_s",
    "train_peak_MB",
)
SUMMARY_COLUMNS = (
    "config",
    "layers",
    "rank",
    "lora_params",
    "seeds",
    "accuracy_pct",
    "accuracy_range_pct",
    "train_loss_last",
    "step_median_ms",
    "step_vs_all",
    "train_peak_MB",
    "predicted_memory_MB",
    "predicted_flops_vs_all",
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny BERT, 10 steps")
    parser.add_argument("--steps", type=int, default=None, help="training steps per config")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=48)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--max-test", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    set_offline_env()
    if args.smoke:
        model, configs = "tiny-bert", TINY_CONFIGS
        steps, seeds = args.steps or 10, args.seeds or [0]
        batch, seq, max_test = 8, 32, 100
    else:
        model, configs = "all-MiniLM-L6-v2", MINILM_CONFIGS
        steps, seeds = args.steps or 200, args.seeds or [0, 1]
        batch, seq, max_test = args.batch_size, args.seq_len, args.max_test
    default_out = "observation_smoke" if args.smoke else "observation"
    out: Path = args.out or REPO_ROOT / "runs" / "bench" / default_out
    command = reproduce_command("observation.py", argv)
    spec = get_model_spec(model, target_modules="qv")
    names = list(configs)
    grid = tuple(sorted({r for _, r in configs.values()}))
    job = JobParams(batch_size=batch, seq_len=seq, target_modules="qv", ranks=grid)
    costs = CostModel(spec, job)

    rows: list[dict[str, Any]] = []
    for seed in seeds:
        measured = measure_in_subprocess(
            {
                "model": model,
                "configs": [
                    [list(configs[n][0]), [configs[n][1]] * len(configs[n][0])] for n in names
                ],
                "batch_size": batch,
                "seq_len": seq,
                "steps": steps,
                "warmup": 0,
                "passes": 1,
                "learning_rate": args.learning_rate,
                "threads": args.threads,
                "seed": seed,
                "data": "rotten_tomatoes",
                "max_test": max_test,
            }
        )
        for name, res in zip(names, measured["results"], strict=True):
            layers, rank = configs[name]
            rows.append(
                {
                    "seed": seed,
                    "config": name,
                    "layers": layers,
                    "rank": rank,
                    "lora_params": spec.lora_params(layers, (rank,) * len(layers)),
                    "trainable_params": res["trainable_params"],
                    "accuracy": res["accuracy"],
                    "test_loss": res["test_loss"],
                    "train_loss_last": res["train_loss_last"],
                    "step_median_s": res["step_median_s"],
                    "step_fastest_s": res["step_fastest_s"],
                    "train_peak_MB": res["train_peak_bytes"] / 1e6,
                }
            )
            print(
                f"seed {seed} {name:>9}: accuracy {res['accuracy']:.3f}  "
                f"step {1e3 * res['step_median_s']:.0f} ms  "
                f"peak +{res['train_peak_bytes'] / 1e6:.0f} MB",
                flush=True,
            )
    all_name = next(n for n in names if n.startswith("all-"))
    all_layers, all_rank = configs[all_name]
    all_flops = costs.step_flops(all_layers, (all_rank,) * len(all_layers))
    all_step = spread(r["step_median_s"] for r in rows if r["config"] == all_name).mean
    summary = []
    for name in names:
        layers, rank = configs[name]
        mine = [r for r in rows if r["config"] == name]
        acc = spread(100 * r["accuracy"] for r in mine)
        step = spread(r["step_median_s"] for r in mine)
        ranks = (rank,) * len(layers)
        summary.append(
            {
                "config": name,
                "layers": f"{min(layers)}-{max(layers)}" if len(layers) > 1 else str(layers[0]),
                "rank": rank,
                "lora_params": spec.lora_params(layers, ranks),
                "seeds": len(mine),
                "accuracy_pct": acc.fmt(".1f"),
                "accuracy_range_pct": f"{acc.lo:.1f}-{acc.hi:.1f}",
                "train_loss_last": spread(r["train_loss_last"] for r in mine).fmt(".3f"),
                "step_median_ms": spread(1e3 * r["step_median_s"] for r in mine).fmt(".0f"),
                "step_vs_all": f"{step.mean / all_step:.2f}x",
                "train_peak_MB": spread(r["train_peak_MB"] for r in mine).fmt(".0f"),
                "predicted_memory_MB": costs.evaluate(_host(), layers, ranks).memory_bytes / 1e6,
                "predicted_flops_vs_all": f"{costs.step_flops(layers, ranks) / all_flops:.2f}x",
            }
        )
    write_csv(out / "observation.csv", rows, RUN_COLUMNS)
    write_csv(out / "observation_summary.csv", summary, SUMMARY_COLUMNS)
    summary_md = markdown_table(
        summary,
        SUMMARY_COLUMNS,
        headers={
            "accuracy_pct": "test accuracy (%)",
            "accuracy_range_pct": "range over seeds",
            "train_loss_last": "train loss (last 20)",
            "step_median_ms": "host step (ms)",
            "step_vs_all": "host step vs all",
            "train_peak_MB": "measured peak training MB",
            "predicted_memory_MB": "cost model memory MB",
            "predicted_flops_vs_all": "cost model FLOPs vs all",
        },
        formats={"predicted_memory_MB": lambda v: f"{v:.0f}"},
    )
    md = write_markdown(
        out / "observation.md",
        "The observation: top layers, high ranks vs all layers, low ranks",
        [
            f"{model}, {steps} steps of batch {batch} x {seq} tokens, learning rate "
            f"{args.learning_rate}, seeds {seeds}, {max_test} test sentences. Host step "
            "times are this machine's wall clock with one torch thread.",
            summary_md,
            "## Per seed\n\n" + markdown_table(rows, RUN_COLUMNS),
        ],
        command,
    )
    print(summary_md)
    print(f"wrote {out / 'observation.csv'}, {md}")
    print(f"reproduce: {command}")
    return 0


def _host() -> Any:
    from legend.planner.profiles import DeviceProfile

    return DeviceProfile(
        device_id="host",
        tflops=1.0,
        memory_gb=1000.0,
        uplink_mbps=1.0,
        downlink_mbps=1.0,
        num_samples=1,
    )


if __name__ == "__main__":
    raise SystemExit(main())
