"""End-to-end federated runs on the tiny model: every method, resume, faults, bad job files."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from strategies import csv_rows

from legend.federation.adapters import AdapterState
from legend.federation.cli import main
from legend.federation.job import METHODS, JobError, load_job
from legend.federation.runner import prepare, run_job

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny.toml"


@pytest.fixture(scope="module")
def tiny_cfg():
    return load_job(TINY, job__rounds=2)


@pytest.fixture(scope="module")
def prepared(tiny_cfg):
    """Model, tokenized data and partitions loaded once for every tiny run of this module."""
    return prepare(tiny_cfg, calibration=None)


def test_the_validation_split_is_held_out_of_every_device(tiny_cfg, prepared):
    from legend.federation.runner import load_job_data

    data = load_job_data(tiny_cfg, prepared.fleet)
    held = set(data.validation.tolist())
    assert held and prepared.validation is not None
    assert len(held) == len(prepared.validation.labels)
    assert all(held.isdisjoint(part.tolist()) for part in data.parts)


def _same_data(cfg, prepared):
    # The prepared bundle must match the job it is reused for.
    assert cfg.job.model == prepared.cfg.job.model
    assert cfg.job.seed == prepared.cfg.job.seed


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_end_to_end(method, tiny_cfg, prepared, tmp_path):
    cfg = tiny_cfg.override("job", method=method)
    _same_data(cfg, prepared)
    result = run_job(cfg, tmp_path / method, prepared=prepared, show_progress=False)
    out = result.out_dir
    assert result.rounds_completed == 2
    rounds = csv_rows(out / "rounds.csv")
    devices = csv_rows(out / "devices.csv")
    assert [int(r["round"]) for r in rounds] == [1, 2]
    assert len(devices) == 2 * 6
    for r in rounds:
        assert 0.0 <= float(r["accuracy"]) <= 1.0
        assert float(r["sim_time_s"]) > 0 and float(r["host_time_s"]) > 0
        assert int(r["participants"]) >= 1
        assert float(r["bytes_up"]) > 0
        # the progress model's prediction and the validation split it is checked against
        assert float(r["predicted_progress"]) > 0
        assert math.isfinite(float(r["val_loss"])) and math.isfinite(float(r["val_loss_drop"]))
    for t in (1, 2):
        plan = json.loads((out / "plans" / f"round_{t:04d}.json").read_text())
        assert plan["status"] in ("OPTIMAL", "FEASIBLE")
        assert len(plan["devices"]) == 6
    trained = [d for d in devices if d["status"] == "ok"]
    assert trained and all(math.isfinite(float(d["train_loss"])) for d in trained)
    if method in ("uniform", "hetlora", "rank-only"):
        assert all(d["depth"] == "4" for d in trained)
    if method == "uniform":
        assert {d["ranks"] for d in trained} == {"4 4 4 4"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == method and summary["finished"] is True
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert all(
        np.isfinite(a).all() and np.isfinite(b).all()
        for a, b in result.global_state.factors.values()
    )


def test_exact_plans_are_heterogeneous(tiny_cfg, prepared, tmp_path):
    result = run_job(tiny_cfg, tmp_path / "exact", prepared=prepared, show_progress=False)
    devices = [d for d in csv_rows(result.out_dir / "devices.csv") if d["round"] == "1"]
    configs = {(d["layers"], d["ranks"]) for d in devices}
    assert len(configs) >= 2, configs
    # Slow phones get shallower adapters than laptops.
    depth = {d["device_id"]: int(d["depth"]) for d in devices}
    assert depth["phone-1"] <= depth["laptop-1"]


def test_adapter_loads_with_peft(tiny_cfg, prepared, tmp_path):
    import torch
    from peft import PeftModel

    from legend.models.loaders import load_base_model

    result = run_job(tiny_cfg, tmp_path / "run", prepared=prepared, show_progress=False)
    base = load_base_model("tiny-bert", num_labels=2, seed=tiny_cfg.job.seed)
    model = PeftModel.from_pretrained(base, str(result.out_dir / "adapter"))
    batch = prepared.test.batch(np.arange(16))
    batch.pop("labels")
    with torch.no_grad(), prepared.host.evaluation_model(result.global_state) as reference:
        expected = reference(**batch).logits
    with torch.no_grad():
        got = model(**batch).logits
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("server_optimizer", ["none", "adam", "momentum"])
def test_resume_equals_uninterrupted_run(server_optimizer, tiny_cfg, prepared, tmp_path):
    cfg = tiny_cfg.override("job", rounds=3).override(
        "federation", server_optimizer=server_optimizer, server_lr=0.05
    )
    if server_optimizer != "none":
        cfg = cfg.override("train", optimizer="sgd", loss="logit-adjusted", learning_rate=0.5)
    full = run_job(cfg, tmp_path / "full", prepared=prepared, show_progress=False)
    part = run_job(cfg, tmp_path / "part", prepared=prepared, show_progress=False, stop_after=1)
    assert part.rounds_completed == 1
    assert not (tmp_path / "part" / "adapter").exists()
    resumed = run_job(cfg, tmp_path / "part", prepared=prepared, show_progress=False, resume=True)
    assert resumed.rounds_completed == 3
    for key, (a, b) in full.global_state.factors.items():
        a2, b2 = resumed.global_state.factors[key]
        np.testing.assert_allclose(a2, a, atol=1e-6)
        np.testing.assert_allclose(b2, b, atol=1e-6)
    rows_full = csv_rows(tmp_path / "full" / "rounds.csv")
    rows_resumed = csv_rows(tmp_path / "part" / "rounds.csv")
    assert [r["round"] for r in rows_resumed] == ["1", "2", "3"]
    assert [r["accuracy"] for r in rows_resumed] == [r["accuracy"] for r in rows_full]
    assert [r["bytes_up"] for r in rows_resumed] == [r["bytes_up"] for r in rows_full]
    # the progress model is part of the checkpoint: the resumed run predicts the same
    assert [r["predicted_progress"] for r in rows_resumed] == [
        r["predicted_progress"] for r in rows_full
    ]
    state = json.loads((tmp_path / "part" / "checkpoints" / "state.json").read_text())
    assert (state["server_optimizer"] is None) == (server_optimizer == "none")


def test_resumed_clock_uses_the_recorded_server_time(tiny_cfg, prepared, tmp_path):
    """The server's time per round is measured once and recorded with the checkpoint, so
    two resumes of one interrupted run keep the same simulated clock."""
    cfg = tiny_cfg.override("job", rounds=3)
    run_job(cfg, tmp_path / "a", prepared=prepared, show_progress=False, stop_after=1)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for name in ("a", "b"):
        run_job(cfg, tmp_path / name, prepared=prepared, show_progress=False, resume=True)
    a, b = csv_rows(tmp_path / "a" / "rounds.csv"), csv_rows(tmp_path / "b" / "rounds.csv")
    assert [r["sim_clock_s"] for r in a] == [r["sim_clock_s"] for r in b]
    assert len({r["server_time_s"] for r in a}) == 1
    state = json.loads((tmp_path / "a" / "checkpoints" / "state.json").read_text())
    assert state["progress"]["server_time_s"] == float(a[0]["server_time_s"])
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["sim_time_s"] == float(a[-1]["sim_clock_s"])


def test_the_first_rounds_planning_time_is_the_fastest_of_its_repeats(
    tiny_cfg, prepared, tmp_path, monkeypatch
):
    """A busy host only slows planning down: the server's planning time is the fastest of
    PLAN_TIMING_REPEATS timed plans after an untimed one, so one slow solve does not stay
    on every round of the simulated clock."""
    from legend.federation import core, session

    delays = iter([0.5, 0.4, 0.05, 0.3])  # untimed, then the three timed plans
    real_plan = core.ServerCore.plan

    def slow_plan(self, round_index, device_ids):
        _burn_cpu(next(delays, 0.0))
        return real_plan(self, round_index, device_ids)

    monkeypatch.setattr(core.ServerCore, "plan", slow_plan)
    assert session.PLAN_TIMING_REPEATS == 3
    run_job(
        tiny_cfg.override("job", rounds=1), tmp_path / "run", prepared=prepared, show_progress=False
    )
    server_time = float(csv_rows(tmp_path / "run" / "rounds.csv")[0]["server_time_s"])
    assert 0.05 <= server_time < 0.3


def _burn_cpu(seconds: float) -> None:
    """Keep this process busy for ``seconds`` of its own CPU time."""
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_the_server_time_leaves_out_waiting_for_a_busy_host(
    tiny_cfg, prepared, tmp_path, monkeypatch
):
    """On a loaded host the server's work waits for the CPU: wall time passes that the
    work does not use. The simulated clock counts the work (its CPU time), not the wait."""
    from legend.federation import core

    real_finish = core.ServerCore.finish_round

    def waiting_finish(self, *args, **kwargs):
        time.sleep(0.6)  # stands for the CPU taken by other processes
        return real_finish(self, *args, **kwargs)

    monkeypatch.setattr(core.ServerCore, "finish_round", waiting_finish)
    run_job(
        tiny_cfg.override("job", rounds=1), tmp_path / "run", prepared=prepared, show_progress=False
    )
    server_time = float(csv_rows(tmp_path / "run" / "rounds.csv")[0]["server_time_s"])
    assert 0.0 < server_time < 0.3


def test_the_server_timer_counts_a_solver_worker_process():
    """Work the server hands to a child process (the HiGHS worker) counts as server time."""
    import subprocess
    import sys

    from legend.federation.session import _ServerTimer

    # waits for its stdin to close, burns 0.3 s of CPU, reports, then stays alive (idle)
    burn = (
        "import sys, time\n"
        "sys.stdin.read()\n"
        "end = time.process_time() + 0.3\n"
        "while time.process_time() < end: pass\n"
        "print('done', flush=True)\n"
        "time.sleep(5)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", burn], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        with _ServerTimer() as timer:
            child.stdin.close()
            assert child.stdout.readline().strip() == b"done"
        assert 0.25 <= timer.seconds < 2.0
    finally:
        child.kill()
        child.wait()


def test_a_resumed_checkpoint_is_verified(tiny_cfg, prepared, tmp_path):
    cfg = tiny_cfg.override("job", rounds=2)
    run_job(cfg, tmp_path / "run", prepared=prepared, show_progress=False, stop_after=1)
    npz = tmp_path / "run" / "checkpoints" / "round_0001.npz"
    npz.write_bytes(npz.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"round_0001\.npz is damaged"):
        run_job(cfg, tmp_path / "run", prepared=prepared, show_progress=False, resume=True)


def test_existing_run_dir_is_not_overwritten(tiny_cfg, prepared, tmp_path):
    cfg = tiny_cfg.override("job", rounds=1)
    run_job(cfg, tmp_path / "run", prepared=prepared, show_progress=False)
    before = (tmp_path / "run" / "rounds.csv").read_text()
    with pytest.raises(ValueError, match="--resume"):
        run_job(cfg, tmp_path / "run", prepared=prepared, show_progress=False)
    assert (tmp_path / "run" / "rounds.csv").read_text() == before


def test_faults_are_excluded_and_logged(tiny_cfg, prepared, tmp_path):
    cfg = tiny_cfg.override("federation", dropout_prob=0.25, corrupt_prob=0.5).override(
        "job", rounds=3
    )
    result = run_job(cfg, tmp_path / "faults", prepared=prepared, show_progress=False)
    assert result.rounds_completed == 3
    devices = csv_rows(tmp_path / "faults" / "devices.csv")
    statuses = [d["status"] for d in devices]
    assert any(s == "dropped" for s in statuses)
    rejected = [s for s in statuses if s.startswith("rejected")]
    assert rejected
    log = (tmp_path / "faults" / "run.log").read_text()
    assert "rejected" in log and "dropped out" in log
    for a, b in result.global_state.factors.values():
        assert np.isfinite(a).all() and np.isfinite(b).all()
    rounds = csv_rows(tmp_path / "faults" / "rounds.csv")
    assert sum(int(r["rejected"]) for r in rounds) == len(rejected)
    # A dropped device makes the server wait for its timeout.
    for r in rounds:
        if int(r["dropped"]):
            assert float(r["sim_time_s"]) >= 1.5 * float(r["planned_round_time_s"])


def test_killed_process_resumes_to_the_same_result(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [sys.executable, "-m", "legend.federation.cli", "run", str(TINY), "--quiet"]
    full = subprocess.run(
        [*cmd, "--out", str(tmp_path / "full")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert full.returncode == 0, full.stderr
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        [*cmd, "--out", str(run_dir)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    state = run_dir / "checkpoints" / "state.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if state.is_file() and json.loads(state.read_text())["round"] >= 1:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    done = json.loads(state.read_text())["round"]
    assert 1 <= done < 3
    resumed = subprocess.run(
        [*cmd, "--resume", str(run_dir)], env=env, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr
    a = AdapterState.from_npz(tmp_path / "full" / "checkpoints" / "round_0003.npz")
    b = AdapterState.from_npz(run_dir / "checkpoints" / "round_0003.npz")
    for key, (fa, fb) in a.factors.items():
        np.testing.assert_allclose(b.factors[key][0], fa, atol=1e-6)
        np.testing.assert_allclose(b.factors[key][1], fb, atol=1e-6)
    rounds = csv_rows(run_dir / "rounds.csv")
    assert [r["round"] for r in rounds] == ["1", "2", "3"]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[job]\nfleet='tiny_fleet.csv'\nbogus=1\n", "unknown key `job.bogus`"),
        ("[job]\nfleet='tiny_fleet.csv'\nrounds='three'\n", "`job.rounds`"),
        ("[job]\nfleet='tiny_fleet.csv'\nmethod='magic'\n", "`job.method` = 'magic'"),
        ("[job]\nfleet='tiny_fleet.csv'\nmodel='gpt-9'\n", "unknown model 'gpt-9'"),
        ("[job]\nfleet='missing.csv'\n", "does not exist"),
        ("[job]\nfleet='tiny_fleet.csv'\n[data]\ndataset='nope.csv'\n", "`data.dataset`"),
        ("[job]\nfleet='tiny_fleet.csv'\n[extra]\nx=1\n", "unknown section [extra]"),
        ("[job]\nfleet='tiny_fleet.csv'\n[train]\nranks=[8,4]\n", "strictly increasing"),
        ("[job]\nfleet='tiny_fleet.csv'\n[train]\nloss='focal'\n", "`train.loss` = 'focal'"),
        ("[job\n", "not valid TOML"),
        (
            "[job]\nfleet='tiny_fleet.csv'\n[data]\nvalidation_size=0\n"
            "[federation]\nprobe_examples=64\n",
            "`federation.probe_examples` = 64 probes the server's validation split, but "
            "`data.validation_size` = 0",
        ),
        ("[job]\nfleet='tiny_fleet.csv'\n[federation]\nprobe_examples=-1\n", "must be >= 0"),
        (
            "[job]\nfleet='tiny_fleet.csv'\n[planner]\nmin_sample_share=0.8\n",
            "`planner.min_sample_share` = 0.8 only applies with `allow_dropping` = true",
        ),
    ],
)
def test_bad_job_files_exit_2_with_the_key(text, needle, tmp_path, capsys):
    (tmp_path / "tiny_fleet.csv").write_text((ROOT / "examples" / "tiny_fleet.csv").read_text())
    job = tmp_path / "job.toml"
    job.write_text(text)
    with pytest.raises(JobError):
        load_job(job)
    code = main(["run", str(job), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_devices_report_the_loss_decrease_of_the_layers_they_trained(tiny_cfg, prepared, tmp_path):
    """Each reply carries, per model layer, the first-order training-loss decrease its
    adapter bought (positive under the tiny job's SGD), NaN for layers it did not train;
    the round's progress-model signals carry them."""
    from legend.federation.core import ClientCore
    from legend.federation.runner import RunSession
    from legend.federation.session import prepare_run_dir

    out = tmp_path / "run"
    prepare_run_dir(tiny_cfg, out, False)
    session = RunSession(tiny_cfg, out, resume=False, prepared=prepared)
    p = session.prepared
    client = ClientCore(p.host, session.server.costs)
    plan, instructions = session.start_round(1)
    L = p.spec.num_layers
    replies = []
    for ins in instructions:
        reply = client.train(ins, p.fleet[ins.device_id], p.device_data[ins.device_id])
        replies.append(reply)
        assert len(reply.layer_decrease) == L
        for layer in range(L):
            value = reply.layer_decrease[layer]
            if layer in ins.layers:
                assert math.isfinite(value) and value > 0, (ins.device_id, layer, value)
            else:
                assert math.isnan(value)
    assert any(ins.layers for ins in instructions)
    session.complete_round(1, plan, replies)
    assert session.server.progress_model.rounds_observed == 1


def test_a_run_started_by_an_older_legend_resumes(tiny_cfg, prepared, tmp_path):
    """A run records its job's digest over the options its legend knew. An option added
    since (here `planner.min_sample_share`, emulated as absent) at its default must not
    block --resume; set to anything else, the job has changed and resume is refused."""
    from legend.federation.session import RunDirError

    run = tmp_path / "old"
    run_job(tiny_cfg, run, prepared=prepared, show_progress=False, stop_after=1)
    inputs = _as_older_legend(run, tiny_cfg, "min_sample_share", "planner")

    changed = tiny_cfg.override("planner", allow_dropping=True, min_sample_share=0.5)
    with pytest.raises(RunDirError, match=r"only job\.rounds may change"):
        run_job(changed, run, prepared=prepared, show_progress=False, resume=True)
    result = run_job(tiny_cfg, run, prepared=prepared, show_progress=False, resume=True)
    assert [r["round"] for r in csv_rows(result.out_dir / "rounds.csv")] == ["1", "2"]
    # a digest that matches neither the job nor its older form still stops the resume
    inputs["job"]["sha256"] = "0" * 64
    (run / "inputs.json").write_text(json.dumps(inputs))
    with pytest.raises(RunDirError, match="input changed since the run started: job"):
        run_job(tiny_cfg.override("job", rounds=3), run, prepared=prepared, resume=True)


def _as_older_legend(run: Path, cfg, key: str, section: str) -> dict:
    """Rewrite ``run`` as a legend without ``section.key`` wrote it: the key gone from its
    config.toml and the job digest computed without it; returns the new ``inputs.json``."""
    import hashlib

    from legend.federation.session import _comparable

    config = run / "config.toml"
    lines = config.read_text().splitlines()
    assert any(line.startswith(f"{key} =") for line in lines)
    config.write_text("\n".join(x for x in lines if not x.startswith(f"{key} =")) + "\n")
    older = _comparable(cfg, paths=False)
    del older[section][key]
    inputs = json.loads((run / "inputs.json").read_text())
    digest = hashlib.sha256(json.dumps(older, sort_keys=True, default=str).encode()).hexdigest()
    assert inputs["job"]["sha256"] != digest  # the digest the older legend wrote
    inputs["job"]["sha256"] = digest
    (run / "inputs.json").write_text(json.dumps(inputs))
    return inputs


def test_a_run_of_the_dense_server_optimizer_resumes_only_as_it_ran(tiny_cfg, prepared, tmp_path):
    """Before `federation.server_lazy` existed FedAdam stepped every parameter. A run started
    then must not continue under the lazy default as if nothing changed: resume names the
    key and its value, and with `server_lazy = false` continues the run as it ran."""
    from legend.federation.session import RunDirError

    dense = tiny_cfg.override(
        "federation", server_optimizer="adam", server_lr=0.01, server_lazy=False
    )
    run = tmp_path / "dense"
    run_job(dense, run, prepared=prepared, show_progress=False, stop_after=1)
    _as_older_legend(run, dense, "server_lazy", "federation")
    lazy = dense.override("federation", server_lazy=True)
    with pytest.raises(RunDirError) as err:
        run_job(lazy, run, prepared=prepared, show_progress=False, resume=True)
    assert "set federation.server_lazy = false in the job" in str(err.value)
    result = run_job(dense, run, prepared=prepared, show_progress=False, resume=True)
    assert [r["round"] for r in csv_rows(result.out_dir / "rounds.csv")] == ["1", "2"]
    # and it equals the dense run uninterrupted
    whole = run_job(dense, tmp_path / "whole", prepared=prepared, show_progress=False)
    assert [(r["accuracy"], r["test_loss"]) for r in csv_rows(whole.out_dir / "rounds.csv")] == [
        (r["accuracy"], r["test_loss"]) for r in csv_rows(result.out_dir / "rounds.csv")
    ]


@pytest.mark.parametrize(
    ("section", "key"),
    [("federation", "server_lazy"), ("planner", "saturation")],
    ids=["server-lazy-under-fedavg", "saturation-auto-additive"],
)
def test_an_older_run_resumes_where_the_new_option_changes_nothing(
    tiny_cfg, prepared, tmp_path, section, key
):
    """`server_lazy` does nothing under FedAvg, and `planner.saturation = "auto"` plans
    additively for a model without a stored coverage response, as the legend before each
    option did: their absence from an older run's config blocks nothing."""
    assert tiny_cfg.federation.server_optimizer == "none"
    assert tiny_cfg.planner.saturation == "auto"
    run = tmp_path / "older"
    run_job(tiny_cfg, run, prepared=prepared, show_progress=False, stop_after=1)
    _as_older_legend(run, tiny_cfg, key, section)
    result = run_job(tiny_cfg, run, prepared=prepared, show_progress=False, resume=True)
    assert [r["round"] for r in csv_rows(result.out_dir / "rounds.csv")] == ["1", "2"]


def test_a_run_whose_checkout_moved_resumes_from_the_same_files(tiny_cfg, prepared, tmp_path):
    """A run compares its input files by the digests in ``inputs.json``: when the fleet it
    recorded is gone (the checkout moved), a job naming a byte-identical copy resumes it,
    and a copy with other contents is refused naming the input."""
    import shutil

    from legend.federation.session import RunDirError

    old_home, new_home = tmp_path / "old_checkout", tmp_path / "new_checkout"
    old_home.mkdir()
    new_home.mkdir()
    fleet = Path(tiny_cfg.job.fleet)
    shutil.copy(fleet, old_home / fleet.name)
    run = tmp_path / "run"
    started = tiny_cfg.override("job", fleet=str(old_home / fleet.name))
    run_job(started, run, prepared=prepared, show_progress=False, stop_after=1)
    shutil.rmtree(old_home)

    moved = tiny_cfg.override("job", fleet=str(shutil.copy(fleet, new_home / fleet.name)))
    result = run_job(moved, run, prepared=prepared, show_progress=False, resume=True)
    assert [r["round"] for r in csv_rows(result.out_dir / "rounds.csv")] == ["1", "2"]

    edited = new_home / "edited.csv"
    edited.write_text(fleet.read_text() + "\n")
    with pytest.raises(RunDirError, match=r"input changed since the run started: fleet"):
        run_job(
            tiny_cfg.override("job", fleet=str(edited), rounds=3),
            run,
            prepared=prepared,
            show_progress=False,
            resume=True,
        )


@pytest.mark.parametrize("method", ["greedy", "exact"])
def test_a_changed_price_blocks_a_resume_only_where_the_method_reads_it(
    method, tiny_cfg, prepared, tmp_path
):
    """A run whose ``config.toml`` holds another ``planner.seconds_per_mb`` (the default
    changed between versions) resumes where its method does not read the price (the LEGEND
    greedy plans on its fixed utility); for ``exact`` it is refused, the error naming the key,
    both values and that only job.rounds may change."""
    from legend.federation.session import RunDirError

    cfg = tiny_cfg.override("job", method=method)
    run = tmp_path / method
    run_job(
        cfg.override("planner", seconds_per_mb=0.008),
        run,
        prepared=prepared,
        show_progress=False,
        stop_after=1,
    )
    now = cfg.override("planner", seconds_per_mb="auto")
    if method == "greedy":
        result = run_job(now, run, prepared=prepared, show_progress=False, resume=True)
        assert [r["round"] for r in csv_rows(result.out_dir / "rounds.csv")] == ["1", "2"]
    else:
        with pytest.raises(
            RunDirError,
            match=r"planner\.seconds_per_mb = 0\.008 in the run, 'auto' now; only job\.rounds",
        ):
            run_job(now, run, prepared=prepared, show_progress=False, resume=True)


@pytest.mark.parametrize("method", ["exact", "greedy"])
def test_the_servers_probe_runs_for_the_methods_that_plan_on_the_progress_model(
    method, tiny_cfg, prepared, tmp_path, monkeypatch
):
    """With ``federation.probe_examples`` set, the server probes every layer of the global
    state each round for ``exact``, on its validation split (its host time recorded once,
    its evidence in the progress model's state, the simulated clock charged only beyond the
    devices); the LEGEND greedy plans on its fixed utility, so it neither probes nor refuses
    a resume over it.

    The tiny random-initialised model's split-half products are noise (often negative, so
    they add no record): the probe's measurement is checked in tests/test_progress.py, and
    here a spy runs the real probe, checks what it was given and hands on its magnitudes."""
    import legend.federation.training as training

    real = training.probe_layer_decrease
    calls = []

    def spy(model, split, layer_params, num_layers, **kwargs):
        calls.append((split, sorted(layer_params), num_layers, kwargs["examples"]))
        return tuple(abs(v) for v in real(model, split, layer_params, num_layers, **kwargs))

    monkeypatch.setattr(training, "probe_layer_decrease", spy)
    cfg = tiny_cfg.override("job", method=method)
    plain = run_job(cfg, tmp_path / "plain", prepared=prepared, show_progress=False)
    assert calls == []
    probed_cfg = cfg.override("federation", probe_examples=16)
    probed = run_job(probed_cfg, tmp_path / "probed", prepared=prepared, show_progress=False)
    states = [
        json.loads((r.out_dir / "checkpoints" / "state.json").read_text())["progress"]
        for r in (plain, probed)
    ]
    rows = [csv_rows(r.out_dir / "rounds.csv") for r in (plain, probed)]
    assert states[0]["probe_time_s"] is None
    evidence = [np.asarray(s["progress_model"]["information"]) for s in states]
    if method == "greedy":
        assert states[1]["probe_time_s"] is None and calls == []
        np.testing.assert_array_equal(evidence[1], evidence[0])
        device_s = [[float(r["sim_time_s"]) - float(r["server_time_s"]) for r in x] for x in rows]
        assert device_s[1] == pytest.approx(device_s[0], rel=1e-9)
        # an option the method does not read does not block a resume
        run_job(
            cfg.override("job", rounds=3),
            tmp_path / "probed",
            prepared=prepared,
            show_progress=False,
            resume=True,
        )
        return
    probe_s = states[1]["probe_time_s"]
    assert probe_s is not None and probe_s > 0
    layers = list(range(prepared.spec.num_layers))
    assert calls == [(prepared.validation, layers, len(layers), 16)] * 2  # once a round
    assert not np.allclose(evidence[1], evidence[0])
    # round 1 plans alike in both runs (the probe's evidence enters after it): the clock
    # charges the probe only where it outlasts the round's devices
    first = [float(x[0]["sim_time_s"]) - float(x[0]["server_time_s"]) for x in rows]
    assert first[1] == pytest.approx(max(first[0], probe_s), rel=1e-9)
