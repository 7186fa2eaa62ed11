"""8-bit quantization: fake quantization vs a round-and-clamp reference, straight-through gradients, observer
warm-up and freezing, PEG groups and permutation, masks through QAT and conversion, fake-quant vs converted
parity, bad input, state round trip, PTQ calibration.

Tiny models built in code and hand-written loops; no trainer, no network.
"""

from __future__ import annotations

import copy
import types

import numpy as np
import pytest
import torch
import transformers
from pydantic import ValidationError

from sparsify.checkpoint import load_state, save_state
from sparsify.config import FieldError
from sparsify.techniques.pruning import BlockPruner, PruningConfig
from sparsify.techniques.quantization import (
    QuantizationConfig,
    Quantizer,
    calibrate,
    convert_activations,
    int8_linear,
    load_converted,
)
from sparsify.techniques.quantization import fake_quant as fq
from sparsify.techniques.quantization import peg
from sparsify.techniques.quantization.convert import dequantize_input, dequantize_weight, quantize_input

HIDDEN = 32
LAYER0 = "bert.encoder.layer.0"


def tiny_bert(seed: int = 0, layers: int = 2):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=100, hidden_size=HIDDEN, num_hidden_layers=layers,
                                     num_attention_heads=2, intermediate_size=64, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config)


def batch(seed=1, n=4, length=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 100, (n, length), generator=g), torch.randint(0, 2, (n,), generator=g)


def make(model, masks=None, total_steps=50, **kw):
    kw.setdefault("freeze_after_steps", 3)
    quantizer = Quantizer(QuantizationConfig(**kw))
    quantizer.prepare(model, steps_per_epoch=10, total_steps=total_steps, masks=masks)
    return quantizer


def train(model, quantizer, steps, first=1, optimizer=None, pruner=None, seed=1):
    """The trainer's order: backward, (mask gradients), optimizer.step, pruner.step, quantizer.step."""
    params = list(model.parameters()) + quantizer.parameters()
    optimizer = optimizer or torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    logs = {}
    for step in range(first, first + steps):
        x, y = batch(seed + step)
        model(input_ids=x, labels=y).loss.backward()
        if pruner is not None:
            pruner.mask_gradients()
        optimizer.step()
        optimizer.zero_grad()
        if pruner is not None:
            pruner.step(step, optimizer)
        logs[step] = quantizer.step(step)
    return optimizer, logs


def ranges(quantizer):
    return {n: (p.observer.lo.clone(), p.observer.hi.clone()) for n, p in quantizer.points.items() if p.quantized}


# -- fake quantization vs references --------------------------------------------------------------------------


def test_fake_quantize_equals_round_and_clamp_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, 16, generator=g) * 3
    scale, zp = 0.02, 117
    ref = (np.clip(np.round(x.numpy() / scale) + zp, 0, 255) - zp) * scale  # numpy rounds half to even, as torch
    np.testing.assert_allclose(fq.fake_quantize(x, scale, zp, 0, 255).numpy(), ref, rtol=0, atol=1e-6)
    # saturates: values beyond the range land on its ends
    assert fq.fake_quantize(torch.tensor([1e3, -1e3]), scale, zp, 0, 255).tolist() == pytest.approx(
        [(255 - zp) * scale, (0 - zp) * scale])
    # per-dimension parameters broadcast over the last axis (PEG)
    s = torch.rand(16, generator=g) * 0.05 + 0.001
    z = torch.randint(0, 256, (16,), generator=g).float()
    ref = (np.clip(np.round(x.numpy() / s.numpy()) + z.numpy(), 0, 255) - z.numpy()) * s.numpy()
    np.testing.assert_allclose(fq.fake_quantize(x, s, z, 0, 255).numpy(), ref, rtol=0, atol=1e-6)

    # weights: symmetric int8 per output channel, scale = max|row| / 127
    w = torch.randn(8, 12, generator=g)
    w[3] = 0.0  # an all-zero row (a pruned output channel)
    q = fq.fake_quantize_weight(w)
    amax = np.abs(w.numpy()).max(axis=1, keepdims=True)
    scale = np.where(amax > 0, amax / 127, 1.0)
    ref = np.clip(np.round(w.numpy() / scale), -127, 127) * scale
    np.testing.assert_allclose(q.detach().numpy(), ref, rtol=0, atol=1e-7)
    codes, scales = fq.quantize_weight(w)
    assert codes.dtype == torch.int8 and scales.dtype == torch.float32 and int(codes.abs().max()) == 127
    assert torch.equal(codes.float() * scales[:, None], q.detach())
    assert bool((q[3] == 0).all())

    # activation parameters from a range; the range always includes 0
    scale, zp = fq.qparams_from_range(torch.tensor(-1.0), torch.tensor(3.0))
    assert float(scale) == pytest.approx(4 / 255) and int(zp) == round(1 / (4 / 255))
    scale, zp = fq.qparams_from_range(torch.tensor(0.5), torch.tensor(2.0))
    assert float(scale) == pytest.approx(2 / 255) and int(zp) == 0
    scale, zp = fq.qparams_from_range(torch.tensor(-1.0), torch.tensor(3.0), symmetric=True)
    assert float(scale) == pytest.approx(3 / 127) and int(zp) == 128


def test_straight_through_gradients():
    x = torch.tensor([-10.0, -0.5, 0.0, 0.3, 1.0, 10.0], requires_grad=True)
    fq.fake_quantize(x, 0.01, 128, 0, 255).backward(torch.arange(1.0, 7.0))
    # passes straight through inside [-1.28, 1.27], zero where clamped
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 5.0, 0.0]

    w = torch.randn(4, 6, requires_grad=True)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[:, :2] = False
    fq.fake_quantize_weight(w, mask).sum().backward()
    assert torch.equal(w.grad, mask.float())  # identity through the rounding, times the mask

    # LSQ: same values, gradient for the scale = round(v) - v inside, qmin - z / qmax - z outside (x grad_factor)
    x = torch.tensor([-10.0, 0.013, 0.5, 10.0], requires_grad=True)
    s = torch.tensor(0.01, requires_grad=True)
    z = torch.tensor(100.0)
    y = fq.lsq_fake_quantize(x, s, z, 0, 255, grad_factor=1.0)
    assert torch.allclose(y, fq.fake_quantize(x.detach(), 0.01, 100, 0, 255))
    y.sum().backward()
    v = x.detach() / 0.01 + 100
    expected = torch.where(v < 0, torch.tensor(-100.0), torch.where(v > 255, torch.tensor(155.0),
                                                                    torch.round(v) - v))
    assert float(s.grad) == pytest.approx(float(expected.sum()), rel=1e-4)
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]


# -- the technique on a tiny model ----------------------------------------------------------------------------


def test_installs_without_replacing_modules_and_keeps_hooks():
    model = tiny_bert()
    names = [n for n, _ in model.named_parameters()]
    modules = dict(model.named_modules())
    seen = []
    modules[f"{LAYER0}.attention.self.query"].register_forward_hook(lambda m, i, o: seen.append(o))
    quantizer = make(model, start_step=2)
    assert [n for n, _ in model.named_parameters()] == names
    assert all(modules[n] is m for n, m in model.named_modules())
    assert set(model.state_dict()) == set(copy.deepcopy(tiny_bert()).state_dict())
    assert len(quantizer.layers) == 12 and not quantizer.active
    x, _ = batch()
    with torch.no_grad():
        before = model(input_ids=x).logits
        assert torch.equal(before, tiny_bert()(input_ids=x).logits)  # inactive: the plain forward
    assert len(seen) == 1
    quantizer.remove()
    assert "forward" not in modules[f"{LAYER0}.attention.self.query"].__dict__


def test_observers_warm_up_then_freeze_at_the_configured_step():
    model = tiny_bert()
    quantizer = make(model, start_step=2, freeze_after_steps=3)
    assert quantizer.start_step == 2 and quantizer.freeze_step == 5
    _, logs = train(model, quantizer, 1)
    assert not quantizer.active and logs[1] == {"quant/active": 0.0}
    assert not any(p.observer.initialized for p in quantizer.points.values())  # nothing observed before the start
    opt, logs = train(model, quantizer, 1, first=2)
    assert quantizer.active and not quantizer.frozen
    history = [ranges(quantizer)]
    for step in (3, 4, 5):
        opt, logs = train(model, quantizer, 1, first=step, optimizer=opt)
        history.append(ranges(quantizer))
        assert quantizer.frozen == (step >= 5), step
    # the ranges move during the warm-up (forward passes of steps 3, 4, 5) ...
    name = f"{LAYER0}.intermediate.dense.input"
    assert all(not torch.equal(history[i][name][1], history[i + 1][name][1]) for i in range(3))
    assert all(p.observer.batches == 3 for p in quantizer.points.values())
    # ... and stay fixed from the freeze on, in training and in evaluation
    frozen = ranges(quantizer)
    scales = {n: p.scale.clone() for n, p in quantizer.points.items()}
    opt, logs = train(model, quantizer, 2, first=6, optimizer=opt)
    model.eval()
    with torch.no_grad():
        model(input_ids=batch(99)[0])
    for n, (lo, hi) in ranges(quantizer).items():
        assert torch.equal(lo, frozen[n][0]) and torch.equal(hi, frozen[n][1])
        assert torch.equal(quantizer.points[n].scale, scales[n])
    assert logs[7]["quant/frozen"] == 1.0 and 0 < logs[7]["quant/weight_error"] < 1e-3
    assert 0 < logs[7]["quant/activation_error"] < 1e-2
    assert f"quant/range/{name}/max" in logs[7]


def test_eval_passes_do_not_feed_the_observers():
    model = tiny_bert()
    quantizer = make(model, start_step=0)
    model.eval()
    with torch.no_grad():
        model(input_ids=batch()[0])
    assert not any(p.observer.initialized for p in quantizer.points.values())


def test_lsq_scales_are_learned_after_the_warm_up():
    model = tiny_bert()
    quantizer = make(model, start_step=0, freeze_after_steps=2, observer="lsq")
    params = quantizer.parameters()
    assert len(params) == 12 and all(p.requires_grad for p in params)
    opt, _ = train(model, quantizer, 2)
    assert quantizer.frozen
    initial = [p.detach().clone() for p in params]
    assert all(torch.allclose(p, quantizer.points[n].scale) for p, n in
               zip(initial, [n for n, p in quantizer.points.items() if p.lsq is not None]))
    train(model, quantizer, 3, first=3, optimizer=opt)
    assert any(not torch.equal(a, b.detach()) for a, b in zip(initial, params))
    entry = quantizer.convert()[f"{LAYER0}.intermediate.dense"]
    lsq = quantizer.points[f"{LAYER0}.intermediate.dense.input"].lsq
    assert torch.allclose(entry["input_scale"], lsq.detach())


# -- PEG ------------------------------------------------------------------------------------------------------


def test_peg_groups_and_permutation():
    lo = torch.tensor([-1.0, -1.0, -50.0, -1.0, -1.0, -1.0, -1.0, -2.0])
    hi = torch.tensor([1.0, 1.0, 60.0, 1.0, 1.0, 1.0, 1.0, 2.0])
    perm = peg.sort_permutation(lo, hi)
    assert perm.tolist() == [0, 1, 3, 4, 5, 6, 7, 2]  # by range, stable; the outliers last
    index = peg.group_index(8, 4, perm)
    assert index.tolist() == [0, 0, 3, 1, 1, 2, 2, 3]
    assert peg.group_index(8, 4).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    glo, ghi = peg.group_ranges(lo, hi, 4, perm)
    assert glo.tolist() == [-1, -1, -1, -50] and ghi.tolist() == [1, 1, 1, 60]
    glo, ghi = peg.group_ranges(lo, hi, 4)
    assert glo.tolist() == [-1, -50, -1, -2] and ghi.tolist() == [1, 60, 1, 2]
    with pytest.raises(ValueError):
        peg.group_index(8, 3)

    # a model with 4 outlier dimensions in the feed-forward input, one in each contiguous group of 8: with the
    # permutation they share one group, and the other dimensions are quantized far more finely than with one
    # range per tensor or with contiguous groups
    outliers = [3, 11, 19, 27]

    def outlier_model():
        model = tiny_bert()
        with torch.no_grad():
            for layer in model.bert.encoder.layer:
                layer.attention.output.LayerNorm.weight[outliers] = 40.0  # structured outliers, as in BERT
        return model

    errors = {}
    for name, extra in (("tensor", {}), ("peg", {"peg": {"groups": 4}}),
                        ("peg-unsorted", {"peg": {"groups": 4, "permute": False}})):
        model = outlier_model()
        cfg = QuantizationConfig(mode="ptq", calibration_batches=2, **extra)
        quantizer = calibrate(model, [{"input_ids": batch(s)[0]} for s in range(2)], cfg)
        entry = quantizer.convert()[f"{LAYER0}.intermediate.dense"]
        if name == "tensor":
            assert entry["input_groups"] == 1 and entry["input_scale"].shape == ()
            assert entry["input_permutation"] is None
        else:
            assert entry["input_groups"] == 4 and entry["input_scale"].shape == (4,)
            assert entry["input_zero_point"].shape == (4,) and entry["input_zero_point"].dtype == torch.int32
        if name == "peg":
            p = entry["input_permutation"]
            assert p.dtype == torch.int64 and sorted(p.tolist()) == list(range(HIDDEN))
            assert sorted(p[-4:].tolist()) == outliers
            assert peg.group_index(HIDDEN, 4, p)[outliers].tolist() == [3, 3, 3, 3]  # together, in the last group
        if name == "peg-unsorted":
            assert entry["input_permutation"] is None
        # not a PEG target: per tensor
        assert quantizer.convert()[f"{LAYER0}.attention.self.query"]["input_groups"] == 1
        captured = []
        handle = model.get_submodule(f"{LAYER0}.intermediate.dense").register_forward_pre_hook(
            lambda m, args: captured.append(args[0]))
        with torch.no_grad():
            model(input_ids=batch(7)[0])
        handle.remove()
        x = captured[0]
        assert float(x[..., 3].abs().max()) > 10 * float(x[..., :3].abs().max())  # the outliers are there
        error = dequantize_input(quantize_input(x, entry), entry) - x
        others = [d for d in range(HIDDEN) if d not in outliers]
        errors[name] = float(error[..., others].pow(2).mean() / x[..., others].pow(2).mean())
    # the ordinary dimensions no longer pay for the outliers' range, except the 4 that share their group
    # (all 28 do, per tensor or with contiguous groups)
    assert errors["peg"] < 0.5 * errors["tensor"], errors
    assert errors["peg"] < 0.5 * errors["peg-unsorted"], errors


def test_keep_16bit_activations_are_not_quantized_to_8_bits():
    model = tiny_bert()
    quantizer = calibrate(model, [{"input_ids": batch()[0]}], QuantizationConfig(
        mode="ptq", calibration_batches=1, keep_16bit=[r"output\.dense\.input$"]))
    kept = [n for n, p in quantizer.points.items() if p.keep_16bit]
    assert len(kept) == 4 and quantizer.points[f"{LAYER0}.output.dense.input"].observer is None
    converted = quantizer.convert()
    assert converted[f"{LAYER0}.output.dense"]["input_bits"] == 16
    assert converted[f"{LAYER0}.output.dense"]["input_scale"] is None
    assert converted[f"{LAYER0}.intermediate.dense"]["input_bits"] == 8


# -- masks ----------------------------------------------------------------------------------------------------


def test_masks_survive_qat_and_conversion():
    model = tiny_bert()
    pruner = BlockPruner(PruningConfig(block="4x1", final_sparsity=0.75, end_step=4, update_every=2))
    pruner.prepare(model, steps_per_epoch=10, total_steps=12)
    quantizer = make(model, masks=lambda: pruner.masks, total_steps=12, start_step=4, freeze_after_steps=2)
    opt, _ = train(model, quantizer, 4, pruner=pruner)  # pruning: masks replaced at steps 2 and 4
    assert quantizer.active and pruner.finished(4)
    for name, mask in pruner.masks.items():
        assert quantizer.layers[name].mask is mask  # followed the pruner's new masks
    train(model, quantizer, 6, first=5, optimizer=opt, pruner=pruner)
    assert quantizer.frozen
    converted = quantizer.convert(model)
    for name, mask in pruner.masks.items():
        module = model.get_submodule(name)
        assert 0.7 < 1 - mask.float().mean() < 0.8
        assert bool((module.weight[~mask] == 0).all())
        assert bool((fq.fake_quantize_weight(module.weight, mask)[~mask] == 0).all())
        assert bool((converted[name]["weight_int8"][~mask] == 0).all())
        assert bool((dequantize_weight(converted[name])[~mask] == 0).all())

    # the mask acts inside the weight path even where the weight itself is not zero
    model = tiny_bert()
    name = f"{LAYER0}.attention.self.query"
    mask = torch.rand(HIDDEN, HIDDEN, generator=torch.Generator().manual_seed(3)) > 0.5
    quantizer = make(model, masks={name: mask}, start_step=0)
    module = model.get_submodule(name)
    assert bool((module.weight[~mask] != 0).all())
    x = torch.randn(3, HIDDEN)
    point = quantizer.layers[name].point
    point.observer.update(x)
    module.eval()
    expected = torch.nn.functional.linear(
        quantizer._quantize_activation(point, x, False), fq.fake_quantize_weight(module.weight * mask), module.bias)
    assert torch.equal(module(x), expected)
    quantizer.freeze()
    assert bool((quantizer.convert()[name]["weight_int8"][~mask] == 0).all())


# -- conversion -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [
    {},
    {"peg": {"groups": 4}, "activations": {"residual_sums": True, "layernorm_outputs": True}},
    {"activation_scheme": "symmetric", "keep_16bit": [r"layer\.1\.output\.dense"]},
])
def test_fake_quant_and_converted_models_agree(extra):
    model = tiny_bert(seed=3)
    reference = copy.deepcopy(model)
    data = [{"input_ids": batch(s, n=8)[0]} for s in range(3)]
    quantizer = calibrate(model, data, QuantizationConfig(mode="ptq", calibration_batches=3, **extra))
    converted = quantizer.convert()
    entry = converted[f"{LAYER0}.intermediate.dense"]
    assert entry["weight_int8"].dtype == torch.int8 and entry["weight_int8"].shape == (64, HIDDEN)
    assert entry["weight_scale"].dtype == torch.float32 and entry["weight_scale"].shape == (64,)
    assert entry["bias"].dtype == torch.float32 and entry["bits"] == 8
    assert entry["input_scale"].dtype == torch.float32 and entry["input_zero_point"].dtype == torch.int32
    undo = load_converted(reference, converted, convert_activations(quantizer), quantizer.embedding_name)
    x = batch(11, n=16)[0]
    with torch.no_grad():
        fake, real = model(input_ids=x).logits, reference(input_ids=x).logits
    assert torch.equal(fake.argmax(-1), real.argmax(-1))
    assert torch.allclose(fake, real, atol=1e-4, rtol=0)
    undo()
    undo = load_converted(reference, converted, convert_activations(quantizer), quantizer.embedding_name, exact=False)
    with torch.no_grad():
        fast = reference(input_ids=x).logits  # the float32 shortcut the search uses: the same up to rounding
    assert torch.allclose(fast, real, atol=1e-4, rtol=0) and torch.equal(fast.argmax(-1), real.argmax(-1))
    # and one layer on its own: integer arithmetic vs fake quantization
    layer = model.get_submodule(f"{LAYER0}.intermediate.dense")
    h = torch.randn(2, 5, HIDDEN)
    with torch.no_grad():
        assert torch.allclose(layer(h), int8_linear(h, entry), atol=1e-5)
    undo()
    with torch.no_grad():
        assert not torch.allclose(reference(input_ids=x).logits, real, atol=1e-7)  # the float model again


def test_converted_files_round_trip_without_pickle(tmp_path):
    from sparsify.techniques.quantization import read_converted, save_converted

    model = tiny_bert()
    quantizer = calibrate(model, [{"input_ids": batch()[0]}], QuantizationConfig(
        mode="ptq", calibration_batches=1, peg={"groups": 4}, activations={"residual_sums": True}))
    converted, activations = quantizer.convert(), convert_activations(quantizer)
    save_converted(tmp_path, converted, activations)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quantization.json", "quantization.safetensors"]
    loaded, loaded_activations = read_converted(tmp_path)
    for original, back in ((converted, loaded), (activations, loaded_activations)):
        assert set(original) == set(back)
        for name, entry in original.items():
            assert set(entry) == set(back[name]), name
            for key, value in entry.items():
                if isinstance(value, torch.Tensor):
                    assert value.dtype == back[name][key].dtype and torch.equal(value, back[name][key]), (name, key)
                else:
                    assert value == back[name][key], (name, key)


def test_convert_needs_frozen_observers():
    from sparsify.errors import SparsifyError

    quantizer = make(tiny_bert(), start_step=0)
    with pytest.raises(SparsifyError, match="frozen"):
        quantizer.convert()


# -- PTQ ------------------------------------------------------------------------------------------------------


def test_ptq_calibrates_a_fixed_number_of_batches_without_training():
    model = tiny_bert()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = [{"input_ids": batch(s)[0], "labels": batch(s)[1], "idx": torch.arange(4)} for s in range(10)]
    quantizer = calibrate(model, data, QuantizationConfig(mode="ptq", calibration_batches=3))
    assert quantizer.active and quantizer.frozen and not model.training
    assert all(p.observer.batches == 3 for p in quantizer.points.values())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # the quantizer built by the trainer does the same through .calibrate()
    model = tiny_bert()
    quantizer = Quantizer(QuantizationConfig(mode="ptq", calibration_batches=2))
    quantizer.prepare(model, steps_per_epoch=10, total_steps=0)
    assert quantizer.calibrate(model, iter(data)) == 2 and quantizer.frozen


# -- bad input ------------------------------------------------------------------------------------------------


def _field(excinfo):
    err = excinfo.value
    if isinstance(err, ValidationError):
        first = err.errors()[0]
        loc = tuple(first["loc"])
        inner = first.get("ctx", {}).get("error")
        return loc + (inner.field if isinstance(inner, FieldError) else ())
    return err.field


def test_bad_config_names_the_key():
    with pytest.raises(ValidationError) as e:
        QuantizationConfig(bits=4)
    assert _field(e) == ("bits",)
    with pytest.raises(ValidationError) as e:
        QuantizationConfig(peg={"groups": 0})
    assert _field(e)[:2] == ("peg", "groups")
    with pytest.raises(ValidationError) as e:
        QuantizationConfig(mode="ptq", observer="lsq")
    assert _field(e) == ("observer",)
    with pytest.raises(ValidationError) as e:
        QuantizationConfig(mode="ptq", start_step=3)
    assert _field(e) == ("start_step",)
    with pytest.raises(ValidationError) as e:
        QuantizationConfig(freeze_after_steps=0)
    assert _field(e) == ("freeze_after_steps",)
    with pytest.raises(ValidationError) as e:
        QuantizationConfig(keep_16bit=["("])
    assert _field(e) == ("keep_16bit", 0)
    with pytest.raises(ValidationError) as e:
        QuantizationConfig(granularity="channel")
    assert _field(e) == ("granularity",)


def _recipe(*techniques, steps=None, epochs=None):
    training = types.SimpleNamespace(steps=steps, epochs=epochs)
    return types.SimpleNamespace(training=training, techniques=tuple(techniques))


def test_qat_start_before_the_pruning_end_is_refused():
    pruning = PruningConfig(block="4x1", final_sparsity=0.9, end_step=600)
    late = QuantizationConfig(start_step=600)
    late.check_recipe(_recipe(pruning, late, steps=1000))  # starts as pruning ends: fine
    early = QuantizationConfig(start_step=400)
    with pytest.raises(FieldError) as e:
        early.check_recipe(_recipe(pruning, early, steps=1000))
    assert e.value.field == ("start_step",) and "600" in str(e.value)
    default = QuantizationConfig()  # start 0
    with pytest.raises(FieldError) as e:
        default.check_recipe(_recipe(pruning, default, steps=1000))
    assert e.value.field == ("start_step",)
    by_epoch = QuantizationConfig(start_epoch=0.5)
    with pytest.raises(FieldError) as e:  # units differ: the order cannot be checked
        by_epoch.check_recipe(_recipe(pruning, by_epoch, steps=1000))
    assert e.value.field == ("start_epoch",)
    pruning_epochs = PruningConfig(block="4x1", final_sparsity=0.9, end_epoch=2.0)
    with pytest.raises(FieldError) as e:
        by_epoch.check_recipe(_recipe(pruning_epochs, by_epoch, epochs=3.0))
    assert e.value.field == ("start_epoch",)
    never = QuantizationConfig(start_step=1000)
    with pytest.raises(FieldError) as e:
        never.check_recipe(_recipe(never, steps=1000))
    assert e.value.field == ("start_step",)
    ptq = QuantizationConfig(mode="ptq")
    with pytest.raises(FieldError) as e:
        ptq.check_recipe(_recipe(pruning, ptq, steps=1000))
    assert e.value.field == ("mode",)


def test_bad_input_against_the_model_names_the_key():
    with pytest.raises(FieldError) as e:
        make(tiny_bert(), peg={"groups": 5})  # 5 does not divide the hidden size 32
    assert e.value.field == ("peg", "groups") and "32" in str(e.value)
    with pytest.raises(FieldError) as e:
        make(tiny_bert(), peg={"groups": 2, "targets": ["no-such-activation"]})
    assert e.value.field == ("peg", "targets", 0)
    with pytest.raises(FieldError) as e:
        make(tiny_bert(), keep_16bit=["pooler"])
    assert e.value.field == ("keep_16bit", 0)
    with pytest.raises(FieldError) as e:
        make(tiny_bert(), include=["decoder"])
    assert e.value.field == ("include", 0)
    with pytest.raises(FieldError) as e:
        make(tiny_bert(), total_steps=10, start_step=10)
    assert e.value.field == ("start_step",)
    with pytest.raises(FieldError) as e:
        Quantizer(QuantizationConfig(start_epoch=1.0)).prepare(tiny_bert(), total_steps=10)
    assert e.value.field == ("start_epoch",)


# -- state ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("observer", ["minmax", "lsq"])
def test_state_dict_round_trip_resumes_exactly(tmp_path, observer):
    kw = {"start_step": 1, "freeze_after_steps": 3, "observer": observer, "peg": {"groups": 4}}
    model = tiny_bert()
    quantizer = make(model, **kw)
    opt, _ = train(model, quantizer, 2)  # mid warm-up
    save_state(tmp_path / "q", quantizer.state_dict())
    model_state = copy.deepcopy(model.state_dict())
    opt_state = copy.deepcopy(opt.state_dict())

    resumed_model = tiny_bert(seed=5)
    resumed_model.load_state_dict(model_state)
    resumed = make(resumed_model, **kw)
    resumed_opt = torch.optim.AdamW(list(resumed_model.parameters()) + resumed.parameters(), lr=1e-2,
                                    weight_decay=0.0)
    resumed_opt.load_state_dict(opt_state)
    resumed.load_state_dict(load_state(tmp_path / "q"))
    assert resumed.active and not resumed.frozen

    train(model, quantizer, 4, first=3, optimizer=opt)
    train(resumed_model, resumed, 4, first=3, optimizer=resumed_opt)
    assert quantizer.frozen and resumed.frozen
    for (n, a), (_, b) in zip(model.named_parameters(), resumed_model.named_parameters()):
        assert torch.equal(a, b), n
    for name, p in quantizer.points.items():
        assert torch.equal(p.scale, resumed.points[name].scale)
        if p.permutation is not None:
            assert torch.equal(p.permutation, resumed.points[name].permutation)
    for a, b in zip(quantizer.parameters(), resumed.parameters()):
        assert torch.equal(a, b)

    # a frozen state round-trips too, and refuses a different set of activations
    again = make(tiny_bert(), **kw)
    again.load_state_dict(load_state_roundtrip(tmp_path, quantizer.state_dict()))
    assert again.frozen
    for name, s in again.state_dict()["points"].items():
        assert torch.equal(s["scale"], quantizer.state_dict()["points"][name]["scale"])
    other = make(tiny_bert(), start_step=1, activations={"residual_sums": True})
    from sparsify.errors import SparsifyError

    with pytest.raises(SparsifyError, match="recipe changed"):
        other.load_state_dict(quantizer.state_dict())


def load_state_roundtrip(tmp_path, state):
    save_state(tmp_path / "again", state)
    return load_state(tmp_path / "again")


def test_finalize_leaves_a_fake_quant_eval_model():
    model = tiny_bert()
    quantizer = make(model, start_step=0, freeze_after_steps=10)
    train(model, quantizer, 2)
    assert not quantizer.frozen
    quantizer.finalize(model)
    assert quantizer.frozen and quantizer.active and not model.training
    converted = quantizer.convert(model)
    assert len(converted) == 12 and all(e["input_bits"] == 8 for e in converted.values())


def test_word_embeddings_train_as_the_int8_rows_the_export_stores():
    """embeddings: true (default): once QAT is on, looked-up rows are exactly the export's int8 rows
    (codes x per-row scale, computed by the export's own numpy code), the table still gets gradients, the
    conversion reference looks them up the same way; embeddings: false leaves them float32."""
    from sparsify.export import _quantize_rows
    from sparsify.techniques.quantization.convert import int8_rows

    model = tiny_bert()
    table = model.get_input_embeddings().weight
    codes, scales = _quantize_rows(table.detach().numpy())
    rows = torch.from_numpy(codes.astype(np.float32) * scales[:, None])
    assert not torch.equal(rows, table.detach())  # rounding changes the table: the check below can fail
    x, y = batch()
    quantizer = make(model, start_step=0)
    seen = {}  # a hook registered after the quantizer's sees what the encoder gets
    model.get_input_embeddings().register_forward_hook(lambda m, a, out: seen.update(out=out))
    assert quantizer.embedding_name == "bert.embeddings.word_embeddings"
    model(input_ids=x, labels=y).loss.backward()
    assert torch.equal(seen["out"], rows[x])  # the hook's output replaces the lookup
    assert table.grad is not None and table.grad.abs().sum() > 0  # straight through
    assert torch.equal(int8_rows(table.detach()[x]), rows[x])  # the conversion reference agrees bit for bit
    quantizer.remove()
    model(input_ids=x)
    assert torch.equal(seen["out"], table.detach()[x])  # removed with the quantizer
    off = make(tiny_bert(), start_step=0, embeddings=False)
    assert off.embedding_name is None


# -- through the recipe loader --------------------------------------------------------------------------------


def test_recipe_errors_name_the_key_and_line(make_recipe, monkeypatch):
    from sparsify.errors import RecipeError
    from sparsify.recipe import load_recipe
    from sparsify.techniques import TECHNIQUES, TechniqueEntry

    # the registry line (idempotent if it is already there)
    monkeypatch.setitem(TECHNIQUES, "quantization", TechniqueEntry(
        QuantizationConfig, "sparsify.techniques.quantization.quantizer:Quantizer"))
    pruning = {"kind": "pruning", "block": "4x1", "final_sparsity": 0.5, "end_step": 6}
    recipe = load_recipe(make_recipe(techniques=[pruning, {"kind": "quantization", "start_step": 6,
                                                           "peg": {"groups": 4}}]))
    assert recipe.technique("quantization").peg.groups == 4
    assert TECHNIQUES["quantization"].load() is Quantizer
    with pytest.raises(RecipeError, match=r"recipe\d+\.yaml:\d+: techniques\[1\]\.start_step: .*before pruning ends"):
        load_recipe(make_recipe(techniques=[pruning, {"kind": "quantization", "start_step": 3}]))
    with pytest.raises(RecipeError, match=r"techniques\[0\]\.bits"):
        load_recipe(make_recipe(techniques=[{"kind": "quantization", "bits": 4}]))
    with pytest.raises(RecipeError, match=r"techniques\[0\]\.peg\.groups"):
        load_recipe(make_recipe(techniques=[{"kind": "quantization", "peg": {"groups": 0}}]))
    with pytest.raises(RecipeError, match=r"techniques\[1\]\.mode"):
        load_recipe(make_recipe(techniques=[pruning, {"kind": "quantization", "mode": "ptq"}]))


# -- through the trainer --------------------------------------------------------------------------------------


def test_trainer_measures_fake_quant_against_conversion(make_recipe):
    """A pruning + QAT run ends by evaluating the fake-quant model and its int8 conversion on the eval split;
    metrics.json records the agreement, and the saved conversion keeps the zeros of the pruned weights."""
    import json

    from sparsify.recipe import load_recipe
    from sparsify.techniques.quantization.convert import read_converted
    from sparsify.train import train

    pruning = {"kind": "pruning", "block": "4x1", "final_sparsity": 0.5, "start_step": 0, "end_step": 4,
               "update_every": 2}
    qat = {"kind": "quantization", "start_step": 4, "freeze_after_steps": 2, "peg": {"groups": 4},
           "activations": {"linear_inputs": True, "residual_sums": True}}  # the points beyond the Linear inputs too
    recipe = load_recipe(make_recipe(training={"steps": 8, "eval_every": None, "save_every": None},
                                     techniques=[pruning, qat]))
    run_dir = train(recipe, progress=False)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    parity = metrics["conversion_parity"]
    assert parity["step"] == 8 and parity["examples"] > 0
    # measured 0.0 here; leaving out the residual-sum points in the conversion gives 5.6e-4
    assert parity["label_agreement"] >= 0.95 and parity["max_abs_logit_diff"] < 1e-4
    # the fake-quant accuracy in the parity record is the final evaluation's
    assert parity["fake_quant"]["accuracy"] == metrics["final_step_metrics"]["accuracy"]
    # the word embeddings trained as int8 rows: recorded, and the export stores them so by default
    from sparsify.export import export
    from sparsify.techniques.quantization.convert import trained_embeddings

    assert trained_embeddings(run_dir / "model") == "bert.embeddings.word_embeddings"
    assert export(run_dir, run_dir / "artifact")["manifest"]["embeddings"]["word"].startswith("int8")
    export(run_dir, run_dir / "hf", "hf")  # the dense-equivalent checkpoint holds the rows as trained
    from safetensors.torch import load_file

    from sparsify.techniques.quantization.convert import int8_rows

    key = "bert.embeddings.word_embeddings.weight"
    trained, exported = load_file(str(run_dir / "model" / "model.safetensors"))[key], load_file(
        str(run_dir / "hf" / "model.safetensors"))[key]
    assert not torch.equal(trained, exported) and torch.equal(exported, int8_rows(trained))
    converted, _ = read_converted(run_dir / "model")
    for name, entry in converted.items():
        codes = entry["weight_int8"].reshape(-1, 4, entry["weight_int8"].shape[1])  # 4x1 blocks (out x in)
        blocks_zero = (codes == 0).all(dim=1)
        assert blocks_zero.float().mean() >= 0.5, name  # at least the pruned half stays exactly zero
