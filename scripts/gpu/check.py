"""The GPU measurements of issue #12, run by scripts/gpu-check.sh on the lent device machine (or, with --smoke,
on any machine with tiny shapes and the CPU, to check the script itself). Writes one JSON file.

Sections:
  parity     the same bake binary's CUDA bf16 pass against its CPU f32 pass on a SmolLM2-shaped random model,
             with transformers' own bf16-vs-f32 error on the same prompts as the yardstick
  speed      the full TruthfulQA activation pass of a Llama-2-7B-shaped random model: bake, PyTorch batched
             (bf16, SDPA, 256 prompts a batch) and the reference's way (batch 1, fp16, hooks; on a subset,
             extrapolated)
  end_to_end `bake --model <7B shape> --out ...`, wall time and stage times
  evaluation `bake eval --baked` of that bake: one model in the checkpoint's dtype, both protocols on 100
             questions, CE/KL on 100 documents; wall time, peak device memory, bake's own stage times
  streaming  a 13B-shaped model under --max-memory 8GB (layer-streamed), peak device memory, activations
             against a resident run
"""
import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import torch
from safetensors.torch import load_file
from transformers import AutoModel, LlamaConfig, LlamaForCausalLM

# (layers, hidden, heads, kv_heads, ffn); every shape uses SmolLM2's tokenizer, so its vocabulary (49,152).
SHAPES = {
    "smollm2": (30, 576, 9, 3, 1536),
    "7b": (32, 4096, 32, 32, 11008),
    "13b": (40, 5120, 40, 40, 13824),
}
SMOKE_SHAPES = {"smollm2": (4, 64, 4, 2, 128), "7b": (2, 128, 4, 4, 256), "13b": (3, 160, 5, 5, 320)}
VOCAB = 49152

p = argparse.ArgumentParser()
p.add_argument("--bake", required=True)
p.add_argument("--carry", required=True, help="folder with tokenizer.json and prompts.json")
p.add_argument("--work", required=True)
p.add_argument("--out", required=True)
p.add_argument("--smoke", action="store_true")
args = p.parse_args()
smoke = args.smoke
gpu = torch.cuda.is_available() and not smoke
torch_device = "cuda" if gpu else "cpu"
bake_device = "cuda" if gpu else "cpu"
shapes = SMOKE_SHAPES if smoke else SHAPES
prompts = json.load(open(os.path.join(args.carry, "prompts.json")))
tokens = prompts["tokens"]
result = {"smoke": smoke, "torch": torch.__version__, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
if gpu:
    result["gpu"] = torch.cuda.get_device_name(0)


def save():
    with open(os.path.join(args.out, "gpu-check.json"), "w") as f:
        json.dump(result, f, indent=1)


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def make_model(shape, folder):
    """A randomly initialised bf16 checkpoint of `shape`, made by transformers on the device, seed 0."""
    layers, hidden, heads, kv, ffn = shapes[shape]
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv, vocab_size=VOCAB, max_position_embeddings=2048, rms_norm_eps=1e-5,
        tie_word_embeddings=(shape == "smollm2"), torch_dtype="bfloat16",
    )
    started = time.time()
    torch.manual_seed(0)
    # Made in bf16 on the device: a 13B shape in f32 would need 52 GB first.
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(torch_device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(folder, max_shard_size="5GB")
    del model
    shutil.copy(os.path.join(args.carry, "tokenizer.json"), folder)
    if gpu:
        torch.cuda.empty_cache()
    return round(time.time() - started, 1)


class PeakDeviceMemory:
    """Polls the driver's device-wide used memory (cuMemGetInfo through torch) every 20 ms while a command
    runs, less what was in use before it started."""

    def __init__(self):
        self.peak, self.running = 0, False

    def used(self):
        free, total = torch.cuda.mem_get_info(0)
        return total - free

    def __enter__(self):
        if gpu:
            self.baseline = self.used()
            self.running = True
            self.thread = threading.Thread(target=self.poll, daemon=True)
            self.thread.start()
        return self

    def poll(self):
        while self.running:
            self.peak = max(self.peak, self.used() - self.baseline)
            time.sleep(0.02)

    def __exit__(self, *_):
        if gpu:
            self.running = False
            self.thread.join()


def bake(*argv, cache=None, name="bake"):
    """Runs bake; returns (wall seconds, stdout, stderr). Its own cache folder when `cache` names one."""
    env = dict(os.environ)
    if cache:
        env["BAKE_CACHE_DIR"] = os.path.join(args.work, cache)
    if smoke and argv[0] != "--model":
        argv = (argv[0], "--heads", "4", *argv[1:])
    elif smoke:
        argv = ("--heads", "4", *argv)
    started = time.time()
    run = subprocess.run([args.bake, *argv], capture_output=True, text=True, env=env)
    seconds = time.time() - started
    with open(os.path.join(args.out, f"{name}.log"), "w") as f:
        f.write(f"$ bake {' '.join(argv)}\n{run.stdout}\n{run.stderr}")
    if run.returncode != 0:
        raise RuntimeError(f"bake {' '.join(argv)} failed ({run.returncode}): {run.stderr[-2000:]}")
    return round(seconds, 2), run.stdout, run.stderr


def cached_activations(cache):
    """The one cache entry a run with its own cache folder wrote: probe and tuning rows, [prompts, layers, width]."""
    (path,) = glob.glob(os.path.join(args.work, cache, "*.safetensors"))
    t = load_file(path)
    return torch.cat([t["probe"], t["tuning"]]).float()


def plan_line(stderr):
    return next((l.strip() for l in stderr.splitlines() if "activations:" in l and "prompts" in l), None)


def capture_torch(model_dir, ids, dtype, batch, attn):
    """o_proj inputs at each prompt's last token, every layer, with forward pre-hooks; right padding."""
    model = AutoModel.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn).to(torch_device).eval()
    layers = model.layers
    captured = [None] * len(layers)

    def hook(l):
        def pre(_, inputs):
            captured[l] = inputs[0]
        return pre

    hooks = [layer.self_attn.o_proj.register_forward_pre_hook(hook(l)) for l, layer in enumerate(layers)]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i])) if batch > 1 else list(range(len(ids)))
    rows = [None] * len(ids)

    def run(chunk):
        width = max(len(ids[i]) for i in chunk)
        x = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, i in enumerate(chunk):
            x[r, : len(ids[i])] = torch.tensor(ids[i])
            mask[r, : len(ids[i])] = 1
        with torch.no_grad():
            model(input_ids=x.to(torch_device), attention_mask=mask.to(torch_device) if batch > 1 else None)
        last = torch.tensor([len(ids[i]) - 1 for i in chunk], device=torch_device)
        picked = torch.stack([c[torch.arange(len(chunk), device=torch_device), last] for c in captured], 1)
        for r, i in enumerate(chunk):
            rows[i] = picked[r].float().cpu()

    run(order[:batch])  # warm-up, not timed
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    sync()
    started = time.time()
    for start in range(0, len(order), batch):
        run(order[start : start + batch])
    sync()
    seconds = time.time() - started
    for h in hooks:
        h.remove()
    del model
    if gpu:
        torch.cuda.empty_cache()
    return seconds, torch.stack(rows)


def compare(a, b):
    """Per layer: max |Δ|, max |Δ| / max |a|, and the relative RMS error sqrt(Σ Δ² / Σ a²)."""
    out = []
    for l in range(a.shape[1]):
        d = (b[:, l] - a[:, l]).abs()
        out.append({
            "max_abs": float(d.max()),
            "max_rel": float(d.max() / a[:, l].abs().max()),
            "rel_rms": float((d.pow(2).sum() / a[:, l].pow(2).sum()).sqrt()),
        })
    return out


def val_accuracy_gap(report_a, report_b):
    """The largest difference of a head's validation accuracy between two reports, in validation prompts."""
    val = set(json.load(open(report_a))["val_questions"])
    n_val = sum(1 for q in prompts["probe_questions"][: json.load(open(report_a))["probe_prompts"]] if q in val)
    a, b = (json.load(open(r))["val_accuracy"] for r in (report_a, report_b))
    gap = max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    heads_a, heads_b = (json.load(open(r))["heads"] for r in (report_a, report_b))
    return {"max_gap_prompts": round(gap * n_val, 3), "validation_prompts": n_val,
            "same_top_heads": heads_a == heads_b,
            "top_heads_overlap": len({tuple(h) for h in heads_a} & {tuple(h) for h in heads_b})}


def section(name, body):
    log(f"{name} ...")
    started = time.time()
    try:
        result[name] = body()
    except Exception as e:  # a failed section is reported; the others still run
        result[name] = {"error": f"{type(e).__name__}: {e}"}
    result[name]["section_seconds"] = round(time.time() - started, 1)
    log(f"{name}: {json.dumps(result[name])[:400]}")
    save()


def parity():
    model = os.path.join(args.work, "smollm2-shape")
    made = make_model("smollm2", model)
    limit = "20" if smoke else "100"
    common = ["probe", "--model", model, "--limit", limit]
    cpu_s, _, _ = bake(*common, "--device", "cpu", "--dtype", "f32", "--out", f"{args.work}/p-cpu", cache="c-cpu",
                       name="parity-cpu")
    dev_s, _, dev_err = bake(*common, "--device", bake_device, "--dtype", "bf16", "--out", f"{args.work}/p-dev",
                             cache="c-dev", name="parity-device")
    full, half = cached_activations("c-cpu"), cached_activations("c-dev")
    layers = compare(full, half)
    # The yardstick: transformers' own bf16 against its f32 on the first 200 prompts, one at a time.
    sample = tokens[:200] if not smoke else tokens[:20]
    _, t32 = capture_torch(model, sample, torch.float32, 1, "eager")
    _, t16 = capture_torch(model, sample, torch.bfloat16, 1, "eager")
    yardstick = compare(t32, t16)
    ours_sample = compare(full[: len(sample)], half[: len(sample)])
    return {
        "model_seconds": made, "cpu_f32_seconds": cpu_s, "device_bf16_seconds": dev_s, "plan": plan_line(dev_err),
        "prompts": int(full.shape[0]),
        "max_rel_rms": max(l["rel_rms"] for l in layers),
        "max_rel": max(l["max_rel"] for l in layers),
        "per_layer": layers,
        "transformers_bf16_max_rel_rms_on_sample": max(l["rel_rms"] for l in yardstick),
        "bake_bf16_max_rel_rms_on_sample": max(l["rel_rms"] for l in ours_sample),
        "ratio_to_transformers_per_layer": [o["rel_rms"] / t["rel_rms"] for o, t in zip(ours_sample, yardstick)],
        "val_accuracy": val_accuracy_gap(f"{args.work}/p-cpu/report.json", f"{args.work}/p-dev/report.json"),
    }


def speed():
    model = os.path.join(args.work, "llama-7b-shape")
    made = make_model("7b", model)
    limit = ["--limit", "30"] if smoke else []
    warm_s, _, _ = bake("probe", "--model", model, "--limit", "2", "--no-cache", "--out", f"{args.work}/warm",
                        name="speed-warmup")
    wall, _, err = bake("probe", "--model", model, *limit, "--no-cache", "--out", f"{args.work}/full",
                        name="speed-bake")
    report = json.load(open(f"{args.work}/full/report.json"))
    n = report["probe_prompts"] + report["tuning_prompts"]
    ids = tokens[:n]
    torch_s, _ = capture_torch(model, ids, torch.bfloat16, 256, "sdpa")
    subset = ids[: (50 if smoke else 500)]
    ref_s, _ = capture_torch(model, subset, torch.float16, 1, "eager")
    stage_seconds = timings_log(f"{args.work}/full/probe.log")
    bake_pass = stage_seconds["activations"]
    extrapolated = ref_s * n / len(subset)
    return {
        "model_seconds": made, "prompts": n, "plan": plan_line(err),
        "warmup_run_seconds_incl_jit": warm_s,
        "bake_activation_pass_seconds": round(bake_pass, 2), "bake_probe_wall_seconds": wall,
        "bake_stage_seconds": stage_seconds,
        "torch_batched_bf16_sdpa_256_seconds": round(torch_s, 2),
        "reference_batch1_fp16_seconds_on_subset": round(ref_s, 2), "reference_subset_prompts": len(subset),
        "reference_batch1_fp16_seconds_extrapolated": round(extrapolated, 1),
        "speedup_vs_torch_batched": round(torch_s / bake_pass, 2),
        "speedup_vs_reference": round(extrapolated / bake_pass, 1),
    }


def end_to_end():
    model = os.path.join(args.work, "llama-7b-shape")
    limit = ["--limit", "30"] if smoke else []
    out = f"{args.work}/baked-7b"
    wall, stdout, _ = bake("--model", model, *limit, "--no-cache", "--out", out, name="end-to-end")
    stages = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] == "s" and parts[0] in {"data", "activations", "probes", "write", "total"}:
            stages[parts[0]] = float(parts[1])
    size = sum(os.path.getsize(f) for f in glob.glob(f"{out}/**", recursive=True) if os.path.isfile(f))
    return {"wall_seconds": wall, "stage_seconds": stages, "written_bytes": size}


def evaluation():
    model, baked = os.path.join(args.work, "llama-7b-shape"), f"{args.work}/baked-7b"
    # The model is random, so any English will do for CE/KL's timing: 100 documents of about 128 tokens.
    corpus = os.path.join(args.work, "corpus.txt")
    words = "the model reads a long document about rivers cities and the people who live beside them".split()
    with open(corpus, "w") as f:
        f.write("\n\n".join(" ".join(words[(i + j) % len(words)] for j in range(120)) for i in range(100)))
    limit, documents = ("10", "4") if smoke else ("100", "100")
    try:
        with PeakDeviceMemory() as peak:
            wall, stdout, _ = bake("eval", "--model", model, "--baked", baked, "--limit", limit, "--protocol", "both",
                                   "--corpus", corpus, "--documents", documents, "--json", name="eval-7b")
    finally:
        shutil.rmtree(baked, ignore_errors=True)
    report = json.loads(stdout)
    return {"wall_seconds": wall, "peak_device_bytes": peak.peak if gpu else None, "rows": report["rows"],
            "bake_seconds": report["timings"]}


def timings_log(path):
    """A `probe.log` / `bake.log`: `stage: seconds s` per line."""
    stages = (line.rsplit(": ", 1) for line in open(path).read().splitlines())
    return {stage: float(value.removesuffix(" s")) for stage, value in stages}


def streaming():
    shutil.rmtree(os.path.join(args.work, "llama-7b-shape"), ignore_errors=True)  # disk: 26 GB for the 13B shape
    model = os.path.join(args.work, "llama-13b-shape")
    made = make_model("13b", model)
    common = ["probe", "--model", model, "--limit", "40" if not smoke else "5"]
    budget = "8GB"
    if smoke:  # tiny shapes: the streamed estimate itself, which only the streamed mode fits
        _, plan, _ = bake("--model", model, *common[3:], "--dry-run", "--out", f"{args.work}/plan13",
                          name="streaming-plan")
        budget = str(json.loads(plan[plan.index("{"):])["streamed_bytes"])
    with PeakDeviceMemory() as peak:
        streamed_s, _, err = bake(*common, "--max-memory", budget, "--out", f"{args.work}/s13", cache="c-s13",
                                  name="streaming-13b")
    resident_s, _, _ = bake(*common, "--out", f"{args.work}/r13", cache="c-r13", name="resident-13b")
    layers = compare(cached_activations("c-r13"), cached_activations("c-s13"))
    return {
        "model_seconds": made, "budget": budget, "plan": plan_line(err), "streamed_seconds": streamed_s,
        "resident_seconds": resident_s, "peak_device_bytes": peak.peak if gpu else None,
        "max_abs_vs_resident": max(l["max_abs"] for l in layers),
        "max_rel_rms_vs_resident": max(l["rel_rms"] for l in layers),
    }


os.makedirs(args.out, exist_ok=True)
for name, body in [("parity", parity), ("speed", speed), ("end_to_end", end_to_end), ("evaluation", evaluation),
                   ("streaming", streaming)]:
    section(name, body)
result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
save()
print(json.dumps(result, indent=1))
