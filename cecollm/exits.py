"""Early-exit configuration: where the exits are, how confident each must be, what their heads are."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import _core

METRICS = {"max_prob": _core.METRIC_MAX_PROB, "margin": _core.METRIC_MARGIN, "entropy": _core.METRIC_ENTROPY}
GATE = "gate"  # the metric of a trained gate: its predicted probability that the exit agrees with the full model
KV_MODES = ("catchup", "propagate")
HEADS_FORMAT = "cecollm-exit-heads-1"


@dataclass
class ExitHead:
    """What an exit applies to its hidden state h (dim,): an optional low-rank adapter
    h' = h + up · (down · h), the RMSNorm weights, then the model's shared LM head. An optional gate
    predicts, from h alone, whether this exit's top-1 will equal the full model's:
    p = sigmoid(gate_w[:dim] · (h / rms(h)) + gate_w[dim] · p_prev + gate_b), p_prev being the previous
    exit's gate probability (0 at the first exit)."""

    norm: np.ndarray | None = None  # (dim,) float32; None: the model's final norm
    down: np.ndarray | None = None  # (rank, dim)
    up: np.ndarray | None = None  # (dim, rank)
    gate_w: np.ndarray | None = None  # (dim + 1,)
    gate_b: float = 0.0

    def logits(self, model, h: np.ndarray, rows: int | None = None) -> np.ndarray:
        """(n, rows or vocab) logits of hidden states h (n, dim) at this exit, in C (ce_exit_logits)."""
        return model.core.head(h, self.norm, model.config["vocab"] if rows is None else rows, self.down, self.up)

    def gate(self, h: np.ndarray, prev: np.ndarray | float) -> np.ndarray:
        """Gate probabilities for hidden states h (n, dim) given the previous exit's (n,) or scalar (ce_exit_gate)."""
        return _core.exit_gate(np.asarray(h, np.float32).reshape(-1, len(self.gate_w) - 1), self.gate_w, self.gate_b, prev)

    def spec(self, layer: int) -> tuple:
        """What the C edge (_core.Edge) takes for this head at `layer`."""
        return (layer, self.norm, self.down, self.up, self.gate_w, self.gate_b)


def weights_fingerprint(config: dict, tensors: dict) -> str:
    """A short hash of a model's configuration and of some of its weights' bytes."""
    import hashlib
    import json

    digest = hashlib.sha256(json.dumps({k: config[k] for k in sorted(config)}).encode())
    for name in ("output_norm.weight", "blk.0.attn_q.weight", "token_embd.weight"):
        digest.update(np.asarray(tensors[name][0]).reshape(-1).view(np.uint8)[: 1 << 16].tobytes())
    return digest.hexdigest()[:32]


def model_fingerprint(model) -> str:
    return weights_fingerprint(model.config, model.weights.tensors)


@dataclass(frozen=True)
class ExitPolicy:
    """Exits and the decision rule of an edge device.

    exits: exit points, each the number of layers run before it (an exit at 8 reads the hidden state
        leaving layer 7). The edge owns layers [0, split); exits lie in [1, split].
    thresholds: one per exit, or one for all. A token exits at the first exit whose confidence
        reaches its threshold; a threshold above 1 disables that exit.
    metric: "max_prob" (default), "margin" (top-1 minus top-2 probability) or "entropy"
        (1 - H/ln V), all in [0, 1].
    kv: "catchup" (exact: skipped layers' keys/values are computed with the next token) or
        "propagate" (approximate, as CALM: the exit's hidden state stands in for skipped layers).
    precheck_rows: when set (and the metric is max_prob or margin), an exit first computes logits
        over this many leading vocabulary entries (BPE vocabularies list frequent tokens first). Their
        softmax bounds the full confidence from above whenever the full top-1 is among them, so a
        check whose bound is below the threshold is skipped without the full LM head.
    exit_heads: {exit: ExitHead} trained heads (see load_exit_heads); exits not listed use the
        model's final norm and LM head. With metric "gate", each exit before the split needs a gate:
        the gate's probability is the confidence, and the LM head runs only for exits taken.

    >>> ExitPolicy(exits=(6, 10), split=15, thresholds=(0.9, 0.8))  # doctest: +ELLIPSIS
    ExitPolicy(exits=(6, 10), split=15, ...)
    """

    exits: tuple[int, ...] = (6, 10)
    split: int = 15
    thresholds: tuple[float, ...] = (0.8,)
    metric: str = "max_prob"
    kv: str = "catchup"
    precheck_rows: int | None = None
    exit_heads: dict = field(default_factory=dict, hash=False, compare=False, repr=False)
    latency_budget_s: float | None = None  # latency-aware exits (collaborative mode): see effective_threshold
    threshold_floor: float = 0.5

    def __post_init__(self):
        exits = tuple(sorted(int(e) for e in self.exits))
        object.__setattr__(self, "exits", exits)
        thresholds = tuple(float(t) for t in self.thresholds)
        if len(thresholds) == 1:
            thresholds = thresholds * len(exits)
        object.__setattr__(self, "thresholds", thresholds)
        if len(set(exits)) != len(exits) or any(not 1 <= e <= self.split for e in exits):
            raise ValueError(f"exits {exits} must be distinct and inside [1, split={self.split}]")
        if len(thresholds) != len(exits):
            raise ValueError(f"{len(thresholds)} thresholds for {len(exits)} exits")
        if any(t < 0 for t in thresholds):
            raise ValueError("thresholds must be >= 0 (above 1 disables an exit)")
        if self.metric not in METRICS and self.metric != GATE:
            raise ValueError(f"metric {self.metric!r} is not one of {sorted(METRICS) + [GATE]}")
        if self.metric == GATE and any(self.head(e).gate_w is None for e in exits if e < self.split):
            raise ValueError("metric 'gate' needs a trained gate at every exit before the split")
        if self.kv not in KV_MODES:
            raise ValueError(f"kv {self.kv!r} is not one of {KV_MODES}")
        if self.precheck_rows is not None and self.metric not in ("max_prob", "margin"):
            raise ValueError("the candidate pre-check bounds max_prob and margin only")
        if self.latency_budget_s is not None and not self.latency_budget_s > 0:
            raise ValueError(f"latency_budget_s must be > 0, not {self.latency_budget_s}")
        if not 0 <= self.threshold_floor <= 1:
            raise ValueError(f"threshold_floor {self.threshold_floor} outside [0, 1]")

    def validate_for(self, n_layers: int, vocab: int, dim: int) -> None:
        if not 1 <= self.split <= n_layers:
            raise ValueError(f"split {self.split} outside [1, {n_layers}]")
        if self.precheck_rows is not None and not 2 <= self.precheck_rows < vocab:
            raise ValueError(f"precheck_rows {self.precheck_rows} outside [2, {vocab})")
        for e, head in self.exit_heads.items():
            if head.norm is not None and np.shape(head.norm) != (dim,):
                raise ValueError(f"exit norm for {e} has shape {np.shape(head.norm)}, expected ({dim},)")
            if head.down is not None and (np.shape(head.down)[1:] != (dim,) or np.shape(head.up) != (dim, len(head.down))):
                raise ValueError(f"exit adapter for {e} has shapes {np.shape(head.down)}, {np.shape(head.up)}")
            if head.gate_w is not None and np.shape(head.gate_w) != (dim + 1,):
                raise ValueError(f"exit gate for {e} has shape {np.shape(head.gate_w)}, expected ({dim + 1},)")

    @classmethod
    def for_model(cls, model, split: int | None = None, threshold: float = 0.8, **options) -> ExitPolicy:
        """The policy a model suggests: an exit-tuned model's trained exits up to the split (the split's
        own exit among them: the edge finishes a confident token there too); any other model the
        default exits (6, 10). split defaults to half depth.

        >>> ExitPolicy.for_model(cecollm.load_model("smollm2-135m-ee"))   # doctest: +SKIP
        ExitPolicy(exits=(4, 8, 12, 15), split=15, thresholds=(0.8, 0.8, 0.8, 0.8), ...)
        """
        split = model.n_layers // 2 if split is None else split
        trained = tuple(e for e in getattr(model, "trained_exits", ()) if e <= split)
        exits = trained or tuple(e for e in cls.exits if e < split) or (split,)
        return cls(exits=exits, split=split, thresholds=(threshold,), **options)

    def threshold(self, exit_layer: int) -> float:
        return self.thresholds[self.exits.index(exit_layer)]

    def effective_threshold(self, exit_layer: int, cloud_cost_s: float | None) -> float:
        """The latency-aware rule. An exit's threshold τ is met at the link's reference cost: with a
        latency budget B per token and the cloud currently costing c seconds per token (round trip,
        upload and cloud compute, as measured), an exit accepts when its confidence reaches

            τ(c) = clip(1 - (1 - τ) · c / B, threshold_floor, 1)

        i.e. the error risk 1 - confidence the edge accepts grows in proportion to what asking the
        cloud costs: at c = B it is the configured τ, a slow link lowers it (down to the floor), a
        fast one raises it toward 1. A disabled exit (τ > 1) stays disabled; without a budget, or
        before any cost is known, τ is used as given."""
        base = self.threshold(exit_layer)
        if base > 1.0 or self.latency_budget_s is None or cloud_cost_s is None:
            return base
        return min(1.0, max(self.threshold_floor, 1.0 - (1.0 - base) * cloud_cost_s / self.latency_budget_s))

    def head(self, exit_layer: int) -> ExitHead:
        """The exit's head: the trained one when given, else the model's final norm and LM head."""
        return self.exit_heads.get(exit_layer) or ExitHead()


def confidence(logits: np.ndarray, metric: str = "max_prob") -> tuple[np.ndarray, np.ndarray]:
    """(confidence, top-1 id) per row of logits, computed in C."""
    return _core.confidence(np.asarray(logits, np.float32), METRICS[metric])


def save_exit_heads(path, heads: dict[int, ExitHead], model, extra_metadata: dict | None = None) -> None:
    """Writes trained heads as safetensors, with the base model's fingerprint in the metadata."""
    from safetensors.numpy import save_file

    tensors = {}
    for e, head in heads.items():
        for name in ("norm", "down", "up", "gate_w"):
            value = getattr(head, name)
            if value is not None:
                tensors[f"exit.{e}.{name}"] = np.ascontiguousarray(value, np.float32)
        if head.gate_w is not None:
            tensors[f"exit.{e}.gate_b"] = np.array([head.gate_b], np.float32)
    metadata = {"format": HEADS_FORMAT, "base_fingerprint": model_fingerprint(model),
                "exits": ",".join(str(e) for e in sorted(heads)), **(extra_metadata or {})}  # fmt: skip
    save_file(tensors, str(path), metadata=metadata)


def load_exit_heads(path, model=None) -> dict[int, ExitHead]:
    """Exit heads from a side file: safetensors written by save_exit_heads / `cecollm train-exits`, or a
    GGUF or safetensors holding tensors named ``exit.{E}.norm`` (also ``exit.{E}.norm.weight``),
    ``exit.{E}.down``, ``exit.{E}.up``, ``exit.{E}.gate_w``, ``exit.{E}.gate_b``. With model given,
    a file that records another base model's fingerprint is refused."""
    import re

    path = str(path)
    fingerprint = None
    if path.endswith(".gguf"):
        from .gguf_file import GGUFFile, GGUFFormatError, tensor_nbytes
        from .gguf_loader import ModelFormatError

        try:
            reader = GGUFFile(path)
            tensors = {}
            for t in reader.tensors:
                if t.type_id not in (0, 1):
                    raise GGUFFormatError(f"exit tensor {t.name} has type {t.type_name}; F32 or F16 expected")
                raw = reader.data(t, tensor_nbytes(t)).view(np.float32 if t.type_id == 0 else np.float16)
                tensors[t.name] = raw.reshape(t.shape[::-1]).astype(np.float32)
            fingerprint = reader.fields.get("cecollm.base_fingerprint")
        except GGUFFormatError as exc:
            raise ModelFormatError(f"{path}: not a readable GGUF file ({exc})") from None
    else:
        from safetensors import safe_open

        with safe_open(path, framework="numpy") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            fingerprint = (f.metadata() or {}).get("base_fingerprint")
    if model is not None and fingerprint is not None and fingerprint != model_fingerprint(model):
        raise ValueError(f"{path} was trained for another model (fingerprint {fingerprint}); "
                         f"this model's is {model_fingerprint(model)}")  # fmt: skip
    pattern = re.compile(r"exit\.(\d+)\.(norm|down|up|gate_w|gate_b)(?:\.weight)?")
    heads: dict[int, ExitHead] = {}
    for name, value in tensors.items():
        match = pattern.fullmatch(name)
        if not match:
            continue
        head = heads.setdefault(int(match.group(1)), ExitHead())
        value = np.ascontiguousarray(value, np.float32)
        kind = match.group(2)
        if kind == "norm":
            head.norm = value.reshape(-1)
        elif kind == "gate_b":
            head.gate_b = float(value.reshape(-1)[0])
        elif kind == "gate_w":
            head.gate_w = value.reshape(-1)
        else:
            setattr(head, kind, value)
    if not heads:
        raise ValueError(f"{path}: no tensors named exit.<E>.norm / down / up / gate_w")
    return heads
