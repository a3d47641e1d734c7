#!/usr/bin/env python3
"""Render a legend report in headless Chromium and check that the page is non-trivial.

Usage::

    python scripts/render_report.py OUT/report.html [--screenshot OUT/report.png]
        [--manifest OUT/report.json] [--chromium /usr/bin/chromium]

It takes a full-window screenshot (PNG) of the page and dumps the DOM the browser built,
then checks:

- the screenshot is a readable PNG and not blank (enough non-background pixels, some
  colour variety);
- the page has as many ``<img>`` elements as the manifest lists figures, every one an
  embedded PNG (``data:image/png;base64``) that decodes;
- every table of the manifest is present with the number of body rows it says it shows;
- the page loads no external resource (``src``/``href`` to http(s)).

It prints a JSON summary and exits 0 when every check passes, 1 when one fails and 2 when
the browser or the files are missing. The browser is Debian's ``chromium`` package
(``apt-get install -y chromium``); ``--chromium`` or ``$LEGEND_CHROMIUM`` pick another.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
)


def find_chromium(explicit: str | None = None) -> str | None:
    """The browser binary: ``explicit``, ``$LEGEND_CHROMIUM``, or the first on ``PATH``."""
    for name in (explicit, os.environ.get("LEGEND_CHROMIUM"), *CANDIDATES):
        if not name:
            continue
        path = shutil.which(name) or (name if Path(name).is_file() else None)
        if path:
            return path
    return None


class _Dom(HTMLParser):
    """Counts images, table body rows per table id and external references."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.rows: dict[str, int] = {}
        self.external: list[str] = []
        self._table: list[str] = []
        self._in_body = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        for key in ("src", "href"):
            value = a.get(key) or ""
            if value.startswith(("http://", "https://", "//")):
                self.external.append(value[:80])
        if tag == "img":
            self.images.append(a.get("src") or "")
        elif tag == "table":
            self._table.append(a.get("id") or f"table-{len(self.rows)}")
            self.rows.setdefault(self._table[-1], 0)
        elif tag == "tbody":
            self._in_body += 1
        elif tag == "tr" and self._table and self._in_body:
            self.rows[self._table[-1]] += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "table" and self._table:
            self._table.pop()
        elif tag == "tbody" and self._in_body:
            self._in_body -= 1


def _png_stats(data: bytes) -> dict[str, Any]:
    import numpy as np
    from PIL import Image

    image = Image.open(io.BytesIO(data)).convert("RGB")
    pixels = np.asarray(image, dtype=np.int16).reshape(-1, 3)[::7]
    colours, counts = np.unique(pixels, axis=0, return_counts=True)
    background = colours[int(np.argmax(counts))]
    differing = np.abs(pixels - background).sum(axis=1) > 30
    return {
        "width": image.width,
        "height": image.height,
        "non_background_share": round(float(differing.mean()), 4),
        "colours": len(colours),
    }


def _run(browser: str, args: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [browser, *args], capture_output=True, text=True, timeout=timeout_s, check=False
    )


def render(
    html_path: Path,
    *,
    screenshot: Path,
    manifest_path: Path | None,
    browser: str,
    window: str = "1400,4000",
    timeout_s: float = 120.0,
) -> dict[str, Any]:
    """Screenshot and check one report page; returns a summary with ``ok`` and ``failures``."""
    failures: list[str] = []
    url = html_path.resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="legend-chromium-") as profile:
        common = [*FLAGS, f"--user-data-dir={profile}", f"--window-size={window}"]
        shot = _run(browser, [*common, f"--screenshot={screenshot}", url], timeout_s)
        dom = _run(browser, [*common, "--dump-dom", url], timeout_s)
    summary: dict[str, Any] = {"html": str(html_path), "screenshot": str(screenshot)}
    if shot.returncode != 0 or not screenshot.is_file():
        failures.append(f"screenshot failed (exit {shot.returncode}): {shot.stderr[-400:]}")
    else:
        stats = _png_stats(screenshot.read_bytes())
        summary["screenshot_stats"] = stats
        if stats["non_background_share"] < 0.02 or stats["colours"] < 16:
            failures.append(f"screenshot looks blank: {stats}")
    if dom.returncode != 0 or "<html" not in dom.stdout.lower():
        failures.append(f"--dump-dom failed (exit {dom.returncode}): {dom.stderr[-400:]}")
        summary.update(ok=False, failures=failures)
        return summary
    parser = _Dom()
    parser.feed(dom.stdout)
    summary["images"] = len(parser.images)
    summary["table_rows"] = parser.rows
    if parser.external:
        failures.append(f"page references external resources: {parser.external[:3]}")
    bad_images = 0
    for src in parser.images:
        prefix = "data:image/png;base64,"
        if not src.startswith(prefix):
            bad_images += 1
            continue
        try:
            stats = _png_stats(base64.b64decode(src[len(prefix) :]))
        except Exception:  # any decoding failure is a failed check
            bad_images += 1
            continue
        if stats["non_background_share"] < 0.01:
            bad_images += 1
    if bad_images:
        failures.append(f"{bad_images} image(s) are not embedded, non-blank PNGs")
    if not parser.images:
        failures.append("the page has no images")
    if not parser.rows:
        failures.append("the page has no tables")
    if manifest_path is not None:
        expected = json.loads(manifest_path.read_text())
        if len(parser.images) != expected["images"]:
            failures.append(f"{len(parser.images)} images, the manifest lists {expected['images']}")
        for name, info in expected["tables"].items():
            got = parser.rows.get(f"t-{name}")
            if got is None:
                failures.append(f"table {name!r} is missing from the page")
            elif got != info["rows_shown"]:
                failures.append(f"table {name!r} shows {got} rows, expected {info['rows_shown']}")
        summary["expected"] = {
            "images": expected["images"],
            "tables": {k: v["rows_shown"] for k, v in expected["tables"].items()},
        }
    summary.update(ok=not failures, failures=failures)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("html", type=Path, help="the report.html to render")
    parser.add_argument("--screenshot", type=Path, help="PNG to write (default: next to html)")
    parser.add_argument("--manifest", type=Path, help="report.json (default: next to html)")
    parser.add_argument("--chromium", help="browser binary (default: chromium on PATH)")
    parser.add_argument("--window-size", default="1400,4000", help="WIDTH,HEIGHT in pixels")
    parser.add_argument("--timeout-s", type=float, default=120.0)
    args = parser.parse_args(argv)
    if not args.html.is_file():
        print(f"error: {args.html} does not exist", file=sys.stderr)
        return 2
    browser = find_chromium(args.chromium)
    if browser is None:
        print(
            "error: no chromium found; install it with `apt-get install -y chromium` "
            "or pass --chromium PATH",
            file=sys.stderr,
        )
        return 2
    screenshot = args.screenshot or args.html.with_suffix(".png")
    manifest = args.manifest or args.html.with_name("report.json")
    summary = render(
        args.html,
        screenshot=screenshot,
        manifest_path=manifest if manifest.is_file() else None,
        browser=browser,
        window=args.window_size,
        timeout_s=args.timeout_s,
    )
    print(json.dumps(summary, indent=2))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
