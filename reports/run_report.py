"""The run report: how each method did against simulated time and bytes.

:func:`load_run` reads a run directory written by ``legend run`` (``summary.json``,
``rounds.csv``, ``devices.csv``; ``config.toml`` and ``plans/`` are not needed) and checks
every file and column it uses, naming the file and what is missing. :func:`build_run_report`
compares one or more runs:

- accuracy vs simulated time and vs cumulative bytes, one line per run (method);
- time-to-target and bytes-to-target: the simulated clock and the cumulative bytes at the
  first evaluated round whose accuracy reaches the target. The target is ``target`` when
  given, otherwise the **lowest final accuracy among the runs**, so that every run reaches
  it and the comparison is never empty;
- round duration and waiting time per round (mean and slowest device);
- predicted vs observed time per device (the cost model's calibration error), per device
  class and per device;
- with a network topology (the run wrote ``links.csv``): each shared link's utilisation
  per round, up and down, and which links bound each round.

Simulated times are device times from the cost model; host times are what this machine
spent and are labelled as such.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from legend.federation.session import (  # the record schema, written by the run session
    DEVICE_COLUMNS,
    LINK_COLUMNS,
    ROUND_COLUMNS,
)
from legend.reports.errors import ReportInputError
from legend.reports.render import (
    Figure,
    KeyValues,
    Paragraph,
    Report,
    Section,
    Table,
    figure_png,
    format_value,
    new_figure,
)

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "DEVICE_COLUMNS",
    "LINK_COLUMNS",
    "REQUIRED_FILES",
    "ROUND_COLUMNS",
    "RunData",
    "build_run_report",
    "calibration_frame",
    "default_target",
    "link_round_frame",
    "load_run",
    "target_frame",
]

REQUIRED_FILES = ("summary.json", "rounds.csv", "devices.csv")
MB = 1e6
PER_DEVICE_LIMIT = 60
# Links drawn in the utilisation-per-round figure (the busiest; the table has every link).
LINKS_SHOWN = 6
_COLOURS = ("#2f6fdf", "#f29d38", "#34a853", "#c0392b", "#7b61ff", "#00a3a3", "#8c564b")


@dataclass(frozen=True, kw_only=True, eq=False)
class RunData:
    """One run directory's records; ``label`` names it in plots and tables."""

    path: Path
    label: str
    summary: dict[str, Any]
    rounds: pd.DataFrame
    devices: pd.DataFrame
    links: pd.DataFrame | None = None  # links.csv, when the run had a topology

    @property
    def method(self) -> str:
        return str(self.summary.get("method") or self.path.name)

    @property
    def final_accuracy(self) -> float:
        acc = self.rounds["accuracy"].dropna()
        return float(acc.iloc[-1]) if len(acc) else math.nan


def _read_csv(path: Path, columns: Sequence[str], run: Path) -> pd.DataFrame:
    import pandas as pd

    try:
        frame = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise ReportInputError(
            f"run directory {run}: {path.name} is empty (no header); the run wrote nothing"
        ) from None
    except (OSError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise ReportInputError(
            f"run directory {run}: {path.name} is not readable CSV: {exc}"
        ) from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ReportInputError(
            f"run directory {run}: {path.name} lacks column(s) {', '.join(missing)}; "
            "was it written by `legend run`?"
        )
    return frame


def load_run(path: str | Path) -> RunData:
    """Read and check one run directory.

    Raises
    ------
    ReportInputError
        The directory or one of ``summary.json``, ``rounds.csv``, ``devices.csv`` is
        missing or unreadable, a column is missing, or the run has no completed round.
    """
    import pandas as pd

    run = Path(path)
    if not run.is_dir():
        raise ReportInputError(
            f"run directory {run} does not exist; give a `legend run --out` directory"
        )
    missing = [name for name in REQUIRED_FILES if not (run / name).is_file()]
    if missing:
        hint = (
            " (summary.json is written when a run finishes: resume it with "
            f"`legend run CONFIG --resume {run}`)"
            if missing == ["summary.json"]
            else ""
        )
        raise ReportInputError(
            f"run directory {run} is missing {', '.join(missing)}; a run directory holds "
            f"{', '.join(REQUIRED_FILES)}{hint}"
        )
    try:
        summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportInputError(
            f"run directory {run}: summary.json is not readable JSON: {exc}"
        ) from None
    if not isinstance(summary, dict):
        raise ReportInputError(f"run directory {run}: summary.json must hold a JSON object")
    rounds = _read_csv(run / "rounds.csv", ROUND_COLUMNS, run)
    if rounds.empty:
        raise ReportInputError(
            f"run directory {run} is an empty run: rounds.csv has no rounds (the run did not "
            "complete one)"
        )
    devices = _read_csv(run / "devices.csv", DEVICE_COLUMNS, run)
    if devices.empty:
        raise ReportInputError(f"run directory {run} is an empty run: devices.csv has no rows")
    numeric = [c for c in ROUND_COLUMNS if c not in ("round", "solver_status")]
    try:
        rounds[numeric] = rounds[numeric].apply(pd.to_numeric, errors="raise")
        for c in (
            "predicted_time_s",
            "observed_time_s",
            "predicted_compute_s",
            "observed_compute_s",
        ):
            devices[c] = pd.to_numeric(devices[c], errors="raise")
    except (ValueError, TypeError) as exc:
        raise ReportInputError(f"run directory {run}: a numeric column holds text: {exc}") from None
    rounds = rounds.sort_values("round", kind="stable").reset_index(drop=True)
    devices["device_class"] = devices["device_class"].fillna("-").astype(str)
    devices["status"] = devices["status"].fillna("").astype(str)
    links = None
    if (run / "links.csv").is_file():
        links = _read_csv(run / "links.csv", LINK_COLUMNS, run)
        numbers = ["up_bytes", "down_bytes", "utilisation_up", "utilisation_down"]
        try:
            links[numbers] = links[numbers].apply(pd.to_numeric, errors="raise")
        except (ValueError, TypeError) as exc:
            raise ReportInputError(
                f"run directory {run}: links.csv: a numeric column holds text: {exc}"
            ) from None
        binding = links["binding"].astype(str).str.strip().str.lower()
        if not binding.isin(("true", "false")).all():
            raise ReportInputError(
                f"run directory {run}: links.csv: `binding` must be True or False"
            )
        links["binding"] = binding == "true"
    return RunData(
        path=run,
        label=str(summary.get("method") or run.name),
        summary=summary,
        rounds=rounds,
        devices=devices,
        links=links,
    )


def _unique_labels(runs: Sequence[RunData]) -> list[RunData]:
    labels = [r.label for r in runs]
    out = []
    for r in runs:
        if labels.count(r.label) > 1:
            r = replace(r, label=f"{r.label} ({r.path.name})")
        out.append(r)
    return out


def default_target(runs: Sequence[RunData]) -> float:
    """The lowest final accuracy among the runs (every run reaches it)."""
    finals = [r.final_accuracy for r in runs if not math.isnan(r.final_accuracy)]
    if not finals:
        raise ReportInputError(
            "no run has an evaluated round (accuracy is empty in every rounds.csv); "
            "pass --target and evaluate at least once (federation.eval_every)"
        )
    return min(finals)


def target_frame(runs: Sequence[RunData], target: float) -> pd.DataFrame:
    """One row per run: final accuracy, totals, and time/bytes/rounds to ``target``."""
    import pandas as pd

    rows = []
    for r in runs:
        rd = r.rounds
        evaluated = rd.dropna(subset=["accuracy"])
        hit = evaluated[evaluated["accuracy"] >= target - 1e-12]
        first = hit.iloc[0] if len(hit) else None
        rows.append(
            {
                "run": r.label,
                "method": r.method,
                "model": r.summary.get("model", ""),
                "rounds": len(rd),
                "final_accuracy": r.final_accuracy,
                "best_accuracy": float(evaluated["accuracy"].max()) if len(evaluated) else math.nan,
                "sim_time_s": float(rd["sim_clock_s"].iloc[-1]),
                "host_time_s": float(rd["host_clock_s"].iloc[-1]),
                "total_MB": float(rd["cum_bytes"].iloc[-1]) / MB,
                "target": target,
                "reached": first is not None,
                "rounds_to_target": int(first["round"]) if first is not None else None,
                "time_to_target_s": float(first["sim_clock_s"]) if first is not None else math.nan,
                "MB_to_target": float(first["cum_bytes"]) / MB if first is not None else math.nan,
            }
        )
    frame = pd.DataFrame(rows)
    times = frame["time_to_target_s"]
    data = frame["MB_to_target"]
    if times.notna().any():
        frame["speedup_vs_slowest"] = times.max() / times
        frame["MB_saved_vs_most_pct"] = 100.0 * (1 - data / data.max())
    return frame


def calibration_frame(runs: Sequence[RunData], by: str = "device_class") -> pd.DataFrame:
    """Predicted vs observed device time of completed devices, per run and ``by``.

    ``time_mape_pct`` is the mean absolute percentage error of the round time,
    ``time_ratio`` the mean observed/predicted ratio (>1: the cost model is optimistic).
    """
    import pandas as pd

    parts = []
    for r in runs:
        d = r.devices
        ok = d[(d["status"] == "ok") & (d["predicted_time_s"] > 0)].copy()
        if ok.empty:
            continue
        ok["run"] = r.label
        ok["abs_pct"] = (
            100.0 * (ok["observed_time_s"] - ok["predicted_time_s"]).abs() / ok["predicted_time_s"]
        )
        ok["ratio"] = ok["observed_time_s"] / ok["predicted_time_s"]
        ok["compute_abs_pct"] = 100.0 * (
            (ok["observed_compute_s"] - ok["predicted_compute_s"]).abs()
            / ok["predicted_compute_s"].where(ok["predicted_compute_s"] > 0)
        )
        parts.append(ok)
    if not parts:
        return pd.DataFrame(
            columns=[
                "run",
                by,
                "samples",
                "time_mape_pct",
                "time_ratio",
                "time_max_abs_pct",
                "compute_mape_pct",
            ]
        )
    data = pd.concat(parts, ignore_index=True)
    out = data.groupby(["run", by], sort=False).agg(
        samples=("abs_pct", "size"),
        predicted_mean_s=("predicted_time_s", "mean"),
        observed_mean_s=("observed_time_s", "mean"),
        time_mape_pct=("abs_pct", "mean"),
        time_ratio=("ratio", "mean"),
        time_max_abs_pct=("abs_pct", "max"),
        compute_mape_pct=("compute_abs_pct", "mean"),
    )
    return out.reset_index()


def link_round_frame(runs: Sequence[RunData]) -> pd.DataFrame:
    """One row per run, round and link of every run with ``links.csv``, as written."""
    import pandas as pd

    parts = [
        r.links.assign(
            run=r.label, up_MB=r.links["up_bytes"] / MB, down_MB=r.links["down_bytes"] / MB
        )[
            [
                "run",
                "round",
                "link",
                "up_MB",
                "down_MB",
                "utilisation_up",
                "utilisation_down",
                "binding",
            ]
        ]
        for r in runs
        if r.links is not None
    ]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def _binding_per_round(links: pd.DataFrame) -> pd.DataFrame:
    """Per run and round: the links that bound it and the busiest link."""
    import pandas as pd

    rows = []
    for (run, rnd), group in links.groupby(["run", "round"], sort=False):
        busiest = group[["utilisation_up", "utilisation_down"]].max(axis=1).to_numpy()
        top = group.iloc[int(busiest.argmax())]
        rows.append(
            {
                "run": run,
                "round": rnd,
                "binding_links": ", ".join(group.loc[group["binding"], "link"]) or "none",
                "busiest_link": top["link"],
                "utilisation_up": top["utilisation_up"],
                "utilisation_down": top["utilisation_down"],
            }
        )
    return pd.DataFrame(rows)


# -- figures -------------------------------------------------------------------------------


def _colour(i: int) -> str:
    return _COLOURS[i % len(_COLOURS)]


def _accuracy_figure(
    runs: Sequence[RunData], target: float, x: str, xlabel: str, scale: float
) -> bytes:
    fig = new_figure(9.0, 4.2)
    ax = fig.add_subplot()
    for i, r in enumerate(runs):
        rd = r.rounds.dropna(subset=["accuracy"])
        ax.plot(rd[x] / scale, rd["accuracy"], "o-", markersize=3, color=_colour(i), label=r.label)
    ax.axhline(target, color="#555", linestyle="--", linewidth=1, label=f"target {target:.4g}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return figure_png(fig)


def _waiting_figure(runs: Sequence[RunData]) -> bytes:
    fig = new_figure(10.0, 4.0)
    ax1, ax2 = fig.subplots(1, 2)
    for i, r in enumerate(runs):
        rd = r.rounds
        c = _colour(i)
        ax1.plot(rd["round"], rd["sim_time_s"], "o-", markersize=3, color=c, label=f"{r.label}")
        ax1.plot(rd["round"], rd["planned_round_time_s"], ":", color=c, label=f"{r.label} planned")
        ax2.plot(
            rd["round"], rd["waiting_mean_s"], "o-", markersize=3, color=c, label=f"{r.label} mean"
        )
        ax2.plot(rd["round"], rd["waiting_max_s"], "--", color=c, label=f"{r.label} max")
    ax1.set_title("Round duration (simulated)", fontsize=10)
    ax1.set_xlabel("round")
    ax1.set_ylabel("seconds")
    ax2.set_title("Waiting per round (idle time of devices)", fontsize=10)
    ax2.set_xlabel("round")
    ax2.set_ylabel("seconds")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return figure_png(fig)


def _calibration_figure(runs: Sequence[RunData]) -> bytes:
    fig = new_figure(6.5, 5.2)
    ax = fig.add_subplot()
    lo, hi = math.inf, 0.0
    for i, r in enumerate(runs):
        d = r.devices
        ok = d[(d["status"] == "ok") & (d["predicted_time_s"] > 0) & (d["observed_time_s"] > 0)]
        if ok.empty:
            continue
        ax.scatter(
            ok["predicted_time_s"],
            ok["observed_time_s"],
            s=10,
            alpha=0.6,
            color=_colour(i),
            label=r.label,
        )
        lo = min(lo, float(ok["predicted_time_s"].min()), float(ok["observed_time_s"].min()))
        hi = max(hi, float(ok["predicted_time_s"].max()), float(ok["observed_time_s"].max()))
    if math.isfinite(lo) and hi > 0:
        ax.plot(
            [lo, hi],
            [lo, hi],
            color="#555",
            linestyle="--",
            linewidth=1,
            label="observed = predicted",
        )
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel("predicted device round time (s)")
    ax.set_ylabel("observed device round time (s)")
    ax.set_title("Cost model calibration (each point: one device in one round)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return figure_png(fig)


def _links_figure(links: pd.DataFrame) -> tuple[bytes, str]:
    """Utilisation up and down per link over rounds; filled markers: the link bound."""
    from matplotlib.ticker import MaxNLocator

    peak = (
        links.assign(peak=links[["utilisation_up", "utilisation_down"]].max(axis=1))
        .groupby(["run", "link"], sort=False)["peak"]
        .max()
        .sort_values(ascending=False, kind="stable")
    )
    shown = list(peak.index[:LINKS_SHOWN])
    fig = new_figure(10.0, 4.2)
    axes = fig.subplots(1, 2, sharey=True)
    for i, (run, link) in enumerate(shown):
        data = links[(links["run"] == run) & (links["link"] == link)]
        label = link if links["run"].nunique() == 1 else f"{run}: {link}"
        for ax, way in zip(axes, ("up", "down"), strict=True):
            values = 100 * data[f"utilisation_{way}"]
            ax.plot(data["round"], values, "-", color=_colour(i), label=label)
            hit = data["binding"].to_numpy(dtype=bool)
            ax.plot(data["round"][hit], values[hit], "o", color=_colour(i))
            ax.plot(data["round"][~hit], values[~hit], "o", mfc="white", color=_colour(i))
    for ax, way in zip(axes, ("up", "down"), strict=True):
        ax.set_title(f"Utilisation {way}", fontsize=10)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("% of capacity x round time")
    axes[0].legend(fontsize=7)
    more = len(peak) - len(shown)
    caption = (
        "Bytes through each link / (capacity x the devices' round time), per round; filled "
        "markers: the link bound that round (doubling it would have ended the round sooner)."
        + (
            f" The {len(shown)} busiest of {len(peak):,} links; tables/links.csv has all."
            if more
            else ""
        )
    )
    return figure_png(fig), caption


# -- the report ----------------------------------------------------------------------------


def build_run_report(
    runs: Sequence[RunData],
    *,
    target: float | None = None,
    per_device_limit: int = PER_DEVICE_LIMIT,
) -> Report:
    """Compare runs; ``target`` defaults to the lowest final accuracy among them."""
    import pandas as pd

    if not runs:
        raise ReportInputError("give at least one run directory")
    runs = _unique_labels(runs)
    if target is not None and not (math.isfinite(target) and 0 <= target <= 1):
        raise ReportInputError(f"`--target` must be an accuracy in [0, 1], got {target!r}")
    chosen = default_target(runs) if target is None else float(target)
    targets = target_frame(runs, chosen)
    calib = calibration_frame(runs)
    calib_devices = calibration_frame(runs, by="device_id")
    per_round = pd.concat(
        [
            r.rounds.assign(run=r.label, cum_MB=r.rounds["cum_bytes"] / MB)[
                [
                    "run",
                    "round",
                    "sim_time_s",
                    "sim_clock_s",
                    "host_time_s",
                    "accuracy",
                    "cum_MB",
                    "participants",
                    "dropped",
                    "rejected",
                    "waiting_mean_s",
                    "waiting_max_s",
                    "planned_round_time_s",
                ]
            ]
            for r in runs
        ],
        ignore_index=True,
    )
    status = pd.concat(
        [
            r.devices.assign(
                run=r.label, outcome=r.devices["status"].str.split(":").str[0].str.strip()
            )
            .groupby(["run", "outcome"], sort=False)
            .size()
            .rename("device_rounds")
            .reset_index()
            for r in runs
        ],
        ignore_index=True,
    )
    best = targets.sort_values("time_to_target_s", kind="stable").iloc[0]
    headline = KeyValues(
        items=(
            ("Runs", str(len(runs))),
            ("Target accuracy", f"{chosen:.4g}" + (" (lowest final)" if target is None else "")),
            ("Fastest to target", f"{best['run']} ({format_value(best['time_to_target_s'])} s)"),
            ("Best final accuracy", f"{targets['final_accuracy'].max():.4g}"),
            ("Rounds", ", ".join(str(len(r.rounds)) for r in runs)),
        )
    )
    models = sorted({str(r.summary.get("model", "")) for r in runs} - {""})
    datasets = sorted({str(r.summary.get("dataset", "")) for r in runs} - {""})
    sections = [
        Section(
            title="Summary",
            blocks=(
                headline,
                Paragraph(
                    text=(
                        f"Runs: {', '.join(str(r.path) for r in runs)}. Model "
                        f"{', '.join(models) or '?'}, dataset {', '.join(datasets) or '?'}. "
                        "Simulated time is device time from the cost model; host time is what "
                        "this machine spent. The target defaults to the lowest final accuracy "
                        "among the runs so every run reaches it; set it with --target."
                    )
                ),
                Table(
                    name="targets",
                    title="Time-to-target and bytes-to-target",
                    frame=targets,
                    caption="time_to_target_s and MB_to_target: simulated clock and cumulative "
                    "bytes at the first evaluated round reaching the target.",
                ),
            ),
        ),
        Section(
            title="Accuracy",
            blocks=(
                Figure(
                    name="accuracy_time",
                    title="Accuracy vs simulated time",
                    png=_accuracy_figure(runs, chosen, "sim_clock_s", "simulated time (s)", 1.0),
                ),
                Figure(
                    name="accuracy_bytes",
                    title="Accuracy vs cumulative bytes",
                    png=_accuracy_figure(runs, chosen, "cum_bytes", "cumulative bytes (MB)", MB),
                ),
            ),
        ),
        Section(
            title="Rounds and waiting",
            blocks=(
                Figure(
                    name="waiting", title="Round duration and waiting", png=_waiting_figure(runs)
                ),
                Table(name="rounds", title="Per round", frame=per_round, max_rows=per_device_limit),
                Table(
                    name="device_status",
                    title="Device outcomes",
                    frame=status,
                    caption="Device-rounds by status (ok, dropped, rejected).",
                ),
            ),
        ),
        Section(
            title="Calibration",
            blocks=(
                Figure(
                    name="calibration",
                    title="Predicted vs observed time per device",
                    png=_calibration_figure(runs),
                ),
                Table(
                    name="calibration",
                    title="Calibration error by device class",
                    frame=calib,
                    caption="time_mape_pct: mean |observed - predicted| / predicted over "
                    "completed device-rounds; time_ratio > 1: devices slower than predicted.",
                ),
                Table(
                    name="calibration_devices",
                    title="Calibration error per device",
                    frame=calib_devices.sort_values(
                        "time_mape_pct", ascending=False, kind="stable"
                    ),
                    max_rows=per_device_limit,
                ),
            ),
        ),
    ]
    links = link_round_frame(runs)
    if len(links):
        png, caption = _links_figure(links)
        sections.append(
            Section(
                title="Links",
                blocks=(
                    Paragraph(
                        text="Runs with a network topology record each shared link's bytes per "
                        "round (links.csv). Utilisation: bytes / (capacity x the devices' round "
                        "time). A link binds a round when doubling its capacity would have ended "
                        "the round sooner on the fair-sharing clock."
                    ),
                    Table(
                        name="binding_links",
                        title="Binding link per round",
                        frame=_binding_per_round(links),
                        caption="busiest_link: the link with the highest utilisation that round.",
                        max_rows=per_device_limit,
                    ),
                    Figure(
                        name="link_utilisation",
                        title="Link utilisation per round",
                        png=png,
                        caption=caption,
                    ),
                    Table(
                        name="links",
                        title="Links per round",
                        frame=links,
                        caption="One row per run, round and link that carried a participant's "
                        "bytes, as in links.csv.",
                        max_rows=per_device_limit,
                    ),
                ),
            )
        )
    return Report(
        kind="run",
        title=f"Run report: {', '.join(r.label for r in runs)}",
        subtitle=f"target accuracy {chosen:.4g}",
        sections=tuple(sections),
        meta={"runs": [str(r.path) for r in runs], "target": chosen},
    )
