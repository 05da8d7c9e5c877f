"""The python code of the docs runs as written: every python block of README.md and docs/*.md,
and the example of ps.torch's package docstring, each in a fresh interpreter in an empty
directory. A block that cannot run alone says so on the line before it:
``<!-- not run: why -->``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.M | re.S)
SKIP = re.compile(r"<!-- not run: (.+?) -->\s*$")


def _blocks() -> tuple[list[tuple[str, str]], list[str]]:
    """(id, code) of every block to run, and the ids of the blocks marked not to run."""
    run, skipped = [], []
    for page in PAGES:
        text = page.read_text()
        for m in BLOCK.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            where = f"{page.relative_to(ROOT)}:{line}"
            before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
            if SKIP.search(before):
                skipped.append(where)
            else:
                run.append((where, m.group(1)))
    doc = (ROOT / "paramserver" / "torch" / "__init__.py").read_text()
    example = doc.split('"""', 2)[1].split("Example:\n", 1)[1]
    run.append(("paramserver/torch/__init__.py docstring", textwrap.dedent(example)))
    return run, skipped


RUN, SKIPPED = _blocks()


def test_blocks_are_found_and_counted() -> None:
    pages = {where.split(":")[0] for where, _ in RUN}
    assert {"README.md", "docs/quickstart.md", "docs/pytorch.md"} <= pages
    print(f"\n{len(RUN)} python blocks run, {len(SKIPPED)} marked not run: {SKIPPED}")


@pytest.mark.timeout(420)
@pytest.mark.parametrize(("where", "code"), RUN, ids=[w for w, _ in RUN])
def test_block_runs(where: str, code: str, tmp_path: Path) -> None:
    if "torch" in code:
        pytest.importorskip("torch")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, f"{where} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
