"""compressor: post-training compression of Hugging Face checkpoints into compressed-tensors artifacts.

Public API: compress(), load(), verify() (compressor.api), evaluate() (compressor.evaluate), generate()
(compressor.generate).
"""
__version__ = "0.1.0"

from .api import compress, load, verify  # noqa: E402
from .evaluate import evaluate  # noqa: E402
from .generate import generate  # noqa: E402

__all__ = ["compress", "load", "evaluate", "verify", "generate", "__version__"]
