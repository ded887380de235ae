"""The device side: the trainer (decode the download, train, encode the update; the same in a real client and
a simulated device), the gRPC client runtime (register, heartbeat, fetch, upload, resume), and uplink
throttling.

Imports: the shared core, edgelora.protos, edgelora.codec; never edgelora.server.
"""
