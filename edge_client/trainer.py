"""The device side of a round, with no transport: apply the download, train, compute and encode the update.

A device is a generic executor of the task's Structure / TrainSpec / UploadRule, so methods live on the
server. The gRPC edge client and the simulator both call DeviceTrainer.run().
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch

from edgelora import codec
from edgelora.data import Examples, device_examples
from edgelora.frozen_base import release_freed_memory
from edgelora.models import ModelHost, load_base_model, load_tokenizer, trainable_params, trainable_state
from edgelora.schema import DataConfig, ModelConfig
from edgelora.secagg import coordinates as coords
from edgelora.secagg.ring import encode as ring_encode
from edgelora.sparsity import global_topk
from edgelora.task_types import task_type
from edgelora.tasks import PhaseTimes, Structure, Task, Update, UploadFormat, device_index, device_seed
from edgelora.training import batches, evaluate, train_local

from .secagg import SecAggDevice


class DownloadError(ValueError):
    """The task's payload does not fit this device's model (a server bug or a corrupted stream)."""


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, MB: its high-water mark over loading and every round it
    trained (a process hosting many virtual devices reports its own, shared by them)."""
    try:
        import resource
    except ImportError:  # Windows: not reported
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def resident_mb() -> float:
    """What this process holds in memory now, MB (Linux; 0 elsewhere: not reported)."""
    try:
        pages = int(open("/proc/self/statm").read().split()[1])
        return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError, IndexError):
        return 0.0


def available_mb() -> float:
    """The memory this process may grow to, as the OS tells it: what it holds plus what the OS says is
    available (MemAvailable; Linux). 0 where the OS does not say (then nothing is declared)."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return round(int(line.split()[1]) / 1024 + resident_mb(), 1)
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


class DeviceHost(ModelHost):
    """One process's base model, tokenizer and built structure, shared by the virtual devices it hosts."""

    def __init__(self, model: ModelConfig, torch_device: str = "cpu") -> None:
        self.task = task_type(model.task)
        # a device never writes into its base: its LoRA models share the base's weights (build_model)
        super().__init__(load_base_model(model), torch_device, frozen=self.task.frozen_modules(model),
                         share_frozen=True, reload=lambda: load_base_model(model))
        self.model_cfg = model
        self.tokenizer = load_tokenizer(model.name, model.task)


def warm_up_pass(model, examples: Examples, host: ModelHost) -> None:
    """One forward pass over a single example, no gradients kept, then the heap's freed pages handed back: what
    is resident afterwards (every base weight read once) is what the device declares at Register. It runs
    before the coordinator has fitted a plan to the device, so it must stay small: a backward pass over one
    128-token row of SmolLM2 alone peaked 350 MB above that (benchmarks.lm_device)."""
    enc, labels = next(iter(batches(examples, host.tokenizer, host.model_cfg.max_seq_len, 1, np.arange(1),
                                    host.task)))
    with torch.no_grad():
        model(**{k: v.to(host.torch_device) for k, v in enc.items()}, labels=labels.to(host.torch_device))
    release_freed_memory()


class DeviceTrainer:
    def __init__(self, device_id: str, host: DeviceHost, data: DataConfig, examples: Examples | None = None,
                 progress: bool = False, eval_examples: Examples | None = None) -> None:
        """`examples`: the device's own training data (data.mode = own), else its partition of the run's
        dataset; `eval_examples`: its held-out data for federated evaluation."""
        self.device_id = device_id
        self.host = host
        self.examples = examples if examples is not None else device_examples(data, device_index(device_id),
                                                                              host.model_cfg.task)
        self.eval_examples = eval_examples
        # A partition of a shared dataset is an experiment: stochastic rounding and secure aggregation's noise
        # are seeded per round and device, so a run is reproducible bit for bit. On a device's own data they
        # come from the OS: a seed the coordinator could know would let it subtract the noise.
        self.reproducible = examples is None
        self.progress = progress
        self.residual: dict[str, np.ndarray] = {}  # FLASC error feedback: what top-k did not send
        self._pending_residual: dict[str, np.ndarray] | None = None

    def run(self, task: Task, payload: bytes, download_s: float = 0.0, secure: SecAggDevice | None = None) -> Update:
        """`secure`: the device's secure-aggregation session for the task's round (a secure task's upload is
        masked with it)."""
        model, init, masks = self.host.prepare(task.structure, task.train.base)
        received = self._apply_download(model, init, payload)
        scored = (0, 0.0, 0.0)
        if task.evaluate and self.eval_examples is not None and len(self.eval_examples):
            acc, loss = evaluate(model, self.eval_examples, self.host.tokenizer, self.host.model_cfg.max_seq_len,
                                 self.host.torch_device, precision=task.train.precision, task=self.host.task).pair
            scored = (len(self.eval_examples), loss, acc)
        # Dropout draws from torch's global RNG: seed it per (task, device) so a run is reproducible, and the
        # simulator and a real deployment train identically.
        torch.manual_seed(self._task_seed(task))
        t0 = time.perf_counter()
        loss = train_local(model, self.examples, self.host.tokenizer, task.train, self.host.model_cfg.max_seq_len,
                           self.host.torch_device,
                           masks={n: torch.from_numpy(m) for n, m in masks.items()}, task=self.host.task,
                           progress=f"device {self.device_id} round {task.round}" if self.progress else None)
        t1 = time.perf_counter()
        trained = trainable_state(model)
        delta = {n: trained[n] - received[n] for n in trained}
        if task.upload.secure is not None:
            # Only the masked vector speaks for this device's data: the example count travels inside it, and
            # the scalars computed on the data (training loss, held-out score) are not sent at all.
            # (nor the peak memory, whose size follows the data's lengths)
            upload, examples = self._encode_secure(task, delta, masks, received, secure), 0
            loss, scored, peak = float("nan"), (0, 0.0, 0.0), 0.0
        else:
            upload, examples, peak = self._encode(task, delta, masks), len(self.examples), peak_rss_mb()
        t2 = time.perf_counter()
        return Update(self.device_id, task.round, examples, upload, loss,
                      PhaseTimes(download_s=download_s, train_s=t1 - t0, encode_s=t2 - t1), task_id=task.task_id,
                      eval_examples=scored[0], eval_loss=scored[1], eval_accuracy=scored[2], peak_rss_mb=peak)

    def warm_up(self, structure: Structure) -> float:
        """Build `structure` on the host and run one forward pass on one of this device's examples
        (warm_up_pass), so the first task does not pay for the build and for reading the weights in (a device
        does this before it registers). Weights are untouched (no gradients, no step) and training reseeds
        torch's RNG per task, so it changes no result. Returns the seconds it took."""
        t0 = time.perf_counter()
        model, _, _ = self.host.prepare(structure)
        if len(self.examples):
            warm_up_pass(model, self.examples, self.host)
        return time.perf_counter() - t0

    def _task_seed(self, task: Task) -> int:
        """One seed per (round, device): dropout's draws and stochastic rounding's come from it."""
        return task.train.seed * 1_000_003 + device_seed(self.device_id)

    @property
    def has_state(self) -> bool:
        """Whether this device carries state from one round to the next (FLASC's error-feedback residual)."""
        return bool(self.residual) or self._pending_residual is not None

    def accepted(self) -> None:
        """The server accepted the last update: only now does error feedback keep what it did not send, so a
        refused and retried upload does not count the residual twice."""
        if self._pending_residual is not None:
            self.residual, self._pending_residual = self._pending_residual, None

    def _apply_download(self, model, init: dict[str, np.ndarray], payload: bytes) -> dict[str, np.ndarray]:
        try:
            tensors = codec.decode_bundle(payload)
        except codec.CodecError as e:
            raise DownloadError(f"download payload: {e}") from None
        params = trainable_params(model)
        missing = sorted(set(params) - set(tensors))
        if missing:
            raise DownloadError(f"download lacks trainable tensors {missing[:3]}")
        received = {}
        with torch.no_grad():
            for name, t in tensors.items():
                if name not in params:
                    raise DownloadError(f"download names {name!r}, which this model does not train")
                # Masked: untouched entries are W0's; Sparse (FLASC top-k): zeros elsewhere; Dense: all given.
                base = init[name] if isinstance(t, codec.Masked) else None
                value = codec.to_dense(name, t, base=base)
                if value.shape != tuple(params[name].shape):
                    raise DownloadError(f"download {name}: shape {value.shape} != model {tuple(params[name].shape)}")
                params[name].copy_(torch.from_numpy(value))
                received[name] = value
        return received

    def _encode(self, task: Task, delta: dict[str, np.ndarray], masks: dict[str, np.ndarray]) -> bytes:
        rule = task.upload
        feedback = rule.format == UploadFormat.TOPK and rule.error_feedback
        if rule.format == UploadFormat.TOPK:
            if feedback:
                delta = {n: d + self.residual.get(n, 0.0) for n, d in delta.items()}
            tensors: dict[str, codec.Tensor] = dict(global_topk(delta, rule.density))
        elif rule.format == UploadFormat.MASKED:
            s = task.structure
            tensors = {n: (codec.Masked(d.shape, s.mask_seed, s.mask_density, d[masks[n]].astype(np.float32))
                           if n in masks else codec.Dense(d)) for n, d in delta.items()}
        else:
            tensors = {n: codec.Dense(d) for n, d in delta.items()}
        # Stochastic rounding draws from a stream fixed by (round seed, device), so a run is reproducible.
        payload = codec.encode_bundle(tensors, value_type=rule.value_type, rounding=rule.rounding,
                                      seed=self._task_seed(task))
        if feedback:  # what was sent is what the server decodes: top-k's and rounding's errors both carry over
            sent = codec.decode_bundle(payload)
            self._pending_residual = {n: delta[n] - codec.to_dense(n, sent[n]) for n in delta}
        return payload

    def _encode_secure(self, task: Task, delta: dict[str, np.ndarray], masks: dict[str, np.ndarray],
                       received: dict[str, np.ndarray], secure: SecAggDevice | None) -> bytes:
        """A secure round's upload: the delta at the round's shared coordinates, fixed point in the announced
        ring (clipped, weighted, stochastically rounded, with this device's share of the noise), masked."""
        up = task.upload.secure
        if secure is None or task.masking is None:
            raise DownloadError(f"round {task.round}: a secure task, but this device holds no keys for it (it "
                                f"missed the round's key phases)")
        feedback = task.upload.error_feedback
        if feedback:
            delta = {n: d + self.residual.get(n, 0.0) for n, d in delta.items()}
        shapes = {n: tuple(d.shape) for n, d in delta.items()}
        sets = coords.coordinate_sets(up, shapes, task.structure, masks.keys(), received)
        values = coords.gather(delta, sets)
        # Stochastic rounding and DP noise, not masks (those are AES-CTR keyed by the pairwise agreement, in
        # edge_client/secagg.py): seeded by the round in experiments, by the OS on a device's own data.
        rng = np.random.default_rng(self._task_seed(task) if self.reproducible else None)
        vector = ring_encode(values, len(self.examples), up.ring, rng)
        payload = codec.encode_ring(secure.mask(vector, task.masking), up.ring.bits)
        if feedback:  # what the round's coordinates left out carries over (FLASC's random-k)
            sent = coords.scatter(values, sets, shapes)
            self._pending_residual = {n: delta[n] - sent[n] for n in delta}
        return payload
