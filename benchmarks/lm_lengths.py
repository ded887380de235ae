"""Shakespeare speech lengths in SmolLM2 tokens (+ EOS): what model.max_seq_len cuts, for C7's sizing.

    python -m benchmarks.lm_lengths [--path ../shared/datasets/shakespeare/shakespeare.jsonl.gz]

Prints the count, median, 95th percentile and the share longer than 32, 64 and 128 tokens. Asserts nothing.
"""
from __future__ import annotations

import argparse
import gzip
import json
import statistics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", default="../shared/datasets/shakespeare/shakespeare.jsonl.gz")
    ap.add_argument("--model", default="smollm2")
    args = ap.parse_args()
    from edgelora.models import load_tokenizer

    tok = load_tokenizer(args.model, "causal-lm")
    with gzip.open(args.path, "rt") as f:
        lengths = sorted(len(tok(json.loads(line)["text"])["input_ids"]) + 1 for line in f)
    n = len(lengths)
    longer = ", ".join(f"> {k}: {sum(x > k for x in lengths) / n:.1%}" for k in (32, 64, 128))
    print(f"{n} speeches: median {statistics.median(lengths):g} tokens, 95th percentile {lengths[int(0.95 * n)]}, "
          f"{longer}")


if __name__ == "__main__":
    main()
