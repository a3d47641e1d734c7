"""Run many ``legend`` command lines in one process (the entry point the console script calls).

Usage: ``python refusals_driver.py CASES.json RESULTS.json``. ``CASES.json`` lists
``{"name", "cwd", "argv"}``; for each case the driver records the exit status, stdout,
stderr, a traceback if anything escaped ``main`` (it must not), and the SHA-256 of every
file under ``cwd`` before and after the command. Sharing one process keeps the torch and
transformers imports to one, so a hundred bad inputs take seconds each at most.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
import time
import traceback
from pathlib import Path


def _tree(root: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def main() -> None:
    from legend.federation.cli import main as legend

    cases = json.loads(Path(sys.argv[1]).read_text())
    results = {}
    for case in cases:
        cwd = Path(case["cwd"])
        before = _tree(cwd)
        out, err = io.StringIO(), io.StringIO()
        os.chdir(cwd)
        started = time.perf_counter()
        code, crash = None, ""
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = legend(case["argv"])
            except BaseException:
                crash = traceback.format_exc()
        results[case["name"]] = {
            "code": code,
            "stdout": out.getvalue(),
            "stderr": err.getvalue(),
            "traceback": crash,
            "before": before,
            "after": _tree(cwd),
            "seconds": time.perf_counter() - started,
        }
    Path(sys.argv[2]).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
