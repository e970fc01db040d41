"""The daemon's Prometheus metrics (`ckptd serve --metrics-port`), in a registry of its own."""

from __future__ import annotations

import logging
from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

PHASE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
PHASES = ("handoff", "write", "fsync", "commit")


class DaemonMetrics:
    """Counters, gauges and per-phase histograms of one daemon. Always collected (cheap); served over
    HTTP only when `serve()` is called."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.saves_started = Counter(
            "ckptd_saves_started", "Saves this node began (first rank handed over)", registry=r
        )
        self.saves_committed = Counter("ckptd_saves_committed", "Saves committed", registry=r)
        self.saves_aborted = Counter("ckptd_saves_aborted", "Saves aborted", registry=r)
        self.bytes_written = Counter("ckptd_bytes_written", "Tensor bytes this node wrote to disk", registry=r)
        self.phase_seconds = Histogram(
            "ckptd_save_phase_seconds",
            "Seconds per save phase: handoff (first to last rank's hand-over), write, fsync, commit",
            ["phase"],
            buckets=PHASE_BUCKETS,
            registry=r,
        )
        self.saves_in_flight = Gauge("ckptd_saves_in_flight", "Saves in flight on this node", registry=r)
        self.staged_bytes_mapped = Gauge(
            "ckptd_staged_bytes_mapped",
            "Bytes of clients' staging regions the daemon holds mapped (pool occupancy)",
            registry=r,
        )
        self.last_committed_step = Gauge(
            "ckptd_last_committed_step", "Step of the newest committed checkpoint", registry=r
        )
        self.tier_bytes_waiting = Gauge(
            "ckptd_tier_bytes_waiting", "Bytes of the checkpoint waiting to be copied into a tier", ["tier"], registry=r
        )
        self.tier_bytes_copied = Counter(
            "ckptd_tier_bytes_copied",
            "Bytes copied into a tier (its copy throughput is the rate)",
            ["tier"],
            registry=r,
        )
        self.tier_last_step = Gauge(
            "ckptd_tier_last_step", "Step of the newest checkpoint a tier's `latest` names", ["tier"], registry=r
        )
        for phase in PHASES:
            self.phase_seconds.labels(phase)

    def serve(self, port: int, address: str = "127.0.0.1") -> None:
        """Expose the metrics at http://ADDRESS:PORT/metrics from a background thread."""
        start_http_server(port, addr=address, registry=self.registry)
        log.info("metrics at http://%s:%d/metrics", address, port)

    def observe_phase(self, phase: str, seconds: Optional[float]) -> None:
        """Record one save's time in `phase` (ignored when unknown)."""
        if seconds is not None and seconds >= 0:
            self.phase_seconds.labels(phase).observe(seconds)
