"""legend's ServerApp and its Strategy: plan, send slices, aggregate through the session.

The server side drives a :class:`~legend.federation.session.RunSession` (the same run
directory, records, checkpoints and resume as the in-process engine); the Strategy only
turns the session's instructions into messages and the replies back into
:class:`~legend.federation.core.ClientReply` objects. Flower's own round loop
(:meth:`Strategy.start`) runs the rounds.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from legend.federation.core import ClientInstruction, ClientReply
from legend.federation.errors import FederationError
from legend.federation.flower.codec import (
    JOB,
    PROFILE,
    REPLY,
    ServerSettings,
    instruction_to_record,
    job_payload,
    reply_from_record,
    state_to_arrays,
)
from legend.federation.flower.errors import FlowerEngineError, FlowerInputError, FlowerNodeError
from legend.federation.flower.records import append_node_rows, write_status
from legend.planner.costs import Calibration
from legend.planner.profiles import DeviceProfile, Fleet, FleetError

__all__ = ["LegendStrategy", "make_server_app", "run_server", "server_app"]

log = logging.getLogger("legend.federation")


class LegendStrategy(Strategy):
    """A Flower strategy that plans, slices and aggregates with legend's round core.

    Every round it asks the :class:`~legend.federation.session.RunSession` for the round's
    plan and per-device instructions (planned for the devices whose nodes are connected),
    builds a fresh message per node with that node's own plan and adapter slice
    (:meth:`configure_train`), and hands the replies back to the session, which checks and
    aggregates heterogeneous updates with the run's rule, evaluates, records and writes the
    checkpoint (:meth:`aggregate_train`). Nodes that do not reply within the round's timeout
    are passed as ``missing`` and are not planned again.

    Flower numbers the rounds of :meth:`Strategy.start` from 1; the strategy maps Flower's
    round ``k`` to the session's ``k``-th pending round (they differ after ``--resume``). Run
    it with :meth:`run`, which starts Flower's loop over exactly the pending rounds.

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
    on_round
        Called with each round's node rows (device, node, process, model loads) after the
        session recorded the round; the ServerApp appends them to ``flower_nodes.csv``.
    """

    def __init__(
        self,
        session: Any,
        node_of: Mapping[str, int],
        job: ConfigRecord,
        *,
        round_timeout_s: float,
        on_round: Callable[[list[dict[str, Any]]], None] = lambda rows: None,
    ) -> None:
        self.session = session
        self.node_of = dict(node_of)
        self.job = job
        self.round_timeout_s = round_timeout_s
        self.lost: set[str] = set()
        self.on_round = on_round
        self.rounds = list(session.pending_rounds())
        self._pending: tuple[Any, list[ClientInstruction]] | None = None

    def run(self, grid: Grid) -> Any:
        """Run the session's pending rounds with Flower's loop; returns Flower's result.

        Evaluation is central (the session evaluates the global adapter after each round),
        so Flower's evaluate steps send nothing.
        """
        return self.start(
            grid,
            initial_arrays=state_to_arrays(self.session.server.global_state),
            num_rounds=len(self.rounds),
            timeout=self.round_timeout_s,
        )

    def _session_round(self, server_round: int) -> int:
        if not 1 <= server_round <= len(self.rounds):
            raise FlowerEngineError(
                f"Flower asked for round {server_round}; the session has {len(self.rounds)} "
                "pending rounds"
            )
        return int(self.rounds[server_round - 1])

    # -- the Strategy contract ------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Plan the round and build one message per participating node.

        ``arrays`` and ``config`` are ignored: the global adapter lives in the session and
        every node gets its own slice of it.
        """
        server_round = self._session_round(server_round)
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
        """Aggregate the round's replies through the session.

        Error replies, undecodable replies and nodes that never answered count as dropped
        (``missing``); they are left out of later rounds. Returns the new global adapter and
        the round's numeric records.
        """
        server_round = self._session_round(server_round)
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
            extra = msg.content.config_records[REPLY]
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
        self.on_round(node_rows)
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
            content=RecordDict({JOB: ConfigRecord(dict(job))}),
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
        record = msg.content.config_records.get(PROFILE)
        if record is None:
            problems.append(f"node {node}: reply has no `{PROFILE}`")
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
            "the nodes run legend's node worker (python -m legend.federation.flower node)"
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
    write_status(out, state="starting")
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
        write_status(out, state="querying", nodes=len(nodes))
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
        write_status(out, state="running", devices=sorted(node_of))
        strategy = LegendStrategy(
            session,
            node_of,
            job,
            round_timeout_s=settings.round_timeout_s,
            on_round=lambda rows: append_node_rows(out, rows),
        )
        strategy.run(grid)
        result = session.finish()
        write_status(out, state="finished", rounds=result.rounds_completed)
        return result
    except BaseException as exc:
        code = getattr(exc, "exit_code", 1)
        write_status(
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
