"""Secure aggregation of sparse uploads (SecAgg+, Bell et al. 2020) with distributed differential privacy:
the pieces both sides share, with no transport and no round logic.

- primitives: X25519 key agreement, HKDF-SHA256, AES-GCM, an AES-256-CTR keystream as the mask generator,
  Shamir sharing (pycryptodome), all from well-kept libraries; nothing cryptographic written here.
- graph: the round's neighbour graph (each device shares with O(log n) others).
- messages: the protocol's messages as frozen dataclasses (protos/serde carries them).
- masking: what both sides derive alike: the key that seals shares, the sealed plaintext, the mask key from
  its seed, the self and pairwise mask seeds and their signs.
- coordinates: the coordinate set S a round's uploads share, derived on both sides (no index travels).
- ring: fixed point in Z_(2^b): clip, weight, stochastic rounding, the bit width that cannot wrap.
- dp: integer noise each device adds, and the accountant's epsilon.

The coordinator's side of a round is server/secagg.py (the protocol) and server/secure.py (the round), the
device's edge_client/secagg.py; docs/security.md says what the coordinator learns.
Imports: numpy, cryptography, pycryptodome, dp-accounting (lazily, optional), and the core; never grpc,
server/ or edge_client/.
"""
