"""Independent check of bake's residual-stream capture (tests/methods.rs): each prompt through stock transformers
(float32, one prompt at a time), each decoder layer's output read by a forward hook, averaged over the prompt's
last N tokens, against what bake captured. Prints one JSON line."""
import json
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

d = Path(sys.argv[1])
spec = json.loads((d / "spec.json").read_text())
model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32).eval()
layers, width, n = spec["layers"], spec["width"], spec["tokens"]
ours = np.fromfile(d / "residual.f32", dtype="<f4").reshape(len(spec["prompts"]), layers, width)

outputs = {}
for l, layer in enumerate(model.model.layers):
    layer.register_forward_hook(lambda m, a, out, l=l: outputs.__setitem__(l, out[0] if isinstance(out, tuple) else out))
theirs = np.zeros_like(ours, dtype=np.float64)
for i, ids in enumerate(spec["prompts"]):
    with torch.no_grad():
        model(torch.tensor([ids]))
    for l in range(layers):
        theirs[i, l] = outputs[l][0, -n:].double().mean(dim=0).numpy()
diff = np.abs(ours - theirs)
print(json.dumps({
    "max_abs_diff": float(diff.max()),
    "max_abs_value": float(np.abs(theirs).max()),
    "max_rel_diff": float((diff / np.maximum(np.abs(theirs).max(axis=2, keepdims=True), 1e-6)).max()),
}))
