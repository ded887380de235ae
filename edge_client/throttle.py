"""Application-level link throttling for machines where `tc` is not available (no root).

A token bucket paces the upload chunk stream and the download read loop so that an edge device behaves as if it
sat behind a link of the given rate. It counts gRPC message bytes (payload + protobuf framing), not TCP/IP
headers, so it is slightly kinder than a real link of the same rate (a few percent; deploy/README.md).
Real shaping with `tc` lives in deploy/emulate.py.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

# Upload pieces this small keep the pacing smooth: at 1 Mbit/s one piece is ~0.13 s of link time.
PACED_CHUNK_BYTES = 16 * 1024


class TokenBucket:
    """Tokens are bytes; `rate_bytes_s` refill per second up to `burst_bytes`. `take(n)` blocks until n are paid.

    A request larger than the burst is allowed and drives the bucket negative (it is paid off by waiting), so
    any message size works and the long-run rate is exact: time for N bytes = (N - burst) / rate.
    """

    def __init__(self, rate_bytes_s: float, burst_bytes: int = PACED_CHUNK_BYTES,
                 clock=time.monotonic, sleep=time.sleep) -> None:
        if rate_bytes_s <= 0:
            raise ValueError(f"rate must be > 0 bytes/s, got {rate_bytes_s}")
        self.rate = float(rate_bytes_s)
        self.burst = float(burst_bytes)
        self.tokens = float(burst_bytes)
        self.clock, self.sleep = clock, sleep
        self.stamp = clock()
        self.lock = threading.Lock()

    def take(self, n: int) -> float:
        """Pay n bytes; return the seconds slept."""
        with self.lock:
            now = self.clock()
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            self.tokens -= n
            wait = -self.tokens / self.rate if self.tokens < 0 else 0.0
        if wait > 0:
            self.sleep(wait)
        return wait


def mbit_to_bytes_s(mbps: float) -> float:
    return mbps * 1e6 / 8


@dataclass
class LinkThrottle:
    """The device's links: None = unthrottled in that direction. One bucket per direction, shared by every
    virtual device of the process (they share the machine's link)."""
    uplink_mbps: float | None = None
    downlink_mbps: float | None = None

    def __post_init__(self) -> None:
        for name in ("uplink_mbps", "downlink_mbps"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"--{name.replace('_', '-')}: must be > 0 Mbit/s, got {v}")
        self.up = TokenBucket(mbit_to_bytes_s(self.uplink_mbps)) if self.uplink_mbps else None
        self.down = TokenBucket(mbit_to_bytes_s(self.downlink_mbps)) if self.downlink_mbps else None

    def upload_chunk_bytes(self, chunk_bytes: int) -> int:
        return min(chunk_bytes, PACED_CHUNK_BYTES) if self.up else chunk_bytes

    def paced_upload(self, msgs: Iterable) -> Iterator:
        """Yield each protobuf message once its bytes are paid for on the uplink."""
        for m in msgs:
            if self.up:
                self.up.take(m.ByteSize())
            yield m

    def paced_download(self, msgs: Iterable) -> Iterator:
        """Hand on each received message after its bytes are paid for on the downlink; holding the read back
        lets HTTP/2 flow control push back on the server."""
        for m in msgs:
            if self.down:
                self.down.take(m.ByteSize())
            yield m
