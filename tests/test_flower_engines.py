"""The tiny job on Flower: simulation runtime and a real SuperLink with SuperNodes.

Every test runs real Flower processes on 127.0.0.1 (SuperLink, one SuperNode per device,
legend node workers, the ServerApp process the SuperLink starts) and the real tiny model and
data, and checks the final global adapter against the in-process engine's for the same seed.
All waits are bounded and every process is stopped by id in a ``finally``/fixture teardown;
the tests assert that none is left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from strategies import csv_rows

pytest.importorskip("flwr")

from legend.federation import flower_engine
from legend.federation.adapters import AdapterState
from legend.federation.flower.errors import FlowerEngineError, FlowerInputError
from legend.federation.flower_engine import (
    descendants,
    flower_env,
    pid_alive,
    process_stats,
    start_local_federation,
)
from legend.federation.job import load_job
from legend.planner.profiles import load_fleet

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny.toml"
ROUNDS = 2
TOL = 1e-5


def _max_diff(a: AdapterState, b: AdapterState) -> float:
    assert a.factors.keys() == b.factors.keys() and a.head.keys() == b.head.keys()
    diffs = [
        max(float(np.abs(x - u).max()), float(np.abs(y - v).max()))
        for (x, y), (u, v) in ((a.factors[k], b.factors[k]) for k in a.factors)
    ]
    diffs += [float(np.abs(a.head[k] - b.head[k]).max()) for k in a.head]
    return max(diffs)


def _plan_columns(run_dir: Path) -> list[tuple[str, ...]]:
    return [
        (r["round"], r["device_id"], r["status"], r["layers"], r["ranks"], r["samples"])
        for r in csv_rows(run_dir / "devices.csv")
    ]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The in-process engine's run of the tiny job (2 rounds)."""
    from legend.federation.runner import run_job

    out = tmp_path_factory.mktemp("inprocess") / "run"
    cfg = load_job(TINY, job__rounds=ROUNDS)
    result = run_job(cfg, out, show_progress=False)
    plans = _plan_columns(out)
    layer_sets = {p[3] for p in plans}
    rank_sets = {p[4] for p in plans}
    assert len(layer_sets) > 1 and len(rank_sets) > 1, "the tiny job must plan heterogeneously"
    return result, out


def _session_processes(sid: int) -> list[int]:
    """Live processes whose session id is ``sid`` (what a process group leaves behind)."""
    stats = process_stats().items()
    return [pid for pid, fields in stats if fields[0] != "Z" and int(fields[3]) == sid]


# -- simulation runtime --------------------------------------------------------------------


def test_flower_simulation_matches_the_in_process_engine(reference, tmp_path):
    result, ref_dir = reference
    out = tmp_path / "sim"
    cmd = [
        sys.executable,
        "-m",
        "legend.federation.cli",
        "run",
        str(TINY),
        "--engine",
        "flower-sim",
        "--rounds",
        str(ROUNDS),
        "--out",
        str(out),
        "--quiet",
    ]
    env = flower_env()
    env["LEGEND_FLOWER_ROUND_TIMEOUT_S"] = "120"
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = output.decode(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    # Ray's helpers belong to the run's session: none may outlive it.
    deadline = time.monotonic() + 20
    while _session_processes(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = _session_processes(proc.pid)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left behind by the simulation: {left}"

    final = AdapterState.from_npz(out / "checkpoints" / f"round_{ROUNDS:04d}.npz")
    assert _max_diff(final, result.global_state) <= TOL
    assert _plan_columns(out) == _plan_columns(ref_dir)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["engine"] == "flower-sim" and summary["rounds"] == ROUNDS
    assert (out / "adapter" / "adapter_config.json").is_file()


# -- deployment: one local federation for the tests below ------------------------------------


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """A SuperLink and one SuperNode per device of the tiny fleet, on 127.0.0.1."""
    ids = list(load_fleet(load_job(TINY).job.fleet).device_ids)
    fed = start_local_federation(
        ids, state_dir=tmp_path_factory.mktemp("federation"), workers=2, ready_timeout_s=120
    )
    try:
        yield fed
    finally:
        pids = fed.pids()
        fed.stop()
        left = [p for p in pids if pid_alive(p)]
        assert not left, f"processes left behind by the federation: {left}"


def _deploy(cfg, out, fed, **kwargs):
    return flower_engine.run(
        cfg.override("job", engine="flower-deploy"),
        out,
        superlink=fed.address,
        show_progress=False,
        # Sized to the tiny job: the query includes each worker's first model load (seconds).
        query_timeout_s=kwargs.pop("query_timeout_s", 60.0),
        node_wait_s=kwargs.pop("node_wait_s", 30.0),
        **kwargs,
    )


def test_flower_deployment_matches_the_in_process_engine(reference, federation, tmp_path):
    result, ref_dir = reference
    out = tmp_path / "deploy"
    cfg = load_job(TINY, job__rounds=ROUNDS)
    deployed = _deploy(cfg, out, federation, round_timeout_s=120.0)
    assert deployed.rounds_completed == ROUNDS
    assert _max_diff(deployed.global_state, result.global_state) <= TOL
    assert _plan_columns(out) == _plan_columns(ref_dir)
    assert deployed.summary["engine"] == "flower-deploy"
    # Each node worker loaded the model once and kept it for every round and node.
    nodes = csv_rows(out / "flower_nodes.csv")
    assert {r["round"] for r in nodes} == {str(t) for t in range(1, ROUNDS + 1)}
    assert len({r["pid"] for r in nodes}) == len(federation.workers)
    assert {r["model_loads"] for r in nodes} == {"1"}
    # The ServerApp process the SuperLink started is gone after the run.
    serverapps = [
        p
        for p in descendants(federation.superlink.pid)
        if "flwr-serverapp" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")
        and pid_alive(p)
    ]
    deadline = time.monotonic() + 15
    while serverapps and time.monotonic() < deadline:
        time.sleep(0.5)
        serverapps = [p for p in serverapps if pid_alive(p)]
    assert not serverapps


def test_nodes_train_from_the_prefix_cache_as_the_in_process_engine(federation, tmp_path):
    """``train.cache_prefix`` reaches the nodes (in the job's TOML) and the feature pass in
    the instruction: the nodes' updates and clock are the in-process engine's."""
    from legend.federation.runner import run_job

    cfg = load_job(TINY, job__rounds=ROUNDS, train__cache_prefix=True)
    reference = run_job(cfg, tmp_path / "inprocess", show_progress=False)
    out = tmp_path / "deploy"
    deployed = _deploy(cfg, out, federation, round_timeout_s=120.0)
    assert deployed.rounds_completed == ROUNDS
    assert _max_diff(deployed.global_state, reference.global_state) <= TOL
    assert _plan_columns(out) == _plan_columns(tmp_path / "inprocess")
    ref_rows = csv_rows(tmp_path / "inprocess" / "devices.csv")
    got = [float(r["observed_compute_s"]) for r in csv_rows(out / "devices.csv")]
    want = [float(r["observed_compute_s"]) for r in ref_rows]
    np.testing.assert_allclose(got, want, rtol=1e-9)
    # the tiny fleet's devices adapt below full depth, so some of them computed features
    state = json.loads((out / "checkpoints" / "state.json").read_text())
    assert state["progress"]["prefix_built"]


def _serverapp_pids(fed) -> list[int]:
    out = []
    for pid in descendants(fed.superlink.pid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "flwr-serverapp" in cmd and pid_alive(pid):
            out.append(pid)
    return out


def _watch(path: Path, condition, action, stop: threading.Event, timeout_s: float = 300):
    def loop() -> None:
        deadline = time.monotonic() + timeout_s
        while not stop.is_set() and time.monotonic() < deadline:
            if condition(path):
                action()
                return
            time.sleep(0.2)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def _rounds_done(run_dir: Path) -> int:
    path = run_dir / "checkpoints" / "state.json"
    if not path.is_file():
        return 0
    try:
        return int(json.loads(path.read_text())["round"])
    except (ValueError, KeyError):
        return 0


def test_server_killed_then_resumed_continues_from_the_last_round(reference, federation, tmp_path):
    result, _ = reference
    out = tmp_path / "killed"
    cfg = load_job(TINY, job__rounds=ROUNDS)
    killed: list[int] = []

    def kill_server() -> None:
        for pid in _serverapp_pids(federation):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    # Kill it while round 2's messages are on their way: SuperNodes that receive one after
    # the run stopped keep a task whose message never arrives, and the federation must
    # still serve the resumed run (and the tests after this one).
    stop = threading.Event()
    watcher = _watch(out, lambda d: (d / "plans" / "round_0002.json").is_file(), kill_server, stop)
    try:
        with pytest.raises(FlowerEngineError, match="--resume"):
            _deploy(cfg, out, federation, round_timeout_s=120.0)
    finally:
        stop.set()
        watcher.join(timeout=5)
    assert killed, "the ServerApp process was not found"
    assert _rounds_done(out) == 1
    assert not (out / "summary.json").exists() or not json.loads(
        (out / "summary.json").read_text()
    ).get("finished")

    resumed = _deploy(cfg, out, federation, resume=True, round_timeout_s=120.0)
    assert resumed.rounds_completed == ROUNDS
    rounds = [r["round"] for r in csv_rows(out / "rounds.csv")]
    assert rounds == [str(t) for t in range(1, ROUNDS + 1)]
    # Nothing lost, nothing repeated: the result equals an uninterrupted run.
    assert _max_diff(resumed.global_state, result.global_state) <= TOL


def test_node_whose_profile_is_missing_from_the_job_is_named(federation, tmp_path):
    """A SuperNode plays a device the job's fleet lacks: the run stops before round 1 and
    names it (malformed node-config values take the same path; see test_flower.py)."""
    fleet = tmp_path / "fleet.csv"
    lines = (ROOT / "examples" / "tiny_fleet.csv").read_text().splitlines()
    fleet.write_text("\n".join(line for line in lines if not line.startswith("laptop-2")) + "\n")
    cfg = load_job(TINY, job__rounds=1, job__fleet=str(fleet))
    start = time.monotonic()
    with pytest.raises(FlowerInputError) as info:
        _deploy(cfg, tmp_path / "run", federation, round_timeout_s=30.0, node_wait_s=30.0)
    assert time.monotonic() - start < 200
    text = str(info.value)
    assert "'laptop-2' is not a device of the job's fleet" in text and "profile is missing" in text
    assert info.value.exit_code == 2
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_node_killed_mid_round_is_dropped_and_not_planned_again(federation, tmp_path):
    """Runs last: it kills a SuperNode of the shared federation."""
    out = tmp_path / "node-killed"
    cfg = load_job(TINY, job__rounds=ROUNDS)
    victim = "laptop-2"
    stop = threading.Event()
    watcher = _watch(
        out,
        lambda d: (d / "plans" / "round_0001.json").is_file(),
        lambda: federation.kill_node(victim),
        stop,
    )
    start = time.monotonic()
    try:
        res = _deploy(cfg, out, federation, round_timeout_s=15.0)
    finally:
        stop.set()
        watcher.join(timeout=5)
    assert time.monotonic() - start < 240
    assert res.rounds_completed == ROUNDS
    rows = csv_rows(out / "devices.csv")
    first = {r["device_id"]: r["status"] for r in rows if r["round"] == "1"}
    second = {r["device_id"]: r["status"] for r in rows if r["round"] == "2"}
    assert first[victim] == "dropped"
    assert all(s == "ok" for d, s in first.items() if d != victim)
    assert victim not in second and set(second.values()) == {"ok"} and len(second) == 5
    rounds = csv_rows(out / "rounds.csv")
    assert [r["dropped"] for r in rounds] == ["1", "0"]
    assert [r["participants"] for r in rounds] == ["5", "5"]
    for t in (1, 2):
        assert (out / "checkpoints" / f"round_{t:04d}.npz").is_file()
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert "no reply from laptop-2" in (out / "run.log").read_text()
