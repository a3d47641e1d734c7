"""Checks of the paths a command reads and writes, made where they enter (the CLI).

Every command refuses, with one line naming the option and the path:

- an input that does not exist or is a folder where a file is expected;
- an output that is one of the command's inputs (it would be overwritten);
- an output under a file, in a folder it cannot create or write, or a folder where a file
  is expected (and the other way round);
- an output folder holding files the command did not make (they would be mixed with or
  overwritten by its own).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from legend.models.errors import PathError

__all__ = [
    "check_input_file",
    "check_output_dir",
    "check_output_file",
    "writing",
]


def check_input_file(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` as a readable file, or :class:`PathError` saying why not."""
    p = Path(path)
    if p.is_dir():
        raise PathError(f"{what} {p} is a folder; give a file")
    if not p.exists():
        raise PathError(f"{what} {p} does not exist")
    if not os.access(p, os.R_OK):
        raise PathError(f"{what} {p} cannot be read (permission denied)")
    return p


def _same(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return a.samefile(b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def _refuse_inputs(out: Path, option: str, inputs: Iterable[str | os.PathLike[str] | None]) -> None:
    for given in inputs:
        if given is None or str(given) == "":
            continue
        if _same(out, Path(given)):
            raise PathError(
                f"{option} {out} is also an input of this command ({given}); writing there "
                "would overwrite it: give another path"
            )


def _writable_folder(folder: Path, option: str, out: Path) -> None:
    """Create ``folder`` (and parents) and prove a file can be written in it."""
    created: Path | None = None  # the first folder this check creates (removed after it)
    for parent in (folder, *folder.parents):
        if parent.exists():
            if not parent.is_dir():
                raise PathError(f"{option} {out}: {parent} is a file, not a folder")
            break
        created = parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise PathError(
            f"{option} {out} cannot be written ({exc.strerror or exc}); choose another path"
        ) from None
    finally:
        if created is not None and created.is_dir():
            shutil.rmtree(created, ignore_errors=True)


def check_output_file(
    out: str | os.PathLike[str],
    option: str = "--out",
    inputs: Iterable[str | os.PathLike[str] | None] = (),
) -> Path:
    """``out`` as a file path the command may write (its folder is created)."""
    p = Path(out)
    _refuse_inputs(p, option, inputs)
    if p.is_dir():
        raise PathError(f"{option} {p} is a folder; give a file path")
    _writable_folder(p.parent, option, p)
    if p.exists() and not os.access(p, os.W_OK):
        raise PathError(f"{option} {p} cannot be written (permission denied)")
    return p


def check_output_dir(
    out: str | os.PathLike[str],
    option: str = "--out",
    inputs: Iterable[str | os.PathLike[str] | None] = (),
    owned: Iterable[str] = (),
) -> Path:
    """``out`` as a folder the command may fill: new, empty, or holding only ``owned`` names
    (what an earlier run of the same command wrote)."""
    p = Path(out)
    _refuse_inputs(p, option, inputs)
    for given in inputs:
        if given is not None and str(given) and _inside(Path(given), p):
            raise PathError(
                f"{option} {p} holds an input of this command ({given}); give another folder"
            )
    if p.exists() and not p.is_dir():
        raise PathError(f"{option} {p} is a file; give a folder")
    if p.is_dir():
        allowed = set(owned)
        foreign = sorted(e.name for e in p.iterdir() if e.name not in allowed)
        if foreign:
            raise PathError(
                f"{option} {p} holds other files ({', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}); give a new or empty folder"
            )
    _writable_folder(p, option, p)
    return p


def _inside(path: Path, folder: Path) -> bool:
    try:
        inner, outer = path.resolve(), folder.resolve()
        return inner.is_relative_to(outer) and inner != outer
    except OSError:
        return False


@contextlib.contextmanager
def writing(out: str | os.PathLike[str], option: str = "--out") -> Iterator[None]:
    """Turn an ``OSError`` while writing ``out`` (disk full, removed folder) into one line."""
    try:
        yield
    except OSError as exc:
        raise PathError(
            f"{option} {out} could not be written ({exc.strerror or exc}); nothing complete "
            "was written there"
        ) from None
