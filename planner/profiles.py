"""Device profiles, fleets and job parameters, loaded from CSV, TOML or JSON.

A fleet file lists one device per row (CSV) or per entry of ``devices`` (TOML/JSON):

======================  =========  =================================================
field                   required   meaning
======================  =========  =================================================
``device_id``           yes        unique name
``tflops``              yes        effective training throughput, TFLOP/s (> 0)
``memory_gb``           yes        memory available to training, GB (1e9 bytes, > 0)
``uplink_mbps``         yes        upload bandwidth, Mbit/s (> 0)
``downlink_mbps``       yes        download bandwidth, Mbit/s (> 0)
``num_samples``         yes        local training samples (integer > 0)
``local_steps``         no         local steps per round; default: the job's
``device_class``        no         a label; devices of one class share a profile
======================  =========  =================================================
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from legend.planner.errors import FleetError, PlannerInputError

__all__ = [
    "OPTIONAL_FIELDS",
    "REQUIRED_FIELDS",
    "DeviceProfile",
    "Fleet",
    "JobParams",
    "load_fleet",
    "parse_rank_grid",
]

REQUIRED_FIELDS = (
    "device_id",
    "tflops",
    "memory_gb",
    "uplink_mbps",
    "downlink_mbps",
    "num_samples",
)
OPTIONAL_FIELDS = ("local_steps", "device_class", "prefix_built")
_POSITIVE_FLOATS = ("tflops", "memory_gb", "uplink_mbps", "downlink_mbps")
_POSITIVE_INTS = ("num_samples", "local_steps")
MAX_COUNT = 10**12  # bound of integer fields (samples, steps): beyond it a value is a mistake


@dataclass(frozen=True, kw_only=True)
class DeviceProfile:
    """One device's capacities. Units are in the field names."""

    device_id: str
    tflops: float
    memory_gb: float
    uplink_mbps: float
    downlink_mbps: float
    num_samples: int
    local_steps: int | None = None
    device_class: str | None = None
    prefix_built: bool = True
    """Whether the device already holds its frozen-prefix features; read only when the job
    caches the prefix (``JobParams.cache_prefix``). A federated run sets it ``False`` for a
    device until its first round with the cache, which then also computes them."""

    def __post_init__(self) -> None:
        if not isinstance(self.prefix_built, bool):
            raise FleetError(
                f"device {self.device_id!r}: `prefix_built` must be true or false, "
                f"got {self.prefix_built!r}"
            )
        if not isinstance(self.device_id, str) or not self.device_id.strip():
            raise FleetError(f"`device_id` must be a non-empty string, got {self.device_id!r}")
        for name in _POSITIVE_FLOATS:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise FleetError(
                    f"device {self.device_id!r}: `{name}` must be a finite number > 0, "
                    f"got {value!r}"
                )
        for name in _POSITIVE_INTS:
            value = getattr(self, name)
            if value is None and name == "local_steps":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_COUNT:
                raise FleetError(
                    f"device {self.device_id!r}: `{name}` must be an integer in "
                    f"1..{MAX_COUNT:.0e}, got {value!r}"
                )

    @property
    def memory_bytes(self) -> float:
        return self.memory_gb * 1e9

    @property
    def uplink_bps(self) -> float:
        """Upload bandwidth in bytes per second."""
        return self.uplink_mbps * 1e6 / 8

    @property
    def downlink_bps(self) -> float:
        """Download bandwidth in bytes per second."""
        return self.downlink_mbps * 1e6 / 8

    @property
    def flops_per_s(self) -> float:
        return self.tflops * 1e12

    def to_dict(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "tflops": self.tflops,
            "memory_gb": self.memory_gb,
            "uplink_mbps": self.uplink_mbps,
            "downlink_mbps": self.downlink_mbps,
            "num_samples": self.num_samples,
            "local_steps": self.local_steps,
            "device_class": self.device_class,
            # only when not the default, so fleets written before it read and hash the same
            **({} if self.prefix_built else {"prefix_built": False}),
        }


@dataclass(frozen=True, kw_only=True)
class Fleet:
    """An ordered, non-empty collection of devices with unique ids."""

    devices: tuple[DeviceProfile, ...]
    source: str = field(default="<memory>", compare=False)

    def __post_init__(self) -> None:
        if not self.devices:
            raise FleetError(f"{self.source}: the fleet is empty; list at least one device")
        seen: set[str] = set()
        for device in self.devices:
            if device.device_id in seen:
                raise FleetError(
                    f"{self.source}: duplicate `device_id` {device.device_id!r}; ids must be unique"
                )
            seen.add(device.device_id)

    def __len__(self) -> int:
        return len(self.devices)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.devices)

    def __getitem__(self, device_id: str) -> DeviceProfile:
        return self._by_id[device_id]

    @cached_property
    def _by_id(self) -> dict[str, DeviceProfile]:
        return {d.device_id: d for d in self.devices}

    @property
    def device_ids(self) -> tuple[str, ...]:
        return tuple(d.device_id for d in self.devices)

    def subset(self, device_ids: Iterable[str]) -> Fleet:
        wanted = set(device_ids)
        return Fleet(
            devices=tuple(d for d in self.devices if d.device_id in wanted), source=self.source
        )

    def to_records(self) -> list[dict[str, Any]]:
        return [d.to_dict() for d in self.devices]

    @classmethod
    def from_records(
        cls,
        records: Sequence[Mapping[str, Any]],
        source: str = "<memory>",
        row_numbers: Sequence[int] | None = None,
    ) -> Fleet:
        """Build a fleet from dict rows, validating each field (strings are parsed).

        ``row_numbers`` are what error messages call each record (default: 1, 2, ...).
        """
        numbers = list(row_numbers) if row_numbers is not None else range(1, len(records) + 1)
        devices = [
            _device_from_row(row, source, number)
            for row, number in zip(records, numbers, strict=True)
        ]
        first_row: dict[str, int] = {}
        for device, number in zip(devices, numbers, strict=True):
            if device.device_id in first_row:
                raise FleetError(
                    f"{source}, row {number}: duplicate `device_id` {device.device_id!r} "
                    f"(first at row {first_row[device.device_id]}); ids must be unique"
                )
            first_row[device.device_id] = number
        return cls(devices=tuple(devices), source=source)


@dataclass(frozen=True, kw_only=True)
class JobParams:
    """The training workload every device runs in a round; all fields have defaults.

    ``bytes_per_param`` is what one transferred parameter costs on the wire (4 for fp32,
    2 for fp16); ``weight_precision`` is how the frozen base weights sit in memory.
    ``cache_prefix``: each device keeps the output of the frozen layers below its adapted
    block for its local samples (computed once, without dropout, in its first round that
    reads them), so a local step runs forward only from its lowest adapted layer
    (docs/costs.md, "The frozen-prefix cache").
    """

    batch_size: int = 16
    seq_len: int = 64
    local_steps: int = 10
    bytes_per_param: int = 4
    weight_precision: str = "fp32"
    target_modules: str | tuple[str, ...] = "qv"
    ranks: tuple[int, ...] = (2, 4, 8, 16)
    train_head: bool = True
    lora_scale: float = 2.0
    cache_prefix: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.cache_prefix, bool):
            raise PlannerInputError(
                f"`cache_prefix` must be true or false, got {self.cache_prefix!r}"
            )
        for name in ("batch_size", "seq_len", "local_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise PlannerInputError(f"`{name}` must be an integer > 0, got {value!r}")
        if self.bytes_per_param not in (1, 2, 4, 8):
            raise PlannerInputError(
                f"`bytes_per_param` must be 1, 2, 4 or 8, got {self.bytes_per_param!r}"
            )
        if self.weight_precision not in WEIGHT_BYTES:
            raise PlannerInputError(
                f"`weight_precision` must be one of {sorted(WEIGHT_BYTES)}, "
                f"got {self.weight_precision!r}"
            )
        object.__setattr__(self, "ranks", parse_rank_grid(self.ranks))
        if not (isinstance(self.lora_scale, (int, float)) and self.lora_scale > 0):
            raise PlannerInputError(f"`lora_scale` must be > 0, got {self.lora_scale!r}")
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))

    @property
    def weight_bytes(self) -> float:
        return WEIGHT_BYTES[self.weight_precision]

    def steps_for(self, device: DeviceProfile) -> int:
        return device.local_steps if device.local_steps is not None else self.local_steps

    def with_(self, **changes: Any) -> JobParams:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        # ``cache_prefix`` only when set, so the digests of plans made before it are unchanged
        extra = {"cache_prefix": True} if self.cache_prefix else {}
        return {
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "local_steps": self.local_steps,
            "bytes_per_param": self.bytes_per_param,
            "weight_precision": self.weight_precision,
            "target_modules": self.target_modules
            if isinstance(self.target_modules, str)
            else list(self.target_modules),
            "ranks": list(self.ranks),
            "train_head": self.train_head,
            "lora_scale": self.lora_scale,
            **extra,
        }


WEIGHT_BYTES: dict[str, float] = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.0, "4bit": 0.5}


def parse_rank_grid(ranks: str | Iterable[int] | Iterable[str]) -> tuple[int, ...]:
    """Parse ``"2,4,8,16"`` or a sequence; it must be strictly increasing positive integers."""
    raw: list[Any]
    raw = [p.strip() for p in ranks.split(",")] if isinstance(ranks, str) else list(ranks)
    if not raw or raw == [""]:
        raise PlannerInputError("rank grid is empty; give strictly increasing ranks like 2,4,8,16")
    parsed: list[int] = []
    for item in raw:
        try:
            if isinstance(item, bool) or (isinstance(item, float) and not item.is_integer()):
                raise ValueError
            value = int(item)
        except (TypeError, ValueError):
            raise PlannerInputError(
                f"rank grid entry {item!r} is not an integer; give ranks like 2,4,8,16"
            ) from None
        if value <= 0:
            raise PlannerInputError(
                f"rank grid entry {value} must be > 0; give ranks like 2,4,8,16"
            )
        parsed.append(value)
    if any(b <= a for a, b in itertools.pairwise(parsed)):
        raise PlannerInputError(
            f"rank grid {parsed} must be strictly increasing, e.g. {sorted(set(parsed))}"
        )
    return tuple(parsed)


# -- loading -------------------------------------------------------------------------------


def _device_from_row(row: Mapping[str, Any], source: str, row_number: int) -> DeviceProfile:
    where = f"{source}, row {row_number}"
    unknown = sorted(set(row) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS))
    if unknown:
        raise FleetError(
            f"{where}: unknown field {unknown[0]!r}; allowed fields are "
            f"{', '.join(REQUIRED_FIELDS + OPTIONAL_FIELDS)}"
        )
    values: dict[str, Any] = {}
    for name in REQUIRED_FIELDS:
        if (
            name not in row
            or row[name] is None
            or (isinstance(row[name], str) and not row[name].strip())
        ):
            raise FleetError(f"{where}: missing required field `{name}`")
    values["device_id"] = str(row["device_id"]).strip()
    for name in _POSITIVE_FLOATS:
        values[name] = _number(row[name], name, where, integer=False)
    values["num_samples"] = _number(row["num_samples"], "num_samples", where, integer=True)
    steps = row.get("local_steps")
    if steps is not None and not (isinstance(steps, str) and not steps.strip()):
        values["local_steps"] = _number(steps, "local_steps", where, integer=True)
    device_class = row.get("device_class")
    if device_class is not None and str(device_class).strip():
        values["device_class"] = str(device_class).strip()
    built = row.get("prefix_built")
    if built is not None and not (isinstance(built, str) and not built.strip()):
        values["prefix_built"] = _boolean(built, "prefix_built", where)
    try:
        return DeviceProfile(**values)
    except FleetError as exc:
        raise FleetError(f"{where}: {exc}") from None


def _boolean(raw: Any, name: str, where: str) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise FleetError(f"{where}: field `{name}` = {raw!r} must be true or false")


def _number(raw: Any, name: str, where: str, *, integer: bool) -> Any:
    expected = "an integer > 0" if integer else "a finite number > 0"
    if isinstance(raw, bool):
        raise FleetError(f"{where}: field `{name}` = {raw!r} is not a number; expected {expected}")
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise FleetError(
            f"{where}: field `{name}` = {raw!r} is not a number; expected {expected}"
        ) from None
    if not math.isfinite(value) or value <= 0:
        raise FleetError(f"{where}: field `{name}` = {raw!r}; expected {expected}")
    if integer:
        if not value.is_integer():
            raise FleetError(f"{where}: field `{name}` = {raw!r}; expected {expected}")
        if value > MAX_COUNT:
            raise FleetError(
                f"{where}: field `{name}` = {raw!r} is implausibly large; expected an integer "
                f"<= {MAX_COUNT:.0e}"
            )
        return int(value)
    return value


def load_fleet(path: str | Path) -> Fleet:
    """Load a fleet from ``.csv``, ``.toml`` or ``.json``; every error names file, row and field."""
    path = Path(path)
    source = str(path)
    if path.is_dir():
        raise FleetError(f"fleet file {source} is a folder; give a .csv, .toml or .json file")
    if not path.is_file():
        raise FleetError(f"fleet file {source} does not exist; give a .csv, .toml or .json file")
    suffix = path.suffix.lower()
    try:
        # utf-8-sig: spreadsheets start their CSV files with a byte-order mark
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise FleetError(f"fleet file {source} cannot be read: {exc}") from None
    records: list[Mapping[str, Any]]
    row_numbers: list[int] | None = None
    if suffix == ".csv":
        records, row_numbers = _read_csv(text, source)
    elif suffix in (".toml", ".json"):
        try:
            data = tomllib.loads(text) if suffix == ".toml" else json.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
            raise FleetError(
                f"fleet file {source} is not valid {suffix[1:].upper()}: {exc}"
            ) from None
        devices = data.get("devices") if isinstance(data, dict) else data
        if not isinstance(devices, list) or not all(isinstance(d, dict) for d in devices):
            raise FleetError(
                f"fleet file {source}: expected a list of device tables under `devices`"
            )
        records = devices
    else:
        raise FleetError(
            f"fleet file {source}: unsupported suffix {suffix!r}; use .csv, .toml or .json"
        )
    return Fleet.from_records(records, source=source, row_numbers=row_numbers)


def _read_csv(text: str, source: str) -> tuple[list[Mapping[str, Any]], list[int]]:
    """Rows as dicts and their numbers (row 1 is the line after the header)."""
    lines = text.splitlines()
    if not any(line.strip() for line in lines):
        raise FleetError(f"{source}: the fleet is empty; expected a header row and device rows")
    reader = csv.reader(lines)
    header = [h.strip() for h in next(reader)]
    missing = [f for f in REQUIRED_FIELDS if f not in header]
    if missing and len(header) == 1:
        separator = next((c for c in ";\t|" if c in header[0]), None)
        if separator is not None:
            raise FleetError(
                f"{source}, header: the columns look {separator!r}-separated; a fleet CSV is "
                "comma-separated (save it as CSV with ',' as the delimiter)"
            )
    if missing:
        raise FleetError(
            f"{source}, header: missing column `{missing[0]}`; required columns are "
            f"{','.join(REQUIRED_FIELDS)}"
        )
    unknown = [h for h in header if h not in REQUIRED_FIELDS + OPTIONAL_FIELDS]
    if unknown:
        raise FleetError(
            f"{source}, header: unknown column {unknown[0]!r}; allowed columns are "
            f"{','.join(REQUIRED_FIELDS + OPTIONAL_FIELDS)}"
        )
    if len(set(header)) != len(header):
        raise FleetError(f"{source}, header: duplicate column names in {header}")
    rows: list[Mapping[str, Any]] = []
    numbers: list[int] = []
    for number, cells in enumerate(reader, start=1):
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            raise FleetError(
                f"{source}, row {number}: {len(cells)} cells but the header has {len(header)} "
                f"columns ({','.join(header)})"
            )
        rows.append(dict(zip(header, cells, strict=True)))
        numbers.append(number)
    if not rows:
        raise FleetError(f"{source}: the fleet is empty; add at least one device row")
    return rows, numbers
