"""``sparsify bench kernels``: our block-sparse kernels against torch dense / torch CSR / DeepSparse.

Every method runs on the same matrices in the same process, interleaved round-robin (one timed batch of
calls per method per round), so machine noise hits all of them alike; per-round ratios against torch dense are
summarized by their median, inter-quartile range and min-max. FLOP counts are 2 per multiply-add, on the
stored (non-zero) weights: ``2 * tokens * nnz``.

torch is imported lazily here (never by the kernels). DeepSparse 1.8 pins numpy < 2, so it may run in a
separate interpreter: ``--deepsparse-python /path/to/venv/bin/python`` (or ``$SPARSIFY_DEEPSPARSE_PYTHON``)
starts ``_deepsparse_worker.py`` there and times it through a pipe (its engine is timed inside the worker, so
the pipe is not counted). DeepSparse Community is licensed for evaluation / research / non-production use.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

SHAPES = [(384, 384), (1536, 384), (384, 1536), (768, 768), (3072, 768), (768, 3072)]
TOKENS = [128, 1024]
SPARSITIES = [0.70, 0.80, 0.90, 0.95]
ALL_METHODS = ["ours_fp32", "ours_int8w", "ours_int8", "ours_int8_static", "torch_dense", "torch_csr", "deepsparse"]
BASELINE = "torch_dense"


@dataclass
class Record:
    out_features: int
    in_features: int
    tokens: int
    sparsity: float
    block: str
    method: str
    threads: int
    median_ms: float
    min_ms: float
    max_ms: float
    speedup_vs_torch_dense: float
    speedup_q25: float
    speedup_q75: float
    speedup_min: float
    speedup_max: float
    gflops_nnz: float
    rounds: int
    per_round_ms: list = field(default_factory=list)
    note: str = ""
    # per-round ratios (other ms / this ms), median [min, max]; None when that method was not measured
    speedup_vs_ours_fp32: float | None = None
    speedup_vs_ours_fp32_range: list | None = None
    speedup_vs_deepsparse: float | None = None
    speedup_vs_deepsparse_range: list | None = None


def _parse_shape(s: str) -> tuple[int, int]:
    try:
        a, b = s.lower().split("x")
        return int(a), int(b)
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {s!r} is not OUTxIN, e.g. 768x3072") from None


def _csv(conv):
    def parse(s: str):
        try:
            return [conv(v) for v in s.split(",") if v]
        except (ValueError, argparse.ArgumentTypeError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sparsify bench kernels",
        description="Time the block-sparse kernels against torch dense fp32 (F.linear), torch CSR and DeepSparse, "
        "interleaved round-robin in one process. Block orientation: rows x cols of the (out, in) weight.",
    )
    p.add_argument("--shapes", type=_csv(_parse_shape), default=None, help="OUTxIN list (default: the six BERT shapes)")
    p.add_argument("--tokens", type=_csv(int), default=None, help="token counts M (default 128,1024)")
    p.add_argument("--sparsities", type=_csv(float), default=None, help="default 0.7,0.8,0.9,0.95")
    p.add_argument("--block", default="4x1", help="block shape rows x cols, out x in (default 4x1)")
    p.add_argument("--methods", type=_csv(str), default=None, help=f"subset of {','.join(ALL_METHODS)}")
    p.add_argument("--threads", type=int, default=None, help="threads for numba, torch and DeepSparse (default: all cores)")
    p.add_argument("--rounds", type=int, default=None, help="round-robin repetitions (default 7, quick 3)")
    p.add_argument("--min-time", type=float, default=None, help="seconds per timed batch (default 0.05, quick 0.01)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deepsparse-python", default=os.environ.get("SPARSIFY_DEEPSPARSE_PYTHON"),
                   help="interpreter with deepsparse==1.8.0 (default: $SPARSIFY_DEEPSPARSE_PYTHON, else in-process "
                   "import if available)")
    p.add_argument("--quick", action="store_true", help="smoke grid: 90%% sparsity, M=128, 3 rounds")
    p.add_argument("--json", metavar="PATH", help="write the records as JSON: {threads, cpu (model, count, "
                   "/proc/cpuinfo flags), load_average, records: [...]}; timings compare only on the same CPU")
    return p


# ------------------------------------------------------------------------------------------ problem setup
def make_weight(n_out: int, n_in: int, block: tuple[int, int], sparsity: float, rng: np.random.Generator):
    """Random weight with exactly round(sparsity * blocks) zero blocks, uniformly placed."""
    br, bc = block
    nb = (n_out // br) * (n_in // bc)
    keep = np.zeros(nb, dtype=bool)
    keep[rng.choice(nb, size=int(round((1.0 - sparsity) * nb)), replace=False)] = True
    bmask = keep.reshape(n_out // br, n_in // bc)
    w = (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(np.float32)
    w *= np.repeat(np.repeat(bmask, br, axis=0), bc, axis=1)
    return w, bmask


class WorkerProcess:
    """A benchmark peer in another interpreter (DeepSparse cannot share this venv), spoken to in JSON lines:
    one request per line, one reply per line with ``ok`` and, on failure, ``error``."""

    def __init__(self, argv: list[str]):
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True)

    def recv(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("deepsparse worker exited")
        return json.loads(line)

    def call(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        rep = self.recv()
        if not rep.get("ok"):
            raise RuntimeError(f"deepsparse worker: {rep.get('error')}")
        return rep

    def pause(self) -> None:
        """Stop the process (SIGSTOP) while other methods are timed: DeepSparse's engine threads keep polling
        between its own runs (its worker averaged more than one of the 2 cores over a whole model benchmark) and
        would take CPU from the others. No-op where the platform has no SIGSTOP."""
        if hasattr(signal, "SIGSTOP") and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if hasattr(signal, "SIGCONT") and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)

    def close(self) -> None:
        self.resume()
        try:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()


class _DeepSparse:
    """A DeepSparse engine pool, in-process or in a worker subprocess."""

    def __init__(self, python: str | None, threads: int):
        self.threads = threads
        self.proc = None
        self.local = None
        self.tmp = tempfile.mkdtemp(prefix="sparsify-bench-")
        if python:
            worker = os.path.join(os.path.dirname(__file__), "_deepsparse_worker.py")
            self.proc = WorkerProcess([python, worker])
            hello = self.proc.recv()
            if not hello.get("ok"):
                raise RuntimeError(f"deepsparse worker failed to start: {hello}")
            self.version = hello.get("version", "?")
        else:
            import deepsparse  # noqa: F401  (ImportError: not available)

            self.version = deepsparse.__version__
            self.local = {}

    def load(self, key: str, w: np.ndarray, b: np.ndarray, x: np.ndarray) -> Callable[[int], float]:
        """Returns ``time(n) -> ms per call`` (timed inside the engine's process)."""
        paths = {}
        for name, arr in (("weight", w), ("bias", b), ("x", x)):
            paths[name] = os.path.join(self.tmp, f"{key}-{name}.npy")
            np.save(paths[name], arr)
        if self.proc is not None:
            self.proc.resume()
            self.proc.call(cmd="load", key=key, threads=self.threads, **paths)
            self.proc.pause()

            def timed(n: int) -> float:  # the worker runs only during its own turn (see WorkerProcess.pause)
                self.proc.resume()
                try:
                    return self.proc.call(cmd="time", key=key, n=n)["ms"]
                finally:
                    self.proc.pause()

            return timed
        # In-process: reuse the worker's model builder through its protocol-free path.
        import onnx
        from onnx import TensorProto, helper, numpy_helper

        import deepsparse

        m = x.shape[0]
        xi = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, m, w.shape[1]])
        yo = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, m, w.shape[0]])
        nodes = [helper.make_node("MatMul", ["x", "wt"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])]
        inits = [numpy_helper.from_array(np.ascontiguousarray(w.T), "wt"), numpy_helper.from_array(b, "b")]
        model = helper.make_model(helper.make_graph(nodes, "linear", [xi], [yo], inits),
                                  opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8
        path = os.path.join(self.tmp, f"{key}.onnx")
        onnx.save(model, path)
        eng = deepsparse.Engine(path, batch_size=1, num_cores=self.threads)
        xb = x[None]

        def run(n: int) -> float:
            t = time.perf_counter()
            for _ in range(n):
                eng.run([xb])
            return (time.perf_counter() - t) / n * 1e3

        return run

    def drop(self, key: str) -> None:
        if self.proc is not None:
            self.proc.resume()
            self.proc.call(cmd="drop", key=key)
            self.proc.pause()

    def close(self) -> None:
        if self.proc is not None:
            self.proc.close()


def _timer(fn: Callable[[], object]) -> Callable[[int], float]:
    def run(n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t) / n * 1e3

    return run


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .format import BlockSparseMatrix, format_block, parse_block
    from .int8 import int8_backend, quantize_activations, spmm_int8
    from .spmm import spmm
    from .threads import set_num_threads, threading_layer

    try:
        block = parse_block(args.block)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    shapes = args.shapes or SHAPES
    tokens = args.tokens or ([128] if args.quick else TOKENS)
    sparsities = args.sparsities or ([0.90] if args.quick else SPARSITIES)
    rounds = args.rounds or (3 if args.quick else 7)
    min_time = args.min_time if args.min_time is not None else (0.01 if args.quick else 0.05)
    pause = 0.0 if args.quick else 0.01
    methods = args.methods or list(ALL_METHODS)
    unknown = sorted(set(methods) - set(ALL_METHODS))
    if unknown:
        print(f"error: unknown methods {unknown}; choose from {ALL_METHODS}", file=sys.stderr)
        return 2
    if BASELINE not in methods:
        methods = [BASELINE] + methods
    for s in sparsities:
        if not 0.0 <= s < 1.0:
            print(f"error: sparsity {s} not in [0, 1)", file=sys.stderr)
            return 2
    for n_out, n_in in shapes:
        if n_out % block[0] or n_in % block[1]:
            print(f"error: block {format_block(block)} does not divide {n_out}x{n_in}", file=sys.stderr)
            return 2

    import torch
    import torch.nn.functional as F

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    set_num_threads(threads)

    ds = None
    ds_note = ""
    if "deepsparse" in methods:
        try:
            ds = _DeepSparse(args.deepsparse_python, threads)
            ds_note = f"deepsparse {ds.version}" + (f" via {args.deepsparse_python}" if args.deepsparse_python else "")
        except Exception as e:  # optional peer
            methods = [m for m in methods if m != "deepsparse"]
            ds_note = f"deepsparse not measured ({type(e).__name__}: {e})"

    rng = np.random.default_rng(args.seed)
    cal_rng = np.random.default_rng(args.seed + 1)  # its own stream: the problems do not depend on the methods
    records: list[Record] = []
    print(f"# sparsify bench kernels: block {format_block(block)} (out x in), threads {threads} "
          f"(numba {threading_layer()} + torch {torch.get_num_threads()}), rounds {rounds}, "
          f"methods {','.join(methods)}")
    if ds_note:
        print(f"# {ds_note}")
    if hasattr(os, "getloadavg"):  # the machine may be shared: say how loaded it was
        print("# load average at start (1, 5, 15 min): " + ", ".join(f"{v:.2f}" for v in os.getloadavg()))
    print("# speedup = torch dense ms / method ms per round: median [IQR] (min-max); GFLOP/s = 2*M*nnz / median")
    try:
        for n_out, n_in in shapes:
            for m in tokens:
                x = rng.standard_normal((m, n_in)).astype(np.float32)
                xt = torch.from_numpy(x)
                for sp in sparsities:
                    w, _ = make_weight(n_out, n_in, block, sp, rng)
                    bias = (0.1 * rng.standard_normal(n_out)).astype(np.float32)
                    bsm = BlockSparseMatrix.from_dense(w, block, bias=bias)
                    nnz = bsm.nnz
                    out = np.empty((m, n_out), np.float32)
                    runs: dict[str, Callable[[int], float]] = {}
                    notes: dict[str, str] = {}
                    wt, bt = torch.from_numpy(w), torch.from_numpy(bias)
                    ref = x.astype(np.float64) @ w.T.astype(np.float64) + bias
                    for meth in methods:
                        if meth == "torch_dense":
                            runs[meth] = _timer(lambda: F.linear(xt, wt, bt))
                        elif meth == "torch_csr":
                            with warnings.catch_warnings():
                                warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
                                wcsr = wt.to_sparse_csr()
                            xT = xt.t()
                            runs[meth] = _timer(lambda wcsr=wcsr, xT=xT: torch.mm(wcsr, xT))
                            notes[meth] = "mm(W_csr, X^T), no bias, result left transposed"
                        elif meth == "ours_fp32":
                            spmm(x, bsm, out=out)
                            err = float(np.abs(out - ref).max())
                            runs[meth] = _timer(lambda: spmm(x, bsm, out=out))
                            notes[meth] = f"max_abs_err {err:.2e}"
                        elif meth == "ours_int8w":
                            q = bsm.quantize()
                            spmm(x, q, out=out)
                            err = float(np.abs(out - ref).max())
                            runs[meth] = _timer(lambda q=q: spmm(x, q, out=out))
                            notes[meth] = f"int8 weights, fp32 activations; max_abs_err {err:.2e}"
                        elif meth == "ours_int8":
                            q8 = bsm.quantize()
                            spmm_int8(x, q8, out=out)
                            err = float(np.abs(out - ref).max())
                            runs[meth] = _timer(lambda q8=q8: spmm_int8(x, q8, out=out))
                            notes[meth] = (f"int8 x int8 -> int32 ({int8_backend(q8)}), u7 activations per tensor "
                                           f"(dynamic), int8 weights per channel; max_abs_err {err:.2e}")
                        elif meth == "ours_int8_static":
                            # activation scale / zero point fixed beforehand (as a QAT-trained model carries them),
                            # calibrated on another batch of the same distribution; values outside are clipped
                            q8 = bsm.quantize()
                            _, s_x, zp = quantize_activations(cal_rng.standard_normal((m, n_in)).astype(np.float32))
                            spmm_int8(x, q8, out=out, x_scale=s_x, x_zero_point=zp)
                            err = float(np.abs(out - ref).max())
                            runs[meth] = _timer(lambda q8=q8, s_x=s_x, zp=zp: spmm_int8(x, q8, out=out, x_scale=s_x,
                                                                                         x_zero_point=zp))
                            notes[meth] = (f"int8 x int8 -> int32 ({int8_backend(q8)}), u7 activations per tensor "
                                           f"(static, calibrated on another batch), int8 weights per channel; "
                                           f"max_abs_err {err:.2e}")
                        elif meth == "deepsparse":
                            key = f"{n_out}x{n_in}-{m}-{sp}"
                            try:
                                runs[meth] = ds.load(key, w, bias, x)
                                notes[meth] = ds_note
                            except Exception as e:
                                notes[meth] = f"failed: {e}"
                    # Calibrate batch sizes: each timed batch lasts at least min_time.
                    reps = {}
                    for meth, run in runs.items():
                        run(1)
                        t1 = max(run(1), 1e-3)
                        reps[meth] = max(1, int(np.ceil(min_time * 1e3 / t1)))
                    per_round: dict[str, list[float]] = {k: [] for k in runs}
                    for _ in range(rounds):
                        for meth, run in runs.items():
                            time.sleep(pause)  # let the previous method's thread pool stop spinning
                            run(1)  # warm-up: caches refill, this pool wakes up
                            per_round[meth].append(run(reps[meth]))
                    base = np.array(per_round[BASELINE])
                    line = [f"{n_out}x{n_in} M={m} {sp:.0%}:"]
                    for meth, ts in per_round.items():
                        ts = np.array(ts)
                        ratio = base / ts
                        med = float(np.median(ts))
                        rec = Record(
                            out_features=n_out, in_features=n_in, tokens=m, sparsity=sp, block=format_block(block),
                            method=meth, threads=threads, median_ms=med, min_ms=float(ts.min()),
                            max_ms=float(ts.max()), speedup_vs_torch_dense=float(np.median(ratio)),
                            speedup_q25=float(np.percentile(ratio, 25)), speedup_q75=float(np.percentile(ratio, 75)),
                            speedup_min=float(ratio.min()), speedup_max=float(ratio.max()),
                            gflops_nnz=2.0 * m * nnz / (med * 1e-3) / 1e9, rounds=rounds,
                            per_round_ms=[float(v) for v in ts], note=notes.get(meth, ""),
                        )
                        for other, attr in (("ours_fp32", "speedup_vs_ours_fp32"), ("deepsparse", "speedup_vs_deepsparse")):
                            if other in per_round and other != meth:
                                rel = np.array(per_round[other]) / ts
                                setattr(rec, attr, float(np.median(rel)))
                                setattr(rec, attr + "_range", [float(rel.min()), float(rel.max())])
                        records.append(rec)
                        if meth == BASELINE:
                            line.append(f"{meth} {med:.3f} ms")
                        else:
                            line.append(
                                f"{meth} {med:.3f} ms x{rec.speedup_vs_torch_dense:.2f} "
                                f"[{rec.speedup_q25:.2f}-{rec.speedup_q75:.2f}] ({rec.speedup_min:.2f}-"
                                f"{rec.speedup_max:.2f}) {rec.gflops_nnz:.0f} GF/s"
                            )
                    print(" | ".join(line), flush=True)
                    rel = [f"{r.method} vs ours_fp32 x{r.speedup_vs_ours_fp32:.2f} ({r.speedup_vs_ours_fp32_range[0]:.2f}-"
                           f"{r.speedup_vs_ours_fp32_range[1]:.2f})" for r in records[-len(per_round):]
                           if r.speedup_vs_ours_fp32 is not None and r.method.startswith("ours")]
                    rel += [f"{r.method} vs deepsparse x{r.speedup_vs_deepsparse:.2f} ({r.speedup_vs_deepsparse_range[0]:.2f}-"
                            f"{r.speedup_vs_deepsparse_range[1]:.2f})" for r in records[-len(per_round):]
                            if r.speedup_vs_deepsparse is not None and r.method.startswith("ours")]
                    if rel:
                        print("    per-round speedups (other ms / ours ms): " + ", ".join(rel), flush=True)
                    if "deepsparse" in runs:
                        ds.drop(f"{n_out}x{n_in}-{m}-{sp}")
    finally:
        if ds is not None:
            ds.close()
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    if load is not None:
        print("# load average at end (1, 5, 15 min): " + ", ".join(f"{v:.2f}" for v in load))
    if args.json:
        from sparsify.machine import cpu_info

        with open(args.json, "w") as f:
            json.dump({"threads": threads, "cpu": cpu_info(), "load_average_at_end": load,
                       "records": [asdict(r) for r in records]}, f, indent=1)
        print(f"# wrote {len(records)} records to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
