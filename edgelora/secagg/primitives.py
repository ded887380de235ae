"""The cryptographic primitives of SecAgg+ (Bonawitz et al. 2017, section 4; Bell et al. 2020, section 3),
each a thin wrapper over a well-kept library: X25519 key agreement, HKDF-SHA256, AES-256-GCM and an AES-256-CTR
keystream from `cryptography`, Shamir sharing from pycryptodome. Nothing here is a cipher, a KDF, a random
generator or a sharing scheme of our own; key material comes from the OS."""
from __future__ import annotations

import secrets
import struct
from typing import Iterable, Sequence

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

PUBLIC_KEY_BYTES = 32
SECRET_BYTES = 32                  # private keys, shared secrets, derived keys and PRG seeds
SEED_BYTES = 16                    # a device's two shared secrets (its self-mask seed and its mask key's seed):
                                   # pycryptodome's Shamir shares 16-byte secrets in one polynomial over GF(2^128)
NONCE_BYTES = 12                   # AES-GCM's standard nonce, drawn at random per seal
TAG_BYTES = 16
# One AES-256-CTR stream per seed (every derived seed is used once), so the counter can start at zero.
_ZERO_COUNTER = bytes(16)
# Keystream is generated and added in pieces of this many bytes, so the piece of the running sum and the
# keystream stay in cache while every mask is added to it (add_keystreams).
_PIECE_BYTES = 1 << 20


class SecAggError(ValueError):
    """A secure-aggregation check that failed; the message names what."""


class KeyPair:
    """An X25519 key pair (RFC 7748), as the protocol's c (share encryption) and s (mask agreement) keys."""

    def __init__(self, private: X25519PrivateKey) -> None:
        self._private = private
        self.public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @classmethod
    def generate(cls) -> KeyPair:
        return cls(X25519PrivateKey.generate())  # OpenSSL draws it from the OS

    @classmethod
    def from_private_bytes(cls, data: bytes) -> KeyPair:
        if len(data) != SECRET_BYTES:
            raise SecAggError(f"an X25519 private key is {SECRET_BYTES} bytes, got {len(data)}")
        return cls(X25519PrivateKey.from_private_bytes(data))

    def private_bytes(self) -> bytes:
        return self._private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def agree(private: KeyPair, peer_public: bytes) -> bytes:
    """X25519(private, peer_public): the same 32 bytes on both sides. A key of the wrong size, or a low-order
    point (the shared secret would be all zeros, known to anyone), is a SecAggError."""
    if len(peer_public) != PUBLIC_KEY_BYTES:
        raise SecAggError(f"an X25519 public key is {PUBLIC_KEY_BYTES} bytes, got {len(peer_public)}")
    try:
        return private._private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as e:
        raise SecAggError(f"X25519 with this public key failed: {e}") from e


def check_public_key(public: bytes) -> None:
    """SecAggError unless `public` is a usable X25519 public key: agreement with it from a throwaway key must
    succeed (a low-order point is refused, Bonawitz et al. 2017, section 4)."""
    agree(KeyPair.generate(), public)


def context(*parts: bytes | str) -> bytes:
    """An unambiguous byte string of the parts (each length-prefixed), for KDF contexts and associated data:
    session|"ab"|"c" must not equal session|"a"|"bc"."""
    return b"".join(struct.pack(">I", len(p)) + p for p in (x.encode() if isinstance(x, str) else x for x in parts))


def split_context(data: bytes, count: int) -> list[bytes]:
    """The `count` parts that context() joined; SecAggError when the bytes do not hold exactly that."""
    parts, at = [], 0
    for _ in range(count):
        if at + 4 > len(data):
            raise SecAggError(f"framed data ends after {len(parts)} of {count} parts")
        (size,) = struct.unpack_from(">I", data, at)
        if at + 4 + size > len(data):
            raise SecAggError(f"framed part {len(parts)} claims {size} bytes; fewer remain")
        parts.append(data[at + 4:at + 4 + size])
        at += 4 + size
    if at != len(data):
        raise SecAggError(f"{len(data) - at} bytes trail the {count} framed parts")
    return parts


def derive(secret: bytes, purpose: bytes, context: bytes) -> bytes:
    """HKDF-SHA256 (RFC 5869) -> 32 bytes; `purpose` (b"share", b"mask", b"self") and `context` (the session
    and the device ids) go into info, so every key is bound to one use in one round (Bell et al. 2020)."""
    info = struct.pack(">I", len(purpose)) + purpose + context
    return HKDF(algorithm=hashes.SHA256(), length=SECRET_BYTES, salt=None, info=info).derive(secret)


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """AES-256-GCM under `key`; a random 12-byte nonce from the OS, first in the blob."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated)


def open_sealed(key: bytes, blob: bytes, associated: bytes) -> bytes:
    """The plaintext of a seal() blob; SecAggError when it is too short or does not authenticate."""
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise SecAggError(f"a sealed blob is at least {NONCE_BYTES + TAG_BYTES} bytes, got {len(blob)}")
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], associated)
    except InvalidTag as e:
        raise SecAggError("the sealed blob does not authenticate (tampered, or sealed for another pair)") from e


def _keystream(seed: bytes):
    if len(seed) != SECRET_BYTES:
        raise SecAggError(f"a PRG seed is {SECRET_BYTES} bytes, got {len(seed)}")
    # AES-CTR, not ChaCha20: with AES instructions (x86's AES-NI/VAES, ARMv8's crypto extensions) OpenSSL's
    # AES-256-CTR made masks 2.2x faster here (benchmarks/secagg.py), and the coordinator makes one per device.
    return Cipher(algorithms.AES(seed), modes.CTR(_ZERO_COUNTER)).encryptor()


def prg_words(seed: bytes, count: int, dtype) -> np.ndarray:
    """`count` words of `dtype` from AES-256-CTR's keystream under `seed`, read little-endian: the mask generator
    (a stream cipher as PRG, Bonawitz et al. 2017, section 3)."""
    dt = np.dtype(dtype)
    out = np.empty(count, dt.newbyteorder("<"))
    _keystream(seed).update_into(bytes(out.nbytes), out.view(np.uint8))
    return out.astype(dt, copy=False)


def add_keystreams(total: np.ndarray, streams: Iterable[tuple[bytes, int]]) -> np.ndarray:
    """total += sign * prg_words(seed, len(total), total.dtype) for every (seed, sign), sign +1 or -1, in place
    (wrapping in total's unsigned dtype). Piece by piece, all streams at once: the piece of `total` stays in
    cache while every mask is added, which is what makes unmasking 5M values x 100 masks fast."""
    dt = total.dtype
    encryptors = [(_keystream(seed), np.add if sign > 0 else np.subtract) for seed, sign in streams]
    words = max(1, _PIECE_BYTES // dt.itemsize)
    zeros = memoryview(bytes(words * dt.itemsize))
    piece = np.empty(words, dt.newbyteorder("<"))
    piece_bytes = piece.view(np.uint8)
    for start in range(0, len(total), words):
        part = total[start:start + words]
        size = len(part) * dt.itemsize
        for encryptor, op in encryptors:
            encryptor.update_into(zeros[:size], piece_bytes[:size])
            op(part, piece[:len(part)], out=part)
    return total


def shamir_split(secret: bytes, threshold: int, holders: int) -> list[bytes]:
    """Shamir's t-of-n shares of a 16-byte secret (Bonawitz et al. 2017, section 3), by pycryptodome over
    GF(2^128); share j (16 bytes) is the polynomial at x = j + 1. Secrets are 16 bytes because the
    coordinator rebuilds one per device each round, and pycryptodome's field arithmetic is pure Python: a
    32-byte secret would be two polynomials and twice the unmasking CPU (benchmarks/secagg.py)."""
    if len(secret) != SEED_BYTES:
        raise SecAggError(f"shamir_split shares {SEED_BYTES}-byte secrets, got {len(secret)}")
    if not 1 <= threshold <= holders:
        raise SecAggError(f"threshold {threshold} must be in 1..{holders} (the holders)")
    return [share for _, share in Shamir.split(threshold, holders, secret, ssss=False)]


def shamir_combine(shares: Sequence[tuple[int, bytes]]) -> bytes:
    """The 16-byte secret from (x, share) pairs; at least the threshold of them (fewer give a wrong secret:
    the caller checks the count, and where it can, the result)."""
    if not shares:
        raise SecAggError("shamir_combine needs shares")
    for x, share in shares:
        if len(share) != SEED_BYTES or not 1 <= x < 1 << 16:
            raise SecAggError(f"share at x={x} must be {SEED_BYTES} bytes with x in 1..65535, got {len(share)}")
    try:
        return Shamir.combine(list(shares), ssss=False)
    except ValueError as e:
        raise SecAggError(f"the shares do not combine: {e}") from e
