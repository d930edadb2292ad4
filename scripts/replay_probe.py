"""Independent replay of `bake probe` with transformers hooks and scikit-learn, from report.json's indices.

Usage: replay_probe.py MODEL_DIR DATA_DIR REPORT_JSON [--batch-size N] [--skip-probes]

Rebuilds every probe and tuning prompt from the dataset and the report (templates, limit, tuning_question),
captures the input of every layer's self_attn.o_proj at each prompt's last token with forward pre-hooks
(batch 1 as the reference code does, or right-padded batches), fits one sklearn LogisticRegression (C=1) per
head on the report's train questions, and compares validation accuracy, the top-K set and δ with the report.
Prints timings (activation pass, probes) and the comparison as JSON on the last line.
"""
import argparse
import json
import time

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

parser = argparse.ArgumentParser()
parser.add_argument("model")
parser.add_argument("data")
parser.add_argument("report")
parser.add_argument("--batch-size", type=int, default=1)
parser.add_argument("--skip-probes", action="store_true")
args = parser.parse_args()

report = json.load(open(args.report))
recipe = report["recipe"]
mc = [json.loads(l) for l in open(f"{args.data}/multiple_choice/validation.jsonl")]
gen = {json.loads(l)["question"].strip(): json.loads(l) for l in open(f"{args.data}/generation/validation.jsonl")}
if recipe.get("limit"):
    mc = mc[: recipe["limit"]]

probe_prompts, probe_q, probe_y, tuning_prompts = [], [], [], []
for i, row in enumerate(mc):
    for answer, label in zip(row["mc2_targets"]["choices"], row["mc2_targets"]["labels"]):
        probe_prompts.append(recipe["prompts"]["probe"].format(question=row["question"], answer=answer))
        probe_q.append(i)
        probe_y.append(label)
    g = gen[row["question"].strip()]
    other = mc[report["tuning_question"][i]]["question"]
    for answer in g["correct_answers"] + g["incorrect_answers"]:
        tuning_prompts.append(
            recipe["prompts"]["tuning"].format(question=row["question"], answer=answer, other_question=other))

tok = AutoTokenizer.from_pretrained(args.model)
model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
layers = model.model.layers
captured = {}

def hook(layer):
    def pre_hook(module, inputs):
        captured[layer] = inputs[0].detach()
    return pre_hook

for l, layer in enumerate(layers):
    layer.self_attn.o_proj.register_forward_pre_hook(hook(l))

def capture(prompts):
    ids = [tok(p)["input_ids"] for p in prompts]
    out = np.zeros((len(prompts), len(layers), layers[0].self_attn.o_proj.in_features), dtype=np.float32)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i])) if args.batch_size > 1 else range(len(ids))
    order = list(order)
    with torch.inference_mode():
        for start in range(0, len(order), args.batch_size):
            chunk = order[start : start + args.batch_size]
            width = max(len(ids[i]) for i in chunk)
            x = torch.tensor([ids[i] + [0] * (width - len(ids[i])) for i in chunk])
            mask = torch.tensor([[1] * len(ids[i]) + [0] * (width - len(ids[i])) for i in chunk])
            model.model(input_ids=x, attention_mask=mask)
            last = torch.tensor([len(ids[i]) - 1 for i in chunk])
            for l in range(len(layers)):
                out[chunk, l] = captured[l][torch.arange(len(chunk)), last].numpy()
    return out

start = time.perf_counter()
X = capture(probe_prompts)
T = capture(tuning_prompts)
activation_seconds = time.perf_counter() - start
n_prompts = len(probe_prompts) + len(tuning_prompts)
result = {"prompts": n_prompts, "batch_size": args.batch_size, "activation_seconds": round(activation_seconds, 2),
          "prompts_per_s": round(n_prompts / activation_seconds, 2), "torch_threads": torch.get_num_threads()}

if not args.skip_probes:
    from sklearn.linear_model import LogisticRegression

    H, D = report["heads_per_layer"], report["head_dim"]
    L = len(layers)
    probe_q, probe_y = np.array(probe_q), np.array(probe_y)
    train = np.isin(probe_q, report["train_questions"])
    val = np.isin(probe_q, report["val_questions"])
    Xh = X.reshape(len(X), L, H, D).astype(np.float64)
    Th = T.reshape(len(T), L, H, D).astype(np.float64)
    start = time.perf_counter()
    acc = np.zeros((L, H))
    for l in range(L):
        for h in range(H):
            clf = LogisticRegression(C=1.0, tol=1e-8, max_iter=10000).fit(Xh[train, l, h], probe_y[train])
            acc[l, h] = (clf.predict(Xh[val, l, h]) == probe_y[val]).mean()
    result["probe_seconds"] = round(time.perf_counter() - start, 2)
    ours = np.array(report["val_accuracy"])
    result["val_accuracy_max_abs_diff"] = float(np.abs(acc - ours).max())
    K = len(report["heads"])
    flat = acc.reshape(-1)
    cut = np.sort(flat)[::-1][K - 1]
    above = {(int(i // H), int(i % H)) for i in np.where(flat > cut)[0]}
    at_cut = {(int(i // H), int(i % H)) for i in np.where(flat == cut)[0]}
    chosen = {tuple(h) for h in report["heads"]}
    result["top_k_agrees_up_to_ties"] = bool(above <= chosen and chosen <= above | at_cut)
    fit = train | val
    rel = []
    for (l, h) in report["heads"]:
        com = Xh[fit & (probe_y == 1), l, h].mean(0) - Xh[fit & (probe_y == 0), l, h].mean(0)
        theta = com / np.linalg.norm(com)
        sigma = (Th[:, l, h] @ theta).std()
        delta = recipe["alpha"] * sigma * theta
        reported = np.array(report["delta"][str(l)][h * D : (h + 1) * D])
        rel.append(float(np.linalg.norm(delta - reported) / np.linalg.norm(delta)))
    result["delta_max_relative_diff"] = max(rel)
print(json.dumps(result))
