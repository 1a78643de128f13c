"""The tokenizer, built with the `tokenizers` library from the vocabulary and merges in the model file."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from .gguf_file import GGUFFormatError
from .gguf_loader import ModelFormatError, TokenizerSpec

# GGUF token types (llama.cpp's llama_token_type)
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4

# Control tokens that end a generation in the chat formats cecollm knows, besides eos/eot.
END_OF_GENERATION_TEXTS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>")

# llama.cpp's GPT-2 word splitting (used by 'gpt2', 'smollm' after its digit split)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


# Qwen2's: the same with digits one at a time
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def _pre_tokenizer(name: str):
    """The pre-tokenizer llama.cpp names `name` (tokenizer.ggml.pre)."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if name in ("default", "gpt2", "gpt-2"):
        return byte_level
    if name == "smollm":  # SmolLM's tokenizer.json: digits one by one, then GPT-2 byte-level splitting
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if name in ("llama3", "llama-bpe", "qwen2"):
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_SPLIT if name == "qwen2" else LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    raise ValueError(f"pre-tokenizer {name!r} is not supported (supported: default, gpt2, smollm, llama3, qwen2)")


def _read_json(path: str) -> dict:
    """A JSON object from path, or {} when the file is absent."""
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        value = json.load(f)
    return value if isinstance(value, dict) else {}


@dataclass
class ChatMessage:
    role: str
    content: str


class TextTokenizer:
    """Byte-level BPE from a model file's vocabulary; special tokens and chat template included.

    >>> tok = TextTokenizer(spec)           # doctest: +SKIP
    >>> tok.decode(tok.encode("Hi 42"))     # doctest: +SKIP
    'Hi 42'
    """

    def __repr__(self) -> str:
        return self._repr

    def __init__(self, spec: TokenizerSpec):
        if spec.model != "gpt2":
            raise ValueError(f"tokenizer model {spec.model!r} is not supported (only byte-level BPE 'gpt2')")
        try:  # the strings are decoded here, first
            vocab = {token: i for i, token in enumerate(spec.tokens)}
            merges = [tuple(m.split(" ", 1)) for m in spec.merges]
        except GGUFFormatError as exc:
            raise ModelFormatError(f"the model file's tokenizer: {exc}") from None
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        tok.pre_tokenizer = _pre_tokenizer(spec.pre)
        tok.decoder = decoders.ByteLevel()
        special = [t for t, kind in zip(spec.tokens, spec.token_types) if kind == TOKEN_CONTROL]
        user = [t for t, kind in zip(spec.tokens, spec.token_types) if kind == TOKEN_USER_DEFINED]
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
        ends = {spec.eos_id, spec.eot_id}
        self._setup(tok, len(spec.tokens), set(special), spec.bos_id, spec.eos_id, ends, spec.add_bos, spec.chat_template,
                    f"byte-level BPE, pre={spec.pre!r}")  # fmt: skip

    @classmethod
    def from_hf(cls, folder: str) -> TextTokenizer:
        """The tokenizer of a Hugging Face checkpoint directory: tokenizer.json as it is, with
        tokenizer_config.json's BOS/EOS, add_bos_token and chat template (and config.json's token ids)."""
        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            raise ModelFormatError(f"{folder}: tokenizer.json is missing")
        try:
            tok = Tokenizer.from_file(path)
        except Exception as exc:  # the tokenizers library raises plain Exceptions
            raise ModelFormatError(f"{path}: unreadable ({exc})") from None
        config = _read_json(os.path.join(folder, "tokenizer_config.json"))
        model_config = _read_json(os.path.join(folder, "config.json"))
        special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}

        def token_id(key):  # a token named in tokenizer_config.json, else config.json's id
            text = config.get(key)
            text = text.get("content") if isinstance(text, dict) else text
            found = tok.token_to_id(text) if isinstance(text, str) else None
            fallback = model_config.get(f"{key}_id")
            return found if found is not None else fallback if isinstance(fallback, int) else None

        eos_ids = model_config.get("eos_token_id")
        ends = {token_id("eos_token"), *(eos_ids if isinstance(eos_ids, list) else [eos_ids])}
        self = cls.__new__(cls)
        self._setup(tok, tok.get_vocab_size(), special, token_id("bos_token"), token_id("eos_token"), ends,
                    bool(config.get("add_bos_token", False)), config.get("chat_template"), "tokenizer.json")  # fmt: skip
        return self

    def _setup(self, tok, vocab_size: int, special: set, bos_id, eos_id, ends: set, add_bos: bool, chat_template,
               describe: str) -> None:  # fmt: skip
        self._tok = tok
        # what encoding and chat templates need besides the vocabulary (which now lives in `tok`)
        self.add_bos, self.chat_template = add_bos, chat_template
        self.bos_id, self.eos_id = bos_id, eos_id
        self.bos_text = tok.id_to_token(bos_id) if bos_id is not None else ""
        self.eos_text = tok.id_to_token(eos_id) if eos_id is not None else ""
        ends = set(ends) | {tok.token_to_id(t) for t in END_OF_GENERATION_TEXTS if t in special}
        self.end_ids = frozenset(i for i in ends if isinstance(i, int))
        self.vocab_size = vocab_size
        self._repr = f"TextTokenizer({describe}, {vocab_size} tokens, chat template: {'yes' if chat_template else 'no'})"

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of text; special tokens written in the text are recognised."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids, skip_special: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        """The prompt text for a conversation, rendered from the model's own template."""
        if not self.chat_template:
            raise ValueError("this model has no chat template")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        msgs = [m if isinstance(m, dict) else {"role": m.role, "content": m.content} for m in messages]
        return env.from_string(self.chat_template).render(
            messages=msgs, add_generation_prompt=add_generation_prompt, bos_token=self.bos_text, eos_token=self.eos_text
        )
