"""``sparsify predict ARTIFACT --text "..." [--text ...] | --file texts.txt [--json] [--threads N]``.

Sequence classification prints ``label<TAB>score<TAB>text``, token classification ``token/label ...``, question
answering (``question<TAB>context`` lines) ``answer<TAB>score<TAB>question | context``."""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from sparsify.errors import SparsifyError

__all__ = ["main"]

MIN_LENGTH = 8  # as data.max_length in recipes: room for the special tokens and some text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sparsify predict",
        description="Classify texts with an exported artifact on CPU (block-sparse runtime). One text per line in "
                    "--file; a line with a TAB is a sentence pair. Texts over the maximum length are truncated (a "
                    "warning says how many); a question-answering model reads a long context in overlapping "
                    "windows and answers with the best span of any window.")
    parser.add_argument("artifact", help="artifact directory written by 'sparsify export'")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", action="append", help="a text to classify (repeatable)")
    src.add_argument("--file", help="a UTF-8 file with one text per line ('-' for stdin)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=None,
                        help=f"truncate longer texts, in tokens: {MIN_LENGTH} up to the model's positions "
                             "(default: the artifact's)")
    parser.add_argument("--doc-stride", type=int, default=None,
                        help="question answering: tokens of context shared by consecutive windows of a long context "
                             "(default: a quarter of the maximum length)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    parser.add_argument("--full-length", action="store_true", help="ignore the artifact's length configuration")
    parser.add_argument("--json", action="store_true", help="print one JSON object per text")
    args = parser.parse_args(argv)
    try:
        if args.max_length is not None and args.max_length < MIN_LENGTH:
            raise SparsifyError(f"--max-length {args.max_length}: must be at least {MIN_LENGTH} tokens")
        from sparsify.embed import read_texts

        texts = read_texts(args.text, args.file)
        if not texts:
            raise SparsifyError("no texts to classify (empty --file)")
        from sparsify.runtime import SparseModel

        model = SparseModel.from_pretrained(args.artifact, threads=args.threads,
                                            length_config=None if args.full_length else "default")
        if model.head == "embeddings":
            raise SparsifyError(f"{args.artifact}: an embedding model: use 'sparsify embed'")
        if model.head == "question-answering" and not all(isinstance(t, tuple) for t in texts):
            raise SparsifyError("a question-answering model takes 'question<TAB>context' lines")
        if args.doc_stride is not None and model.head != "question-answering":
            raise SparsifyError(f"--doc-stride: only a question-answering model reads windows; this one has a "
                                f"{model.head} head")
        if args.max_length is not None and args.max_length > model.max_positions:
            raise SparsifyError(f"--max-length {args.max_length}: the artifact's model has {model.max_positions} "
                                f"positions; give at most {model.max_positions}")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            preds = model.predict(texts, batch_size=args.batch_size, max_length=args.max_length,
                                  return_probabilities=args.json, doc_stride=args.doc_stride)
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
    except SparsifyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for text, p in zip(texts, preds):
        shown = " | ".join(text) if isinstance(text, tuple) else text
        if args.json:
            print(json.dumps({"text": shown, **p} if isinstance(p, dict) else {"text": shown, "tokens": p}))
        elif isinstance(p, list):  # token classification
            print(" ".join(f"{t['token']}/{t['label']}" for t in p))
        elif "answer" in p:
            print(f"{p['answer']}\t{p['score']:.4f}\t{shown}")
        elif "label" in p:
            print(f"{p['label']}\t{p['score']:.4f}\t{shown}")
        else:
            print(f"{p['score']:.4f}\t{shown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
