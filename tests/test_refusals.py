"""What legend refuses, through the real command: one table of bad inputs and faults.

Each case prepares its own folder (copies of a tiny job, fleet, data set, plan and finished
run, then the fault), runs one ``legend`` command line there and checks:

- the exit status (2 bad input, 5 a run that accepted no update, 0 where legend copes);
- that the message names the file and the field or option at fault;
- that no traceback appears;
- that every file present before the command is byte-identical after it, and that a refused
  command leaves nothing new behind.

The cases run in one subprocess (``refusals_driver.py``, which calls the console script's
entry point), so that torch loads once; a few run through the ``legend`` executable itself.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from legend.federation.adapters import AdapterState

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "FLWR_TELEMETRY_ENABLED": "0",
}

FLEET = (ROOT / "examples" / "tiny_fleet.csv").read_text()
JOB = """\
[job]
name = "tiny"
model = "tiny-bert"
fleet = "fleet.csv"
method = "uniform"
rounds = 2

[train]
batch_size = 4
seq_len = 16
local_steps = 1
ranks = [2, 4]
uniform_rank = 2
threads = 1

[data]
dataset = "data.csv"
max_test = 16
min_samples = 2

[planner]
calibration = "none"
solver = "greedy"
"""


def _data_csv(rows: int = 120, label: Callable[[int], str] = lambda i: str(i % 2)) -> str:
    words = ("good", "bad", "fine", "poor", "great", "awful", "nice", "dull")
    lines = ["text,label"]
    for i in range(rows):
        lines.append(f"{words[i % 8]} film number {i} {words[(i * 3) % 8]},{label(i)}")
    return "\n".join(lines) + "\n"


# -- case set-ups: each edits the case folder (a copy of the base workspace) -----------------


def _write(name: str, text: str | bytes) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        path = d / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text)

    return setup


def _job(**changes: str) -> Callable[[Path], None]:
    """Replace ``key = ...`` lines of the job (or add them to their section)."""

    def setup(d: Path) -> None:
        text = (d / "job.toml").read_text()
        for dotted, value in changes.items():
            section, key = dotted.split(".")
            lines = text.splitlines()
            start = lines.index(f"[{section}]")
            for i in range(start + 1, len(lines)):
                if lines[i].startswith("["):
                    lines.insert(i, f"{key} = {value}")
                    break
                if lines[i].split(" = ")[0] == key:
                    lines[i] = f"{key} = {value}"
                    break
            else:
                lines.append(f"{key} = {value}")
            text = "\n".join(lines) + "\n"
        (d / "job.toml").write_text(text)

    return setup


def _fleet_edit(fn: Callable[[str], str], name: str = "fleet.csv") -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        (d / name).write_text(fn(FLEET))

    return setup


def _plan_edit(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        plan = json.loads((d / "plan.json").read_text())
        fn(plan)
        (d / "plan.json").write_text(json.dumps(plan, allow_nan=True))

    return setup


def _state_edit(fn: Callable[[dict], None], name: str = "state.json") -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        path = d / "run" / "checkpoints" / name
        state = json.loads(path.read_text())
        fn(state)
        path.write_text(json.dumps(state))

    return setup


def _truncate(rel: str, size: int) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        path = d / rel
        path.write_bytes(path.read_bytes()[:size])

    return setup


def _adapter_edit(fn: Callable[[AdapterState], AdapterState], digest: bool = True):
    """Rewrite the last checkpoint's arrays; with ``digest`` its recorded SHA-256 too (so
    that only the content checks can catch it)."""

    def setup(d: Path) -> None:
        ck = d / "run" / "checkpoints"
        npz = ck / "round_0002.npz"
        fn(AdapterState.from_npz(npz)).to_npz(npz)
        if digest:
            for name in ("state.json", "round_0002.json"):
                state = json.loads((ck / name).read_text())
                state["sha256"]["round_0002.npz"] = hashlib.sha256(npz.read_bytes()).hexdigest()
                (ck / name).write_text(json.dumps(state))

    return setup


def _poison(value: float, head: bool = False) -> Callable[[AdapterState], AdapterState]:
    def fn(state: AdapterState) -> AdapterState:
        if head:
            name = sorted(state.head)[0]
            arr = state.head[name].copy()
            arr.flat[0] = value
            return AdapterState(factors=dict(state.factors), head={**state.head, name: arr})
        key = sorted(state.factors)[0]
        a, b = state.factors[key]
        a = a.copy()
        a.flat[0] = value
        return AdapterState(factors={**state.factors, key: (a, b)}, head=dict(state.head))

    return fn


def _other_ranks(state: AdapterState) -> AdapterState:
    factors = {k: (a[:1].copy(), b[:, :1].copy()) for k, (a, b) in state.factors.items()}
    return AdapterState(factors=factors, head=dict(state.head))


def _fewer_layers(state: AdapterState) -> AdapterState:
    factors = {k: v for k, v in state.factors.items() if k[0] != 0}
    return AdapterState(factors=factors, head=dict(state.head))


def _chain(*setups: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        for s in setups:
            s(d)

    return setup


def _mkdir(name: str) -> Callable[[Path], None]:
    return lambda d: (d / name).mkdir(parents=True, exist_ok=True)


def _model_dir(**config: object) -> Callable[[Path], None]:
    base = {
        "model_type": "bert",
        "num_hidden_layers": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 2,
        "vocab_size": 100,
        "max_position_embeddings": 64,
    }
    base.update(config)
    return _write("mymodel/config.json", json.dumps({k: v for k, v in base.items() if v != ...}))


def _symlink_checkpoint(d: Path) -> None:
    ck = d / "run" / "checkpoints"
    (ck / "elsewhere.npz").symlink_to(d / "fleet.csv")
    state = json.loads((ck / "state.json").read_text())
    state["global_state"] = "elsewhere.npz"
    (ck / "state.json").write_text(json.dumps(state))


@dataclass(frozen=True, kw_only=True)
class Case:
    name: str
    argv: tuple[str, ...]
    code: int = 2
    must: tuple[str, ...] = ()  # substrings of the message: the file and the field or option
    setup: Callable[[Path], None] | None = None
    run_dir: bool = False  # copy the finished run into the case folder
    new_files: bool = False  # the command may add files (successes)
    executable: bool = False  # through the `legend` console script in its own process


PLAN = ("plan", "--fleet", "fleet.csv", "--model", "tiny-bert", "--format", "json")
RUN = ("run", "job.toml", "--quiet")
RESUME = ("run", "job.toml", "--resume", "run", "--rounds", "3", "--quiet")
REPORT_PLAN = ("report", "plan", "plan.json")
WHATIF = ("report", "whatif", "--fleet", "fleet.csv", "--model", "tiny-bert", "--models", "")

CASES: tuple[Case, ...] = (
    # -- data loss and escape ---------------------------------------------------------------
    Case(
        name="plan-out-is-fleet",
        argv=(*PLAN, "--out", "fleet.csv"),
        must=("--out", "fleet.csv", "input"),
        executable=True,
    ),
    Case(
        name="plan-out-is-fleet-other-spelling",
        argv=(*PLAN, "--out", "./sub/../fleet.csv"),
        must=("--out", "fleet.csv", "input"),
        setup=_mkdir("sub"),
    ),
    Case(
        name="plan-out-is-calibration",
        argv=(*PLAN, "--calibration", "cal.json", "--out", "cal.json"),
        must=("--out", "cal.json", "input"),
        setup=_write("cal.json", "{}"),
    ),
    Case(
        name="plan-out-is-topology",
        argv=(*PLAN, "--topology", "topo.toml", "--out", "topo.toml"),
        must=("--out", "topo.toml", "input"),
        setup=_write("topo.toml", ""),
    ),
    Case(
        name="plan-out-is-model-config",
        argv=(
            "plan",
            "--fleet",
            "fleet.csv",
            "--model",
            "mymodel/config.json",
            "--out",
            "mymodel/config.json",
        ),
        must=("--out", "config.json", "input"),
        setup=_model_dir(),
    ),
    Case(
        name="plan-out-is-folder",
        argv=(*PLAN, "--out", "sub"),
        must=("--out", "sub", "folder"),
        setup=_mkdir("sub"),
    ),
    Case(
        name="plan-out-under-file",
        argv=(*PLAN, "--out", "fleet.csv/plan.json"),
        must=("--out", "fleet.csv", "is a file"),
    ),
    Case(
        name="plan-out-in-proc",
        argv=(*PLAN, "--out", "/proc/legend/plan.json"),
        must=("--out", "/proc/legend/plan.json", "cannot be written"),
    ),
    Case(
        name="run-out-user-folder",
        argv=(*RUN, "--out", "mine"),
        must=("--out", "mine", "notes.txt", "not a legend run directory"),
        setup=_write("mine/notes.txt", "my notes"),
    ),
    Case(
        name="run-out-user-plans-folder",
        argv=(*RUN, "--out", "mine"),
        must=("--out", "mine", "plans"),
        setup=_write("mine/plans/keep.json", "{}"),
    ),
    Case(
        name="run-out-is-job-file", argv=(*RUN, "--out", "job.toml"), must=("job.toml", "is a file")
    ),
    Case(
        name="run-out-is-fleet-file",
        argv=(*RUN, "--out", "fleet.csv"),
        must=("fleet.csv", "is a file"),
        executable=True,
    ),
    Case(
        name="run-out-under-file",
        argv=(*RUN, "--out", "fleet.csv/run"),
        must=("fleet.csv/run", "cannot be written"),
    ),
    Case(
        name="run-out-in-proc",
        argv=(*RUN, "--out", "/proc/legend-run"),
        must=("/proc/legend-run", "cannot be written"),
    ),
    Case(
        name="run-out-holds-a-run",
        argv=(*RUN, "--out", "run"),
        must=("run", "already holds a run", "--resume"),
        run_dir=True,
    ),
    Case(
        name="job-name-escapes",
        argv=RUN,
        must=("job.toml", "job.name", "../../x"),
        setup=_job(**{"job.name": '"../../x"'}),
    ),
    Case(
        name="job-name-absolute",
        argv=RUN,
        must=("job.toml", "job.name", "/tmp/x"),
        setup=_job(**{"job.name": '"/tmp/x"'}),
    ),
    Case(
        name="job-name-slash",
        argv=RUN,
        must=("job.toml", "job.name"),
        setup=_job(**{"job.name": '"a/b"'}),
    ),
    Case(
        name="job-name-empty",
        argv=RUN,
        must=("job.toml", "job.name"),
        setup=_job(**{"job.name": '""'}),
    ),
    Case(
        name="job-name-dot",
        argv=RUN,
        must=("job.toml", "job.name"),
        setup=_job(**{"job.name": '".."'}),
    ),
    Case(
        name="state-names-file-outside",
        argv=RESUME,
        must=("state.json", "global_state", "../../fleet.csv"),
        run_dir=True,
        setup=_state_edit(lambda s: s.update(global_state="../../fleet.csv")),
    ),
    Case(
        name="state-names-absolute-path",
        argv=RESUME,
        must=("state.json", "global_state", "/etc/passwd"),
        run_dir=True,
        setup=_state_edit(lambda s: s.update(global_state="/etc/passwd")),
    ),
    Case(
        name="state-optimizer-outside",
        argv=RESUME,
        must=("state.json", "server_optimizer.m"),
        run_dir=True,
        setup=_state_edit(lambda s: s.update(server_optimizer={"step": 1, "m": "../m.npz"})),
    ),
    Case(
        name="state-link-leads-outside",
        argv=RESUME,
        must=("state.json", "elsewhere.npz", "outside"),
        run_dir=True,
        setup=_symlink_checkpoint,
    ),
    Case(
        name="run-file-link-leads-outside",
        argv=RESUME,
        must=("calibration.json", "leads outside"),
        run_dir=True,
        setup=lambda d: (d / "run" / "calibration.json").symlink_to(d / "fleet.csv"),
    ),
    Case(
        name="report-plan-out-is-plan",
        argv=(*REPORT_PLAN, "--out", "plan.json"),
        must=("--out", "plan.json", "input"),
    ),
    Case(
        name="report-plan-out-user-folder",
        argv=(*REPORT_PLAN, "--out", "mine"),
        must=("--out", "mine", "notes.txt"),
        setup=_write("mine/notes.txt", "x"),
    ),
    Case(
        name="report-plan-out-holds-plan",
        argv=(*REPORT_PLAN, "--out", "."),
        must=("--out", "plan.json"),
    ),
    Case(
        name="report-plan-out-is-file",
        argv=(*REPORT_PLAN, "--out", "fleet.csv"),
        must=("--out", "fleet.csv", "is a file"),
    ),
    Case(
        name="report-run-out-is-run",
        argv=("report", "run", "run", "--out", "run"),
        must=("--out", "run", "input"),
        run_dir=True,
    ),
    Case(
        name="report-whatif-out-under-file",
        argv=(*WHATIF, "--out", "fleet.csv/rep"),
        must=("--out", "fleet.csv", "is a file"),
    ),
    Case(
        name="report-out-in-proc",
        argv=(*REPORT_PLAN, "--out", "/proc/legend-report"),
        must=("--out", "/proc/legend-report", "cannot be written"),
    ),
    Case(
        name="calibrate-out-is-folder",
        argv=("calibrate", "--model", "tiny-bert", "--out", "sub"),
        must=("--out", "sub", "folder"),
        setup=_mkdir("sub"),
    ),
    Case(
        name="calibrate-out-under-file",
        argv=("calibrate", "--model", "tiny-bert", "--out", "fleet.csv/cal.json"),
        must=("--out", "fleet.csv", "is a file"),
    ),
    Case(
        name="failed-start-leaves-nothing",
        argv=(*RUN, "--out", "fresh"),
        must=("job.toml", "job.devices_per_round", "fleet.csv"),
        setup=_job(**{"job.devices_per_round": "50"}),
    ),
    # -- resume and checkpoints -------------------------------------------------------------
    Case(
        name="npz-truncated",
        argv=RESUME,
        must=("round_0002.npz", "damaged", "round 1"),
        run_dir=True,
        setup=_truncate("run/checkpoints/round_0002.npz", 100),
    ),
    Case(
        name="npz-empty",
        argv=RESUME,
        must=("round_0002.npz", "damaged", "round 1"),
        run_dir=True,
        setup=_truncate("run/checkpoints/round_0002.npz", 0),
        executable=True,
    ),
    Case(
        name="npz-missing",
        argv=RESUME,
        must=("round_0002.npz", "missing", "round 1"),
        run_dir=True,
        setup=lambda d: (d / "run/checkpoints/round_0002.npz").unlink(),
    ),
    Case(
        name="npz-truncated-digest-matches",
        argv=RESUME,
        must=("round_0002.npz", "damaged"),
        run_dir=True,
        setup=_chain(
            _truncate("run/checkpoints/round_0002.npz", 200), _state_edit(lambda s: s.pop("sha256"))
        ),
    ),
    Case(
        name="state-truncated",
        argv=RESUME,
        must=("state.json", "damaged", "round_0002.json"),
        run_dir=True,
        setup=_truncate("run/checkpoints/state.json", 40),
    ),
    Case(
        name="state-empty",
        argv=RESUME,
        must=("state.json", "damaged"),
        run_dir=True,
        setup=_truncate("run/checkpoints/state.json", 0),
    ),
    Case(
        name="state-not-an-object",
        argv=RESUME,
        must=("state.json", "object"),
        run_dir=True,
        setup=_write("run/checkpoints/state.json", "[1, 2]"),
    ),
    Case(
        name="state-without-round",
        argv=RESUME,
        must=("state.json", "`round`"),
        run_dir=True,
        setup=_state_edit(lambda s: s.pop("round")),
    ),
    Case(
        name="state-round-mismatch",
        argv=RESUME,
        must=("state.json", "progress.round"),
        run_dir=True,
        setup=_state_edit(lambda s: s.update(round=1)),
    ),
    Case(
        name="state-bad-estimates",
        argv=RESUME,
        must=("state.json", "damaged"),
        run_dir=True,
        setup=_state_edit(lambda s: s.update(estimates={"phone-1": [1.0]})),
    ),
    Case(
        name="npz-digest-differs",
        argv=RESUME,
        must=("round_0002.npz", "SHA-256", "state.json"),
        run_dir=True,
        setup=_adapter_edit(_poison(0.5), digest=False),
    ),
    Case(
        name="npz-nan",
        argv=RESUME,
        must=("round_0002.npz", "NaN"),
        run_dir=True,
        setup=_adapter_edit(_poison(math.nan)),
    ),
    Case(
        name="npz-inf-head",
        argv=RESUME,
        must=("round_0002.npz", "head", "NaN or infinity"),
        run_dir=True,
        setup=_adapter_edit(_poison(math.inf, head=True)),
    ),
    Case(
        name="npz-other-ranks",
        argv=RESUME,
        must=("round_0002.npz", "not of this job", "shape"),
        run_dir=True,
        setup=_adapter_edit(_other_ranks),
    ),
    Case(
        name="npz-other-layers",
        argv=RESUME,
        must=("round_0002.npz", "not of this job", "modules"),
        run_dir=True,
        setup=_adapter_edit(_fewer_layers),
    ),
    Case(
        name="resume-fleet-changed",
        argv=RESUME,
        must=("fleet", "fleet.csv", "inputs.json", "changed"),
        run_dir=True,
        setup=_fleet_edit(lambda t: t.replace("0.30,2,10,60", "0.30,2,10,61")),
    ),
    Case(
        name="resume-data-changed",
        argv=RESUME,
        must=("dataset", "data.csv", "changed"),
        run_dir=True,
        setup=_write("data.csv", _data_csv(121)),
    ),
    Case(
        name="resume-job-changed",
        argv=RESUME,
        must=("job differs", "config.toml", "job.rounds"),
        run_dir=True,
        setup=_job(**{"train.learning_rate": "0.01"}),
    ),
    Case(
        name="resume-inputs-damaged",
        argv=RESUME,
        must=("inputs.json", "damaged"),
        run_dir=True,
        setup=_truncate("run/inputs.json", 10),
    ),
    Case(
        name="resume-missing-folder",
        argv=("run", "job.toml", "--resume", "nowhere", "--quiet"),
        must=("nowhere", "does not exist"),
    ),
    Case(
        name="resume-not-a-run",
        argv=("run", "job.toml", "--resume", "sub", "--quiet"),
        must=("sub", "config.toml", "missing"),
        setup=_mkdir("sub"),
    ),
    Case(
        name="resume-without-rounds",
        argv=RESUME,
        must=("state.json", "no completed round"),
        run_dir=True,
        setup=lambda d: shutil.rmtree(d / "run" / "checkpoints"),
    ),
    # -- silent wrong results ---------------------------------------------------------------
    Case(
        name="run-rejects-every-update",
        argv=(*RUN, "--out", "bad"),
        code=5,
        must=("bad", "rejected", "training loss", "learning_rate"),
        setup=_job(**{"train.learning_rate": "1e30"}),
        new_files=True,
    ),
    Case(
        name="report-plan-negative-round-time",
        argv=(*REPORT_PLAN, "--out", "rep"),
        must=("plan.json", "round_time_s", "-1"),
        setup=_plan_edit(lambda p: p.update(round_time_s=-1.0)),
    ),
    Case(
        name="report-plan-nan",
        argv=(*REPORT_PLAN, "--out", "rep"),
        must=("plan.json", "objective_value", "nan"),
        setup=_plan_edit(lambda p: p.update(objective_value=math.nan)),
    ),
    Case(
        name="report-plan-ranks-off-grid",
        argv=(*REPORT_PLAN, "--out", "rep"),
        must=("plan.json", "ranks", "grid"),
        setup=_plan_edit(
            lambda p: p["devices"][0].update(ranks=[3] * len(p["devices"][0]["ranks"]))
        ),
    ),
    Case(
        name="report-plan-duplicate-device",
        argv=(*REPORT_PLAN, "--out", "rep"),
        must=("plan.json", "more than once"),
        setup=_plan_edit(lambda p: p["devices"].append(p["devices"][0])),
    ),
    Case(
        name="report-plan-num-layers",
        argv=(*REPORT_PLAN, "--out", "rep"),
        must=("plan.json", "num_layers", "7"),
        setup=_plan_edit(lambda p: p.update(num_layers=7)),
    ),
    Case(
        name="report-plan-unknown-model",
        argv=(*REPORT_PLAN, "--out", "rep"),
        must=("plan.json", "model", "no-such-model"),
        setup=_plan_edit(lambda p: p.update(model="no-such-model")),
    ),
    Case(
        name="report-plan-negative-device-time",
        argv=(*REPORT_PLAN, "--out", "rep"),
        must=("plan.json", "predicted_time_s"),
        setup=_plan_edit(lambda p: p["devices"][0].update(predicted_time_s=-3.0)),
    ),
    Case(
        name="report-plan-layer-outside",
        argv=(*REPORT_PLAN, "--out", "rep"),
        must=("plan.json", "layers", "outside"),
        setup=_plan_edit(
            lambda p: p["devices"][-1].update(layers=[9] * len(p["devices"][-1]["layers"]))
        ),
    ),
    Case(
        name="report-plan-fleet-changed",
        argv=(*REPORT_PLAN, "--fleet", "fleet2.csv", "--out", "rep"),
        must=("plan.json", "fleet2.csv", "memory"),
        setup=_fleet_edit(lambda t: t.replace("2.0,50,200", "0.0001,50,200"), "fleet2.csv"),
    ),
    Case(
        name="report-plan-fleet-samples-changed",
        argv=(*REPORT_PLAN, "--fleet", "fleet2.csv", "--out", "rep"),
        must=("plan.json", "fleet2.csv", "digest"),
        setup=_fleet_edit(lambda t: t.replace(",60,phone", ",70,phone"), "fleet2.csv"),
    ),
    Case(
        name="report-plan-fleet-lacks-device",
        argv=(*REPORT_PLAN, "--fleet", "fleet2.csv", "--out", "rep"),
        must=("fleet2.csv", "lacks", "phone-1"),
        setup=_fleet_edit(
            lambda t: "\n".join(x for x in t.splitlines() if not x.startswith("phone-1")) + "\n",
            "fleet2.csv",
        ),
    ),
    Case(
        name="plan-ranks-wider-than-layer",
        argv=(*PLAN, "--ranks", "2,128,1024", "--out", "p.json"),
        must=("--ranks", "128", "tiny-bert", "64"),
    ),
    Case(
        name="job-ranks-wider-than-layer",
        argv=RUN,
        must=("job.toml", "train.ranks", "128"),
        setup=_job(**{"train.ranks": "[2, 128]"}),
    ),
    Case(
        name="fleet-samples-1e300-csv",
        argv=(*PLAN, "--out", "p.json"),
        must=("fleet.csv", "row 1", "num_samples", "1e300"),
        setup=_fleet_edit(lambda t: t.replace("0.30,2,10,60", "0.30,2,10,1e300")),
    ),
    Case(
        name="fleet-samples-1e300-toml",
        argv=("plan", "--fleet", "fleet.toml", "--model", "tiny-bert", "--out", "p.json"),
        must=("fleet.toml", "num_samples", "1e+300"),
        setup=_write(
            "fleet.toml",
            '[[devices]]\ndevice_id = "a"\ntflops = 1.0\nmemory_gb = 1.0\n'
            "uplink_mbps = 1.0\ndownlink_mbps = 1.0\nnum_samples = 1e300\n",
        ),
    ),
    Case(
        name="plan-server-mbps-inf",
        argv=(*PLAN, "--server-mbps", "inf", "--out", "p.json"),
        must=("--server-mbps", "inf"),
    ),
    Case(
        name="plan-server-mbps-nan",
        argv=(*PLAN, "--server-mbps", "nan", "--out", "p.json"),
        must=("--server-mbps", "nan"),
    ),
    Case(
        name="plan-server-mbps-negative",
        argv=(*PLAN, "--server-mbps", "-5", "--out", "p.json"),
        must=("--server-mbps", "-5"),
    ),
    Case(
        name="plan-deadline-inf",
        argv=(*PLAN, "--objective", "deadline", "--deadline-s", "inf", "--out", "p.json"),
        must=("--deadline-s", "inf"),
    ),
    Case(
        name="plan-time-limit-zero",
        argv=(*PLAN, "--time-limit-s", "0", "--out", "p.json"),
        must=("--time-limit-s", "0"),
    ),
    Case(
        name="data-fractional-label-csv",
        argv=RUN,
        must=("data.csv", "row 2", "label", "0.5", "data.dataset"),
        setup=_write("data.csv", _data_csv(label=lambda i: "0.5" if i == 0 else str(i % 2))),
    ),
    Case(
        name="data-fractional-label-jsonl",
        argv=RUN,
        must=("data.jsonl", "line 1", "label", "0.5"),
        setup=_chain(
            _write(
                "data.jsonl",
                '{"text": "a", "label": 0.5}\n'
                + "".join(f'{{"text": "t{i}", "label": {i % 2}}}\n' for i in range(60)),
            ),
            _job(**{"data.dataset": '"data.jsonl"'}),
        ),
    ),
    Case(
        name="devices-per-round-above-fleet",
        argv=RUN,
        must=("job.toml", "job.devices_per_round", "50", "6 devices"),
        setup=_job(**{"job.devices_per_round": "50"}),
    ),
    # -- messages ---------------------------------------------------------------------------
    Case(
        name="fleet-with-bom",
        argv=(*PLAN, "--out", "p.json"),
        code=0,
        setup=_write("fleet.csv", b"\xef\xbb\xbf" + FLEET.encode()),
        new_files=True,
    ),
    Case(
        name="job-with-bom-is-read",
        argv=RUN,
        must=("job.toml", "job.devices_per_round"),
        setup=_chain(
            _job(**{"job.devices_per_round": "50"}),
            lambda d: (d / "job.toml").write_bytes(b"\xef\xbb\xbf" + (d / "job.toml").read_bytes()),
        ),
    ),
    Case(
        name="plan-file-with-bom-is-read",
        argv=(*REPORT_PLAN, "--out", "rep"),
        must=("plan.json", "round_time_s"),
        setup=_chain(
            _plan_edit(lambda p: p.update(round_time_s=-2.0)),
            lambda d: (d / "plan.json").write_bytes(
                b"\xef\xbb\xbf" + (d / "plan.json").read_bytes()
            ),
        ),
    ),
    Case(
        name="topology-not-utf8",
        argv=(*PLAN, "--topology", "topo.toml", "--out", "p.json"),
        must=("topo.toml", "UTF-8"),
        setup=_write("topo.toml", b"\xff\xfe\x00links"),
    ),
    Case(
        name="fleet-semicolons",
        argv=(*PLAN, "--out", "p.json"),
        must=("fleet.csv", "';'", "comma-separated"),
        setup=_fleet_edit(lambda t: t.replace(",", ";")),
    ),
    Case(
        name="fleet-tabs",
        argv=(*PLAN, "--out", "p.json"),
        must=("fleet.csv", "'\\t'", "comma-separated"),
        setup=_fleet_edit(lambda t: t.replace(",", "\t")),
    ),
    Case(
        name="fleet-is-folder",
        argv=("plan", "--fleet", "sub", "--model", "tiny-bert", "--out", "p.json"),
        must=("--fleet", "sub", "folder"),
        setup=_mkdir("sub"),
    ),
    Case(
        name="plan-topology-is-folder",
        argv=(*PLAN, "--topology", "sub", "--out", "p.json"),
        must=("--topology", "sub", "folder"),
        setup=_mkdir("sub"),
    ),
    Case(
        name="plan-calibration-is-folder",
        argv=(*PLAN, "--calibration", "sub", "--out", "p.json"),
        must=("--calibration", "sub", "folder"),
        setup=_mkdir("sub"),
    ),
    Case(
        name="job-file-is-folder",
        argv=("run", "sub", "--quiet"),
        must=("sub", "folder"),
        setup=_mkdir("sub"),
    ),
    Case(
        name="job-fleet-is-folder",
        argv=RUN,
        must=("job.toml", "job.fleet", "folder"),
        setup=_chain(_mkdir("fl"), _job(**{"job.fleet": '"fl"'})),
    ),
    Case(
        name="job-dataset-is-folder",
        argv=RUN,
        must=("job.toml", "data.dataset", "folder"),
        setup=_chain(_mkdir("dd"), _job(**{"data.dataset": '"dd"'})),
    ),
    Case(
        name="job-not-toml",
        argv=RUN,
        must=("job.toml", "not valid TOML"),
        setup=_write("job.toml", "[job\n"),
    ),
    Case(
        name="model-config-bad-type",
        argv=("plan", "--fleet", "fleet.csv", "--model", "mymodel", "--out", "p.json"),
        must=("mymodel/config.json", "model_type"),
        setup=_model_dir(model_type="nope"),
    ),
    Case(
        name="model-config-bad-field",
        argv=("plan", "--fleet", "fleet.csv", "--model", "mymodel", "--out", "p.json"),
        must=("mymodel/config.json", "hidden_size", "-1"),
        setup=_model_dir(hidden_size=-1),
    ),
    Case(
        name="model-config-not-json",
        argv=("plan", "--fleet", "fleet.csv", "--model", "mymodel", "--out", "p.json"),
        must=("mymodel/config.json", "JSON"),
        setup=_write("mymodel/config.json", "{oops"),
    ),
    Case(
        name="data-wrong-columns",
        argv=RUN,
        must=("job.toml", "data.dataset", "data.csv", "'text'"),
        setup=_write("data.csv", "review,label\nnice,1\nbad,0\n"),
    ),
    Case(
        name="data-no-advice-for-python-arguments",
        argv=RUN,
        must=("rename them in the file",),
        setup=_write("data.csv", "review,label\nnice,1\nbad,0\n"),
    ),
    Case(
        name="data-max-train-too-small",
        argv=RUN,
        must=("job.toml", "data.max_train", "1"),
        setup=_job(**{"data.max_train": "1"}),
    ),
    Case(
        name="data-too-few-rows-for-devices",
        argv=RUN,
        must=("job.toml", "job.fleet", "data.min_samples"),
        setup=_chain(_write("data.csv", _data_csv(12)), _job(**{"data.min_samples": "8"})),
    ),
    Case(
        name="calibrate-cuda-on-cpu-torch",
        argv=("calibrate", "--model", "tiny-bert", "--device", "cuda", "--out", "cal.json"),
        must=("--device", "cuda", "cpu"),
    ),
    Case(
        name="calibrate-unknown-device",
        argv=("calibrate", "--model", "tiny-bert", "--device", "abacus", "--out", "cal.json"),
        must=("--device", "abacus"),
    ),
    Case(
        name="report-plan-file-is-folder",
        argv=("report", "plan", "sub", "--out", "rep"),
        must=("plan", "sub", "folder"),
        setup=_mkdir("sub"),
    ),
    Case(
        name="report-run-missing",
        argv=("report", "run", "nowhere", "--out", "rep"),
        must=("nowhere", "does not exist"),
    ),
    # -- large inputs -----------------------------------------------------------------------
    Case(
        name="whatif-fleet-scale-1e6",
        argv=(*WHATIF, "--fleet-scales", "1e6", "--out", "rep"),
        must=("--fleet-scales", "1e+06"),
    ),
    Case(
        name="whatif-fleet-scale-inf",
        argv=(*WHATIF, "--fleet-scales", "inf", "--out", "rep"),
        must=("--fleet-scales", "inf"),
    ),
    Case(
        name="whatif-fleet-scale-negative",
        argv=(*WHATIF, "--fleet-scales", "-1", "--out", "rep"),
        must=("--fleet-scales", "-1"),
    ),
    Case(
        name="whatif-bandwidth-zero",
        argv=(*WHATIF, "--bandwidth-scales", "0", "--out", "rep"),
        must=("--bandwidth-scales", "0"),
    ),
    Case(
        name="whatif-too-many-points",
        argv=(*WHATIF, "--bandwidth-scales", ",".join(["1"] * 500), "--out", "rep"),
        must=("--bandwidth-scales", "500"),
    ),
    Case(
        name="whatif-deadline-points",
        argv=(*WHATIF, "--deadline-points", "100000", "--out", "rep"),
        must=("--deadline-points", "100000"),
    ),
)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The base files and one finished two-round run of the tiny job."""
    base = tmp_path_factory.mktemp("refusals") / "base"
    base.mkdir()
    (base / "fleet.csv").write_text(FLEET)
    (base / "job.toml").write_text(JOB)
    (base / "data.csv").write_text(_data_csv())
    legend = Path(sys.executable).with_name("legend")
    for argv in (
        [*PLAN, "--out", "plan.json"],
        ["run", "job.toml", "--out", "run", "--quiet"],
    ):
        done = subprocess.run(
            [str(legend), *argv], cwd=base, env=ENV, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr
    return base


def _case_dir(base: Path, case: Case) -> Path:
    d = base.parent / "cases" / case.name
    d.mkdir(parents=True)
    for name in ("fleet.csv", "job.toml", "data.csv", "plan.json"):
        shutil.copy(base / name, d / name)
    if case.run_dir:
        shutil.copytree(base / "run", d / "run", symlinks=True)
    if case.setup is not None:
        case.setup(d)
    return d


@pytest.fixture(scope="module")
def results(workspace: Path) -> dict[str, dict]:
    """Every in-process case run through the entry point in one subprocess."""
    listed = []
    for case in CASES:
        d = _case_dir(workspace, case)
        listed.append({"name": case.name, "cwd": str(d), "argv": list(case.argv)})
    cases_file = workspace.parent / "cases.json"
    results_file = workspace.parent / "results.json"
    cases_file.write_text(
        json.dumps([c for c, case in zip(listed, CASES, strict=True) if not case.executable])
    )
    done = subprocess.run(
        [sys.executable, str(HERE / "refusals_driver.py"), str(cases_file), str(results_file)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(results_file.read_text())
    from refusals_driver import _tree

    legend = Path(sys.executable).with_name("legend")
    for case, item in zip(CASES, listed, strict=True):
        if not case.executable:
            continue
        cwd = Path(item["cwd"])
        before = _tree(cwd)
        proc = subprocess.run(
            [str(legend), *case.argv], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300
        )
        out[case.name] = {
            "code": proc.returncode,
            "stdout": proc.stdout,
            "stderr": proc.stderr,
            "traceback": "",
            "before": before,
            "after": _tree(cwd),
        }
    return out


def test_the_table_covers_every_class() -> None:
    assert len(CASES) >= 80
    assert len({c.name for c in CASES}) == len(CASES)
    assert sum(c.executable for c in CASES) >= 3


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_refusal(case: Case, results: dict[str, dict]) -> None:
    got = results[case.name]
    text = got["stdout"] + got["stderr"]
    assert not got["traceback"], got["traceback"]
    assert "Traceback" not in text, text
    assert got["code"] == case.code, text
    for needle in case.must:
        assert needle in got["stderr"], f"{needle!r} not in the message: {got['stderr']}"
    if case.code != 0:
        errors = [line for line in got["stderr"].splitlines() if line.startswith("error:")]
        assert len(errors) == 1, got["stderr"]
    before, after = got["before"], got["after"]
    changed = sorted(k for k in before if after.get(k) != before[k])
    assert not changed, f"files changed or removed: {changed}"
    if not case.new_files:
        assert sorted(set(after) - set(before)) == [], "the refused command left files behind"


def test_long_text_is_cut_before_tokenizing() -> None:
    """A 4 MB line costs no more than a short one and gives the same tokens as its start."""
    import time

    from legend.federation.training import tokenize
    from legend.models.loaders import load_tokenizer

    tokenizer = load_tokenizer("tiny-bert")
    long_text = "word " * 800_000
    started = time.perf_counter()
    split = tokenize(tokenizer, [long_text, "short"], np.array([0, 1]), 16)
    assert time.perf_counter() - started < 5.0
    reference = tokenize(tokenizer, ["word " * 64, "short"], np.array([0, 1]), 16)
    assert (split.tensors["input_ids"] == reference.tensors["input_ids"]).all()
