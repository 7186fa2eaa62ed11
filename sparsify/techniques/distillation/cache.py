"""Teacher outputs kept on disk across runs (``distillation.teacher_cache: DIR``).

A run that distils from a frozen teacher computes the same teacher outputs in every run of a sweep; with a cache
directory the first run stores them and later runs (and resumed ones) read them instead of running the teacher.

    DIR/cache.json             {"format": 1, "teacher": sha256, "data": sha256, "outputs": {...}, "shards": [...]}
    DIR/shard-00000.safetensors   per example i: "i/ids", "i/types" (token ids and types, no padding) and one
                                  tensor per teacher output ("i/logits", "i/hidden.3", ...)

The cache is keyed by the teacher's weights (a hash of its state dict), the tokenized training data (a hash of the
token ids and types of every example, so a different dataset, split, slice, tokenizer or max length is a different
cache) and the outputs the distillation terms read. A directory built for another key is refused with one error
line; nothing stale is ever read. Each shard carries its sha256 in ``cache.json``: a damaged or missing shard is
skipped with a warning and its examples are computed again. Shards are written atomically (temporary file, then
rename) and only by the main process.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from sparsify.errors import SparsifyError

FORMAT = 1
MANIFEST = "cache.json"


def teacher_fingerprint(teacher: torch.nn.Module) -> str:
    """sha256 over the teacher's state dict (names, dtypes, shapes, values)."""
    h = hashlib.sha256()
    for name, t in sorted(teacher.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def data_fingerprint(split) -> str:
    """sha256 over the token ids (and token types) of every example of a tokenized split, in order."""
    h = hashlib.sha256()
    columns = [c for c in ("input_ids", "token_type_ids") if c in split.column_names]
    for column in columns:
        h.update(column.encode())
        for row in split[column]:
            h.update(np.asarray(row, np.int32).tobytes())
            h.update(b"|")
    h.update(str(len(split)).encode())
    return h.hexdigest()


class TeacherCache:
    """Per-example teacher outputs in a directory (see the module docstring). ``entries`` maps an example index to
    ``{"ids": int32, "types": int32 | None, "tokens": {name: (tokens, ...)}, "example": {name: tensor}}``, the
    layout the distiller's in-memory cache uses."""

    def __init__(self, directory: str | os.PathLike, *, teacher: str, data: str, outputs: dict, write: bool = True,
                 shard_examples: int = 4096):
        self.dir = Path(directory)
        self.key = {"teacher": teacher, "data": data, "outputs": outputs}
        self.write = write
        self.shard_examples = shard_examples
        self.shards: list[dict] = []
        self.unsaved: list[int] = []

    # -- reading ----------------------------------------------------------------------------------------
    def load(self) -> dict[int, dict]:
        """The entries stored so far ({} for a new directory); refuses a directory built for another key."""
        mpath = self.dir / MANIFEST
        if self.dir.exists() and not self.dir.is_dir():
            raise SparsifyError(f"{self.dir}: distillation.teacher_cache must be a directory, this is a file")
        if not mpath.exists():
            if self.dir.is_dir() and any(self.dir.iterdir()):
                raise SparsifyError(f"{self.dir}: not a teacher cache (no {MANIFEST}) and not empty; give "
                                    "distillation.teacher_cache an empty or new directory")
            return {}
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
            if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
                raise ValueError("not a cache manifest")
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise SparsifyError(f"{mpath}: damaged teacher cache manifest ({e}); delete the directory to rebuild "
                                "it") from None
        if manifest.get("format") != FORMAT:
            raise SparsifyError(f"{mpath}: teacher cache format {manifest.get('format')!r}, this version reads "
                                f"{FORMAT}; delete the directory to rebuild it")
        for what, name in (("teacher", "teacher's weights"), ("data", "tokenized training data"),
                           ("outputs", "distillation terms' teacher outputs")):
            if manifest.get(what) != self.key[what]:
                raise SparsifyError(f"{mpath}: this teacher cache was built for other {name} than this run's; "
                                    "give distillation.teacher_cache another directory (or delete this one)")
        entries: dict[int, dict] = {}
        for shard in manifest["shards"]:
            got = self._read_shard(shard)
            if got is not None:
                self.shards.append(shard)
                entries.update(got)
        return entries

    def _read_shard(self, shard) -> dict[int, dict] | None:
        from safetensors.torch import load

        try:  # the file is read once: checked, then parsed from the same bytes
            if Path(shard["file"]).name != shard["file"]:
                raise ValueError("not a file name")
            raw = (self.dir / str(shard["file"])).read_bytes()
            if hashlib.sha256(raw).hexdigest() != shard["sha256"]:
                raise ValueError("checksum mismatch")
            tensors = load(raw)
        except Exception as e:  # a missing, truncated or altered shard: recompute its examples
            warnings.warn(f"{self.dir}: teacher cache shard {shard.get('file') if isinstance(shard, dict) else shard!r}"
                          f" skipped ({type(e).__name__}: {e}); its examples are computed again", stacklevel=2)
            return None
        entries: dict[int, dict] = {}
        for name, value in tensors.items():
            idx, _, part = name.partition("/")
            e = entries.setdefault(int(idx), {"ids": None, "types": None, "tokens": {}, "example": {}})
            if part in ("ids", "types"):
                e[part] = value
            elif part.startswith("tokens."):
                e["tokens"][part[len("tokens."):]] = value
            else:
                e["example"][part[len("example."):]] = value
        return entries

    # -- writing ----------------------------------------------------------------------------------------
    def added(self, idx: int, entries: dict[int, dict]) -> None:
        """Note a newly computed entry; writes a shard once ``shard_examples`` are waiting."""
        if not self.write:
            return
        self.unsaved.append(idx)
        if len(self.unsaved) >= self.shard_examples:
            self.flush(entries)

    def flush(self, entries: dict[int, dict]) -> None:
        """Write the waiting entries as one shard and the manifest that lists it (both atomically)."""
        if not self.write or not self.unsaved:
            return
        from safetensors.torch import save

        tensors = {}
        for idx in self.unsaved:
            e = entries[idx]
            tensors[f"{idx}/ids"] = e["ids"].contiguous()
            if e.get("types") is not None:
                tensors[f"{idx}/types"] = e["types"].contiguous()
            for name, value in e["tokens"].items():
                tensors[f"{idx}/tokens.{name}"] = value.contiguous()
            for name, value in e["example"].items():
                tensors[f"{idx}/example.{name}"] = value.contiguous()
        self.dir.mkdir(parents=True, exist_ok=True)
        n = len(self.shards)
        while (self.dir / f"shard-{n:05d}.safetensors").exists():  # a damaged shard left in place keeps its name
            n += 1
        name = f"shard-{n:05d}.safetensors"
        raw = save(tensors)  # hashed from the bytes written, not read back
        tmp = self.dir / (name + ".tmp")
        tmp.write_bytes(raw)
        os.replace(tmp, self.dir / name)
        self.shards.append({"file": name, "sha256": hashlib.sha256(raw).hexdigest(), "examples": len(self.unsaved)})
        manifest = {"format": FORMAT, **self.key, "shards": self.shards}
        tmp = self.dir / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        os.replace(tmp, self.dir / MANIFEST)
        self.unsaved = []
