"""Shared fixtures: a tiny BERT classifier with its own tokenizer, toy sentiment data and recipe files.

Everything is built in code (no network, no Hub); tests that need the real cached model say so.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import yaml

POSITIVE = ["good", "great", "fine", "nice", "superb", "lovely", "fun", "bright"]
NEGATIVE = ["bad", "awful", "poor", "dull", "boring", "ugly", "sad", "weak"]
NEUTRAL = ["the", "a", "movie", "film", "plot", "actor", "story", "was", "is", "very", "quite", "and", "scene", "music"]


def toy_sentences(n: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = rng.choices(NEUTRAL, k=rng.randint(2, 6)) + rng.choices(POSITIVE if label else NEGATIVE, k=2)
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide BERT sequence classifier and a word-level tokenizer, saved in HF format."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + POSITIVE + NEGATIVE + NEUTRAL
    backend = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                        model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2)
    model = BertForSequenceClassification(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_sentence_transformers_files(path: Path, dim: int, modes=("mean",), normalize: bool = True,
                                      max_seq_length: int = 32) -> Path:
    """The sentence-transformers files of a bare encoder saved in ``path``: Transformer -> Pooling (-> Normalize)."""
    import json

    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (path / "2_Normalize").mkdir(exist_ok=True)
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir(exist_ok=True)
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": dim,
                                                                "pooling_mode": list(modes)}))
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length}))
    return path


@pytest.fixture(scope="session")
def tiny_st_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny BERT as a sentence-transformers model: a bare encoder (no head), mean pooling, Normalize."""
    import shutil

    import torch
    from transformers import BertModel

    path = tmp_path_factory.mktemp("tiny-st")
    torch.manual_seed(1)
    BertModel.from_pretrained(tiny_model_dir).save_pretrained(path)
    for f in tiny_model_dir.iterdir():
        if "token" in f.name or f.name == "vocab.txt":
            shutil.copyfile(f, path / f.name)
    return write_sentence_transformers_files(path, 32)


def toy_tags(words: list[str]) -> list[str]:
    """B-POS for positive words, B-NEG for negative ones, O for the rest: a tag that follows from the word."""
    return ["B-POS" if w in POSITIVE else "B-NEG" if w in NEGATIVE else "O" for w in words]


@pytest.fixture(scope="session")
def toy_token_data(tmp_path_factory) -> dict[str, Path]:
    """Toy token-classification data as jsonl: ``tokens`` (words) and ``ner_tags`` (tag names), train and validation."""
    import json

    path = tmp_path_factory.mktemp("toy-tokens")
    out = {}
    for split, (n, seed) in {"train": (192, 11), "validation": (64, 12)}.items():
        rows = [{"tokens": s.split(), "ner_tags": toy_tags(s.split())} for s, _ in toy_sentences(n, seed)]
        out[split] = path / f"{split}.jsonl"
        out[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


@pytest.fixture(scope="session")
def toy_qa_data(tmp_path_factory) -> dict[str, Path]:
    """Toy extractive QA as jsonl: the question "good" asks for the one positive word of the context (SQuAD-style
    ``answers``), train and validation."""
    import json

    path = tmp_path_factory.mktemp("toy-qa")
    out = {}
    for split, (n, seed) in {"train": (192, 21), "validation": (64, 22)}.items():
        rng = random.Random(seed)
        rows = []
        for _ in range(n):
            answer = rng.choice(POSITIVE)
            words = rng.choices(NEUTRAL, k=rng.randint(2, 8)) + [answer, rng.choice(NEGATIVE)]
            rng.shuffle(words)
            context = " ".join(words)
            start = next(i for i in range(len(context)) if context.startswith(answer, i) and
                         (i == 0 or context[i - 1] == " ") and context[i + len(answer):i + len(answer) + 1] in ("", " "))
            rows.append({"question": "good", "context": context, "answers": {"text": [answer], "answer_start": [start]}})
        out[split] = path / f"{split}.jsonl"
        out[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


@pytest.fixture(scope="session")
def toy_pairs(tmp_path_factory) -> Path:
    """Labelled sentence pairs (sentence1, sentence2, label: 1 when both sentences have the same sentiment)."""
    import pandas as pd

    a, b = toy_sentences(48, 5), toy_sentences(48, 6)
    rows = [(x, y, int(lx == ly)) for (x, lx), (y, ly) in zip(a, b)]
    path = tmp_path_factory.mktemp("toy-pairs") / "pairs.csv"
    pd.DataFrame(rows, columns=["sentence1", "sentence2", "label"]).to_csv(path, index=False)
    return path


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> dict[str, Path]:
    """Toy sentiment data as csv, tsv, jsonl and parquet (train and validation of each)."""
    import pandas as pd

    path = tmp_path_factory.mktemp("toy-data")
    frames = {"train": pd.DataFrame(toy_sentences(192, 1), columns=["sentence", "label"]),
              "validation": pd.DataFrame(toy_sentences(64, 2), columns=["sentence", "label"])}
    out = {}
    for split, df in frames.items():
        df.to_csv(path / f"{split}.csv", index=False)
        df.to_csv(path / f"{split}.tsv", index=False, sep="\t")
        df.to_json(path / f"{split}.jsonl", orient="records", lines=True)
        df.to_parquet(path / f"{split}.parquet")
        out[split] = path / f"{split}.csv"
    out["dir"] = path
    return out


def tiny_recipe(model_dir: Path, data_files: dict, output_dir: Path, **sections) -> dict:
    """A recipe mapping for the tiny model on toy data; keyword sections are merged in."""
    recipe = {
        "output_dir": str(output_dir),
        "model": {"name_or_path": str(model_dir)},
        "data": {"train_file": str(data_files["train"]), "validation_file": str(data_files["validation"]),
                 "max_length": 32},
        "training": {"steps": 8, "batch_size": 16, "learning_rate": 3e-3, "log_every": 2, "seed": 7, "threads": 1},
        "techniques": [],
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture
def make_recipe(tiny_model_dir, toy_data, tmp_path):
    """Write a tiny recipe file and return its path: make_recipe(training={"steps": 4}, name="x")."""
    counter = iter(range(1000))

    def make(**sections) -> Path:
        i = next(counter)
        recipe = tiny_recipe(tiny_model_dir, toy_data, tmp_path / f"run{i}", **sections)
        return write_recipe(tmp_path / f"recipe{i}.yaml", recipe)

    return make


def fake_quantize_int8(model, linears: dict, calib_batch) -> dict:
    """A QAT-convert()-like dict for ``linears`` (name -> nn.Linear of ``model``): int8 per-channel weights and
    per-tensor asymmetric uint8 input parameters; ``model`` becomes the fake-quant torch reference with the same
    numbers (dequantized weights, input quantize-dequantize hooks)."""
    import numpy as np
    import torch

    from sparsify.kernels.format import quantize_per_channel

    ranges, hooks = {}, []
    for n, m in linears.items():
        hooks.append(m.register_forward_pre_hook(
            lambda mod, args, n=n: ranges.__setitem__(n, (min(0.0, float(args[0].min())), float(args[0].max())))))
    with torch.no_grad():
        model(**calib_batch)
    for h in hooks:
        h.remove()
    conv = {}
    for n, m in linears.items():
        q, s = quantize_per_channel(m.weight.detach().numpy())
        lo, hi = ranges[n]
        scale = (hi - lo) / 255.0
        zp = float(np.rint(-lo / scale))
        conv[n] = {"weight_int8": q, "weight_scale": s, "bias": m.bias.detach().numpy(), "input_scale": scale,
                   "input_zero_point": zp, "input_groups": 1, "input_permutation": None, "bits": 8}
        with torch.no_grad():
            m.weight.copy_(torch.from_numpy(q.astype(np.float32) * s[:, None]))
        m.register_forward_pre_hook(
            lambda mod, args, scale=scale, zp=zp: ((torch.clamp(torch.round(args[0] / scale) + zp, 0, 255) - zp)
                                                   * scale,))
    return conv


@pytest.fixture(scope="session")
def fake_quantize():
    """:func:`fake_quantize_int8` (test modules load with importlib and cannot import conftest)."""
    return fake_quantize_int8


@pytest.fixture(scope="session")
def sparse_artifact(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with its encoder Linear layers about 70% sparse in 4x1 blocks, exported as an artifact."""
    import shutil

    import torch
    from transformers import BertForSequenceClassification

    from sparsify.export import export

    tmp = tmp_path_factory.mktemp("sparse-art")
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and "encoder" in name:
                keep = torch.rand(mod.weight.shape[0] // 4, mod.weight.shape[1]) >= 0.7
                mod.weight.mul_(keep.repeat_interleave(4, 0))
    model.save_pretrained(tmp / "model")
    for f in tiny_model_dir.glob("*token*"):
        shutil.copyfile(f, tmp / "model" / f.name)
    export(tmp / "model", tmp / "art")
    return tmp / "art"


@pytest.fixture(scope="session")
def finished_run(tiny_model_dir, toy_data, tmp_path_factory) -> Path:
    """The recipe file of a finished 4-step run with checkpoints at steps 2 and 4 (both kept)."""
    from sparsify.cli import main

    tmp = tmp_path_factory.mktemp("ckpt-run")
    recipe = tmp / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "output_dir": str(tmp / "run"), "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train_file": str(toy_data["train"]), "validation_file": str(toy_data["validation"]), "max_length": 32},
        "training": {"steps": 4, "save_every": 2, "batch_size": 16, "seed": 7, "threads": 1}}))
    assert main(["train", str(recipe), "--no-progress"]) == 0
    return recipe
