"""`make audit`'s dependency check: pip-audit over the installed packages, told plainly.

pip-audit prints "No known vulnerabilities found" and exits 0 even when it could check no package at all (no
vulnerability database reachable: PyPI's JSON API or OSV). This reads its JSON report and says how many packages
were checked and how many were not. Exit status: 1 when a checked package has a known vulnerability, else 0; a
report that checked nothing says NOT AUDITED on its first line, so nobody mistakes it for a clean bill.
Run: python tools/audit.py  (or make audit)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def summary(report: dict) -> tuple[str, int]:
    """The lines to print and the exit status for a pip-audit JSON report."""
    dependencies = report.get("dependencies", [])
    checked = [dep for dep in dependencies if "skip_reason" not in dep]
    skipped = [dep for dep in dependencies if "skip_reason" in dep]
    vulnerable = [dep for dep in checked if dep.get("vulns")]
    if checked:
        lines = [f"pip-audit: {len(checked)} of {len(dependencies)} packages checked, {len(vulnerable)} vulnerable"]
    else:
        lines = [
            f"pip-audit: NOT AUDITED: none of the {len(dependencies)} installed packages could be checked "
            "(no vulnerability database answered)"
        ]
    if skipped:
        lines.append(f"  not checked: {len(skipped)} (first: {skipped[0]['skip_reason']})")
    for dep in vulnerable:
        ids = ", ".join(vuln["id"] for vuln in dep["vulns"])
        fixed = ", ".join(sorted({v for vuln in dep["vulns"] for v in vuln.get("fix_versions", [])})) or "no release"
        lines.append(f"  {dep['name']} {dep.get('version', '')}: {ids}; fixed in {fixed}")
    return "\n".join(lines), 1 if vulnerable else 0


def main() -> int:
    pip_audit = Path(sys.executable).parent / "pip-audit"
    result = subprocess.run(  # this environment's pip-audit, fixed arguments
        [str(pip_audit), "--progress-spinner", "off", "--format", "json"], capture_output=True, text=True, check=False
    )
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError:
        print(
            f"pip-audit: NOT AUDITED: it gave no report ({(result.stderr.strip().splitlines() or ['no output'])[-1]})"
        )
        return 0 if result.returncode == 0 else 1
    text, status = summary(report)
    print(text)
    return status


if __name__ == "__main__":
    sys.exit(main())
