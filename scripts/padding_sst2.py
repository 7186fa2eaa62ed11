"""Tokens per training step with random and with length-grouped batches (``training.group_by_length``) on the SST-2
training split: what dynamic padding pads each batch to (its longest sentence x its size), from the trainer's own
sampler. A measurement of the data, not of a machine: the result is the same everywhere.

    python scripts/padding_sst2.py [--model runs/sst2/minilm-l6-dense] [--groups 0,8,50] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2", help="tokenizer to count with")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--groups", default="0,8,50", help="group_by_length values (0: random batches)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--json", help="write the record here")
    args = p.parse_args(argv)

    from datasets import load_dataset
    from transformers import AutoTokenizer

    from sparsify.train import EpochSampler

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    sentences = list(load_dataset("nyu-mll/glue", "sst2", split="train")["sentence"])
    lengths = [len(ids) for ids in tokenizer(sentences, truncation=True, max_length=args.max_length)["input_ids"]]
    b = args.batch_size
    rows = []
    for group in (int(g) for g in args.groups.split(",")):
        sampler = EpochSampler(len(lengths), args.seed, lengths=lengths, batch_size=b, group=group)
        order = list(sampler)
        padded = [max(lengths[i] for i in order[a:a + b]) * len(order[a:a + b]) for a in range(0, len(order), b)]
        rows.append({"group_by_length": group, "padded_tokens_per_batch": statistics.mean(padded)})
    real = sum(lengths) / (len(lengths) / b)
    base = rows[0]["padded_tokens_per_batch"] if rows and rows[0]["group_by_length"] == 0 else None
    for row in rows:
        row["real_tokens_per_batch"] = real
        row["padding_share"] = 1 - real / row["padded_tokens_per_batch"]
        if base is not None:
            row["fewer_tokens_than_random"] = base / row["padded_tokens_per_batch"]
        print(json.dumps(row))
    record = {"command": "python scripts/padding_sst2.py " + " ".join(argv or []), "tokenizer": args.model,
              "examples": len(lengths), "batch_size": b, "max_length": args.max_length, "seed": args.seed,
              "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
