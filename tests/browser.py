"""A real browser for the tests that check a page draws: Debian's Chromium, headless and offline."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def chromium(page: Path, out: Path) -> tuple[str, Path]:
    """(the DOM as Chromium parsed it, a screenshot). Network off: a page that needs a CDN draws nothing."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "no chromium on PATH: make test installs it (tools/system-packages)"
    flags = [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1200,1600",
        "--disable-background-networking", "--disable-component-update", "--no-first-run",
        "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=<-loopback>",  # every request outside fails
    ]  # fmt: skip
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    png = out / f"{page.stem}.png"
    subprocess.run([*flags, f"--screenshot={png}", page.as_uri()], capture_output=True, timeout=120, check=True)
    return dom, png


def pixels_near(png: Path, colour: str, tolerance: int = 40) -> int:
    """How many pixels of the screenshot are within tolerance of colour (#rrggbb)."""
    from PIL import Image

    target = tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))
    image = Image.open(png).convert("RGB")
    return sum(all(abs(a - b) <= tolerance for a, b in zip(p, target, strict=True)) for p in image.getdata())
