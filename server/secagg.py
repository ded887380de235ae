"""The coordinator's side of one SecAgg+ round (Bonawitz et al. 2017, figure 4; Bell et al. 2020): it relays
keys and sealed shares between neighbours, adds masked uploads into one running sum, and from the survivors'
shares removes the self masks of the devices that uploaded and the pairwise masks toward those that dropped.
It never holds a device's unmasked vector: only the masked running sum, and at the end the sum of U3.

No threads: the caller serialises calls. Bad messages raise UpdateRejected with a Refusal code; a round that
cannot yield a sum raises RoundAborted."""
from __future__ import annotations

import numpy as np

from edgelora.protos.refusals import Refusal, UpdateRejected
from edgelora.secagg import ring
from edgelora.secagg.masking import (SHARE_BYTES, mask_key_pair, mask_sign, pairwise_mask_seed, self_mask_seed,
                                     share_points)
from edgelora.secagg.messages import (Advertise, MaskingInput, PeerKeys, Setup, ShareOut, UnmaskReply,
                                      UnmaskRequest)
from edgelora.secagg.primitives import (NONCE_BYTES, PUBLIC_KEY_BYTES, TAG_BYTES, KeyPair, SecAggError,
                                        add_keystreams, check_public_key, shamir_combine)

PHASES = ("advertise", "share", "upload", "unmask", "done")
MAX_BLOB_BYTES = 4096       # a sealed share is ~110 bytes plus two device ids; anything far larger is not one


class RoundAborted(Exception):
    """The round cannot yield a sum (too few devices or shares); the message says why."""


class SecAggServer:
    """One round's coordinator state. Phases in order: advertise, share, upload, unmask, done; each close_*
    fixes the set the paper names (U1, U2, U3)."""

    def __init__(self, setup: Setup) -> None:
        self._setup = setup
        self._graph = setup.graph()
        self._word = ring.word_dtype(setup.bits)
        self.phase = "advertise"
        self._keys: dict[str, tuple[bytes, bytes]] = {}          # U1's advertised (c, s)
        self._blobs: dict[str, dict[str, bytes]] = {}            # U2: sender -> receiver -> blob
        self._total = np.zeros(setup.length, self._word)         # the masked running sum of U3
        self._added: set[str] = set()
        self._replies: dict[str, UnmaskReply] = {}
        self._self_shares: dict[str, dict[int, bytes]] = {}      # survivor v -> x -> share of b_v
        self._key_shares: dict[str, dict[int, bytes]] = {}       # dropped v -> x -> share of s_v's key
        self.failures: dict[str, tuple[str, ...]] = {}            # device -> neighbours whose blob did not open
        self._result: np.ndarray | None = None
        self.advertised = self.shared = self.survivors = self.dropped = frozenset()

    def setup(self) -> Setup:
        return self._setup

    def expected(self) -> frozenset[str]:
        """Devices that may still answer this phase."""
        return {"advertise": frozenset(self._setup.devices), "share": self.advertised, "upload": self.shared,
                "unmask": self.survivors, "done": frozenset()}[self.phase] - self.answered()

    def answered(self) -> frozenset[str]:
        """Devices that answered this phase."""
        return frozenset({"advertise": self._keys, "share": self._blobs, "upload": self._added,
                          "unmask": self._replies, "done": ()}[self.phase])

    # Round 0: advertise keys.
    def advertise(self, msg: Advertise) -> None:
        self._check_sender(msg.device, msg.session, "advertise", frozenset(self._setup.devices), self._keys)
        for name, key in (("c_public", msg.c_public), ("s_public", msg.s_public)):
            if len(key) != PUBLIC_KEY_BYTES:
                raise UpdateRejected(Refusal.INVALID, f"{name} must be {PUBLIC_KEY_BYTES} bytes, got {len(key)}")
            try:
                check_public_key(key)
            except SecAggError as e:
                raise UpdateRejected(Refusal.INVALID, f"{name} is not a usable X25519 key: {e}") from e
        if msg.c_public == msg.s_public:
            raise UpdateRejected(Refusal.INVALID, "c_public equals s_public: the two key pairs must differ")
        for other, keys in self._keys.items():
            if {msg.c_public, msg.s_public} & set(keys):
                raise UpdateRejected(Refusal.INVALID, f"{msg.device} advertises a public key {other} advertised "
                                                      f"(a relabelled message)")
        self._keys[msg.device] = (msg.c_public, msg.s_public)

    def close_advertise(self) -> None:
        """Fixes U1. The threshold plus one: with fewer, no device could have t peers to share with."""
        self._close("advertise", "share")
        self.advertised = frozenset(self._keys)
        self._require(len(self.advertised) >= self._setup.threshold + 1,
                      f"{len(self.advertised)} devices advertised keys, fewer than threshold + 1")

    def peers_for(self, device: str) -> PeerKeys:
        """Device's neighbours in U1 and their keys (SecAgg+: neighbours only, Bell et al. 2020)."""
        self._check_member(device, self.advertised, "advertised keys (U1)")
        return PeerKeys({v: self._keys[v] for v in self._holders(device)})

    def _holders(self, device: str) -> list[str]:
        """Who holds `device`'s shares: its neighbours in U1, sorted (share_points gives their x)."""
        return sorted(set(self._graph[device]) & self.advertised)

    # Round 1: share keys.
    def share(self, msg: ShareOut) -> None:
        self._check_sender(msg.device, msg.session, "share", self.advertised, self._blobs)
        holders = set(self._holders(msg.device))
        if set(msg.ciphertexts) != holders:
            missing, extra = sorted(holders - set(msg.ciphertexts)), sorted(set(msg.ciphertexts) - holders)
            raise UpdateRejected(Refusal.INVALID, f"ciphertexts must go to exactly the sender's neighbours in U1; "
                                                  f"missing {missing}, not neighbours {extra}")
        for v, blob in msg.ciphertexts.items():
            if not NONCE_BYTES + TAG_BYTES < len(blob) <= MAX_BLOB_BYTES:
                raise UpdateRejected(Refusal.INVALID, f"the ciphertext to {v} is {len(blob)} bytes, not a sealed "
                                                      f"share")
        self._blobs[msg.device] = dict(msg.ciphertexts)

    def close_share(self) -> None:
        """Fixes U2, the devices whose shares went out (their masks may be in the sum)."""
        self._close("share", "upload")
        self.shared = frozenset(self._blobs)
        self._require(len(self.shared) >= self._setup.threshold + 1,
                      f"{len(self.shared)} devices shared keys, fewer than threshold + 1")

    def masking_input_for(self, device: str) -> MaskingInput:
        self._check_member(device, self.shared, "shared keys (U2)")
        return MaskingInput(self._in_order(self.shared),
                            {v: blobs[device] for v, blobs in self._blobs.items() if device in blobs})

    # Round 2: masked input.
    def add_masked(self, device: str, vector: np.ndarray) -> None:
        """Adds one masked upload to the running sum; the vector itself is not kept."""
        self._check_sender(device, self._setup.session, "upload", self.shared, self._added)
        self._check_vector(vector)
        np.add(self._total, vector, out=self._total, casting="unsafe")
        self._added.add(device)

    def _check_vector(self, vector: np.ndarray) -> None:
        bits, length = self._setup.bits, self._setup.length
        if not isinstance(vector, np.ndarray) or vector.ndim != 1 or len(vector) != length:
            shape = getattr(vector, "shape", type(vector).__name__)
            raise UpdateRejected(Refusal.INVALID, f"a masked upload has length {length}, got {shape}")
        if vector.dtype.kind not in "ui":
            raise UpdateRejected(Refusal.INVALID, f"a masked upload holds integers, got {vector.dtype}")
        if vector.size and (vector.min() < 0 or int(vector.max()) >> bits):
            raise UpdateRejected(Refusal.INVALID, f"a masked upload holds {bits}-bit values, got one of "
                                                  f"{int(vector.max())} (>= 2^{bits}) or below 0")

    def close_uploads(self) -> None:
        """Fixes U3 = the devices whose masked upload was added."""
        self._close("upload", "unmask")
        self.survivors = frozenset(self._added)
        self.dropped = self.shared - self.survivors
        self._require(len(self.survivors) >= self._setup.threshold,
                      f"{len(self.survivors)} devices uploaded, fewer than the threshold")

    def unmask_request(self) -> UnmaskRequest:
        if self.phase not in ("unmask", "done"):
            raise UpdateRejected(Refusal.PRECONDITION, f"no unmask request in phase {self.phase}")
        return UnmaskRequest(self._in_order(self.survivors), self._in_order(self.dropped))

    # Round 4: unmasking.
    def unmask(self, msg: UnmaskReply) -> None:
        """A survivor's shares: b-shares of its surviving neighbours, key-shares of its dropped ones."""
        self._check_sender(msg.device, msg.session, "unmask", self.survivors, self._replies)
        near = set(self._graph[msg.device])
        self._check_shares(msg.self_shares, near & self.survivors, msg.device, "self")
        self._check_shares(msg.key_shares, near & self.dropped, msg.device, "key")
        both = sorted(set(msg.self_shares) & set(msg.key_shares) | set(msg.failed) & (set(msg.self_shares) |
                                                                                   set(msg.key_shares)))
        if both or not set(msg.failed) <= near & self.shared:
            raise UpdateRejected(Refusal.INVALID, f"{msg.device} sends two answers (shares of both kinds, or a "
                                                  f"share and a failure) for {both}, or names failures of "
                                                  f"devices that sealed nothing to it")
        for store, shares in ((self._self_shares, msg.self_shares), (self._key_shares, msg.key_shares)):
            for v, (x, share) in shares.items():
                store.setdefault(v, {})[x] = share
        self._replies[msg.device] = msg
        if msg.failed:
            self.failures[msg.device] = tuple(msg.failed)

    def _check_shares(self, shares: dict[str, tuple[int, bytes]], allowed: set[str], device: str,
                      kind: str) -> None:
        """Only what the request asked for, each share at the x its holder was dealt (share_points)."""
        asked = sorted(set(shares) - allowed)
        if asked:
            raise UpdateRejected(Refusal.INVALID, f"{kind}-shares of {asked} were not asked of {device}")
        for v, (x, share) in shares.items():
            if x != share_points(self._holders(v)).get(device) or len(share) != SHARE_BYTES:
                raise UpdateRejected(Refusal.INVALID, f"{device}'s {kind}-share of {v} has x={x} or "
                                                      f"{len(share)} bytes; expected its dealt x and {SHARE_BYTES}")

    def result(self) -> np.ndarray:
        """The sum over U3 of their vectors mod 2^b (Bonawitz et al. 2017, round 4): minus PRG(b_u) for every
        u in U3, minus each survivor's signed masks toward its dropped neighbours, rebuilt from s_v's key."""
        if self._result is not None:
            return self._result
        if self.phase != "unmask":
            raise UpdateRejected(Refusal.PRECONDITION, f"no result in phase {self.phase}")
        session, devices, streams = self._setup.session, self._setup.devices, []
        for u in self._in_order(self.survivors):
            streams.append((self_mask_seed(self._rebuild(u, self._self_shares, "self-mask seed"), session, u), -1))
        for v in self._in_order(self.dropped):
            key = self._dropped_key(v)
            for u in self._in_order(set(self._graph[v]) & self.survivors):
                streams.append((pairwise_mask_seed(key, self._keys[u][1], session, v, u), -mask_sign(devices, u, v)))
        self._result = ring.reduce(add_keystreams(self._total, streams), self._setup.bits)
        self.phase = "done"
        return self._result

    def _dropped_key(self, v: str) -> KeyPair:
        """s_v's private key, derived from its seed rebuilt from t shares, checked against the public key v
        advertised."""
        key = mask_key_pair(self._rebuild(v, self._key_shares, "mask key"), self._setup.session, v)
        if key.public != self._keys[v][1]:
            raise RoundAborted(f"the mask key rebuilt for {v} does not match the key it advertised")
        return key

    def _rebuild(self, v: str, store: dict[str, dict[int, bytes]], what: str) -> bytes:
        """A secret from the first t shares. A mask key is checked against its public key; a self-mask seed
        cannot be, and a second t-subset is not combined to cross-check it: only a device that deviates from
        the protocol can send a wrong share, and such a device can bend the sum as much through its own masked
        upload, which nothing can check (the semi-honest model, docs/security.md). One combine per secret
        halves the unmasking CPU that pycryptodome's pure-Python field arithmetic dominates."""
        t = self._setup.threshold
        shares = sorted(store.get(v, {}).items())
        if len(shares) < t:
            raise RoundAborted(f"{len(shares)} shares of {v}'s {what} came back, fewer than the threshold {t}")
        return shamir_combine(shares[:t])

    # Checks shared by the phases.
    def _check_sender(self, device: str, session: bytes, phase: str, members: frozenset[str], done) -> None:
        if self.phase != phase:
            raise UpdateRejected(Refusal.PRECONDITION, f"{phase} from {device} arrives in phase {self.phase}")
        if session != self._setup.session:
            raise UpdateRejected(Refusal.PRECONDITION, f"{phase} from {device} carries another round's session "
                                                       f"(a replay)")
        if device not in members:
            raise UpdateRejected(Refusal.PRECONDITION, f"{device} may not {phase} in this round (not in the set "
                                                       f"the previous phase fixed)")
        if device in done:
            raise UpdateRejected(Refusal.EXISTS, f"{device} already sent its {phase}")

    def _check_member(self, device: str, members: frozenset[str], what: str) -> None:
        if device not in members:
            raise UpdateRejected(Refusal.PRECONDITION, f"{device} is not among the devices that {what}")

    def _close(self, phase: str, following: str) -> None:
        if self.phase != phase:
            raise UpdateRejected(Refusal.PRECONDITION, f"cannot close {phase} in phase {self.phase}")
        self.phase = following

    def _require(self, condition: bool, why: str) -> None:
        if not condition:
            self.phase = "done"
            raise RoundAborted(f"round {self._setup.round}: {why}")

    def _in_order(self, devices) -> tuple[str, ...]:
        return tuple(d for d in self._setup.devices if d in devices)
