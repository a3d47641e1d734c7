"""How far the global LoRA adapter has moved, round by round, in finished or running runs.

For every checkpoint of a run directory (``checkpoints/round_NNNN.npz``) it reports the size
of the adapter's weight change ``||s B A||_F`` per layer (query and value together, ``s`` the
run's ``train.lora_scale``), next to the round's test accuracy and loss from ``rounds.csv``.
This is what to look at when a run's accuracy falls after it has learned: an adapter whose
change keeps growing by a constant amount a round is being pushed in a fixed direction by
the server optimizer, whatever the devices learn.

    .venv/bin/python benchmarks/adapter_growth.py runs/bench/time_to_accuracy/seed3/exact \\
        runs/bench/time_to_accuracy/seed3/uniform --out runs/bench/adapter_growth

Writes ``adapter_growth.csv`` (one row per run and round) and ``adapter_growth.md`` (every
``--every``-th round) into ``--out``. Reads only; nothing is trained.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    markdown_table,
    read_csv,
    reproduce_command,
    run_checkpoints,
    write_csv,
    write_markdown,
)

COLUMNS = ("run", "round", "accuracy", "test_loss", "total", "top_layer", "layers")


def growth_rows(run: Path) -> list[dict[str, object]]:
    """One row per checkpointed round of ``run``: the adapter's change per layer."""
    from legend.federation.adapters import AdapterState
    from legend.federation.job import TrainSection

    config = run / "config.toml"
    if not config.is_file():
        raise SystemExit(f"{run} is not a run directory: it has no config.toml")
    # read as text: the run's fleet file need not exist any more to read its checkpoints
    train = tomllib.loads(config.read_text()).get("train", {})
    scale = float(train.get("lora_scale", TrainSection.lora_scale))
    # a run that has not finished a round yet has no rounds.csv: no accuracies to show
    records = read_csv(run / "rounds.csv") if (run / "rounds.csv").is_file() else []
    rounds = {int(r["round"]): r for r in records}
    rows = []
    for number, path in run_checkpoints(run):
        state = AdapterState.from_npz(path)
        squares: dict[int, float] = {}
        for (layer, _), (a, b) in state.factors.items():
            delta = scale * (b.astype(np.float64) @ a.astype(np.float64))
            squares[layer] = squares.get(layer, 0.0) + float(np.sum(delta * delta))
        per_layer = [squares[k] ** 0.5 for k in sorted(squares)]
        record = rounds.get(number, {})
        rows.append(
            {
                "run": str(run),
                "round": number,
                "accuracy": _number(record.get("accuracy")),
                "test_loss": _number(record.get("test_loss")),
                "total": sum(squares.values()) ** 0.5,
                "top_layer": per_layer[-1] if per_layer else 0.0,
                "layers": " ".join(f"{v:.2f}" for v in per_layer),
            }
        )
    if not rows:
        raise SystemExit(f"{run} has no checkpoints (checkpoints/round_NNNN.npz)")
    return rows


def _number(text: str | None) -> float:
    try:
        return float(text) if text else float("nan")
    except ValueError:
        return float("nan")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="run directories")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/adapter_growth"))
    parser.add_argument("--every", type=int, default=5, help="rounds between table rows")
    args = parser.parse_args(argv)
    if args.every < 1:
        parser.error(f"--every must be a positive number of rounds, got {args.every}")
    rows = [row for run in args.runs for row in growth_rows(run)]
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "adapter_growth.csv", rows, COLUMNS)
    shown = [r for r in rows if int(r["round"]) % args.every == 0 or int(r["round"]) == 1]
    table = markdown_table(shown, COLUMNS)
    command = reproduce_command("adapter_growth.py", argv)
    write_markdown(args.out / "adapter_growth.md", "Adapter growth", [table], command)
    print(table)
    print(command)


if __name__ == "__main__":
    main()
