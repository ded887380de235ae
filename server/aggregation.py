"""Aggregators: `[aggregator] name = "..."` picks one (its Config: edgelora.schema.AGGREGATOR_CONFIGS), as
`[method]` picks a method (Flower's strategies, aggregate.py's pure functions).

An Aggregator has three hooks and no state of its own: `start()` gives the round's accumulator, devices'
deltas (trained - received) are `add`ed to it as they arrive (after `clip`), and `finish(params, acc,
opt_state)` returns the new weights and server-optimizer state, which live in ServerState (checkpointed).

- fedavg: the (example-weighted) mean delta; `clip_norm` scales each delta to global L2 norm <= C first.
  Memory: one running sum, whatever the number of devices (and up to as much again of top-k uploads waiting to
  be added: RunningMean.flush). A delta comes in the form it travelled (`Delta`):
  per tensor a dense array or codec.Sparse (a masked upload's values at the mask's indices), or, for a top-k
  upload, one FlatSparse over every tensor laid end to end; k values are added at their k indices, in one
  step for a FlatSparse: the work per upload grows with what was sent, not with the model or its tensors.
- fedadam: the same mean delta as a negative pseudo-gradient for a server AdamW (Reddi et al. 2021, Alg. 2).
- median / trimmed-mean: coordinate-wise median, or the mean after dropping the floor(beta K) largest and
  smallest values of each coordinate (Yin et al. 2018): robust to a minority of arbitrary updates. Memory:
  all K deltas of the round (K copies of the trainable weights).
- dp-fedavg: central DP (McMahan et al. 2018, DP-FedAvg): each delta clipped to C, unweighted sum + Gaussian
  noise N(0, (z C)^2) per coordinate, divided by K = server.devices_per_round (a fixed denominator); epsilon
  spent at `delta` is reported every round by dp-accounting's RDP accountant. Memory: the running sum.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import numpy as np

from edgelora import codec
from edgelora.configtools import ConfigError
from edgelora.schema import DpFedAvgConfig, FedAdamConfig, FedAvgConfig, MedianConfig, TrimmedMeanConfig

Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class Layout:
    """Tensors laid end to end in one flat vector, in this order: tensor i takes [starts[i], starts[i + 1])."""
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, shapes: dict[str, tuple[int, ...]]) -> "Layout":
        return cls(tuple(shapes), tuple(tuple(s) for s in shapes.values()))

    @cached_property
    def starts(self) -> np.ndarray:
        out = np.zeros(len(self.names) + 1, np.int64)
        np.cumsum([math.prod(s) for s in self.shapes], out=out[1:])
        return out

    @property
    def size(self) -> int:
        return int(self.starts[-1])

    def views(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Each tensor's part of `flat`, shaped (views: writing to one writes to `flat`)."""
        s = self.starts
        return {n: flat[s[i]:s[i + 1]].reshape(shape) for i, (n, shape) in enumerate(zip(self.names, self.shapes))}


@dataclass(frozen=True, eq=False)
class FlatSparse:
    """A sparse delta over every tensor of `layout` at once: strictly increasing positions in the layout's flat
    vector and their float32 values; everything else is zero. A top-k upload reaches the aggregator in this
    form (codec.decode_flat), so its norm, clipping and running sum are each one whole-array step, however
    many tensors it spans."""
    layout: Layout
    positions: np.ndarray  # int64
    values: np.ndarray  # float32

    def __post_init__(self) -> None:
        """ValueError unless positions and values are what the accumulator relies on (check_coordinates): a
        FlatSparse that exists is one it may add without looking again."""
        check_coordinates(codec.Sparse((self.layout.size,), self.positions, self.values))

    def tensors(self) -> dict[str, codec.Sparse]:
        """The same delta, tensor by tensor."""
        cuts = np.searchsorted(self.positions, self.layout.starts)
        return {n: codec.Sparse(shape, self.positions[cuts[i]:cuts[i + 1]] - self.layout.starts[i],
                                self.values[cuts[i]:cuts[i + 1]])
                for i, (n, shape) in enumerate(zip(self.layout.names, self.layout.shapes))}


# A device's delta in the form it travelled: per tensor dense, or codec.Sparse (sorted unique flat indices and
# their values; everything else is zero), or one FlatSparse over every tensor. Round.check returns one,
# Round.accept aggregates it.
Delta = "dict[str, np.ndarray | codec.Sparse] | FlatSparse"


def check_coordinates(t: codec.Sparse) -> None:
    """ValueError unless `t` is what the sparse accumulator relies on: a value per index, and 1-D integer
    indices strictly increasing (so unique: a fancy-index `+=` would add a repeated index once) inside the
    tensor. O(k). The codec's decoder guarantees it for uploads; this keeps any other caller honest."""
    idx, n = t.indices, math.prod(t.shape)
    if not isinstance(idx, np.ndarray) or idx.ndim != 1 or idx.dtype.kind not in "iu":
        raise ValueError("indices must be a 1-D integer numpy array")
    if np.size(t.values) != idx.size:
        raise ValueError(f"{np.size(t.values)} values for {idx.size} indices")
    if idx.size and (idx[0] < 0 or idx[-1] >= n or (idx[1:] <= idx[:-1]).any()):
        raise ValueError(f"indices must be strictly increasing (sorted, no duplicates) in [0, {n})")


def densify(name: str, t) -> np.ndarray:
    """The float32 array a tensor of a Delta stands for (what the robust aggregators hold)."""
    return codec.to_dense(name, t) if isinstance(t, codec.Sparse) else np.asarray(t, np.float32)


def by_tensor(delta: Delta) -> dict:
    """A Delta as a dict of tensors (a FlatSparse cut into its tensors)."""
    return delta.tensors() if isinstance(delta, FlatSparse) else delta


def _flat_values(t) -> np.ndarray:
    return np.asarray(t.values if isinstance(t, codec.Sparse) else t).reshape(-1)


_MINUS_ZERO = np.uint64(1 << 63)  # the bits of float64 -0.0


def _products(values: np.ndarray, weight: float) -> np.ndarray:
    """weight x values in float64, value by value (the dense path's weight x delta)."""
    products = values.astype(np.float64)
    products *= weight
    return products


PENDING_BYTES = 64 << 20  # top-k uploads wait to be added until this much, or the sum's size, is waiting
SWEEP_BLOCK = 1 << 19  # entries of the sum a flush adds every waiting upload to at a time (4 MiB of float64)
_NONE = np.zeros(0, np.int64)  # no -0.0 positions


@dataclass
class AtIndices:
    """A tensor's running sum while every upload so far sent the same indices (a mask is shared by every
    device of a round): the float64 sums of its k entries; every other entry's sum is +0.0."""
    shape: tuple[int, ...]
    indices: np.ndarray
    total: np.ndarray


class RunningMean:
    """Weighted running sum: memory is at most one float64 copy of the weights, whatever the number of devices.

    A codec.Sparse tensor is added at its k indices only, so an upload costs what it sent, not the model:
    - while every upload of a tensor sends the same indices (a masked upload: every device shares the mask),
      its sum is k float64 values (AtIndices), added to in order like a dense array of k;
    - once indices differ (top-k) or a dense upload comes, the tensor's float64 sum is made whole, once per
      round, and a sparse upload adds at its indices (one fancy-index `+=`: they are unique, check_coordinates).
    A FlatSparse (a top-k upload over every tensor) that starts a round makes the sum one float64 vector over
    its layout, with each tensor's sum a view of it; every later FlatSparse of the round waits (at most the
    sum's size, and PENDING_BYTES, of them), and the waiting ones are added together by `flush` in a sweep of
    the sum a cache-sized block at a time: each entry gets the same additions in the same order as one upload
    at a time, but the sum's memory is crossed once for all of them, not once each (at 1/16 about half its
    cache lines are touched per upload, so an add cost about what a dense one does). Anything that reads the
    sum flushes first. (A dict delta after it turns the sum back into tensors: its views, and the -0.0
    positions cut per tensor.)
    Either way the sum is bit for bit the dense path's (sum += weight x the dense delta): weight x 0.0 = +0.0
    changes no number, and the one bit it changes (-0.0 + +0.0 = +0.0) is reproduced where a sparse add
    skips a -0.0 entry (rare: a sum entry is -0.0 only where the values added there were -0.0)."""

    def __init__(self) -> None:
        self._sums: dict[str, np.ndarray | AtIndices] = {}  # insertion order: dp-fedavg draws noise in it
        self.weight = 0.0
        self.count = 0
        # flat positions of a whole sum holding -0.0 (absent: none; None: unknown, a dense add came last)
        self._minus_zeros: dict[str, np.ndarray | None] = {}
        self._flat: tuple[Layout, np.ndarray] | None = None  # the sum as one vector, while FlatSparse adds come
        self._flat_minus = np.zeros(0, np.int64)  # its -0.0 positions
        # FlatSparse adds not yet made, in arrival order: (positions, values, weight); the delta's arrays are
        # held as they are (a FlatSparse is not changed after it is made), the float64 products made block by
        # block in the flush
        self._waiting: list[tuple[np.ndarray, np.ndarray, float]] = []
        self._waiting_bytes = 0

    @property
    def sum(self) -> Arrays:
        """Every tensor's float64 sum, whole (an AtIndices sum is made whole here, once)."""
        self.flush()
        for name in list(self._sums):
            self._whole(name)
        return self._sums

    @property
    def held_bytes(self) -> int:
        """Bytes of the sums as held: k float64 values per AtIndices tensor, n per whole one (the waiting adds
        are not counted: at most the sum's size more)."""
        return sum(v.total.nbytes if isinstance(v, AtIndices) else v.nbytes for v in self._sums.values())

    def add(self, delta: Delta, weight: float) -> None:
        if weight <= 0:
            raise ValueError(f"weight must be > 0, got {weight}")
        if isinstance(delta, FlatSparse):
            if not self._sums or (self._flat is not None and self._flat[0] == delta.layout):
                self._add_flat(delta, weight)  # checked when it was made
                self.weight += weight
                self.count += 1
                return
            delta = delta.tensors()
        self._unflatten()
        for k, v in delta.items():  # every tensor checked before any is added: a refused delta adds nothing
            held = self._sums.get(k)
            if isinstance(v, codec.Sparse) and not (isinstance(held, AtIndices) and v.indices is held.indices):
                try:
                    check_coordinates(v)
                except ValueError as e:
                    raise ValueError(f"{k}: {e}") from None
        for k, v in delta.items():
            if isinstance(v, codec.Sparse):
                self._add_sparse(k, v, weight)
            elif k in self._sums:
                self._whole(k)
                self._sums[k] += weight * v.astype(np.float64)
                self._minus_zeros[k] = None
            else:
                self._sums[k] = weight * v.astype(np.float64)
                self._minus_zeros[k] = None
        self.weight += weight
        self.count += 1

    def _add_flat(self, delta: FlatSparse, weight: float) -> None:
        pos = delta.positions
        if self._flat is None:  # the round's first add: weight x delta, +0.0 elsewhere
            products = _products(delta.values, weight)
            flat = np.zeros(delta.layout.size, np.float64)
            flat[pos] = products
            self._flat = (delta.layout, flat)
            self._sums = delta.layout.views(flat)
            self._flat_minus = pos[products.view(np.uint64) == _MINUS_ZERO]
            return
        values = delta.values
        self._waiting.append((pos, values, weight))
        self._waiting_bytes += pos.nbytes + values.nbytes
        if self._waiting_bytes >= min(PENDING_BYTES, self._flat[1].nbytes):
            self.flush()

    def flush(self) -> None:
        """Make the waiting FlatSparse adds, in arrival order. Where the sum holds no -0.0 none can arise (x + y
        is -0.0 only where both are), so they go in together, block by block; otherwise one at a time with
        _scatter_add's bookkeeping. Either way bit for bit what adding each as it came gives."""
        if not self._waiting:
            return
        waiting, self._waiting, self._waiting_bytes = self._waiting, [], 0
        flat = self._flat[1]
        if self._flat_minus.size:
            for pos, values, weight in waiting:
                self._flat_minus = self._scatter_add(flat, self._flat_minus, pos, _products(values, weight))
            return
        edges = np.minimum(np.arange(0, flat.size + SWEEP_BLOCK, SWEEP_BLOCK), flat.size)
        cuts = [np.searchsorted(pos, edges) for pos, _, _ in waiting]
        for b in range(edges.size - 1):  # the positions index the whole sum: the block is what they touch
            for (pos, values, weight), cut in zip(waiting, cuts):
                lo, hi = cut[b], cut[b + 1]
                if hi > lo:
                    np.add.at(flat, pos[lo:hi], _products(values[lo:hi], weight))

    def _unflatten(self) -> None:
        """Back to a sum per tensor (its views of the vector stay), -0.0 positions cut per tensor."""
        if self._flat is None:
            return
        self.flush()
        layout, minus = self._flat[0], self._flat_minus
        cuts = np.searchsorted(minus, layout.starts)
        self._minus_zeros = {n: minus[cuts[i]:cuts[i + 1]] - layout.starts[i] for i, n in enumerate(layout.names)
                             if cuts[i + 1] > cuts[i]}
        self._flat = None

    def _add_sparse(self, name: str, t: codec.Sparse, weight: float) -> None:
        idx = t.indices
        products = _products(np.asarray(t.values).reshape(-1), weight)
        held = self._sums.get(name)
        if held is None:  # the dense path's first add is weight x delta: +0.0 elsewhere, the products as they are
            self._sums[name] = AtIndices(tuple(t.shape), idx, products)
            return
        if isinstance(held, AtIndices):
            if idx is held.indices or (idx.size == held.indices.size and np.array_equal(idx, held.indices)):
                held.total += products
                return
            held = self._whole(name)
        minus = self._scatter_add(held.reshape(-1), self._minus_zeros.pop(name, _NONE), idx, products)
        if minus.size:
            self._minus_zeros[name] = minus

    @classmethod
    def _scatter_add(cls, flat: np.ndarray, minus: np.ndarray | None, idx: np.ndarray, products: np.ndarray
                     ) -> np.ndarray:
        """flat[idx] += products, as the dense path's add leaves it: the -0.0 entries at `minus` (None:
        unknown) that idx skips become +0.0. Returns flat's -0.0 positions after the add."""
        cls._skip_minus_zeros(flat, minus, idx)
        np.add.at(flat, idx, products)  # = flat[idx] += products (idx is unique), without its gather-then-scatter
        maybe = idx[products.view(np.uint64) == _MINUS_ZERO]  # x + y = -0.0 only if both are -0.0
        return maybe[flat[maybe].view(np.uint64) == _MINUS_ZERO]

    def _whole(self, name: str) -> np.ndarray:
        """The tensor's sum as a whole float64 array (an AtIndices sum scattered into zeros, once)."""
        held = self._sums[name]
        if isinstance(held, AtIndices):
            whole = np.zeros(held.shape, np.float64)
            whole.reshape(-1)[held.indices] = held.total
            minus = held.indices[held.total.view(np.uint64) == _MINUS_ZERO]
            if minus.size:
                self._minus_zeros[name] = minus
            self._sums[name] = held = whole
        return held

    @staticmethod
    def _skip_minus_zeros(flat: np.ndarray, minus: np.ndarray | None, idx: np.ndarray) -> None:
        """-0.0 + (+0.0) = +0.0 at the sum's -0.0 entries this upload does not touch."""
        if minus is None:  # a dense add came last: find its -0.0 entries (O(n), only where forms mix)
            minus = np.flatnonzero(flat.view(np.uint64) == _MINUS_ZERO)
        if idx.size and minus.size:
            at = np.minimum(np.searchsorted(idx, minus), idx.size - 1)
            minus = minus[idx[at] != minus]
        flat[minus] = 0.0

    def mean(self) -> Arrays:
        if not self.count:
            raise ValueError("no updates to average")
        self.flush()
        out = {}
        for k, v in self._sums.items():
            if isinstance(v, AtIndices):  # (0 / weight) is +0.0 wherever nothing was sent
                out[k] = np.zeros(v.shape, np.float32)
                out[k].reshape(-1)[v.indices] = (v.total / self.weight).astype(np.float32)
            else:
                out[k] = (v / self.weight).astype(np.float32)
        return out


def fedavg_step(params: Arrays, mean_delta: Arrays) -> Arrays:
    return {k: (v + mean_delta[k]).astype(np.float32) if k in mean_delta else v for k, v in params.items()}


def fedadam_step(params: Arrays, mean_delta: Arrays, opt_state: Arrays, cfg: "FedAdamConfig"
                 ) -> tuple[Arrays, Arrays]:
    """One AdamW step with gradient g = -mean_delta, exactly torch.optim.AdamW's update (bias-corrected)."""
    step = int(opt_state.get("step", np.zeros(1))[0]) + 1
    b1, b2 = cfg.beta1, cfg.beta2
    new_params, new_state = {}, {"step": np.array([step], np.float32)}
    for k, p in params.items():
        g = -mean_delta[k].astype(np.float64) if k in mean_delta else np.zeros_like(p, np.float64)
        m = b1 * opt_state.get(f"m/{k}", np.zeros_like(p)).astype(np.float64) + (1 - b1) * g
        v = b2 * opt_state.get(f"v/{k}", np.zeros_like(p)).astype(np.float64) + (1 - b2) * g * g
        x = p.astype(np.float64) * (1 - cfg.lr * cfg.weight_decay)
        denom = np.sqrt(v / (1 - b2 ** step)) + cfg.eps
        x = x - cfg.lr * (m / (1 - b1 ** step)) / denom
        new_params[k] = x.astype(np.float32)
        new_state[f"m/{k}"], new_state[f"v/{k}"] = m.astype(np.float32), v.astype(np.float32)
    return new_params, new_state


class UpdateList:
    """Every accepted delta of the round, for aggregators that need them all (median, trimmed mean)."""

    def __init__(self) -> None:
        self.deltas: list[Arrays] = []
        self.count = 0

    def add(self, delta: Delta, weight: float) -> None:
        """Sparse tensors are densified: an order statistic needs every coordinate of every delta."""
        self.deltas.append({k: densify(k, v) if isinstance(v, codec.Sparse) else v.astype(np.float32)
                            for k, v in by_tensor(delta).items()})
        self.count += 1

    def stacked(self, name: str) -> np.ndarray:
        return np.stack([d[name] for d in self.deltas])


def _sum_of_squares(t) -> float:
    """Sum of the squares of a tensor's nonzero entries, in flat-index order. Summing the nonzeros alone (not
    the zeros a top-k or mask left out) makes the float64 result the same number whichever form the tensor
    travelled in, so clipping a sparse delta equals clipping its dense copy bit for bit. (einsum squares and
    adds in float64 through a small buffer: no float64 copy of the values, which cost more than the sum.)"""
    v = _flat_values(t)
    if np.count_nonzero(v) != v.size:
        v = v[v != 0]
    return _squares_added(v)


def _squares_added(v: np.ndarray) -> float:
    return float(np.einsum("i,i->", v, v, dtype=np.float64))


def global_norm(delta: Delta) -> float:
    """The L2 norm over every tensor together: per tensor, then summed (a FlatSparse: over its values at once,
    the same number up to float64 rounding)."""
    if isinstance(delta, FlatSparse):  # no zeros filtered: there is no per-tensor sum for it to match
        return float(np.sqrt(_squares_added(delta.values)))
    return float(np.sqrt(sum(_sum_of_squares(v) for v in delta.values())))


def clip_to_norm(delta: Delta, c: float, norm: float | None = None) -> Delta:
    """delta x min(1, c / ||delta||), the norm taken over every tensor together (`norm`, when the caller has it);
    each tensor keeps its form."""
    norm = global_norm(delta) if norm is None else norm
    if norm <= c:
        return delta
    scale = c / norm
    if isinstance(delta, FlatSparse):
        return FlatSparse(delta.layout, delta.positions, (delta.values * scale).astype(np.float32))
    return {k: codec.Sparse(v.shape, v.indices, (v.values * scale).astype(np.float32))
            if isinstance(v, codec.Sparse) else (v * scale).astype(np.float32) for k, v in delta.items()}


# -- aggregators ------------------------------------------------------------------------------------------------
class Aggregator:
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Config: ClassVar[type] = FedAvgConfig

    def __init__(self, cfg, run=None) -> None:
        self.cfg = cfg
        self.run = run

    def weight(self, num_examples: int) -> float:
        return float(num_examples) if getattr(self.cfg, "weighted", False) else 1.0

    def clip(self, delta: Delta, norm: float | None = None) -> Delta:
        """What of a device's delta enters the aggregate (clip_norm, where the config has one); `norm`: the
        delta's global_norm, when the caller has it."""
        c = getattr(self.cfg, "clip_norm", 0.0)
        return clip_to_norm(delta, c, norm) if c > 0 else delta

    def start(self):
        """The round's accumulator: `add(delta, weight)` per accepted upload, `count` of them."""
        return RunningMean()

    def privacy_spent(self, rounds: int) -> float | None:
        """Epsilon spent after `rounds` rounds (None: the aggregator promises no privacy). Every round counts,
        aggregated or not: an upper bound."""
        return None

    def finish(self, params: Arrays, acc, opt_state: Arrays, round_number: int = 0) -> tuple[Arrays, Arrays]:
        """The new weights and server-optimizer state after round `round_number` (1-based)."""
        raise NotImplementedError

    def mean_delta(self, acc) -> Arrays:
        """The delta the round applies: the mean by default, an order statistic for the robust aggregators."""
        return acc.mean()


class FedAvg(Aggregator):
    name = "fedavg"
    summary = "FedAvg: add the (example-weighted) mean delta"
    Config = FedAvgConfig

    def finish(self, params, acc, opt_state, round_number=0):
        return fedavg_step(params, self.mean_delta(acc)), opt_state


class FedAdam(Aggregator):
    name = "fedadam"
    summary = "FedAdam (Reddi et al. 2021): the mean delta as a pseudo-gradient for a server AdamW"
    Config = FedAdamConfig

    def finish(self, params, acc, opt_state, round_number=0):
        return fedadam_step(params, self.mean_delta(acc), opt_state, self.cfg)


class Median(FedAvg):
    name = "median"
    summary = "coordinate-wise median of the deltas (robust; holds all K deltas)"
    Config = MedianConfig

    def start(self):
        return UpdateList()

    def mean_delta(self, acc):
        return {k: np.median(acc.stacked(k), axis=0).astype(np.float32) for k in acc.deltas[0]}


class TrimmedMean(Median):
    name = "trimmed-mean"
    summary = "coordinate-wise beta-trimmed mean of the deltas (robust; holds all K deltas)"
    Config = TrimmedMeanConfig

    def mean_delta(self, acc):
        m = int(math.floor(self.cfg.beta * acc.count))
        out = {}
        for k in acc.deltas[0]:
            v = np.sort(acc.stacked(k), axis=0)
            out[k] = v[m:acc.count - m].mean(axis=0, dtype=np.float64).astype(np.float32)
        return out


class DpFedAvg(Aggregator):
    name = "dp-fedavg"
    summary = "DP-FedAvg: clip to C, sum, add N(0, (zC)^2), divide by K; epsilon from an RDP accountant"
    Config = DpFedAvgConfig

    def finish(self, params, acc, opt_state, round_number=0):
        rng = np.random.default_rng([self.cfg.noise_seed, round_number])  # resumes draw the same noise
        std = self.cfg.noise_multiplier * self.cfg.clip_norm
        k = self.run.server.devices_per_round
        mean = {}
        for name, total in acc.sum.items():  # unweighted: acc.sum is the plain sum of clipped deltas
            mean[name] = ((total + rng.normal(0.0, std, size=total.shape)) / k).astype(np.float32)
        return fedavg_step(params, mean), opt_state

    def privacy_spent(self, rounds: int) -> float:
        return dp_epsilon(self.cfg.noise_multiplier, self.run.server.devices_per_round / self.run.data.num_devices,
                          rounds, self.cfg.delta)


def dp_epsilon(noise_multiplier: float, sampling_rate: float, rounds: int, delta: float) -> float:
    """Epsilon at `delta` after `rounds` Gaussian mechanisms at noise_multiplier, each on a sample of rate q
    (dp-accounting's RDP accountant; Poisson sampling, the usual approximation of sampling K of N)."""
    import logging

    try:
        import dp_accounting
        from dp_accounting import rdp
    except ImportError:
        raise ConfigError("aggregator dp-fedavg needs dp-accounting: pip install 'edgelora[dp]'") from None
    if noise_multiplier == 0:
        return math.inf
    logging.getLogger("absl").setLevel(logging.ERROR)  # warns of orders it skips; the epsilon is the library's
    acc = rdp.RdpAccountant()
    event = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sampling_rate < 1:
        event = dp_accounting.PoissonSampledDpEvent(sampling_rate, event)
    acc.compose(event, rounds)
    return float(acc.get_epsilon(delta))


AGGREGATORS: dict[str, type[Aggregator]] = {a.name: a for a in (FedAvg, FedAdam, Median, TrimmedMean, DpFedAvg)}

def make_aggregator(run) -> Aggregator:
    return AGGREGATORS[run.aggregator.name](run.aggregator, run)
