"""``--reload``: a real watcher, real file edits in a copy of an app, real rolling reloads."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import aiohttp
import pytest

from aiocluster.cli import build_parser
from aiocluster.ops.reloader import Patterns

from .conftest import StartCluster
from .harness import ClusterProcess, cli, wait_pid_gone

pytestmark = pytest.mark.timeout(90)

RELOADED = r"reload complete: 2 workers replaced"
#: Fork: the reload's new zygote fails to load; spawn: its first new worker does.
BROKEN = r"reload stopped: (the program failed to load|a new worker could not start)"


def write_app(folder: Path, version: str) -> None:
    """The app, saved as an editor does: a new file renamed over the old one."""
    source = textwrap.dedent(
        f"""
        import os
        from aiohttp import web

        VERSION = {version}

        async def hello(request: web.Request) -> web.Response:
            return web.json_response({{"version": VERSION, "pid": os.getpid()}})

        app = web.Application()
        app.router.add_get("/", hello)
        """
    )
    temporary = folder / ".reloadable.py.tmp"
    temporary.write_text(source)
    os.replace(temporary, folder / "reloadable.py")


async def versions(c: ClusterProcess, n: int = 6) -> set[str]:
    """The versions ``n`` fresh connections are answered with."""
    seen = set()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        for _ in range(n):
            async with s.get(c.url, timeout=aiohttp.ClientTimeout(total=10)) as r:
                seen.add((await r.json())["version"])
    return seen


async def reloaded(c: ClusterProcess, mark: int) -> None:
    """Wait for a reload that began after line ``mark`` to complete, and for the workers it
    replaced to exit: until then a fresh connection may still reach one that drains."""
    before = dict(c.worker_pids)
    await c.wait_for(RELOADED, start=mark)
    for worker_id, pid in before.items():
        if c.count(rf"replacing worker {worker_id} \(pid {pid}\)"):
            await wait_pid_gone(pid, 30)


@pytest.mark.parametrize("start", ["fork", "spawn"])
async def test_an_edit_reloads_a_broken_edit_keeps_the_old_workers(
    start_cluster: StartCluster, tmp_path: Path, start: str
) -> None:
    write_app(tmp_path, '"one"')
    c = await start_cluster(
        *cli("run", "reloadable:app", "-w", "2", "-b", "127.0.0.1:0", "--reload"),
        *("--start", start),
        cwd=tmp_path,
    )
    await c.wait_for(r"reload: watching .* for changes to \*\.py")
    assert await versions(c) == {"one"}

    (tmp_path / "notes.txt").write_text("not watched\n")
    write_app(tmp_path, '"two"')
    await reloaded(c, 0)
    assert await versions(c) == {"two"}
    assert c.count(r"reload: reloadable\.py changed; reloading the workers") == 1
    assert "notes.txt" not in c.output
    serving = dict(c.worker_pids)

    mark = len(c.lines)
    write_app(tmp_path, "(")  # a syntax error: the import fails
    await c.wait_for(BROKEN, start=mark)
    assert "SyntaxError" in "\n".join(c.lines[mark:])
    assert await versions(c) == {"two"}  # the old workers keep serving
    assert c.count(RELOADED) == 1

    mark = len(c.lines)
    write_app(tmp_path, '"three"')
    await reloaded(c, mark)
    assert await versions(c) == {"three"}
    assert len(c.worker_pids) > len(serving)
    assert await c.stop() == 0


async def test_a_missing_reload_dir_is_one_line_and_exit_2(
    start_cluster: StartCluster, tmp_path: Path
) -> None:
    write_app(tmp_path, '"one"')
    c = await start_cluster(
        *cli("run", "reloadable:app", "-w", "1", "-b", "127.0.0.1:0", "--reload"),
        *("--reload-dir", "nowhere"),
        cwd=tmp_path,
        ready=False,
    )
    assert await c.wait() == 2
    assert "aiocluster: error: --reload-dir nowhere: no such directory" in c.output
    assert not c.worker_pids


def test_reload_is_never_an_abbreviation() -> None:
    args = build_parser().parse_args(["run", "m:app", "--reload"])
    assert args.reload is True and not hasattr(args, "reload_batch")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "m:app", "--reload-b", "2"])


def test_patterns_choose_what_reloads(tmp_path: Path) -> None:
    p = Patterns([tmp_path], include=["*.html"], exclude=["tests/*", "build"])
    assert p.wanted(str(tmp_path / "app.py"))
    assert p.wanted(str(tmp_path / "pkg" / "mod.py"))
    assert p.wanted(str(tmp_path / "templates" / "index.html"))
    assert not p.wanted(str(tmp_path / "notes.txt"))
    assert not p.wanted(str(tmp_path / ".app.py.swp"))
    assert not p.wanted(str(tmp_path / ".hidden" / "x.py"))
    assert not p.wanted(str(tmp_path / "tests" / "test_x.py"))
    assert not p.wanted(str(tmp_path / "build" / "lib" / "x.py"))
