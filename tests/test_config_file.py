"""The config file: ``-c FILE`` (TOML), ``$AIOCLUSTER_CONFIG``, ``[tool.aiocluster]`` in
./pyproject.toml; below the command line and the environment; errors name file and key."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from aiocluster import ClusterConfig, ConfigError
from aiocluster._options import OPTIONS, Settings, run_settings
from aiocluster.cli import build_parser, command_settings

from .conftest import StartCluster
from .harness import APPS, cli

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for opt in OPTIONS:
        if opt.env is not None:
            monkeypatch.delenv(opt.env, raising=False)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def settings_of(*args: str, env: dict[str, str] | None = None) -> Settings:
    return command_settings(build_parser().parse_args(["run", "mod:app", *args]), env or {})


def test_precedence_command_line_environment_file_default(tmp_path: Path) -> None:
    file = write(
        tmp_path / "cluster.toml",
        'workers = 3\ntimeout = 5\ngraceful-timeout = 7\npolicy = "rr"\nsticky = true\n'
        'bind = ["127.0.0.1:9001", "unix:/tmp/x.sock"]\n',
    )
    s = command_settings(
        build_parser().parse_args(["run", "mod:app", "-c", str(file), "-w", "2"]),
        {"AIOCLUSTER_WORKERS": "4", "AIOCLUSTER_TIMEOUT": "6"},
    )
    assert (s["workers"], s["timeout"], s["graceful_timeout"], s["backlog"]) == (2, 6.0, 7.0, 2048)
    assert (s.origins["workers"], s.origins["timeout"]) == ("command line", "environment")
    assert s.origins["graceful_timeout"] == "config file"
    assert s.sources["graceful_timeout"] == f"config file {file}"
    assert s.origins["backlog"] == "default"
    config = ClusterConfig.from_settings(s)
    assert (config.policy, config.sticky) == ("rr", True)
    assert [str(a) for a in config.binds] == ["127.0.0.1:9001", "unix:/tmp/x.sock"]


def test_pyproject_tool_table_when_no_file_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert ClusterConfig.build().workers != 5  # nothing there yet
    write(tmp_path / "pyproject.toml", '[project]\nname = "x"\n')
    assert ClusterConfig.build().backlog == 2048  # no [tool.aiocluster]: no options
    write(
        tmp_path / "pyproject.toml",
        '[project]\nname = "x"\n[tool.aiocluster]\nworkers = 5\nlog_level = "warning"\n',
    )
    assert ClusterConfig.build().workers == 5  # the Python API reads it as the CLI does
    assert run_settings()["log_level"] == "warning"
    assert ClusterConfig.build(workers=1).workers == 1
    monkeypatch.setenv("AIOCLUSTER_WORKERS", "6")
    assert ClusterConfig.build().workers == 6
    # A named file replaces pyproject.toml.
    other = write(tmp_path / "other.toml", "backlog = 64\n")
    monkeypatch.setenv("AIOCLUSTER_CONFIG", str(other))
    config = ClusterConfig.build()
    assert (config.backlog, config.workers) == (64, 6)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("wrokers = 2\n", "unknown key 'wrokers'; did you mean 'workers'?"),
        ("workers = true\n", "workers = True: must be a whole number, not True"),
        ("workers = 0\n", "workers = 0: must be at least 1, not 0"),
        ('policy = "fast"\n', "policy = 'fast': must be one of shared, rr, reuseport"),
        ("sticky = 2\n", "sticky = 2: expected 1/0, true/false"),
        ("bind = 8000\n", "bind = 8000: must be HOST:PORT or unix:PATH, not 8000"),
        ("port = 8000\n", "'port' is a keyword of the Python API only (use bind)"),
        ('config = "x.toml"\n', "a config file cannot name another one"),
        ("workers = [\n", "is not valid TOML"),
    ],
)
def test_a_bad_file_names_the_file_the_key_and_what_is_allowed(
    tmp_path: Path, text: str, message: str
) -> None:
    file = write(tmp_path / "bad.toml", text)
    with pytest.raises(ConfigError) as caught:
        settings_of("-c", str(file))
    assert str(caught.value).startswith(str(file))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_the_command_says_one_line_and_exits_2(tmp_path: Path) -> None:
    file = write(tmp_path / "bad.toml", "workers = -1\n")
    for args, message in [
        (["-c", str(file)], f"aiocluster: error: {file}: workers = -1: must be at least 1"),
        (["-c", str(tmp_path / "none.toml")], "aiocluster: error: cannot read the config file"),
    ]:
        proc = subprocess.run(
            cli("run", "webapp:app", *args),
            cwd=APPS,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert proc.returncode == 2
        assert proc.stderr.startswith(message) and proc.stderr.count("\n") == 1, proc.stderr


def test_print_config_says_where_each_value_came_from_and_is_a_config_file(
    tmp_path: Path,
) -> None:
    file = write(tmp_path / "cluster.toml", "graceful_timeout = 5\nbacklog = 64\n")
    proc = subprocess.run(
        cli("run", "webapp:app", "--print-config", "-c", str(file), "-w", "2"),
        cwd=APPS,
        env={"PATH": "/usr/bin:/bin", "AIOCLUSTER_TIMEOUT": "9"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = {line.split(" = ")[0]: line for line in proc.stdout.splitlines()}
    assert lines["workers"].split() == ["workers", "=", "2", "#", "command", "line"]
    assert lines["timeout"].split() == ["timeout", "=", "9.0", "#", "environment"]
    assert lines["graceful_timeout"].endswith(f"# config file {file}")
    assert lines["name"].split() == ["name", "=", '"webapp"', "#", "default", "(APP)"]
    assert lines["bind"].split()[:3] == ["bind", "=", '["127.0.0.1:8000"]']
    # The output is TOML that, as a config file, gives the same settings.
    printed = tomllib.loads(proc.stdout)
    assert (printed["workers"], printed["backlog"], printed["timeout"]) == (2, 64, 9.0)
    again = write(tmp_path / "printed.toml", proc.stdout)
    s = settings_of("-c", str(again))
    assert (s["workers"], s["backlog"], s["timeout"], s["graceful_timeout"]) == (2, 64, 9.0, 5.0)


async def test_a_cluster_runs_from_its_config_file(
    start_cluster: StartCluster, tmp_path: Path
) -> None:
    file = write(
        tmp_path / "cluster.toml", 'workers = 2\nbind = "127.0.0.1:0"\nname = "from-file"\n'
    )
    c = await start_cluster(*cli("run", "webapp:app", "--config", str(file)))
    assert len(c.worker_pids) == 2
    await c.wait_for(r"control socket at \S+/from-file\.sock")
    assert await c.stop() == 0
    # aiocluster.run() honours AIOCLUSTER_CONFIG as the command line does.
    d = await start_cluster(sys.executable, "env_app.py", env={"AIOCLUSTER_CONFIG": str(file)})
    assert len(d.worker_pids) == 2
    assert await d.stop() == 0
