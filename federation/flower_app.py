"""legend on Flower (Message API): the ServerApp, the ClientApp and their messages.

The Flower apps are thin transports over the engine-neutral round core
(:mod:`legend.federation.core`): the server side drives a
:class:`~legend.federation.session.RunSession` (same run directory, checkpoints and resume as
the in-process engine) and the client side calls :meth:`ClientCore.train`. Nothing of the
round logic is repeated here; this module only moves
:class:`~legend.federation.core.ClientInstruction` and
:class:`~legend.federation.core.ClientReply` objects through Flower messages.

Protocol (message types and records)::

    server -> node  "query"  config "legend.job"          job TOML, fleet, calibration
    node -> server           config "legend.profile"      device id and profile (or "error")
    server -> node  "train"  config "legend.job"          (again: a node may have restarted)
                             config "legend.instruction"  round, plan, seed, optimiser
                             arrays "legend.adapter"      the node's slice of the global adapter
    node -> server           config "legend.reply"        observations (times, bytes, samples)
                             arrays "legend.update"       the trained slice (absent if dropped)

Each node learns its identity from its node config: ``device-id="phone-1"`` (deployment)
or ``partition-id=N`` (the simulation runtime; the N-th device of the fleet). Optional
node-config keys ``tflops``, ``memory-gb``, ``uplink-mbps``, ``downlink-mbps`` and
``device-class`` override the fleet file's declared profile; the node reports the result
and the server plans with the reported profiles. A node recomputes its data partition from
the job's seed (:func:`legend.federation.data.partition`) and tokenizes only its share.

The frozen base model is cached per process and reused for every message of the same job.
In the simulation runtime each ray actor keeps its cache. In deployment Flower starts a new
``flwr-clientapp`` process for every message, so legend ships its own long-lived node
worker (:func:`serve_nodes`, ``python -m legend.federation.flower_app node``) that runs the
ClientApp for one or more SuperNodes started with ``--isolation process``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.result import Result

from legend.federation.adapters import AdapterState
from legend.federation.core import ClientInstruction, ClientReply
from legend.federation.errors import FederationError, FederationInputError
from legend.federation.job import JobConfig
from legend.planner.costs import Calibration
from legend.planner.profiles import DeviceProfile, Fleet, FleetError

__all__ = [
    "NODE_PROFILE_KEYS",
    "PROTOCOL_VERSION",
    "FlowerEngineError",
    "FlowerInputError",
    "FlowerNodeError",
    "LegendStrategy",
    "ServerSettings",
    "client_app",
    "instruction_from_record",
    "instruction_to_record",
    "job_payload",
    "make_server_app",
    "node_profile",
    "reply_from_record",
    "reply_to_record",
    "serve_nodes",
    "server_app",
    "state_from_arrays",
    "state_to_arrays",
]

log = logging.getLogger("legend.federation")

PROTOCOL_VERSION = 2
"""Version of the message layout below; nodes refuse messages of another version."""

NODE_PROFILE_KEYS = {
    "tflops": "tflops",
    "memory-gb": "memory_gb",
    "uplink-mbps": "uplink_mbps",
    "downlink-mbps": "downlink_mbps",
    "device-class": "device_class",
}
"""Node-config keys that override the fleet file's profile of the node's device."""

_JOB = "legend.job"
_INSTRUCTION = "legend.instruction"
_ADAPTER = "legend.adapter"
_REPLY = "legend.reply"
_UPDATE = "legend.update"
_PROFILE = "legend.profile"


class FlowerEngineError(FederationError):
    """A Flower run that could not be carried out (unreachable SuperLink, failed run)."""


class FlowerInputError(FlowerEngineError, FederationInputError):
    """Bad input to a Flower run: an address, a node config, a message. Exit status 2."""


class FlowerNodeError(FlowerInputError):
    """One or more SuperNodes whose device identity or profile cannot be used."""


# -- adapters as ArrayRecords ------------------------------------------------------------


def state_to_arrays(state: AdapterState) -> ArrayRecord:
    """An adapter state as an ArrayRecord (keys ``A|layer|module``, ``B|...``, ``H|name``)."""
    items: dict[str, Array] = {}
    for (layer, module), (a, b) in sorted(state.factors.items()):
        items[f"A|{layer}|{module}"] = Array(np.ascontiguousarray(a))
        items[f"B|{layer}|{module}"] = Array(np.ascontiguousarray(b))
    for name, value in sorted(state.head.items()):
        items[f"H|{name}"] = Array(np.ascontiguousarray(value))
    return ArrayRecord(items)


def state_from_arrays(record: ArrayRecord) -> AdapterState:
    """The inverse of :func:`state_to_arrays`; unknown keys raise :class:`FlowerInputError`."""
    a_part: dict[tuple[int, str], np.ndarray] = {}
    b_part: dict[tuple[int, str], np.ndarray] = {}
    head: dict[str, np.ndarray] = {}
    for key, array in record.items():
        kind, _, rest = key.partition("|")
        value = array.numpy()
        if kind == "H" and rest:
            head[rest] = value
            continue
        layer_text, _, module = rest.partition("|")
        if kind not in ("A", "B") or not module or not layer_text.isdigit():
            raise FlowerInputError(
                f"adapter record key {key!r} is not of the form A|layer|module, "
                "B|layer|module or H|name; the sender speaks another protocol"
            )
        (a_part if kind == "A" else b_part)[(int(layer_text), module)] = value
    if a_part.keys() != b_part.keys():
        odd = sorted(a_part.keys() ^ b_part.keys())
        raise FlowerInputError(f"adapter record has A without B (or B without A) for {odd}")
    factors = {key: (a_part[key], b_part[key]) for key in a_part}
    return AdapterState(factors=factors, head=head)


# -- instructions and replies ------------------------------------------------------------


def instruction_to_record(ins: ClientInstruction, job: ConfigRecord) -> RecordDict:
    """A fresh message payload for one device (never shared between messages)."""
    config = ConfigRecord(
        {
            "protocol": PROTOCOL_VERSION,
            "round": ins.round,
            "device-id": ins.device_id,
            "device-index": ins.device_index,
            "layers": [int(x) for x in ins.layers],
            "ranks": [int(x) for x in ins.ranks],
            "local-steps": ins.local_steps,
            "batch-size": ins.batch_size,
            "learning-rate": float(ins.learning_rate),
            "weight-decay": float(ins.weight_decay),
            "loss": ins.loss,
            "optimizer": ins.optimizer,
            "freeze-a": bool(ins.freeze_a),
            "seed": [int(x) for x in ins.seed],
            "fault": ins.fault or "",
        }
    )
    return RecordDict(
        {
            _JOB: ConfigRecord(dict(job)),
            _INSTRUCTION: config,
            _ADAPTER: state_to_arrays(ins.init_state),
        }
    )


def _field(record: Mapping[str, Any], key: str, kind: type, what: str) -> Any:
    if key not in record:
        raise FlowerInputError(f"{what} has no `{key}`; the sender speaks another protocol")
    value = record[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind):
        raise FlowerInputError(
            f"{what}: `{key}` = {value!r} must be of type {kind.__name__}, "
            f"got {type(value).__name__}"
        )
    return value


def _check_protocol(record: Mapping[str, Any], what: str) -> None:
    version = record.get("protocol")
    if version != PROTOCOL_VERSION:
        raise FlowerInputError(
            f"{what} uses protocol version {version!r}, this node speaks {PROTOCOL_VERSION}; "
            "install the same legend version on the server and every node"
        )


def instruction_from_record(content: RecordDict) -> ClientInstruction:
    """Decode a train message's payload into the round core's instruction."""
    if _INSTRUCTION not in content.config_records or _ADAPTER not in content.array_records:
        raise FlowerInputError(
            f"train message lacks `{_INSTRUCTION}` or `{_ADAPTER}`; it was not sent by legend"
        )
    c = content.config_records[_INSTRUCTION]
    what = "train instruction"
    _check_protocol(c, what)
    fault = _field(c, "fault", str, what)
    return ClientInstruction(
        round=_field(c, "round", int, what),
        device_id=_field(c, "device-id", str, what),
        device_index=_field(c, "device-index", int, what),
        layers=tuple(int(x) for x in _field(c, "layers", list, what)),
        ranks=tuple(int(x) for x in _field(c, "ranks", list, what)),
        init_state=state_from_arrays(content.array_records[_ADAPTER]),
        local_steps=_field(c, "local-steps", int, what),
        batch_size=_field(c, "batch-size", int, what),
        learning_rate=_field(c, "learning-rate", float, what),
        weight_decay=_field(c, "weight-decay", float, what),
        loss=_field(c, "loss", str, what),
        optimizer=_field(c, "optimizer", str, what),
        freeze_a=_field(c, "freeze-a", bool, what),
        seed=tuple(int(x) for x in _field(c, "seed", list, what)),
        fault=fault or None,
    )


_REPLY_FLOATS = (
    "train_loss",
    "host_time_s",
    "sim_compute_s",
    "sim_download_s",
    "sim_upload_s",
    "download_bytes",
    "upload_bytes",
    "memory_bytes",
)


def reply_to_record(reply: ClientReply, extra: Mapping[str, Any] | None = None) -> RecordDict:
    """A train reply's payload: observations in a ConfigRecord, the update as arrays."""
    config: dict[str, Any] = {
        "protocol": PROTOCOL_VERSION,
        "round": reply.round,
        "device-id": reply.device_id,
        "num-samples": int(reply.num_samples),
        "steps": int(reply.steps),
        "dropped": bool(reply.dropped),
        "has-state": reply.state is not None,
    }
    for name in _REPLY_FLOATS:
        config[name.replace("_", "-")] = float(getattr(reply, name))
    config.update(extra or {})
    records: dict[str, Any] = {_REPLY: ConfigRecord(config)}
    if reply.state is not None:
        records[_UPDATE] = state_to_arrays(reply.state)
    return RecordDict(records)


def reply_from_record(content: RecordDict) -> ClientReply:
    """Decode a train reply into the round core's :class:`ClientReply`."""
    if _REPLY not in content.config_records:
        raise FlowerInputError(f"train reply lacks `{_REPLY}`; it was not sent by legend")
    c = content.config_records[_REPLY]
    what = "train reply"
    _check_protocol(c, what)
    state = None
    if _field(c, "has-state", bool, what):
        if _UPDATE not in content.array_records:
            raise FlowerInputError(f"train reply announces an update but has no `{_UPDATE}`")
        state = state_from_arrays(content.array_records[_UPDATE])
    floats = {name: _field(c, name.replace("_", "-"), float, what) for name in _REPLY_FLOATS}
    return ClientReply(
        round=_field(c, "round", int, what),
        device_id=_field(c, "device-id", str, what),
        state=state,
        num_samples=_field(c, "num-samples", int, what),
        steps=_field(c, "steps", int, what),
        dropped=_field(c, "dropped", bool, what),
        **floats,
    )


# -- the job as a message payload ----------------------------------------------------------


def job_payload(cfg: JobConfig, fleet: Fleet, calibration: Calibration | None) -> ConfigRecord:
    """Everything a node needs to load the job: TOML, fleet and calibration, plus a digest."""
    job_toml = cfg.to_toml()
    fleet_json = json.dumps(
        [{k: v for k, v in d.to_dict().items() if v is not None} for d in fleet.devices],
        sort_keys=True,
    )
    calibration_json = calibration.to_json() if calibration is not None else ""
    digest = hashlib.sha256(
        "\0".join((job_toml, fleet_json, calibration_json)).encode()
    ).hexdigest()
    return ConfigRecord(
        {
            "protocol": PROTOCOL_VERSION,
            "job-toml": job_toml,
            "fleet-json": fleet_json,
            "calibration-json": calibration_json,
            "digest": digest,
        }
    )


# -- node side -----------------------------------------------------------------------------


def node_profile(node_config: Mapping[str, Any], fleet: Fleet) -> DeviceProfile:
    """The device a node plays, from its node config and the job's fleet.

    ``device-id`` names the device (or ``partition-id`` gives its position in the fleet);
    the keys of :data:`NODE_PROFILE_KEYS` override the declared profile.

    Raises
    ------
    FlowerNodeError
        When the node config names no device, a device that is not in the fleet, or an
        override that is not a valid value.
    """
    ids = fleet.device_ids
    if "device-id" in node_config:
        device_id = node_config["device-id"]
        if not isinstance(device_id, str) or not device_id.strip():
            raise FlowerNodeError(
                f"node config `device-id` = {device_id!r} must be a non-empty string; start "
                "the SuperNode with --node-config 'device-id=\"phone-1\"'"
            )
    elif "partition-id" in node_config:
        index = node_config["partition-id"]
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(ids):
            raise FlowerNodeError(
                f"node config `partition-id` = {index!r} must be an integer in "
                f"[0, {len(ids) - 1}] (the fleet has {len(ids)} devices)"
            )
        device_id = ids[index]
    else:
        raise FlowerNodeError(
            "node config has no `device-id` (nor `partition-id`): the node's profile is "
            f"missing; start the SuperNode with --node-config 'device-id=\"{ids[0]}\"' "
            "naming one device of the job's fleet"
        )
    if device_id not in ids:
        shown = ", ".join(ids[:8]) + (", ..." if len(ids) > 8 else "")
        raise FlowerNodeError(
            f"node config `device-id` = {device_id!r} is not a device of the job's fleet "
            f"({shown}); the node's profile is missing: use one of the fleet's ids"
        )
    changes: dict[str, Any] = {}
    for key, attribute in NODE_PROFILE_KEYS.items():
        if key not in node_config:
            continue
        value = node_config[key]
        if attribute == "device_class":
            if not isinstance(value, str):
                raise FlowerNodeError(
                    f"device {device_id!r}: node config `{key}` = {value!r} must be a string"
                )
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise FlowerNodeError(
                f"device {device_id!r}: node config `{key}` = {value!r} must be a number > 0 "
                f"(e.g. --node-config '{key}=1.5')"
            )
        else:
            value = float(value)
        changes[attribute] = value
    try:
        return replace(fleet[device_id], **changes)
    except FleetError as exc:
        raise FlowerNodeError(f"node config of device {device_id!r}: {exc}") from None


@dataclass
class _LoadedJob:
    """One job's model, data and client core in a node process (kept across messages)."""

    cfg: JobConfig
    fleet: Fleet
    client: Any
    tokenizer: Any
    texts: Sequence[str]
    labels: np.ndarray
    parts: list[np.ndarray]
    shares: dict[str, Any] = field(default_factory=dict)

    def data_of(self, device_id: str) -> Any:
        """The device's training share, tokenized once (only this device's rows)."""
        if device_id not in self.shares:
            from legend.federation.training import DeviceData, tokenize

            idx = self.parts[self.fleet.device_ids.index(device_id)]
            split = tokenize(
                self.tokenizer,
                [self.texts[i] for i in idx],
                self.labels[idx],
                self.cfg.train.seq_len,
            )
            self.shares[device_id] = DeviceData(split, np.arange(len(idx)))
        return self.shares[device_id]


_JOBS: dict[str, _LoadedJob] = {}
_JOBS_LOCK = threading.Lock()
_MODEL_LOADS = 0  # how many times this process loaded a base model (reported to the server)


def _fleet_from_json(text: str) -> Fleet:
    try:
        records = json.loads(text)
        return Fleet.from_records(records, source="<job message>")
    except (ValueError, TypeError) as exc:
        raise FlowerInputError(f"the job message carries an unusable fleet: {exc}") from None


def _loaded_job(payload: Mapping[str, Any]) -> _LoadedJob:
    """The job of a message, loaded once per process (model, data partition, cost model)."""
    global _MODEL_LOADS
    _check_protocol(payload, "job message")
    digest = _field(payload, "digest", str, "job message")
    with _JOBS_LOCK:
        if digest in _JOBS:
            return _JOBS[digest]
        _JOBS.clear()  # one job per process at a time: free the previous model
        import torch

        from legend.federation.apply import AdapterHost
        from legend.federation.core import ClientCore
        from legend.federation.job import load_job
        from legend.federation.session import load_job_data
        from legend.planner.costs import CostModel

        fleet = _fleet_from_json(_field(payload, "fleet-json", str, "job message"))
        with tempfile.TemporaryDirectory(prefix="legend-node-") as tmp:
            fleet_path = Path(tmp) / "fleet.json"
            fleet_path.write_text(json.dumps({"devices": fleet.to_records()}))
            job_path = Path(tmp) / "job.toml"
            job_path.write_text(_field(payload, "job-toml", str, "job message"))
            # The node needs the fleet only to partition the data; calibration arrives in
            # the message (a server-side path would not exist here).
            cfg = load_job(
                job_path,
                job__fleet=str(fleet_path),
                job__topology="",  # the server's clock applies it; a node never reads it
                planner__calibration="none",
            )
        cal_json = _field(payload, "calibration-json", str, "job message")
        calibration = Calibration.from_json(cal_json) if cal_json else None
        threads = cfg.train.threads or int(os.environ.get("LEGEND_NODE_THREADS") or 0)
        if threads:
            torch.set_num_threads(threads)
        data = load_job_data(cfg, fleet)
        _MODEL_LOADS += 1
        dataset, spec, base, tokenizer, parts = (
            data.dataset,
            data.spec,
            data.base,
            data.tokenizer,
            data.parts,
        )
        host = AdapterHost(base, spec, cfg.job_params)
        client = ClientCore(
            host, CostModel(spec, cfg.job_params, calibration), jitter=cfg.federation.jitter
        )
        job = _LoadedJob(
            cfg=cfg,
            fleet=fleet,
            client=client,
            tokenizer=tokenizer,
            texts=dataset.train_texts,
            labels=np.asarray(dataset.train_labels),
            parts=[np.asarray(p) for p in parts],
        )
        _JOBS[digest] = job
        return job


def _job_record(content: RecordDict) -> ConfigRecord:
    if _JOB not in content.config_records:
        raise FlowerInputError(f"message lacks `{_JOB}`; it was not sent by legend")
    return content.config_records[_JOB]


client_app = ClientApp()


@client_app.query()
def _query(msg: Message, context: Context) -> Message:
    """Report this node's device profile; loads (and caches) the job's model and data."""
    try:
        payload = _job_record(msg.content)
        fleet = _fleet_from_json(_field(payload, "fleet-json", str, "job message"))
        profile = node_profile(context.node_config, fleet)
        start = time.perf_counter()
        _loaded_job(payload).data_of(profile.device_id)
        record = {k: v for k, v in profile.to_dict().items() if v is not None}
        record.update(
            {
                "protocol": PROTOCOL_VERSION,
                "error": "",
                "load-time-s": time.perf_counter() - start,
                "pid": os.getpid(),
                "model-loads": _MODEL_LOADS,
            }
        )
    except Exception as exc:  # reported to the server, which names the node
        record = {"protocol": PROTOCOL_VERSION, "error": f"{type(exc).__name__}: {exc}"}
    return Message(RecordDict({_PROFILE: ConfigRecord(record)}), reply_to=msg)


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    """Train one round of this node's device with :meth:`ClientCore.train`."""
    job = _loaded_job(_job_record(msg.content))
    ins = instruction_from_record(msg.content)
    profile = node_profile(context.node_config, job.fleet)
    if profile.device_id != ins.device_id:
        raise FlowerInputError(
            f"this node plays {profile.device_id!r} but was sent the instruction of "
            f"{ins.device_id!r}"
        )
    reply = job.client.train(ins, profile, job.data_of(ins.device_id))
    extra = {"pid": os.getpid(), "model-loads": _MODEL_LOADS}
    return Message(reply_to_record(reply, extra), reply_to=msg)


# -- server side ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    """How the ServerApp runs a job.

    Parameters
    ----------
    job_toml
        The resolved job (:meth:`JobConfig.to_toml`).
    run_dir
        The run directory (on the machine that runs the ServerApp).
    resume
        Continue the run in ``run_dir`` from its last completed round.
    round_timeout_s
        How long a round waits for replies; nodes that have not answered by then are
        treated as dropped and left out of later rounds.
    query_timeout_s
        How long the profile query waits (it includes each node's first model load).
    node_wait_s
        How long to wait for every device of the fleet to connect before starting with
        the nodes present.
    show_progress
        Print a line per round.
    """

    job_toml: str
    run_dir: str
    resume: bool = False
    round_timeout_s: float = 300.0
    query_timeout_s: float = 300.0
    node_wait_s: float = 60.0
    show_progress: bool = True

    def to_config(self) -> dict[str, Any]:
        return {
            "job-toml": self.job_toml,
            "run-dir": self.run_dir,
            "resume": self.resume,
            "round-timeout-s": self.round_timeout_s,
            "query-timeout-s": self.query_timeout_s,
            "node-wait-s": self.node_wait_s,
            "show-progress": self.show_progress,
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ServerSettings:
        what = "the Flower run config"
        return cls(
            job_toml=_field(config, "job-toml", str, what),
            run_dir=_field(config, "run-dir", str, what),
            resume=_field(config, "resume", bool, what),
            round_timeout_s=_field(config, "round-timeout-s", float, what),
            query_timeout_s=_field(config, "query-timeout-s", float, what),
            node_wait_s=_field(config, "node-wait-s", float, what),
            show_progress=_field(config, "show-progress", bool, what),
        )


STATUS_FILE = "flower_status.json"
NODES_FILE = "flower_nodes.csv"


def _write_status(run_dir: Path, **status: Any) -> None:
    path = run_dir / STATUS_FILE
    tmp = path.with_suffix(".tmp")
    import socket

    record = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time(), **status}
    tmp.write_text(json.dumps(record))
    tmp.replace(path)


class LegendStrategy(Strategy):
    """A Flower strategy that plans, slices and aggregates with legend's round core.

    Every round it asks the :class:`~legend.federation.session.RunSession` for the round's
    plan and per-device instructions (planned for the devices whose nodes are connected),
    builds a fresh message per node with that node's own plan and adapter slice
    (:meth:`configure_train`), and hands the replies back to the session, which checks and
    aggregates heterogeneous updates with the run's rule, evaluates, records and writes the
    checkpoint (:meth:`aggregate_train`). Nodes that do not reply within the round's timeout
    are passed as ``missing`` and are not planned again.

    Parameters
    ----------
    session
        The run's session (owns the server core and the run directory).
    node_of
        Which Flower node plays which device.
    job
        The job payload sent with every message (:func:`job_payload`).
    round_timeout_s
        The reply timeout of a round.
    """

    def __init__(
        self,
        session: Any,
        node_of: Mapping[str, int],
        job: ConfigRecord,
        *,
        round_timeout_s: float,
    ) -> None:
        self.session = session
        self.node_of = dict(node_of)
        self.job = job
        self.round_timeout_s = round_timeout_s
        self.lost: set[str] = set()
        self._pending: tuple[Any, list[ClientInstruction]] | None = None
        self._nodes_csv = Path(session.out) / NODES_FILE

    # -- the Strategy contract ------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Plan round ``server_round`` and build one message per participating node.

        ``arrays`` and ``config`` are ignored: the global adapter lives in the session and
        every node gets its own slice of it.
        """
        connected = set(grid.get_node_ids())
        available = [d for d, n in self.node_of.items() if n in connected and d not in self.lost]
        if not available:
            raise FlowerEngineError(
                f"round {server_round}: no device is left to train (every node dropped or "
                "disconnected); restart the SuperNodes and continue with --resume"
            )
        plan, instructions = self.session.start_round(server_round, available)
        self._pending = (plan, instructions)
        return [
            grid.create_message(
                content=instruction_to_record(ins, self.job),
                message_type="train",
                dst_node_id=self.node_of[ins.device_id],
                group_id=str(server_round),
                ttl=self.round_timeout_s + 60.0,
            )
            for ins in instructions
        ]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the replies of round ``server_round`` through the session.

        Error replies, undecodable replies and nodes that never answered count as dropped
        (``missing``); they are left out of later rounds. Returns the new global adapter and
        the round's numeric records.
        """
        if self._pending is None:
            raise FlowerEngineError("aggregate_train called before configure_train")
        plan, instructions = self._pending
        self._pending = None
        device_of = {n: d for d, n in self.node_of.items()}
        decoded: list[ClientReply] = []
        node_rows: list[dict[str, Any]] = []
        for msg in replies:
            device = device_of.get(msg.metadata.src_node_id, "?")
            if msg.has_error():
                log.warning(
                    "round %d: node %s (%s) failed: %s",
                    server_round,
                    msg.metadata.src_node_id,
                    device,
                    msg.error.reason,
                )
                continue
            try:
                reply = reply_from_record(msg.content)
            except FlowerInputError as exc:
                log.warning("round %d: reply of %s unusable: %s", server_round, device, exc)
                continue
            if reply.device_id != device or reply.round != server_round:
                log.warning(
                    "round %d: node %s replied for %s round %d; ignored",
                    server_round,
                    device,
                    reply.device_id,
                    reply.round,
                )
                continue
            decoded.append(reply)
            extra = msg.content.config_records[_REPLY]
            node_rows.append(
                {
                    "round": server_round,
                    "device_id": device,
                    "node_id": msg.metadata.src_node_id,
                    "pid": extra.get("pid", ""),
                    "model_loads": extra.get("model-loads", ""),
                    "host_time_s": reply.host_time_s,
                }
            )
        answered = {r.device_id for r in decoded}
        missing = sorted({ins.device_id for ins in instructions} - answered)
        if missing:
            log.warning(
                "round %d: no reply from %s within %.0f s; continuing without them",
                server_round,
                ", ".join(missing),
                self.round_timeout_s,
            )
            self.lost.update(missing)
        row = self.session.complete_round(server_round, plan, decoded, missing=missing)
        _append_rows(self._nodes_csv, node_rows)
        metrics: dict[str, Any] = {
            str(k): float(v)
            for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        }
        return state_to_arrays(self.session.server.global_state), MetricRecord(metrics)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """No federated evaluation: the session evaluates the global adapter centrally."""
        return []

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        log.info(
            "LegendStrategy: method %s, aggregation %s, %d devices on nodes, round timeout %.0f s",
            self.session.cfg.job.method,
            self.session.cfg.aggregation,
            len(self.node_of),
            self.round_timeout_s,
        )

    def start(  # type: ignore[override]
        self,
        grid: Grid,
        initial_arrays: ArrayRecord | None = None,
        num_rounds: int | None = None,
        timeout: float | None = None,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Run the session's pending rounds (all of them, or those left after ``--resume``).

        Evaluation is central (in the session), so ``evaluate_fn`` and the evaluate
        configuration are not used; ``num_rounds`` and ``timeout`` default to the job's
        rounds and the strategy's round timeout.
        """
        result = Result()
        arrays = initial_arrays or state_to_arrays(self.session.server.global_state)
        wait = self.round_timeout_s if timeout is None else timeout
        rounds = list(self.session.pending_rounds())
        if num_rounds is not None:
            rounds = rounds[:num_rounds]
        for t in rounds:
            messages = list(self.configure_train(t, arrays, train_config or ConfigRecord(), grid))
            replies = grid.send_and_receive(messages, timeout=wait)
            new_arrays, metrics = self.aggregate_train(t, replies)
            if new_arrays is not None:
                arrays = result.arrays = new_arrays
            if metrics is not None:
                result.train_metrics_clientapp[t] = metrics
        return result


def _append_rows(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    import csv

    if not rows:
        return
    new = not path.exists()
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)


def _wait_for_nodes(grid: Grid, want: int, wait_s: float) -> list[int]:
    deadline = time.monotonic() + wait_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= want or time.monotonic() >= deadline:
            return nodes
        time.sleep(0.5)


def _query_profiles(
    grid: Grid, nodes: Sequence[int], job: ConfigRecord, fleet: Fleet, timeout_s: float
) -> tuple[dict[str, int], dict[str, DeviceProfile]]:
    """Ask every node for its device and profile; every bad node is named in one error."""
    messages = [
        grid.create_message(
            content=RecordDict({_JOB: ConfigRecord(dict(job))}),
            message_type="query",
            dst_node_id=node,
            group_id="profile",
            ttl=timeout_s + 60.0,
        )
        for node in nodes
    ]
    replies = list(grid.send_and_receive(messages, timeout=timeout_s))
    problems: list[str] = []
    node_of: dict[str, int] = {}
    profiles: dict[str, DeviceProfile] = {}
    for msg in replies:
        node = msg.metadata.src_node_id
        if msg.has_error():
            problems.append(f"node {node}: {msg.error.reason}")
            continue
        record = msg.content.config_records.get(_PROFILE)
        if record is None:
            problems.append(f"node {node}: reply has no `{_PROFILE}`")
            continue
        error = record.get("error", "")
        if error:
            problems.append(f"node {node}: {error!s}")
            continue
        data = {k: v for k, v in record.items() if k in DeviceProfile.__dataclass_fields__}
        try:
            profile = DeviceProfile(**data)
        except (TypeError, FleetError) as exc:
            problems.append(f"node {node}: malformed profile {data}: {exc}")
            continue
        if profile.device_id in node_of:
            problems.append(
                f"nodes {node_of[profile.device_id]} and {node} both claim device "
                f"{profile.device_id!r}; give every SuperNode its own device-id"
            )
            continue
        if profile.device_id not in fleet.device_ids:
            problems.append(f"node {node}: device {profile.device_id!r} is not in the fleet")
            continue
        node_of[profile.device_id] = node
        profiles[profile.device_id] = profile
    silent = sorted(set(nodes) - {m.metadata.src_node_id for m in replies})
    for node in silent:
        log.warning("node %s did not answer the profile query within %.0f s", node, timeout_s)
    if problems:
        raise FlowerNodeError(
            "SuperNodes with a missing or malformed device profile:\n  - " + "\n  - ".join(problems)
        )
    if not node_of:
        raise FlowerEngineError(
            f"no SuperNode answered the profile query within {timeout_s:.0f} s; check that "
            "the nodes run legend's node worker (python -m legend.federation.flower_app node)"
        )
    return node_of, profiles


def run_server(grid: Grid, settings: ServerSettings) -> Any:
    """The ServerApp's body: load the job, query the nodes, run the pending rounds.

    Returns the :class:`~legend.federation.session.RunResult`. The run directory receives
    ``flower_status.json`` (running / finished / failed, with the error) so that a client
    watching a deployment run can report the outcome.
    """
    from legend.federation.job import load_job
    from legend.federation.session import RunSession, prepare, run_log

    out = Path(settings.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_status(out, state="starting")
    logging_to_run_dir = run_log(out)
    logging_to_run_dir.__enter__()
    try:
        with tempfile.TemporaryDirectory(prefix="legend-server-") as tmp:
            job_path = Path(tmp) / "job.toml"
            job_path.write_text(settings.job_toml)
            cfg = load_job(job_path)
        cal_file = out / "calibration.json"
        calibration: Calibration | str | None = "config"
        if settings.resume:
            calibration = Calibration.load(cal_file) if cal_file.is_file() else None
        prepared = prepare(cfg, calibration=calibration)
        fleet = prepared.fleet
        job = job_payload(cfg, fleet, prepared.calibration)
        nodes = _wait_for_nodes(grid, len(fleet), settings.node_wait_s)
        if not nodes:
            raise FlowerEngineError(
                f"no SuperNode connected within {settings.node_wait_s:.0f} s; start "
                "SuperNodes (see docs/flower.md) before the run"
            )
        _write_status(out, state="querying", nodes=len(nodes))
        node_of, profiles = _query_profiles(grid, nodes, job, fleet, settings.query_timeout_s)
        absent = [d for d in fleet.device_ids if d not in node_of]
        if absent:
            log.warning("devices without a node (not planned): %s", ", ".join(absent))
        # Plan with the profiles the nodes reported, keeping the fleet's order (device
        # indices seed every draw, so they must not move).
        prepared.fleet = Fleet(
            devices=tuple(profiles.get(d.device_id, d) for d in fleet.devices),
            source=fleet.source,
        )
        session = RunSession(
            cfg,
            out,
            resume=settings.resume,
            prepared=prepared,
            show_progress=settings.show_progress,
        )
        _write_status(out, state="running", devices=sorted(node_of))
        strategy = LegendStrategy(session, node_of, job, round_timeout_s=settings.round_timeout_s)
        strategy.summary()
        strategy.start(grid)
        result = session.finish()
        _write_status(out, state="finished", rounds=result.rounds_completed)
        return result
    except BaseException as exc:
        code = getattr(exc, "exit_code", 1)
        _write_status(
            out,
            state="failed",
            error=f"{exc}" if isinstance(exc, FederationError) else repr(exc),
            error_type=type(exc).__name__,
            exit_code=code,
            traceback=traceback.format_exc(),
        )
        raise
    finally:
        logging_to_run_dir.__exit__(None, None, None)


def make_server_app(
    settings: ServerSettings | None = None, sink: list[Any] | None = None
) -> ServerApp:
    """A ServerApp running legend's job.

    With ``settings`` (the simulation engine, in-process) they are used as given; without,
    they are read from the Flower run config (deployment: the keys of
    :meth:`ServerSettings.to_config`). The run's result is appended to ``sink``.
    """
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        current = settings or ServerSettings.from_config(context.run_config)
        result = run_server(grid, current)
        if sink is not None:
            sink.append(result)

    return app


server_app = make_server_app()
"""The ServerApp of a deployment run (settings from the run config)."""


# -- the long-lived node worker (deployment) ----------------------------------------------


def _runtime_client(address: str, insecure: bool, root_certificates: str | None, token: str = ""):  # type: ignore[no-untyped-def]
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
    )
    from flwr.supercore.runtime import RuntimeHttpClient

    interceptors: list[Any] = [
        RuntimeVersionHttpInterceptor(component_name="flwr-clientapp" if token else "SuperExec")
    ]
    if token:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=insecure,
        root_certificates=None if insecure else root_certificates,
        interceptors=interceptors,
        retry_invoker=None,
    )


class _Superseded(Exception):
    """The SuperNode created a newer task while this one's message never arrived."""

    def __init__(self, token: str) -> None:
        super().__init__("superseded by a newer task")
        self.token = token


def _pull_task_input(
    client: Any, acquire: Callable[[], str | None], *, max_wait_s: float
) -> tuple[Message, Context]:
    """Pull a task's message and context from the SuperNode, with a bounded wait.

    Flower's own pull waits up to two hours for the message's objects. A SuperNode that
    drops a message half-received (its run was stopped, e.g. a killed ServerApp) leaves
    the task pending with objects that never arrive, and it has already moved on to the
    next message (it handles one at a time). So while an object is unavailable the worker
    asks the SuperNode for a newer task: if there is one, this task is stale and
    :class:`_Superseded` carries the newer task's token. The wait also ends at the
    message's expiry (``created_at + ttl``) and after ``max_wait_s``.
    """
    from flwr.common.serde import context_from_proto
    from flwr.proto.node_pb2 import Node
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import (
        ObjectUnavailableError,
        pull_and_inflate_object_from_tree,
    )
    from flwr.supercore.task_identity import TaskIdentity

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = res.task_id
    TaskIdentity.run_id = res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context = context_from_proto(res.context)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise FlowerEngineError(f"the SuperNode has no message for run {context.run_id}")
    meta = pulled.messages_list[0].metadata
    expires = meta.created_at + meta.ttl if meta.ttl > 0 else math.inf
    deadline = time.monotonic() + max_wait_s
    node = Node(node_id=context.node_id)
    pull = make_pull_object_fn_protobuf(client.PullObject, node, context.run_id)
    lock = threading.Lock()
    last_check = [0.0]

    def pull_object(object_id: str) -> bytes:
        try:
            return pull(object_id)
        except ObjectUnavailableError:
            with lock:
                now = time.monotonic()
                if now - last_check[0] >= 0.5:
                    last_check[0] = now
                    newer = acquire()
                    if newer:
                        raise _Superseded(newer) from None
                if now > deadline or time.time() > expires:
                    raise FlowerEngineError(
                        f"message {meta.message_id[:12]} of run {context.run_id} did not "
                        f"arrive at the SuperNode in time; task abandoned"
                    ) from None
            raise

    tree = pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree,
        pull_object,
        make_confirm_message_received_fn_protobuf(
            client.ConfirmMessageReceived, node, context.run_id
        ),
        return_type=Message,
        max_time=max_wait_s,
        initial_backoff=0.1,
        backoff_cap=0.5,
    )
    message.metadata.__dict__["_message_id"] = tree.object_id
    return message, context


def _run_task(
    address: str,
    token: str,
    insecure: bool,
    root_certificates: str | None,
    *,
    acquire: Callable[[], str | None] = lambda: None,
    max_wait_s: float = 120.0,
) -> str | None:
    """Execute one ClientApp task of a SuperNode in this process (model cache kept).

    Returns the token of a newer task of the same SuperNode when this one turned out to be
    stale (see :func:`_pull_task_input`); the caller runs that one next.
    """
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

    client = _runtime_client(address, insecure, root_certificates, token)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message = reply = None
    context = None
    newer: str | None = None
    status, details = SubStatus.FAILED, "task failed"
    try:
        try:
            message, context = _pull_task_input(client, acquire, max_wait_s=max_wait_s)
        except _Superseded as exc:
            log.warning("SuperNode at %s dropped a task's message; running its next task", address)
            newer, details = exc.token, "stale task: the SuperNode moved on to a newer message"
            return newer
        try:
            reply = client_app(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
        except Exception as exc:
            log.exception("ClientApp raised")
            details = f"{type(exc).__name__}: {exc}"
            reply = Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details),
                reply_to=message,
            )
        if reply is not None and context is not None:
            push_message(client, reply, context)
    finally:
        try:
            push_task_output(client=client, context=context, sub_status=status, details=details)
        except Exception as exc:  # the SuperNode forgot the task (e.g. it restarted)
            log.warning("could not close a task of the SuperNode at %s: %s", address, exc)
        finally:
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()
    return None


def serve_nodes(
    addresses: Sequence[str],
    *,
    insecure: bool = True,
    root_certificates: str | None = None,
    poll_interval_s: float = 0.2,
    give_up_after_s: float = 30.0,
    task_input_wait_s: float = 120.0,
    stop: threading.Event | None = None,
) -> None:
    """Run ClientApp tasks of SuperNodes in this process, keeping the model cached.

    Each address is the Runtime API (``--port``) of a SuperNode started with
    ``--isolation process``. The worker polls them in turn for a ClientApp task and runs it
    here, so the frozen base model and the data shares are loaded once and reused across
    rounds and across the SuperNodes it serves. A SuperNode that stays unreachable for
    ``give_up_after_s`` is dropped; the worker returns when none is left (or on ``stop``).

    A task whose message the SuperNode dropped half-received (its run was stopped, e.g. a
    killed ServerApp) is abandoned as soon as the SuperNode has a newer task, or after
    ``task_input_wait_s`` (see :func:`_pull_task_input`), so that it cannot block the
    worker and the next run.
    """
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType

    stop = stop or threading.Event()
    pollers = {a: _runtime_client(a, insecure, root_certificates) for a in addresses}
    last_ok = dict.fromkeys(addresses, time.monotonic())
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    while pollers and not stop.is_set():
        busy = False
        for address in list(pollers):
            try:
                res = pollers[address].AcquireTask(request)
            except Exception as exc:  # SuperNode gone or restarting
                if time.monotonic() - last_ok[address] > give_up_after_s:
                    log.warning("SuperNode at %s unreachable (%s); no longer served", address, exc)
                    pollers.pop(address).close()
                continue
            last_ok[address] = time.monotonic()
            token = res.token if res.HasField("task") else ""
            while token:
                busy = True

                def acquire(poller: Any = pollers[address]) -> str | None:
                    newer = poller.AcquireTask(request)
                    return str(newer.token) if newer.HasField("task") and newer.token else None

                try:
                    token = (
                        _run_task(
                            address,
                            token,
                            insecure,
                            root_certificates,
                            acquire=acquire,
                            max_wait_s=task_input_wait_s,
                        )
                        or ""
                    )
                except Exception:
                    log.exception("task of the SuperNode at %s failed", address)
                    token = ""
        if not busy:
            stop.wait(poll_interval_s)
    for poller in pollers.values():
        poller.close()


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m legend.federation.flower_app",
        description="legend's node worker: runs the ClientApp of SuperNodes started with "
        "--isolation process, keeping the model loaded across rounds.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    node = sub.add_parser("node", help="serve one or more SuperNodes")
    node.add_argument(
        "--supernode",
        action="append",
        required=True,
        metavar="HOST:PORT",
        help="Runtime API address of a SuperNode (its --port); repeat to serve several",
    )
    node.add_argument("--root-certificates", default=None, help="CA of the Runtime API (TLS)")
    node.add_argument("--give-up-after-s", type=float, default=30.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    stop = threading.Event()

    def _stop(_signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    serve_nodes(
        args.supernode,
        insecure=args.root_certificates is None,
        root_certificates=args.root_certificates,
        give_up_after_s=args.give_up_after_s,
        stop=stop,
    )
    return 0


if __name__ == "__main__":
    sys.exit(_main())
