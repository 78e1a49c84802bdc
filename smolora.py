"""smolora: continual visual instruction tuning with LoRA, MoELoRA (CoIN) and SMoLoRA, written by hand.

Read top to bottom beside the papers (DESIGN.md section 2 holds the equations):
  1. the adapters: LoRALinear, MoELoRALinear, SMoLoRALinear, each forward beside its formula;
  2. putting them into a LLaVA model: add_adapters, set_routing, the adapter state dict.
Notation as in the papers: x a token's input to a linear layer, W0 the frozen weight, r the total rank,
s = alpha / r the LoRA scale (the TOTAL rank r in both papers' code, also for the mixtures).
"""
import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F


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

    @torch.no_grad()
    def merge(self):
        """W = W0 + s B A: the layer then costs what the plain linear costs."""
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """W0 = W - s B A: back to the frozen weight, the adapter separate again."""
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False


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

    Stacked form (ours, exactly equal): z = A_all x for all experts in one matmul, each expert's
    r/E-slice of z scaled by its g_e, then one matmul with B_all. One LoRA's cost instead of E.
    """

    def __init__(self, base: nn.Linear, r=128, alpha=256, num_experts=8, dropout=0.05):
        super().__init__()
        self.base, self.r, self.num_experts, self.scaling = base, r, num_experts, alpha / r
        self.lora_A, self.lora_B = _expert_weights(base, r, num_experts)
        self.router = nn.Linear(base.in_features, num_experts, bias=False,
                                device=base.weight.device, dtype=torch.float32)
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


class SMoLoRALinear(nn.Module):
    """SMoLoRA: a separable mixture of LoRA, two pools of E/2 experts and two routers (DESIGN.md 2.3).

    Experts [0, E/2) form the visual-understanding (VU) pool, [E/2, E) the instruction-following (IF) pool.
        G_vu = softmax(top_k(R_vu . Avg(x)))              per sample; Avg over this layer's input
        G_if = softmax(top_k(R_if . f(X_ins)))            per sample; f the instruction embedding
        x_vu = sum_{i in VU} G_vu,i * s * B_i A_i x       x_if likewise over the IF pool
        [alpha_t, beta_t] = softmax([I_vu . x_vu, I_if . x_if])        per token ("adaptive fusion")
        h = W0 x + alpha_t * x_vu + beta_t * x_if

    With top_k = 1 (the paper's setting) the softmax over one kept logit is the constant 1, so R_vu and
    R_if receive no gradient: the papers' routers are never trained and stay the random projections
    they were initialised as. That is what the official code does too; with top_k >= 2 they learn.
    """

    def __init__(self, base: nn.Linear, r=128, alpha=256, num_experts=8, top_k=1, ins_dim=None,
                 dropout=0.05):
        super().__init__()
        if num_experts < 2 or num_experts % 2:
            raise ValueError(f"num_experts={num_experts} is not allowed for SMoLoRA: "
                             f"it must be even (two pools of E/2 experts)")
        pool = num_experts // 2
        if not 1 <= top_k <= pool:
            raise ValueError(f"top_k={top_k} is not allowed with num_experts={num_experts}: "
                             f"top_k must be between 1 and the pool size {pool}")
        self.base, self.r, self.num_experts, self.top_k = base, r, num_experts, top_k
        self.scaling = alpha / r
        self.lora_A, self.lora_B = _expert_weights(base, r, num_experts)
        kw = dict(device=base.weight.device, dtype=torch.float32)
        self.vu_router = nn.Linear(base.in_features, pool, bias=False, **kw)                # R_vu
        self.if_router = nn.Linear(ins_dim or base.in_features, pool, bias=False, **kw)     # R_if
        # I_vu, I_if: the paper writes no bias; the official code's Linear(out, 1) carries one.
        self.fuse_vu = nn.Linear(base.out_features, 1, **kw)
        self.fuse_if = nn.Linear(base.out_features, 1, **kw)
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
        rank = self.lora_A.shape[1]
        # Stacked form: gather each sample's kept experts, one batched matmul for all their A, one for all B.
        A = self.lora_A[experts].flatten(1, 3)                         # (B, 2*k*rank, in)
        z = torch.bmm(self.dropout(x), A.transpose(1, 2))              # A_i x                (B, L, 2*k*rank)
        z = z.unflatten(-1, (2, self.top_k, rank)) * (self.scaling * gates)[:, None, :, :, None]
        z = z.flatten(-2)                                              # G_i s A_i x, VU | IF (B, L, 2, k*rank)
        B = self.lora_B[experts].transpose(-1, -2).flatten(2, 3)      # B_i^T, VU | IF       (B, 2, k*rank, out)
        # I . x_pool = (I B_pool) . z_pool: the fusion logits are read in the rank space, so x_vu and x_if
        # (B, L, out) each) are never built apart (ours, exactly equal, about a third of the layer's time).
        I = torch.stack([self.fuse_vu.weight, self.fuse_if.weight])   # I_vu, I_if           (2, 1, out)
        IB = (B @ I.transpose(1, 2)).squeeze(-1)                       # I_pool B_pool        (B, 2, k*rank)
        logits = (z * IB[:, None]).sum(-1) + torch.cat([self.fuse_vu.bias, self.fuse_if.bias])  # (B, L, 2)
        fusion = torch.softmax(logits, dim=-1)                         # [alpha_t, beta_t]    (B, L, 2)
        delta = torch.bmm((z * fusion.unsqueeze(-1)).flatten(2), B.flatten(1, 2))  # alpha_t x_vu + beta_t x_if
        return h + delta.to(h.dtype)                                   # h = W0 x + alpha_t x_vu + beta_t x_if


ADAPTERS = (LoRALinear, MoELoRALinear, SMoLoRALinear)


# ----------------------------------------------------------------------------------------------
# 2. Adapters in a LLaVA model (module names of transformers' LlavaForConditionalGeneration, as in
#    llava-hf/llava-1.5-7b-hf): where each method goes (DESIGN.md 2.2 / 2.3), routing, state dicts.

LLM_LINEARS = r"model\.language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"
TARGETS = {
    "lora": (LLM_LINEARS,),                      # every linear of the LLM (q, k, v, o, gate, up, down)
    "moelora": (LLM_LINEARS,),
    "smolora": (r"model\.language_model\.layers\.\d+\.mlp\.(gate|up|down)_proj",  # the LLM's MLP
                r"model\.multi_modal_projector\.linear_[12]"),                    # and both projector linears
}
HPARAMS = {"lora": {"r", "alpha", "dropout"},
           "moelora": {"r", "alpha", "dropout", "num_experts"},
           "smolora": {"r", "alpha", "dropout", "num_experts", "top_k"}}


def add_adapters(model, method, targets=None, **hparams):
    """Wrap the method's target linears in place, freeze everything else; return the wrapped names.

    `targets` (regular expressions matched against whole module names) overrides the method's defaults.
    """
    if method not in TARGETS:
        raise ValueError(f"unknown method {method!r}: allowed are {', '.join(TARGETS)}")
    unknown = set(hparams) - HPARAMS[method]
    if unknown:
        raise ValueError(f"hyper-parameter(s) {', '.join(sorted(unknown))} not allowed for {method}: "
                         f"allowed are {', '.join(sorted(HPARAMS[method]))}")
    patterns = [re.compile(p) for p in (targets or TARGETS[method])]
    names = [name for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and any(p.fullmatch(name) for p in patterns)]
    if not names:
        raise ValueError(f"targets {list(targets or TARGETS[method])} match no linear module of "
                         f"{type(model).__name__}: give regular expressions over its module names")
    model.requires_grad_(False)
    ins_dim = model.get_input_embeddings().embedding_dim
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        if method == "lora":
            adapter = LoRALinear(base, **hparams)
        elif method == "moelora":
            adapter = MoELoRALinear(base, **hparams)
        else:
            adapter = SMoLoRALinear(base, ins_dim=ins_dim, **hparams)
            # top-1 routers get no gradient (see SMoLoRALinear): keep them out of the optimizer.
            adapter.vu_router.requires_grad_(adapter.top_k > 1)
            adapter.if_router.requires_grad_(adapter.top_k > 1)
        adapter.base.requires_grad_(False)
        adapter.train(base.training)   # a new module starts in training mode: follow the model's
        setattr(parent, child, adapter)
    return names


def instruction_embedding(model, input_ids, ins_mask):
    """f(X_ins) (ours): the mean of the frozen input embeddings over the instruction's tokens.  (B, d)"""
    with torch.no_grad():
        embeddings = model.get_input_embeddings()(input_ids).float()  # (B, L, d)
    m = ins_mask.to(embeddings.dtype).unsqueeze(-1)                   # (B, L, 1)
    return (embeddings * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)


def set_routing(model, mask, ins):
    """Hand every SMoLoRA layer what its routers see: the attention mask (B, L) and f(X_ins) (B, d).

    The projector's layers see the image tokens only, which carry no padding: they average over all of them.
    """
    for name, module in model.named_modules():
        if isinstance(module, SMoLoRALinear):
            module.set_routing(None if "multi_modal_projector" in name else mask, ins)


def route_batch(model, batch):
    """set_routing from a collated batch (input_ids, attention_mask, ins_mask)."""
    set_routing(model, batch["attention_mask"],
                instruction_embedding(model, batch["input_ids"], batch["ins_mask"]))


def adapter_state_dict(model):
    """Only the adapter tensors (experts, routers, fusion vectors), keyed by their full names."""
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, ADAPTERS):
            for key, tensor in module.state_dict().items():
                if not key.startswith("base."):
                    state[f"{name}.{key}"] = tensor.detach().clone()
    return state


def load_adapter_state_dict(model, state):
    """Load what adapter_state_dict saved; the keys must match the model's adapters exactly."""
    own = adapter_state_dict(model)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    reshaped = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or reshaped:
        raise ValueError(f"adapter state does not fit this model: missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}, other shape {reshaped[:3]} (same method and hyper-parameters?)")
    model.load_state_dict(state, strict=False)
