"""Fleet files: CSV, TOML and JSON load to the same fleet; every bad input names the file,
the row, the field and the value."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from strategies import fleets

from legend.models.errors import InputError
from legend.planner.errors import FleetError, PlannerInputError
from legend.planner.profiles import Fleet, load_fleet, parse_rank_grid

HEADER = "device_id,tflops,memory_gb,uplink_mbps,downlink_mbps,num_samples"
GOOD_ROW = "a,1,2,3,4,5"


def write_fleet_files(fleet: Fleet, folder: Path) -> dict[str, Path]:
    """The same fleet as CSV, TOML and JSON."""
    records = fleet.to_records()
    columns = ["device_id", "tflops", "memory_gb", "uplink_mbps", "downlink_mbps"]
    columns += ["num_samples", "local_steps", "device_class"]
    lines = [",".join(columns)]
    for r in records:
        lines.append(
            ",".join(
                "" if r[c] is None else repr(r[c]) if isinstance(r[c], float) else str(r[c])
                for c in columns
            )
        )
    paths = {s: folder / f"fleet.{s}" for s in ("csv", "toml", "json")}
    paths["csv"].write_text("\n".join(lines) + "\n")
    toml = []
    for r in records:
        toml.append("[[devices]]")
        toml += [f"{k} = {json.dumps(v)}" for k, v in r.items() if v is not None]
    paths["toml"].write_text("\n".join(toml) + "\n")
    paths["json"].write_text(
        json.dumps({"devices": [{k: v for k, v in r.items() if v is not None} for r in records]})
    )
    return paths


def test_example_fleets_are_equivalent(example_fleets: dict[str, Path]) -> None:
    loaded = {s: load_fleet(p) for s, p in example_fleets.items()}
    assert loaded["csv"] == loaded["toml"] == loaded["json"]
    fleet = loaded["csv"]
    assert len(fleet) >= 20
    classes = {d.device_class for d in fleet}
    assert len(classes) >= 4
    ups = [d.uplink_mbps for d in fleet]
    assert max(ups) / min(ups) >= 10
    assert all(2 <= d.memory_gb <= 16 for d in fleet)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(fleet=fleets(max_size=6))
def test_formats_round_trip(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> None:
    folder = tmp_path_factory.mktemp("fleet")
    paths = write_fleet_files(fleet, folder)
    for path in paths.values():
        assert load_fleet(path) == fleet


def _csv(tmp_path: Path, text: str, name: str = "fleet.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# (file name, content, fragments the message must contain)
BAD_FILES = [
    ("short.csv", f"{HEADER}\na,1,2,3,4\n", ["short.csv", "row 1", "5 cells"]),
    (
        "nocol.csv",
        "device_id,tflops,memory_gb,uplink_mbps,downlink_mbps\na,1,2,3,4\n",
        ["nocol.csv", "missing column", "num_samples"],
    ),
    ("extra.csv", f"{HEADER},colour\n{GOOD_ROW},red\n", ["extra.csv", "unknown column", "colour"]),
    ("text.csv", f"{HEADER}\na,fast,2,3,4,5\n", ["text.csv", "row 1", "tflops", "'fast'"]),
    ("zero.csv", f"{HEADER}\na,1,0,3,4,5\n", ["zero.csv", "row 1", "memory_gb", "'0'"]),
    ("neg.csv", f"{HEADER}\na,1,2,-3,4,5\n", ["neg.csv", "row 1", "uplink_mbps", "'-3'"]),
    ("nan.csv", f"{HEADER}\na,1,2,3,nan,5\n", ["nan.csv", "row 1", "downlink_mbps", "'nan'"]),
    ("inf.csv", f"{HEADER}\na,inf,2,3,4,5\n", ["inf.csv", "row 1", "tflops", "'inf'"]),
    ("frac.csv", f"{HEADER}\na,1,2,3,4,5.5\n", ["frac.csv", "row 1", "num_samples", "'5.5'"]),
    ("steps.csv", f"{HEADER},local_steps\n{GOOD_ROW},0\n", ["steps.csv", "row 1", "local_steps"]),
    (
        "dup.csv",
        f"{HEADER}\n{GOOD_ROW}\nb,1,2,3,4,5\n{GOOD_ROW}\n",
        ["dup.csv", "row 3", "duplicate", "'a'", "row 1"],
    ),
    (
        "blank.csv",
        f"{HEADER}\n{GOOD_ROW}\n\nb,1,2,x,4,5\n",
        ["blank.csv", "row 3", "uplink_mbps", "'x'"],
    ),
    ("noid.csv", f"{HEADER}\n ,1,2,3,4,5\n", ["noid.csv", "row 1", "device_id"]),
    ("empty.csv", "", ["empty.csv", "empty"]),
    ("header.csv", f"{HEADER}\n", ["header.csv", "empty"]),
    ("dupcol.csv", f"{HEADER},tflops\n{GOOD_ROW},1\n", ["dupcol.csv", "duplicate column"]),
    ("fleet.yaml", "devices: []\n", ["fleet.yaml", ".yaml"]),
    ("broken.toml", "[[devices]\n", ["broken.toml", "TOML"]),
    (
        "missing.toml",
        '[[devices]]\ndevice_id = "a"\ntflops = 1\n',
        ["missing.toml", "row 1", "memory_gb"],
    ),
    ("notlist.toml", "devices = 3\n", ["notlist.toml", "devices"]),
    ("broken.json", '{"devices": [', ["broken.json", "JSON"]),
    ("empty.json", '{"devices": []}', ["empty.json", "empty"]),
    (
        "bool.json",
        '{"devices": [{"device_id": "a", "tflops": true, "memory_gb": 1, "uplink_mbps": 1, '
        '"downlink_mbps": 1, "num_samples": 1}]}',
        ["bool.json", "row 1", "tflops", "True"],
    ),
    (
        "unknown.json",
        '{"devices": [{"device_id": "a", "tflops": 1, "memory_gb": 1, "uplink_mbps": 1, '
        '"downlink_mbps": 1, "num_samples": 1, "gpu": "x"}]}',
        ["unknown.json", "row 1", "'gpu'"],
    ),
    (
        "dup.json",
        '{"devices": [{"device_id": "a", "tflops": 1, "memory_gb": 1, "uplink_mbps": 1, '
        '"downlink_mbps": 1, "num_samples": 1}, {"device_id": "a", "tflops": 2, "memory_gb": 1, '
        '"uplink_mbps": 1, "downlink_mbps": 1, "num_samples": 1}]}',
        ["dup.json", "row 2", "duplicate", "'a'"],
    ),
]


@pytest.mark.parametrize(("name", "content", "fragments"), BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_fleet_files_name_file_row_field_and_value(
    tmp_path: Path, name: str, content: str, fragments: list[str]
) -> None:
    path = _csv(tmp_path, content, name)
    with pytest.raises(FleetError) as info:
        load_fleet(path)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert isinstance(info.value, ValueError) and isinstance(info.value, InputError)
    assert info.value.exit_code == 2
    assert "\n" not in message


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(FleetError, match="does not exist"):
        load_fleet(tmp_path / "nope.csv")
    binary = tmp_path / "bin.csv"
    binary.write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(FleetError, match="cannot be read"):
        load_fleet(binary)


@pytest.mark.parametrize(
    ("grid", "expected"),
    [("2,4,8,16", (2, 4, 8, 16)), (" 1, 3 ", (1, 3)), ([4, 8], (4, 8)), ("8", (8,))],
)
def test_rank_grids_parse(grid: object, expected: tuple[int, ...]) -> None:
    assert parse_rank_grid(grid) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("grid", "fragment"),
    [
        ("4,2", "strictly increasing"),
        ("2,2,4", "strictly increasing"),
        ("0,2", "must be > 0"),
        ("-2,4", "must be > 0"),
        ("2,x", "'x' is not an integer"),
        ("2.5,4", "not an integer"),
        ("", "empty"),
    ],
)
def test_bad_rank_grids(grid: str, fragment: str) -> None:
    with pytest.raises(PlannerInputError, match=fragment):
        parse_rank_grid(grid)
