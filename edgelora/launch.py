"""One `edgelora server` and its `edgelora client` processes, started and always stopped in one place.

The demo (`edgelora demo`), the network emulation (deploy/emulate.py), the integration tests and the
benchmarks all run a coordinator and devices as real processes:

    with Launcher(run_dir, env={"OMP_NUM_THREADS": "1"}) as fleet:
        addr = fleet.start_server(config_path, args=["--insecure"], log=run_dir / "server.log")
        fleet.start_clients(Client(device_id=str(i), args=["--insecure"], log=logs / f"client_{i}.log")
                            for i in range(4))
        rc = fleet.wait_server(timeout_s=600)
        codes = fleet.wait_clients(timeout_s=60)

Whichever way the block is left (its end, an exception, Ctrl-C), every process it started that is still
running gets one SIGINT (the server stops as on Ctrl-C, its finished rounds saved) and is killed if it has
not exited `stop_grace_s` later. The processes run in their own session, so a terminal's Ctrl-C reaches the
launcher only and each process is interrupted once, by the launcher: a second SIGINT could land inside the
server's own shutdown. Since SIGINT only ever comes from the launcher, a launcher that was itself started with
SIGINT ignored (a shell's `cmd &`) does not pass that on: its children's SIGINT is reset to the default, or
every stop would end in a kill.

It starts the CLI as subprocesses and never imports the server or the client: the standard library, tomli_w
(a config given as a dict) only.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import tomli_w

LOG_TAIL_CHARS = 3000


def wait_for_server_addr(run_dir: Path, proc, timeout_s: float = 300.0) -> str:
    """HOST:PORT from RUN_DIR/server.addr, which a server started with port 0 writes once it listens.
    Raises RuntimeError if the server process `proc` exits first, TimeoutError after timeout_s."""
    path = Path(run_dir) / "server.addr"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before listening")
        time.sleep(0.2)
    raise TimeoutError(f"server did not write {path} within {timeout_s:.0f} s")



def gone_after(run: Mapping) -> float:
    """A wait_server clients_gone_s for a run config's sections: its server.device_timeout_s (default 60 s),
    the longest a finished server waits for its devices, plus 30 s."""
    return float(run.get("server", {}).get("device_timeout_s", 60.0)) + 30.0


class LaunchError(RuntimeError):
    """The server exited or hung before it listened, or did not finish in time; says where its output is."""


@dataclass(frozen=True)
class Client:
    """One `edgelora client` process: its device (or devices), its other flags, where its output goes."""

    device_id: str | None = None          # --device-id: one device, an index or (with --data) a name
    device_ids: str | None = None         # --device-ids: many virtual devices in this process, e.g. "0-49"
    args: Sequence[str] = ()              # every other flag: --insecure or --tls-ca ..., --quiet, --data ...
    log: Path | None = None               # stdout and stderr go here; None: the launcher's own
    env: Mapping[str, str] | None = None  # on top of the launcher's environment
    prefix: Sequence[str] = ()            # run through this, e.g. ("ip", "netns", "exec", "ns0")

    def __post_init__(self) -> None:
        if (self.device_id is None) == (self.device_ids is None):
            raise ValueError(f"Client: give one of device_id and device_ids, got {self.device_id!r} and "
                             f"{self.device_ids!r}")

    def device_flags(self) -> list[str]:
        return ["--device-id", self.device_id] if self.device_id is not None else ["--device-ids", self.device_ids]


class Launcher:
    """A context manager over one run folder's server and clients (see the module docstring)."""

    def __init__(self, run_dir: Path, *, verbose: bool = False, env: Mapping[str, str] | None = None,
                 python: str = sys.executable, cwd: Path | None = None, stop_grace_s: float = 10.0) -> None:
        """verbose: `edgelora -v` (INFO logs) for every process; env: added to this process's environment."""
        self.run_dir = Path(run_dir)
        self.stop_grace_s = stop_grace_s
        self.server: subprocess.Popen | None = None
        self.server_log: Path | None = None
        self.addr: str | None = None
        self.clients: list[subprocess.Popen] = []
        self._client_logs: list[Path | None] = []
        self._exe = [python, "-m", "edgelora.cli", *(["-v"] if verbose else [])]
        self._env = {**os.environ, **(env or {})}
        self._cwd = cwd
        self._started: list[subprocess.Popen] = []  # every process, a server replaced by a resumed one too

    def __enter__(self) -> "Launcher":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start_server(self, config: Path | Mapping | None = None, *, args: Sequence[str] = (), resume: bool = False,
                     port: int | None = 0, log: Path | None = None, prefix: Sequence[str] = (),
                     timeout_s: float = 300.0) -> str:
        """`edgelora server --config CONFIG --out RUN_DIR --port PORT ARGS`, and HOST:PORT once it listens.

        config: a TOML file, or a run config's sections (written to RUN_DIR/run.toml), or None for the defaults;
        resume: `--resume RUN_DIR` instead (a server that died may be replaced so, its clients still running);
        port: None leaves the config's. RUN_DIR/server.addr is removed first, so a stale one is never read.
        A server that exits first, or has not listened within timeout_s, is a LaunchError with its log's tail."""
        if self.server is not None and self.server.poll() is None:
            raise LaunchError(f"a server is already running for {self.run_dir} (pid {self.server.pid})")
        if isinstance(config, Mapping):
            self.run_dir.mkdir(parents=True, exist_ok=True)
            path = self.run_dir / "run.toml"
            path.write_text(tomli_w.dumps(config))
            config = path
        where = ["--resume", str(self.run_dir)] if resume else \
            [*(["--config", str(config)] if config is not None else []), "--out", str(self.run_dir)]
        (self.run_dir / "server.addr").unlink(missing_ok=True)
        self.server_log, self.addr = log, None
        self.server = self._start([*prefix, *self._exe, "server", *where,
                                   *(["--port", str(port)] if port is not None else []), *args], log, None)
        try:
            self.addr = wait_for_server_addr(self.run_dir, self.server, timeout_s)
        except (RuntimeError, TimeoutError) as e:
            raise LaunchError(f"{e}{self.server_log_tail()}") from None
        return self.addr

    def start_clients(self, clients: Iterable[Client], addr: str | None = None) -> list[subprocess.Popen]:
        """An `edgelora client --server ADDR` process per Client (ADDR: the started server's by default)."""
        addr = addr or self.addr
        if addr is None:
            raise LaunchError("start_clients: no server address (start_server first, or give addr)")
        clients = list(clients)
        procs = [self._start([*c.prefix, *self._exe, "client", "--server", addr, *c.device_flags(), *c.args],
                             c.log, c.env) for c in clients]
        self.clients += procs
        self._client_logs += [c.log for c in clients]
        return procs

    def wait_server(self, timeout_s: float | None = None, clients_gone_s: float | None = None) -> int:
        """The server's exit code; a LaunchError (with its log's tail) if it is still running after timeout_s.

        clients_gone_s: also a LaunchError once every client this launcher started has exited and the server is
        still running this long after the last did: with nothing left to train (the clients crashed, say) a
        server waits for devices to return, which here none ever will. The error names the clients' exit codes
        and shows the end of the first failed one's log. Give it more than the run's server.device_timeout_s
        (gone_after below): after its last round a server waits up to that long for devices that may not have
        heard the run is over, and clients that did hear exit first."""
        if self.server is None:
            raise LaunchError("wait_server: no server was started")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        gone_since = None
        while True:
            step = 0.5 if clients_gone_s is not None and self.clients else None
            if deadline is not None:
                left = deadline - time.monotonic()
                step = left if step is None else min(step, left)
            try:
                return self.server.wait(timeout=None if step is None else max(0.0, step))
            except subprocess.TimeoutExpired:
                pass
            if deadline is not None and time.monotonic() >= deadline:
                raise LaunchError(f"server did not finish within {timeout_s:.0f} s{self.server_log_tail()}")
            if clients_gone_s is not None and self.clients and all(c.poll() is not None for c in self.clients):
                gone_since = gone_since or time.monotonic()
                if time.monotonic() - gone_since >= clients_gone_s:
                    codes = [c.returncode for c in self.clients]
                    raise LaunchError(f"every client exited (codes {codes}) and the server was still running "
                                      f"{clients_gone_s:.0f} s later{self._failed_client_tail()}")

    def _failed_client_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        for c, log in zip(self.clients, self._client_logs):
            if c.returncode and log is not None and Path(log).exists():
                return f"; the end of {log}:\n{Path(log).read_text(errors='replace')[-chars:]}"
        return ""

    def wait_clients(self, timeout_s: float) -> list[int | None]:
        """Each client's exit code, in start order, waiting up to timeout_s for all of them together. A client
        still running then is stopped (SIGINT, then killed) and reads None: it did not exit on its own."""
        deadline = time.monotonic() + timeout_s
        for c in self.clients:
            with suppress(subprocess.TimeoutExpired):
                c.wait(timeout=max(0.0, deadline - time.monotonic()))
        late = [c for c in self.clients if c.poll() is None]
        self._stop(late)
        return [None if c in late else c.returncode for c in self.clients]

    def server_log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        """The end of the server's log, for an error message ('' when its output went to this terminal)."""
        if self.server_log is None or not Path(self.server_log).exists():
            return ""
        text = Path(self.server_log).read_text(errors="replace")[-chars:]
        return f"; the end of {self.server_log}:\n{text}"

    def stop(self) -> None:
        """Stop every process still running: SIGINT, then a kill after stop_grace_s. Safe to call again."""
        self._stop(self._started)

    def _start(self, cmd: list[str], log: Path | None, env: Mapping[str, str] | None) -> subprocess.Popen:
        out = open(log, "w") if log is not None else None
        inherits_ignored_sigint = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        try:
            p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if out else None, cwd=self._cwd,
                                 env={**self._env, **(env or {})}, start_new_session=True,
                                 preexec_fn=_default_sigint if inherits_ignored_sigint else None)
        finally:
            if out is not None:
                out.close()  # the child has its own descriptor
        self._started.append(p)
        return p

    def _stop(self, procs: list[subprocess.Popen]) -> None:
        live = [p for p in procs if p.poll() is None]
        for p in live:
            with suppress(ProcessLookupError):
                p.send_signal(signal.SIGINT)
        deadline = time.monotonic() + self.stop_grace_s
        try:
            for p in live:
                with suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=max(0.0, deadline - time.monotonic()))
        finally:  # also when a second Ctrl-C cuts the wait short
            for p in live:
                if p.poll() is None:
                    p.kill()
                    with suppress(subprocess.TimeoutExpired):
                        p.wait(timeout=self.stop_grace_s)


def _default_sigint() -> None:
    """In the child, before exec: SIGINT back to its default, so Python there turns it into KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
