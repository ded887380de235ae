"""edgelora: federated parameter-efficient fine-tuning (SLoRA, FLASC) for real edge devices.

This folder is the shared core, at the bottom of the house (docs/architecture.md): the run config's schema
(schema, loaded by config), task and device specs (tasks), models and Hub loading (models, hub, smollm2,
adapters), task types, data and partitioning, local training and precision (the frozen base's, frozen_base),
the memory model that fits a device's training to its budget (memory), the methods, and the server state as a
value (state). Apart from it, above: simulation/ (sequential and Ray runners), experiments/
(sweep, report, centralized baseline, Flower comparison), cli/ and launch.py (one server and its
client processes, started and stopped in one place).

Imports: the core imports only itself and third-party libraries (torch, transformers, peft, numpy) and the
codec; never grpc, edgelora.protos, edgelora.server, edgelora.edge_client, or the packages above it.
"""
__version__ = "0.1.0"
