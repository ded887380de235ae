"""Shared fixtures: tiny randomly initialised BERT runs (seconds, no downloads)."""
from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on two cores: one torch thread each (their server and client subprocesses
    # inherit it), not four threads fighting for two cores. Runs compared bit for bit then all train at 1.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]

TINY = {
    "server": {"rounds": 2, "devices_per_round": 2, "min_devices": 1, "round_deadline_s": 60.0,
               "registration_timeout_s": 60.0, "heartbeat_s": 1.0, "plots": False},
    "model": {"name": "tiny-bert", "max_seq_len": 32},
    "data": {"num_devices": 2, "partition": "iid", "max_examples_per_device": 24, "test_max_examples": 32},
    "train": {"batch_size": 8, "lr": 1e-3},
    "method": {"name": "lora", "lora": {"rank": 4, "alpha": 8.0}},
}


UNGROUPED = ("--dist loadgroup: pytest-xdist could not keep this test's xdist_group on one worker (pytest {v} with "
             "this pytest-xdist does not; pyproject's test extra pins pytest < 9.2), so it would race the group's "
             "other tests")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Under `--dist loadgroup` (make test) an xdist_group's tests must share one worker: Ray's tests one local
    Ray, the network emulation's one set of namespaces and addresses. pytest-xdist marks them by a suffix on the
    node id; where a pytest release stops that from working (9.2 did), each such test fails saying why rather
    than racing."""
    if not getattr(config.option, "loadgroup", False):  # set on an xdist worker under --dist loadgroup only
        return
    for item in items:
        if item.get_closest_marker("xdist_group") and "@" not in item.nodeid:
            item.add_marker(pytest.mark.ungrouped)


def pytest_runtest_setup(item):
    if item.get_closest_marker("ungrouped"):
        pytest.fail(UNGROUPED.format(v=pytest.__version__), pytrace=False)


def drive_rounds(coord):
    """coord.run_rounds() in a daemon thread, started: (the thread, the message of the RoundsAbandoned it
    stopped with, once it has)."""
    import threading

    from edgelora.state import RoundsAbandoned

    stopped: list[str] = []

    def drive():
        try:
            coord.run_rounds()
        except RoundsAbandoned as e:
            stopped.append(str(e))

    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    return driver, stopped


def tiny_raw(**sections) -> dict:
    raw = copy.deepcopy(TINY)
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


@pytest.fixture
def tiny_config():
    from edgelora.config import load_config

    def make(**sections):
        return load_config(tiny_raw(**sections))

    return make


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgelora.cli", *args]


def sigint_default() -> None:
    """preexec_fn for a child the test will Ctrl-C: a shell starts background jobs with SIGINT ignored, the child
    inherits that, and Python then never turns SIGINT into KeyboardInterrupt (the suite run as `make test &`)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


# A child that presses Ctrl-C on itself: a real SIGINT, sent at a point the test chooses (right after a round's
# row and state are saved), not at whatever point a polling parent happens to see the row (a round of a tiny
# model takes ~0.05 s: a parent polling every 0.1 s sometimes saw the first row only after the last round).
_CTRL_C_AFTER_ROUND = """
import os, signal, sys
from edgelora.runlog import RunFolder
commit, after, sent = RunFolder.commit_round, int(sys.argv[1]), []
def commit_then_ctrl_c(self, rec, *args, **kwargs):
    commit(self, rec, *args, **kwargs)
    if rec.round == after and not sent:
        sent.append(rec.round)
        os.kill(os.getpid(), signal.SIGINT)
RunFolder.commit_round = commit_then_ctrl_c
from edgelora.cli import main
sys.exit(main(sys.argv[2:]))
"""


def cli_ctrl_c_after_round(round_id: int, *args: str) -> list[str]:
    """`edgelora ARGS` (as cli()) that gets Ctrl-C (SIGINT) once, just after the first run's round ROUND_ID
    is committed (RunFolder.commit_round). Start it with preexec_fn=sigint_default."""
    return [sys.executable, "-c", _CTRL_C_AFTER_ROUND, str(round_id), *args]
