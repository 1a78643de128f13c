"""Multi-exit fine-tuning of the model's own weights (LITE-style), as a low-rank delta over the base.

Every exit e (a number of layers run) reads the hidden state after layer e through the model's
*shared* final RMSNorm and LM head, as the final layer does. Tuning teaches the early layers to make
those states decodable while keeping the final layer's behaviour. Per batch of token sequences:

    L = Σ_{e in exits} w_exit · [ KL(p_T^(1/τ) ‖ p_e) + λ_top1 · CE(p_e, argmax p_T) ]  +  w_final · KL(p_T ‖ p_L)

p_T is the *original* model's final distribution (the teacher: the same weights without the delta),
p_T^(1/τ) the same sharpened by temperature τ ≤ 1 (renormalized), p_e the tuned model's distribution at
exit e, p_L at its last layer. The KL terms are self-distillation (the final term protects the final
layer). An exit taught the teacher's own distribution is at most as confident as the teacher, which on
this model's answers reaches 0.8 on only ~41% of tokens; the sharpened teacher (τ < 1) and the top-1
term move an exit's confidence toward whether it names the teacher's greedy choice, which is what a
confidence threshold acts on.

What is trained: for every layer matrix W (type Q4_0/Q4_1/Q8_0/F16/F32 as stored) a rank-r update,
W' = Q(W + up · down) with Q the matrix's own quantizer, and the per-layer RMSNorm weights. Training
sees W' through the quantizer with a straight-through gradient, so what is optimized is exactly what
ships. The embedding / LM head and the final norm stay the base model's (shared by every exit).

This module needs numpy and torch only (`pip install cecollm[train]`); it never imports the C core, so
it also runs on a GPU machine where the extension is not built (load it by path there).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np

# GGML type ids (as cecollm._core.TYPE_*), so that this module needs no compiled extension.
TYPE_F32, TYPE_F16, TYPE_Q4_0, TYPE_Q4_1, TYPE_Q8_0 = 0, 1, 2, 3, 8
ROPE_ADJACENT = 0  # as cecollm._core.ROPE_ADJACENT: GGUF's rotation of adjacent pairs
MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
NORMS = ("attn_norm", "ffn_norm")
DELTA_FORMAT = "cecollm-delta-1"


@dataclass
class Recipe:
    """Everything that decides a tuned model (stored in the delta's metadata)."""

    exits: tuple = (4, 8, 12, 15)  # exits trained through the shared head (the split among them)
    method: str = "scales"  # "scales": each quantization block's scale and minimum; "lora"; "full"
    rank: int = 16  # lora: rank of each matrix's update
    alpha: float = 32.0  # lora: update scale, up · down · alpha / rank (folded into `up` at export)
    quantize_aware: bool = True  # lora / full: train through the matrix's quantizer (straight-through)
    w_exit: float = 1.0  # weight of each exit's loss
    w_final: float = 12.0  # weight of the final layer's KL to the teacher
    top1: float = 0.0  # λ_top1: hard-label term toward the teacher's greedy token at exits
    tau: float = 0.5  # temperature of the teacher the exits learn (1: its own distribution)
    steps: int = 500
    batch: int = 16  # sequences per step
    seq_len: int = 384  # longer sequences are cut
    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 0.0
    train_norms: bool = True
    seed: int = 0


@dataclass
class TrainLog:
    recipe: dict
    steps_done: int = 0
    seconds: float = 0.0
    device: str = "cpu"
    losses: list = field(default_factory=list)  # (step, total, per-exit KL..., final KL)
    evaluation: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# The quantizers, differentiable by straight-through (forward: the shipped weights)


def fake_quantize(w, type_id: int):
    """w (rows, cols) rounded through the GGML type as cecollm's C quantizer does (ggml's reference
    rounding, fp16 scales), with the gradient passed straight through."""
    import torch

    if type_id == TYPE_F32:
        return w
    if type_id == TYPE_F16:
        q = w.to(torch.float16).to(torch.float32)
    else:
        b = w.reshape(-1, 32)
        if type_id == TYPE_Q4_1:  # x = d q + m, q = trunc((x - min) / d + 0.5) in [0, 15]
            lo, hi = b.min(-1, keepdim=True).values, b.max(-1, keepdim=True).values
            d = (hi - lo) / 15
            inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
            q = torch.clamp(torch.floor((b - lo) * inv + 0.5), 0, 15)
            q = q * d.to(torch.float16).to(torch.float32) + lo.to(torch.float16).to(torch.float32)
        elif type_id == TYPE_Q4_0:  # x = d (q - 8), d = (signed absmax) / -8
            idx = b.abs().argmax(-1, keepdim=True)
            d = torch.gather(b, -1, idx) / -8
            inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
            q = torch.clamp(torch.floor(b * inv + 8.5), 0, 15)
            q = (q - 8) * d.to(torch.float16).to(torch.float32)
        elif type_id == TYPE_Q8_0:  # x = d q, d = absmax / 127, q rounded half away from zero
            d = b.abs().max(-1, keepdim=True).values / 127
            inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
            v = b * inv
            q = torch.sign(v) * torch.floor(v.abs() + 0.5) * d.to(torch.float16).to(torch.float32)
        else:
            raise ValueError(f"no quantizer for type id {type_id}")
        q = q.reshape(w.shape)
    return q.detach() + (w - w.detach())  # the value is q exactly; the gradient is w's


def _fp16(x):
    """x rounded to fp16 (as stored), gradient straight through."""
    import torch

    return x.detach().to(torch.float16).float() + (x - x.detach())


def block_grid(w, type_id: int):
    """(codes, d, m) of a matrix (rows, cols) stored in a block type: w == codes · d + m per block of 32
    (Q4_0: codes already minus 8; m = 0 for Q4_0 and Q8_0), d and m float32 holding fp16 values, shaped
    (rows, cols / 32) and codes (rows, cols / 32, 32). Reads the grid off the dequantized values, which
    holds for blocks a reference quantizer made (they contain their extreme codes); checked."""
    import torch

    rows = w.shape[0]
    b = w.reshape(rows, -1, 32).double()
    if type_id == TYPE_Q4_1:
        m = b.min(-1).values
        d = (b.max(-1).values - m) / 15
    elif type_id == TYPE_Q4_0:  # the code-0 element is the signed extreme: -8 d
        extreme = torch.gather(b, -1, b.abs().argmax(-1, keepdim=True))[..., 0]
        d, m = extreme / -8, torch.zeros_like(extreme)
    elif type_id == TYPE_Q8_0:
        d, m = b.abs().max(-1).values / 127, torch.zeros(b.shape[:2], dtype=b.dtype)
    else:
        raise ValueError(f"type id {type_id} has no block grid")
    d = d.to(torch.float16).double()
    m = m.to(torch.float16).double()
    safe = torch.where(d == 0, torch.ones_like(d), d)
    codes = torch.round((b - m[..., None]) / safe[..., None])
    rebuilt = (codes.float() * d.float()[..., None] + m.float()[..., None]).reshape(w.shape)
    if not torch.equal(rebuilt, w.float()):
        raise ValueError("the matrix is not on a block grid its type's reference quantizer makes")
    return codes.float(), d.float(), m.float()


# ---------------------------------------------------------------------------------------------
# The model in torch: the same LLaMA forward as the C core, with exits through the shared head


def _torch_module_classes():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class TunedLinear(nn.Module):
        """y = x · W'ᵀ for a matrix stored quantized. method "scales": W' keeps every weight's integer
        code and trains each block's fp16 scale d and minimum m (W' = q · d' + m', d' = d (1 + s),
        m' = m + d t, rounded to fp16 straight-through): exactly what the block format stores, so the
        tuned matrix ships in the base's own type with nothing re-quantized. "lora": W' = Q(W + s · up ·
        down); "full": W' = Q(W'') with W'' trained; Q the matrix's quantizer (straight-through) when
        quantize_aware, else the identity."""

        def __init__(self, weight: np.ndarray, type_id: int, recipe: Recipe, generator):
            super().__init__()
            self.type_id, self.method = type_id, recipe.method
            self.quantize = recipe.quantize_aware
            w = torch.from_numpy(np.ascontiguousarray(weight, np.float32))
            self.register_buffer("base", w)  # the original weights: the teacher's, and the update's origin
            if self.method == "scales":
                q, d, m = block_grid(w, type_id)
                self.register_buffer("codes", q)
                self.register_buffer("d0", d)
                self.register_buffer("m0", m)
                self.s = nn.Parameter(torch.zeros_like(d))
                self.t = nn.Parameter(torch.zeros_like(m)) if type_id == TYPE_Q4_1 else None
            elif self.method == "lora":
                self.scale = recipe.alpha / recipe.rank
                out_f, in_f = w.shape
                self.down = nn.Parameter(torch.randn(recipe.rank, in_f, generator=generator) / math.sqrt(in_f))
                self.up = nn.Parameter(torch.zeros(out_f, recipe.rank))
            elif self.method == "full":
                self.full = nn.Parameter(w.clone())
            else:
                raise ValueError(f"method {self.method!r} is not one of 'scales', 'lora', 'full'")

        def scales(self):
            """(d', m') of every block, (rows, blocks), fp16 values (straight-through)."""
            d = _fp16(self.d0 * (1 + self.s))
            m = _fp16(self.m0 + self.d0 * self.t) if self.t is not None else self.m0
            return d, m

        def weight(self, adapted: bool = True):
            if not adapted:
                return self.base
            if self.method == "scales":
                d, m = self.scales()
                return (self.codes * d[..., None] + m[..., None]).reshape(self.base.shape)
            w = self.base + self.scale * (self.up @ self.down) if self.method == "lora" else self.full
            return fake_quantize(w, self.type_id) if self.quantize else w

        def forward(self, x, adapted: bool = True):
            return F.linear(x, self.weight(adapted).to(x.dtype))

    class Block(nn.Module):
        def __init__(self, cfg: dict, tensors: dict, i: int, recipe: Recipe, generator):
            super().__init__()
            self.cfg = cfg
            for name in MATRICES:
                w, type_id = tensors[f"blk.{i}.{name}.weight"]
                setattr(self, name, TunedLinear(w, type_id, recipe, generator))
            for name in NORMS:
                w = torch.from_numpy(np.asarray(tensors[f"blk.{i}.{name}.weight"][0], np.float32).reshape(-1).copy())
                self.register_buffer(name + "_base", w.clone())
                setattr(self, name, nn.Parameter(w, requires_grad=recipe.train_norms))

        def norm(self, x, name: str, adapted: bool):
            w = getattr(self, name) if adapted else getattr(self, name + "_base")
            return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.cfg["norm_eps"]).to(x.dtype) * w.to(x.dtype)

        def forward(self, x, cos, sin, adapted: bool = True):
            cfg = self.cfg
            bsz, t, _ = x.shape
            hd, nh, nkv = cfg["head_dim"], cfg["n_heads"], cfg["n_kv_heads"]
            xn = self.norm(x, "attn_norm", adapted)
            q = self.attn_q(xn, adapted).view(bsz, t, nh, hd)
            k = self.attn_k(xn, adapted).view(bsz, t, nkv, hd)
            v = self.attn_v(xn, adapted).view(bsz, t, nkv, hd)
            q, k = _rope(q, cos, sin, cfg["rope_style"]), _rope(k, cos, sin, cfg["rope_style"])
            q, k, v = (z.transpose(1, 2) for z in (q, k, v))
            k = k.repeat_interleave(nh // nkv, dim=1)  # query head h reads key head h // (nh / nkv)
            v = v.repeat_interleave(nh // nkv, dim=1)
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.attn_output(att.transpose(1, 2).reshape(bsz, t, nh * hd), adapted)
            xn = self.norm(x, "ffn_norm", adapted)
            return x + self.ffn_down(F.silu(self.ffn_gate(xn, adapted)) * self.ffn_up(xn, adapted), adapted)

    def _rope(x, cos, sin, style):
        """x (B, T, H, hd) rotated per position; pairs (2i, 2i+1) (GGUF) or (i, i + hd/2) (HF)."""
        if style == ROPE_ADJACENT:
            a, b = x[..., 0::2], x[..., 1::2]
            return torch.stack((a * cos - b * sin, a * sin + b * cos), -1).flatten(-2)
        half = x.shape[-1] // 2
        a, b = x[..., :half], x[..., half:]
        return torch.cat((a * cos - b * sin, a * sin + b * cos), -1)

    class TunedLlama(nn.Module):
        """The model with exits. forward(ids, adapted=False) is the base model (the teacher)."""

        def __init__(self, cfg: dict, tensors: dict, recipe: Recipe):
            super().__init__()
            self.cfg, self.recipe = cfg, recipe
            generator = torch.Generator().manual_seed(recipe.seed)
            self.blocks = nn.ModuleList(Block(cfg, tensors, i, recipe, generator) for i in range(cfg["n_layers"]))
            emb, _ = tensors["token_embd.weight"]
            self.register_buffer("embedding", torch.from_numpy(np.ascontiguousarray(emb, np.float32)))
            head = tensors.get("output.weight", tensors["token_embd.weight"])[0]
            self.register_buffer("head", torch.from_numpy(np.ascontiguousarray(head, np.float32)))
            norm = np.asarray(tensors["output_norm.weight"][0], np.float32).reshape(-1)
            self.register_buffer("final_norm", torch.from_numpy(norm.copy()))
            hd = cfg["head_dim"]
            self.register_buffer("inv_freq", 1.0 / cfg["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd))

        def hidden_states(self, ids, layers, adapted: bool = True) -> dict:
            """{layer: hidden state (B, T, dim) after that many layers} for each layer in `layers`."""
            pos = torch.arange(ids.shape[1], device=ids.device).float()
            ang = (pos[:, None] * self.inv_freq[None, :])[None, :, None, :]  # (1, T, 1, hd/2)
            cos, sin = torch.cos(ang), torch.sin(ang)
            x = self.embedding[ids]
            out = {}
            want = set(layers)
            for i, block in enumerate(self.blocks[: max(layers)]):
                x = block(x, cos.to(x.dtype), sin.to(x.dtype), adapted)
                if i + 1 in want:
                    out[i + 1] = x
            return out

        def logits(self, h):
            """Through the shared final norm and LM head: (..., vocab) float32."""
            eps = self.cfg["norm_eps"]
            hn = h.float() * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + eps) * self.final_norm
            return hn @ self.head.T  # under autocast, in its precision

        def trainable(self):
            return [p for p in self.parameters() if p.requires_grad]

    return TunedLlama


def build_torch_model(config: dict, tensors: dict, recipe: Recipe):
    """tensors: {GGUF name: (float32 array (rows, cols) or (n,), GGML type id)}."""
    return _torch_module_classes()(config, tensors, recipe)


# ---------------------------------------------------------------------------------------------
# Training


def _batches(sequences: list, batch: int, seq_len: int, rng: np.random.Generator):
    """Endless random batches: (ids (B, T) int64 right-padded with 0, mask (B, T-1) of real targets)."""
    while True:
        pick = rng.choice(len(sequences), batch, replace=len(sequences) < batch)
        rows = [np.asarray(sequences[i][:seq_len], np.int64) for i in pick]
        t = max(len(r) for r in rows)
        ids = np.zeros((batch, t), np.int64)
        mask = np.zeros((batch, t - 1), bool)
        for b, r in enumerate(rows):
            ids[b, : len(r)] = r
            mask[b, : len(r) - 1] = True
        yield ids, mask


def exit_losses(model, ids, mask, recipe: Recipe, autocast: bool):
    """(total loss, {exit: KL}, final KL) of one batch; see the module docstring for the formula."""
    import torch
    import torch.nn.functional as F

    n_layers = model.cfg["n_layers"]
    exits = [e for e in recipe.exits if e < n_layers]
    ctx = torch.autocast(ids.device.type, dtype=torch.bfloat16) if autocast else _null()
    with ctx:
        with torch.no_grad():
            teacher = model.logits(model.hidden_states(ids, [n_layers], adapted=False)[n_layers][:, :-1])
            teacher_logits = teacher[mask].float()
            teacher = F.log_softmax(teacher_logits, -1)
            sharp = F.log_softmax(teacher_logits / recipe.tau, -1) if recipe.tau != 1 else teacher
            greedy = teacher.argmax(-1)
        states = model.hidden_states(ids, exits + [n_layers])
        kls, total = {}, 0.0
        for layer in exits + [n_layers]:
            logp = F.log_softmax(model.logits(states[layer][:, :-1])[mask].float(), -1)
            if layer == n_layers:
                kl = F.kl_div(logp, teacher, log_target=True, reduction="batchmean")
                total = total + recipe.w_final * kl
            else:
                kl = F.kl_div(logp, sharp, log_target=True, reduction="batchmean")
                total = total + recipe.w_exit * (kl + (recipe.top1 * F.nll_loss(logp, greedy) if recipe.top1 else 0))
            kls[layer] = kl.detach()
    return total, kls


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def train(model, sequences: list, recipe: Recipe, device: str | None = None, progress: bool = True,
          checkpoint: str | None = None, checkpoint_every: int = 200, log_every: int = 25,
          stop_after: int | None = None, deadline: float | None = None) -> TrainLog:  # fmt: skip
    """Tunes `model` (from build_torch_model) on token sequences. With checkpoint given, the state
    (trainable tensors, optimizer, step, data position) is saved there every checkpoint_every steps and
    when the run stops; a run with the same checkpoint resumes from it. stop_after: stop after this
    many steps of this call (a time-boxed CPU session; resume later). deadline: a time.time() after
    which this call stops at the end of the current step (checkpointed; log.steps_done < recipe.steps)."""
    import os

    import torch

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(dev)
    torch.manual_seed(recipe.seed)
    params = model.trainable()
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / recipe.warmup)
                                              * 0.5 * (1 + math.cos(math.pi * min(s, recipe.steps) / recipe.steps)))  # fmt: skip
    log = TrainLog(recipe=asdict(recipe), device=str(dev))
    start = 0
    if checkpoint and os.path.exists(checkpoint):
        state = torch.load(checkpoint, map_location=dev, weights_only=False)
        model.load_state_dict(state["model"], strict=False)
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start, log.losses, log.seconds = state["step"], state["losses"], state["seconds"]
    rng = np.random.default_rng(recipe.seed)
    batches = _batches(sequences, recipe.batch, recipe.seq_len, rng)
    for _ in range(start):  # the data stream resumes where it stopped
        next(batches)
    bar = _bar(recipe.steps, start, progress)
    t0 = time.perf_counter() - log.seconds
    autocast = dev.type == "cuda"
    end = recipe.steps if stop_after is None else min(recipe.steps, start + stop_after)
    for step in range(start, end):
        ids, mask = next(batches)
        loss, kls = exit_losses(model, torch.from_numpy(ids).to(dev), torch.from_numpy(mask).to(dev), recipe, autocast)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step + 1 == recipe.steps:
            row = [step, loss.item()] + [float(v) for v in kls.values()]
            log.losses.append(row)
            bar.set_postfix_str(" ".join(f"{k}:{float(v):.3f}" for k, v in kls.items()))
        bar.update(1)
        late = deadline is not None and time.time() >= deadline and step + 1 < end
        if checkpoint and ((step + 1) % checkpoint_every == 0 or step + 1 == end or late):
            log.seconds = time.perf_counter() - t0
            torch.save({"model": {k: v for k, v in model.state_dict().items() if k in _trainable_names(model)},
                        "opt": opt.state_dict(), "sched": sched.state_dict(), "step": step + 1,
                        "losses": log.losses, "seconds": log.seconds}, checkpoint)  # fmt: skip
        if late:
            end = step + 1
            break
    bar.close()
    log.steps_done = end
    log.seconds = time.perf_counter() - t0
    return log


def _trainable_names(model) -> set:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _bar(total: int, initial: int, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is part of the train extra; without it, no bar
        enabled = False
    if not enabled:

        class _Quiet:
            def update(self, n=1):
                pass

            def set_postfix_str(self, s):
                pass

            def close(self):
                pass

        return _Quiet()
    return tqdm(total=total, initial=initial, desc="finetune", unit="step", dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------
# Teacher answers on the accelerator (the base model, batched; no KV cache: each step recomputes)


def generate_answers(model, prompts: list, max_new_tokens: int, end_ids, temperature: float = 0.0,
                     top_p: float = 0.95, seed: int = 0, batch: int = 64, device: str | None = None) -> list:  # fmt: skip
    """The base model's answers (token ids, an end token included when one ended it) to prompts (token
    ids), in batches: sequences are right-padded, so causal attention never sees the padding."""
    import torch

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(dev).eval()
    gen = torch.Generator(device=dev).manual_seed(seed)
    n_layers, ends = model.cfg["n_layers"], set(end_ids)
    answers = []
    ctx = torch.autocast(dev.type, dtype=torch.bfloat16) if dev.type == "cuda" else _null()
    for b0 in range(0, len(prompts), batch):
        group = prompts[b0 : b0 + batch]
        lens = torch.tensor([len(p) for p in group], device=dev)
        ids = torch.zeros((len(group), int(lens.max()) + max_new_tokens), dtype=torch.long, device=dev)
        for i, p in enumerate(group):
            ids[i, : len(p)] = torch.as_tensor(p, device=dev)
        done = torch.zeros(len(group), dtype=torch.bool, device=dev)
        out = [[] for _ in group]
        with torch.no_grad(), ctx:
            for _ in range(max_new_tokens):
                t = int(lens.max())
                h = model.hidden_states(ids[:, :t], [n_layers], adapted=False)[n_layers]
                logits = model.logits(h[torch.arange(len(group), device=dev), lens - 1]).float()
                if temperature > 0:
                    probs = torch.softmax(logits / temperature, -1)
                    sorted_p, order = probs.sort(-1, descending=True)
                    keep = sorted_p.cumsum(-1) - sorted_p < top_p  # the smallest prefix reaching top_p
                    sorted_p = sorted_p * keep
                    pick = torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1, generator=gen)[:, 0]
                    token = order.gather(-1, pick[:, None])[:, 0]
                else:
                    token = logits.argmax(-1)
                for i in torch.nonzero(~done).flatten().tolist():
                    out[i].append(int(token[i]))
                    done[i] = int(token[i]) in ends
                ids[torch.arange(len(group), device=dev), lens] = token
                lens = torch.where(done, lens, lens + 1)
                if bool(done.all()):
                    break
        answers += out
    return answers


# ---------------------------------------------------------------------------------------------
# Evaluation in torch (teacher-forced), to compare recipes quickly on any device


def evaluate(model, answers: list, human: list, threshold: float = 0.8, device: str | None = None) -> dict:
    """answers: [(ids, first answer position)] of held-out instructions; human: [ids] of human text.
    Returns, teacher-forced on the answers: per exit, top-1 agreement with the tuned model's final
    layer and the share reaching `threshold`; the share of tokens the edge would finish (first exit
    reaching the threshold) and how often those agree with the final layer; perplexity of the tuned
    and the base model's final layer on the human text."""
    import torch

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(dev).eval()
    n_layers = model.cfg["n_layers"]
    exits = [e for e in model.recipe.exits if e < n_layers]
    agree = {e: [] for e in exits}
    conf = {e: [] for e in exits}
    with torch.no_grad():
        for ids, first in answers:
            x = torch.as_tensor(np.asarray(ids, np.int64)[None], device=dev)
            states = model.hidden_states(x, exits + [n_layers])
            final = model.logits(states[n_layers][0, first - 1 : -1]).argmax(-1)
            for e in exits:
                p = torch.softmax(model.logits(states[e][0, first - 1 : -1]).float(), -1)
                c, top = p.max(-1)
                agree[e].append((top == final).cpu().numpy())
                conf[e].append(c.cpu().numpy())
        nll = {True: [], False: []}
        for ids in human:
            x = torch.as_tensor(np.asarray(ids, np.int64)[None], device=dev)
            for adapted in (True, False):
                h = model.hidden_states(x, [n_layers], adapted)[n_layers][0, :-1]
                logp = torch.log_softmax(model.logits(h).float(), -1)
                nll[adapted].append(-logp[torch.arange(len(ids) - 1), x[0, 1:]].cpu().numpy())
    model.train()
    agree = {e: np.concatenate(v) for e, v in agree.items()}
    conf = {e: np.concatenate(v) for e, v in conf.items()}
    decided = np.zeros(len(agree[exits[0]]), bool)
    right = np.zeros_like(decided)
    for e in exits:  # the first exit that reaches the threshold decides
        take = ~decided & (conf[e] >= threshold)
        right |= take & agree[e]
        decided |= take
    ppl = {k: float(np.exp(np.concatenate(v).mean())) for k, v in nll.items()}
    return {
        "threshold": threshold,
        "agreement": {e: float(agree[e].mean()) for e in exits},
        "confident_share": {e: float((conf[e] >= threshold).mean()) for e in exits},
        "edge_share": float(decided.mean()),
        "edge_precision": float(right.sum() / max(decided.sum(), 1)),
        "perplexity": ppl[True],
        "base_perplexity": ppl[False],
        "perplexity_ratio": ppl[True] / ppl[False],
    }


# ---------------------------------------------------------------------------------------------
# The delta: what ships


def delta_tensors(model) -> dict:
    """{name: float32 array} of the tuned model's change. method "scales": per matrix `<name>.d` (and
    `<name>.m` for Q4_1), each block's new scale (minimum), (rows, cols / 32), fp16 values; "lora":
    `<name>.up` (rows, rank) with the scale folded in and `<name>.down` (rank, cols). Per layer norm its
    full weights."""
    recipe = model.recipe
    if recipe.method == "full":
        raise ValueError("a full-weight tuning has no small delta; use method 'scales' or 'lora' to ship one")
    out = {}
    for i, block in enumerate(model.blocks):
        for name in MATRICES:
            lin, key = getattr(block, name), f"blk.{i}.{name}.weight"
            if recipe.method == "scales":
                d, m = lin.scales()
                out[key + ".d"] = d.detach().float().cpu().numpy()
                if lin.t is not None:
                    out[key + ".m"] = m.detach().float().cpu().numpy()
            else:
                out[key + ".up"] = (lin.up.detach().float().cpu().numpy() * lin.scale).astype(np.float32)
                out[key + ".down"] = lin.down.detach().float().cpu().numpy().astype(np.float32)
        if recipe.train_norms:
            for name in NORMS:
                out[f"blk.{i}.{name}.weight"] = getattr(block, name).detach().float().cpu().numpy()
    return out


def save_delta(path, model, base_fingerprint: str, base_name: str, log: TrainLog | None = None,
               dtype: str = "f16") -> None:  # fmt: skip
    """Writes the delta as safetensors (block scales in fp16, as stored; low-rank factors in `dtype`;
    norms in f32) with the recipe."""
    from safetensors.numpy import save_file

    tensors = {}
    for name, value in delta_tensors(model).items():
        half = name.endswith((".d", ".m")) or (name.endswith((".up", ".down")) and dtype == "f16")
        tensors[name] = np.ascontiguousarray(value.astype(np.float16 if half else np.float32))
    recipe = dict(asdict(model.recipe), exits=list(model.recipe.exits))
    metadata = {
        "format": DELTA_FORMAT,
        "base_fingerprint": base_fingerprint,
        "base_name": base_name,
        "exits": ",".join(str(e) for e in model.recipe.exits),
        "recipe": json.dumps(recipe),
    }
    if log is not None:
        metadata["training"] = json.dumps({"steps": log.steps_done, "seconds": round(log.seconds, 1),
                                           "device": log.device, "evaluation": log.evaluation})  # fmt: skip
    save_file(tensors, str(path), metadata=metadata)


# ---------------------------------------------------------------------------------------------
# Running where the C extension is not built (a GPU machine): weights through the `gguf` package


def tensors_from_gguf(path: str) -> tuple[dict, dict]:
    """(config, {name: (float32 array, type id)}) of a llama GGUF, dequantized by `gguf`'s reference."""
    import gguf

    reader = gguf.GGUFReader(path)

    def field(key):
        f = reader.fields[key]
        return f.parts[f.data[0]][0].item()

    arch = "llama"
    cfg = {
        "n_layers": int(field(f"{arch}.block_count")),
        "dim": int(field(f"{arch}.embedding_length")),
        "ffn_dim": int(field(f"{arch}.feed_forward_length")),
        "n_heads": int(field(f"{arch}.attention.head_count")),
        "n_kv_heads": int(field(f"{arch}.attention.head_count_kv")),
        "rope_theta": float(field(f"{arch}.rope.freq_base")),
        "norm_eps": float(field(f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_style": ROPE_ADJACENT,
    }
    cfg["head_dim"] = cfg["dim"] // cfg["n_heads"]
    tensors = {}
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = [int(x) for x in t.shape][::-1]
        tensors[t.name] = (w.reshape(shape if len(shape) > 1 else [-1]), int(t.tensor_type))
    return cfg, tensors


def _main(argv=None) -> None:
    """python cecollm/finetune.py --gguf BASE --data train.json --out DIR [--eval eval.json] [--recipe JSON ...]"""
    import argparse
    import os

    parser = argparse.ArgumentParser(description=_main.__doc__)
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--data", required=True, help="JSON from `cecollm finetune --save-data` (sequences, held-out)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--recipe", action="append", default=[], help="JSON of Recipe fields; repeat for several runs")
    parser.add_argument("--base-fingerprint", default="")
    parser.add_argument("--checkpoint-dir", default=None, help="where resumable training state goes (default: --out)")
    parser.add_argument("--name", default="run", help="prefix of the files written")
    parser.add_argument("--sample-text", type=int, default=0, help="add this many free texts the base model samples")
    parser.add_argument("--extra-answers", type=int, default=0, help="add N answers per train prompt, sampled at T=0.8")
    parser.add_argument("--data-fraction", type=float, default=1.0, help="train on a seeded random fraction of the sequences")
    parser.add_argument("--deadline", type=float, default=None, help="time.time() to stop training at (checkpointed)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    cfg, tensors = tensors_from_gguf(args.gguf)
    with open(args.data) as f:
        data = json.load(f)
    if args.sample_text or args.extra_answers:
        sampler = build_torch_model(cfg, tensors, Recipe(method="full"))
    if args.sample_text:  # the base model's own free text (document start, temperature 1): protects the final layer
        texts = generate_answers(sampler, [[data.get("bos_id", 0)]] * args.sample_text, 256, [], temperature=1.0,
                                 top_p=1.0, seed=1, batch=128)  # fmt: skip
        data["sequences"] = list(data["sequences"]) + [[data.get("bos_id", 0)] + t for t in texts]
    if args.extra_answers:  # more of the base model's answers to the training instructions (data-size ablation)
        prompts, seen = [], set()
        for s in data["sequences"]:
            if isinstance(s, dict) and s.get("prompt_len", 0) > 0 and s.get("id") not in seen:
                seen.add(s.get("id"))
                prompts.append(s["ids"][: s["prompt_len"]])
        for k in range(args.extra_answers):
            answers = generate_answers(sampler, prompts, 200, data.get("end_ids", []), temperature=0.8,
                                       seed=100 + k, batch=128)  # fmt: skip
            data["sequences"] = list(data["sequences"]) + [
                {"id": f"extra-{k}-{i}", "sample": 2 + k, "prompt_len": len(p), "ids": p + a}
                for i, (p, a) in enumerate(zip(prompts, answers))
            ]
    if args.sample_text or args.extra_answers:
        del sampler
    if args.data_fraction < 1.0:  # a seeded random subset, the same for every recipe of this call
        n = len(data["sequences"])
        keep = np.random.default_rng(0).permutation(n)[: max(1, round(args.data_fraction * n))]
        data["sequences"] = [data["sequences"][i] for i in sorted(keep)]
    print(json.dumps({"training_sequences": len(data["sequences"])}), flush=True)
    for k, text in enumerate(args.recipe or ["{}"]):
        fields = json.loads(text)
        recipe = Recipe(**{**fields, "exits": tuple(fields.get("exits", Recipe.exits))})
        model = build_torch_model(cfg, tensors, recipe)
        name = f"{args.name}{k}" if len(args.recipe) > 1 else args.name
        seqs = [s["ids"] if isinstance(s, dict) else s for s in data["sequences"]]
        log = train(model, seqs, recipe, checkpoint=os.path.join(args.checkpoint_dir or args.out, name + ".ckpt"),
                    deadline=args.deadline)  # fmt: skip
        if log.steps_done < recipe.steps:  # stopped at the deadline: resume with the same command
            print(json.dumps({"run": name, "stopped_at": log.steps_done, "of": recipe.steps}), flush=True)
            continue
        if "heldout" not in data and "heldout_prompts" in data:  # the base model answers them here, once
            prompts = data["heldout_prompts"]
            answers = generate_answers(model, prompts, 100, data.get("end_ids", []))
            data["heldout"] = [{"ids": p + a, "prompt_len": len(p)} for p, a in zip(prompts, answers)]
        held = [(s["ids"], s["prompt_len"]) for s in data.get("heldout", [])]
        log.evaluation = {str(t): evaluate(model, held, data.get("human", []), threshold=t) for t in (0.5, 0.8, 0.9, 0.95)}
        print(json.dumps({"run": name, "recipe": asdict(recipe), "seconds": log.seconds, "eval": log.evaluation}), flush=True)
        with open(os.path.join(args.out, name + ".json"), "w") as f:
            json.dump(asdict(log), f)
        if recipe.method != "full":
            save_delta(os.path.join(args.out, name + ".safetensors"), model, args.base_fingerprint, "", log)


if __name__ == "__main__":
    _main()
