"""A program that calls aiocluster.run() with a Starlette application (ASGI)."""

from __future__ import annotations

import sys

from asgi_app import app

import aiocluster

if __name__ == "__main__":
    aiocluster.run(app, host="127.0.0.1", port=int(sys.argv[1]), workers=2)
