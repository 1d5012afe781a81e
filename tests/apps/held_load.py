"""webapp's application, whose import waits for the test while the file named in $HOLD exists:
a reload's new zygote then stays in its load until the test writes a byte to the FIFO $GATE."""

from __future__ import annotations

import os
import sys

from webapp import make_app

if os.path.exists(os.environ["HOLD"]):
    sys.stderr.write(f"TEST load-held pid={os.getpid()}\n")
    sys.stderr.flush()
    with open(os.environ["GATE"], "rb") as gate:  # blocks until the test opens it to write
        gate.read(1)

app = make_app()
