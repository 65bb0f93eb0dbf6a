"""CITATION.cff: the CFF 1.2.0 keys GitHub and Zenodo need, the package's own version and
licence, and the TesticulUS paper's authors as the paper lists them."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

import tus

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT.parent / "shared" / "reference" / "paper-miccai-testiculus.md"
# CFF 1.2.0's required keys: of the file, of a person or entity author, of a reference.
REQUIRED = {"cff-version", "message", "title", "authors"}
REFERENCE_REQUIRED = {"type", "title", "authors"}


@pytest.fixture(scope="module")
def citation() -> dict:
    return yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))


def is_author(entry: dict) -> bool:
    return bool(entry.get("family-names") or entry.get("name"))


def test_cff_1_2_0_required_keys(citation):
    assert citation["cff-version"] == "1.2.0"
    assert REQUIRED <= set(citation) and citation["type"] == "software"
    assert citation["authors"] and all(is_author(a) for a in citation["authors"])
    for reference in citation["references"]:
        assert REFERENCE_REQUIRED <= set(reference)
        assert all(is_author(a) for a in reference["authors"])
        assert re.fullmatch(r"[A-Z]{2}", reference["conference"]["country"])  # ISO 3166-1 alpha-2
        assert isinstance(reference["year"], int)


def test_version_and_licence_are_the_packages(citation):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert citation["version"] == project["version"] == tus.__version__
    assert citation["license"] == "MIT" and (ROOT / "LICENSE").read_text().startswith("MIT License")


def test_paper_authors_as_the_paper_lists_them(citation):
    if not PAPER.is_file():
        pytest.skip(f"{PAPER} not present")
    paper = next(r for r in citation["references"] if r["type"] == "conference-paper")
    assert paper["title"] in PAPER.read_text(encoding="utf-8")
    byline = " ".join(PAPER.read_text(encoding="utf-8").split("University of Modena")[0].split("\n")[3:]).replace("✉", "")
    listed = [name.strip() for name in re.split(r",|\band\b", byline) if name.strip()]
    assert [f"{a['given-names']} {a['family-names']}" for a in paper["authors"]] == listed
