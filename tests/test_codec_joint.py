"""The joint index stream (bundle version 3) and decode_flat: the Golomb-coded sparse tensors' indices in one
stream, each tensor under its own parameter, decoded in one pass however many tensors there are; and every
check of it."""
import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from edgelora import codec
from edgelora.codec import gap_bytes, golomb, values, zstd_frame
from edgelora.codec.container import assemble, take_apart
from edgelora.codec.header import pack_header
from edgelora.codec.index_coding import BITMAP, JOINT, JOINT_BYTES
from edgelora.sparsity import global_topk

RNG = np.random.default_rng(11)


def random_sparse(rng, shape, k):
    n = int(np.prod(shape))
    return codec.Sparse(shape, np.sort(rng.choice(n, k, replace=False)), rng.normal(size=k).astype(np.float32))


# three sparse tensors: 5 of 40, none of 7 (k = 0) and all 6 of 6 (k = n), then a dense one
TENSORS = {"a": random_sparse(RNG, (5, 8), 5), "empty": random_sparse(RNG, (7,), 0),
           "full": random_sparse(RNG, (2, 3), 6), "d": codec.Dense(RNG.normal(size=(2, 2)).astype(np.float32))}


def assert_same(decoded: dict, sent: dict) -> None:
    assert list(decoded) == list(sent)
    for name, t in sent.items():
        got = decoded[name]
        assert type(got) is type(t) and tuple(got.shape) == tuple(t.shape)
        np.testing.assert_array_equal(np.asarray(got.values).reshape(-1), np.asarray(t.values).reshape(-1))
        if isinstance(t, codec.Sparse):
            np.testing.assert_array_equal(got.indices, t.indices)


def test_sparse_tensors_share_one_stream_by_hand():
    """a holds flat 1 and 6 of 8 (gaps 1 and 4), b holds 0 and 3 of 4 (gaps 0 and 2). Each entry says joint with
    its own Golomb m and no bytes of its own; the stream is one byte string of the two codes' parts regrouped,
    and decode_flat lays the tensors end to end: positions 1, 6, 8 and 11."""
    tensors = {"a": codec.Sparse((8,), np.array([1, 6]), np.array([1.0, 2.0], np.float32)),
               "b": codec.Sparse((2, 2), np.array([0, 3]), np.array([3.0, 4.0], np.float32))}
    data = codec.encode_bundle(tensors)
    assert data[4] == 3
    table, sides, _ = take_apart(data)
    ms = [e.index_param for e in table.entries]
    assert [(e.index_coder, e.index_size) for e in table.entries] == [(JOINT, 0)] * 2 and min(ms) >= 1
    assert table.joint_size == len(sides[0]) and sides[0] == golomb.encode_joint(
        [np.array([1, 4]), np.array([0, 2])], ms)
    flat = codec.decode_flat(data)
    np.testing.assert_array_equal(flat.positions, [1, 6, 8, 11])
    np.testing.assert_array_equal(flat.values, [1, 2, 3, 4])
    np.testing.assert_array_equal(flat.starts, [0, 2, 4])
    assert flat.names == ("a", "b") and flat.shapes == ((8,), (2, 2))
    assert_same(codec.decode_bundle(data), tensors)


def test_each_tensor_keeps_its_own_parameter():
    """Global top-k picks many entries of one tensor and few of another: each keeps the Golomb m its own
    density calls for, so the joint stream is never larger than the tensors' own streams (it saves their
    byte padding), and decoding one stream gives every tensor back."""
    rng = np.random.default_rng(2)
    tensors = {"dense-ish": random_sparse(rng, (4000,), 1000), "thin": random_sparse(rng, (4000,), 8),
               "mid": random_sparse(rng, (500, 4), 100)}
    joint, own = codec.encode_bundle(tensors), codec.encode_bundle(tensors, joint_indices=False)
    table = take_apart(joint)[0]
    assert len({e.index_param for e in table.entries}) == 3  # three densities, three parameters
    own_index_bytes = sum(e.index_size for e in take_apart(own)[0].entries)
    assert table.joint_size <= own_index_bytes
    assert_same(codec.decode_bundle(joint), tensors)


def test_one_sparse_tensor_or_joint_off_keeps_the_older_versions():
    one = {"a": TENSORS["a"], "d": TENSORS["d"]}
    assert codec.encode_bundle(one)[4] == 1
    data = codec.encode_bundle(TENSORS, joint_indices=False)
    assert data[4] == 1 and JOINT not in [e.index_coder for e in take_apart(data)[0].entries]
    assert_same(codec.decode_bundle(data), TENSORS)
    two = dict(TENSORS, b=random_sparse(RNG, (30,), 4))  # a second Golomb-coded tensor: the joint stream
    assert codec.encode_bundle(two)[4] == 3
    blockwise = codec.encode_bundle(two, value_type="int8_block")
    assert blockwise[4] == 3  # joint and blockwise: version 3 reads both
    assert_same(codec.decode_bundle(codec.encode_bundle(two)), two)


@pytest.mark.parametrize("value_type", codec.VALUE_TYPES)
def test_mixed_forms_round_trip_under_every_value_type(value_type):
    tensors = dict(TENSORS, m=codec.Masked((6, 6), 3, 0.25, RNG.normal(size=9).astype(np.float32)))
    data = codec.encode_bundle(tensors, value_type=value_type)
    flat = codec.decode_flat(data)
    assert flat.positions is None  # not every tensor is sparse
    decoded = codec.decode_bundle(data)
    for name, t in tensors.items():
        if isinstance(t, codec.Sparse):
            np.testing.assert_array_equal(decoded[name].indices, t.indices)
    np.testing.assert_array_equal(np.concatenate([np.asarray(t.values).reshape(-1) for t in decoded.values()]),
                                  flat.values)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 300), st.floats(0, 1)), min_size=2, max_size=8), st.integers(0, 2**32 - 1))
def test_positions_are_the_tensors_laid_end_to_end(sizes_and_densities, seed):
    """Any sizes and densities (empty tensors, k = 0, k = n): decode_flat's positions are each tensor's indices
    plus the sizes before it, and decode_bundle gives back every tensor, joint or not."""
    rng = np.random.default_rng(seed)
    tensors = {f"t{i}": random_sparse(rng, (n,), int(round(d * n))) for i, (n, d) in enumerate(sizes_and_densities)}
    start, expect = 0, []
    for t in tensors.values():
        expect.append(t.indices + start)
        start += t.shape[0]
    for joint in (True, False):
        data = codec.encode_bundle(tensors, joint_indices=joint)
        flat = codec.decode_flat(data)
        np.testing.assert_array_equal(flat.positions, np.concatenate(expect))
        assert_same(codec.decode_bundle(data), tensors)


def test_a_tensor_whose_bitmap_codes_better_keeps_its_own_stream():
    """Beside two Golomb-coded tensors, one at density 0.7 (where Golomb is 13 % over the bound and its
    bitmap through zstd about 1 %) keeps its own stream."""
    n, rng = 40_000, np.random.default_rng(4)
    tensors = {"dense": codec.Sparse((n,), np.flatnonzero(rng.random(n) < 0.7), None),
               "a": random_sparse(rng, (3000,), 30), "b": random_sparse(rng, (3000,), 60)}
    tensors["dense"] = dataclasses.replace(tensors["dense"], values=np.ones(tensors["dense"].indices.size, np.float32))
    data = codec.encode_bundle(tensors)
    assert [e.index_coder for e in take_apart(data)[0].entries] == [BITMAP, JOINT, JOINT] and data[4] == 4
    assert_same(codec.decode_bundle(data), tensors)
    np.testing.assert_array_equal(codec.decode_flat(data).positions[-90:-60],
                                  tensors["a"].indices + n)


# -- every check of the joint stream --------------------------------------------------------------------------
VALID = codec.encode_bundle({"a": TENSORS["a"], "b": random_sparse(RNG, (50,), 9)})


def rebuilt(entries=(), stream=None, joint_size=None, preamble=None):
    """VALID with its entries changed by `entries` ((index, {field: value}) pairs), its joint stream replaced
    by `stream` (its size set to match) or its joint_size set."""
    table, sides, section = take_apart(VALID)
    for i, changes in entries:
        table.entries[i] = dataclasses.replace(table.entries[i], **changes)
    if stream is not None:
        sides[0], table.joint_size = stream, len(stream)
    if joint_size is not None:
        table.joint_size = joint_size
    return assemble(table, sides, section, preamble=preamble)


def test_valid_bundle_decodes():
    assert codec.decode_flat(VALID).values.size == 14
    assert codec.decode_flat(rebuilt()).values.size == 14


@pytest.mark.parametrize("kw,field", [
    # 14 values in all, as the planes say, but 4 + 10 where the stream holds 5 + 9
    (dict(entries=[(0, dict(count=4)), (1, dict(count=10))]), "joint index stream: index_payload: golomb"),
    (dict(entries=[(0, dict(index_size=1))]), "a: index_coder: a joint entry has index_size 0 and count >= 1"),
    (dict(entries=[(0, dict(index_param=0))]), r"a: index_param: golomb m=0 outside \[1, 40\]"),
    (dict(entries=[(1, dict(index_param=51))]), r"b: index_param: golomb m=51 outside \[1, 50\]"),
    (dict(entries=[(0, dict(index_coder=9))]), "index_coder: unknown coder 9"),
    (dict(entries=[(0, dict(index_param=1))]), "joint index stream: index_payload: golomb"),  # another m: garbage
    (dict(stream=b"\x00"), "joint index stream: count: 14 indices cannot fit"),
    (dict(stream=b"\xff" * 40), "joint index stream: index_payload: golomb"),
    (dict(stream=b"\x00" * 30 + b"\xff" * 4), "joint index stream: index_payload: golomb"),
    (dict(joint_size=10 ** 6), "index_size/plane_size: payload sizes"),
])
def test_joint_stream_checks(kw, field):
    with pytest.raises(codec.CodecError, match=field):
        codec.decode_bundle(rebuilt(**kw))


def test_a_joint_entry_needs_version_3():
    """A version 2 header has no joint_size, so an entry of it that says joint is refused by name."""
    table, sides, section = take_apart(VALID)
    raw = pack_header(table)
    record = 4 + 4 * 9  # tensor_count and the four plane records come before joint_size (8 bytes)
    frame = zstd_frame.compress(raw[:record] + raw[record + 8:], 3)
    v2 = assemble(table, sides[1:], section, header_frame=frame, preamble=(b"ELCB", 2, 0, 0))
    with pytest.raises(codec.CodecError, match="a: index_coder: the joint stream needs bundle version 3, this is 2"):
        codec.decode_bundle(v2)


def test_a_joint_stream_no_tensor_claims_is_refused():
    table, sides, section = take_apart(codec.encode_bundle({"a": TENSORS["a"]}))  # version 1, one stream
    raw = pack_header(table)
    record = 4 + 4 * 9  # a version 3 header: joint_size after the plane records
    frame = zstd_frame.compress(raw[:record] + (3).to_bytes(8, "little") + raw[record:], 3)
    bundle = assemble(table, [b"abc"] + sides, section, header_frame=frame, preamble=(b"ELCB", 3, 0, 0))
    with pytest.raises(codec.CodecError, match="joint_size: 3 bytes of joint index stream, and no tensor says joint"):
        codec.decode_bundle(bundle)


def test_decode_joint_reads_fields_past_57_bits():
    """A field wider than one 64-bit window holds (m past 2**57, a tensor past 2**58 entries: decode_joint
    takes ns as numbers, nothing that big is allocated) is read bit by bit, beside a narrow one."""
    big, small = 2**60, 100
    idx_big, idx_small = np.array([3, 2**59 + 5, 2**60 - 1]), np.array([0, 7, 99])
    ms = [2**59 + 3, 5]
    payload = golomb.encode_joint([golomb.gaps_of(idx_big), golomb.gaps_of(idx_small)], ms)
    local = golomb.decode_joint(payload, np.array(ms), np.array([big, small]), np.array([3, 3]))
    np.testing.assert_array_equal(local, np.concatenate([idx_big, idx_small]))


def test_decode_joint_reads_fields_of_mixed_widths_zero_included():
    """m = 1 and 2 have no remainder field (width 0), m = 11 a 3-bit one and m = 5000 a 12-bit one: one run of
    mixed widths, read a 32-bit window per field, gives every tensor back."""
    rng = np.random.default_rng(6)
    ms, ns = [1, 11, 2, 5000, 11], [40, 400, 40, 10**6, 400]
    idx = [np.sort(rng.choice(n, max(2, n // 8), replace=False)) for n in ns]
    payload = golomb.encode_joint([golomb.gaps_of(i) for i in idx], ms)
    local = golomb.decode_joint(payload, np.array(ms), np.array(ns), np.array([i.size for i in idx]))
    np.testing.assert_array_equal(local, np.concatenate(idx))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 2000), st.floats(0, 1), st.integers(0, 8)), min_size=1, max_size=12),
       st.integers(1, 4000), st.integers(0, 2**32 - 1))
def test_decode_joint_inverts_encode_joint_under_any_parameters_in_runs_of_any_size(tensors, chunk, seed):
    """Any sizes, counts >= 1 and Golomb parameters (not only the best ones, m = 1 included): the stream is
    exactly the tensors' Golomb bits, and decode_joint, working through runs of whole tensors of at most
    golomb.CHUNK indices, gives them back at any run size (1: every tensor a run alone)."""
    rng = np.random.default_rng(seed)
    gaps, ms, ns, counts, expect = [], [], [], [], []
    for n, density, m_shift in tensors:
        k = max(1, int(density * n))
        idx = np.sort(rng.choice(n, k, replace=False))
        g = golomb.gaps_of(idx)
        gaps.append(g), ms.append(max(1, min(n, golomb.best_parameter(g, n) + m_shift - 4))), ns.append(n)
        counts.append(k), expect.append(idx)
    payload = golomb.encode_joint(gaps, ms)
    assert len(payload) == -(-sum(golomb.golomb_bits(g, m) for g, m in zip(gaps, ms)) // 8)  # the codes, regrouped
    old, golomb.CHUNK = golomb.CHUNK, chunk
    try:
        local = golomb.decode_joint(payload, np.array(ms), np.array(ns), np.array(counts))
    finally:
        golomb.CHUNK = old
    np.testing.assert_array_equal(local, np.concatenate(expect))


# -- the joint stream as byte gaps (version 4) --------------------------------------------------------------
def topk_upload(rng, density, tensors=6, size=(512, 256)):
    """A device's top-k upload over a few LoRA-sized tensors, as FLASC sends it."""
    delta = {f"t{i}": rng.standard_normal(size).astype(np.float32) for i in range(tensors)}
    return global_topk(delta, density)


def test_byte_gaps_by_hand():
    """The stream of test_sparse_tensors_share_one_stream_by_hand as bytes: gaps 1, 4 then 0, 2, one zstd frame;
    each entry says coder 4 with index_param 0, the bundle is version 4, and the indices come back."""
    tensors = {"a": codec.Sparse((8,), np.array([1, 6]), np.array([1.0, 2.0], np.float32)),
               "b": codec.Sparse((2, 2), np.array([0, 3]), np.array([3.0, 4.0], np.float32))}
    data = codec.encode_bundle(tensors, byte_gap_slack=100.0)  # a 4-gap frame is larger than 1 byte of Golomb
    assert data[4] == 4
    table, sides, _ = take_apart(data)
    assert [(e.index_coder, e.index_param, e.index_size) for e in table.entries] == [(JOINT_BYTES, 0, 0)] * 2
    assert zstd_frame.decompress(sides[0], 4, "stream") == bytes([1, 4, 0, 2])
    np.testing.assert_array_equal(codec.decode_flat(data).positions, [1, 6, 8, 11])
    assert_same(codec.decode_bundle(data), tensors)


def test_gaps_of_255_and_more_follow_the_bytes_as_u64():
    """A gap of 254 is its byte; 255, 10**6 and 298 are a 255 byte each and, after the k bytes, 0, 10**6 - 255
    and 298 - 255."""
    idx = np.array([254, 510, 510 + 10**6 + 1])  # gaps 254, 255, 10**6
    tensors = {"a": codec.Sparse((2 * 10**6,), idx, np.ones(3, np.float32)),
               "b": codec.Sparse((300,), np.array([0, 299]), np.ones(2, np.float32))}
    data = codec.encode_bundle(tensors, byte_gap_slack=100.0)
    content = zstd_frame.decompress(take_apart(data)[1][0], 5 + 3 * 8, "stream")
    assert content[:5] == bytes([254, 255, 255, 0, 255])
    assert np.frombuffer(content[5:], "<u8").tolist() == [0, 10**6 - 255, 298 - 255]
    assert_same(codec.decode_bundle(data), tensors)


def test_the_encoder_writes_byte_gaps_where_they_cost_at_most_one_percent_more():
    """At density 1/16 the byte gaps are within 1 % of Golomb's size and written; at 1/64 a gap of 255 or more
    is common and costs its u64, and Golomb stays. Either way the same indices come back."""
    rng = np.random.default_rng(5)
    for density, coder in ((1 / 16, JOINT_BYTES), (1 / 64, JOINT)):
        tensors = topk_upload(rng, density)
        chosen, golomb_only = codec.encode_bundle(tensors), codec.encode_bundle(tensors, byte_gap_slack=-1)
        table, reference = take_apart(chosen)[0], take_apart(golomb_only)[0]
        assert {e.index_coder for e in table.joint} == {coder} and reference.joint
        assert {e.index_coder for e in reference.joint} == {JOINT}
        assert coder == JOINT or chosen[4] == 4
        assert table.joint_size <= 1.01 * reference.joint_size
        np.testing.assert_array_equal(codec.decode_flat(chosen).positions, codec.decode_flat(golomb_only).positions)
        assert_same(codec.decode_bundle(chosen), tensors)


def test_short_gaps_are_written_by_the_optimal_parser_where_a_fast_level_misses_the_one_percent():
    """At density 1/4 the gaps are short and 7-byte runs of them repeat by chance: level 3's LZ matches make the
    frame more than 1 % larger than Golomb, zstd's optimal parser leaves them to the entropy stage and is
    within it, so the fast-to-read byte gaps are written (the stream decodes as any zstd frame)."""
    tensors = topk_upload(np.random.default_rng(6), 1 / 4, tensors=40, size=(16, 576))  # LoRA A matrices
    golomb_only = codec.encode_bundle(tensors, byte_gap_slack=-1)
    reference = take_apart(golomb_only)[0]
    gaps = [golomb.gaps_of(tensors[e.name].indices) for e in reference.joint]
    assert len(gap_bytes.encode(gaps, 3)) > 1.01 * reference.joint_size  # a fast level alone misses
    chosen = codec.encode_bundle(tensors)
    table = take_apart(chosen)[0]
    assert {e.index_coder for e in table.joint} == {JOINT_BYTES}
    assert table.joint_size <= 1.01 * reference.joint_size
    np.testing.assert_array_equal(codec.decode_flat(chosen).positions, codec.decode_flat(golomb_only).positions)
    assert_same(codec.decode_bundle(chosen), tensors)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 3000), st.floats(0, 1)), min_size=1, max_size=10),
       st.integers(0, 2**32 - 1))
def test_byte_gaps_decode_to_the_same_indices_as_golomb(tensors, seed):
    """Any sizes and counts >= 1 (gaps of 0, of 255 and more, k = n): gap_bytes.decode gives back what
    golomb.decode_joint gives back from the same tensors."""
    rng = np.random.default_rng(seed)
    gaps, ms, ns, counts, expect = [], [], [], [], []
    for n, density in tensors:
        k = max(1, int(density * n))
        idx = np.sort(rng.choice(n, k, replace=False))
        gaps.append(golomb.gaps_of(idx)), ms.append(golomb.best_parameter(gaps[-1], n))
        ns.append(n), counts.append(k), expect.append(idx)
    local = gap_bytes.decode(gap_bytes.encode(gaps, 3), np.array(ns), np.array(counts))
    np.testing.assert_array_equal(local, np.concatenate(expect))
    np.testing.assert_array_equal(local, golomb.decode_joint(golomb.encode_joint(gaps, ms), np.array(ms),
                                                             np.array(ns), np.array(counts)))


BYTES_VALID = codec.encode_bundle({"a": TENSORS["a"], "b": random_sparse(RNG, (50,), 9)}, byte_gap_slack=100.0)


def bytes_rebuilt(entries=(), content=None, frame=None, preamble=None):
    """BYTES_VALID with entries changed, its stream replaced by a frame of `content` (or by `frame`)."""
    table, sides, section = take_apart(BYTES_VALID)
    for i, changes in entries:
        table.entries[i] = dataclasses.replace(table.entries[i], **changes)
    if content is not None:
        frame = zstd_frame.compress(content, 3)
    if frame is not None:
        sides[0], table.joint_size = frame, len(frame)
    return assemble(table, sides, section, preamble=preamble)



@pytest.mark.parametrize("kw,field", [
    (dict(content=bytes(13)), r"joint index stream: zstd frame declares 13 bytes; 14 gap bytes"),
    (dict(content=bytes(14) + bytes(7)), r"joint index stream: zstd frame declares 21 bytes"),
    (dict(content=bytes(14) + bytes(8 * 15)), r"joint index stream: zstd frame declares 134 bytes"),
    (dict(content=bytes([255]) + bytes(13)), "1 gap bytes say 255 or more, the frame carries 0 u64 remainders"),
    (dict(content=bytes(14) + bytes(8)), "0 gap bytes say 255 or more, the frame carries 1 u64 remainders"),
    (dict(content=bytes([255]) + bytes(13) + (2**63).to_bytes(8, "little")), "runs past every tensor's n"),
    (dict(content=bytes([39]) + bytes(13)), "joint index stream: index 43 of the stream's tensor 0 >= n=40"),
    (dict(content=bytes(5) + bytes([42]) + bytes(8)), "index 50 of the stream's tensor 1 >= n=50"),
    (dict(frame=b"\x28\xb5\x2f\xfd" + bytes(20)), "joint index stream: "),
    (dict(entries=[(0, dict(index_param=3))]), "a: index_param: a byte-gap entry has index_param 0, not 3"),
    (dict(entries=[(0, dict(index_coder=JOINT, index_param=3))], preamble=(b"ELCB", 4, 0, 0)),
     r"index_coder: the joint stream is Golomb codes \(3\) or byte gaps \(4\), and entries say both"),
    (dict(preamble=(b"ELCB", 3, 0, 0)), "a: index_coder: the joint stream of byte gaps needs bundle version 4, this is 3"),
])
def test_byte_gap_stream_checks(kw, field):
    assert_same(codec.decode_bundle(bytes_rebuilt()), codec.decode_bundle(BYTES_VALID))  # unchanged, it decodes
    with pytest.raises(codec.CodecError, match=field):
        codec.decode_bundle(bytes_rebuilt(**kw))


@pytest.mark.parametrize("stream", ["golomb", "byte gaps"])
def test_every_truncation_and_bit_flip_is_rejected(stream):
    valid = VALID if stream == "golomb" else BYTES_VALID
    assert valid[4] == (3 if stream == "golomb" else 4)
    for cut in range(len(valid)):
        with pytest.raises(codec.CodecError):
            codec.decode_flat(valid[:cut])
    data = bytearray(valid)
    for pos in range(len(data)):
        data[pos] ^= 0x10
        with pytest.raises(codec.CodecError):  # the crc32 catches any one flip
            codec.decode_flat(bytes(data))
        data[pos] ^= 0x10



# -- blockwise values of every tensor in one pass --------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 300), min_size=1, max_size=8), st.sampled_from(["int4_block", "int8_block"]),
       st.sampled_from([1, 3, 64]), st.integers(0, 2**32 - 1))
def test_blockwise_values_of_every_tensor_decode_in_one_pass_as_tensor_by_tensor(counts, value_type, block, seed):
    """Any counts (0, odd: an int4 padding nibble) and block sizes: decode_flat's one pass over the bundle's
    codes and scales gives each tensor's values exactly as its own codes times its own block scales, worked
    out here tensor by tensor from the format (FORMAT.md, "Values")."""
    rng = np.random.default_rng(seed)
    tensors = {f"t{i}": random_sparse(rng, (400,), c) for i, c in enumerate(counts)}
    data = codec.encode_bundle(tensors, value_type=value_type, block_size=block)
    table, sides, section = take_apart(data)
    plane = section[:table.plane_sizes[0]]
    if table.plane_codecs[0]:  # zstd where that was smaller
        plane = zstd_frame.decompress(plane, values.plane_sizes(np.full(len(counts), values.VALUE_TYPES.index(value_type)),
                                                                 np.array(counts))[0], "plane")
    stored = values.unpack_planes([plane, b"", b"", b""], [value_type] * len(counts), counts)
    expect = []
    for e, s, side in zip(table.entries, stored, sides[1:] if data[4] >= 3 else sides):
        if value_type == "int4_block":  # two codes a byte, the first high; code = nibble - 8
            codes = np.stack([s >> 4, s & 15], axis=1).reshape(-1)[:e.count].astype(np.float32) - 8
        else:
            codes = s.astype(np.float32)
        expect.append(codes * np.repeat(np.frombuffer(side[e.index_size:], "<f4"), block)[:e.count])
    np.testing.assert_array_equal(codec.decode_flat(data).values, np.concatenate(expect))


def test_a_bad_code_in_one_tensor_of_a_blockwise_bundle_is_named():
    """The one pass finds the bad nibble; the bundle is read again tensor by tensor to say whose it is."""
    tensors = {n: random_sparse(np.random.default_rng(i), (50,), 7) for i, n in enumerate(("a", "b", "c"))}
    table, sides, section = take_apart(codec.encode_bundle(tensors, value_type="int4_block"))
    assert table.plane_codecs[0] == 0  # raw: byte 4 is b's first pair of codes
    bad = bytearray(section)
    bad[4] &= 0x0F  # b's first code: nibble 0 (code -8)
    with pytest.raises(codec.CodecError, match="b: values: int4 nibble 0"):
        codec.decode_flat(assemble(table, sides, bytes(bad)))
