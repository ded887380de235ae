"""A real two-node Ray cluster on this machine: a head and a second raylet started with `ray start` on their
own ports, one CPU each; `edgelora simulate --backend ray --ray-address` spreads its two actors over both
nodes and ends bit for bit where the sequential simulator ends."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgelora.server.checkpoint import load_state
from edgelora.simulation.simulator import simulate

from .conftest import REPO
from .test_simulate import method_run

pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]  # one Ray at a time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# One auth mode for the head, the second raylet and every driver (Ray 2.5x turns token auth on for some
# starts and not others, and then the second node cannot join).
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled"}


def _ray(*args):
    exe = Path(sys.executable).with_name("ray")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=180, env=ENV)


@pytest.fixture
def two_nodes(tmp_path):
    port = _free_port()
    common = ["--num-cpus", "1", "--disable-usage-stats", "--node-ip-address", "127.0.0.1"]
    head = _ray("start", "--head", "--port", str(port), "--include-dashboard", "false", *common)
    assert head.returncode == 0, head.stdout + head.stderr
    try:
        second = _ray("start", "--address", f"127.0.0.1:{port}", *common)
        assert second.returncode == 0, second.stdout + second.stderr
        yield f"127.0.0.1:{port}"
    finally:
        _ray("stop", "--force")


def test_a_simulation_spread_over_two_raylets_matches_the_sequential_run(tmp_path, two_nodes):
    import torch

    run = method_run("flasc", server={"rounds": 3})  # FLASC with error feedback: per-device state on each node
    (tmp_path / "run.toml").write_text(run.to_toml())
    script = (f"import json, ray; ray.init(address={two_nodes!r}); "
              f"print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive']]))")
    nodes = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                      timeout=120, env=ENV).stdout.strip().splitlines()[-1])
    assert len(nodes) == 2, nodes
    code = ("import sys, json; from edgelora.config import load_config; from edgelora.simulation.simulator import Simulator; "
            "run = load_config(sys.argv[1]); "
            "run = run.replace(simulate=type(run.simulate)(backend='ray', ray_address=sys.argv[2], workers=2)); "
            "sim = Simulator(run, sys.argv[3], progress=False); "
            "print('NODES', json.dumps(sim.runner.actor_nodes())); sim.run_rounds()")
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run.toml"), two_nodes, str(tmp_path / "ray")],
                       capture_output=True, text=True, timeout=600, cwd=REPO, env=ENV)
    assert p.returncode == 0, p.stderr[-3000:]
    placed = json.loads(next(l for l in p.stdout.splitlines() if l.startswith("NODES"))[6:])
    assert sorted(placed) == sorted(nodes), "the two actors did not land one on each node"
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the actors train at 1 thread (device_cpus = 1)
    try:
        simulate(run, tmp_path / "seq", progress=False)
    finally:
        torch.set_num_threads(before)
    a, b = load_state(tmp_path / "seq"), load_state(tmp_path / "ray")
    assert a.round == b.round == 3
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k], err_msg=k)
    rows = [[json.loads(l) for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("seq", "ray")]
    assert [(r["bytes_down"], r["bytes_up"], r["accuracy"]) for r in rows[0]] == \
        [(r["bytes_down"], r["bytes_up"], r["accuracy"]) for r in rows[1]]
