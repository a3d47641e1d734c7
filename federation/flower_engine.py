"""Run a legend job on Flower: the simulation runtime or a real SuperLink with SuperNodes.

``legend run JOB.toml --engine flower-sim`` runs the job's devices as virtual SuperNodes
on Flower's simulation runtime (ray), in this process. ``legend run JOB.toml --engine
flower-deploy --superlink HOST:PORT`` submits it to a running SuperLink; the ServerApp
runs next to the SuperLink and writes the run directory there, SuperNodes train their
devices (see ``docs/flower.md``). Both use the apps of :mod:`legend.federation.flower`, which drive
the same :class:`~legend.federation.session.RunSession` as the in-process engine, so the run
directory, checkpoints and ``--resume`` are the same.

:class:`LocalFederation` (:func:`start_local_federation`) starts a SuperLink, N SuperNodes
and legend's node workers on 127.0.0.1 with free ports and stops them by process id; the
script ``scripts/flower_local.py`` wraps it. Nothing here relies on ``flwr run``'s
auto-started local SuperLink or on runtime dependency installs.

Bounded waits everywhere: node start-up (``node_wait_s``), the profile query
(``query_timeout_s``), every round (``round_timeout_s``) and the whole deployment run
(``deadline_s``). Defaults come from the environment variables ``LEGEND_FLOWER_NODE_WAIT_S``,
``LEGEND_FLOWER_QUERY_TIMEOUT_S``, ``LEGEND_FLOWER_ROUND_TIMEOUT_S`` and
``LEGEND_FLOWER_DEADLINE_S``; TLS for a remote SuperLink from
``LEGEND_FLOWER_ROOT_CERTIFICATES`` (or ``LEGEND_FLOWER_INSECURE=1``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from legend.federation.errors import FederationInputError
from legend.federation.flower import flwr_internals
from legend.federation.flower.codec import ServerSettings
from legend.federation.flower.errors import FlowerEngineError, FlowerInputError
from legend.federation.flower.records import NODES_FILE, STATUS_FILE, read_status
from legend.federation.job import JobConfig
from legend.federation.session import check_run_dir, load_result

__all__ = [
    "FLOWER_ENV",
    "FlowerConnectionError",
    "LocalFederation",
    "flower_env",
    "parse_address",
    "run",
    "start_local_federation",
]

log = logging.getLogger("legend.federation")

FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
"""Environment every Flower process of a legend run gets (no telemetry, offline)."""


class FlowerConnectionError(FlowerInputError):
    """A SuperLink that cannot be reached at the given address."""


def _env_float(name: str, default: float) -> float:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        value = float(text)
    except ValueError:
        raise FlowerInputError(
            f"environment variable {name} = {text!r} must be a number of seconds"
        ) from None
    if not math.isfinite(value) or value <= 0:
        raise FlowerInputError(f"environment variable {name} = {text!r} must be > 0")
    return value


def flower_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) plus :data:`FLOWER_ENV`, with this
    interpreter's ``bin`` directory first on ``PATH`` (Flower starts its helpers by name)."""
    env = dict(os.environ if base is None else base)
    env.update(FLOWER_ENV)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return env


def parse_address(text: str | None, *, what: str = "--superlink") -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 as ``[::1]:PORT``) -> ``(host, port)``; bad input names the fix."""
    if text is None or not text.strip():
        raise FlowerInputError(
            f"{what} is required for engine flower-deploy: give the SuperLink's address as "
            "HOST:PORT, e.g. --superlink 127.0.0.1:9093 (scripts/flower_local.py start "
            "prints one)"
        )
    text = text.strip()
    if "://" in text:
        raise FlowerInputError(
            f"{what} = {text!r}: give HOST:PORT without a scheme, e.g. 127.0.0.1:9093"
        )
    host, sep, port_text = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise FlowerInputError(
            f"{what} = {text!r} is not HOST:PORT with a port in 1..65535, e.g. 127.0.0.1:9093"
        )
    return host, int(port_text)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_reachable(host: str, port: int, *, timeout_s: float = 5.0) -> None:
    """Fail fast (bounded) when nothing listens at ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return
    except OSError as exc:
        raise FlowerConnectionError(
            f"SuperLink at {host}:{port} is unreachable ({exc}); start one (for a try on this "
            "machine: python scripts/flower_local.py start) or fix --superlink"
        ) from None


# -- run ----------------------------------------------------------------------------------


def run(
    cfg: JobConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    superlink: str | None = None,
    show_progress: bool = True,
    round_timeout_s: float | None = None,
    query_timeout_s: float | None = None,
    node_wait_s: float | None = None,
    deadline_s: float | None = None,
    root_certificates: str | None = None,
    num_cpus: int | None = None,
) -> Any:
    """Run (or resume) ``cfg`` on Flower; returns a :class:`~legend.federation.session.RunResult`.

    Parameters
    ----------
    cfg
        The job; ``cfg.job.engine`` picks ``flower-sim`` or ``flower-deploy``.
    run_dir
        The run directory (for ``flower-deploy``: a path on the SuperLink's machine).
    resume
        Continue the run in ``run_dir`` from its last completed round.
    superlink
        ``HOST:PORT`` of a running SuperLink (``flower-deploy`` only).
    show_progress
        Print a line per round.
    round_timeout_s, query_timeout_s, node_wait_s, deadline_s
        Bounded waits (see the module docstring for their environment defaults).
    root_certificates
        CA certificate (PEM) of a SuperLink with TLS; default ``LEGEND_FLOWER_ROOT_CERTIFICATES``.
    num_cpus
        CPUs the simulation runtime may use (default: all).
    """
    for key, value in FLOWER_ENV.items():
        os.environ.setdefault(key, value)
    out = Path(run_dir).absolute()
    engine = cfg.job.engine
    if engine not in ("flower-sim", "flower-deploy"):
        raise FlowerInputError(
            f"`job.engine` = {engine!r} does not run on Flower; use flower-sim or flower-deploy"
        )
    if engine == "flower-sim" and superlink is not None:
        raise FlowerInputError(
            "--superlink is for engine flower-deploy; flower-sim runs its own simulated nodes"
        )
    settings = ServerSettings(
        job_toml=cfg.to_toml(),
        run_dir=str(out),
        resume=resume,
        round_timeout_s=round_timeout_s or _env_float("LEGEND_FLOWER_ROUND_TIMEOUT_S", 300.0),
        query_timeout_s=query_timeout_s or _env_float("LEGEND_FLOWER_QUERY_TIMEOUT_S", 300.0),
        node_wait_s=node_wait_s or _env_float("LEGEND_FLOWER_NODE_WAIT_S", 60.0),
        show_progress=show_progress,
    )
    if engine == "flower-deploy":
        host, port = parse_address(superlink)
        check_run_dir(cfg, out, resume)
        check_reachable(host, port)
        certs = root_certificates or os.environ.get("LEGEND_FLOWER_ROOT_CERTIFICATES") or None
        if (
            certs is None
            and not _is_loopback(host)
            and os.environ.get("LEGEND_FLOWER_INSECURE") != "1"
        ):
            raise FlowerInputError(
                f"SuperLink {host}:{port} is on another machine: give its CA certificate with "
                "LEGEND_FLOWER_ROOT_CERTIFICATES=ca.crt (TLS), or set LEGEND_FLOWER_INSECURE=1 "
                "to connect without TLS"
            )
        if certs is not None and not Path(certs).is_file():
            raise FlowerInputError(f"root certificates file {certs} does not exist")
        budget = deadline_s or _env_float(
            "LEGEND_FLOWER_DEADLINE_S",
            settings.node_wait_s
            + settings.query_timeout_s
            + cfg.job.rounds * (settings.round_timeout_s + 120.0)
            + 300.0,
        )
        return _run_deployment(cfg, out, settings, f"{host}:{port}", certs, budget, show_progress)
    check_run_dir(cfg, out, resume)
    return _run_simulation(cfg, out, settings, num_cpus)


# -- simulation runtime --------------------------------------------------------------------


def _run_simulation(
    cfg: JobConfig, out: Path, settings: ServerSettings, num_cpus: int | None
) -> Any:
    from flwr.simulation import run_simulation

    from legend.federation.flower.client_app import client_app
    from legend.federation.flower.server_app import make_server_app
    from legend.planner.profiles import load_fleet

    fleet = load_fleet(cfg.job.fleet)
    cpus = max(1, num_cpus or os.cpu_count() or 1)
    # Each virtual node trains on one CPU; torch must not spawn more threads than that.
    os.environ.setdefault("LEGEND_NODE_THREADS", "1")
    sink: list[Any] = []
    backend_config: Any = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": cpus,
            "num_gpus": 0,
            "include_dashboard": False,
            "logging_level": "error",
            "log_to_driver": False,
        },
    }
    try:
        run_simulation(
            server_app=make_server_app(settings, sink),
            client_app=client_app,
            num_supernodes=len(fleet),
            backend_config=backend_config,
        )
    except FederationInputError:
        raise
    except Exception as exc:
        status = read_status(out)
        if status.get("state") == "failed":
            raise _status_error(status) from None
        raise FlowerEngineError(f"the Flower simulation failed: {exc}") from exc
    if not sink:
        status = read_status(out)
        if status.get("state") == "failed":
            raise _status_error(status)
        raise FlowerEngineError(
            f"the Flower simulation ended without a result (status: {status or 'none'})"
        )
    return sink[0]


def _status_error(status: Mapping[str, Any]) -> FlowerEngineError:
    message = str(status.get("error") or "unknown error")
    if status.get("exit_code") == 2:
        return FlowerInputError(message)
    return FlowerEngineError(f"the ServerApp failed: {message}")


# -- deployment ----------------------------------------------------------------------------

_APP_NAME = "legend-flower"


def _write_app(app_dir: Path, settings: ServerSettings) -> None:
    """The Flower App submitted to the SuperLink: a pyproject.toml pointing at legend's apps.

    It carries no code (legend is installed where the SuperLink and the nodes run) and no
    dependencies to install; the run config holds the job.
    """
    import tomli_w

    from legend import federation  # noqa: F401  (legend must be importable here)

    app_dir.mkdir(parents=True, exist_ok=True)
    project = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {
            "name": _APP_NAME,
            "version": "1.0.0",
            "description": "legend federated LoRA job",
            "license": "Apache-2.0",
            "dependencies": [],
        },
        "tool": {
            "hatch": {"build": {"targets": {"wheel": {"packages": ["."]}}}},
            "flwr": {
                "app": {
                    "publisher": "legend",
                    "components": {
                        "serverapp": "legend.federation.flower.server_app:server_app",
                        "clientapp": "legend.federation.flower.client_app:client_app",
                    },
                    "config": settings.to_config(),
                }
            },
        },
    }
    (app_dir / "pyproject.toml").write_text(tomli_w.dumps(project))
    (app_dir / "legend_job.py").write_text(
        '"""A legend job; the apps live in legend.federation.flower."""\n'
    )


def _print_new_rounds(out: Path, seen: int, total: int) -> int:
    import csv

    path = out / "rounds.csv"
    if not path.is_file():
        return seen
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows[seen:]:
        acc = row.get("accuracy") or "-"
        print(
            f"round {row['round']:>3}/{total}  acc {acc[:5]}  sim {float(row['sim_time_s']):8.1f} s"
            f"  host {float(row['host_time_s']):6.1f} s  devices {row['participants']}/"
            f"{row['planned']}" + (f"  dropped {row['dropped']}" if row["dropped"] != "0" else ""),
            file=sys.stderr,
            flush=True,
        )
    return len(rows)


def _run_deployment(
    cfg: JobConfig,
    out: Path,
    settings: ServerSettings,
    address: str,
    certs: str | None,
    deadline_s: float,
    show_progress: bool,
) -> Any:
    out.mkdir(parents=True, exist_ok=True)
    (out / STATUS_FILE).unlink(missing_ok=True)
    if not settings.resume:
        (out / NODES_FILE).unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="legend-flower-app-") as tmp:
        app_dir = Path(tmp) / _APP_NAME
        _write_app(app_dir, settings)
        with flwr_internals.control_client(address, certs) as client:
            run_id = flwr_internals.start_run(client, app_dir)
            if show_progress:
                print(f"Flower run {run_id} started on {address}", file=sys.stderr)
            finished = False
            try:
                _wait_for_run(client, run_id, out, cfg, deadline_s, show_progress)
                finished = True
            finally:
                if not finished:
                    flwr_internals.stop_run(client, run_id)
    return load_result(out)


def _wait_for_run(
    client: Any, run_id: int, out: Path, cfg: JobConfig, deadline_s: float, show: bool
) -> None:
    start = time.monotonic()
    seen = 0
    last_check = 0.0
    while True:
        if show:
            seen = _print_new_rounds(out, seen, cfg.job.rounds)
        status = read_status(out)
        if status.get("state") == "finished":
            return
        if status.get("state") == "failed":
            raise _status_error(status)
        if _server_died(status):
            time.sleep(0.5)
            if _server_died(read_status(out)):
                raise FlowerEngineError(
                    f"the ServerApp process (pid {status['pid']}) of Flower run {run_id} died "
                    f"before the job finished. Completed rounds are in {out}: continue with "
                    f"--resume {out}"
                )
        now = time.monotonic()
        if now - last_check >= 2.0:
            last_check = now
            try:
                state, sub, details = flwr_internals.run_state(client, run_id)
            except Exception as exc:
                raise FlowerConnectionError(
                    f"lost the SuperLink while run {run_id} was going ({exc}); the run "
                    f"directory {out} keeps every completed round: continue with --resume"
                ) from None
            if state == "finished":
                time.sleep(0.5)  # the status file is written before the ServerApp exits
                status = read_status(out)
                if status.get("state") == "finished":
                    return
                if status.get("state") == "failed":
                    raise _status_error(status)
                raise FlowerEngineError(
                    f"Flower run {run_id} ended ({sub}{': ' + details if details else ''}) "
                    f"before the job finished; the ServerApp process was stopped or killed. "
                    f"Completed rounds are in {out}: continue with --resume {out}"
                )
        if now - start > deadline_s:
            raise FlowerEngineError(
                f"Flower run {run_id} did not finish within {deadline_s:.0f} s; it was stopped. "
                f"Completed rounds are in {out}: continue with --resume {out}"
            )
        time.sleep(0.3)


def _server_died(status: Mapping[str, Any]) -> bool:
    """True when the ServerApp ran on this machine and its process is gone."""
    return (
        status.get("state") in ("starting", "querying", "running")
        and status.get("host") == socket.gethostname()
        and isinstance(status.get("pid"), int)
        and not pid_alive(status["pid"])
    )


# -- a local federation on 127.0.0.1 -------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, deadline: float, proc: subprocess.Popen[bytes], what: str) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FlowerEngineError(f"{what} exited with status {proc.returncode} at start-up")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.2)
    raise FlowerEngineError(f"{what} did not listen on 127.0.0.1:{port} in time")


def stat_fields(pid: int | str) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (state, parent pid, process
    group, session, ...), or ``None`` where there is no such process (Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :].split()


def process_stats() -> dict[int, list[str]]:
    """:func:`stat_fields` of every process, by pid."""
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        fields_ = stat_fields(entry) if entry.isdigit() else None
        if fields_ is not None:
            stats[int(entry)] = fields_
    return stats


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids."""
    tree: dict[int, list[int]] = {}
    for pid, fields_ in process_stats().items():
        tree.setdefault(int(fields_[1]), []).append(pid)
    return tree


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children, their children, ...)."""
    tree = _children()
    out: list[int] = []
    stack = [pid]
    while stack:
        for child in tree.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def pid_alive(pid: int) -> bool:
    """True when ``pid`` runs and is not a zombie."""
    fields_ = stat_fields(pid)
    return fields_ is not None and fields_[0] != "Z"


def _terminate(pids: Sequence[int], timeout_s: float) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.1)
    for pid in pids:
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


@dataclass
class ManagedProcess:
    """A process of a :class:`LocalFederation`: its role, Popen handle and log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid


@dataclass
class LocalFederation:
    """A SuperLink, SuperNodes and node workers on 127.0.0.1, stopped by process id.

    Use as a context manager, or call :meth:`stop` in a ``finally`` block.
    """

    state_dir: Path
    superlink_port: int
    superlink: ManagedProcess
    nodes: dict[str, ManagedProcess]
    node_ports: dict[str, int]
    workers: list[ManagedProcess]
    seen: set[int] = field(default_factory=set)

    @property
    def address(self) -> str:
        """The SuperLink's address for ``--superlink``."""
        return f"127.0.0.1:{self.superlink_port}"

    def processes(self) -> list[ManagedProcess]:
        return [*self.workers, *self.nodes.values(), self.superlink]

    def pids(self) -> list[int]:
        """Every process started here and every descendant seen so far, alive or not."""
        for proc in self.processes():
            self.seen.add(proc.pid)
            self.seen.update(descendants(proc.pid))
        return sorted(self.seen)

    def alive(self) -> list[int]:
        """The processes of :meth:`pids` that still run."""
        return [p for p in self.pids() if pid_alive(p)]

    def kill_node(self, device_id: str) -> None:
        """SIGKILL the SuperNode of ``device_id`` (fault injection)."""
        proc = self.nodes[device_id]
        self.pids()
        proc.popen.kill()
        proc.popen.wait(timeout=10)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop workers, SuperNodes and the SuperLink (SIGTERM, then SIGKILL) by pid, then any
        descendant they left (SuperExec, ServerApp processes)."""
        all_pids = self.pids()
        for group in (self.workers, list(self.nodes.values()), [self.superlink]):
            _terminate([p.pid for p in group], timeout_s)
            for p in group:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.popen.wait(timeout=1)
        _terminate([p for p in all_pids if pid_alive(p)], timeout_s)

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def to_json(self) -> str:
        """Process ids and ports, for ``scripts/flower_local.py stop``."""
        return json.dumps(
            {
                "superlink": self.address,
                "pids": {
                    "superlink": self.superlink.pid,
                    "nodes": {d: p.pid for d, p in self.nodes.items()},
                    "workers": [w.pid for w in self.workers],
                },
                "node_ports": self.node_ports,
                "state_dir": str(self.state_dir),
            },
            indent=2,
        )


def _node_config(device_id: str, extra: Mapping[str, Any]) -> str:
    parts = [f'device-id="{device_id}"']
    for key, value in extra.items():
        parts.append(f'{key}="{value}"' if isinstance(value, str) else f"{key}={value}")
    return " ".join(parts)


def start_local_federation(
    device_ids: Sequence[str],
    *,
    state_dir: str | Path,
    workers: int = 2,
    node_config: Mapping[str, Mapping[str, Any]] | None = None,
    ready_timeout_s: float = 60.0,
    detach: bool = False,
) -> LocalFederation:
    """Start a SuperLink, one SuperNode per device and ``workers`` node workers on 127.0.0.1.

    Every process gets a free port and logs to ``state_dir``; the SuperNodes run with
    ``--isolation process`` and the workers (``python -m legend.federation.flower node``)
    run their ClientApp tasks, keeping the model loaded. On any start-up failure everything
    started so far is stopped.

    Parameters
    ----------
    device_ids
        One SuperNode per id (``device-id`` in its node config).
    state_dir
        Logs and the SuperLink/SuperNode Flower home (``FLWR_HOME``).
    workers
        Node workers; SuperNode ``i`` is served by worker ``i % workers``.
    node_config
        Extra node-config keys per device (e.g. ``{"phone-1": {"tflops": 0.003}}``).
    ready_timeout_s
        How long each process may take to listen.
    detach
        Start the processes in their own sessions (they outlive this process; stop them
        with ``scripts/flower_local.py stop``).
    """
    if not device_ids:
        raise FlowerInputError("give at least one device id to start a SuperNode for")
    if workers < 1:
        raise FlowerInputError(f"`workers` must be >= 1, got {workers}")
    state = Path(state_dir).absolute()
    state.mkdir(parents=True, exist_ok=True)
    env = flower_env()
    env["FLWR_HOME"] = str(state / "flwr-home")
    bin_dir = Path(sys.executable).parent
    started: list[ManagedProcess] = []

    def spawn(name: str, argv: list[str]) -> ManagedProcess:
        log_path = state / f"{name}.log"
        with log_path.open("ab") as fh:
            popen = subprocess.Popen(
                argv,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=state,
                start_new_session=detach,
            )
        proc = ManagedProcess(name=name, popen=popen, log_path=log_path)
        started.append(proc)
        return proc

    try:
        deadline = time.monotonic() + ready_timeout_s
        link_port = free_port()
        link = spawn(
            "superlink",
            [
                str(bin_dir / "flower-superlink"),
                "--insecure",
                "--disable-runtime-dependency-installation",
                "--host",
                "127.0.0.1",
                "--port",
                str(link_port),
            ],
        )
        _wait_port(link_port, deadline, link.popen, "flower-superlink")
        nodes: dict[str, ManagedProcess] = {}
        ports: dict[str, int] = {}
        for device_id in device_ids:
            port = free_port()
            ports[device_id] = port
            nodes[device_id] = spawn(
                f"supernode-{device_id}",
                [
                    str(bin_dir / "flower-supernode"),
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{link_port}",
                    "--isolation",
                    "process",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--node-config",
                    _node_config(device_id, (node_config or {}).get(device_id, {})),
                ],
            )
        deadline = time.monotonic() + ready_timeout_s
        for device_id, proc in nodes.items():
            _wait_port(ports[device_id], deadline, proc.popen, f"flower-supernode {device_id}")
        groups: list[list[str]] = [[] for _ in range(min(workers, len(device_ids)))]
        for i, device_id in enumerate(device_ids):
            groups[i % len(groups)].append(f"127.0.0.1:{ports[device_id]}")
        worker_procs = []
        for k, group in enumerate(groups):
            argv = [sys.executable, "-m", "legend.federation.flower", "node"]
            for address in group:
                argv += ["--supernode", address]
            worker_procs.append(spawn(f"worker-{k}", argv))
        return LocalFederation(
            state_dir=state,
            superlink_port=link_port,
            superlink=link,
            nodes=nodes,
            node_ports=ports,
            workers=worker_procs,
        )
    except BaseException:
        seen = {d for p in started for d in descendants(p.pid)}
        _terminate([p.pid for p in reversed(started)], 5.0)
        _terminate([p for p in seen if pid_alive(p)], 5.0)
        raise
