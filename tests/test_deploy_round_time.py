"""Where round time goes (runlog.round_phases and RUN_DIR/round_time.png), with numbers checked by hand."""
from __future__ import annotations

import json

import pytest

from edgelora.runlog import PHASES, RunFolder, round_phases


def _dev(i, status="completed", **kw):
    d = dict(device_id=str(i), status=status, download_s=0.0, train_s=0.0, encode_s=0.0, upload_s=0.0,
             task_sent_at=0.0, download_done_at=0.0, upload_started_at=0.0, upload_done_at=0.0)
    d.update(kw)
    return d


def test_round_phases_by_hand():
    # device 0: 1 s down, 4 s train (+1 s build the server sees), 2 s up, done at 8; device 1: done at 12
    rec = {"round": 1, "seconds": 13.0, "devices": [
        _dev(0, download_s=1.0, train_s=3.5, encode_s=0.5, upload_s=2.0, upload_started_at=6.0, upload_done_at=8.0),
        _dev(1, download_s=3.0, train_s=5.0, encode_s=0.0, upload_s=4.0, upload_started_at=8.0, upload_done_at=12.0)]}
    down, train, up, wait, server = round_phases(rec, deadline_s=60.0)
    assert (down, train, up) == (2.0, 5.0, 3.0)       # means: (1+3)/2, (5+5)/2, (2+4)/2
    assert wait == pytest.approx(12.0 - 10.0)          # the round collected at 12 s
    assert server == pytest.approx(1.0)
    rec["devices"].append(_dev(2, status="dropped"))
    assert round_phases(rec, deadline_s=20.0)[3] == pytest.approx(20.0 - 10.0)  # a drop: waited for the deadline
    assert round_phases({"devices": [_dev(0, status="rejected")]}, 60.0) is None


def test_simulated_devices_take_turns_so_phases_are_sums_without_waiting():
    # the same two devices one after another (the simulator): 4 s down, 10 s training, 6 s up, 2 s server
    rec = {"round": 1, "seconds": 22.0, "devices": [
        _dev(0, download_s=1.0, train_s=3.5, encode_s=0.5, upload_s=2.0, upload_done_at=8.0),
        _dev(1, download_s=3.0, train_s=5.0, encode_s=1.0, upload_s=4.0, upload_done_at=20.0)]}
    assert round_phases(rec, deadline_s=60.0, sequential=True) == [4.0, 10.0, 6.0, 0.0, 2.0]


def test_round_time_png_is_written(tiny_config, tmp_path):
    folder = RunFolder(tmp_path, tiny_config())
    rec = {"round": 1, "seconds": 3.0, "devices": [_dev(0, download_s=1.0, upload_s=1.0, upload_done_at=2.5)]}
    folder.metrics_path.write_text(json.dumps(rec) + "\n")
    folder.plot_round_time()
    assert (tmp_path / "round_time.png").stat().st_size > 1000 and len(PHASES) == 5
    assert folder.data_label() == "20newsgroups"
