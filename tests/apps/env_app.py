"""A program that calls aiocluster.run(app) with no options, or only ``workers`` (argv[1]):
everything else comes from the AIOCLUSTER_* environment, as it does for the command line."""

from __future__ import annotations

import sys

from webapp import make_app

import aiocluster

if __name__ == "__main__":
    if len(sys.argv) > 1:
        aiocluster.run(make_app, workers=int(sys.argv[1]))
    else:
        aiocluster.run(make_app)
