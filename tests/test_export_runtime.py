"""Export (sparsify / hf / onnx) and the CPU runtime: round trip, corrupted artifacts, parity with PyTorch for
several block shapes and int8, length configurations, predict CLI and a benchmark smoke run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sparsify.errors import SparsifyError  # noqa: E402
from sparsify.export import export, main as export_main  # noqa: E402
from sparsify.runtime import ArtifactError, SparseModel  # noqa: E402
from sparsify.runtime.model import FORMAT_VERSION, MANIFEST, WEIGHTS, _drop_tokens  # noqa: E402

TEXTS = ["the movie was good and fun", "a dull boring plot", "great", "the film is very bad and the music is sad",
         "superb lovely story and a bright scene", "weak"]


def _sparse_model_dir(src: Path, dst: Path, block, sparsity: float = 0.7, seed: int = 0) -> Path:
    """The tiny fixture model with its encoder Linear weights pruned in ``block`` blocks and a sharper head."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    model = BertForSequenceClassification.from_pretrained(src).eval()
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.mul_(8.0 if name == "classifier" else 3.0)  # logits far from 0: a strict parity check
                if "encoder" in name and block is not None:
                    o, i = mod.weight.shape
                    br, bc = block
                    keep = torch.rand(o // br, i // bc) >= sparsity
                    mod.weight.mul_(keep.repeat_interleave(br, 0).repeat_interleave(bc, 1))
    model.save_pretrained(dst)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / f).is_file():
            shutil.copyfile(src / f, dst / f)
    return dst


def _torch_logits(model_dir: Path, texts, max_length: int = 64):
    from transformers import AutoTokenizer, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = BertForSequenceClassification.from_pretrained(model_dir).eval()
    batch = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits.numpy(), batch


@pytest.fixture(scope="module")
def sparse_4x1(tiny_model_dir, tmp_path_factory) -> Path:
    return _sparse_model_dir(tiny_model_dir, tmp_path_factory.mktemp("m4x1"), (4, 1))


@pytest.fixture(scope="module")
def artifact(sparse_4x1, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("art") / "a"
    export(sparse_4x1, out)
    return out


# ------------------------------------------------------------------------------------------------ round trip
def test_round_trip_manifest_and_predict(artifact, sparse_4x1):
    manifest = json.loads((artifact / MANIFEST).read_text())
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["architecture"]["num_hidden_layers"] == 2
    assert manifest["labels"] == ["LABEL_0", "LABEL_1"]
    assert set(manifest["files"]) >= {WEIGHTS, "tokenizer.json"}
    layers = manifest["layers"]
    assert len(layers) == 12 and all(m["block"] == "4x1" for m in layers.values())
    assert all(0.5 < m["sparsity"] < 0.9 for m in layers.values())
    assert manifest["size"]["weights_bytes"] < manifest["size"]["dense_fp32_bytes"]
    model = SparseModel.from_pretrained(artifact, threads=1)
    preds = model.predict(TEXTS, batch_size=4, return_probabilities=True)
    assert len(preds) == len(TEXTS) and all(p["label"] in ("LABEL_0", "LABEL_1") for p in preds)
    assert all(abs(sum(p["probabilities"].values()) - 1) < 1e-6 for p in preds)
    ref, _ = _torch_logits(sparse_4x1, TEXTS)
    assert [p["label"] for p in preds] == [f"LABEL_{i}" for i in ref.argmax(1)]


@pytest.mark.parametrize("block", [(4, 1), (1, 4), (2, 2), (8, 1), (1, 1), None], ids=lambda b: "dense" if b is None
                         else f"{b[0]}x{b[1]}")
def test_parity_with_pytorch(tiny_model_dir, tmp_path, block):
    src = _sparse_model_dir(tiny_model_dir, tmp_path / "m", block, sparsity=0.6)
    export(src, tmp_path / "a")
    manifest = json.loads((tmp_path / "a" / MANIFEST).read_text())
    expect = None if block is None else f"{block[0]}x{block[1]}"
    assert {m["block"] for m in manifest["layers"].values()} == {expect}
    ref, batch = _torch_logits(src, TEXTS)
    model = SparseModel.from_pretrained(tmp_path / "a", threads=2)
    got = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    assert np.abs(ref).max() > 0.1  # a meaningful comparison
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(model.logits(TEXTS, batch_size=2), ref, atol=1e-4, rtol=1e-4)


def test_left_padding_and_torch_inputs(artifact, sparse_4x1):
    ref, batch = _torch_logits(sparse_4x1, TEXTS[:3])  # right-padded reference
    ids, mask = batch["input_ids"].numpy(), batch["attention_mask"].numpy()
    left_ids, left_mask = np.zeros_like(ids), np.zeros_like(mask)
    for b in range(len(ids)):  # padding moved to the left: the runtime counts positions over real tokens
        n = mask[b].sum()
        left_ids[b, -n:], left_mask[b, -n:] = ids[b, :n], 1
    model = SparseModel.from_pretrained(artifact, threads=1)
    np.testing.assert_allclose(model(torch.from_numpy(left_ids), torch.from_numpy(left_mask)), ref, atol=1e-4)


# ------------------------------------------------------------------------------------------------ bad input
def _copy(artifact: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(artifact, dst)
    return dst


def _rewrite_manifest(path: Path, **changes) -> None:
    m = json.loads((path / MANIFEST).read_text())
    m.update(changes)
    (path / MANIFEST).write_text(json.dumps(m))


@pytest.mark.parametrize("case", ["no_dir", "not_dir", "no_manifest", "manifest_not_json", "not_ours", "newer_version",
                                  "missing_weights", "truncated_weights", "tampered_weights", "missing_tokenizer",
                                  "manifest_missing_key", "path_escape"])
def test_corrupted_artifact(artifact, tmp_path, case):
    a = _copy(artifact, tmp_path)
    expected = {
        "no_dir": "no such artifact", "not_dir": "not a directory", "no_manifest": "not a sparsify artifact",
        "manifest_not_json": "not valid JSON", "not_ours": "not a sparsify artifact manifest",
        "newer_version": "newer than this sparsify supports", "missing_weights": "missing",
        "truncated_weights": "truncated", "tampered_weights": "checksum mismatch",
        "missing_tokenizer": "tokenizer.json: missing", "manifest_missing_key": "lacks the required key",
        "path_escape": "outside the artifact",
    }[case]
    target = a
    if case == "no_dir":
        target = tmp_path / "nope"
    elif case == "not_dir":
        target = a / WEIGHTS
    elif case == "no_manifest":
        (a / MANIFEST).unlink()
    elif case == "manifest_not_json":
        (a / MANIFEST).write_text('{"format": "sparsify-artifact", ')
    elif case == "not_ours":
        _rewrite_manifest(a, format="something-else")
    elif case == "newer_version":
        _rewrite_manifest(a, format_version=FORMAT_VERSION + 1)
    elif case == "missing_weights":
        (a / WEIGHTS).unlink()
    elif case == "truncated_weights":
        data = (a / WEIGHTS).read_bytes()
        (a / WEIGHTS).write_bytes(data[: len(data) // 2])
    elif case == "tampered_weights":
        data = bytearray((a / WEIGHTS).read_bytes())
        data[-3] ^= 0xFF
        (a / WEIGHTS).write_bytes(bytes(data))
    elif case == "missing_tokenizer":
        (a / "tokenizer.json").unlink()
    elif case == "manifest_missing_key":
        m = json.loads((a / MANIFEST).read_text())
        del m["layers"]
        (a / MANIFEST).write_text(json.dumps(m))
    elif case == "path_escape":
        m = json.loads((a / MANIFEST).read_text())
        m["files"]["../evil"] = {"sha256": "0", "bytes": 1}
        (a / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=expected):
        SparseModel.from_pretrained(target)


def test_corrupted_weights_without_verification_still_clear(artifact, tmp_path):
    a = _copy(artifact, tmp_path)
    (a / WEIGHTS).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    _rewrite_manifest(a, files={**json.loads((a / MANIFEST).read_text())["files"],
                                WEIGHTS: {"sha256": "x", "bytes": (a / WEIGHTS).stat().st_size}})
    with pytest.raises(ArtifactError, match="cannot read the weights"):
        SparseModel.from_pretrained(a, verify=False)


def test_bad_inputs(artifact):
    with pytest.raises(SparsifyError, match="int8_weights must be one of 'dequantize', 'keep'"):
        SparseModel.from_pretrained(artifact, threads=1, int8_weights="float16")
    model = SparseModel.from_pretrained(artifact, threads=1)
    with pytest.raises(SparsifyError, match="empty"):
        model.predict([])
    with pytest.raises(SparsifyError, match="no real tokens"):
        model(np.array([[2, 5, 3]]), np.array([[0, 0, 0]]))
    with pytest.raises(SparsifyError, match="vocabulary"):
        model(np.array([[2, 999, 3]]))
    with pytest.raises(SparsifyError, match="exceeds"):
        model(np.full((1, 65), 5))
    assert model(np.zeros((0, 4), np.int64)).shape == (0, 2)
    with pytest.warns(UserWarning, match="truncated"):
        out = model.predict(["good " * 200, "bad"])
    assert len(out) == 2


# ------------------------------------------------------------------------------------------------ lengths
def test_drop_tokens_keeps_cls_and_most_attended():
    h = np.arange(10, dtype=np.float32)[:, None].repeat(3, 1).copy()
    sig = np.array([0.0, 5, 1, 4, 2, 9, 0, 3, 1, 8], np.float32)  # seq A = rows 0-5, seq B = rows 6-9
    starts, lens = np.array([0, 6], np.int64), np.array([6, 4], np.int64)
    out, s2, l2 = _drop_tokens(h, sig, starts, lens, lens.copy(), 3)
    assert l2.tolist() == [3, 3] and s2.tolist() == [0, 3]
    assert out[:, 0].tolist() == [0, 1, 5, 6, 7, 9]  # [CLS] of each kept, then the most attended, in order
    out, _, l3 = _drop_tokens(h, sig, starts, lens, lens.copy(), 0.5)  # ratio of the input length (ceil)
    assert l3.tolist() == [3, 2]


def test_length_config_honoured(sparse_4x1, tmp_path, monkeypatch):
    import sparsify.runtime.model as rm

    src = tmp_path / "m"
    shutil.copytree(sparse_4x1, src)
    (src / "length_config.json").write_text(json.dumps({"length_config": [4, 3]}))
    export(src, tmp_path / "a")
    manifest = json.loads((tmp_path / "a" / MANIFEST).read_text())
    assert manifest["length_config"]["lengths"] == [4, 3]
    seen = []
    real = rm._drop_tokens

    def spy(*args):
        res = real(*args)
        seen.append(res[2].tolist())
        return res

    monkeypatch.setattr(rm, "_drop_tokens", spy)
    model = SparseModel.from_pretrained(tmp_path / "a", threads=1)
    assert model.length_config == [4, 3]
    texts = TEXTS[:4]
    dropped = model.logits(texts)
    assert seen == [[4, 4, 3, 4]]  # layer 0 keeps <= 4 tokens ("great" has 3); the last layer keeps only [CLS]
    seen.clear()
    full = model.logits(texts, length_config=None)
    assert seen == []
    ref, _ = _torch_logits(sparse_4x1, texts)
    np.testing.assert_allclose(full, ref, atol=1e-4)
    assert not np.allclose(dropped, ref, atol=1e-4)
    # a configuration keeping every token reproduces the full-length model exactly
    np.testing.assert_allclose(model.logits(texts, length_config=[64, 64]), full, atol=1e-6)
    model.logits(texts, length_config=[0.5, 0.25])
    assert seen[-1] == [4, 3, 2, 6]  # ceil(0.5 * input length): 8, 6, 3, 12 tokens -> 4, 3, 2, 6
    with pytest.raises(SparsifyError, match="2 layers"):
        model.logits(texts, length_config=[4])
    with pytest.raises(SparsifyError, match="grows"):
        model.logits(texts, length_config=[3, 4])


# ------------------------------------------------------------------------------------------------ int8
def test_int8_parity_with_fake_quant(sparse_4x1, tmp_path, fake_quantize):
    from transformers import AutoTokenizer, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(sparse_4x1)
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    model = BertForSequenceClassification.from_pretrained(sparse_4x1).eval()
    encoder = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "encoder" in n}
    conv = fake_quantize(model, encoder, batch)
    summary = export(sparse_4x1, tmp_path / "a", quantized=conv)
    layers = summary["manifest"]["layers"]
    assert all(m["dtype"] == "int8" and m["block"] == "4x1" and m["quantization"]["input"]["bits"] == 8
               for m in layers.values())
    with torch.no_grad():
        ref = model(**batch).logits.numpy()
    rt = SparseModel.from_pretrained(tmp_path / "a", threads=2)
    got = rt(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    np.testing.assert_allclose(got, ref, atol=2e-3, rtol=1e-3)
    assert (got.argmax(1) == ref.argmax(1)).all()
    # from disk: quantization.json + quantization.safetensors in the model directory
    from safetensors.numpy import save_file

    src = tmp_path / "q"
    shutil.copytree(sparse_4x1, src)
    tensors = {f"{n}.{k}": np.asarray(v, np.float32 if k != "weight_int8" else np.int8)
               for n, d in conv.items() for k, v in d.items() if k in ("weight_int8", "weight_scale", "bias")}
    save_file(tensors, str(src / "quantization.safetensors"))
    (src / "quantization.json").write_text(json.dumps({n: {k: v for k, v in d.items() if k not in (
        "weight_int8", "weight_scale", "bias")} for n, d in conv.items()}))
    export(src, tmp_path / "b")
    np.testing.assert_allclose(SparseModel.from_pretrained(tmp_path / "b", threads=1)(
        batch["input_ids"], batch["attention_mask"]), got, atol=1e-6)
    for value, message in ((np.nan, "non-finite"), (0.0, "scales must be positive")):  # damaged: refused
        damaged = dict(tensors)
        key = "bert.encoder.layer.0.intermediate.dense.weight_scale"
        damaged[key] = damaged[key].copy()
        damaged[key][1] = value
        save_file(damaged, str(src / "quantization.safetensors"))
        with pytest.raises(SparsifyError, match=f"quantization.safetensors: {key}.*{message}"):
            export(src, tmp_path / "damaged")
        assert not (tmp_path / "damaged").exists()
    save_file(tensors, str(src / "quantization.safetensors"))
    # hf export: dense-equivalent dequantized weights load in plain transformers
    export(src, tmp_path / "hf", format="hf")
    hf = BertForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    w = hf.bert.encoder.layer[0].intermediate.dense.weight.detach().numpy()
    c = conv["bert.encoder.layer.0.intermediate.dense"]
    np.testing.assert_allclose(w, c["weight_int8"].astype(np.float32) * c["weight_scale"][:, None], rtol=1e-6)


def _calibrated(model_dir: Path, batch, **extra):
    """PTQ with the project's Quantizer on one batch -> (converted, activations): the conversion the export reads."""
    from transformers import BertForSequenceClassification

    from sparsify.techniques.quantization import QuantizationConfig, calibrate, convert_activations

    model = BertForSequenceClassification.from_pretrained(model_dir).eval()
    quantizer = calibrate(model, [dict(batch)], QuantizationConfig(mode="ptq", calibration_batches=1, **extra))
    return quantizer.convert(), convert_activations(quantizer)


def _converted_logits(model_dir: Path, batch, converted, activations, word=None):
    """The integer reference in PyTorch (``load_converted``): int8 Linear layers and the activation points."""
    from transformers import BertForSequenceClassification

    from sparsify.techniques.quantization.convert import load_converted

    model = BertForSequenceClassification.from_pretrained(model_dir).eval()
    if word is not None:
        with torch.no_grad():
            model.get_input_embeddings().weight.copy_(torch.from_numpy(word))
    load_converted(model, converted, activations)
    with torch.no_grad():
        return model(**batch).logits.numpy()


_POINTS = {
    "residual_sums": {"activations": {"residual_sums": True}},
    "peg_all_points": {"activations": {"residual_sums": True, "layernorm_outputs": True},
                       "peg": {"groups": 4, "permute": True,
                               "targets": [r"LayerNorm\.(input|output)$", r"intermediate\.dense\.input$"]}},
    "layernorm_outputs_16bit_sum": {"activations": {"residual_sums": True, "layernorm_outputs": True},
                                    "keep_16bit": [r"layer\.0\.output\.LayerNorm\.input$"]},
}


@pytest.mark.parametrize("block", [(4, 1), (1, 4), (8, 1), None], ids=["4x1", "1x4", "8x1", "dense"])
@pytest.mark.parametrize("case", list(_POINTS))
def test_int8_activation_points_parity(tiny_model_dir, tmp_path, case, block):
    """Residual sums and LayerNorm outputs (per tensor, PEG groups with a permutation, float16) are quantized by
    the runtime where the quantizer's hooks quantize them: logits match the converted model in PyTorch."""
    from transformers import AutoTokenizer

    from sparsify.techniques.quantization import save_converted

    src = _sparse_model_dir(tiny_model_dir, tmp_path / "m", block, sparsity=0.6)
    tok = AutoTokenizer.from_pretrained(src)
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    converted, activations = _calibrated(src, batch, **_POINTS[case])
    assert activations and all(p["bits"] in (8, 16) for p in activations.values())
    save_converted(src, converted, activations)  # quantization.json + .safetensors, as a training run writes
    summary = export(src, tmp_path / "a", embeddings="float32")
    manifest = summary["manifest"]
    assert set(manifest["activations"]) == set(activations)
    if case == "peg_all_points":
        assert all(d["groups"] == 4 and d["permuted"] for d in manifest["activations"].values())
    if case == "layernorm_outputs_16bit_sum":
        assert manifest["activations"]["bert.encoder.layer.0.output.LayerNorm.input"]["bits"] == 16
    assert all(m["dtype"] == "int8" for m in manifest["layers"].values())
    if block is None:  # dense quantized layers are stored as int8 codes, not dequantized
        w = SparseModel.from_pretrained(tmp_path / "a", threads=1, int8_weights="keep")
        from safetensors.numpy import load_file

        t = load_file(str(tmp_path / "a" / WEIGHTS))
        name = "bert.encoder.layer.0.intermediate.dense"
        assert t[name + ".weight"].dtype == np.int8 and t[name + ".scales"].dtype == np.float32
        assert w.layers[0].inter.dtype == np.int8
        # the default holds them as float32: code x channel scale, the same values
        d = SparseModel.from_pretrained(tmp_path / "a", threads=1).layers[0].inter
        assert d.dtype == np.float32
        np.testing.assert_array_equal(d.to_dense(), w.layers[0].inter.to_dense())
    ref = _converted_logits(src, batch, converted, activations)
    without = _converted_logits(src, batch, converted, {})
    # the points matter: a runtime skipping them would be 50x further off than the tolerance below
    assert np.abs(ref - without).max() > 1e-3
    for mode in ("keep", "dequantize"):  # int8 codes widened in the kernel, or float32 from load
        rt = SparseModel.from_pretrained(tmp_path / "a", threads=2, int8_weights=mode)
        got = rt(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        np.testing.assert_allclose(got, ref, atol=2e-5, rtol=0)  # measured: under 1e-7
        assert (got.argmax(1) == ref.argmax(1)).all()
    # length-adaptive runs quantize the same points on the kept tokens: keeping every token changes nothing
    np.testing.assert_allclose(rt(batch["input_ids"], batch["attention_mask"], length_config=[64, 64]), got,
                               atol=1e-6)


def test_activation_points_unknown_to_the_runtime_rejected(sparse_4x1, tmp_path):
    from transformers import AutoTokenizer

    batch = AutoTokenizer.from_pretrained(sparse_4x1)(TEXTS, padding=True, return_tensors="pt")
    converted, activations = _calibrated(sparse_4x1, batch, activations={"residual_sums": True})
    bad = {"bert.embeddings.LayerNorm.output": next(iter(activations.values()))}
    with pytest.raises(SparsifyError, match="replays only"):
        export(sparse_4x1, tmp_path / "x", quantized=converted, activations=bad)
    export(sparse_4x1, tmp_path / "a", quantized=converted, activations=activations)
    m = json.loads((tmp_path / "a" / MANIFEST).read_text())
    m["activations"]["bert.encoder.layer.0.attention.output.dense.output"] = {"bits": 8}
    (tmp_path / "a" / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="does not know"):
        SparseModel.from_pretrained(tmp_path / "a")


def test_int8_word_embeddings(sparse_4x1, tmp_path):
    """int8 word embeddings (one scale per row): the runtime equals PyTorch given the same dequantized rows,
    and the quantized model exports them by default."""
    from safetensors.numpy import load_file
    from transformers import AutoTokenizer

    summary = export(sparse_4x1, tmp_path / "a", embeddings="int8")
    t = load_file(str(tmp_path / "a" / WEIGHTS))
    codes, scales = t["bert.embeddings.word_embeddings.weight"], t["bert.embeddings.word_embeddings.scales"]
    assert codes.dtype == np.int8 and scales.shape == (codes.shape[0],)
    assert summary["manifest"]["embeddings"]["word"].startswith("int8")
    word = codes.astype(np.float32) * scales[:, None]
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(sparse_4x1).eval()
    original = model.get_input_embeddings().weight.detach().numpy()
    assert 0 < np.abs(word - original).max() <= scales.max() / 2 + 1e-7
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(torch.from_numpy(word))
    batch = AutoTokenizer.from_pretrained(sparse_4x1)(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = model(**batch).logits.numpy()
    got = SparseModel.from_pretrained(tmp_path / "a", threads=1)(batch["input_ids"], batch["attention_mask"])
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
    # default: as the run trained them. float32 for a float model and for a quantized one that trained them
    # float32 (with a note saying how to get int8); int8 when quantization.json records int8 rows
    assert export(sparse_4x1, tmp_path / "f")["manifest"]["embeddings"]["word"] == "float32"
    converted, activations = _calibrated(sparse_4x1, batch)
    from sparsify.techniques.quantization import save_converted

    run = tmp_path / "run"
    shutil.copytree(sparse_4x1, run)
    save_converted(run, converted, activations)
    q = export(run, tmp_path / "q32")
    assert q["manifest"]["embeddings"]["word"] == "float32"
    assert any("--embeddings int8" in n for n in q["notes"])
    save_converted(run, converted, activations, embeddings="bert.embeddings.word_embeddings")
    q = export(run, tmp_path / "q")
    assert q["manifest"]["embeddings"]["word"].startswith("int8") and not q["notes"]
    ref_q = _converted_logits(sparse_4x1, batch, converted, activations, word=word)
    got_q = SparseModel.from_pretrained(tmp_path / "q", threads=1)(batch["input_ids"], batch["attention_mask"])
    np.testing.assert_allclose(got_q, ref_q, atol=2e-3, rtol=1e-3)


# ------------------------------------------------------------------------------------------------ hf / onnx / CLI
def test_hf_export_loads_in_plain_transformers(sparse_4x1, tmp_path, capsys):
    assert export_main([str(sparse_4x1), "-o", str(tmp_path / "hf"), "--format", "hf"]) == 0
    assert "dense fp32" in capsys.readouterr().out
    ref, batch = _torch_logits(sparse_4x1, TEXTS)
    got, _ = _torch_logits(tmp_path / "hf", TEXTS)
    np.testing.assert_allclose(got, ref, atol=1e-6)
    assert export_main([str(sparse_4x1), "-o", str(tmp_path / "hf")]) == 2  # not empty, no --overwrite
    assert "exists" in capsys.readouterr().err
    assert export_main([str(tmp_path / "missing"), "-o", str(tmp_path / "x")]) == 2


def test_onnx_export_matches(sparse_4x1, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (bench extra)")
    pytest.importorskip("onnx")
    export(sparse_4x1, tmp_path / "o", format="onnx")
    ref, batch = _torch_logits(sparse_4x1, TEXTS)
    sess = ort.InferenceSession(str(tmp_path / "o" / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {k: batch[k].numpy() for k in ("input_ids", "attention_mask", "token_type_ids")})[0]
    np.testing.assert_allclose(got, ref, atol=1e-4)


def test_predict_cli(artifact, tmp_path, capsys):
    from sparsify.predict import main as predict_main

    assert predict_main([str(artifact), "--text", "good fun", "--text", "bad", "--threads", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].endswith("good fun")
    f = tmp_path / "t.txt"
    f.write_text("good\n\nbad\tdull\n")
    assert predict_main([str(artifact), "--file", str(f), "--json"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [r["text"] for r in rows] == ["good", "bad | dull"]
    f.write_text("\n")
    assert predict_main([str(artifact), "--file", str(f)]) == 2
    assert predict_main([str(tmp_path), "--text", "x"]) == 2
    assert "error:" in capsys.readouterr().err


def test_bench_quick_smoke(artifact, tmp_path, capsys):
    from sparsify.bench_model import SCENARIOS, main as bench_main

    out = tmp_path / "b.json"
    assert bench_main([str(artifact), "--quick", "--json", str(out), "--methods", "sparsify,torch_fp32",
                       "--threads", "1", "--no-cold-start"]) == 0
    res = json.loads(out.read_text())
    recs = res["records"]
    assert {r["scenario"] for r in recs} == set(SCENARIOS)
    assert {r["method"] for r in recs} == {"sparsify", "torch_fp32"}
    for r in recs:
        assert r["median_ms"] > 0 and r["items_per_s"] > 0 and r["speedup_vs_torch_fp32"] > 0
    assert res["parity"]["argmax_agreement"] == 1.0
    assert "speedup" in capsys.readouterr().out
    if Path("/proc/cpuinfo").is_file():  # timings are comparable only on the same CPU: its SIMD flags are recorded
        assert res["cpu"]["cpu_count"] >= 1 and any(f.startswith(("avx", "sse", "neon", "asimd"))
                                                    for f in res["cpu"]["flags"])


def test_bench_settle_must_be_a_sane_pause(artifact, capsys):
    from sparsify.bench_model import main as bench_main

    for bad in ("-1", "11"):
        with pytest.raises(SystemExit) as e:
            bench_main([str(artifact), "--quick", "--settle", bad])
        assert e.value.code == 2
        assert "--settle must be in [0, 10]" in capsys.readouterr().err


def test_cold_start_measures_both_engines(artifact, tmp_path, monkeypatch):
    """A fresh process to its first prediction, ours and PyTorch's (the torch one once failed with an IndexError)."""
    from sparsify.bench_model import _cold_starts, dense_torch_model
    from sparsify.runtime import SparseModel

    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # as a user starting the bench in the repository root
    model = dense_torch_model(SparseModel.from_pretrained(artifact, threads=1))
    cold = _cold_starts(artifact, model, tmp_path, threads=1, seq=16, int8_weights="dequantize", quick=False)
    assert set(cold) == {"sparsify", "torch_fp32"}
    for kind, c in cold.items():
        assert "error" not in c, (kind, c)
        assert 0 < c["load_s"] < c["cold_start_s"] and c["peak_rss_mb"] > 0
