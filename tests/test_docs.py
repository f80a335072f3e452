"""The documentation stays whole: no merge left its conflict markers behind, and every
relative link in the README and docs/ leads to a file that exists."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

MARKER = re.compile(r"^(<{7} |={7}$|>{7} )", re.MULTILINE)
LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")


def tracked_text_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "ls-files", "-z"], capture_output=True, check=False
    )
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout: {listed.stderr.decode(errors='replace').strip()}")
    files = []
    for name in listed.stdout.decode().split("\0"):
        path = REPO_ROOT / name
        if name and path.suffix in {".md", ".py", ".rs", ".toml", ".yaml", ".yml", ".txt"}:
            files.append(path)
    return files


def test_no_conflict_markers_were_committed() -> None:
    found = [
        f"{path.relative_to(REPO_ROOT)}:{text.count(chr(10), 0, m.start()) + 1}"
        for path in tracked_text_files()
        if path.is_file()
        for text in [path.read_text(errors="replace")]
        for m in MARKER.finditer(text)
    ]
    assert not found, f"merge conflict markers in: {', '.join(found)}"


@pytest.mark.parametrize(
    "doc",
    [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))],
    ids=lambda p: p.name,
)
def test_relative_links_lead_somewhere(doc: Path) -> None:
    broken = [
        target
        for target in LINK.findall(doc.read_text())
        if "://" not in target
        and not target.startswith("mailto:")
        and not (doc.parent / target).exists()
    ]
    assert not broken, f"{doc.name} links to missing files: {broken}"


ARCHITECTURE = REPO_ROOT / "docs" / "architecture.md"
PACKAGE_ROOT = REPO_ROOT / "python"
# A row of the glossary: | name | module | role |
GLOSSARY_ROW = re.compile(r"^\|[^|]+\|([^|]+)\|[^|]+\|$", re.MULTILINE)
NAMED = re.compile(r"`([^`]+)`")


def glossary_paths() -> list[str]:
    text = ARCHITECTURE.read_text()
    glossary = text[text.index("## Glossary") :]
    end = glossary.find("\n## ", 1)
    glossary = glossary if end == -1 else glossary[:end]
    return [
        name
        for column in GLOSSARY_ROW.findall(glossary)
        for name in NAMED.findall(column)
        if name.startswith(("tartarus", "rust/"))
    ]


def python_packages() -> list[str]:
    return sorted(
        ".".join(init.parent.relative_to(PACKAGE_ROOT).parts)
        for init in (PACKAGE_ROOT / "tartarus").rglob("__init__.py")
        if "__pycache__" not in init.parts
    )


def module_exists(dotted: str) -> bool:
    path = PACKAGE_ROOT.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def test_every_module_the_glossary_names_exists() -> None:
    names = glossary_paths()
    assert names, "docs/architecture.md has no glossary rows naming modules"
    missing = [
        name
        for name in names
        if not ((REPO_ROOT / name).exists() if name.startswith("rust/") else module_exists(name))
    ]
    assert not missing, f"the glossary names modules that do not exist: {missing}"


def test_every_package_has_its_glossary_entry() -> None:
    named = set(glossary_paths())
    absent = [package for package in python_packages() if package not in named]
    assert not absent, f"packages without a row in the glossary: {absent}"
