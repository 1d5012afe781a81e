"""What the results record about the machine: CPU, memory, kernel, every program's version."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

from .config import NODE, REPO


def run_output(argv: list[str]) -> str:
    """What ``argv`` prints (stdout and stderr), or "not found" if it cannot run."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    return (proc.stdout + proc.stderr).strip()


def machine() -> dict[str, Any]:
    """The machine line of the results: cores, CPU, memory, kernel, versions, git."""
    from importlib import metadata

    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for dist in (
        "aiocluster",
        "aiohttp",
        "uvloop",
        "gunicorn",
        "uvicorn",
        "httptools",
        "websockets",
        "granian",
    ):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    versions["node"] = run_output([NODE, "--version"])
    versions["nginx"] = run_output(["nginx", "-v"]).removeprefix("nginx version: ")
    wrk_text = run_output(["wrk", "--version"])
    found = re.search(r"wrk (\S+)", wrk_text)
    versions["wrk"] = found.group(1) if found else wrk_text.splitlines()[0] if wrk_text else "?"
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "versions": versions,
        "git": run_output(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
    }
