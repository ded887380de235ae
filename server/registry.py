"""Devices known to the coordinator, with liveness from heartbeats (any RPC counts as one)."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


@dataclass
class DeviceEntry:
    device_id: str
    hardware: str
    versions: dict[str, str]
    registered_at: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)


class DeviceRegistry:
    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._devices: dict[str, DeviceEntry] = {}
        self._lock = threading.Lock()

    def register(self, device_id: str, hardware: str, versions: dict[str, str]) -> bool:
        """Add or refresh a device; True when it was new."""
        with self._lock:
            new = device_id not in self._devices
            self._devices[device_id] = DeviceEntry(device_id, hardware, dict(versions))
            return new

    def touch(self, device_id: str) -> bool:
        with self._lock:
            entry = self._devices.get(device_id)
            if entry is None:
                return False
            entry.last_seen = time.monotonic()
            return True

    def __contains__(self, device_id: str) -> bool:
        with self._lock:
            return device_id in self._devices

    def __len__(self) -> int:
        with self._lock:
            return len(self._devices)

    def live(self) -> list[str]:
        now = time.monotonic()
        with self._lock:
            return sorted((d.device_id for d in self._devices.values() if now - d.last_seen <= self.timeout_s),
                          key=_id_key)


def _id_key(device_id: str):
    return (0, int(device_id), "") if device_id.isdigit() else (1, 0, device_id)
