"""Readers, hashing, bad input and checksums of paramserver.data, offline."""

from __future__ import annotations

import gzip
import zipfile
from pathlib import Path

import numpy as np
import pytest

from paramserver.data import (
    BadLines,
    CTRBatch,
    SparseBatch,
    SyntheticCriteo,
    auc,
    hash_field,
    line_index,
    read_criteo,
    read_libsvm,
    read_table,
    read_text,
)
from paramserver.data.fetch import Source, fetch, verify
from paramserver.errors import DataError

pytestmark = pytest.mark.timeout(60)


def _criteo_line(label: str = "1", ints: str = "\t".join(["3"] * 13)) -> str:
    return "\t".join([label, ints, *["0a1b2c3d"] * 26]) + "\n"


def test_criteo_reader_matches_the_generator_in_any_block_size(tmp_path: Path) -> None:
    gen = SyntheticCriteo(examples=3000, seed=3)
    path = gen.write_tsv(tmp_path / "synthetic.tsv")
    train, test = gen.make()
    want = CTRBatch.concat([test, train])
    for block in (4096, 1 << 20):
        got = CTRBatch.concat(list(read_criteo(path, block_bytes=block)))
        np.testing.assert_array_equal(got.keys, want.keys)
        np.testing.assert_array_equal(got.y, want.y)
        np.testing.assert_allclose(got.dense, want.dense)
    # chunks of whole lines cover the file exactly once, and report true line numbers
    chunks = line_index(path, 20_000)
    assert len(chunks) > 3
    assert chunks[0][2] == 1
    parts = [
        CTRBatch.concat(list(read_criteo(path, start=a, stop=b, first_line=f)))
        for a, b, f in chunks
    ]
    assert sum(len(p) for p in parts) == 3000
    np.testing.assert_array_equal(CTRBatch.concat(parts).keys, want.keys)
    lines = path.read_bytes().split(b"\n")
    assert all(lines[f - 1] == path.read_bytes()[a : a + len(lines[f - 1])] for a, _, f in chunks)


def test_gzip_and_missing_values(tmp_path: Path) -> None:
    path = tmp_path / "day.gz"
    with gzip.open(path, "wt") as f:
        f.write(_criteo_line("0", "\t".join([""] * 13)))
        f.write(_criteo_line("1", "\t".join(["-1"] + ["100"] * 12)))
    b = CTRBatch.concat(list(read_criteo(path)))
    assert b.keys.shape == (2, 39) and list(b.y) == [0.0, 1.0]
    assert (
        b.dense[0].sum() == 0
        and b.dense[1, 0] == 0
        and b.dense[1, 1] == pytest.approx(np.log1p(100))
    )


def test_malformed_lines_name_file_and_line_or_are_skipped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "bad.tsv"
    text = (
        _criteo_line() * 3 + "1\t2\t3\n" + _criteo_line() + _criteo_line("1", "\t".join(["x"] * 13))
    )
    text += _criteo_line("2") + "\n" + _criteo_line("0")
    path.write_text(text)
    with pytest.raises(
        DataError, match=rf"{path.name}:4: expected 40 tab-separated fields, found 3"
    ):
        list(read_criteo(path))
    bad = BadLines("skip")
    b = CTRBatch.concat(list(read_criteo(path, bad=bad)))
    assert len(b) == 5 and list(b.y) == [1, 1, 1, 1, 0]
    assert bad.count == 3
    assert any(":6: integer field I1 is not a number" in m for m in bad.first)
    assert any(":7: label '2' is not 0 or 1" in m for m in bad.first)
    assert "3 malformed line(s) skipped" in bad.report()


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such data file"):
        list(read_criteo(tmp_path / "nope.tsv"))
    with pytest.raises(DataError, match="no such data file"):
        line_index(tmp_path / "nope.tsv")


def test_libsvm(tmp_path: Path) -> None:
    path = tmp_path / "a.svm"
    path.write_text("1 3:1.5 7:2\n0 qid:4 3:1\n\n-1 2:1\n1 5:x\n0 1:1 2:2 4:4\n")
    with pytest.raises(DataError, match=r"a.svm:4: label -1.0 is not 0 or 1"):
        list(read_libsvm(path))
    bad = BadLines("skip")
    b = next(read_libsvm(path, bad=bad, signed_labels=True))
    assert list(b.y) == [1, 0, 0, 0] and bad.count == 1 and ":5:" in bad.first[0]
    np.testing.assert_array_equal(b.indptr, [0, 2, 3, 4, 7])
    np.testing.assert_array_equal(b.values, [1.5, 2, 1, 1, 1, 2, 4])
    np.testing.assert_array_equal(b.keys[:2], hash_field(0, np.array([3, 7], np.uint64)))
    t = b.take(np.array([3, 0]))
    np.testing.assert_array_equal(t.indptr, [0, 3, 5])
    np.testing.assert_array_equal(t.values, [1, 2, 4, 1.5, 2])
    s = SparseBatch.from_ctr(
        CTRBatch(np.ones((2, 3), np.uint64), np.zeros((2, 0), np.float32), np.zeros(2, np.float32))
    )
    np.testing.assert_array_equal(s.indptr, [0, 3, 6])


def test_csv_and_parquet_give_the_same_batches(tmp_path: Path) -> None:
    import pandas as pd

    df = pd.DataFrame(
        {
            "click": [0, 1, 1, 0],
            "site": ["a", "b", "a", "c"],
            "price": [1.0, 2.5, -3.0, 0.0],
            "x": [9, 9, 9, 9],
        }
    )
    df.to_csv(tmp_path / "t.csv", index=False)
    df.to_parquet(tmp_path / "t.parquet")
    args = {"label": "click", "categorical": ["site"], "numeric": ["price"]}
    a = CTRBatch.concat(list(read_table(tmp_path / "t.csv", **args)))  # type: ignore[arg-type]
    b = CTRBatch.concat(list(read_table(tmp_path / "t.parquet", batch_rows=3, **args)))  # type: ignore[arg-type]
    np.testing.assert_array_equal(a.keys, b.keys)
    np.testing.assert_array_equal(a.dense, b.dense)
    assert a.keys.shape == (4, 2) and a.keys[0, 0] == a.keys[2, 0] != a.keys[1, 0]
    (tmp_path / "bad.csv").write_text("click,site,price,x\n1,a,1,2\n1,a\n3,a,1,1\n0,b,zz,1\n")
    with pytest.raises(DataError, match=r"bad.csv:3: expected 4 fields, found 2"):
        list(read_table(tmp_path / "bad.csv", **args))  # type: ignore[arg-type]
    bad = BadLines("skip")
    got = CTRBatch.concat(list(read_table(tmp_path / "bad.csv", bad=bad, **args)))  # type: ignore[arg-type]
    assert len(got) == 1 and bad.count == 3
    with pytest.raises(DataError, match="no column"):
        list(read_table(tmp_path / "t.csv", label="nope"))
    pd.DataFrame({"click": [0, 5], "site": ["a", "b"], "price": [1.0, 2.0]}).to_parquet(
        tmp_path / "l.parquet"
    )
    with pytest.raises(DataError, match=r"label 5\.0 is not 0 or 1"):
        list(read_table(tmp_path / "l.parquet", **args))  # type: ignore[arg-type]


def test_text_tokens_and_markup(tmp_path: Path) -> None:
    p = tmp_path / "w.xml"
    p.write_text("<page><text>The [[Cat|cats]] sat {{cite}} &amp; ran.</text></page>\nIt's OK\n")
    words = np.concatenate(list(read_text(p, markup=True)))
    assert list(words) == [b"the", b"cats", b"sat", b"ran", b"it's", b"ok"]


def test_hashing_is_deterministic_and_separates_fields() -> None:
    v = np.array([1, 2, 1], dtype=np.uint64)
    a, b = hash_field(0, v), hash_field(1, v)
    assert a[0] == a[2] and a[0] != a[1] and not set(a) & set(b)
    assert hash_field(0, v)[0] == a[0]


def test_auc_matches_sklearn() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    s = np.round(rng.random(500) + y * 0.3, 1)  # ties
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s))


def _fake_wheel(folder: Path, content: bytes) -> None:
    folder.mkdir(exist_ok=True)
    with zipfile.ZipFile(folder / "psfakedata-1.0-py3-none-any.whl", "w") as z:
        z.writestr("psfakedata/data/x.txt", content)
        z.writestr(
            "psfakedata-1.0.dist-info/METADATA",
            "Metadata-Version: 2.1\nName: psfakedata\nVersion: 1.0\n",
        )
        z.writestr(
            "psfakedata-1.0.dist-info/WHEEL",
            "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        z.writestr("psfakedata-1.0.dist-info/RECORD", "")


@pytest.mark.timeout(120)
def test_fetch_checks_pins_and_removes_a_mismatch(tmp_path: Path) -> None:
    import hashlib

    _fake_wheel(tmp_path / "index", b"hello")
    good = hashlib.sha256(b"hello").hexdigest()
    local = ["--no-index", "--find-links", str(tmp_path / "index")]
    src = Source("psfakedata", "1.0", {"psfakedata/data/x.txt": good})
    folder = fetch("fake", root=tmp_path / "cache", source=src, pip_args=local)
    assert (folder / "x.txt").read_bytes() == b"hello"
    # a damaged cached copy is fetched again
    (folder / "x.txt").write_bytes(b"tampered")
    fetch("fake", root=tmp_path / "cache", source=src, pip_args=local)
    assert (folder / "x.txt").read_bytes() == b"hello"
    # a download that does not match its pin is refused and removed
    wrong = Source("psfakedata", "1.0", {"psfakedata/data/x.txt": "0" * 64})
    with pytest.raises(DataError, match="checksum mismatch"):
        fetch("fake2", root=tmp_path / "cache", source=wrong, pip_args=local)
    assert not (tmp_path / "cache" / "fake2" / "x.txt").exists()
    with pytest.raises(DataError, match="checksum mismatch"):
        verify(folder / "x.txt", "1" * 64)
    assert not (folder / "x.txt").exists()
    with pytest.raises(DataError, match="unknown data set"):
        fetch("nope")


def test_data_dir_comes_from_ps_data_dir() -> None:
    from paramserver.config import from_env

    assert from_env({"PS_DATA_DIR": "/x/y"}).data_dir == "/x/y"
    assert from_env({}).data_dir.endswith(".cache/paramserver")
