"""coremltools' own weight-compression tests, run on milsparse's drop-in functions
(tests/conformance/ct_dropin.py): every test passes except the deliberate differences listed,
with their reasons, in docs/coremltools-dropin.md; and every listed one does differ (the list
cannot go stale)."""

import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="coremltools' tests convert torch models")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "conformance"))
import outcomes  # noqa: E402


def _documented() -> set[str]:
    page = (ROOT / "docs" / "coremltools-dropin.md").read_text()
    table = page.split("<!-- conformance-differences -->")[1].split("<!-- /")[0]
    return set(re.findall(r"^\| `([^`]+)` \|", table, re.M))


def test_coremltools_own_tests_pass_on_the_drop_in_but_the_documented_differences():
    if not outcomes.test_file().exists():
        pytest.fail(f"coremltools' tests are not installed at {outcomes.test_file()}")
    results = outcomes.run()
    failed = {t for t, outcome in results.items() if outcome == "failed"}
    passed = sum(outcome == "passed" for outcome in results.values())
    documented = _documented()
    assert documented and len(results) > 250  # the classes were collected
    assert failed - documented == set(), "failures not listed in docs/coremltools-dropin.md"
    assert documented - failed == set(), "listed as different, but it passes (or is gone)"
    assert passed / (passed + len(failed)) >= 0.95
