"""How far transformers' own bf16 forward is from its f32 forward at every layer's o_proj input (used by
tests/precision.rs as the bound for bake's bf16 pass: bf16 done right is no further off than PyTorch's).

Usage: bf16_reference.py MODEL_DIR PROMPTS_JSON_FILE
PROMPTS_JSON_FILE: a list of token-id lists. Each prompt runs alone (no padding), eager attention.
Prints one JSON object: relative_rms, per layer, sqrt(sum (bf16 - f32)^2 / sum f32^2) over the prompts' last
tokens.
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM

model_dir, prompts = sys.argv[1], json.load(open(sys.argv[2]))
torch.manual_seed(0)


def capture(dtype):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager").eval()
    layers = model.model.layers
    rows = [[] for _ in layers]
    hooks = [
        layer.self_attn.o_proj.register_forward_pre_hook(lambda _, args, l=l: rows[l].append(args[0][0, -1].float()))
        for l, layer in enumerate(layers)
    ]
    with torch.no_grad():
        for ids in prompts:
            model.model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    return [torch.stack(r) for r in rows]


full, half = capture(torch.float32), capture(torch.bfloat16)
relative = [float(((h - f).pow(2).sum() / f.pow(2).sum()).sqrt()) for f, h in zip(full, half)]
print(json.dumps({"relative_rms": relative, "prompts": len(prompts)}))
