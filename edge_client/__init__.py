"""The device side: the trainer (decode the download, train, encode the update; the same in a real client and
a simulated device), the gRPC client runtime (register, heartbeat, fetch, upload, resume), uplink
throttling, and the process's memory allocator (jemalloc, preloaded on a restart).

Imports: the shared core, edgelora.protos, edgelora.codec; never edgelora.server.
"""
