"""An application that configures logging itself, at import (aiocluster must leave it be)."""

from __future__ import annotations

import logging
import sys

logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="OWNFMT %(name)s: %(message)s")

from webapp import make_app  # noqa: E402 - after the logging set-up, as apps do

app = make_app()
