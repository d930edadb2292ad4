"""A tiny randomly initialised checkpoint of another model family, made by transformers (the independent
reference for tests/families.rs), and transformers' own outputs on it.

Usage: make_family_model.py FAMILY OUT TOKENIZER_DIR PROMPTS_JSON
FAMILY: mistral (GQA, an explicit head_dim unlike hidden/heads, untied embeddings), qwen2 (GQA, random q/k/v
biases, tied embeddings, rope_theta 1e6) or qwen3 (GQA, explicit head_dim, per-head q/k norms with random
weights, untied embeddings). The tokenizer files of TOKENIZER_DIR are copied beside the weights.
Prints one JSON object: per prompt (a list of token ids), the last position's logits and every layer's
o_proj input at the last token, in float32 with eager attention.
"""
import json
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config, Qwen3Config

family, out, tokenizer_dir, prompts = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), json.loads(sys.argv[4])
common = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=49152, max_position_embeddings=512, rms_norm_eps=1e-5, initializer_range=0.1, bos_token_id=1,
    eos_token_id=2, pad_token_id=2,
)
if family == "mistral":
    config = MistralConfig(**common, head_dim=32, sliding_window=None, tie_word_embeddings=False)
elif family == "qwen2":
    config = Qwen2Config(**common, rope_theta=1_000_000.0, use_sliding_window=False, tie_word_embeddings=True)
elif family == "qwen3":
    config = Qwen3Config(**common, head_dim=32, rope_theta=1_000_000.0, use_sliding_window=False,
                         tie_word_embeddings=False)
else:
    sys.exit(f"unknown family {family}")
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
with torch.no_grad():
    for name, p in model.named_parameters():
        if name.endswith("_proj.bias"):  # transformers initialises biases to zero; make them count
            p.normal_(0.0, 0.1)
        if name.endswith(("q_norm.weight", "k_norm.weight")):  # and norms to one
            p.uniform_(0.5, 1.5)
model.save_pretrained(out)
for name in ["tokenizer.json", "tokenizer_config.json"]:
    shutil.copy(tokenizer_dir / name, out / name)

model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
captured = {}
for l, layer in enumerate(model.model.layers):
    layer.self_attn.o_proj.register_forward_pre_hook(lambda _, args, l=l: captured.__setitem__(l, args[0][0, -1]))
cases = []
for ids in prompts:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    cases.append({"last_logits": logits.tolist(), "o_proj_input_last_token": [captured[l].tolist() for l in range(3)]})
print(json.dumps({"architecture": type(model).__name__, "cases": cases}))
