"""The server's layer probe against the layer gains a run learned from its devices.

For finished runs (such as those of ``time_to_accuracy.py``), at chosen rounds ``k``, the
global state the run checkpointed after round ``k`` (what round ``k + 1`` started from) is
probed on the run's own validation split (the server's held-out part of the train split,
rebuilt from ``config.toml``), every layer at the largest rank of the grid:

- ``probe``: ``legend.federation.training.probe_layer_decrease``, the inner product of the
  gradients of the two halves of ``--examples`` validation examples per layer (an
  estimate of ``||g_l||^2`` without the sampling noise);
- ``squared_B``: the squared norm of one batch's gradient per layer, ``B`` examples (``B``
  = 16, the devices' batch in the benchmark, and ``--examples``): what a device's
  first-order decrease of an SGD step measures, noise included;

and set beside the layer gains the run planned round ``k + 1`` with (its plan's
``layer_weights``: the progress model's estimate from the devices' measurements up to
round ``k``). Every column is a ratio to the last layer. ``log_gap`` is the mean absolute
difference of the logs of the probe's and the learned ratios over the layers where the
probe is positive.

Usage::

    .venv/bin/python benchmarks/probe_agreement.py RUN_DIR [RUN_DIR ...] \\
        [--rounds 1 10 20 30 40] [--examples 256] [--out runs/bench/probe_agreement]

Writes ``probe_agreement.csv`` and ``.md`` and prints the host CPU time of one probe.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    load_run_config,
    markdown_table,
    reproduce_command,
    set_offline_env,
    write_csv,
    write_markdown,
)

#: The devices' batch in ``time_to_accuracy.py``: the squared gradient a device measures.
DEVICE_BATCH = 16


def _squared_norms(model: Any, split: Any, layer_params: Any, num_layers: int, n: int) -> list:
    """Per layer, the squared norm of the mean loss's gradient over the first ``n``
    examples of ``split`` (one batch)."""
    import numpy as np

    model.eval()
    for p in model.parameters():
        p.grad = None
    model(**split.batch(np.arange(n))).loss.backward()
    out = [math.nan] * num_layers
    for layer, group in layer_params.items():
        out[int(layer)] = float(sum((p.grad**2).sum() for p in group if p.grad is not None))
    return out


def _ratios(values: Sequence[float]) -> list[float]:
    last = values[-1]
    return [v / last if math.isfinite(v) and last > 0 else math.nan for v in values]


def run_rows(run: Path, rounds: Sequence[int], examples: int) -> tuple[list[dict], float]:
    """The rows of one run, and the host CPU seconds of its last probe."""
    import torch

    from legend.federation.session import _load_arrays, prepare
    from legend.federation.training import probe_layer_decrease

    torch.set_num_threads(1)
    cfg = load_run_config(run)
    prepared = prepare(cfg, calibration=None)
    if prepared.validation is None:
        raise SystemExit(f"{run}: the job holds no validation split (data.validation_size = 0)")
    num_layers = prepared.spec.num_layers
    rows: list[dict[str, Any]] = []
    cpu = math.nan
    for k in rounds:
        checkpoint = run / "checkpoints" / f"round_{k:04d}.npz"
        plan_file = run / "plans" / f"round_{k + 1:04d}.json"
        if not checkpoint.is_file() or not plan_file.is_file():
            print(f"{run}: round {k} has no checkpoint or no next plan; skipped", flush=True)
            continue
        state = _load_arrays(checkpoint)
        learned = json.loads(plan_file.read_text(encoding="utf-8"))["options"]["layer_weights"]
        with prepared.host.activate_global(state) as model:
            params = prepared.host.layer_parameters()
            started = time.process_time()
            probe = probe_layer_decrease(
                model, prepared.validation, params, num_layers, examples=examples
            )
            cpu = time.process_time() - started
            small = _squared_norms(model, prepared.validation, params, num_layers, DEVICE_BATCH)
            n = (
                min(examples, len(prepared.validation))
                if examples > 0
                else len(prepared.validation)
            )
            large = _squared_norms(model, prepared.validation, params, num_layers, n)
        columns = {
            "probe": _ratios(probe),
            f"squared_{DEVICE_BATCH}": _ratios(small),
            f"squared_{n}": _ratios(large),
            "learned": _ratios(learned),
        }
        gaps = [
            abs(math.log(p) - math.log(q))
            for p, q in zip(columns["probe"], columns["learned"], strict=True)
            if p > 0 and q > 0
        ]
        for name, values in columns.items():
            rows.append(
                {
                    "run": str(run),
                    "round": k,
                    "measure": name,
                    **{f"layer {ly}": v for ly, v in enumerate(values)},
                    "log_gap": (sum(gaps) / len(gaps)) if name == "learned" and gaps else math.nan,
                }
            )
        print(
            f"{run} round {k}: probe {[round(v, 3) for v in columns['probe']]}, "
            f"learned {[round(v, 3) for v in columns['learned']]}",
            flush=True,
        )
    return rows, cpu


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories")
    parser.add_argument("--rounds", type=int, nargs="+", default=[1, 10, 20, 30, 40])
    parser.add_argument("--examples", type=int, default=256, help="validation examples probed")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/probe_agreement"))
    args = parser.parse_args(argv)
    set_offline_env()
    rows: list[dict[str, Any]] = []
    cpu = math.nan
    for run in args.runs:
        mine, cpu = run_rows(run, args.rounds, args.examples)
        rows.extend(mine)
    if not rows:
        raise SystemExit("no round of the runs has a checkpoint and a next plan")
    columns = tuple(rows[0])
    write_csv(args.out / "probe_agreement.csv", rows, columns)
    text = markdown_table(
        rows,
        columns,
        formats={
            c: (lambda v: "-" if isinstance(v, float) and math.isnan(v) else f"{v:.3f}")
            for c in columns
            if c.startswith("layer") or c == "log_gap"
        },
    )
    write_markdown(
        args.out / "probe_agreement.md",
        "The server's layer probe against the learned layer gains",
        [
            "Ratios to the last layer. `probe`: the split-half gradient product on "
            f"{args.examples} validation examples; `squared_B`: one batch's squared gradient "
            "of B examples; `learned`: the layer gains the run planned the next round with. "
            f"Host CPU time of one probe: {cpu:.2f} s.",
            text,
        ],
        reproduce_command("probe_agreement.py", argv),
    )
    print(text)
    print(f"host CPU seconds of one probe: {cpu:.2f}")


if __name__ == "__main__":
    main()
