"""llama.cpp (through llama-cpp-python, which vendors it) against transformers on a base and its bake: the
logits of each, and how the bake moves them in each runtime (used by tests/gguf.rs).

Usage: gguf_runtime.py HF_BASE HF_BAKED GGUF_BASE GGUF_BAKED PROMPTS_JSON_FILE
PROMPTS_JSON_FILE: a list of strings. Each is tokenized by the base's tokenizer.json (what bake uses) and
also by llama.cpp's own tokenizer; the same ids then run in both runtimes, one prompt at a time, llama.cpp with
an f32 KV cache (its default f16 cache rounds keys and values). Prints one JSON object of maxima over every
position and vocabulary entry:
  base_difference   |llama.cpp(base) - transformers(base)|
  baked_difference  |llama.cpp(bake) - transformers(bake)|
  move_transformers |transformers(bake) - transformers(base)|
  move_llama_cpp    |llama.cpp(bake) - llama.cpp(base)|
  move_difference   |(llama.cpp(bake) - llama.cpp(base)) - (transformers(bake) - transformers(base))|
each also as a root mean square (`rms_…`, over every logit), the cosine between the two runtimes' moves, top-1
agreement between the runtimes for the base and for the bake (all positions, and for the bake those where
transformers' top-1 leads its second by more than twice base_difference), and whether the tokenizers agree.
"""
import json
import os
import sys

import numpy as np
import torch
from llama_cpp import Llama
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

hf_base, hf_baked, gguf_base, gguf_baked, prompts_file = sys.argv[1:6]
prompts = json.load(open(prompts_file))
tokenizer = Tokenizer.from_file(os.path.join(hf_base, "tokenizer.json"))
ids = [tokenizer.encode(p, add_special_tokens=False).ids for p in prompts]
GGML_TYPE_F32 = 0


def transformers_logits(folder):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(torch.tensor([p])).logits[0].numpy() for p in ids]


def llama_cpp_run(path):
    llm = Llama(model_path=path, n_ctx=512, n_batch=512, logits_all=True, n_threads=2, type_k=GGML_TYPE_F32,
                type_v=GGML_TYPE_F32, verbose=False)
    logits = []
    for p in ids:
        llm.reset()
        llm.eval(p)
        logits.append(np.array(llm.scores[: len(p)], dtype=np.float32))
    own_ids = [llm.tokenize(text.encode(), add_bos=False, special=False) for text in prompts]
    return logits, own_ids


def max_abs(a, b):
    return float(max(np.abs(x - y).max() for x, y in zip(a, b)))


def rms(a, b=None):
    b = b if b is not None else [np.zeros_like(x) for x in a]
    return float(np.sqrt(sum(((x - y).astype(np.float64) ** 2).sum() for x, y in zip(a, b)) / sum(x.size for x in a)))


def top1_agreement(a, b):
    return int(sum((np.argmax(x, axis=1) == np.argmax(y, axis=1)).sum() for x, y in zip(a, b)))


hf = {"base": transformers_logits(hf_base), "baked": transformers_logits(hf_baked)}
(llama_base, own_ids), (llama_baked, _) = llama_cpp_run(gguf_base), llama_cpp_run(gguf_baked)
base_difference = max_abs(llama_base, hf["base"])
moves_hf = [b - a for a, b in zip(hf["base"], hf["baked"])]
moves_llama = [b - a for a, b in zip(llama_base, llama_baked)]
agree, agree_clear, clear = 0, 0, 0
positions = sum(len(p) for p in ids)
for theirs, ours in zip(llama_baked, hf["baked"]):
    top = np.argsort(-ours, axis=1)
    for t in range(len(ours)):
        same = int(np.argmax(theirs[t]) == top[t, 0])
        agree += same
        if ours[t, top[t, 0]] - ours[t, top[t, 1]] > 2 * base_difference:
            clear += 1
            agree_clear += same
flat = lambda moves: np.concatenate([m.ravel() for m in moves]).astype(np.float64)
norms = np.linalg.norm(flat(moves_llama)) * np.linalg.norm(flat(moves_hf))
# No cosine when a runtime does not move at all (a bake with α = 0).
cosine = float(flat(moves_llama) @ flat(moves_hf) / norms) if norms > 0 else None
print(json.dumps({
    "prompts": len(ids),
    "positions": positions,
    "tokenizers_agree": own_ids == ids,
    "base_difference": base_difference,
    "baked_difference": max_abs(llama_baked, hf["baked"]),
    "move_transformers": float(max(np.abs(m).max() for m in moves_hf)),
    "move_llama_cpp": float(max(np.abs(m).max() for m in moves_llama)),
    "move_difference": max_abs(moves_llama, moves_hf),
    "rms_base_difference": rms(llama_base, hf["base"]),
    "rms_baked_difference": rms(llama_baked, hf["baked"]),
    "rms_move_transformers": rms(moves_hf),
    "rms_move_llama_cpp": rms(moves_llama),
    "rms_move_difference": rms(moves_llama, moves_hf),
    "move_cosine": cosine,
    "base_top1_agree": top1_agreement(llama_base, hf["base"]),
    "top1_agree": agree,
    "clear_positions": clear,
    "top1_agree_clear": agree_clear,
}))
