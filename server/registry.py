"""Devices known to the coordinator, with liveness from heartbeats (any RPC counts as one)."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .sampling import device_sort_key


@dataclass(frozen=True)
class Capacity:
    """What a device declares of its memory and hardware at Register."""
    memory_mb: float = 0.0
    resident_mb: float = 0.0
    accelerator: str = ""
    fast_bf16: bool = False


@dataclass
class DeviceEntry:
    device_id: str
    hardware: str
    versions: dict[str, str]
    tier: int | None = None
    uplink_mbps: float = 0.0      # declared by the device at Register (0: nothing declared)
    downlink_mbps: float = 0.0
    capacity: Capacity = Capacity()  # its memory and hardware, declared at Register (0 MB: nothing declared)
    registered_at: float = 0.0    # on the registry's clock
    last_seen: float = 0.0


class DeviceRegistry:
    def __init__(self, timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout_s = timeout_s
        self.clock = clock  # tests inject one they move by hand
        self._devices: dict[str, DeviceEntry] = {}
        self._order: list[DeviceEntry] | None = None  # every entry in device_sort_key order; None: stale
        self._lock = threading.Lock()

    def register(self, device_id: str, hardware: str, versions: dict[str, str], tier: int | None = None,
                 uplink_mbps: float = 0.0, downlink_mbps: float = 0.0, capacity: Capacity = Capacity()) -> bool:
        """Add or refresh a device; True when it was new."""
        with self._lock:
            new = device_id not in self._devices
            now = self.clock()
            self._devices[device_id] = DeviceEntry(device_id, hardware, dict(versions), tier, uplink_mbps,
                                                   downlink_mbps, capacity, now, now)
            self._order = None  # a new entry (or a new object for a known id): sort again at the next live()
            return new

    def entries(self) -> list[DeviceEntry]:
        with self._lock:
            return list(self._devices.values())

    def entry(self, device_id: str) -> DeviceEntry | None:
        with self._lock:
            return self._devices.get(device_id)

    def touch(self, device_id: str) -> bool:
        with self._lock:
            entry = self._devices.get(device_id)
            if entry is None:
                return False
            entry.last_seen = self.clock()
            return True

    def __contains__(self, device_id: str) -> bool:
        with self._lock:
            return device_id in self._devices

    def __len__(self) -> int:
        with self._lock:
            return len(self._devices)

    def is_live(self, device_id: str) -> bool:
        """Registered, and heard from within timeout_s."""
        now = self.clock()
        with self._lock:
            entry = self._devices.get(device_id)
            return entry is not None and now - entry.last_seen <= self.timeout_s

    def live_count(self) -> int:
        """How many are live (live() without listing and sorting them)."""
        now = self.clock()
        with self._lock:
            return sum(now - d.last_seen <= self.timeout_s for d in self._devices.values())

    def live(self) -> list[str]:
        """The live devices in device_sort_key order (what sampling draws from). The order of every entry is
        kept between calls and made again only after a registration, so a round opening on a fleet that
        registered long ago filters, not sorts, the registry."""
        now = self.clock()
        with self._lock:
            if self._order is None:
                self._order = sorted(self._devices.values(), key=lambda d: device_sort_key(d.device_id))
            return [d.device_id for d in self._order if now - d.last_seen <= self.timeout_s]
