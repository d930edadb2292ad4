"""Independent check of a baked folder with stock transformers and pyvene 0.1.8 (used by tests/bake_end_to_end.rs).

Usage: check_baked.py BAKED_DIR BASE_DIR PROMPTS_JSON
PROMPTS_JSON: a list of token-id lists. Prints one JSON object:
  loading: transformers' loading info for the baked model (missing/unexpected/mismatched keys) and warnings
  baked_logits / base_logits: last-position logits of each prompt (float32 compute)
  hooked_logits: the base's, with each δ of activation_diff.safetensors added by a torch hook where its name
    says (`self_attn.o_proj.input`: a pre-hook on o_proj; `mlp.down_proj.output`: a hook on the layer's MLP
    output), independently of bake's own forward pass
  baked_tokens / pyvene_tokens: greedy continuations (8 tokens) of each prompt, baked vs base + pyvene diff
"""
import json
import logging
import sys
import warnings

import torch
import transformers
from transformers import AutoModelForCausalLM

baked_dir, base_dir, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])

records = []
handler = logging.Handler()
handler.emit = lambda record: records.append(record.getMessage())
transformers.logging.get_logger().addHandler(handler)
transformers.logging.set_verbosity_warning()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    baked, info = AutoModelForCausalLM.from_pretrained(baked_dir, dtype=torch.float32, output_loading_info=True)
loading = {k: sorted(map(str, v)) for k, v in info.items() if k != "error_msgs"}
loading["warnings"] = [m for m in records if "initialized" in m or "not used" in m or "newly" in m]
loading["warnings"] += [str(w.message) for w in caught if "initialized" in str(w.message)]
base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
baked.eval()
base.eval()

def last_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].tolist()

def greedy(model, ids, **kwargs):
    out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=0, **kwargs)
    return out[0, len(ids):].tolist()

import pyvene as pv
from pyvene.models import intervenable_modelcard as cards

# pyvene 0.1.8 predates Qwen3; its module layout is Qwen2's (model.layers[l].self_attn.o_proj), so it is
# registered as Qwen2 is, as the README tells users to.
if hasattr(transformers, "Qwen3ForCausalLM"):
    for table in (cards.type_to_module_mapping, cards.type_to_dimension_mapping):
        table.setdefault(transformers.Qwen3ForCausalLM, table[transformers.Qwen2ForCausalLM])

def hooked_logits(base_dir, prompts):
    """The base with every δ added by a plain torch hook at the module its name names."""
    from safetensors import safe_open
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    handles = []
    with safe_open(f"{baked_dir}/activation_diff.safetensors", "pt") as f:
        for name in f.keys():
            layer = model.model.layers[int(name.split(".")[1])]
            delta = f.get_tensor(name).to(torch.float32)
            if name.endswith("self_attn.o_proj.input.delta"):
                hook = lambda m, args, d=delta: (args[0] + d,) + tuple(args[1:])
                handles.append(layer.self_attn.o_proj.register_forward_pre_hook(hook))
            elif name.endswith("mlp.down_proj.output.delta"):
                handles.append(layer.mlp.register_forward_hook(lambda m, args, out, d=delta: out + d))
            else:
                raise SystemExit(f"unknown diff tensor {name}")
    logits = [last_logits(model, ids) for ids in prompts]
    for h in handles:
        h.remove()
    return logits

pv_model = pv.IntervenableModel.load(f"{baked_dir}/activation_diff", base)
pv_model.set_device("cpu")
pyvene_tokens = []
for ids in prompts:
    with torch.no_grad():
        _, out = pv_model.generate(
            {"input_ids": torch.tensor([ids])}, unit_locations=None, intervene_on_prompt=True,
            max_new_tokens=8, do_sample=False, pad_token_id=0,
        )
    pyvene_tokens.append(out[0, len(ids):].tolist())
pv_model.disable_model_gradients()
# pyvene hooks live on `base`; drop them before using it as the plain base model.
del pv_model
base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()

print(json.dumps({
    "loading": loading,
    "baked_logits": [last_logits(baked, ids) for ids in prompts],
    "base_logits": [last_logits(base, ids) for ids in prompts],
    "hooked_logits": hooked_logits(base_dir, prompts),
    "baked_tokens": [greedy(baked, ids) for ids in prompts],
    "pyvene_tokens": pyvene_tokens,
}))
