"""A secure round's refusals over gRPC: a real coordinator on a real port, behind the device-token interceptor,
and four devices the test drives with raw stubs (edge_client's SecureSessions answers every prompt honestly;
the test forges the rest). Each bad key message or masked upload is refused with its typed status and a message
that names what was wrong, and the round and the server go on: the honest messages that follow are taken, the
four devices' sum is unmasked exactly, and the run finishes."""
from __future__ import annotations

import secrets

import grpc
import numpy as np
import pytest

from edgelora import codec
from edgelora.edge_client.sessions import SecureSessions
from edgelora.protos import edgelora_pb2 as pb
from edgelora.protos import edgelora_pb2_grpc as pb_grpc
from edgelora.protos import serde
from edgelora.secagg import ring
from edgelora.server.app import run_server
from edgelora.server.auth import DeviceTokenInterceptor

from .conftest import drive_rounds
from .test_server_grpc import refused
from .test_simulate import _records

DEVICES = ("0", "1", "2", "3")  # 4 sampled: k = 3 neighbours, t = 2, so one share may fail to open
VALUE = 10  # every device's integer at every ring coordinate: the unmasked mean is VALUE / scale exactly


def altered(msg, **fields):
    """A copy of a protobuf message with `fields` set (the original stays as sent)."""
    copy = type(msg)()
    copy.CopyFrom(msg)
    for name, value in fields.items():
        setattr(copy, name, value)
    return copy


@pytest.fixture
def secure_server(tiny_config, tmp_path):
    """start(rounds) -> (coordinator, {device id: Device}, the rounds' driver thread): a secure run of 4
    devices, all 4 a round, registered under their own tokens, its rounds driven in a thread."""
    started = []

    def start(rounds: int = 1):
        run = tiny_config(server={"rounds": rounds, "devices_per_round": len(DEVICES), "min_devices": len(DEVICES)},
                          data={"num_devices": len(DEVICES)}, secure={"enabled": True, "clip": 0.05})
        tokens = {d: secrets.token_urlsafe(32) for d in DEVICES}
        ctx = run_server(run, tmp_path / "run", interceptors=[DeviceTokenInterceptor(tokens)])
        coord, port = ctx.__enter__()
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        started.append((ctx, channel))
        stub = pb_grpc.CoordinatorStub(channel)
        devices = {d: Device(stub, d, tokens[d]) for d in DEVICES}
        for dev in devices.values():
            dev.register(coord)
        driver, _ = drive_rounds(coord)
        return coord, devices, driver

    yield start
    for ctx, channel in started:
        channel.close()
        ctx.__exit__(None, None, None)


class Device:
    """One device, driven by the test: raw stub calls under its own token; honest answers from SecureSessions."""

    def __init__(self, stub, device_id: str, token: str) -> None:
        self.stub, self.id = stub, device_id
        self.md = (("x-device-id", device_id), ("authorization", f"Bearer {token}"))
        self.sessions = SecureSessions()

    def register(self, coord) -> None:
        self.stub.Register(pb.RegisterRequest(device_id=self.id, hardware="test",
                                              model_fingerprint=coord.model_fingerprint,
                                              tokenizer_fingerprint=coord.tokenizer_fingerprint),
                           timeout=10, metadata=self.md)

    def fetch(self, kind) -> pb.TaskHeader:
        """The next task of `kind`, long-polled (its download is read and dropped)."""
        for _ in range(10):
            header = None
            for chunk in self.stub.FetchTask(pb.FetchTaskRequest(device_id=self.id, wait_s=20.0), timeout=60,
                                             metadata=self.md):
                if chunk.WhichOneof("part") == "header":
                    header = chunk.header
            if header.kind != pb.TaskHeader.WAIT:
                assert header.kind == kind, (header.kind, kind)
                return header
        raise AssertionError(f"device {self.id} was given no task of kind {kind}")

    def prompted(self, phase: str) -> pb.TaskHeader:
        header = self.fetch(pb.TaskHeader.SECAGG)
        assert header.secagg.WhichOneof("phase") == phase
        return header

    def answer(self, header: pb.TaskHeader):
        """The honest answer to a key-phase prompt (AdvertiseKeysRequest, ShareKeysRequest, UnmaskSharesRequest)."""
        return self.sessions.answer(self.id, header)

    def send(self, request) -> pb.SecAggAck:
        rpc = {pb.AdvertiseKeysRequest: self.stub.AdvertiseKeys, pb.ShareKeysRequest: self.stub.ShareKeys,
               pb.UnmaskSharesRequest: self.stub.UnmaskShares}[type(request)]
        return rpc(request, timeout=10, metadata=self.md)

    def phase(self, name: str) -> None:
        """Answer this key phase's prompt honestly."""
        assert self.send(self.answer(self.prompted(name))).round > 0

    def masked_upload(self, header: pb.TaskHeader) -> tuple[np.ndarray, int]:
        """(this device's masked ring vector for its TRAIN task, the ring's bits): VALUE at every coordinate,
        a full weight (examples = the weight cap) in the count limbs."""
        task = serde.task_from_proto(header)
        spec = task.upload.secure.ring
        session = self.sessions.for_task(self.id, task)
        values = np.full(session.setup.length - spec.count_limbs, VALUE, np.int64)
        vector = ring.to_ring(np.concatenate([values, ring.count_limb_values(spec.weight_cap, spec)]), spec.bits)
        return session.mask(vector, task.masking), spec.bits

    def upload(self, header: pb.TaskHeader, payload: bytes) -> pb.SubmitReply:
        def msgs():
            yield pb.UpdateChunk(header=pb.UpdateHeader(device_id=self.id, round=header.round, task_id=header.task_id,
                                                        payload_bytes=len(payload)))
            yield pb.UpdateChunk(data=payload)
        return self.stub.SubmitUpdate(msgs(), timeout=30, metadata=self.md)

    def heartbeat(self) -> pb.HeartbeatReply:
        return self.stub.Heartbeat(pb.HeartbeatRequest(device_id=self.id), timeout=10, metadata=self.md)


def upload_all(devices) -> None:
    for dev in devices:
        header = dev.fetch(pb.TaskHeader.TRAIN)
        masked, bits = dev.masked_upload(header)
        assert dev.upload(header, codec.encode_ring(masked, bits)).accepted


def finish_round(coord, devices, from_phase: str) -> None:
    """The rest of the round under way, every device honest, from `from_phase` on; its mean is checked."""
    rnd = coord.round
    phases = ("advertise", "share", "upload", "unmask")
    for name in phases[phases.index(from_phase):]:
        if name == "upload":
            upload_all(devices)
        else:
            for dev in devices:
                dev.phase(name)
    assert_unmasked(coord, rnd, len(devices))


def assert_unmasked(coord, rnd, count: int) -> None:
    """Round `rnd`'s secure sum was unmasked from `count` devices, each weighing 1: its mean is VALUE / scale
    at every coordinate, so nothing a refusal carried got into it."""
    secure = rnd.secure
    with coord.cond:
        coord.cond.wait_for(lambda: secure.count or secure.aborted, timeout=30)
    assert secure.count == count and not secure.aborted, secure.aborted
    means = secure.mean()
    assert means
    for name, mean in means.items():
        np.testing.assert_allclose(mean, VALUE / secure.upload.ring.scale, rtol=1e-6, err_msg=name)


def done(coord, devices, driver, rounds: int) -> None:
    """The run finished: every device is told to stop, and every round aggregated every device's upload."""
    for dev in devices.values():
        dev.fetch(pb.TaskHeader.STOP)
    driver.join(timeout=30)
    assert not driver.is_alive() and coord.state.finished and coord.state.round == rounds
    rows = _records(coord.folder.path)
    assert [r["aggregated"] for r in rows] == [True] * rounds
    assert [sorted((d["device_id"], d["status"]) for d in r["devices"]) for r in rows] == \
        [[(d, "completed") for d in DEVICES]] * rounds


def test_bad_advertisements_are_refused_by_type_and_the_rounds_go_on(secure_server):
    """Round 1's advertise phase: a relabelled message (device 0's request naming device 1, under 0's token)
    is PERMISSION_DENIED; device 0's second advertisement ALREADY_EXISTS; device 1 advertising device 0's keys
    as its own INVALID_ARGUMENT; a session that is not the round's, or another round's number,
    FAILED_PRECONDITION. Round 2: device 0's round-1 advertisement replayed, as it was and with round 2's number,
    FAILED_PRECONDITION. Both rounds then complete with every device, and the run finishes."""
    coord, devices, driver = secure_server(rounds=2)
    d0, d1 = devices["0"], devices["1"]
    first = {d: dev.answer(dev.prompted("advertise")) for d, dev in devices.items()}

    relabelled = altered(first["0"], device_id="1")
    refused(lambda: d0.send(relabelled), grpc.StatusCode.PERMISSION_DENIED,
            "this token may act only as device 0, not '1'", "forbidden")
    assert d0.send(first["0"]).round == 1
    refused(lambda: d0.send(first["0"]), grpc.StatusCode.ALREADY_EXISTS, "0 already sent its advertise", "exists")
    refused(lambda: d1.send(relabelled), grpc.StatusCode.INVALID_ARGUMENT,
            "1 advertises a public key 0 advertised (a relabelled message)", "invalid")
    wrong_session = altered(first["1"], session=bytes(16))
    refused(lambda: d1.send(wrong_session), grpc.StatusCode.FAILED_PRECONDITION,
            "advertise from 1 carries another round's session (a replay)", "precondition")
    wrong_round = altered(first["1"], round=2)
    refused(lambda: d1.send(wrong_round), grpc.StatusCode.FAILED_PRECONDITION,
            "a key message for round 2, but the secure round under way is 1", "precondition")
    assert d1.heartbeat().round == 0  # the server still answers, and round 1 is still under way
    for d in ("1", "2", "3"):
        assert devices[d].send(first[d]).round == 1
    finish_round(coord, list(devices.values()), from_phase="share")

    second = {d: dev.prompted("advertise") for d, dev in devices.items()}
    assert second["0"].secagg.advertise.session != first["0"].session
    refused(lambda: d0.send(first["0"]), grpc.StatusCode.FAILED_PRECONDITION,
            "a key message for round 1, but the secure round under way is 2", "precondition")
    replayed = altered(first["0"], round=2)
    refused(lambda: d0.send(replayed), grpc.StatusCode.FAILED_PRECONDITION,
            "advertise from 0 carries another round's session (a replay)", "precondition")
    for d, dev in devices.items():
        assert dev.send(dev.answer(second[d])).round == 2
    finish_round(coord, list(devices.values()), from_phase="share")
    done(coord, devices, driver, rounds=2)


def test_masked_uploads_of_the_wrong_length_or_bit_width_are_refused_and_the_round_goes_on(secure_server):
    """Device 0's masked upload one value short, then at one bit more a value than the round's ring: each is
    INVALID_ARGUMENT naming the count or the bits it expected, nothing of it reaches the sum, and the server
    still answers. The same device's right upload (the same task) is then accepted, and the round unmasks
    the four devices' sum exactly."""
    coord, devices, driver = secure_server(rounds=1)
    for name in ("advertise", "share"):
        for dev in devices.values():
            dev.phase(name)
    rnd = coord.round
    d0 = devices["0"]
    header = d0.fetch(pb.TaskHeader.TRAIN)
    masked, bits = d0.masked_upload(header)
    n = len(masked)
    refused(lambda: d0.upload(header, codec.encode_ring(masked[:-1], bits)), grpc.StatusCode.INVALID_ARGUMENT,
            f"masked upload: ring payload: {n - 1} values, this round expects {n}", "invalid")
    assert d0.heartbeat().round == 0 and rnd.open
    refused(lambda: d0.upload(header, codec.encode_ring(masked, bits + 1)), grpc.StatusCode.INVALID_ARGUMENT,
            f"masked upload: ring payload: {bits + 1}-bit values, this round expects {bits}", "invalid")
    assert d0.heartbeat().round == 0 and rnd.open
    assert d0.upload(header, codec.encode_ring(masked, bits)).accepted
    upload_all([devices[d] for d in ("1", "2", "3")])
    for dev in devices.values():
        dev.phase("unmask")
    assert_unmasked(coord, rnd, len(DEVICES))
    done(coord, devices, driver, rounds=1)


def test_a_share_that_does_not_open_is_reported_and_the_round_still_unmasks(secure_server):
    """Device 0 seals its shares to device 1 under a corrupted tag (the coordinator cannot tell: it relays
    sealed blobs). At unmasking device 1 reports device 0 in UnmaskReply.failed instead of a share, the
    coordinator records it, and the round still unmasks from devices 2's and 3's shares of device 0
    (t = 2 of its 3 holders)."""
    coord, devices, driver = secure_server(rounds=1)
    for dev in devices.values():
        dev.phase("advertise")
    rnd = coord.round
    for d, dev in devices.items():
        request = dev.answer(dev.prompted("share"))
        if d == "0":
            blob = bytearray(request.ciphertexts["1"])
            blob[-1] ^= 1
            request.ciphertexts["1"] = bytes(blob)
        assert dev.send(request).round == 1
    upload_all(devices.values())
    for d, dev in devices.items():
        request = dev.answer(dev.prompted("unmask"))
        assert list(request.failed) == (["0"] if d == "1" else []), d
        if d == "1":
            assert "0" not in request.self_shares  # failed instead: no share of 0 from device 1
        assert dev.send(request).round == 1
    assert rnd.secure.protocol.failures == {"1": ("0",)}
    assert_unmasked(coord, rnd, len(DEVICES))
    done(coord, devices, driver, rounds=1)
