"""Flower transport: message (de)serialisation, node identity and profile, bad addresses.

These run in seconds; the engines themselves are tested in ``test_flower_engines.py``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("flwr")

from legend.federation import flower_engine
from legend.federation.adapters import AdapterState
from legend.federation.core import ClientInstruction, ClientReply
from legend.federation.flower import flwr_internals
from legend.federation.flower.client_app import node_profile
from legend.federation.flower.codec import (
    ServerSettings,
    instruction_from_record,
    instruction_to_record,
    job_payload,
    reply_from_record,
    reply_to_record,
    state_from_arrays,
    state_to_arrays,
)
from legend.federation.flower.errors import FlowerInputError, FlowerNodeError
from legend.federation.flower_engine import FlowerConnectionError, free_port, parse_address
from legend.federation.job import load_job
from legend.models.errors import InputError
from legend.planner.profiles import load_fleet

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny.toml"


def _state(rng: np.random.Generator, layers: dict[int, int], modules=("query", "value")):
    factors = {
        (layer, m): (
            rng.standard_normal((r, 8)).astype(np.float32),
            rng.standard_normal((8, r)).astype(np.float32),
        )
        for layer, r in layers.items()
        for m in modules
    }
    head = {
        "classifier.weight": rng.standard_normal((2, 8)).astype(np.float32),
        "classifier.bias": rng.standard_normal(2).astype(np.float32),
    }
    return AdapterState(factors=factors, head=head)


@settings(max_examples=25, deadline=None)
@given(
    layers=st.dictionaries(st.integers(0, 11), st.sampled_from([1, 2, 4, 8]), min_size=1),
    seed=st.integers(0, 2**32 - 1),
)
def test_adapter_state_round_trips_through_array_record(layers, seed):
    state = _state(np.random.default_rng(seed), layers)
    back = state_from_arrays(state_to_arrays(state))
    assert back.equals(state)
    assert all(a.dtype == np.float32 for a, _ in back.factors.values())


def test_module_and_head_names_with_separators_survive():
    rng = np.random.default_rng(0)
    state = AdapterState(
        factors={(3, "self_attn.q_proj"): (np.ones((2, 4)), np.ones((4, 2)))},
        head={"classifier.dense.weight": rng.standard_normal((3, 3))},
    )
    assert state_from_arrays(state_to_arrays(state)).equals(state)


def test_unknown_array_keys_are_rejected_with_the_key():
    from flwr.app import Array, ArrayRecord

    record = ArrayRecord({"weights.0": Array(np.ones(3, dtype=np.float32))})
    with pytest.raises(FlowerInputError, match=r"'weights\.0'"):
        state_from_arrays(record)


def _instruction(state: AdapterState, fault: str | None = None) -> ClientInstruction:
    return ClientInstruction(
        round=3,
        device_id="phone-1",
        device_index=0,
        layers=(2, 3),
        ranks=(4, 2),
        init_state=state,
        local_steps=5,
        batch_size=8,
        learning_rate=3e-3,
        weight_decay=0.01,
        freeze_a=False,
        seed=(0, 3, 0, 0),
        fault=fault,
        loss="logit-adjusted",
    )


@pytest.fixture(scope="module")
def tiny_job():
    cfg = load_job(TINY)
    return cfg, load_fleet(cfg.job.fleet)


@pytest.mark.parametrize("fault", [None, "drop", "nan"])
def test_instruction_round_trip_and_fresh_payload_per_message(tiny_job, fault):
    cfg, fleet = tiny_job
    job = job_payload(cfg, fleet, None)
    state = _state(np.random.default_rng(1), {2: 4, 3: 2})
    ins = _instruction(state, fault)
    first, second = instruction_to_record(ins, job), instruction_to_record(ins, job)
    assert first is not second
    assert first["legend.adapter"] is not second["legend.adapter"]
    assert first["legend.job"] is not second["legend.job"]
    back = instruction_from_record(first)
    assert back.init_state.equals(state)
    for name in ("round", "device_id", "device_index", "layers", "ranks", "local_steps"):
        assert getattr(back, name) == getattr(ins, name)
    assert (back.learning_rate, back.seed, back.fault) == (ins.learning_rate, ins.seed, fault)
    assert back.loss == ins.loss


def _reply(round: int, device_id: str, state: AdapterState | None) -> ClientReply:
    return ClientReply(
        round=round,
        device_id=device_id,
        state=state,
        num_samples=80,
        train_loss=math.nan if state is None else 0.6931,
        steps=3,
        host_time_s=0.25,
        sim_compute_s=1.5,
        sim_download_s=0.1,
        sim_upload_s=0.2,
        download_bytes=1234.0,
        upload_bytes=567.0,
        memory_bytes=1e8,
        dropped=state is None,
        layer_decrease=() if state is None else (0.25, math.nan, 0.0, 1e-7),
    )


@pytest.mark.parametrize("with_state", [True, False])
def test_reply_round_trip_keeps_observations(with_state):
    state = _state(np.random.default_rng(2), {0: 8}) if with_state else None
    reply = _reply(2, "jetson-1", state)
    back = reply_from_record(reply_to_record(reply, {"pid": 1}))
    assert (back.state is None) == (state is None)
    if state is not None:
        assert back.state is not None and back.state.equals(state)
    for name in ("num_samples", "steps", "dropped", "sim_compute_s", "upload_bytes"):
        assert getattr(back, name) == getattr(reply, name)
    # the per-layer loss decreases travel, NaN (an untrained layer) included
    np.testing.assert_array_equal(back.layer_decrease, reply.layer_decrease)
    assert math.isnan(back.train_loss) == math.isnan(reply.train_loss)


def test_messages_of_another_protocol_are_refused(tiny_job):
    cfg, fleet = tiny_job
    record = instruction_to_record(
        _instruction(_state(np.random.default_rng(3), {1: 2})), job_payload(cfg, fleet, None)
    )
    record["legend.instruction"]["protocol"] = 99
    with pytest.raises(FlowerInputError, match="protocol version 99"):
        instruction_from_record(record)


def test_job_payload_digest_tracks_the_job(tiny_job):
    cfg, fleet = tiny_job
    a = job_payload(cfg, fleet, None)["digest"]
    assert job_payload(cfg, fleet, None)["digest"] == a
    assert job_payload(cfg.override("job", seed=1), fleet, None)["digest"] != a


# -- node identity and profile -----------------------------------------------------------


def test_node_profile_from_device_id_partition_id_and_overrides(tiny_job):
    _, fleet = tiny_job
    assert node_profile({"device-id": "jetson-2"}, fleet) == fleet["jetson-2"]
    assert node_profile({"partition-id": 4, "num-partitions": 6}, fleet) == fleet["laptop-1"]
    p = node_profile({"device-id": "phone-1", "tflops": 0.004, "uplink-mbps": 3}, fleet)
    assert (p.tflops, p.uplink_mbps, p.memory_gb) == (0.004, 3.0, fleet["phone-1"].memory_gb)


@pytest.mark.parametrize(
    ("node_config", "match"),
    [
        ({}, r"no `device-id`.*profile is missing.*--node-config"),
        ({"device-id": "ghost"}, r"'ghost' is not a device of the job's fleet.*phone-1"),
        ({"device-id": ""}, r"`device-id` = '' must be a non-empty string"),
        ({"partition-id": 6}, r"`partition-id` = 6 must be an integer in \[0, 5\]"),
        ({"device-id": "phone-1", "tflops": "fast"}, r"`tflops` = 'fast' must be a number"),
        ({"device-id": "phone-1", "memory-gb": -1.0}, r"`memory_gb` must be a finite number > 0"),
        ({"device-id": "phone-1", "device-class": 3}, r"`device-class` = 3 must be a string"),
    ],
)
def test_missing_or_malformed_node_profiles_name_the_problem(tiny_job, node_config, match):
    _, fleet = tiny_job
    with pytest.raises(FlowerNodeError, match=match) as info:
        node_profile(node_config, fleet)
    error = info.value
    assert isinstance(error, ValueError)
    assert isinstance(error, InputError)
    assert error.exit_code == 2


def test_server_settings_round_trip_through_the_run_config():
    s = ServerSettings(job_toml="[job]\n", run_dir="/tmp/x", resume=True, round_timeout_s=7.0)
    assert ServerSettings.from_config(s.to_config()) == s
    bad = {**s.to_config(), "round-timeout-s": "soon"}
    with pytest.raises(FlowerInputError, match="`round-timeout-s` = 'soon'"):
        ServerSettings.from_config(bad)


# -- addresses and an unreachable SuperLink ------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:9093", ("127.0.0.1", 9093)), ("[::1]:80", ("::1", 80)), ("h:1", ("h", 1))],
)
def test_parse_address(text, expected):
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (None, "--superlink is required"),
        ("localhost", "not HOST:PORT"),
        ("http://127.0.0.1:9093", "without a scheme"),
        ("127.0.0.1:99999", "not HOST:PORT"),
    ],
)
def test_bad_superlink_addresses(text, match):
    with pytest.raises(FlowerInputError, match=match):
        parse_address(text)


def test_unreachable_superlink_fails_fast_with_the_address(tiny_job, tmp_path):
    cfg, _ = tiny_job
    port = free_port()  # nothing listens there
    start = time.monotonic()
    with pytest.raises(FlowerConnectionError, match=rf"127\.0\.0\.1:{port} is unreachable"):
        flower_engine.run(
            cfg.override("job", engine="flower-deploy"),
            tmp_path / "run",
            superlink=f"127.0.0.1:{port}",
        )
    assert time.monotonic() - start < 10
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cli_reports_unreachable_superlink_with_exit_status_2(tmp_path, capsys):
    from legend.federation.cli import main

    port = free_port()
    code = main(
        [
            "run",
            str(TINY),
            "--engine",
            "flower-deploy",
            "--superlink",
            f"127.0.0.1:{port}",
            "--out",
            str(tmp_path / "run"),
            "--quiet",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port} is unreachable" in err and "flower_local.py" in err


def test_remote_superlink_without_tls_is_refused(tiny_job, tmp_path, monkeypatch):
    cfg, _ = tiny_job
    monkeypatch.delenv("LEGEND_FLOWER_INSECURE", raising=False)
    monkeypatch.delenv("LEGEND_FLOWER_ROOT_CERTIFICATES", raising=False)
    monkeypatch.setattr(flower_engine, "check_reachable", lambda host, port: None)
    with pytest.raises(FlowerInputError, match="LEGEND_FLOWER_ROOT_CERTIFICATES"):
        flower_engine.run(
            cfg.override("job", engine="flower-deploy"), tmp_path / "r", superlink="10.1.2.3:9093"
        )


def test_resume_without_a_run_is_refused_before_anything_starts(tiny_job, tmp_path):
    cfg, _ = tiny_job
    with pytest.raises(InputError, match="cannot resume"):
        flower_engine.run(cfg.override("job", engine="flower-sim"), tmp_path / "none", resume=True)


def test_flower_internals_were_checked_against_the_installed_flower():
    """The node worker and run submission use Flower internals (one module); they were
    checked against the versions it lists. On any other Flower, run the Flower tests
    (tests/test_flower_engines.py) and add the version to CHECKED_VERSIONS, or fix them."""
    installed = flwr_internals.flower_version()
    assert installed in flwr_internals.CHECKED_VERSIONS, (
        f"Flower {installed} is installed, but legend.federation.flower.flwr_internals was "
        f"checked against {flwr_internals.CHECKED_VERSIONS} only"
    )


def test_client_app_pickles_with_an_empty_job_cache():
    """The simulation runtime pickles the ClientApp into every ray actor."""
    import cloudpickle

    from legend.federation.flower.client_app import JobCache, make_client_app

    cache = JobCache()
    cache.model_loads = 2
    copy = cloudpickle.loads(cloudpickle.dumps(cache))
    assert copy.model_loads == 0 and copy is not cache
    cloudpickle.dumps(make_client_app(cache))


class _Session:
    """The part of a run session the Strategy uses, after a resume at round 3 of 4."""

    def __init__(self, cfg, state: AdapterState) -> None:
        self.cfg = cfg
        self.server = type("Server", (), {"global_state": state})()
        self.started: list[int] = []
        self.completed: list[tuple[int, list[str], list[str]]] = []

    def pending_rounds(self):
        return iter((3, 4))

    def start_round(self, t: int, available: list[str]):
        self.started.append(t)
        ins = _instruction(self.server.global_state)
        return f"plan {t}", [
            ClientInstruction(**{**ins.__dict__, "round": t, "device_id": d}) for d in available
        ]

    def complete_round(self, t, plan, replies, *, missing):
        self.completed.append((t, [r.device_id for r in replies], list(missing)))
        return {"round": t, "accuracy": 0.5}


class _Grid:
    """Delivers each message to a node that answers with its slice unchanged (node 2 fails)."""

    def get_node_ids(self):
        return [1, 2]

    def create_message(self, content, message_type, dst_node_id, group_id, ttl):
        from flwr.app import Message, Metadata

        meta = Metadata(
            run_id=1,
            message_id=f"m{dst_node_id}-{group_id}",
            src_node_id=0,
            dst_node_id=dst_node_id,
            reply_to_message_id="",
            group_id=group_id,
            created_at=time.time(),
            ttl=ttl,
            message_type=message_type,
        )
        return Message(content=content, metadata=meta)

    def send_and_receive(self, messages, timeout):
        from flwr.app import Error, Message

        replies = []
        for msg in messages:
            if msg.metadata.dst_node_id == 2:
                replies.append(Message(Error(code=0, reason="boom"), reply_to=msg))
                continue
            ins = instruction_from_record(msg.content)
            reply = _reply(ins.round, ins.device_id, ins.init_state)
            replies.append(Message(reply_to_record(reply, {"pid": 7}), reply_to=msg))
        return replies


def test_strategy_runs_the_pending_rounds_with_flowers_own_loop(tiny_job):
    """Flower's Strategy.start drives the rounds (no override); after a resume its rounds
    1, 2 are the session's 3, 4; a failed node is missing and not planned again; the node
    rows go to the callback, not to a file."""
    from legend.federation.flower.server_app import LegendStrategy

    assert "start" not in LegendStrategy.__dict__
    cfg, fleet = tiny_job
    session = _Session(cfg, _state(np.random.default_rng(0), {2: 4, 3: 2}))
    rows: list[list[dict]] = []
    strategy = LegendStrategy(
        session,
        {"phone-1": 1, "phone-2": 2},
        job_payload(cfg, fleet, None),
        round_timeout_s=5.0,
        on_round=rows.append,
    )
    result = strategy.run(_Grid())
    assert session.started == [3, 4]
    assert session.completed == [(3, ["phone-1"], ["phone-2"]), (4, ["phone-1"], [])]
    assert [[r["round"] for r in round_rows] for round_rows in rows] == [[3], [4]]
    assert rows[0][0]["pid"] == 7 and rows[0][0]["device_id"] == "phone-1"
    assert sorted(result.train_metrics_clientapp) == [1, 2]


def test_reply_with_bad_layer_decrease_is_refused():
    reply = _reply(2, "jetson-1", _state(np.random.default_rng(2), {0: 8}))
    record = reply_to_record(reply, {"layer-decrease": ["0.1", "0.2"]})
    with pytest.raises(FlowerInputError, match=r"`layer-decrease`.*list of floats"):
        reply_from_record(record)
