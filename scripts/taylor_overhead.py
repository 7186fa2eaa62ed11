"""Extra time per training step of ``score: taylor`` (accumulating |W * grad| after each backward pass).

    python scripts/taylor_overhead.py [--model sentence-transformers/all-MiniLM-L6-v2] [--threads 1] [--rounds 20]

Times, on one batch of 32 x 64 tokens, a training step (forward, backward, AdamW step) and the pruner's
``mask_gradients()`` with score l2 (masking only) and taylor (masking + the moving average), interleaved, and
prints the medians and the taylor share of a step. Writes JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--json")
    args = p.parse_args()
    import torch
    from transformers import AutoModelForSequenceClassification

    from sparsify.machine import cpu_info
    from sparsify.techniques.pruning import BlockPruner, PruningConfig

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
    ids = torch.randint(1000, 20000, (32, 64))
    labels = torch.randint(0, 2, (32,))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    pruners = {}
    for score in ("l2", "taylor"):
        pr = BlockPruner(PruningConfig(block="4x1", final_sparsity=0.9, start_step=10, end_step=1000, score=score))
        pr.prepare(model, total_steps=1000)
        pr.steps_done = 100  # inside the scoring window
        pruners[score] = pr
    times = {"step": [], "l2": [], "taylor": []}
    for r in range(args.rounds + 2):
        t0 = time.perf_counter()
        model(input_ids=ids, labels=labels).loss.backward()
        t1 = time.perf_counter()
        spent = {}
        for score in (("l2", "taylor") if r % 2 else ("taylor", "l2")):
            s = time.perf_counter()
            pruners[score].mask_gradients()
            spent[score] = time.perf_counter() - s
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad()
        t3 = time.perf_counter()
        if r >= 2:  # warm-up
            times["step"].append((t1 - t0) + (t3 - t2))
            for k, v in spent.items():
                times[k].append(v)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    result = {"model": args.model, "threads": args.threads, "rounds": args.rounds, "batch": [32, 64],
              "median_ms": med, "taylor_extra_ms": med["taylor"] - med["l2"],
              "taylor_extra_share_of_step": (med["taylor"] - med["l2"]) / (med["step"] + med["l2"]),
              "cpu": cpu_info()}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
