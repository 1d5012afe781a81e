"""Proxy headers: the client's address, scheme and host, as a trusted proxy forwards them.

Behind nginx every connection comes from nginx; it says who the client was in
``X-Forwarded-For``, ``X-Forwarded-Proto`` and ``X-Forwarded-Host``, or in RFC 7239's
``Forwarded``. Those headers are believed only on a connection from a trusted peer (one of
``forwarded_allow_ips``, or a Unix socket: only local processes allowed by its file mode reach
one); from anyone else they are ignored, or any client could say it is anyone.

The client is the nearest address in the chain that is not itself a trusted proxy: walking the
list from the right (the proxy next to us appended the last entry) skips the proxies we trust,
so a client cannot hide behind an address it wrote itself at the left. The scheme and host
are taken from the same hop (or from the only one a proxy kept).

The rules are :func:`forwarded` and :func:`believe`, pure functions of the peer and the
headers; :func:`proxy_handler` applies them to an aiohttp app and :class:`ProxyHeaders` to
an ASGI one, so both kinds of app believe exactly the same things. uvicorn's own
``ProxyHeadersMiddleware`` is not used for ASGI apps: it ignores ``Forwarded`` and
``X-Forwarded-Host``, and trusts every hop of a chain from a trusted peer.

aiohttp-remotes was considered: its strict middleware answers 400 to an untrusted peer, its
relaxed and filtered ones believe the headers from any peer, and none reads ``Forwarded`` and
``X-Forwarded-*`` behind one setting, so this small module does what uvicorn and gunicorn do.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aiohttp import web

__all__ = [
    "Forwarded",
    "ProxyHeaders",
    "TrustedPeers",
    "believe",
    "forwarded",
    "parse_forwarded",
    "proxy_handler",
]

log = logging.getLogger("aiocluster.worker")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_SCHEMES = {"http": "http", "https": "https", "ws": "http", "wss": "https"}

#: The forwarding headers read, lower-case (``Forwarded`` is parsed; the others are lists).
HEADERS = ("forwarded", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host")
_RAW_HEADERS = frozenset(name.encode("latin-1") for name in HEADERS)

# One RFC 7239 pair and what ends it: ``name=token`` or ``name="quoted \" string"``. Values
# are taken a little wider than a token (``for=10.0.0.1:80`` unquoted is common), never
# across a separator.
_PAIR = re.compile(r'\s*([^=;,\s]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;,\s"]*)\s*([;,]|$)')
_ESCAPE = re.compile(r"\\(.)")


class TrustedPeers:
    """The peers whose forwarding headers are believed: networks, or ``*`` for any."""

    def __init__(self, peers: Iterable[str]) -> None:
        peers = list(peers)
        self.anyone = "*" in peers
        self.networks: tuple[Network, ...] = tuple(
            ipaddress.ip_network(peer, strict=False) for peer in peers if peer != "*"
        )

    def __contains__(self, host: object) -> bool:
        """True for a trusted IP address (text); None, a Unix socket's peer, is trusted."""
        if host is None:
            return True
        if self.anyone:
            return True
        address = _ip(host)
        if address is None:
            return False
        return any(address in network for network in self.networks)


def _ip(host: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not isinstance(host, str):
        return None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # ::ffff:127.0.0.1 on a dual-stack socket
    return address


@dataclass(frozen=True, slots=True)
class Forwarded:
    """What the proxies say of the client (None: they say nothing of it)."""

    remote: str | None = None
    scheme: str | None = None
    host: str | None = None


def parse_forwarded(values: Iterable[str]) -> list[dict[str, str]]:
    """The elements of RFC 7239 ``Forwarded`` headers (every value received, in order), each
    a mapping of lower-case parameter names to unquoted values.

    A malformed part is skipped up to the next comma, so what a proxy appended after it (at
    the right, where the trusted hops are) is still read.
    """
    elements: list[dict[str, str]] = []
    for value in values:
        element: dict[str, str] = {}
        pos = 0
        while pos < len(value):
            match = _PAIR.match(value, pos)
            if match is None:  # not a pair: skip this element
                comma = value.find(",", pos)
                pos = len(value) if comma < 0 else comma + 1
                if element:
                    elements.append(element)
                element = {}
                continue
            name, raw, end = match.groups()
            if raw.startswith('"'):
                raw = _ESCAPE.sub(r"\1", raw[1:-1])
            element.setdefault(name.lower(), raw)
            pos = match.end()
            if end != ";":
                if element:
                    elements.append(element)
                element = {}
        if element:
            elements.append(element)
    return elements


def _split(values: Iterable[str]) -> list[str]:
    """Every comma-separated item of headers that may repeat, in order."""
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def _node(value: str) -> str:
    """The address of an RFC 7239 node: ``"[2001:db8::1]:4711"`` -> ``2001:db8::1``."""
    value = value.strip().strip('"')
    if value.startswith("["):
        return value[1:].partition("]")[0]
    if value.count(":") == 1:  # IPv4 (or a name) with a port
        return value.partition(":")[0]
    return value


def _pick(hops: Sequence[str], trusted: TrustedPeers) -> int | None:
    """Which hop, from the left, is the client: the rightmost that is not a trusted proxy."""
    if not hops:
        return None
    for index in range(len(hops) - 1, -1, -1):
        if hops[index] not in trusted:
            return index
    return 0  # every hop is a trusted proxy: the first is as far as they say


def _at(items: Sequence[str], index: int, hops: int) -> str | None:
    """The item of hop ``index`` of ``hops``, or the last item of a proxy that kept fewer."""
    if not items:
        return None
    offset = hops - 1 - index  # counted from the right, where every proxy appends
    return items[-1 - offset] if offset < len(items) else items[0]


def forwarded(
    peer: str | None,
    trusted: TrustedPeers,
    headers: Mapping[str, Sequence[str]],
    elements: Sequence[Mapping[str, str]] = (),
) -> Forwarded:
    """What to believe of the client, for a connection from ``peer``.

    ``headers`` maps lower-case ``x-forwarded-for``/``-proto``/``-host`` to every value
    received; ``elements`` are the parsed ``Forwarded`` elements (aiohttp's
    ``request.forwarded``), which win over the ``X-Forwarded-*`` headers when present.
    Nothing is believed unless ``peer`` is trusted.
    """
    if peer not in trusted:
        return Forwarded()
    if elements:
        hops = [_node(element.get("for", "")) for element in elements]
        index = _pick(hops, trusted)
        assert index is not None
        element = elements[index]
        scheme = element.get("proto")
        host = element.get("host")
        return Forwarded(hops[index] or None, _scheme(scheme), host or None)
    fors = _split(headers.get("x-forwarded-for", ()))
    protos = _split(headers.get("x-forwarded-proto", ()))
    hosts = _split(headers.get("x-forwarded-host", ()))
    index = _pick(fors, trusted)
    if index is None:  # no address: the proxy's own hop for the scheme and host
        return Forwarded(
            None, _scheme(protos[-1] if protos else None), hosts[-1] if hosts else None
        )
    return Forwarded(
        _node(fors[index]) or None,
        _scheme(_at(protos, index, len(fors))),
        _at(hosts, index, len(fors)),
    )


def _scheme(value: str | None) -> str | None:
    return None if value is None else _SCHEMES.get(value.strip().lower())


def believe(
    peer: str | None, trusted: TrustedPeers, headers: Mapping[str, Sequence[str]]
) -> Forwarded:
    """:func:`forwarded`, from the raw headers: ``headers`` maps the lower-case names of
    :data:`HEADERS` to every value received (``Forwarded`` is parsed here)."""
    if peer not in trusted:
        return Forwarded()
    return forwarded(peer, trusted, headers, parse_forwarded(headers.get("forwarded", ())))


Handler = Callable[["web.BaseRequest"], Awaitable["web.StreamResponse"]]


def proxy_handler(handler: Handler, peers: Iterable[str]) -> Handler:
    """``handler`` (an aiohttp server's request handler, which runs the application) given each
    request with ``remote``, ``scheme`` (so ``secure``) and ``host`` as the forwarding headers
    of a trusted peer say.

    A wrapper of the server's handler rather than a middleware: aiohttp builds each request's
    middleware chain anew, which cost more than most requests need here (a look for four
    headers). A request without any of them goes to ``handler`` as it is, with no frame more.
    """
    trusted = TrustedPeers(peers)

    def handle(request: web.BaseRequest) -> Awaitable[web.StreamResponse]:
        if not any(name in request.headers for name in HEADERS):
            return handler(request)  # nothing forwarded: most requests with no proxy in front
        return handler(_as_forwarded(request, trusted))

    return handle


def _as_forwarded(request: web.BaseRequest, trusted: TrustedPeers) -> web.BaseRequest:
    transport = request.transport
    if transport is None:  # the connection is gone already
        return request
    sock = transport.get_extra_info("socket")
    peername = transport.get_extra_info("peername")
    peer: str | None
    if sock is not None and sock.family == socket.AF_UNIX:
        peer = None  # a Unix socket: trusted
    elif isinstance(peername, tuple) and peername:
        peer = str(peername[0])
    else:
        return request  # no address to trust
    headers = {name: request.headers.getall(name, []) for name in HEADERS}
    says = believe(peer, trusted, headers)
    changes: dict[str, str] = {}
    if says.remote is not None:
        changes["remote"] = says.remote
    if says.scheme is not None:
        changes["scheme"] = says.scheme
    if says.host is not None:
        changes["host"] = says.host
    return request.clone(**changes) if changes else request  # type: ignore[arg-type]


Scope = dict[str, Any]
Receive = Callable[[], Awaitable[Any]]
Send = Callable[[Any], Awaitable[None]]


class ProxyHeaders:
    """An ASGI 3 app that sets ``scope["client"]``, ``scope["scheme"]`` and the ``host``
    header from the forwarding headers of a trusted peer, then calls ``app``.

    The peer is ``scope["client"]``; a connection with no client address on a listen with no
    port (a Unix socket) is trusted, as in :class:`TrustedPeers`. The client's port is not
    forwarded (0), as uvicorn does; a websocket's scheme becomes ``ws``/``wss``.
    """

    def __init__(
        self,
        app: Callable[[Scope, Receive, Send], Awaitable[None]],
        peers: Iterable[str],
    ) -> None:
        self.app = app
        self.trusted = TrustedPeers(peers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve ``scope`` as the trusted proxies say it is (other scopes go through)."""
        if scope["type"] in ("http", "websocket"):
            self.apply(scope)
        await self.app(scope, receive, send)

    def apply(self, scope: Scope) -> None:
        """Rewrite ``scope`` (an HTTP or websocket one) as the trusted proxies say it is."""
        raw: list[tuple[bytes, bytes]] = scope.get("headers", [])
        headers: dict[str, list[str]] = {}
        for name, value in raw:
            key = name.lower()
            if key in _RAW_HEADERS:
                headers.setdefault(key.decode("latin-1"), []).append(value.decode("latin-1"))
        if not headers:
            return  # nothing forwarded: most requests when no proxy is in front
        client = scope.get("client")
        peer: str | None
        if client:
            peer = str(client[0])
        else:
            server = scope.get("server")
            if not server or server[1] is not None:
                return  # no address to trust, and not a Unix socket
            peer = None
        says = believe(peer, self.trusted, headers)
        if says.remote is not None:
            scope["client"] = (says.remote, 0)
        if says.scheme is not None:
            secure = says.scheme == "https"
            if scope["type"] == "websocket":
                scope["scheme"] = "wss" if secure else "ws"
            else:
                scope["scheme"] = says.scheme
        if says.host is not None:
            host = says.host.encode("latin-1")
            scope["headers"] = [(b"host", host)] + [
                (name, value) for name, value in raw if name.lower() != b"host"
            ]
