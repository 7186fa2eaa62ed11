"""Sentence embeddings: ``sparsify embed``, predict / hf export of the other heads, and (with the cached
all-MiniLM-L6-v2) parity of the dense runtime with sentence-transformers. The per-architecture parity of every
head and format is in ``test_architectures.py``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sparsify.cli import main as cli  # noqa: E402
from sparsify.export import export  # noqa: E402
from sparsify.runtime import SparseModel  # noqa: E402

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
SENTENCES = ["a gripping, beautifully acted film .", "it 's a dull , lifeless movie ", "great",
             "the plot makes no sense whatsoever , but the music is lovely and the actors seem to enjoy themselves"]


@pytest.fixture(scope="module")
def st_artifact(tiny_model_dir, tmp_path_factory) -> tuple[Path, object]:
    from sentence_transformers import SentenceTransformer, models

    tr = models.Transformer(str(tiny_model_dir), max_seq_length=32)
    st = SentenceTransformer(modules=[tr, models.Pooling(32, pooling_mode="mean"), models.Normalize()], device="cpu")
    src = tmp_path_factory.mktemp("st")
    st.save(str(src))
    out = tmp_path_factory.mktemp("art") / "a"
    export(src, out)
    return out, st


def test_embed_cli(st_artifact, tmp_path, capsys):
    art, st = st_artifact
    texts = ["the movie was good", "", "a dull plot", "  great  "]
    f = tmp_path / "texts.txt"
    f.write_text("\n".join(texts) + "\n", encoding="utf-8")
    assert cli(["embed", str(art), "--file", str(f), "-o", str(tmp_path / "e.npy")]) == 0
    assert "wrote 3 x 32 float32 embeddings" in capsys.readouterr().out
    got = np.load(tmp_path / "e.npy", allow_pickle=False)
    ref = st.encode([t for t in texts if t.strip()], convert_to_numpy=True)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    assert cli(["embed", str(art), "--text", "great", "-o", str(tmp_path / "r.npy"), "--no-normalize"]) == 0
    raw = np.load(tmp_path / "r.npy")
    assert abs(np.linalg.norm(raw) - 1) > 1e-3 and np.allclose(raw / np.linalg.norm(raw), ref[2], atol=1e-5)
    capsys.readouterr()
    for args, msg in ((["--text", "x", "-o", str(tmp_path / "e.npy")], "exists"),
                      (["--text", "x", "-o", str(tmp_path / "e.txt")], "must be a .npy"),
                      (["--file", str(tmp_path / "none.txt"), "-o", str(tmp_path / "n.npy")], "cannot read")):
        assert cli(["embed", str(art), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and msg in err and len(err.strip().splitlines()) == 1
    assert cli(["predict", str(art), "--text", "x"]) == 2
    assert "use 'sparsify embed'" in capsys.readouterr().err


def test_bench_model_times_embeddings_against_sentence_transformers(st_artifact, tmp_path, capsys):
    """An embeddings artifact is timed against the sentence-transformers library on its dense-equivalent weights
    (rebuilt from the artifact: the library's embeddings must equal ours), interleaved, every scenario."""
    from sparsify.bench_model import SCENARIOS, main as bench_main

    art, st = st_artifact
    out = tmp_path / "b.json"
    assert bench_main([str(art), "--quick", "--json", str(out), "--threads", "1", "--no-cold-start"]) == 0
    res = json.loads(out.read_text())
    assert res["head"] == "embeddings" and res["baseline"] == "sentence_transformers"
    assert {(r["scenario"], r["method"]) for r in res["records"]} == {
        (s, m) for s in SCENARIOS for m in ("sparsify", "sentence_transformers")}
    for r in res["records"]:
        assert r["median_ms"] > 0 and r["speedup_vs_sentence_transformers"] > 0 and r["rounds"] == 2
    assert res["parity"]["min_cosine"] > 0.99999 and res["parity"]["texts"] == 64
    table = capsys.readouterr().out
    assert "speedup vs sentence_transformers" in table and "cosine min" in table
    # the rebuilt library model is the exported one: same embeddings as the original on real text
    from sparsify.bench_model import dense_sentence_transformer

    rebuilt = dense_sentence_transformer(SparseModel.from_pretrained(art, threads=1), tmp_path / "st")
    np.testing.assert_allclose(rebuilt.encode(SENTENCES), st.encode(SENTENCES), atol=1e-5)


def test_manifest_records_the_pooling(st_artifact):
    art, _ = st_artifact
    m = json.loads((art / "sparsify.json").read_text())
    assert m["head"] == "embeddings" and m["prefix"] == ""
    assert m["pooling"]["modes"] == ["mean"] and m["pooling"]["normalize"] is True
    assert m["max_length"] == 32  # max_seq_length (sentence_bert_config.json, or the tokenizer in newer versions)


def test_hf_export_keeps_the_sentence_transformers_files(st_artifact, tmp_path):
    from sentence_transformers import SentenceTransformer

    _, st = st_artifact
    src = tmp_path / "st"
    st.save(str(src))
    export(src, tmp_path / "hf", format="hf")
    again = SentenceTransformer(str(tmp_path / "hf"), device="cpu")
    np.testing.assert_allclose(again.encode(SENTENCES), st.encode(SENTENCES), atol=1e-6)


def test_predict_cli_token_and_qa_heads(tiny_model_dir, tmp_path, capsys):
    from transformers import AutoModelForQuestionAnswering, AutoModelForTokenClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    for name, cls in (("tok", AutoModelForTokenClassification), ("qa", AutoModelForQuestionAnswering)):
        from transformers import BertConfig

        model = cls.from_config(BertConfig(**{k: v for k, v in cfg.items() if k in (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "max_position_embeddings")}, num_labels=3 if name == "tok" else 2))
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
        export(tmp_path / name, tmp_path / f"{name}-art")
    assert cli(["predict", str(tmp_path / "tok-art"), "--text", "the movie was good"]) == 0
    out = capsys.readouterr().out.strip()
    assert [w.split("/")[0] for w in out.split()] == ["the", "movie", "was", "good"]
    f = tmp_path / "qa.txt"
    f.write_text("what was the movie\tthe movie was good\n", encoding="utf-8")
    assert cli(["predict", str(tmp_path / "qa-art"), "--file", str(f), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert "the movie was good"[row["start"]:row["end"]] == row["answer"]
    assert cli(["predict", str(tmp_path / "qa-art"), "--text", "no context"]) == 2
    assert "question<TAB>context" in capsys.readouterr().err
    export(tmp_path / "tok", tmp_path / "tok-hf", format="hf")
    again = AutoModelForTokenClassification.from_pretrained(tmp_path / "tok-hf")
    assert again.classifier.weight.shape == (3, 32)


def _minilm_dir():
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(MINILM, local_files_only=True))
    except Exception:
        return None


@pytest.mark.skipif(os.environ.get("HF_HUB_OFFLINE") != "1" and _minilm_dir() is None,
                    reason="all-MiniLM-L6-v2 not in the Hugging Face cache")
def test_minilm_dense_parity_with_sentence_transformers(tmp_path):
    """The shipped model, exported dense and embedded by the runtime: cosine >= 0.9999 to sentence-transformers
    (the full SST-2 dev measurement: scripts/embed_parity_sst2.py)."""
    from sentence_transformers import SentenceTransformer

    src = _minilm_dir()
    if src is None:
        pytest.skip("all-MiniLM-L6-v2 not in the Hugging Face cache")
    summary = export(MINILM, tmp_path / "a")  # a hub id resolves to its cached snapshot
    m = summary["manifest"]
    assert m["head"] == "embeddings" and m["pooling"]["modes"] == ["mean"] and m["pooling"]["normalize"]
    assert m["max_length"] == 256
    rt = SparseModel.from_pretrained(tmp_path / "a", threads=2)
    got = rt.embed(SENTENCES, batch_size=2)
    ref = SentenceTransformer(str(src), device="cpu").encode(SENTENCES, convert_to_numpy=True)
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.9999 and np.abs(got - ref).max() < 1e-4
