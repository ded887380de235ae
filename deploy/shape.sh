#!/bin/sh
# Container entrypoint: shape eth0 with tc when EDGELORA_UPLINK_MBIT / EDGELORA_DOWNLINK_MBIT are set (needs
# NET_ADMIN), then run the command as the unprivileged edgelora user.
# Uplink: tbf on eth0's egress. Downlink: tbf on the ingress side needs ifb, which containers rarely have, so
# the downlink is throttled in the application instead (edgelora client --downlink-mbps).
set -eu
if [ -n "${EDGELORA_UPLINK_MBIT:-}" ]; then
    rate_kbit=$(awk "BEGIN { printf \"%d\", ${EDGELORA_UPLINK_MBIT} * 1000 }")
    tc qdisc replace dev eth0 root tbf rate "${rate_kbit}kbit" burst 3200 limit 65536
    if [ -n "${EDGELORA_DELAY_MS:-}" ]; then
        tc qdisc add dev eth0 parent 1:1 handle 10: netem delay "${EDGELORA_DELAY_MS}ms" 2>/dev/null \
            || echo "shape: no netem in this kernel; delay not applied" >&2
    fi
    echo "shape: eth0 uplink ${EDGELORA_UPLINK_MBIT} Mbit/s" >&2
fi
if [ "$(id -u)" = "0" ] && command -v setpriv >/dev/null; then
    exec setpriv --reuid=edgelora --regid=edgelora --init-groups "$@"
fi
exec "$@"
