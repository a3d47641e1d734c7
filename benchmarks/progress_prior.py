"""Measure the progress model's prior of a model: layer gains and rank response.

The planner's ``progress`` objective starts every run from a prior stored with the model
preset (``models/progress_priors.json``, :mod:`legend.models.priors`); a run then
re-estimates it from its own updates (:mod:`legend.federation.progress`). This script
measures that prior the way a run would see it: a few federated rounds in which every
device trains *every* layer, on the model's default data with the time-to-accuracy
benchmark's local recipe, over several seeds. Per round it reads the
devices' replies with :meth:`ProgressModel.signals`: per layer the first-order training-loss
decrease the devices measured (at full-rank equivalent), per rank the decrease a layer
trained at that rank buys relative to the largest rank (every device trains every layer,
the ranks of the grid in turn across devices and layers, so ranks are told apart from
devices and layers). It normalises the layer gains to mean 1 and averages over rounds and
seeds.

Prints the prior, its spread over seeds, and with ``--write`` stores it in
``models/progress_priors.json`` (the entry for the model is replaced; other entries are
kept; the file is written atomically).

    .venv/bin/python benchmarks/progress_prior.py --model all-MiniLM-L6-v2 --write

``--smoke`` runs a tiny random-initialised BERT for one round (seconds; for CI).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO_ROOT, set_offline_env

PRIORS = REPO_ROOT / "models" / "progress_priors.json"


def build_config(args: argparse.Namespace, seed: int) -> Any:
    """A ``uniform`` job (every device trains every layer); the ranks are set per round."""
    from legend.federation.job import JobConfig, JobSection

    job = JobSection(
        name=f"progress-prior-s{seed}",
        model=args.model,
        fleet=str(Path(args.fleet).resolve()),
        method="uniform",
        rounds=args.rounds,
        seed=seed,
        devices_per_round=args.devices_per_round,
    )
    recipe = {
        key: getattr(args, key)
        for key in ("batch_size", "seq_len", "local_steps", "learning_rate", "threads")
    }
    return (
        JobConfig(job=job)
        .override(
            "train",
            target_modules="qv",
            ranks=tuple(args.ranks),
            uniform_rank=max(args.ranks),
            optimizer=args.optimizer,
            **recipe,
        )
        .override("data", dataset=args.dataset, max_test=16, alpha=args.alpha)
        .override("planner", calibration="none")
        .override("federation", server_optimizer="none")
    )


def measure_seed(args: argparse.Namespace, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per round ``(layer gains normalised to mean 1, rank shares)`` of one seed: the gains
    from the devices' measured loss decreases (the run's own rule)."""
    from legend.federation.adapters import ClientUpdate, init_global
    from legend.federation.core import ClientCore, ServerCore
    from legend.federation.runner import prepare

    cfg = build_config(args, seed)
    p = prepare(cfg, calibration=None)
    r_max = max(cfg.train.ranks)
    server = ServerCore(
        cfg,
        p.fleet,
        p.spec,
        calibration=None,
        global_state=init_global(p.spec, r_max, p.initial_head, seed=seed),
    )
    client = ClientCore(p.host, server.costs)
    energies, shares = [], []
    grid = tuple(cfg.train.ranks)
    for t in range(1, cfg.job.rounds + 1):
        plan = server.plan(t, server.select(t))
        # every layer, the ranks of the grid in turn across devices and layers, so that a
        # rank's effect is seen within each device and within each layer
        plan = dataclasses.replace(
            plan,
            devices=tuple(
                dataclasses.replace(
                    dp,
                    ranks=tuple(grid[(k + j) % len(grid)] for j in range(len(dp.layers))),
                )
                for k, dp in enumerate(plan.devices)
            ),
        )
        replies = [
            client.train(ins, p.fleet[ins.device_id], p.device_data[ins.device_id])
            for ins in server.instructions(t, plan)
        ]
        trained = [r for r in replies if r.state is not None]
        updates = [
            ClientUpdate(device_id=r.device_id, num_samples=r.num_samples, state=r.state)
            for r in trained
        ]
        signals = server.progress_model.signals(
            server.global_state, updates, [r.layer_decrease for r in trained]
        )
        e = np.asarray(signals.layer_measure)
        energies.append(e / np.nanmean(e))
        shares.append(np.asarray(signals.rank_decrease or signals.rank_share))
        server.finish_round(t, plan, replies)
    return np.asarray(energies), np.asarray(shares)


def main(argv: list[str] | None = None) -> int:
    set_offline_env()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--fleet", default=str(REPO_ROOT / "examples" / "fleet.csv"))
    parser.add_argument("--dataset", default="rotten_tomatoes")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--devices-per-round", type=int, default=10)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--learning-rate", type=float, default=0.5)
    parser.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write", action="store_true", help=f"store the prior in {PRIORS}")
    parser.add_argument("--smoke", action="store_true", help="tiny model, one round")
    args = parser.parse_args(argv)
    if args.smoke:
        args.model = "tiny-bert"
        args.fleet = str(REPO_ROOT / "examples" / "tiny_fleet.csv")
        args.seeds, args.rounds, args.devices_per_round = [0], 1, 3
        args.ranks, args.local_steps = [2, 4, 8], 2
        if args.write:
            parser.error("--smoke measures a random model; it cannot --write a prior")
    load = os.getloadavg()
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    started = time.perf_counter()
    per_seed_gain, per_seed_share = [], []
    for seed in args.seeds:
        energies, shares = measure_seed(args, seed)
        per_seed_gain.append(np.nanmean(energies, axis=0))
        per_seed_share.append(np.nanmean(shares, axis=0))
    gains = np.mean(per_seed_gain, axis=0)
    gains = gains / gains.mean()
    share = np.maximum.accumulate(np.mean(per_seed_share, axis=0))
    spread_g = np.std(per_seed_gain, axis=0)
    spread_s = np.std(per_seed_share, axis=0)
    print(f"host time {time.perf_counter() - started:.0f} s, seeds {args.seeds}")
    print("layer  gain   (std over seeds)")
    for layer, (g, s) in enumerate(zip(gains, spread_g, strict=True)):
        print(f"{layer:>5}  {g:.3f}  ({s:.3f})")
    print("rank   phi    (std over seeds)")
    for r, v, s in zip(args.ranks, share, spread_s, strict=True):
        print(f"{r:>5}  {v:.3f}  ({s:.3f})")
    entry = {
        "layer_gains": [round(float(g), 4) for g in gains],
        "rank_response": {
            str(r): round(float(v), 4) for r, v in zip(args.ranks, share, strict=True)
        },
        "source": (
            f"benchmarks/progress_prior.py --model {args.model} (seeds "
            f"{' '.join(map(str, args.seeds))}, {args.rounds} rounds, {args.devices_per_round} "
            f"devices, {args.dataset}, alpha {args.alpha}, {args.local_steps} local steps of "
            f"{args.optimizer} lr {args.learning_rate}, every layer, the ranks of the grid in turn)"
        ),
    }
    if args.write:
        data = json.loads(PRIORS.read_text()) if PRIORS.is_file() else {}
        data[args.model] = entry
        tmp = PRIORS.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, PRIORS)
        print(f"wrote the prior of {args.model} to {PRIORS}")
    else:
        print(json.dumps({args.model: entry}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
