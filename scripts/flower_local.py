#!/usr/bin/env python
"""Start (and stop, by process id) a Flower SuperLink and N SuperNodes on 127.0.0.1.

For trying ``legend run JOB.toml --engine flower-deploy`` on one machine::

    python scripts/flower_local.py start --fleet examples/tiny_fleet.csv --state-dir /tmp/fl
    legend run examples/tiny.toml --engine flower-deploy --superlink 127.0.0.1:PORT
    python scripts/flower_local.py stop --state-dir /tmp/fl

``start`` starts a SuperLink (``--insecure --disable-runtime-dependency-installation``,
free port), one SuperNode per device of the fleet (``--isolation process``, node config
``device-id="..."``) and ``--workers`` legend node workers that run the ClientApp tasks
with the model kept in memory; it writes the process ids to ``STATE_DIR/federation.json``
and prints the SuperLink address. ``stop`` stops exactly those processes (and any
process they started) by id. ``up`` does both: it runs until Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path

from legend.federation.flower_engine import (
    descendants,
    pid_alive,
    start_local_federation,
)
from legend.planner.profiles import load_fleet

_MARKERS = ("flower-superlink", "flower-supernode", "legend.federation.flower node")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _start(args: argparse.Namespace, *, detach: bool) -> int:
    fleet = load_fleet(args.fleet)
    ids = list(fleet.device_ids[: args.nodes] if args.nodes else fleet.device_ids)
    fed = start_local_federation(ids, state_dir=args.state_dir, workers=args.workers, detach=detach)
    state = Path(args.state_dir) / "federation.json"
    state.write_text(fed.to_json())
    print(f"SuperLink: {fed.address}  ({len(ids)} SuperNodes, {len(fed.workers)} workers)")
    print(f"process ids in {state}; logs in {fed.state_dir}")
    print(f"run: legend run JOB.toml --engine flower-deploy --superlink {fed.address}")
    if detach:
        return 0
    print("Ctrl-C stops everything")
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        fed.stop()
        state.unlink(missing_ok=True)
        print("stopped")
    return 0


def _stop(args: argparse.Namespace) -> int:
    state = Path(args.state_dir) / "federation.json"
    if not state.is_file():
        print(f"nothing to stop: {state} does not exist", file=sys.stderr)
        return 1
    data = json.loads(state.read_text())
    pids = data["pids"]
    ordered = [*pids["workers"], *pids["nodes"].values(), pids["superlink"]]
    # Only processes that are still ours (a pid may have been reused since).
    ours = [p for p in ordered if pid_alive(p) and any(m in _cmdline(p) for m in _MARKERS)]
    children = [c for p in ours for c in descendants(p)]
    for group in (ours, children):
        for pid in group:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(pid_alive(p) for p in group):
            time.sleep(0.1)
        for pid in group:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
    state.unlink()
    print(f"stopped {len(ours)} processes ({len(children)} helpers)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("start", "up"):
        p = sub.add_parser(name, help=f"{name} a local SuperLink and SuperNodes")
        p.add_argument("--fleet", default="examples/tiny_fleet.csv", help="one node per device")
        p.add_argument("--nodes", type=int, default=0, help="only the first N devices")
        p.add_argument("--workers", type=int, default=2, help="legend node worker processes")
        p.add_argument("--state-dir", default=".flower-local", help="logs and process ids")
    p = sub.add_parser("stop", help="stop the processes recorded in STATE_DIR")
    p.add_argument("--state-dir", default=".flower-local")
    args = parser.parse_args(argv)
    if args.command == "stop":
        return _stop(args)
    if args.nodes < 0 or args.workers < 1:
        parser.error("--nodes must be >= 0 and --workers >= 1")
    return _start(args, detach=args.command == "start")


if __name__ == "__main__":
    sys.exit(main())
