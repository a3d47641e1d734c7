"""Loading, de-duplication, splits and device partitions on the real movie-review data."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from legend.federation.data import (
    DataError,
    TextDataset,
    load_dataset,
    partition,
    partition_stats,
)
from legend.federation.errors import FederationInputError
from legend.models.errors import InputError

# ------------------------------------------------------------------ real data


@pytest.fixture(scope="module")
def rt() -> TextDataset:
    return load_dataset("rotten_tomatoes", seed=0)


@pytest.fixture(scope="module")
def imdb() -> TextDataset:
    return load_dataset("imdb", seed=0)


def test_rotten_tomatoes_sizes_and_balance(rt: TextDataset) -> None:
    assert rt.source == "rotten_tomatoes"
    assert rt.label_names == ("negative", "positive")
    assert rt.num_labels == 2
    assert rt.num_train + rt.num_test == 8530  # no repeated sentences in this corpus
    assert rt.dropped_duplicates == 0 and rt.dropped_conflicts == 0
    assert rt.num_test == round(0.2 * 8530)
    assert np.bincount(rt.train_labels).tolist() == [3412, 3412]
    assert np.bincount(rt.test_labels).tolist() == [853, 853]
    assert rt.train_labels.dtype == np.int64 and not rt.train_labels.flags.writeable
    assert "negative" in rt.describe()


def test_imdb_deduplicated_and_cleaned(imdb: TextDataset) -> None:
    # 25,000 reviews; 98 are repeated copies once <br /> tags and whitespace are normalised.
    assert imdb.num_train + imdb.num_test == 25_000 - 98
    assert imdb.dropped_duplicates == 98 and imdb.dropped_conflicts == 0
    assert not any("<br" in text for text in imdb.train_texts + imdb.test_texts)
    counts = np.bincount(np.concatenate([imdb.train_labels, imdb.test_labels]))
    assert abs(int(counts[0]) - int(counts[1])) < 100
    assert np.mean([len(t) for t in imdb.test_texts]) > 10 * 114 / 2  # long reviews


@pytest.mark.parametrize("fixture", ["rt", "imdb"])
def test_train_and_test_texts_do_not_overlap(fixture: str, request: pytest.FixtureRequest) -> None:
    data: TextDataset = request.getfixturevalue(fixture)
    train = set(data.train_texts)
    assert len(train) == data.num_train
    assert len(set(data.test_texts)) == data.num_test
    assert train.isdisjoint(data.test_texts)


def test_split_is_seeded_and_shuffled(rt: TextDataset) -> None:
    again = load_dataset("rotten_tomatoes", seed=0)
    assert again.train_texts == rt.train_texts and again.test_texts == rt.test_texts
    assert np.array_equal(again.train_labels, rt.train_labels)
    other = load_dataset("rotten_tomatoes", seed=1)
    assert other.train_texts != rt.train_texts
    assert set(other.train_texts) != set(rt.train_texts)
    # The source file is sorted by label; the split must not be.
    assert 0.3 < rt.train_labels[:200].mean() < 0.7


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
def test_split_is_stratified(fraction: float) -> None:
    data = load_dataset("rotten_tomatoes", seed=3, test_fraction=fraction)
    assert data.num_test == round(fraction * 8530)
    test_counts = np.bincount(data.test_labels)
    assert abs(int(test_counts[0]) - int(test_counts[1])) <= 1


def test_max_train_and_max_test_subsample_stratified(rt: TextDataset) -> None:
    small = load_dataset("rotten_tomatoes", seed=0, max_train=301, max_test=50)
    assert small.num_train == 301 and small.num_test == 50
    assert sorted(np.bincount(small.train_labels).tolist()) == [150, 151]
    assert np.bincount(small.test_labels).tolist() == [25, 25]
    # A subsample of the same seeded split, never touching the test side.
    assert set(small.train_texts) <= set(rt.train_texts)
    assert set(small.test_texts) <= set(rt.test_texts)
    assert small == load_dataset("rotten_tomatoes", seed=0, max_train=301, max_test=50)
    big = load_dataset("rotten_tomatoes", max_train=10**9)
    assert big.num_train == rt.num_train


def test_text_dataset_validates_alignment() -> None:
    with pytest.raises(DataError, match="train_labels"):
        TextDataset(
            train_texts=("a", "b"),
            train_labels=np.array([0]),
            test_texts=(),
            test_labels=np.array([], dtype=np.int64),
            label_names=("x", "y"),
            source="memory",
        )
    with pytest.raises(DataError, match=r"ids in \[0, 2\)"):
        TextDataset(
            train_texts=("a",),
            train_labels=np.array([5]),
            test_texts=(),
            test_labels=np.array([], dtype=np.int64),
            label_names=("x", "y"),
            source="memory",
        )


def test_module_imports_no_torch() -> None:
    code = "import sys, legend.federation.data; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------ user files


def _write_csv(path: Path, rows: list[tuple[str, object]], header: str = "text,label") -> Path:
    lines = [header] + [f'"{text}",{label}' for text, label in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _write_jsonl(path: Path, records: list[dict[str, object]]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


def _rows(num: int, labels: list[object]) -> list[tuple[str, object]]:
    return [(f"example number {i}", labels[i % len(labels)]) for i in range(num)]


def test_user_csv_with_int_labels(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "ints.csv", _rows(40, [2, 0, 1]))
    data = load_dataset(path, test_fraction=0.25, seed=5)
    assert data.label_names == ("0", "1", "2")
    assert data.source == str(path)
    assert data.num_train + data.num_test == 40 and data.num_test == 10
    assert sorted(np.bincount(data.test_labels).tolist()) == [3, 3, 4]
    for text, label in zip(data.train_texts, data.train_labels, strict=True):
        number = int(text.rsplit(" ", 1)[1])
        assert data.label_names[label] == str([2, 0, 1][number % 3])


def test_user_csv_with_string_labels_and_custom_columns(tmp_path: Path) -> None:
    rows = _rows(30, ["pos", "neg", "neutral"])
    path = _write_csv(tmp_path / "strings.csv", rows, header="review,sentiment")
    data = load_dataset(path, text_column="review", label_column="sentiment")
    assert data.label_names == ("neg", "neutral", "pos")  # sorted, then numbered
    mapping = dict(rows)
    for text, label in zip(data.test_texts, data.test_labels, strict=True):
        assert data.label_names[label] == mapping[text]


def test_integer_labels_sort_numerically(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "stars.csv", _rows(20, [10, 2]))
    assert load_dataset(path).label_names == ("2", "10")


def test_user_jsonl_with_int_and_string_labels(tmp_path: Path) -> None:
    ints = _write_jsonl(
        tmp_path / "ints.jsonl", [{"text": f"t {i}", "label": i % 2} for i in range(20)]
    )
    data = load_dataset(ints)
    assert data.label_names == ("0", "1") and data.num_train + data.num_test == 20
    strings = _write_jsonl(
        tmp_path / "strings.jsonl",
        [{"body": f"t {i}", "y": ["spam", "ham"][i % 2], "extra": i} for i in range(20)],
    )
    data = load_dataset(strings, text_column="body", label_column="y")
    assert data.label_names == ("ham", "spam")
    for text, label in zip(data.train_texts, data.train_labels, strict=True):
        assert data.label_names[label] == ["spam", "ham"][int(text.split()[1]) % 2]


def test_deduplication_keeps_first_and_drops_conflicts(tmp_path: Path) -> None:
    rows = _rows(20, ["a", "b"])
    rows += [("example number 0", "a"), ("example  number 0 ", "a")]  # same text, same label
    rows += [("example number 1", "a")]  # "example number 1" was "b": conflicting
    path = _write_csv(tmp_path / "dups.csv", rows)
    data = load_dataset(path)
    texts = data.train_texts + data.test_texts
    assert data.dropped_duplicates == 2
    assert data.dropped_conflicts == 2  # both copies of the conflicting text
    assert len(texts) == 19 and len(set(texts)) == 19
    assert "example number 1" not in texts and "example number 0" in texts


def test_edited_file_is_read_again(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "edit.csv", _rows(10, ["a", "b"]))
    assert load_dataset(path).label_names == ("a", "b")
    _write_csv(path, _rows(12, ["a", "b", "cc"]))
    assert load_dataset(path).label_names == ("a", "b", "cc")


# ------------------------------------------------------------------ bad input


def _bad(tmp_path: Path, name: str, content: str) -> Path:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("name", "content", "pattern"),
    [
        ("empty.csv", "", "file is empty"),
        ("header.csv", "text,label\n", "no rows"),
        ("nolabel.csv", "text,stars\nhello,1\nbye,0\n", "no column 'label'.*label_column"),
        ("single.csv", "text,label\na,1\nb,1\nc,1\n", "same label"),
        ("lonely.csv", "text,label\na,1\nb,1\nc,0\n", r"\['0'\] have a single example"),
        ("emptytext.csv", "text,label\na,1\n,0\n", "row 3: 'text' is empty"),
        ("nolab.csv", "text,label\na,1\nb,\n", "row 3: 'label' is empty"),
        ("mixed.csv", "text,label\na,1\nb,pos\n", r"mixes integers \(row 2: 1\) and strings"),
        ("empty.jsonl", "\n\n", "file is empty"),
        ("badjson.jsonl", '{"text": "a", "label": 1}\n{oops\n', "line 2: not valid JSON"),
        ("array.jsonl", '["a", 1]\n', "line 1: expected a JSON object"),
        ("nokey.jsonl", '{"text": "a", "lab": 1}\n', "line 1: no key 'label'"),
        ("number.jsonl", '{"text": "a", "label": 1}\n{"text": 5, "label": 0}\n', "line 2.*text"),
        ("null.jsonl", '{"text": null, "label": 1}\n', "line 1: 'text' must be text"),
        ("bool.jsonl", '{"text": "a", "label": true}\n', "line 1.*boolean"),
        ("float.jsonl", '{"text": "a", "label": 0.5}\n', "line 1.*0.5 is fractional"),
    ],
)
def test_bad_files_raise_clear_errors(
    tmp_path: Path, name: str, content: str, pattern: str
) -> None:
    path = _bad(tmp_path, name, content)
    with pytest.raises(DataError, match=pattern) as info:
        load_dataset(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, FederationInputError) and isinstance(info.value, InputError)
    assert info.value.exit_code == 2


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\ncaf\xe9,1\nb,0\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_dataset(path)


@pytest.mark.parametrize(
    ("name", "pattern"),
    [
        ("sst2", "unknown data set 'sst2'"),
        ("reviews.parquet", "unknown data set"),
        ("missing/file.csv", "file not found"),
    ],
)
def test_unknown_names_and_missing_files(name: str, pattern: str) -> None:
    with pytest.raises(DataError, match=pattern):
        load_dataset(name)


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5, math.nan, True, "0.2"])
def test_bad_test_fraction(fraction: object) -> None:
    with pytest.raises(DataError, match="`test_fraction`"):
        load_dataset(test_fraction=fraction)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"max_train": 1}, "`max_train`"),
        ({"max_train": 2.5}, "`max_train`"),
        ({"max_test": 0}, "`max_test`"),
        ({"seed": -1}, "`seed`"),
        ({"seed": 1.5}, "`seed`"),
    ],
)
def test_bad_caps_and_seed(kwargs: dict[str, object], pattern: str) -> None:
    with pytest.raises(DataError, match=pattern):
        load_dataset(**kwargs)  # type: ignore[arg-type]


def test_same_text_and_label_column(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "ok.csv", _rows(10, ["a", "b"]))
    with pytest.raises(DataError, match="both 'text'"):
        load_dataset(path, label_column="text")


# ------------------------------------------------------------------ partitions


def _check_disjoint_cover(parts: list[np.ndarray], total: int) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined))
    assert joined.min() >= 0 and joined.max() < total
    assert all(p.dtype == np.int64 for p in parts)


def test_partition_covers_the_real_train_set(rt: TextDataset) -> None:
    parts = partition(rt.train_labels, 20, alpha=0.5, seed=0)
    assert len(parts) == 20
    _check_disjoint_cover(parts, rt.num_train)
    assert sum(len(p) for p in parts) == rt.num_train
    assert all(len(p) >= 8 for p in parts)
    again = partition(rt.train_labels, 20, alpha=0.5, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition(rt.train_labels, 20, alpha=0.5, seed=1)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_dirichlet_skew_grows_as_alpha_shrinks(rt: TextDataset) -> None:
    entropy = {
        alpha: partition_stats(
            partition(rt.train_labels, 20, alpha=alpha, seed=2), rt.train_labels
        )["label_entropy_bits"].mean()
        for alpha in (0.1, 1.0, 100.0, math.inf)
    }
    assert entropy[0.1] < 0.4 < 0.9 < entropy[100.0]
    assert entropy[0.1] < entropy[1.0] < entropy[100.0] <= entropy[math.inf]
    assert entropy[math.inf] > 0.999  # IID: each device holds the global 50/50 mix


def test_min_samples_honoured_under_strong_skew(rt: TextDataset) -> None:
    parts = partition(rt.train_labels, 200, alpha=0.05, quantity_skew=3.0, min_samples=25, seed=4)
    assert min(len(p) for p in parts) >= 25
    _check_disjoint_cover(parts, rt.num_train)
    assert sum(len(p) for p in parts) == rt.num_train


def test_quantity_skew_spreads_sizes(rt: TextDataset) -> None:
    def spread(skew: float) -> float:
        sizes = np.array([len(p) for p in partition(rt.train_labels, 30, quantity_skew=skew)])
        return float(sizes.std() / sizes.mean())

    assert spread(0.0) < 0.01  # equal within one example
    assert spread(0.0) < spread(0.5) < spread(1.0) < spread(2.0)


def test_explicit_sizes_follow_label_proportions(rt: TextDataset) -> None:
    sizes = [400, 250, 100, 40, 8]
    parts = partition(rt.train_labels, 5, alpha=math.inf, sizes=sizes, seed=0)
    assert [len(p) for p in parts] == sizes
    _check_disjoint_cover(parts, rt.num_train)
    stats = partition_stats(parts, rt.train_labels, label_names=rt.label_names)
    assert (abs(stats["negative"] - stats["positive"]) <= 1).all()
    skewed = partition(rt.train_labels, 5, alpha=0.1, sizes=sizes, seed=0)
    assert [len(p) for p in skewed] == sizes


def test_partition_stats_table() -> None:
    labels = np.array([0, 0, 1, 1, 2, 2, 2, 0])
    table = partition_stats([np.array([0, 1, 2, 3]), np.array([4, 5, 6]), np.array([7])], labels)
    assert list(table.columns) == [
        "device",
        "samples",
        "label_0",
        "label_1",
        "label_2",
        "label_entropy_bits",
    ]
    assert table["samples"].tolist() == [4, 3, 1]
    assert table[["label_0", "label_1", "label_2"]].sum(axis=1).tolist() == [4, 3, 1]
    assert table["label_entropy_bits"].tolist() == [1.0, 0.0, 0.0]


@settings(max_examples=40, deadline=None)
@given(
    counts=st.lists(st.integers(0, 60), min_size=2, max_size=5).filter(lambda c: sum(c) >= 40),
    num_devices=st.integers(1, 5),
    alpha=st.sampled_from([0.01, 0.3, 1.0, 50.0, math.inf]),
    quantity_skew=st.sampled_from([0.0, 0.7, 2.5]),
    seed=st.integers(0, 2**16),
)
def test_partition_is_a_disjoint_cover_with_min_samples(
    counts: list[int], num_devices: int, alpha: float, quantity_skew: float, seed: int
) -> None:
    labels = np.repeat(np.arange(len(counts)), counts)
    labels = np.random.default_rng(seed).permutation(labels)
    parts = partition(
        labels, num_devices, alpha=alpha, quantity_skew=quantity_skew, seed=seed, min_samples=8
    )
    _check_disjoint_cover(parts, len(labels))
    assert sum(len(p) for p in parts) == len(labels)
    assert min(len(p) for p in parts) >= 8


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(3, 30), min_size=1, max_size=6),
    alpha=st.sampled_from([0.05, 1.0, math.inf]),
    seed=st.integers(0, 2**16),
)
def test_partition_with_sizes_gives_exact_sizes(sizes: list[int], alpha: float, seed: int) -> None:
    labels = np.random.default_rng(seed).integers(0, 3, size=200)
    parts = partition(labels, len(sizes), alpha=alpha, sizes=sizes, seed=seed, min_samples=3)
    assert [len(p) for p in parts] == sizes
    _check_disjoint_cover(parts, len(labels))


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"num_devices": 0}, "`num_devices`"),
        ({"num_devices": 2, "alpha": 0}, "`alpha`"),
        ({"num_devices": 2, "alpha": math.nan}, "`alpha`"),
        ({"num_devices": 2, "quantity_skew": -1}, "`quantity_skew`"),
        ({"num_devices": 2, "min_samples": 0}, "`min_samples`"),
        ({"num_devices": 2, "seed": -3}, "`seed`"),
        ({"num_devices": 20}, r"cannot give 20 devices.*needs 160"),
        ({"num_devices": 2, "sizes": [10]}, "one size per device"),
        (
            {"num_devices": 2, "sizes": [60, 50]},
            "110 examples in total but the training set has 100",
        ),
        ({"num_devices": 2, "sizes": [10, 4]}, r"`sizes\[1\]`.*min_samples"),
        ({"num_devices": 2, "sizes": [10, 10], "quantity_skew": 1.0}, "one or the other"),
    ],
)
def test_partition_bad_arguments(kwargs: dict[str, object], pattern: str) -> None:
    labels = np.arange(100) % 2
    with pytest.raises(DataError, match=pattern):
        partition(labels, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("labels", "pattern"),
    [
        (np.array([], dtype=np.int64), "non-empty"),
        (np.zeros((4, 2), dtype=np.int64), "one-dimensional"),
        (np.array([0.0, 1.0]), "integer label ids"),
        (np.array([0, -1]), "non-negative"),
    ],
)
def test_partition_bad_labels(labels: np.ndarray, pattern: str) -> None:
    with pytest.raises(DataError, match=pattern):
        partition(labels, 1, min_samples=1)
