"""legend's node worker: runs the ClientApp of SuperNodes, keeping the model loaded.

Flower's deployment runtime starts a new ``flwr-clientapp`` process for every message, so
the frozen base model would be loaded for every message (``docs/flower.md`` gives the
cost). The worker serves one or more SuperNodes started with ``--isolation process``: it
polls their Runtime API for ClientApp tasks and runs each in this process with
:data:`~legend.federation.flower.client_app.client_app`, whose job cache then lives as long
as the worker. Start it with ``python -m legend.federation.flower node --supernode
HOST:PORT [...]``. The task protocol itself is in
:mod:`~legend.federation.flower.flwr_internals`.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from collections.abc import Sequence
from typing import Any

from legend.federation.flower import flwr_internals
from legend.federation.flower.client_app import client_app

__all__ = ["main", "serve_nodes"]

log = logging.getLogger("legend.federation")


def serve_nodes(
    addresses: Sequence[str],
    *,
    insecure: bool = True,
    root_certificates: str | None = None,
    poll_interval_s: float = 0.2,
    give_up_after_s: float = 30.0,
    task_input_wait_s: float = 120.0,
    stop: threading.Event | None = None,
) -> None:
    """Run ClientApp tasks of SuperNodes in this process, keeping the model cached.

    Each address is the Runtime API (``--port``) of a SuperNode started with
    ``--isolation process``. The worker polls them in turn for a ClientApp task and runs it
    here, so the frozen base model and the data shares are loaded once and reused across
    rounds and across the SuperNodes it serves. A SuperNode that stays unreachable for
    ``give_up_after_s`` is dropped; the worker returns when none is left (or on ``stop``).

    A task whose message the SuperNode dropped half-received (its run was stopped, e.g. a
    killed ServerApp) is abandoned as soon as the SuperNode has a newer task, or after
    ``task_input_wait_s`` (see :func:`~legend.federation.flower.flwr_internals.run_task`),
    so that it cannot block the worker and the next run.
    """
    flwr_internals.check_version()
    stop = stop or threading.Event()
    pollers = {a: flwr_internals.runtime_client(a, insecure, root_certificates) for a in addresses}
    last_ok = dict.fromkeys(addresses, time.monotonic())
    while pollers and not stop.is_set():
        busy = False
        for address in list(pollers):
            try:
                token = flwr_internals.acquire_task(pollers[address]) or ""
            except Exception as exc:  # SuperNode gone or restarting
                if time.monotonic() - last_ok[address] > give_up_after_s:
                    log.warning("SuperNode at %s unreachable (%s); no longer served", address, exc)
                    pollers.pop(address).close()
                continue
            last_ok[address] = time.monotonic()
            while token:
                busy = True

                def acquire(poller: Any = pollers[address]) -> str | None:
                    return flwr_internals.acquire_task(poller)

                try:
                    token = (
                        flwr_internals.run_task(
                            client_app,
                            address,
                            token,
                            insecure,
                            root_certificates,
                            acquire=acquire,
                            max_wait_s=task_input_wait_s,
                        )
                        or ""
                    )
                except Exception:
                    log.exception("task of the SuperNode at %s failed", address)
                    token = ""
        if not busy:
            stop.wait(poll_interval_s)
    for poller in pollers.values():
        poller.close()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m legend.federation.flower node ...``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m legend.federation.flower",
        description="legend's node worker: runs the ClientApp of SuperNodes started with "
        "--isolation process, keeping the model loaded across rounds.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    node = sub.add_parser("node", help="serve one or more SuperNodes")
    node.add_argument(
        "--supernode",
        action="append",
        required=True,
        metavar="HOST:PORT",
        help="Runtime API address of a SuperNode (its --port); repeat to serve several",
    )
    node.add_argument("--root-certificates", default=None, help="CA of the Runtime API (TLS)")
    node.add_argument("--give-up-after-s", type=float, default=30.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    stop = threading.Event()

    def _stop(_signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    serve_nodes(
        args.supernode,
        insecure=args.root_certificates is None,
        root_certificates=args.root_certificates,
        give_up_after_s=args.give_up_after_s,
        stop=stop,
    )
    return 0
