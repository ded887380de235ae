"""The coordinator's Prometheus endpoint, scraped during a real run, and `edgelora status` on a live server
(its /status) and on a run folder."""
from __future__ import annotations

import re
import subprocess
import threading
import time
import urllib.request

from .conftest import REPO, cli


def _scrape(addr: str) -> str:
    return urllib.request.urlopen(f"http://{addr}/metrics", timeout=5).read().decode()


def _value(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_metrics_endpoint_sees_the_rounds_counter_advance_and_status_reads_it(tiny_config, tmp_path):
    from edgelora.edge_client.runtime import ClientOptions, EdgeClient
    from edgelora.server.app import run_server

    run = tiny_config(server={"rounds": 3, "devices_per_round": 2, "min_registered": 2})
    run_dir = tmp_path / "run"
    seen = []
    with run_server(run, run_dir, metrics_port=0) as (coord, port):
        addr = (run_dir / "metrics.addr").read_text().strip()
        before = _scrape(addr)
        assert _value(before, "edgelora_rounds_completed_total") == 0
        assert _value(before, 'edgelora_devices{state="registered"}') == 0
        driver = threading.Thread(target=coord.run_rounds, daemon=True)
        driver.start()
        client = EdgeClient(ClientOptions(f"127.0.0.1:{port}", ["0", "1"], progress=False, poll_s=1.0))
        t = threading.Thread(target=client.run, daemon=True)
        t.start()
        deadline = time.monotonic() + 120
        while driver.is_alive() and time.monotonic() < deadline:
            seen.append(_value(_scrape(addr), "edgelora_rounds_completed_total"))
            time.sleep(0.2)
        driver.join(timeout=30)
        final = _scrape(addr)
        status = subprocess.run(cli("status", addr), cwd=REPO, capture_output=True, text=True, timeout=60)
        t.join(timeout=30)
        client.close()
    assert seen == sorted(seen) and seen[-1] >= 2 and len(set(seen)) >= 2  # it advanced while we watched
    assert _value(final, "edgelora_rounds_completed_total") == 3 and _value(final, "edgelora_round") == 3
    assert _value(final, 'edgelora_devices{state="registered"}') == 2
    assert _value(final, 'edgelora_bytes_total{direction="up"}') > 0
    assert _value(final, 'edgelora_phase_seconds_count{phase="train"}') == 6  # 2 devices x 3 rounds
    assert status.returncode == 0, status.stderr
    assert "3 rounds done (dense), finished; 2 devices:" in status.stdout
    assert re.search(r"^  0 +live ", status.stdout, re.M) and re.search(r"^  1 +live ", status.stdout, re.M)
    assert len([l for l in status.stdout.splitlines() if re.match(r"\s+[123] +dense", l)]) == 3
    folder = subprocess.run(cli("status", str(run_dir)), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert folder.returncode == 0 and "round 3 devices: 0 completed, 1 completed" in folder.stdout
    assert len([l for l in folder.stdout.splitlines() if re.match(r"\s+[123] +dense", l)]) == 3
