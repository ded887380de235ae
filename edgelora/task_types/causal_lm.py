"""Causal language modelling: next-token prediction on text, and instruction tuning with a chat template.

Plain text: each example is tokenised (with the tokenizer's end-of-sequence token appended) and cut to
model.max_seq_len; every real token is a target. Instruction data: the prompt (the conversation before the
answer) and the response are rendered with the tokenizer's chat template and the loss covers the response
tokens only, prompt positions masked with -100 (as trl's SFTTrainer's completion-only loss). Padding never
counts, in the loss or in the metrics. Scored by mean token NLL, its perplexity and next-token accuracy
(FLASC's next-token metric), plus, for instruction data, the exact-match rate of greedy answers.
"""
from __future__ import annotations

import math
import re

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..configtools import check
from ..hub import from_pretrained
from ..precision import autocast
from ..smollm2 import model_dir, tokenizer_dir
from .base import Scores, TaskType, freeze, n_batches

IGNORE = -100
# Embeddings and the (usually tied) output projection: frozen unless model.train_embeddings asks.
EMBEDDINGS = ("embed_tokens", "lm_head", "wte", "wpe", "embed_positions", "embed_in", "embed_out")
# Without a chat template (GPT-2 and other base models) instruction data is rendered this way.
PLAIN_TEMPLATE_ROLE = "### {role}:\n{content}\n\n"
PLAIN_TEMPLATE_ANSWER = "### Assistant:\n"
# Seeds which held-out examples exact match and samples.md look at (spread_indices). A constant, not
# server.seed: runs of different seeds and methods are scored on the same examples, and every place that
# evaluates (simulator, gRPC server, centralized run, `edgelora evaluate`) draws them alike.
SPREAD_SEED = 0x5EED


class CausalLM(TaskType):
    name = "causal-lm"
    head_modules = ()
    presets = ("smollm2", "tiny-llama")
    eval_batch_size = 8     # logits are batch x tokens x vocabulary (49,152 for SmolLM2)
    scores_round0 = True
    table_metrics = (("ppl", "perplexity", ".3f"), ("tok acc", "accuracy", ".4f"))

    def tokenizer_source(self, name: str) -> str:
        if name in ("smollm2", "tiny-llama"):  # tiny-llama borrows SmolLM2's tokenizer and chat template
            return str(tokenizer_dir())
        return name

    def load_base_model(self, cfg) -> nn.Module:
        from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
        from transformers.utils import logging as hf_logging

        torch.manual_seed(cfg.head_seed)  # tiny-llama's random weights: identical on every machine
        tok = self.load_tokenizer(cfg.name)
        if cfg.name == "tiny-llama":
            conf = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               num_key_value_heads=1, intermediate_size=64, max_position_embeddings=512,
                               tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                               eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
            model = LlamaForCausalLM(conf)
        else:
            name = cfg.name
            if name == "smollm2":
                name = str(model_dir())
            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()
            try:
                model = from_pretrained(AutoModelForCausalLM, name, dtype=torch.float32)
            finally:
                hf_logging.set_verbosity(verbosity)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tok.pad_token_id
        return freeze(model)

    def frozen_modules(self, cfg) -> tuple[str, ...]:
        return () if cfg.train_embeddings else EMBEDDINGS

    def check_data(self, run) -> None:
        d = run.data
        # own: no partitions. A label-skewed one reads each row's class from data.label_column (edgelora.data)
        check(d.mode == "own" or d.partition in ("iid", "natural") or bool(d.label_column), "data.label_column",
              f"data.partition = {d.partition} splits by class, and a causal-lm run takes each row's class from "
              f"data.label_column: name the class column, or use iid or natural (a device per value of "
              f"data.partition_column)")
        check(bool(d.prompt_column) == bool(d.response_column), "data.response_column",
              "instruction data needs both data.prompt_column and data.response_column (or data.messages_column)")
        check(not (d.messages_column and d.prompt_column), "data.messages_column",
              "give either data.messages_column or data.prompt_column/response_column, not both")

    def scores_exact_match(self, run) -> bool:
        """Instruction data (a prompt to answer) with server.exact_match_examples > 0: see evaluate."""
        return bool(run.server.exact_match_examples and (run.data.prompt_column or run.data.messages_column))

    # -- batches ----------------------------------------------------------------------------------------------
    def encode(self, examples, i: int, tokenizer, max_len: int) -> tuple[list[int], list[int]]:
        """(input ids, labels) of example i: labels are the ids, with prompt positions set to -100."""
        if examples.prompts is None:
            ids = tokenizer(examples.texts[i] + (tokenizer.eos_token or ""), truncation=True,
                            max_length=max_len).input_ids
            return ids, list(ids)
        prefix, full = render(tokenizer, examples.prompts[i], examples.texts[i])
        p_ids = tokenizer(prefix, add_special_tokens=False).input_ids
        f_ids = tokenizer(full, add_special_tokens=False).input_ids
        if f_ids[:len(p_ids)] != p_ids:  # the template's join re-tokenised differently: cut by text instead
            p_ids = f_ids[:len(tokenizer(prefix, add_special_tokens=False).input_ids)]
        r_ids = f_ids[len(p_ids):]
        if len(f_ids) > max_len:  # keep the end of the prompt (nearest the answer) and the start of the answer
            room = max(max_len - len(r_ids), max_len // 2)
            p_ids = p_ids[-room:] if room > 0 else []
            r_ids = r_ids[:max_len - len(p_ids)]
        return p_ids + r_ids, [IGNORE] * len(p_ids) + r_ids

    def batches(self, examples, tokenizer, max_len, batch_size, order=None):
        idx = np.arange(len(examples)) if order is None else order
        pad = pad_id(tokenizer)
        for s in range(0, len(idx), batch_size):
            rows = [self.encode(examples, int(i), tokenizer, max_len) for i in idx[s:s + batch_size]]
            width = max(len(ids) for ids, _ in rows)
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
            labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, (ids, lab) in enumerate(rows):
                input_ids[r, :len(ids)] = torch.tensor(ids)
                labels[r, :len(lab)] = torch.tensor(lab)
                mask[r, :len(ids)] = 1
            yield {"input_ids": input_ids, "attention_mask": mask}, labels

    # -- the training loss --------------------------------------------------------------------------------------
    def loss(self, model, inputs, labels, loss_chunk_tokens: int = 0):
        if not loss_chunk_tokens:
            return super().loss(model, inputs, labels)
        return chunked_lm_loss(model, inputs, labels, loss_chunk_tokens)

    def loss_terms(self, labels) -> int:
        """Target tokens: every position after the first whose label is not -100 (the model's loss shifts)."""
        return int((labels[:, 1:] != IGNORE).sum())

    # -- scores -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model, examples, tokenizer, max_len, device, batch_size=None, progress=None,
                 precision="fp32", exact_match_examples: int = 0) -> Scores:
        """Mean NLL over every target token, its exp (perplexity), next-token accuracy; for instruction data
        also the exact-match rate of greedy answers on `exact_match_examples` examples (spread_indices)."""
        batch_size = batch_size or self.eval_batch_size
        model.eval()
        nll, correct, tokens = 0.0, 0, 0
        for enc, labels in tqdm(self.batches(examples, tokenizer, max_len, batch_size),
                                total=n_batches(len(examples), batch_size), desc=progress or "eval", leave=False,
                                disable=progress is None, unit="batch"):
            with autocast(precision, device):
                logits = model(**{k: v.to(device) for k, v in enc.items()}).logits
            logits, target = logits[:, :-1].float().cpu(), labels[:, 1:]
            keep = target != IGNORE
            nll += float(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                     ignore_index=IGNORE, reduction="sum"))
            correct += int(((logits.argmax(-1) == target) & keep).sum())
            tokens += int(keep.sum())
        if not tokens:
            return Scores(float("nan"), float("nan"), float("nan"))
        loss = nll / tokens
        exact = None
        if examples.prompts is not None and exact_match_examples:
            exact = self.exact_match(model, examples, tokenizer, max_len, device, exact_match_examples)
        return Scores(correct / tokens, loss, math.exp(min(loss, 700.0)), exact)

    def samples(self, model, base, examples, tokenizer, max_len, device, n: int, new_tokens: int) -> list[dict]:
        return samples(model, base, examples, tokenizer, max_len, device, n, new_tokens)

    def exact_match(self, model, examples, tokenizer, max_len, device, n: int) -> float:
        """Share of n examples spread over the split (spread_indices) whose greedy answer equals the reference
        (whitespace and case aside)."""
        idx = spread_indices(len(examples), n)
        refs = [examples.texts[i] for i in idx]
        budget = max(len(tokenizer(r, add_special_tokens=False).input_ids) for r in refs) + 4
        prompts = [prompt_ids(examples, i, tokenizer, max_len) for i in idx]
        answers = greedy(model, tokenizer, prompts, budget, device)
        return sum(normalise(a) == normalise(r) for a, r in zip(answers, refs)) / len(idx)


def chunked_lm_loss(model, inputs: dict, labels: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """The causal-LM loss (mean next-token cross-entropy over target tokens, in float32, as the model's own)
    without full logits: the decoder's hidden states of the target positions go through the output layer
    `chunk_tokens` at a time, each chunk under activation checkpointing, so only one chunk's logits (and, in the
    backward pass, their gradient) exist at once: chunk x vocabulary floats instead of batch x sequence x
    vocabulary. The same loss and gradients as the model's up to floating-point summation order (tested)."""
    from torch.utils.checkpoint import checkpoint

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(inner.config, "final_logit_softcapping", None) or getattr(inner.config, "logit_scale", None):
        raise ValueError(f"train.loss_chunk_tokens: {type(inner).__name__} transforms its logits after the output "
                         f"layer; train it with loss_chunk_tokens = 0")
    hidden = inner.get_decoder()(**inputs).last_hidden_state
    target = labels[:, 1:].to(hidden.device)
    keep = target != IGNORE
    h, t = hidden[:, :-1][keep], target[keep]
    if not len(t):
        return hidden.sum() * 0.0  # no target token: a zero loss that still reaches the graph
    head = inner.get_output_embeddings()
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, len(t), chunk_tokens):
        total = total + checkpoint(_chunk_nll, head, h[s:s + chunk_tokens], t[s:s + chunk_tokens],
                                   use_reentrant=False)
    return total / len(t)


def _chunk_nll(head, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(head(h).float(), t, reduction="sum")


def spread_indices(n_examples: int, n: int) -> np.ndarray:
    """Indices of min(n, n_examples) examples drawn across the whole split: one seeded pick (SPREAD_SEED) in
    each of n equal stretches, in order. The first n examples of a file sorted by class would cover only its
    first classes; stretches give every part of the file its share, whatever the order, and the same draw
    on every machine and run."""
    n = min(n, n_examples)
    bounds = np.arange(n + 1) * n_examples // n if n else np.zeros(1, np.int64)
    rng = np.random.default_rng(SPREAD_SEED)
    return np.asarray([rng.integers(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])], np.int64)


# -- rendering, generation ----------------------------------------------------------------------------------------
def render(tokenizer, history, response: str) -> tuple[str, str]:
    """(prompt text, prompt + response text): the tokenizer's chat template, or a plain one without it."""
    messages = [{"role": role, "content": content} for role, content in history]
    if getattr(tokenizer, "chat_template", None):
        prefix = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)
        return prefix, full
    prefix = "".join(PLAIN_TEMPLATE_ROLE.format(role=r.capitalize(), content=c) for r, c in history)
    prefix += PLAIN_TEMPLATE_ANSWER
    return prefix, prefix + response + (tokenizer.eos_token or "")


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def prompt_ids(examples, i: int, tokenizer, max_len: int, text_tokens: int = 12) -> list[int]:
    """What a generation starts from: the rendered prompt (instruction data), or the text's first
    `text_tokens` tokens, at most half of it (a short text still leaves a continuation to make)."""
    if examples.prompts is not None:
        prefix, _ = render(tokenizer, examples.prompts[i], "")
        return tokenizer(prefix, add_special_tokens=False).input_ids[-max_len:]
    ids = _text_ids(examples, i, tokenizer, max_len)
    return ids[:_text_cut(len(ids), text_tokens)]


def _text_ids(examples, i: int, tokenizer, max_len: int) -> list[int]:
    return tokenizer(examples.texts[i], truncation=True, max_length=max_len).input_ids


def _text_cut(n_tokens: int, text_tokens: int = 12) -> int:
    return min(text_tokens, max(1, n_tokens // 2))


def reference_text(examples, i: int, tokenizer, max_len: int) -> str:
    """What the held-out example really says after its prompt: the response, or the rest of the text."""
    if examples.prompts is not None:
        return examples.texts[i]
    ids = _text_ids(examples, i, tokenizer, max_len)
    return tokenizer.decode(ids[_text_cut(len(ids)):], skip_special_tokens=True)


@torch.no_grad()
def greedy(model, tokenizer, prompts: list[list[int]], new_tokens: int, device, batch_size: int = 8) -> list[str]:
    """Greedy continuations (decoded, special tokens dropped) of token-id prompts, left-padded in batches."""
    from transformers import GenerationConfig

    model.eval()
    pad = pad_id(tokenizer)
    gen = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad,
                           eos_token_id=tokenizer.eos_token_id)
    out: list[str] = []
    for s in range(0, len(prompts), batch_size):
        rows = prompts[s:s + batch_size]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long, device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long, device=device)
        seqs = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
        out += [tokenizer.decode(q[width:], skip_special_tokens=True) for q in seqs.cpu()]
    return out


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def samples(model, base, examples, tokenizer, max_len: int, device, n: int, new_tokens: int) -> list[dict]:
    """The prompts of n held-out examples spread over the split (spread_indices) with the base model's and
    `model`'s greedy continuations."""
    idx = spread_indices(len(examples), n)
    prompts = [prompt_ids(examples, i, tokenizer, max_len) for i in idx]
    before = greedy(base, tokenizer, prompts, new_tokens, device)
    after = greedy(model, tokenizer, prompts, new_tokens, device)
    return [{"prompt": tokenizer.decode(p, skip_special_tokens=examples.prompts is None),
             "reference": reference_text(examples, i, tokenizer, max_len),
             "base": b, "final": a} for i, p, b, a in zip(idx, prompts, before, after)]
