"""A device within the memory it has: the frozen base held as bf16, int8 or nf4 under LoRA (every LoRA-based
method trains on it, the server scores on it and on fp32), the memory model's plans (the task as made where it
fits; levers that keep the update before a smaller base; a device no plan fits is refused), and a real gRPC
run where three devices declare budgets: one trains as made, one under a plan, one is refused at Register."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from edgelora import memory
from edgelora.config import ModelConfig, load_config
from edgelora.configtools import ConfigError
from edgelora.data import Examples
from edgelora.frozen_base import base_bytes
from edgelora.models import ModelHost, load_base_model
from edgelora.tasks import LoraSpec, Structure, StructureKind, TrainSpec

from .test_lm import LM_METHODS, lm_raw, write_speeches

LORA = Structure(kind=StructureKind.LORA, lora=LoraSpec(rank=4, alpha=8.0, modules_to_save=()))
TEXTS = ("the first speech is long enough to fill the window", "a short one", "and a third, of middling length here",
         "four", "five words of plain text", "six is the last of them, and it runs on a little")


def _device_host():
    from edge_client.trainer import DeviceHost

    return DeviceHost(ModelConfig(task="causal-lm", name="tiny-llama", max_seq_len=24))


@pytest.mark.parametrize("base", ["bf16", "int8", "nf4"])
def test_a_devices_base_is_held_smaller_trains_lora_and_comes_back_as_loaded(base):
    """The layers LoRA wraps are converted in place (smaller), LoRA trains on them (loss falls, A and B move,
    the base does not), and asking for fp32 again reloads W0 exactly; a full structure refuses a smaller base."""
    from edgelora.training import train_local

    host = _device_host()
    w0 = {n: p.detach().clone() for n, p in host.base.named_parameters()}
    fp32_bytes = base_bytes(host.base)
    model = host.build(LORA, base)
    assert base_bytes(host.base) < fp32_bytes and host.base_kind[0] == base
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    examples = Examples(TEXTS, np.zeros(len(TEXTS), np.int64))
    spec = TrainSpec(local_epochs=3, batch_size=3, lr=1e-2, precision="fp32", base=base)
    losses = [train_local(model, examples, host.tokenizer, spec, 24, host.torch_device, task=host.task)
              for _ in range(2)]
    assert losses[1] < losses[0]
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
    host.build(LORA)  # fp32 again: W0 reloaded, bit for bit
    assert all(torch.equal(p, w0[n]) for n, p in host.base.named_parameters())
    with pytest.raises(ConfigError, match=f"train.base = '{base}'.*only a LoRA structure"):
        host.build(Structure(kind=StructureKind.FULL), base)


def test_an_nf4_layer_computes_the_same_in_eval_and_training_on_any_cpu():
    """bitsandbytes repacks a 4-bit layer in place at its first no-grad eval forward on an AVX512-BF16 CPU (block
    scales rounded to bf16; it fails where in_features is not a multiple of the block). Ours never repack: eval
    and training forwards agree bit for bit and the stored weight is untouched, whatever this CPU has."""
    from torch import nn

    from edgelora.frozen_base import convert

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 32)).requires_grad_(False)  # 32: under one block
    assert convert(model, "nf4", ["0", "1"]) == 2
    x = torch.randn(3, 32)
    stored = [m.weight.detach().clone() for m in model]
    train_out = model.train()(x.requires_grad_(True)).detach()
    with torch.no_grad():
        eval_out = model.eval()(x.detach())
    assert torch.equal(eval_out, train_out)
    assert all(torch.equal(m.weight, w) and not getattr(m.weight.quant_state, "packing_format_for_cpu", False)
               for m, w in zip(model, stored))


def test_a_mapped_tensor_is_copied_a_block_at_a_time_each_blocks_file_pages_dropped_as_it_goes(tmp_path, monkeypatch):
    """What converting leaves as loaded (embeddings, norms) gets memory of its own so the safetensors mapping can
    go; a view of the mapping is copied in blocks, each block's span handed to _release right after it is copied
    (a whole clone held the file's pages and the copy at once: 113 MB twice for SmolLM2's embeddings)."""
    from edgelora import frozen_base

    values = np.arange(10_000, dtype=np.float32)
    path = tmp_path / "w.safetensors"  # the name _file_mappings looks for; a private mapping, as transformers'
    values.tofile(path)
    t = torch.from_numpy(np.memmap(path, np.float32, "c"))
    monkeypatch.setattr(frozen_base, "COPY_BLOCK", 4096)
    released = []
    real_release = frozen_base._release
    monkeypatch.setattr(frozen_base, "_release", lambda span, mapped: (released.append(span),
                                                                         real_release(span, mapped)))
    mapped = frozen_base._file_mappings()
    assert any(lo <= t.data_ptr() < hi for lo, hi in mapped)
    out = frozen_base._copied(t, mapped)
    assert torch.equal(out, torch.from_numpy(values)) and out.data_ptr() != t.data_ptr()
    assert released == [(t.data_ptr() + lo, min(4096, t.nbytes - lo)) for lo in range(0, t.nbytes, 4096)]


def test_converting_a_tied_model_keeps_the_tie_and_leaves_no_view_of_the_file(tmp_path):
    """tiny-llama with its output projection tied to its embeddings, saved and loaded as transformers maps it:
    after an nf4 conversion the two are still one Parameter, in memory of its own."""
    from transformers import AutoModelForCausalLM

    from edgelora import frozen_base

    model = load_base_model(ModelConfig(task="causal-lm", name="tiny-llama"))
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.save_pretrained(tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").requires_grad_(False)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    in_file = lambda: [n for n, p in loaded.named_parameters()  # noqa: E731
                       if any(lo <= p.data_ptr() < hi for lo, hi in frozen_base._file_mappings())]
    assert "model.embed_tokens.weight" in in_file()  # as loaded, a view of the file
    frozen_base.convert(loaded, "nf4", ["q_proj", "v_proj"])
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight and in_file() == []


def test_a_host_that_cannot_reload_its_base_keeps_it_as_loaded():
    host = ModelHost(load_base_model(ModelConfig(task="causal-lm", name="tiny-llama")))
    with pytest.raises(ConfigError, match="only a device's host converts it"):
        host.build(LORA, "nf4")


@pytest.mark.parametrize("name", ["lora", "flasc", "slora", "flora"])
def test_every_lora_method_trains_on_an_nf4_base_and_the_server_scores_both_bases(name, tmp_path):
    """Rows name the base they were scored on (the devices': nf4) and give the fp32 base's score beside it;
    SLoRA's and FLoRA's Stage 1 trains every weight, so its tasks keep fp32."""
    from edgelora.simulation.simulator import simulate

    run = load_config(lm_raw(write_speeches(tmp_path / "s.jsonl"), method={"name": name, **LM_METHODS[name]},
                             train={"base": "nf4"}))
    simulate(run, tmp_path / "r", progress=False)
    rows = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert r["eval_base"] == "nf4" and r["loss_fp32"] is not None and np.isfinite(r["loss"])
        assert r["loss"] != r["loss_fp32"]  # the same weights on another base score differently


def test_a_smaller_base_is_refused_where_nothing_trains_lora():
    raw = lm_raw("unused.jsonl", method={"name": "fft"}, train={"base": "nf4"})
    with pytest.raises(ConfigError, match="train.base.*method fft trains no LoRA"):
        load_config(raw)
    with pytest.raises(ConfigError, match="train.base"):
        load_config(lm_raw("unused.jsonl", train={"base": "fp8"}))


# -- the memory model and its plans ----------------------------------------------------------------------------
# SmolLM2-135M under LoRA r = 16 on its seven projections (what the coefficients were calibrated on)
SMOL = memory.Footprint(layers=30, hidden=576, vocab=49152, trainable=4_884_480, convertible=106_168_320,
                        weights=134_515_008)
SPEC = TrainSpec(batch_size=4, precision="fp32")


def test_the_task_as_made_is_kept_wherever_it_fits():
    for budget in (0.0, 100_000.0):  # nothing declared; plenty
        fitted = memory.fit(SPEC, SMOL, 128, memory.Declared(budget, 900.0))
        assert fitted.spec == SPEC and fitted.plan == "" and not fitted.changes_result


def test_a_tight_budget_gets_levers_that_keep_the_update_before_a_smaller_base():
    as_made = memory.predict_mb(memory.Plan(), SMOL, 4, 128, 900.0)
    fitted = memory.fit(SPEC, SMOL, 128, memory.Declared(as_made - 300, 900.0))
    assert fitted.plan and not fitted.changes_result and fitted.spec.base == "fp32"
    assert fitted.predicted_mb <= as_made - 300
    assert dataclasses.replace(fitted.spec, micro_batch_size=0, loss_chunk_tokens=0,
                               gradient_checkpointing=False) == SPEC  # only the levers changed
    # the most frugal plan that keeps the update, and 50 MB less: only a smaller base fits
    keep, smaller = memory.candidates(SPEC, SMOL)
    frugal = min(memory.predict_mb(p, SMOL, 4, 128, 900.0) for p in keep)
    fitted = memory.fit(SPEC, SMOL, 128, memory.Declared(frugal - 50, 900.0))
    assert fitted.changes_result and fitted.spec.base in ("bf16", "int8", "nf4")
    assert fitted.plan.endswith(fitted.spec.base)
    # below the smallest plan of all: none
    least = memory.frugal(SPEC, SMOL, 128, memory.Declared(0, 900.0))
    assert least.changes_result and memory.fit(SPEC, SMOL, 128, memory.Declared(least.predicted_mb - 1, 900.0)) is None


def test_plans_never_drop_a_lever_the_run_asked_for_and_only_lora_gets_a_smaller_base():
    asked = dataclasses.replace(SPEC, gradient_checkpointing=True, micro_batch_size=2)
    keep, smaller = memory.candidates(asked, SMOL)
    assert all(p.gradient_checkpointing and 1 <= p.micro_batch_size <= 2 for p in keep)
    full = dataclasses.replace(SMOL, convertible=0)  # a full or sparse structure: its base trains
    assert memory.candidates(SPEC, full)[1] == []
    classifier = dataclasses.replace(SMOL, vocab=0)
    assert all(p.loss_chunk_tokens == 0 for p in memory.candidates(SPEC, classifier)[0])


def test_a_planned_device_computes_the_update_of_one_without_a_budget():
    """Two devices with the same data, one planned into micro-batches, the chunked loss and checkpointing, the
    other as made: the same update up to floating-point summation order."""
    from edgelora.models import load_trainable_state, trainable_state
    from edgelora.training import train_local

    host = _device_host()
    examples = Examples(TEXTS, np.zeros(len(TEXTS), np.int64))
    spec = TrainSpec(local_epochs=3, batch_size=6, lr=1e-2, precision="fp32", seed=3)
    plan = memory.Plan(micro_batch_size=2, loss_chunk_tokens=8, gradient_checkpointing=True)
    deltas = []
    for s in (spec, plan.apply(spec)):
        model, init, _ = host.prepare(LORA)
        load_trainable_state(model, init)
        torch.manual_seed(0)
        train_local(model, examples, host.tokenizer, s, 24, host.torch_device, task=host.task)
        deltas.append({n: v - init[n] for n, v in trainable_state(model).items()})
    for n, d in deltas[0].items():
        err, scale = float(np.abs(deltas[1][n] - d).max()), float(np.abs(d).max())
        assert scale > 0 and err <= 1e-3 * scale, f"{n}: off by {err:.3g} at scale {scale:.3g}"


# -- over gRPC, real processes -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_three_devices_declare_budgets_over_grpc_one_as_made_one_planned_one_refused(tmp_path):
    """tiny-llama at batch 32 x 128 tokens: its 49,152-word logits are predicted at ~2.6 GB over what a device
    holds. Device 0 declares 20 GB and trains the task as made; device 1 declares what it holds + ~1 GB and is
    planned (levers that keep the update); device 2 declares 300 MB, less than any process holds, and is
    refused at Register with the sizes. Every device that trained reports a peak under its budget. Device 1
    runs on jemalloc (--allocator), and says so at Register."""
    from edgelora.launch import Client, Launcher, gone_after

    raw = lm_raw(write_speeches(tmp_path / "s.jsonl"),
                 server={"rounds": 2, "devices_per_round": 2, "min_registered": 2, "plots": False},
                 train={"batch_size": 32})
    raw["model"]["max_seq_len"] = 128
    budgets = {"0": "20000", "1": "1700", "2": "300"}
    with Launcher(tmp_path / "run", verbose=True) as fleet:
        fleet.start_server(raw, args=["--insecure"], log=tmp_path / "server.log", timeout_s=120)
        # device 1 runs on jemalloc (the system's, or Ray's copy): the client starts itself again with it preloaded
        fleet.start_clients(Client(device_id=d, log=tmp_path / f"client_{d}.log",
                                   args=["--insecure", "--quiet", "--give-up-s", "60", "--memory-mb", mb,
                                         *(["--allocator", "jemalloc"] if d == "1" else [])])
                            for d, mb in budgets.items())
        assert fleet.wait_server(300, clients_gone_s=gone_after(raw)) == 0, fleet.server_log_tail()
        codes = fleet.wait_clients(60)
    refused = (tmp_path / "client_2.log").read_text()
    assert codes[2] == 2 and "declares 300 MB" in refused and "predicted to need" in refused, refused[-2000:]
    assert codes[:2] == [0, 0]
    registered = [l for l in (tmp_path / "server.log").read_text().splitlines() if " registered (" in l]
    assert [l.split("device ")[1].split()[0] for l in registered if ", jemalloc" in l] == ["1"], registered
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][1:]
    devices = {d["device_id"]: d for r in rows for d in r["devices"] if d["status"] == "completed"}
    assert set(devices) == {"0", "1"}
    assert devices["0"]["plan"] == "" and devices["0"]["memory_mb"] == 20000
    assert devices["1"]["plan"] not in ("", "plain") and not devices["1"]["plan"].endswith(("nf4", "int8", "bf16"))
    for d in devices.values():
        assert 0 < d["peak_rss_mb"] <= d["memory_mb"], d


def test_register_checks_what_a_device_declares_of_its_memory_and_quantizer(tmp_path):
    """In process: a budget below what the device holds is refused with the sizes, a negative one as invalid,
    and under a quantized base a device without the server's bitsandbytes is refused (its weights would differ);
    a device that fits registers with its figures."""
    from edgelora.frozen_base import quantizer_version
    from edgelora.protos.refusals import Refusal, UpdateRejected
    from edgelora.server.coordinator import Coordinator
    from edgelora.server.registry import Capacity

    run = load_config(lm_raw(write_speeches(tmp_path / "s.jsonl"), train={"base": "nf4"}))
    coord = Coordinator(run, tmp_path / "run")
    fps = (coord.model_fingerprint, coord.tokenizer_fingerprint)
    ours = {"bitsandbytes": quantizer_version()}
    with pytest.raises(UpdateRejected, match="bitsandbytes \\(not installed\\), the server with") as e:
        coord.register("0", "test", {}, *fps)
    assert e.value.code == Refusal.PRECONDITION
    with pytest.raises(UpdateRejected, match="declares 200 MB and holds 400 MB already.*predicted to need") as e:
        coord.register("0", "test", ours, *fps, capacity=Capacity(memory_mb=200, resident_mb=400))
    assert e.value.code == Refusal.PRECONDITION and "0" not in coord.registry
    with pytest.raises(UpdateRejected, match="memory_mb = -1: must be >= 0 MB") as e:
        coord.register("0", "test", ours, *fps, capacity=Capacity(memory_mb=-1))
    assert e.value.code == Refusal.INVALID
    coord.register("0", "test", ours, *fps, capacity=Capacity(memory_mb=4000, resident_mb=400, accelerator="cpu"))
    info = coord.declared_device("0")
    assert (info.memory_mb, info.resident_mb) == (4000, 400)
