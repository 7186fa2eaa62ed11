"""``sparsify embed ARTIFACT --file texts.txt -o embeddings.npy [--text ...] [--normalize | --no-normalize]``.

Sentence embeddings on CPU with an exported artifact: pooled as the model's sentence-transformers configuration
says (``modules.json`` / ``1_Pooling/config.json``, recorded in the manifest at export); an artifact without one
gets mean pooling over the real tokens, with a warning. Writes a float32 ``.npy`` (rows in input order, no pickle).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from sparsify.errors import SparsifyError

__all__ = ["main"]


def read_texts(text: list[str] | None, file: str | None, *, pairs: bool = True) -> list:
    """Texts from repeated ``--text`` or a UTF-8 ``--file`` (one per line, ``-`` for stdin; blank lines
    skipped; with ``pairs`` a line with a TAB is a (text, text_pair) pair)."""
    if text is not None:
        return list(text)
    try:
        raw = sys.stdin.read() if file == "-" else Path(file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SparsifyError(f"--file {file}: cannot read ({e})") from None
    return [tuple(line.split("\t", 1)) if pairs and "\t" in line else line for line in raw.splitlines()
            if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sparsify embed",
        description="Embed texts with an exported artifact on CPU and write a float32 .npy (one row per text, in "
                    "input order). Pooling and normalisation follow the model's sentence-transformers configuration.")
    parser.add_argument("artifact", help="artifact directory written by 'sparsify export'")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", action="append", help="a text to embed (repeatable)")
    src.add_argument("--file", help="a UTF-8 file with one text per line ('-' for stdin)")
    parser.add_argument("-o", "--output", required=True, help="output .npy file")
    norm = parser.add_mutually_exclusive_group()
    norm.add_argument("--normalize", dest="normalize", action="store_true", default=None,
                      help="unit-length embeddings (default: as the model's configuration says)")
    norm.add_argument("--no-normalize", dest="normalize", action="store_false", help="raw pooled embeddings")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=None, help="truncate longer texts (default: the artifact's)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    parser.add_argument("--full-length", action="store_true",
                        help="ignore the artifact's length configuration (token dropping), if it has one")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)
    try:
        out = Path(args.output)
        if out.suffix != ".npy":
            raise SparsifyError(f"-o {out}: the output must be a .npy file")
        if out.exists() and not args.overwrite:
            raise SparsifyError(f"{out}: exists (choose another -o or pass --overwrite)")
        texts = read_texts(args.text, args.file, pairs=False)
        if not texts:
            raise SparsifyError("no texts to embed (empty --file)")
        if args.batch_size < 1:
            raise SparsifyError(f"--batch-size must be positive, got {args.batch_size}")
        from sparsify.runtime import SparseModel

        model = SparseModel.from_pretrained(args.artifact, threads=args.threads)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            emb = model.embed(texts, batch_size=args.batch_size, normalize=args.normalize, max_length=args.max_length,
                              length_config=None if args.full_length else "default")
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
        import numpy as np

        out.parent.mkdir(parents=True, exist_ok=True)
        np.save(out, emb, allow_pickle=False)
    except SparsifyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    pooling = model.pooling or {}
    print(f"wrote {emb.shape[0]} x {emb.shape[1]} float32 embeddings to {out} (pooling "
          f"{'+'.join(model.pooling_modes)}, normalised: "
          f"{bool(pooling.get('normalize')) if args.normalize is None else args.normalize}"
          + (f", length config {model.length_config}" if model.length_config and not args.full_length else "") + ")")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
