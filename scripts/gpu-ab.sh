#!/usr/bin/env bash
# An A/B of two builds of nosa on one machine: builds both, then runs the same `nosa bench`
# command with each in alternated processes (A, B, A, B, ...), and summarizes the step times per
# configuration. Processes on the lent GPU machines differ by a few percent (offloaded steps by up
# to 10%), so a change is judged by alternated processes like these, not against a figure from
# another call.
#
#   scripts/gpu-ab.sh [--rounds N] A B -- BENCH_ARGS...
#
# A, B: commits of this checkout (exported with git archive) or source trees (directories,
#   relative to the repository root; the commit recorded is the tree's COMMIT file when it has
#   one, else the directory's name). On a machine without the history, export the trees first,
#   e.g. `git archive OLD | tar -x -C ab/old && echo OLD > ab/old/COMMIT`.
# --rounds: processes per build (default 2).
# BENCH_ARGS: a `nosa bench` command line without --json and --commit (the script sets them).
# NOSA_AB_CMAKE: the builds' CMake options (default: the CUDA backend for sm_90).
# Results go to RESULTS (default: $OUT when set, else build-ab/results):
#   ab.jsonl      one `nosa bench` JSON document per process; each row also has `tree` (A or B)
#                 and `process` (the round)
#   summary.txt   per configuration: each build's step times in process order, their means, B / A
#   log.txt       the builds' and runs' output
set -uo pipefail
cd "$(dirname "$0")/.."

rounds=2
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) break ;;
  esac
done
if [ $# -lt 3 ] || [ "$3" != "--" ]; then
  echo "usage: scripts/gpu-ab.sh [--rounds N] A B -- BENCH_ARGS... (see --help)" >&2
  exit 2
fi
a=$1 b=$2
shift 3
for arg in "$@"; do
  case "$arg" in
    --json|--json=*|--commit|--commit=*)
      echo "gpu-ab: leave $arg out of BENCH_ARGS (the script sets it)" >&2; exit 2 ;;
  esac
done
[ "$rounds" -ge 1 ] 2>/dev/null || { echo "gpu-ab: --rounds takes a count >= 1" >&2; exit 2; }

work=${NOSA_AB_DIR:-build-ab}
results=${RESULTS:-${OUT:-$work/results}}
mkdir -p "$work" "$results"
work=$(cd "$work" && pwd)
results=$(cd "$results" && pwd)
log=$results/log.txt
: >"$log"
: >"$results/ab.jsonl"
cmake_args=${NOSA_AB_CMAKE:--DNOSA_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

# tree NAME REF: prints "SOURCE_DIR COMMIT" for a commit of this checkout or a directory.
tree() {
  local name=$1 ref=$2
  if [ -d "$ref" ]; then
    local commit
    commit=$(cat "$ref/COMMIT" 2>/dev/null || basename "$ref")
    echo "$(cd "$ref" && pwd) $commit"
  elif git rev-parse --verify --quiet "$ref^{commit}" >/dev/null; then
    local sha src=$work/src-$name
    sha=$(git rev-parse --short "$ref")
    rm -rf "$src" && mkdir -p "$src"
    git archive "$sha" | tar -x -C "$src" || return 1
    echo "$src $sha"
  else
    echo "gpu-ab: $ref is neither a directory nor a commit of this checkout" >&2
    return 1
  fi
}
read -r src_a commit_a < <(tree a "$a") || exit 2
read -r src_b commit_b < <(tree b "$b") || exit 2
[ -n "${src_a:-}" ] && [ -n "${src_b:-}" ] || exit 2

# Both builds at once, each on half the cores.
jobs=$(( $(nproc) / 2 > 0 ? $(nproc) / 2 : 1 ))
build() {
  cmake -S "$1" -B "$2" -G Ninja -DCMAKE_BUILD_TYPE=Release $cmake_args && ninja -C "$2" -j "$jobs" nosa
}
echo "== building A ($commit_a) and B ($commit_b) $(date -u +%H:%M:%S)" | tee -a "$log"
build "$src_a" "$work/build-a" >"$work/build-a.log" 2>&1 &
pid_a=$!
build "$src_b" "$work/build-b" >"$work/build-b.log" 2>&1
rc_b=$?
wait $pid_a
rc_a=$?
cat "$work/build-a.log" "$work/build-b.log" >>"$log"
if [ $rc_a -ne 0 ] || [ $rc_b -ne 0 ]; then
  echo "gpu-ab: build failed (A: rc $rc_a, B: rc $rc_b); see $log" | tee -a "$results/summary.txt"
  exit 1
fi

status=0
for round in $(seq 1 "$rounds"); do
  for t in A B; do
    if [ $t = A ]; then bin=$work/build-a/launcher/nosa commit=$commit_a; else bin=$work/build-b/launcher/nosa commit=$commit_b; fi
    echo "== round $round, $t ($commit): nosa bench $* $(date -u +%H:%M:%S)" | tee -a "$log"
    one=$work/one.json
    rm -f "$one"
    if ! "$bin" bench "$@" --commit "$commit" --json "$one" >>"$log" 2>&1; then
      echo "gpu-ab: round $round, $t failed; see $log" | tee -a "$results/summary.txt"
      status=1
      continue
    fi
    python3 - "$one" "$t" "$round" >>"$results/ab.jsonl" <<'PY'
import json, sys
doc = json.load(open(sys.argv[1]))
for row in doc.get("results", []):
    row["tree"], row["process"] = sys.argv[2], int(sys.argv[3])
print(json.dumps(doc, separators=(",", ":")))
PY
  done
done

python3 - "$results/ab.jsonl" "$commit_a" "$commit_b" >>"$results/summary.txt" <<'PY'
import json, sys
from collections import OrderedDict
path, commit_a, commit_b = sys.argv[1:4]
keys = ("suite", "shape", "mode", "batch", "context", "controlled_miss_rate", "residency",
        "label", "tp")
table = OrderedDict()
for line in open(path):
    for row in json.loads(line).get("results", []):
        if "step_ms_median" not in row:
            continue
        key = tuple(row.get(k) for k in keys)
        table.setdefault(key, {"A": [], "B": []})[row["tree"]].append(row["step_ms_median"])
print(f"A = {commit_a}, B = {commit_b}: step ms (median of each process's timed steps), in "
      "process order; mean; B / A")
for key, t in table.items():
    name = " ".join(f"{k}={v}" for k, v in zip(keys, key) if v not in (None, ""))
    ma = sum(t["A"]) / len(t["A"]) if t["A"] else float("nan")
    mb = sum(t["B"]) / len(t["B"]) if t["B"] else float("nan")
    fa = ", ".join(f"{v:.3f}" for v in t["A"])
    fb = ", ".join(f"{v:.3f}" for v in t["B"])
    print(f"  {name}\n    A: {fa} (mean {ma:.3f})   B: {fb} (mean {mb:.3f})   B / A {mb / ma:.3f}")
PY
cat "$results/summary.txt"
exit $status
