"""An application that starts a thread at import: forking it would be unsafe (see _zygote)."""

from __future__ import annotations

import threading

from webapp import make_app

_stop = threading.Event()
threading.Thread(target=_stop.wait, name="import-time-poller", daemon=True).start()

app = make_app()
