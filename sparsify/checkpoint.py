"""Checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint is a directory ``checkpoints/step-000500`` holding

    model.safetensors          the (unwrapped) model's weights
    optimizer.{safetensors,json}, scheduler.json
    techniques.{safetensors,json}   every technique's state_dict (masks, projections, ...)
    rng-<rank>.{safetensors,json}   torch / numpy / python RNG states of each process
    trainer_state.json         optimizer step, epoch, data position, best metric, elapsed time

It is written to ``step-000500.tmp`` and renamed when complete, so a run killed while saving leaves no
half-written checkpoint for ``--resume`` to trip over.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

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
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp") and (p / "trainer_state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


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
