"""A device's memory levers change where memory goes, not what is learned: micro-batches (gradient
accumulation) and the chunked causal-LM loss give the whole batch's loss and gradients up to floating-point
summation order, on a classifier (tiny-bert) and a causal LM (tiny-llama, LoRA, instruction-style labels with
prompt positions masked), and they reach the device through the task."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from edgelora.config import ModelConfig, load_config
from edgelora.configtools import ConfigError
from edgelora.data import Examples
from edgelora.models import load_base_model, load_tokenizer
from edgelora.task_types import task_type
from edgelora.task_types.causal_lm import IGNORE, chunked_lm_loss
from edgelora.tasks import Stage, TrainSpec
from edgelora.training import train_local

from .conftest import tiny_raw
from .test_lm import lm_raw, write_speeches

TEXTS = ("the first speech is long enough to fill the window", "a short one", "and a third, of middling length here",
         "four", "five words of plain text", "six is the last of them, and it runs on a little")


def _lora_llama():
    from edgelora.models import build_model
    from edgelora.tasks import LoraSpec, Structure, StructureKind

    torch.manual_seed(0)
    lora = LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj", "up_proj"), modules_to_save=())
    return build_model(load_base_model(ModelConfig(task="causal-lm", name="tiny-llama")),
                       Structure(kind=StructureKind.LORA, lora=lora))


def _lm_batch():
    tok = load_tokenizer("tiny-llama", "causal-lm")
    (inputs, labels), = task_type("causal-lm").batches(Examples(TEXTS, np.zeros(len(TEXTS), np.int64)), tok, 24,
                                                       len(TEXTS))
    labels = labels.clone()
    labels[0, :5] = IGNORE  # a prompt, as instruction data masks it
    labels[3, :] = IGNORE   # a row with no target at all
    return inputs, labels


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Equal up to float32 summation order: within 1e-4 of the tensor's largest entry (a lost or doubled term
    is off by percents)."""
    err, scale = float((got - want).abs().max()), float(want.abs().max())
    assert err <= 1e-4 * scale + 1e-12, f"{what}: off by {err:.3g} at scale {scale:.3g}"


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("chunk", [1, 7, 10_000])
def test_the_chunked_lm_loss_is_the_models_loss_and_gradients(chunk):
    inputs, labels = _lm_batch()
    model = _lora_llama()
    model.train()
    full = model(**inputs, labels=labels).loss
    full.backward()
    want = _grads(model)
    model.zero_grad(set_to_none=True)
    got = chunked_lm_loss(model, inputs, labels, chunk)
    got.backward()
    assert float(got.detach()) == pytest.approx(float(full.detach()), rel=1e-6)
    for n, g in _grads(model).items():
        _close(g, want[n], n)


def test_a_batch_without_a_target_token_has_a_zero_chunked_loss():
    inputs, labels = _lm_batch()
    model = _lora_llama()
    loss = chunked_lm_loss(model, inputs, torch.full_like(labels, IGNORE), 4)
    loss.backward()
    assert float(loss.detach()) == 0.0 and loss.requires_grad


def _train(model, examples, tok, task, **spec):
    base = dict(local_epochs=1, batch_size=len(examples), lr=1e-2, optimizer="sgd", momentum=0.0, seed=3)
    loss = train_local(model, examples, tok, TrainSpec(**{**base, **spec}), 24, torch.device("cpu"), task=task)
    return loss, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("levers", [{"micro_batch_size": 1}, {"micro_batch_size": 4},
                                    {"loss_chunk_tokens": 5}, {"micro_batch_size": 2, "loss_chunk_tokens": 3}])
def test_a_causal_lm_step_with_memory_levers_is_the_whole_batch_step(levers):
    """One SGD step on 6 speeches (the first a prompt-masked row): with micro-batches (1 row a pass; 4 + 2),
    the chunked loss, or both, the loss and every LoRA weight after the step are the plain step's up to
    float summation order."""
    tok = load_tokenizer("tiny-llama", "causal-lm")
    examples = Examples(TEXTS, np.zeros(len(TEXTS), np.int64))
    model = _lora_llama()
    twin = copy.deepcopy(model)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    plain_loss, plain = _train(model, examples, tok, "causal-lm")
    loss, after = _train(twin, examples, tok, "causal-lm", **levers)
    assert loss == pytest.approx(plain_loss, rel=1e-6)
    for n, w in after.items():
        _close(w - start[n], plain[n] - start[n], n)  # the update itself, not the weights it lands on
    assert any(not torch.equal(plain[n], start[n]) for n in plain), "the step changed nothing"


def test_a_classifier_step_in_micro_batches_is_the_whole_batch_step():
    """tiny-bert LoRA with its head, 6 examples as 4 + 2: the mean loss over examples weighted back together."""
    from edgelora.models import build_model
    from edgelora.tasks import LoraSpec, Structure, StructureKind

    cfg = ModelConfig(name="tiny-bert", num_labels=3, max_seq_len=24)
    tok = load_tokenizer("tiny-bert")
    examples = Examples(TEXTS, np.array([0, 1, 2, 0, 1, 2], np.int64))
    base = load_base_model(cfg)
    structure = Structure(kind=StructureKind.LORA, lora=LoraSpec(rank=4, alpha=8.0, modules_to_save=("classifier",)))
    a = build_model(base, structure)
    b = copy.deepcopy(a)
    start = {n: p.detach().clone() for n, p in a.named_parameters() if p.requires_grad}
    for m in [*a.modules(), *b.modules()]:  # passes draw dropout masks in another order: the same distribution,
        if isinstance(m, torch.nn.Dropout):  # not the same draws, so equality holds without dropout
            m.p = 0.0
    plain_loss, plain = _train(a, examples, tok, "classification")
    loss, after = _train(b, examples, tok, "classification", micro_batch_size=4)
    assert loss == pytest.approx(plain_loss, rel=1e-6)
    for n, w in after.items():
        _close(w - start[n], plain[n] - start[n], n)


def test_the_levers_travel_in_the_task_and_bad_values_are_refused(tmp_path):
    from edgelora.methods import make_method
    from edgelora.state import ServerState
    from protos import edgelora_pb2 as pb
    from protos import serde

    with pytest.raises(ConfigError, match="train.loss_chunk_tokens: a classifier has one logit per class"):
        load_config(tiny_raw(train={"loss_chunk_tokens": 64}))
    run = load_config(lm_raw(write_speeches(tmp_path / "s.jsonl"), train={"micro_batch_size": 2,
                                                                          "loss_chunk_tokens": 64}))
    spec = make_method(run).train_spec(ServerState(round=0, stage=Stage.DENSE, stage_start=1, params={}))
    assert (spec.micro_batch_size, spec.loss_chunk_tokens) == (2, 64)
    wire = serde.train_to_proto(spec).SerializeToString()
    assert serde.train_from_proto(pb.TrainSpec.FromString(wire)) == spec
    for field in ("micro_batch_size", "loss_chunk_tokens"):
        with pytest.raises(ConfigError, match=f"train.{field}"):
            load_config(tiny_raw(train={field: -1}))


def test_the_device_memory_benchmark_runs_each_lever_and_agrees_on_the_loss():
    """benchmarks.lm_device's child, in process on tiny-llama: plain, micro-batches + chunked loss, checkpointing
    and handing freed pages back train the same batch to the same loss, and each step's peak is recorded; a
    setting it cannot read is refused by name."""
    import argparse

    from benchmarks import lm_device

    def child(setting):
        p = lm_device.parse_setting(setting)
        return lm_device.child(argparse.Namespace(model="tiny-llama", seq_len=32, rank=4, batch=4, steps=3,
                                                  precision=p["precision"], micro_batch=p["micro_batch"],
                                                  chunk=p["chunk"], gradient_checkpointing=p["gc"],
                                                  copy_base=p["copy"], base=p["base"], budget=p["budget"],
                                                  release=p["release"]))

    plain, levers, gc = child("fp32+copy"), child("fp32+mb1+chunk16"), child("fp32+gc")
    released = child("fp32+release")
    assert released["release_each_step"] and released["released_mb"] > 0 and plain["released_mb"] is None
    assert released["loss_after"] == pytest.approx(plain["loss_after"], rel=1e-4)
    for r in (plain, released):  # each step's own peak, none above the whole life's
        assert len(r["step_peaks_mb"]) == 3 and 0 < max(r["step_peaks_mb"]) <= r["peak_rss_mb"]
    assert plain["base_copied"] and not levers["base_copied"] and plain["build_s"] > 0
    assert (levers["micro_batch"], levers["effective_batch"], levers["chunked_loss"]) == (1, 4, 16)
    assert levers["loss_after"] == pytest.approx(plain["loss_after"], rel=1e-4)
    assert gc["loss_after"] == pytest.approx(plain["loss_after"], rel=1e-4) and gc["gradient_checkpointing"]
    for bad in ("fp16", "fp32+mb", "fp32+fast"):
        with pytest.raises(SystemExit, match="--settings"):
            lm_device.parse_setting(bad)
    refused = {"setting": "fp32+budget1", **child("fp32+budget1")}  # no plan fits 1 MB
    assert refused["plan"] == "refused" and refused["predicted_mb"] > 1
    rows = lm_device.table([refused, {"setting": "fp32+copy", **plain}, {"setting": "fp32+gc", **gc}]).splitlines()
    assert rows[0] == "against the first setting, fp32+copy:" and rows[2].split()[:2] == ["fp32+budget1", "refused"]
    assert rows[4].split()[0] == "fp32+gc" and len(rows) == 5
    assert lm_device.table([refused]).splitlines()[1].split()[:2] == ["fp32+budget1", "refused"]  # none trained


def test_a_devices_lora_model_holds_the_base_weights_once_and_never_writes_them():
    """DeviceHost builds LoRA over the base's own weight tensors (no second copy), trains without touching
    them, and a later full-weight structure (SLoRA's Stage 1 before, here after) still trains a copy."""
    from edge_client.trainer import DeviceHost

    from edgelora.tasks import LoraSpec, Structure, StructureKind

    host = DeviceHost(ModelConfig(task="causal-lm", name="tiny-llama", max_seq_len=24))
    before = {n: p.detach().clone() for n, p in host.base.named_parameters()}
    lora = host.build(Structure(kind=StructureKind.LORA, lora=LoraSpec(rank=4, alpha=8.0, modules_to_save=())))
    base_ptrs = {p.data_ptr() for p in host.base.parameters()}
    frozen = [p for n, p in lora.named_parameters() if not p.requires_grad]
    assert frozen and all(p.data_ptr() in base_ptrs for p in frozen)
    assert not any(p.data_ptr() in base_ptrs for p in lora.parameters() if p.requires_grad)
    examples = Examples(TEXTS, np.zeros(len(TEXTS), np.int64))
    _train(lora, examples, host.tokenizer, "causal-lm")
    full = host.build(Structure(kind=StructureKind.FULL))
    assert not any(p.data_ptr() in base_ptrs for p in full.parameters() if p.requires_grad)
    _train(full, examples, host.tokenizer, "causal-lm")
    for n, p in host.base.named_parameters():
        assert torch.equal(p, before[n]), n


def test_the_allocator_lever_preloads_jemalloc_once_and_says_why_it_cannot(tmp_path, monkeypatch, capsys):
    """`edgelora client --allocator jemalloc` starts itself again with jemalloc first in LD_PRELOAD (what was
    preloaded stays after it); a library that is not there, a restart the preload did not take in, and a name
    it does not know are each one line, exit 2. (The restart itself runs in test_memory_plans' gRPC test.)"""
    from edgelora.cli import main
    from edgelora.edge_client import allocator

    assert allocator.in_use() == "system"  # pytest's own process: glibc's malloc
    env = allocator.preloaded({"LD_PRELOAD": "libother.so", "X": "1"}, "/lib/libjemalloc.so.2")
    assert env["LD_PRELOAD"] == "/lib/libjemalloc.so.2:libother.so" and env["X"] == "1"
    assert allocator.preloaded({}, "libjemalloc.so.2")["LD_PRELOAD"] == "libjemalloc.so.2"
    lib = tmp_path / "libjemalloc.so.2"
    lib.write_bytes(b"")
    assert allocator.jemalloc_path({"EDGELORA_JEMALLOC": str(lib)}) == str(lib)
    with pytest.raises(allocator.AllocatorError, match="EDGELORA_JEMALLOC='/nowhere.so': no such file"):
        allocator.jemalloc_path({"EDGELORA_JEMALLOC": "/nowhere.so"})
    allocator.restart_under("system", ["client"])  # nothing to do: this process goes on
    with pytest.raises(allocator.AllocatorError, match="unknown 'tcmalloc'"):
        allocator.restart_under("tcmalloc", [])

    argv = ["client", "--allocator", "jemalloc", "--server", "127.0.0.1:1", "--device-id", "0"]
    monkeypatch.setenv("EDGELORA_JEMALLOC", "/nowhere.so")
    assert main(argv) == 2
    assert "edgelora client: EDGELORA_JEMALLOC='/nowhere.so': no such file" in capsys.readouterr().err
    monkeypatch.delenv("EDGELORA_JEMALLOC")
    monkeypatch.setattr(allocator, "jemalloc_path", lambda env=None: None)
    assert main(argv) == 2
    assert "no jemalloc library found (Debian/Ubuntu: apt install libjemalloc2" in capsys.readouterr().err
    monkeypatch.setenv("EDGELORA_ALLOCATOR_RESTARTED", "1")  # as if restarted, and still on glibc
    assert main(argv) == 2
    assert "the process does not run on it" in capsys.readouterr().err
