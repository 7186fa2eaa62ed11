"""DeepSparse timing worker for ``sparsify bench kernels`` (standalone: numpy, onnx and deepsparse only).

Run with an interpreter that has ``deepsparse==1.8.0`` (it pins numpy < 2, so it often lives in its own
virtualenv). Protocol: one JSON object per line on stdin, one JSON reply per line on stdout.

* ``{"cmd": "load", "key": k, "weight": path.npy, "bias": path.npy, "x": path.npy, "threads": n}``
  builds ``y = x @ W^T + b`` as ONNX (W^T as a MatMul initializer: DeepSparse finds its sparsity itself),
  compiles it and returns ``{"ok": true, "max_abs_err": ...}`` against numpy;
* ``{"cmd": "time", "key": k, "n": n}`` runs it ``n`` times and returns ``{"ms": per_call}``;
* ``{"cmd": "drop", "key": k}`` / ``{"cmd": "quit"}``.
"""

import json
import os
import sys
import tempfile
import time


def main() -> int:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    import deepsparse

    engines = {}
    tmp = tempfile.mkdtemp(prefix="ds-bench-")
    out = sys.stdout
    sys.stdout = sys.stderr  # deepsparse prints banners; keep the protocol channel clean
    out.write(json.dumps({"ok": True, "version": deepsparse.__version__}) + "\n")
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        try:
            cmd = req["cmd"]
            if cmd == "quit":
                break
            if cmd == "load":
                w = np.load(req["weight"])
                b = np.load(req["bias"])
                x = np.load(req["x"])[None]
                n_out, n_in = w.shape
                m = x.shape[1]
                xi = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, m, n_in])
                yo = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, m, n_out])
                nodes = [helper.make_node("MatMul", ["x", "wt"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])]
                inits = [numpy_helper.from_array(np.ascontiguousarray(w.T), "wt"), numpy_helper.from_array(b, "b")]
                model = helper.make_model(
                    helper.make_graph(nodes, "linear", [xi], [yo], inits),
                    opset_imports=[helper.make_opsetid("", 13)],
                )
                model.ir_version = 8
                path = os.path.join(tmp, f"{req['key']}.onnx")
                onnx.save(model, path)
                eng = deepsparse.Engine(path, batch_size=1, num_cores=int(req["threads"]))
                y = eng.run([x])[0]
                err = float(np.abs(y[0].astype(np.float64) - (x[0].astype(np.float64) @ w.T.astype(np.float64) + b)).max())
                engines[req["key"]] = (eng, x)
                reply = {"ok": True, "max_abs_err": err}
            elif cmd == "time":
                eng, x = engines[req["key"]]
                n = int(req["n"])
                t = time.perf_counter()
                for _ in range(n):
                    eng.run([x])
                reply = {"ok": True, "ms": (time.perf_counter() - t) / n * 1e3}
            elif cmd == "drop":
                engines.pop(req["key"], None)
                reply = {"ok": True}
            else:
                reply = {"ok": False, "error": f"unknown command {cmd!r}"}
        except Exception as e:  # report, keep serving
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
