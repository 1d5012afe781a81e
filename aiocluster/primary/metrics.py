"""The workers' metrics, merged: what each live worker last reported, and what exited ones
counted, so that a cluster-wide counter never goes backwards when a worker exits.

Bounded: one report per live worker (each within :mod:`aiocluster.wire.metricsform`'s limits),
and at most :data:`MAX_RETIRED` series kept for exited workers (a series first seen past that
bound is dropped from the exited workers' part, and said once).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiocluster.wire.metricsform import SUMMED, Family

if TYPE_CHECKING:
    from prometheus_client.core import Metric

__all__ = ["MAX_RETIRED", "REPORT_BURST", "REPORT_RATE", "MetricsStore", "Reporter"]

log = logging.getLogger("aiocluster.primary")

#: Series of exited workers' counters kept at most (counter, histogram and summary samples).
MAX_RETIRED = 50_000
#: Reports a worker may send: this many in a burst, refilled at REPORT_RATE a second (a worker
#: sends at most 4 a second, with its heartbeats).
REPORT_BURST = 20.0
REPORT_RATE = 8.0

SeriesKey = tuple[str, tuple[tuple[str, str], ...]]


def _metric(name: str, doc: str, kind: str) -> Metric:
    # prometheus_client is imported on the first scrape, not with the primary: it is ~20 ms
    # of the primary's start-up, which runs while the zygote loads the application.
    from prometheus_client.core import Metric

    return Metric(name, doc, kind)


@dataclass(frozen=True, slots=True)
class Reporter:
    """A live worker and its last report."""

    worker: int
    slot: int
    families: dict[str, Family]


@dataclass(slots=True)
class _Retired:
    type: str
    help: str
    samples: dict[SeriesKey, float]


class MetricsStore:
    """The workers' reports: :meth:`report` on each, :meth:`retire` on exit, :meth:`collect`
    for a scrape."""

    def __init__(self) -> None:
        self._live: dict[int, Reporter] = {}
        self._retired: dict[str, _Retired] = {}
        self._retired_series = 0
        self._said_full = False
        self._budget: dict[int, tuple[float, float]] = {}

    def allow(self, worker: int, now: float) -> bool:
        """Whether worker ``worker`` may send a report at loop time ``now`` (False: it floods)."""
        tokens, since = self._budget.get(worker, (REPORT_BURST, now))
        tokens = min(REPORT_BURST, tokens + (now - since) * REPORT_RATE) - 1.0
        self._budget[worker] = (tokens, now)
        return tokens >= 0.0

    def report(self, worker: int, slot: int, families: dict[str, Family]) -> None:
        """Worker ``worker`` (of ``slot``) reported ``families``: they replace its last report."""
        self._live[worker] = Reporter(worker, slot, families)

    def last(self, worker: int) -> Reporter | None:
        """Worker ``worker``'s last report, if it sent one."""
        return self._live.get(worker)

    def retire(self, worker: int) -> None:
        """Worker ``worker`` exited: keep what its counters counted; forget its gauges."""
        self._budget.pop(worker, None)
        gone = self._live.pop(worker, None)
        if gone is None:
            return
        for family in gone.families.values():
            if family.type not in SUMMED:
                continue
            kept = self._retired.get(family.name)
            if kept is None:
                if self._retired_series >= MAX_RETIRED:
                    self._full(family.name)
                    continue
                kept = self._retired[family.name] = _Retired(family.type, family.help, {})
            elif kept.type != family.type:
                continue  # workers disagree on its type: the first one seen wins
            for key, value in family.samples.items():
                if key in kept.samples:
                    kept.samples[key] += value
                elif self._retired_series < MAX_RETIRED:
                    kept.samples[key] = value
                    self._retired_series += 1
                else:
                    self._full(family.name)

    def _full(self, name: str) -> None:
        if not self._said_full:
            self._said_full = True
            log.warning(
                "keeping exited workers' counts for %d series at most: %s and newer series "
                "count only what live workers report",
                MAX_RETIRED,
                name,
            )

    @property
    def retired_series(self) -> int:
        """How many series exited workers' counts are kept for."""
        return self._retired_series

    def collect(self) -> Iterator[Metric]:
        """Every family, merged: summed types over all workers, gauges as their mode says."""
        order: dict[str, tuple[str, str, str]] = {
            name: (kept.type, kept.help, "sum") for name, kept in self._retired.items()
        }
        for reporter in self._live.values():
            for family in reporter.families.values():
                order.setdefault(family.name, (family.type, family.help, family.mode))
        live = sorted(self._live.values(), key=lambda r: (r.slot, r.worker))
        for name, (kind, doc, mode) in sorted(order.items()):
            parts = [(r, f) for r in live if (f := r.families.get(name)) and f.type == kind]
            if kind in SUMMED:
                yield self._summed(name, kind, doc, parts)
                if mode == "each":
                    yield _per_worker(_worker_name(name), kind, doc, parts)
            elif mode == "all":
                yield _per_worker(name, kind, doc, parts)
            else:
                yield _combined(name, kind, doc, mode, parts)

    def _summed(
        self, name: str, kind: str, doc: str, parts: list[tuple[Reporter, Family]]
    ) -> Metric:
        kept = self._retired.get(name)
        totals: dict[SeriesKey, float] = dict(kept.samples) if kept and kept.type == kind else {}
        for _, family in parts:
            for key, value in family.samples.items():
                totals[key] = totals.get(key, 0.0) + value
        metric = _metric(name, doc, kind)
        for (sample, labels), value in totals.items():
            metric.add_sample(sample, dict(labels), value)
        return metric


def _worker_name(name: str) -> str:
    """Where a family summed over workers is also shown per worker."""
    if name.startswith("aiocluster_"):
        return "aiocluster_worker_" + name.removeprefix("aiocluster_")
    return name + "_by_worker"


def _with_worker(labels: tuple[tuple[str, str], ...], r: Reporter) -> dict[str, str]:
    # worker and slot are ours: an application's own labels of those names are renamed.
    out = {("exported_" + k if k in ("worker", "slot") else k): v for k, v in labels}
    out["worker"] = str(r.worker)
    out["slot"] = str(r.slot)
    return out


def _per_worker(name: str, kind: str, doc: str, parts: list[tuple[Reporter, Family]]) -> Metric:
    metric = _metric(name, doc, kind)
    for reporter, family in parts:
        for (sample, labels), value in family.samples.items():
            metric.add_sample(
                sample.replace(family.name, name, 1), _with_worker(labels, reporter), value
            )
    return metric


def _combined(
    name: str, kind: str, doc: str, mode: str, parts: list[tuple[Reporter, Family]]
) -> Metric:
    values: dict[SeriesKey, list[float]] = {}
    for _, family in parts:
        for key, value in family.samples.items():
            values.setdefault(key, []).append(value)
    metric = _metric(name, doc, kind)
    for (sample, labels), found in values.items():
        value = sum(found) if mode == "sum" else max(found) if mode == "max" else min(found)
        metric.add_sample(sample, dict(labels), value)
    return metric
