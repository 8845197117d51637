"""make audit's report: a check that checked nothing says so; a known vulnerability fails it."""

from __future__ import annotations

import sys

from tests.helpers import ROOT

sys.path.insert(0, str(ROOT / "tools"))
from audit import summary  # tools/ is a folder of scripts, not a package

SKIPPED = {"name": "accelerate", "skip_reason": "Dependency not found on PyPI and could not be audited: accelerate"}


def test_a_report_that_checked_nothing_says_not_audited():
    text, status = summary({"dependencies": [SKIPPED, {**SKIPPED, "name": "torch"}]})
    assert text.splitlines()[0] == (
        "pip-audit: NOT AUDITED: none of the 2 installed packages could be checked (no vulnerability database answered)"
    )
    assert "No known vulnerabilities" not in text and status == 0


def test_a_known_vulnerability_fails_the_audit_and_names_its_fix():
    vulnerable = {"name": "mlflow", "version": "3.0.0", "vulns": [{"id": "GHSA-x", "fix_versions": ["3.1.0"]}]}
    text, status = summary({"dependencies": [SKIPPED, {"name": "torch", "version": "2.13.0", "vulns": []}, vulnerable]})
    assert text.splitlines() == [
        "pip-audit: 2 of 3 packages checked, 1 vulnerable",
        f"  not checked: 1 (first: {SKIPPED['skip_reason']})",
        "  mlflow 3.0.0: GHSA-x; fixed in 3.1.0",
    ]
    assert status == 1
    assert summary({"dependencies": [{"name": "torch", "version": "2.13.0", "vulns": []}]}) == (
        "pip-audit: 1 of 1 packages checked, 0 vulnerable",
        0,
    )
