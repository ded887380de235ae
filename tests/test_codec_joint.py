"""The joint index stream (bundle version 3) and decode_flat: every sparse tensor's indices coded as one stream
over the tensors laid end to end, decoded in one pass however many tensors there are; and every check of it."""
import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from edgelora import codec
from edgelora.codec import zstd_frame
from edgelora.codec.container import assemble, take_apart
from edgelora.codec.header import pack_header
from edgelora.codec.index_coding import GOLOMB, JOINT, NONE, RANS

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
    """a holds flat 1 and 6 of 8, b holds 0 and 3 of 4: laid end to end, the stream codes 1, 6, 8 and 11 of 12;
    each entry says joint, with no bytes of its own, and the bundle is version 3."""
    tensors = {"a": codec.Sparse((8,), np.array([1, 6]), np.array([1.0, 2.0], np.float32)),
               "b": codec.Sparse((2, 2), np.array([0, 3]), np.array([3.0, 4.0], np.float32))}
    data = codec.encode_bundle(tensors)
    assert data[4] == 3
    table, sides, _ = take_apart(data)
    assert [(e.index_coder, e.index_param, e.index_size) for e in table.entries] == [(JOINT, 0, 0)] * 2
    assert table.joint_size == len(sides[0]) > 0
    flat = codec.decode_flat(data)
    np.testing.assert_array_equal(flat.positions, [1, 6, 8, 11])
    np.testing.assert_array_equal(flat.values, [1, 2, 3, 4])
    np.testing.assert_array_equal(flat.starts, [0, 2, 4])
    assert flat.names == ("a", "b") and flat.shapes == ((8,), (2, 2))
    assert_same(codec.decode_bundle(data), tensors)


def test_one_sparse_tensor_or_joint_off_keeps_the_older_versions():
    one = {"a": TENSORS["a"], "d": TENSORS["d"]}
    assert codec.encode_bundle(one)[4] == 1
    data = codec.encode_bundle(TENSORS, joint_indices=False)
    assert data[4] == 1 and JOINT not in [e.index_coder for e in take_apart(data)[0].entries]
    assert_same(codec.decode_bundle(data), TENSORS)
    blockwise = codec.encode_bundle(TENSORS, value_type="int8_block")
    assert blockwise[4] == 3  # joint and blockwise: version 3 reads both


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


def test_a_dense_joint_stream_uses_rans():
    n = 40_000
    tensors = {f"t{i}": codec.Sparse((n,), np.flatnonzero(RNG.random(n) < 0.4), None) for i in range(2)}
    tensors = {k: dataclasses.replace(t, values=np.ones(t.indices.size, np.float32)) for k, t in tensors.items()}
    data = codec.encode_bundle(tensors)
    assert take_apart(data)[0].joint_coder == RANS
    assert_same(codec.decode_bundle(data), tensors)


# -- every check of the joint stream --------------------------------------------------------------------------
VALID = codec.encode_bundle({"a": TENSORS["a"], "b": random_sparse(RNG, (50,), 9)})


def rebuilt(entries=(), joint=None, stream=None, preamble=None):
    """VALID with its entries changed by `entries` ((index, {field: value}) pairs), the joint record changed by
    `joint` (a dict) or its stream replaced by `stream` (its size set to match)."""
    table, sides, section = take_apart(VALID)
    for i, changes in entries:
        table.entries[i] = dataclasses.replace(table.entries[i], **changes)
    if stream is not None:
        sides[0], table.joint_size = stream, len(stream)
    for k, v in (joint or {}).items():
        setattr(table, k, v)
    return assemble(table, sides, section, preamble=preamble)


def test_valid_bundle_decodes():
    assert codec.decode_flat(VALID).values.size == 14
    assert codec.decode_flat(rebuilt()).values.size == 14


@pytest.mark.parametrize("kw,field", [
    # 14 values in all, as the planes say, but 4 + 10 where the stream gives 5 + 9
    (dict(entries=[(0, dict(count=4)), (1, dict(count=10))]),
     "a: count: the joint index stream gives it 5 indices, its count says 4"),
    (dict(entries=[(0, dict(index_param=3))]), "a joint entry has index_param and index_size 0"),
    (dict(entries=[(0, dict(index_size=1))]), "a joint entry has index_param and index_size 0"),
    (dict(entries=[(0, dict(index_coder=9))]), "index_coder: unknown coder 9"),
    (dict(joint=dict(joint_coder=JOINT)), "joint_coder: unknown coder 3"),
    (dict(joint=dict(joint_coder=7)), "joint_coder: unknown coder 7"),
    (dict(joint=dict(joint_coder=NONE, joint_param=0)), "joint index stream: index_payload: coder 'none'"),
    (dict(joint=dict(joint_param=0)), "joint index stream: .*golomb m=0"),
    (dict(joint=dict(joint_param=10 ** 6)), "joint index stream: .*golomb m"),
    (dict(stream=b"\x00"), "joint index stream: count: 14 indices cannot fit"),
    (dict(stream=b"\xff" * 40), "joint index stream"),
    (dict(joint=dict(joint_coder=RANS, joint_param=1)), "joint index stream: .*rans"),
])
def test_joint_stream_checks(kw, field):
    with pytest.raises(codec.CodecError, match=field):
        codec.decode_bundle(rebuilt(**kw))


def test_a_joint_entry_needs_version_3():
    """A version 2 header has no joint record, so an entry of it that says joint is refused by name."""
    table, sides, section = take_apart(VALID)
    raw = pack_header(table)
    record = 4 + 4 * 9  # tensor_count and the four plane records come before the joint record (17 bytes)
    frame = zstd_frame.compress(raw[:record] + raw[record + 17:], 3)
    v2 = assemble(table, sides[1:], section, header_frame=frame, preamble=(b"ELCB", 2, 0, 0))
    with pytest.raises(codec.CodecError, match="a: index_coder: the joint stream needs bundle version 3, this is 2"):
        codec.decode_bundle(v2)


def test_every_truncation_and_bit_flip_is_rejected_or_decodes_in_bounds():
    for cut in range(len(VALID)):
        with pytest.raises(codec.CodecError):
            codec.decode_flat(VALID[:cut])
    data = bytearray(VALID)
    for pos in range(len(data)):
        data[pos] ^= 0x10
        with pytest.raises(codec.CodecError):  # the crc32 catches any one flip
            codec.decode_flat(bytes(data))
        data[pos] ^= 0x10
