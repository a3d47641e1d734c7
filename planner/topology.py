r"""Fleet network topology: links that devices share on their way to the server.

A topology is a graph of nodes (the ``server``, access points or sites, and the fleet's
devices) joined by links with a capacity in Mbit/s in each direction and a latency. Each
device's route is its path to the server; routes must be unique (the graph is a forest),
every device is attached by exactly one link and reaches the server.

File format (TOML or JSON)::

    [[nodes]]                       # every node that is neither "server" nor a device
    id = "ap-1"
    kind = "access_point"           # free text: access_point, site, ...

    [[links]]                       # unordered pair; "up" is the direction to the server
    a = "phone-01"
    b = "ap-1"
    up_mbps = 20.0
    down_mbps = 50.0
    latency_ms = 5.0                # optional, recorded (not part of the cost model)

    contention = "together"         # optional, top level: "together" (default) or "staggered"

Contention model
----------------
A link ``e`` is *congested* in a direction when the devices routed through it could
together send faster than its capacity (``sum_i rate_i > capacity_e``); only congested
links add rows to the integer program (a link that can never be saturated, such as a
device's private link at least as fast as its profile, keeps the per-device term alone, so
a star topology plans exactly like no topology). Every device downloads from the start of
the round, computes, then uploads. Two models of how a congested link is shared:

``"together"`` (default). Every participant of ``e`` waits for all of the link's bytes in
each congested direction: ``c_i + down_ie + up_ie <= T`` with the transfer term ``B_e /
capacity_e`` in a congested direction and the device's own ``B_i / rate_i`` otherwise.
Exact for devices that start their transfers together; it overrates plans whose devices
finish computing at different times. The per-link Lagrangian planner
(:mod:`legend.planner.linklagrange`) solves this model at any scale.

``"staggered"``. Downloads through a link congested downstream all end at
``D_e = B_e / capacity_e`` (all of the round's bytes down through ``e``; exact when the
participants download the same number of bytes, pessimistic for the smaller ones), so each
device ``i`` releases its upload at ``r_i = D_e + c_i`` (``c_i`` its compute time; without
downstream congestion ``r_i = down_i + c_i``, its own download). An upload then leaves at
most at the device's own rate ``u_i`` and the link serves at most its capacity, so for
every time ``theta`` the bytes not yet sent,
``rem_i(theta) = clip(B_i - max(0, theta - r_i) u_i, 0, B_i)``, still need
``sum_i rem_i(theta) / capacity_e`` seconds after ``theta`` while any remain: the round
lasts at least

.. math::

    \max\Big(\max_i (r_i + B_i / u_i),\ \max_\theta \big(\theta
        + \textstyle\sum_{i \in e} \mathrm{rem}_i(\theta) / \mathrm{capacity}_e\big)\Big),

the maximum over ``theta`` taken at the breakpoints ``r_i`` and ``r_i + B_i / u_i``.
Transfers of devices that finish computing early overlap the compute of the others, as on
the fair-sharing clock; on the benchmark's access-point topology this predicts the
simulated rounds of the greedy's and the exact planner's plans to within a few percent
(docs/topology.md). Its program is heavier (rows at several times per link, and rows
added at a solution's peak until they hold its exact round time), so it is opt-in.

Both imply the round-level rule *bytes through e in each direction* ``<= capacity_e * T``
(C7 of docs/planner.md is the special case of the server's own link).
:func:`simulate_round` is the fair-sharing (max-min, processor-sharing) clock used to check
the prediction.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from legend.planner.errors import PlannerInputError

if TYPE_CHECKING:
    from legend.planner.costs import ConfigCost, CostModel
    from legend.planner.profiles import DeviceProfile, Fleet

__all__ = [
    "CONTENTION_MODELS",
    "SERVER",
    "Link",
    "LinkLoad",
    "Topology",
    "TopologyError",
    "link_loads",
    "link_times",
    "load_topology",
    "predicted_round_time",
    "remaining_bytes",
    "simulate_round",
    "staggered_upload_s",
]

SERVER = "server"
_MB = 1e6
CONTENTION_MODELS = ("together", "staggered")


class TopologyError(PlannerInputError):
    """A topology file or its fit to the fleet is invalid (exit status 2)."""


@dataclass(frozen=True, kw_only=True)
class Link:
    """One link; ``child`` is the endpoint farther from the server."""

    child: str
    parent: str
    up_mbps: float
    down_mbps: float
    latency_ms: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.child}--{self.parent}"


@dataclass(frozen=True, kw_only=True)
class Topology:
    """Links, each device's route (link indices from the device up to the server) and the
    contention model of congested links (see the module docstring)."""

    links: tuple[Link, ...]
    routes: Mapping[str, tuple[int, ...]]
    node_kinds: Mapping[str, str]
    contention: str = "together"

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], fleet: Fleet, *, source: str = "topology"
    ) -> Topology:
        """Build and validate a topology for ``fleet``; errors name the node or link."""
        import networkx as nx

        device_ids = set(fleet.device_ids)
        contention = data.get("contention", "together")
        if contention not in CONTENTION_MODELS:
            raise TopologyError(
                f"{source}: `contention` = {contention!r} is not a contention model; use "
                + " or ".join(f'"{m}"' for m in CONTENTION_MODELS)
                + ' (or leave it out for "together")'
            )
        kinds: dict[str, str] = {SERVER: "server"}
        for d in device_ids:
            kinds[d] = "device"
        for k, node in enumerate(data.get("nodes", []) or []):
            if not isinstance(node, Mapping) or not isinstance(node.get("id"), str):
                raise TopologyError(f"{source}: nodes[{k}] needs a string `id`")
            nid = node["id"]
            if nid in kinds:
                raise TopologyError(
                    f"{source}: node {nid!r} is declared twice (the server and the fleet's "
                    "devices are implicit nodes); remove the duplicate"
                )
            kinds[nid] = str(node.get("kind", "relay"))
        raw_links = data.get("links")
        if not isinstance(raw_links, Sequence) or not raw_links:
            raise TopologyError(f"{source}: `links` must be a non-empty list of links")
        graph = nx.Graph()
        graph.add_nodes_from(kinds)
        specs: dict[frozenset[str], dict[str, float]] = {}
        for k, link in enumerate(raw_links):
            if not isinstance(link, Mapping):
                raise TopologyError(f"{source}: links[{k}] must be a table with a, b, up_mbps")
            a, b = link.get("a"), link.get("b")
            if not isinstance(a, str) or not isinstance(b, str) or a == b:
                raise TopologyError(
                    f"{source}: links[{k}] needs two different node ids `a` and `b`, "
                    f"got {a!r} and {b!r}"
                )
            for node in (a, b):
                if node not in kinds:
                    raise TopologyError(
                        f"{source}: link {a}--{b} names unknown node {node!r}; declare it "
                        "under [[nodes]] or add the device to the fleet"
                    )
            key = frozenset((a, b))
            if key in specs:
                raise TopologyError(f"{source}: link {a}--{b} is listed twice; keep one")
            values: dict[str, float] = {}
            for field in ("up_mbps", "down_mbps", "latency_ms"):
                v = link.get(field, 0.0 if field == "latency_ms" else None)
                if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                    raise TopologyError(
                        f"{source}: link {a}--{b}: `{field}` must be a number, got {v!r}"
                    )
                ok = v >= 0 if field == "latency_ms" else v > 0
                if not ok:
                    raise TopologyError(
                        f"{source}: link {a}--{b}: `{field}` must be "
                        f"{'>= 0' if field == 'latency_ms' else '> 0'}, got {v!r}"
                    )
                values[field] = float(v)
            specs[key] = values
            graph.add_edge(a, b)
        for d in sorted(device_ids):
            deg = graph.degree(d)
            if deg == 0:
                raise TopologyError(
                    f"{source}: device {d!r} has no route to the server: add a link from it"
                )
            if deg > 1:
                raise TopologyError(
                    f"{source}: device {d!r} is attached {deg} times; a device has one link"
                )
        if not nx.is_forest(graph):
            cycle = nx.find_cycle(graph)
            path = " -> ".join(str(u) for u, _ in cycle)
            raise TopologyError(f"{source}: the links form a cycle ({path}); routes must be unique")
        paths = nx.single_source_shortest_path(graph, SERVER)
        for d in sorted(device_ids):
            if d not in paths:
                raise TopologyError(
                    f"{source}: device {d!r} has no route to the server (its part of the "
                    "graph is not connected to 'server')"
                )
        links: list[Link] = []
        link_id: dict[frozenset[str], int] = {}
        # orient every link reachable from the server; child = endpoint farther away
        for key, values in specs.items():
            a, b = tuple(key)
            if a not in paths:
                continue  # a part not connected to the server carries no device
            child, parent = (a, b) if len(paths[a]) > len(paths[b]) else (b, a)
            link_id[key] = len(links)
            links.append(Link(child=child, parent=parent, **values))
        routes = {}
        for d in fleet.device_ids:
            p = paths[d][::-1]  # device ... server
            routes[d] = tuple(link_id[frozenset((u, v))] for u, v in itertools.pairwise(p))
        return cls(links=tuple(links), routes=routes, node_kinds=kinds, contention=contention)

    def devices_on(self, link: int) -> tuple[str, ...]:
        return self._devices_on.get(link, ())

    @cached_property
    def _devices_on(self) -> dict[int, tuple[str, ...]]:
        on: dict[int, list[str]] = {}
        for device_id, route in self.routes.items():
            for e in route:
                on.setdefault(e, []).append(device_id)
        return {e: tuple(ds) for e, ds in on.items()}

    def link_index(self, name: str) -> int:
        for k, link in enumerate(self.links):
            if name in (link.name, f"{link.parent}--{link.child}"):
                return k
        raise TopologyError(
            f"no link named {name!r}; links: {', '.join(lk.name for lk in self.links)}"
        )

    def with_capacity(self, link: int, *, factor: float) -> Topology:
        """The same topology with link ``link``'s capacity multiplied by ``factor``."""
        lk = self.links[link]
        new = Link(
            child=lk.child,
            parent=lk.parent,
            up_mbps=lk.up_mbps * factor,
            down_mbps=lk.down_mbps * factor,
            latency_ms=lk.latency_ms,
        )
        links = (*self.links[:link], new, *self.links[link + 1 :])
        return dataclasses.replace(self, links=links)

    def congested(self, fleet: Fleet) -> list[tuple[int, bool, bool]]:
        """``(link, up congested, down congested)`` for links that need program rows."""
        out = []
        for k, link in enumerate(self.links):
            devs = [fleet[d] for d in self.devices_on(k)]
            if not devs:
                continue
            up = sum(d.uplink_mbps for d in devs) > link.up_mbps * (1 + 1e-12)
            down = sum(d.downlink_mbps for d in devs) > link.down_mbps * (1 + 1e-12)
            if up or down:
                out.append((k, up, down))
        return out

    def to_dict(self) -> dict[str, Any]:
        nodes = [
            {"id": n, "kind": k}
            for n, k in self.node_kinds.items()
            if k not in ("server", "device")
        ]
        links = [
            {
                "a": lk.child,
                "b": lk.parent,
                "up_mbps": lk.up_mbps,
                "down_mbps": lk.down_mbps,
                "latency_ms": lk.latency_ms,
            }
            for lk in self.links
        ]
        out: dict[str, Any] = {"nodes": nodes, "links": links}
        if self.contention != "together":
            out["contention"] = self.contention
        return out


def load_topology(path: str | Path, fleet: Fleet) -> Topology:
    """Read a TOML or JSON topology file and validate it against ``fleet``."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise TopologyError(f"cannot read topology file {p}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise TopologyError(
            f"topology file {p} is not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    try:
        data = tomllib.loads(text) if p.suffix.lower() == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise TopologyError(
            f"topology file {p} is not valid {p.suffix[1:].upper()}: {exc}"
        ) from None
    if not isinstance(data, Mapping):
        raise TopologyError(f"topology file {p} must hold a table with `links`")
    return Topology.from_dict(data, fleet, source=str(p))


# -- predictions ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class LinkLoad:
    """Bytes of one round through a link and the time they need at its capacity."""

    link: str
    up_bytes: float
    down_bytes: float
    up_s: float
    down_s: float


def link_loads(
    topology: Topology,
    fleet: Fleet,
    costs: CostModel,
    configurations: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]],
) -> list[LinkLoad]:
    """Per link, the round's bytes each way (participants only) and their drain time."""
    out = []
    for k, link in enumerate(topology.links):
        up = down = 0.0
        for d in topology.devices_on(k):
            layers, ranks = configurations.get(d, ((), ()))
            if layers:
                c = costs.evaluate(fleet[d], layers, ranks)
                up += c.upload_bytes
                down += c.download_bytes
        out.append(
            LinkLoad(
                link=link.name,
                up_bytes=up,
                down_bytes=down,
                up_s=up * 8 / (link.up_mbps * _MB),
                down_s=down * 8 / (link.down_mbps * _MB),
            )
        )
    return out


def remaining_bytes(theta: Any, release_s: Any, nbytes: Any, rate: Any) -> np.ndarray:
    """``rem_i(theta)``: the bytes of each upload (released at ``release_s``, at most
    ``rate`` bytes/s) that are surely still to send at each time of ``theta``; shape
    ``(len(theta), len(release_s))`` for an array ``theta``, ``(len(release_s),)`` for a
    number."""
    t = np.asarray(theta, dtype=float)
    r = np.asarray(release_s, dtype=float)
    b = np.asarray(nbytes, dtype=float)
    u = np.asarray(rate, dtype=float)
    return np.clip(b - np.maximum(t[..., None] - r, 0.0) * u, 0.0, b)


def staggered_upload_s(
    release_s: Any, nbytes: Any, rate: Any, s_per_byte: float, count: Any = None
) -> float:
    """The ``"staggered"`` bound of a link's uploads: ``max_theta theta + s_per_byte *
    sum_i count_i rem_i(theta)`` over the breakpoints ``release_i`` and ``release_i +
    nbytes_i / rate_i`` (``rate`` in bytes/s, at most the link's capacity; see the module
    docstring). 0 without uploads."""
    r = np.asarray(release_s, dtype=float)
    if not len(r):
        return 0.0
    b = np.asarray(nbytes, dtype=float)
    u = np.asarray(rate, dtype=float)
    n = np.ones_like(r) if count is None else np.asarray(count, dtype=float)
    theta = np.concatenate([r, r + b / u])
    return float((theta + s_per_byte * (remaining_bytes(theta, r, b, u) @ n)).max())


def link_times(
    topology: Topology, fleet: Fleet, costs: Mapping[str, ConfigCost]
) -> dict[int, float]:
    """Per congested link, the time its contention rows hold the round to.

    ``costs`` maps each participant to its costs (:meth:`CostModel.evaluate`). For a link
    congested in some direction, under the topology's contention model (see the module
    docstring): ``"together"``, the longest ``compute_i + down_ie + up_ie`` over its
    participants; ``"staggered"``, the longest ``D_e + compute_i + upload_i`` (downstream
    congestion) and the uploads' bound :func:`staggered_upload_s` (upstream congestion).
    Links without participants are left out.
    """
    out = {}
    for k, up_c, down_c in topology.congested(fleet):
        ids = [d for d in topology.devices_on(k) if d in costs]
        if not ids:
            continue
        on = [costs[d] for d in ids]
        link = topology.links[k]
        up_s = sum(c.upload_bytes for c in on) * 8 / (link.up_mbps * _MB)
        down_s = sum(c.download_bytes for c in on) * 8 / (link.down_mbps * _MB)
        if topology.contention == "together":
            out[k] = max(
                c.compute_s + (down_s if down_c else c.download_s) + (up_s if up_c else c.upload_s)
                for c in on
            )
            continue
        release = [(down_s if down_c else c.download_s) + c.compute_s for c in on]
        t = max(r + c.upload_s for r, c in zip(release, on, strict=True))
        if up_c:
            cap = link.up_mbps * _MB / 8
            rate = [min(fleet[d].uplink_mbps * _MB / 8, cap) for d in ids]
            t = max(
                t,
                staggered_upload_s(release, [c.upload_bytes for c in on], rate, 1.0 / cap),
            )
        out[k] = t
    return out


def predicted_round_time(
    topology: Topology,
    fleet: Fleet,
    costs: CostModel,
    configurations: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]],
) -> float:
    """The round time the program's contention rows imply (see the module docstring)."""
    evals = {d: costs.evaluate(fleet[d], *cfg) for d, cfg in configurations.items() if cfg[0]}
    if not evals:
        return 0.0
    own = max(c.time_s for c in evals.values())
    return max([own, *link_times(topology, fleet, evals).values()])


def _max_min_rates(
    flows: Sequence[tuple[float, tuple[int, ...]]], capacity: Sequence[float]
) -> list[float]:
    """Max-min fair rates of flows ``(private cap, links)`` over link ``capacity``."""
    rate = [0.0] * len(flows)
    frozen = [False] * len(flows)
    left = list(capacity)
    while not all(frozen):
        active = [i for i in range(len(flows)) if not frozen[i]]
        count: dict[int, int] = {}
        for i in active:
            for e in flows[i][1]:
                count[e] = count.get(e, 0) + 1
        share = min((left[e] / n for e, n in count.items()), default=math.inf)
        inc = min(share, min(flows[i][0] - rate[i] for i in active))
        for i in active:
            rate[i] += inc
        for e, n in count.items():
            left[e] -= inc * n
        for i in active:
            if rate[i] >= flows[i][0] * (1 - 1e-12) or any(
                left[e] <= 1e-9 * max(capacity[e], 1.0) for e in flows[i][1]
            ):
                frozen[i] = True
    return rate


def simulate_round(
    topology: Topology | None,
    devices: Sequence[DeviceProfile],
    compute_s: Sequence[float],
    bytes_one_way: Sequence[float],
) -> list[float]:
    """Finish time of each device in a round on a fair-sharing network clock.

    Every device downloads ``bytes_one_way`` (all start at 0), computes for
    ``compute_s``, then uploads the same number of bytes. Concurrent transfers share every
    link on their route max-min fairly, each also capped by the device's own profile rate;
    without a topology every device has its private line (the cost model's times).
    """
    n = len(devices)
    links = topology.links if topology is not None else ()
    cap_up = [lk.up_mbps * _MB / 8 for lk in links]
    cap_down = [lk.down_mbps * _MB / 8 for lk in links]
    # link ids: up direction e, down direction len(links) + e
    capacity = cap_up + cap_down
    route = [topology.routes[d.device_id] if topology is not None else () for d in devices]
    phase = ["down"] * n  # down -> compute -> up -> done
    left = [float(b) for b in bytes_one_way]
    ready = [0.0] * n  # end of compute
    finish = [0.0] * n
    now = 0.0
    for i in range(n):
        if left[i] <= 0:
            phase[i], ready[i] = "compute", compute_s[i]
    for _ in range(20 * n + 10):
        for i in range(n):
            if phase[i] == "compute" and ready[i] <= now + 1e-12:
                phase[i], left[i] = "up", float(bytes_one_way[i])
                if left[i] <= 0:
                    phase[i], finish[i] = "done", now
        active = [i for i in range(n) if phase[i] in ("down", "up")]
        computing = [ready[i] for i in range(n) if phase[i] == "compute"]
        if not active and not computing:
            break
        flows = []
        for i in active:
            if phase[i] == "down":
                flows.append(
                    (devices[i].downlink_mbps * _MB / 8, tuple(len(links) + e for e in route[i]))
                )
            else:
                flows.append((devices[i].uplink_mbps * _MB / 8, tuple(route[i])))
        rates = _max_min_rates(flows, capacity) if flows else []
        step = min(
            [left[i] / r for i, r in zip(active, rates, strict=True) if r > 0]
            + [c - now for c in computing]
        )
        step = max(step, 0.0)
        now += step
        for i, r in zip(active, rates, strict=True):
            left[i] -= r * step
            if left[i] <= 1e-9 * max(1.0, bytes_one_way[i]):
                if phase[i] == "down":
                    phase[i], ready[i] = "compute", now + compute_s[i]
                else:
                    phase[i], finish[i] = "done", now
    return finish
