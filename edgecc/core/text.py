"""Real text for accuracy and calibration: reading it, and cutting it into token windows or sentences.

The default text is The Devil's Dictionary (Debian's `dict-devil`). Accuracy (`edgecc bench`) reads
from the text's beginning; calibration (`--calibration-text`) from its end, so a perplexity
measured on a text's beginning is on text that calibration never saw.
"""

from __future__ import annotations

import gzip
import os
import re
from pathlib import Path

import numpy as np

from edgecc.errors import UserError

DEVIL = Path("/usr/share/dictd/devil.dict.dz")


def read_text(text_path: str | os.PathLike | None) -> tuple[str, Path]:
    """The text (default The Devil's Dictionary; .gz/.dz decompressed) and its path."""
    path = Path(text_path) if text_path else DEVIL
    if not path.is_file():
        how = "" if text_path else " (apt-get install dict-devil, or give a text file)"
        raise UserError(f"{path}: no such text file{how}")
    try:
        raw = gzip.open(path).read() if path.suffix in (".gz", ".dz") else path.read_bytes()
    except (OSError, EOFError) as e:
        raise UserError(f"{path}: cannot read it: {e}") from None
    return raw.decode("utf-8", "replace"), path


def tokenizer(path: str | os.PathLike):
    """A `tokenizers` tokenizer from a tokenizer.json file, or a one-line error naming it."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own Exception type for every malformed file
        raise UserError(f"{path}: not a readable tokenizer.json: {str(e).splitlines()[0]}") from None


def token_ids(tokenizer_path: Path, text_path: Path | None) -> tuple[list[int], str]:
    """The text's token ids and its path."""
    text, path = read_text(text_path)
    return tokenizer(tokenizer_path).encode(text).ids, str(path)


def token_windows(tokenizer_path: Path, text_path: Path | None, windows: int, length: int) -> tuple[list, str]:
    """The first `windows` non-overlapping windows of `length` tokens of the text."""
    ids, path = token_ids(tokenizer_path, text_path)
    if len(ids) < windows * length:
        raise UserError(f"{path}: {len(ids)} tokens, fewer than {windows} windows x {length}")
    return [ids[i * length:(i + 1) * length] for i in range(windows)], path


def sentences(text: str, count: int, from_end: bool = False) -> list[str]:
    """`count` distinct sentences of 6 to 40 words: the text's first, or its last."""
    found = [sentence for para in re.split(r"\n\s*\n", text)
             for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", " ".join(para.split()))]
    out: list[str] = []
    for sentence in reversed(found) if from_end else found:
        if 6 <= len(sentence.split()) <= 40 and sentence not in out:
            out.append(sentence)
            if len(out) == count:
                break
    return out


def padded(tokenizer_path: Path, texts: list[str], length: int) -> dict[str, np.ndarray]:
    """Texts tokenized, cut and padded to `length` tokens: input_ids and attention_mask, int64."""
    tok = tokenizer(tokenizer_path)
    tok.enable_truncation(length)
    tok.enable_padding(length=length)
    encoded = tok.encode_batch(texts)
    return {"input_ids": np.array([e.ids for e in encoded], np.int64),
            "attention_mask": np.array([e.attention_mask for e in encoded], np.int64)}
