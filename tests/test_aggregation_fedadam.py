"""FedAdam = FedAvg's mean delta fed, as gradient -delta, to one server AdamW step (Reddi et al. 2021, Alg. 2).
Checked against torch.optim.AdamW itself, over two steps so the bias correction and the moments count."""
from __future__ import annotations

import numpy as np
import torch

from edgelora.schema import FedAdamConfig
from edgelora.server.aggregation import FedAdam, RunningMean


def test_fedadam_one_client_matches_torch_adamw():
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)}
    deltas = [{k: rng.normal(scale=0.1, size=v.shape).astype(np.float32) for k, v in params.items()}
              for _ in range(2)]
    cfg = FedAdamConfig(name="fedadam", lr=0.05, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.01)
    fedadam = FedAdam(cfg)

    ref = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in params.items()}
    opt = torch.optim.AdamW(list(ref.values()), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                            weight_decay=cfg.weight_decay)
    ours, opt_state = params, {}
    for delta in deltas:
        agg = fedadam.start()
        agg.add(delta, 7.0)  # one client: the mean is its delta whatever its weight
        ours, opt_state = fedadam.finish(ours, agg, opt_state)
        for k, p in ref.items():
            p.grad = torch.from_numpy(-delta[k])
        opt.step()
        for k in params:
            np.testing.assert_allclose(ours[k], ref[k].detach().numpy(), rtol=0, atol=1e-6)
    # the server optimizer's state is plain arrays (checkpointed in ServerState.opt_state)
    assert int(opt_state["step"][0]) == 2 and set(opt_state) == {"step", "m/w", "v/w", "m/b", "v/b"}
    # and the first step moved every weight by about lr (Adam's normalised step), so the test can fail
    one = RunningMean()
    one.add(deltas[0], 1.0)
    moved = np.abs(fedadam.finish(params, one, {})[0]["w"] - params["w"])
    assert np.all(moved > 0.04) and np.all(moved < 0.06)
