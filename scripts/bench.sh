#!/usr/bin/env bash
# Benchmarks against an independent reference measured in the same run.
#   scripts/bench.sh forward [N_PROMPTS]       bake's forward pass vs transformers, SmolLM2 on CPU (tokens/s)
#   scripts/bench.sh activations [N_QUESTIONS] bake's activation pass vs PyTorch batch 1 (the reference code's
#                                              way) and PyTorch batched, same prompts; probes vs scikit-learn
#   scripts/bench.sh eval [N_QUESTIONS]        bake eval (both protocols + CE on 20 wikitext-2 documents) vs the
#                                              same computation in transformers (tests/python/eval_reference.py)
#   scripts/bench.sh bake-1b                   peak RSS of a bake of a random ~1B LLaMA, and the write step vs cp
#   scripts/bench.sh probes                    probes for every head: bake vs scikit-learn on the same rows, on
#                                              the 7B shape (synthetic), the 70B shape (bake only) and SmolLM2's
#                                              real activations (full TruthfulQA; fills the activation cache)
#   scripts/bench.sh bake-7b                   a random Llama-2-7B-shaped bf16 model (~13.8 GB, in
#                                              $BAKE_BENCH_DIR or /tmp, deleted after): streamed bake, peak RSS
#                                              against the plan, stage times, write rate vs cp + sync
#   scripts/bench.sh fits-7b                   with no memory flags, on this machine: bake --limit 10, eval --baked
#                                              and verify --base --run of a random Llama-2-7B-shaped bf16 model,
#                                              then bake --limit 2 of a 13B shape (~27 GB each, in
#                                              $BAKE_BENCH_DIR or /tmp, deleted after): each command's plan
#                                              against its peak RSS, and its stage times
#   scripts/bench.sh memory                    SmolLM2, resident and streamed: the plan's estimate vs peak RSS
#   scripts/bench.sh gguf                      bake gguf of a Qwen2.5-Coder bake into its Q4_K_M GGUF (rewritten as
#                                              llama) and of a SmolLM2 bake into its Q4_1 GGUF: wall time and
#                                              peak RSS against cp + sync of the same input file
# Needs the environment of scripts/setup-test-env.sh (BAKE_SMOLLM2, BAKE_SHARED, BAKE_PYTHON).
set -euo pipefail
cd "$(dirname "$0")/.."
# Empties the page cache (root only) so a copy's timing does not depend on what ran before it.
drop_caches() {
  sync
  if ! { echo 3 > /proc/sys/vm/drop_caches; } 2> /dev/null; then
    echo "note: cannot drop the page cache (not root?); copy timings depend on what is cached" >&2
  fi
}
what=${1:-forward}
case "$what" in
  forward)
    n=${2:-256}
    prompts=$(mktemp)
    # TruthfulQA probe prompts "Q: {question} A: {answer}" from the first mc2 choices.
    "$BAKE_PYTHON" - "$BAKE_SHARED/data/truthfulqa/multiple_choice/validation.jsonl" "$n" > "$prompts" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
out = [f"Q: {r['question']} A: {c}" for r in rows for c in r["mc2_targets"]["choices"]]
print("\n".join(out[: int(sys.argv[2])]))
PY
    export BAKE_BENCH_PROMPTS=$prompts
    cargo bench --bench forward 2>/dev/null | grep '^{' | tee /tmp/bake-bench-forward.json
    "$BAKE_PYTHON" scripts/bench_forward_torch.py | tee -a /tmp/bake-bench-forward.json
    "$BAKE_PYTHON" -c '
import json; r=[json.loads(l) for l in open("/tmp/bake-bench-forward.json")]
b, t = r[0]["tokens_per_s"], r[1]["tokens_per_s"]; print("ratio bake/transformers: %.2fx" % (b / t))'
    rm -f "$prompts";;
  activations)
    n=${2:-40}
    cargo build --release -q
    out=$(mktemp -d)
    ./target/release/bake probe --model "$BAKE_SMOLLM2" --recipe recipes/truthfulqa.yaml --no-cache \
      --dataset "$BAKE_SHARED/data/truthfulqa" --limit "$n" --out "$out" > /dev/null
    "$BAKE_PYTHON" -c '
import json, sys; r = json.load(open(sys.argv[1]))
n = r["probe_prompts"] + r["tuning_prompts"]; t = r["timings"]
print(json.dumps({"impl": "bake", "prompts": n, "activation_seconds": round(t["activations"], 2),
                  "prompts_per_s": round(n / t["activations"], 2), "probe_seconds": round(t["probes"], 2)}))' "$out/report.json" | tee "$out/bake.json"
    for batch in 1 32; do
      "$BAKE_PYTHON" scripts/replay_probe.py "$BAKE_SMOLLM2" "$BAKE_SHARED/data/truthfulqa" "$out/report.json" \
        --batch-size $batch $([ $batch = 1 ] || echo --skip-probes) 2>/dev/null | tail -1 | tee "$out/torch$batch.json"
    done
    "$BAKE_PYTHON" -c '
import json, sys; d = sys.argv[1]
b, t1, tb = (json.load(open(f"{d}/{n}.json")) for n in ("bake", "torch1", "torch32"))
print("activations: bake/torch-batch-1 %.2fx, bake/torch-batched %.2fx" % (b["prompts_per_s"] / t1["prompts_per_s"], b["prompts_per_s"] / tb["prompts_per_s"]))
print("probes: bake %.2f s, sklearn %.2f s (%.1fx); replay agrees: val acc diff %.1e, top-K %s, delta rel diff %.1e" % (
    b["probe_seconds"], t1["probe_seconds"], t1["probe_seconds"] / b["probe_seconds"], t1["val_accuracy_max_abs_diff"],
    t1["top_k_agrees_up_to_ties"], t1["delta_max_relative_diff"]))' "$out"
    rm -rf "$out";;
  eval)
    n=${2:-817}
    cargo build --release -q
    out=$(mktemp -d)
    corpus="$BAKE_SHARED/data/wikitext2/test.jsonl"
    start=$(date +%s.%N)
    ./target/release/bake eval --model "$BAKE_SMOLLM2" --dataset "$BAKE_SHARED/data/truthfulqa" --limit "$n" \
      --corpus "$corpus" --documents 20 --json 2> /dev/null > "$out/bake.json"
    end=$(date +%s.%N)
    picked=$("$BAKE_PYTHON" -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1]))["documents_picked"]))' "$out/bake.json")
    "$BAKE_PYTHON" tests/python/eval_reference.py "$BAKE_SMOLLM2" "$BAKE_SHARED/data/truthfulqa" "$n" "$corpus" "$picked" 128 \
      2> /dev/null > "$out/torch.json"
    "$BAKE_PYTHON" -c '
import json, sys; d, bake_s = sys.argv[1], float(sys.argv[2])
b, t = json.load(open(f"{d}/bake.json")), json.load(open(f"{d}/torch.json"))
row = b["rows"][0]
for p in ("reference", "leaderboard"):
    print("%-11s MC1 bake %.4f transformers %.4f | MC2 bake %.4f transformers %.4f" % (p, row["mc"][p]["mc1"], t[p]["mc1"], row["mc"][p]["mc2"], t[p]["mc2"]))
print("CE bake %.4f transformers %.4f" % (row["ce"], t["ce"]))
print("%d questions: bake %.1f s (incl. loading), transformers %.1f s (model loaded): %.2fx" % (b["questions"], bake_s, t["seconds"], t["seconds"] / bake_s))' \
      "$out" "$(echo "$end - $start" | bc)"
    rm -rf "$out";;
  bake-1b)
    cargo build --release -q --example synthetic_model
    work=$(mktemp -d)
    ./target/release/examples/synthetic_model "$work/llama-1b" 16 2048 16 16 128 5632 49152 bf16 "$BAKE_SMOLLM2/tokenizer.json"
    sync
    /usr/bin/time -v ./target/release/bake --model "$work/llama-1b" --recipe recipes/truthfulqa.yaml --no-cache \
      --dataset "$BAKE_SHARED/data/truthfulqa" --limit 3 --heads 8 --max-shard-size 1GB --out "$work/baked" \
      > "$work/stdout" 2> "$work/time"
    grep -E "Maximum resident|Elapsed" "$work/time"
    grep -E "^  (data|activations|probes|write|total) |^    (biases|weights|other files|flush to disk) " "$work/stdout"
    # bake's write step ends with every file on disk (fsync), so cp is timed up to the end of `sync` too.
    sync; start=$(date +%s.%N); cp -r "$work/llama-1b" "$work/copy"; copied=$(date +%s.%N); sync; end=$(date +%s.%N)
    echo "cp -r of the base folder: $(echo "$copied - $start" | bc) s, + sync: $(echo "$end - $start" | bc) s ($(du -sb "$work/llama-1b" | cut -f1) bytes)"
    rm -rf "$work";;
  probes)
    cargo build --release -q --bench probes
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    run() { cargo bench -q --bench probes -- "$@" 2>/dev/null | grep '^{'; }
    echo "# 7B shape: 32 layers x 32 heads x 128, 4,700 train + 1,180 validation rows"
    run synthetic 32 32 128 4700 1180 "$work/7b"
    "$BAKE_PYTHON" scripts/bench_probes.py "$work/7b" --heads-default 256 --heads-tight 64 2>/dev/null
    echo "# 70B shape: 80 layers x 64 heads x 128 (bake only: 5,120 fits over 1,024 generated heads)"
    rm -rf "$work/7b"
    BAKE_BENCH_RUNS=1 run synthetic 32 32 128 4700 1180 "$work/70b" 5
    rm -rf "$work/70b"
    echo "# SmolLM2-135M, real activations, full TruthfulQA (30 layers x 9 heads x 64)"
    run smollm2 "$work/smollm2"
    "$BAKE_PYTHON" scripts/bench_probes.py "$work/smollm2" --runs 3 2>/dev/null;;
  fits-7b)
    cargo build --release -q --example synthetic_model
    cargo build --release -q
    work=$(mktemp -d -p "${BAKE_BENCH_DIR:-/tmp}")
    trap 'rm -rf "$work"' EXIT
    corpus="$BAKE_SHARED/data/wikitext2/test.jsonl"
    echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo) memory"
    # Runs one command under /usr/bin/time; prints its plan, its peak RSS against the plan, and its stage lines.
    measure() {
      local name=$1; shift
      /usr/bin/time -v "$@" > "$work/$name.out" 2> "$work/$name.err" || { tail -5 "$work/$name.err"; exit 1; }
      local plan peak
      plan=$(grep -oE "peak (host|device) memory ~[0-9.]+ GB" "$work/$name.err" | head -1 | grep -oE "[0-9.]+ GB" | cut -d' ' -f1)
      peak=$(awk '/Maximum resident/ {printf "%.2f", $6 * 1024 / 1e9}' "$work/$name.err")
      echo "== $name: $(grep -E 'Elapsed' "$work/$name.err" | sed 's/.*: //') wall, peak RSS $peak GB, plan $plan GB ($(echo "scale=3; $peak / $plan" | bc)x)"
      grep -E "^bake: .*(plan|passes|prompts, )" "$work/$name.err" | head -2 | cut -c1-700
      grep -E "^bake: +[0-9.]+ s " "$work/$name.err" | head -20
    }
    # Llama-2-7B's shape (32 layers, hidden 4096, 32 heads of 128, FFN 11008) with SmolLM2's tokenizer (a
    # vocabulary of 49,152 instead of 32,000).
    ./target/release/examples/synthetic_model "$work/llama-7b" 32 4096 32 32 128 11008 49152 bf16 "$BAKE_SMOLLM2/tokenizer.json" > /dev/null
    sync
    measure bake-7b ./target/release/bake --model "$work/llama-7b" --no-cache --limit 10 --out "$work/baked"
    grep -E "^  (data|activations|probes|write|total) " "$work/bake-7b.out"
    measure eval-7b ./target/release/bake eval --model "$work/llama-7b" --baked "$work/baked" --limit 10 \
      --corpus "$corpus" --documents 10
    cat "$work/eval-7b.out"
    measure verify-7b ./target/release/bake verify "$work/baked" --base "$work/llama-7b" --run
    tail -1 "$work/verify-7b.out"
    rm -rf "$work/llama-7b" "$work/baked"
    # Llama-2-13B's shape: 40 layers, hidden 5120, 40 heads of 128, FFN 13824.
    ./target/release/examples/synthetic_model "$work/llama-13b" 40 5120 40 40 128 13824 49152 bf16 "$BAKE_SMOLLM2/tokenizer.json" > /dev/null
    sync
    measure bake-13b ./target/release/bake --model "$work/llama-13b" --no-cache --limit 2 --out "$work/baked-13b"
    grep -E "^  (data|activations|probes|write|total) " "$work/bake-13b.out";;
  bake-7b)
    cargo build --release -q --example synthetic_model
    cargo build --release -q
    work=$(mktemp -d -p "${BAKE_BENCH_DIR:-/tmp}")
    trap 'rm -rf "$work"' EXIT
    # Llama-2-7B's shape (32 layers, hidden 4096, 32 heads of 128, FFN 11008) with SmolLM2's tokenizer, so
    # the vocabulary is 49,152 instead of 32,000 (0.3 GB more of embeddings and head).
    ./target/release/examples/synthetic_model "$work/llama-7b" 32 4096 32 32 128 11008 49152 bf16 "$BAKE_SMOLLM2/tokenizer.json"
    sync
    args=(--model "$work/llama-7b" --recipe recipes/truthfulqa.yaml --no-cache --limit 2 --heads 48 --max-memory 12GB)
    ./target/release/bake "${args[@]}" --out "$work/baked" --dry-run | sed -n 1p
    # The page cache decides a copy's speed more than the copying does: both copies below start from a base
    # read once, cold, just before (the bake's own activation pass reads it; cp gets a `cat`).
    drop_caches
    /usr/bin/time -v ./target/release/bake "${args[@]}" --out "$work/baked" > "$work/stdout" 2> "$work/time"
    grep -E "Maximum resident|Elapsed" "$work/time"
    cat "$work/baked/bake.log"
    grep -E "^  (data|activations|probes|write|total) |^    (biases|weights|other files|flush to disk) " "$work/stdout"
    bytes=$(du -sb "$work/baked" | cut -f1)
    drop_caches
    cat "$work"/llama-7b/* > /dev/null
    sync; start=$(date +%s.%N); cp -r "$work/llama-7b" "$work/copy"; copied=$(date +%s.%N); sync; end=$(date +%s.%N)
    echo "cp -r of the base folder: $(echo "$copied - $start" | bc) s, + sync: $(echo "$end - $start" | bc) s ($(du -sb "$work/llama-7b" | cut -f1) bytes); baked folder $bytes bytes";;
  memory)
    cargo build --release -q
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    n=${2:-817}
    args=(--model "$BAKE_SMOLLM2" --recipe recipes/truthfulqa.yaml --no-cache --limit "$n")
    plan=$(./target/release/bake "${args[@]}" --out "$work/plan" --dry-run | sed -n '/^{/,$p')
    # 5% over the streamed estimate picks the streamed mode (the resident one needs more). Not the estimate
    # itself: a budget also bounds `auto` batches, and smaller batches share fewer tokens.
    streamed=$(echo "$plan" | "$BAKE_PYTHON" -c 'import json,sys; print(int(json.load(sys.stdin)["streamed_bytes"] * 1.05))')
    for budget in 100GB "$streamed"; do
      ./target/release/bake "${args[@]}" --max-memory "$budget" --out "$work/baked-$budget" --dry-run | sed -n 1p
      /usr/bin/time -v ./target/release/bake "${args[@]}" --max-memory "$budget" --out "$work/baked-$budget" > /dev/null 2> "$work/time"
      grep -E "Maximum resident" "$work/time"
    done;;
  gguf)
    cargo build --release -q
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    for case in "qwen25 $BAKE_QWEN25 $BAKE_QWEN25_GGUF 40" "smollm2 $BAKE_SMOLLM2 $BAKE_SMOLLM2_GGUF 60"; do
      set -- $case
      ./target/release/bake --quiet --model "$2" --limit "$4" --out "$work/$1-baked" > /dev/null
      drop_caches
      start=$(date +%s.%N)
      /usr/bin/time -v ./target/release/bake --quiet gguf "$work/$1-baked" --gguf "$3" --out "$work/$1-gguf" \
        > /dev/null 2> "$work/time"
      end=$(date +%s.%N)
      rss=$(sed -n 's/.*Maximum resident set size (kbytes): //p' "$work/time")
      drop_caches
      copy_start=$(date +%s.%N); cp "$3" "$work/copy.gguf"; sync; copy_end=$(date +%s.%N)
      "$BAKE_PYTHON" -c '
import json, sys
name, size, t, rss, c = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
print(json.dumps({"case": name, "input_bytes": size, "bake_gguf_seconds": round(t, 2), "peak_rss_bytes": rss * 1024,
                  "cp_sync_seconds": round(c, 2), "ratio_to_cp": round(t / c, 2)}))' \
        "$1" "$(stat -c %s "$3")" "$(echo "$end - $start" | bc)" "$rss" "$(echo "$copy_end - $copy_start" | bc)"
      rm -f "$work/copy.gguf"
    done;;
  *) echo "unknown benchmark $what" >&2; exit 2;;
esac
