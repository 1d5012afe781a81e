"""``python -m aiocluster.ops.upgrade_check``: the pre-flight of an in-place upgrade of the primary.

Run by the primary (:mod:`aiocluster.primary.upgrade`) with its own interpreter, environment
and directory, the state document on stdin. It proves the code installed now can take over:
every module of the package compiles, the modules the primary runs import, and the document
loads with this code's reader (format, version, every field, the configuration through this
code's option table). Prints the new version and exits 0; otherwise one line on stderr and
exit status 1.
"""

from __future__ import annotations

import importlib
import os
import sys

#: What the new image of the primary imports before it can resume.
_PRIMARY_MODULES = (
    "aiocluster.cli",
    "aiocluster._entry",
    "aiocluster.primary.cluster",
    "aiocluster.primary.upgrade",
    "aiocluster.ops.operations",
    "aiocluster.ops.control",
)


def _compile_package(root: str) -> None:
    """Compile every module of the package: a syntax error anywhere is found now, not when a
    worker or the primary first imports that module."""
    for folder, _, files in os.walk(root):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path, "rb") as f:
                    compile(f.read(), path, "exec", dont_inherit=True)


def main() -> int:
    """The check; the exit status."""
    try:
        document = sys.stdin.buffer.read()
        import aiocluster

        _compile_package(os.path.dirname(os.path.abspath(aiocluster.__file__)))
        for module in _PRIMARY_MODULES:
            importlib.import_module(module)
        from aiocluster.primary.upgrade_state import load, load_config

        load_config(load(document).config)
    except SyntaxError as err:
        sys.stderr.write(f"aiocluster: error: {err.filename}:{err.lineno}: {err.msg}\n")
        return 1
    except Exception as err:
        sys.stderr.write(f"aiocluster: error: {type(err).__name__}: {err}\n")
        return 1
    sys.stdout.write(f"{aiocluster.__version__}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
