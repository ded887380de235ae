"""The coordinator side: the round driver (driver) and the round's logic (engine), the server's run, state
checkpoints (checkpoint), device sampling, the gRPC coordinator (coordinator, registry, servicer, auth,
metrics) and the process that serves it (app).

Imports: the shared core, edgelora.protos, edgelora.codec; never edgelora.edge_client or the simulation,
experiments and CLI packages above it.
"""
