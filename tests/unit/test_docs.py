"""The documentation covers what the code has: every PS_* variable, every CLI command, and its
links resolve."""

from __future__ import annotations

import re
from pathlib import Path

from paramserver.config import ENV_VARS

ROOT = Path(__file__).parents[2]
DOCS = ROOT / "docs"


def test_every_env_var_is_documented_in_configuration() -> None:
    text = (DOCS / "configuration.md").read_text()
    rows = set(re.findall(r"^\| `(PS_[A-Z_]+)` \|", text, flags=re.M))
    assert set(ENV_VARS) <= rows, f"undocumented: {sorted(set(ENV_VARS) - rows)}"


def test_every_command_is_in_the_cli_reference() -> None:
    text = (DOCS / "cli.md").read_text()
    for command in ("run", "coordinator", "server", "status", "k8s manifest", "train", "demo"):
        assert f"paramserver {command}" in text


def test_doc_links_resolve() -> None:
    pages = [ROOT / "README.md", *DOCS.glob("*.md")]
    for page in pages:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            if target.startswith("../shared/"):
                continue  # outside the repository
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"
    readme = (ROOT / "README.md").read_text()
    for doc in ("quickstart", "concepts", "cli", "configuration", "operations", "performance"):
        assert f"docs/{doc}.md" in readme
