"""Augmentation for distillation (data.augment): teacher-labelled noisy copies of the training examples."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
import yaml

from sparsify.augment import IGNORE, augment_examples, neighbours
from sparsify.cli import main
from sparsify.recipe import AugmentConfig
from sparsify.techniques.distillation.losses import labelled_cross_entropy

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "great", "movie", "film", "##s", "the", ",", "a",
         "9"]


def wordpiece_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordPiece({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def ids(*words):
    return [VOCAB.index(w) for w in words]


def embeddings():
    """Rows of one-hot-ish vectors: good ~ great, movie ~ film, the ~ a; every other row far from all."""
    e = torch.eye(len(VOCAB)) * 10
    for x, y in (("good", "great"), ("movie", "film"), ("the", "a")):
        e[VOCAB.index(x), VOCAB.index(y)] = e[VOCAB.index(y), VOCAB.index(x)] = 9
    return e


def dataset():
    rows = {  # a pair example: [CLS] the good movie ##s , 9 [SEP] a film [SEP]
        "input_ids": [ids("[CLS]", "the", "good", "movie", "##s", ",", "9", "[SEP]", "a", "film", "[SEP]"),
                      ids("[CLS]", "great", "film", "[SEP]", "good", "[SEP]")],
        "token_type_ids": [[0] * 8 + [1] * 3, [0] * 4 + [1] * 2],
        "attention_mask": [[1] * 11, [1] * 6],
        "labels": [1, 0],
        "idx": [0, 1],
    }
    return datasets.Dataset.from_dict(rows)


def test_nearest_words_are_the_embedding_neighbours():
    e = embeddings()
    queries = torch.tensor(ids("good", "movie", "the")).numpy()
    candidates = torch.tensor(ids("good", "great", "movie", "film", "the", "a")).numpy()
    assert neighbours(e, queries, candidates, 1).tolist() == [ids("great"), ids("film"), ids("a")]
    two = neighbours(e, queries, candidates, 2)
    assert all(q not in row for q, row in zip(queries, two.tolist()))  # never the word itself


def test_replacing_every_word_keeps_specials_punctuation_and_multi_piece_words():
    out = augment_examples(dataset(), wordpiece_tokenizer(), embeddings(),
                           AugmentConfig(copies=1, replace_prob=1.0, mask_prob=0.0, top_k=1), seed=0)
    assert len(out) == 4
    assert out[0]["input_ids"] == dataset()[0]["input_ids"] and out[0]["labels"] == 1  # originals first, unchanged
    copy = out[2]
    # the -> a, good -> great, "movie ##s" (two pieces: no neighbour) kept, ",", "9" and specials kept, a -> the
    assert copy["input_ids"] == ids("[CLS]", "a", "great", "movie", "##s", ",", "9", "[SEP]", "the", "movie", "[SEP]")
    assert copy["token_type_ids"] == [0] * 8 + [1] * 3 and copy["attention_mask"] == [1] * 11
    assert out[3]["input_ids"] == ids("[CLS]", "good", "movie", "[SEP]", "great", "[SEP]")
    assert [out[i]["labels"] for i in (2, 3)] == [IGNORE, IGNORE]
    assert out["idx"] == [0, 1, 2, 3]


def test_masking_collapses_a_word_to_one_mask_token_and_keeps_the_segments():
    out = augment_examples(dataset(), wordpiece_tokenizer(), embeddings(),
                           AugmentConfig(copies=2, replace_prob=0.0, mask_prob=1.0), seed=0)
    assert len(out) == 6 and out["idx"] == list(range(6))
    m = "[MASK]"
    assert out[2]["input_ids"] == ids("[CLS]", m, m, m, ",", "9", "[SEP]", m, m, "[SEP]")  # "movie ##s": one mask
    assert out[2]["token_type_ids"] == [0] * 7 + [1] * 3
    assert out[2]["attention_mask"] == [1] * 10
    assert out[4]["input_ids"] == out[2]["input_ids"]  # every word masked: both copies alike


def test_copies_depend_on_the_seed_only():
    cfg = AugmentConfig(copies=3, replace_prob=0.4, mask_prob=0.3, top_k=2)
    a = augment_examples(dataset(), wordpiece_tokenizer(), embeddings(), cfg, seed=1)
    b = augment_examples(dataset(), wordpiece_tokenizer(), embeddings(), cfg, seed=1)
    c = augment_examples(dataset(), wordpiece_tokenizer(), embeddings(), cfg, seed=2)
    assert a["input_ids"] == b["input_ids"]
    assert a["input_ids"] != c["input_ids"]
    assert a["input_ids"][2:] != [a["input_ids"][i % 2] for i in range(6)]  # the copies did change


def test_a_tokenizer_without_wordpiece_pieces_is_refused():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from sparsify.errors import SparsifyError

    bpe = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE({"a": 0, "<mask>": 1}, [])),
                                  mask_token="<mask>")
    with pytest.raises(SparsifyError, match="not a WordPiece tokenizer"):
        augment_examples(dataset(), bpe, embeddings(), AugmentConfig(), seed=0)


def test_task_loss_reads_the_labelled_examples_only():
    logits = torch.randn(4, 3, requires_grad=True)
    labels = torch.tensor([2, IGNORE, 0, IGNORE])
    expected = torch.nn.functional.cross_entropy(logits[[0, 2]], labels[[0, 2]])
    assert torch.allclose(labelled_cross_entropy(logits, labels), expected)
    none = labelled_cross_entropy(logits, torch.full((4,), IGNORE))
    assert float(none.detach()) == 0.0
    none.backward()  # still a part of the graph: a batch of copies only trains without a label loss
    assert logits.grad is not None and float(logits.grad.abs().sum()) == 0.0


@pytest.mark.parametrize(("probs", "message"), [({"replace_prob": 0.7, "mask_prob": 0.4}, "add up to at most 1"),
                                                ({"replace_prob": 0.0, "mask_prob": 0.0}, "both 0")])
def test_probabilities_are_checked(probs, message):
    from sparsify.config import FieldError

    with pytest.raises((FieldError, ValueError), match=message):
        AugmentConfig(**probs)


def one_error(capsys, *expected: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and err.strip().endswith(lines[0]), err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(("sections", "message"), [
    ({}, "needs a distillation technique with a logits term"),
    ({"techniques": [{"kind": "distillation", "hidden": {"weight": 1.0}}]}, "with a logits term"),
    ({"data": {"task": "embedding"}}, "this task is 'embedding'"),
])
def test_recipes_that_cannot_use_copies_get_one_error_line(make_recipe, tiny_model_dir, capsys, sections, message):
    data = {"augment": {"copies": 1}, **sections.pop("data", {})}
    recipe = make_recipe(data=data, teacher={"name_or_path": str(tiny_model_dir)}, **sections)
    assert main(["train", str(recipe), "--no-progress"]) != 0
    line = one_error(capsys, "data.augment", message)
    assert Path(recipe).name in line  # the file is named
    assert not Path(yaml.safe_load(recipe.read_text())["output_dir"]).exists()  # nothing written


def test_a_run_with_copies_trains_on_them_and_reports_its_task_loss(make_recipe, tiny_model_dir):
    # 3 copies per example and batches of 4: about a third of the batches hold copies only, whose task loss must be
    # 0, not the NaN of a cross-entropy over no labels
    recipe = make_recipe(
        data={"augment": {"copies": 3, "replace_prob": 0.2, "mask_prob": 0.2}},
        teacher={"name_or_path": str(tiny_model_dir)},
        techniques=[{"kind": "distillation", "task_weight": 0.5, "logits": {"weight": 1.0}}],
        training={"steps": None, "epochs": 1, "batch_size": 4, "log_every": 1, "fit_samples": 32})
    assert main(["train", str(recipe), "--no-progress"]) == 0
    run = Path(yaml.safe_load(recipe.read_text())["output_dir"])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps_per_epoch"] == 192  # (192 examples + 3 x 192 copies) / 4
    assert metrics["train_fit"]["examples"] == 32
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((run / "tensorboard").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    task = [e.value for e in events.Scalars("train/distill/task")]
    loss = [e.value for e in events.Scalars("train/loss")]
    assert len(task) == 192 and all(v == v and v >= 0 for v in task + loss)  # finite at every step
    assert 0.0 in task  # some batches were copies only
