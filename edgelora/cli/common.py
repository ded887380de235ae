"""Helpers every command group shares: flags, logging, run folders, device ids."""
from __future__ import annotations

import argparse
import logging
import os
from datetime import datetime
from pathlib import Path

from ..configtools import ConfigError


def _verbose_flag(sub: argparse.ArgumentParser) -> None:
    """-v after the subcommand too; SUPPRESS as the default, so a subcommand without it does not reset the
    `edgelora -v server ...` given before it."""
    sub.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

def _tensorboard_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tensorboard", action="store_true", help="also log each round to RUN_DIR/tb for TensorBoard")

class _DropMessage(logging.Filter):
    """Drops a logger's records whose message holds `text`."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


# (logger, words of the message): third-party lines that say nothing to a user of ours, dropped from the terminal.
# peft imports bitsandbytes wherever it is installed, at the first LoRA model a process builds (the quant and test
# extras install it), and bitsandbytes then says it could not fetch an optional CPU 4-bit kernel from the Hugging
# Face Hub (the `kernels` package): every server, client and simulation printed it, quantized or not. Its own
# kernel is used instead; edgelora never downloads code.
QUIET_LINES = (("bitsandbytes.backends.cpu.ops", "from kernels-community"),)


def _setup_logging(verbose: bool, quiet: bool = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for name, text in QUIET_LINES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.text == text for f in logger.filters):
            logger.addFilter(_DropMessage(text))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if quiet:  # transformers' "Loading weights" bars too
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*requires_grad=True to a scalar.*")

def default_run_dir() -> Path:
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")

def parse_device_ids(text: str) -> list[str]:
    """'3' -> ['3']; '0-3' -> ['0','1','2','3']; '0,2,5-6' -> ['0','2','5','6']."""
    out: list[str] = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            lo, hi = part.split("-", 1)
            if not (lo.isdigit() and hi.isdigit()) or int(lo) > int(hi):
                raise ConfigError(f"--device-ids: {part!r} is not a range like 0-49")
            out += [str(i) for i in range(int(lo), int(hi) + 1)]
        elif part.isdigit():
            out.append(part)
        else:
            raise ConfigError(f"--device-ids: {part!r} is not a device index")
    return out

def _replace(obj, **kw):
    import dataclasses

    new = dataclasses.replace(obj, **kw)
    new.validate()
    return new

def _torch_device(device: str) -> str:
    """--device cpu|cuda|auto -> a torch device name; cuda without a GPU is a clear error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available here")
    return device
