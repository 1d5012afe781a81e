"""A worker that writes hostile bytes and descriptors on its channel, in a real cluster.

For every kind of bad input the primary must log what happened naming the worker, kill it,
replace it, keep serving, and end up holding exactly the descriptors it held before.
"""

from __future__ import annotations

import errno
import subprocess
import sys

import pytest

from aiocluster.wire.address import Address
from aiocluster.wire.sockets import needs_resolver

from .actions import HOSTILE, expect_cut_off, get_ok, inject
from .conftest import StartCluster
from .procfs import fd_kinds

pytestmark = pytest.mark.timeout(40)

# kind (tests/apps/hostile.py) -> what the primary says about it
PROTOCOL_ERRORS = [
    ("random-bytes", "frame announces 2651075870 bytes, more than the 1048576 allowed"),
    ("length-4gib", "frame announces 4294967295 bytes, more than the 1048576 allowed"),
    ("bad-utf8", "frame payload is not valid JSON"),
    ("json-array", "frame payload is a JSON list, not an object"),
    ("json-string", "frame payload is a JSON str, not an object"),
    ("json-null", "frame payload is a JSON NoneType, not an object"),
    ("no-act", "message has no string 'act'"),
    ("unknown-act", "unknown act 'selfDestruct'"),
    ("primary-only-act", "unknown act 'disconnect'"),
    ("ack-to-nothing", "reply to 1000000000, a request never sent"),
    ("online-twice", "sent 'online' twice"),
    ("query-index-string", "'queryServer': field 'index' must be int, got str"),
    ("query-address-string", "bad queryServer address: address must be an object, not str"),
    ("listening-no-address", "'listening': field 'address' must be str, got NoneType"),
    ("heartbeat-string", "'heartbeat': field 'rss' must be a number in 0..2**63, got 'lots'"),
    ("heartbeat-1e999", "number '1e999' is out of range"),
    ("heartbeat-huge-int", "'heartbeat': field 'rss' must be a number in 0..2**63"),
    ("metrics-not-a-list", "'metrics': 'families' must be a list of at most 1000"),
    ("metrics-bad-name", "'metrics': family name 'no spaces' is not a metric name"),
    ("metrics-own-name", "family aiocluster_requests: the aiocluster_ prefix is aiocluster's"),
    ("metrics-too-many-series", "'metrics': more than 10000 series in one report"),
    ("metrics-string-value", "'metrics': sample value must be a finite number, got '1'"),
    ("metrics-flood", "sends metrics reports faster than 8 a second (burst 20)"),
    ("many-fds-none-announced", "descriptors truncated (MSG_CTRUNC)"),
    ("fd-of-regular-file", "frame announces 1 descriptors, more than the 0 allowed"),
    ("fd-of-socket", "frame announces 1 descriptors, more than the 0 allowed"),
    ("fds-announced-none-sent", "frame announces 2 descriptors, more than the 0 allowed"),
]


@pytest.mark.parametrize(("kind", "why"), PROTOCOL_ERRORS, ids=[k for k, _ in PROTOCOL_ERRORS])
async def test_hostile_input_cuts_off_that_worker_only(
    start_cluster: StartCluster, kind: str, why: str
) -> None:
    c = await start_cluster(*HOSTILE)
    assert c.proc is not None
    primary = c.proc.pid
    baseline = fd_kinds(primary)
    worker = await inject(c, kind)
    # The channel names the worker when it refuses the input, then the primary acts on it.
    await c.wait_for(rf"worker {worker} \(pid \d+\): protocol error, closing the channel: ")
    await expect_cut_off(c, worker, "broke the channel protocol", why)
    await get_ok(f"{c.url}/")
    assert fd_kinds(primary) == baseline
    assert "Traceback" not in c.output
    assert c.count("broke the channel protocol") == 1, c.output


@pytest.mark.parametrize(
    ("host", "by_name"),
    [("127.0.0.1", False), ("::1", False), ("0.0.0.0", False), ("localhost", True), ("a.b", True)],
)
def test_only_host_names_go_to_the_resolver_thread(host: str, by_name: bool) -> None:
    assert needs_resolver(Address.tcp(host, 80)) is by_name


def test_a_listen_on_an_ip_literal_leaves_the_idna_codec_unimported() -> None:
    """The IDNA codec's first use costs ~2.5 ms of imports, on the way to the first worker's
    first listen; an IP literal needs no codec. A fresh interpreter, as the primary is."""
    code = (
        "import sys; from aiocluster.wire.address import Address; "
        "from aiocluster.wire.sockets import needs_resolver, open_listener; "
        "a = Address.tcp('127.0.0.1', 0); needs_resolver(a); s, _ = open_listener(a, 8); "
        "print(s.getsockname()[0], 'encodings.idna' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=20, check=True
    )
    assert done.stdout.split() == ["127.0.0.1", "False"], done.stderr


async def test_a_listen_on_a_host_name_resolves_or_fails_only_that_call(
    start_cluster: StartCluster,
) -> None:
    """Host names are resolved in the resolver's thread (DNS may be slow; the primary's loop
    must not wait on it); one that does not resolve fails only that worker's call, with the
    resolver's reason, and the cluster serves on."""
    c = await start_cluster(*HOSTILE)
    ok = await get_ok(f"{c.url}/listen-host?host=localhost")
    assert ok["errno"] == 0
    assert isinstance(ok["sockname"], list) and ok["sockname"][1] > 0
    bad = await get_ok(f"{c.url}/listen-host?host=no-such-host.invalid")
    assert bad["errno"] == errno.EADDRNOTAVAIL
    assert "cannot resolve 'no-such-host.invalid'" in str(bad["error"])
    await c.wait_for(r"cannot listen on no-such-host\.invalid:0: \[Errno 99\] cannot resolve")
    await get_ok(f"{c.url}/")
    assert c.proc is not None and c.proc.returncode is None
