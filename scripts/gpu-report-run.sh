#!/usr/bin/env bash
# The benchmark report's run, in ONE command on a machine with 4 GPUs (written for the lent
# nvidia-h200-x4: 4 x H200, 64 cores, 512 GiB RAM, no network), finishing within --deadline
# seconds (default 540: one 600 s call). Steps that would not fit are skipped and said so; every
# step has its own timeout; a failure is logged and the run goes on.
#
#   A  build (cmake + ninja -j60)
#   B  four lanes at once, one GPU and a quarter of the cores each (one after the other with fewer
#      than 4 GPUs, or --serial):
#        GPU 0  nosa bench decode (1b, 8b: dense / infllmv2 / nosa, B = 1, 16, 64, 16K and 32K;
#               each row also times the attention alone), prefill (16 x 16K, 1b and 8b)
#        GPU 1  ctest -L gpu (single-GPU tests), the PyTorch SDPA peer (scripts/bench_sdpa.py),
#               the transformers generate peer (scripts/bench_transformers.py)
#        GPU 2  offload 8b B=16 (nosa vs infllmv2, 16K and 32K), the controlled miss-rate sweep,
#               offload 1b B=16, 64 at 16K
#        GPU 3  offload 8b B=64 (nosa vs infllmv2, 16K, then 32K)
#   C  all GPUs: multi-GPU tests, tensor-parallel scaling of nosa-8b-like B=64 16K at TP = 1, 2, 4
#      (KV in HBM and offloaded; rows labelled "tp"), TP = 2 and 4 logits against TP = 1
#   D  KV beyond HBM: nosa-8b-like, 32 x 128K, host (96 GiB) + disk, one GPU, with what time is
#      left
#
# Results (at most 8 files) in RESULTS (default: $OUT, else build-gpu/report-results):
#   summary.txt   what ran, pass/fail/skipped with times, every result line, the tables
#                 (scripts/bench_summary.py), the machine and the commit
#   log.txt       everything the steps printed (by lane)
#   bench.jsonl   one `nosa bench` JSON document a line (each with machine, GPU count, commit,
#                 command, configuration)
#   peers.jsonl   the transformers and SDPA peers' documents (same machine and commit)
#   tp_check.txt  TP = 2 and 4 against TP = 1: greedy tokens and logprob differences
#   gpu-tests.txt ctest output of the GPU tests
# The machine has no git history: set NOSA_COMMIT to the commit being run. Afterwards copy the
# files to bench/results/DATE-h200x4-report/ and run scripts/bench-report.sh.
#
#   scripts/gpu-report-run.sh [--deadline S] [--jobs N] [--serial] [--no-build] [--dry-run]
#                             [--lanes-until S] [--tp-until S] [--no-beyond-hbm]
# --no-beyond-hbm skips phase D (when its run is taken separately).
# --dry-run prints the plan (every command, its lane, estimate and time limit) and writes the
# files without running anything (no GPU needed).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
root=$PWD

deadline=540 jobs=60 serial=0 dry=0 do_build=1 beyond_hbm=1
lanes_until=0 tp_until=0
while [ $# -gt 0 ]; do
  case "$1" in
    --deadline) deadline=$2; shift ;;
    --jobs) jobs=$2; shift ;;
    --serial) serial=1 ;;
    --no-build) do_build=0 ;;
    --dry-run) dry=1 ;;
    --no-beyond-hbm) beyond_hbm=0 ;;
    --lanes-until) lanes_until=$2; shift ;;
    --tp-until) tp_until=$2; shift ;;
    -h|--help) sed -n '2,38p' "$0"; exit 0 ;;
    *) echo "gpu-report-run: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
# Phase ends (seconds from the start): the lanes, then tensor parallelism; the rest is phase D.
[ "$lanes_until" -gt 0 ] || lanes_until=$((deadline * 56 / 100))
[ "$tp_until" -gt 0 ] || tp_until=$((deadline * 78 / 100))

start=$(date +%s)
now() { echo $(($(date +%s) - start)); }

export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
build=${NOSA_GPU_BUILD:-build-gpu}
results=${RESULTS:-${OUT:-$build/report-results}}
mkdir -p "$results"
results=$(cd "$results" && pwd)
summary=$results/summary.txt log=$results/log.txt
bench_out=$results/bench.jsonl peers_out=$results/peers.jsonl
tp_out=$results/tp_check.txt tests_out=$results/gpu-tests.txt
for f in "$summary" "$log" "$bench_out" "$peers_out" "$tp_out" "$tests_out"; do : >"$f"; done
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
nosa=$root/$build/launcher/nosa

. scripts/commit-id.sh
commit=$(commit_id)
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
gpus=${gpus:-0}
gpu_desc=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -1)
machine_text="${gpus} x ${gpu_desc:-no GPU}, $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB RAM", $2 / 1048576}' /proc/meminfo)"
parallel=0
[ "$gpus" -ge 4 ] && [ $serial -eq 0 ] && parallel=1

say() { echo "$*" | tee -a "$summary"; }
say "nosa gpu-report-run  commit $commit  $(date -u +%Y-%m-%dT%H:%M:%SZ)"
[ "$commit" = unknown ] && say "WARNING: no commit recorded (set NOSA_COMMIT: this copy has no git history)"
say "machine: $machine_text"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader 2>/dev/null |
  sed 's/^/  gpu /' | tee -a "$summary"
for f in "$tp_out" "$tests_out"; do
  echo "# nosa gpu-report-run, commit $commit, machine: $machine_text, $(date -u +%Y-%m-%dT%H:%M:%SZ)" >"$f"
done
say "host: $(hostname), deadline $deadline s (lanes until $lanes_until s, tensor parallelism until $tp_until s)"
say "lanes: $([ $parallel -eq 1 ] && echo "concurrent, one GPU each" || echo "one after the other")$([ $dry -eq 1 ] && echo "  [dry run: nothing is executed]")"

# ---- running steps ------------------------------------------------------------------------------
# Each lane writes its own log, summary part and JSONL (merged in lane order at the end).
# step LANE UNTIL EST LIMIT NAME -- COMMAND...: runs COMMAND when EST seconds still fit before
# UNTIL, under timeout min(LIMIT, UNTIL - now); appends its output to the lane's log.
step() {
  local lane=$1 until=$2 est=$3 limit=$4 name=$5
  shift 6
  local lsum=$scratch/sum.$lane llog=$scratch/log.$lane t0
  t0=$(now)
  local room=$((until - t0))
  if [ $((t0 + est)) -gt "$until" ]; then
    echo "  skipped (deadline: $room s left of this phase, needs ~$est s): $name" >>"$lsum"
    return 99
  fi
  [ "$limit" -gt "$room" ] && limit=$room
  echo "== [$lane] $name  (t=$t0 s, limit $limit s)" >>"$llog"
  echo "\$ $*" >>"$llog"
  if [ $dry -eq 1 ]; then
    echo "  [$lane] ~${est}s ≤${limit}s  $name: $*" >>"$lsum"
    return 0
  fi
  timeout -k 15 "$limit" "$@" >>"$llog" 2>&1
  local rc=$?
  local dt=$(($(now) - t0))
  case $rc in
    0) echo "  ok ($dt s): $name" >>"$lsum" ;;
    124|137) echo "  TIMED OUT after $dt s: $name" >>"$lsum" ;;
    *) echo "  FAILED (exit $rc, $dt s): $name" >>"$lsum" ;;
  esac
  return $rc
}

# Adds the machine (nvidia-smi name, GPU count), the commit and the lane to a JSON document and
# appends it as one line to a JSONL file.
annotate() {  # annotate IN.json OUT.jsonl LANE_TEXT
  python3 - "$1" "$2" "$machine_text" "$gpus" "$commit" "$3" <<'PY'
import json, sys
src, dst, machine, gpus, commit, lane = sys.argv[1:7]
try:
    doc = json.load(open(src))
except (OSError, ValueError) as e:
    print(f"annotate: {src}: {e}")
    sys.exit(0)
m = doc.get("machine")
if not isinstance(m, dict):
    m = {"backend": str(m)} if m else {}
m["gpu"] = machine
m["gpus"] = int(gpus)
doc["machine"] = m
if not doc.get("commit") or doc.get("commit") in ("unknown", "not recorded"):
    doc["commit"] = commit
doc["lane"] = lane
with open(dst, "a") as f:
    f.write(json.dumps(doc, separators=(",", ":")) + "\n")
PY
}

# bench LANE UNTIL EST LIMIT NP ARGS...: one `nosa bench` run (NP = 1, or mpirun -np NP); its
# result lines go to the lane's summary, its document to the lane's JSONL.
bench() {
  local lane=$1 until=$2 est=$3 limit=$4 np=$5
  shift 5
  local json=$scratch/bench.$lane.json lsum=$scratch/sum.$lane
  rm -f "$json"
  local cmd=("$nosa" bench "$@" --device cuda --commit "$commit" --json "$json")
  [ "$np" -gt 1 ] && cmd=(mpirun --allow-run-as-root --oversubscribe -x NCCL_NVLS_ENABLE -np "$np" "${cmd[@]}")
  touch "$scratch/log.$lane" "$lsum"
  local mark
  mark=$(wc -l <"$scratch/log.$lane")
  step "$lane" "$until" "$est" "$limit" "nosa bench $* (np $np)" -- "${cmd[@]}"
  local rc=$?
  [ $rc -eq 99 ] && return
  tail -n +"$((mark + 1))" "$scratch/log.$lane" | grep -E "\] (decode|offload|prefill) " |
    grep -v "rank [1-9]" | sed 's/^.*\] /    /' >>"$lsum"
  [ -f "$json" ] && annotate "$json" "$scratch/bench.$lane.jsonl" "$lane"
}

in_lane() {  # in_lane K: lane K's GPU and a quarter of the cores (the CPU-heavy GPU tests must
  # not slow the host side of another lane's steps)
  [ $parallel -eq 1 ] || return 0
  export CUDA_VISIBLE_DEVICES=$1
  local q=$(($(nproc) / 4))
  if [ "$q" -ge 1 ] && command -v taskset >/dev/null; then
    taskset -cp "$(($1 * q))-$(($1 * q + q - 1))" "$BASHPID" >/dev/null 2>&1 || true
  fi
}

# ---- A: build -----------------------------------------------------------------------------------
if [ $do_build -eq 1 ]; then
  nvcc=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
  step A "$deadline" 60 300 "build (ninja -j$jobs)" -- bash -c "cmake -S . -B '$build' -G Ninja \
    -DCMAKE_BUILD_TYPE=Release -DNOSA_CUDA=ON -DCMAKE_CUDA_COMPILER='$nvcc' \
    -DCMAKE_CUDA_ARCHITECTURES='${CUDA_ARCH:-90}' && ninja -C '$build' -k 0 -j$jobs"
fi
cat "$scratch/sum.A" 2>/dev/null | tee -a "$summary"
cat "$scratch/log.A" >>"$log" 2>/dev/null
if [ $dry -eq 0 ] && [ ! -x "$nosa" ]; then
  say "no nosa binary: nothing else can run"
  tail -30 "$log" | tee -a "$summary"
  exit 1
fi
say "build phase done at $(now) s"

# ---- B: the lanes -------------------------------------------------------------------------------
U=$lanes_until
lane0() {
  in_lane 0
  local s="--steps 8 --warmup 3 --threads 16"
  bench L0 $U 25 150 1 --suite decode --shape nosa-1b-like --mode dense,infllmv2,nosa \
    --batch 1,16,64 --context 16384,32768 $s
  bench L0 $U 35 150 1 --suite decode --shape nosa-8b-like --mode dense,infllmv2,nosa \
    --batch 1,16,64 --context 16384,32768 $s
  bench L0 $U 30 120 1 --suite prefill --shape nosa-1b-like --mode dense,infllmv2,nosa \
    --prompts 16 --prompt-len 16384 --threads 16
  bench L0 $U 70 180 1 --suite prefill --shape nosa-8b-like --mode dense,infllmv2,nosa \
    --prompts 16 --prompt-len 16384 --threads 16
}
lane1() {
  in_lane 1
  step L1 $U 40 180 "ctest -L gpu (one GPU)" -- bash -c "cd '$build' && ctest -L gpu \
    -E 'cuda_check_against_transformers|PeerAllReduce' -V -j 1 >'$scratch/ctest1.txt' 2>&1; \
    rc=\$?; grep -E 'tests passed|tests failed|\\((Failed|Timeout|SEGFAULT|Not Run|Exception)\\)' \
    '$scratch/ctest1.txt'; exit \$rc"
  grep -E 'tests passed|tests failed|\((Failed|Timeout|SEGFAULT|Not Run|Exception)\)' \
    "$scratch/ctest1.txt" 2>/dev/null | sed 's/^/    /' >>"$scratch/sum.L1"
  cat "$scratch/ctest1.txt" >>"$tests_out" 2>/dev/null
  rm -f "$scratch/sdpa.json" "$scratch/tf.json"
  step L1 $U 45 150 "PyTorch SDPA peer" -- python3 scripts/bench_sdpa.py \
    --shape nosa-1b-like,nosa-8b-like --batch 1,16,64 --context 16384,32768 --prompts 16 \
    --prompt-len 16384 --commit "$commit" --out "$scratch/sdpa.json"
  grep -E "^sdpa (decode|prefill|peer)|^skipped" "$scratch/log.L1" | sed 's/^/    /' >>"$scratch/sum.L1"
  [ -f "$scratch/sdpa.json" ] && annotate "$scratch/sdpa.json" "$scratch/peers.L1.jsonl" L1
  step L1 $U 80 200 "transformers generate peer" -- python3 scripts/bench_transformers.py \
    --shape nosa-1b-like --shape nosa-8b-like --batch 16 --context 16384 --decode-steps 8 \
    --out "$scratch/tf.json"
  grep -E "^transformers |^skipped" "$scratch/log.L1" | sed 's/^/    /' >>"$scratch/sum.L1"
  [ -f "$scratch/tf.json" ] && annotate "$scratch/tf.json" "$scratch/peers.L1.jsonl" L1
}
lane2() {
  in_lane 2
  bench L2 $U 40 150 1 --suite offload --shape nosa-8b-like --mode nosa,infllmv2 --batch 16 \
    --context 16384,32768 --steps 6 --warmup 2 --threads 16
  bench L2 $U 40 120 1 --suite offload --shape nosa-8b-like --mode nosa --batch 16 \
    --context 16384 --miss-rate 0,0.05,0.1,0.2,0.4 --steps 6 --warmup 2 --threads 16
  bench L2 $U 50 120 1 --suite offload --shape nosa-1b-like --mode nosa,infllmv2 --batch 16,64 \
    --context 16384 --steps 8 --warmup 3 --threads 16
}
lane3() {
  in_lane 3
  bench L3 $U 50 150 1 --suite offload --shape nosa-8b-like --mode nosa,infllmv2 --batch 64 \
    --context 16384 --steps 6 --warmup 2 --threads 16
  bench L3 $U 90 200 1 --suite offload --shape nosa-8b-like --mode nosa,infllmv2 --batch 64 \
    --context 32768 --steps 6 --warmup 2 --threads 16
}
if [ $parallel -eq 1 ]; then
  lane0 & p0=$!
  lane1 & p1=$!
  lane2 & p2=$!
  lane3 & p3=$!
  wait $p0 $p1 $p2 $p3
else
  lane0; lane1; lane2; lane3
fi
unset CUDA_VISIBLE_DEVICES
for l in L0 L1 L2 L3; do
  say ""
  case $l in
    L0) say "== lane GPU 0: decode (KV in HBM) and prefill" ;;
    L1) say "== lane GPU 1: GPU tests, SDPA and transformers peers" ;;
    L2) say "== lane GPU 2: offloaded decode B=16, miss-rate sweep, 1b" ;;
    L3) say "== lane GPU 3: offloaded decode B=64" ;;
  esac
  cat "$scratch/sum.$l" 2>/dev/null | tee -a "$summary"
  cat "$scratch/log.$l" >>"$log" 2>/dev/null
  cat "$scratch/bench.$l.jsonl" >>"$bench_out" 2>/dev/null
  cat "$scratch/peers.$l.jsonl" >>"$peers_out" 2>/dev/null
done
say "lanes done at $(now) s"

# ---- C: tensor parallelism ----------------------------------------------------------------------
U=$tp_until
if [ "$gpus" -ge 2 ] || [ $dry -eq 1 ]; then
  tps=(2)
  { [ "$gpus" -ge 4 ] || [ $dry -eq 1 ]; } && tps=(2 4)
  step C $U 20 60 "ctest PeerAllReduce (${tps[*]} GPUs)" -- bash -c "cd '$build' && \
    ctest -R PeerAllReduce -V >'$scratch/ctest2.txt' 2>&1; rc=\$?; \
    grep -E 'tests passed|tests failed' '$scratch/ctest2.txt'; exit \$rc"
  grep -E 'tests passed|tests failed' "$scratch/ctest2.txt" 2>/dev/null | sed 's/^/    /' >>"$scratch/sum.C"
  cat "$scratch/ctest2.txt" >>"$tests_out" 2>/dev/null
  # Logits of TP = 2 and 4 against TP = 1 (tiny: 4 query / 2 KV heads; a 4-layer 1b-like).
  models=$scratch/models
  python3 -c "print(','.join(str(3 + (i * 7919) % 1990) for i in range(3000)))" >"$scratch/ids"
  tp_check() {  # tp_check MODEL MODE
    local m=$1 mode=$2 n specs=() est=$((6 * (2 + ${#tps[@]})))
    local args=(generate --model "$models/$m" --attention "$mode" --prompt-ids @"$scratch/ids"
                --max-tokens 16 --ignore-eos --json --logprobs 5 --device cuda --log-level warn)
    rm -f "$scratch"/tp[0-9].json
    step C $U "$est" 60 "TP check $m $mode: TP=1" -- bash -c '"$@" > "'"$scratch/tp1.json"'"' _ \
      "$nosa" "${args[@]}" --tp 1 || return
    for n in "${tps[@]}"; do
      step C $U 6 60 "TP check $m $mode: TP=$n" -- bash -c '"$@" > "'"$scratch/tp$n.json"'"' _ \
        mpirun --allow-run-as-root --oversubscribe -x NCCL_NVLS_ENABLE -np "$n" \
        "$nosa" "${args[@]}" --tp "$n" && specs+=("$n:$scratch/tp$n.json")
    done
    # The same TP = 2 run without step graphs: replays must give the tokens of direct steps.
    local direct=0
    step C $U 6 60 "TP check $m $mode: TP=2 without graphs" -- bash -c '"$@" > "'"$scratch/tp2d.json"'"' _ \
      mpirun --allow-run-as-root --oversubscribe -x NCCL_NVLS_ENABLE -x NOSA_CUDA_GRAPHS=0 -np 2 \
      "$nosa" "${args[@]}" --tp 2 && direct=1
    if [ $dry -eq 0 ] && [ ${#specs[@]} -gt 0 ]; then
      python3 scripts/tp_logits_check.py --name "$m $mode" "$scratch/tp1.json" "${specs[@]}" |
        tee -a "$tp_out" >>"$scratch/sum.C"
      [ $direct -eq 1 ] && python3 scripts/tp_logits_check.py --name "$m $mode" \
        --against "TP=2 without step graphs" "$scratch/tp2d.json" "TP=2 with graphs:$scratch/tp2.json" |
        tee -a "$tp_out" >>"$scratch/sum.C"
    fi
  }
  # Decode scaling first (cheap), one logits check, offloaded scaling, the other checks.
  s="--steps 8 --warmup 3 --label tp"
  bench C $U 15 90 1 --suite decode --shape nosa-8b-like --mode nosa,dense --batch 64 --context 16384 $s --tp 1
  for n in "${tps[@]}"; do
    bench C $U 20 90 "$n" --suite decode --shape nosa-8b-like --mode nosa,dense --batch 64 \
      --context 16384 $s --tp "$n"
  done
  step C $U 10 60 "make-model tiny and 1b-like (4 layers)" -- bash -c "'$nosa' make-model \
    --shape tiny --attention nosa --seed 3 --out '$models/tiny' && '$nosa' make-model --shape \
    nosa-1b-like --layers 4 --attention nosa --seed 3 --out '$models/1b4'"
  tp_check 1b4 nosa
  s="--steps 6 --warmup 2 --label tp"
  bench C $U 30 120 1 --suite offload --shape nosa-8b-like --mode nosa --batch 64 --context 16384 $s --tp 1
  for n in "${tps[@]}"; do
    bench C $U 25 120 "$n" --suite offload --shape nosa-8b-like --mode nosa --batch 64 \
      --context 16384 $s --tp "$n"
  done
  tp_check tiny nosa
  tp_check 1b4 dense
  tp_check tiny dense
  say ""
  say "== tensor parallelism on $gpus GPUs (TP = 1 ${tps[*]}; nosa-8b-like B=64 16K)"
  cat "$scratch/sum.C" 2>/dev/null | tee -a "$summary"
  cat "$scratch/log.C" >>"$log" 2>/dev/null
  cat "$scratch/bench.C.jsonl" >>"$bench_out" 2>/dev/null
else
  say "tensor parallelism: skipped ($gpus GPU)"
fi
say "tensor parallelism done at $(now) s"

# The tables so far: in $OUT before phase D (a run killed at the call's limit keeps them).
say ""
python3 scripts/bench_summary.py "$bench_out" "$peers_out" 2>&1 | tee -a "$summary"

# ---- D: KV beyond HBM (last: pins 96 GiB of host memory and writes the rest to disk) -------------
if [ $beyond_hbm -eq 0 ]; then
  say ""
  say "gpu-report-run: done in $(now) s (phase D skipped: --no-beyond-hbm); files: $(cd "$results" && ls | tr '\n' ' ')"
  exit 0
fi
kvdir=/tmp/nosa-kv
left=$((deadline - 20 - $(now)))
rm -rf "$kvdir"
mkdir -p "$kvdir"
say ""
say "== KV beyond HBM (nosa-8b-like, 32 x 128K = 128 GiB of KV; host 96 GiB + disk), from $(now) s"
bench D $((deadline - 20)) 60 "$left" 1 --suite offload --shape nosa-8b-like --mode nosa --batch 32 \
  --context 131072 --offload host+disk --host-kv-gib 96 --disk-kv-dir "$kvdir" --steps 3 --warmup 1
rm -rf "$kvdir"
cat "$scratch/sum.D" 2>/dev/null | tee -a "$summary"
cat "$scratch/log.D" >>"$log" 2>/dev/null
cat "$scratch/bench.D.jsonl" >>"$bench_out" 2>/dev/null
python3 scripts/bench_summary.py "$scratch/bench.D.jsonl" 2>&1 | sed -n '/^KV on disk/,$p' |
  tee -a "$summary"

say ""
say "gpu-report-run: done in $(now) s; files: $(cd "$results" && ls | tr '\n' ' ')"
# The device tool returns files of at most 16 MiB: keep the end of a long log.
for f in "$log" "$tests_out"; do
  if [ "$(stat -c %s "$f")" -gt $((15 << 20)) ]; then
    tail -c $((15 << 20)) "$f" >"$scratch/trim" && mv "$scratch/trim" "$f"
  fi
done
exit 0
