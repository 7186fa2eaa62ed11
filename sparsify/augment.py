"""Augmentation for distillation (TinyBERT-style): noisy, unlabelled copies of the tokenized training examples.

    train = augment_examples(data.train, tokenizer, model.get_input_embeddings().weight, recipe.data.augment, seed=42)

A copy keeps its example's length band and sentence pairs: it works on the token ids, a word being a WordPiece
token and the ``##`` pieces after it. Each alphabetic word of a copy is, independently, replaced by one of its
nearest words (cosine of the input word embeddings, among the single-token alphabetic words of the vocabulary),
masked (all its pieces become one mask token), or kept. Special tokens and punctuation are never touched. Copies
carry the label :data:`IGNORE` (the teacher labels them through distillation) and ``idx`` values after the
originals'. The draw depends only on the seed, so a resumed run sees the same copies.
"""

from __future__ import annotations

import numpy as np
import torch

from sparsify.errors import SparsifyError

IGNORE = -100  # the label of an example without one (the task loss skips it)


def _word_starts(tokens: list[str], prefix: str) -> np.ndarray:
    return np.array([not t.startswith(prefix) for t in tokens], dtype=bool)


def wordpiece_prefix(tokenizer) -> str:
    """The continuation prefix (``##``) of a WordPiece tokenizer with a mask token; any other is refused (one error
    line): words are read from the continuation pieces."""
    backend = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    wordpiece = getattr(tokenizer, "wordpiece_tokenizer", None)  # a slow BertTokenizer
    if type(backend).__name__ == "WordPiece":
        prefix = backend.continuing_subword_prefix
    elif wordpiece is not None:
        prefix = "##"
    else:
        prefix = None
    if prefix is None or tokenizer.mask_token_id is None:
        raise SparsifyError(f"{type(tokenizer).__name__} is not a WordPiece tokenizer with a mask token: the "
                            "augmentation reads words from '##' continuation pieces (BERT, DistilBERT, MiniLM "
                            "tokenizers)")
    return prefix


def neighbours(embeddings: torch.Tensor, queries: np.ndarray, candidates: np.ndarray, k: int,
               chunk: int = 2048) -> np.ndarray:
    """``(len(queries), k)`` token ids: for each query id, the ``k`` candidate ids of highest cosine similarity
    of their embedding rows, most similar first, the query itself left out."""
    e = torch.nn.functional.normalize(embeddings.detach().float(), dim=1)
    cand = torch.as_tensor(candidates, dtype=torch.long)
    ec = e[cand]
    k = min(k, len(candidates) - 1)
    out = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), chunk):
        q = torch.as_tensor(queries[start:start + chunk], dtype=torch.long)
        sims = e[q] @ ec.T
        sims[q.unsqueeze(1) == cand.unsqueeze(0)] = -float("inf")  # not the word itself
        out[start:start + chunk] = cand[sims.topk(k, dim=1).indices].numpy()
    return out


def augment_examples(train, tokenizer, embeddings: torch.Tensor, cfg, *, seed: int):
    """``train`` (a tokenized `datasets.Dataset` with input_ids, attention_mask, labels, idx and maybe
    token_type_ids) followed by ``cfg.copies`` augmented copies of each of its examples."""
    import datasets

    prefix = wordpiece_prefix(tokenizer)
    vocab_size = embeddings.shape[0]
    id_tokens = tokenizer.convert_ids_to_tokens(list(range(vocab_size)))
    special = set(tokenizer.all_special_ids)
    alpha = np.array([i not in special and t is not None and t.isalpha() for i, t in enumerate(id_tokens)])
    starts = _word_starts([t or "" for t in id_tokens], prefix)

    ids = list(train["input_ids"])  # plain lists: indexing a dataset column row by row is slow
    types = list(train["token_type_ids"]) if "token_type_ids" in train.column_names else None
    # the single-token words of the data that may be replaced, and their neighbours
    used = np.unique(np.concatenate([np.asarray(x, dtype=np.int64) for x in ids]))
    candidates = np.flatnonzero(alpha & starts)
    queries = np.intersect1d(used, candidates)
    table = neighbours(embeddings, queries, candidates, cfg.top_k) if len(queries) and len(candidates) > 1 else None
    row_of = {int(q): r for r, q in enumerate(queries)}

    rng = np.random.default_rng(seed)
    mask_id = tokenizer.mask_token_id
    new = {"input_ids": [], "attention_mask": [], "labels": [], "idx": []}
    if types is not None:
        new["token_type_ids"] = []
    next_idx = max(train["idx"]) + 1 if len(train) else 0
    for _copy in range(cfg.copies):
        for n, example in enumerate(ids):
            out_ids, out_types = _augment_one(example, types[n] if types is not None else None, starts, alpha,
                                              row_of, table, mask_id, cfg, rng)
            new["input_ids"].append(out_ids)
            new["attention_mask"].append([1] * len(out_ids))
            new["labels"].append(IGNORE)
            new["idx"].append(next_idx)
            next_idx += 1
            if types is not None:
                new["token_type_ids"].append(out_types)
    columns = {c: new[c] for c in train.column_names}
    copies = datasets.Dataset.from_dict(columns, features=train.features)
    return datasets.concatenate_datasets([train, copies])


def _augment_one(example, types, starts, alpha, row_of, table, mask_id, cfg, rng):
    example = np.asarray(example, dtype=np.int64)
    n = len(example)
    # words: a start piece and the '##' pieces after it; only alphabetic words change
    bounds = np.flatnonzero(starts[example]).tolist()
    if not bounds or bounds[0] != 0:  # a leading continuation piece (truncated text) is a word of its own
        bounds.insert(0, 0)
    bounds.append(n)
    draws = rng.random(len(bounds) - 1)
    picks = rng.integers(0, table.shape[1] if table is not None else 1, size=len(bounds) - 1)
    out_ids, out_types = [], []
    for w, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        head = int(example[a])
        word_type = types[a] if types is not None else None
        if not alpha[head]:  # special tokens, punctuation, numbers: kept
            out_ids.extend(example[a:b].tolist())
            out_types.extend(types[a:b] if types is not None else [None] * (b - a))
            continue
        if draws[w] < cfg.replace_prob:
            row = row_of.get(head) if b - a == 1 else None  # multi-piece words have no neighbours: kept
            if row is not None and table is not None:
                out_ids.append(int(table[row, picks[w]]))
                out_types.append(word_type)
                continue
        elif draws[w] < cfg.replace_prob + cfg.mask_prob:
            out_ids.append(mask_id)
            out_types.append(word_type)
            continue
        out_ids.extend(example[a:b].tolist())
        out_types.extend(types[a:b] if types is not None else [None] * (b - a))
    return out_ids, out_types
