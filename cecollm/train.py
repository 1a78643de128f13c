"""Training exit heads and gates by self-distillation, with the base model frozen.

Hidden states at each exit and the full model's next-token distributions come from cecollm's C
engine; PyTorch (optional: `pip install cecollm[train]`, CPU is enough, a GPU is used when present)
fits, per exit, an RMSNorm and a low-rank adapter in front of the shared LM head by minimising
KL(full ‖ exit), then a logistic gate on the RMS-normalized hidden state (and the previous exit's
gate probability) that predicts whether the exit's top-1 equals the full model's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from . import _core
from .exits import ExitHead, save_exit_heads
from .model import Model
from .sweep import _progress, eval_text

SELF_PROMPTS = (
    "Tell me about the history of tea.",
    "How do airplanes stay in the air?",
    "Write a short poem about autumn leaves.",
    "What are some tips for learning a new language?",
    "Explain what a database index is.",
    "Describe a busy market in the morning.",
    "Why do we have seasons on Earth?",
    "Give me a recipe for a simple salad.",
    "What is the difference between weather and climate?",
    "Write a Python function that reverses a string.",
    "Summarize the plot of a detective story you invent.",
    "How does a bicycle gear system work?",
    "What should I pack for a weekend hiking trip?",
    "Explain photosynthesis to a ten-year-old.",
    "Write a friendly email inviting a colleague to lunch.",
    "What are the planets of the solar system?",
)


@dataclass
class TrainingData:
    """Per exit: hidden states (N, dim); the teacher's log-probabilities (N, vocab)."""

    hidden: dict  # exit -> (N, dim) float32
    teacher_logprobs: np.ndarray
    text_index: np.ndarray  # (N,) which text each position came from


@dataclass
class TrainReport:
    exits: list
    positions: int
    seconds: float
    final_kl: dict = field(default_factory=dict)
    gate_accuracy: dict = field(default_factory=dict)


def self_generated_texts(model: Model, n: int = 16, tokens: int = 96, seed: int = 0, tick=lambda: None) -> list[str]:
    """Text the model writes itself (sampled, seeded): distillation needs no external data. tick()
    after each text."""
    texts = []
    for i, prompt in enumerate((SELF_PROMPTS * (n // len(SELF_PROMPTS) + 1))[:n]):
        result = model.generate(prompt, max_new_tokens=tokens, temperature=0.8, top_p=0.95, seed=seed + i, chat=True)
        texts.append(model.chat_prompt(prompt) + result.text)
        tick()
    return texts


def collect_training_data(model: Model, exits, texts: list[str], tick=lambda: None) -> TrainingData:
    """Runs each text once: hidden states at every exit and the full model's log-probabilities.
    tick() after each text."""
    exits = sorted(exits)
    hidden = {e: [] for e in exits}
    teacher, index = [], []
    for t, text in enumerate(texts):
        ids = np.asarray(model.tokenize(text), np.int32)[:2048]
        if len(ids) < 2:
            continue
        cache = model.new_cache(len(ids))
        h, done = model.core.embed(ids), 0
        for e in exits:
            h = cache.forward(h, 0, done, e) if e > done else h
            done = e
            hidden[e].append(h.copy())
        h = cache.forward(h, 0, done, model.n_layers) if done < model.n_layers else h
        logits = model.core.head(h).astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        teacher.append((logits - np.log(np.exp(logits).sum(-1, keepdims=True))).astype(np.float32))
        index.append(np.full(len(ids), t))
        tick()
    return TrainingData({e: np.concatenate(v) for e, v in hidden.items()}, np.concatenate(teacher), np.concatenate(index))


def _lm_head(model: Model) -> np.ndarray:
    """The (tied) LM head, dequantized: (vocab, dim) float32."""
    tensors = model.weights.tensors
    raw, type_id, rows, cols = tensors.get("output.weight", tensors["token_embd.weight"])
    return _core.dequantize(raw, type_id, rows, cols)


def train_exit_heads(model: Model, exits=(4, 8, 12, 16), steps: int = 300, rank: int = 32, batch: int = 128,
                     lr: float = 3e-3, texts: list[str] | None = None, self_text: int = 16, seed: int = 0,
                     progress: bool = True, device: str | None = None) -> tuple[dict, TrainReport]:  # fmt: skip
    """Trains one head (norm + rank-`rank` adapter) and one gate per exit. steps=0 returns the
    untrained heads (final norm, zero adapter): they behave exactly as the default exits.

    >>> heads, report = train_exit_heads(model, exits=(4, 8), steps=50)   # doctest: +SKIP
    >>> save_exit_heads("exits.safetensors", heads, model)                # doctest: +SKIP
    """
    import torch

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    exits = sorted(int(e) for e in exits)
    if any(not 1 <= e < model.n_layers for e in exits):
        raise ValueError(f"exits {exits} must lie in [1, {model.n_layers})")
    texts = list(eval_text("train") if texts is None else texts)
    human = len(texts)  # every other one of these calibrates the gates: text of the kind they will see,
    # which the heads never train on (heads fit their training text better than new text)
    prep = _progress(self_text + len(texts) + self_text, progress)  # writing texts, then running them
    if self_text:
        texts += self_generated_texts(model, self_text, seed=seed, tick=lambda: prep.update("self-generated text"))
    data = collect_training_data(model, exits, texts, tick=lambda: prep.update("teacher pass"))
    prep.close()
    n, dim = data.teacher_logprobs.shape[0], model.config["dim"]
    final_norm = np.asarray(model.weights.tensors["output_norm.weight"][0], np.float32).reshape(-1)
    eps = model.config["norm_eps"]
    head_matrix = torch.from_numpy(_lm_head(model)).to(dev)
    teacher = torch.from_numpy(data.teacher_logprobs).to(dev)
    calibration = (data.text_index < human) & (data.text_index % 2 == 1) if human > 1 else np.zeros(n, bool)
    trainable = np.flatnonzero(~calibration)
    generator = np.random.default_rng(seed)
    report = TrainReport(exits, n, 0.0)
    heads: dict[int, ExitHead] = {}
    bar = _progress(len(exits) * max(steps, 1), progress)

    def exit_logits(h, w, down, up):
        h2 = h + (h @ down.T) @ up.T
        return (h2 * torch.rsqrt(h2.pow(2).mean(-1, keepdim=True) + eps) * w) @ head_matrix.T

    for e in exits:
        hidden = torch.from_numpy(data.hidden[e]).to(dev)
        w = torch.nn.Parameter(torch.from_numpy(final_norm.copy()).to(dev))
        down = torch.nn.Parameter(torch.randn(rank, dim, device=dev) / dim**0.5)
        up = torch.nn.Parameter(torch.zeros(dim, rank, device=dev))  # zero: training starts at the default head
        opt = torch.optim.Adam([w, down, up], lr=lr)
        running = None
        for step in range(steps):
            idx = torch.from_numpy(generator.choice(trainable, min(batch, len(trainable)))).to(dev)
            logp = torch.log_softmax(exit_logits(hidden[idx], w, down, up), -1)
            loss = torch.nn.functional.kl_div(logp, teacher[idx], log_target=True, reduction="batchmean")
            opt.zero_grad()
            loss.backward()
            opt.step()
            running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
            bar.update(f"exit {e}: KL {running:.3f}")
        heads[e] = ExitHead(norm=w.detach().cpu().numpy(), down=down.detach().cpu().numpy(),
                            up=up.detach().cpu().numpy())  # fmt: skip
        report.final_kl[e] = running
        if steps == 0:
            heads[e] = ExitHead(norm=final_norm.copy(), down=np.zeros((rank, dim), np.float32),
                                up=np.zeros((dim, rank), np.float32))  # fmt: skip
            bar.update(f"exit {e}: untrained")
    bar.close()
    if steps:
        _train_gates(model, heads, data, exits, seed, report, calibrate_on=calibration)
    report.seconds = time.perf_counter() - t0
    return heads, report


def _train_gates(model: Model, heads: dict, data: TrainingData, exits, seed: int, report: TrainReport,
                 calibrate_on: np.ndarray, l2: float = 1e-2) -> None:  # fmt: skip
    """Logistic gates, fitted in exit order so each sees the previous exit's gate probability.
    The weights are fitted with an L2 penalty on the positions outside `calibrate_on`; a scale and an
    offset of the gate's logit are then fitted on the positions inside it (Platt scaling), which the
    heads did not train on. Exit agreement is much higher on the model's own text and on the heads'
    training text than on new human text, so this is what makes the probabilities mean what they say
    there. When either set is empty, a random 20% of the positions calibrates."""
    import torch

    torch.manual_seed(seed)
    teacher_top1 = data.teacher_logprobs.argmax(-1)
    n = len(teacher_top1)
    if calibrate_on.all() or not calibrate_on.any():
        calibrate_on = np.zeros(n, bool)
        calibrate_on[np.random.default_rng(seed).permutation(n)[: n // 5]] = True
    fit, calib = torch.from_numpy(np.flatnonzero(~calibrate_on)), torch.from_numpy(np.flatnonzero(calibrate_on))
    prev = np.zeros(n)
    for e in exits:
        head = heads[e]
        hidden = data.hidden[e]
        top1 = np.concatenate([head.logits(model, hidden[i : i + 512]).argmax(-1) for i in range(0, len(hidden), 512)])
        target = torch.from_numpy((top1 == teacher_top1).astype(np.float32))
        hn = hidden / np.sqrt(np.mean(hidden.astype(np.float64) ** 2, -1, keepdims=True) + 1e-6)
        x = torch.from_numpy(np.concatenate([hn, prev[:, None]], 1).astype(np.float32))
        w = torch.zeros(x.shape[1], requires_grad=True)
        b = torch.zeros(1, requires_grad=True)
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        opt = torch.optim.Adam([w, b], lr=0.05)
        for _ in range(300):
            loss = bce(x[fit] @ w + b, target[fit]) + l2 * w.pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        z = (x[calib] @ w + b).detach()
        scale, offset = torch.ones(1, requires_grad=True), torch.zeros(1, requires_grad=True)
        opt = torch.optim.Adam([scale, offset], lr=0.05)
        for _ in range(300):
            loss = bce(scale * z + offset, target[calib])
            opt.zero_grad()
            loss.backward()
            opt.step()
        head.gate_w = (scale * w).detach().numpy().astype(np.float32)
        head.gate_b = float((scale * b + offset).item())
        prev = head.gate(hidden, prev)
        report.gate_accuracy[e] = float(np.mean((prev >= 0.5) == target.numpy().astype(bool)))


def gate_calibration(model: Model, heads: dict, exits, texts: list[str], bins: int = 10) -> list[dict]:
    """Predicted vs observed agreement of each exit's gate on (held-out) texts, in probability bins."""
    data = collect_training_data(model, exits, texts)
    teacher_top1 = data.teacher_logprobs.argmax(-1)
    rows, prev = [], np.zeros(len(teacher_top1))
    for e in sorted(exits):
        head = heads[e]
        top1 = head.logits(model, data.hidden[e]).argmax(-1)
        prev = head.gate(data.hidden[e], prev)
        agree = top1 == teacher_top1
        edges = np.linspace(0, 1, bins + 1)
        which = np.clip(np.digitize(prev, edges) - 1, 0, bins - 1)
        for k in range(bins):
            sel = which == k
            if sel.any():
                rows.append({"exit": e, "bin": f"{edges[k]:.1f}-{edges[k + 1]:.1f}", "count": int(sel.sum()),
                             "predicted": float(prev[sel].mean()), "observed": float(agree[sel].mean())})  # fmt: skip
    return rows


def train_and_save(model: Model, out, exits, steps: int, rank: int = 32, data_files=(), self_text: int = 16,
                   progress: bool = True) -> TrainReport:  # fmt: skip
    """What `cecollm train-exits` does: train, then write the side file with the model's fingerprint."""
    texts = None
    if data_files:
        texts = []
        for path in data_files:
            with open(path, encoding="utf-8") as f:
                texts += [p.strip() for p in f.read().split("\n\n") if p.strip()]
    heads, report = train_exit_heads(model, exits, steps=steps, rank=rank, texts=texts, self_text=self_text,
                                     progress=progress)  # fmt: skip
    save_exit_heads(out, heads, model, {"steps": str(steps), "rank": str(rank), "positions": str(report.positions)})
    return report
