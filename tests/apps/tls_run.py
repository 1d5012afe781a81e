"""aiocluster.run(app, ssl_context=...) as with aiohttp's web.run_app: $CERT and $KEY."""

from __future__ import annotations

import os
import ssl

from client_app import make_app

import aiocluster

if __name__ == "__main__":
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(os.environ["CERT"], os.environ["KEY"])
    aiocluster.run(make_app, ssl_context=context, workers=2)
