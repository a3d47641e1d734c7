"""The files a Flower run adds to its run directory, and how they are written.

- ``flower_status.json``: the ServerApp's state (starting, querying, running, finished,
  failed with the error), so that the process that submitted a deployment run can report
  the outcome; written atomically.
- ``flower_nodes.csv``: one row per device and round (which node and process trained it,
  how many times that process loaded the base model).

The round records themselves (``rounds.csv``, ``devices.csv``, checkpoints) belong to the
run session, as for the in-process engine.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["NODES_FILE", "STATUS_FILE", "append_node_rows", "read_status", "write_status"]

STATUS_FILE = "flower_status.json"
NODES_FILE = "flower_nodes.csv"


def write_status(run_dir: Path, **status: Any) -> None:
    """Replace the run's status file with ``status`` plus this process's id and host."""
    path = run_dir / STATUS_FILE
    tmp = path.with_suffix(".tmp")
    record = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time(), **status}
    tmp.write_text(json.dumps(record))
    tmp.replace(path)


def read_status(run_dir: Path) -> dict[str, Any]:
    """The run's status, or ``{}`` when there is none (yet) or it cannot be read."""
    try:
        data = json.loads((run_dir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def append_node_rows(run_dir: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Append a round's rows to ``flower_nodes.csv`` (with a header when it is new)."""
    if not rows:
        return
    path = run_dir / NODES_FILE
    new = not path.exists()
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)
