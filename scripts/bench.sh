#!/usr/bin/env bash
# Benchmarks against an independent reference measured in the same run.
#   scripts/bench.sh forward [N_PROMPTS]   bake's forward pass vs transformers, SmolLM2 on CPU (tokens/s)
# Needs the environment of scripts/setup-test-env.sh (BAKE_SMOLLM2, BAKE_SHARED, BAKE_PYTHON).
set -euo pipefail
cd "$(dirname "$0")/.."
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
  *) echo "unknown benchmark $what" >&2; exit 2;;
esac
