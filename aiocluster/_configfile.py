"""Reading a TOML config file: ``-c FILE``, ``$AIOCLUSTER_CONFIG``, or ``./pyproject.toml``.

Only the reading is here (what the file says, or a one-line :class:`ConfigError` saying why it
cannot be read); :func:`aiocluster._options.config_file` checks the keys against the option
table and makes the file one layer of the settings. Standard library only: every role loads it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiocluster._errors import ConfigError

__all__ = ["PYPROJECT", "FileTable", "read_table"]

#: Read, when no file is named, for its ``[tool.aiocluster]`` table (from the current directory).
PYPROJECT = "pyproject.toml"


@dataclass(frozen=True, slots=True)
class FileTable:
    """The options a file gives: ``path`` as named, and the table of ``key = value`` lines."""

    path: str
    values: Mapping[str, Any]


def read_table(path: str | None) -> FileTable | None:
    """The option table of ``path``, or of ``./pyproject.toml`` when ``path`` is None.

    A named file must exist and be valid TOML; its options are its top-level keys (or, for a
    ``pyproject.toml``, its ``[tool.aiocluster]`` table). ``./pyproject.toml`` is optional, and
    gives nothing without a ``[tool.aiocluster]`` table.
    """
    named = path is not None
    if path is None:
        path = PYPROJECT
        if not os.path.isfile(path):
            return None
    import tomllib  # here: most starts read no file, and the parser is ~6 ms of start-up

    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except OSError as err:
        raise ConfigError(f"cannot read the config file {path}: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path} is not valid TOML: {err}") from None
    if os.path.basename(path) == PYPROJECT:
        table = document.get("tool", {}).get("aiocluster")
        if table is None:
            if named:
                raise ConfigError(f"{path} has no [tool.aiocluster] table")
            return None
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: tool.aiocluster must be a table of options")
        return FileTable(path, table)
    return FileTable(path, document)
