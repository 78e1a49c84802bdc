"""The README's LLaVA-1.5-7B memory table, computed: the model built from llava-1.5-7b-hf's configuration on the
`meta` device (shapes only: no weights, no memory), each method's adapters added as a run adds them, and the exact
trainable parameters and bytes counted. Activations are not counted here (they depend on the kernels): the README
gives them as an estimate.

    python tests/llava7b_memory.py
"""
import os
import sys

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import smolora  # noqa: E402

# llava-hf/llava-1.5-7b-hf's config.json: CLIP ViT-L/14 at 336 px, feature layer -2, Vicuna-7B, a 2-layer GELU MLP
CONFIG = LlavaConfig(
    vision_config=CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                   num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768),
    text_config=LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                            num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096),
    vision_feature_layer=-2, vision_feature_select_strategy="default", image_token_index=32000,
    projector_hidden_act="gelu", pad_token_id=32001)
ROWS = {"lora": "LoRA r=128 (q, k, v, o, gate, up, down); also multitask, dirlora, replay",
        "ewc": "EWC: LoRA + its Fisher F and anchor theta* (fp32)",
        "olora": "O-LoRA r=128 shared by 8 tasks (16 each), earlier ones frozen",
        "dora": "DoRA r=128 (LoRA's targets) and its magnitude m",
        "moelora": "MoELoRA E=8 r=128",
        "smolora": "SMoLoRA E=8 r=128 (MLP + projector)"}


def count(method):
    """(trainable parameters, bytes of adapters + gradients + AdamW's two moments, bytes of the bf16 weights)."""
    cfg = smolora.Config.paper(method, tasks="coin", model="llava-1.5-7b")
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(CONFIG)
        weights = sum(p.numel() for p in model.parameters()) * 2                           # bfloat16
        smolora.add_adapters(model, smolora.METHODS[method].adapter, **smolora.adapter_hparams(cfg))
    adapters = sum(t.numel() for t in smolora.adapter_state_dict(model).values()) * 4      # float32, frozen parts too
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    extra = 2 * trainable * 4 if method == "ewc" else 0                                     # F and theta*
    return trainable, adapters + trainable * 4 * 3 + extra, weights                         # + gradient, 2 moments


if __name__ == "__main__":
    print("| method | trainable parameters | adapters + gradients + AdamW (fp32) | weights (bf16) |")
    print("|---|---:|---:|---:|")
    for method, label in ROWS.items():
        trainable, state, weights = count(method)
        print(f"| {label} | {trainable / 1e6:.1f}M | {state / 1e9:.2f} GB | {weights / 1e9:.2f} GB |")
