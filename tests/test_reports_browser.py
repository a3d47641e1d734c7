"""Every report renders in a real browser (headless Chromium): screenshot non-blank, every
figure an embedded PNG, every table with the rows the manifest promises.

Skips when no Chromium is installed (CI installs Debian's ``chromium`` package).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_reports import EXAMPLE_FLEET, MINILM, big_fleet
from test_reports_run import write_run

from legend.models.spec import get_model_spec
from legend.planner.api import PlannerOptions, plan_round
from legend.planner.profiles import JobParams, load_fleet
from legend.reports.plan_report import build_plan_report
from legend.reports.render import write_report
from legend.reports.run_report import build_run_report, load_run
from legend.reports.whatif import WhatIfSettings, build_whatif_report, run_whatif

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "render_report.py"

sys.path.insert(0, str(SCRIPT.parent))
from render_report import find_chromium  # noqa: E402

CHROMIUM = find_chromium()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="no chromium on PATH (install Debian's package: apt-get install -y chromium)",
    ),
]


def _render(html: Path) -> dict:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), str(html)], capture_output=True, text=True, timeout=300
    )
    summary = json.loads(out.stdout)
    assert out.returncode == 0, summary["failures"]
    assert (html.parent / "report.png").stat().st_size > 50_000
    return summary


def test_plan_report_for_a_thousand_devices_renders(tmp_path):
    fleet = big_fleet(1000)
    plan = plan_round(fleet, get_model_spec(MINILM), JobParams(), PlannerOptions(solver="greedy"))
    written = write_report(build_plan_report(plan, fleet=fleet), tmp_path)
    summary = _render(written.html)
    assert summary["images"] == 4
    assert summary["table_rows"]["t-devices"] == 60
    assert summary["table_rows"]["t-fleet_classes"] == 4


def test_whatif_and_run_reports_render(tmp_path):
    fleet = load_fleet(EXAMPLE_FLEET)
    settings = WhatIfSettings(
        bandwidth_scales=(0.5, 1.0, 2.0),
        fleet_scales=(1.0, 2.0),
        deadline_points=3,
        models=(MINILM, "roberta-large"),
    )
    result = run_whatif(fleet, get_model_spec(MINILM), settings=settings)
    written = write_report(build_whatif_report(result), tmp_path / "whatif")
    summary = _render(written.html)
    assert summary["images"] == 4
    assert summary["table_rows"]["t-bandwidth"] == 3
    assert summary["table_rows"]["t-deadline"] == 3

    runs = [
        load_run(write_run(tmp_path / "a", "uniform", [0.5, 0.6, 0.7], [10, 10, 10], 100)),
        load_run(write_run(tmp_path / "b", "exact", [0.55, 0.65, 0.68], [5, 5, 5], 40)),
    ]
    written = write_report(build_run_report(runs), tmp_path / "run")
    summary = _render(written.html)
    assert summary["images"] == 4
    assert summary["table_rows"]["t-targets"] == 2
    assert summary["table_rows"]["t-rounds"] == 6
