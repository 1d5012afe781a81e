"""An application module that raises while it is imported."""

from __future__ import annotations

raise RuntimeError("this module cannot be imported")
