"""One round's logic, with no transport: plan a task, validate and decode uploads, aggregate, step the
method. The gRPC server (server/) and the in-process simulator drive the same engine."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from edgelora import codec

from .aggregation import RunningMean, apply_aggregate
from .config import RunConfig
from .data import partition_sizes
from .methods import Method, ModelHost
from .models import load_trainable_state, masked_names
from .sparsity import topk_count
from .state import ServerState
from .tasks import Stage, Task, UploadFormat


log = logging.getLogger("edgelora.server")


class UpdateRejected(Exception):
    """An upload the server refuses. `code` maps to a gRPC status in the servicer:
    invalid -> INVALID_ARGUMENT, precondition -> FAILED_PRECONDITION, exists -> ALREADY_EXISTS,
    exhausted -> RESOURCE_EXHAUSTED, unknown (device not registered) -> FAILED_PRECONDITION,
    unavailable -> UNAVAILABLE."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class RoundPlan:
    task: Task
    payload: bytes                       # codec bytes of the download, identical for every sampled device
    shapes: dict[str, tuple[int, ...]]   # the trainable tensors every upload must carry
    masked: frozenset[str]               # tensors that travel as Masked under an UploadFormat.MASKED rule


class RoundEngine:
    def __init__(self, run: RunConfig, method: Method, host: ModelHost) -> None:
        self.run = run
        self.method = method
        self.host = host
        self.before_switch: ServerState | None = None  # set by finish() when the round ended a stage

    @cached_property
    def partition_sizes(self) -> list[int]:
        return partition_sizes(self.run.data)

    def check_examples(self, device_id: str, num_examples: int) -> None:
        """FedAvg weights come from the partition the config assigns, never from what a device claims."""
        expected = self.partition_sizes[int(device_id)]
        if num_examples != expected:
            raise UpdateRejected("invalid", f"num_examples {num_examples} != {expected}, the size of device "
                                            f"{device_id}'s partition")

    def init_state(self, rng_state: dict) -> ServerState:
        stage = self.method.initial_stage()
        params = self.method.init_params(self.host, stage)
        return ServerState(round=0, stage=stage, stage_start=1, params=params, rng=rng_state)

    def plan(self, state: ServerState) -> RoundPlan:
        m = self.method
        structure = m.structure(state)
        task = Task(round=state.round + 1, stage=state.stage, method=m.name, structure=structure,
                    train=m.train_spec(state), upload=m.upload_rule(state), deadline_s=self.run.server.round_deadline_s)
        download = m.download(state)
        payload = codec.encode_bundle(download, value_type=task.upload.value_type)
        model = self.host.build(structure)
        shapes = {n: tuple(v.shape) for n, v in state.params.items()}
        masked = frozenset(masked_names(model, structure)) if task.upload.format == UploadFormat.MASKED else frozenset()
        return RoundPlan(task, payload, shapes, masked)

    def decode_update(self, plan: RoundPlan, payload: bytes) -> dict[str, np.ndarray]:
        """Validate an upload against the round's plan and return the dense delta, or raise UpdateRejected."""
        try:
            tensors = codec.decode_bundle(payload, max_elements=max(1, sum(math.prod(s) for s in plan.shapes.values())))
        except codec.CodecError as e:
            raise UpdateRejected("invalid", f"payload: {e}") from None
        missing = sorted(set(plan.shapes) - set(tensors))
        extra = sorted(set(tensors) - set(plan.shapes))
        if extra:
            raise UpdateRejected("invalid", f"unknown tensor name(s) {extra[:3]} (this round trains {len(plan.shapes)} tensors)")
        if missing:
            raise UpdateRejected("invalid", f"missing tensor(s) {missing[:3]}")
        rule = plan.task.upload
        total_nnz = 0
        delta = {}
        for name, t in tensors.items():
            shape = tuple(t.shape)
            if shape != plan.shapes[name]:
                raise UpdateRejected("invalid", f"tensor {name}: shape {shape} != expected {plan.shapes[name]}")
            expected_form = self._expected_form(plan, name)
            if not isinstance(t, expected_form):
                raise UpdateRejected("invalid", f"tensor {name}: sent as {type(t).__name__}, this round expects "
                                                f"{expected_form.__name__} ({rule.format.name} upload)")
            if isinstance(t, codec.Masked):
                s = plan.task.structure
                if t.seed != s.mask_seed or not math.isclose(t.density, s.mask_density, rel_tol=0, abs_tol=1e-12):
                    raise UpdateRejected("invalid", f"tensor {name}: mask (seed {t.seed}, density {t.density}) is "
                                                    f"not this round's (seed {s.mask_seed}, density {s.mask_density})")
            if isinstance(t, codec.Sparse):
                total_nnz += len(t.indices)
            try:
                delta[name] = codec.to_dense(name, t)
            except codec.CodecError as e:
                raise UpdateRejected("invalid", f"tensor {name}: {e}") from None
            peak = float(np.abs(delta[name]).max()) if delta[name].size else 0.0
            if peak > self.run.server.max_update_abs:
                raise UpdateRejected("invalid", f"tensor {name}: |delta| reaches {peak:.3g}, above "
                                                f"server.max_update_abs = {self.run.server.max_update_abs:g}")
        if rule.format == UploadFormat.TOPK:
            k = topk_count(sum(math.prod(s) for s in plan.shapes.values()), rule.density)
            if total_nnz > k:
                raise UpdateRejected("invalid", f"top-k upload carries {total_nnz} entries; density "
                                                f"{rule.density} allows {k}")
        return delta

    @staticmethod
    def _expected_form(plan: RoundPlan, name: str) -> type:
        fmt = plan.task.upload.format
        if fmt == UploadFormat.TOPK:
            return codec.Sparse
        if fmt == UploadFormat.MASKED and name in plan.masked:
            return codec.Masked
        return codec.Dense

    def finish(self, state: ServerState, agg: RunningMean | None, rng_state: dict) -> ServerState:
        """Aggregate what arrived (None = round abandoned: weights unchanged) and let the method step."""
        mean = None
        params, opt_state = state.params, state.opt_state
        if agg is not None and agg.count:
            mean = agg.mean()
            params, opt_state = apply_aggregate(params, mean, opt_state, self.run.aggregator)
            if not all(np.isfinite(v).all() for v in params.values()):  # never commit a broken model
                log.warning("round %d: the aggregate is not finite; weights left unchanged", state.round + 1)
                mean, params, opt_state = None, state.params, state.opt_state
        new = state.replace(round=state.round + 1, params=params, opt_state=opt_state, rng=rng_state)
        aggregated = new
        new = self.method.after_round(new, self.host, mean)
        # A stage switch (SLoRA's priming) replaces the weights: keep the state it started from, so the round
        # can report the accuracy on both sides of the switch.
        self.before_switch = aggregated if new.stage != aggregated.stage else None
        if new.round >= self.run.server.rounds:
            new = new.replace(finished=True)
        return new

    def model_for(self, state: ServerState):
        """The server's model holding the global weights (for evaluation and saving)."""
        model = self.host.build(self.method.structure(state))
        load_trainable_state(model, state.params)
        return model

    def weight(self, num_examples: int) -> float:
        return float(num_examples) if self.run.aggregator.weighted else 1.0


def stage_name(stage: Stage) -> str:
    return stage.name.lower()
