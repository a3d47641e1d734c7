"""Helpers shared by the benchmark scripts: the 50-device fleet, output tables, statistics.

Every benchmark writes its rows as CSV and as a Markdown table into its output directory and
prints the command that reproduces it. Nothing here imports torch.
"""

from __future__ import annotations

import csv
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
FLEET50 = BENCH_DIR / "fleet50.csv"

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "FLWR_TELEMETRY_ENABLED": "0",
}


def set_offline_env() -> None:
    """Nothing is downloaded at run time: the model and the data ship as packages."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


# -- the 50-device fleet ------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DeviceClass:
    """Ranges one device class is drawn from (log-uniform for throughput and links)."""

    name: str
    count: int
    tflops: tuple[float, float]
    memory_gb: tuple[float, float]
    uplink_mbps: tuple[float, float]
    downlink_mbps: tuple[float, float]
    num_samples: tuple[int, int]


# The classes of examples/fleet.csv (docs/cli.md, "The example fleet"), ten devices each.
FLEET50_CLASSES = (
    DeviceClass(
        name="phone-low",
        count=10,
        tflops=(0.05, 0.08),
        memory_gb=(2.0, 3.0),
        uplink_mbps=(2, 5),
        downlink_mbps=(10, 20),
        num_samples=(60, 100),
    ),
    DeviceClass(
        name="phone",
        count=10,
        tflops=(0.12, 0.20),
        memory_gb=(3.0, 4.0),
        uplink_mbps=(8, 20),
        downlink_mbps=(40, 100),
        num_samples=(80, 140),
    ),
    DeviceClass(
        name="tablet",
        count=10,
        tflops=(0.10, 0.15),
        memory_gb=(3.0, 4.0),
        uplink_mbps=(10, 20),
        downlink_mbps=(50, 100),
        num_samples=(80, 140),
    ),
    DeviceClass(
        name="jetson",
        count=10,
        tflops=(0.5, 1.0),
        memory_gb=(4.0, 6.0),
        uplink_mbps=(20, 50),
        downlink_mbps=(50, 200),
        num_samples=(100, 160),
    ),
    DeviceClass(
        name="laptop",
        count=10,
        tflops=(1.0, 2.0),
        memory_gb=(8.0, 16.0),
        uplink_mbps=(20, 100),
        downlink_mbps=(100, 500),
        num_samples=(120, 180),
    ),
)
FLEET50_SEED = 2412
FLEET_COLUMNS = (
    "device_id",
    "device_class",
    "tflops",
    "memory_gb",
    "uplink_mbps",
    "downlink_mbps",
    "num_samples",
    "local_steps",
)


def fleet50_csv(seed: int = FLEET50_SEED) -> str:
    """The text of ``benchmarks/fleet50.csv``: ten devices per class, drawn with ``seed``."""
    rng = np.random.default_rng(seed)

    def log_uniform(lo: float, hi: float) -> float:
        return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))

    lines = [",".join(FLEET_COLUMNS)]
    for c in FLEET50_CLASSES:
        for i in range(1, c.count + 1):
            tflops = log_uniform(*c.tflops)
            memory = rng.uniform(*c.memory_gb)
            up = log_uniform(*c.uplink_mbps)
            down = log_uniform(*c.downlink_mbps)
            samples = int(rng.integers(c.num_samples[0], c.num_samples[1] + 1))
            lines.append(
                f"{c.name}-{i},{c.name},{tflops:.3f},{memory:.1f},{up:.1f},{down:.0f},{samples},"
            )
    return "\n".join(lines) + "\n"


# -- statistics ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Spread:
    """Mean, sample standard deviation, minimum and maximum of finite values."""

    n: int
    mean: float
    std: float
    lo: float
    hi: float

    def fmt(self, spec: str = ".3g", *, unit: str = "") -> str:
        if self.n == 0:
            return "-"
        if self.n == 1:
            return f"{self.mean:{spec}}{unit}"
        return f"{self.mean:{spec}} ± {self.std:{spec}}{unit}"


def spread(values: Iterable[float | None]) -> Spread:
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        return Spread(n=0, mean=math.nan, std=math.nan, lo=math.nan, hi=math.nan)
    arr = np.asarray(finite)
    std = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
    return Spread(n=len(arr), mean=float(arr.mean()), std=std, lo=float(arr.min()), hi=float(arr.max()))


# -- output -------------------------------------------------------------------------------

Formatter = Callable[[Any], str]


def _default_format(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.4g}"
    return str(value)


def markdown_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    *,
    headers: Mapping[str, str] | None = None,
    formats: Mapping[str, Formatter] | None = None,
) -> str:
    """A GitHub Markdown table of ``rows`` (numbers right-aligned)."""
    headers = headers or {}
    formats = formats or {}
    head = "| " + " | ".join(headers.get(c, c) for c in columns) + " |"
    align = []
    for c in columns:
        numeric = any(isinstance(r.get(c), (int, float)) and not isinstance(r.get(c), bool) for r in rows)
        align.append("---:" if numeric else "---")
    lines = [head, "|" + "|".join(align) + "|"]
    for r in rows:
        cells = [formats.get(c, _default_format)(r.get(c)) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({c: _csv_value(r.get(c)) for c in columns})
    return path


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    if isinstance(value, (tuple, list)):
        return " ".join(str(v) for v in value)
    return value


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def reproduce_command(script: str, argv: Sequence[str] | None) -> str:
    """The shell command that reruns ``script`` with these arguments, from the repo root."""
    args = list(sys.argv[1:] if argv is None else argv)
    return shlex.join([".venv/bin/python", f"benchmarks/{script}", *args])


def host_description() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def write_markdown(path: Path, title: str, blocks: Sequence[str], command: str) -> Path:
    """``# title``, the blocks, and how to reproduce; returns the path."""
    stamp = time.strftime("%Y-%m-%d %H:%M")
    text = [f"# {title}", "", f"Reproduce: `{command}`  ", f"Host: {host_description()}; {stamp}", ""]
    for block in blocks:
        text.append(block.rstrip() + "\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(text))
    return path


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (``getrusage``; Linux reports KiB)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if platform.system() == "Darwin" else peak * 1024)


def current_rss_bytes() -> int:
    """This process's resident set size now (``/proc/self/statm``; 0 where unavailable)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")
