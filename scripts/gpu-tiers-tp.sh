#!/usr/bin/env bash
# Offloaded KV and tensor parallelism on GPUs, in one command (written for the lent H200
# machines: one or two GPUs, no network). Runs scripts/gpu-check.sh's build, GPU tests and
# reference checks, then:
#   offload    `nosa bench --suite offload`: NOSA vs InfLLM-V2 with the KV in pinned host memory,
#              the GPU holding a block cache; a controlled miss-rate sweep; the all-in-HBM decode
#              of the same shapes for comparison
#   tp         with two or more GPUs: TP=2 (and TP=4 with four GPUs) logits against TP=1 (tiny and
#              a 4-layer 1b-like checkpoint), and decode scaling of nosa-8b-like at B=64, 16K
#              (TP=1, 2, 4; KV in HBM and offloaded) with the efficiency in the summary
# Everything lands in RESULTS (default: $OUT, else build-gpu/results): summary.txt, log.txt,
# transformers_check.json, bench.jsonl (one JSON document per `nosa bench` run, each with the
# machine, commit and configuration), tp_check.txt.
#   scripts/gpu-tiers-tp.sh [--no-check] [--no-offload] [--deadline SECONDS]
# --no-check skips gpu-check's tests and reference checks (the offload test still runs);
# --no-offload skips the offload benchmarks.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
check=1 deadline=0 offload=1
while [ $# -gt 0 ]; do
  case "$1" in
    --no-check) check=0 ;;
    --no-offload) offload=0 ;;
    --deadline) deadline=$2; shift ;;
    *) echo "gpu-tiers-tp: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
late() { [ "$deadline" -gt 0 ] && [ $SECONDS -gt $((deadline - 45)) ]; }
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
build=${NOSA_GPU_BUILD:-build-gpu}
results=${RESULTS:-${OUT:-$build/results}}
mkdir -p "$results"
results=$(cd "$results" && pwd)
export RESULTS=$results

if [ $check -eq 1 ]; then
  GPU_CHECK_DEADLINE=$deadline scripts/gpu-check.sh --no-bench --no-peer
else
  scripts/gpu-check.sh --no-tests --no-bench --no-peer
fi
summary=$results/summary.txt
log=$results/log.txt
nosa=$root/$build/launcher/nosa
[ -x "$nosa" ] || { echo "no nosa binary" | tee -a "$summary"; exit 1; }
. scripts/commit-id.sh
commit=$(commit_id)
say() { echo "$*" | tee -a "$summary"; }
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
bench_out=$results/bench.jsonl
: >"$bench_out"
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
mpirun_np=(mpirun --allow-run-as-root --oversubscribe -x NCCL_NVLS_ENABLE -np)

# One `nosa bench` run: its JSON document goes to bench.jsonl, its table lines to the summary.
bench() {
  local launch=$1; shift
  if late; then say "skipped (deadline): nosa bench $*"; return; fi
  say "\$ nosa bench $*   ($launch)"
  local t0=$SECONDS
  if [ "$launch" = "1" ]; then
    timeout 600 "$nosa" bench "$@" --device cuda --commit "$commit" --json "$scratch/b.json" \
      >>"$log" 2>"$scratch/err.txt"
  else
    timeout 600 "${mpirun_np[@]}" "$launch" "$nosa" bench "$@" --device cuda --commit "$commit" \
      --json "$scratch/b.json" >>"$log" 2>"$scratch/err.txt"
  fi
  local rc=$?
  cat "$scratch/err.txt" >>"$log"
  grep -E "\] (decode|offload|prefill) " "$scratch/err.txt" | grep -v "rank [1-9]" |
    sed 's/^.*\] /  /' | tee -a "$summary"
  [ $rc -ne 0 ] && say "  FAILED ($rc): $(tail -2 "$scratch/err.txt" | tr '\n' ' ')"
  [ -f "$scratch/b.json" ] && tr -d '\n' <"$scratch/b.json" >>"$bench_out" && echo >>"$bench_out"
  rm -f "$scratch/b.json"
  say "  ($((SECONDS - t0)) s)"
}

if [ $check -eq 0 ]; then  # still run the offload correctness test
  (cd "$build" && timeout 300 ctest -R Offload -V) >"$scratch/t.txt" 2>&1
  cat "$scratch/t.txt" >>"$log"
  grep -E "\[ offload +\]|tests passed|tests failed" "$scratch/t.txt" | sed 's/^[0-9]*: /  /' |
    tee -a "$summary"
fi
[ $offload -eq 1 ] && {
say ""
say "== offloaded decode (KV in pinned host memory; GPU block cache = 2x the batch's selection)"
bench 1 --suite offload --shape nosa-1b-like --mode nosa,infllmv2 --batch 16,64 --context 16384 \
  --steps 8 --warmup 3
bench 1 --suite decode --shape nosa-1b-like --mode dense,nosa --batch 16,64 --context 16384 \
  --steps 8 --warmup 3
bench 1 --suite offload --shape nosa-1b-like --mode nosa --batch 16 --context 16384 \
  --miss-rate 0,0.05,0.1,0.2,0.4 --steps 8 --warmup 3
bench 1 --suite offload --shape nosa-8b-like --mode nosa,infllmv2 --batch 16 \
  --context 16384,32768 --steps 6 --warmup 2
}

if [ "$gpus" -ge 2 ]; then
  tps=(2)
  [ "$gpus" -ge 4 ] && tps=(2 4)
  say ""
  say "== tensor parallelism on $gpus GPUs (TP = 1 ${tps[*]})"
  tp=$results/tp_check.txt
  : >"$tp"
  models=$scratch/models
  "$nosa" make-model --shape tiny --attention nosa --seed 3 --out "$models/tiny" >>"$log" 2>&1
  "$nosa" make-model --shape nosa-1b-like --layers 4 --attention nosa --seed 3 \
    --out "$models/1b4" >>"$log" 2>&1
  python3 -c "print(','.join(str(3 + (i * 7919) % 1990) for i in range(3000)))" >"$scratch/ids"
  for m in tiny 1b4; do
    for mode in dense nosa; do
      if late; then say "skipped (deadline): TP check $m $mode"; continue; fi
      args=(generate --model "$models/$m" --attention $mode --prompt-ids @"$scratch/ids"
            --max-tokens 16 --ignore-eos --json --logprobs 5 --device cuda --log-level warn)
      timeout 300 "$nosa" "${args[@]}" --tp 1 >"$scratch/tp1.json" 2>>"$log"
      specs=()
      for n in "${tps[@]}"; do
        timeout 300 "${mpirun_np[@]}" "$n" "$nosa" "${args[@]}" --tp "$n" >"$scratch/tp$n.json" \
          2>>"$log" && specs+=("$n:$scratch/tp$n.json")
      done
      [ ${#specs[@]} -gt 0 ] &&
        python3 scripts/tp_logits_check.py --name "$m $mode" "$scratch/tp1.json" "${specs[@]}" |
        tee -a "$tp" "$summary"
    done
  done
  # Scaling (rows labelled "tp": the report compares each TP = n with its own TP = 1 row).
  for n in 1 "${tps[@]}"; do
    bench "$n" --suite decode --shape nosa-8b-like --mode nosa,dense --batch 64 --context 16384 \
      --steps 8 --warmup 3 --tp "$n" --label tp
  done
  for n in 1 "${tps[@]}"; do
    bench "$n" --suite offload --shape nosa-8b-like --mode nosa --batch 64 --context 16384 \
      --steps 6 --warmup 2 --tp "$n" --label tp
  done
  say ""
  python3 scripts/bench_summary.py "$bench_out" | sed -n '/tensor-parallel scaling/,/^$/p' |
    tee -a "$summary"
fi
say ""
say "gpu-tiers-tp: done in $SECONDS s"
