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


def _drawn(monkeypatch) -> list[tuple[str, list[int]]]:
    """Every plot RunFolder draws, as (plot, rounds on it)."""
    drawn = []
    for name in ("plot", "plot_round_time"):
        monkeypatch.setattr(RunFolder, name, lambda self, rows=None, name=name: drawn.append(
            (name, [r["round"] for r in (self.records() if rows is None else rows)])))
    return drawn


def _append(folder, r):
    from edgelora.records import DeviceRecord, RoundRecord

    rec = RoundRecord(round=r, stage="lora", accuracy=0.5, loss=1.0)
    rec.devices["0"] = DeviceRecord("0", status="completed", train_s=1.0, upload_done_at=1.0)
    rec.close()
    folder.append(rec)


def test_plots_are_drawn_at_the_first_and_the_last_round_and_at_most_every_interval(tiny_config, tmp_path,
                                                                                        monkeypatch):
    """Drawing accuracy.png and round_time.png costs ~0.3 s of serial server time (round_time.png ~1 s at 200
    rounds): not every round, but when a row first exists, after the last round, and otherwise at most every
    PLOT_EVERY_S seconds."""
    from edgelora import runlog

    drawn = _drawn(monkeypatch)
    folder = RunFolder(tmp_path, tiny_config(server={"rounds": 5, "plots": True}))
    folder.echo = lambda line: None
    for r in (1, 2, 3):
        _append(folder, r)
    assert drawn == [("plot", [1]), ("plot_round_time", [1])]
    monkeypatch.setattr(runlog, "PLOT_EVERY_S", 0.0)  # the interval has passed: the next row draws
    _append(folder, 4)
    monkeypatch.setattr(runlog, "PLOT_EVERY_S", 3600.0)
    _append(folder, 5)  # the last round draws whatever the interval
    assert [rounds for name, rounds in drawn if name == "plot_round_time"] == [[1], [1, 2, 3, 4], [1, 2, 3, 4, 5]]
    assert [rounds for name, rounds in drawn if name == "plot"] == [[1], [1, 2, 3, 4], [1, 2, 3, 4, 5]]


def test_plots_false_draws_nothing_and_never_imports_matplotlib(tiny_config, tmp_path, monkeypatch):
    from edgelora import runlog

    drawn = _drawn(monkeypatch)
    monkeypatch.setattr(runlog, "pyplot", lambda: pytest.fail("matplotlib was imported"))
    folder = RunFolder(tmp_path, tiny_config(server={"rounds": 2}))  # the suite's runs: plots = false
    folder.echo = lambda line: None
    for r in (1, 2):
        _append(folder, r)
    folder.close()
    assert drawn == [] and not list(tmp_path.glob("*.png"))
    assert [r["round"] for r in folder.records()] == [1, 2]


def test_a_run_stopped_between_draws_gets_its_last_rows_drawn(tiny_config, tmp_path, monkeypatch):
    """A run stopped (or interrupted, or abandoned) before its last round: the rows after the last draw are
    drawn when the round driver closes its RunFolder (RoundDriver.run_rounds, whatever ends it)."""
    drawn = _drawn(monkeypatch)
    folder = RunFolder(tmp_path, tiny_config(server={"rounds": 5, "plots": True}))
    folder.echo = lambda line: None
    for r in (1, 2, 3):
        _append(folder, r)
    folder.close()
    assert [rounds for name, rounds in drawn if name == "plot_round_time"] == [[1], [1, 2, 3]]
