"""The floor of a first answer for the aiohttp app: no server, only what every server pays.

A fresh interpreter imports ``aiohttp.web`` (as hello_aiohttp.py does, and as gunicorn's
aiohttp worker does in its master), then answers every connection on HOST:PORT with one
``200`` on a plain blocking socket and closes it. Nothing here can be trimmed by a server: no
worker, no loop, no fork. The ``starts`` measure times it beside the servers (row
``import-floor``), so that how far each server is from this floor is measured, not guessed.

    python import_floor.py 127.0.0.1 8080
"""

import socket
import sys

import aiohttp.web  # noqa: F401  (the import is what is timed)

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nfloor"


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    with socket.create_server((host, port), backlog=64) as listener:
        while True:
            conn, _ = listener.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(ANSWER)


if __name__ == "__main__":
    main()
