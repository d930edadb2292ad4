"""scikit-learn on exactly the rows `cargo bench --bench probes` fitted, in the same run.

Usage: bench_probes.py DIR [--heads-default N] [--heads-tight N] [--jobs J]

DIR holds rows.safetensors (train_x [heads, n, d], train_y, val_x, val_y; f32) and bake.json (bake's time,
coefficients and gradient norms). Fits LogisticRegression(C=1) per head twice: with scikit-learn's defaults
(lbfgs, tol 1e-4, on the f32 rows) and tightly (lbfgs on f64 rows, tol 1e-8, max_iter 10000), on the first
N heads of each (all by default; the per-head time is what is compared, and synthetic heads cost alike), J
processes at a time (default 1: joblib's processes cost more than they save here; numpy's BLAS uses both
cores either way), the default fit timed --runs times (median). Reports seconds per head, the largest
gradient norm ‖∇f‖₂ of scikit-learn's objective ½‖w‖² + C Σ log-loss at each solution (f64), bake's, the
largest coefficient difference from bake, and the validation accuracies' largest difference.
"""
import argparse
import json
import time

import numpy as np
from joblib import Parallel, delayed
from safetensors.numpy import load_file
from sklearn.linear_model import LogisticRegression

parser = argparse.ArgumentParser()
parser.add_argument("dir")
parser.add_argument("--heads-default", type=int, default=0)
parser.add_argument("--heads-tight", type=int, default=0)
parser.add_argument("--jobs", type=int, default=1)
parser.add_argument("--runs", type=int, default=1, help="time the default fits this many times; the median counts")
args = parser.parse_args()

rows = load_file(f"{args.dir}/rows.safetensors")
bake = json.load(open(f"{args.dir}/bake.json"))
train_x, train_y, val_x, val_y = rows["train_x"], rows["train_y"].astype(int), rows["val_x"], rows["val_y"].astype(int)
heads = train_x.shape[0]


def gradient_norm(x, y, coef):
    x = x.astype(np.float64)
    w, b = np.asarray(coef[:-1], dtype=np.float64), float(coef[-1])
    z = x @ w + b
    r = 1.0 / (1.0 + np.exp(-z)) - y
    g = np.concatenate([w + x.T @ r, [r.sum()]])
    return float(np.sqrt(g @ g))


def fit(h, tight):
    x = train_x[h].astype(np.float64) if tight else train_x[h]
    model = LogisticRegression(C=1.0, tol=1e-8, max_iter=10000) if tight else LogisticRegression(C=1.0)
    model.fit(x, train_y)
    coef = model.coef_[0].tolist() + [float(model.intercept_[0])]
    accuracy = float((model.predict(val_x[h]) == val_y).mean())
    return coef, accuracy


def run(count, tight):
    count = min(count or heads, heads)
    times = []
    for _ in range(1 if tight else args.runs):
        start = time.perf_counter()
        fits = Parallel(n_jobs=args.jobs)(delayed(fit)(h, tight) for h in range(count))
        times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    return {
        "impl": "sklearn-tight" if tight else "sklearn-default",
        "heads_fitted": count,
        "seconds": round(seconds, 2),
        "seconds_per_head": seconds / count,
        "max_gradient_norm": max(gradient_norm(train_x[h], train_y, c) for h, (c, _) in enumerate(fits)),
        "max_coef_diff_from_bake": max(
            float(np.max(np.abs(np.array(c) - np.array(bake["coefficients"][h])))) for h, (c, _) in enumerate(fits)),
        "max_val_accuracy_diff_from_bake": max(abs(a - bake["val_accuracy"][h]) for h, (_, a) in enumerate(fits)),
    }


default, tight = run(args.heads_default, False), run(args.heads_tight, True)
print(json.dumps(default))
print(json.dumps(tight))
b = bake["seconds_per_head"]
print(json.dumps({
    "heads": bake["heads"], "head_dim": bake["head_dim"], "train_rows": bake["train_rows"],
    "bake_seconds": round(bake["seconds"], 2), "bake_max_gradient_norm": bake["max_gradient_norm"],
    "sklearn_default_seconds_for_all": round(default["seconds_per_head"] * bake["heads"], 2),
    "speedup_vs_default": round(default["seconds_per_head"] / b, 2),
    "speedup_vs_tight": round(tight["seconds_per_head"] / b, 2),
}))
