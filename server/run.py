"""The server side of a run, opened and advanced the same way by the gRPC coordinator and the simulator."""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from edgelora.data import held_out_examples, with_num_labels
from edgelora.methods import ModelHost, make_method
from edgelora.models import load_base_model, load_tokenizer
from edgelora.runlog import RunFolder
from edgelora.schema import RunConfig
from edgelora.state import RoundsAbandoned, ServerState
from edgelora.task_types import Scores, task_type
from edgelora.tasks import DeviceInfo
from edgelora.training import evaluate

from .checkpoint import load_state, save_state
from .engine import Round, RoundEngine
from .sampling import sample_devices

log = logging.getLogger("edgelora.server")

_MEASURED = ("uplink_bps", "downlink_bps", "up_bytes_per_entry", "down_bytes_per_entry")


class ServerRun:
    """Run folder, W0, round engine, test split and the current ServerState (fresh, or loaded to resume)."""

    def __init__(self, run: RunConfig, run_dir: Path, resume: bool = False) -> None:
        run = with_num_labels(run)
        self.run = run
        self.folder = RunFolder(run_dir, run, resume=resume)
        self.task = task_type(run.model.task)
        self.tokenizer = load_tokenizer(run.model.name, run.model.task)
        # The method's initial weights (e.g. LoRA's random A) come from the torch RNG right after the base
        # model seeds it: keep this order, or a simulated and a gRPC run start from different weights.
        self.base = load_base_model(run.model)
        self.engine = RoundEngine(run, make_method(run), ModelHost(self.base, frozen=self.task.frozen_modules(run.model)))
        self.test = held_out_examples(run.data, run.model.task)
        if run.data.mode == "partitions":  # the sizes uploads are checked against: partitioned now, not in the
            self.engine.partition_sizes    # first upload's handler (seconds of imports and data, round 1 stalled)
        self._base_host: ModelHost | None = None  # W0 held as the devices hold it (train.base), made when needed
        self.abandoned_in_a_row = 0  # not checkpointed: a resumed run gets max_abandoned_rounds tries again
        if resume:
            self.state = load_state(run_dir)
            self.folder.drop_rows_after(self.state.round)  # rows of a round whose state never landed
            log.info("resumed %s at round %d (stage %s)", run_dir, self.state.round, self.state.stage.name)
        else:
            self.state = self.engine.init_state(np.random.PCG64(run.server.seed).state)
            if self.task.scores_round0 and len(self.test):  # the curve starts where the base model began
                self.folder.append_base(lambda rec: self.score(rec, self.state))
            save_state(self.state, run_dir)

    def evaluate(self, model) -> Scores:
        return evaluate(model, self.test, self.tokenizer, self.run.model.max_seq_len, self.base.device,
                        precision=self.run.train.precision, task=self.task,
                        exact_match_examples=self.run.server.exact_match_examples)

    def devices_base(self, state: ServerState) -> str:
        """The base devices train the served structure on (train.base; fp32 where the structure is not LoRA)."""
        return self.engine.method.train_spec(state).base

    def score(self, rec, state: ServerState) -> None:
        """Scores the served weights into the round's row: on the base the devices train on (train.base),
        and where that is not fp32 also on the fp32 base (accuracy_fp32, loss_fp32), so both are reported."""
        scores = self.evaluate(self.engine.model_for(state))
        base = self.devices_base(state)
        if base != "fp32":
            if self._base_host is None:
                with torch.random.fork_rng():  # loading seeds torch's RNG; the run's own draws stay as they were
                    self._base_host = ModelHost(load_base_model(self.run.model), self.base.device,
                                                frozen=self.task.frozen_modules(self.run.model), share_frozen=True,
                                                reload=lambda: load_base_model(self.run.model))
            rec.eval_base, rec.accuracy_fp32, rec.loss_fp32 = base, scores.accuracy, scores.loss
            scores = self.evaluate(self.engine.model_for(state, self._base_host, base))
        rec.set_scores(scores)

    def device_info(self, device_id: str) -> DeviceInfo:
        """What the server knows of a device when its task is planned: what it measured (ServerState.devices)
        and what the device declared (declared_device)."""
        m = self.state.devices.get(device_id, {})
        return dataclasses.replace(self.declared_device(device_id), **{k: float(v) for k, v in m.items()
                                                                       if k in _MEASURED})

    def declared_device(self, device_id: str) -> DeviceInfo:
        """What the device said of itself (the coordinator: at Register)."""
        return DeviceInfo(device_id)

    def open_round(self, live: list[str]) -> Round:
        """Sample this round's devices from `live` (the checkpointed sampler) and plan each one's task."""
        sampled, rng_state = sample_devices(live, self.state.rng, self.run.server.sampled_per_round)
        return self.engine.open_round(self.state, sampled, rng_state, {d: self.device_info(d) for d in sampled})

    def close_round(self, rnd: Round, before_save: Callable[[ServerState], None] | None = None) -> ServerState:
        """Aggregate if enough devices reported, evaluate when due, then persist; returns the new state
        (the caller installs it, the coordinator under its lock). A round with fewer than server.min_devices
        updates is abandoned: it does not count as one of server.rounds and runs again (see `_abandon`).

        Order matters for crash safety (RunFolder.commit_round): the metrics row and the final model are written
        before the state; `before_save` (what the devices carry between rounds) goes right before it too."""
        cfg, state, rec = self.run.server, self.state, rnd.record
        rnd.close()
        if rnd.agg.count < cfg.min_devices:
            return self._abandon(rnd)
        self.abandoned_in_a_row = 0
        new_state, before_switch = self.engine.finish(state, rnd.agg, rnd.rng_state, rnd.measured_devices())
        rec.aggregated = new_state.params is not state.params
        rec.epsilon = self.engine.privacy_spent(new_state.round)
        if len(self.test) and (new_state.round % cfg.eval_every == 0 or new_state.finished):
            self.score(rec, new_state)
        if before_switch is not None:  # e.g. SLoRA: Stage 1's model, before SVD priming replaced it
            rec.accuracy_before_switch, rec.loss_before_switch = self.evaluate(self.engine.model_for(before_switch)).pair
        rec.close()
        final = self.engine.model_for(new_state) if new_state.finished else None
        if final is not None and self.run.server.samples and len(self.test) and hasattr(self.task, "samples"):
            self.folder.write_samples(self.task.samples(final, self.base, self.test, self.tokenizer,
                                                        self.run.model.max_seq_len, self.base.device,
                                                        self.run.server.samples, self.run.server.sample_tokens))

        def save() -> None:
            if before_save is not None:
                before_save(new_state)
            save_state(new_state, self.folder.path)

        self.folder.commit_round(rec, save, final)
        return new_state

    def _abandon(self, rnd: Round) -> ServerState:
        """The round ends with the weights, the round count and the method's stage as they were; only the
        sampler moves on (the next try draws afresh) and the links measured stay. Its record goes to
        RUN_DIR/abandoned.jsonl (bytes spent included), not to metrics.jsonl. After max_abandoned_rounds in
        a row the run stops with RoundsAbandoned, its state saved."""
        cfg, rec = self.run.server, rnd.record
        self.abandoned_in_a_row += 1
        rec.aggregated = False
        rec.close()
        self.folder.append_abandoned(rec, self.abandoned_in_a_row, cfg.max_abandoned_rounds, cfg.min_devices)
        new_state = self.state.replace(rng=rnd.rng_state, devices=rnd.measured_devices())
        save_state(new_state, self.folder.path)
        if self.abandoned_in_a_row >= cfg.max_abandoned_rounds:
            self.state = new_state
            raise RoundsAbandoned(f"round {rnd.number} was abandoned {self.abandoned_in_a_row} times in a row "
                                  f"(server.max_abandoned_rounds = {cfg.max_abandoned_rounds}): the run stops after "
                                  f"{new_state.round} rounds, its state saved in {self.folder.path}; continue it "
                                  f"with --resume when devices are back")
        return new_state
