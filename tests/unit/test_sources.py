"""A user's data file cut into parts (paramserver.data.sources): the parts, read one by one,
give exactly what the whole-file readers give, and a file of the wrong kind is one clear error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from paramserver.data import CTRBatch, SyntheticCriteo, read_criteo, read_libsvm, read_table
from paramserver.data.sources import FileData, parse_data
from paramserver.errors import ConfigError, DataError

pytestmark = pytest.mark.timeout(60)


def _frame(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "label": (rng.random(n) < 0.3).astype(np.int64),
        "site": np.array([f"s{v}" for v in rng.integers(0, 50, n)], dtype=object),
        "price": np.round(rng.lognormal(0, 1, n), 3),
    }


def _all_parts(src: FileData, parts: list) -> CTRBatch:  # type: ignore[type-arg]
    return CTRBatch.concat([b for p in parts for b in src.batches(p, 100)])


def test_criteo_parts_read_what_the_whole_file_reader_reads(tmp_path: Path) -> None:
    path = SyntheticCriteo(examples=3000).write_tsv(tmp_path / "c.tsv")
    src = FileData(f"criteo:{path}", part_bytes=30_000)
    assert len(src) > 5 and len(src.test) >= 1
    want = CTRBatch.concat(list(read_criteo(path)))
    got = _all_parts(src, [*src.train, *src.test])
    np.testing.assert_array_equal(got.keys, want.keys)
    np.testing.assert_array_equal(got.y, want.y)
    assert src.train_rows + src.test_rows == 3000
    # batches are full except a part's last
    sizes = [len(b) for b in src.batches(src.train[0], 100)]
    assert all(s == 100 for s in sizes[:-1]) and 0 < sizes[-1] <= 100


def test_csv_and_parquet_parts_match_read_table(tmp_path: Path) -> None:
    import pandas as pd

    df = pd.DataFrame(_frame(2000))
    csv = tmp_path / "d.csv"
    df.to_csv(csv, index=False)
    pq = tmp_path / "d.parquet"
    df.to_parquet(pq, row_group_size=250)
    for spec, part_bytes in ((f"csv:{csv}", 2000), (f"parquet:{pq}", 0)):
        src = FileData(spec, part_bytes=part_bytes)
        assert src.columns == (["site"], ["price"])  # inferred from the first rows
        assert len(src) >= 5
        want = CTRBatch.concat(
            list(read_table(spec.split(":", 1)[1], label="label", categorical=["site"],
                            numeric=["price"]))
        )  # fmt: skip
        got = _all_parts(src, [*src.train, *src.test])
        np.testing.assert_array_equal(got.keys, want.keys)
        np.testing.assert_allclose(got.dense, want.dense)
        assert src.train_rows + src.test_rows == 2000


def test_libsvm_rows_become_fixed_width_keys(tmp_path: Path) -> None:
    path = tmp_path / "d.svm"
    path.write_text("1 3:1 7:1\n0 3:1\n1 2:1 5:1 9:0.5\n" * 400)
    src = FileData(f"libsvm:{path}", part_bytes=2000)
    src.probe()
    assert src.shape == (3, 0)
    got = _all_parts(src, [*src.train, *src.test])
    assert len(got) == 1200
    want = next(iter(read_libsvm(path)))
    # the first row's keys are its features' keys, the second's padded with a missing key
    np.testing.assert_array_equal(got.keys[0, :2], want.keys[:2])
    assert got.keys[1, 1] == got.keys[4, 1] != got.keys[0, 1]
    # a value other than 1 is folded into its key
    assert got.keys[2, 2] != want.keys[5]
    np.testing.assert_array_equal(got.y[:3], [1, 0, 1])


def test_a_file_of_the_wrong_kind_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.tsv"
    path.write_text("".join(f"{i},a,b\n" for i in range(2000)))
    src = FileData(f"criteo:{path}", part_bytes=4096)
    with pytest.raises(DataError, match=r"no valid line in .*bad.tsv; is it Criteo TSV"):
        src.probe()
    with pytest.raises(DataError, match="no such data file"):
        FileData(f"criteo:{tmp_path / 'missing.tsv'}")
    with pytest.raises(ConfigError, match="KIND:PATH"):
        parse_data("tsv:x")
