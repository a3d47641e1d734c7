"""legend's ClientApp: a node reports its device profile and trains its device's rounds.

Each node learns its identity from its node config: ``device-id="phone-1"`` (deployment)
or ``partition-id=N`` (the simulation runtime; the N-th device of the fleet). Optional
node-config keys ``tflops``, ``memory-gb``, ``uplink-mbps``, ``downlink-mbps`` and
``device-class`` override the fleet file's declared profile; the node reports the result
and the server plans with the reported profiles. A node recomputes its data partition from
the job's seed (:func:`legend.federation.data.partition`) and tokenizes only its share.

A :class:`JobCache` keeps the frozen base model, the data and the client core of the
current job across the messages its process handles. How long that is depends on the
runtime: a ray actor of the simulation keeps it for the whole run; Flower's deployment
runtime starts a new ``flwr-clientapp`` process per message (so the model is loaded per
message) unless legend's node worker (:mod:`~legend.federation.flower.node_worker`) runs
the app, once per node process. The training itself is
:meth:`~legend.federation.core.ClientCore.train`; this module only decodes and encodes.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from legend.federation.flower.codec import (
    PROFILE,
    PROTOCOL_VERSION,
    check_protocol,
    fleet_from_json,
    instruction_from_record,
    job_record,
    read_field,
    reply_to_record,
)
from legend.federation.flower.errors import FlowerInputError, FlowerNodeError
from legend.federation.job import JobConfig
from legend.planner.costs import Calibration
from legend.planner.profiles import DeviceProfile, Fleet, FleetError

__all__ = [
    "NODE_PROFILE_KEYS",
    "JobCache",
    "LoadedJob",
    "client_app",
    "make_client_app",
    "node_profile",
]

NODE_PROFILE_KEYS = {
    "tflops": "tflops",
    "memory-gb": "memory_gb",
    "uplink-mbps": "uplink_mbps",
    "downlink-mbps": "downlink_mbps",
    "device-class": "device_class",
}
"""Node-config keys that override the fleet file's profile of the node's device."""


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
class LoadedJob:
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


class JobCache:
    """The job a node process holds: loaded on its first message, reused while it lasts.

    One job at a time (a message of another job frees the previous model); thread-safe.
    ``model_loads`` counts the base-model loads of this cache; nodes report it so that a
    run shows how often its nodes loaded the model. A pickled cache arrives empty: the
    simulation runtime pickles the ClientApp into every ray actor, and each actor loads
    the job for itself.
    """

    def __init__(self) -> None:
        self._empty()

    def _empty(self) -> None:
        self._jobs: dict[str, LoadedJob] = {}
        self._lock = threading.Lock()
        self.model_loads = 0

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._empty()

    def get(self, payload: Mapping[str, Any]) -> LoadedJob:
        """The job of a message's payload (:func:`~legend.federation.flower.codec.job_payload`)."""
        check_protocol(payload, "job message")
        digest = read_field(payload, "digest", str, "job message")
        with self._lock:
            if digest not in self._jobs:
                self._jobs.clear()  # one job per process at a time: free the previous model
                self._jobs[digest] = _load_job(payload)
                self.model_loads += 1
            return self._jobs[digest]


def _load_job(payload: Mapping[str, Any]) -> LoadedJob:
    """Load a job's model, data partition and client core from its message payload."""
    import torch

    from legend.federation.apply import AdapterHost
    from legend.federation.core import ClientCore
    from legend.federation.job import load_job
    from legend.federation.session import load_job_data
    from legend.planner.costs import CostModel

    fleet = fleet_from_json(read_field(payload, "fleet-json", str, "job message"))
    with tempfile.TemporaryDirectory(prefix="legend-node-") as tmp:
        fleet_path = Path(tmp) / "fleet.json"
        fleet_path.write_text(json.dumps({"devices": fleet.to_records()}))
        job_path = Path(tmp) / "job.toml"
        job_path.write_text(read_field(payload, "job-toml", str, "job message"))
        # The node needs the fleet only to partition the data; calibration arrives in
        # the message (a server-side path would not exist here).
        cfg = load_job(
            job_path,
            job__fleet=str(fleet_path),
            job__topology="",  # the server's clock applies it; a node never reads it
            planner__calibration="none",
        )
    cal_json = read_field(payload, "calibration-json", str, "job message")
    calibration = Calibration.from_json(cal_json) if cal_json else None
    threads = cfg.train.threads or int(os.environ.get("LEGEND_NODE_THREADS") or 0)
    if threads:
        torch.set_num_threads(threads)
    data = load_job_data(cfg, fleet)
    host = AdapterHost(data.base, data.spec, cfg.job_params)
    costs = CostModel(data.spec, cfg.job_params, calibration)
    return LoadedJob(
        cfg=cfg,
        fleet=fleet,
        client=ClientCore(host, costs, jitter=cfg.federation.jitter),
        tokenizer=data.tokenizer,
        texts=data.dataset.train_texts,
        labels=np.asarray(data.dataset.train_labels),
        parts=[np.asarray(p) for p in data.parts],
    )


def make_client_app(cache: JobCache | None = None) -> ClientApp:
    """legend's ClientApp, holding its jobs in ``cache`` (a new one by default)."""
    jobs = cache or JobCache()
    app = ClientApp()

    @app.query()
    def _query(msg: Message, context: Context) -> Message:
        """Report this node's device profile; loads (and caches) the job's model and data."""
        try:
            payload = job_record(msg.content)
            fleet = fleet_from_json(read_field(payload, "fleet-json", str, "job message"))
            profile = node_profile(context.node_config, fleet)
            start = time.perf_counter()
            jobs.get(payload).data_of(profile.device_id)
            record = {k: v for k, v in profile.to_dict().items() if v is not None}
            record.update(
                {
                    "protocol": PROTOCOL_VERSION,
                    "error": "",
                    "load-time-s": time.perf_counter() - start,
                    "pid": os.getpid(),
                    "model-loads": jobs.model_loads,
                }
            )
        except Exception as exc:  # reported to the server, which names the node
            record = {"protocol": PROTOCOL_VERSION, "error": f"{type(exc).__name__}: {exc}"}
        return Message(RecordDict({PROFILE: ConfigRecord(record)}), reply_to=msg)

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        """Train one round of this node's device with :meth:`ClientCore.train`."""
        job = jobs.get(job_record(msg.content))
        ins = instruction_from_record(msg.content)
        profile = node_profile(context.node_config, job.fleet)
        if profile.device_id != ins.device_id:
            raise FlowerInputError(
                f"this node plays {profile.device_id!r} but was sent the instruction of "
                f"{ins.device_id!r}"
            )
        reply = job.client.train(ins, profile, job.data_of(ins.device_id))
        extra = {"pid": os.getpid(), "model-loads": jobs.model_loads}
        return Message(reply_to_record(reply, extra), reply_to=msg)

    return app


client_app = make_client_app()
"""The ClientApp Flower loads (``legend.federation.flower.client_app:client_app``)."""
