"""The HiGHS worker process of :mod:`legend.planner.backends` (``python -m`` this module).

It reads length-prefixed pickles of ``(MILP, SolveLimits)`` from stdin, solves each with
HiGHS and writes the length-prefixed pickled result to stdout, until stdin ends. The parent
stops it when a solve overruns its time limit.
"""

from __future__ import annotations

import os
import pickle
import sys

from legend.planner.backends import _failed, _highs_here, _read


def main() -> None:
    # the protocol keeps its own copy of stdout; what HiGHS prints (its banner) goes to
    # stderr, which the parent discards
    stdin = sys.stdin.buffer
    stdout = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    while True:
        try:
            size = int.from_bytes(_read(stdin, 8), "little")
        except EOFError:
            return
        milp, limits = pickle.loads(_read(stdin, size))
        try:
            result = _highs_here(milp, limits)
        except Exception as exc:  # report, never leave the parent waiting
            result = _failed(f"{type(exc).__name__}: {exc}")
        data = pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
        stdout.write(len(data).to_bytes(8, "little") + data)
        stdout.flush()


if __name__ == "__main__":
    main()
