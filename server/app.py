"""Start and stop the coordinator: `run_server()` is a context manager that always stops the gRPC server."""
from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import threading
from pathlib import Path

import grpc

from edgelora.config import RunConfig
from edgelora.protos import edgelora_pb2_grpc as pb_grpc
from edgelora.protos.channel import SERVER_OPTIONS
from edgelora.state import RoundsAbandoned

from .coordinator import Coordinator
from .metrics import CoordinatorMetrics, serve_metrics
from .servicer import CHUNK_SLACK, RECEIVE_LIMIT, CoordinatorServicer

log = logging.getLogger("edgelora.server")


@contextlib.contextmanager
def run_server(run: RunConfig, run_dir: Path, resume: bool = False, credentials=None, interceptors=(),
               tensorboard: bool = False, metrics_port: int | None = None):
    """Yield (coordinator, port) with a gRPC server listening; stop it on exit whatever happened.
    The server is grpc.aio on one event loop in its own thread (server.servicer); `interceptors` are
    grpc.aio.ServerInterceptor. `metrics_port` (0 = any free one): Prometheus metrics at
    http://HOST:PORT/metrics, written to RUN_DIR/metrics.addr."""
    coord = Coordinator(run, Path(run_dir), resume=resume)
    if tensorboard:
        coord.folder.log_to_tensorboard()
    http = None
    if metrics_port is not None:
        coord.metrics = CoordinatorMetrics(coord)
        http = serve_metrics(coord.metrics, coord, run.server.host, metrics_port)
        (Path(run_dir) / "metrics.addr").write_text(f"{run.server.host}:{http.server_port}\n")
        log.info("metrics at http://%s:%d/metrics", run.server.host, http.server_port)
    cfg = run.server
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="grpc-aio", daemon=True)
    thread.start()

    def on_loop(coro):
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    async def start():
        # Uploads arrive as many chunk-sized messages; the servicer refuses a chunk over chunk_bytes by name.
        server = grpc.aio.server(interceptors=list(interceptors), maximum_concurrent_rpcs=cfg.max_connections,
                                 options=[("grpc.max_receive_message_length", RECEIVE_LIMIT),
                                          ("grpc.max_send_message_length", cfg.chunk_bytes + CHUNK_SLACK),
                                          *SERVER_OPTIONS])
        servicer = CoordinatorServicer(coord)
        pb_grpc.add_CoordinatorServicer_to_server(servicer, server)
        address = f"{cfg.host}:{cfg.port}"
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"server.port: could not listen on {address}")
        await server.start()
        return server, servicer, port

    server = None
    try:
        server, servicer, port = on_loop(start())
        (Path(run_dir) / "server.addr").write_text(f"{cfg.host}:{port}\n")
        log.info("coordinator listening on %s:%d, run folder %s", cfg.host, port, run_dir)
        yield coord, port
    finally:
        try:
            if server is not None:
                coord.stop()
                on_loop(server.stop(grace=2.0))
                servicer.close()
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()
            if http is not None:
                http.shutdown()


def settle_heap() -> None:
    """Move every object the process holds after start-up (torch, transformers, the models: ~400,000 of them)
    out of the cyclic garbage collector's reach (gc.freeze), once, in the server's own process. A full
    collection scans every tracked object, ~0.1-0.2 s with them, and the event loop that answers every device
    stands still meanwhile: that pause was the heartbeats' p99 with thousands of devices connected."""
    gc.collect()
    gc.freeze()


def serve(run: RunConfig, run_dir: Path, resume: bool = False, **kw) -> int:
    """Run every round, then stay until every live device has heard the run is over, then stop. Returns a
    process exit code."""
    with run_server(run, run_dir, resume=resume, **kw) as (coord, port):
        settle_heap()
        print(f"edgelora server listening on {run.server.host}:{port}; run folder {run_dir}", flush=True)
        try:
            state = coord.run_rounds()
        except (TimeoutError, RoundsAbandoned) as e:
            log.error("%s", e)
            return 2
        except KeyboardInterrupt:
            log.warning("interrupted; state of round %d is in %s (resume with --resume)", coord.state.round, run_dir)
            return 130
        # A live device heartbeats every heartbeat_s or stops counting as live within device_timeout_s, so the
        # wait ends by then; the bound is a guard.
        untold = coord.say_goodbye(run.server.device_timeout_s + run.server.heartbeat_s)
        if untold:
            log.warning("stopping before device(s) %s heard the run is over; they retry until their --give-up-s",
                        ", ".join(untold))
        print(f"finished {state.round} rounds; run folder {run_dir}", flush=True)
        return 0
