"""A device's side of one SecAgg+ round (Bonawitz et al. 2017, figure 4; Bell et al. 2020): fresh keys,
Shamir shares of its mask secrets sealed to its neighbours, the masked upload, and the shares it reveals to
unmask the sum. It checks every request against what it saw, and refuses (ProtocolViolation) what an honest
device must not do: above all, it never reveals both shares for one peer."""
from __future__ import annotations

import secrets

import numpy as np

from edgelora.secagg import ring
from edgelora.secagg.masking import (SealedShares, mask_key_pair, pairwise_mask_seed, mask_sign, self_mask_seed,
                                     share_associated, share_key, share_points)
from edgelora.secagg.messages import (Advertise, MaskingInput, PeerKeys, Setup, ShareOut, UnmaskReply,
                                      UnmaskRequest)
from edgelora.secagg.primitives import (PUBLIC_KEY_BYTES, SEED_BYTES, KeyPair, SecAggError, add_keystreams,
                                        open_sealed, seal, shamir_split)


class ProtocolViolation(SecAggError):
    """The coordinator asked for something an honest device must refuse; the message says what."""


class SecAggDevice:
    """One device in one round. Calls in protocol order: advertise, share, mask, unmask."""

    def __init__(self, device: str, setup: Setup) -> None:
        if device not in setup.devices:
            raise ProtocolViolation(f"device {device!r} is not among the round's sampled devices")
        self.device = device
        self.setup = setup
        self.neighbours = frozenset(setup.graph()[device])
        self._seed = secrets.token_bytes(SEED_BYTES)        # b_u, the self-mask seed, from the OS
        self._c = KeyPair.generate()                        # encrypts shares to peers
        self._s_seed = secrets.token_bytes(SEED_BYTES)      # r_u, from the OS: s_u = HKDF(r_u)
        self._s = mask_key_pair(self._s_seed, setup.session, device)   # agrees pairwise masks
        self._peers: dict[str, tuple[bytes, bytes]] | None = None
        self._masking: MaskingInput | None = None
        self._request: UnmaskRequest | None = None
        self._reply: UnmaskReply | None = None
        self._revealed: dict[str, str] = {}                 # peer -> "self" or "key": the share given out

    def advertise(self) -> Advertise:
        """Round 0: the two public keys (the same message if asked again: the keys are fixed per round)."""
        return Advertise(self.device, self.setup.session, self._c.public, self._s.public)

    def share(self, peers: PeerKeys) -> ShareOut:
        """Round 1: t-of-|peers| Shamir shares of s_u's key seed r_u and of b_u, one blob per neighbour."""
        if self._peers is not None:
            raise ProtocolViolation("share asked twice: the shares were dealt already")
        self._check_peers(peers)
        self._peers = dict(peers.keys)
        points = share_points(peers.keys)
        key_shares = shamir_split(self._s_seed, self.setup.threshold, len(points))
        seed_shares = shamir_split(self._seed, self.setup.threshold, len(points))
        session, u = self.setup.session, self.device
        blobs = {}
        for v, x in points.items():
            plain = SealedShares(u, v, x, key_shares[x - 1], seed_shares[x - 1]).to_bytes()
            key = share_key(self._c, peers.keys[v][0], session, u, v)
            blobs[v] = seal(key, plain, share_associated(session, u, v))
        return ShareOut(u, session, blobs)

    def _check_peers(self, peers: PeerKeys) -> None:
        strangers = sorted(set(peers.keys) - self.neighbours)
        if strangers:
            raise ProtocolViolation(f"keys for devices that are not this device's neighbours: {strangers}")
        if len(peers.keys) < self.setup.threshold:
            raise ProtocolViolation(f"{len(peers.keys)} neighbours advertised, fewer than the threshold "
                                    f"{self.setup.threshold}: the shares would not be recoverable")
        seen = {self._c.public, self._s.public}
        for v, (c, s) in sorted(peers.keys.items()):
            if len(c) != PUBLIC_KEY_BYTES or len(s) != PUBLIC_KEY_BYTES or c == s or {c, s} & seen:
                raise ProtocolViolation(f"{v}'s public keys are malformed, equal, or another device's")
            seen |= {c, s}

    def mask(self, vector: np.ndarray, inp: MaskingInput) -> np.ndarray:
        """Round 2: y = x + PRG(b_u) + sum over neighbours v in U2 of sign(u, v) * PRG(s_uv), mod 2^b."""
        if self._peers is None or self._masking is not None:
            raise ProtocolViolation("mask asked before share, or twice")
        toward = self._check_shared(inp)
        self._masking = inp
        bits, session, u = self.setup.bits, self.setup.session, self.device
        y = self._checked_vector(vector).astype(ring.word_dtype(bits))   # a copy: the caller's x stays clear
        streams = [(self_mask_seed(self._seed, session, u), 1)]
        streams += [(pairwise_mask_seed(self._s, self._peers[v][1], session, u, v),
                     mask_sign(self.setup.devices, u, v)) for v in sorted(toward)]
        return ring.reduce(add_keystreams(y, streams), bits)

    def _check_shared(self, inp: MaskingInput) -> frozenset[str]:
        """The neighbours to mask toward: U2's; U2 must hold this device and only devices it saw (a neighbour
        that never advertised cannot have received shares)."""
        shared = frozenset(inp.shared)
        if self.device not in shared:
            raise ProtocolViolation("the shared set (U2) lacks this device")
        unseen = sorted((shared & self.neighbours) - set(self._peers)) + sorted(shared - set(self.setup.devices))
        if unseen:
            raise ProtocolViolation(f"the shared set (U2) names devices this device never saw: {unseen}")
        toward = (shared & self.neighbours) - {self.device}
        if len(toward) < self.setup.threshold:
            raise ProtocolViolation(f"only {len(toward)} neighbours shared, fewer than the threshold "
                                    f"{self.setup.threshold} (Bonawitz et al. 2017, round 2: abort)")
        return toward

    def _checked_vector(self, vector: np.ndarray) -> np.ndarray:
        bits, length = self.setup.bits, self.setup.length
        if vector.ndim != 1 or len(vector) != length or vector.dtype.kind not in "ui":
            raise SecAggError(f"the vector must be {length} integers, got shape {vector.shape} of {vector.dtype}")
        if vector.min() < 0 or int(vector.max()) >> bits:
            raise SecAggError(f"the vector's values must lie in [0, 2^{bits})")
        return vector

    def unmask(self, req: UnmaskRequest) -> UnmaskReply:
        """Round 4: for each neighbour, the share of b_v if v survived, of s_v's key if v dropped; never both."""
        if self._masking is None:
            raise ProtocolViolation("unmask asked before this device masked its upload")
        self._check_request(req)
        if self._reply is not None:
            return self._reply                                      # the same request again: the same answer
        self._request = req
        survivors, dropped = frozenset(req.survivors), frozenset(req.dropped)
        self_shares, key_shares, failed = {}, {}, []
        for v in sorted((survivors | dropped) & self.neighbours):
            opened = self._open(v)
            if opened is None:
                failed.append(v)
            elif v in survivors:
                self_shares[v] = (opened.x, opened.seed_share)
            else:
                key_shares[v] = (opened.x, opened.key_share)
        self._revealed.update({v: "self" for v in self_shares} | {v: "key" for v in key_shares})
        self._reply = UnmaskReply(self.device, self.setup.session, self_shares, key_shares, tuple(failed))
        return self._reply

    def _check_request(self, req: UnmaskRequest) -> None:
        survivors, dropped = frozenset(req.survivors), frozenset(req.dropped)
        both = sorted(survivors & dropped)
        if both:
            raise ProtocolViolation(f"asked for both shares of {both}: survivors and dropped overlap")
        flipped = sorted(v for v in survivors if self._revealed.get(v) == "key") + \
            sorted(v for v in dropped if self._revealed.get(v) == "self")
        if flipped:
            raise ProtocolViolation(f"the other share of {flipped} was revealed already")
        if self._request is not None and self._request != req:
            raise ProtocolViolation("a second unmask request that differs from the first")
        if survivors | dropped != frozenset(self._masking.shared):
            raise ProtocolViolation("survivors and dropped must together be the shared set (U2) this device "
                                    "masked toward")
        if self.device not in survivors:
            raise ProtocolViolation("this device is not among the survivors")
        if len(survivors) < self.setup.threshold:
            raise ProtocolViolation(f"{len(survivors)} survivors, fewer than the threshold {self.setup.threshold}")

    def _open(self, v: str) -> SealedShares | None:
        """v's blob to this device, opened and checked to name the pair; None when it is missing or does not
        open (the device reports it in `failed`; the coordinator may still have t other shares)."""
        blob = self._masking.incoming.get(v)
        if blob is None or v not in self._peers:
            return None
        session, u = self.setup.session, self.device
        try:
            opened = SealedShares.from_bytes(open_sealed(share_key(self._c, self._peers[v][0], session, v, u),
                                                         blob, share_associated(session, v, u)))
        except SecAggError:
            return None
        return opened if (opened.sender, opened.receiver) == (v, u) else None
