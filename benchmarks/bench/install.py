"""``--setup`` (the benchmark venv with every row's dependencies, wrk and nginx) and the
checkout's install into that venv at every run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from .config import HERE, NODE, REPO, VENV, say
from .machine import run_output

#: The checkout's extras the rows need: ``asgi`` for the aiocluster-asgi rows.
EXTRAS = "asgi"


def setup() -> int:
    """Make the benchmark venv with every dependency of every row, and install wrk and nginx
    from the distribution."""
    if not (VENV / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(VENV / "bin" / "pip"), "install", "-q"]
    subprocess.run([*pip, "-r", str(HERE / "requirements.txt")], check=True)
    # The checkout's own dependencies and extras (aiohttp, prometheus-client, uvicorn...): the
    # reinstall at every run below is --no-deps.
    subprocess.run([*pip, f"{REPO}[{EXTRAS}]"], check=True)
    install_checkout()
    missing = [tool for tool in ("wrk", "nginx") if not shutil.which(tool)]
    if missing:
        if os.geteuid() == 0 and shutil.which("apt-get"):
            subprocess.run(["apt-get", "update", "-q"], check=True)
            subprocess.run(["apt-get", "install", "-y", "-q", *missing], check=True)
        else:
            print(f"install {' '.join(missing)}: sudo apt-get install -y {' '.join(missing)}")
            return 1
    if not Path(NODE).exists():
        print("Node.js not found: the node rows will be skipped (apt-get install -y nodejs)")
    print(f"ready: {VENV}")
    return 0


def install_checkout() -> str:
    """Install this checkout into the venv as users install a release: not editable.

    An editable install adds a finder to every interpreter's start (``site`` imports it, and
    pathlib with it: ~20 ms of each start to first answer here), which no peer pays and no
    user's deployment has. Done at every run, so the servers run the checkout as it is now.
    """
    described = run_output(["git", "-C", str(REPO), "describe", "--always", "--dirty"])
    say(f"installing aiocluster {described} from {REPO} into {VENV} (not editable)")
    pip = [str(VENV / "bin" / "pip"), "install", "-q", "--no-deps", "--force-reinstall"]
    subprocess.run([*pip, str(REPO)], check=True)
    # --no-deps keeps the reinstall quick; a dependency the checkout gained since --setup is
    # installed now (``pip check`` names what the installed aiocluster lacks).
    check = subprocess.run(
        [str(VENV / "bin" / "pip"), "check"], capture_output=True, text=True, check=False
    )
    if any(line.startswith("aiocluster ") for line in check.stdout.splitlines()):
        say(f"installing the checkout's missing dependencies:\n{check.stdout.strip()}")
        subprocess.run(
            [str(VENV / "bin" / "pip"), "install", "-q", f"{REPO}[{EXTRAS}]"], check=True
        )
    return described


def reexec_in_venv(script: Path) -> None:
    """Run ``script`` again under the benchmark venv's Python (psutil, matplotlib, the servers
    live there), unless this is that Python or the venv does not exist."""
    python = VENV / "bin" / "python"
    if Path(sys.prefix).resolve() == VENV.resolve() or not python.exists():
        return
    os.execv(str(python), [str(python), str(script.resolve()), *sys.argv[1:]])
