"""Proxy headers: believed from a trusted peer, ignored from anyone else.

The pure rules first (which hop is the client), then real clusters, of an aiohttp app and of
a Starlette (ASGI) app, and a real aiohttp client that forges the headers from 127.0.0.2,
trusted or not.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence
from pathlib import Path

import aiohttp
import pytest

from aiocluster.worker.proxy import Forwarded, TrustedPeers, believe, forwarded, parse_forwarded

from .conftest import StartCluster
from .harness import cli
from .test_metrics import scrape_until
from .test_operations import free_port

pytestmark = pytest.mark.timeout(60)

LOCAL = TrustedPeers(["127.0.0.1"])
#: The same ``/client`` answer from either kind of app.
APPS = pytest.mark.parametrize("app", ["client_app:app", "asgi_app:app"])
FORGED = {
    "X-Forwarded-For": "203.0.113.9",
    "X-Forwarded-Proto": "https",
    "X-Forwarded-Host": "shop.example",
}


def x_headers(**values: str) -> Mapping[str, Sequence[str]]:
    return {"x-forwarded-" + name: [value] for name, value in values.items()}


def test_an_untrusted_peer_is_believed_in_nothing() -> None:
    says = forwarded("10.1.2.3", LOCAL, x_headers(**{"for": "203.0.113.9", "proto": "https"}))
    assert says == Forwarded()
    assert forwarded("10.1.2.3", LOCAL, {}, [{"for": "203.0.113.9"}]) == Forwarded()


def test_the_client_is_the_rightmost_untrusted_hop() -> None:
    trusted = TrustedPeers(["127.0.0.1", "10.0.0.0/8"])
    # The client wrote 6.6.6.6 itself; the trusted proxies appended the rest.
    headers = x_headers(**{"for": "6.6.6.6, 198.51.100.7, 10.0.0.5", "proto": "https"})
    assert forwarded("127.0.0.1", trusted, headers) == Forwarded("198.51.100.7", "https", None)
    # Every hop trusted: the leftmost is as far as they say.
    assert forwarded("127.0.0.1", trusted, x_headers(**{"for": "10.9.9.9, 10.0.0.5"})).remote == (
        "10.9.9.9"
    )
    # '*' trusts every peer and every hop.
    assert forwarded("192.0.2.1", TrustedPeers(["*"]), headers).remote == "6.6.6.6"


def test_scheme_and_host_come_from_the_clients_hop() -> None:
    headers = {
        "x-forwarded-for": ["198.51.100.7", "127.0.0.1"],  # repeated headers are one list
        "x-forwarded-proto": ["https, http"],
        "x-forwarded-host": ["shop.example, internal"],
    }
    assert forwarded("127.0.0.1", LOCAL, headers) == Forwarded(
        "198.51.100.7", "https", "shop.example"
    )
    # A proxy that kept one proto and host for the whole chain (nginx ingress).
    one = x_headers(**{"for": "198.51.100.7, 127.0.0.1", "proto": "https", "host": "a.example"})
    assert forwarded("127.0.0.1", LOCAL, one) == Forwarded("198.51.100.7", "https", "a.example")
    # An unknown scheme is ignored; ws/wss are http/https.
    assert forwarded("127.0.0.1", LOCAL, x_headers(proto="gopher")).scheme is None
    assert forwarded("127.0.0.1", LOCAL, x_headers(proto="wss")).scheme == "https"


def test_rfc_7239_forwarded_wins_over_x_forwarded() -> None:
    elements = [
        {"for": '"[2001:db8::7]:4711"', "proto": "https", "host": "shop.example"},
        {"for": "127.0.0.1:5000", "proto": "http"},
    ]
    says = forwarded("127.0.0.1", LOCAL, x_headers(**{"for": "6.6.6.6"}), elements)
    assert says == Forwarded("2001:db8::7", "https", "shop.example")
    assert forwarded("127.0.0.1", LOCAL, {}, [{"for": "unknown"}]).remote == "unknown"


def test_the_forwarded_header_is_parsed_as_rfc_7239_says() -> None:
    values = [
        'for=192.0.2.60;proto=HTTP;by=203.0.113.43, For="[2001:db8:cafe::17]:4711"',
        'for="_gazonk";host="a\\"b.example", for=198.51.100.17;host=shop.example',
    ]
    assert parse_forwarded(values) == [
        {"for": "192.0.2.60", "proto": "HTTP", "by": "203.0.113.43"},
        {"for": "[2001:db8:cafe::17]:4711"},
        {"for": "_gazonk", "host": 'a"b.example'},
        {"for": "198.51.100.17", "host": "shop.example"},
    ]
    # A malformed element is skipped, what a proxy appended after it is still read.
    assert parse_forwarded(["garbage;;=, for=10.0.0.1"]) == [{"for": "10.0.0.1"}]
    assert parse_forwarded(["", " ; ,"]) == []
    # From the raw headers, Forwarded first; an untrusted peer is believed in nothing.
    raw = {"forwarded": ["for=198.51.100.1;proto=https"], "x-forwarded-for": ["6.6.6.6"]}
    assert believe("127.0.0.1", LOCAL, raw) == Forwarded("198.51.100.1", "https", None)
    assert believe("127.0.0.2", LOCAL, raw) == Forwarded()
    assert believe("127.0.0.1", LOCAL, {"x-forwarded-for": ["6.6.6.6"]}).remote == "6.6.6.6"


def test_trusted_peers() -> None:
    peers = TrustedPeers(["127.0.0.1", "10.0.0.0/8", "2001:db8::/32"])
    assert "127.0.0.1" in peers and "10.200.0.1" in peers and "2001:db8::5" in peers
    assert "::ffff:127.0.0.1" in peers  # a dual-stack socket's IPv4 peer
    assert "127.0.0.2" not in peers and "example.org" not in peers
    assert None in peers  # a Unix socket's peer: only local processes reach it


def loopback_alias_works() -> bool:
    probe = socket.socket()
    try:
        probe.bind(("127.0.0.2", 0))
    except OSError:
        return False
    finally:
        probe.close()
    return True


needs_127_0_0_2 = pytest.mark.skipif(
    not loopback_alias_works(), reason="this system cannot bind 127.0.0.2"
)


async def client_view(
    url: str, headers: Mapping[str, str], source: str = "127.0.0.2"
) -> dict[str, object]:
    """What the app at ``url`` says of its client, asked with ``headers`` from ``source`` (any
    127/8 address is loopback on Linux): the JSON of a GET, or of a ``ws://`` URL's first
    message (the ASGI app's ``/ws-client``)."""
    connector = aiohttp.TCPConnector(force_close=True, local_addr=(source, 0))
    async with aiohttp.ClientSession(connector=connector) as s:
        data: object
        if url.startswith("ws"):
            timeout = aiohttp.ClientWSTimeout(ws_close=10)
            async with s.ws_connect(url, headers=headers, timeout=timeout) as ws:
                data = await ws.receive_json(timeout=10)
        else:
            async with s.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=10)) as r:
                assert r.status == 200
                data = await r.json()
    assert isinstance(data, dict)
    return data


@needs_127_0_0_2
@APPS
@pytest.mark.parametrize("policy", ["shared", "rr"])
async def test_a_spoofing_client_is_ignored_unless_trusted(
    start_cluster: StartCluster, policy: str, app: str
) -> None:
    # Default trust: 127.0.0.1 only. The client at 127.0.0.2 forges every header.
    c = await start_cluster(*cli("run", app, "-w", "2", "-b", "127.0.0.1:0", "--policy", policy))
    url = f"{c.url}/client"
    seen = await client_view(url, {**FORGED, "Forwarded": "for=198.51.100.1;proto=https"})
    assert (seen["remote"], seen["scheme"], seen["secure"]) == ("127.0.0.2", "http", False)
    assert seen["host"] == c.address
    # The same headers from the trusted 127.0.0.1 (a proxy on this machine) are believed.
    trusted = await client_view(url, FORGED, source="127.0.0.1")
    assert (trusted["remote"], trusted["scheme"], trusted["secure"]) == (
        "203.0.113.9",
        "https",
        True,
    )
    assert trusted["host"] == "shop.example"
    rfc = await client_view(url, {"Forwarded": 'for="198.51.100.1";proto=https'}, "127.0.0.1")
    assert (rfc["remote"], rfc["secure"]) == ("198.51.100.1", True)
    # A client that hides behind an address it wrote itself at the left is still seen.
    chain = {"X-Forwarded-For": "6.6.6.6, 198.51.100.7"}
    assert (await client_view(url, chain, "127.0.0.1"))["remote"] == "198.51.100.7"
    if app.startswith("asgi"):  # a websocket's scope: ws or wss
        ws_url = f"ws://{c.address}/ws-client"
        spoofed = await client_view(ws_url, FORGED)
        assert (spoofed["remote"], spoofed["scheme"]) == ("127.0.0.2", "ws")
        believed = await client_view(ws_url, FORGED, "127.0.0.1")
        assert (believed["remote"], believed["scheme"], believed["host"]) == (
            "203.0.113.9",
            "wss",
            "shop.example",
        )
    assert await c.stop() == 0


@needs_127_0_0_2
@APPS
async def test_forwarded_allow_ips_takes_networks_and_the_switch_turns_it_off(
    start_cluster: StartCluster, tmp_path: Path, app: str
) -> None:
    c = await start_cluster(
        *cli("run", app, "-w", "1", "-b", "127.0.0.1:0"),
        env={"AIOCLUSTER_FORWARDED_ALLOW_IPS": "10.0.0.0/8, 127.0.0.0/30"},
    )
    seen = await client_view(f"{c.url}/client", FORGED)  # 127.0.0.2 is in 127.0.0.0/30
    assert (seen["remote"], seen["scheme"], seen["host"]) == (
        "203.0.113.9",
        "https",
        "shop.example",
    )
    assert await c.stop() == 0
    d = await start_cluster(
        *cli("run", app, "-w", "1", "-b", "127.0.0.1:0", "--no-proxy-headers"),
        env={"AIOCLUSTER_FORWARDED_ALLOW_IPS": "*"},
    )
    seen = await client_view(f"{d.url}/client", FORGED)
    assert (seen["remote"], seen["scheme"]) == ("127.0.0.2", "http")
    assert await d.stop() == 0


@APPS
async def test_a_unix_socket_peer_is_a_trusted_proxy(
    start_cluster: StartCluster, tmp_path: Path, app: str
) -> None:
    """nginx in front on a Unix socket (docs/deployment.md): its headers are believed."""
    path = tmp_path / "app.sock"
    c = await start_cluster(*cli("run", app, "-w", "1", "-b", f"unix:{path}"))
    connector = aiohttp.UnixConnector(path=str(path))
    async with (
        aiohttp.ClientSession(connector=connector) as s,
        s.get("http://localhost/client", headers=FORGED) as r,
    ):
        seen = await r.json()
    assert (seen["remote"], seen["secure"], seen["host"]) == ("203.0.113.9", True, "shop.example")
    assert await c.stop() == 0


@APPS
async def test_with_admin_requests_are_counted_and_proxy_headers_still_believed(
    start_cluster: StartCluster, app: str
) -> None:
    """With ``--admin`` requests are timed (for ASGI in the same layer as the proxy headers,
    for aiohttp in a middleware behind the server-handler wrapper): both still apply."""
    admin = free_port()
    c = await start_cluster(
        *cli("run", app, "-w", "1", "-b", "127.0.0.1:0", "--admin", f"127.0.0.1:{admin}")
    )
    trusted = await client_view(f"{c.url}/client", FORGED, source="127.0.0.1")
    assert (trusted["remote"], trusted["scheme"], trusted["host"]) == (
        "203.0.113.9",
        "https",
        "shop.example",
    )
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{c.url}/nowhere") as r:
            assert r.status == 404
        m = await scrape_until(
            s,
            f"http://127.0.0.1:{admin}/metrics",
            lambda m: m.get("aiocluster_http_request_duration_seconds_count{}") == 2,
        )
    assert m["aiocluster_http_responses_total{code=2xx}"] == 1
    assert m["aiocluster_http_responses_total{code=4xx}"] == 1
    assert await c.stop() == 0
