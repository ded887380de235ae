"""SecAgg+'s protocol core in memory: primitives, the neighbour graph, the device (edgelora.edge_client.secagg)
and the coordinator (edgelora.server.secagg). Sums are checked bit for bit against the clear sum of the same
integer vectors; hostile coordinators and bad messages against the refusals the protocol promises."""
from __future__ import annotations

import secrets
from dataclasses import replace

import numpy as np
import pytest
from scipy.stats import chisquare

from edgelora.edge_client.secagg import ProtocolViolation, SecAggDevice
from edgelora.protos.refusals import Refusal, UpdateRejected
from edgelora.secagg import graph, primitives as p
from edgelora.secagg.messages import MaskingInput, Setup, UnmaskRequest
from edgelora.server.secagg import RoundAborted, SecAggServer

PHASES = ("advertise", "share", "upload", "unmask")


def make_setup(n: int, threshold: int, *, k: int = 0, bits: int = 12, length: int = 40) -> Setup:
    return Setup(round=3, session=secrets.token_bytes(16), devices=tuple(f"dev{i:02d}" for i in range(n)),
                 neighbours=k, threshold=threshold, graph_seed=11, bits=bits, length=length)


def vectors_for(setup: Setup, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {d: rng.integers(0, 1 << setup.bits, setup.length).astype(np.uint16) for d in setup.devices}


def clear_sum(setup: Setup, vectors: dict[str, np.ndarray], who) -> np.ndarray:
    total = sum(vectors[d].astype(np.int64) for d in who)
    return (total % (1 << setup.bits)).astype(np.uint16)


def held_arrays(obj, seen=None):
    """Every numpy array reachable from obj's attributes (dicts, lists, tuples, sets, objects)."""
    seen = seen if seen is not None else set()
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from held_arrays(v, seen)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            yield from held_arrays(v, seen)
    elif hasattr(obj, "__dict__"):
        yield from held_arrays(vars(obj), seen)


class Round:
    """Drives one round in memory. stop[d] = the first phase device d never answers (it has dropped)."""

    def __init__(self, setup: Setup, vectors: dict[str, np.ndarray], stop: dict[str, str] | None = None):
        self.setup, self.vectors, self.stop = setup, vectors, stop or {}
        self.server = SecAggServer(setup)
        self.devices = {d: SecAggDevice(d, setup) for d in setup.devices}
        self.uploads: dict[str, np.ndarray] = {}

    def answers(self, phase: str) -> list[str]:
        """The expected devices that have not dropped before `phase`."""
        return [d for d in self.server.expected()
                if d not in self.stop or PHASES.index(phase) < PHASES.index(self.stop[d])]

    def to_uploads(self, tamper=None) -> None:
        for d in self.answers("advertise"):
            self.server.advertise(self.devices[d].advertise())
        self.server.close_advertise()
        for d in self.answers("share"):
            self.server.share(self.devices[d].share(self.server.peers_for(d)))
        self.server.close_share()
        for d in self.answers("upload"):
            inp = self.server.masking_input_for(d)
            if tamper:
                inp = tamper(d, inp)
            self.uploads[d] = self.devices[d].mask(self.vectors[d], inp)
            self.server.add_masked(d, self.uploads[d])
            self.assert_no_clear_vector()

    def to_result(self, tamper=None) -> np.ndarray:
        self.to_uploads(tamper)
        self.server.close_uploads()
        request = self.server.unmask_request()
        for d in self.answers("unmask"):
            self.server.unmask(self.devices[d].unmask(request))
        self.assert_no_clear_vector()
        return self.server.result()

    def assert_no_clear_vector(self) -> None:
        for a in held_arrays(self.server):
            for d, v in self.vectors.items():
                assert not (a.shape == v.shape and np.array_equal(a, v)), f"the server holds {d}'s clear vector"


# Primitives.
def test_prg_words_is_aes256_ctr_keystream_and_add_keystreams_matches_it():
    seed = bytes(range(32))
    words = p.prg_words(seed, 5, np.uint16)
    assert words.dtype == np.uint16 and words.tolist() == p.prg_words(seed, 5, np.uint16).tolist()
    assert p.prg_words(bytes(32), 1, np.uint32)[0] != p.prg_words(seed, 1, np.uint32)[0]
    # AES-256 of the zero block under the zero key (the counter starts at zero) is dc95c078 a2408989 ...
    assert p.prg_words(bytes(32), 2, np.uint32).tolist() == [0x78C095DC, 0x898940A2]
    long = 3 * (1 << 20) // 2 + 7                     # crosses add_keystreams' piece boundaries
    total = np.arange(long, dtype=np.uint16)
    p.add_keystreams(total, [(seed, 1), (bytes(32), -1)])
    expect = np.arange(long, dtype=np.uint16) + p.prg_words(seed, long, np.uint16) - p.prg_words(bytes(32), long,
                                                                                                 np.uint16)
    assert np.array_equal(total, expect)


def test_derive_binds_purpose_and_context_and_context_is_unambiguous():
    s = bytes(32)
    keys = {p.derive(s, b"mask", p.context(b"x", "a", "b")), p.derive(s, b"self", p.context(b"x", "a", "b")),
            p.derive(s, b"mask", p.context(b"y", "a", "b")), p.derive(s, b"mask", p.context(b"x", "ab", ""))}
    assert len(keys) == 4 and all(len(k) == 32 for k in keys)
    assert p.split_context(p.context(b"x", "ab", ""), 3) == [b"x", b"ab", b""]
    with pytest.raises(p.SecAggError, match="trail"):
        p.split_context(p.context(b"x", "ab") + b"!", 2)


def test_seal_opens_only_untampered_with_the_same_associated_data():
    key = secrets.token_bytes(32)
    blob = p.seal(key, b"shares", b"s|u|v")
    assert p.open_sealed(key, blob, b"s|u|v") == b"shares"
    assert p.seal(key, b"shares", b"s|u|v") != blob        # a fresh nonce each time
    for bad_blob, ad in ((blob[:-1] + bytes([blob[-1] ^ 1]), b"s|u|v"), (blob, b"s|v|u"), (blob[:10], b"s|u|v")):
        with pytest.raises(p.SecAggError):
            p.open_sealed(key, bad_blob, ad)


def test_agree_is_symmetric_and_refuses_low_order_keys():
    a, b = p.KeyPair.generate(), p.KeyPair.generate()
    assert p.agree(a, b.public) == p.agree(b, a.public)
    assert p.KeyPair.from_private_bytes(a.private_bytes()).public == a.public
    with pytest.raises(p.SecAggError):
        p.agree(a, bytes(32))                              # the all-zero point: the secret would be public
    with pytest.raises(p.SecAggError, match="32 bytes"):
        p.agree(a, bytes(31))


def test_shamir_any_threshold_subset_rebuilds_the_16_byte_secret_and_fewer_do_not():
    secret = secrets.token_bytes(16)
    shares = p.shamir_split(secret, 3, 5)
    assert [len(s) for s in shares] == [16] * 5
    points = [(x + 1, s) for x, s in enumerate(shares)]
    assert p.shamir_combine(points[:3]) == secret == p.shamir_combine([points[4], points[1], points[2]])
    assert p.shamir_combine(points[:2]) != secret
    with pytest.raises(p.SecAggError):
        p.shamir_split(secret, 6, 5)
    with pytest.raises(p.SecAggError, match="16-byte"):
        p.shamir_split(secrets.token_bytes(32), 3, 5)


# The graph.
def test_neighbour_count_auto_and_requested():
    assert [graph.neighbour_count(n) for n in (2, 5, 30, 100)] == [1, 4, 16, 20]
    assert graph.neighbour_count(9, 3) == 4                # 9 * 3 is odd: no 3-regular graph on 9
    assert graph.neighbour_count(10, 3) == 3 and graph.neighbour_count(5, 10) == 4


def test_neighbours_is_a_seeded_symmetric_k_regular_graph():
    devices = [f"d{i}" for i in range(30)]
    for k in (4, 5, 16, 29):
        g = graph.neighbours(devices, k, seed=3)
        assert all(len(g[d]) == k and d not in g[d] and list(g[d]) == sorted(g[d]) for d in devices)
        assert all(d in g[e] for d in devices for e in g[d])
    assert graph.neighbours(devices, 4, 3) == graph.neighbours(devices, 4, 3) != graph.neighbours(devices, 4, 4)
    with pytest.raises(ValueError):
        graph.neighbours(devices[:9], 3, 0)


# End to end.
def test_five_devices_sum_equals_the_clear_sum_bit_for_bit():
    setup = make_setup(5, 3)
    vectors = vectors_for(setup)
    r = Round(setup, vectors)
    assert np.array_equal(r.to_result(), clear_sum(setup, vectors, setup.devices))
    assert r.server.phase == "done" and r.server.survivors == frozenset(setup.devices)


def test_five_devices_one_drops_after_sharing_another_after_uploading():
    """Issue 27's case: U3 keeps the device that uploaded, the one that shared only has its masks removed."""
    setup = make_setup(5, 2)
    vectors = vectors_for(setup, 1)
    r = Round(setup, vectors, stop={"dev01": "upload", "dev02": "unmask"})
    result = r.to_result()
    assert r.server.survivors == {"dev00", "dev02", "dev03", "dev04"} and r.server.dropped == {"dev01"}
    assert np.array_equal(result, clear_sum(setup, vectors, ["dev00", "dev02", "dev03", "dev04"]))


def test_drops_after_advertise_after_share_and_after_upload_leave_the_survivors_sum():
    """Seven devices, t = 3: four answer the unmask request, so each survivor's seed has three holders left."""
    setup = make_setup(7, 3)
    vectors = vectors_for(setup, 1)
    r = Round(setup, vectors, stop={"dev00": "share", "dev01": "upload", "dev02": "unmask"})
    result = r.to_result()
    assert r.server.advertised == frozenset(setup.devices)
    assert r.server.shared == frozenset(setup.devices) - {"dev00"}
    assert r.server.survivors == frozenset(setup.devices) - {"dev00", "dev01"} and r.server.dropped == {"dev01"}
    assert np.array_equal(result, clear_sum(setup, vectors, sorted(r.server.survivors)))


def test_thirty_devices_with_the_auto_graph_and_drops():
    setup = make_setup(30, 9, length=100)
    vectors = vectors_for(setup, 2)
    stop = {"dev03": "share", "dev10": "upload", "dev11": "upload", "dev20": "upload", "dev25": "unmask"}
    r = Round(setup, vectors, stop)
    result = r.to_result()
    k = graph.neighbour_count(30)
    assert k == 16 and all(len(r.devices[d].neighbours) == k for d in setup.devices)
    assert all(len(r.server.peers_for(d).keys) <= k for d in r.server.advertised)
    survivors = [d for d in setup.devices if d not in stop or stop[d] == "unmask"]
    assert np.array_equal(result, clear_sum(setup, vectors, survivors))


def test_masked_upload_is_uniform_mod_2_to_the_b():
    """Chi-square over the top 6 of b = 12 bits (64 buckets, 10^5 values): a constant input comes out
    uniform. The same test on the clear input fails, so it would see unmasked data."""
    setup = make_setup(3, 2, bits=12, length=100_000)
    r = Round(setup, {d: np.full(setup.length, 7, np.uint16) for d in setup.devices})
    r.to_uploads()

    def p_uniform(values: np.ndarray) -> float:
        return chisquare(np.bincount(values >> 6, minlength=64)).pvalue

    assert all(v.max() < 1 << 12 for v in r.uploads.values())
    assert p_uniform(r.uploads["dev00"]) > 1e-6
    assert p_uniform(r.vectors["dev00"]) < 1e-6


def test_no_array_the_server_holds_is_a_clear_vector():
    setup = make_setup(4, 2, length=64)
    vectors = vectors_for(setup, 3)
    r = Round(setup, vectors)        # Round checks the server's arrays after every upload and unmask reply
    assert np.array_equal(r.to_result(), clear_sum(setup, vectors, setup.devices))


# Attacks: a hostile coordinator, replayed, relabelled and tampered messages.
def _dealt(n: int = 5, t: int = 2):
    """A round of n devices through their uploads, every device's shares dealt."""
    setup = make_setup(n, t)
    r = Round(setup, vectors_for(setup, 4))
    r.to_uploads()
    return setup, r


def test_a_device_never_reveals_both_shares_of_one_peer():
    """The hostile coordinator asks dev00 for shares of a neighbour as a survivor and as dropped, in one request
    and then across two; dev00 refuses each time, so the coordinator never holds b_v and s_v for one v."""
    setup, r = _dealt()
    dev = r.devices["dev00"]
    v = sorted(dev.neighbours)[0]
    everyone = tuple(setup.devices)
    with pytest.raises(ProtocolViolation, match="both shares"):
        dev.unmask(UnmaskRequest(everyone, (v,)))
    honest = dev.unmask(UnmaskRequest(everyone, ()))
    assert v in honest.self_shares and not honest.key_shares
    flipped = UnmaskRequest(tuple(d for d in everyone if d != v), (v,))
    with pytest.raises(ProtocolViolation, match="revealed already|differs"):
        dev.unmask(flipped)
    assert dev.unmask(UnmaskRequest(everyone, ())) == honest        # the same request again: the same answer


def test_a_device_refuses_requests_that_contradict_what_it_saw():
    setup, r = _dealt()
    dev = r.devices["dev01"]
    with pytest.raises(ProtocolViolation, match="not among the survivors"):
        dev.unmask(UnmaskRequest(tuple(d for d in setup.devices if d != "dev01"), ("dev01",)))
    with pytest.raises(ProtocolViolation, match="shared set"):
        dev.unmask(UnmaskRequest(tuple(setup.devices[:4]), ()))    # dev04 vanished from U2
    fresh = SecAggDevice("dev02", setup)
    with pytest.raises(ProtocolViolation, match="before this device masked"):
        fresh.unmask(UnmaskRequest(tuple(setup.devices), ()))


def test_replayed_duplicate_and_relabelled_key_messages_are_refused_with_typed_refusals():
    setup = make_setup(4, 2)
    server = SecAggServer(setup)
    devices = {d: SecAggDevice(d, setup) for d in setup.devices}
    old = SecAggDevice("dev00", replace(setup, session=secrets.token_bytes(16))).advertise()
    with pytest.raises(UpdateRejected, match="another round's session") as e:
        server.advertise(old)                                           # a replay from another round
    assert e.value.code is Refusal.PRECONDITION
    server.advertise(devices["dev00"].advertise())
    with pytest.raises(UpdateRejected, match="already sent") as e:
        server.advertise(devices["dev00"].advertise())                  # a duplicate
    assert e.value.code is Refusal.EXISTS
    stolen = replace(devices["dev00"].advertise(), device="dev01")      # dev00's keys under dev01's name
    with pytest.raises(UpdateRejected, match="relabelled") as e:
        server.advertise(stolen)
    assert e.value.code is Refusal.INVALID
    stranger = replace(devices["dev01"].advertise(), device="dev99")
    with pytest.raises(UpdateRejected, match="may not advertise") as e:
        server.advertise(stranger)
    assert e.value.code is Refusal.PRECONDITION
    for d in setup.devices[1:]:                                         # the round goes on
        server.advertise(devices[d].advertise())
    server.close_advertise()
    assert server.advertised == frozenset(setup.devices)


def test_a_share_that_fails_to_decrypt_is_reported_and_the_round_completes():
    """The coordinator corrupts the blob dev01 sealed to dev00: dev00 reports dev01 in `failed`; dev01's
    other holders still reach the threshold, and the sum is exact."""
    setup = make_setup(5, 2)
    vectors = vectors_for(setup, 5)
    r = Round(setup, vectors)

    def corrupt(d, inp):
        if d != "dev00" or "dev01" not in inp.incoming:
            return inp
        blob = bytearray(inp.incoming["dev01"])
        blob[-1] ^= 1
        return MaskingInput(inp.shared, {**inp.incoming, "dev01": bytes(blob)})

    result = r.to_result(tamper=corrupt)
    assert r.server.failures == {"dev00": ("dev01",)}
    assert np.array_equal(result, clear_sum(setup, vectors, setup.devices))


def test_a_wrong_key_share_is_caught_by_the_advertised_public_key():
    """dev03 drops after sharing; one holder returns a corrupted share of dev03's key seed: the key rebuilt
    from it does not match the key dev03 advertised, and the round aborts instead of unmasking garbage."""
    setup = make_setup(5, 2)
    r = Round(setup, vectors_for(setup, 6), stop={"dev03": "upload"})
    r.to_uploads()
    r.server.close_uploads()
    request = r.server.unmask_request()
    holders = sorted(d for d in r.answers("unmask") if "dev03" in r.devices[d].neighbours)
    for d in r.answers("unmask"):
        reply = r.devices[d].unmask(request)
        if d == holders[0]:
            x, share = reply.key_shares["dev03"]
            reply = replace(reply, key_shares={**reply.key_shares, "dev03": (x, bytes(16 - len(share)) +
                                                                         bytes(b ^ 0xFF for b in share))})
        r.server.unmask(reply)
    with pytest.raises(RoundAborted, match="does not match"):
        r.server.result()


def test_unmask_replies_with_shares_not_asked_for_are_refused():
    setup, r = _dealt()
    r.server.close_uploads()
    request = r.server.unmask_request()
    reply = r.devices["dev00"].unmask(request)
    v = next(iter(reply.self_shares))
    forged = replace(reply, key_shares={v: reply.self_shares[v]}, self_shares={})  # a survivor's key share
    with pytest.raises(UpdateRejected, match="not asked") as e:
        r.server.unmask(forged)
    assert e.value.code is Refusal.INVALID
    r.server.unmask(reply)                                              # the honest reply is still taken


def test_a_malformed_prompt_is_a_protocol_violation_the_device_loop_handles():
    """A prompt with no phase, or a setup that does not validate (threshold 0, a session of the wrong size),
    is refused as a ProtocolViolation, which the gRPC runtime and the simulator's runners log and go on from,
    instead of an error that would end the device's loop."""
    from edgelora.edge_client.sessions import SecureSessions
    from edgelora.protos import edgelora_pb2 as pb
    from edgelora.protos import serde

    sessions = SecureSessions()
    with pytest.raises(ProtocolViolation, match="malformed"):
        sessions.answer("dev00", pb.TaskHeader(kind=pb.TaskHeader.SECAGG, round=3))
    good = make_setup(4, 2)
    for field, value in (("threshold", 0), ("session", b"short")):
        header = serde.prompt_to_proto(3, good)
        setattr(header.secagg.advertise, field, value)
        with pytest.raises(ProtocolViolation, match="malformed"):
            sessions.answer("dev00", header)
    assert sessions.answer("dev00", serde.prompt_to_proto(3, good)).device_id == "dev00"
