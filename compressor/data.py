"""Text -> token windows: calibration samples (random windows, seeded) and evaluation windows
(non-overlapping, from the start), cut from one token stream. A window starts with the token the model's
tokenizer puts in front of every text (default_bos: a decoder's BOS, an encoder's [CLS]) exactly when the
tokenizer puts one there, as the model sees text in serving; `--bos / --no-bos` force it for evaluation (pick_bos).

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


PROBE = "x"  # the text default_bos encodes


def start_tokens(tokenizer) -> list[int]:
    """The ids a window may start with, in order of preference: the tokenizer's BOS, then its CLS (those it has)."""
    ids = (getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "cls_token_id", None))
    return [i for i in ids if i is not None]


def default_bos(tokenizer) -> int | None:
    """The id of the token the tokenizer puts in front of every text by default, or None when it puts none:
    `tokenizer(PROBE)` is longer than the text's own tokens and starts with the tokenizer's BOS (Llama 3, Gemma)
    or, for an encoder, its CLS (BERT's [CLS]). SmolLM2, GPT-2 and Qwen put none: their windows are the text's.

    What the call does is the rule, not `add_bos_token`: in transformers 5 that flag reads False unless
    tokenizer_config.json sets it, while a post-processor in tokenizer.json (Llama 3's) adds the BOS anyway, and
    when the flag is True the tokenizer rebuilds its post-processor to add the BOS, so the call sees it either
    way. Serving (a pipeline, vLLM) calls the tokenizer too."""
    ids = tokenizer(PROBE, verbose=False)["input_ids"]
    text = tokenizer(PROBE, add_special_tokens=False, verbose=False)["input_ids"]
    return ids[0] if len(ids) > len(text) and ids[0] in start_tokens(tokenizer) else None


def pick_bos(tokenizer, bos: bool | None) -> int | None:
    """The id windows start with, or None: the tokenizer's default (`bos` None: default_bos), none (False), or
    one forced (True: the default one, else the tokenizer's BOS, else its CLS; a BadInput when it has neither)."""
    if bos is False:
        return None
    first = default_bos(tokenizer)
    if bos is None or first is not None:
        return first
    if start_tokens(tokenizer):
        return start_tokens(tokenizer)[0]
    raise BadInput(f"--bos: the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} ({type(tokenizer).__name__}) "
                   f"has no BOS or CLS token to start a window with")


def with_bos(windows: torch.Tensor, bos: int | None) -> torch.Tensor:
    """(n, L) windows -> (n, L + 1) with `bos` in front of each; unchanged when `bos` is None."""
    if bos is None:
        return windows
    return torch.cat([windows.new_full((windows.shape[0], 1), bos), windows], 1)


def check_window_request(samples: int, seq_len: int) -> None:
    """Calibration sizes that mean something: at least one window, of at least two tokens."""
    if samples < 1:
        raise BadInput(f"--samples {samples}: calibration needs at least 1 window")
    if seq_len < 2:
        raise BadInput(f"--seq-len {seq_len}: a calibration window needs at least 2 tokens")


def calibration_windows(tokens: torch.Tensor, samples: int, seq_len: int, seed: int, what: str = "calibration data",
                        bos: int | None = None) -> torch.Tensor:
    """`samples` windows of `seq_len` tokens at seeded random offsets: (samples, seq_len); with `bos`, each is
    `bos` and seq_len - 1 tokens of text (without, the same windows as before BOS existed). More windows than the
    data has tokens is refused: they would repeat the same text over and over."""
    check_window_request(samples, seq_len)
    body = seq_len - (bos is not None)  # text tokens per window
    n = tokens.numel()
    if n < body:
        raise BadInput(f"{what} has {n} tokens, shorter than one window of seq_len {seq_len}"
                       + (f" (a BOS and {body} tokens of text)" if bos is not None else ""))
    if samples > n:
        raise BadInput(f"{what} has {n} tokens, fewer than the {samples} windows asked for (samples): give more "
                       f"text or fewer samples")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n - body + 1, (samples,), generator=g)
    return with_bos(tokens.unfold(0, body, 1)[starts], bos)  # (samples, seq_len)


def eval_windows(tokens: torch.Tensor, seq_len: int, max_tokens: int, what: str = "evaluation data",
                 bos: int | None = None) -> torch.Tensor:
    """Non-overlapping windows from the start of the text, at most max_tokens tokens in all: (n, seq_len); a
    partial last window is dropped. With `bos`, each window is `bos` and the next seq_len - 1 tokens of text:
    the model predicts every text token of it and never the BOS. Without, each window is seq_len tokens of text,
    its first not predicted (the windows as before BOS existed)."""
    body = seq_len - (bos is not None)  # text tokens per window
    n = min(tokens.numel() // body, max_tokens // seq_len)
    if n == 0:
        raise BadInput(f"{what} has {tokens.numel()} tokens, shorter than one window of seq_len {seq_len}"
                       + (f" (a BOS and {body} tokens of text)" if bos is not None else ""))
    return with_bos(tokens[: n * body].reshape(n, body), bos)  # (n, seq_len)


def load_windows(tokenizer, files, samples: int, seq_len: int, seed: int) -> tuple[torch.Tensor, dict]:
    """Calibration windows from files (or the embedded corpus), each starting with the tokenizer's default BOS
    when it has one (default_bos), and a description for the artifact (`bos`: whether they do)."""
    default = not files
    paths = [Path(f) for f in (files or DEFAULT_CORPUS)]
    texts = read_texts(paths)
    names = ", ".join(p.name for p in paths)
    tokens = tokenize(tokenizer, texts)
    bos = default_bos(tokenizer)
    windows = calibration_windows(tokens, samples, seq_len, seed, what=f"calibration data ({names})", bos=bos)
    info = {
        "source": f"embedded default corpus ({names})" if default else names,
        "files": [{"name": p.name, "sha256": sha256_file(p)} for p in paths],
        "samples": samples,
        "seq_len": seq_len,
        "seed": seed,
        "bos": bos is not None,
        "tokens_available": int(tokens.numel()),
        "windows_sha256": hashlib.sha256(windows.numpy().tobytes()).hexdigest(),
    }
    return windows, info
