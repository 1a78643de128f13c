"""Early-exit configuration: where the exits are, how confident each must be, what their heads are."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import _core

METRICS = {"max_prob": _core.METRIC_MAX_PROB, "margin": _core.METRIC_MARGIN, "entropy": _core.METRIC_ENTROPY}
KV_MODES = ("catchup", "propagate")


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
    exit_norms: {exit: (dim,) float32} norm weights replacing the final norm at that exit.

    >>> ExitPolicy(exits=(6, 10), split=15, thresholds=(0.9, 0.8))  # doctest: +ELLIPSIS
    ExitPolicy(exits=(6, 10), split=15, ...)
    """

    exits: tuple[int, ...] = (6, 10)
    split: int = 15
    thresholds: tuple[float, ...] = (0.8,)
    metric: str = "max_prob"
    kv: str = "catchup"
    precheck_rows: int | None = None
    exit_norms: dict = field(default_factory=dict, hash=False, compare=False, repr=False)

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
        if self.metric not in METRICS:
            raise ValueError(f"metric {self.metric!r} is not one of {sorted(METRICS)}")
        if self.kv not in KV_MODES:
            raise ValueError(f"kv {self.kv!r} is not one of {KV_MODES}")
        if self.precheck_rows is not None and self.metric == "entropy":
            raise ValueError("the candidate pre-check bounds max_prob and margin, not entropy")

    def validate_for(self, n_layers: int, vocab: int, dim: int) -> None:
        if not 1 <= self.split <= n_layers:
            raise ValueError(f"split {self.split} outside [1, {n_layers}]")
        if self.precheck_rows is not None and not 2 <= self.precheck_rows < vocab:
            raise ValueError(f"precheck_rows {self.precheck_rows} outside [2, {vocab})")
        for e, w in self.exit_norms.items():
            if e not in self.exits and e != self.split:
                raise ValueError(f"an exit norm is given for {e}, which is not an exit")
            if np.shape(w) != (dim,):
                raise ValueError(f"exit norm for {e} has shape {np.shape(w)}, expected ({dim},)")

    def threshold(self, exit_layer: int) -> float:
        return self.thresholds[self.exits.index(exit_layer)]

    def norm(self, exit_layer: int):
        """The exit head's norm weights, or None for the model's final norm."""
        w = self.exit_norms.get(exit_layer)
        return None if w is None else np.ascontiguousarray(w, dtype=np.float32)


def confidence(logits: np.ndarray, metric: str = "max_prob") -> tuple[np.ndarray, np.ndarray]:
    """(confidence, top-1 id) per row of logits, computed in C."""
    return _core.confidence(np.asarray(logits, np.float32), METRICS[metric])


def load_exit_norms(path) -> dict[int, np.ndarray]:
    """Exit-head norms from a side file: tensors named ``exit.{E}.norm.weight`` (E = the exit point),
    in safetensors or GGUF. Returns {E: (dim,) float32}."""
    import re

    path = str(path)
    pattern = re.compile(r"exit\.(\d+)\.norm\.weight")
    if path.endswith(".gguf"):
        from .gguf_loader import ModelFormatError

        import gguf

        try:
            tensors = {t.name: np.array(t.data, np.float32) for t in gguf.GGUFReader(path, "r").tensors}
        except Exception as exc:
            raise ModelFormatError(f"{path}: not a readable GGUF file ({exc})") from None
    else:
        from safetensors.numpy import load_file

        tensors = load_file(path)
    norms = {}
    for name, value in tensors.items():
        match = pattern.fullmatch(name)
        if match:
            norms[int(match.group(1))] = np.ascontiguousarray(value, np.float32).reshape(-1)
    if not norms:
        raise ValueError(f"{path}: no tensors named exit.<E>.norm.weight")
    return norms
