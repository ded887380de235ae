"""Sequence classification: a fresh, seeded head on a pretrained encoder, scored by accuracy."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..configtools import check
from ..hub import from_pretrained
from ..precision import autocast
from .base import Scores, TaskType, freeze, n_batches


class Classification(TaskType):
    name = "classification"
    head_modules = ("classifier",)
    presets = ("minilm", "tiny-bert")

    def tokenizer_source(self, name: str) -> str:
        # tiny-bert borrows MiniLM's WordPiece vocabulary: no download, and real tokenisation in tests.
        return "minilm" if name == "tiny-bert" else name

    def load_base_model(self, cfg) -> nn.Module:
        from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification
        from transformers.utils import logging as hf_logging

        torch.manual_seed(cfg.head_seed)  # the classifier head is freshly initialised: seed it identically everywhere
        if cfg.name == "tiny-bert":
            tok = self.load_tokenizer(cfg.name)
            conf = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=64, max_position_embeddings=512, num_labels=cfg.num_labels)
            model = BertForSequenceClassification(conf)
        else:
            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected: we seed it
            try:
                model = from_pretrained(AutoModelForSequenceClassification, cfg.name, num_labels=cfg.num_labels)
            finally:
                hf_logging.set_verbosity(verbosity)
        model.config.pad_token_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        return freeze(model)

    def check_data(self, run) -> None:
        d = run.data
        check(d.mode == "partitions" or bool(d.label_names), "data.label_names",
              "data.mode = own needs the run's classes listed in order: devices map their own labels to them")
        check(run.train.loss_chunk_tokens == 0, "train.loss_chunk_tokens",
              "a classifier has one logit per class, nothing to chunk: it is for model.task = causal-lm")

    def batches(self, examples, tokenizer, max_len, batch_size, order=None):
        idx = np.arange(len(examples)) if order is None else order
        for s in range(0, len(idx), batch_size):
            sel = idx[s:s + batch_size]
            enc = tokenizer([examples.texts[i] for i in sel], truncation=True, max_length=max_len,
                            padding=True, return_tensors="pt")
            yield enc, torch.from_numpy(examples.labels[sel])

    @torch.no_grad()
    def evaluate(self, model, examples, tokenizer, max_len, device, batch_size=None, progress=None,
                 precision="fp32", exact_match_examples: int = 0) -> Scores:
        """Accuracy and mean cross-entropy (logits in fp32 whatever the autocast precision); a classifier
        generates nothing, so exact_match_examples does not apply."""
        batch_size = batch_size or self.eval_batch_size
        model.eval()
        correct, loss_sum = 0, 0.0
        for enc, labels in tqdm(self.batches(examples, tokenizer, max_len, batch_size),
                                total=n_batches(len(examples), batch_size), desc=progress or "eval", leave=False,
                                disable=progress is None, unit="batch"):
            with autocast(precision, device):
                logits = model(**{k: v.to(device) for k, v in enc.items()}).logits
            logits = logits.float().cpu()
            loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(-1) == labels).sum())
        n = max(len(examples), 1)
        return Scores(correct / n, loss_sum / n)
