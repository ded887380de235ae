"""What both sides of a SecAgg+ round derive identically, in one place: the key that seals shares between
two devices, the plaintext of a sealed share, the x each share holder gets, and the self and pairwise mask
seeds with their signs (Bonawitz et al. 2017, section 4, figure 4; Bell et al. 2020). The device adds the
masks (edge_client/secagg.py), the coordinator removes them (server/secagg.py), with the same functions."""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterable, Sequence

from .primitives import SEED_BYTES, KeyPair, SecAggError, agree, context, derive, split_context

SHARE_BYTES = SEED_BYTES


def share_associated(session: bytes, sender: str, receiver: str) -> bytes:
    """AES-GCM's associated data for the blob `sender` seals to `receiver`: a blob from another round or
    another pair does not open."""
    return context(session, sender, receiver)


def share_key(own_c: KeyPair, peer_c_public: bytes, session: bytes, sender: str, receiver: str) -> bytes:
    """The AES key of the sender -> receiver blob: HKDF of KA(c_u, c_v) (Bonawitz et al. 2017, round 1)."""
    return derive(agree(own_c, peer_c_public), b"share", share_associated(session, sender, receiver))


@dataclass(frozen=True)
class SealedShares:
    """The plaintext of one blob: the pair it was made for (so the coordinator cannot swap blobs between
    pairs, Bonawitz et al. 2017, round 1), the receiver's x, and its shares of s_u's key and of b_u."""
    sender: str
    receiver: str
    x: int
    key_share: bytes
    seed_share: bytes

    def to_bytes(self) -> bytes:
        return context(self.sender, self.receiver, struct.pack(">H", self.x), self.key_share, self.seed_share)

    @classmethod
    def from_bytes(cls, data: bytes) -> SealedShares:
        sender, receiver, x, key_share, seed_share = split_context(data, 5)
        if len(x) != 2 or len(key_share) != SHARE_BYTES or len(seed_share) != SHARE_BYTES:
            raise SecAggError("a sealed share's x or share has the wrong size")
        return cls(sender.decode(errors="replace"), receiver.decode(errors="replace"),
                   struct.unpack(">H", x)[0], key_share, seed_share)


def share_points(holders: Iterable[str]) -> dict[str, int]:
    """Holder -> the x of its share: the holders sorted, x = position + 1 (never 0, which is the secret)."""
    return {h: i + 1 for i, h in enumerate(sorted(holders))}


def mask_key_pair(seed: bytes, session: bytes, device: str) -> KeyPair:
    """s_u, the X25519 key that agrees pairwise masks, derived from a 16-byte seed r_u (HKDF): a device shares
    r_u, not the 32-byte private key, so rebuilding a dropped device's key is one 16-byte Shamir secret, and
    the coordinator checks what it rebuilt against the public key the device advertised."""
    if len(seed) != SEED_BYTES:
        raise SecAggError(f"a mask key's seed is {SEED_BYTES} bytes, got {len(seed)}")
    return KeyPair.from_private_bytes(derive(seed, b"s-key", context(session, device)))


def self_mask_seed(b: bytes, session: bytes, device: str) -> bytes:
    """The seed of PRG(b_u), the self mask (Bonawitz et al. 2017, round 2): it hides a slow device's upload
    even after its pairwise masks were removed."""
    return derive(b, b"self", context(session, device))


def pairwise_mask_seed(own_s: KeyPair, peer_s_public: bytes, session: bytes, u: str, v: str) -> bytes:
    """The seed of m_uv: HKDF of KA(s_u, s_v), with the pair in a fixed order, so u and v get the same seed."""
    low, high = sorted((u, v))
    return derive(agree(own_s, peer_s_public), b"mask", context(session, low, high))


def mask_sign(devices: Sequence[str], u: str, v: str) -> int:
    """+1 if u comes before v in the round's order, else -1: m_uv + m_vu = 0, so pairwise masks cancel in the
    sum (Bonawitz et al. 2017, section 3)."""
    return 1 if devices.index(u) < devices.index(v) else -1
