"""Closing a round, the same way for the gRPC coordinator and the simulator."""
from __future__ import annotations

from typing import Callable

from .aggregation import RunningMean
from .engine import RoundEngine
from .runlog import RoundRecord, RunFolder
from .state import ServerState, save_state


def close_round(engine: RoundEngine, folder: RunFolder, state: ServerState, agg: RunningMean | None,
                rng_state: dict, rec: RoundRecord, evaluate: Callable[[object], tuple[float, float]]) -> ServerState:
    """Aggregate if enough devices reported, evaluate when due, then persist.

    Order matters for crash safety: the metrics row and the final model are written before the state, so
    a crash in between re-runs the round on resume (RunFolder drops rows past the saved round) instead of
    losing its row or its adapter."""
    cfg = engine.run.server
    aggregated = agg is not None and agg.count >= cfg.min_devices
    new_state = engine.finish(state, agg if aggregated else None, rng_state)
    rec.aggregated = aggregated and new_state.params is not state.params
    if new_state.round % cfg.eval_every == 0 or new_state.finished:
        rec.accuracy, rec.loss = evaluate(engine.model_for(new_state))
    rec.close()
    folder.append(rec)
    if new_state.finished:
        folder.save_final_model(engine.model_for(new_state))
    save_state(new_state, folder.path)
    return new_state
