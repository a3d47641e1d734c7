"""What a Flower train message costs a node: a fresh process per message vs the node worker.

Flower's deployment runtime (public API only) runs the ClientApp in a new ``flwr-clientapp``
process for every message, so each message pays for the interpreter, the imports, loading
the frozen base model, the data share and its tokenization before it trains. legend's node
worker runs the same ClientApp in one long-lived process, so only its first message pays
for loading. This script measures both with legend's real ClientApp on the same train
message (one device of the job's fleet, its top layers at rank 8):

- ``per-message process``: ``--messages`` fresh Python processes, each importing the
  ClientApp and handling one message; wall time from spawn to exit (the process start that
  Flower adds on top, and its transport, are not included: a lower bound for that route).
- ``long-lived worker``: one process handling ``--messages`` messages in a row; the first
  includes the process start and the load, the others only train.

    python benchmarks/flower_model_load.py                     # MiniLM quickstart job
    python benchmarks/flower_model_load.py --job examples/tiny.toml --messages 3

Prints a table and writes it as JSON next to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _prepare(job_path: Path, out: Path) -> dict[str, Any]:
    """Build one train message's parts (instruction, job payload, node config) and pickle them."""
    from legend.federation.adapters import init_global, slice_for
    from legend.federation.apply import AdapterHost
    from legend.federation.core import ClientInstruction
    from legend.federation.flower.codec import job_payload
    from legend.federation.job import load_job
    from legend.federation.runner import load_job_data
    from legend.planner.profiles import load_fleet

    cfg = load_job(job_path, planner__calibration="none")
    fleet = load_fleet(cfg.job.fleet)
    data = load_job_data(cfg, fleet)
    host = AdapterHost(data.base, data.spec, cfg.job_params)
    rank = min(8, max(cfg.train.ranks))
    global_state = init_global(data.spec, rank, host.initial_head(), seed=cfg.job.seed)
    layers = tuple(range(data.spec.num_layers - 2, data.spec.num_layers))
    device = fleet.devices[0]
    instruction = ClientInstruction(
        round=1,
        device_id=device.device_id,
        device_index=0,
        layers=layers,
        ranks=(rank,) * len(layers),
        init_state=slice_for(global_state, layers, (rank,) * len(layers)),
        local_steps=cfg.train.local_steps,
        batch_size=cfg.train.batch_size,
        learning_rate=cfg.train.learning_rate,
        weight_decay=cfg.train.weight_decay,
        loss=cfg.train.loss,
        optimizer=cfg.train.optimizer,
        freeze_a=False,
        seed=(cfg.job.seed, 1, 0, 0),
        fault=None,
    )
    parts = {
        "instruction": instruction,
        "payload": dict(job_payload(cfg, fleet, None)),
        "node_config": {"device-id": device.device_id},
    }
    path = out / "message.pkl"
    path.write_bytes(pickle.dumps(parts))
    return {"model": cfg.job.model, "device": device.device_id, "layers": layers, "rank": rank}


def _serve(parts_path: str, messages: int) -> None:
    """Child process: handle ``messages`` train messages with legend's ClientApp."""
    start = time.perf_counter()
    from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict

    from legend.federation.flower.client_app import client_app
    from legend.federation.flower.codec import instruction_to_record

    imported = time.perf_counter() - start
    parts = pickle.loads(Path(parts_path).read_bytes())
    context = Context(
        run_id=1, node_id=1, node_config=parts["node_config"], state=RecordDict(), run_config={}
    )
    times = []
    for _ in range(messages):
        content = instruction_to_record(parts["instruction"], ConfigRecord(parts["payload"]))
        # As delivered to a node (a message built here outside a Flower task needs metadata).
        metadata = Metadata(
            run_id=1,
            message_id=f"bench-{len(times)}",
            src_node_id=0,
            dst_node_id=1,
            reply_to_message_id="",
            group_id="1",
            created_at=time.time(),
            ttl=600.0,
            message_type="train",
        )
        message = Message(content=content, metadata=metadata)
        t0 = time.perf_counter()
        reply = client_app(message=message, context=context)
        times.append(time.perf_counter() - t0)
        if reply.has_error():
            raise SystemExit(f"the ClientApp failed: {reply.error.reason}")
    print(json.dumps({"import_s": imported, "handle_s": times}))


def _child(parts_path: Path, messages: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    result = subprocess.run(
        [sys.executable, __file__, "--child", str(parts_path), "--messages", str(messages)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    wall = time.perf_counter() - t0
    if result.returncode != 0:
        raise SystemExit(f"child failed:\n{result.stderr[-3000:]}")
    data = json.loads(result.stdout.strip().splitlines()[-1])
    data["wall_s"] = wall
    return dict(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", type=Path, default=ROOT / "examples" / "quickstart.toml")
    parser.add_argument("--messages", type=int, default=4)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "flower_model_load.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _serve(args.child, args.messages)
        return 0
    with tempfile.TemporaryDirectory(prefix="legend-bench-") as tmp:
        info = _prepare(args.job, Path(tmp))
        parts = Path(tmp) / "message.pkl"
        fresh = [_child(parts, 1) for _ in range(args.messages)]
        worker = _child(parts, args.messages)
    per_process = [r["wall_s"] for r in fresh]
    warm = worker["handle_s"][1:]
    first = worker["wall_s"] - sum(warm)
    result = {
        **info,
        "messages": args.messages,
        "per_message_process_wall_s": per_process,
        "per_message_process_import_s": [r["import_s"] for r in fresh],
        "per_message_process_handle_s": [r["handle_s"][0] for r in fresh],
        "worker_first_message_s": first,
        "worker_later_messages_s": warm,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    med = statistics.median
    print(f"model {info['model']}, device {info['device']}, layers {info['layers']} at rank 8")
    print(f"{'route':<34} {'per message (median)':>22}")
    print(f"{'per-message process (wall)':<34} {med(per_process):>20.2f} s")
    print(f"{'  of which imports':<34} {med(result['per_message_process_import_s']):>20.2f} s")
    print(f"{'  of which load + train':<34} {med(result['per_message_process_handle_s']):>20.2f} s")
    print(f"{'long-lived worker, first message':<34} {first:>20.2f} s")
    if warm:
        print(f"{'long-lived worker, later messages':<34} {med(warm):>20.2f} s")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
