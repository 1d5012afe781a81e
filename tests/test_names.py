"""Names that don't collide, factory arguments, and the warning for too many workers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest

from aiocluster import ConfigError
from aiocluster._appspec import AppSpec, parse_spec
from aiocluster._options import name_from

from .conftest import StartCluster
from .harness import APPS, cli
from .test_cluster import get_json

pytestmark = pytest.mark.timeout(60)

EXAMPLES = APPS.parent.parent / "examples"


def test_a_default_name_comes_from_the_program() -> None:
    assert name_from("myapp.web:app") == "myapp.web"
    assert name_from("/srv/shop/hello.py") == "hello"
    assert name_from("/srv/shop/__main__.py") == "shop"
    assert name_from("/srv/my shop!.py") == "my-shop"
    assert name_from("-c") == name_from("") == "default"


def test_factory_arguments_are_literals_never_run() -> None:
    assert parse_spec("m:app") == AppSpec("m", "app")
    assert parse_spec('pkg.m:create_app("x", debug=True)') == AppSpec(
        "pkg.m", "create_app", ("x",), {"debug": True}
    )
    assert parse_spec("m:make( [1, 2], n={'a': None}, )").kwargs == {"n": {"a": None}}
    assert parse_spec("m:ns.make()") == AppSpec("m", "ns.make", (), {})
    for spec, why in [
        ('m:make(open("/etc/passwd"))', "argument 1 (open('/etc/passwd')) is not a literal"),
        ("m:make(x=__import__('os'))", "argument x (__import__('os')) is not a literal"),
        ("m:make(**opts)", "**mappings are not allowed"),
        ("m:make(1", "not valid Python syntax"),
        ("m:make(1)(2)", "expected one call of make"),
        ("m:make(1) + 1", "expected one call of make"),
    ]:
        with pytest.raises(ConfigError) as caught:
            parse_spec(spec)
        assert why in str(caught.value) and "\n" not in str(caught.value)


async def test_a_factory_with_arguments_builds_the_app_in_each_worker(
    start_cluster: StartCluster,
) -> None:
    c = await start_cluster(
        *cli("run", 'client_app:make_app("howdy", debug=True)', "-w", "2", "-b", "127.0.0.1:0")
    )
    data = await get_json(f"{c.url}/client")
    assert (data["greeting"], data["debug"]) == ("howdy", True)
    assert await c.stop() == 0


@pytest.fixture
def runtime_dir() -> Iterator[str]:
    """One XDG_RUNTIME_DIR for several clusters: the per-user control directory they share."""
    folder = tempfile.mkdtemp(prefix="aiocluster-names-")
    os.chmod(folder, 0o700)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def control(runtime_dir: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli(*args),
        env={**os.environ, "XDG_RUNTIME_DIR": runtime_dir},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


async def test_two_programs_run_side_by_side_and_status_finds_them(
    start_cluster: StartCluster, runtime_dir: str
) -> None:
    env = {"XDG_RUNTIME_DIR": runtime_dir}
    assert "no cluster is running" in control(runtime_dir, "status").stderr
    web = await start_cluster(*cli("run", "webapp:app", "-w", "1", "-b", "127.0.0.1:0"), env=env)
    await web.wait_for(r"control socket at \S+/webapp\.sock")
    # With one cluster running, the commands find it without --name.
    one = control(runtime_dir, "status")
    assert one.returncode == 0 and one.stdout.startswith("cluster webapp "), one.stderr
    # A second program, with no --name either: its own name, no collision.
    hello = await start_cluster(
        sys.executable,
        str(EXAMPLES / "hello.py"),
        env={**env, "AIOCLUSTER_BIND": "127.0.0.1:0", "AIOCLUSTER_WORKERS": "1"},
    )
    await hello.wait_for(r"control socket at \S+/hello\.sock")
    both = control(runtime_dir, "status")
    assert both.returncode == 0, both.stderr
    assert both.stdout.startswith("2 clusters are running")
    assert "cluster hello " in both.stdout and "cluster webapp " in both.stdout
    ambiguous = control(runtime_dir, "reload")
    assert ambiguous.returncode == 2
    assert ambiguous.stderr == (
        "aiocluster: error: 2 clusters are running (hello, webapp): say which with --name\n"
    )
    named = control(runtime_dir, "status", "--name", "hello")
    assert named.returncode == 0 and named.stdout.startswith("cluster hello ")
    assert await hello.stop() == 0
    assert await web.stop() == 0


async def test_run_honours_aiocluster_name(start_cluster: StartCluster) -> None:
    c = await start_cluster(
        sys.executable,
        str(EXAMPLES / "hello.py"),
        env={
            "AIOCLUSTER_NAME": "blue",
            "AIOCLUSTER_BIND": "127.0.0.1:0",
            "AIOCLUSTER_WORKERS": "1",
        },
    )
    await c.wait_for(r"control socket at \S+/blue\.sock")
    assert c.address != "127.0.0.1:8080"  # $AIOCLUSTER_BIND, not the example's default port
    assert await c.stop() == 0


@pytest.mark.skipif(shutil.which("taskset") is None, reason="needs taskset")
async def test_more_than_four_workers_per_cpu_is_a_warning(start_cluster: StartCluster) -> None:
    # One CPU for the primary (its affinity is what it counts): 5 workers is over 4 per CPU.
    argv = ["taskset", "-c", "0", *cli("run", "bare_proto:Loaded", "--protocol")]
    c = await start_cluster(*argv, "-w", "5", "-b", "127.0.0.1:0")
    assert c.count(r"WARNING .*5 workers for 1 CPUs: more than 4 per CPU") == 1
    assert await c.stop() == 0
    d = await start_cluster(*argv, "-w", "4", "-b", "127.0.0.1:0")
    assert "per CPU" not in d.output
    assert await d.stop() == 0


def test_hello_example_takes_its_port_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import hello

    monkeypatch.delenv("PORT", raising=False)
    monkeypatch.delenv("AIOCLUSTER_BIND", raising=False)
    assert hello.port() == 8080
    monkeypatch.setenv("PORT", "9000")
    assert hello.port() == 9000
    monkeypatch.delenv("PORT")
    monkeypatch.setenv("AIOCLUSTER_BIND", "127.0.0.1:9001")
    assert hello.port() is None  # run() then listens where $AIOCLUSTER_BIND says
