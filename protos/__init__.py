"""The wire contract: edgelora.proto and its generated modules, serde (domain types <-> protobuf in matched
pairs; nothing else touches *_pb2 types), refusals (the Refusal codes and the one refusal -> gRPC status
table) and channel options.

Imports: the shared core's types (edgelora.schema, edgelora.tasks, edgelora.task_types), grpc, protobuf;
never the codec, edgelora.server or edgelora.edge_client.
"""
