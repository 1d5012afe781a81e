"""Listen addresses: parsing ``HOST:PORT`` / ``unix:PATH`` specs and the handle key (pure code)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Literal

from aiocluster._errors import ConfigError

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "Address", "parse_bind"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000

Kind = Literal["tcp", "unix"]


@dataclass(frozen=True, slots=True)
class Address:
    """Where to listen: a TCP host and port, or a Unix socket path."""

    kind: Kind
    host: str = ""
    port: int = 0
    path: str = ""

    @classmethod
    def tcp(cls, host: str, port: int) -> Address:
        """A TCP address; ``port`` 0 lets the OS choose (all workers then share the one port)."""
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
            raise ConfigError(f"port must be an integer from 0 to 65535, not {port!r}")
        if not isinstance(host, str) or not host:
            raise ConfigError(f"host must be a non-empty string, not {host!r}")
        if not host.isprintable() or not _is_utf8(host):
            raise ConfigError(f"host {host!r} is not a printable UTF-8 host name")
        return cls("tcp", host=host, port=port)

    @classmethod
    def unix(cls, path: str) -> Address:
        """A Unix stream socket at ``path`` (a stale socket file there is replaced)."""
        if not isinstance(path, str) or not path or "\0" in path:
            raise ConfigError(f"unix socket path must be a non-empty string, not {path!r}")
        try:
            size = len(path.encode())
        except UnicodeError:
            # A lone surrogate, e.g. from a peer's JSON: no file name, and no reply could carry it.
            raise ConfigError(f"unix socket path {path!r} is not valid UTF-8 text") from None
        if size > 100:
            # sun_path is 104 bytes on macOS and 108 on Linux, including the terminator.
            raise ConfigError(f"unix socket path is too long ({size} bytes): {path}")
        return cls("unix", path=path)

    def to_wire(self) -> dict[str, Any]:
        """The address as it travels in a ``queryServer`` request."""
        if self.kind == "unix":
            return {"kind": "unix", "path": self.path}
        return {"kind": "tcp", "host": self.host, "port": self.port}

    @classmethod
    def from_wire(cls, obj: object) -> Address:
        """Parse an address from a peer's message; :class:`ConfigError` if it is malformed."""
        if not isinstance(obj, dict):
            raise ConfigError(f"address must be an object, not {type(obj).__name__}")
        kind = obj.get("kind")
        if kind == "unix":
            return cls.unix(obj.get("path"))  # type: ignore[arg-type]
        if kind == "tcp":
            return cls.tcp(obj.get("host"), obj.get("port"))  # type: ignore[arg-type]
        raise ConfigError(f"unknown address kind {kind!r}")

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def _is_utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeError:
        return False
    return True


def parse_bind(spec: str) -> Address:
    """Parse a bind spec: ``HOST:PORT``, ``[V6]:PORT``, ``:PORT``, ``PORT`` or ``unix:PATH``.

    >>> parse_bind("127.0.0.1:8080")
    Address(kind='tcp', host='127.0.0.1', port=8080, path='')
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"empty bind address {spec!r}; use HOST:PORT or unix:PATH")
    spec = spec.strip()
    if spec.startswith("unix:"):
        return Address.unix(spec[len("unix:") :])
    host, sep, port_text = spec.rpartition(":")
    if not sep:
        host, port_text = "", spec
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"bad IPv6 address in bind {spec!r}") from None
    elif ":" in host:
        raise ConfigError(f"bad bind {spec!r}: write IPv6 addresses in brackets, e.g. [::1]:8000")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(
            f"bad bind {spec!r}: port {port_text!r} is not a number (use HOST:PORT or unix:PATH)"
        ) from None
    return Address.tcp(host or DEFAULT_HOST, port)
