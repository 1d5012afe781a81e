"""Turn a results JSON from run.py into a Markdown table and a PNG chart beside it.

    python benchmarks/report.py benchmarks/results/quick.json

The report itself is ``bench/report.py``; this is its command line.
"""

from __future__ import annotations

import sys
from pathlib import Path

from bench.report import main

if __name__ == "__main__":
    sys.exit(main([Path(arg) for arg in sys.argv[1:]]))
