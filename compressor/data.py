"""Text -> token windows: calibration samples (random windows, seeded) and evaluation windows
(non-overlapping, from the start). No BOS is added: windows are cut from one token stream.

With no --calib, the embedded default corpus is used: two public-domain novels shipped inside the
package (Jane Austen's Emma and Mansfield Park, compressor/corpus/).
"""
from __future__ import annotations

import codecs
import hashlib
import json
import warnings
from pathlib import Path

import torch

from .errors import BadInput
from .files import sha256_file

CORPUS_DIR = Path(__file__).parent / "corpus"
DEFAULT_CORPUS = (CORPUS_DIR / "emma.txt", CORPUS_DIR / "mansfieldpark.txt")


class DataWarning(UserWarning):
    """Text that was read but may not be what the user meant (binary data, another encoding); the CLI prints it."""


# Undecodable bytes (read as U+FFFD) and NULs above this fraction of a text file's characters: a warning.
BINARY_FRACTION = 0.001


def read_texts(files: list[Path] | tuple[Path, ...]) -> list[str]:
    """Documents of .txt files (a file is one document) and .jsonl files (a `text` field per line)."""
    texts: list[str] = []
    for f in files:
        f = Path(f)
        if f.is_dir():
            raise BadInput(f"data file {f} is a directory, not a .txt or .jsonl file")
        if not f.is_file():
            raise BadInput(f"data file {f} does not exist")
        docs: list[str] = []
        if f.suffix == ".jsonl":
            for i, line in enumerate(decode_text(f, strict=True).splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise BadInput(f"{f}:{i}: not valid JSON ({e.msg})") from None
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise BadInput(f"{f}:{i}: each line needs a string field 'text'")
                docs.append(rec["text"])
        elif f.suffix in (".txt", ".md", ""):
            docs.append(decode_text(f, strict=False))
        else:
            raise BadInput(f"data file {f}: expected .txt or .jsonl, got {f.suffix!r}")
        if not any(d.strip() for d in docs):
            raise BadInput(f"data file {f} is empty")
        texts += docs
    return texts


def decode_text(f: Path, strict: bool) -> str:
    """A text file's content: UTF-16 when it starts with a UTF-16 byte-order mark (with a DataWarning), else UTF-8.
    Bytes that are not UTF-8 are a BadInput when `strict` (.jsonl), else read as U+FFFD, with a DataWarning when
    they or NULs are more than BINARY_FRACTION of the text (binary data, or UTF-16 without a mark)."""
    data = f.read_bytes()
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        warnings.warn(f"data file {f} is UTF-16 text (it starts with a UTF-16 byte-order mark): decoded as UTF-16",
                      DataWarning, stacklevel=3)
        return data.decode("utf-16", errors="strict" if strict else "replace")
    if strict:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadInput(f"data file {f} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None
    text = data.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") + text.count("\x00")
    if text and bad / len(text) > BINARY_FRACTION:
        warnings.warn(f"data file {f} does not look like UTF-8 text: {bad / len(text):.1%} of its characters are "
                      f"undecodable bytes or NULs (binary data, or UTF-16 without a byte-order mark?)",
                      DataWarning, stacklevel=3)
    return text


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    """One stream of token ids: the documents' tokens, separated by EOS where the tokenizer has one."""
    sep = [tokenizer.eos_token_id] if getattr(tokenizer, "eos_token_id", None) is not None else []
    ids: list[int] = []
    for t in texts:
        if not t.strip():
            continue
        if ids:
            ids += sep
        ids += tokenizer(t, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def check_window_request(samples: int, seq_len: int) -> None:
    """Calibration sizes that mean something: at least one window, of at least two tokens."""
    if samples < 1:
        raise BadInput(f"--samples {samples}: calibration needs at least 1 window")
    if seq_len < 2:
        raise BadInput(f"--seq-len {seq_len}: a calibration window needs at least 2 tokens")


def calibration_windows(tokens: torch.Tensor, samples: int, seq_len: int, seed: int, what: str = "calibration data") -> torch.Tensor:
    """`samples` windows of `seq_len` tokens at seeded random offsets: (samples, seq_len). More windows than the
    data has tokens is refused: they would repeat the same text over and over."""
    check_window_request(samples, seq_len)
    n = tokens.numel()
    if n < seq_len:
        raise BadInput(f"{what} has {n} tokens, shorter than one window of seq_len {seq_len}")
    if samples > n:
        raise BadInput(f"{what} has {n} tokens, fewer than the {samples} windows asked for (samples): give more "
                       f"text or fewer samples")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n - seq_len + 1, (samples,), generator=g)
    return tokens.unfold(0, seq_len, 1)[starts]


def eval_windows(tokens: torch.Tensor, seq_len: int, max_tokens: int, what: str = "evaluation data") -> torch.Tensor:
    """The first max_tokens tokens as non-overlapping windows: (n, seq_len); a partial last window is dropped."""
    n = min(tokens.numel(), max_tokens) // seq_len
    if n == 0:
        raise BadInput(f"{what} has {tokens.numel()} tokens, shorter than one window of seq_len {seq_len}")
    return tokens[: n * seq_len].reshape(n, seq_len)


def load_windows(tokenizer, files, samples: int, seq_len: int, seed: int) -> tuple[torch.Tensor, dict]:
    """Calibration windows from files (or the embedded corpus) and a description for the artifact."""
    default = not files
    paths = [Path(f) for f in (files or DEFAULT_CORPUS)]
    texts = read_texts(paths)
    names = ", ".join(p.name for p in paths)
    tokens = tokenize(tokenizer, texts)
    windows = calibration_windows(tokens, samples, seq_len, seed, what=f"calibration data ({names})")
    info = {
        "source": f"embedded default corpus ({names})" if default else names,
        "files": [{"name": p.name, "sha256": sha256_file(p)} for p in paths],
        "samples": samples,
        "seq_len": seq_len,
        "seed": seed,
        "tokens_available": int(tokens.numel()),
        "windows_sha256": hashlib.sha256(windows.numpy().tobytes()).hexdigest(),
    }
    return windows, info
