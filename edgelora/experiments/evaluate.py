"""`edgelora evaluate`: a run folder's model scored on its held-out split, whichever way it was trained."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from edgelora.config import load_config
from edgelora.configtools import ConfigError
from edgelora.data import held_out_examples, with_num_labels
from edgelora.methods import ModelHost, make_method
from edgelora.models import load_base_model, load_tokenizer
from edgelora.runlog import read_records
from edgelora.server.checkpoint import has_state, load_state
from edgelora.server.engine import RoundEngine
from edgelora.task_types import task_type
from edgelora.training import evaluate


def evaluate_run(run_dir: Path, max_examples: int | None = None, device: str = "cpu") -> dict:
    """A run folder's model on its held-out split (the test split, or the validation carve the run used),
    capped at `max_examples` (0 = the whole split; None = the run's own data.test_max_examples).

    The model is the server state's (simulator and gRPC runs: what the last metrics row evaluated), or, for a
    centralized run, which keeps no server state, its saved final adapter/ or model/."""
    run_dir, device = Path(run_dir), torch.device(device)
    if not (run_dir / "config.toml").exists():
        raise ConfigError(f"evaluate: {run_dir} is not a run folder (no config.toml)")
    run = with_num_labels(load_config(run_dir / "config.toml"))
    if max_examples is not None:
        run = run.replace(data=dataclasses.replace(run.data, test_max_examples=max_examples))
    task = task_type(run.model.task)
    base = load_base_model(run.model).to(device)
    if has_state(run_dir):
        state = load_state(run_dir)
        host = ModelHost(base, frozen=task.frozen_modules(run.model))
        model, rounds = RoundEngine(run, make_method(run), host).model_for(state), state.round
    elif (run_dir / "adapter").is_dir():
        from peft import PeftModel  # only for a centralized run's saved adapter
        model, rounds = PeftModel.from_pretrained(base, str(run_dir / "adapter")), None
    elif (run_dir / "model").is_dir():
        model = type(base).from_pretrained(str(run_dir / "model")).to(device)
        rounds = None
    else:
        raise ConfigError(f"evaluate: {run_dir} holds neither a server state (state/) nor a saved final model "
                          f"(adapter/ or model/)")
    rows = read_records(run_dir / "metrics.jsonl")
    if rounds is None:
        rounds = max((r["round"] for r in rows), default=0)
    test = held_out_examples(run.data, run.model.task)
    scores = evaluate(model, test, load_tokenizer(run.model.name, run.model.task), run.model.max_seq_len, device,
                      precision=run.train.precision, task=task)
    recorded = next((r["accuracy"] for r in reversed(rows) if r.get("round") == rounds
                     and r.get("accuracy") is not None), None)
    return {"run": run_dir.name, "rounds": rounds, "examples": len(test), "accuracy": scores.accuracy,
            "loss": scores.loss, "perplexity": scores.perplexity, "recorded_accuracy": recorded}
