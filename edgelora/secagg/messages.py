"""The messages of one SecAgg+ round (Bonawitz et al. 2017, figure 4: rounds 0-4; Bell et al. 2020) as frozen
dataclasses: what the coordinator and a device exchange, with no transport (protos/serde converts them)."""
from __future__ import annotations

from dataclasses import dataclass

from . import graph, ring
from .primitives import SecAggError

SESSION_BYTES = 16


@dataclass(frozen=True)
class Setup:
    """A round's public parameters, from the coordinator. session: 16 random bytes drawn per round; every KDF
    context and AEAD's associated data carries it, so nothing from another round is accepted. devices: the
    sampled devices in the coordinator's order (it fixes the sign of pairwise masks). neighbours: k (0: auto,
    graph.neighbour_count). threshold: t, shares needed to rebuild a secret. bits: the ring's b; length: ring
    coordinates per upload."""
    round: int
    session: bytes
    devices: tuple[str, ...]
    neighbours: int
    threshold: int
    graph_seed: int
    bits: int
    length: int

    def __post_init__(self) -> None:
        if len(self.session) != SESSION_BYTES:
            raise SecAggError(f"session must be {SESSION_BYTES} bytes, got {len(self.session)}")
        if not self.devices or len(set(self.devices)) != len(self.devices):
            raise SecAggError(f"devices must be distinct and at least one, got {list(self.devices)}")
        k = graph.neighbour_count(len(self.devices), self.neighbours)
        if not 1 <= self.threshold <= k:
            raise SecAggError(f"threshold {self.threshold} must be in 1..{k}: each device shares its secrets "
                              f"among its {k} neighbours")
        ring.word_dtype(self.bits)  # raises for a bit width outside 1..MAX_BITS
        if self.length < 1:
            raise SecAggError(f"length must be at least 1, got {self.length}")

    def graph(self) -> dict[str, tuple[str, ...]]:
        """The round's neighbour graph (public, the same on every side)."""
        return graph.neighbours(self.devices, graph.neighbour_count(len(self.devices), self.neighbours),
                                self.graph_seed)


@dataclass(frozen=True)
class Advertise:
    """Round 0: a device's two fresh X25519 public keys, c (to encrypt shares) and s (to agree masks)."""
    device: str
    session: bytes
    c_public: bytes
    s_public: bytes


@dataclass(frozen=True)
class PeerKeys:
    """The device's neighbours that advertised: neighbour -> (c_public, s_public)."""
    keys: dict[str, tuple[bytes, bytes]]


@dataclass(frozen=True)
class ShareOut:
    """Round 1: neighbour -> the AES-GCM blob of the shares sealed to it (the coordinator relays it)."""
    device: str
    session: bytes
    ciphertexts: dict[str, bytes]


@dataclass(frozen=True)
class MaskingInput:
    """Before round 2: shared = U2, every device whose ShareOut was accepted; incoming: the blobs sealed to
    this device, by sender."""
    shared: tuple[str, ...]
    incoming: dict[str, bytes]


@dataclass(frozen=True)
class UnmaskRequest:
    """Round 3/4: survivors = U3 (their masked upload was accepted); dropped = U2 minus U3."""
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]


@dataclass(frozen=True)
class UnmaskReply:
    """A survivor's shares: self_shares (of b_v, v a surviving neighbour) and key_shares (of s_v's private key,
    v a dropped neighbour), peer -> (x, share); failed: neighbours whose blob did not open (reported, not
    fatal: the others' shares may still reach the threshold)."""
    device: str
    session: bytes
    self_shares: dict[str, tuple[int, bytes]]
    key_shares: dict[str, tuple[int, bytes]]
    failed: tuple[str, ...]
