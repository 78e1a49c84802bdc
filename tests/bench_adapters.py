"""Speed of the adapters: forward + backward on one 2048x2048 linear, a batch of 4 x 256 tokens.

    python -m tests.bench_adapters [--device cuda] [--dtype bfloat16]

Compares the frozen linear alone (forward + the gradient to its input, what any adapter must pay)
with LoRA r=128, MoELoRA (E=8, r=128) and SMoLoRA (E=8, r=128, top-1), all with dropout 0.05.
"""
import argparse
import time

import torch
import torch.nn as nn

from smolora import LoRALinear, MoELoRALinear, SMoLoRALinear


def make_step(layer, x, mask, ins):
    def step():
        x.grad = None
        out = layer(x, mask, ins) if isinstance(layer, SMoLoRALinear) else layer(x)
        out.backward(torch.ones_like(out))
        if x.is_cuda:
            torch.cuda.synchronize()
    return step


def best_seconds_per_step(steps_by_name, steps, rounds=7):
    """Round-robin over the layers, the best round of each: the least disturbed by the rest of the machine."""
    best = dict.fromkeys(steps_by_name, float("inf"))
    for step in steps_by_name.values():
        for _ in range(3):
            step()
    for _ in range(rounds):
        for name, step in steps_by_name.items():
            start = time.perf_counter()
            for _ in range(steps):
                step()
            best[name] = min(best[name], (time.perf_counter() - start) / steps)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    base = nn.Linear(2048, 2048, bias=False, device=args.device, dtype=dtype).requires_grad_(False)
    x = torch.randn(4, 256, 2048, device=args.device, dtype=dtype, requires_grad=True)
    mask, ins = torch.ones(4, 256, device=args.device), torch.randn(4, 2048, device=args.device)
    layers = {
        "frozen linear": base,
        "LoRA r=128": LoRALinear(base, r=128, alpha=256, dropout=0.05),
        "MoELoRA E=8 r=128": MoELoRALinear(base, r=128, alpha=256, num_experts=8, dropout=0.05),
        "SMoLoRA E=8 r=128 top-1": SMoLoRALinear(base, r=128, alpha=256, num_experts=8, dropout=0.05),
    }
    times = best_seconds_per_step({name: make_step(layer, x, mask, ins) for name, layer in layers.items()}, args.steps)
    print(f"| layer ({args.device}, {args.dtype}) | ms / step | x frozen | x LoRA |")
    print("|---|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {1000 * t:.1f} | {t / times['frozen linear']:.2f} | {t / times['LoRA r=128']:.2f} |")


if __name__ == "__main__":
    main()
