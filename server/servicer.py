"""gRPC servicer on grpc.aio: translates protobuf <-> domain and delegates to the Coordinator. No round logic here.

One event loop serves every device. A device waiting for its task (a FetchTask long poll) or streaming its
upload costs a coroutine and its stream, not a thread. Calls into the Coordinator, which holds the round
driver's lock, run on two small thread pools: `light` for the quick ones (register, heartbeat, the task
check, a download's byte count), `heavy` for checking and adding an upload (decode and aggregation). So a
heartbeat never waits behind an upload, and the loop never waits on the driver's lock. A long poll waits on
the loop, woken by the driver (RoundDriver.task_listeners) whenever a round opens or closes, the state changes
or the server stops.

Long polls are held up to 7/8 of server.max_connections (the calls grpc.aio serves at once; past it every call,
heartbeats and uploads too, is refused RESOURCE_EXHAUSTED). A poll past that share is answered WAIT at once with
a jittered retry-after, as pace steering answers, so a fleet larger than the cap degrades to devices asking
again later instead of every device's heartbeat being refused."""
from __future__ import annotations

import asyncio
import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor

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
LIGHT_THREADS = 8  # quick Coordinator calls in flight at once
HEAVY_THREADS = 4  # uploads being checked and added at once (the driver decodes at most 2 at a time)


def poll_cap(max_connections: int) -> int:
    """Long polls held at once: server.max_connections less an eighth kept for every other call."""
    return max_connections - max(1, max_connections // 8)


async def _abort(coord: Coordinator, context: grpc.aio.ServicerContext, e: UpdateRejected, what: str) -> None:
    """Refuse the call with the refusal's typed status (raises, ending the handler)."""
    log.warning("%s refused: %s", what, e.message)
    if coord.metrics is not None:
        coord.metrics.refused(e.code.value)
    await context.abort_with_status(refusal_status(e.code.value, STATUS[e.code], e.message))


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    """Made on the event loop that serves it: the constructor ties the driver's wake-ups to that loop."""

    def __init__(self, coord: Coordinator) -> None:
        self.coord = coord
        run = coord.run
        self.spec = pb.RunSpec(run_id=coord.folder.path.name, model=serde.model_to_proto(run.model),
                               data=serde.data_to_proto(run.data), method=run.method.name,
                               chunk_bytes=run.server.chunk_bytes, max_upload_bytes=run.server.max_upload_bytes,
                               initial_structure=serde.structure_to_proto(coord.engine.method.initial_structure()))
        self.light = ThreadPoolExecutor(LIGHT_THREADS, thread_name_prefix="rpc-light")
        self.heavy = ThreadPoolExecutor(HEAVY_THREADS, thread_name_prefix="rpc-heavy")
        self._loop = asyncio.get_running_loop()
        self._polls: dict[str, set[asyncio.Future]] = {}  # device -> its long polls' wake-ups
        self._poll_cap = poll_cap(run.server.max_connections)
        self._told_full = False  # the operator was told polls reached the cap (once a run)
        coord.task_listeners.append(self._wake_threadsafe)

    def close(self) -> None:
        """(after the server stopped) Detach from the driver and release the pools."""
        if self._wake_threadsafe in self.coord.task_listeners:
            self.coord.task_listeners.remove(self._wake_threadsafe)
        self.light.shutdown(wait=False, cancel_futures=True)
        self.heavy.shutdown(wait=False, cancel_futures=True)

    def _wake_threadsafe(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._wake)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    def _wake(self) -> None:
        """Wake the polls of the devices that may have something now (Coordinator.may_have_tasks): a round
        opening wakes its sampled devices, not every device connected."""
        targets = self.coord.may_have_tasks()
        for device_id in (list(self._polls) if targets is None else targets):
            for woken in self._polls.get(device_id, ()):
                if not woken.done():
                    woken.set_result(None)

    async def _on(self, pool: ThreadPoolExecutor, fn, *args):
        return await self._loop.run_in_executor(pool, functools.partial(fn, *args))

    # -- unary calls -------------------------------------------------------------------------------------
    async def GetRunSpec(self, request, context):
        return self.spec

    async def Register(self, request, context):
        try:
            await self._on(self.light, self.coord.register, request.device_id, request.hardware,
                           dict(request.versions), request.model_fingerprint, request.tokenizer_fingerprint,
                           request.data_error, request.tier if request.HasField("tier") else None,
                           (request.uplink_mbps, request.downlink_mbps),
                           Capacity(request.memory_mb, request.resident_mb, request.accelerator, request.fast_bf16))
        except UpdateRejected as e:
            await _abort(self.coord, context, e, f"register {request.device_id!r}")
        return pb.RegisterReply(run_id=self.spec.run_id, heartbeat_s=self.coord.run.server.heartbeat_s)

    def _heartbeat(self, device_id: str) -> pb.HeartbeatReply:
        state = self.coord.heartbeat(device_id)
        return pb.HeartbeatReply(round=state.round, run_finished=state.finished,
                                 next_heartbeat_s=0.0 if state.finished else self.coord.heartbeat_after(device_id))

    async def Heartbeat(self, request, context):
        try:  # on the loop: a heartbeat takes the registry's lock only, unless the run is over (then the driver's)
            if self.coord.state.finished:
                return await self._on(self.light, self._heartbeat, request.device_id)
            return self._heartbeat(request.device_id)
        except UpdateRejected as e:
            await _abort(self.coord, context, e, f"heartbeat {request.device_id!r}")

    async def UploadOffset(self, request, context):
        try:  # may wait (up to 30 s) for a broken stream to settle: on the loop's default pool, not a light one
            offset = await self._on(None, self.coord.upload_offset, request.device_id, request.round,
                                    request.task_id)
        except UpdateRejected as e:
            await _abort(self.coord, context, e, f"upload offset {request.device_id!r}")
        return pb.UploadOffsetReply(offset=offset)

    # -- the long poll ---------------------------------------------------------------------------------------
    async def _next_task(self, device_id: str, wait_s: float):
        """Coordinator.next_task, but the wait happens here, on the loop: ask without waiting; if there is
        nothing yet, wait until the driver's wake-up reaches this device (_wake) and ask again. A poll lasts
        wait_s x a uniform draw in [0.5, 1), at most 60 s, so polls begun together (a fleet registering at once)
        do not all end and come back together."""
        deadline = self._loop.time() + self.coord.jittered(max(0.0, min(wait_s, 60.0)), 0.5, 1.0)
        while True:
            woken = self._loop.create_future()  # registered before asking: a wake-up during the question is kept
            self._polls.setdefault(device_id, set()).add(woken)
            try:
                # Once the run is over every poll wakes to hear STOP: answered here, not through the pool (the
                # driver's lock is held only briefly then), so telling thousands of devices is one pass
                kind, r, task = (self.coord.next_task(device_id) if self.coord.state.finished else
                                 await self._on(self.light, self.coord.next_task, device_id))
                if kind != "wait" or task:  # task: pace steering's retry_after_s
                    return kind, r, task
                left = deadline - self._loop.time()
                if left <= 0:
                    return "wait", None, 0.0
                if self.coord.polls_held >= self._poll_cap:
                    return "wait", None, self._come_back_later()
                self.coord.polls_held += 1  # only ever changed here, on the loop
                try:
                    await asyncio.wait_for(woken, left)
                except asyncio.TimeoutError:
                    return "wait", None, 0.0
                finally:
                    self.coord.polls_held -= 1
            finally:
                polls = self._polls.get(device_id)
                if polls is not None:
                    polls.discard(woken)
                    if not polls:
                        del self._polls[device_id]

    def _come_back_later(self) -> float:
        """Retry-after for a poll past the cap: server.heartbeat_s, jittered."""
        if not self._told_full:
            self._told_full = True
            log.warning("%d devices are waiting for a task, the most server.max_connections = %d leaves room for; "
                        "more are told to ask again later (raise server.max_connections, or set server.pace_s)",
                        self.coord.polls_held, self.coord.run.server.max_connections)
        return self.coord.jittered(self.coord.run.server.heartbeat_s)

    async def FetchTask(self, request, context):
        try:
            kind, r, task = await self._next_task(request.device_id, request.wait_s)
        except UpdateRejected as e:
            await _abort(self.coord, context, e, f"fetch {request.device_id!r}")
        if kind == "secagg":
            header = serde.prompt_to_proto(r.number, task)
            await self._on(self.light, self.coord.downloaded, r, request.device_id,
                           pb.TaskChunk(header=header).ByteSize())
            yield pb.TaskChunk(header=header)
            return
        if kind != "train":
            k = pb.TaskHeader.STOP if kind == "stop" else pb.TaskHeader.WAIT
            yield pb.TaskChunk(header=pb.TaskHeader(kind=k, round=self.coord.state.round, retry_after_s=task or 0.0))
            return
        plan = r.plans[request.device_id]
        header = serde.task_to_proto(task, len(plan.payload))
        for chunk in serde.chunks(header, pb.TaskChunk, plan.payload, self.coord.run.server.chunk_bytes):
            await self._on(self.light, self.coord.downloaded, r, request.device_id, chunk.ByteSize())
            yield chunk
        await self._on(self.light, self.coord.downloaded, r, request.device_id, 0, True)

    # -- the upload -------------------------------------------------------------------------------------------
    async def SubmitUpdate(self, request_iterator, context):
        cfg = self.coord.run.server
        stream = request_iterator.__aiter__()
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            await _abort(self.coord, context,
                         UpdateRejected(Refusal.INVALID, "empty upload stream: expected a header first"), "upload")
        if first.WhichOneof("part") != "header":
            await _abort(self.coord, context,
                         UpdateRejected(Refusal.INVALID, "upload stream must start with a header"), "upload")
        h = first.header
        what = f"upload from {h.device_id!r} for round {h.round}"
        if h.payload_bytes > cfg.max_upload_bytes:
            await _abort(self.coord, context, UpdateRejected(
                Refusal.EXHAUSTED, f"declared payload of {h.payload_bytes} bytes exceeds the server's limit of "
                                   f"{cfg.max_upload_bytes}"), what)
        try:
            r, buf = await self._on(self.light, self.coord.begin_upload, h.device_id, h.round, h.task_id,
                                    h.payload_bytes, h.offset)
        except UpdateRejected as e:
            await _abort(self.coord, context, e, what)
        # The payload is held once, in the buffer of its declared size, never as chunks plus their join.
        got, error, wire = h.offset, "", first.ByteSize()
        view = memoryview(buf)
        started = time.perf_counter()
        try:
            async for msg in stream:
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
            view.release()
            await self._reject(r, h, wire, e, context, what)
        except (asyncio.CancelledError, grpc.RpcError) as e:
            # The device went away mid-stream (grpc.aio cancels the handler), or sent a message over gRPC's
            # receive limit: keep what arrived until the round closes, for the device to resume.
            view.release()
            self._keep_partial(r, h, buf, got, wire, what)
            if isinstance(e, asyncio.CancelledError):
                raise
            return pb.SubmitReply(accepted=False, round=h.round, bytes_received=wire)
        upload_s = time.perf_counter() - started
        view.release()
        if not error and got != h.payload_bytes:
            # The stream ended before its declared bytes: a device that closed it early, or a link that died
            # (grpc.aio can see the stream end before it learns the call was cancelled). Either way what arrived
            # is kept for a resume, and the call is refused.
            self._keep_partial(r, h, buf, got, wire, what)
            await _abort(self.coord, context, UpdateRejected(Refusal.INVALID, (
                f"truncated upload: got {got} of {h.payload_bytes} declared bytes (kept until the round closes: "
                f"resume from UploadOffset)")), what)
        times = serde.times_from_proto(h.times)
        times = type(times)(times.download_s, times.train_s, times.encode_s, upload_s)
        try:
            await self._on(self.heavy, self.coord.finish_upload, r, h.device_id, None if error else buf,
                           h.num_examples, h.train_loss, times, wire, error,
                           (h.eval_examples, h.eval_loss, h.eval_accuracy), h.peak_rss_mb)
        except UpdateRejected as e:
            await _abort(self.coord, context, e, what)
        log.info("accepted %s: %d bytes", what, got)
        return pb.SubmitReply(accepted=True, round=h.round, bytes_received=wire)

    def _keep_partial(self, r, h, buf, got: int, wire: int, what: str) -> None:
        """(on the loop, without an await: it runs even in a handler being cancelled; the driver's lock briefly)"""
        self.coord.keep_partial(r, h.device_id, h.task_id, buf, got, wire)
        log.warning("%s broke off at byte %d of %d; kept until the round closes, for the device to resume "
                    "(or a message over gRPC's receive limit of %d bytes was refused)", what, got,
                    h.payload_bytes, RECEIVE_LIMIT)

    async def _reject(self, r, h, wire, e, context, what):
        try:
            await self._on(self.light, self.coord.finish_upload, r, h.device_id, None, 0, 0.0,
                           serde.times_from_proto(h.times), wire, e.message)
        except UpdateRejected:
            pass
        await _abort(self.coord, context, e, what)

    # -- a secure round's key phases: translate, delegate, refuse with a typed status ----------------------------
    async def AdvertiseKeys(self, request, context):
        return await self._answer(request, serde.advertise_from_proto, "advertised keys", context)

    async def ShareKeys(self, request, context):
        return await self._answer(request, serde.share_from_proto, "shares", context)

    async def UnmaskShares(self, request, context):
        return await self._answer(request, serde.unmask_from_proto, "unmasking shares", context)

    async def _answer(self, request, from_proto, what: str, context):
        try:  # the answer's checks (signatures, shares) are the heavy kind of work
            await self._on(self.heavy, self.coord.answer, request.device_id, request.round, from_proto(request),
                           request.ByteSize())
        except UpdateRejected as e:
            await _abort(self.coord, context, e, f"{what} from {request.device_id!r} for round {request.round}")
        return pb.SecAggAck(round=request.round)
