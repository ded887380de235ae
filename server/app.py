"""Start and stop the coordinator: `run_server()` is a context manager that always stops the gRPC server."""
from __future__ import annotations

import contextlib
import logging
from concurrent import futures
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
    `metrics_port` (0 = any free one): Prometheus metrics at http://HOST:PORT/metrics, written to
    RUN_DIR/metrics.addr."""
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
    # Uploads arrive as many chunk-sized messages; the servicer refuses a chunk over chunk_bytes by name.
    # Each waiting device holds a handler thread (FetchTask long-polls), so the pool is sized for the fleet:
    # threads start on demand, and an idle one costs its stack's touched pages only.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=cfg.max_connections, thread_name_prefix="rpc"),
                         interceptors=list(interceptors),
                         options=[("grpc.max_receive_message_length", RECEIVE_LIMIT),
                                  ("grpc.max_send_message_length", cfg.chunk_bytes + CHUNK_SLACK),
                                  *SERVER_OPTIONS])
    pb_grpc.add_CoordinatorServicer_to_server(CoordinatorServicer(coord), server)
    address = f"{cfg.host}:{cfg.port}"
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"server.port: could not listen on {address}")
    server.start()
    (Path(run_dir) / "server.addr").write_text(f"{cfg.host}:{port}\n")
    log.info("coordinator listening on %s:%d, run folder %s", cfg.host, port, run_dir)
    try:
        yield coord, port
    finally:
        coord.stop()
        server.stop(grace=2.0).wait()
        if http is not None:
            http.shutdown()


def serve(run: RunConfig, run_dir: Path, resume: bool = False, **kw) -> int:
    """Run every round, then stay until every live device has heard the run is over, then stop. Returns a
    process exit code."""
    with run_server(run, run_dir, resume=resume, **kw) as (coord, port):
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
