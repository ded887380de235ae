"""What a new user sees when something goes wrong: one line on stderr, never a traceback. Argument and config
errors run `edgelora.cli.main` in this process (the code a user's command runs, without a second interpreter
importing torch); what needs a process of its own (Ctrl-C, a fresh transformers) runs the CLI as a user does."""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w

from edgelora.experiments.sweep import rounds_done

from .conftest import REPO, cli_ctrl_c_after_round, sigint_default, tiny_raw


def _main(capsys, *args: str) -> tuple[int, str, str]:
    """`edgelora ARGS` in this process: (exit code, stdout, stderr). The CLI's global settings (transformers'
    progress bars) are put back."""
    from transformers.utils import logging as hf_logging

    from edgelora.cli import main

    bars = hf_logging.is_progress_bar_enabled()
    try:
        code = main(list(args))
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    out = capsys.readouterr()
    return code, out.out, out.err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(tmp_path: Path, **sections) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(tomli_w.dumps(tiny_raw(**sections)))
    return path


def test_unknown_model_without_the_hub_is_one_line(tmp_path, capsys, monkeypatch):
    # HF_ENDPOINT at a closed local port: the Hub is unreachable however the test machine is connected
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_free_port()}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    code, _, err = _main(capsys, "simulate", "--config", str(_config(tmp_path)), "--model", "not-a-model",
                         "--out", str(tmp_path / "r"), "--quiet")
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "'not-a-model' is not a local path or a known preset" in err
    assert "Hugging Face Hub is unreachable" in err


def test_client_without_a_server_is_one_line(capsys):
    code, _, err = _main(capsys, "client", "--server", f"127.0.0.1:{_free_port()}", "--device-id", "0",
                         "--give-up-s", "2", "--insecure", "--quiet")
    assert code == 1, err
    assert "Traceback" not in err
    assert "unreachable" in err.splitlines()[-1], err


def test_a_client_budget_that_is_not_a_size_is_one_line(capsys):
    code, _, err = _main(capsys, "client", "--server", "127.0.0.1:1", "--device-id", "0", "--memory-mb", "-5",
                         "--insecure", "--quiet")
    assert code == 2 and "Traceback" not in err
    assert "--memory-mb: must be > 0 MB, got -5.0" in err, err


def test_simulate_refuses_more_devices_a_round_than_devices_as_the_server_does(tmp_path, capsys):
    code, _, err = _main(capsys, "simulate", "--config", str(_config(tmp_path)), "--devices", "3",
                         "--per-round", "5", "--out", str(tmp_path / "r"), "--quiet")
    assert code == 2 and "Traceback" not in err
    assert "server.devices_per_round: (5) exceeds data.num_devices (3)" in err
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_ctrl_c_in_simulate_is_one_line_and_says_how_to_resume(tmp_path):
    out = tmp_path / "r"
    proc = subprocess.run(cli_ctrl_c_after_round(1, "simulate", "--config", str(_config(tmp_path, server={"rounds": 3})),
                                                 "--out", str(out), "--quiet"),
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          preexec_fn=sigint_default, timeout=240)
    err = proc.stderr
    assert proc.returncode == 130, err
    assert rounds_done(out) == 1
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert f"interrupted; finished rounds are saved in {out} (continue with --resume {out})" in err


def test_methods_name_prints_its_fields_with_defaults(capsys):
    code, out, err = _main(capsys, "methods", "slora")
    assert code == 0, err
    assert "stage1_rounds = 0" in out and "lora.rank = 8" in out and "Stage 1 mask density" in out
    code, _, err = _main(capsys, "methods", "sloar")
    assert code == 2 and "unknown method 'sloar'" in err and "Traceback" not in err


def test_model_loads_show_no_transformers_loading_bar_and_leave_the_setting_as_it_was():
    # a bare transformers load of the same folder prints the bar, so its absence from edgelora's load means something
    code = ("import sys; from transformers import AutoModelForSequenceClassification as A; "
            "from transformers.utils import logging as L; from edgelora.models import load_base_model; "
            "from edgelora.hub import resolve_model_name; {load}; sys.stdout.write(str(L.is_progress_bar_enabled()))")
    bare = "A.from_pretrained(resolve_model_name('minilm'), num_labels=3)"
    ours = "load_base_model('minilm', 3, 0)"
    runs = {k: subprocess.run([sys.executable, "-c", code.format(load=v)], capture_output=True, text=True, timeout=120)
            for k, v in (("bare", bare), ("ours", ours))}
    assert all(p.returncode == 0 for p in runs.values()), runs["ours"].stderr + runs["bare"].stderr
    assert "Loading weights" in runs["bare"].stderr
    assert "Loading weights" not in runs["ours"].stderr
    assert runs["ours"].stdout == "True"  # the bar is off for our load only, not for the user's own loads after it


@pytest.mark.parametrize("argv, verbose", [(["-v", "server", "--config", "x.toml"], True),
                                           (["server", "-v", "--config", "x.toml"], True),
                                           (["server", "--config", "x.toml"], False),
                                           (["--verbose", "simulate", "--config", "x.toml"], True)])
def test_verbose_counts_before_and_after_the_subcommand(argv, verbose):
    from edgelora.cli import build_parser

    assert getattr(build_parser().parse_args(argv), "verbose", False) is verbose


def test_bitsandbytes_kernel_hub_line_is_dropped_and_its_other_warnings_are_not(caplog):
    import logging

    from edgelora.cli.common import _setup_logging

    _setup_logging(False)
    _setup_logging(False)  # a second call adds no second filter
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert len(bnb.filters) == 1
    with caplog.at_level(logging.WARNING):
        bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'.")
        bnb.warning("some other trouble")
    assert [r.getMessage() for r in caplog.records] == ["some other trouble"]
