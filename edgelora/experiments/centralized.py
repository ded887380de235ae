"""The ceiling for a federated run: the same model, structure, tokenizer, max_seq_len and training examples,
trained in one place with one optimizer.

The examples are the union of every device's partition (what the federation holds, caps included), and the
budget is the number of examples the federated run sees: rounds x devices_per_round x mean partition size x
local_epochs. Training is cut into `server.rounds` equal slices, so metrics.jsonl has one row per slice with
the federated run's round numbers (stage "central", no bytes): the two runs plot on the same axes.

Resumable like a simulator run: after every round RUN_DIR/state/ holds the trained parameters and the
optimizer's moments (edgelora.state, atomically), and each round reseeds its own shuffling and dropout, so a
run stopped between rounds and continued ends bit-identical to an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch

from edgelora.configtools import ConfigError
from edgelora.data import Examples, device_examples, held_out_examples, with_num_labels
from edgelora.edge_client.trainer import DeviceHost
from edgelora.methods import make_method
from edgelora.records import RoundRecord
from edgelora.runlog import RunFolder
from edgelora.schema import RunConfig
from edgelora.server.checkpoint import has_state, load_state, save_state
from edgelora.state import ServerState
from edgelora.tasks import Stage
from edgelora.training import evaluate, make_optimizer, train_local


def union_of_partitions(run: RunConfig) -> Examples:
    return Examples.concat([device_examples(run.data, i, run.model.task) for i in range(run.data.num_devices)])


def examples_seen_budget(run: RunConfig, n_union: int) -> int:
    """Examples a federated run of this config trains on: rounds x K x mean partition size x local epochs."""
    mean_size = n_union / run.data.num_devices
    per_round = run.server.devices_per_round * mean_size * run.train.local_epochs
    if run.train.max_steps:
        per_round = min(per_round, run.server.devices_per_round * run.train.max_steps * run.train.batch_size)
    return int(round(run.server.rounds * per_round))


def train_centralized(run: RunConfig, run_dir: Path, device: str = "cpu", echo=None,
                      tensorboard: bool = False, resume: bool = False, stop=None) -> list[dict]:
    """Train (or, with `resume`, continue from RUN_DIR/state) and return metrics.jsonl's rows.

    `stop()` is asked before every round; when it says True the run returns with its state saved."""
    run = with_num_labels(run)
    method = make_method(run)
    if method.initial_stage() != Stage.DENSE:
        raise ConfigError(f"centralized: method {run.method.name!r} changes structure between stages; "
                          f"give its stage's own method (sft for SLoRA's Stage 1, lora for Stage 2)")
    host = DeviceHost(run.model, device)  # the device's own model builder: same structure, same masks
    model, _, masks = host.prepare(method.structure(_state_at(0)))
    masks = {n: torch.from_numpy(m) for n, m in masks.items()}
    examples = union_of_partitions(run)
    test = held_out_examples(run.data, run.model.task)
    budget = examples_seen_budget(run, len(examples))
    per_round = math.ceil(budget / run.server.rounds)
    # One seeded stream of epochs over the union, cut into per-round slices; one optimizer throughout.
    gen = np.random.default_rng(run.server.seed)
    stream = np.concatenate([gen.permutation(len(examples)) for _ in range(math.ceil(budget / len(examples)) + 1)])
    spec = method.train_spec(_state_at(0))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = make_optimizer(list(trainable.values()), spec)
    done = _restore(run_dir, trainable, opt, per_round) if resume else 0
    folder = RunFolder(run_dir, run, resume=done > 0)
    if done:
        folder.drop_rows_after(done)  # rows a crash wrote after the last saved state
    if echo is not None:
        folder.echo = echo
    if tensorboard:
        folder.log_to_tensorboard()
    score = lambda: evaluate(model, test, host.tokenizer, run.model.max_seq_len, host.torch_device,
                             precision=run.train.precision, task=host.task,
                             exact_match_examples=run.server.exact_match_examples)
    if not done and host.task.scores_round0 and len(test):  # the base model, as a federated run's row 0
        folder.append_base(lambda rec: rec.set_scores(score()))
    try:
        for r in range(done + 1, run.server.rounds + 1):
            if stop is not None and stop():
                break
            rec = RoundRecord(round=r, stage="central")
            part = examples.subset(stream[(r - 1) * per_round: r * per_round])
            # one pass over this round's slice (train_local shuffles it, seeded per round)
            spec_r = dataclasses.replace(method.train_spec(_state_at(r - 1)), local_epochs=1, max_steps=0)
            for group in opt.param_groups:  # train.lr_schedule steps per round, as the federated run's does
                group["lr"] = spec_r.lr
            torch.manual_seed(spec_r.seed)
            loss = train_local(model, part, host.tokenizer, spec_r, run.model.max_seq_len, host.torch_device,
                               masks=masks, optimizer=opt, task=host.task)
            if r % run.server.eval_every == 0 or r == run.server.rounds:
                rec.set_scores(score())
            rec.close()
            rec.sampled = rec.completed = 1  # one party holds all the data
            rec.train_loss = loss
            last = r == run.server.rounds
            folder.commit_round(rec, lambda: _save(run_dir, r, trainable, opt, per_round, finished=last),
                                model if last else None)
    finally:  # stopped or not, the plots show every round it ran
        folder.close()
    return folder.records()


def _save(run_dir: Path, round_done: int, trainable: dict, opt: torch.optim.Optimizer, per_round: int,
          finished: bool) -> None:
    """The trained parameters and the optimizer's per-parameter tensors (AdamW's moments and step, SGD's
    momentum), keyed by parameter name, as a ServerState."""
    names = list(trainable)
    moments = {f"{names[i]}/{k}": v.detach().cpu().numpy().astype(np.float32, copy=False).reshape(-1)
               for i, per_param in opt.state_dict()["state"].items() for k, v in per_param.items()
               if torch.is_tensor(v)}
    save_state(ServerState(round=round_done, stage=Stage.DENSE, stage_start=1,
                           params={n: p.detach().cpu().numpy() for n, p in trainable.items()},
                           opt_state=moments, rng={"examples_per_round": per_round}, finished=finished),
               run_dir)


def _restore(run_dir: Path, trainable: dict, opt: torch.optim.Optimizer, per_round: int) -> int:
    """Load what _save wrote; returns the rounds done (0: nothing to continue, start afresh)."""
    if not has_state(run_dir):
        return 0
    state = load_state(run_dir)
    if state.rng.get("examples_per_round") != per_round or set(state.params) != set(trainable):
        raise ConfigError(f"centralized: {run_dir}/state was written for another budget or structure "
                          f"({state.rng.get('examples_per_round')} examples a round, now {per_round}); "
                          f"move that folder away to start again")
    with torch.no_grad():
        for n, p in trainable.items():
            p.copy_(torch.from_numpy(state.params[n]))
    index = {n: i for i, n in enumerate(trainable)}
    per_param: dict[int, dict] = {}
    for key, value in state.opt_state.items():
        name, _, k = key.rpartition("/")
        shape = () if k == "step" else tuple(trainable[name].shape)
        per_param.setdefault(index[name], {})[k] = torch.from_numpy(value.copy()).reshape(shape)
    opt.load_state_dict({"state": per_param, "param_groups": opt.state_dict()["param_groups"]})
    return state.round


def _state_at(round_done: int) -> ServerState:
    return ServerState(round=round_done, stage=Stage.DENSE, stage_start=1, params={})
