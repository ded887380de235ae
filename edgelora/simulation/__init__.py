"""Simulation: the round driver (edgelora.server.driver) over virtual devices, partitions of one dataset,
reproducible bit for bit and bit-identical to a gRPC run of the same config. `simulator` is the driver's
Devices for them; `sequential` trains them in this process, `ray_devices` in Ray actors (optional: Ray is
imported only when simulate.backend = "ray").

May import: the shared core (edgelora.*), edgelora.server (the driver), edgelora.edge_client.trainer,
edgelora.protos, edgelora.codec. Nothing below imports this package.
"""
