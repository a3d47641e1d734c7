"""The protocol between legend's ServerApp and ClientApp, as Flower records.

Message types and records::

    server -> node  "query"  config "legend.job"          job TOML, fleet, calibration
    node -> server           config "legend.profile"      device id and profile (or "error")
    server -> node  "train"  config "legend.job"          (again: a node may have restarted)
                             config "legend.instruction"  round, plan, seed, optimiser
                             arrays "legend.adapter"      the node's slice of the global adapter
    node -> server           config "legend.reply"        observations (times, bytes, samples)
                             arrays "legend.update"       the trained slice (absent if dropped)

The round core's :class:`~legend.federation.core.ClientInstruction` and
:class:`~legend.federation.core.ClientReply` travel through these records unchanged; nothing
here knows about rounds, plans or aggregation. :class:`ServerSettings` is the run config a
deployment run carries. Decoding checks the protocol version and every field's type and
raises :class:`~legend.federation.flower.errors.FlowerInputError` naming what is wrong.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from legend.federation.adapters import AdapterState
from legend.federation.core import ClientInstruction, ClientReply
from legend.federation.flower.errors import FlowerInputError
from legend.federation.job import JobConfig
from legend.planner.costs import Calibration
from legend.planner.profiles import Fleet

__all__ = [
    "ADAPTER",
    "INSTRUCTION",
    "JOB",
    "PROFILE",
    "PROTOCOL_VERSION",
    "REPLY",
    "UPDATE",
    "ServerSettings",
    "check_protocol",
    "fleet_from_json",
    "instruction_from_record",
    "instruction_to_record",
    "job_payload",
    "job_record",
    "read_field",
    "reply_from_record",
    "reply_to_record",
    "state_from_arrays",
    "state_to_arrays",
]

PROTOCOL_VERSION = 2
"""Version of the message layout above; nodes refuse messages of another version."""

JOB = "legend.job"
INSTRUCTION = "legend.instruction"
ADAPTER = "legend.adapter"
REPLY = "legend.reply"
UPDATE = "legend.update"
PROFILE = "legend.profile"


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
            "build-prefix": bool(ins.build_prefix),
        }
    )
    return RecordDict(
        {
            JOB: ConfigRecord(dict(job)),
            INSTRUCTION: config,
            ADAPTER: state_to_arrays(ins.init_state),
        }
    )


def read_field(record: Mapping[str, Any], key: str, kind: type, what: str) -> Any:
    """``record[key]`` checked to be a ``kind`` (an int is accepted as a float)."""
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


def read_fields(record: Mapping[str, Any], kinds: Mapping[str, type], what: str) -> dict[str, Any]:
    """:func:`read_field` of every ``kinds`` entry, by its Python name (the key has hyphens)."""
    return {
        name: read_field(record, name.replace("_", "-"), kind, what) for name, kind in kinds.items()
    }


def check_protocol(record: Mapping[str, Any], what: str) -> None:
    """Refuse a record of another protocol version."""
    version = record.get("protocol")
    if version != PROTOCOL_VERSION:
        raise FlowerInputError(
            f"{what} uses protocol version {version!r}, this node speaks {PROTOCOL_VERSION}; "
            "install the same legend version on the server and every node"
        )


# The instruction fields a train message carries in its config record, with their types.
_INSTRUCTION_FIELDS: dict[str, type] = {
    "round": int,
    "device_id": str,
    "device_index": int,
    "layers": list,
    "ranks": list,
    "local_steps": int,
    "batch_size": int,
    "learning_rate": float,
    "weight_decay": float,
    "loss": str,
    "optimizer": str,
    "freeze_a": bool,
    "seed": list,
}


def instruction_from_record(content: RecordDict) -> ClientInstruction:
    """Decode a train message's payload into the round core's instruction."""
    if INSTRUCTION not in content.config_records or ADAPTER not in content.array_records:
        raise FlowerInputError(
            f"train message lacks `{INSTRUCTION}` or `{ADAPTER}`; it was not sent by legend"
        )
    c = content.config_records[INSTRUCTION]
    what = "train instruction"
    check_protocol(c, what)
    fields = read_fields(c, _INSTRUCTION_FIELDS, what)
    for name in ("layers", "ranks", "seed"):
        fields[name] = tuple(int(x) for x in fields[name])
    return ClientInstruction(
        **fields,
        init_state=state_from_arrays(content.array_records[ADAPTER]),
        fault=read_field(c, "fault", str, what) or None,
        # absent from the messages of servers before the frozen-prefix cache: no build
        build_prefix=read_field(c, "build-prefix", bool, what) if "build-prefix" in c else False,
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


_REPLY_FIELDS: dict[str, type] = {
    "round": int,
    "device_id": str,
    "num_samples": int,
    "steps": int,
    "dropped": bool,
}


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
    if reply.layer_decrease:
        config["layer-decrease"] = [float(v) for v in reply.layer_decrease]
    config.update(extra or {})
    records: dict[str, Any] = {REPLY: ConfigRecord(config)}
    if reply.state is not None:
        records[UPDATE] = state_to_arrays(reply.state)
    return RecordDict(records)


def reply_from_record(content: RecordDict) -> ClientReply:
    """Decode a train reply into the round core's :class:`ClientReply`."""
    if REPLY not in content.config_records:
        raise FlowerInputError(f"train reply lacks `{REPLY}`; it was not sent by legend")
    c = content.config_records[REPLY]
    what = "train reply"
    check_protocol(c, what)
    state = None
    if read_field(c, "has-state", bool, what):
        if UPDATE not in content.array_records:
            raise FlowerInputError(f"train reply announces an update but has no `{UPDATE}`")
        state = state_from_arrays(content.array_records[UPDATE])
    kinds = {**_REPLY_FIELDS, **dict.fromkeys(_REPLY_FLOATS, float)}
    decrease = read_field(c, "layer-decrease", list, what) if "layer-decrease" in c else []
    if not all(isinstance(v, float) for v in decrease):
        raise FlowerInputError(
            f"{what}: `layer-decrease` = {decrease!r} must be a list of floats, one per model "
            "layer; install the same legend version on the server and every node"
        )
    return ClientReply(state=state, layer_decrease=tuple(decrease), **read_fields(c, kinds, what))


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


# -- the run config of a deployment run -----------------------------------------------------


# The settings' fields with their types (the run config's keys have hyphens).
_SETTINGS_FIELDS: dict[str, type] = {
    "job_toml": str,
    "run_dir": str,
    "resume": bool,
    "round_timeout_s": float,
    "query_timeout_s": float,
    "node_wait_s": float,
    "show_progress": bool,
}


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
        """The settings as a Flower run config (the inverse of :meth:`from_config`)."""
        return {name.replace("_", "-"): getattr(self, name) for name in _SETTINGS_FIELDS}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ServerSettings:
        return cls(**read_fields(config, _SETTINGS_FIELDS, "the Flower run config"))


def job_record(content: RecordDict) -> ConfigRecord:
    """The job payload of a legend message (:func:`job_payload`)."""
    if JOB not in content.config_records:
        raise FlowerInputError(f"message lacks `{JOB}`; it was not sent by legend")
    return content.config_records[JOB]


def fleet_from_json(text: str) -> Fleet:
    """The fleet a job payload carries."""
    try:
        records = json.loads(text)
        return Fleet.from_records(records, source="<job message>")
    except (ValueError, TypeError) as exc:
        raise FlowerInputError(f"the job message carries an unusable fleet: {exc}") from None
