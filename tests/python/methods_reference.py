"""Independent checks of bake's NL-ITI on the activations bake captured (tests/methods.rs writes them):
the mean over each prompt's last tokens and the unit centre-of-mass directions with numpy, sigma with numpy,
and each head's MLP probe with scikit-learn's MLPClassifier fitted to convergence from bake's starting point.
Prints one JSON line last."""
import json
import sys
import warnings
from pathlib import Path

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier

d = Path(sys.argv[1])
spec = json.loads((d / "spec.json").read_text())
L, H, D = spec["layers"], spec["heads"], spec["head_dim"]
counts = np.array(spec["counts"])
each = np.fromfile(d / "each.f32", dtype="<f4").reshape(counts.sum(), L, H * D)
means = np.fromfile(d / "means.f32", dtype="<f4").reshape(len(counts), L, H * D)
labels = np.array(spec["labels"], dtype=bool)
questions = np.array(spec["questions"])

# 1. The mean over each prompt's last tokens.
starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
numpy_means = np.stack([each[s:s + n].astype(np.float64).mean(axis=0) for s, n in zip(starts, counts)])
mean_diff = float(np.abs(numpy_means.astype(np.float32) - means).max())

# 2. Unit centre-of-mass directions over the train and validation questions, and sigma (population std of
# the projections; the test passes the probe prompts as the tuning set).
fit = np.isin(questions, spec["train"] + spec["val"])
acts = numpy_means.astype(np.float32).astype(np.float64)
direction_diff, sigma_diff = 0.0, 0.0
for shift in spec["shifts"]:
    layer, head = shift["head"]
    x = acts[:, layer, head * D:(head + 1) * D]
    com = x[fit & labels].mean(axis=0) - x[fit & ~labels].mean(axis=0)
    unit = com / np.linalg.norm(com)
    sigma = float(np.std(x @ unit))
    delta = np.array(shift["delta"])
    direction_diff = max(direction_diff, float(np.abs(delta / (spec["alpha"] * shift["sigma"]) - unit).max()))
    sigma_diff = max(sigma_diff, abs(shift["sigma"] - sigma) / sigma)

# 3. MLP probes: scikit-learn's MLPClassifier (the same architecture and L2 penalty, L-BFGS) from bake's start,
# on every third head (the fits are most of this script's time).
train, val = np.isin(questions, spec["train"]), np.isin(questions, spec["val"])
hidden, alpha = spec["mlp"]["hidden"], spec["mlp"]["alpha"]
n_val = int(val.sum())
diffs, sk_acc, bake_acc = [], [], []
for probe in spec["probes"][::3]:
    layer, head = probe["head"]
    x = means[:, layer, head * D:(head + 1) * D].astype(np.float64)
    p = np.array(probe["initial"])
    w1 = p[:hidden * D].reshape(hidden, D).T
    b1 = p[hidden * D:hidden * (D + 1)]
    w2 = p[hidden * (D + 1):hidden * (D + 2)].reshape(hidden, 1)
    b2 = p[hidden * (D + 2):]
    clf = MLPClassifier(hidden_layer_sizes=(hidden,), activation="relu", alpha=alpha, solver="lbfgs",
                        max_iter=1, warm_start=True, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x[train], labels[train])  # sets up the shapes; the weights are replaced below
        clf.coefs_, clf.intercepts_ = [w1.copy(), w2.copy()], [b1.copy(), b2.copy()]
        # scikit-learn's own stopping rule, which bake's mirrors: tol 1e-4 (L-BFGS's gtol) or 200 iterations.
        clf.set_params(max_iter=200, tol=1e-4)
        clf.fit(x[train], labels[train])
    acc = float((clf.predict(x[val]) == labels[val]).mean())
    sk_acc.append(acc)
    bake_acc.append(probe["val_accuracy"])
    diffs.append(abs(acc - probe["val_accuracy"]) * n_val)
diffs = np.array(diffs)
report = {
    "mean_max_abs_diff": mean_diff,
    "direction_max_abs_diff": direction_diff,
    "sigma_max_rel_diff": sigma_diff,
    "heads": len(diffs),
    "validation_prompts": n_val,
    "within_one_prompt": int((diffs <= 1.0 + 1e-9).sum()),
    "largest_prompt_diff": float(diffs.max()),
    "mean_abs_accuracy_diff": float(np.mean(diffs) / n_val),
    "bake_mean_accuracy": float(np.mean(bake_acc)),
    "sklearn_mean_accuracy": float(np.mean(sk_acc)),
    "top8_overlap": len(set(np.argsort(-np.array(sk_acc), kind="stable")[:8].tolist())
                        & set(np.argsort(-np.array(bake_acc), kind="stable")[:8].tolist())),
}
print(json.dumps(report))
