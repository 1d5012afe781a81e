"""The tree shows the roles: which process runs a module, and what it may import.

- ``aiocluster/wire/``: every process; imports nothing of the other subpackages, nor aiohttp.
- ``aiocluster/worker/`` and ``aiocluster/_zygote.py``: workers and the zygote; never import
  ``primary/`` or ``ops/``, not even lazily inside a function.
- ``aiocluster/primary/``: the primary; never imports ``worker/`` or ``ops/``.
- ``aiocluster/ops/``: around a running primary; may import ``primary/``.
- top-level modules are shared (config, errors, logging, role); only the entry points
  (``_entry.py``, ``cli.py``) reach ``primary/``/``ops/``, inside the functions that run in the
  primary.

Checked twice: statically over every import statement, and in a live worker's ``sys.modules``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import StartCluster
from .harness import cli
from .test_cluster import get_json

PACKAGE = Path(__file__).resolve().parent.parent / "aiocluster"

#: Subpackage (or top-level module) -> what it may never import, at any depth.
FORBIDDEN = {
    "wire": ("aiocluster.primary", "aiocluster.worker", "aiocluster.ops", "aiohttp"),
    "worker": ("aiocluster.primary", "aiocluster.ops"),
    "_zygote": ("aiocluster.primary", "aiocluster.ops", "aiocluster.worker", "aiohttp"),
    "_role": ("aiocluster.",),
    "primary": ("aiocluster.worker", "aiocluster.ops"),
}
#: Top-level modules every role loads: they may not load a role's modules at import time.
SHARED = (
    "_config",
    "_configfile",
    "_options",
    "_errors",
    "_kinds",
    "_logging",
    "_appspec",
    "_role",
    "_tls",
    "_zygote",
    "_process",
    "_title",
    "web",
)


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, *, top_level_only: bool) -> Iterator[str]:
    """Every module ``path`` imports (absolute names); only those run at import if asked."""
    tree = ast.parse(path.read_text(), str(path))
    package: str | None = None
    if path.is_relative_to(PACKAGE):
        name = module_name(path)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]

    def walk(node: ast.AST, nested: bool) -> Iterator[str]:
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                inner = True  # never runs
            if isinstance(child, ast.Import) and not (top_level_only and nested):
                yield from (alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and not (top_level_only and nested):
                base = child.module or ""
                if child.level:
                    assert package is not None, f"{path}: relative import in a package root"
                    up = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*up, base] if base else up)
                yield base
                yield from (f"{base}.{alias.name}" for alias in child.names)
            yield from walk(child, inner)

    yield from walk(tree, False)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def role_of(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_module_is_in_a_role_folder_or_a_known_top_level_module() -> None:
    top_level = {"aiocluster", "aiocluster.__main__", "aiocluster.cli", "aiocluster._entry"}
    top_level |= {f"aiocluster.{name}" for name in SHARED}
    for name in modules():
        if role_of(name) not in ("wire", "worker", "primary", "ops"):
            assert name in top_level, f"{name}: put it in wire/, worker/, primary/ or ops/"


def violations(role: str, path: Path) -> list[str]:
    """The imports of ``path`` that code of ``role`` may not make."""
    found = []
    for target in imports(path, top_level_only=False):
        for banned in FORBIDDEN[role]:
            if banned.endswith("."):
                hit = target.startswith(banned)
            else:
                hit = target == banned or target.startswith(banned + ".")
            if hit:
                found.append(f"{target} (no {banned} in {role})")
    return found


@pytest.mark.parametrize("role", sorted(FORBIDDEN))
def test_a_role_never_imports_what_it_must_not(role: str) -> None:
    checked = [(name, path) for name, path in modules().items() if role_of(name) == role]
    assert checked, f"no module found for {role}"
    bad = {name: v for name, path in checked if (v := violations(role, path))}
    assert not bad, bad


def test_what_a_worker_loads_at_import_never_reaches_the_primary() -> None:
    """The closure of import-time imports from worker/, the zygote and the shared modules."""
    table = modules()
    start = [n for n in table if role_of(n) in ("worker", "wire")]
    start += [f"aiocluster.{name}" for name in SHARED]
    seen: set[str] = set()
    path_to: dict[str, str] = {}
    todo = list(start)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for target in imports(table[name], top_level_only=True):
            if target in table and target not in seen:
                path_to.setdefault(target, name)
                todo.append(target)
    reached = sorted(n for n in seen if role_of(n) in ("primary", "ops"))
    assert not reached, {n: f"imported by {path_to.get(n)}" for n in reached}


def test_the_checker_sees_a_forbidden_import(tmp_path: Path) -> None:
    """The static check above catches a lazy import inside a function: it can fail."""
    fake = tmp_path / "sample.py"
    fake.write_text(
        "import typing\nif typing.TYPE_CHECKING:\n    from aiocluster.ops import admin\n"
        "def f():\n    from aiocluster.primary.cluster import Cluster\n"
    )
    assert violations("worker", fake) == [
        "aiocluster.ops (no aiocluster.ops in worker)",
        "aiocluster.ops.admin (no aiocluster.ops in worker)",
        "aiocluster.primary.cluster (no aiocluster.primary in worker)",
        "aiocluster.primary.cluster.Cluster (no aiocluster.primary in worker)",
    ]
    assert set(imports(fake, top_level_only=True)) == {"typing"}


@pytest.mark.parametrize("start", ["fork", "spawn"])
async def test_a_live_worker_has_loaded_nothing_of_the_primary(
    start_cluster: StartCluster, start: str
) -> None:
    if start == "fork" and sys.platform != "linux":
        pytest.skip("start method fork is Linux-only")
    c = await start_cluster(
        *cli("run", "webapp:app", "-w", "1", "-b", "127.0.0.1:0", "--start", start)
    )
    answer = await get_json(f"{c.url}/modules")
    loaded = answer["modules"]
    assert isinstance(loaded, list)
    assert "aiocluster.worker.link" in loaded  # it is a worker, and the list is real
    leaked = [m for m in loaded if role_of(m) in ("primary", "ops")]
    assert not leaked, f"a {start} worker loaded the primary's modules: {leaked}"


#: What the primary needs for none of its work unless an option asks (prometheus_client: the
#: admin endpoint's scrape) or never (aiohttp, uvicorn: the application's), so its start-up,
#: which runs beside the zygote's load of the application, does not pay for them.
NOT_IN_THE_PRIMARY = ("aiohttp", "prometheus_client", "uvicorn", "yarl", "multidict")


def test_the_primarys_start_imports_neither_aiohttp_nor_prometheus() -> None:
    """The import-time closure of what ``aiocluster run`` loads in the primary."""
    code = (
        "import sys, aiocluster.cli, aiocluster._entry, aiocluster.ops.operations, "
        "aiocluster.primary.cluster, aiocluster.primary.upgrade\n"
        f"print(sorted(m for m in {NOT_IN_THE_PRIMARY!r} if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


def mapped_files(pid: int) -> str:
    """``/proc/PID/maps``: every file the process has mapped (extension modules among them)."""
    return Path(f"/proc/{pid}/maps").read_text()


async def test_a_live_primary_has_not_loaded_aiohttp(start_cluster: StartCluster) -> None:
    """aiohttp and its parts load C extensions: a primary that imported them maps their files."""
    c = await start_cluster(*cli("run", "webapp:app", "-w", "1", "-b", "127.0.0.1:0"))
    assert c.proc is not None
    answer = await get_json(f"{c.url}/probe")  # a worker serves: the cluster is up
    assert isinstance(answer["pid"], int)
    assert "/aiohttp/" in mapped_files(answer["pid"])  # the check sees aiohttp where it is
    primary = mapped_files(c.proc.pid)
    leaked = sorted(m for m in ("/aiohttp/", "/multidict/", "/yarl/") if m in primary)
    assert not leaked, f"the primary mapped {leaked}"
