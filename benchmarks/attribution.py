"""Which layers and rank slots lowered the global model's loss, round by round, in finished runs.

The progress model (docs/planner.md) values a configuration by what its adapter buys on the
*device*. This script measures what each layer and rank slot of the *global* adapter bought
the *global* model, from a run's checkpoints: for every round ``t`` it takes the global
state before the round (the previous checkpoint; round 1 starts from the run's seeded
initial adapter) and the server's step ``Delta_t`` to the next checkpoint, and splits the
first-order change of the loss on a held-out split,

    L(W + Delta W) - L(W)  ~  <dL/dW, Delta W>,   Delta W = s (B' A' - B A) per module,

exactly over layers and over rank slots (``B A = sum_k b_k a_k^T``, so slot ``k``'s part is
``s <G, b'_k a'_k^T - b_k a_k^T>`` with ``G = dL/dW``), plus the head's
``<dL/dhead, Delta head>``. Slots are grouped by the run's rank grid (for ranks 2, 4, 8, 16:
slots 1-2, 3-4, 5-8, 9-16). Each round also records the actual change of the loss, so the
first-order split can be checked.

    .venv/bin/python benchmarks/attribution.py runs/bench/time_to_accuracy/seed0/exact \\
        runs/bench/time_to_accuracy/seed0/uniform --split validation --out runs/bench/attribution

``--split validation`` (default) uses the server's own held-out part of the training data
(what the progress model may see); ``--split test`` the test sentences (``--max`` of them),
less noisy, for analysis only. Writes ``attribution.csv`` (one row per run and round: the
loss decrease bought per layer, per slot group and by the head, the first-order total and
the actual decrease) and ``attribution.md`` (per run, each part's share of the total
first-order decrease over all rounds). Each row also holds, per layer and slot group, the
decrease it bought (``cell_<layer>_<slots>``) and how many mean-sized devices trained it
that round (``cover_<layer>_<slots>``, from the run's ``devices.csv``); ``coverage.csv``
pools, over the cells trained at more than one coverage, each round's decrease relative to
the cell's mean by the number of devices that trained it: whether a slot buys more when
more devices train it. Reads runs; trains nothing.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    markdown_table,
    read_csv,
    reproduce_command,
    run_checkpoints,
    set_offline_env,
    write_csv,
    write_markdown,
)


def slot_groups(ranks: Sequence[int]) -> list[tuple[int, int]]:
    """Rank-slot groups ``[lo, hi)`` of a rank grid: what each step up the grid adds."""
    bounds = [0, *sorted(int(r) for r in ranks)]
    return list(itertools.pairwise(bounds))


def _gradients(host: Any, family: str, state: Any, split: Any, batch_size: int) -> tuple:
    """Mean loss on ``split`` at ``state`` and its gradients: per ``(layer, module)`` the
    gradient with respect to the module's effective weight, and per head parameter."""
    import torch

    from legend.federation.apply import adapted_modules

    with host.evaluation_model(state) as model:
        names = adapted_modules(model, family)
        weights = {}
        for name, module in model.named_modules():
            bare = name.removeprefix("base_model.model.")
            if bare in names and names[bare][0] is not None:
                weights[names[bare][0]] = module.base_layer.weight
        heads = {
            n: p
            for n, p in model.named_parameters()
            if "modules_to_save" in n and p.dtype.is_floating_point
        }
        tracked = [*weights.values(), *heads.values()]
        for p in tracked:
            p.requires_grad_(True)
            p.grad = None
        total, n = 0.0, len(split)
        try:
            with torch.enable_grad():
                for start in range(0, n, batch_size):
                    batch = split.batch(np.arange(start, min(n, start + batch_size)))
                    out = model(**batch)
                    (out.loss * len(batch["labels"]) / n).backward()
                    total += float(out.loss.detach()) * len(batch["labels"]) / n
            grads = {k: w.grad.detach().double().numpy().copy() for k, w in weights.items()}
            head = {n_: p.grad.detach().double().numpy().copy() for n_, p in heads.items()}
        finally:
            for p in tracked:
                p.requires_grad_(False)
                p.grad = None
    return total, grads, head


def round_coverage(run: Path, num_layers: int, ranks: Sequence[int]) -> dict[int, np.ndarray]:
    """Per round ``[layer, slot group]``: how many mean-sized devices trained it (the
    samples of the devices whose update was accepted, over their mean), from the run's
    ``devices.csv``; empty when the run has none."""
    path = run / "devices.csv"
    if not path.is_file():
        return {}
    groups = slot_groups(ranks)
    by_round: dict[int, list[dict[str, str]]] = {}
    for row in read_csv(path):
        if row.get("status") == "ok":
            by_round.setdefault(int(row["round"]), []).append(row)
    out = {}
    for number, rows in by_round.items():
        mean = float(np.mean([float(r["samples"]) for r in rows]))
        cover = np.zeros((num_layers, len(groups)))
        for r in rows:
            for layer, rank in zip(r["layers"].split(), r["ranks"].split(), strict=True):
                for j, (_lo, hi) in enumerate(groups):
                    if int(rank) >= hi:
                        cover[int(layer), j] += float(r["samples"]) / mean
        out[number] = cover
    return out


def _coverage_samples(
    rows: Sequence[dict[str, Any]],
) -> tuple[dict[int, tuple[list[float], list[float]]], int]:
    """Per coverage (whole devices) the normalised decreases of one run's cells (see
    :func:`coverage_response`), and how many cells contributed."""
    cells = sorted(k.removeprefix("cover_") for k in rows[0] if k.startswith("cover_"))
    total = np.asarray([sum(float(r[f"cell_{c}"]) for c in cells) for r in rows])
    pooled: dict[int, tuple[list[float], list[float]]] = {}
    used = 0
    for cell in cells:
        cover = np.asarray([float(r[f"cover_{cell}"]) for r in rows])
        dec = np.asarray([float(r[f"cell_{cell}"]) for r in rows])
        trained = cover > 0
        if len(np.unique(np.rint(cover[trained]))) < 2 or dec[trained].mean() <= 0:
            continue
        used += 1
        rel = dec[trained] / dec[trained].mean()
        for c, v in zip(np.rint(cover[trained]).astype(int), rel, strict=True):
            pooled.setdefault(int(c), ([], []))[0].append(float(v))
        both = trained & (total > 0)
        share = dec[both] / total[both]
        if share.mean() > 0:
            for c, v in zip(np.rint(cover[both]).astype(int), share / share.mean(), strict=True):
                pooled.setdefault(int(c), ([], []))[1].append(float(v))
    return pooled, used


def coverage_response(
    rows: Sequence[dict[str, Any]], label: str | None = None
) -> list[dict[str, Any]]:
    """The loss decrease a layer's slot group bought against how many mean-sized devices
    trained it, pooled over the cells (layer, slot group) trained at more than one coverage
    and binned by coverage (rounded to whole devices). Two normalisations: each cell's
    decrease over its mean over the rounds that trained it (its gain), and, to take out how
    much the whole round learned, each cell's share of the round's LoRA decrease over the
    cell's mean share (rounds whose LoRA decrease is not positive left out). ``rows`` may
    hold several runs (their ``run`` field): each is normalised on its own, then pooled."""
    pooled: dict[int, tuple[list[float], list[float]]] = {}
    used = 0
    for run in dict.fromkeys(r["run"] for r in rows):
        part, n = _coverage_samples([r for r in rows if r["run"] == run])
        used += n
        for c, (rel, share) in part.items():
            pooled.setdefault(c, ([], []))[0].extend(rel)
            pooled[c][1].extend(share)

    def mean_se(v: list[float]) -> tuple[float, float]:
        if not v:
            return float("nan"), float("nan")
        se = float(np.std(v) / np.sqrt(len(v))) if len(v) > 1 else float("nan")
        return float(np.mean(v)), se

    out = []
    for c, (rel, share) in sorted(pooled.items()):
        m1, s1 = mean_se(rel)
        m2, s2 = mean_se(share)
        out.append(
            {
                "run": label or rows[0]["run"],
                "devices": c,
                "cells x rounds": len(rel),
                "cells": used,
                "relative decrease": m1,
                "std error": s1,
                "relative share of the round": m2,
                "share std error": s2,
            }
        )
    return out


def attribute(run: Path, split_name: str, max_examples: int) -> list[dict[str, Any]]:
    """One row per round of ``run``: the first-order loss decrease per layer, slot group
    and head, and the actual decrease."""
    from legend.federation.adapters import AdapterState, init_global
    from legend.federation.job import load_job
    from legend.federation.session import prepare

    cfg = load_job(run / "config.toml")
    prepared = prepare(cfg, calibration=None)
    split = prepared.validation if split_name == "validation" else prepared.test
    if split is None:
        raise SystemExit(f"{run}: the job holds out no validation split; use --split test")
    if max_examples and len(split) > max_examples:
        from legend.federation.training import TokenizedSplit

        split = TokenizedSplit(
            tensors={k: v[:max_examples] for k, v in split.tensors.items()},
            labels=split.labels[:max_examples],
        )
    spec, host = prepared.spec, prepared.host
    scale = float(cfg.train.lora_scale)
    groups = slot_groups(cfg.train.ranks)
    batch = cfg.federation.eval_batch_size
    coverage = round_coverage(run, spec.num_layers, cfg.train.ranks)
    before = init_global(spec, max(cfg.train.ranks), prepared.initial_head, seed=cfg.job.seed)
    # each state's loss and gradients once: a round's "after" is the next round's "before"
    loss, grads, head_grads = _gradients(host, spec.family, before, split, batch)
    rows = []
    for number, path in run_checkpoints(run):
        after = AdapterState.from_npz(path)
        loss_after, grads_after, head_after = _gradients(host, spec.family, after, split, batch)
        cell_part = np.zeros((spec.num_layers, len(groups)))  # [layer, slot group]
        for key, (a1, b1) in after.factors.items():
            a0, b0 = (x.astype(np.float64) for x in before.factors[key])
            a1, b1 = a1.astype(np.float64), b1.astype(np.float64)
            g = grads[key]
            # per slot k: s * (b1_k^T G a1_k - b0_k^T G a0_k); a decrease is its negative
            slot = -scale * (
                np.einsum("ok,oi,ki->k", b1, g, a1) - np.einsum("ok,oi,ki->k", b0, g, a0)
            )
            for j, (lo, hi) in enumerate(groups):
                cell_part[key[0], j] += float(slot[lo:hi].sum())
        layer_part, group_part = cell_part.sum(axis=1), cell_part.sum(axis=0)
        head_part = 0.0
        for name, grad in head_grads.items():
            # PEFT's "base_model.model.classifier.modules_to_save.default.weight" is the
            # state's "classifier.weight"
            key = name.removeprefix("base_model.model.").replace(".modules_to_save.default", "")
            if key not in after.head:
                raise SystemExit(f"{run}: head parameter {key} is not in the checkpoint")
            delta = after.head[key].astype(np.float64) - before.head[key]
            head_part -= float(np.sum(grad * delta))
        actual = loss - loss_after
        row: dict[str, Any] = {
            "run": str(run),
            "round": number,
            "loss_before": loss,
            "actual_decrease": actual,
            "first_order_decrease": float(layer_part.sum()) + head_part,
            "head": head_part,
        }
        row.update({f"layer_{k}": float(v) for k, v in enumerate(layer_part)})
        row.update(
            {
                f"slots_{lo + 1}-{hi}": float(v)
                for (lo, hi), v in zip(groups, group_part, strict=True)
            }
        )
        cover = coverage.get(number)
        for layer in range(spec.num_layers):
            for j, (lo, hi) in enumerate(groups):
                row[f"cell_{layer}_{lo + 1}-{hi}"] = float(cell_part[layer, j])
                if cover is not None:
                    row[f"cover_{layer}_{lo + 1}-{hi}"] = float(cover[layer, j])
        rows.append(row)
        before, loss, grads, head_grads = after, loss_after, grads_after, head_after
        print(
            f"{run} round {number}: actual {actual:+.4f}, first order "
            f"{row['first_order_decrease']:+.4f}",
            flush=True,
        )
    return rows


def shares(rows: Sequence[dict[str, Any]], parts: Sequence[str]) -> dict[str, Any]:
    """Each part's share of the run's summed first-order decrease, and how well the first
    order tracked the actual decreases (Pearson's r over rounds)."""
    total = sum(float(r["first_order_decrease"]) for r in rows)
    out: dict[str, Any] = {"run": rows[0]["run"], "rounds": len(rows)}
    for p in parts:
        out[p] = sum(float(r[p]) for r in rows) / total if total else float("nan")
    first = np.asarray([float(r["first_order_decrease"]) for r in rows])
    actual = np.asarray([float(r["actual_decrease"]) for r in rows])
    out["first_vs_actual_r"] = (
        float(np.corrcoef(first, actual)[0, 1])
        if len(rows) > 2 and first.std() > 0
        else float("nan")
    )
    out["sum_first_order"] = float(first.sum())
    out["sum_actual"] = float(actual.sum())
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="run directories")
    parser.add_argument("--split", choices=("validation", "test"), default="validation")
    parser.add_argument("--max", type=int, default=0, help="at most this many examples")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/attribution"))
    args = parser.parse_args(argv)
    if args.max < 0:
        parser.error(f"--max must be 0 (the whole split) or a positive count, got {args.max}")
    set_offline_env()
    all_rows, summary, response = [], [], []
    for run in args.runs:
        rows = attribute(run, args.split, args.max)
        if not rows:
            raise SystemExit(f"{run} has no checkpoints (checkpoints/round_NNNN.npz)")
        parts = [k for k in rows[0] if k.startswith(("layer_", "slots_"))] + ["head"]
        all_rows += rows
        summary.append(shares(rows, parts))
        response += coverage_response(rows)
    if len(args.runs) > 1 and any(k.startswith("cover_") for k in all_rows[0]):
        response += coverage_response(all_rows, label="all runs")
    columns = list(dict.fromkeys(k for r in all_rows for k in r))
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "attribution.csv", all_rows, columns)
    summary_columns = list(dict.fromkeys(k for r in summary for k in r))
    table = markdown_table(summary, summary_columns)
    blocks = [table]
    if response:
        write_csv(args.out / "coverage.csv", response, list(response[0]))
        blocks.append(markdown_table(response, list(response[0])))
    command = reproduce_command("attribution.py", argv)
    write_markdown(
        args.out / "attribution.md", "Loss decrease by layer and rank slot", blocks, command
    )
    print("\n\n".join(blocks))
    print(command)


if __name__ == "__main__":
    main()
