"""Host calibration: time the real model on this machine and fit the cost model's step time.

One local training step of a configuration that adapts ``d`` layers at ranks ``r_l`` is
modelled as

    step_s = forward_s + d * backward_per_layer_s + (sum_l r_l) * lora_per_rank_s

(``docs/costs.md``: the forward pass is paid in full, backward runs only through the
adapted layers, LoRA adds work per unit rank). :func:`run_calibration` measures training
steps (forward, backward, AdamW update) of the real model with LoRA on the top ``d`` layers
for several depths and ranks on random token batches, takes the fastest of ``repeats``
timed steps per configuration (other work on a shared host only ever adds time), and fits
the three coefficients with non-negative bounds (so the fitted cost can never fall with depth
or rank) under a robust loss. ``host_tflops`` is the
model's analytic forward FLOPs (:meth:`~legend.models.spec.ModelSpec.forward_flops_per_token`)
divided by ``forward_s``: device times are host times scaled by ``host_tflops /
device.tflops``.

Memory (constraint C6) is measured too, unless ``memory=False``: the peak memory of training
steps of the top ``d`` layers at every measured depth and rank, each configuration in a
fresh process (:mod:`legend.federation.memory` says what is counted and why), fitted as the
tightest affine upper bound ``static + d * per_layer + (sum_l r_l) * per_rank``. The cost
model uses the three coefficients instead of its analytic memory model.

``legend calibrate --model M`` runs it, prints the measured and fitted times and memory, and
writes the :class:`~legend.planner.costs.Calibration` JSON to ``--out`` or to
:func:`default_calibration_path`.

torch, transformers and peft are imported inside the functions.
"""

from __future__ import annotations

import math
import os
import platform
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from legend.federation.errors import FederationInputError
from legend.federation.memory import (
    MEMORY_METHOD,
    MEMORY_METHOD_CUDA,
    MemorySample,
    fit_memory_bound,
    measure_peak_memory,
    measurement_noise,
)
from legend.models.errors import LegendError
from legend.models.paths import check_output_file, writing
from legend.planner.costs import Calibration
from legend.planner.profiles import parse_rank_grid

if TYPE_CHECKING:
    from legend.models.spec import ModelSpec

__all__ = [
    "CalibrationResult",
    "MemorySample",
    "StepSample",
    "calibrate",
    "calibrate_command",
    "default_calibration_path",
    "fit_step_time",
    "fitted_calibration",
    "load_or_none",
    "run_calibration",
]

Progress = Callable[[int, int, str], None]
"""``progress(done, total, what)``, called after each measured configuration."""

_MAX_DEPTHS = 6
_MAX_RANKS = 3


@dataclass(frozen=True, kw_only=True)
class StepSample:
    """One measured configuration: top ``depth`` layers at ``rank`` each."""

    depth: int
    rank: int
    step_s: float
    """The fastest of ``times_s``."""
    times_s: tuple[float, ...]
    predicted_s: float

    @property
    def rel_error(self) -> float:
        """``(predicted - measured) / measured``."""
        return (self.predicted_s - self.step_s) / self.step_s


@dataclass(frozen=True, kw_only=True)
class CalibrationResult:
    """The fitted calibration with the measurements and the quality of the fit."""

    calibration: Calibration
    samples: tuple[StepSample, ...]
    forward_only_s: float
    """Fastest inference forward pass (no autograd) of the batch."""
    rmse_s: float
    max_rel_error: float
    median_rel_error: float
    peak_rss_bytes: int | None = None
    """Peak resident memory of this process (CPU runs; includes Python and libraries)."""
    memory_samples: tuple[MemorySample, ...] = ()
    """Measured peak memory per configuration and the fitted bound's prediction (empty when
    memory was not measured)."""

    def summary(self) -> dict[str, Any]:
        cal = self.calibration
        return {
            "forward_s": cal.forward_s,
            "backward_per_layer_s": cal.backward_per_layer_s,
            "lora_per_rank_s": cal.lora_per_rank_s,
            "host_tflops": cal.host_tflops,
            "forward_only_s": self.forward_only_s,
            "rmse_s": self.rmse_s,
            "max_rel_error": self.max_rel_error,
            "median_rel_error": self.median_rel_error,
            "memory_static_bytes": cal.memory_static_bytes,
            "memory_per_layer_bytes": cal.memory_per_layer_bytes,
            "memory_per_rank_bytes": cal.memory_per_rank_bytes,
        }


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "legend" / "calibration"


def _modules_label(target_modules: str | Sequence[str]) -> str:
    if isinstance(target_modules, str):
        return target_modules
    return "+".join(target_modules)


def default_calibration_path(
    model: str,
    *,
    batch_size: int = 16,
    seq_len: int = 64,
    target_modules: str | Sequence[str] = "qv",
) -> Path:
    """``$XDG_CACHE_HOME/legend/calibration/<model>-b<batch>-s<seq>.json`` (default
    ``~/.cache``); target modules other than ``"qv"`` add ``-<modules>`` before ``.json``."""
    name = Path(model).name if os.sep in model or Path(model).is_dir() else model
    stem = f"{name}-b{batch_size}-s{seq_len}"
    label = _modules_label(target_modules)
    if label != "qv":
        stem += f"-{label}"
    stem = re.sub(r"[^A-Za-z0-9._+-]", "_", stem)
    return _cache_root() / f"{stem}.json"


def load_or_none(
    model: str,
    *,
    batch_size: int = 16,
    seq_len: int = 64,
    target_modules: str | Sequence[str] = "qv",
    path: str | Path | None = None,
) -> Calibration | None:
    """The cached calibration for this model and batch shape, or ``None`` when there is none.

    A file that exists but is not a calibration raises
    :class:`~legend.planner.errors.PlannerInputError` (it says how to recreate it).
    """
    file = (
        Path(path)
        if path is not None
        else default_calibration_path(
            model, batch_size=batch_size, seq_len=seq_len, target_modules=target_modules
        )
    )
    if not file.is_file():
        return None
    return Calibration.load(file)


def _positive_int(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise FederationInputError(f"`{name}` must be an integer >= 1, got {value!r}")
    return value


def _spread(values: Sequence[int], most: int) -> tuple[int, ...]:
    """At most ``most`` values of a sorted sequence, always keeping the first and last."""
    if len(values) <= most:
        return tuple(values)
    picks = {round(i * (len(values) - 1) / (most - 1)) for i in range(most)}
    return tuple(values[i] for i in sorted(picks))


def fit_step_time(
    samples: Sequence[tuple[int, int, float]],
) -> tuple[float, float, float]:
    """Fit ``step_s = forward_s + depth * backward_per_layer_s + rank_sum * lora_per_rank_s``.

    ``samples`` are ``(depth, sum of ranks, measured step seconds)``; the coefficients are
    returned in that order, all ``>= 0``.

    The residuals are relative (``(predicted - t) / t``) under a soft-L1 loss: a shared
    machine produces occasional slow outliers, and a plain least-squares fit lets one of
    them drag every coefficient. Non-negative least squares gives the starting point.
    """
    import numpy as np
    from scipy.optimize import least_squares, nnls

    if len(samples) < 3:
        raise FederationInputError(f"the fit needs at least three samples, got {len(samples)}")
    design = np.array([[1.0, d, s] for d, s, _ in samples])
    target = np.array([t for _, _, t in samples])
    weighted = design / target[:, None]
    scale = np.abs(weighted).max(axis=0)
    start, _ = nnls(weighted / scale, np.ones_like(target))

    def relative(x: np.ndarray) -> np.ndarray:
        return (weighted / scale) @ x - 1.0

    result = least_squares(
        relative, start, bounds=(0.0, np.inf), loss="soft_l1", f_scale=0.05, method="trf"
    )
    forward_s, backward_s, lora_s = (float(c) for c in result.x / scale)
    return forward_s, backward_s, lora_s


def fitted_calibration(
    spec: ModelSpec,
    batch_size: int,
    seq_len: int,
    step_times: tuple[float, float, float],
    *,
    host: str,
    **extra: Any,
) -> Calibration:
    """The :class:`Calibration` of fitted step times ``(forward_s, backward_per_layer_s,
    lora_per_rank_s)``; the host's TFLOP/s follow from the forward time and the model's
    analytic forward FLOPs. ``extra``: further fields (memory)."""
    forward_s, backward_s, lora_s = step_times
    tokens = batch_size * seq_len
    return Calibration(
        model=spec.name,
        target_modules=tuple(spec.target_modules),
        batch_size=batch_size,
        seq_len=seq_len,
        host=host,
        host_tflops=spec.forward_flops_per_token(seq_len) * tokens / forward_s / 1e12,
        forward_s=forward_s,
        backward_per_layer_s=backward_s,
        lora_per_rank_s=lora_s,
        **extra,
    )


def run_calibration(
    model: str,
    *,
    batch_size: int = 16,
    seq_len: int = 64,
    target_modules: str | Sequence[str] = "qv",
    ranks: str | Sequence[int] = (2, 8, 16),
    depths: Sequence[int] | None = None,
    repeats: int = 5,
    warmup: int = 1,
    passes: int = 3,
    seed: int = 0,
    device: str = "cpu",
    memory: bool = True,
    memory_steps: int = 3,
    progress: Progress | None = None,
) -> CalibrationResult:
    """Time training steps of ``model`` on this host and fit the step-time model.

    Parameters
    ----------
    model
        A loadable model (``all-MiniLM-L6-v2``, ``tiny-bert``, ``tiny-llama`` or a local
        directory; see :func:`~legend.models.loaders.load_base_model`).
    batch_size, seq_len
        The batch shape of the job the calibration is for.
    target_modules
        A preset (``"qv"``, ``"attention"``, ``"all"``) or module names.
    ranks
        Ranks to measure (a grid such as ``"2,4,8,16"``; at most three are used: the
        smallest, the largest and one between).
    depths
        Depths (numbers of top layers) to measure; default: every depth ``1..L`` for models
        with at most six layers, otherwise six depths spread from 1 to ``L``.
    repeats, warmup
        Timed steps per configuration (the fastest counts) and untimed steps after each
        adapter installation.
    passes
        Sweeps over the configurations (in a fresh random order each) that share the
        ``repeats`` timed steps.
    seed
        Seed of the random batch and the adapter initialisation (the global torch random
        state is restored afterwards).
    device
        ``"cpu"`` or a torch device such as ``"cuda"``.
    memory
        Also measure peak training memory (every measured depth and rank, one fresh
        process each, and three of them a second time for the measurement noise) and fit
        the memory coefficients.
    memory_steps
        Training steps per memory measurement (the peak stops growing after the second,
        when the AdamW moments exist).
    progress
        Called after each configuration with ``(done, total, description)``.
    """
    import numpy as np
    import torch

    from legend.federation.adapters import init_global, slice_for
    from legend.federation.apply import AdapterHost
    from legend.models.loaders import load_base_model
    from legend.models.spec import get_model_spec
    from legend.planner.plan import DevicePlan
    from legend.planner.profiles import JobParams

    batch_size = _positive_int(batch_size, "batch_size")
    seq_len = _positive_int(seq_len, "seq_len")
    repeats = _positive_int(repeats, "repeats")
    if not isinstance(warmup, int) or warmup < 0:
        raise FederationInputError(f"`warmup` must be an integer >= 0, got {warmup!r}")
    grid = parse_rank_grid(ranks)
    modules: str | tuple[str, ...] = (
        target_modules if isinstance(target_modules, str) else tuple(target_modules)
    )
    spec = get_model_spec(model, target_modules=modules)
    if seq_len > spec.max_position_embeddings:
        raise FederationInputError(
            f"`seq_len` {seq_len} exceeds the {spec.max_position_embeddings} positions of "
            f"{spec.name}; use a shorter sequence"
        )
    L = spec.num_layers
    if depths is None:
        depth_list = _spread(list(range(1, L + 1)), _MAX_DEPTHS)
    else:
        depth_list = tuple(sorted({int(d) for d in depths}))
        bad = [d for d in depth_list if not 1 <= d <= L]
        if bad:
            raise FederationInputError(
                f"`depths` {bad} are outside 1..{L}, the layers of {spec.name}"
            )
    rank_list = _spread(grid, _MAX_RANKS)
    if len(depth_list) < 2 or len(rank_list) < 2:
        raise FederationInputError(
            "calibration needs at least two depths and two ranks to separate the backward "
            f"and LoRA costs; got depths {list(depth_list)} and ranks {list(rank_list)}"
        )
    try:
        torch_device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise FederationInputError(f"`device` {device!r} is not a torch device: {exc}") from None
    cuda = torch_device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(torch_device)

    job = JobParams(batch_size=batch_size, seq_len=seq_len, target_modules=modules, ranks=grid)
    configs = [(d, r) for d in depth_list for r in rank_list]
    passes = max(1, min(passes, repeats))
    memory_configs = [(d, r) for d in depth_list for r in rank_list] if memory else []
    repeat_at = sorted({0, len(memory_configs) // 2, len(memory_configs) - 1}) if memory else []
    total = len(configs) * passes + 1 + len(memory_configs) + len(repeat_at)
    with torch.random.fork_rng(devices=None if cuda else []):
        torch.manual_seed(seed)
        base = load_base_model(model, num_labels=spec.num_labels, seed=seed).to(torch_device)
        host = AdapterHost(base, spec, job)
        glob = init_global(spec, max(rank_list), host.initial_head(), seed=seed)
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(1, spec.vocab_size, (batch_size, seq_len), generator=gen)
        batch = {
            "input_ids": ids.to(torch_device),
            "attention_mask": torch.ones_like(ids).to(torch_device),
        }
        labels = torch.randint(0, spec.num_labels, (batch_size,), generator=gen).to(torch_device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(torch_device)

        # Inference forward pass (reported; the fit's intercept is what the cost model uses).
        forward_times: list[float] = []
        with torch.no_grad():
            for i in range(warmup + repeats):
                sync()
                start = time.perf_counter()
                base(**batch)
                sync()
                if i >= warmup:
                    forward_times.append(time.perf_counter() - start)
        if progress is not None:
            progress(1, total, "forward pass")

        # Configurations are measured in `passes` sweeps, each in a fresh random order, so
        # that a burst of other work on the host does not land on one configuration only.
        per_pass = math.ceil(repeats / passes)
        timed: dict[tuple[int, int], list[float]] = {c: [] for c in configs}
        order = random.Random(seed)
        done = 1
        for sweep in range(passes):
            sweep_configs = list(configs)
            order.shuffle(sweep_configs)
            for depth, rank in sweep_configs:
                steps = min(per_pass, repeats - sweep * per_pass)
                if steps <= 0:
                    continue
                layers = tuple(range(L - depth, L))
                plan = DevicePlan(device_id="calibration", layers=layers, ranks=(rank,) * depth)
                with host.activate(plan, slice_for(glob, layers, plan.ranks)) as peft_model:
                    params = [p for p in peft_model.parameters() if p.requires_grad]
                    optimizer = torch.optim.AdamW(params, lr=1e-4)
                    for i in range(warmup + steps):
                        sync()
                        start = time.perf_counter()
                        loss = peft_model(**batch, labels=labels).loss
                        loss.backward()
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                        sync()
                        if i >= warmup:
                            timed[(depth, rank)].append(time.perf_counter() - start)
                done += 1
                if progress is not None:
                    progress(done, total, f"depth {depth}, rank {rank}")
        samples = [(d, r, tuple(timed[(d, r)])) for d, r in configs]
        peak_cuda = float(torch.cuda.max_memory_allocated(torch_device)) if cuda else None

    memory_fields: dict[str, Any] = {}
    memory_samples: tuple[MemorySample, ...] = ()
    if memory_configs:

        def peak_of(depth: int, rank: int, what: str) -> float:
            nonlocal done
            (peak,) = measure_peak_memory(
                model,
                [(tuple(range(L - depth, L)), (rank,) * depth)],
                batch_size=batch_size,
                seq_len=seq_len,
                target_modules=modules,
                steps=memory_steps,
                seed=seed,
                device=device,
            )
            done += 1
            if progress is not None:
                progress(done, total, f"{what}, depth {depth}, rank {rank}")
            return peak

        peaks = [peak_of(d, r, "memory") for d, r in memory_configs]
        # The smallest, a middle and the largest configuration once more, in fresh
        # processes: how much one configuration's peak moves between processes.
        again = [peak_of(*memory_configs[k], "memory again") for k in repeat_at]
        noise = measurement_noise([peaks[k] for k in repeat_at], again)
        for k, peak in zip(repeat_at, again, strict=True):
            peaks[k] = max(peaks[k], peak)
        points = [(d, d * r, m) for (d, r), m in zip(memory_configs, peaks, strict=True)]
        fit = fit_memory_bound(points, noise=noise)
        memory_samples = tuple(
            MemorySample(depth=d, rank=r, peak_bytes=m, predicted_bytes=fit.predict(d, s))
            for (d, r), (_, s, m) in zip(memory_configs, points, strict=True)
        )
        method = MEMORY_METHOD_CUDA if cuda else MEMORY_METHOD
        memory_fields = {
            "memory_static_bytes": fit.static,
            "memory_per_layer_bytes": fit.per_layer,
            "memory_per_rank_bytes": fit.per_rank,
            "memory_headroom_bytes": fit.headroom,
            "memory_samples": tuple((s.depth, s.rank, s.peak_bytes) for s in memory_samples),
            "memory_method": method.format(steps=memory_steps),
        }

    # The fastest timed step of each configuration: noise on a shared host only adds time.
    fastest = [min(t) for _, _, t in samples]
    rows = [(d, d * r) for d, r, _ in samples]
    forward_s, backward_s, lora_s = fit_step_time(
        [(d, s, t) for (d, s), t in zip(rows, fastest, strict=True)]
    )
    if forward_s <= 0:  # pragma: no cover - a step always takes time
        forward_s = min(fastest)
    predicted = [forward_s + d * backward_s + s * lora_s for d, s in rows]
    residuals = np.array(predicted) - np.array(fastest)
    calibration = fitted_calibration(
        spec,
        batch_size,
        seq_len,
        (forward_s, backward_s, lora_s),
        host=_host_description(torch_device),
        peak_memory_bytes=peak_cuda,
        **memory_fields,
    )
    return CalibrationResult(
        calibration=calibration,
        samples=tuple(
            StepSample(depth=d, rank=r, step_s=m, times_s=t, predicted_s=p)
            for (d, r, t), m, p in zip(samples, fastest, predicted, strict=True)
        ),
        forward_only_s=min(forward_times),
        rmse_s=float(math.sqrt(float(np.mean(residuals**2)))),
        max_rel_error=float(np.max(np.abs(residuals) / np.array(fastest))),
        median_rel_error=float(np.median(np.abs(residuals) / np.array(fastest))),
        peak_rss_bytes=None if cuda else _peak_rss_bytes(),
        memory_samples=memory_samples,
    )


def calibrate(model: str, **options: Any) -> Calibration:
    """Time ``model`` on this host and return the fitted :class:`Calibration`.

    ``options`` are those of :func:`run_calibration` (``batch_size``, ``seq_len``,
    ``target_modules``, ``ranks``, ``repeats``, ``memory``, ...), which measures and fits.
    """
    return run_calibration(model, **options).calibration


def _host_description(device: Any) -> str:
    import torch

    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{platform.machine()} cpu, {os.cpu_count()} cores"
    return f"{where}; torch {torch.__version__}, {torch.get_num_threads()} threads"


def _peak_rss_bytes() -> int | None:
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if platform.system() == "Darwin" else peak * 1024)


def _parse_modules(text: str) -> str | tuple[str, ...]:
    text = text.strip()
    if "," in text:
        return tuple(part.strip() for part in text.split(",") if part.strip())
    return text


def calibrate_command(
    model: Annotated[
        str,
        typer.Option(
            "--model",
            help="all-MiniLM-L6-v2, tiny-bert, tiny-llama or a local Hugging Face model directory.",
        ),
    ],
    batch_size: Annotated[int, typer.Option("--batch-size", help="Batch size of the job.")] = 16,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Sequence length in tokens.")] = 64,
    target_modules: Annotated[
        str,
        typer.Option(
            "--target-modules",
            help="qv, attention, all, or comma-separated module names (e.g. query,value).",
        ),
    ] = "qv",
    ranks: Annotated[
        str, typer.Option("--ranks", help="Ranks to time (at most three are used).")
    ] = "2,8,16",
    repeats: Annotated[
        int, typer.Option("--repeats", help="Timed steps per configuration (the fastest counts).")
    ] = 5,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    memory: Annotated[
        bool,
        typer.Option(
            "--memory/--no-memory",
            help="Also measure peak training memory per depth and rank (one fresh process "
            "per configuration) for the memory constraint.",
        ),
    ] = True,
    threads: Annotated[
        int | None,
        typer.Option("--threads", help="torch CPU threads while timing (default: torch's)."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Where to write the calibration JSON; default "
            "~/.cache/legend/calibration/<model>-b<batch>-s<seq>.json.",
        ),
    ] = None,
) -> None:
    """Time the model on this host and write a calibration for the cost model."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    console = Console(stderr=True)
    modules = _parse_modules(target_modules)
    if threads is not None:
        import torch

        torch.set_num_threads(_positive_int(threads, "threads"))
    path = out or default_calibration_path(
        model, batch_size=batch_size, seq_len=seq_len, target_modules=modules
    )
    check_torch_device(device)
    check_output_file(path, "--out")
    with Progress(
        TextColumn("calibrating {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task(model, total=None)

        def report(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total, description=f"{model}: {what}")

        try:
            result = run_calibration(
                model,
                batch_size=batch_size,
                seq_len=seq_len,
                target_modules=modules,
                ranks=ranks,
                repeats=repeats,
                device=device,
                memory=memory,
                progress=report,
            )
        except LegendError:
            raise
        except ValueError as exc:  # e.g. a bad --ranks grid from the planner's parser
            raise FederationInputError(str(exc)) from None
    cal = result.calibration
    out_console = Console()
    out_console.print(
        _fit_table(
            f"{cal.model}: batch {cal.batch_size} x {cal.seq_len} tokens, {cal.host}",
            ("measured ms", "fitted ms", "error"),
            [
                (
                    s.depth,
                    s.rank,
                    f"{s.step_s * 1e3:.1f}",
                    f"{s.predicted_s * 1e3:.1f}",
                    s.rel_error,
                )
                for s in result.samples
            ],
        )
    )
    fit = [
        ("forward_s (intercept)", f"{cal.forward_s * 1e3:.2f} ms"),
        ("backward_per_layer_s", f"{cal.backward_per_layer_s * 1e3:.3f} ms"),
        ("lora_per_rank_s", f"{cal.lora_per_rank_s * 1e6:.2f} us"),
        ("inference forward (measured)", f"{result.forward_only_s * 1e3:.2f} ms"),
        ("host_tflops", f"{cal.host_tflops:.4f}"),
        ("fit rmse", f"{result.rmse_s * 1e3:.2f} ms"),
        ("median relative error", f"{result.median_rel_error:.1%}"),
        ("max relative error", f"{result.max_rel_error:.1%}"),
    ]
    if cal.peak_memory_bytes is not None:
        fit.append(("peak CUDA memory", f"{cal.peak_memory_bytes / 2**20:.0f} MiB"))
    elif result.peak_rss_bytes is not None:
        fit.append(("peak process RSS", f"{result.peak_rss_bytes / 2**20:.0f} MiB"))
    out_console.print(
        _coefficient_table("fitted step time = forward + depth * backward + sum(ranks) * lora", fit)
    )
    if result.memory_samples:
        out_console.print(
            _fit_table(
                "peak training memory: measured and the fitted bound "
                "static + depth * per_layer + sum(ranks) * per_rank",
                ("measured MB", "bound MB", "over"),
                [
                    (
                        m.depth,
                        m.rank,
                        f"{m.peak_bytes / 1e6:.1f}",
                        f"{m.predicted_bytes / 1e6:.1f}",
                        m.rel_error,
                    )
                    for m in result.memory_samples
                ],
            )
        )
        assert cal.memory_static_bytes is not None
        assert cal.memory_per_layer_bytes is not None
        assert cal.memory_per_rank_bytes is not None
        coefficients = [
            ("memory_static_bytes", f"{cal.memory_static_bytes / 1e6:.1f} MB"),
            ("memory_per_layer_bytes", f"{cal.memory_per_layer_bytes / 1e6:.2f} MB"),
            ("memory_per_rank_bytes", f"{cal.memory_per_rank_bytes / 1e3:.1f} kB"),
            (
                "memory_headroom_bytes",
                f"{(cal.memory_headroom_bytes or 0.0) / 1e6:.1f} MB (in static: leave-one-out "
                "allowance plus the noise between processes)",
            ),
        ]
        out_console.print(_coefficient_table(f"memory: {cal.memory_method}", coefficients))
    with writing(path, "--out"):
        path.parent.mkdir(parents=True, exist_ok=True)
        cal.save(path)
    out_console.print(f"wrote {path}")


def _fit_table(
    title: str, columns: Sequence[str], rows: Sequence[tuple[int, int, str, str, float]]
) -> Any:
    """A table of measured against fitted values by depth and rank, with the relative error
    (``columns``: the headers of the last three)."""
    from rich.table import Table

    table = Table(title=title)
    for column in ("depth", "rank", *columns):
        table.add_column(column, justify="right")
    for depth, rank, measured, fitted, error in rows:
        table.add_row(str(depth), str(rank), measured, fitted, f"{error:+.1%}")
    return table


def _coefficient_table(title: str, rows: Sequence[tuple[str, str]]) -> Any:
    """A two-column table of fitted coefficients and their values."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("coefficient")
    table.add_column("value", justify="right")
    for name, value in rows:
        table.add_row(name, value)
    return table


def check_torch_device(device: str) -> None:
    """``--device`` must name a device this torch can use (one line, not a traceback)."""
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise FederationInputError(
            f"--device {device!r} is not a torch device; use cpu or cuda"
        ) from None
    if kind == "cuda" and not torch.cuda.is_available():
        why = "is built without CUDA" if torch.version.cuda is None else "sees no CUDA device"
        raise FederationInputError(
            f"--device {device}: this torch ({torch.__version__}) {why}; use --device cpu"
        )
