"""A real inference engine for tests and benchmarks: llama.cpp's `llama-server` built from the
pinned `llama-cpp-python` sdist, serving Gemma 3 270M Q4_K_M (the pretrained base model), both
kept in a per-machine cache outside the repository (`llooma engine build`, `make engine`).

The model echoes and drifts: it is there to test transport and protocol against a real engine
(tokenization, usage, finish reasons, sampling, errors, load, crashes), not answer quality.
"""

from llooma.engine._build import (
    LLAMA_CPP_PYTHON_VERSION,
    MODEL_FILE,
    MODEL_SHA256,
    EnginePaths,
    cache_root,
    engine_paths,
    ensure_engine,
)
from llooma.engine._server import CHAT_TEMPLATE, UPSTREAM_MODEL, LlamaServer

__all__ = [
    "CHAT_TEMPLATE",
    "LLAMA_CPP_PYTHON_VERSION",
    "MODEL_FILE",
    "MODEL_SHA256",
    "UPSTREAM_MODEL",
    "EnginePaths",
    "LlamaServer",
    "cache_root",
    "engine_paths",
    "ensure_engine",
]
