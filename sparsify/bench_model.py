"""``sparsify bench model ARTIFACT [--json PATH] [--quick]``: the runtime against PyTorch and other engines.

Scenarios (records' ``scenario``): ``latency_b1_s128`` (batch 1, 128 tokens), ``throughput_b32_s128`` (batch 32,
128 tokens) and ``throughput_b32_sst2`` (batches of 32 SST-2 validation sentences at their real lengths: our
runtime packs them without padding, PyTorch and onnxruntime pad each batch to its longest sentence, DeepSparse,
compiled for one static shape, pads to the longest of all). Sequence lengths are capped at the model's positions.

Methods: ``sparsify`` (this runtime, with the artifact's length configuration if it has one, else full length),
``sparsify_full`` (full length; only when the artifact has a length configuration), ``torch_fp32`` (the
dense-equivalent model in transformers), ``torch_int8_dynamic`` (``quantize_dynamic`` of its Linear layers),
``onnxruntime`` (the ONNX export of that model) and ``deepsparse`` (DeepSparse 1.8 on the same ONNX, whose zeros
it exploits; run in its own interpreter, ``--deepsparse-python`` / ``$SPARSIFY_DEEPSPARSE_PYTHON``, default
``/work/ds-venv/bin/python`` when present). Unavailable methods are skipped with a note.

An embeddings artifact (a sentence-transformers model) is timed against ``sentence_transformers``: the library's
model (Transformer, Pooling, Normalize) rebuilt with the artifact's dense-equivalent weights and pooling, fed the
same token ids (tokenization is timed for neither); parity is the cosine of the two embeddings.

All methods run in this process (DeepSparse in its worker, timed there), interleaved round-robin: per round each
method gets a warm-up call and a timed call, so machine noise hits all alike. Reported: median ms per batch,
its min-max, items/s, and the per-round speedup over torch_fp32 as median [IQR]. Cold start (a fresh process
until its first prediction; numba's disk cache warm) and peak memory (max RSS) are measured in subprocesses.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from sparsify.errors import SparsifyError
from sparsify.machine import cpu_info
from sparsify.kernels.bench import WorkerProcess

__all__ = ["main", "run_benchmark"]

SCENARIOS = ("latency_b1_s128", "throughput_b32_sst2", "throughput_b32_s128")
METHODS = ("sparsify", "sparsify_full", "torch_fp32", "torch_int8_dynamic", "onnxruntime", "deepsparse")
BASELINE = "torch_fp32"

_DS_WORKER = r'''
import json, sys, time
import numpy as np
import deepsparse
out = sys.stdout
sys.stdout = sys.stderr
out.write(json.dumps({"ok": True, "version": deepsparse.__version__}) + "\n"); out.flush()
engines = {}
for line in sys.stdin:
    req = json.loads(line)
    try:
        if req["cmd"] == "quit":
            break
        if req["cmd"] == "load":
            inputs = [np.load(p) for p in req["inputs"]]
            eng = deepsparse.Engine(req["onnx"], batch_size=inputs[0].shape[0], num_cores=int(req["threads"]),
                                    input_shapes=[list(a.shape) for a in inputs])
            y = eng.run(inputs)[0]
            engines[req["key"]] = (eng, inputs)
            rep = {"ok": True, "logits": np.asarray(y, np.float64).tolist()}
        elif req["cmd"] == "time":
            eng, inputs = engines[req["key"]]
            t = time.perf_counter()
            for _ in range(int(req["n"])):
                eng.run(inputs)
            rep = {"ok": True, "ms": (time.perf_counter() - t) / int(req["n"]) * 1e3}
        else:
            rep = {"ok": False, "error": "unknown command"}
    except Exception as e:
        rep = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    out.write(json.dumps(rep) + "\n"); out.flush()
'''

_COLD = r'''
import json, resource, sys, time
t0 = time.perf_counter()
kind, path, threads, seq, int8_weights = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
import numpy as np
if kind == "sparsify":
    from sparsify.runtime import SparseModel
    t1 = time.perf_counter()
    m = SparseModel.from_pretrained(path, threads=threads, int8_weights=int8_weights)
    t2 = time.perf_counter()
    m.predict(["a first prediction"])
    t3 = time.perf_counter()
    v = m.word.shape[0]
    ids = np.random.default_rng(0).integers(1000 if v > 2000 else 5, min(20000, v), (32, seq))
    m(ids, np.ones_like(ids))
else:
    import torch
    torch.set_num_threads(threads)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    t1 = time.perf_counter()
    m = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    t2 = time.perf_counter()
    with torch.no_grad():
        m(**tok(["a first prediction"], return_tensors="pt"))
    t3 = time.perf_counter()
    v = m.config.vocab_size
    ids = torch.randint(1000 if v > 2000 else 5, min(20000, v), (32, seq))
    with torch.no_grad():
        m(input_ids=ids, attention_mask=torch.ones_like(ids))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # may include the parent's (fork)
try:  # VmHWM is reset by exec: this process's own peak
    peak = [int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
except Exception:
    pass
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "first_prediction_s": t3 - t2, "cold_start_s": t3 - t0,
                  "peak_rss_mb": peak}))
'''


# ------------------------------------------------------------------------------------------------ setup
def _bert_config(sm, **extra):
    from transformers import BertConfig

    arch = dict(sm.manifest["architecture"])
    arch.pop("architectures", None)
    if arch.get("model_type", "bert") != "bert":
        raise SparsifyError(f"bench model rebuilds BERT encoders for PyTorch; this artifact is "
                            f"{arch.get('model_type')!r}")
    return BertConfig(**{k: v for k, v in arch.items() if k != "model_type"}, **extra)


def _dense_state_dict(sm, p: str) -> dict[str, np.ndarray]:
    """The artifact's embeddings and encoder as dense-equivalent BERT weights, names under the prefix ``p``."""
    word = sm.word_table()  # int8 / packed low-bit rows decoded
    sd = {f"{p}embeddings.word_embeddings.weight": word, f"{p}embeddings.position_embeddings.weight": sm.pos,
          f"{p}embeddings.token_type_embeddings.weight": sm.typ, f"{p}embeddings.LayerNorm.weight": sm.emb_ln[0],
          f"{p}embeddings.LayerNorm.bias": sm.emb_ln[1]}
    for i, L in enumerate(sm.layers):
        b = f"{p}encoder.layer.{i}."
        for name, m in (("attention.self.query", L.q), ("attention.self.key", L.k), ("attention.self.value", L.v),
                        ("attention.output.dense", L.attn_out), ("intermediate.dense", L.inter),
                        ("output.dense", L.out)):
            sd[b + name + ".weight"], sd[b + name + ".bias"] = m.to_dense(), m.bias
        sd[b + "attention.output.LayerNorm.weight"], sd[b + "attention.output.LayerNorm.bias"] = L.ln1
        sd[b + "output.LayerNorm.weight"], sd[b + "output.LayerNorm.bias"] = L.ln2
    return sd


def _load(model, sd: dict) -> None:
    import torch

    missing, unexpected = model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()},
                                                strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise SparsifyError(f"cannot rebuild the dense model: missing {missing[:3]}, unexpected {unexpected[:3]}")


def dense_torch_model(sm):
    """A transformers BertForSequenceClassification holding the artifact's dense-equivalent weights."""
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification(_bert_config(sm, num_labels=int(sm.classifier[0].shape[0]))).eval()
    p = sm.manifest.get("prefix", "bert.")
    sd = _dense_state_dict(sm, p)
    sd["classifier.weight"], sd["classifier.bias"] = sm.classifier
    if sm.pooler is not None:
        sd[f"{p}pooler.dense.weight"], sd[f"{p}pooler.dense.bias"] = sm.pooler
    _load(model, sd)
    return model


ST_POOLING = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens", "max": "pooling_mode_max_tokens",
              "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens"}


def dense_sentence_transformer(sm, directory: Path):
    """The sentence-transformers library's model (Transformer -> Pooling (-> Normalize)) with the artifact's
    dense-equivalent weights and pooling, saved in ``directory`` and loaded from there."""
    import shutil

    from sentence_transformers import SentenceTransformer
    from transformers import BertModel

    model = BertModel(_bert_config(sm), add_pooling_layer=False).eval()
    _load(model, _dense_state_dict(sm, ""))
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (Path(sm.path) / f).is_file():
            shutil.copyfile(Path(sm.path) / f, directory / f)
    modes = sm.pooling_modes
    unknown = [m for m in modes if m not in ST_POOLING]
    if unknown:
        raise SparsifyError(f"pooling {unknown[0]!r} has no sentence-transformers equivalent here "
                            f"(supported: {', '.join(ST_POOLING)})")
    pooling = {"word_embedding_dimension": sm.hidden, **{key: mode in modes for mode, key in ST_POOLING.items()}}
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if (sm.pooling or {}).get("normalize"):
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (directory / "2_Normalize").mkdir(exist_ok=True)
    (directory / "1_Pooling").mkdir(exist_ok=True)
    (directory / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    (directory / "modules.json").write_text(json.dumps(modules))
    (directory / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": sm.max_positions}))
    return SentenceTransformer(str(directory), device="cpu")


def _sst2_sentences(n: int, quick: bool = False) -> tuple[list[str], str]:
    try:
        if quick and os.environ.get("HF_DATASETS_OFFLINE") != "1":
            raise RuntimeError("--quick without a local dataset cache")
        from datasets import load_dataset

        parquet = os.environ.get("SPARSIFY_GLUE_PARQUET")
        if parquet and list(Path(parquet, "sst2").glob("validation*.parquet")):
            files = sorted(str(f) for f in Path(parquet, "sst2").glob("validation*.parquet"))
            ds = load_dataset("parquet", data_files={"validation": files}, split="validation")
        else:
            ds = load_dataset("nyu-mll/glue", "sst2", split="validation")
        return list(ds["sentence"][:n]), "sst2 validation"
    except Exception as e:  # offline without the dataset: synthetic sentences of SST-2-like lengths
        rng = np.random.default_rng(0)
        words = "the a film movie plot was is very good bad story acting music scene not quite".split()
        lens = np.clip(rng.gamma(4.0, 5.0, n).astype(int), 2, 60)
        return [" ".join(rng.choice(words, k)) for k in lens], f"synthetic lengths (SST-2 unavailable: {type(e).__name__})"


class _DeepSparse(WorkerProcess):
    def __init__(self, python: str, threads: int):
        super().__init__([python, "-c", _DS_WORKER])
        hello = self.recv()
        self.version, self.threads = hello["version"], threads


# ------------------------------------------------------------------------------------------------ run
def _scenario_inputs(sm, seq: int, quick: bool, sst2_batches: int, notes: list[str]):
    """``(enc, inputs, items, batches)``: the SST-2 batches packed for our runtime, and per scenario the padded
    ``(ids, mask, types)`` arrays every method gets, the items and the batches of one call."""
    rng = np.random.default_rng(0)
    sentences, source = _sst2_sentences((2 if quick else sst2_batches) * 32, quick)
    notes.append(f"throughput_b32_sst2 texts: {source}")
    enc = [sm.encode(sentences[i:i + 32], seq) for i in range(0, len(sentences), 32)]

    def padded(e, width):
        ids, _, types, lens, _ = e
        B = len(lens)
        out_ids, mask, tt = (np.zeros((B, width), np.int64) for _ in range(3))
        o = 0
        for b, n in enumerate(lens):
            out_ids[b, :n], tt[b, :n], mask[b, :n] = ids[o:o + n], types[o:o + n], 1
            o += n
        return out_ids, mask, tt

    inputs = {}
    vocab = sm.word.shape[0]
    for name, B in (("latency_b1_s128", 1), ("throughput_b32_s128", 32)):
        ids = rng.integers(1000 if vocab > 2000 else 5, min(20000, vocab), (B, seq)).astype(np.int64)
        ids[:, 0], ids[:, -1] = 101 % vocab, 102 % vocab
        inputs[name] = [(ids, np.ones_like(ids), np.zeros_like(ids))]
    inputs["throughput_b32_sst2"] = [padded(e, int(e[3].max())) for e in enc]
    items = {s: sum(x[0].shape[0] for x in v) for s, v in inputs.items()}
    batches = {s: len(v) for s, v in inputs.items()}
    return enc, inputs, items, batches


def _interleave(runners: dict, batches: dict, rounds: int, settle: float, log, timed_inside=()) -> dict:
    """Per (scenario, method), the ms per batch of each round: every round runs each method once to warm up and
    once timed, in an order that rotates between rounds. ``timed_inside`` methods return their own seconds."""
    per: dict[tuple[str, str], list[float]] = {}
    for s in SCENARIOS:
        order = list(runners[s])
        for r in range(rounds):
            for meth in order[r % len(order):] + order[:r % len(order)]:
                fn = runners[s][meth]
                time.sleep(settle)  # the previous method's thread pool stops spinning
                fn()  # warm-up
                t = time.perf_counter()
                inner = fn()
                el = inner if meth in timed_inside else time.perf_counter() - t
                per.setdefault((s, meth), []).append(el * 1e3 / batches[s])
            log(f"  {s} round {r + 1}/{rounds}: " + ", ".join(f"{m} {per[(s, m)][-1]:.1f} ms" for m in order))
    return per


def _records(per: dict, items: dict, batches: dict, *, seq: int, threads: int, baseline: str) -> list[dict]:
    """One record per (scenario, method): median, range, items/s and the per-round speedup over ``baseline``
    (median and quartiles, key ``speedup_vs_<baseline>``)."""
    records = []
    for (s, meth), ms in per.items():
        ms_a = np.array(ms)
        base = per.get((s, baseline))
        sp = np.array(base) / ms_a if base else None
        B = items[s] / batches[s]
        records.append({
            "scenario": s, "method": meth, "median_ms": float(np.median(ms_a)), "min_ms": float(ms_a.min()),
            "max_ms": float(ms_a.max()), "items_per_s": float(B * 1e3 / np.median(ms_a)),
            f"speedup_vs_{baseline}": None if sp is None else float(np.median(sp)),
            "speedup_q25": None if sp is None else float(np.quantile(sp, 0.25)),
            "speedup_q75": None if sp is None else float(np.quantile(sp, 0.75)),
            "rounds": len(ms), "batch": int(B), "seq_len": seq if s != "throughput_b32_sst2" else "real",
            "threads": threads, "per_round_ms": [round(v, 3) for v in ms],
        })
    return records


def _torch_run(m, inputs, features: bool = False):
    """One call of a torch model over ``inputs``: keyword tensors, or (``features``) one dict of them, as a
    sentence-transformers model takes."""
    import torch

    def run():
        with torch.no_grad():
            for ids, mask, tt in inputs:
                feats = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
                         "token_type_ids": torch.from_numpy(tt)}
                m(feats) if features else m(**feats)
    return run


def run_benchmark(artifact: str, *, threads: int = 2, rounds: int = 7, quick: bool = False,
                  methods: tuple[str, ...] = METHODS, deepsparse_python: str | None = None,
                  sst2_batches: int = 8, cold_start: bool = True, int8_weights: str = "dequantize",
                  settle: float = 0.1, log=print) -> dict:
    """Interleaved timings of the artifact against the peers; an embeddings artifact is timed against the
    sentence-transformers library (:func:`run_embedding_benchmark`)."""
    import torch

    from sparsify.runtime import SparseModel

    torch.set_num_threads(threads)
    sm = SparseModel.from_pretrained(artifact, threads=threads, int8_weights=int8_weights)
    if sm.head == "embeddings":
        return run_embedding_benchmark(sm, threads=threads, rounds=rounds, quick=quick, sst2_batches=sst2_batches,
                                       settle=settle, log=log)
    seq = min(128, sm.max_positions)
    notes: list[str] = []
    tmp = Path(tempfile.mkdtemp(prefix="sparsify-bench-"))
    model = dense_torch_model(sm)
    have = [m for m in methods if m in METHODS]
    if sm.length_config is None and "sparsify_full" in have:
        have.remove("sparsify_full")
    peers = _peer_engines(model, have, tmp, threads, deepsparse_python, notes)
    enc, scen_inputs, items, batches = _scenario_inputs(sm, seq, quick, sst2_batches, notes)
    sst_max = max(int(e[3].max()) for e in enc)
    runners: dict[str, dict] = {}  # scenario -> method -> callable() running one "call"
    for s, inputs in scen_inputs.items():
        for meth in have:
            fn = _classifier_runner(meth, s, inputs, sm, enc, model, peers, tmp, threads, sst_max, notes)
            if fn is not None:
                runners.setdefault(s, {})[meth] = fn

    # parity of the runtime with the dense torch model on the SST-2 batches (full length)
    with torch.no_grad():
        ref = np.concatenate([model(input_ids=torch.from_numpy(i), attention_mask=torch.from_numpy(m_),
                                    token_type_ids=torch.from_numpy(t_)).logits.numpy()
                              for i, m_, t_ in scen_inputs["throughput_b32_sst2"]])
    got = np.concatenate([sm._forward_packed(e[0], e[1], e[2], e[3], None) for e in enc])
    parity = {"max_abs_logit_diff": float(np.abs(ref - got).max()),
              "argmax_agreement": float((ref.argmax(1) == got.argmax(1)).mean()), "texts": len(ref),
              "reference": "torch fp32, dense-equivalent weights" + (
                  " (activation quantization not simulated: see scripts/parity_sst2.py for int8 parity)"
                  if sm.manifest.get("quantized") else "")}

    rounds = 2 if quick else rounds
    ds = peers.get("deepsparse")
    if ds is not None:
        ds.pause()
    per = _interleave(runners, batches, rounds, settle, log, timed_inside=("deepsparse",))
    records = _records(per, items, batches, seq=seq, threads=threads, baseline=BASELINE)
    cold = _cold_starts(artifact, model, tmp, threads, seq, int8_weights, quick) if cold_start else {}
    if ds is not None:
        ds.close()
    return {"artifact": str(artifact), "head": sm.head, "baseline": BASELINE, "threads": threads, "rounds": rounds,
            "records": records, "cold_start": cold, "parity": parity, "notes": notes,
            "length_config": sm.length_config, "int8_weights": int8_weights, "cpu_count": os.cpu_count(),
            "cpu": cpu_info()}


def _peer_engines(model, have: list[str], tmp: Path, threads: int, deepsparse_python, notes: list[str]) -> dict:
    """The peers that need setting up (onnxruntime session, DeepSparse worker, torch dynamic int8), by method;
    a peer that cannot run is removed from ``have`` with a note."""
    import torch

    from sparsify.export import export_onnx

    peers: dict = {}
    if "onnxruntime" in have or "deepsparse" in have:
        try:
            peers["onnx"] = export_onnx(model, tmp / "model.onnx")
        except Exception as e:
            notes.append(f"onnx export failed ({type(e).__name__}: {e}): onnxruntime and deepsparse skipped")
            have[:] = [m for m in have if m not in ("onnxruntime", "deepsparse")]
    if "onnxruntime" in have:
        try:
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
            peers["onnxruntime"] = ort.InferenceSession(str(peers["onnx"]), so, providers=["CPUExecutionProvider"])
            notes.append(f"onnxruntime {ort.__version__}")
        except ImportError:
            notes.append("onnxruntime not installed: skipped (pip install 'sparsify-encoders[bench]')")
            have.remove("onnxruntime")
    if "deepsparse" in have:
        py = deepsparse_python or os.environ.get("SPARSIFY_DEEPSPARSE_PYTHON") or (
            "/work/ds-venv/bin/python" if Path("/work/ds-venv/bin/python").is_file() else None)
        try:
            if py is None:
                raise RuntimeError("no interpreter with deepsparse (--deepsparse-python)")
            ds = _DeepSparse(py, threads)
            atexit.register(ds.close)  # also if the run fails while the worker is paused (stopped)
            peers["deepsparse"] = ds
            notes.append(f"deepsparse {ds.version} via {py}")
        except Exception as e:
            notes.append(f"deepsparse skipped ({type(e).__name__}: {e})")
            have.remove("deepsparse")
    if "torch_int8_dynamic" in have:
        peers["torch_int8_dynamic"] = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear},
                                                                            dtype=torch.qint8)
    return peers


def _classifier_runner(meth, s, inputs, sm, enc, model, peers, tmp, threads, sst_max, notes):
    """A callable running one timed call of method ``meth`` in scenario ``s`` (None: skipped, with a note)."""
    if meth in ("sparsify", "sparsify_full"):
        lc = "default" if meth == "sparsify" else None
        if s == "throughput_b32_sst2":
            return lambda: [sm._forward_packed(e[0], e[1], e[2], e[3], lc) for e in enc]
        return lambda: [sm(i, m_, t_, length_config=lc) for i, m_, t_ in inputs]
    if meth == "torch_fp32":
        return _torch_run(model, inputs)
    if meth == "torch_int8_dynamic":
        return _torch_run(peers["torch_int8_dynamic"], inputs)
    if meth == "onnxruntime":
        sess = peers["onnxruntime"]
        return lambda: [sess.run(["logits"], {"input_ids": i, "attention_mask": m_, "token_type_ids": t_})
                        for i, m_, t_ in inputs]
    ds = peers["deepsparse"]
    keys = []
    try:
        for j, (i, m_, t_) in enumerate(inputs):
            width = sst_max if s == "throughput_b32_sst2" else i.shape[1]
            arrs = [np.pad(a, ((0, 0), (0, width - a.shape[1]))) for a in (i, m_, t_)]
            paths = []
            for nm, a in zip(("ids", "mask", "types"), arrs):
                paths.append(str(tmp / f"{s}-{j}-{nm}.npy"))
                np.save(paths[-1], a)
            key = f"{s}-{j}"
            ds.call(cmd="load", key=key, onnx=str(peers["onnx"]), inputs=paths, threads=threads)
            keys.append(key)
    except Exception as e:
        notes.append(f"deepsparse {s} skipped: {e}")
        return None

    def fn():  # the worker runs only during its own turn (see WorkerProcess.pause)
        ds.resume()
        try:
            return sum(ds.call(cmd="time", key=k, n=1)["ms"] for k in keys) / 1e3
        finally:
            ds.pause()
    return fn


EMBEDDING_BASELINE = "sentence_transformers"


def run_embedding_benchmark(sm, *, threads: int = 2, rounds: int = 7, quick: bool = False, sst2_batches: int = 8,
                            settle: float = 0.1, log=print) -> dict:
    """An embeddings artifact against the sentence-transformers library (PyTorch fp32) on its dense-equivalent
    weights and pooling: the same scenarios, interleaved; both from token ids (tokenization is not timed, as for
    the classifiers). Parity: the cosine of our embeddings to the library's on the SST-2 batches."""
    import torch

    seq = min(128, sm.max_positions)
    notes: list[str] = ["peers: sentence-transformers (PyTorch fp32) only; onnxruntime / DeepSparse are timed for "
                        "classifier artifacts"]
    tmp = Path(tempfile.mkdtemp(prefix="sparsify-bench-"))
    try:
        st = dense_sentence_transformer(sm, tmp / "st")
    except ImportError:
        raise SparsifyError("bench model on an embeddings artifact times it against the sentence-transformers "
                            "library: pip install sentence-transformers") from None
    import sentence_transformers

    notes.append(f"sentence-transformers {sentence_transformers.__version__}, torch {torch.__version__}")
    enc, scen_inputs, items, batches = _scenario_inputs(sm, seq, quick, sst2_batches, notes)
    runners: dict[str, dict] = {}
    for s, inputs in scen_inputs.items():
        if s == "throughput_b32_sst2":  # packed without padding, as the runtime takes texts
            ours = (lambda: [sm._forward_packed(e[0], e[1], e[2], e[3]) for e in enc])
        else:
            ours = (lambda inputs=inputs: [sm(i, m_, t_) for i, m_, t_ in inputs])
        runners[s] = {"sparsify": ours, EMBEDDING_BASELINE: _torch_run(st, inputs, features=True)}

    with torch.no_grad():
        ref = np.concatenate([st({"input_ids": torch.from_numpy(i), "attention_mask": torch.from_numpy(m_),
                                  "token_type_ids": torch.from_numpy(t_)})["sentence_embedding"].numpy()
                              for i, m_, t_ in scen_inputs["throughput_b32_sst2"]])
    got = np.concatenate([sm._forward_packed(e[0], e[1], e[2], e[3], None) for e in enc])
    cos = (ref * got).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    parity = {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()), "texts": len(ref),
              "reference": "sentence-transformers, dense-equivalent weights" + (
                  " (activation quantization not simulated)" if sm.manifest.get("quantized") else "")}
    rounds = 2 if quick else rounds
    per = _interleave(runners, batches, rounds, settle, log)
    records = _records(per, items, batches, seq=seq, threads=threads, baseline=EMBEDDING_BASELINE)
    return {"artifact": str(sm.path), "head": sm.head, "baseline": EMBEDDING_BASELINE, "threads": threads,
            "rounds": rounds, "records": records, "cold_start": {}, "parity": parity, "notes": notes,
            "length_config": sm.length_config, "int8_weights": None, "cpu_count": os.cpu_count(), "cpu": cpu_info()}


def _cold_starts(artifact, model, tmp: Path, threads: int, seq: int, int8_weights: str, quick: bool) -> dict:
    """A fresh process to its first prediction, for our runtime and (unless quick) PyTorch on the same weights."""
    cold = {}
    for kind in (("sparsify",) if quick else ("sparsify", "torch_fp32")):
        path = Path(artifact)
        if kind == "torch_fp32":
            path = tmp / "hf"
            model.save_pretrained(str(path))
            for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
                if (Path(artifact) / f).is_file():
                    (path / f).write_bytes((Path(artifact) / f).read_bytes())
        try:
            # cwd: a neutral folder, so that the measured process imports what an installed user's would
            res = subprocess.run([sys.executable, "-c", _COLD, kind, str(path.resolve()), str(threads), str(seq),
                                  int8_weights], capture_output=True, text=True, timeout=600, cwd=tmp)
        except subprocess.TimeoutExpired:
            cold[kind] = {"error": "timed out after 600 s"}
            continue
        lines = res.stdout.strip().splitlines()
        if res.returncode != 0 or not lines:
            cold[kind] = {"error": f"exit {res.returncode}: {res.stderr.strip()[-300:] or 'no output'}"}
            continue
        cold[kind] = json.loads(lines[-1])
    return cold


def format_table(result: dict) -> str:
    baseline = result.get("baseline", BASELINE)
    lines = [f"{'scenario':22s} {'method':22s} {'median ms':>10s} {'min-max':>17s} {'items/s':>9s}  speedup vs "
             f"{baseline} median [IQR]"]
    for r in result["records"]:
        v = r[f"speedup_vs_{baseline}"]
        sp = "-" if v is None else f"{v:.2f} [{r['speedup_q25']:.2f}-{r['speedup_q75']:.2f}]"
        lines.append(f"{r['scenario']:22s} {r['method']:22s} {r['median_ms']:10.1f} "
                     f"{r['min_ms']:8.1f}-{r['max_ms']:<8.1f} {r['items_per_s']:9.1f}  {sp}")
    for kind, c in result["cold_start"].items():
        if "error" in c:
            lines.append(f"cold start {kind}: {c['error']}")
        else:
            lines.append(f"cold start {kind}: {c['cold_start_s']:.2f} s to first prediction (import {c['import_s']:.2f}, "
                         f"load {c['load_s']:.2f}, first {c['first_prediction_s']:.2f}); peak RSS after a batch of 32: "
                         f"{c['peak_rss_mb']:.0f} MB")
    p = result["parity"]
    if "min_cosine" in p:
        lines.append(f"parity vs {p['reference']} on {p['texts']} texts (full length): cosine min {p['min_cosine']:.6f}, "
                     f"mean {p['mean_cosine']:.6f}")
    else:
        lines.append(f"parity vs {p.get('reference', 'torch fp32')} on {p['texts']} texts (full length): max |logit "
                     f"diff| {p['max_abs_logit_diff']:.2e}, argmax agreement {100 * p['argmax_agreement']:.2f}%")
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from sparsify.runtime.model import INT8_WEIGHTS

    parser = argparse.ArgumentParser(prog="sparsify bench model", description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", help="artifact directory written by 'sparsify export'")
    parser.add_argument("--json", dest="json_path", help="write the records (and cold start, notes) to this file")
    parser.add_argument("--quick", action="store_true", help="2 rounds, 2 SST-2 batches, no torch cold start (smoke)")
    parser.add_argument("--threads", type=int, default=2,
                        help="CPU threads for every method, ours and the peers alike (default 2)")
    parser.add_argument("--rounds", type=int, default=7,
                        help="interleaved rounds per scenario; medians and spread are over these (default 7)")
    parser.add_argument("--sst2-batches", type=int, default=8,
                        help="batches of 32 real SST-2 validation sentences in throughput_b32_sst2 (default 8)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated subset of {','.join(METHODS)} (default: all; sparsify_full is our "
                             "runtime without token dropping, run when the artifact has a length configuration)")
    parser.add_argument("--deepsparse-python", default=None,
                        help="interpreter with deepsparse==1.8.0 (default: $SPARSIFY_DEEPSPARSE_PYTHON)")
    parser.add_argument("--int8-weights", choices=INT8_WEIGHTS, default="dequantize",
                        help="quantized artifacts: hold int8 weights as float32 from load (dequantize, default: "
                             "faster here) or keep the codes and widen them in the kernel (keep: 4x less weight "
                             "memory)")
    parser.add_argument("--no-cold-start", action="store_true",
                        help="skip the cold-start measurement (a fresh process to its first prediction)")
    parser.add_argument("--settle", type=float, default=0.1,
                        help="seconds of pause before each method's turn, so that the previous method's spinning "
                        "thread pool is idle (default 0.1)")
    args = parser.parse_args(argv)
    if not 0.0 <= args.settle <= 10.0:
        parser.error(f"--settle must be in [0, 10] seconds, got {args.settle}")
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    bad = [m for m in methods if m not in METHODS]
    try:
        if bad:
            raise SparsifyError(f"--methods: unknown {', '.join(bad)} (choose from {', '.join(METHODS)})")
        if BASELINE not in methods:
            raise SparsifyError(f"--methods must include the baseline {BASELINE}")
        result = run_benchmark(args.artifact, threads=args.threads, rounds=args.rounds, quick=args.quick,
                               methods=methods, deepsparse_python=args.deepsparse_python,
                               sst2_batches=args.sst2_batches, cold_start=not args.no_cold_start,
                               int8_weights=args.int8_weights, settle=args.settle,
                               log=lambda s: print(s, file=sys.stderr))
    except SparsifyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(result))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
