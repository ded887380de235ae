"""The server state on disk, written atomically; and the grouped-array bundle it (and the simulator's device
residuals) are stored as.

On disk: RUN_DIR/state/meta.json (scalars, RNG state) + RUN_DIR/state/tensors.elb (a codec bundle of the
global weights, optimizer moments and method state, float32 = lossless). No pickle.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from edgelora import codec
from edgelora.state import Arrays, ServerState
from edgelora.tasks import Stage

_GROUPS = ("params", "opt_state", "method_state", "last_update")


def groups_to_bytes(groups: dict[str, Arrays]) -> bytes:
    """Named groups of arrays as one codec bundle of dense float32 tensors named GROUP/NAME."""
    return codec.encode_bundle({f"{g}/{k}": codec.Dense(v) for g, arrays in groups.items() for k, v in arrays.items()})


def groups_from_bytes(data: bytes) -> dict[str, Arrays]:
    """The inverse of groups_to_bytes (a group without arrays is absent)."""
    groups: dict[str, Arrays] = {}
    for key, t in codec.decode_bundle(data).items():
        g, _, name = key.partition("/")
        groups.setdefault(g, {})[name] = codec.to_dense(key, t)
    return groups


def save_state(state: ServerState, run_dir: Path) -> None:
    """Write the state so that a crash at any instant leaves either the old or the new one on disk."""
    run_dir = Path(run_dir)
    tmp = run_dir / "state.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "tensors.elb").write_bytes(groups_to_bytes({g: getattr(state, g) for g in _GROUPS}))
    meta = {"round": state.round, "stage": state.stage.name, "stage_start": state.stage_start,
            "rng": state.rng, "finished": state.finished, "devices": state.devices}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    final, old = run_dir / "state", run_dir / "state.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    dir_fd = os.open(run_dir, os.O_RDONLY)  # make the renames themselves durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def has_state(run_dir: Path) -> bool:
    """Whether RUN_DIR holds a saved state to continue from (state.old: a crash between save_state's renames)."""
    run_dir = Path(run_dir)
    return (run_dir / "state" / "meta.json").exists() or (run_dir / "state.old" / "meta.json").exists()


def load_state(run_dir: Path) -> ServerState:
    run_dir = Path(run_dir)
    d = run_dir / "state"
    if not d.exists() and (run_dir / "state.old").exists():  # crashed between the two renames: put it back
        (run_dir / "state.old").rename(d)
    if not (d / "meta.json").exists():
        raise FileNotFoundError(f"{run_dir} holds no server state (state/meta.json)")
    meta = json.loads((d / "meta.json").read_text())
    decoded = groups_from_bytes((d / "tensors.elb").read_bytes())
    if set(decoded) - set(_GROUPS):
        raise ValueError(f"{d / 'tensors.elb'}: unknown tensor groups {sorted(set(decoded) - set(_GROUPS))}")
    groups = {g: decoded.get(g, {}) for g in _GROUPS}
    return ServerState(round=meta["round"], stage=Stage[meta["stage"]], stage_start=meta["stage_start"],
                       rng=meta["rng"], finished=meta.get("finished", False), devices=meta.get("devices", {}),
                       **groups)
