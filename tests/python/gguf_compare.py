"""A GGUF written by `bake gguf` against its input, read with gguf-py (llama.cpp's own reader), not bake's
(used by tests/gguf.rs).

Usage: gguf_compare.py INPUT_GGUF OUTPUT_GGUF BAKED_FOLDER
Prints one JSON object:
  architecture        the output's general.architecture
  same_metadata       every input key is in the output with the same value (a qwen2 file's `qwen2.*` keys as
                      `llama.*`, general.architecture as llama), in the same order, before bake's `bake.*` keys
  provenance          the output's `bake.*` keys
  copied, identical   input tensors found in the output with their type and shape, and how many have the
                      input's bytes exactly
  permuted            query/key tensors whose bytes are the input's rows reordered from rotary halves to
                      adjacent pairs (llama.cpp's converter's permutation), row by row, for a rewritten qwen2
  added               tensors the input lacks, and for each `blk.N.attn_output.bias` (`blk.N.ffn_down.bias`)
                      whether it equals the baked folder's o_proj (down_proj) bias of layer N (as f32) exactly
"""
import json
import os
import sys

import numpy as np
from gguf import GGUFReader
from safetensors import safe_open

input_path, output_path, baked = sys.argv[1:4]
src, out = GGUFReader(input_path), GGUFReader(output_path)
arch = lambda r: r.fields["general.architecture"].contents()
rewritten = arch(src) == "qwen2" and arch(out) == "llama"


def renamed(key):
    return "llama." + key[len("qwen2."):] if rewritten and key.startswith("qwen2.") else key


def value(reader, key):
    return reader.fields[key].contents()


skip = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}
src_keys = [k for k in src.fields if k not in skip]
out_keys = [k for k in out.fields if k not in skip]
same = out_keys[: len(src_keys)] == [renamed(k) for k in src_keys] and all(
    value(out, renamed(k)) == ("llama" if rewritten and k == "general.architecture" else value(src, k)) for k in src_keys
)
provenance = {k: value(out, k) for k in out_keys[len(src_keys):]}


def heads_of(name):
    part = name.split(".")[2] if name.startswith("blk.") else ""
    return {"attn_q": value(src, "qwen2.attention.head_count"), "attn_k": value(src, "qwen2.attention.head_count_kv")}.get(part) if rewritten else None


def interleaved(raw, heads):
    rows = raw.reshape(raw.shape[0], -1) if raw.ndim > 1 else raw.reshape(-1, 1)
    n = rows.shape[0]
    half = n // heads // 2
    return rows.reshape(heads, 2, half, -1).swapaxes(1, 2).reshape(raw.shape)


out_tensors = {t.name: t for t in out.tensors}
copied = identical = permuted = 0
for t in src.tensors:
    o = out_tensors.get(t.name)
    if o is None or o.tensor_type != t.tensor_type or list(o.shape) != list(t.shape):
        continue
    copied += 1
    a, b = np.asarray(t.data), np.asarray(o.data)
    heads = heads_of(t.name)
    if heads is None:
        identical += int(a.tobytes() == b.tobytes())
    else:
        permuted += int(interleaved(a, heads).tobytes() == b.tobytes())



def baked_tensor(name):
    index = os.path.join(baked, "model.safetensors.index.json")
    file = json.load(open(index))["weight_map"][name] if os.path.exists(index) else "model.safetensors"
    with safe_open(os.path.join(baked, file), "pt") as st:
        return st.get_tensor(name).float().numpy()


added = {}
src_names = {t.name for t in src.tensors}
for t in out.tensors:
    if t.name in src_names:
        continue
    layer = int(t.name.split(".")[1])
    hf_name = {"attn_output.bias": "self_attn.o_proj.bias", "ffn_down.bias": "mlp.down_proj.bias"}.get(t.name.split(".", 2)[2])
    theirs = baked_tensor(f"model.layers.{layer}.{hf_name}") if hf_name else None
    added[t.name] = bool(theirs is not None and np.array_equal(np.asarray(t.data, dtype=np.float32), theirs))

print(json.dumps({
    "architecture": arch(out),
    "same_metadata": same,
    "provenance": {k: v if not isinstance(v, list) else v[:3] for k, v in provenance.items()},
    "input_tensors": len(src.tensors),
    "copied": copied,
    "identical": identical,
    "permuted": permuted,
    "added": added,
}))
