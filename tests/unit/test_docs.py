"""The front door and the site: a README a newcomer reads in minutes, without history, and a documentation site
that builds strictly and draws in a browser, offline."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.browser import chromium, pixels_near
from tests.helpers import ROOT

MATERIAL_HEADER = "#4051b5"  # Material for MkDocs' default primary colour (indigo)


def test_the_readme_is_short_and_holds_no_history():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 220
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", text), "a date: history lives in git"
    assert not re.search(r"randomly-seed|\bseed \d{3,}", text), "a test seed"
    commits = set(subprocess.run(["git", "rev-list", "--all"], cwd=ROOT, capture_output=True, text=True).stdout.split())
    hexes = set(re.findall(r"\b[0-9a-f]{7,40}\b", text))
    assert not {h for h in hexes if any(commit.startswith(h) for commit in commits)}, "a commit hash"
    for link in re.findall(r"\]\(((?:docs|infra)/[^)#]+)", text):
        assert (ROOT / link).exists(), link


def test_the_site_builds_strictly_and_its_pages_draw_offline(tmp_path):
    site = tmp_path / "site"
    build = [str(Path(sys.executable).parent / "mkdocs"), "build", "--strict", "--quiet", "--site-dir", str(site)]
    result = subprocess.run(
        build, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    home, reference = site / "index.html", site / "reference/params/index.html"
    for page in (home, reference):
        assert not re.search(r'(src|href)="https?://(?!127\.0\.0\.1)[^"]*\.(js|css)', page.read_text()), page
    dom, png = chromium(home, tmp_path)
    assert "ingest → tokenize → train → evaluate → register" in dom and pixels_near(png, MATERIAL_HEADER) > 5000
    dom, png = chromium(reference, tmp_path)
    assert "<code>train.learning_rate</code>" in dom and pixels_near(png, MATERIAL_HEADER) > 5000
