"""The ``metrics`` report a worker sends the primary: its shape and its bounds (pure).

One report carries every metric family the worker has now (its application's registry and
aiocluster's own request metrics), as plain JSON::

    {"act": "metrics", "families": [
        {"name": "jobs", "type": "counter", "help": "...", "mode": "sum",
         "samples": [["jobs_total", {"queue": "a"}, 12.0], ...]}, ...]}

Both ends check the same limits: the worker trims what would not fit (and says so once), the
primary cuts off a worker whose report breaks them (it was not sent by aiocluster's code).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from aiocluster._errors import ProtocolError

__all__ = [
    "DURATION",
    "GAUGE_MODES",
    "IN_FLIGHT",
    "LAG",
    "MAX_FAMILIES",
    "MAX_LABELS",
    "MAX_REPORT_BYTES",
    "MAX_SERIES",
    "MAX_TEXT",
    "METRICS",
    "OWN_FAMILIES",
    "RESPONSES",
    "SUMMED",
    "Family",
    "gauge_mode",
    "parse_report",
]

#: The act of the report (worker -> primary), sent with a heartbeat when something changed.
METRICS = "metrics"

#: aiocluster's own families, which every worker reports (the primary refuses other names
#: with the ``aiocluster_`` prefix: those are the primary's).
DURATION = "aiocluster_http_request_duration_seconds"
RESPONSES = "aiocluster_http_responses"
IN_FLIGHT = "aiocluster_http_requests_in_flight"
LAG = "aiocluster_loop_lag_seconds"
OWN_FAMILIES = frozenset({DURATION, IN_FLIGHT, LAG, RESPONSES})

#: Families in one report, series (samples) in one report, labels on one sample.
MAX_FAMILIES = 1000
MAX_SERIES = 10_000
MAX_LABELS = 16
#: Longest name, help text or label value, in characters.
MAX_TEXT = 1000
#: The worker sends no report larger than this (the channel refuses frames over 1 MiB).
MAX_REPORT_BYTES = 768 * 1024

#: Types whose samples are summed over workers (and kept when a worker exits).
SUMMED = frozenset({"counter", "histogram", "summary"})
_TYPES = SUMMED | {"gauge", "info", "stateset", "enum", "gaugehistogram", "unknown"}
#: How a gauge's values from several workers combine: one series per live worker (``all``,
#: labels ``worker`` and ``slot``), or one series (``sum``, ``max``, ``min``). prometheus_client's
#: ``live*`` spellings mean the same here: only live workers' gauges ever count.
GAUGE_MODES = frozenset({"all", "sum", "max", "min"})
_ALIASES = {"liveall": "all", "livesum": "sum", "livemax": "max", "livemin": "min"}
#: ``each``: summed like any counter, and also shown per worker (aiocluster's own families).
_SUMMED_MODES = frozenset({"sum", "each"})

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")


def gauge_mode(mode: str) -> str | None:
    """``mode`` as one of :data:`GAUGE_MODES` (``livesum`` is ``sum``...), None if unknown."""
    mode = _ALIASES.get(mode, mode)
    return mode if mode in GAUGE_MODES else None


@dataclass(frozen=True, slots=True)
class Family:
    """One metric family of one worker's report, checked."""

    name: str
    type: str
    help: str
    mode: str
    #: (sample name, sorted (label, value) pairs) -> value.
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _fail(why: str) -> ProtocolError:
    return ProtocolError(f"'metrics': {why}")


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise _fail(f"{what} must be a string of at most {MAX_TEXT} characters")
    return value


def _name(value: Any, what: str) -> str:
    name = _text(value, what)
    if not _NAME.match(name):
        raise _fail(f"{what} {name!r:.60} is not a metric name")
    return name


def _labels(value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict) or len(value) > MAX_LABELS:
        raise _fail(f"labels must be an object of at most {MAX_LABELS} entries")
    pairs = []
    for key, text in value.items():
        if not _LABEL.match(key) or len(key) > MAX_TEXT:
            raise _fail(f"{key!r:.60} is not a label name")
        pairs.append((key, _text(text, f"label {key}")))
    return tuple(sorted(pairs))


def _value(value: Any) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise _fail(f"sample value must be a finite number, got {value!r:.40}")
    return float(value)


def _family(raw: Any, series: int) -> tuple[Family, int]:
    if not isinstance(raw, dict):
        raise _fail("a family must be an object")
    name = _name(raw.get("name"), "family name")
    kind = raw.get("type")
    if kind not in _TYPES:
        raise _fail(f"family {name}: unknown type {kind!r:.40}")
    mode = raw.get("mode", "sum" if kind in SUMMED else "all")
    if mode not in (_SUMMED_MODES if kind in SUMMED else GAUGE_MODES):
        raise _fail(f"family {name}: mode {mode!r:.40} does not fit type {kind}")
    samples_raw = raw.get("samples")
    if not isinstance(samples_raw, list):
        raise _fail(f"family {name}: samples must be a list")
    series += len(samples_raw)
    if series > MAX_SERIES:
        raise _fail(f"more than {MAX_SERIES} series in one report")
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for sample in samples_raw:
        if not isinstance(sample, list) or len(sample) != 3:
            raise _fail(f"family {name}: a sample must be [name, labels, value]")
        sample_name = _name(sample[0], "sample name")
        if not sample_name.startswith(name):
            raise _fail(f"family {name}: sample {sample_name} is not of it")
        samples[(sample_name, _labels(sample[1]))] = _value(sample[2])
    return Family(name, kind, _text(raw.get("help", ""), "help"), mode, samples), series


def parse_report(msg: dict[str, Any], reserved: frozenset[str]) -> dict[str, Family]:
    """The families of a ``metrics`` report, checked against every bound; raises
    :class:`ProtocolError` for anything else. Names starting with ``aiocluster_`` must be in
    ``reserved`` (aiocluster's own worker families): the primary's names are its own."""
    raw = msg.get("families")
    if not isinstance(raw, list) or len(raw) > MAX_FAMILIES:
        raise _fail(f"'families' must be a list of at most {MAX_FAMILIES}")
    families: dict[str, Family] = {}
    series = 0
    for item in raw:
        family, series = _family(item, series)
        if family.name.startswith("aiocluster_") and family.name not in reserved:
            raise _fail(f"family {family.name}: the aiocluster_ prefix is aiocluster's own")
        if family.name in families:
            raise _fail(f"family {family.name} twice")
        families[family.name] = family
    return families
