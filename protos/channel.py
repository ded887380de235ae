"""gRPC connection settings the two ends of the protocol must agree on.

Dead links. A link that dies without a FIN or RST (a cable pulled, a radio out of range, `ip link set down`)
leaves a long poll or an upload waiting on a dead TCP connection for many minutes. Devices send an HTTP/2 ping
every 20 s; one unanswered within 10 s closes the connection, so the call in flight fails UNAVAILABLE and the
device backs off and reconnects. A gRPC server answers pings more often than every 5 minutes with GOAWAY
("too_many_pings") unless it is told to permit them: SERVER_OPTIONS does.

Coming back. gRPC's own reconnect backoff grows to 120 s by default, so after a long outage a channel could
wait two minutes before its next attempt, whatever the device's own backoff (at most 10 s) says. Capped at
10 s here: a device reconnects within about 10 s of its link returning.
"""
from __future__ import annotations

CLIENT_OPTIONS = (("grpc.keepalive_time_ms", 20_000), ("grpc.keepalive_timeout_ms", 10_000),
                  ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0),
                  ("grpc.initial_reconnect_backoff_ms", 250), ("grpc.max_reconnect_backoff_ms", 10_000))
SERVER_OPTIONS = (("grpc.keepalive_permit_without_calls", 1),
                  ("grpc.http2.min_ping_interval_without_data_ms", 10_000))
