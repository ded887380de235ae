"""The edge device runtime: connect, register, wait for tasks, train, encode, upload; reconnect with backoff.

One process can host many virtual devices (`--device-ids 0-49`); they share one base model and train in turn.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass, replace

import grpc
import torch

from edgelora.codec import CodecError
from edgelora.configtools import ConfigError
from edgelora.data import own_examples, own_lm_examples
from edgelora.edge_client.trainer import DeviceHost, DeviceTrainer, DownloadError, available_mb, resident_mb
from edgelora.models import fingerprint_model, fingerprint_tokenizer, hardware_info
from edgelora.precision import cpu_has_fast_bf16
from edgelora.protos import edgelora_pb2 as pb
from edgelora.protos import edgelora_pb2_grpc as pb_grpc
from edgelora.protos import serde
from edgelora.protos.channel import CLIENT_OPTIONS
from edgelora.protos.refusals import refusal_code
from edgelora.tasks import Update, device_seed

from .allocator import in_use as allocator_in_use
from .secagg import ProtocolViolation
from .sessions import SecureSessions
from .throttle import LinkThrottle

log = logging.getLogger("edgelora.client")

UPLOAD_ATTEMPTS = 4  # streams per update: the first, then resumes from what the server holds
# Broken links (and a request iterator that failed mid-stream) end a call with these: resume, do not retrain.
RESUMABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED,
             grpc.StatusCode.UNKNOWN)

# Retries of idempotent unary calls are declared in the channel's service config, not hand-written loops.
SERVICE_CONFIG = """{"methodConfig": [{
  "name": [{"service": "edgelora.v1.Coordinator", "method": "GetRunSpec"},
           {"service": "edgelora.v1.Coordinator", "method": "Heartbeat"}],
  "retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.2s", "maxBackoff": "2s", "backoffMultiplier": 2,
                  "retryableStatusCodes": ["UNAVAILABLE"]}}]}"""


@dataclass
class ClientOptions:
    server: str
    device_ids: list[str]
    torch_device: str = "cpu"
    give_up_s: float = 300.0       # stop retrying after the server has been unreachable this long
    poll_s: float = 10.0           # long-poll hold per FetchTask
    progress: bool = True
    credentials: grpc.ChannelCredentials | None = None
    metadata: tuple[tuple[str, str], ...] = ()
    token_for: dict[str, str] | None = None  # per-device auth tokens (see deploy/README.md)
    throttle: LinkThrottle | None = None     # application-level link emulation (--uplink-mbps/--downlink-mbps)
    tier: int | None = None                  # capability tier of every hosted device (--tier); None: the server's
    data: str | None = None                  # own data (--data PATH): for runs with data.mode = own
    text_column: str = "text"
    label_column: str = "label"
    eval_fraction: float = 0.2               # own data held out for federated evaluation
    declared_uplink_mbps: float = 0.0        # link rates declared at Register (default: the throttle's, if any)
    declared_downlink_mbps: float = 0.0
    memory_mb: float | None = None           # the memory the process may use (--memory-mb); None: what the OS says

    def __post_init__(self) -> None:
        if self.throttle is not None:
            self.declared_uplink_mbps = self.declared_uplink_mbps or (self.throttle.uplink_mbps or 0.0)
            self.declared_downlink_mbps = self.declared_downlink_mbps or (self.throttle.downlink_mbps or 0.0)


class RunOver(Exception):
    """The server said the run is over (a heartbeat reply) while this device was between tries."""


class Backoff:
    """Exponential backoff with jitter (each wait uniform in [d/2, d], d doubling to 10 s): devices cut off
    together do not all come back in the same instant when the link returns. A wait ends early, raising
    RunOver, once `over` is set: the heartbeat thread heard the run finished."""

    def __init__(self, give_up_s: float, over: threading.Event) -> None:
        self.give_up_s = give_up_s
        self.over = over
        self.delay = 0.25
        self.since: float | None = None

    def failed(self, what: str) -> None:
        if self.over.is_set():
            raise RunOver(what)
        now = time.monotonic()
        self.since = self.since or now
        if now - self.since > self.give_up_s:
            raise ConnectionError(f"server unreachable for {self.give_up_s:.0f} s ({what}); giving up")
        wait = self.delay * random.uniform(0.5, 1.0)
        log.warning("%s; retrying in %.1f s", what, wait)
        if self.over.wait(wait):
            raise RunOver(what)
        self.delay = min(self.delay * 2, 10.0)

    def ok(self) -> None:
        if self.since is not None:
            log.info("reconnected: the server answers again after %.1f s", time.monotonic() - self.since)
        self.delay, self.since = 0.25, None


class EdgeClient:
    def __init__(self, opts: ClientOptions) -> None:
        self.opts = opts
        self.run_over = threading.Event()  # a heartbeat reply said run_finished, or close() was called
        self.backoff = Backoff(opts.give_up_s, self.run_over)
        self.channel = self._connect()
        self.stub = pb_grpc.CoordinatorStub(self.channel)
        self.spec = self._call(lambda: self.stub.GetRunSpec(pb.RunSpecRequest(), timeout=10,
                                                           metadata=self._md(opts.device_ids[0])), "get run spec")
        self.model_cfg = serde.model_from_proto(self.spec.model)
        self.data_cfg = serde.data_from_proto(self.spec.data)
        self.host = DeviceHost(self.model_cfg, opts.torch_device)
        self.model_fp = fingerprint_model(self.host.base)
        self.tok_fp = fingerprint_tokenizer(self.host.tokenizer)
        self.trainers: dict[str, DeviceTrainer] = {}
        self.data_errors: dict[str, str] = {}  # devices whose data did not load: the server hears why
        self.not_before: dict[str, float] = {}  # pace steering: a device asks for a task again from this time
        own = self.data_cfg.mode == "own"
        if own != (opts.data is not None):
            raise ConfigError("this run trains on each device's own data (data.mode = own): give --data PATH" if own
                              else "this run trains partitions of a shared dataset (data.mode = partitions): "
                                   "--data is for runs with data.mode = own")
        for d in opts.device_ids:
            try:
                if own:
                    if self.model_cfg.task == "causal-lm":  # the run's text or instruction columns
                        train, held_out = own_lm_examples(opts.data, self.data_cfg, opts.eval_fraction,
                                                          seed=device_seed(d))
                    else:
                        train, held_out = own_examples(opts.data, tuple(self.data_cfg.label_names),
                                                       opts.text_column, opts.label_column, opts.eval_fraction,
                                                       seed=device_seed(d))
                    self.trainers[d] = DeviceTrainer(d, self.host, self.data_cfg, examples=train,
                                                     progress=opts.progress, eval_examples=held_out)
                    log.info("device %s: %d own examples to train, %d held out", d, len(train), len(held_out))
                else:
                    self.trainers[d] = DeviceTrainer(d, self.host, self.data_cfg, progress=opts.progress)
            except (ConfigError, OSError, ValueError) as e:
                if own:  # the device's own file: refuse to start, naming what is wrong
                    raise ConfigError(f"device {d}: {e}") from None
                self.data_errors[d] = str(e)
        info = hardware_info(opts.torch_device)
        allocator = allocator_in_use()  # said at Register: a device on jemalloc holds less than the plan assumes
        self.info = info if allocator == "system" else replace(info, hardware=f"{info.hardware}, {allocator}")
        self.stopped: set[str] = set()
        self.late = 0  # tasks let go because the round's deadline passed before the upload could start
        self.payload_bytes_sent: dict[str, int] = {}
        self.sessions = SecureSessions()  # secure aggregation: each device's keys for the round under way
        self.heartbeat_s = 5.0
        self._beat: threading.Thread | None = None
        self._stop = threading.Event()

    def _connect(self) -> grpc.Channel:
        opts = [("grpc.service_config", SERVICE_CONFIG), ("grpc.enable_retries", 1),
                ("grpc.max_receive_message_length", 5 << 20), *CLIENT_OPTIONS]
        if self.opts.credentials is not None:
            return grpc.secure_channel(self.opts.server, self.opts.credentials, options=opts)
        return grpc.insecure_channel(self.opts.server, options=opts)

    def _md(self, device_id: str | None = None) -> tuple[tuple[str, str], ...]:
        md = tuple(self.opts.metadata)
        if device_id is not None and self.opts.token_for and device_id in self.opts.token_for:
            md += (("x-device-id", device_id), ("authorization", f"Bearer {self.opts.token_for[device_id]}"))
        return md

    def _call(self, fn, what: str):
        while True:
            try:
                out = fn()
                self.backoff.ok()
                return out
            except grpc.RpcError as e:
                if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
                self.backoff.failed(f"{what}: {e.code().name}")

    # -- protocol --------------------------------------------------------------------------------------------
    def register(self, device_id: str) -> None:
        req = pb.RegisterRequest(device_id=device_id, hardware=self.info.hardware,
                                 versions={**self.info.versions, "grpc": grpc.__version__},
                                 model_fingerprint=self.model_fp, tokenizer_fingerprint=self.tok_fp,
                                 data_error=self.data_errors.get(device_id, ""), tier=self.opts.tier,
                                 uplink_mbps=self.opts.declared_uplink_mbps, downlink_mbps=self.opts.declared_downlink_mbps,
                                 **self.capacity())
        try:
            reply = self._call(lambda: self.stub.Register(req, timeout=30, metadata=self._md(device_id)),
                               f"register {device_id}")
        except grpc.RpcError as e:  # e.g. another base model, or a tier the run does not plan for
            if e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
                raise ConfigError(f"device {device_id}: the server refused it: {e.details()}") from None
            raise
        self.heartbeat_s = reply.heartbeat_s or 5.0
        log.info("device %s registered with %s", device_id, self.opts.server)

    def capacity(self) -> dict:
        """What Register declares of this process's memory and hardware: its budget (--memory-mb, or what the OS
        says is available), what it holds now (its base loaded, the warm-up pass run), where it trains."""
        budget = self.opts.memory_mb if self.opts.memory_mb is not None else available_mb()
        device = torch.device(self.opts.torch_device)
        fast = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_fast_bf16()
        return {"memory_mb": budget, "resident_mb": resident_mb(), "accelerator": device.type, "fast_bf16": fast}

    def fetch(self, device_id: str, wait_s: float) -> tuple[pb.TaskHeader, bytes, float, float]:
        """(header, payload, download seconds, time.monotonic() when the header arrived)."""
        t0 = time.perf_counter()
        header_at = time.monotonic()
        stream = self.stub.FetchTask(pb.FetchTaskRequest(device_id=device_id, wait_s=wait_s),
                                     timeout=wait_s + 600, metadata=self._md(device_id))
        header, parts = None, []
        if self.opts.throttle is not None:
            stream = self.opts.throttle.paced_download(stream)
        for chunk in stream:
            if chunk.WhichOneof("part") == "header":
                header = chunk.header
                t0, header_at = time.perf_counter(), time.monotonic()
            else:
                parts.append(chunk.data)
        if header is None:
            raise DownloadError("task stream carried no header")
        payload = b"".join(parts)
        if header.kind == pb.TaskHeader.TRAIN and len(payload) != header.payload_bytes:
            raise DownloadError(f"task payload truncated: {len(payload)} of {header.payload_bytes} bytes")
        return header, payload, time.perf_counter() - t0, header_at

    def submit(self, update: Update) -> pb.SubmitReply:
        """Stream the update; if the stream breaks, ask the server how much it holds and send only the rest
        (up to UPLOAD_ATTEMPTS streams), instead of training again."""
        offset = 0
        for attempt in range(1, UPLOAD_ATTEMPTS + 1):
            try:
                reply = self._stream(update, offset)
                if reply.accepted:
                    return reply
                broke = "the server kept a partial upload"  # it saw the stream break before we did
            except grpc.RpcError as e:
                if e.code() not in RESUMABLE or attempt == UPLOAD_ATTEMPTS:
                    raise
                broke = e.code().name
            self.backoff.failed(f"device {update.device_id} upload: {broke}")
            offset = self._call(lambda: self.stub.UploadOffset(
                pb.UploadOffsetRequest(device_id=update.device_id, round=update.round, task_id=update.task_id),
                timeout=30, metadata=self._md(update.device_id)), "upload offset").offset
            log.info("device %s round %d: resuming the upload at byte %d of %d", update.device_id, update.round,
                     offset, len(update.payload))
        raise ConnectionError(f"device {update.device_id}: upload did not complete in {UPLOAD_ATTEMPTS} streams")

    def _stream(self, update: Update, offset: int) -> pb.SubmitReply:
        header = serde.update_header_to_proto(update)
        header.offset = offset
        rest = memoryview(update.payload)[offset:]
        throttle = self.opts.throttle
        chunk = self.spec.chunk_bytes if throttle is None else throttle.upload_chunk_bytes(self.spec.chunk_bytes)
        msgs = serde.chunks(header, pb.UpdateChunk, rest, chunk)
        if throttle is not None:
            msgs = throttle.paced_upload(msgs)
        return self.stub.SubmitUpdate(self._counted(update.device_id, msgs), timeout=600,
                                      metadata=self._md(update.device_id))

    def _counted(self, device_id: str, msgs):
        """Payload bytes handed to gRPC, per device (what a resume saves shows here)."""
        for m in msgs:
            if m.WhichOneof("part") == "data":
                self.payload_bytes_sent[device_id] = self.payload_bytes_sent.get(device_id, 0) + len(m.data)
            yield m

    # -- main loop -------------------------------------------------------------------------------------------
    def warm_up(self) -> None:
        """Build the run's first structure (and run one pass) before registering: the server may open round 1
        as soon as enough devices registered, and the build is then not part of it."""
        if not self.spec.HasField("initial_structure"):
            return  # a server that does not say: the first task builds it
        trainer = next((t for d, t in self.trainers.items() if d not in self.data_errors), None)
        if trainer is not None:
            seconds = trainer.warm_up(serde.structure_from_proto(self.spec.initial_structure))
            log.info("built the run's first structure and ran one pass in %.2f s", seconds)

    def run(self) -> int:
        self.warm_up()
        for d in self.opts.device_ids:
            self.register(d)
        for d, error in self.data_errors.items():
            log.error("device %s cannot load its data (the server was told): %s", d, error)
            self.stopped.add(d)
        if len(self.data_errors) == len(self.opts.device_ids):
            raise ConfigError(f"device(s) {', '.join(self.data_errors)} cannot load their data (the server was "
                              f"told): {next(iter(self.data_errors.values()))}")
        self._beat = threading.Thread(target=self._heartbeats, name="heartbeat", daemon=True)
        self._beat.start()
        wait_s = self.opts.poll_s if len(self.opts.device_ids) == 1 else 0.0
        try:
            while len(self.stopped) < len(self.opts.device_ids) and not self.run_over.is_set():
                busy = False
                for d in self.opts.device_ids:
                    if d not in self.stopped and self.not_before.get(d, 0.0) <= time.monotonic():
                        busy |= self._serve_once(d, wait_s)
                paced = [self.not_before.get(d, 0.0) for d in self.opts.device_ids if d not in self.stopped]
                if not busy and paced and min(paced) > time.monotonic():  # pace steering: nobody asks yet
                    self.run_over.wait(min(paced) - time.monotonic())
                elif not busy and wait_s == 0:
                    self.run_over.wait(0.5)
        except RunOver as e:
            log.info("the server says the run is over (heard while retrying: %s)", e)
        except ValueError:  # grpc: "Channel closed": close() was called while a device was still being served
            if not self._stop.is_set():
                raise
            log.info("the client was closed; devices %s stop", ",".join(self.opts.device_ids))
        finally:
            self._stop.set()
        log.info("run finished; devices %s exit", ",".join(self.opts.device_ids))
        return 0

    def _serve_once(self, device_id: str, wait_s: float) -> bool:
        try:
            header, payload, download_s, header_at = self.fetch(device_id, wait_s)
            self.backoff.ok()
        except grpc.RpcError as e:
            self._recover(device_id, e, "fetch task")
            return False
        except (DownloadError, CodecError) as e:  # a broken task stream: ask again after a pause
            self.backoff.failed(f"device {device_id} fetch task: {e}")
            return False
        if header.kind == pb.TaskHeader.STOP:
            self.stopped.add(device_id)
            return False
        if header.kind == pb.TaskHeader.SECAGG:
            self._answer_secagg(device_id, header)
            return True
        if header.kind != pb.TaskHeader.TRAIN:  # WAIT: under pace steering, not before retry_after_s
            self.not_before[device_id] = time.monotonic() + header.retry_after_s
            return False
        task = serde.task_from_proto(header)
        try:
            update = self.trainers[device_id].run(task, payload, download_s,
                                                    secure=self.sessions.for_task(device_id, task))
        except (DownloadError, CodecError, ProtocolViolation) as e:
            log.error("device %s round %d: %s", device_id, task.round, e)
            self.backoff.failed(f"device {device_id} round {task.round}: unusable task")
            return True
        # The task says how long its round stays open: an upload that could only arrive after it closes would
        # be refused anyway, so the device lets the round go instead of spending its uplink on it.
        if task.deadline_s > 0 and time.monotonic() > header_at + task.deadline_s:
            self.late += 1
            log.warning("device %s round %d: trained past the task's deadline (%.1f s); not uploading",
                        device_id, task.round, task.deadline_s)
            return True
        try:
            reply = self.submit(update)
            self.trainers[device_id].accepted()
            log.info("device %s round %d: uploaded %d bytes", device_id, task.round, reply.bytes_received)
        except grpc.RpcError as e:
            if e.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS,
                            grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED):
                log.error("device %s round %d: upload refused: %s %s", device_id, task.round, e.code().name,
                          e.details())
            self._recover(device_id, e, "upload")
        return True

    def _answer_secagg(self, device_id: str, header: pb.TaskHeader) -> None:
        """A secure round's key phase: answer the prompt with the matching RPC, or refuse what an honest device
        must not do (the coordinator then counts this device as dropped)."""
        try:
            request = self.sessions.answer(device_id, header)
        except ProtocolViolation as e:
            log.error("device %s round %d: refused the coordinator's secure-aggregation prompt: %s", device_id,
                      header.round, e)
            return
        rpc = {pb.AdvertiseKeysRequest: self.stub.AdvertiseKeys, pb.ShareKeysRequest: self.stub.ShareKeys,
               pb.UnmaskSharesRequest: self.stub.UnmaskShares}[type(request)]
        try:
            rpc(request, timeout=30, metadata=self._md(device_id))
        except grpc.RpcError as e:
            self._recover(device_id, e, "secure aggregation")

    def _recover(self, device_id: str, e: grpc.RpcError, what: str) -> None:
        if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
            self.backoff.failed(f"device {device_id} {what}: {e.code().name}")
        elif refusal_code(e) == "unknown":
            self.register(device_id)  # the server restarted (e.g. resumed) and does not know it: join again
        elif e.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            raise PermissionError(f"device {device_id}: {e.code().name}: {e.details()}")
        else:  # refused or failed on the server's side: never retry in a tight loop
            self.backoff.failed(f"device {device_id} {what}: {e.code().name}: {e.details()}")

    def _heartbeats(self) -> None:
        """Every device's heartbeat, every heartbeat_s, or as the replies say (pace steering: the shortest
        interval any of this process's devices was given)."""
        interval = self.heartbeat_s
        while not self._stop.wait(interval):
            told = []
            for d in self.opts.device_ids:
                if self._stop.is_set():
                    return
                if d in self.data_errors:  # it never joined: nothing to keep alive
                    continue
                try:
                    reply = self.stub.Heartbeat(pb.HeartbeatRequest(device_id=d), timeout=5, metadata=self._md(d))
                except grpc.RpcError as e:  # reconnects are the main loop's; a restarted server needs a Register
                    if refusal_code(e) == "unknown":
                        try:
                            self.register(d)
                        except (grpc.RpcError, ConfigError, RunOver):  # the main loop meets it too and says so
                            pass
                    continue
                if reply.run_finished:  # the main loop may be in a backoff sleep and miss its STOP task
                    self.run_over.set()
                    self._heard_over(d)
                    return
                if reply.next_heartbeat_s > 0:
                    told.append(reply.next_heartbeat_s)
            interval = min(told) if told else self.heartbeat_s

    def _heard_over(self, heard: str) -> None:
        """The server said the run is over to `heard`: one heartbeat for each other device of this process,
        whose reply tells the server that device heard it too. Otherwise the server, which waits at the end for
        every live device to be told, waits out server.device_timeout_s for devices that exit unheard."""
        for d in self.opts.device_ids:
            if d != heard and d not in self.data_errors:
                try:
                    self.stub.Heartbeat(pb.HeartbeatRequest(device_id=d), timeout=5, metadata=self._md(d))
                except grpc.RpcError:  # a server already gone: nothing left to tell
                    pass

    def close(self) -> None:
        # Join the heartbeat thread before closing the channel: a gRPC call still in flight on a closed
        # channel at interpreter exit aborts the process. A run() still serving stops at its next call.
        self._stop.set()
        self.run_over.set()
        if self._beat is not None:
            self._beat.join(timeout=10)
        self.channel.close()
