"""Checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint is a directory ``checkpoints/step-000500`` holding

    model.safetensors          the (unwrapped) model's weights
    optimizer.{safetensors,json}, scheduler.json
    techniques.{safetensors,json}   every technique's state_dict (masks, projections, ...)
    rng-<rank>.{safetensors,json}   torch / numpy / python RNG states of each process
    trainer_state.json         optimizer step, epoch, data position, best metric, elapsed time
    manifest.json              size and sha256 of every other file, written last

It is written to ``step-000500.tmp`` and renamed when complete, so a run killed while saving leaves no
half-written checkpoint for ``--resume`` to trip over. A checkpoint damaged later (a truncated or missing file,
a flipped byte) fails its checksums: :func:`resume_checkpoint` takes the newest checkpoint that is intact and
says which newer ones it skipped and why. A checkpoint without a manifest (written before checksums existed) is
used only if every file it needs is present and parses.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from sparsify.errors import SparsifyError
from sparsify.runtime.model import sha256_file

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "sparsify-checkpoint"
_REQUIRED = ("model.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json",
             "techniques.safetensors", "techniques.json", "trainer_state.json")
_STEP = re.compile(r"step-(\d+)")
_TENSOR = "__tensor__"
_INT_KEYS = "__int_keys__"


def save_state(stem: Path, state: dict) -> None:
    """Write a nested dict (tensor or JSON leaves) as ``stem.safetensors`` + ``stem.json``."""
    tensors: dict[str, torch.Tensor] = {}

    def encode(obj, key):
        if isinstance(obj, torch.Tensor):
            tensors[key] = obj.detach().cpu().contiguous().clone()
            return {_TENSOR: key}
        if isinstance(obj, np.ndarray):
            return encode(torch.from_numpy(obj), key)
        if isinstance(obj, dict):
            if obj and all(isinstance(k, int) for k in obj):
                return {_INT_KEYS: {str(k): encode(v, f"{key}/{k}") for k, v in obj.items()}}
            return {str(k): encode(v, f"{key}/{k}") for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [encode(v, f"{key}/{i}") for i, v in enumerate(obj)]
        if isinstance(obj, (np.integer, np.floating)):
            return obj.item()
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        raise TypeError(f"cannot checkpoint {type(obj).__name__} at {key!r}: use tensors or JSON values")

    doc = encode(state, "")
    save_file(tensors, str(stem) + ".safetensors")
    Path(str(stem) + ".json").write_text(json.dumps(doc, indent=1))


def load_state(stem: Path) -> dict:
    tensors = load_file(str(stem) + ".safetensors")
    doc = json.loads(Path(str(stem) + ".json").read_text())

    def decode(obj):
        if isinstance(obj, dict):
            if set(obj) == {_TENSOR}:
                return tensors[obj[_TENSOR]]
            if set(obj) == {_INT_KEYS}:
                return {int(k): decode(v) for k, v in obj[_INT_KEYS].items()}
            return {k: decode(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [decode(v) for v in obj]
        return obj

    return decode(doc)


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": np_state[1], "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy(), n["pos"], n["has_gauss"], n["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Checkpoints of a run (``step-NNNNNN`` directories, not the ``.tmp`` ones being written), oldest first.
    They are not checked here: :func:`resume_checkpoint` picks an intact one."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if _STEP.fullmatch(p.name) and p.is_dir()]
    return sorted(done, key=lambda p: int(_STEP.fullmatch(p.name).group(1)))


def write_manifest(ckpt: Path) -> None:
    """``manifest.json``: size and sha256 of every file of the checkpoint directory; written last."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(Path(ckpt).iterdir()) if p.is_file() and p.name != MANIFEST}
    (Path(ckpt) / MANIFEST).write_text(json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=1))


def verify_checkpoint(ckpt: Path) -> str | None:
    """Why ``ckpt`` cannot be resumed from (a missing, truncated or modified file), or None when it is intact."""
    ckpt = Path(ckpt)
    mpath = ckpt / MANIFEST
    if not mpath.is_file():
        return _check_unverified(ckpt)
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        files = manifest["files"] if manifest.get("format") == MANIFEST_FORMAT else None
        if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
            raise ValueError("not a checkpoint manifest")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, AttributeError) as e:
        return f"{MANIFEST}: unreadable ({e})"
    for name in _REQUIRED:
        if name not in files:
            return f"{MANIFEST}: does not list {name}"
    for name, info in files.items():
        f = ckpt / name
        if Path(name).name != name:
            return f"{MANIFEST}: bad file name {name!r}"
        if not f.is_file():
            return f"{name}: missing"
        if f.stat().st_size != info.get("bytes"):
            return f"{name}: {f.stat().st_size} bytes, {info.get('bytes')} when saved (truncated or modified)"
        if sha256_file(f) != info.get("sha256"):
            return f"{name}: sha256 checksum mismatch (modified or corrupted)"
    return None


def _check_unverified(ckpt: Path) -> str | None:
    """A checkpoint without manifest (older sparsify): every required file present and parsing."""
    from safetensors import safe_open

    for name in _REQUIRED:
        f = ckpt / name
        if not f.is_file():
            return f"{name}: missing (and no {MANIFEST} with checksums)"
        try:
            if name.endswith(".json"):
                json.loads(f.read_text(encoding="utf-8"))
            else:
                with safe_open(str(f), framework="pt") as st:
                    for key in st.keys():
                        st.get_slice(key)
        except Exception as e:  # safetensors raises its own error types for malformed files
            return f"{name}: unreadable ({type(e).__name__}: {e}) (and no {MANIFEST} with checksums)"
    return None


def resume_checkpoint(run_dir: Path) -> Path:
    """The newest intact checkpoint of a run; the newer, damaged ones are named on stderr with the reason. A
    :class:`SparsifyError` when there is none."""
    ckpts = checkpoint_dirs(run_dir)
    if not ckpts:
        raise SparsifyError(f"--resume: no checkpoint in {Path(run_dir) / 'checkpoints'}; start the run without "
                            "--resume")
    skipped = []
    for ckpt in reversed(ckpts):
        reason = verify_checkpoint(ckpt)
        if reason is None:
            for path, why in skipped:
                print(f"warning: --resume: skipped the damaged checkpoint {path}: {why}", file=sys.stderr)
            if not (ckpt / MANIFEST).is_file():
                print(f"warning: --resume: {ckpt} has no {MANIFEST}: its files parse but carry no checksums",
                      file=sys.stderr)
            return ckpt
        skipped.append((ckpt, reason))
    worst = "; ".join(f"{p.name}: {why}" for p, why in skipped)
    raise SparsifyError(f"--resume: no intact checkpoint in {Path(run_dir) / 'checkpoints'} ({worst}); start "
                        "again with --overwrite")


def write_checkpoint(run_dir: Path, step: int, *, model, optimizer, scheduler, techniques: dict, trainer_state: dict,
                     rank: int, is_main: bool, barrier, keep: int) -> Path:
    """Write a checkpoint from every process (each saves its RNG state); returns its directory."""
    from safetensors.torch import save_model

    final = Path(run_dir) / "checkpoints" / f"step-{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    if is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    save_state(tmp / f"rng-{rank}", rng_state())
    if is_main:
        save_model(model, str(tmp / "model.safetensors"))
        save_state(tmp / "optimizer", optimizer.state_dict())
        (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict(), indent=1, default=_no_callables))
        save_state(tmp / "techniques", techniques)
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
    barrier()
    if is_main:
        write_manifest(tmp)  # last: every process's files are written
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in checkpoint_dirs(run_dir)[:-keep]:
            shutil.rmtree(old)
    barrier()
    return final


def _no_callables(obj):
    return None  # LambdaLR stores its lambdas as None too: they are rebuilt from the recipe


def read_checkpoint(ckpt: Path, *, model, optimizer, scheduler, rank: int) -> tuple[dict, dict]:
    """Restore model, optimizer, scheduler and this process's RNG; returns (techniques state, trainer state)."""
    from safetensors.torch import load_model

    load_model(model, str(ckpt / "model.safetensors"))
    optimizer.load_state_dict(load_state(ckpt / "optimizer"))
    sched = json.loads((ckpt / "scheduler.json").read_text())
    sched.pop("lr_lambdas", None)
    scheduler.load_state_dict({**scheduler.state_dict(), **sched})
    rng_file = ckpt / f"rng-{rank}"
    if Path(str(rng_file) + ".json").is_file():
        set_rng_state(load_state(rng_file))
    return load_state(ckpt / "techniques"), json.loads((ckpt / "trainer_state.json").read_text())
