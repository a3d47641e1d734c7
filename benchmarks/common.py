"""Helpers shared by the benchmark scripts: the 50-device fleet, output tables, statistics.

Every benchmark writes its rows as CSV and as a Markdown table into its output directory and
prints the command that reproduces it. Nothing here imports torch.
"""

from __future__ import annotations

import csv
import math
import os
import platform
import re
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
FLEET50_AP = BENCH_DIR / "fleet50_ap.toml"
FLEET50_AP_STAGGERED = BENCH_DIR / "fleet50_ap_staggered.toml"

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


# The classes of examples/fleet.csv (docs/cli.md, "The example fleet"), ten devices each:
# name, tflops, memory_gb, uplink_mbps, downlink_mbps, num_samples.
FLEET50_CLASSES = tuple(
    DeviceClass(
        name=name,
        count=10,
        tflops=tflops,
        memory_gb=memory,
        uplink_mbps=up,
        downlink_mbps=down,
        num_samples=samples,
    )
    for name, tflops, memory, up, down, samples in (
        ("phone-low", (0.05, 0.08), (2.0, 3.0), (2, 5), (10, 20), (60, 100)),
        ("phone", (0.12, 0.20), (3.0, 4.0), (8, 20), (40, 100), (80, 140)),
        ("tablet", (0.10, 0.15), (3.0, 4.0), (10, 20), (50, 100), (80, 140)),
        ("jetson", (0.5, 1.0), (4.0, 6.0), (20, 50), (50, 200), (100, 160)),
        ("laptop", (1.0, 2.0), (8.0, 16.0), (20, 100), (100, 500), (120, 180)),
    )
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


# The shared links of setting B: five access points, each serving two devices of every class
# (devices 1-2 of each class on ap-1, 3-4 on ap-2, ...), each with a capped backhaul to one
# core router, whose link to the server is capped too. A device's own link to its access
# point carries its profile's rates, so only the backhauls and the server link are shared.
FLEET50_AP_BACKHAUL_MBPS = (20.0, 40.0)  # up, down per access point
FLEET50_SERVER_MBPS = (50.0, 100.0)  # up, down of the server's link


def fleet50_ap_topology_toml(fleet_csv: str | None = None, contention: str = "together") -> str:
    """The text of ``benchmarks/fleet50_ap.toml`` (``contention="staggered"``:
    ``benchmarks/fleet50_ap_staggered.toml``) for the fleet ``fleet50_csv()``."""
    text = fleet50_csv() if fleet_csv is None else fleet_csv
    rows = [line.split(",") for line in text.strip().splitlines()[1:]]
    aps = sorted({(int(r[0].rsplit("-", 1)[1]) - 1) // 2 + 1 for r in rows})
    out = [
        "# Setting B of benchmarks/time_to_accuracy.py: benchmarks/fleet50.csv behind five",
        "# shared access points (two devices of every class each), their backhauls meeting at",
        "# one core router whose link to the server is capped. Written by",
        "# fleet50_ap_topology_toml() in benchmarks/common.py; a test checks it.",
        "",
    ]
    if contention != "together":
        out += [
            "# The exact planner models the shared links with uploads released as devices",
            "# finish computing (docs/topology.md, contention models).",
            f'contention = "{contention}"',
            "",
        ]
    out += [
        "[[nodes]]",
        'id = "core"',
        'kind = "router"',
        "",
    ]
    for ap in aps:
        out += ["[[nodes]]", f'id = "ap-{ap}"', 'kind = "access_point"', ""]
    up, down = FLEET50_SERVER_MBPS
    out += [
        "[[links]]",
        'a = "core"',
        'b = "server"',
        f"up_mbps = {up}",
        f"down_mbps = {down}",
        "latency_ms = 20.0",
        "",
    ]
    up, down = FLEET50_AP_BACKHAUL_MBPS
    for ap in aps:
        out += [
            "[[links]]",
            f'a = "ap-{ap}"',
            'b = "core"',
            f"up_mbps = {up}",
            f"down_mbps = {down}",
            "latency_ms = 10.0",
            "",
        ]
    for r in rows:
        device, ap = r[0], (int(r[0].rsplit("-", 1)[1]) - 1) // 2 + 1
        out += [
            "[[links]]",
            f'a = "{device}"',
            f'b = "ap-{ap}"',
            f"up_mbps = {float(r[4])}",
            f"down_mbps = {float(r[5])}",
            "latency_ms = 5.0",
            "",
        ]
    return "\n".join(out)


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
    return Spread(
        n=len(arr), mean=float(arr.mean()), std=std, lo=float(arr.min()), hi=float(arr.max())
    )


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
        numeric = any(
            isinstance(r.get(c), (int, float)) and not isinstance(r.get(c), bool) for r in rows
        )
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
    text = [
        f"# {title}",
        "",
        f"Reproduce: `{command}`  ",
        f"Host: {host_description()}; {stamp}",
        "",
    ]
    for block in blocks:
        text.append(block.rstrip() + "\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(text))
    return path


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_run_config(run: Path) -> Any:
    """A finished run's job (``config.toml``), its fleet and topology files verified.

    Each input file must have the SHA-256 the run recorded in ``inputs.json``. Where the
    recorded path is gone (the run was made from another checkout), a file of the same name
    under ``benchmarks/`` or ``examples/`` with that digest stands in for it; any other
    mismatch is an error naming the file and what to do."""
    import json

    from legend.federation.job import load_job

    inputs = json.loads((run / "inputs.json").read_text(encoding="utf-8"))
    overrides = {}
    for key in ("fleet", "topology"):
        entry = inputs.get(key)
        if not entry or not entry.get("path"):
            continue
        recorded, digest = Path(entry["path"]), entry["sha256"]
        candidates = [
            recorded,
            *(REPO_ROOT / d / recorded.name for d in ("benchmarks", "examples")),
        ]
        found = next((c for c in candidates if c.is_file() and _sha256(c) == digest), None)
        if found is None:
            raise SystemExit(
                f"{run / 'inputs.json'}: no {key} file with the run's SHA-256 {digest[:12]}... "
                f"at {recorded} or under benchmarks/ or examples/ ({recorded.name}); restore "
                "the file the run was made with"
            )
        overrides[f"job__{key}"] = str(found)
    return load_job(run / "config.toml", **overrides)


def run_checkpoints(run: Path) -> list[tuple[int, Path]]:
    """A run directory's global-state checkpoints (``checkpoints/round_NNNN.npz``, not the
    server optimizer's moments beside them) as ``(round, path)``, in round order."""
    out = []
    for path in (run / "checkpoints").glob("round_*.npz"):
        match = re.fullmatch(r"round_(\d+)\.npz", path.name)
        if match is not None:
            out.append((int(match.group(1)), path))
    return sorted(out)


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


# -- measuring one configuration in a fresh process ----------------------------------------

WORKER_FLAG = "--measure-config"


def measure_in_subprocess(
    payload: Mapping[str, Any], *, timeout_s: float = 3600.0
) -> dict[str, Any]:
    """Run :func:`measure_configs` in a fresh Python process and return its result."""
    import json
    import subprocess

    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": str(payload.get("threads", 1))}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), WORKER_FLAG, json.dumps(dict(payload))],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout_s,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"measuring {dict(payload)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    last = [line for line in proc.stdout.splitlines() if line.startswith("{")][-1]
    result: dict[str, Any] = json.loads(last)
    return result


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) of this process (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc), so the next baseline is honest."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure_configs(payload: Mapping[str, Any]) -> dict[str, Any]:
    """Train LoRA configurations of one model on this host and measure each.

    ``payload`` keys: ``model``; ``configs``, a list of ``[layers, ranks]``; ``batch_size``,
    ``seq_len``; ``steps`` (timed per configuration and pass), ``warmup`` (untimed steps
    after each adapter installation), ``passes`` (sweeps over the configurations, each in a
    fresh seeded order; the step time is the fastest and the median over all passes);
    ``learning_rate``, ``threads``, ``seed``; ``data``: ``"random"`` (one random token batch,
    for timing) or ``"rotten_tomatoes"`` (seeded batches of the train split, then an
    evaluation on ``max_test`` test examples after the last pass).

    The frozen base model is loaded once. Memory, read from ``/proc/self/status``:
    ``model_load_bytes``, the resident set size added by loading the model (libraries,
    data and autograd already started before), read after one untimed training step (the
    weights of a memory-mapped checkpoint become resident when first used); per
    configuration ``train_peak_bytes``, the peak resident set size while its adapter is
    installed and trained (``VmHWM``, reset just before) minus the resident set size just
    before (freed heap returned to the OS first), in the first pass. Step times are host
    wall clock of forward, backward and the AdamW update.
    """
    import gc
    import random

    import torch

    from legend.federation.adapters import init_global, slice_for
    from legend.federation.apply import AdapterHost
    from legend.models.loaders import load_base_model
    from legend.models.spec import get_model_spec
    from legend.planner.plan import DevicePlan
    from legend.planner.profiles import JobParams

    torch.set_num_threads(int(payload.get("threads", 1)))
    seed = int(payload.get("seed", 0))
    model_name = str(payload["model"])
    configs = [
        (tuple(int(v) for v in layers), tuple(int(v) for v in ranks))
        for layers, ranks in payload["configs"]
    ]
    batch_size, seq_len = int(payload["batch_size"]), int(payload["seq_len"])
    steps, warmup = int(payload["steps"]), int(payload.get("warmup", 1))
    passes = int(payload.get("passes", 1))
    data_kind = str(payload.get("data", "random"))
    spec = get_model_spec(model_name, target_modules="qv")
    grid = tuple(sorted({r for _, ranks in configs for r in ranks}))
    job = JobParams(batch_size=batch_size, seq_len=seq_len, target_modules="qv", ranks=grid)

    train = test = None
    if data_kind == "random":
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(1, spec.vocab_size, (batch_size, seq_len), generator=gen)
        fixed = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": torch.randint(0, spec.num_labels, (batch_size,), generator=gen),
        }
    else:
        from legend.federation.data import load_dataset
        from legend.federation.training import tokenize
        from legend.models.loaders import load_tokenizer

        ds = load_dataset(data_kind, seed=seed, max_test=int(payload.get("max_test", 500)))
        tok = load_tokenizer(model_name)
        train = tokenize(tok, ds.train_texts, ds.train_labels, seq_len)
        test = tokenize(tok, ds.test_texts, ds.test_labels, seq_len)
        del tok, ds
    # Load the code the model and PEFT need, and start autograd, before the baseline, so that
    # the measured increase is the model, its adapter and training, not library imports.
    import peft  # noqa: F401
    import transformers

    for cls in ("BertForSequenceClassification", "LlamaForSequenceClassification"):
        getattr(transformers, cls)
    probe = torch.ones(4, requires_grad=True)
    (probe * 2).sum().backward()
    del probe
    gc.collect()
    _malloc_trim()
    reset = _reset_peak_rss()
    rss_before = current_rss_bytes()
    base = load_base_model(model_name, num_labels=spec.num_labels, seed=seed)
    host = AdapterHost(base, spec, job)
    glob = init_global(spec, max(grid), host.initial_head(), seed=seed)
    # One untimed step of the first configuration: PEFT's and the optimizer's first-use
    # costs land here, not on whichever configuration happens to be measured first.
    first_layers, first_ranks = configs[0]
    first = DevicePlan(device_id="bench", layers=first_layers, ranks=first_ranks)
    with host.activate(first, slice_for(glob, first_layers, first_ranks)) as model:
        warm_batch = fixed if train is None else train.batch(np.arange(batch_size))
        warm_opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        model(**warm_batch).loss.backward()
        warm_opt.step()
        del warm_opt, warm_batch
    # Weights may be memory-mapped from the checkpoint and become resident only when first
    # used: the loaded model's memory is read after that first step, its adapter removed.
    gc.collect()
    _malloc_trim()
    model_load = current_rss_bytes() - rss_before

    results: dict[int, dict[str, Any]] = {
        i: {"layers": list(c[0]), "ranks": list(c[1]), "times": [], "losses": []}
        for i, c in enumerate(configs)
    }
    order = random.Random(seed)
    for sweep in range(passes):
        indices = list(range(len(configs)))
        if sweep > 0:
            order.shuffle(indices)
        for i in indices:
            layers, ranks = configs[i]
            res = results[i]
            rng = np.random.default_rng([seed, 11, i])
            gc.collect()
            _malloc_trim()
            reset = _reset_peak_rss()
            rss0 = current_rss_bytes()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                plan = DevicePlan(device_id="bench", layers=layers, ranks=ranks)
                state = res.get("state") or slice_for(glob, layers, ranks)
                with host.activate(plan, state) as model:
                    params = [p for p in model.parameters() if p.requires_grad]
                    res["trainable_params"] = sum(int(p.numel()) for p in params)
                    lr = float(payload.get("learning_rate", 1e-3))
                    optimizer = torch.optim.AdamW(params, lr=lr)
                    perm = rng.permutation(len(train)) if train is not None else None
                    cursor = 0
                    model.train()
                    for k in range(warmup + steps):
                        if train is not None and perm is not None:
                            if cursor + batch_size > len(perm):
                                perm, cursor = rng.permutation(len(train)), 0
                            batch = train.batch(perm[cursor : cursor + batch_size])
                            cursor += batch_size
                        else:
                            batch = fixed
                        start = time.perf_counter()
                        loss = model(**batch).loss
                        loss.backward()
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                        elapsed = time.perf_counter() - start
                        res["losses"].append(float(loss.detach()))
                        if k >= warmup:
                            res["times"].append(elapsed)
                    if sweep == 0:
                        peak = _status_kib("VmHWM") * 1024 if reset else peak_rss_bytes()
                        res["train_peak_bytes"] = peak - rss0
                        res["peak_reset"] = reset
                    if test is not None and sweep == passes - 1:
                        from legend.federation.training import evaluate

                        res["accuracy"], res["test_loss"] = evaluate(model, test, batch_size=64)
                    if passes > 1 and data_kind != "random":
                        res["state"] = host.extract()  # keep training across passes
                    del optimizer, params
    out = []
    for i in range(len(configs)):
        res = results[i]
        res.pop("state", None)
        times = np.asarray(res.pop("times"))
        losses = res.pop("losses")
        res.update(
            step_fastest_s=float(times.min()),
            step_median_s=float(np.median(times)),
            timed_steps=len(times),
            train_loss_last=float(np.mean(losses[-min(20, len(losses)) :])),
        )
        out.append(res)
    return {
        "model": model_name,
        "model_load_bytes": model_load,
        "threads": torch.get_num_threads(),
        "results": out,
    }


if __name__ == "__main__":
    import json

    if len(sys.argv) == 3 and sys.argv[1] == WORKER_FLAG:
        set_offline_env()
        print(json.dumps(measure_configs(json.loads(sys.argv[2]))), flush=True)
    else:
        print(f"usage: {sys.argv[0]} {WORKER_FLAG} JSON (used by the benchmark scripts)")
        raise SystemExit(2)
