"""edgelora.launch: a server that dies or hangs before it listens is an error naming its log's tail; clients get
the server's address; every process is gone once the block is left, also by an exception or Ctrl-C.

Most tests run a stand-in for `python -m edgelora.cli` (a few lines that act as a server or a client as told by
FAKE_SERVER / FAKE_CLIENT), so they take about a second; one starts the real CLI."""
from __future__ import annotations

import signal
import sys
import time

import pytest

from edgelora.launch import Client, LaunchError, Launcher

# Stands in for `python -m edgelora.cli [-v] server|client ...`: prints its arguments, then per FAKE_<ROLE>:
# die (exit 3 with a message), listen (server: write RUN_DIR/server.addr, then wait), hang (wait without
# listening), exitN (exit N at once), stubborn (write the address if a server, ignore SIGINT, wait).
FAKE = """#!{python}
import os, signal, sys, time
argv = sys.argv[3:]
role = argv[argv.index("server") if "server" in argv else argv.index("client")]
mode = os.environ.get("FAKE_" + role.upper(), "hang")
print("fake", role, " ".join(argv), flush=True)
if mode == "die":
    print("boom: the dataset is missing", flush=True)
    sys.exit(3)
if role == "server" and mode in ("listen", "stubborn"):
    out = argv[argv.index("--out" if "--out" in argv else "--resume") + 1]
    os.makedirs(out, exist_ok=True)
    open(os.path.join(out, "server.addr"), "w").write("127.0.0.1:4321\\n")
if mode.startswith("exit"):
    sys.exit(int(mode[4:]))
if mode == "stubborn":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
try:
    time.sleep(600)
except KeyboardInterrupt:
    sys.exit(130)
"""


@pytest.fixture
def fake(tmp_path):
    path = tmp_path / "fake-python"
    path.write_text(FAKE.format(python=sys.executable))
    path.chmod(0o755)
    return str(path)


def _all_gone(fleet: Launcher) -> bool:
    return all(p.poll() is not None for p in [fleet.server, *fleet.clients])


def test_a_server_that_dies_at_start_up_is_an_error_with_its_log_tail(tmp_path, fake, monkeypatch):
    monkeypatch.setenv("FAKE_SERVER", "die")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "server.addr").write_text("127.0.0.1:1\n")  # a previous server's: never taken for this one's
    with pytest.raises(LaunchError) as e, Launcher(run_dir, python=fake) as fleet:
        fleet.start_server(tmp_path / "run.toml", log=tmp_path / "server.log", timeout_s=30)
    msg = str(e.value)
    assert "server exited with code 3 before listening" in msg
    assert str(tmp_path / "server.log") in msg and "boom: the dataset is missing" in msg
    # what it was started with: --config, --out RUN_DIR, --port 0
    assert f"server --config {tmp_path / 'run.toml'} --out {run_dir} --port 0" in msg


def test_a_server_that_never_listens_is_a_timeout_and_is_stopped(tmp_path, fake):
    with pytest.raises(LaunchError, match=r"(?s)did not write .*server.addr within 1 s.*fake server"), \
            Launcher(tmp_path / "run", python=fake, env={"FAKE_SERVER": "hang"}) as fleet:
        fleet.start_server(None, log=tmp_path / "server.log", timeout_s=1)
    assert _all_gone(fleet)


def test_clients_get_the_address_their_flags_and_env_and_report_exit_codes(tmp_path, fake):
    logs = tmp_path / "logs"
    logs.mkdir()
    with Launcher(tmp_path / "run", python=fake, verbose=True, env={"FAKE_SERVER": "listen"},
                  stop_grace_s=5) as fleet:
        addr = fleet.start_server({"server": {"rounds": 1}}, args=["--insecure"], port=None,
                                  log=tmp_path / "server.log")
        assert addr == "127.0.0.1:4321" == fleet.addr
        fleet.start_clients([Client(device_id="alpha", args=["--insecure"], log=logs / "a.log",
                                    env={"FAKE_CLIENT": "exit0"}),
                             Client(device_ids="0-3", log=logs / "b.log", env={"FAKE_CLIENT": "exit2"}),
                             Client(device_id="5", prefix=["env", "FAKE_CLIENT=exit5"]),
                             Client(device_id="7", env={"FAKE_CLIENT": "hang"})])
        t0 = time.monotonic()
        assert fleet.wait_clients(timeout_s=2) == [0, 2, 5, None]  # the last was still running: stopped
        assert time.monotonic() - t0 < 5
        assert fleet.server.poll() is None
    assert _all_gone(fleet)
    assert (logs / "a.log").read_text() == f"fake client -v client --server {addr} --device-id alpha --insecure\n"
    assert "--device-ids 0-3" in (logs / "b.log").read_text()
    # a config given as sections is written into the run folder; port=None leaves the config's
    assert (tmp_path / "run" / "run.toml").read_text() == "[server]\nrounds = 1\n"
    assert (tmp_path / "server.log").read_text() == \
        f"fake server -v server --config {tmp_path / 'run' / 'run.toml'} --out {tmp_path / 'run'} --insecure\n"


@pytest.mark.parametrize("raised", [RuntimeError("the body failed"), KeyboardInterrupt()])
def test_every_process_is_gone_after_the_block_even_when_it_raises(tmp_path, fake, raised):
    with pytest.raises(type(raised)), Launcher(tmp_path / "run", python=fake, env={"FAKE_SERVER": "listen"},
                                               stop_grace_s=1) as fleet:
        fleet.start_server(None)
        fleet.start_clients([Client(device_id="0"),  # stops on SIGINT
                             Client(device_id="1", env={"FAKE_CLIENT": "stubborn"})])  # is killed
        time.sleep(0.5)  # the stubborn one has set its handler
        assert not any(p.poll() is not None for p in [fleet.server, *fleet.clients])
        raise raised
    assert _all_gone(fleet)
    assert fleet.server.returncode == fleet.clients[0].returncode == 130  # SIGINT first, as Ctrl-C
    assert fleet.clients[1].returncode == -9  # it ignored SIGINT: killed


def test_a_launcher_that_ignores_sigint_still_stops_its_processes_with_it(tmp_path, fake):
    """Started in the background by a shell (`make test &`), this process ignores SIGINT; its children would
    inherit that, and every stop would be a kill after the grace period."""
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with Launcher(tmp_path / "run", python=fake, env={"FAKE_SERVER": "listen"}, stop_grace_s=30) as fleet:
            fleet.start_server(None)
            fleet.start_clients([Client(device_id="0")])
            time.sleep(0.5)  # both are inside their sleep
    finally:
        signal.signal(signal.SIGINT, old)
    assert fleet.server.returncode == fleet.clients[0].returncode == 130  # KeyboardInterrupt, not a kill


def test_a_resumed_server_replaces_a_dead_one_and_waits_for_its_own_address(tmp_path, fake):
    with Launcher(tmp_path / "run", python=fake, env={"FAKE_SERVER": "listen"}, stop_grace_s=1) as fleet:
        fleet.start_server(None)
        first = fleet.server
        with pytest.raises(LaunchError, match="already running"):
            fleet.start_server(None)
        first.kill()
        first.wait()
        fleet.start_server(resume=True, port=5000, log=tmp_path / "server2.log")
        assert fleet.server is not first
        with pytest.raises(LaunchError, match=r"(?s)did not finish within 0 s.*--resume"):
            fleet.wait_server(timeout_s=0.2)
    assert (tmp_path / "server2.log").read_text() == f"fake server server --resume {tmp_path / 'run'} --port 5000\n"
    assert _all_gone(fleet)


def test_a_client_needs_one_device_flag():
    with pytest.raises(ValueError, match="one of device_id and device_ids"):
        Client()
    with pytest.raises(ValueError, match="one of device_id and device_ids"):
        Client(device_id="0", device_ids="0-1")


def test_the_real_server_with_a_bad_config_names_the_field(tmp_path):
    """The real CLI: the error is the server's own one line, from its log."""
    with pytest.raises(LaunchError) as e, Launcher(tmp_path / "run") as fleet:
        fleet.start_server({"server": {"rounds": 0}}, args=["--insecure"], log=tmp_path / "server.log",
                           timeout_s=120)
    assert "server exited with code 2 before listening" in str(e.value)
    assert "edgelora: config error: server.rounds" in str(e.value)
    assert _all_gone(fleet)


def test_a_server_left_waiting_after_every_client_died_is_an_error_naming_them(tmp_path, fake, monkeypatch):
    """Every client exits (one fails, its log says why) while the server waits for devices that will never
    come back: wait_server gives up clients_gone_s after the last one, not at its timeout."""
    monkeypatch.setenv("FAKE_SERVER", "listen")
    with Launcher(tmp_path / "run", python=fake, stop_grace_s=1) as fleet:
        fleet.start_server(None)
        fleet.start_clients([Client(device_id="0", log=tmp_path / "c0.log", env={"FAKE_CLIENT": "exit0"}),
                             Client(device_id="1", log=tmp_path / "c1.log", env={"FAKE_CLIENT": "die"})])
        start = time.monotonic()
        with pytest.raises(LaunchError, match=r"(?s)every client exited \(codes \[0, 3\]\).*c1.log.*boom"):
            fleet.wait_server(timeout_s=300, clients_gone_s=0.5)
        assert time.monotonic() - start < 60
    assert _all_gone(fleet)
