"""Every use of Flower internals in legend, in one module, checked against known versions.

Flower's public API (``flwr.app``, ``flwr.clientapp``, ``flwr.serverapp``,
``flwr.simulation``) covers the apps and the simulation. Two things need more:

- **The long-lived node worker.** Flower's deployment runtime starts a new
  ``flwr-clientapp`` process for every message, which loads the frozen base model per
  message. The node worker (:mod:`~legend.federation.flower.node_worker`) instead pulls a
  SuperNode's ClientApp tasks over its Runtime API and runs them in one process; the task
  protocol (acquire, pull the message and context, heartbeat, push the reply and the task
  output) has no public client.
- **Submitting a run to a SuperLink** without ``flwr run`` (which would read the user's
  Flower configuration and may start its own SuperLink): the Control API client, building
  the app bundle (FAB), listing and stopping runs.

These functions rely on modules Flower does not promise to keep (``flwr.supercore``,
``flwr.supernode``, ``flwr.proto``, ``flwr.common``, ``flwr.cli``) and on message metadata
internals, so they are checked against the versions in :data:`CHECKED_VERSIONS`; a test
fails on any other installed version, and :func:`check_version` warns at run time. Moving
to a new Flower release means running the Flower tests on it and adding it there.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message

from legend.federation.flower.errors import FlowerEngineError

__all__ = [
    "CHECKED_VERSIONS",
    "Superseded",
    "acquire_task",
    "check_version",
    "control_client",
    "flower_version",
    "run_state",
    "run_task",
    "runtime_client",
    "start_run",
    "stop_run",
]

log = logging.getLogger("legend.federation")

CHECKED_VERSIONS = ("1.40.0", "1.41.0", "1.42.0")
"""Flower versions the functions below were checked against (the Flower tests pass)."""

_warned: list[str] = []


def flower_version() -> str:
    """The installed Flower version."""
    return version("flwr")


def check_version() -> None:
    """Warn once when the installed Flower is not one of :data:`CHECKED_VERSIONS`."""
    found = flower_version()
    if found not in CHECKED_VERSIONS and found not in _warned:
        _warned.append(found)
        log.warning(
            "Flower %s is installed; legend's node worker and run submission were checked "
            "against %s only",
            found,
            ", ".join(CHECKED_VERSIONS),
        )


# -- the node worker's task runtime (SuperNode Runtime API) --------------------------------


def runtime_client(
    address: str, insecure: bool, root_certificates: str | None, token: str = ""
) -> Any:
    """A client of the Runtime API of the SuperNode at ``address`` (of one task with ``token``)."""
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


class Superseded(Exception):
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
    :class:`Superseded` carries the newer task's token. The wait also ends at the
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
                        raise Superseded(newer) from None
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


def run_task(
    handler: Callable[..., Message],
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
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

    client = runtime_client(address, insecure, root_certificates, token)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message = reply = None
    context = None
    newer: str | None = None
    status, details = SubStatus.FAILED, "task failed"
    try:
        try:
            message, context = _pull_task_input(client, acquire, max_wait_s=max_wait_s)
        except Superseded as exc:
            log.warning("SuperNode at %s dropped a task's message; running its next task", address)
            newer, details = exc.token, "stale task: the SuperNode moved on to a newer message"
            return newer
        try:
            reply = handler(message=message, context=context)
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


def acquire_task(poller: Any) -> str | None:
    """The token of the SuperNode's next ClientApp task, or ``None`` when it has none."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType

    res = poller.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
    return str(res.token) if res.HasField("task") and res.token else None


# -- submitting a run (SuperLink Control API) ------------------------------------------------


@contextlib.contextmanager
def control_client(address: str, certs: str | None) -> Iterator[Any]:
    from flwr.cli.typing import SuperLinkConnection
    from flwr.cli.utils import init_http_client_from_connection

    connection = SuperLinkConnection(
        name="legend", address=address, root_certificates=certs, insecure=certs is None
    )
    client = init_http_client_from_connection(connection)
    try:
        yield client
    finally:
        client.close()


def start_run(client: Any, app_dir: Path) -> int:
    from flwr.cli.build import build_fab_from_disk
    from flwr.cli.config_utils import load_and_validate
    from flwr.common.config import get_metadata_from_config
    from flwr.common.serde import fab_to_proto, user_config_to_proto
    from flwr.proto.control_pb2 import StartRunRequest
    from flwr.supercore.fab import Fab

    config, _warnings = load_and_validate(app_dir / "pyproject.toml")
    get_metadata_from_config(config)
    fab_bytes = build_fab_from_disk(app_dir)
    fab = Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})
    request = StartRunRequest(
        fab=fab_to_proto(fab), override_config=user_config_to_proto({}), federation=""
    )
    try:
        response = client.StartRun(request)
    except Exception as exc:
        raise FlowerEngineError(f"the SuperLink refused the run: {exc}") from exc
    if not response.HasField("run_id"):
        raise FlowerEngineError("the SuperLink did not start the run (no run id returned)")
    return int(response.run_id)


def run_state(client: Any, run_id: int) -> tuple[str, str, str]:
    from flwr.common.serde import run_from_proto
    from flwr.proto.control_pb2 import ListRunsRequest

    response = client.ListRuns(ListRunsRequest(run_id=run_id))
    runs = [run_from_proto(p) for p in response.run_dict.values()]
    if not runs:
        return "unknown", "", ""
    status = runs[0].status
    return status.status, status.sub_status, status.details


def stop_run(client: Any, run_id: int) -> None:
    from flwr.proto.control_pb2 import StopRunRequest

    with contextlib.suppress(Exception):
        client.StopRun(StopRunRequest(run_id=run_id))
