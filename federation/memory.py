"""Peak training memory of LoRA configurations, measured on the host, and its affine fit.

What is measured
    One configuration (LoRA on ``layers`` at ``ranks``) is trained for a few AdamW steps on a
    random token batch in a **fresh Python process**. Its memory is that process's peak
    resident set size (``VmHWM`` in ``/proc/self/status``) minus its resident set size
    after importing torch, transformers and PEFT and starting autograd (the runtime, which a
    device's ``memory_gb``, "memory available to training", does not include). The peak
    covers loading the model, installing the adapter, and the steps (from the second step on
    the AdamW moments exist and the peak stops growing; three steps are the default). On a
    CUDA device the process's peak of the caching allocator's reserved memory is used
    instead (``torch.cuda.max_memory_reserved``).

Why this measure
    On CPU torch has no allocator statistics. ``tracemalloc`` sees only Python objects
    (about 3 MB for MiniLM at depth 6, rank 16). ``torch.profiler`` with
    ``profile_memory=True`` sees tensor allocations (about 126 MB above the loaded model for
    that configuration) but not what the C heap keeps around them, nor library workspaces,
    while the operating system has to supply about 390 MB. The peak resident set size is
    what a device must have; a fresh process per configuration keeps heap left over by
    one configuration from landing on the next.

The fit
    :func:`fit_memory_bound` fits ``memory = static + d * per_layer + S * per_rank`` (``d``
    layers that backward runs through, ``S`` the rank sum; the planner enumerates
    configurations by exactly these two numbers) as the tightest affine **upper bound** of
    the measurements: a linear program minimising the total over-prediction subject to
    predicting no measurement low, with non-negative coefficients, then raised by a
    leave-one-out headroom for the configurations that were not measured, and by the
    measurement noise: a few configurations are measured twice, in separate fresh
    processes, and the largest difference between the two peaks is added as well (the same
    configuration differs by several MB, sometimes 10% and more, between processes, because
    the C heap is laid out differently each time; a bound fitted through neighbours that
    happened to measure low would otherwise be exceeded by a configuration that measures
    high). Memory is a hard constraint (C6), so the fit errs high rather than through the
    middle.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from legend.federation.errors import FederationInputError

__all__ = [
    "MEMORY_METHOD",
    "MemoryFit",
    "MemorySample",
    "fit_memory_bound",
    "measure_peak_memory",
    "measurement_noise",
]

MEMORY_METHOD = (
    "peak resident set size (VmHWM) of a fresh process per configuration, above the process "
    "after importing torch, transformers and peft; model load, adapter and {steps} AdamW steps"
)
MEMORY_METHOD_CUDA = (
    "peak reserved CUDA memory (torch.cuda.max_memory_reserved) of a fresh process per "
    "configuration; model load, adapter and {steps} AdamW steps"
)

_WORKER_FLAG = "--measure-peak-memory"


@dataclass(frozen=True, kw_only=True)
class MemorySample:
    """One measured configuration: top ``depth`` layers at ``rank`` each."""

    depth: int
    rank: int
    peak_bytes: float
    predicted_bytes: float

    @property
    def rel_error(self) -> float:
        """``(predicted - measured) / measured``; never negative for the fitted samples."""
        return (self.predicted_bytes - self.peak_bytes) / self.peak_bytes


@dataclass(frozen=True, kw_only=True)
class MemoryFit:
    """``memory = static + depth * per_layer + rank_sum * per_rank``; ``static`` includes
    ``headroom``: the leave-one-out allowance for configurations that were not measured
    plus ``noise``, the largest difference between two measurements of one configuration."""

    static: float
    per_layer: float
    per_rank: float
    headroom: float
    noise: float = 0.0

    def predict(self, depth: int, rank_sum: int) -> float:
        return self.static + depth * self.per_layer + rank_sum * self.per_rank


def _upper_bound(samples: Sequence[tuple[int, int, float]]) -> tuple[float, float, float]:
    import numpy as np
    from scipy.optimize import linprog

    design = np.array([[1.0, float(d), float(s)] for d, s, _ in samples])
    measured = np.array([float(m) for _, _, m in samples])
    # Scale columns and bytes to O(1) for the solver.
    col = np.maximum(np.abs(design).max(axis=0), 1.0)
    unit = max(float(measured.max()), 1.0)
    a = design / col
    result = linprog(
        c=a.sum(axis=0),
        A_ub=-a,
        b_ub=-measured / unit,
        bounds=[(0.0, None)] * 3,
        method="highs",
    )
    if not result.success:  # pragma: no cover - feasible and bounded by construction
        raise FederationInputError(f"the memory fit failed: {result.message}")
    static, per_layer, per_rank = (float(v) for v in result.x / col * unit)
    # The solver's tolerance may leave a prediction a hair below its measurement.
    shortfall = float(np.max(measured - design @ np.array([static, per_layer, per_rank])))
    return static + max(0.0, shortfall), per_layer, per_rank


def fit_memory_bound(samples: Sequence[tuple[int, int, float]], *, noise: float = 0.0) -> MemoryFit:
    """The tightest affine upper bound ``static + depth * per_layer + rank_sum * per_rank``,
    raised by a leave-one-out headroom and by the measurement ``noise``.

    ``samples`` are ``(depth, rank sum, measured bytes)``. The bound minimises the summed
    over-prediction subject to every prediction being at least its measurement, with all
    three coefficients ``>= 0``. Peak resident memory depends a little on how the C heap
    happens to be laid out for each shape (a few MB either way), so a configuration that
    was not measured can exceed a bound fitted through its neighbours. The headroom
    estimates that from the measurements themselves: each sample is left out in turn, the
    bound is fitted to the others, and the largest amount by which it under-predicts the
    left-out sample is added to ``static`` (zero when every left-out sample is covered).
    This is the jackknife form of a conformal bound: for a configuration whose peak is
    exchangeable with the ``n`` measured ones, the bound holds with probability at least
    ``n / (n + 1)``; more measured configurations give a safer bound.

    The jackknife sees each configuration once, so it cannot tell a neighbourhood that
    measured low by chance. ``noise`` (bytes, ``>= 0``: the largest difference between two
    fresh measurements of one configuration, see :func:`measurement_noise`) is added on top:
    the peaks the bound passes through may each be up to that much below what the same
    configurations reach in another process.
    """
    if not math.isfinite(noise) or noise < 0:
        raise FederationInputError(f"`noise` must be a finite number >= 0, got {noise!r}")
    if len(samples) < 3:
        raise FederationInputError(f"the fit needs at least three samples, got {len(samples)}")
    static, per_layer, per_rank = _upper_bound(samples)
    headroom = 0.0
    if len(samples) > 3:
        for i, (d, s, m) in enumerate(samples):
            c, a, b = _upper_bound([x for j, x in enumerate(samples) if j != i])
            headroom = max(headroom, m - (c + d * a + s * b))
    headroom += noise
    return MemoryFit(
        static=static + headroom,
        per_layer=per_layer,
        per_rank=per_rank,
        headroom=headroom,
        noise=noise,
    )


def measurement_noise(first: Sequence[float], second: Sequence[float]) -> float:
    """The largest difference between two measurements of the same configurations
    (``first[k]`` and ``second[k]`` measured in separate fresh processes)."""
    if len(first) != len(second) or not first:
        raise FederationInputError(
            "measurement noise needs the same configurations measured twice, got "
            f"{len(first)} and {len(second)} measurements"
        )
    return max(abs(float(a) - float(b)) for a, b in zip(first, second, strict=True))


def measure_peak_memory(
    model: str,
    configs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int,
    seq_len: int,
    target_modules: str | Sequence[str] = "qv",
    steps: int = 3,
    seed: int = 0,
    device: str = "cpu",
    threads: int | None = None,
    timeout_s: float = 900.0,
) -> list[float]:
    """Peak memory in bytes of training each ``(layers, ranks)`` configuration, each in a
    fresh process (see the module docstring for what is counted)."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise FederationInputError(f"`steps` must be an integer >= 1, got {steps!r}")
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": str(threads),
    }
    peaks = []
    for layers, ranks in configs:
        payload = {
            "model": model,
            "layers": [int(v) for v in layers],
            "ranks": [int(v) for v in ranks],
            "batch_size": batch_size,
            "seq_len": seq_len,
            "target_modules": target_modules
            if isinstance(target_modules, str)
            else list(target_modules),
            "steps": steps,
            "seed": seed,
            "device": device,
            "threads": threads,
        }
        proc = subprocess.run(
            [sys.executable, "-m", "legend.federation.memory", _WORKER_FLAG, json.dumps(payload)],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout_s,
            check=False,
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            raise FederationInputError(
                f"measuring the memory of layers {payload['layers']} at ranks "
                f"{payload['ranks']} failed (exit {proc.returncode}): {proc.stderr[-2000:]}"
            )
        peaks.append(float(json.loads(lines[-1])["peak_bytes"]))
    return peaks


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise FederationInputError(f"/proc/self/status has no {field}")  # pragma: no cover


def _measure_one(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The worker: runs in a fresh process (``python -m legend.federation.memory``)."""
    import ctypes
    import gc

    import peft  # noqa: F401 - imported before the baseline, like everything the run needs
    import torch
    import transformers  # noqa: F401

    from legend.federation.adapters import init_global, slice_for
    from legend.federation.apply import AdapterHost
    from legend.models.loaders import load_base_model
    from legend.models.spec import get_model_spec
    from legend.planner.plan import DevicePlan
    from legend.planner.profiles import JobParams

    torch.set_num_threads(int(payload["threads"]))
    device = torch.device(str(payload["device"]))
    cuda = device.type == "cuda"
    modules = payload["target_modules"]
    modules = modules if isinstance(modules, str) else tuple(modules)
    spec = get_model_spec(str(payload["model"]), target_modules=modules)
    layers = tuple(int(v) for v in payload["layers"])
    ranks = tuple(int(v) for v in payload["ranks"])
    batch_size, seq_len = int(payload["batch_size"]), int(payload["seq_len"])
    seed = int(payload["seed"])
    job = JobParams(
        batch_size=batch_size, seq_len=seq_len, target_modules=modules, ranks=sorted(set(ranks))
    )
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, spec.vocab_size, (batch_size, seq_len), generator=gen)
    labels = torch.randint(0, spec.num_labels, (batch_size,), generator=gen)
    # Start autograd and the optimizer code before the baseline.
    probe = torch.ones(4, requires_grad=True)
    torch.optim.AdamW([probe]).zero_grad()
    (probe * 2).sum().backward()
    del probe
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    if cuda:
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats(device)
        baseline = 0
    else:
        with contextlib.suppress(OSError):  # kernels before 4.0 cannot reset the peak
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        baseline = _status_bytes("VmRSS")
    torch.manual_seed(seed)
    base = load_base_model(str(payload["model"]), num_labels=spec.num_labels, seed=seed)
    base = base.to(device)
    host = AdapterHost(base, spec, job)
    glob = init_global(spec, max(ranks), host.initial_head(), seed=seed)
    state = slice_for(glob, layers, ranks)
    del glob
    batch = {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "labels": labels.to(device),
    }
    plan = DevicePlan(device_id="memory", layers=layers, ranks=ranks)
    with host.activate(plan, state) as peft_model:
        optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad])
        peft_model.train()
        for _ in range(int(payload["steps"])):
            loss = peft_model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
            peak = int(torch.cuda.max_memory_reserved(device))
        else:
            peak = _status_bytes("VmHWM") - baseline
    return {"peak_bytes": peak, "baseline_bytes": baseline}


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == _WORKER_FLAG:
        print(json.dumps(_measure_one(json.loads(sys.argv[2]))), flush=True)
    else:
        print(f"usage: python -m legend.federation.memory {_WORKER_FLAG} JSON", file=sys.stderr)
        raise SystemExit(2)
