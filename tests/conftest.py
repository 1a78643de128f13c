import os

import numpy as np
import pytest

import cecollm


@pytest.fixture(scope="session")
def model():
    """The default model (SmolLM2-135M-Instruct Q4_1), loaded once."""
    return cecollm.load_model()


@pytest.fixture(scope="session")
def model_q8():
    """The default model with 8-bit activations (integer dot products)."""
    return cecollm.load_model(activations="q8")


@pytest.fixture(scope="session")
def model_kv16():
    """The default model with an F16 KV cache."""
    return cecollm.load_model(kv_dtype="f16")


@pytest.fixture(scope="session")
def hf_reference(model):
    """transformers loading the same GGUF on CPU torch, dequantized to fp32: (model, tokenizer)."""
    import torch
    import transformers

    folder, name = os.path.split(model.path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    hf.eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return hf, tok


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
