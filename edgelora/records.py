"""What a round leaves on record: a RoundRecord per round (a row of metrics.jsonl) holding a DeviceRecord per
sampled device. The round's engine fills them (server.engine.Round owns every write); the run folder (runlog)
writes and reads them. Plain dataclasses: no I/O here."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field


@dataclass
class DeviceRecord:
    device_id: str
    status: str = "sampled"          # sampled -> completed | rejected | dropped
    num_examples: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    train_loss: float = float("nan")
    download_s: float = 0.0
    train_s: float = 0.0
    encode_s: float = 0.0
    upload_s: float = 0.0
    task_sent_at: float = 0.0        # seconds since the round started (server clock), when each phase began/ended:
    download_done_at: float = 0.0    # last task chunk handed to gRPC
    upload_started_at: float = 0.0   # upload header received
    upload_done_at: float = 0.0      # upload decoded and aggregated
    update_norm: float = 0.0         # global L2 norm of the accepted delta, before any clipping
    eval_examples: int = 0           # federated evaluation: held-out examples the device scored (0 = none)
    eval_loss: float = 0.0
    eval_accuracy: float = 0.0
    peak_rss_mb: float = 0.0         # the device process's peak resident memory when it uploaded (0: not reported)
    memory_mb: float = 0.0           # the memory the device declared at Register (0: none declared)
    plan: str = ""                   # the memory plan fitted to it (edgelora.memory.fit; "" = the task as made)
    predicted_mb: float = 0.0        # the memory model's prediction of its peak under that plan
    error: str = ""


@dataclass
class RoundRecord:
    round: int
    stage: str
    sampled: int = 0
    completed: int = 0
    accuracy: float | None = None    # a classifier's accuracy; a causal LM's next-token accuracy
    loss: float | None = None        # mean cross-entropy (per example; per target token)
    perplexity: float | None = None  # causal LM: exp(loss)
    exact_match: float | None = None  # causal LM on instruction data: greedy answers equal to the reference
    bytes_down: int = 0
    bytes_up: int = 0
    seconds: float = 0.0
    train_loss: float | None = None
    accuracy_before_switch: float | None = None  # a round that ends a stage (SLoRA's priming): the model before it
    loss_before_switch: float | None = None
    aggregated: bool = False
    epsilon: float | None = None     # dp-fedavg: privacy spent after this round, at the aggregator's delta
    # federated evaluation (data.mode = own): the model this round started from, scored by its devices on their
    # held-out data, example-weighted
    fed_accuracy: float | None = None
    fed_loss: float | None = None
    fed_examples: int = 0
    # train.base other than fp32: the scores above are on the base the devices train on (eval_base), and these
    # are the same weights on the fp32 base
    eval_base: str | None = None
    accuracy_fp32: float | None = None
    loss_fp32: float | None = None
    started_at: float = field(default_factory=time.time)
    devices: dict[str, DeviceRecord] = field(default_factory=dict)

    def set_scores(self, scores) -> None:
        """An evaluation's Scores (edgelora.task_types) into this row."""
        self.accuracy, self.loss = scores.accuracy, scores.loss
        self.perplexity, self.exact_match = scores.perplexity, scores.exact_match

    def close(self) -> None:
        done = [d for d in self.devices.values() if d.status == "completed"]
        self.sampled = len(self.devices)
        self.completed = len(done)
        self.bytes_down = sum(d.bytes_down for d in self.devices.values())
        self.bytes_up = sum(d.bytes_up for d in self.devices.values())
        losses = [d.train_loss for d in done if not math.isnan(d.train_loss)]
        self.train_loss = sum(losses) / len(losses) if losses else None
        scored = [d for d in done if d.eval_examples]
        self.fed_examples = sum(d.eval_examples for d in scored)
        if self.fed_examples:
            self.fed_accuracy = sum(d.eval_accuracy * d.eval_examples for d in scored) / self.fed_examples
            self.fed_loss = sum(d.eval_loss * d.eval_examples for d in scored) / self.fed_examples
        self.seconds = time.time() - self.started_at

    def to_json(self) -> dict:
        d = asdict(self)
        d["devices"] = [_clean(asdict(r)) for r in self.devices.values()]
        return _clean(d)


def _clean(d: dict) -> dict:
    # JSON has no NaN/Infinity: a non-finite number (e.g. a diverged loss) is written as null
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}
