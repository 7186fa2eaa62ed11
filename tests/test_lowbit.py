"""Low-bit storage: packing of 4- and 2-bit codes, int4 / 2-bit word-embedding rows (QAT, export, runtime decode),
int4 Linear weights, FP8 fake quantization, and the artifact's size by part.

Tiny models built in code or from the conftest fixtures; no network, no real checkpoints.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from pydantic import ValidationError

from sparsify.packing import pack_int4, pack_uint2, packed_cols, unpack_int4, unpack_uint2
from sparsify.techniques.quantization import QuantizationConfig, Quantizer, calibrate, convert_activations
from sparsify.techniques.quantization import lowbit

TEXTS = ["the movie was good and fun", "a dull boring plot", "great", "the film is very bad and the music is sad",
         "superb lovely story and a bright scene", "weak"]


# -- packing ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cols", [1, 2, 3, 7, 8, 33])
def test_packing_round_trips_and_is_row_addressable(cols):
    rng = np.random.default_rng(cols)
    c4 = rng.integers(-8, 8, (5, cols)).astype(np.int8)
    p4 = pack_int4(c4)
    assert p4.dtype == np.uint8 and p4.shape == (5, packed_cols(cols, 4)) == (5, (cols + 1) // 2)
    np.testing.assert_array_equal(unpack_int4(p4, cols), c4)
    np.testing.assert_array_equal(unpack_int4(p4[3:4], cols), c4[3:4])  # each row starts on a byte
    c2 = rng.integers(0, 4, (5, cols)).astype(np.uint8)
    p2 = pack_uint2(c2)
    assert p2.shape == (5, (cols + 3) // 4)
    np.testing.assert_array_equal(unpack_uint2(p2, cols), c2)
    # the documented bit layout: first code in the low bits
    assert pack_int4(np.array([[-8, 7]]))[0, 0] == 0x00 | (15 << 4)
    assert pack_uint2(np.array([[1, 2, 3, 0]]))[0, 0] == 1 | (2 << 2) | (3 << 4)
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(np.array([[8]]))
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        pack_uint2(np.array([[4]]))


# -- word-embedding rows ---------------------------------------------------------------------------------------


def _table(rows=64, width=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(rows, width, generator=g) * 0.05
    t[3, 5] = 0.9  # an outlier (positive extreme)
    t[4, 6] = -0.7  # a negative extreme
    t[7] = 0.0  # an all-zero row
    return t


def test_int4_rows_are_symmetric_full_range():
    t = _table()
    codes, scales, offsets = lowbit.quantize_rows(t, 4)
    assert offsets is None and codes.dtype == torch.int8
    assert int(codes.min()) == -8 and int(codes.max()) <= 7
    deq = lowbit.dequantize_rows(codes, scales)
    amax = t.abs().amax(dim=1)
    nonzero = amax > 0
    # the row's extreme value lands on code -8 exactly (sign of the scale chosen for it)
    extreme = t.gather(1, t.abs().argmax(dim=1, keepdim=True)).squeeze(1)
    assert torch.equal(deq.gather(1, t.abs().argmax(dim=1, keepdim=True)).squeeze(1)[nonzero], extreme[nonzero])
    assert (codes.gather(1, t.abs().argmax(dim=1, keepdim=True)).squeeze(1)[nonzero] == -8).all()
    assert scales[3] < 0 and scales[4] > 0  # positive extreme -> negative scale
    # every value within half a step, except the opposite extreme that code 7 cannot reach (one step)
    err = (deq - t).abs()
    assert (err <= scales.abs()[:, None] * 0.5 + 1e-7).float().mean() > 0.99
    assert (err <= scales.abs()[:, None] + 1e-7).all()
    assert torch.equal(deq[7], torch.zeros(32)) and scales[7] == 1.0


def test_int2_rows_take_the_least_squared_error_range():
    t = _table()
    codes, scales, offsets = lowbit.quantize_rows(t, 2)
    assert int(codes.min()) >= 0 and int(codes.max()) <= 3
    deq = lowbit.dequantize_rows(codes, scales, offsets)
    err = (deq.double() - t.double()).pow(2).sum(1)
    # brute force over the same candidates, row by row
    for r in range(t.shape[0]):
        row = t[r]
        best = None
        for a in lowbit.INT2_ALPHAS:
            lo, hi = float(row.min()) * a, float(row.max()) * a
            s = (hi - lo) / 3 or 1.0
            q = torch.round((row - lo) / s).clamp(0, 3) * s + lo
            e = float((q.double() - row.double()).pow(2).sum())
            best = e if best is None else min(best, e)
        assert float(err[r]) <= best * (1 + 1e-5) + 1e-12, r
    # the search matters: the outlier row is clipped (alpha < 1), better than the min-max range
    lo, hi = float(t[3].min()), float(t[3].max())
    s = (hi - lo) / 3
    minmax = float(((torch.round((t[3] - lo) / s).clamp(0, 3) * s + lo - t[3]) ** 2).sum())
    assert float(err[3]) < 0.75 * minmax  # measured 0.29 against 0.51
    # a row quantized alone chooses what it chooses within the table (QAT lookups vs the export)
    for r in (0, 3, 7):
        c1, s1, o1 = lowbit.quantize_rows(t[r:r + 1], 2)
        assert torch.equal(c1[0], codes[r]) and s1[0] == scales[r] and o1[0] == offsets[r]


@pytest.mark.parametrize("bits", [4, 2])
def test_qat_rows_are_the_rows_the_export_packs(bits):
    """With embedding_bits 4 / 2 the looked-up rows during QAT are exactly the packed rows of the export, decoded
    as the runtime decodes them (numba), and the table still gets gradients."""
    from sparsify.export import _pack_word_rows
    from sparsify.runtime.ops import decode_rows

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64)
    model = transformers.BertForSequenceClassification(cfg)
    table = model.get_input_embeddings().weight
    q = Quantizer(QuantizationConfig(start_step=0, freeze_after_steps=2, embedding_bits=bits))
    q.prepare(model, total_steps=10)
    seen = {}
    model.get_input_embeddings().register_forward_hook(lambda m, a, out: seen.update(out=out))
    ids = torch.randint(0, 100, (3, 7), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=torch.tensor([0, 1, 0])).loss.backward()
    packed = _pack_word_rows("w.", table.detach().numpy(), bits)
    rows = decode_rows(ids.reshape(-1).numpy(), packed["w.packed"], bits, packed["w.scales"],
                       packed.get("w.offsets"), 32)
    assert torch.equal(seen["out"].reshape(-1, 32), torch.from_numpy(rows))
    assert not torch.equal(seen["out"], table.detach()[ids])  # rounding changed them: the check can fail
    assert table.grad is not None and table.grad.abs().sum() > 0
    assert packed["w.packed"].shape == (100, 32 * bits // 8)


def test_embedding_bits_config_errors_name_the_key():
    with pytest.raises(ValidationError, match="embedding_bits"):
        QuantizationConfig(embedding_bits=3)
    with pytest.raises(ValidationError, match="embedding_bits.*needs embeddings: true"):
        QuantizationConfig(embedding_bits=4, embeddings=False)


def _sparse_dir(src: Path, dst: Path, sparsity=0.6, seed=0) -> Path:
    torch.manual_seed(seed)
    model = transformers.BertForSequenceClassification.from_pretrained(src).eval()
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.mul_(8.0 if name == "classifier" else 3.0)
                if "encoder" in name:
                    keep = torch.rand(mod.weight.shape[0] // 4, mod.weight.shape[1]) >= sparsity
                    mod.weight.mul_(keep.repeat_interleave(4, 0))
        emb = model.get_input_embeddings().weight
        emb.mul_(10.0)  # the rows dominate the embedding sum: their rounding shows in the logits
    model.save_pretrained(dst)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / f).is_file():
            shutil.copyfile(src / f, dst / f)
    return dst


@pytest.mark.parametrize("bits", [4, 2])
def test_lowbit_embedding_artifact_matches_the_fake_quant_model(tiny_model_dir, tmp_path, bits):
    """PTQ with embedding_bits 4 / 2 (int8 Linear layers, uint8 inputs): the exported artifact stores the packed
    rows (two / four codes per byte), the runtime decodes them at lookup, and its logits equal the fake-quant
    PyTorch model's (labels 100%); the run's quantization.json makes the export choose the bits by itself."""
    from safetensors.numpy import load_file

    from sparsify.export import export
    from sparsify.runtime import SparseModel
    from sparsify.runtime.model import WEIGHTS
    from sparsify.techniques.quantization import save_converted

    src = _sparse_dir(tiny_model_dir, tmp_path / "m")
    tok = transformers.AutoTokenizer.from_pretrained(src)
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    model = transformers.BertForSequenceClassification.from_pretrained(src).eval()
    q = calibrate(model, [dict(batch)], QuantizationConfig(mode="ptq", calibration_batches=1, embedding_bits=bits))
    with torch.no_grad():
        fake = model(**batch).logits.numpy()
    save_converted(src, q.convert(), convert_activations(q), q.embedding_name, bits)
    summary = export(src, tmp_path / "a")
    m = summary["manifest"]
    assert m["embeddings"]["bits"] == bits and m["embeddings"]["word"].startswith("int4" if bits == 4 else "2-bit")
    t = load_file(str(tmp_path / "a" / WEIGHTS))
    vocab, width = model.get_input_embeddings().weight.shape
    base = "bert.embeddings.word_embeddings."
    assert t[base + "packed"].dtype == np.uint8 and t[base + "packed"].shape == (vocab, width * bits // 8)
    assert base + "weight" not in t and (base + "offsets" in t) == (bits == 2)
    rt = SparseModel.from_pretrained(tmp_path / "a", threads=1)
    got = rt(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    np.testing.assert_allclose(got, fake, atol=2e-5, rtol=0)  # measured 6e-8 (4 and 2 bits)
    assert (got.argmax(1) == fake.argmax(1)).all()
    # the same artifact with float32 rows is much further off: the check above can fail
    export(src, tmp_path / "f32", embeddings="float32")
    f32 = SparseModel.from_pretrained(tmp_path / "f32", threads=1)(batch["input_ids"], batch["attention_mask"],
                                                                   batch["token_type_ids"])
    assert np.abs(f32 - fake).max() > 10 * np.abs(got - fake).max()
    q.remove()
    # the runtime's decoded table is the rounded table
    np.testing.assert_array_equal(rt.word_table(), lowbit.rounded_rows(model.get_input_embeddings().weight, bits)
                                  .detach().numpy())
    # hf export holds the same rounded rows
    export(src, tmp_path / "hf", "hf")
    hf = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "hf")
    assert torch.equal(hf.get_input_embeddings().weight, lowbit.rounded_rows(model.get_input_embeddings().weight,
                                                                                 bits))


# -- int4 weights -------------------------------------------------------------------------------------------------


def test_int4_weights_per_channel_and_masks_exact():
    from sparsify.techniques.quantization import fake_quant as fq

    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 16, generator=g)
    mask = torch.rand(8, 16, generator=g) > 0.5
    codes, scale = fq.quantize_weight(w, mask, bits=4)
    assert int(codes.abs().max()) == 7 and codes.dtype == torch.int8
    assert (codes[~mask] == 0).all()
    fake = fq.fake_quantize_weight(w, mask, bits=4)
    assert torch.equal(fake, codes.float() * scale[:, None])
    assert (fake[~mask] == 0).all()
    err = (fake - w * mask).abs()
    assert (err <= scale[:, None] / 2 + 1e-6).all() and err.max() > scale.min() / 8  # 15 levels, visibly coarse
    assert torch.equal(scale, (w * mask).abs().amax(1) / 7)


@pytest.mark.parametrize("symmetric", [True, False])
def test_group_rtn_weights(symmetric):
    from sparsify.techniques.quantization import fake_quant as fq

    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 32, generator=g) + (0.0 if symmetric else 0.7)
    w[:, 8:16] *= 20  # one group with a wider range: its own scale
    mask = torch.rand(4, 32, generator=g) > 0.3
    q = fq.rtn_group_weight(w, mask, bits=4, group_size=8, symmetric=symmetric)
    assert (q[~mask] == 0).all()  # pruned weights stay exactly zero
    wm = (w * mask).reshape(4, 4, 8)
    if symmetric:
        step = wm.abs().amax(-1, keepdim=True) / 7
    else:
        step = (wm.amax(-1, keepdim=True).clamp(min=0) - wm.amin(-1, keepdim=True).clamp(max=0)) / 15
    err = (q.reshape(4, 4, 8) - wm).abs()
    assert (err <= step / 2 * (1 + 1e-5) + 1e-6).all()
    levels = [len(torch.unique(q.reshape(4, 4, 8)[r, c])) for r in range(4) for c in range(4)]
    assert max(levels) <= (15 if symmetric else 16)
    # per channel would be much worse on the narrow groups: the groups matter
    per_channel = fq.fake_quantize_weight(w, mask, bits=4)
    assert (per_channel - w * mask)[:, :8].abs().mean() > 3 * (q - w * mask)[:, :8].abs().mean()


def _field(excinfo):
    from sparsify.config import FieldError

    first = excinfo.value.errors()[0]
    inner = first.get("ctx", {}).get("error")
    return tuple(first["loc"]) + (inner.field if isinstance(inner, FieldError) else ())


@pytest.mark.parametrize("kw, field, message", [
    ({"weight_bits": 2}, ("weight_bits",), "8 or 4"),
    ({"weight_group_size": 32}, ("weight_group_size",), "post-training mode"),
    ({"mode": "ptq", "weight_group_size": 4}, ("weight_group_size",), "greater than or equal to 8"),
    ({"mode": "ptq", "weight_scheme": "asymmetric"}, ("weight_scheme",), "need weight_group_size"),
    ({"mode": "ptq", "weight_group_size": 32, "weight_scheme": "zero"}, ("weight_scheme",), "symmetric"),
    ({"embedding_bits": 3}, ("embedding_bits",), "8, 4 or 2"),
    ({"embedding_bits": 4, "embeddings": False}, ("embedding_bits",), "needs embeddings: true"),
])
def test_new_keys_validate_themselves(kw, field, message):
    with pytest.raises(ValidationError, match=message) as e:
        QuantizationConfig(**kw)
    assert _field(e) == field


def test_weight_config_errors_name_the_key():
    from sparsify.config import FieldError

    model = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(FieldError, match="does not divide in_features 32") as e:
        Quantizer(QuantizationConfig(mode="ptq", weight_group_size=24)).prepare(model)
    assert e.value.field == ("weight_group_size",)


def _w4_qat(src: Path, batch, steps=4):
    """W4A8 QAT of ``src``'s encoder Linear layers with their pruning masks (zeros of the weights), a few steps."""
    model = transformers.BertForSequenceClassification.from_pretrained(src)
    masks = {n: m.weight != 0 for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "encoder" in n}
    q = Quantizer(QuantizationConfig(start_step=0, freeze_after_steps=2, weight_bits=4))
    q.prepare(model, total_steps=steps + 1, masks=masks)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    labels = torch.tensor([1, 0, 1, 0, 1, 0])
    model.train()
    for step in range(1, steps + 1):
        model(**batch, labels=labels).loss.backward()
        for n, m in model.named_modules():
            if n in masks:
                m.weight.grad.mul_(masks[n])
        opt.step()
        opt.zero_grad()
        q.step(step)
    q.finalize(model)
    return model, q, masks


def test_w4a8_qat_artifact_matches_the_fake_quant_model(tiny_model_dir, tmp_path):
    """W4A8 QAT: the conversion holds codes in [-7, 7] with the pruned weights exactly 0; the artifact packs them two
    per byte (int4 layers), the runtime unpacks them to exactly those int8 codes, and its logits equal the
    fake-quant model's, labels 100%."""
    from safetensors.numpy import load_file

    from sparsify.export import export
    from sparsify.runtime import SparseModel
    from sparsify.runtime.model import WEIGHTS
    from sparsify.techniques.quantization import save_converted

    src = _sparse_dir(tiny_model_dir, tmp_path / "m")
    tok = transformers.AutoTokenizer.from_pretrained(src)
    batch = dict(tok(TEXTS, padding=True, return_tensors="pt"))
    model, q, masks = _w4_qat(src, batch)
    with torch.no_grad():
        fake = model(**batch).logits.numpy()
    conv = q.convert()
    for name, e in conv.items():
        codes = e["weight_int8"]
        assert e["bits"] == 4 and int(codes.abs().max()) <= 7 and int(codes.abs().max()) == 7
        assert (codes[~masks[name]] == 0).all(), name  # masks stay exact zeros
    model.save_pretrained(src)  # the trained float weights, as the trainer saves them
    save_converted(src, conv, convert_activations(q), q.embedding_name, 8)
    summary = export(src, tmp_path / "a")
    layers = summary["manifest"]["layers"]
    assert all(m["dtype"] == "int4" and m["block"] == "4x1" for m in layers.values())
    t = load_file(str(tmp_path / "a" / WEIGHTS))
    name = "bert.encoder.layer.0.intermediate.dense"
    n_codes = int(np.prod(layers[name]["codes_shape"]))
    assert t[name + ".data"].dtype == np.uint8 and t[name + ".data"].shape == ((n_codes + 1) // 2,)
    keep = SparseModel.from_pretrained(tmp_path / "a", threads=1, int8_weights="keep")
    m = keep.layers[0].inter
    assert m.dtype == np.int8
    from sparsify.kernels.format import BlockSparseMatrix

    codes_only = BlockSparseMatrix(m.shape, m.block, m.indptr, m.indices, m.data, np.ones(m.shape[0], np.float32))
    np.testing.assert_array_equal(codes_only.to_dense(), conv[name]["weight_int8"].numpy())
    for mode in ("keep", "dequantize"):
        rt = SparseModel.from_pretrained(tmp_path / "a", threads=1, int8_weights=mode)
        got = rt(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        np.testing.assert_allclose(got, fake, atol=2e-5, rtol=0)  # measured 7e-8 (logits up to 0.14)
        assert (got.argmax(1) == fake.argmax(1)).all()
    # an int8 export of the same trained weights differs: int4 rounding reached the logits
    q8 = {n: dict(e, bits=8) for n, e in conv.items()}
    from sparsify.techniques.quantization import fake_quant as fq

    for n, e in q8.items():
        w = dict(model.named_modules())[n].weight
        e["weight_int8"], e["weight_scale"] = fq.quantize_weight(w, masks[n], bits=8)
    export(src, tmp_path / "b", quantized=q8, activations=convert_activations(q))
    got8 = SparseModel.from_pretrained(tmp_path / "b", threads=1)(batch["input_ids"], batch["attention_mask"],
                                                                  batch["token_type_ids"])
    assert np.abs(got8 - fake).max() > 5 * np.abs(got - fake).max()


# -- FP8 ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, count, largest, tiniest", [
    ("e4m3", 253, 448.0, 2.0 ** -9), ("e5m2", 247, 57344.0, 2.0 ** -16), ("e3m4", 253, 30.0, 2.0 ** -6)])
def test_fp8_rounding_against_the_exhaustive_table(name, count, largest, tiniest):
    """Every finite value of the format (decoded from its 256 bit patterns) is kept exactly; midpoints go to the
    even mantissa; anything else goes to the nearest value; beyond the largest magnitude it saturates."""
    from sparsify.techniques.quantization import fp8

    table = fp8.representable_values(name)
    assert len(table) == count and table.max() == largest and table[table > 0].min() == tiniest
    assert torch.equal(fp8.round_to_fp8(table.float(), name).double(), table)
    pos = table[table >= 0]  # bit patterns 0, 1, 2, ... in increasing value: mantissa parity = index parity
    mid = ((pos[:-1] + pos[1:]) / 2).float()
    assert torch.equal(mid.double(), (pos[:-1] + pos[1:]) / 2)  # the midpoints are exact in float32
    got = fp8.round_to_fp8(mid, name).double()
    even = torch.where(torch.arange(len(pos) - 1) % 2 == 0, pos[:-1], pos[1:])
    assert torch.equal(got, even)
    assert torch.equal(fp8.round_to_fp8(-mid, name).double(), -even)
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(20000, generator=g) * largest / 3, torch.randn(20000, generator=g) * tiniest * 30])
    q = fp8.round_to_fp8(x, name).double()
    xd = x.double().clamp(-largest, largest)
    nearest = (xd[:, None] - table[None, :]).abs().min(dim=1).values
    assert torch.equal((q - xd).abs(), nearest)
    assert torch.isin(q, table).all()
    big = torch.tensor([largest * 1.02, largest * 10, 1e30, float("inf"), -float("inf")])
    assert torch.equal(fp8.round_to_fp8(big, name), torch.tensor([largest] * 4 + [-largest]))
    assert torch.isnan(fp8.round_to_fp8(torch.tensor([float("nan")]), name)).all()


@pytest.mark.parametrize("name", ["e4m3", "e5m2"])
def test_fp8_matches_torch_casts_after_a_clamp(name):
    """torch's float8 casts round the same way but do not saturate (NaN / inf): equal once clamped."""
    from sparsify.techniques.quantization import fp8

    dtype = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}[name]
    largest = fp8.FORMATS[name].max_value
    x = torch.randn(100000, generator=torch.Generator().manual_seed(1)) * largest / 4
    assert torch.equal(fp8.round_to_fp8(x, name), x.clamp(-largest, largest).to(dtype).float())
    if name == "e5m2":  # torch 2.13 on CPU: E5M2 overflows to infinity (its E4M3FN cast saturates): we clamp
        assert not torch.isfinite(torch.tensor([largest * 2]).to(dtype).float()).all()


def test_e3m4_matches_ml_dtypes_in_their_common_range():
    """ml_dtypes' float8_e3m4 is the IEEE-like variant (largest 15.5); below that both hold the same values."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    from sparsify.techniques.quantization import fp8

    x = torch.randn(100000, generator=torch.Generator().manual_seed(2)) * 4
    x = x[x.abs() < 15.5]
    ref = torch.from_numpy(x.numpy().astype(ml_dtypes.float8_e3m4).astype(np.float32))
    assert torch.equal(fp8.round_to_fp8(x, "e3m4"), ref)


def _tiny(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(cfg)


def on_grid_ok(v: torch.Tensor, table: torch.Tensor) -> bool:
    """Every value of ``v`` is a value of ``table`` up to float32 rounding (``v`` = FP8 value x scale / scale)."""
    v = v.double().flatten()
    nearest = table[(v[:, None] - table[None, :]).abs().argmin(dim=1)]
    return bool(((v - nearest).abs() <= 1e-6 * nearest.abs() + 1e-30).all())


def on_grid(v, table):
    assert on_grid_ok(v, table)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2", "e3m4"])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_fp8_ptq_weights_and_activations(fmt, granularity):
    """PTQ: every quantized Linear computes with FP8 weights (a scale per tensor / output channel, pruned weights
    still 0) on FP8 activations (a scale per tensor / feature from the calibrated range); convert refuses."""
    from sparsify.errors import SparsifyError
    from sparsify.techniques.quantization import fp8

    model = _tiny().eval()
    ids = torch.randint(0, 100, (4, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    name = "bert.encoder.layer.0.intermediate.dense"
    layer = dict(model.named_modules())[name]
    mask = torch.rand(layer.weight.shape, generator=torch.Generator().manual_seed(4)) > 0.5
    cfg = QuantizationConfig(mode="ptq", calibration_batches=1, weight_format=fmt, activation_format=fmt,
                             fp8_granularity=granularity)
    q = calibrate(model, [{"input_ids": ids}], cfg, masks={name: mask})
    table = fp8.representable_values(fmt)
    largest = fp8.FORMATS[fmt].max_value
    w = q._fake_weight(layer.weight, q.layers[name].mask).detach()
    assert (w[~mask] == 0).all()
    amax = (layer.weight * mask).abs().detach()
    amax = amax.amax(1, keepdim=True) if granularity == "channel" else amax.amax()
    scale = amax / largest
    on_grid(w / scale, table)  # FP8 values times the scale
    assert not on_grid_ok(layer.weight.detach() * mask / scale, table)  # the float weights are not: it can fail
    point = q.points[f"{name}.input"]
    assert point.scale.shape == ((32,) if granularity == "channel" else ())
    captured = {}
    layer.register_forward_pre_hook(lambda m, a: captured.update(x=a[0]))
    with torch.no_grad():
        out = model(input_ids=ids).logits
    xs = captured["x"]  # what the Linear received, after the quantizer's fake quantization inside its forward
    assert not torch.equal(out, ref)
    seen = {}

    def spy(x, scale, f, _orig=fp8.fake_quantize_fp8):
        y = _orig(x, scale, f)
        seen.setdefault("pairs", []).append((x, scale, y))
        return y

    import sparsify.techniques.quantization.quantizer as qmod

    qmod.fp8_ops.fake_quantize_fp8, orig = spy, qmod.fp8_ops.fake_quantize_fp8
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        qmod.fp8_ops.fake_quantize_fp8 = orig
    x, s, y = next((x, s, y) for x, s, y in seen["pairs"] if x.shape[-1] == 32 and torch.equal(x, xs.float()))
    on_grid(y / s, table)
    assert not on_grid_ok(x / s, table)
    with pytest.raises(SparsifyError, match="emulation only"):
        q.convert()


def test_fp8_qat_trains_and_freezes():
    model = _tiny()
    q = Quantizer(QuantizationConfig(start_step=0, freeze_after_steps=2, weight_format="e4m3",
                                     activation_format="e4m3", fp8_granularity="channel"))
    q.prepare(model, total_steps=10)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(5)
    for step in range(1, 4):
        ids = torch.randint(0, 100, (4, 9), generator=g)
        loss = model(input_ids=ids, labels=torch.tensor([0, 1, 0, 1])).loss
        loss.backward()
        w = model.bert.encoder.layer[0].intermediate.dense.weight
        assert w.grad is not None and w.grad.abs().sum() > 0
        opt.step()
        opt.zero_grad()
        logs = q.step(step)
    assert q.frozen and logs["quant/frozen"] == 1.0 and logs["quant/weight_error"] > 0
    point = q.points["bert.encoder.layer.0.intermediate.dense.input"]
    assert point.scale.shape == (32,) and (point.scale > 0).all()
    state = q.state_dict()
    q2 = Quantizer(q.config)
    q2.prepare(_tiny(), total_steps=10)
    q2.load_state_dict(state)
    assert torch.equal(q2.points[point.name].scale, point.scale)


@pytest.mark.parametrize("kw, field, message", [
    ({"fp8_granularity": "channel"}, ("fp8_granularity",), "FP8 formats only"),
    ({"weight_format": "e4m3", "weight_bits": 4}, ("weight_bits",), "integer weights"),
    ({"activation_format": "e5m2", "peg": {"groups": 4}}, ("peg",), "fp8_granularity: channel"),
    ({"activation_format": "e3m4", "observer": "lsq"}, ("observer",), "minmax"),
    ({"weight_format": "e2m5"}, ("weight_format",), "e4m3"),
    ({"fp8_granularity": "group", "weight_format": "e4m3"}, ("fp8_granularity",), "tensor"),
])
def test_fp8_keys_validate_themselves(kw, field, message):
    with pytest.raises(ValidationError, match=message) as e:
        QuantizationConfig(**kw)
    assert _field(e) == field


def test_fp8_ptq_through_the_trainer_writes_no_conversion(make_recipe):
    """A PTQ recipe with FP8 formats runs through the trainer (calibration, evaluation of the fake-quant model);
    there is nothing to convert or export, so no quantization.json and no conversion parity."""
    from sparsify.recipe import load_recipe
    from sparsify.train import train

    ptq = {"kind": "quantization", "mode": "ptq", "calibration_batches": 2, "weight_format": "e4m3",
           "activation_format": "e4m3", "fp8_granularity": "channel"}
    recipe = load_recipe(make_recipe(training={"steps": 1, "eval_every": None, "save_every": None},
                                     techniques=[ptq]))
    run_dir = train(recipe, progress=False)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "accuracy" in metrics["metrics"] and "conversion_parity" not in metrics
    assert not (run_dir / "model" / "quantization.json").exists()


@pytest.mark.parametrize("key, value, allowed", [
    ("embedding_bits", 3, "8, 4 or 2"), ("weight_bits", 2, "8 or 4"), ("weight_format", "fp8", "'e4m3'"),
    ("activation_format", "e4m2", "'e3m4'"), ("weight_scheme", "zero", "'asymmetric'")])
def test_recipe_errors_give_file_line_key_and_allowed_values(make_recipe, key, value, allowed):
    from sparsify.errors import RecipeError
    from sparsify.recipe import load_recipe

    bad = {"kind": "quantization", "mode": "ptq", key: value}
    if key == "weight_scheme":
        bad["weight_group_size"] = 32
    with pytest.raises(RecipeError) as e:
        load_recipe(make_recipe(techniques=[bad]))
    message = str(e.value)
    assert len(message.strip().splitlines()) == 1, message
    assert f"techniques[0].{key}" in message and allowed in message
    assert __import__("re").search(r"recipe\d+\.yaml:\d+: ", message), message


# -- size by part -------------------------------------------------------------------------------------------------


def test_export_reports_the_size_by_part(tiny_model_dir, tmp_path, capsys):
    """The summary dict and the CLI give the artifact's bytes by part; the parts add up to the artifact, each
    part equals the bytes of its tensors or files, and low-bit rows shrink the embeddings part as computed."""
    from safetensors.numpy import load_file

    from sparsify.export import SIZE_PARTS, export, main
    from sparsify.runtime.model import WEIGHTS

    src = _sparse_dir(tiny_model_dir, tmp_path / "m")
    sizes = {}
    for emb in ("float32", "int8", "int4", "int2"):
        s = export(src, tmp_path / emb, embeddings=emb)
        parts = s["size_by_part"]
        assert tuple(parts) == SIZE_PARTS and sum(parts.values()) == s["artifact_bytes"]
        t = load_file(str(tmp_path / emb / WEIGHTS))
        assert parts["embeddings"] == sum(a.nbytes for k, a in t.items() if k.startswith("bert.embeddings."))
        assert parts["indices"] == sum(a.nbytes for k, a in t.items() if k.endswith((".indptr", ".indices")))
        assert parts["encoder_weights"] == sum(a.nbytes for k, a in t.items() if "encoder" in k and "LayerNorm"
                                               not in k and k.endswith((".data", ".weight", ".bias")))
        assert parts["tokenizer"] == sum((tmp_path / emb / f).stat().st_size for f in s["manifest"]["files"]
                                         if f != WEIGHTS)
        assert parts["indices"] > 0 and parts["encoder_weights"] > 0 and parts["other"] > 0
        assert parts["scales"] == 0  # float32 Linear layers here (the word rows' scales count as embeddings)
        sizes[emb] = parts["embeddings"]
    vocab, width = transformers.AutoConfig.from_pretrained(src).vocab_size, 32
    rest = sizes["float32"] - vocab * width * 4
    assert sizes["int8"] == rest + vocab * width + vocab * 4
    assert sizes["int4"] == rest + vocab * width // 2 + vocab * 4
    assert sizes["int2"] == rest + vocab * width // 4 + vocab * 8  # scales and offsets
    assert main([str(src), "-o", str(tmp_path / "cli"), "--embeddings", "int4"]) == 0
    out = capsys.readouterr().out
    assert "size by part: embeddings" in out and "encoder weights" in out and "tokenizer" in out


def test_size_by_part_counts_quantization_scales(tiny_model_dir, tmp_path):
    """An int8 / int4 export: weight and activation scales are their own part, and int4 layers halve the encoder
    weights part against int8 (same blocks)."""
    from sparsify.export import export

    src = _sparse_dir(tiny_model_dir, tmp_path / "m")
    tok = transformers.AutoTokenizer.from_pretrained(src)
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    parts = {}
    for bits in (8, 4):
        model = transformers.BertForSequenceClassification.from_pretrained(src).eval()
        q = calibrate(model, [dict(batch)], QuantizationConfig(mode="ptq", calibration_batches=1, weight_bits=bits))
        s = export(src, tmp_path / str(bits), quantized=q.convert(), activations=convert_activations(q))
        parts[bits] = s["size_by_part"]
        layers = s["manifest"]["layers"].values()
        n_out = sum(m["shape"][0] for m in layers)
        assert parts[bits]["scales"] == n_out * 4 + sum(m["shape"][1] * 8 for m in layers)  # weight + input
    codes8 = parts[8]["encoder_weights"] - sum(m["shape"][0] * 4 for m in s["manifest"]["layers"].values())
    codes4 = parts[4]["encoder_weights"] - sum(m["shape"][0] * 4 for m in s["manifest"]["layers"].values())
    assert codes4 == (codes8 + 1) // 2 or abs(codes4 - codes8 / 2) <= len(s["manifest"]["layers"])
    assert parts[4]["indices"] == parts[8]["indices"]


# -- SignRound ----------------------------------------------------------------------------------------------------


def _calib_batches(n=4, seed=7):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 100, (4, 10), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 6:] = 0  # padding: left out of the loss
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 0, 1])})
    return out


def test_signround_lowers_the_block_error_and_keeps_masks():
    from sparsify.techniques.quantization import fake_quant as fq
    from sparsify.techniques.quantization.signround import signround

    model = _tiny(1).eval()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".encoder." in n}
    g = torch.Generator().manual_seed(8)
    masks = {n: (torch.rand(m.weight.shape, generator=g) > 0.5) for n, m in linears.items()}
    with torch.no_grad():
        for n, m in linears.items():
            m.weight.mul_(masks[n])
    before = {n: m.weight.detach().clone() for n, m in linears.items()}
    codes, stats = signround(model, _calib_batches(), linears, bits=4, iters=40, num_batches=4, masks=masks)
    assert set(codes) == set(linears) and len(stats["blocks"]) == 2
    for n, m in linears.items():
        c, s = codes[n]
        assert c.dtype == torch.int8 and int(c.abs().max()) <= 7
        assert (c[~masks[n]] == 0).all() and (m.weight[~masks[n]] == 0).all()  # pruned weights stay exactly 0
        assert torch.equal(m.weight.detach(), c.float() * s[:, None])
        # clipping only shrinks the range: the scale is at most round-to-nearest's
        _, s_rtn = fq.quantize_weight(before[n], masks[n], bits=4)
        assert (s <= s_rtn * (1 + 1e-6)).all()
    for b in stats["blocks"]:
        assert b["signround_loss"] <= b["rtn_loss"]
    assert any(b["signround_loss"] < 0.9 * b["rtn_loss"] for b in stats["blocks"]), stats
    assert any(not torch.equal(codes[n][0], fq.quantize_weight(before[n], masks[n], bits=4)[0]) for n in linears)


def test_signround_ptq_through_the_quantizer_exports_as_w4(tiny_model_dir, tmp_path):
    """rounding: signround in PTQ: the fake-quant model computes with SignRound's codes, convert hands them to the
    export (int4 layers, float inputs: weight-only), and the runtime computes what the fake-quant model does."""
    from sparsify.export import export
    from sparsify.runtime import SparseModel

    src = _sparse_dir(tiny_model_dir, tmp_path / "m")
    tok = transformers.AutoTokenizer.from_pretrained(src)
    batch = dict(tok(TEXTS, padding=True, return_tensors="pt"))
    model = transformers.BertForSequenceClassification.from_pretrained(src).eval()
    masks = {n: m.weight != 0 for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".encoder." in n}
    cfg = QuantizationConfig(mode="ptq", calibration_batches=2, weight_bits=4, rounding="signround",
                             signround_iters=20, embeddings=False, activations={"linear_inputs": False})
    q = calibrate(model, [batch, batch], cfg, masks=masks)
    assert q.signround_stats["iters"] == 20 and set(q.rounded) == set(masks)
    with torch.no_grad():
        fake = model(**batch).logits.numpy()
    conv = q.convert()
    for n, e in conv.items():
        assert torch.equal(e["weight_int8"], q.rounded[n][0]) and e["bits"] == 4 and e["input_bits"] == 32
        assert (e["weight_int8"][~masks[n]] == 0).all()
    s = export(src, tmp_path / "a", quantized=conv, activations=convert_activations(q), embeddings="float32")
    assert all(m["dtype"] == "int4" for m in s["manifest"]["layers"].values())
    got = SparseModel.from_pretrained(tmp_path / "a", threads=1)(batch["input_ids"], batch["attention_mask"],
                                                                 batch["token_type_ids"])
    np.testing.assert_allclose(got, fake, atol=2e-5, rtol=0)  # measured 6e-8


@pytest.mark.parametrize("kw, field, message", [
    ({"rounding": "signround"}, ("rounding",), "mode: ptq"),
    ({"mode": "ptq", "rounding": "signround", "weight_format": "e4m3"}, ("rounding",), "per-channel integer"),
    ({"mode": "ptq", "signround_iters": 10}, ("signround_iters",), "rounding: signround only"),
    ({"mode": "ptq", "rounding": "signround", "signround_iters": 0}, ("signround_iters",), "greater than or equal"),
    ({"mode": "ptq", "rounding": "adaround"}, ("rounding",), "'signround'"),
])
def test_signround_keys_validate_themselves(kw, field, message):
    with pytest.raises(ValidationError, match=message) as e:
        QuantizationConfig(**kw)
    assert _field(e) == field


def test_packed_artifacts_with_a_wrong_manifest_are_refused(tiny_model_dir, tmp_path):
    """The manifest says how the rows and layers are packed; an artifact whose manifest does not fit its tensors
    is refused with one line naming the part."""
    from sparsify.export import export
    from sparsify.runtime import ArtifactError, SparseModel
    from sparsify.runtime.model import MANIFEST

    src = _sparse_dir(tiny_model_dir, tmp_path / "m")
    tok = transformers.AutoTokenizer.from_pretrained(src)
    batch = dict(tok(TEXTS, padding=True, return_tensors="pt"))
    model = transformers.BertForSequenceClassification.from_pretrained(src).eval()
    q = calibrate(model, [batch], QuantizationConfig(mode="ptq", calibration_batches=1, weight_bits=4))
    export(src, tmp_path / "a", quantized=q.convert(), activations=convert_activations(q), embeddings="int4")
    SparseModel.from_pretrained(tmp_path / "a", threads=1)  # as exported: fine
    good = json.loads((tmp_path / "a" / MANIFEST).read_text())
    name = "bert.encoder.layer.0.intermediate.dense"
    for change, message in [
        (lambda m: m["embeddings"].update(bits=3), "embeddings.bits must be 8, 4 or 2"),
        (lambda m: m["embeddings"].update(bits=2), "2-bit token embeddings must be uint8"),
        (lambda m: m["layers"][name].update(codes_shape=[3, 4, 1]), "int4 layer"),
        (lambda m: m["layers"][name].pop("codes_shape"), "codes_shape"),
    ]:
        bad = json.loads(json.dumps(good))
        change(bad)
        (tmp_path / "a" / MANIFEST).write_text(json.dumps(bad))
        with pytest.raises(ArtifactError, match=message) as e:
            SparseModel.from_pretrained(tmp_path / "a", threads=1)
        assert len(str(e.value).splitlines()) == 1


def test_w4a8_qat_with_2bit_rows_through_the_trainer_and_export(make_recipe):
    """Pruning + W4A8 QAT with 2-bit word rows through the trainer: the conversion parity is recorded, the run's
    quantization.json says bits 4 / 2, and the default export packs both (int4 layers, 2-bit rows) into an
    artifact whose runtime agrees with the fake-quant evaluation."""
    from sparsify.export import export
    from sparsify.recipe import load_recipe
    from sparsify.runtime import SparseModel
    from sparsify.techniques.quantization.convert import load_run_conversion, read_converted, trained_embedding_bits
    from sparsify.train import train

    pruning = {"kind": "pruning", "block": "4x1", "final_sparsity": 0.5, "start_step": 0, "end_step": 4,
               "update_every": 2}
    qat = {"kind": "quantization", "start_step": 4, "freeze_after_steps": 2, "weight_bits": 4, "embedding_bits": 2}
    recipe = load_recipe(make_recipe(training={"steps": 8, "eval_every": None, "save_every": None},
                                     techniques=[pruning, qat]))
    run_dir = train(recipe, progress=False)
    parity = json.loads((run_dir / "metrics.json").read_text())["conversion_parity"]
    assert parity["label_agreement"] >= 0.95 and parity["max_abs_logit_diff"] < 1e-3
    assert trained_embedding_bits(run_dir / "model") == 2
    converted, _ = read_converted(run_dir / "model")
    assert all(e["bits"] == 4 and int(e["weight_int8"].abs().max()) <= 7 for e in converted.values())
    s = export(run_dir, run_dir / "artifact")
    m = s["manifest"]
    assert m["embeddings"]["bits"] == 2 and all(x["dtype"] == "int4" for x in m["layers"].values())
    assert s["size_by_part"]["embeddings"] > 0
    rt = SparseModel.from_pretrained(run_dir / "artifact", threads=1)
    import pandas as pd

    val = pd.read_csv(recipe.data.validation_file)
    texts = list(val["sentence"])
    ours = rt.logits(texts, max_length=recipe.data.max_length)
    acc = float((ours.argmax(1) == val["label"].to_numpy()).mean())
    assert abs(acc - parity["converted"]["accuracy"]) <= 2 / len(val)  # at most two of the 64 labels differ
    # the saved run reloaded as its conversion (what the parity script and the length search run): the 2-bit rows
    # as trained, not int8 rows, so it computes what the runtime computes
    model = transformers.AutoModelForSequenceClassification.from_pretrained(run_dir / "model").eval()
    load_run_conversion(model, run_dir / "model")
    enc = transformers.AutoTokenizer.from_pretrained(run_dir / "model")(
        texts, padding=True, truncation=True, max_length=recipe.data.max_length, return_tensors="pt")
    with torch.no_grad():
        ref = model(**enc).logits.numpy()
    assert np.abs(ref - ours).max() < 1e-4, np.abs(ref - ours).max()  # int8 rows instead: 8e-4 here


def test_signround_ptq_through_the_trainer(make_recipe):
    """rounding: signround in a PTQ recipe: the trainer runs SignRound before calibrating, records its statistics in
    metrics.json, and saves SignRound's codes (bits 4) for the export."""
    from sparsify.export import export
    from sparsify.recipe import load_recipe
    from sparsify.techniques.quantization.convert import read_converted
    from sparsify.train import train

    ptq = {"kind": "quantization", "mode": "ptq", "calibration_batches": 2, "weight_bits": 4, "rounding": "signround",
           "signround_iters": 5, "activations": {"linear_inputs": False}, "embeddings": False}
    recipe = load_recipe(make_recipe(training={"steps": 1, "eval_every": None, "save_every": None},
                                     techniques=[ptq]))
    run_dir = train(recipe, progress=False)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    stats = metrics["signround"]
    assert stats["iters"] == 5 and len(stats["blocks"]) == 2 and stats["seconds"] > 0
    assert metrics["conversion_parity"]["label_agreement"] == 1.0
    converted, _ = read_converted(run_dir / "model")
    assert all(e["bits"] == 4 and e["input_bits"] == 32 for e in converted.values())
    s = export(run_dir, run_dir / "artifact")
    assert all(m["dtype"] == "int4" for m in s["manifest"]["layers"].values())


# -- TEQ ----------------------------------------------------------------------------------------------------------


def test_teq_ptq_through_the_trainer(make_recipe):
    """teq: true in a PTQ recipe: the trainer folds the scales before rounding, records the per-layer errors in
    metrics.json, and the saved model is the folded one (its int4 export agrees with the fake-quant model)."""
    from sparsify.recipe import load_recipe
    from sparsify.train import train

    ptq = {"kind": "quantization", "mode": "ptq", "calibration_batches": 2, "weight_bits": 4, "teq": True,
           "teq_iters": 5, "activations": {"linear_inputs": False}, "embeddings": False}
    recipe = load_recipe(make_recipe(training={"steps": 1, "eval_every": None, "save_every": None},
                                     techniques=[ptq]))
    run_dir = train(recipe, progress=False)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    pairs = metrics["teq"]["pairs"]
    assert metrics["teq"]["iters"] == 5 and len(pairs) == 2
    assert all(p["error_teq"] <= p["error_nearest"] for p in pairs)
    assert metrics["conversion_parity"]["label_agreement"] == 1.0


def _outlier_columns(model, seed=3):
    """Give the attention output projections a few large input columns (what TEQ's scales can even out)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, m in model.named_modules():
            if n.endswith("attention.output.dense"):
                cols = torch.randperm(m.in_features, generator=g)[:3]
                m.weight[:, cols] *= 8


@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_teq_fold_is_the_same_function(arch):
    from sparsify.techniques.quantization.teq import fold, foldable_pairs

    torch.manual_seed(0)
    if arch == "bert":
        model = _tiny(2).eval()
    else:
        cfg = transformers.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                            dropout=0.0, attention_dropout=0.0)
        model = transformers.DistilBertForSequenceClassification(cfg).eval()
    pairs = foldable_pairs(model)
    assert len(pairs) == 2 and all(v.out_features == o.in_features for _, v, _, o in pairs)
    with torch.no_grad():  # biases are 0 at init: random ones, so that folding must scale them too
        for _, value, _, out in pairs:
            value.bias.normal_()
            out.bias.normal_()
    batch = {k: v for k, v in _calib_batches(1)[0].items() if k != "labels"}
    if arch == "distilbert":
        batch.pop("token_type_ids", None)
    with torch.no_grad():
        before = model(**batch).logits
        for _, value, _, out in pairs:
            fold(value, out, torch.rand(out.in_features) * 4 + 0.1)
        after = model(**batch).logits
        unfolded = model.__class__(model.config).eval()  # an unrelated model differs: the check can fail
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(unfolded(**batch).logits, before, atol=1e-3)


def _w4_output_error(model, batch) -> float:
    """Squared error of the attention output projections' outputs on ``batch`` when their weights (as the model
    holds them now) are rounded to int4 per output channel, summed over the layers."""
    from sparsify.techniques.quantization.teq import _quantize_ste

    seen, hooks = [], []
    for n, m in model.named_modules():
        if n.endswith("attention.output.dense"):
            hooks.append(m.register_forward_hook(lambda mod, args, out: seen.append((mod, args[0], out))))
    with torch.no_grad():
        model(**batch)
        for h in hooks:
            h.remove()
        return sum(float((torch.nn.functional.linear(x, _quantize_ste(m.weight, 4), m.bias) - y).pow(2).mean())
                   for m, x, y in seen)


def test_teq_lowers_the_w4_error_keeps_the_function_and_the_masks():
    from sparsify.techniques.quantization.teq import teq

    model = _tiny(1).eval()
    _outlier_columns(model)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".encoder." in n}
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for m in linears.values():
            m.weight.mul_(torch.rand(m.weight.shape, generator=g) > 0.5)
    zeros = {n: m.weight == 0 for n, m in linears.items()}
    batch = {k: v for k, v in _calib_batches(1, seed=9)[0].items() if k != "labels"}
    with torch.no_grad():
        before = model(**batch).logits
    w4_error_before = _w4_output_error(model, batch)
    stats = teq(model, _calib_batches(), linears, bits=4, iters=60, num_batches=4)
    assert _w4_output_error(model, batch) < 0.8 * w4_error_before  # the scales were folded into the weights
    assert [p["output"] for p in stats["pairs"]] == [f"bert.encoder.layer.{i}.attention.output.dense" for i in (0, 1)]
    for p in stats["pairs"]:
        assert p["error_teq"] < 0.8 * p["error_nearest"], stats  # the outlier columns made room to gain
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, before, atol=1e-5, rtol=1e-4)  # folded: same float model
    for n, m in linears.items():
        assert torch.equal(m.weight == 0, zeros[n]), n  # pruned weights stay exactly 0, kept ones stay non-zero


def test_teq_ptq_through_the_quantizer(tiny_model_dir, tmp_path):
    """teq: true in PTQ: the scales are folded before rounding, the int4 fake-quant model exports and the runtime
    computes what it computes."""
    from sparsify.export import export
    from sparsify.runtime import SparseModel

    src = _sparse_dir(tiny_model_dir, tmp_path / "m")
    tok = transformers.AutoTokenizer.from_pretrained(src)
    batch = dict(tok(TEXTS, padding=True, return_tensors="pt"))
    model = transformers.BertForSequenceClassification.from_pretrained(src).eval()
    masks = {n: m.weight != 0 for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".encoder." in n}
    cfg = QuantizationConfig(mode="ptq", calibration_batches=2, weight_bits=4, teq=True, teq_iters=20,
                             embeddings=False, activations={"linear_inputs": False})
    q = calibrate(model, [batch, batch], cfg, masks=masks)
    assert q.teq_stats["iters"] == 20 and len(q.teq_stats["pairs"]) == 2
    with torch.no_grad():
        fake = model(**batch).logits.numpy()
    model.save_pretrained(tmp_path / "folded")
    tok.save_pretrained(tmp_path / "folded")
    s = export(tmp_path / "folded", tmp_path / "a", quantized=q.convert(), activations=convert_activations(q),
               embeddings="float32")
    assert all(m["dtype"] == "int4" for m in s["manifest"]["layers"].values())
    got = SparseModel.from_pretrained(tmp_path / "a", threads=1)(batch["input_ids"], batch["attention_mask"],
                                                                 batch["token_type_ids"])
    np.testing.assert_allclose(got, fake, atol=2e-5, rtol=0)


@pytest.mark.parametrize("kw, field, message", [
    ({"teq": True}, ("teq",), "mode: ptq"),
    ({"mode": "ptq", "teq": True, "weight_format": "e4m3"}, ("teq",), "per-channel integer"),
    ({"mode": "ptq", "teq_iters": 10}, ("teq_iters",), "teq: true only"),
    ({"mode": "ptq", "teq": True, "teq_iters": 0}, ("teq_iters",), "greater than or equal"),
])
def test_teq_keys_validate_themselves(kw, field, message):
    with pytest.raises(ValidationError, match=message) as e:
        QuantizationConfig(**kw)
    assert _field(e) == field
