#!/usr/bin/env bash
# Runs two builds of bake on the same inputs and compares what they write, byte for byte: a bake folder,
# `bake probe`'s folder, `bake search`'s folder, and the JSON of `bake eval --baked` and `bake eval --cv 2`.
# Timings (bake.log, probe.log, search.log, the `timings` of eval's JSON) are the only things left out. For
# refactorings that must not change a byte. (Builds before 2026-12-06 wrote the probe's seconds into its
# report.json and listed search.log in outputs.json, so against them those three files differ by nature.)
#
#   scripts/same-outputs.sh BEFORE_BINARY AFTER_BINARY MODEL CORPUS [LIMIT]
#
# Exit 0 when everything is identical; otherwise the differing files are listed and the exit is 1.
set -euo pipefail
[ $# -ge 4 ] || { echo "usage: $0 BEFORE_BINARY AFTER_BINARY MODEL CORPUS [LIMIT]" >&2; exit 2; }
before=$1 after=$2 model=$3 corpus=$4 limit=${5:-40}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

run_all() {
    local bin=$1 out=$2
    mkdir -p "$out"
    export BAKE_CACHE_DIR="$out/cache"
    "$bin" --model "$model" --limit "$limit" --heads 8 --out "$out/bake" -q
    "$bin" probe --model "$model" --limit "$limit" --heads 8 --out "$out/probe" -q
    "$bin" eval --model "$model" --baked "$out/bake" --limit "$limit" --corpus "$corpus" --documents 5 --json -q \
        > "$out/eval-baked.json"
    "$bin" eval --model "$model" --cv 2 --heads 8 --alpha 5 --limit "$limit" --corpus "$corpus" --documents 5 \
        --json -q > "$out/eval-cv.json"
    "$bin" search --model "$model" --limit "$limit" --heads 4,8 --alpha 0,5 --corpus "$corpus" --documents 5 \
        --out "$out/search" -q > /dev/null
    rm -rf "$out/cache" "$out/bake/bake.log" "$out/probe/probe.log" "$out/search/search.log"
    for json in "$out"/eval-*.json; do
        python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); d.pop("timings",None); json.dump(d,open(sys.argv[1],"w"),indent=1,sort_keys=True)' "$json"
    done
}

echo "before: $before" >&2
run_all "$before" "$work/before"
echo "after: $after" >&2
run_all "$after" "$work/after"
files=$(cd "$work/before" && find . -type f | sort)
[ "$files" = "$(cd "$work/after" && find . -type f | sort)" ] || { echo "the two builds wrote different files" >&2; exit 1; }
differ=0
for f in $files; do
    if ! cmp -s "$work/before/$f" "$work/after/$f"; then
        echo "differs: $f" >&2
        differ=1
    fi
done
[ $differ = 0 ] && echo "identical: $(echo "$files" | wc -l) files" >&2
exit $differ
