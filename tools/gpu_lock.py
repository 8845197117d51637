"""Write infra/requirements-gpu.lock.

The CUDA build of torch and what it needs beyond requirements.lock, each pinned with its hash, for the image's
Python (infra/Dockerfile installs it with --require-hashes).

pip resolves torch for the image's platform without installing anything (`pip install --dry-run --report`), and
the report gives each file's sha256. Needs PyPI; `make lock-gpu` runs it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK, GPU_LOCK = ROOT / "requirements.lock", ROOT / "infra/requirements-gpu.lock"
IMAGE_PYTHON = "3.11"  # the Dockerfile's base image (python:3.11-slim-bookworm), as requirements.lock's
# Every manylinux tag up to the base image's glibc (Debian 12: 2.36): pip matches a platform tag exactly.
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(5, 37)]
PLATFORMS += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64", "any"]


def torch_pin() -> str:
    return re.search(r"^TORCH := (\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)


def resolve(requirement: str) -> list[dict]:
    """What pip would install for requirement on the image's platform, from its report."""
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "report.json"
        platforms = [option for tag in PLATFORMS for option in ("--platform", tag)]
        command = [
            sys.executable, "-m", "pip", "install", "--isolated", "--dry-run", "--ignore-installed", "--quiet",
            "--report", str(report), "--index-url", "https://pypi.org/simple", "--python-version", IMAGE_PYTHON,
            "--implementation", "cp", "--only-binary", ":all:", "--target", str(Path(scratch) / "target"),
            *platforms, requirement,
        ]  # fmt: skip
        subprocess.run(command, check=True, env={"PIP_CACHE_DIR": str(Path(scratch) / "cache"), "PATH": ""})
        return json.loads(report.read_text())["install"]


def main() -> None:
    locked = {name.lower().replace("_", "-") for name in re.findall(r"^([\w.-]+)==", LOCK.read_text(), re.M)}
    lines = [f"# Written by tools/gpu_lock.py for Python {IMAGE_PYTHON} on x86_64: {torch_pin()} (CUDA) and what it",
             "# needs beyond requirements.lock, with their hashes. Refresh: make lock-gpu."]  # fmt: skip
    for item in sorted(resolve(torch_pin()), key=lambda item: item["metadata"]["name"].lower()):
        name, version = item["metadata"]["name"], item["metadata"]["version"]
        if name.lower().replace("_", "-") in locked - {"torch"}:
            continue  # requirements.lock has it (its version, its hashes)
        digest = item["download_info"]["archive_info"]["hashes"]["sha256"]
        lines.append(f"{name}=={version} \\\n    --hash=sha256:{digest}")
    GPU_LOCK.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"{GPU_LOCK.relative_to(ROOT)}: {len(lines) - 2} packages")


if __name__ == "__main__":
    main()
