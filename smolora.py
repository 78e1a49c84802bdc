"""smolora: continual visual instruction tuning by hand: LoRA, DoRA, O-LoRA, MoELoRA, SMoLoRA.

Part A, the method, read top to bottom beside the papers:
  1. the adapters, each forward beside its formula;
  2. into LLaVA: where each method's adapters go, f(X_ins), routing, the adapters' state;
  3. training: the answer loss, one optimizer step, one stage;
  4. the methods: what each does beyond tuning, a row per method in METHODS;
  5. the continual run: Config, every knob and its default, then `run`, the protocol.
Part B, running it, which a student may skip: the tiny base model, the run folder and checkpoints
(resume, Ctrl-C, NaN), the command line.
Notation as in the papers: x a token's input to a linear layer, W0 the frozen weight, r the total
rank, s = alpha / r the LoRA scale (the TOTAL rank r in both papers' code, also for the mixtures).
The README's table "Equations in the code" numbers every formula and says where it is in the papers.
"""
import argparse
import inspect
import io
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import safetensors.torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm
from transformers import (AutoModel, AutoProcessor, AutoTokenizer, CLIPVisionConfig, LlamaConfig,
                          LlavaConfig, LlavaForConditionalGeneration)

import data
import eval

# ==============================================================================================
# Part A. The method.
# ==============================================================================================

# ----------------------------------------------------------------------------------------------
# 1. The adapters. Each wraps a frozen nn.Linear (`.base`) and adds a low-rank update to its output.
#    Adapter weights are kept in float32 whatever the base's dtype (ours: bf16 weights would round
#    away AdamW's small updates); the adapter path computes in float32 and is cast back.

class LoRALinear(nn.Module):
    """LoRA (Hu et al. 2021): h = W0 x + s * B A dropout(x), A (r, in), B (out, r), s = alpha/r."""

    def __init__(self, base: nn.Linear, r=8, alpha=16, dropout=0.0):
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank r={r} is not allowed: r must be a positive integer")
        self.base, self.r, self.scaling = base, r, alpha / r
        kw = dict(device=base.weight.device, dtype=torch.float32)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, **kw))  # B = 0: h = W0 x
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))                # as PEFT / loralib
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.merged = False

    def forward(self, x):
        h = self.base(x)                                            # W0 x          (B, L, out)
        if self.merged:
            return h
        z = self.dropout(x.to(self.lora_A.dtype)) @ self.lora_A.T   # A x           (B, L, r)
        return h + (self.scaling * z @ self.lora_B.T).to(h.dtype)   # + s B A x     (B, L, out)

    def delta_weight(self):
        return self.scaling * self.lora_B @ self.lora_A             # s B A         (out, in)

    def merged_weight(self, W0):
        return W0 + self.delta_weight()                             # W = W0 + s B A

    def unmerged_weight(self, W):
        return W - self.delta_weight()                              # W0 = W - s B A

    @torch.no_grad()
    def merge(self, merged=True):
        """W0 -> W, the update folded in: the layer then costs what the plain linear costs;
        merge(False): W -> W0."""
        if self.merged != merged:
            fold = self.merged_weight if merged else self.unmerged_weight
            weight = self.base.weight
            weight.copy_(fold(weight.float()).to(weight.dtype))
            self.merged = merged

    def unmerge(self):
        """W -> W0: back to the frozen weight, the adapter separate again."""
        self.merge(False)


class DoRALinear(LoRALinear):
    """DoRA (Liu et al. 2024, weight-decomposed LoRA): the LoRA-updated weight split into a learned
    magnitude per output row and a direction, its norm a constant in the backward pass (as PEFT):
        W' = m * (W0 + s B A) / ||W0 + s B A||,  m (out,) starts as ||W0|| per row: W' = W0 at init
        h  = W' x + b,  computed as PEFT does:
             W0 x + b + (m/n - 1) W0 dropout(x) + (m/n) s B A dropout(x)"""

    def __init__(self, base: nn.Linear, r=8, alpha=16, dropout=0.0):
        super().__init__(base, r, alpha, dropout)
        self.magnitude = nn.Parameter(base.weight.detach().float().norm(dim=1))  # m = ||W0|| (out,)

    @torch.no_grad()              # detached: a constant in the backward pass
    def weight_norm(self):
        return (self.base.weight.float() + self.delta_weight()).norm(dim=1)  # n = ||W0+sBA|| (out,)

    def forward(self, x):
        h = self.base(x)                                           # W0 x + b           (B, L, out)
        if self.merged:
            return h
        scale = self.magnitude / self.weight_norm()                # m / n              (out,)
        xd = self.dropout(x.to(self.lora_A.dtype))                 # dropout(x), as PEFT
        plain = xd @ self.base.weight.float().T                    # W0 dropout(x)      (B, L, out)
        z = self.scaling * (xd @ self.lora_A.T) @ self.lora_B.T    # s B A dropout(x)   (B, L, out)
        return h + ((scale - 1) * plain + scale * z).to(h.dtype)   # W' x + b

    def merged_weight(self, W0):
        self.merged_norm = self.weight_norm()                        # n, kept to unmerge
        scale = self.magnitude / self.merged_norm
        return (W0 + self.delta_weight()) * scale[:, None]          # W = m (W0 + s B A) / n

    def unmerged_weight(self, W):
        scale = self.merged_norm / self.magnitude
        return W * scale[:, None] - self.delta_weight()              # W0 = W n / m - s B A


class OLoRALinear(LoRALinear):
    """O-LoRA (Wang et al. 2023, orthogonal subspace learning): each task tunes a new LoRA; the
    earlier tasks' LoRAs stay in the model, frozen, and the new A is pushed out of their row space.
        h      = W0 x + sum_{j<t} s B_j A_j x + s B_t A_t x
        L_orth = sum_{j<t} sum |A_j A_t^T|    (the official code's L1; the paper squares the norm)
    The frozen LoRAs are stacked in buffers sized for all the run's tasks (zeros: tasks to come)."""

    def __init__(self, base: nn.Linear, r=8, alpha=16, dropout=0.0, num_tasks=1):
        # ours: the rank budget r shared, r/T per task, so that the T A's can be orthogonal and
        # O-LoRA holds as many parameters as the other methods' one LoRA; s = alpha / r as theirs
        rank = max(1, r // num_tasks)
        super().__init__(base, rank, alpha * rank / r, dropout)
        kw = dict(device=base.weight.device, dtype=torch.float32)
        past_rank = num_tasks * rank
        self.register_buffer("past_A", torch.zeros(past_rank, base.in_features, **kw))  # [A_1; ..]
        self.register_buffer("past_B", torch.zeros(base.out_features, past_rank, **kw))  # [B_1 ..]

    def forward(self, x):
        h = super().forward(x)                                       # W0 x + s B_t A_t x
        z = self.dropout(x.to(self.past_A.dtype)) @ self.past_A.T     # A_j x, all j < t
        return h + (self.scaling * z @ self.past_B.T).to(h.dtype)    # + sum_{j<t} s B_j A_j x

    @torch.no_grad()
    def start_new_lora(self, done):
        """Freeze the LoRA just tuned as task `done`'s (1-based), start a fresh one for the next."""
        rows = slice((done - 1) * self.r, done * self.r)
        self.past_A[rows], self.past_B[:, rows] = self.lora_A, self.lora_B
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B.zero_()

    def orthogonality(self):
        return (self.past_A @ self.lora_A.T).abs().sum()             # sum_{j<t} sum |A_j A_t^T|


def expert_weights(base, r, num_experts):
    """E experts of rank r/E each, stacked: A (E, r/E, in) ~ N(0, 0.01^2), B (E, out, r/E) = 0."""
    if num_experts < 1 or r % num_experts:
        raise ValueError(f"rank r={r} with num_experts={num_experts} is not allowed: "
                         f"r must be a positive multiple of the number of experts")
    kw = dict(device=base.weight.device, dtype=torch.float32)
    rank = r // num_experts
    lora_A = nn.Parameter(torch.randn(num_experts, rank, base.in_features, **kw) * 0.01)
    lora_B = nn.Parameter(torch.zeros(num_experts, base.out_features, rank, **kw))
    return lora_A, lora_B


class MoELoRALinear(nn.Module):
    """MoELoRA (CoIN): a dense per-token softmax over E LoRA experts of rank r/E.
        g = softmax(W_g x)                     W_g (E, in), no bias, no top-k
        h = W0 x + s * sum_e g_e B_e A_e x
    Stacked form (ours, exactly equal): z = A_all x in one matmul, each expert's r/E-slice scaled by
    g_e, one matmul with B_all: one LoRA's cost instead of E."""

    def __init__(self, base: nn.Linear, r=128, alpha=256, num_experts=8, dropout=0.05):
        super().__init__()
        self.base, self.r, self.num_experts, self.scaling = base, r, num_experts, alpha / r
        self.lora_A, self.lora_B = expert_weights(base, r, num_experts)
        self.router = nn.Linear(base.in_features, num_experts, bias=False,
                                device=base.weight.device, dtype=torch.float32)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x):
        h = self.base(x)                                            # W0 x               (B, L, out)
        x = x.to(self.lora_A.dtype)
        E, rank, d_in = self.lora_A.shape
        g = torch.softmax(self.router(x), dim=-1)                   # g = softmax(W_g x) (B, L, E)
        z = self.dropout(x) @ self.lora_A.reshape(E * rank, d_in).T  # A_e x, all e      (B, L, r)
        z = (z.unflatten(-1, (E, rank)) * g.unsqueeze(-1)).flatten(-2)  # g_e A_e x      (B, L, r)
        B_all = self.lora_B.permute(1, 0, 2).reshape(-1, E * rank)  # [B_1 ... B_E]      (out, r)
        return h + (self.scaling * z @ B_all.T).to(h.dtype)         # + s sum_e g_e B_e A_e x


SMOLORA_PARTS = (("vu",), ("if",), ("vu", "if"), ("vu", "if", "fusion"))  # the ablation, full last


def gather_experts(stacked, experts):
    """stacked[experts], (E, ...)[(B, P, k)], by index_select, whose backward adds in a fixed order:
    stacked[experts]'s adds in no fixed order on CPU, and two identical SMoLoRA runs differed."""
    return stacked.index_select(0, experts.flatten()).unflatten(0, experts.shape)


class SMoLoRALinear(nn.Module):
    """SMoLoRA: a separable mixture of LoRA, two pools of E/2 experts and two routers.
    Experts [0, E/2) form the visual-understanding (VU) pool, [E/2, E) instruction-following (IF).
        G_vu = softmax(top_k(R_vu . Avg(x)))              per sample; Avg over this layer's input
        G_if = softmax(top_k(R_if . f(X_ins)))            per sample; f the instruction embedding
        x_vu = sum_{i in VU} G_vu,i * s * B_i A_i x       x_if likewise over the IF pool
        [alpha_t, beta_t] = softmax([I_vu . x_vu, I_if . x_if])        per token ("adaptive fusion")
        h = W0 x + alpha_t * x_vu + beta_t * x_if
    The paper's ablation (`parts`): vu: h = W0 x + x_vu, if: h = W0 x + x_if (the other pool unused,
    untrained); vu,if: h = W0 x + x_vu + x_if; vu,if,fusion: the full method above.
    With top_k = 1 (the paper's) the softmax over one kept logit is the constant 1, so R_vu and R_if
    get no gradient: they stay the random projections they were initialised as, frozen here as
    officially (out of the optimizer); top_k >= 2 trains them."""

    def __init__(self, base: nn.Linear, r=128, alpha=256, num_experts=8, top_k=1, ins_dim=None,
                 dropout=0.05, parts=SMOLORA_PARTS[-1]):
        super().__init__()
        self.check(parts, num_experts, top_k)
        pool = num_experts // 2
        self.base, self.r, self.num_experts, self.top_k = base, r, num_experts, top_k
        self.scaling, self.fusion = alpha / r, "fusion" in parts
        self.pools = [i for i, name in enumerate(("vu", "if")) if name in parts]   # 0: VU, 1: IF
        self.lora_A, self.lora_B = expert_weights(base, r, num_experts)
        kw = dict(device=base.weight.device, dtype=torch.float32)
        self.vu_router = nn.Linear(base.in_features, pool, bias=False, **kw)              # R_vu
        self.if_router = nn.Linear(ins_dim or base.in_features, pool, bias=False, **kw)   # R_if
        # top-1: no gradient reaches them (above); nor the router of a pool the ablation leaves out
        self.vu_router.requires_grad_(top_k > 1 and "vu" in parts)
        self.if_router.requires_grad_(top_k > 1 and "if" in parts)
        if self.fusion:   # I_vu, I_if (1, out): no bias, as in the paper and the official code
            self.fuse_vu, self.fuse_if = (nn.Linear(base.out_features, 1, bias=False, **kw)
                                          for _ in range(2))
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.routing_mask = self.routing_ins = self.routing = None

    @staticmethod
    def check(parts, num_experts, top_k):
        """Refuse, in one line, what SMoLoRA cannot be built with."""
        if tuple(parts) not in SMOLORA_PARTS:
            raise ValueError(f"SMoLoRA's parts {','.join(parts)!r} (--smolora-parts) are not "
                             f"allowed: choose {' | '.join(','.join(p) for p in SMOLORA_PARTS)}")
        if num_experts < 2 or num_experts % 2:
            raise ValueError(f"num_experts={num_experts} (--experts) is not allowed for SMoLoRA: "
                             f"it must be even (two pools)")
        if not 1 <= top_k <= num_experts // 2:
            raise ValueError(f"top_k={top_k} (--top-k) is not allowed with "
                             f"num_experts={num_experts}: between 1 and {num_experts // 2}")

    def set_routing(self, mask, ins):
        """What the next forward routes on: the attention mask (B, L) or None, f(X_ins) (B, d)."""
        self.routing_mask, self.routing_ins, self.routing = mask, ins, None

    def route(self, x, mask, ins):
        """Per sample: the kept experts of each pool (B, 2, k) and their gates G (B, 2, k)."""
        if mask is not None and mask.shape[1] != x.shape[1]:
            # A decode step of generate (one new token): routing is decided once at the prompt and
            # kept for every generated token (ours; the official code re-routes on each new token).
            if self.routing is None:
                raise ValueError("SMoLoRA decode step with no routing: run the prompt through the "
                                 "model first")
            return self.routing
        if ins is None:
            raise ValueError("SMoLoRA needs the instruction embedding: call set_routing(model, "
                             "mask, ins) or pass ins= to the layer")
        if mask is None:
            avg = x.mean(dim=1)                                      # Avg(x)             (B, in)
        else:   # ours: the mean over non-padding tokens: a sample's routing ignores its batch-mates
            m = mask.to(x.dtype).unsqueeze(-1)                       # (B, L, 1)
            avg = (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)     # Avg(x)             (B, in)
        vu_logit, vu_expert = self.vu_router(avg).topk(self.top_k, dim=-1)   # top_k(R_vu . Avg(x))
        if_logit, if_expert = self.if_router(ins.to(avg.dtype)).topk(self.top_k, dim=-1)  # R_if . f
        logits = torch.stack([vu_logit, if_logit], dim=1)                    # (B, 2, k)
        gates = torch.softmax(logits, dim=-1)                                # G_vu, G_if (B, 2, k)
        experts = torch.stack([vu_expert, if_expert + self.num_experts // 2], dim=1)  # (B, 2, k)
        self.routing = (experts, gates)
        return self.routing

    def forward(self, x, mask=None, ins=None):
        h = self.base(x)                                            # W0 x               (B, L, out)
        x = x.to(self.lora_A.dtype)
        if mask is None and ins is None:
            mask, ins = self.routing_mask, self.routing_ins
        experts, gates = self.route(x, mask, ins)                    # (B, 2, k)
        P = len(self.pools)                                          # the pools in use
        experts, gates = experts[:, self.pools], gates[:, self.pools]
        rank = self.lora_A.shape[1]
        # Stacked: gather each sample's kept experts; one batched matmul for their A, one for B.
        A = gather_experts(self.lora_A, experts).flatten(1, 3)      # (B, P*k*rank, in)
        # one dropout mask shared by the kept experts (ours; the official code draws one per expert)
        z = torch.bmm(self.dropout(x), A.transpose(1, 2))           # A_i x        (B, L, P*k*rank)
        z = z.unflatten(-1, (P, self.top_k, rank)) * (self.scaling * gates)[:, None, :, :, None]
        z = z.flatten(-2)                                           # G_i s A_i x  (B, L, P, k*rank)
        B = gather_experts(self.lora_B, experts)                    # (B, P, k, out, rank)
        B = B.transpose(-1, -2).flatten(2, 3)                       # B_i^T     (B, P, k*rank, out)
        if self.fusion:
            # I . x_pool = (I B_pool) . z_pool: the fusion logits are read in the rank space, so
            # x_vu and x_if ((B, L, out) each) are never built apart (ours, exactly equal, faster).
            I = torch.stack([self.fuse_vu.weight, self.fuse_if.weight])   # I_vu, I_if (2, 1, out)
            IB = (B @ I.transpose(1, 2)).squeeze(-1)                # I_pool B_pool (B, 2, k*rank)
            logits = (z * IB[:, None]).sum(-1)                      # [I_vu . x_vu, I_if . x_if]
            z = z * torch.softmax(logits, dim=-1).unsqueeze(-1)     # [alpha_t, beta_t] on each pool
        delta = torch.bmm(z.flatten(2), B.flatten(1, 2))            # alpha_t x_vu + beta_t x_if
        return h + delta.to(h.dtype)                        # h = W0 x + alpha_t x_vu + beta_t x_if


ADAPTERS = {"lora": LoRALinear, "dora": DoRALinear, "olora": OLoRALinear, "moelora": MoELoRALinear,
            "smolora": SMoLoRALinear}


# ----------------------------------------------------------------------------------------------
# 2. Into LLaVA (module names of transformers' LlavaForConditionalGeneration, as in
#    llava-hf/llava-1.5-7b-hf): where each method's adapters go, f(X_ins), routing, their state.

# LoRA, DoRA, O-LoRA, MoELoRA: every linear of the LLM (q, k, v, o, gate, up, down); SMoLoRA: the
# LLM's MLP (gate, up, down) and both linears of the projector
LLM_LAYERS = r"model\.language_model\.layers\.\d+\."
LLM_LINEARS = LLM_LAYERS + r"(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"
TARGETS = {**dict.fromkeys(("lora", "dora", "olora", "moelora"), (LLM_LINEARS,)),
           "smolora": (LLM_LAYERS + r"mlp\.(gate|up|down)_proj",
                       r"model\.multi_modal_projector\.linear_[12]")}


def add_adapters(model, method, targets=None, **hparams):
    """Wrap the method's target linears in place, freeze everything else; return the wrapped names.
    `targets` (regular expressions over whole module names) overrides the method's; hparams: the
    adapter class's arguments."""
    if method not in ADAPTERS:
        raise ValueError(f"unknown method {method!r}: allowed are {', '.join(ADAPTERS)}")
    allowed = set(inspect.signature(ADAPTERS[method]).parameters) - {"base"}
    if set(hparams) - allowed:
        raise ValueError(f"hyper-parameter(s) {', '.join(sorted(set(hparams) - allowed))} not "
                         f"allowed for {method}: allowed are {', '.join(sorted(allowed))}")
    patterns = [re.compile(p) for p in (targets or TARGETS[method])]
    names = [name for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and any(p.fullmatch(name) for p in patterns)]
    if not names:
        raise ValueError(f"targets {list(targets or TARGETS[method])} match no linear module of "
                         f"{type(model).__name__}: give regular expressions over its module names")
    model.requires_grad_(False)
    if method == "smolora":   # f(X_ins) is in the LLM's embedding space, unless an encoder gives it
        hparams.setdefault("ins_dim", model.get_input_embeddings().embedding_dim)
    for name in names:
        adapter = ADAPTERS[method](model.get_submodule(name), **hparams)
        adapter.train(adapter.base.training)   # a new module starts in training mode: as the model
        model.set_submodule(name, adapter)
    return names


def instruction_embedding(model, input_ids, ins_mask):
    """f(X_ins) (ours): the mean of the frozen input embeddings over the instruction's tokens
    (B, d), centred on the vocabulary's mean embedding: uncentred, all of CoIN's instructions went
    to one IF expert."""
    table = model.get_input_embeddings()
    with torch.no_grad():
        centre = table.weight.mean(dim=0, dtype=torch.float32)   # mean_v e(v), no fp32 table copy
        embeddings = table(input_ids).float() - centre           # e(x) - mean_v e(v)  (B, L, d)
    m = ins_mask.to(embeddings.dtype).unsqueeze(-1)              # (B, L, 1)
    return (embeddings * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)


def load_encoder(path):
    """--ins-encoder: (encoder, tokenizer) of a transformers sentence encoder folder
    (all-MiniLM-L6-v2 officially)."""
    try:
        return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--ins-encoder {path} is not a transformers encoder (a folder AutoModel "
                         f"and AutoTokenizer load): {str(e).splitlines()[0]}") from None


@torch.no_grad()
def embed_instructions(model, processor, strings, encoder=None):
    """f(X_ins) of instruction strings, each read alone (N, d): instruction_embedding, or the
    sentence encoder's (the official f), mean-pooled over its tokens."""
    if encoder is None:
        tokens = processor.tokenizer(strings, add_special_tokens=False, padding=True,
                                     return_tensors="pt")
        return instruction_embedding(model, tokens["input_ids"].to(model.device),
                                     tokens["attention_mask"].bool())
    encoder, tokenizer = encoder
    tokens = tokenizer(strings, padding=True, return_tensors="pt")
    m = tokens["attention_mask"].unsqueeze(-1).float()                     # (N, L, 1)
    pooled = (encoder(**tokens).last_hidden_state * m).sum(1) / m.sum(1)   # (N, d)
    return pooled.to(model.device)


def with_instruction_embeddings(records, task, cfg, embed):
    """The records with the f(X_ins) their IF router reads ("ins_embedding"), unless it is read from
    the prompt (default). --if-routing task: one vector for the task whatever a sample's wording (the
    official oracle): its canonical instruction's, or trained on paraphrases the mean of its 5
    training wordings' (the official multi-type code's); --ins-encoder: the sample's own."""
    if cfg.if_routing == "task":
        wordings = (data.training_wordings(task) if cfg.train_instructions == "paraphrased"
                    else [data.canonical_instruction(task)])
        vector = embed(wordings).mean(dim=0)                                # (d,)
        return [{**r, "ins_embedding": vector} for r in records]
    if not cfg.ins_encoder:
        return records
    strings = sorted({r["instruction"] for r in records})
    table = dict(zip(strings, embed(strings)))            # one tensor per distinct string, shared
    return [{**r, "ins_embedding": table[r["instruction"]]} for r in records]


def set_routing(model, mask, ins):
    """Hand every SMoLoRA layer what its routers see: the attention mask (B, L) and f(X_ins) (B, d).
    The projector's layers see the image tokens only, which carry no padding: they average all."""
    for name, module in model.named_modules():
        if isinstance(module, SMoLoRALinear):
            module.set_routing(None if "multi_modal_projector" in name else mask, ins)


def route_batch(model, batch):
    """set_routing from a collated batch, if the model has SMoLoRA. Avg(x) runs over the prompt
    alone (not the answer nor EOS) in training as at test: a sample trains the experts that answer
    it (ours; officially the answer too)."""
    if any(isinstance(m, SMoLoRALinear) for m in model.modules()):
        mask = batch["attention_mask"]
        prompt = mask * (batch["labels"] == -100) if "labels" in batch else mask
        if "ins_embedding" in batch:    # given by with_instruction_embeddings
            ins = batch["ins_embedding"]
        else:
            ins = instruction_embedding(model, batch["input_ids"], batch["ins_mask"])
        set_routing(model, prompt, ins)


@torch.no_grad()
def routing_picks(model, processor, records, batch_size):
    """Per record, per SMoLoRA layer, the top VU and IF expert, numbered within its pool:
    (N, layers, 2) lists."""
    layers = [m for m in model.modules() if isinstance(m, SMoLoRALinear)]
    collate, picks, was_training = data.Collator(processor, train=False), [], model.training
    model.eval()   # no dropout: it would change what later layers' routers see
    for first in range(0, len(records), batch_size):
        batch = collate(records[first:first + batch_size])
        batch = {k: v.to(model.device) for k, v in batch.items()}
        route_batch(model, batch)
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              pixel_values=batch["pixel_values"].to(model.dtype))   # the prompt routes every layer
        experts = torch.stack([m.routing[0][:, :, 0] for m in layers], dim=1)  # (B, layers, 2)
        picks += (experts % (layers[0].num_experts // 2)).tolist()
    model.train(was_training)
    return picks


def adapter_state_dict(model):
    """Only the adapter tensors (experts, routers, fusion vectors), keyed by their full names."""
    return {f"{name}.{key}": tensor.detach().clone() for name, module in model.named_modules()
            if isinstance(module, tuple(ADAPTERS.values()))
            for key, tensor in module.state_dict().items() if not key.startswith("base.")}


def load_adapter_state_dict(model, state):
    """Load what adapter_state_dict saved; the keys must match the model's adapters exactly."""
    own = adapter_state_dict(model)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    reshaped = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or reshaped:
        raise ValueError(f"adapter state does not fit this model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}, other shape {reshaped[:3]} (same method "
                         f"and hyper-parameters?)")
    model.load_state_dict(state, strict=False)


# ----------------------------------------------------------------------------------------------
# 3. Training: AdamW, cosine schedule with warmup, gradient clipping, next-token loss on the answer.

PROJECTOR_LR_FACTOR = 0.2   # SMoLoRA's projector adapters: 2e-5 against the LLM's 1e-4, officially


def cosine_with_warmup(optimizer, total_steps, warmup=0.03):
    """Linear warmup over the first 3% of the steps, then cosine decay to zero (the papers')."""
    warmup_steps = max(1, round(warmup * total_steps))

    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * progress))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def answer_loss(model, batch):
    """Next-token cross-entropy on the answer tokens of a collated batch (labels -100 elsewhere).
    Under torchrun `model` is the DistributedDataParallel around the model (data_parallel)."""
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    batch = {k: v.to(inner.device) for k, v in batch.items()}
    route_batch(inner, batch)
    pixels = batch.get("pixel_values")       # none in the tiny base's text-only stage 0
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 pixel_values=None if pixels is None else pixels.to(inner.dtype),
                 labels=batch["labels"]).loss


class NaNLoss(ValueError):
    """A loss that is not a finite number: the run stops (see StageCheckpoint.step)."""


def train_step(model, batches, optimizer, schedule, max_grad_norm=1.0, penalty=None):
    """One optimizer step on the answer loss averaged over the micro-batches (a list of collated
    batches: gradient accumulation), plus penalty() where a method adds one (EWC, O-LoRA).
    Returns the loss."""
    total = 0.0
    for i, batch in enumerate(batches):
        with gradient_sync(model, i == len(batches) - 1):   # under torchrun: once, at the last
            loss = answer_loss(model, batch) + (penalty() if penalty is not None else 0)
            (loss / len(batches)).backward()          # the gradient of the micro-batches' mean
        total += loss.item() / len(batches)
    if not all(gathered(math.isfinite(total))):      # under torchrun: all ranks stop together
        raise NaNLoss(f"the loss became {total}")
    with uninterrupted():                             # a step is taken whole or not at all
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    return total


def train_stage(model, processor, records, cfg, stage, name, out, penalty=None, progress=True):
    """Tune the adapters on one stage's records (stage `name`, 1-based `stage`) in optimizer steps
    of cfg.grad_accum micro-batches of cfg.batch_size (on each rank, under torchrun)."""
    rank, ranks = rank_and_world()
    size, per_step = cfg.batch_size, cfg.grad_accum * ranks          # micro-batches a step
    steps = max(1, math.ceil(cfg.epochs * len(records) / (size * per_step)))  # optimizer steps
    # the micro-batches, reshuffled each pass, drawn from the seed alone: a resumed run draws them
    generator = torch.Generator().manual_seed(cfg.seed + stage)
    passes = math.ceil(steps * per_step * size / len(records))
    order = torch.cat([torch.randperm(len(records), generator=generator) for _ in range(passes)])
    order = order.tolist()
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in model.named_parameters()
                     if p.requires_grad and ("multi_modal_projector" in n) == projector],
          "lr": cfg.lr * (PROJECTOR_LR_FACTOR if projector else 1)} for projector in (False, True)],
        weight_decay=cfg.weight_decay)
    schedule = cosine_with_warmup(optimizer, steps)
    torch.manual_seed(cfg.seed + stage)             # adapter dropout: the same draws on every run
    checkpoint = StageCheckpoint(out, stage, model, optimizer, schedule)
    first_step = checkpoint.resume() if cfg.resume else 0
    collate, trainee = data.Collator(processor, train=True), data_parallel(model)
    model.train()
    with tqdm(range(first_step, steps), desc=f"stage {stage}: tuning on {name}", initial=first_step,
              total=steps, disable=not progress) as bar:
        for step in bar:
            with checkpoint.step(step):             # Ctrl-C keeps the steps done; NaN stops the run
                mine = range(step * per_step + rank, (step + 1) * per_step, ranks)  # rank r: r-th
                micro_batches = [collate([records[i] for i in order[m * size:(m + 1) * size]])
                                 for m in mine]
                loss = train_step(trainee, micro_batches, optimizer, schedule, penalty=penalty)
            bar.set_postfix(loss=f"{loss:.3f}")
            checkpoint.now_and_then(step + 1, steps)
    model.eval()


# ----------------------------------------------------------------------------------------------
# 4. The methods: what each does beyond tuning its adapter on the tasks in order. A Method names an
#    adapter and up to six hooks, each a function of the run's context (RunContext) and the stage;
#    METHODS has a row per method.

def replay_memory(records, task, ratio, seed):
    """replay: what is kept of a task once learned, a fixed random round(ratio * n) records."""
    return random.Random(f"{seed}/memory/{task}").sample(records, round(ratio * len(records)))


def replay_mix(train, tasks, stage, ratio, seed):
    """replay: stage t's records, task t's n_t plus round(ratio * n_t) drawn as evenly as the count
    allows from the memories of the tasks before it (none at stage 1). Seeded: a resumed run draws
    the same."""
    records, earlier = list(train[tasks[stage - 1]]), tasks[:stage - 1]
    wanted, rng = round(ratio * len(records)), random.Random(f"{seed}/replay/{stage}")
    replayed = []
    for j, task in enumerate(earlier):
        memory = replay_memory(train[task], task, ratio, seed)
        share = wanted // len(earlier) + (j < wanted % len(earlier))
        replayed += rng.sample(memory, min(len(memory), share))
    return records + replayed


EWC_SAMPLES = 64   # ewc: the training samples of a task its Fisher is averaged over (ours: not all)


def diagonal_fisher(model, processor, records):
    """ewc: F_k = (1/n) sum_s (d loss_s / d theta_k)^2 over the trainable (adapter) parameters: the
    empirical Fisher, one sample at a time, on the answer loss of the n records."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    fisher = {name: torch.zeros_like(p) for name, p in params.items()}
    collate = data.Collator(processor, train=True)
    model.eval()                                   # no adapter dropout
    for record in records:
        grads = torch.autograd.grad(answer_loss(model, collate([record])), list(params.values()))
        for name, g in zip(params, grads):
            fisher[name] += g ** 2 / len(records)
    return fisher


def consolidate(model, processor, records, seed, earlier=None):
    """ewc after a task: (F, theta*), F plus the task's diagonal Fisher on EWC_SAMPLES seeded draws
    of its records, theta* the parameters just learned (online EWC, Schwarz et al. 2018: one penalty
    for all earlier tasks). `earlier`: the (F, theta*) of the tasks before it, or None."""
    sample = random.Random(f"{seed}/fisher").sample(records, min(EWC_SAMPLES, len(records)))
    fisher = diagonal_fisher(model, processor, sample)
    if earlier is not None:
        fisher = {name: f + earlier[0][name] for name, f in fisher.items()}
    anchor = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    return fisher, anchor


def ewc_penalty(model, fisher, anchor, lam):
    """ewc (Kirkpatrick et al. 2017): (lambda/2) sum_k F_k (theta_k - theta*_k)^2, the adapters'."""
    return lam / 2 * sum((fisher[name] * (p - anchor[name]) ** 2).sum()
                         for name, p in model.named_parameters() if name in fisher)


def orthogonality_penalty(model, lam=1.0):
    """olora: lambda * L_orth summed over the adapted layers."""
    return lam * sum(m.orthogonality() for m in model.modules() if isinstance(m, OLoRALinear))


# The hooks. The defaults are SeqLoRA's: one stage per task, tuned on that task's records.

def one_stage_per_task(tasks):
    return list(tasks)


def task_records(ctx, stage):
    return ctx.train[ctx.tasks[stage - 1]]


def nothing(ctx, stage=None):
    """A hook where the method does nothing beyond SeqLoRA; as `begin`: no penalty."""


def no_stages(tasks):
    """zeroshot: the base model is evaluated, never tuned."""
    return []


def one_mixed_stage(tasks):
    """multitask: one stage on every task's records; train_stage's shuffle mixes them."""
    return ["all tasks mixed"]


def all_tasks_records(ctx, stage):
    return [r for task in ctx.tasks for r in ctx.train[task]]


def fresh_lora(ctx, stage):
    """dirlora: each task starts from the LoRA as initialised."""
    load_adapter_state_dict(ctx.model, ctx.fresh)


def own_lora(ctx, stage, i):
    """dirlora: a task already trained is answered with its own LoRA, saved after its stage."""
    if i + 1 < stage:
        return safetensors.torch.load_file(ctx.out / "adapters" / f"stage{i + 1}.safetensors")


def replay_records(ctx, stage):
    return replay_mix(ctx.train, ctx.tasks, stage, ctx.cfg.replay_ratio, ctx.cfg.seed)


def ewc_begin(ctx, stage):
    """ewc: from the second task, the penalty anchored at what the earlier tasks learned."""
    if ctx.ewc is not None:
        fisher, anchor = ctx.ewc
        return partial(ewc_penalty, ctx.model, fisher, anchor, ctx.cfg.ewc_lambda)


def ewc_end(ctx, stage):
    """ewc: F and theta* for the tasks to come (recomputed when a run resumes)."""
    if stage < len(ctx.tasks):
        records = ctx.train[ctx.tasks[stage - 1]]
        ctx.ewc = consolidate(ctx.model, ctx.processor, records, ctx.cfg.seed, ctx.ewc)


def olora_begin(ctx, stage):
    """olora: from the second task, freeze the LoRA just tuned, start a new one, orthogonal."""
    if stage > 1:
        torch.manual_seed(ctx.cfg.seed + stage)                 # the new A's draws, also on resume
        for module in ctx.model.modules():
            if isinstance(module, OLoRALinear):
                module.start_new_lora(stage - 1)
        return partial(orthogonality_penalty, ctx.model, ctx.cfg.olora_lambda)


def routing_report(ctx):
    """smolora: which tasks share experts, and so each other's updates (routing.md, routing.png)."""
    picks = {task: routing_picks(ctx.model, ctx.processor, ctx.test[task], ctx.cfg.batch_size)
             for task in ctx.tasks + ctx.cfg.unseen}
    oracle = ", IF routed by task (oracle)" if ctx.cfg.if_routing == "task" else ""
    if is_main():
        eval.write_routing(ctx.out, ctx.cfg.method + oracle, picks, ctx.cfg.experts // 2)


@dataclass(frozen=True)
class Method:
    """A method of the papers' tables: the adapter it tunes, and what `run` does for it."""
    adapter: str | None                  # the adapter it tunes (ADAPTERS); None: nothing is tuned
    notes: str
    stages: Callable = one_stage_per_task   # tasks -> the name of each stage
    records: Callable = task_records        # (ctx, stage) -> the records the stage tunes on
    begin: Callable = nothing               # (ctx, stage) before tuning -> its penalty() or None
    end: Callable = nothing                 # (ctx, stage) after tuning, also when resumed from file
    answer_with: Callable | None = None     # (ctx, stage, i) -> adapters task i is answered with
    report: Callable = nothing              # (ctx) after the last stage


METHODS = {
    "zeroshot": Method(None, "the base model, not tuned", stages=no_stages),
    "multitask": Method("lora", "one LoRA tuned on all tasks mixed, in one stage: the upper bound, "
                        "not continual", stages=one_mixed_stage, records=all_tasks_records),
    "dirlora": Method("lora", "a fresh LoRA per task, each task answered by its own: needs the "
                      "task identity at test", begin=fresh_lora, answer_with=own_lora),
    "lora": Method("lora", "SeqLoRA: one LoRA tuned through the tasks in order"),
    "replay": Method("lora", "SeqLoRA with a memory of earlier tasks' training samples mixed into "
                     "each later task", records=replay_records),
    "ewc": Method("lora", "SeqLoRA with the EWC penalty (lambda/2) sum F (theta - theta*)^2",
                  begin=ewc_begin, end=ewc_end),
    "olora": Method("olora", "O-LoRA: a new LoRA per task, earlier ones frozen, the new A "
                    "orthogonal to theirs", begin=olora_begin),
    "dora": Method("dora", "DoRA: one weight-decomposed LoRA (magnitude and direction) tuned "
                   "through the tasks"),
    "moelora": Method("moelora", "CoIN's MoELoRA: a dense mixture of LoRA experts tuned through "
                      "the tasks"),
    "smolora": Method("smolora", "SMoLoRA: separable visual / instruction expert pools, routed per "
                      "sample", report=routing_report),
}


# ----------------------------------------------------------------------------------------------
# 5. The continual run. Config holds every knob of a run with its default, written here once; the
#    command line is made from it (field batch_size is flag --batch-size). Then `run`: the protocol.

CACHE = Path(os.environ.get("SMOLORA_CACHE", Path.home() / ".cache" / "smolora"))


def knob(default=MISSING, help="", **flag):
    """A Config field: its default and what --help says of it. flag: argparse's choices or action,
    and `owner`, the one method whose runs the knob belongs to (None in the others')."""
    if isinstance(default, (list, dict)):
        return field(default_factory=type(default), metadata=dict(help=help, **flag))
    return field(default=default, metadata=dict(help=help, **flag))


@dataclass(kw_only=True)
class Config:
    """A run's configuration. The defaults suit the tiny model; Config.paper(...) gives each paper's
    recipe for a real LLaVA checkpoint. Checked when made: a bad value raises a one-line error."""
    method: str = knob("smolora", f"{' | '.join(METHODS)}; on the command line several "
                       "(comma-separated) or 'all': each run in <out>/<method>, compared in <out>")
    tasks: list = knob(help="task names in training order, or coin (CoIN's 8) or smolora")
    model: str | None = knob(None, "a LLaVA checkpoint folder or id (default: the tiny model, "
                             "built once)")
    data: str | None = knob(None, "a CoIN-format data root (default: the synthetic mini-CoIN, made "
                            "once)")
    out: str | None = knob(None, "the run folder (default: runs/<method>-<tasks>, or "
                           "runs/compare-<tasks>)")
    resume: bool = knob(False, "continue the run in --out from where it stopped")
    cache: str = knob(str(CACHE), "the tiny model's and synthetic data's folder ($SMOLORA_CACHE)")
    seed: int = knob(0, "seed of adapter init, data order and dropout")
    # ours, by a rule on learning alone (README, tests/rank_rule.py): no r met it; 32 came nearest
    r: int = knob(32, "total adapter rank (olora: shared by the tasks, r/T each)")
    alpha: float = knob(64, "LoRA alpha: the scale is alpha / r (2, as the papers')")
    dropout: float = knob(0.05, "on every adapter's input (the papers' MoE value, LLaVA's LoRA "
                          "scripts'); 0 under torchrun gives the run of one process")
    experts: int = knob(8, "number of experts (MoELoRA, SMoLoRA)")
    lr: float = knob(5e-3, "the LLM adapters' learning rate (the projector's x0.2)")
    batch_size: int = knob(32, "the micro-batch one process computes at once, in training and "
                           "evaluation (per rank under torchrun: an optimizer step sees "
                           "batch-size x grad-accum x ranks records)")
    grad_accum: int = knob(1, "micro-batches per optimizer step")
    epochs: float = knob(8, "passes over each task's training records")
    weight_decay: float = knob(0.0, "AdamW's")
    top_k: int = knob(1, "experts kept per pool by SMoLoRA's routers (paper: 1)")
    layers: str = knob("own", "the linears adapted: the method's own, or SMoLoRA's (the LLM's MLP "
                       "and the projector) for any method, to compare at equal layers",
                       choices=("own", "smolora"))
    max_train: int | None = knob(None, "use at most this many training records per task")
    max_test: int | None = knob(None, "evaluate on at most this many test records per task")
    replay_ratio: float | None = knob(0.1, "replay: memory samples per own record (ours)",
                                      owner="replay")
    ewc_lambda: float | None = knob(5000.0, "ewc: weight of the EWC penalty (ours: about the "
                                    "loss's size once the next task moves the adapters)",
                                    owner="ewc")
    olora_lambda: float | None = knob(0.5, "olora: weight of the orthogonality loss (the official "
                                      "lamda_1; its L2 term, 0, left out)", owner="olora")
    unseen: list = knob([], "comma-separated tasks never trained, evaluated after every stage "
                        "(not in AP)")
    instructions: str = knob("default", "diverse: evaluate with paraphrased instructions never "
                             "trained on", choices=("default", "diverse"))
    train_instructions: str = knob("default", "paraphrased: train on 5 paraphrased instructions "
                                   "per task, none of them --instructions diverse's (SMoLoRA's "
                                   "multi-type setting)", choices=("default", "paraphrased"))
    fewshot: dict = knob({}, "TASK:K[,K...]: after the last stage, tune K examples per class of a "
                         "task, from the final adapters and from fresh ones, at least 20 steps; "
                         "evaluate it apart", action="append")
    smolora_parts: str | None = knob("vu,if,fusion", "SMoLoRA's ablation: vu | if | vu,if | "
                                     "vu,if,fusion (the paper's)", owner="smolora")
    if_routing: str | None = knob("sample", "SMoLoRA's IF router reads the sample's own "
                                  "instruction or its task's canonical one (an oracle of the task)",
                                  choices=("sample", "task"), owner="smolora")
    ins_encoder: str | None = knob(None, "SMoLoRA: embed instructions with this sentence encoder "
                                   "folder, mean-pooled", owner="smolora")
    device: str = knob("cuda" if torch.cuda.is_available() else "cpu", "cpu, cuda or cuda:N")
    dtype: str | None = knob(None, "the base's (default bfloat16 on cuda, float32 on cpu)",
                             choices=("float32", "bfloat16", "float16"))
    grad_checkpointing: bool = knob(False, "recompute activations to save memory")

    @classmethod
    def paper(cls, method="smolora", **knobs):
        """The paper's recipe of `method` for a real checkpoint (SMOLORA_PAPER or PAPER), changed
        by `knobs`."""
        return cls(method=method, **{**(SMOLORA_PAPER if method == "smolora" else PAPER), **knobs})

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"--method {self.method!r} is not allowed: choose one of "
                             f"{', '.join(METHODS)}")
        self.tasks = parse_names(self.tasks, "--tasks", data.TASKS, TASK_LISTS)
        if self.unseen:
            self.unseen = parse_names(self.unseen, "--unseen", data.TASKS, TASK_LISTS)
        if set(self.unseen) & set(self.tasks):
            raise ValueError(f"--unseen {','.join(self.unseen)!r} is not allowed: unseen tasks "
                             f"must not be among --tasks")
        self.dtype = self.dtype or ("bfloat16" if self.device.startswith("cuda") else "float32")
        check_device(self.device, self.dtype)
        if self.out and Path(self.out).exists() and not Path(self.out).is_dir():
            raise ValueError(f"--out {self.out} is not allowed: it is a file; give a folder")
        for knob_ in fields(self):
            name, value, owner = knob_.name, getattr(self, knob_.name), knob_.metadata.get("owner")
            flag, choices = "--" + name.replace("_", "-"), knob_.metadata.get("choices")
            least = "0 or more" if name in ("weight_decay", "dropout") else "positive"
            if type(value) in (int, float) and name != "seed" and (value < 0 or value == 0 and
                                                                   least == "positive"):
                raise ValueError(f"{flag} {value} is not allowed: it must be {least}")
            if choices and value is not None and value not in choices:
                raise ValueError(f"{flag} {value!r} is not allowed: choose {' or '.join(choices)}")
            if owner not in (None, self.method):     # a method's own knob: None in the others' runs
                if value not in (None, knob_.default):
                    raise ValueError(f"{flag} {value!r} is not allowed with --method "
                                     f"{self.method!r}: it is {owner}'s")
                setattr(self, name, None)
        if self.dropout >= 1:
            raise ValueError(f"--dropout {self.dropout} is not allowed: it must be below 1")
        if self.replay_ratio is not None and self.replay_ratio > 1:
            raise ValueError(f"--replay-ratio {self.replay_ratio} is not allowed: it must be in "
                             f"(0, 1]")
        if self.method == "smolora":
            SMoLoRALinear.check(self.smolora_parts.split(","), self.experts, self.top_k)
        if isinstance(self.fewshot, dict):   # as the command line gives it: TASK:K[,K...] specs
            self.fewshot = [f"{task}:{','.join(map(str, ks))}" for task, ks in self.fewshot.items()]
        self.fewshot = parse_fewshot(self.fewshot)
        self.data = str(Path(self.data).resolve()) if self.data else None
        if self.out is None:          # a variant gets a folder of its own
            parts = self.smolora_parts
            variant = [parts != "vu,if,fusion" and parts.replace(",", "+"),
                       self.if_routing == "task" and "task-routing",
                       self.ins_encoder and "encoder"] if self.method == "smolora" else []
            layers = self.layers != "own" and f"{self.layers}-layers"
            wording = self.train_instructions != "default" and self.train_instructions
            name = [self.method, *filter(None, [*variant, layers, wording]), *self.tasks]
            self.out = f"runs/{'-'.join(name)}"


# Each paper's recipe for a real checkpoint (Config.paper): SMoLoRA's lr 1e-4 and weight decay
# 0.01, CoIN's lr 2e-4, both at SMoLoRA's global batch of 64, 8 x 8 accumulated (ours for CoIN's
# methods: its 8 GPUs x 6-16 x 8 is 384-1024, a handful of steps on a few thousand records).
# Config's own defaults are the tiny model's: a rank and a learning rate in proportion to its width
# (128 against 4096) and epochs enough for it to learn a task.
PAPER = dict(r=128, alpha=256, lr=2e-4, batch_size=8, grad_accum=8, epochs=1)
SMOLORA_PAPER = dict(PAPER, lr=1e-4, weight_decay=0.01)


def run(cfg, progress=True):
    """Tune cfg.method on cfg.tasks in order; return the results, as results.json holds them.
    The protocol: the zero-shot row; for each stage, the method's begin, tuning, its end, and every
    task evaluated; after the last stage, the method's report, then each few-shot tuning of an
    unseen task, from the final adapters, evaluated apart."""
    ctx = open_run(cfg, progress)          # the run folder, the model, every task's records
    method, stages = METHODS[cfg.method], ctx.results["stages"]
    evaluate_stage(ctx, 0)
    if stages:
        torch.manual_seed(cfg.seed)                     # the adapters' initialisation
        targets = None if cfg.layers == "own" else TARGETS[cfg.layers]
        add_adapters(ctx.model, method.adapter, targets, **adapter_hparams(cfg, ctx.ins_dim))
    ctx.fresh = adapter_state_dict(ctx.model)
    for stage, name in enumerate(stages, 1):
        saved = ctx.out / "adapters" / f"stage{stage}.safetensors"
        if not load_if_resuming(ctx, saved):
            penalty = method.begin(ctx, stage)
            tune(ctx, saved, stage, name, method.records(ctx, stage), penalty)
        method.end(ctx, stage)
        evaluate_stage(ctx, stage)
    if stages:
        method.report(ctx)
        final = adapter_state_dict(ctx.model)
        # each k from the final adapters, then from fresh ones: what tuning gains from the tasks
        # learned before (for a trained task, its savings: the knowledge kept where the score went)
        shots = [(task, k, start) for start in ("final", "fresh")
                 for task, ks in cfg.fewshot.items() for k in ks]
        for stage, (task, k, start) in enumerate(shots, len(stages) + 1):
            load_adapter_state_dict(ctx.model, final if start == "final" else ctx.fresh)
            name = f"{k}" + ("-fresh" if start == "fresh" else "")
            saved = ctx.out / "adapters" / f"fewshot-{task}-{name}.safetensors"
            if not load_if_resuming(ctx, saved):
                records = data.fewshot_records(ctx.train[task], k, cfg.seed, task)
                tune(ctx, saved, stage, f"{task}, {k} shots, from {start} adapters", records,
                     cfg=replace(cfg, epochs=fewshot_epochs(len(records), cfg)))
            path = ctx.out / "predictions" / f"fewshot-{name}" / f"{task}.jsonl"
            score, mif = evaluate(ctx, task, path)
            row = ctx.results.setdefault("fewshot", {}).setdefault(task, {}).setdefault(str(k), {})
            row |= dict(score=score, mif=mif) if start == "final" else dict(
                fresh_score=score, fresh_mif=mif,
                majority=eval.majority_score(task, [r["answer"] for r in ctx.test[task]]))
            save_results(ctx, f"{task} after {k}-shot tuning from {start} adapters")
    return json.loads((ctx.out / "results.json").read_text())


FEWSHOT_STEPS = 20   # ours: the paper's 1 epoch on 365 classes x k is many steps; on our 5 classes
                     # it would be 1 or 2, so few-shot tuning takes the epochs 20 steps need


def fewshot_epochs(n_records, cfg):
    """The fewest whole epochs over n_records that make FEWSHOT_STEPS optimizer steps: train_stage
    takes ceil(e n / b) steps (the epochs' records back to back, b a step), >= S when e n / b > S - 1."""
    per_step = cfg.batch_size * cfg.grad_accum * rank_and_world()[1]
    return (FEWSHOT_STEPS - 1) * per_step // n_records + 1


@dataclass
class RunContext:
    """What the protocol and the methods' hooks share."""
    cfg: Config
    model: nn.Module
    processor: object
    train: dict                   # task -> its training records
    test: dict                    # task -> its test records: the tasks, the unseen, the few-shot
    out: Path                     # the run folder
    results: dict                 # what results.json holds, filled in as the run goes
    progress: bool = True
    ins_dim: int | None = None    # f(X_ins)'s width where a sentence encoder gives it
    fresh: dict | None = None     # the adapters as initialised
    ewc: tuple | None = None      # ewc: (F, theta*) of the tasks learned so far
    seconds_before: float = 0.0   # a resumed run's time so far
    started: float = field(default_factory=time.time)

    @property
    def tasks(self):
        return self.cfg.tasks


def adapter_hparams(cfg, ins_dim=None):
    """The run's knobs that its method's adapter class takes, by the class's signature."""
    knobs = dict(r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, num_experts=cfg.experts,
                 top_k=cfg.top_k, num_tasks=len(cfg.tasks), ins_dim=ins_dim,
                 parts=cfg.smolora_parts and tuple(cfg.smolora_parts.split(",")))
    takes = inspect.signature(ADAPTERS[METHODS[cfg.method].adapter]).parameters
    return {k: v for k, v in knobs.items() if k in takes and v is not None}


def tune(ctx, saved, stage, name, records, penalty=None, cfg=None):
    """Tune the adapters on `records` as stage `stage` (named `name`), then save them to `saved`."""
    train_stage(ctx.model, ctx.processor, records, cfg or ctx.cfg, stage, name, ctx.out, penalty,
                ctx.progress)
    save_adapters(ctx.model, saved, ctx.out)


def evaluate_stage(ctx, stage):
    """Row `stage` of the matrices: every task and unseen task evaluated, each answered with the
    adapters its method answers it with; then the report is rewritten."""
    answer_with = METHODS[ctx.cfg.method].answer_with
    latest = adapter_state_dict(ctx.model) if answer_with and stage else None
    for i, task in enumerate(ctx.tasks + ctx.cfg.unseen):
        if latest is not None:
            load_adapter_state_dict(ctx.model, answer_with(ctx, stage, i) or latest)
        table, column = ((ctx.results, i) if i < len(ctx.tasks)
                         else (ctx.results["unseen"], i - len(ctx.tasks)))
        path = ctx.out / "predictions" / f"stage{stage}" / f"{task}.jsonl"
        table["matrix"][stage][column], table["mif"][stage][column] = evaluate(ctx, task, path)
    save_results(ctx, f"after stage {stage} of {len(ctx.results['stages'])}")


def evaluate(ctx, task, path):
    """(score, MIF) of the model on a task's test records; the predictions are saved to `path`, and
    reused when resuming."""
    if ctx.cfg.resume and path.exists():
        predictions = eval.load_predictions(path)
    else:
        generate = partial(eval.generate_predictions, ctx.model, ctx.processor, task=task,
                           batch_size=ctx.cfg.batch_size, desc=f"evaluating {task}",
                           before_generate=partial(route_batch, ctx.model), progress=ctx.progress)
        predictions = sharded(generate, ctx.test[task], ctx.cfg.batch_size)   # over the ranks
        if is_main():
            eval.save_predictions(path, predictions)
    return eval.score_predictions(task, predictions)


def save_results(ctx, title):
    """results.json, matrix.md and matrix.png as they stand; the matrices printed under `title`."""
    ctx.results["seconds"] = ctx.seconds_before + time.time() - ctx.started
    if is_main():
        eval.write_report(ctx.out, ctx.results)
    barrier()                         # under torchrun: every rank then reads the report written
    if ctx.progress:
        print(f"\n{title}:\n" + (ctx.out / "matrix.md").read_text())


def open_run(cfg, progress=True):
    """The run's context: its folder, the model, each task's records with the f(X_ins) they route
    on, and the results to fill in."""
    start_ranks(cfg)                          # under torchrun; else nothing
    started, progress = time.time(), progress and is_main()
    encoder = load_encoder(cfg.ins_encoder) if cfg.ins_encoder else None
    out = prepare_out(cfg)
    model_path = cfg.model or main_rank_first(ensure_tiny_model, cfg.cache, progress)
    data_root = cfg.data or main_rank_first(ensure_synthetic, cfg, progress)
    model, processor = load_model(model_path, cfg.device, getattr(torch, cfg.dtype))
    if cfg.grad_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    embed = partial(embed_instructions, model, processor, encoder=encoder)
    fewshot = list(cfg.fewshot)
    train = {t: load_task(data_root, t, "train", cfg.max_train, cfg, embed, cfg.train_instructions)
             for t in cfg.tasks + fewshot}
    test = {t: load_task(data_root, t, "test", cfg.max_test, cfg, embed, cfg.instructions)
            for t in dict.fromkeys(cfg.tasks + cfg.unseen + fewshot)}
    stages = METHODS[cfg.method].stages(cfg.tasks)
    parts = cfg.smolora_parts
    notes = [METHODS[cfg.method].notes,   # and SMoLoRA's knobs where they leave the paper's method
             parts not in (None, "vu,if,fusion") and f"ablation: parts {parts}",
             cfg.if_routing == "task" and "the IF router reads one vector per task, by its "
                                          "identity (an oracle, as officially)",
             cfg.ins_encoder and f"f(X_ins) by the sentence encoder {cfg.ins_encoder}",
             cfg.train_instructions == "paraphrased" and "trained on 5 paraphrased instructions "
                                                         "per task (multi-type)",
             cfg.layers != "own" and f"adapters on {cfg.layers}'s linears"]
    results = {"method": cfg.method, **empty_tables(cfg.tasks, stages), "config": asdict(cfg),
               "stages": stages, "notes": "; ".join(filter(None, notes)), "seconds": None,
               **({"unseen": empty_tables(cfg.unseen, stages)} if cfg.unseen else {})}
    saved = out / "results.json"
    resumed = cfg.resume and saved.exists()
    seconds_before = resumed and json.loads(saved.read_text()).get("seconds") or 0
    return RunContext(cfg, model, processor, train, test, out, results, progress,
                      ins_dim=encoder and encoder[0].config.hidden_size,
                      seconds_before=seconds_before, started=started)


def load_task(data_root, task, split, limit, cfg, embed, instructions="default"):
    """The first `limit` records of a task's split, with the f(X_ins) their IF router reads."""
    records = data.load_records(data_root, task, split, instructions)[:limit]
    return with_instruction_embeddings(records, task, cfg, embed)


def empty_tables(columns, stages):
    """The score and MIF matrices of a run, empty: the zero-shot row, then one per stage."""
    empty = [[None] * len(columns) for _ in range(len(stages) + 1)]
    return {"tasks": list(columns), "matrix": empty, "mif": [list(row) for row in empty]}


# ==============================================================================================
# Part B. Running it: the tiny base model, the run folder and its checkpoints, the command line.
# ==============================================================================================

# ----------------------------------------------------------------------------------------------
# 6. Models and data. Any LLaVA checkpoint folder loads through `load_model`. The tiny default model
#    is built, pretrained as the papers' base was (a language model that knows the scenes and
#    answers in free sentences, then the vision side aligned to it; no task's format) and saved as
#    an ordinary checkpoint folder in the cache, once; so is the synthetic mini-CoIN.

TINY_MODEL = "tiny-llava-v4"                # bump when the recipe below changes: old caches unused
SYNTHETIC = dict(n_train=1000, n_test=200)  # records per task of the synthetic mini-CoIN


def build_tiny_model(processor):
    """A 1M-parameter LlavaForConditionalGeneration: CLIP 3 layers x 128 on 64x64 images in patches
    of 16 (16 image tokens), a Llama of 2 layers x 128, the tokenizer's vocabulary."""
    tokenizer = processor.tokenizer
    vision = CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=3,
                              num_attention_heads=4, image_size=data.IMAGE_SIZE,
                              patch_size=data.PATCH)
    text = LlamaConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, vocab_size=len(tokenizer),
                       max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       tie_word_embeddings=True)
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    return LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text,
                                                     vision_feature_layer=-1,
                                                     image_token_index=image_token))


def pretrain_tiny_model(path, seed=0, progress=True, steps=(500, 900), batch_size=32, lr=1e-3,
                        pool=8, stage1_trains_llm=False):
    """Build the tiny model, pretrain it in two stages as the papers' base was made, and save it to
    `path`. Stage 0, Vicuna's analog: the language model alone, as a text model that knows the
    scenes and answers questions about them in free sentences (data.base_corpus). Stage 1, the
    analog of CLIP and LLaVA-1.5's stage 1: the vision tower and the projector, the language model
    frozen, so that what it knows stays as stage 0 left it. Every batch is a fresh draw of scenes:
    the model learns to read and locate, not to memorise. ours: stage 1 asks stage 0's questions
    about the images too, where LLaVA's has captions alone: with no pretrained CLIP the vision tower
    learns here from scratch, and on captions alone the base answered both of two questions about
    one image on 33% to 86% of images in two builds (88% so, at 450 steps). Stage 1 is as long as
    the default command's budget allows (README): the vision side is what it trains from scratch.
    stage1_trains_llm: the language model trains in stage 1 too (tests/locating.py's experiment)."""
    torch.manual_seed(seed)
    processor = data.build_processor()
    model, collate = build_tiny_model(processor), data.Collator(processor, train=True)
    vision = torch.nn.ModuleList([model.model.vision_tower, model.model.multi_modal_projector])
    parts = (model.model.language_model, model if stage1_trains_llm else vision)
    model.train()
    for stage, (part, count) in enumerate(zip(parts, steps)):
        model.requires_grad_(False)
        part.requires_grad_(True)
        optimizer = torch.optim.AdamW(part.parameters(), lr=lr, weight_decay=0.0)
        schedule = cosine_with_warmup(optimizer, count)
        what = ("the language model, on text" if stage == 0 else
                "the whole model, on images" if stage1_trains_llm else "the vision side, on images")
        bar = tqdm(range(count), desc=f"pretraining the tiny base, stage {stage}: {what}",
                   disable=not progress)
        for step in bar:
            if step % pool == 0:
                corpus = data.base_corpus(batch_size * pool, f"{seed}/{step}", stage)
                batches = data.corpus_batches(corpus, batch_size, f"{seed}/{step}")
            loss = train_step(model, [collate(batches[step % pool])], optimizer, schedule)
            bar.set_postfix(loss=f"{loss:.3f}")
    save_checkpoint(model.eval(), processor, path)
    return path


def ensure_tiny_model(cache, progress=True):
    path = Path(cache) / TINY_MODEL
    if not (path / "config.json").exists():
        print(f"building the tiny base model in {path} (once)")
        pretrain_tiny_model(path, progress=progress)
    return path


def ensure_synthetic(cfg, progress=True):
    """The synthetic mini-CoIN's folder in the cache, holding every task the run names."""
    root = Path(cfg.cache) / "data-v1"
    names = list(dict.fromkeys(cfg.tasks + cfg.unseen + list(cfg.fewshot)))
    data.make_synthetic(root, names, seed=0, progress=progress, **SYNTHETIC)
    return root


def save_checkpoint(model, processor, path):
    path = Path(path)
    temporary = path.with_name(f".tmp-{path.name}")
    shutil.rmtree(temporary, ignore_errors=True)
    model.save_pretrained(temporary)
    processor.save_pretrained(temporary)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(temporary, path)


def load_model(name_or_path, device="cpu", dtype=torch.float32):
    """(model, processor) of a LLaVA checkpoint folder or hub id, as transformers loads any."""
    try:
        model = LlavaForConditionalGeneration.from_pretrained(name_or_path, dtype=dtype)
        processor = AutoProcessor.from_pretrained(name_or_path)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"--model {name_or_path} is not a LLaVA checkpoint (a folder saved by "
                         f"LlavaForConditionalGeneration): {str(e).splitlines()[0]}") from None
    return model.to(device).eval(), processor


# ----------------------------------------------------------------------------------------------
# 7. The run folder and its checkpoints: --resume continues an interrupted run to the same bits;
#    Ctrl-C keeps the steps taken; a NaN loss stops the run and keeps the last good checkpoint.

# where and how a run computes, not what: the only knobs that may differ for --resume, or for a
# rerun to replace a run
RUN_PLACE = ("out", "resume", "cache", "device", "dtype", "grad_checkpointing")
CHECKPOINT_SECONDS = 300    # a mid-stage checkpoint at most this often


def prepare_out(cfg):
    """Refuse an --out folder that holds another run; clear this run's own files unless resuming."""
    out = Path(cfg.out)
    saved, config = out / "results.json", asdict(cfg)
    old = json.loads(saved.read_text()).get("config") or {} if saved.exists() else config
    # a knob the saved run lacks came after it: that run had the knob's default
    old = {**{f.name: None if f.metadata.get("owner") not in (None, cfg.method) else f.default
              for f in fields(cfg) if f.default is not MISSING}, **old}
    differs = [k for k in config if k not in RUN_PLACE and old.get(k) != config[k]]
    if differs:
        raise ValueError(f"--out {out} holds a different run "
                         f"({', '.join(f'{k}={old.get(k)!r}' for k in differs)}); choose another "
                         f"--out or delete that folder")
    if is_main():
        if not cfg.resume:
            for stale in ("adapters", "predictions", "checkpoint.pt"):
                path = out / stale
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
    barrier()
    return out


def load_if_resuming(ctx, saved):
    """When resuming, load the adapters a stage already tuned and saved; True if so."""
    if ctx.cfg.resume and saved.exists():
        load_adapter_state_dict(ctx.model, safetensors.torch.load_file(saved))
        return True
    return False


def save_adapters(model, saved, out):
    """A stage's adapters, atomically; its mid-stage checkpoint is then of no more use."""
    if is_main():
        saved.parent.mkdir(exist_ok=True)
        eval.write_atomic(saved, safetensors.torch.save(adapter_state_dict(model)))
        (out / "checkpoint.pt").unlink(missing_ok=True)
    barrier()


class StageCheckpoint:
    """checkpoint.pt in the run folder: a stage's adapters, optimizer, schedule and every rank's RNG
    after a number of steps, written every CHECKPOINT_SECONDS and, by one process, on Ctrl-C."""

    def __init__(self, out, stage, model, optimizer, schedule):
        self.path, self.stage, self.model = out / "checkpoint.pt", stage, model
        self.optimizer, self.schedule, self.saved_at = optimizer, schedule, time.time()

    def resume(self):
        """The step to start from: the saved step if the checkpoint is this stage's, its state
        loaded; else 0."""
        if not self.path.exists():
            return 0
        try:   # tensors, numbers and dicts only: a checkpoint.pt from elsewhere runs no code
            state = torch.load(self.path, weights_only=True)
        except pickle.UnpicklingError:
            raise ValueError(f"{self.path} holds more than tensors, numbers and dicts and is "
                             f"refused (loading it could run code); delete it to redo stage "
                             f"{self.stage} from its start") from None
        if state["stage"] != self.stage:
            return 0
        rank, ranks = rank_and_world()
        if len(state["rng"]) != ranks:
            raise ValueError(f"{self.path} was saved by {len(state['rng'])} rank(s), this run has "
                             f"{ranks}: resume with as many, or delete it to redo stage "
                             f"{self.stage} from its start")
        load_adapter_state_dict(self.model, state["adapters"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["rng"][rank])
        return state["step"]

    def save(self, done):
        rngs = gathered(torch.get_rng_state())       # each rank draws its own dropout masks
        if is_main():
            state = {"stage": self.stage, "step": done, "adapters": adapter_state_dict(self.model),
                     "rng": rngs, "optimizer": self.optimizer.state_dict(),
                     "schedule": self.schedule.state_dict()}
            buffer = io.BytesIO()
            torch.save(state, buffer)
            eval.write_atomic(self.path, buffer.getvalue())

    def now_and_then(self, done, steps):
        """Save after `done` steps if CHECKPOINT_SECONDS have passed (on rank 0's clock) and the
        stage is not over."""
        due = time.time() - self.saved_at > CHECKPOINT_SECONDS and done < steps
        if gathered(due)[0]:                        # as rank 0's clock says, on every rank
            self.save(done)
            self.saved_at = time.time()

    @contextmanager
    def step(self, step):
        """Around one training step. A NaN loss stops the run, the last good checkpoint kept. Ctrl-C
        saves the steps taken and ends the run: a step cut short is dropped whole, its dropout draws
        too (train_step's update itself is never cut: see uninterrupted)."""
        rng = torch.get_rng_state()
        try:
            yield
        except NaNLoss as e:
            kept = (self.path if self.path.exists()
                    else self.path.parent / "adapters" / f"stage{self.stage - 1}.safetensors")
            raise NaNLoss(f"{e} at stage {self.stage} step {step}: stopped; the last good "
                          f"checkpoint is kept ({kept if kept.exists() else 'none yet'}); lower "
                          f"--lr and rerun with --resume") from None
        except KeyboardInterrupt:
            done = self.schedule.last_epoch              # the steps taken
            if rank_and_world()[1] > 1:   # a save waits for every rank, and one may be gone
                raise KeyboardInterrupt(f"interrupted at stage {self.stage} step {done}; continue "
                                        f"with --resume, from the stage's last checkpoint or its "
                                        f"start") from None
            if done == step:
                torch.set_rng_state(rng)
                self.optimizer.zero_grad(set_to_none=True)
            self.save(done)
            raise KeyboardInterrupt(f"interrupted at stage {self.stage} step {done}; continue with "
                                    f"--resume") from None


@contextmanager
def uninterrupted():
    """Ctrl-C inside waits for the block to end, then raises KeyboardInterrupt."""
    pressed = []
    handler = signal.signal(signal.SIGINT, lambda *_: pressed.append(1))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)
    if pressed:
        raise KeyboardInterrupt


# ----------------------------------------------------------------------------------------------
# 8. More than one GPU: `torchrun --nproc_per_node N smolora.py ...`. Every rank holds the whole
#    model and its share of each step's micro-batches and of each evaluation;
#    DistributedDataParallel averages the adapters' gradients; rank 0 alone writes. Plain
#    `python smolora.py` is one rank: each function below is then the identity or does nothing.

def rank_and_world():
    """(this process's rank, the number of ranks): (0, 1) unless started under torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def is_main():
    return rank_and_world()[0] == 0


def start_ranks(cfg):
    """Under torchrun: join the ranks (NCCL on CUDA, gloo on CPU), each on the GPU of its
    LOCAL_RANK; a rank that torchrun stops stops as on Ctrl-C."""
    if "LOCAL_RANK" not in os.environ or dist.is_initialized():
        return
    if cfg.device not in ("cpu", "cuda"):
        raise ValueError(f"--device {cfg.device} is not allowed under torchrun: give cuda, and "
                         f"each rank takes the GPU of its LOCAL_RANK")
    if cfg.device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cfg.device == "cuda" else "gloo")
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    # SMoLoRA's (1, out) fusion vectors get strided gradients that DDP copies: harmless, but warned
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")


def barrier():
    if dist.is_initialized():
        dist.barrier()


def main_rank_first(make, *args):
    """make(*args) on rank 0 first, then on the others, which find what it made (in the cache)."""
    if not is_main():
        barrier()
    made = make(*args)
    if is_main():
        barrier()
    return made


def data_parallel(model):
    """What training calls: under torchrun the model in DistributedDataParallel, whose backward
    averages the trainable (adapter) parameters' gradients over the ranks."""
    if not dist.is_initialized():
        return model
    # the buffers (O-LoRA's past LoRAs) are alike on every rank: not sent at each forward
    quiet = ("forward_sync_buffers" if "forward_sync_buffers" in   # its name from torch 2.13
             inspect.signature(DistributedDataParallel).parameters else "broadcast_buffers")
    return DistributedDataParallel(model, **{quiet: False})


def gradient_sync(model, now):
    """DDP's no_sync() for a step's micro-batches but the last: the ranks average once a step."""
    if isinstance(model, DistributedDataParallel) and not now:
        return model.no_sync()
    return nullcontext()


def gathered(value):
    """[value of rank 0, of rank 1, ...]."""
    if not dist.is_initialized():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def sharded(compute, records, batch_size):
    """compute(records) over the ranks: rank r takes the whole batches r, r + N, ... (so that each
    batch is the one a single process computes), and every rank gets all the results, in order."""
    rank, ranks = rank_and_world()
    if ranks == 1:
        return compute(records)
    batches = [records[i:i + batch_size] for i in range(0, len(records), batch_size)]
    shares = [iter(share) for share in gathered(compute(sum(batches[rank::ranks], [])))]
    return [next(shares[k % ranks]) for k, batch in enumerate(batches) for _ in batch]


# ----------------------------------------------------------------------------------------------
# 9. The command line: `python smolora.py --tasks scienceqa,textvqa`, one flag per Config field.

TASK_LISTS = {"coin": data.COIN_TASKS, "smolora": data.SMOLORA_TASKS}


def parse_names(names, flag, allowed, aliases):
    """A list of distinct names among `allowed`, given as a list, a comma-separated string, or an
    alias of a list (e.g. 'coin', 'all')."""
    text = names if isinstance(names, str) else ",".join(names)
    if text in aliases:
        names = list(aliases[text])
    else:
        names = [n.strip() for n in text.split(",") if n.strip()]
    if not names or len(set(names)) != len(names) or any(n not in allowed for n in names):
        raise ValueError(f"{flag} {text!r} is not allowed: give distinct comma-separated names "
                         f"among {', '.join(allowed)}, or {' or '.join(map(repr, aliases))}")
    return names


def parse_fewshot(specs):
    """--fewshot places365:5,10 (the flag repeatable) -> {"places365": [5, 10]}: each task once,
    distinct shots k >= 1. A task trained in the run may be given: relearning it measures what the
    final adapters kept of it."""
    fewshot = {}
    for spec in specs:
        task, _, shots = spec.partition(":")
        ks = [int(k) if k.strip().isdigit() else 0 for k in shots.split(",")]
        if task not in data.TASKS or task in fewshot or min(ks) < 1 or len(set(ks)) != len(ks):
            raise ValueError(f"--fewshot {spec!r} is not allowed: give TASK:K[,K...], each task "
                             f"once (one of {', '.join(data.TASKS)}) and distinct shots K >= 1")
        fewshot[task] = ks
    return fewshot


def check_device(device, dtype):
    cuda = re.fullmatch(r"cuda(:\d+)?", device)   # a CPU computes in all three dtypes
    if not (cuda or device == "cpu") or cuda and not torch.cuda.is_available():
        raise ValueError(f"--device {device} is not allowed: choose cpu, or cuda or cuda:N on a "
                         f"machine with CUDA (this one has "
                         f"{'' if torch.cuda.is_available() else 'no '}CUDA)")
    if cuda and dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"--dtype bfloat16 is not allowed on "
                         f"{torch.cuda.get_device_name(device)}, which cannot compute in it: "
                         f"choose float16 or float32")


def command_line():
    """The parser: a flag per Config field, its help and default read from the field. A flag not
    given is left out (SUPPRESS), so that Config.paper's recipe applies with --model."""
    about = ("Continual visual instruction tuning: tune a LLaVA model on tasks one after another, "
             "evaluate every task after every stage.")
    p = argparse.ArgumentParser(prog="smolora.py", description=about,
                                argument_default=argparse.SUPPRESS)
    for knob_ in fields(Config):
        kind = next((t for t in (bool, int, float) if knob_.type is t or t in
                     getattr(knob_.type, "__args__", ())), str)
        name, default = knob_.name, None if knob_.default is MISSING else knob_.default
        notes = [] if default is None or default is False else [f"default {default}"]
        paper = SMOLORA_PAPER.get(name), PAPER.get(name, default)   # SMOLORA_PAPER: all PAPER's
        if paper[0] is not None:
            notes.append(f"with --model {paper[0]}" if paper[0] == paper[1] else
                         f"with --model {paper[0]} for smolora, {paper[1]} for the others")
        flag = dict(action="store_true") if kind is bool else dict(type=kind)
        flag.update({k: v for k, v in knob_.metadata.items() if k in ("choices", "action")})
        p.add_argument("--" + name.replace("_", "-"),
                       help=knob_.metadata["help"] + (f" ({'; '.join(notes)})" if notes else ""),
                       required=knob_.default is MISSING and knob_.default_factory is MISSING,
                       **flag)
    return p


def parse_configs(argv=None):
    """The Config of each method the command line names: one, or several compared in one folder."""
    given = vars(command_line().parse_args(argv))
    methods = parse_names(given.pop("method", Config.method), "--method", METHODS, {"all": METHODS})
    owned = {k.name: k.metadata.get("owner") for k in fields(Config)}
    if len(methods) > 1:   # a comparison: each run in its own folder, under one
        tasks = parse_names(given["tasks"], "--tasks", data.TASKS, TASK_LISTS)
        folder = Path(given.pop("out", f"runs/compare-{'-'.join(tasks)}"))
    configs = []
    for method in methods:
        # a method's own knob goes to its run alone; given with no method to own it, Config refuses
        knobs = {k: v for k, v in given.items()
                 if owned[k] in (None, method) or owned[k] not in methods}
        if len(methods) > 1:
            knobs["out"] = str(folder / method)
        make = Config.paper if "model" in given else Config
        configs.append(make(method=method, **knobs))
    return configs


def main(argv=None):
    say = print if os.environ.get("RANK", "0") == "0" else lambda *_, **__: None  # rank 0 alone
    try:
        configs = parse_configs(argv)    # all checked before any runs
        runs = []
        for cfg in configs:
            say("configuration: " + ", ".join(f"{k}={v}" for k, v in asdict(cfg).items()))
            runs.append(run(cfg))
            metrics = ", ".join(f"{k} {v:.1f}" for k, v in runs[-1]["metrics"].items()
                                if v is not None)
            say(f"{cfg.method} done in {runs[-1]['seconds']:.0f} s: {metrics}; report in "
                f"{cfg.out}/matrix.md")
        if len(configs) > 1 and is_main():
            folder = Path(configs[0].out).parent
            eval.write_comparison(folder, runs)
            say(f"comparison of {', '.join(r['method'] for r in runs)} in {folder}/compare.md "
                f"and compare.png")
        if dist.is_initialized():
            dist.destroy_process_group()
    except ValueError as e:   # bad input, a NaN loss: one line, exit status 2, nothing saved lost
        stop(2, f"smolora.py: error: {e}", say)
    except KeyboardInterrupt as e:   # Ctrl-C: training saved its step, evaluation its tasks done
        stop(130, str(e) or "interrupted; what was saved is kept: continue with --resume", say)
    except RuntimeError as e:        # under torchrun, a collective whose peer has gone
        if not (isinstance(e, dist.DistError) or "gloo" in str(e)):
            raise
        rank, ranks = rank_and_world()
        stop(130, f"rank {rank} of {ranks}: another rank stopped; what was saved is kept: "
                  f"continue with --resume", print)


def stop(status, line, say):
    """Exit with `status` after one line on standard error, left in peace by further signals
    (torchrun's to the ranks left)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    say(line, file=sys.stderr)
    sys.exit(status)


if __name__ == "__main__":
    main()
