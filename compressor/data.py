"""Text -> token windows: calibration samples (random windows, seeded) and evaluation windows
(non-overlapping, from the start). No BOS is added: windows are cut from one token stream.

With no --calib, the embedded default corpus is used: two public-domain novels shipped inside the
package (Jane Austen's Emma and Mansfield Park, compressor/corpus/).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .errors import BadInput

CORPUS_DIR = Path(__file__).parent / "corpus"
DEFAULT_CORPUS = (CORPUS_DIR / "emma.txt", CORPUS_DIR / "mansfieldpark.txt")


def read_texts(files: list[Path] | tuple[Path, ...]) -> list[str]:
    """Documents of .txt files (a file is one document) and .jsonl files (a `text` field per line)."""
    texts: list[str] = []
    for f in files:
        f = Path(f)
        if not f.is_file():
            raise BadInput(f"data file {f} does not exist")
        docs: list[str] = []
        if f.suffix == ".jsonl":
            for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
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
            docs.append(f.read_text(encoding="utf-8", errors="replace"))
        else:
            raise BadInput(f"data file {f}: expected .txt or .jsonl, got {f.suffix!r}")
        if not any(d.strip() for d in docs):
            raise BadInput(f"data file {f} is empty")
        texts += docs
    return texts


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


def calibration_windows(tokens: torch.Tensor, samples: int, seq_len: int, seed: int, what: str = "calibration data") -> torch.Tensor:
    """`samples` windows of `seq_len` tokens at seeded random offsets: (samples, seq_len)."""
    if tokens.numel() < seq_len:
        raise BadInput(f"{what} has {tokens.numel()} tokens, shorter than one window of seq_len {seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len + 1, (samples,), generator=g)
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])


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


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
