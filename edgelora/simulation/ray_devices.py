"""Simulated devices in Ray actors (`edgelora simulate --backend ray`, `[simulate] backend = "ray"`): Flower's
RayActorClientProxy, on edgelora's one round driver (server.driver.RoundDriver.run_one_round).

Each actor hosts a model (edgelora.edge_client.trainer.DeviceHost). A round hands every sampled device its task at once,
spread evenly over the actors (in sampled order, each to the least loaded); a device that carries state from
round to round (FLASC's error-feedback residual) is pinned to the actor that holds it and always trains there,
so that state stays where it is. A device's training depends only on its task, its data and its state, not on
the actor, so the simulator, accepting the results in sampled order, gets exactly what the sequential runner
produces: the aggregate, and so the run, is the same bit for bit. (Pinning every device to actor i mod workers
instead leaves a round of 4 devices on 2 actors 3 + 1 or 4 + 0 more often than 2 + 2: 1.45x at best.)
What crosses Ray is protobuf and codec bytes (a task header, a download payload, an update header, an update
payload) and the run's config as TOML text, nothing else.

Without simulate.ray_address a local Ray starts on this machine and stops with the run; with one the run
joins that cluster (`ray start --head`, then `ray start --address HEAD:PORT` on each node). On a cluster every
node needs edgelora installed and the run's data (and model cache) at the same paths.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator

import tomllib
import torch

from edgelora.config import load_config
from edgelora.configtools import ConfigError
from edgelora.schema import RunConfig
from edgelora.server.checkpoint import groups_from_bytes, groups_to_bytes

from .sequential import SequentialDevices

log = logging.getLogger("edgelora.ray")


def _ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("simulate.backend = ray: Ray is not installed (pip install 'edgelora[ray]')") from None
    return ray


def start_ray(address: str = ""):
    """(ray, whether this call started it): joins `address` (a cluster), or starts a local Ray on this
    machine, unless this process is in a Ray session already."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # devices' runs phone nowhere unless the user asks
    ray = _ray()
    if ray.is_initialized():
        return ray, False
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    else:
        ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
                 object_store_memory=256 << 20)
    return ray, True


def place(devices: list[str], home: dict[str, int], workers: int,
          work: dict[str, float] | None = None) -> dict[str, int]:
    """Device -> actor for one round. A device with a home (the actor holding its state) goes there; the others,
    the most work first (its examples; 1 each when `work` is None, so then in the given order), each to the
    actor with the least work so far (the lowest index among equals): Graham's LPT rule, within 4/3 of the
    best finishing time. Counting devices instead leaves an actor with the large partitions waited on."""
    w = {d: float(work.get(d, 1.0)) if work else 1.0 for d in devices}
    load = [0.0] * workers
    for d in devices:
        if d in home:
            load[home[d]] += w[d]
    placed = {d: home[d] for d in devices if d in home}
    for d in sorted((d for d in devices if d not in home), key=lambda d: -w[d]):  # stable: ties keep their order
        placed[d] = min(range(workers), key=load.__getitem__)
        load[placed[d]] += w[d]
    return placed


class DeviceActor:
    """One Ray worker: a model and the virtual devices it has trained (made a Ray actor by RayDevices)."""

    def __init__(self, run_toml: str, threads: int, torch_device: str) -> None:
        torch.set_num_threads(threads)
        self.devices = SequentialDevices(load_config(tomllib.loads(run_toml)), torch_device)

    def pid(self) -> int:
        return os.getpid()

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def train(self, device_id: str, header: bytes, payload: bytes,
              download_s: float) -> tuple[bytes, bytes, bool] | str:
        """(update header, update payload, whether this actor now holds the device's state), or why the download
        did not fit: the bytes SequentialDevices.run_job hands back, as they are."""
        out = self.devices.run_job(device_id, header, payload, download_s)
        if isinstance(out, Exception):
            return str(out)
        return *out, self.devices.trainer(device_id).has_state

    def secagg(self, device_id: str, prompt: bytes) -> bytes | str:
        """A key-phase prompt -> the device's answer (SequentialDevices.secagg), or why it refused."""
        out = self.devices.secagg(device_id, prompt)
        return str(out) if isinstance(out, Exception) else out

    def accepted(self, device_id: str) -> None:
        self.devices.accepted(device_id)

    def residuals(self, devices: list[str] | None = None) -> bytes:
        return groups_to_bytes(self.devices.residuals(devices))

    def restore(self, data: bytes) -> None:
        self.devices.restore(groups_from_bytes(data))


class RayDevices:
    """The simulator's device runner on Ray (the sequential one is sequential.SequentialDevices)."""

    def __init__(self, run: RunConfig, torch_device: str = "cpu") -> None:
        cfg = run.simulate
        self.run = run
        ray, self._owns_ray = start_ray(cfg.ray_address)
        cpus = ray.cluster_resources().get("CPU", 1.0)
        self.workers = cfg.workers or max(1, min(run.server.sampled_per_round, int(cpus // cfg.device_cpus)))
        self.threads = max(1, int(cfg.device_cpus))
        self.torch_device = "cuda" if cfg.device_gpus > 0 else torch_device
        self._actor_cls = ray.remote(num_cpus=cfg.device_cpus, num_gpus=cfg.device_gpus)(DeviceActor)
        self._toml = run.to_toml()
        self.actors = [self._new_actor() for _ in range(self.workers)]
        self.home: dict[str, int] = {}  # device -> the actor holding its state: it trains there, always
        self.placed: dict[str, int] = {}  # device -> the actor it trains on this round
        self._preplaced: frozenset[str] = frozenset()  # a secure round's devices, placed before its key phases
        log.info("ray: %d actors x %g CPUs (%d torch threads), %g GPUs each", self.workers, cfg.device_cpus,
                 self.threads, cfg.device_gpus)

    def _new_actor(self):
        return self._actor_cls.remote(self._toml, self.threads, self.torch_device)

    def actor_pids(self) -> list[int]:
        return _ray().get([a.pid.remote() for a in self.actors])

    def actor_nodes(self) -> list[str]:
        return _ray().get([a.node.remote() for a in self.actors])

    def train(self, jobs: Iterable, work: dict[str, float] | None = None
              ) -> Iterator[tuple[str, tuple[bytes, bytes] | Exception]]:
        """Every job starts at once; results come back in the jobs' order, as the bytes the actor produced. A
        device whose actor died yields the error (the simulator drops it) and its actor is replaced for the next
        round."""
        ray = _ray()
        jobs = list(jobs)
        if not {d for d, *_ in jobs} <= self._preplaced:
            self.placed = place([d for d, *_ in jobs], self.home, self.workers, work)
        self._preplaced = frozenset()
        started = [(d, self.actors[self.placed[d]].train.remote(d, header, payload, download_s))
                   for d, header, payload, download_s in jobs]
        dead: set[int] = set()
        try:
            for d, ref in started:
                try:
                    out = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    dead.add(self.placed[d])
                    yield d, RuntimeError(f"its Ray worker died ({type(e).__name__})")
                    continue
                if isinstance(out, str):
                    yield d, RuntimeError(out)
                    continue
                header, payload, stateful = out
                if stateful:
                    self.home[d] = self.placed[d]
                yield d, (header, payload)
        finally:  # also when the round filled before every result was read
            for i in sorted(dead):
                log.warning("ray: actor %d died; a new one takes its place (the error-feedback state of its "
                            "devices starts afresh)", i)
                self.actors[i] = self._new_actor()
                self.home = {d: a for d, a in self.home.items() if a != i}

    def place_round(self, devices: list[str], work: dict[str, float] | None = None) -> None:
        """A secure round: its devices' actors are chosen before the key phases, since a device's keys live on
        the actor that trains it."""
        self.placed = place(devices, self.home, self.workers, work)
        self._preplaced = frozenset(devices)

    def secagg(self, device_id: str, prompt: bytes) -> bytes | Exception:
        ray = _ray()
        try:
            out = ray.get(self.actors[self.placed[device_id]].secagg.remote(device_id, prompt))
        except ray.exceptions.RayActorError as e:
            return RuntimeError(f"its Ray worker died ({type(e).__name__})")
        return RuntimeError(out) if isinstance(out, str) else out

    def accepted(self, device_id: str) -> None:
        self.actors[self.placed[device_id]].accepted.remote(device_id)

    def residuals(self, devices: list[str] | None = None) -> dict:
        """The error-feedback residual of each of `devices` (None: every device) that has one, from the actors
        that hold them (for the run's checkpoint)."""
        out = {}
        for data in _ray().get([a.residuals.remote(devices) for a in self.actors]):
            out.update(groups_from_bytes(data))
        return out

    def restore(self, residuals: dict) -> None:
        """A resumed run's residuals: each device's to an actor (spread evenly), which becomes its home."""
        placed = place(sorted(residuals, key=int), {}, self.workers)
        _ray().get([a.restore.remote(groups_to_bytes({d: residuals[d] for d in residuals if placed[d] == i}))
                    for i, a in enumerate(self.actors)])
        self.home.update(placed)

    def close(self) -> None:
        ray = _ray()
        for a in self.actors:
            ray.kill(a)
        self.actors = []
        if self._owns_ray:
            ray.shutdown()
