"""The benchmark runner's command line works without a load: its package imports, ``--list``
prints the server table without wrk, bad options are refused, and the report renders.

Nothing here measures anything (benchmarks/ does, by hand); each run is a few seconds. The
runner is started as a user starts it, ``python benchmarks/run.py``, with BENCH_VENV set to
this interpreter's environment (so it does not re-execute itself elsewhere) and a PATH
without wrk.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
RUN = BENCHMARKS / "run.py"

pytestmark = pytest.mark.timeout(30)


def bench(tmp_path: Path, *args: str, cwd: Path = BENCHMARKS) -> subprocess.CompletedProcess[str]:
    """``python ARGS`` as a user runs it, with an empty PATH (no wrk, no node)."""
    empty = tmp_path / "bin"
    empty.mkdir(exist_ok=True)
    env = {**os.environ, "BENCH_VENV": sys.prefix, "PATH": str(empty)}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=25
    )


def test_list_prints_the_server_table_without_wrk(tmp_path: Path) -> None:
    done = bench(tmp_path, str(RUN), "--list", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    names = [line.split()[0] for line in done.stdout.splitlines() if not line.startswith("note")]
    # The policy rows come from `aiocluster run --help` of the venv: this one has aiocluster.
    for name in ("aiocluster-aiohttp", "aiocluster-aiohttp-rr", "gunicorn-aiohttp", "nginx"):
        assert name in names, done.stdout
    assert len(names) == len(set(names))
    assert "wrk" not in done.stderr


def test_every_measure_names_rows_of_the_table(tmp_path: Path) -> None:
    """A measure's default rows (scenarios.ROWS) are rows the table has: a typo would make a
    measure silently skip its peer."""
    code = (
        "import json; from bench import scenarios; from bench.servers import build_servers; "
        "rows, _ = build_servers(); "
        "print(json.dumps({'table': [r.name for r in rows], 'rows': scenarios.ROWS}))"
    )
    done = bench(tmp_path, "-c", code)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    for measure, names in found["rows"].items():
        missing = set(names) - set(found["table"])
        assert not missing, f"{measure}: {missing}"


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--measure", "burst,bogus"], "unknown measure bogus"),
        (["--burst-connections", "5000,x"], "not a list of positive numbers"),
    ],
)
def test_bad_options_get_a_one_line_error(tmp_path: Path, args: list[str], error: str) -> None:
    done = bench(tmp_path, str(RUN), *args)
    assert done.returncode == 2
    assert error in done.stderr
    assert "Traceback" not in done.stderr


def test_the_report_renders_every_measure(tmp_path: Path) -> None:
    """report.py turns results of the measures of events into their tables and targets."""
    run = {"connections": 5000, "rps": 1000.0, "requests": 5000, "timeouts": 3}
    run |= {"socket_errors": 0, "non_2xx": 0, "p50_ms": 1.0, "p99_ms": 9.0, "max_ms": 20.0}
    run |= {"still_answers": True}
    kill = {"victim": 1, "first_new_answer_s": 0.05, "all_answering_s": 0.06}
    kill |= {"probes": 40, "failed_probes": 0}
    reload = {"duration_s": 2.0, "old_exited_s": 2.0, "first_new_answer_s": 0.3}
    reload |= {"all_new_answering_s": 1.5, "requests": 9000, "failed": 0, "probes": 99}
    reload |= {"failed_probes": 0}

    def row(name: str, family: str = "aiocluster") -> dict[str, object]:
        return {"name": name, "family": family, "describe": name}

    results = {
        "label": "t",
        "started": "now",
        "settings": {"workers": 2, "wrk_threads": 1, "connections": 64, "replace_kills": 1},
        "machine": json.loads((BENCHMARKS / "results" / "quick.json").read_text())["machine"],
        "measures": ["burst", "replace", "reload-time", "startup-growth"],
        "notes": ["start-up growth at 32 workers skipped: a note"],
        "servers": [],
        "burst_sizes": [5000],
        "burst": [{**row("aiocluster-aiohttp"), "runs": [run]}],
        "replace": [
            {**row("aiocluster-aiohttp"), "workers": 2, "kills": [kill]}
            | {"first_new_answer_median_s": 0.05, "all_answering_median_s": 0.06},
            {**row("granian-asgi", "peer"), "skipped": "granian replaces no dead worker"},
        ],
        "reload_time": [
            {**row("aiocluster-aiohttp"), "workers": 8, "signal": "SIGHUP", "reloads": [reload]}
            | {"duration_median_s": 2.0},
            {**row("gunicorn-aiohttp", "peer"), "workers": 8, "signal": "SIGHUP"}
            | {"reloads": [reload | {"failed": 40}], "duration_median_s": 5.0},
        ],
        "growth_workers": [1, 32],
        "startup_growth": [
            {**row("aiocluster-aiohttp"), "by_workers": {"1": {"answering_median_s": 0.3}}}
        ],
    }
    path = tmp_path / "t.json"
    path.write_text(json.dumps(results))
    done = bench(tmp_path, str(BENCHMARKS / "report.py"), str(path))
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "t.md").read_text()
    assert "| aiocluster-aiohttp | 5,000 | 1,000 | 3 | 0 | 0 | 1.0 / 9.0 |" in text
    assert "| aiocluster-aiohttp | 50 (50) | 60 (60) | 0 / 40 |" in text
    assert "granian replaces no dead worker" in text
    assert "| aiocluster-aiohttp | 8 | SIGHUP | 2,000 (2,000) |" in text
    assert "| aiocluster-aiohttp | 300 | — |" in text
    assert "burst 5,000, shared: timeouts = 0: 3 — **not met**" in text
    assert "reload of 8 workers / gunicorn's HUP ≤ 0.5: 0.40 — met" in text
    assert "32 workers skipped" in text
