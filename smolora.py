"""smolora: continual visual instruction tuning with LoRA, DoRA, O-LoRA, MoELoRA (CoIN) and SMoLoRA, by hand.

Read top to bottom beside the papers (DESIGN.md section 2 holds the equations): 1. the adapters, each forward
beside its formula; 2. in a LLaVA model, routing, state dicts; 3. models; 4. training and each method's own
behaviour (METHODS); 5. the continual run, the protocol; 6. the command line.
Notation as in the papers: x a token's input to a linear layer, W0 the frozen weight, r the total rank,
s = alpha / r the LoRA scale (the TOTAL rank r in both papers' code, also for the mixtures).
"""
import argparse
import functools
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
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch
import torch.nn as nn
import safetensors.torch
from tqdm import tqdm
from transformers import (AutoModel, AutoProcessor, AutoTokenizer, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration)

import data
import eval


# ----------------------------------------------------------------------------------------------
# 1. The adapters. Each wraps a frozen nn.Linear (`.base`) and adds a low-rank update to its output.
#    Adapter weights are kept in float32 whatever the base's dtype (ours: bf16 weights would round
#    away AdamW's small updates); the adapter path computes in float32 and is cast back.

class LoRALinear(nn.Module):
    """LoRA (Hu et al. 2021):  h = W0 x + s * B A dropout(x),  A (r, in), B (out, r), s = alpha / r."""

    def __init__(self, base: nn.Linear, r=8, alpha=16, dropout=0.0):
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank r={r} is not allowed: r must be a positive integer")
        self.base, self.r, self.scaling = base, r, alpha / r
        kw = dict(device=base.weight.device, dtype=torch.float32)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, **kw))  # B = 0: h == W0 x at init
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as PEFT / loralib
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.merged = False

    def forward(self, x):
        h = self.base(x)                                          # W0 x          (B, L, out)
        if self.merged:
            return h
        z = self.dropout(x.to(self.lora_A.dtype)) @ self.lora_A.T  # A x          (B, L, r)
        return h + (self.scaling * z @ self.lora_B.T).to(h.dtype)   # + s B A x    (B, L, out)

    def delta_weight(self):
        return self.scaling * self.lora_B @ self.lora_A            # s B A         (out, in)

    def merged_weight(self, W0):
        return W0 + self.delta_weight()                            # W = W0 + s B A

    def unmerged_weight(self, W):
        return W - self.delta_weight()                             # W0 = W - s B A

    @torch.no_grad()
    def merge(self, merged=True):
        """W0 -> W, the update folded in: the layer then costs what the plain linear costs; merge(False): W -> W0."""
        if self.merged != merged:
            fold = self.merged_weight if merged else self.unmerged_weight
            self.base.weight.copy_(fold(self.base.weight.float()).to(self.base.weight.dtype))
            self.merged = merged

    def unmerge(self):
        """W -> W0: back to the frozen weight, the adapter separate again."""
        self.merge(False)


class DoRALinear(LoRALinear):
    """DoRA (Liu et al. 2024, weight-decomposed LoRA): the LoRA-updated weight split into a learned magnitude per
    output row and a direction, its norm a constant in the backward pass (DoRA section 4.3, as PEFT):
        W' = m * (W0 + s B A) / ||W0 + s B A||,   m (out,) initialised to ||W0|| per row, so W' = W0 at init
        h  = W' x + b,  computed as PEFT does: W0 x + b + (m/n - 1) W0 dropout(x) + (m/n) s B A dropout(x)"""

    def __init__(self, base: nn.Linear, r=8, alpha=16, dropout=0.0):
        super().__init__(base, r, alpha, dropout)
        self.magnitude = nn.Parameter(base.weight.detach().float().norm(dim=1))      # m = ||W0|| per row (out,)

    @torch.no_grad()              # detached: a constant in the backward pass
    def weight_norm(self):
        return (self.base.weight.float() + self.delta_weight()).norm(dim=1)           # n = ||W0 + s B A|| (out,)

    def forward(self, x):
        h = self.base(x)                                                   # W0 x + b            (B, L, out)
        if self.merged:
            return h
        scale = self.magnitude / self.weight_norm()                        # m / n               (out,)
        xd = self.dropout(x.to(self.lora_A.dtype))                         # dropout(x), as PEFT
        plain = xd @ self.base.weight.float().T                            # W0 dropout(x)       (B, L, out)
        z = self.scaling * (xd @ self.lora_A.T) @ self.lora_B.T            # s B A dropout(x)    (B, L, out)
        return h + ((scale - 1) * plain + scale * z).to(h.dtype)           # W' x + b

    def merged_weight(self, W0):
        self.merged_norm = self.weight_norm()                              # n, kept to unmerge
        return (W0 + self.delta_weight()) * (self.magnitude / self.merged_norm)[:, None]    # W = m (W0 + s B A) / n

    def unmerged_weight(self, W):
        return W * (self.merged_norm / self.magnitude)[:, None] - self.delta_weight()      # W0 = W n / m - s B A


class OLoRALinear(LoRALinear):
    """O-LoRA (Wang et al. 2023, orthogonal subspace learning): each task tunes a new LoRA; the earlier tasks'
    LoRAs stay in the model, frozen, and the new A is pushed out of the row space of theirs.
        h      = W0 x + sum_{j<t} s B_j A_j x + s B_t A_t x
        L_orth = sum_{j<t} sum |A_j A_t^T|       (the official code's L1; the paper writes the squared norm)
    The frozen LoRAs are stacked in buffers sized for all the run's tasks (zeros for those to come): one shape."""

    def __init__(self, base: nn.Linear, r=8, alpha=16, dropout=0.0, num_tasks=1):
        super().__init__(base, r, alpha, dropout)
        kw = dict(device=base.weight.device, dtype=torch.float32)
        self.register_buffer("past_A", torch.zeros(num_tasks * r, base.in_features, **kw))   # [A_1; ..; A_t-1; 0]
        self.register_buffer("past_B", torch.zeros(base.out_features, num_tasks * r, **kw))  # [B_1 .. B_t-1 0]

    def forward(self, x):
        h = super().forward(x)                                             # W0 x + s B_t A_t x
        z = self.dropout(x.to(self.past_A.dtype)) @ self.past_A.T           # A_j x, all j < t
        return h + (self.scaling * z @ self.past_B.T).to(h.dtype)          # + sum_{j<t} s B_j A_j x

    @torch.no_grad()
    def start_new_lora(self, done):
        """Freeze the LoRA just tuned as task `done`'s (1-based) and start a fresh one for the next task."""
        rows = slice((done - 1) * self.r, done * self.r)
        self.past_A[rows], self.past_B[:, rows] = self.lora_A, self.lora_B
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B.zero_()

    def orthogonality(self):
        return (self.past_A @ self.lora_A.T).abs().sum()                 # sum_{j<t} sum |A_j A_t^T|


def _expert_weights(base, r, num_experts):
    """E experts of rank r/E each, stacked: A (E, r/E, in) ~ N(0, 0.01^2), B (E, out, r/E) = 0."""
    if num_experts < 1 or r % num_experts:
        raise ValueError(f"rank r={r} with num_experts={num_experts} is not allowed: "
                         f"r must be a positive multiple of the number of experts")
    kw = dict(device=base.weight.device, dtype=torch.float32)
    lora_A = nn.Parameter(torch.randn(num_experts, r // num_experts, base.in_features, **kw) * 0.01)
    lora_B = nn.Parameter(torch.zeros(num_experts, base.out_features, r // num_experts, **kw))
    return lora_A, lora_B


class MoELoRALinear(nn.Module):
    """MoELoRA (CoIN): a dense per-token softmax over E LoRA experts of rank r/E.
        g = softmax(W_g x)                     W_g (E, in), no bias, no top-k
        h = W0 x + s * sum_e g_e B_e A_e x
    Stacked form (ours, exactly equal): z = A_all x in one matmul, each expert's r/E-slice scaled by g_e, one
    matmul with B_all: one LoRA's cost instead of E."""

    def __init__(self, base: nn.Linear, r=128, alpha=256, num_experts=8, dropout=0.05):
        super().__init__()
        self.base, self.r, self.num_experts, self.scaling = base, r, num_experts, alpha / r
        self.lora_A, self.lora_B = _expert_weights(base, r, num_experts)
        self.router = nn.Linear(base.in_features, num_experts, bias=False, device=base.weight.device,
                                dtype=torch.float32)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x):
        h = self.base(x)                                            # W0 x                 (B, L, out)
        x = x.to(self.lora_A.dtype)
        E, rank, d_in = self.lora_A.shape
        g = torch.softmax(self.router(x), dim=-1)                   # g = softmax(W_g x)  (B, L, E)
        z = self.dropout(x) @ self.lora_A.reshape(E * rank, d_in).T  # A_e x, all e     (B, L, E*r/E)
        z = (z.unflatten(-1, (E, rank)) * g.unsqueeze(-1)).flatten(-2)  # g_e A_e x      (B, L, r)
        B_all = self.lora_B.permute(1, 0, 2).reshape(-1, E * rank)  # [B_1 ... B_E]       (out, r)
        return h + (self.scaling * z @ B_all.T).to(h.dtype)         # + s sum_e g_e B_e A_e x


SMOLORA_PARTS = (("vu",), ("if",), ("vu", "if"), ("vu", "if", "fusion"))   # the paper's ablation, full method last


def pick(stacked, experts):
    """stacked[experts] (E, ...)[(B, P, k)] by index_select, whose backward adds in a fixed order: stacked[experts]'s
    adds in parallel in no fixed order on CPU, and two identical SMoLoRA runs came out different."""
    return stacked.index_select(0, experts.flatten()).unflatten(0, experts.shape)


class SMoLoRALinear(nn.Module):
    """SMoLoRA: a separable mixture of LoRA, two pools of E/2 experts and two routers (DESIGN.md 2.3).
    Experts [0, E/2) form the visual-understanding (VU) pool, [E/2, E) the instruction-following (IF) pool.
        G_vu = softmax(top_k(R_vu . Avg(x)))              per sample; Avg over this layer's input
        G_if = softmax(top_k(R_if . f(X_ins)))            per sample; f the instruction embedding
        x_vu = sum_{i in VU} G_vu,i * s * B_i A_i x       x_if likewise over the IF pool
        [alpha_t, beta_t] = softmax([I_vu . x_vu, I_if . x_if])        per token ("adaptive fusion")
        h = W0 x + alpha_t * x_vu + beta_t * x_if
    The paper's ablation (`parts`): vu: h = W0 x + x_vu, if: h = W0 x + x_if (the other pool unused, untrained);
    vu,if: h = W0 x + x_vu + x_if; vu,if,fusion: the full method above.
    With top_k = 1 (the paper's) the softmax over one kept logit is the constant 1, so R_vu and R_if get no
    gradient: they stay the random projections they were initialised as, as officially; top_k >= 2 trains them."""

    def __init__(self, base: nn.Linear, r=128, alpha=256, num_experts=8, top_k=1, ins_dim=None,
                 dropout=0.05, parts=SMOLORA_PARTS[-1]):
        super().__init__()
        if tuple(parts) not in SMOLORA_PARTS:
            raise ValueError(f"SMoLoRA parts {parts} are not allowed: choose one of {SMOLORA_PARTS}")
        if num_experts < 2 or num_experts % 2:
            raise ValueError(f"num_experts={num_experts} is not allowed for SMoLoRA: it must be even (two pools)")
        pool = num_experts // 2
        if not 1 <= top_k <= pool:
            raise ValueError(f"top_k={top_k} is not allowed with num_experts={num_experts}: between 1 and {pool}")
        self.base, self.r, self.num_experts, self.top_k = base, r, num_experts, top_k
        self.scaling, self.fusion = alpha / r, "fusion" in parts
        self.pools = [pool for pool, name in enumerate(("vu", "if")) if name in parts]   # 0: VU, 1: IF
        self.lora_A, self.lora_B = _expert_weights(base, r, num_experts)
        kw = dict(device=base.weight.device, dtype=torch.float32)
        self.vu_router = nn.Linear(base.in_features, pool, bias=False, **kw)                # R_vu
        self.if_router = nn.Linear(ins_dim or base.in_features, pool, bias=False, **kw)     # R_if
        # I_vu, I_if (1, out): no bias, as the paper writes and the official code builds them (bias=False)
        if self.fusion:
            self.fuse_vu, self.fuse_if = (nn.Linear(base.out_features, 1, bias=False, **kw) for _ in range(2))
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.routing_mask = self.routing_ins = self.routing = None

    def set_routing(self, mask, ins):
        """What the next forward routes on: the attention mask (B, L) or None, the instruction embedding (B, d)."""
        self.routing_mask, self.routing_ins, self.routing = mask, ins, None

    def route(self, x, mask, ins):
        """Per sample: the kept experts of each pool (B, 2, k) and their gates G (B, 2, k)."""
        if mask is not None and mask.shape[1] != x.shape[1]:
            # A decode step of generate (one new token): routing is decided once at the prompt and kept
            # for every generated token (ours; the official code re-routes on each single token).
            if self.routing is None:
                raise ValueError("SMoLoRA decode step with no routing: run the prompt through the model first")
            return self.routing
        if ins is None:
            raise ValueError("SMoLoRA needs the instruction embedding: call set_routing(model, mask, ins) "
                             "or pass ins= to the layer")
        if mask is None:
            avg = x.mean(dim=1)                                        # Avg(x)              (B, in)
        else:   # ours: the mean over non-padding tokens, so a sample's routing ignores its batch-mates
            m = mask.to(x.dtype).unsqueeze(-1)                         # (B, L, 1)
            avg = (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)       # Avg(x)              (B, in)
        vu_logit, vu_expert = self.vu_router(avg).topk(self.top_k, dim=-1)           # top_k(R_vu . Avg(x))
        if_logit, if_expert = self.if_router(ins.to(avg.dtype)).topk(self.top_k, dim=-1)  # top_k(R_if . f)
        gates = torch.softmax(torch.stack([vu_logit, if_logit], dim=1), dim=-1)      # G_vu, G_if (B, 2, k)
        experts = torch.stack([vu_expert, if_expert + self.num_experts // 2], dim=1)  # (B, 2, k)
        self.routing = (experts, gates)
        return self.routing

    def forward(self, x, mask=None, ins=None):
        h = self.base(x)                                               # W0 x                 (B, L, out)
        x = x.to(self.lora_A.dtype)
        if mask is None and ins is None:
            mask, ins = self.routing_mask, self.routing_ins
        experts, gates = self.route(x, mask, ins)                      # (B, 2, k)
        experts, gates, P = experts[:, self.pools], gates[:, self.pools], len(self.pools)   # the pools in use
        rank = self.lora_A.shape[1]
        # Stacked form: gather each sample's kept experts, one batched matmul for all their A, one for all B.
        A = pick(self.lora_A, experts).flatten(1, 3)                   # (B, P*k*rank, in)
        # one dropout mask shared by the kept experts (ours; the official code draws one per expert call)
        z = torch.bmm(self.dropout(x), A.transpose(1, 2))              # A_i x                (B, L, P*k*rank)
        z = z.unflatten(-1, (P, self.top_k, rank)) * (self.scaling * gates)[:, None, :, :, None]
        z = z.flatten(-2)                                              # G_i s A_i x, VU | IF (B, L, P, k*rank)
        B = pick(self.lora_B, experts).transpose(-1, -2).flatten(2, 3)  # B_i^T, VU | IF       (B, P, k*rank, out)
        if self.fusion:
            # I . x_pool = (I B_pool) . z_pool: the fusion logits are read in the rank space, so x_vu and x_if
            # (B, L, out) each) are never built apart (ours, exactly equal, about a third of the layer's time).
            I = torch.stack([self.fuse_vu.weight, self.fuse_if.weight])  # I_vu, I_if          (2, 1, out)
            IB = (B @ I.transpose(1, 2)).squeeze(-1)                   # I_pool B_pool        (B, 2, k*rank)
            logits = (z * IB[:, None]).sum(-1)                         # [I_vu . x_vu, I_if . x_if] (B, L, 2)
            z = z * torch.softmax(logits, dim=-1).unsqueeze(-1)        # [alpha_t, beta_t] on each pool's z
        delta = torch.bmm(z.flatten(2), B.flatten(1, 2))               # alpha_t x_vu + beta_t x_if, or their sum
        return h + delta.to(h.dtype)                                   # h = W0 x + alpha_t x_vu + beta_t x_if


ADAPTERS = {"lora": LoRALinear, "dora": DoRALinear, "olora": OLoRALinear, "moelora": MoELoRALinear,
            "smolora": SMoLoRALinear}


# ----------------------------------------------------------------------------------------------
# 2. Adapters in a LLaVA model (module names of transformers' LlavaForConditionalGeneration, as in
#    llava-hf/llava-1.5-7b-hf): where each method goes (DESIGN.md 2.2 / 2.3), routing, state dicts.

# LoRA, DoRA, O-LoRA, MoELoRA: every linear of the LLM (q, k, v, o, gate, up, down); SMoLoRA: the LLM's MLP
# (gate, up, down) and both linears of the projector
LLM_LINEARS = r"model\.language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"
TARGETS = {**dict.fromkeys(("lora", "dora", "olora", "moelora"), (LLM_LINEARS,)),
           "smolora": (r"model\.language_model\.layers\.\d+\.mlp\.(gate|up|down)_proj",
                       r"model\.multi_modal_projector\.linear_[12]")}


def add_adapters(model, method, targets=None, **hparams):
    """Wrap the method's target linears in place, freeze everything else; return the wrapped names. `targets`
    (regular expressions over whole module names) overrides the method's; hparams: the adapter class's arguments."""
    if method not in ADAPTERS:
        raise ValueError(f"unknown method {method!r}: allowed are {', '.join(ADAPTERS)}")
    allowed = set(inspect.signature(ADAPTERS[method]).parameters) - {"base"}
    if set(hparams) - allowed:
        raise ValueError(f"hyper-parameter(s) {', '.join(sorted(set(hparams) - allowed))} not allowed for {method}: "
                         f"allowed are {', '.join(sorted(allowed))}")
    patterns = [re.compile(p) for p in (targets or TARGETS[method])]
    names = [name for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and any(p.fullmatch(name) for p in patterns)]
    if not names:
        raise ValueError(f"targets {list(targets or TARGETS[method])} match no linear module of "
                         f"{type(model).__name__}: give regular expressions over its module names")
    model.requires_grad_(False)
    if method == "smolora":
        hparams.setdefault("ins_dim", model.get_input_embeddings().embedding_dim)
    for name in names:
        adapter = ADAPTERS[method](model.get_submodule(name), **hparams)
        if method == "smolora":   # top-1 routers get no gradient (see SMoLoRALinear): keep them out of the optimizer
            adapter.vu_router.requires_grad_(adapter.top_k > 1)
            adapter.if_router.requires_grad_(adapter.top_k > 1)
        adapter.train(adapter.base.training)   # a new module starts in training mode: follow the model's
        model.set_submodule(name, adapter)
    return names


def instruction_embedding(model, input_ids, ins_mask):
    """f(X_ins) (ours): the mean of the frozen input embeddings over the instruction's tokens (B, d), centred on the
    vocabulary's mean embedding: uncentred, all of CoIN's instructions went to one IF expert (README, "Results")."""
    table = model.get_input_embeddings()
    with torch.no_grad():
        centre = table.weight.mean(dim=0, dtype=torch.float32)     # mean_v e(v), with no fp32 copy of the table
        embeddings = table(input_ids).float() - centre             # e(x) - mean_v e(v)  (B, L, d)
    m = ins_mask.to(embeddings.dtype).unsqueeze(-1)                # (B, L, 1)
    return (embeddings * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)


def load_encoder(path):
    """--ins-encoder: (encoder, tokenizer) of a transformers sentence encoder folder (e.g. all-MiniLM-L6-v2)."""
    try:
        return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--ins-encoder {path} is not a transformers encoder (a folder AutoModel and AutoTokenizer "
                         f"load): {str(e).splitlines()[0]}") from None


@torch.no_grad()
def embed_instructions(model, processor, strings, encoder=None):
    """f(X_ins) of instruction strings, each read alone (N, d): instruction_embedding, or `encoder`'s (official)."""
    if encoder is None:
        tokens = processor.tokenizer(strings, add_special_tokens=False, padding=True, return_tensors="pt")
        return instruction_embedding(model, tokens["input_ids"].to(model.device), tokens["attention_mask"].bool())
    encoder, tokenizer = encoder
    tokens = tokenizer(strings, padding=True, return_tensors="pt")
    m = tokens["attention_mask"].unsqueeze(-1).float()                        # (N, L, 1)
    return ((encoder(**tokens).last_hidden_state * m).sum(1) / m.sum(1)).to(model.device)   # mean pooling


def with_instruction_embeddings(records, task, cfg, embed):
    """The records with the f(X_ins) their IF router reads ("ins_embedding") unless read from the prompt (default):
    --if-routing task: the task's canonical instruction (the official oracle); --ins-encoder: the sample's own."""
    if cfg["if_routing"] != "task" and not cfg["ins_encoder"]:
        return records
    keys = [data.canonical_instruction(task) if cfg["if_routing"] == "task" else r["instruction"] for r in records]
    strings = sorted(set(keys))
    table = dict(zip(strings, embed(strings)))                    # one tensor per distinct string, shared
    return [{**r, "ins_embedding": table[key]} for r, key in zip(records, keys)]


def set_routing(model, mask, ins):
    """Hand every SMoLoRA layer what its routers see: the attention mask (B, L) and f(X_ins) (B, d); the projector's
    layers see the image tokens only, which carry no padding: they average over all of them."""
    for name, module in model.named_modules():
        if isinstance(module, SMoLoRALinear):
            module.set_routing(None if "multi_modal_projector" in name else mask, ins)


def route_batch(model, batch):
    """set_routing from a collated batch, if the model has SMoLoRA. Avg(x) runs over the prompt alone (not the answer
    nor EOS) in training as at test: a sample trains the experts that answer it (ours; officially the answer too)."""
    if any(isinstance(m, SMoLoRALinear) for m in model.modules()):
        mask = batch["attention_mask"]
        prompt = mask * (batch["labels"] == -100) if "labels" in batch else mask
        set_routing(model, prompt, batch["ins_embedding"] if "ins_embedding" in batch    # with_instruction_embeddings'
                    else instruction_embedding(model, batch["input_ids"], batch["ins_mask"]))


@torch.no_grad()
def routing_picks(model, processor, records, batch_size):
    """Per record, per SMoLoRA layer, the top VU and IF expert, numbered within its pool: (N, layers, 2) lists."""
    layers = [m for m in model.modules() if isinstance(m, SMoLoRALinear)]
    collate, picks, was_training = data.Collator(processor, train=False), [], model.training
    model.eval()   # no dropout: it would change what later layers' routers see
    for start in range(0, len(records), batch_size):
        batch = {k: v.to(model.device) for k, v in collate(records[start:start + batch_size]).items()}
        route_batch(model, batch)
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              pixel_values=batch["pixel_values"].to(model.dtype))           # the prompt routes every layer
        experts = torch.stack([m.routing[0][:, :, 0] for m in layers], dim=1)  # the top-1 of each pool (B, layers, 2)
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
        raise ValueError(f"adapter state does not fit this model: missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}, other shape {reshaped[:3]} (same method and hyper-parameters?)")
    model.load_state_dict(state, strict=False)


# ----------------------------------------------------------------------------------------------
# 3. Models. Any LLaVA checkpoint folder loads through `load_model`; the tiny default one is built,
#    pretrained on the synthetic captions (all weights: aligned, not instruction-tuned, like the SMoLoRA
#    paper's base) and saved as an ordinary checkpoint folder in the cache, once.

CACHE = Path(os.environ.get("SMOLORA_CACHE", Path.home() / ".cache" / "smolora"))
TINY_MODEL = "tiny-llava-v2"       # bump when the recipe below changes, so old caches are not reused


def build_tiny_model(processor):
    """A 1M-parameter LlavaForConditionalGeneration: CLIP 3 layers x 128 on 64x64 images in patches of 16
    (16 image tokens), a Llama of 2 layers x 128, the tokenizer's vocabulary (DESIGN.md section 9)."""
    tokenizer = processor.tokenizer
    vision = CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                              image_size=data.IMAGE_SIZE, patch_size=data.PATCH)
    text = LlamaConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=len(tokenizer), max_position_embeddings=512,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    return LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-1,
                                                     image_token_index=tokenizer.convert_tokens_to_ids("<image>")))


def pretrain_tiny_model(path, seed=0, progress=True, steps=1000, batch_size=32, lr=1e-3, pool=8):
    """Build the tiny model and train all its weights to caption synthetic scenes; save it to `path`.
    Every batch is a fresh draw of scenes, so the model learns to read and locate rather than memorise."""
    torch.manual_seed(seed)
    processor = data.build_processor()
    model, collate = build_tiny_model(processor), data.Collator(processor, train=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = cosine_with_warmup(optimizer, steps)
    model.train()
    bar = tqdm(range(steps), desc="pretraining the tiny base model on captions", disable=not progress)
    for step in bar:
        if step % pool == 0:
            batches = data.caption_batches(batch_size, pool, f"{seed}/{step}")
        bar.set_postfix(loss=f"{train_step(model, [collate(batches[step % pool])], optimizer, schedule):.3f}")
    save_checkpoint(model.eval(), processor, path)
    return path


def save_checkpoint(model, processor, path):
    path = Path(path)
    temporary = path.with_name(f".tmp-{path.name}")
    shutil.rmtree(temporary, ignore_errors=True)
    model.save_pretrained(temporary)
    processor.save_pretrained(temporary)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(temporary, path)


def load_model(name_or_path, device="cpu", dtype=torch.float32):
    """(model, processor) of a LLaVA checkpoint folder or hub id, as transformers loads any checkpoint."""
    try:
        model = LlavaForConditionalGeneration.from_pretrained(name_or_path, dtype=dtype)
        processor = AutoProcessor.from_pretrained(name_or_path)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"--model {name_or_path} is not a LLaVA checkpoint "
                         f"(a folder saved by LlavaForConditionalGeneration): {str(e).splitlines()[0]}") from None
    return model.to(device).eval(), processor


# ----------------------------------------------------------------------------------------------
# 4. Training: AdamW, cosine schedule with warmup, gradient clipping, next-token loss on the answer.

def cosine_with_warmup(optimizer, total_steps, warmup=0.03):
    """Linear warmup over the first 3% of the steps, then cosine decay to zero (the papers' schedule)."""
    warmup_steps = max(1, round(warmup * total_steps))

    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class NaNLoss(ValueError):
    pass


def answer_loss(model, batch):
    """Next-token cross-entropy on the answer tokens of a collated batch (labels are -100 elsewhere)."""
    batch = {k: v.to(model.device) for k, v in batch.items()}
    route_batch(model, batch)
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 pixel_values=batch["pixel_values"].to(model.dtype), labels=batch["labels"]).loss


def train_step(model, batches, optimizer, schedule, max_grad_norm=1.0, penalty=None):
    """One optimizer step on the answer loss averaged over the micro-batches (a list of collated batches: gradient
    accumulation), plus penalty() when a method adds one (EWC, O-LoRA). Returns the loss."""
    total = 0.0
    for batch in batches:
        loss = answer_loss(model, batch) + (penalty() if penalty is not None else 0)
        if not torch.isfinite(loss):
            raise NaNLoss(f"the loss became {loss.item()}")
        (loss / len(batches)).backward()                  # the gradient of the mean over the micro-batches
        total += loss.item() / len(batches)
    pressed, previous = [], signal.signal(signal.SIGINT, lambda *_: pressed.append(1))
    try:   # Ctrl-C waits for the update to end, then raises: a step is taken whole or not at all (train_stage)
        torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    if pressed:
        raise KeyboardInterrupt
    return total


REPLAY_RATIO = 0.1     # replay: each later task's records get 10% more from the earlier tasks' memories (ours)
EWC_LAMBDA = 5000.0    # ewc (ours): about the loss's size once the next task moves the adapters as SeqLoRA does
EWC_SAMPLES = 64       # ewc: training samples of a task its Fisher is averaged over (ours: a sample, not all)
OLORA_LAMBDA = 0.5     # olora: the orthogonality loss's weight (the official code's lamda_1; its L2 term, 0, left out)


def replay_memory(records, task, ratio, seed):
    """replay: what is kept of a task once it is learned, a fixed random round(ratio * n) of its training records."""
    return random.Random(f"{seed}/memory/{task}").sample(records, round(ratio * len(records)))


def replay_mix(train, tasks, stage, ratio, seed):
    """replay: stage t's training records, task t's n_t plus round(ratio * n_t) drawn as evenly as the count
    allows from the memories of the tasks before it (none at stage 1). Seeded, so a resumed run draws the same."""
    records, earlier = list(train[tasks[stage - 1]]), tasks[:stage - 1]
    wanted, rng = round(ratio * len(records)), random.Random(f"{seed}/replay/{stage}")
    replayed = []
    for j, task in enumerate(earlier):
        memory = replay_memory(train[task], task, ratio, seed)
        replayed += rng.sample(memory, min(len(memory), wanted // len(earlier) + (j < wanted % len(earlier))))
    return records + replayed


def diagonal_fisher(model, processor, records):
    """ewc: F_k = (1/n) sum_s (d loss_s / d theta_k)^2 over the trainable (adapter) parameters: the empirical
    Fisher, one sample at a time, on the answer loss of the n records."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    fisher = {name: torch.zeros_like(p) for name, p in params.items()}
    collate = data.Collator(processor, train=True)
    model.eval()                                   # no adapter dropout
    for record in records:
        grads = torch.autograd.grad(answer_loss(model, collate([record])), list(params.values()))
        for name, g in zip(params, grads):
            fisher[name] += g ** 2 / len(records)
    return fisher


def consolidate(model, processor, records, seed, previous=None):
    """ewc after a task: (F, theta*), F plus the task's diagonal Fisher on EWC_SAMPLES seeded draws of its records,
    theta* the parameters just learned (online EWC, Schwarz et al. 2018: one penalty for all earlier tasks)."""
    sample = random.Random(f"{seed}/fisher").sample(records, min(EWC_SAMPLES, len(records)))
    fisher = diagonal_fisher(model, processor, sample)
    if previous is not None:
        fisher = {name: f + previous[0][name] for name, f in fisher.items()}
    return fisher, {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def ewc_penalty(model, fisher, anchor, lam):
    """ewc (Kirkpatrick et al. 2017): (lambda/2) sum_k F_k (theta_k - theta*_k)^2 over the adapter parameters."""
    return lam / 2 * sum((fisher[name] * (p - anchor[name]) ** 2).sum()
                         for name, p in model.named_parameters() if name in fisher)


def orthogonality_penalty(model, lam=1.0):
    """olora: lambda * L_orth summed over the adapted layers."""
    return lam * sum(m.orthogonality() for m in model.modules() if isinstance(m, OLoRALinear))


@dataclass(frozen=True)
class Method:
    """A method of the papers' tables (DESIGN.md 2.4): the adapter it tunes and what `run` does for it, each a small
    function of the run's state `ctx` (model, processor, cfg, tasks, train, test, out) and the stage (1-based).
    The defaults are SeqLoRA's: one stage per task, on that task's records, nothing before or after."""
    adapter: str | None                         # the adapter it tunes (ADAPTERS); None: nothing is tuned
    notes: str
    stages: Callable = list                     # tasks -> what each stage tunes on, by name
    records: Callable = lambda ctx, stage: ctx.train[ctx.tasks[stage - 1]]   # (ctx, stage) -> what it tunes on
    start: Callable = lambda ctx, stage: None   # (ctx, stage) before tuning the stage -> its penalty() or None
    end: Callable = lambda ctx, stage: None     # (ctx, stage) after the stage, also when resumed from its file
    answer: Callable | None = None              # (ctx, stage, i) -> the adapters task i is answered with, or None
    report: Callable = lambda ctx: None         # (ctx) after the last stage


def ewc_end(ctx, stage):
    """ewc: F and theta* for the tasks to come (recomputed when resumed)."""
    if stage < len(ctx.tasks):
        ctx.ewc = consolidate(ctx.model, ctx.processor, ctx.train[ctx.tasks[stage - 1]], ctx.cfg["seed"], ctx.ewc)


def olora_start(ctx, stage):
    """olora: from the second task, freeze the LoRA just tuned, start a new one, push it orthogonal."""
    if stage > 1:
        torch.manual_seed(ctx.cfg["seed"] + stage)                 # the new A's draws, also on resume
        for module in ctx.model.modules():
            if isinstance(module, OLoRALinear):
                module.start_new_lora(stage - 1)
        return functools.partial(orthogonality_penalty, ctx.model, ctx.cfg["olora_lambda"])


def routing_report(ctx):
    """smolora: which tasks share experts, and so each other's updates (routing.md, routing.png)."""
    picks = {t: routing_picks(ctx.model, ctx.processor, ctx.test[t], ctx.cfg["batch_size"])
             for t in ctx.tasks + ctx.cfg["unseen"]}
    oracle = ", IF routed by task (oracle)" if ctx.cfg["if_routing"] == "task" else ""
    eval.write_routing(ctx.out, ctx.cfg["method"] + oracle, picks, ctx.cfg["experts"] // 2)


METHODS = {
    "zeroshot": Method(None, "the base model, not tuned", stages=lambda tasks: []),
    "multitask": Method("lora", "one LoRA tuned on all tasks mixed, in one stage: the upper bound, not continual",
                        stages=lambda tasks: ["all tasks mixed"],       # train_stage's shuffle mixes them
                        records=lambda ctx, stage: [r for t in ctx.tasks for r in ctx.train[t]]),
    "dirlora": Method("lora", "a fresh LoRA per task, each task answered by its own: needs the task identity at test",
                      start=lambda ctx, stage: load_adapter_state_dict(ctx.model, ctx.fresh),
                      answer=lambda ctx, stage, i: safetensors.torch.load_file(   # a trained task: its own LoRA
                          ctx.out / "adapters" / f"stage{i + 1}.safetensors") if i + 1 < stage else None),
    "lora": Method("lora", "SeqLoRA: one LoRA tuned through the tasks in order"),
    "replay": Method("lora", "SeqLoRA with a memory of earlier tasks' training samples mixed into each later task",
                     records=lambda ctx, stage: replay_mix(ctx.train, ctx.tasks, stage, ctx.cfg["replay_ratio"],
                                                           ctx.cfg["seed"])),
    "ewc": Method("lora", "SeqLoRA with the EWC penalty (lambda/2) sum F (theta - theta*)^2", end=ewc_end,
                  start=lambda ctx, stage: ctx.ewc and functools.partial(ewc_penalty, ctx.model, *ctx.ewc,
                                                                         ctx.cfg["ewc_lambda"])),
    "olora": Method("olora", "O-LoRA: a new LoRA per task, earlier ones frozen, the new A orthogonal to theirs",
                    start=olora_start),
    "dora": Method("dora", "DoRA: one weight-decomposed LoRA (magnitude and direction) tuned through the tasks"),
    "moelora": Method("moelora", "CoIN's MoELoRA: a dense mixture of LoRA experts tuned through the tasks"),
    "smolora": Method("smolora", "SMoLoRA: separable visual / instruction expert pools, routed per sample",
                      report=routing_report),
}


# ----------------------------------------------------------------------------------------------
# 5. The continual run: zero-shot row, then for each task in order: tune, save, evaluate every task.

SYNTHETIC = dict(n_train=1000, n_test=200)   # records per task of the synthetic mini-CoIN
CHECKPOINT_SECONDS = 300                     # a mid-stage checkpoint at most this often
# Adapter and training defaults. For a real checkpoint each method's paper's (DESIGN.md 7): SMoLoRA's lr 1e-4 and
# weight decay 0.01, CoIN's lr 2e-4 and 0, both at SMoLoRA's global batch of 64, 8 x 8 accumulated (ours for CoIN's
# methods: its 8 GPUs x 6-16 x 8 is 384-1024, a handful of steps on a few thousand records). For the tiny model a
# rank and learning rate in proportion to its width (128 against 4096) and epochs enough for it to learn a task.
PAPER_DEFAULTS = dict(r=128, alpha=256, experts=8, lr=2e-4, batch_size=8, grad_accum=8, epochs=1, weight_decay=0.0)
SMOLORA_PAPER_DEFAULTS = dict(PAPER_DEFAULTS, lr=1e-4, weight_decay=0.01)
TINY_DEFAULTS = dict(r=32, alpha=64, experts=8, lr=5e-3, batch_size=32, grad_accum=1, epochs=8, weight_decay=0.0)
PROJECTOR_LR_FACTOR = 0.2                    # SMoLoRA's projector adapters: 2e-5 against 1e-4 (DESIGN.md 2.3)
# where and how a run computes, not what: the only keys that may differ for --resume, or for a rerun to replace it
RUN_PLACE = ("out", "resume", "cache", "device", "dtype", "grad_checkpointing")
OWN_KNOBS = {"replay_ratio": "replay", "ewc_lambda": "ewc", "olora_lambda": "olora", "smolora_parts": "smolora",
             "if_routing": "smolora", "ins_encoder": "smolora"}   # None in the configuration of other methods' runs


def adapter_hparams(cfg, ins_dim=None):
    # dropout 0.05 on every adapter's input: the papers' MoE value and LLaVA's LoRA scripts' (a fair comparison)
    adapter, hparams = METHODS[cfg["method"]].adapter, dict(r=cfg["r"], alpha=cfg["alpha"], dropout=0.05)
    if adapter in ("moelora", "smolora"):
        hparams["num_experts"] = cfg["experts"]
    if adapter == "smolora":
        hparams.update(top_k=cfg["top_k"], parts=tuple(cfg["smolora_parts"].split(",")),
                       **({"ins_dim": ins_dim} if ins_dim else {}))
    if adapter == "olora":   # ours: rank r/T per task, the others' rank budget r shared, so the T A's can be orthogonal
        rank = max(1, cfg["r"] // len(cfg["tasks"]))            # the same scale s = alpha / r below
        hparams.update(r=rank, alpha=cfg["alpha"] * rank / cfg["r"], num_tasks=len(cfg["tasks"]))
    return hparams


def prepare_out(cfg):
    """Refuse an --out folder that holds another run; clear this run's own files unless resuming."""
    out = Path(cfg["out"])
    saved = out / "results.json"
    old = json.loads(saved.read_text()).get("config") or {} if saved.exists() else cfg
    differs = [k for k in cfg if k not in RUN_PLACE and old.get(k) != cfg[k]]
    if differs:
        raise ValueError(f"--out {out} holds a different run ({', '.join(f'{k}={old.get(k)!r}' for k in differs)}); "
                         f"choose another --out or delete that folder")
    if not cfg["resume"]:
        for stale in ("adapters", "predictions", "checkpoint.pt"):
            path = out / stale
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def evaluate(model, processor, task, records, path, cfg, progress=True):
    """(score, MIF) of the model on a task; the predictions are saved, and reused when resuming."""
    if cfg["resume"] and path.exists():
        predictions = eval.load_predictions(path)
    else:
        predictions = eval.generate_predictions(model, processor, records, task, batch_size=cfg["batch_size"],
                                                before_generate=lambda batch: route_batch(model, batch),
                                                desc=f"evaluating {task}", progress=progress)
        eval.save_predictions(path, predictions)
    return eval.score_predictions(task, predictions)


def train_stage(model, processor, records, cfg, stage, out, name, penalty=None, progress=True):
    """Tune the adapters on one stage's records (stage `name`) in optimizer steps of grad_accum micro-batches; a
    checkpoint every CHECKPOINT_SECONDS and on Ctrl-C, from which --resume continues to the same bits."""
    size, accum = cfg["batch_size"], cfg["grad_accum"]
    steps = max(1, math.ceil(cfg["epochs"] * len(records) / (size * accum)))   # optimizer steps
    # the micro-batches, reshuffled each pass, drawn from the seed alone: a resumed run draws the same ones
    generator = torch.Generator().manual_seed(cfg["seed"] + stage)
    order = torch.cat([torch.randperm(len(records), generator=generator)
                       for _ in range(math.ceil(steps * accum * size / len(records)))]).tolist()
    optimizer = torch.optim.AdamW([{"params": [p for n, p in model.named_parameters() if p.requires_grad and
                                               ("multi_modal_projector" in n) == projector],
                                    "lr": cfg["lr"] * (PROJECTOR_LR_FACTOR if projector else 1)}
                                   for projector in (False, True)], weight_decay=cfg["weight_decay"])
    schedule = cosine_with_warmup(optimizer, steps)
    torch.manual_seed(cfg["seed"] + stage)          # adapter dropout: the same draws on every run
    checkpoint, start = out / "checkpoint.pt", 0
    if cfg["resume"] and checkpoint.exists():
        try:   # tensors, numbers and dicts only: a checkpoint.pt from elsewhere runs no code
            state = torch.load(checkpoint, weights_only=True)
        except pickle.UnpicklingError:
            raise ValueError(f"{checkpoint} holds more than tensors, numbers and dicts and is refused (loading it "
                             f"could run code); delete it to redo stage {stage} from its start") from None
        if state["stage"] == stage:
            load_adapter_state_dict(model, state["adapters"])
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
            torch.set_rng_state(state["rng"])
            start = state["step"]

    def save(done):
        buffer = io.BytesIO()
        torch.save({"stage": stage, "step": done, "adapters": adapter_state_dict(model), "rng": torch.get_rng_state(),
                    "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()}, buffer)
        eval.write_atomic(checkpoint, buffer.getvalue())
    collate, last_save = data.Collator(processor, train=True), time.time()
    model.train()
    bar = tqdm(range(start, steps), desc=f"stage {stage}: tuning on {name}", initial=start, total=steps,
               disable=not progress)
    for step in bar:
        rng = torch.get_rng_state()
        try:
            loss = train_step(model, [collate([records[i] for i in order[m * size:(m + 1) * size]]) for m in
                                      range(step * accum, (step + 1) * accum)], optimizer, schedule, penalty=penalty)
        except NaNLoss as e:
            kept = checkpoint if checkpoint.exists() else out / "adapters" / f"stage{stage - 1}.safetensors"
            raise NaNLoss(f"{e} at stage {stage} step {step}: stopped; the last good checkpoint is kept "
                          f"({kept if kept.exists() else 'none yet'}); lower --lr and rerun with --resume") from None
        except KeyboardInterrupt:   # the steps done are kept; a step cut short is dropped whole, its dropout draws too
            done = schedule.last_epoch                   # the steps taken (train_step's update is uninterrupted)
            if done == step:
                torch.set_rng_state(rng)
                optimizer.zero_grad(set_to_none=True)
            bar.close()
            save(done)
            raise KeyboardInterrupt(f"interrupted at stage {stage} step {done}; continue with --resume") from None
        bar.set_postfix(loss=f"{loss:.3f}")
        if time.time() - last_save > CHECKPOINT_SECONDS and step + 1 < steps:
            save(step + 1)
            last_save = time.time()
    model.eval()


def ensure_tiny_model(cache, progress=True):
    path = Path(cache) / TINY_MODEL
    if not (path / "config.json").exists():
        print(f"building the tiny base model in {path} (once)")
        pretrain_tiny_model(path, progress=progress)
    return path


def run(cfg, progress=True):
    """Tuning on cfg["tasks"] with cfg["method"]; returns the results dict (DESIGN.md section 8). The protocol: the
    zero-shot row; for each stage, the method's start, tuning, its end, every task evaluated; after the last, the
    method's report, then each few-shot tuning of an unseen task, from the final adapters (DESIGN.md 3)."""
    started, method = time.time(), METHODS[cfg["method"]]
    encoder = load_encoder(cfg["ins_encoder"]) if cfg["ins_encoder"] else None
    out, cache = prepare_out(cfg), Path(cfg["cache"])
    model_path, data_root = cfg["model"] or ensure_tiny_model(cache, progress), cfg["data"] or cache / "data-v1"
    tasks, unseen, fewshot = cfg["tasks"], cfg["unseen"], cfg["fewshot"]
    if not cfg["data"]:
        data.make_synthetic(data_root, list(dict.fromkeys(tasks + unseen + list(fewshot))), seed=0,
                            progress=progress, **SYNTHETIC)
    model, processor = load_model(model_path, cfg["device"], getattr(torch, cfg["dtype"]))
    if cfg["grad_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    embed = functools.partial(embed_instructions, model, processor, encoder=encoder)

    def records(task, split, limit, instructions="default"):
        return with_instruction_embeddings(data.load_records(data_root, task, split, instructions)[:limit], task,
                                           cfg, embed)
    train = {t: records(t, "train", cfg["max_train"]) for t in tasks + list(fewshot)}
    test = {t: records(t, "test", cfg["max_test"], cfg["instructions"])
            for t in dict.fromkeys(tasks + unseen + list(fewshot))}
    stages = method.stages(tasks)

    def empty(columns):
        return {"tasks": list(columns), **{table: [[None] * len(columns) for _ in range(len(stages) + 1)]
                                           for table in ("matrix", "mif")}}
    notes = [method.notes,    # and SMoLoRA's knobs where they leave the paper's full method, routed per sample
             cfg["smolora_parts"] not in (None, "vu,if,fusion") and f"ablation: parts {cfg['smolora_parts']}",
             cfg["if_routing"] == "task" and "the IF router reads each task's canonical instruction, by its identity "
                                             "(an oracle, as officially)",
             cfg["ins_encoder"] and f"f(X_ins) by the sentence encoder {cfg['ins_encoder']}"]
    results = {"method": cfg["method"], **empty(tasks), "config": cfg, "stages": stages,
               "notes": "; ".join(filter(None, notes)), "seconds": None,
               **({"unseen": empty(unseen)} if unseen else {})}
    previous = out / "results.json"       # a resumed run's time so far counts
    earlier_seconds = cfg["resume"] and previous.exists() and json.loads(previous.read_text()).get("seconds") or 0
    ctx = SimpleNamespace(model=model, processor=processor, cfg=cfg, tasks=tasks, train=train, test=test, out=out,
                          ewc=None)

    def report(title):
        results["seconds"] = earlier_seconds + time.time() - started
        eval.write_report(out, results)
        if progress:
            print(f"\n{title}:\n" + (out / "matrix.md").read_text())

    def evaluate_row(stage):
        latest = adapter_state_dict(model) if method.answer and stage else None
        for i, task in enumerate(tasks + unseen):
            if latest is not None:      # the adapters the method answers this task with
                load_adapter_state_dict(model, method.answer(ctx, stage, i) or latest)
            table, column = (results, i) if i < len(tasks) else (results["unseen"], i - len(tasks))
            path = out / "predictions" / f"stage{stage}" / f"{task}.jsonl"
            table["matrix"][stage][column], table["mif"][stage][column] = evaluate(model, processor, task,
                                                                                   test[task], path, cfg, progress)
        report(f"after stage {stage} of {len(stages)}")

    def tune(saved, stage, name, records, start=lambda: None, config=cfg):
        """Tune on records(), with the penalty start() returns, and save; when resuming, load what was saved."""
        if cfg["resume"] and saved.exists():
            return load_adapter_state_dict(model, safetensors.torch.load_file(saved))
        penalty = start()
        train_stage(model, processor, records(), config, stage, out, name, penalty, progress)
        saved.parent.mkdir(exist_ok=True)
        eval.write_atomic(saved, safetensors.torch.save(adapter_state_dict(model)))
        (out / "checkpoint.pt").unlink(missing_ok=True)

    evaluate_row(0)
    if stages:
        torch.manual_seed(cfg["seed"])
        add_adapters(model, method.adapter, **adapter_hparams(cfg, encoder and encoder[0].config.hidden_size))
    ctx.fresh = adapter_state_dict(model)
    for stage, name in enumerate(stages, 1):
        tune(out / "adapters" / f"stage{stage}.safetensors", stage, name, lambda: method.records(ctx, stage),
             lambda: method.start(ctx, stage))
        method.end(ctx, stage)
        evaluate_row(stage)
    if not stages:
        return json.loads(previous.read_text())
    method.report(ctx)
    final = adapter_state_dict(model)
    for stage, (task, k) in enumerate([(t, k) for t, shots in fewshot.items() for k in shots], len(stages) + 1):
        load_adapter_state_dict(model, final)          # each k from the same final adapters
        tune(out / "adapters" / f"fewshot-{task}-{k}.safetensors", stage, f"{task}, {k} shots",   # one epoch on
             lambda: data.fewshot_records(train[task], k, cfg["seed"], task), config={**cfg, "epochs": 1})  # k a class
        path = out / "predictions" / f"fewshot-{k}" / f"{task}.jsonl"
        score, mif = evaluate(model, processor, task, test[task], path, cfg, progress)
        results.setdefault("fewshot", {}).setdefault(task, {})[str(k)] = {"score": score, "mif": mif}
        report(f"{task} after {k}-shot tuning")
    return json.loads(previous.read_text())


# ----------------------------------------------------------------------------------------------
# 6. The command line: `python smolora.py --tasks scienceqa,textvqa`.

def parse_names(text, flag, allowed, aliases):
    """A comma-separated list of distinct names among `allowed`, or an alias of a list (e.g. 'coin', 'all')."""
    names = list(aliases[text]) if text in aliases else [n.strip() for n in text.split(",") if n.strip()]
    if not names or len(set(names)) != len(names) or any(n not in allowed for n in names):
        raise ValueError(f"{flag} {text!r} is not allowed: give distinct comma-separated names among "
                         f"{', '.join(allowed)}, or {' or '.join(map(repr, aliases))}")
    return names


def parse_fewshot(specs, tasks):
    """--fewshot places365:5,10 (the flag repeatable) -> {"places365": [5, 10]}: tasks not trained, shots k >= 1."""
    fewshot = {}
    for spec in specs or []:
        task, _, shots = spec.partition(":")
        ks = [int(k) if k.strip().isdigit() else 0 for k in shots.split(",")]
        if task not in data.TASKS or task in tasks or task in fewshot or min(ks) < 1 or len(set(ks)) != len(ks):
            raise ValueError(f"--fewshot {spec!r} is not allowed: give TASK:K[,K...], a task not among --tasks (one "
                             f"of {', '.join(t for t in data.TASKS if t not in tasks)}) and distinct shots K >= 1")
        fewshot[task] = ks
    return fewshot


def parse_args(argv=None):
    # the flags in the order of the run's configuration (make_config), which results.json shows
    p = argparse.ArgumentParser(prog="smolora.py", description="Continual visual instruction tuning: tune a LLaVA "
                                "model on tasks one after another, evaluate every task after every stage.")
    p.add_argument("--method", default="smolora", help=f"{' | '.join(METHODS)}, or several (comma-separated) or "
                   "'all': each run in <out>/<method>, compared in <out>")
    p.add_argument("--tasks", required=True, help="task names in training order, or coin (CoIN's 8) or smolora")
    p.add_argument("--model", help="a LLaVA checkpoint folder or id (default: the tiny model, built once)")
    p.add_argument("--data", help="a CoIN-format data root (default: the synthetic mini-CoIN, made once)")
    p.add_argument("--out", help="the run folder (default: runs/<method>-<tasks>, or runs/compare-<tasks>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from where it stopped")
    p.add_argument("--cache", default=str(CACHE), help="the tiny model's and synthetic data's folder ($SMOLORA_CACHE)")
    p.add_argument("--seed", type=int, default=0, help="seed of adapter init, data order and dropout")
    p.add_argument("--r", type=int, help="total adapter rank (olora: shared by the tasks, r/T each)")
    p.add_argument("--alpha", type=float, help="LoRA alpha: the scale is alpha / r")
    p.add_argument("--experts", type=int, help="number of experts (MoELoRA, SMoLoRA)")
    p.add_argument("--lr", type=float, help="the LLM adapters' (projector's x0.2); --model: 1e-4 smolora, else 2e-4")
    p.add_argument("--batch-size", type=int, help="training (micro-)batch and evaluation batch size")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 8 with --model, else 1)")
    p.add_argument("--epochs", type=float, help="passes over each task's training records")
    p.add_argument("--weight-decay", type=float, help="AdamW's (default 0.01 for smolora with --model, else 0)")
    p.add_argument("--top-k", type=int, default=1, help="experts kept per pool by SMoLoRA's routers (paper: 1)")
    p.add_argument("--max-train", type=int, help="use at most this many training records per task")
    p.add_argument("--max-test", type=int, help="evaluate on at most this many test records per task")
    p.add_argument("--replay-ratio", type=float, default=REPLAY_RATIO, help="replay: memory samples per own record")
    p.add_argument("--ewc-lambda", type=float, default=EWC_LAMBDA, help="ewc: weight of the EWC penalty")
    p.add_argument("--olora-lambda", type=float, default=OLORA_LAMBDA, help="olora: weight of the orthogonality loss")
    p.add_argument("--unseen", help="comma-separated tasks never trained, evaluated after every stage (not in AP)")
    p.add_argument("--instructions", default="default", choices=("default", "diverse"),
                   help="diverse: evaluate with paraphrased instructions never trained on")
    p.add_argument("--fewshot", action="append", help="TASK:K[,K...]: after the last stage, tune the final adapters "
                   "1 epoch on K examples per class of an untrained task; evaluate it apart")
    p.add_argument("--smolora-parts", help="SMoLoRA's ablation: vu | if | vu,if | vu,if,fusion (default, the paper's)")
    p.add_argument("--if-routing", choices=("sample", "task"), help="SMoLoRA's IF router reads the sample's own "
                   "instruction (default) or its task's canonical one (an oracle of the task's identity)")
    p.add_argument("--ins-encoder", help="SMoLoRA: embed instructions with this sentence encoder folder, mean-pooled")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default bfloat16 on cuda, else float32")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations to save memory")
    return p.parse_args(argv)


def make_config(args, method=None):
    """`method`'s run configuration (default --method's first): the flags, else the real or tiny model's defaults."""
    methods = parse_names(args.method, "--method", METHODS, {"all": METHODS})
    method, task_lists = method or methods[0], {"coin": data.COIN_TASKS, "smolora": data.SMOLORA_TASKS}
    tasks = parse_names(args.tasks, "--tasks", data.TASKS, task_lists)
    unseen = parse_names(args.unseen, "--unseen", data.TASKS, task_lists) if args.unseen else []
    if set(unseen) & set(tasks):
        raise ValueError(f"--unseen {args.unseen!r} is not allowed: unseen tasks must not be among --tasks")
    defaults = (SMOLORA_PAPER_DEFAULTS if method == "smolora" else PAPER_DEFAULTS) if args.model else TINY_DEFAULTS
    defaults = {**defaults, "smolora_parts": "vu,if,fusion", "if_routing": "sample",
                "dtype": "bfloat16" if args.device.startswith("cuda") else "float32"}
    cfg = {k: defaults.get(k) if v is None else v for k, v in vars(args).items()}
    cuda = re.fullmatch(r"cuda(:\d+)?", args.device)   # a CPU computes in all three dtypes
    if not (cuda or args.device == "cpu") or cuda and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device} is not allowed: choose cpu, or cuda or cuda:N on a machine with "
                         f"CUDA (this one has {'' if torch.cuda.is_available() else 'no '}CUDA)")
    if cuda and cfg["dtype"] == "bfloat16" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"--dtype bfloat16 is not allowed on {torch.cuda.get_device_name(args.device)}, which "
                         f"cannot compute in it: choose float16 or float32")
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is not allowed: it is a file; give a folder for the run")
    for name, value in vars(args).items():   # every number but the seed
        least = "0 or more" if name == "weight_decay" else "positive"
        if type(value) in (int, float) and name != "seed" and (value < 0 or value == 0 and least == "positive"):
            raise ValueError(f"--{name.replace('_', '-')} {value} is not allowed: it must be {least}")
    if args.replay_ratio > 1:
        raise ValueError(f"--replay-ratio {args.replay_ratio} is not allowed: it must be in (0, 1]")
    for flag in ("smolora_parts", "if_routing", "ins_encoder"):
        if getattr(args, flag) is not None and "smolora" not in methods:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)!r} is not allowed with --method "
                             f"{args.method!r}: it is SMoLoRA's")
    parts = cfg["smolora_parts"]
    if tuple(parts.split(",")) not in SMOLORA_PARTS:
        raise ValueError(f"--smolora-parts {parts!r} is not allowed: choose "
                         f"{' | '.join(','.join(p) for p in SMOLORA_PARTS)}")
    variant = [parts.replace(",", "+") if parts != "vu,if,fusion" else "", args.if_routing == "task" and "task-routing",
               args.ins_encoder and "encoder"] if method == "smolora" else []    # a SMoLoRA variant: its own folder
    out = args.out or f"runs/{'-'.join([method, *filter(None, variant)])}-{'-'.join(tasks)}"
    if len(methods) > 1:
        out = Path(args.out or f"runs/compare-{'-'.join(tasks)}") / method
    # a method's own knobs only in its runs, so that they name them
    return {**cfg, "method": method, "tasks": tasks, "data": str(Path(args.data).resolve()) if args.data else None,
            "out": str(out), "unseen": unseen, "fewshot": parse_fewshot(args.fewshot, tasks),
            **{k: None for k, owner in OWN_KNOBS.items() if owner != method}}


def main(argv=None):
    try:
        args = parse_args(argv)
        methods = parse_names(args.method, "--method", METHODS, {"all": METHODS})
        configs = [make_config(args, method) for method in methods]   # all checked first
        runs = []
        for cfg in configs:
            print("configuration: " + ", ".join(f"{k}={v}" for k, v in cfg.items()))
            runs.append(run(cfg))
            print(f"{cfg['method']} done in {runs[-1]['seconds']:.0f} s: " + ", ".join(
                f"{k} {v:.1f}" for k, v in runs[-1]["metrics"].items() if v is not None) +
                f"; report in {cfg['out']}/matrix.md")
        if len(configs) > 1:
            folder = Path(configs[0]["out"]).parent
            eval.write_comparison(folder, runs)
            print(f"comparison of {', '.join(r['method'] for r in runs)} in {folder}/compare.md and compare.png")
    except ValueError as e:   # bad input, a NaN loss: one line, exit status 2, nothing saved is lost
        print(f"smolora.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:   # Ctrl-C: training saved its step (train_stage), evaluation its finished tasks
        print(str(e) or "interrupted; what was saved is kept: continue with --resume", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
