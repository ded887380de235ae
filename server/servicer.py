"""gRPC servicer: translates protobuf <-> domain and delegates to the Coordinator. No round logic here."""
from __future__ import annotations

import logging
import time

import grpc

from edgelora.protos import edgelora_pb2 as pb
from edgelora.protos import edgelora_pb2_grpc as pb_grpc
from edgelora.protos import serde
from edgelora.protos.refusals import STATUS, Refusal, UpdateRejected, refusal_status

from .coordinator import Coordinator
from .registry import Capacity

log = logging.getLogger("edgelora.server")

# gRPC refuses a message over its receive limit before the servicer sees it, and the servicer then learns only
# that the stream broke. So gRPC's limit is the largest message the protocol allows (chunk_bytes is at most
# 4 MiB - 64 KiB), and the per-run chunk cap is checked here, where the refusal can say what was wrong.
RECEIVE_LIMIT = 4 << 20
CHUNK_SLACK = 64 * 1024

def _abort(coord: Coordinator, context: grpc.ServicerContext, e: UpdateRejected, what: str) -> None:
    log.warning("%s refused: %s", what, e.message)
    if coord.metrics is not None:
        coord.metrics.refused(e.code.value)
    context.abort_with_status(refusal_status(e.code.value, STATUS[e.code], e.message))


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    def __init__(self, coord: Coordinator) -> None:
        self.coord = coord
        run = coord.run
        self.spec = pb.RunSpec(run_id=coord.folder.path.name, model=serde.model_to_proto(run.model),
                               data=serde.data_to_proto(run.data), method=run.method.name,
                               chunk_bytes=run.server.chunk_bytes, max_upload_bytes=run.server.max_upload_bytes,
                               initial_structure=serde.structure_to_proto(coord.engine.method.initial_structure()))

    def GetRunSpec(self, request, context):
        return self.spec

    def Register(self, request, context):
        try:
            self.coord.register(request.device_id, request.hardware, dict(request.versions),
                                request.model_fingerprint, request.tokenizer_fingerprint, request.data_error,
                                request.tier if request.HasField("tier") else None,
                                (request.uplink_mbps, request.downlink_mbps),
                                Capacity(request.memory_mb, request.resident_mb, request.accelerator,
                                         request.fast_bf16))
        except UpdateRejected as e:
            _abort(self.coord, context, e, f"register {request.device_id!r}")
        return pb.RegisterReply(run_id=self.spec.run_id, heartbeat_s=self.coord.run.server.heartbeat_s)

    def Heartbeat(self, request, context):
        try:
            state = self.coord.heartbeat(request.device_id)
        except UpdateRejected as e:
            _abort(self.coord, context, e, f"heartbeat {request.device_id!r}")
        return pb.HeartbeatReply(round=state.round, run_finished=state.finished,
                                 next_heartbeat_s=0.0 if state.finished else self.coord.heartbeat_after(request.device_id))

    def FetchTask(self, request, context):
        try:
            kind, r, task = self.coord.next_task(request.device_id, request.wait_s)
        except UpdateRejected as e:
            _abort(self.coord, context, e, f"fetch {request.device_id!r}")
        if kind == "secagg":
            header = serde.prompt_to_proto(r.number, task)
            self.coord.downloaded(r, request.device_id, pb.TaskChunk(header=header).ByteSize())
            yield pb.TaskChunk(header=header)
            return
        if kind != "train":
            k = pb.TaskHeader.STOP if kind == "stop" else pb.TaskHeader.WAIT
            yield pb.TaskChunk(header=pb.TaskHeader(kind=k, round=self.coord.state.round, retry_after_s=task or 0.0))
            return
        plan = r.plans[request.device_id]
        header = serde.task_to_proto(task, len(plan.payload))
        for chunk in serde.chunks(header, pb.TaskChunk, plan.payload, self.coord.run.server.chunk_bytes):
            self.coord.downloaded(r, request.device_id, chunk.ByteSize())
            yield chunk
        self.coord.downloaded(r, request.device_id, 0, finished=True)

    def SubmitUpdate(self, request_iterator, context):
        cfg = self.coord.run.server
        try:
            first = next(request_iterator)
        except StopIteration:
            _abort(self.coord, context, UpdateRejected(Refusal.INVALID, "empty upload stream: expected a header first"), "upload")
        if first.WhichOneof("part") != "header":
            _abort(self.coord, context, UpdateRejected(Refusal.INVALID, "upload stream must start with a header"), "upload")
        h = first.header
        what = f"upload from {h.device_id!r} for round {h.round}"
        if h.payload_bytes > cfg.max_upload_bytes:
            _abort(self.coord, context, UpdateRejected(Refusal.EXHAUSTED, f"declared payload of {h.payload_bytes} bytes exceeds the "
                                                        f"server's limit of {cfg.max_upload_bytes}"), what)
        try:
            r, buf = self.coord.begin_upload(h.device_id, h.round, h.task_id, h.payload_bytes, h.offset)
        except UpdateRejected as e:
            _abort(self.coord, context, e, what)
        # The payload is held once, in the buffer of its declared size, never as chunks plus their join.
        got, error, wire, broken = h.offset, "", first.ByteSize(), False
        view = memoryview(buf)
        started = time.perf_counter()
        try:
            for msg in request_iterator:
                wire += msg.ByteSize()
                if msg.WhichOneof("part") != "data":
                    error = "upload stream carries a second header"
                    break
                if not msg.data:  # an endless stream of empty chunks would hold the upload open forever
                    raise UpdateRejected(Refusal.INVALID, "upload stream carries an empty data chunk")
                if len(msg.data) > cfg.chunk_bytes + CHUNK_SLACK:
                    raise UpdateRejected(Refusal.EXHAUSTED, f"upload chunk of {len(msg.data)} bytes exceeds server.chunk_bytes "
                                                      f"= {cfg.chunk_bytes} (+ {CHUNK_SLACK} bytes of slack)")
                if not r.open:
                    raise UpdateRejected(Refusal.PRECONDITION, f"round {h.round} closed during the upload")
                if got + len(msg.data) > h.payload_bytes:
                    raise UpdateRejected(Refusal.EXHAUSTED, f"stream carries more than the declared {h.payload_bytes} bytes")
                view[got:got + len(msg.data)] = msg.data
                got += len(msg.data)
        except UpdateRejected as e:
            self._reject(r, h, wire, e, context, what)
        except grpc.RpcError:  # the device went away mid-stream (or sent a message over gRPC's receive limit)
            broken = True
        upload_s = time.perf_counter() - started
        if broken:
            view.release()
            self.coord.keep_partial(r, h.device_id, h.task_id, buf, got, wire)
            log.warning("%s broke off at byte %d of %d; kept until the round closes, for the device to resume "
                        "(or a message over gRPC's receive limit of %d bytes was refused)", what, got,
                        h.payload_bytes, RECEIVE_LIMIT)
            return pb.SubmitReply(accepted=False, round=h.round, bytes_received=wire)
        if not error and got != h.payload_bytes:
            error = f"truncated upload: got {got} of {h.payload_bytes} declared bytes"
        times = serde.times_from_proto(h.times)
        times = type(times)(times.download_s, times.train_s, times.encode_s, upload_s)
        try:
            view.release()
            self.coord.finish_upload(r, h.device_id, None if error else buf, h.num_examples,
                                     h.train_loss, times, wire, error,
                                     (h.eval_examples, h.eval_loss, h.eval_accuracy), h.peak_rss_mb)
        except UpdateRejected as e:
            _abort(self.coord, context, e, what)
        log.info("accepted %s: %d bytes", what, got)
        return pb.SubmitReply(accepted=True, round=h.round, bytes_received=wire)

    # -- a secure round's key phases: translate, delegate, refuse with a typed status ----------------------------
    def AdvertiseKeys(self, request, context):
        return self._answer(request, serde.advertise_from_proto, "advertised keys", context)

    def ShareKeys(self, request, context):
        return self._answer(request, serde.share_from_proto, "shares", context)

    def UnmaskShares(self, request, context):
        return self._answer(request, serde.unmask_from_proto, "unmasking shares", context)

    def _answer(self, request, from_proto, what: str, context):
        try:
            self.coord.answer(request.device_id, request.round, from_proto(request), wire_up=request.ByteSize())
        except UpdateRejected as e:
            _abort(self.coord, context, e, f"{what} from {request.device_id!r} for round {request.round}")
        return pb.SecAggAck(round=request.round)

    def UploadOffset(self, request, context):
        try:
            offset = self.coord.upload_offset(request.device_id, request.round, request.task_id)
        except UpdateRejected as e:
            _abort(self.coord, context, e, f"upload offset {request.device_id!r}")
        return pb.UploadOffsetReply(offset=offset)

    def _reject(self, r, h, wire, e, context, what):
        try:
            self.coord.finish_upload(r, h.device_id, None, 0, 0.0, serde.times_from_proto(h.times), wire, e.message)
        except UpdateRejected:
            pass
        _abort(self.coord, context, e, what)
