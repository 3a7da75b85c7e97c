"""Every MoE family of the installed transformers lands in a known bucket, with its reason, as the README says.

The families are found by scanning the installed package (``hf_families.candidate_blocks``), not
from a list: a new transformers release brings its new families into this test by itself. Each is
built tiny and read with ``from_hf``: parity (compiled and numerically equal to the block),
inline (a decoder layer whose MoE ``optimize`` swaps on a tiny model of its family, same output),
refused (``UnsupportedBlock`` with its reason) or unbuildable (no tiny block from its configs,
with the construction error). Any other exception out of ``from_hf`` fails the test.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # the scan builds and reads every family (about a minute)

import hf_families
from test_hf_parity import FAMILIES, MODULE, REFUSED

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


@pytest.fixture(scope="module")
def results() -> list[hf_families.FamilyResult]:
    return hf_families.scan()


def _readme_section() -> str:
    m = re.search(r"^### MoE families in the installed transformers\n(.*?)(?=^#)", README, flags=re.S | re.M)
    assert m, "README lacks the section '### MoE families in the installed transformers'"
    return m.group(1)


def test_every_family_lands_in_a_bucket_with_a_reason(results) -> None:
    assert len(results) >= 40, f"the scan found only {len(results)} MoE blocks in transformers"
    for r in results:
        assert r.bucket in ("parity", "inline", "refused", "unbuildable"), r
        assert r.reason.strip(), f"{r.family} {r.block_class}: {r.bucket} without a reason"
    # Most families are read: a broken importer would refuse them all.
    parity = [r for r in results if r.bucket == "parity"]
    assert len(parity) >= len(results) // 2, hf_families.markdown(results)


def test_scan_agrees_with_the_parity_tables(results) -> None:
    """The hand-sized parity tests (test_hf_parity) and the scan agree where they meet."""
    by_family: dict[str, set[str]] = {}
    for r in results:
        by_family.setdefault(r.family, set()).add(r.bucket)
    by_block = {(r.family, r.block_class): r.bucket for r in results}
    for f, (cls_name, _) in FAMILIES.items():
        fam = MODULE.get(f, f)
        if fam in {MODULE.get(g, g) for g in REFUSED}:
            continue
        if (fam, cls_name) in by_block:  # the block the parity test reads (JetMoE's other blocks are attention)
            assert by_block[(fam, cls_name)] == "parity", (fam, cls_name)
        else:
            assert by_family.get(fam) == {"parity"}, (fam, by_family.get(fam))
    for fam in REFUSED:
        if fam in by_family:  # a family refused only in one of its layer kinds is scanned under its folder
            assert "refused" in by_family[fam], (fam, by_family[fam])


def test_readme_lists_what_is_not_read(results) -> None:
    section = _readme_section()
    for r in results:
        if r.bucket == "parity":
            assert re.search(rf"\b{re.escape(r.family)}\b", section), f"README: parity family {r.family} not named"
        else:
            row = f"| {r.family} | `{r.block_class}` | {r.bucket} |"
            assert row in section, f"README lacks the row {row!r} (regenerate with python tests/hf_families.py)"
    listed = re.findall(r"^\| (\w+) \| `(\w+)` \| (inline|refused|unbuildable) \|", section, flags=re.M)
    now = {(r.family, r.block_class, r.bucket) for r in results}
    for row in listed:
        assert row in now, f"README lists {row} but the scan finds it elsewhere; update the README"
