#!/usr/bin/env bash
# The GPU check, in one command on a machine with an NVIDIA GPU (written for the lent H200:
# Ubuntu 24.04, nvcc 13, CMake and ninja on PATH, no network): configures and builds nosa and the
# GPU tests with the CUDA backend (sm_90 unless CUDA_ARCH says otherwise) on every core, runs the
# gpu-labelled tests, the end-to-end check against transformers, `nosa bench` (decode and
# prefill) and the transformers and PyTorch SDPA peers, and writes a summary and the results
# under RESULTS (default: $OUT when set, else build-gpu/results):
#   summary.txt              what ran, pass/fail, the benchmark table with commands
#   log.txt                  everything the steps printed
#   transformers_check.json  the check against transformers
#   bench.json, bench.csv    every `nosa bench` result (machine, commit, configuration): decode,
#                            prefill and (not with --quick) offloaded decode
#   peer.json                transformers generate on the same shapes
#   sdpa.json                PyTorch SDPA attention alone on the same shapes (scripts/bench_sdpa.py)
#
#   scripts/gpu-check.sh [--quick | --prefill] [--no-tests] [--no-bench] [--no-peer] [--jobs N]
# --quick runs a small benchmark set (for a first look); --prefill only prefill 16 x 16K of both
# shapes, dense and NOSA, against transformers' prefill (issue 3's prefill target in one call,
# about 7 minutes with the build and tests); rerunning reuses the build directory.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD

quick=0 prefill=0 tests=1 bench=1 peer=1 jobs=$(nproc)
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1 ;;
    --prefill) prefill=1 ;;
    --no-tests) tests=0 ;;
    --no-bench) bench=0 ;;
    --no-peer) peer=0 ;;
    --jobs) jobs=$2; shift ;;
    *) echo "gpu-check: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
[ $quick -eq 1 ] && [ $prefill -eq 1 ] && { echo "gpu-check: --quick or --prefill, not both" >&2; exit 2; }

# GPU_CHECK_DEADLINE=SECONDS: skip the benchmark steps that would start after that many seconds
# (leaves time for the summary when the whole run must fit a limit).
deadline=${GPU_CHECK_DEADLINE:-0}
late() { [ "$deadline" -gt 0 ] && [ $SECONDS -gt $((deadline - 30)) ]; }
build=${NOSA_GPU_BUILD:-build-gpu}
results=${RESULTS:-${OUT:-$build/results}}
mkdir -p "$results"
results=$(cd "$results" && pwd)
summary=$results/summary.txt
log=$results/log.txt
: >"$summary"
: >"$log"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
# Never let NCCL or PyTorch use NVLink multicast on shared machines.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1

say() { echo "$*" | tee -a "$summary"; }
step() { echo "== $* ($(date -u +%H:%M:%S))" | tee -a "$log"; }
status=0

. scripts/commit-id.sh
commit=$(commit_id)
say "nosa gpu-check  commit $commit  $(date -u +%Y-%m-%dT%H:%M:%SZ)"
say "gpu: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo none)"
say "host: $(hostname), $(nproc) cores"

# ---- build --------------------------------------------------------------------------------
step build
nvcc=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
t0=$SECONDS
# Only what the GPU steps run (nosa and the gpu-labelled test binaries): the CPU tests are CI's.
gpu_targets() {
  ninja -C "$build" -t targets all 2>/dev/null |
    grep -oE '^(cuda_[a-z_]+_test|peer_all_reduce_(test|check)|nosa): ' | tr -d ': ' | sort -u
}
if cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DNOSA_CUDA=ON \
    -DCMAKE_CUDA_COMPILER="$nvcc" -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCH:-90}" >>"$log" 2>&1 &&
  # shellcheck disable=SC2046
  cmake --build "$build" -j "$jobs" --target $(gpu_targets) >>"$log" 2>&1; then
  say "build: ok ($((SECONDS - t0)) s, $jobs jobs)"
else
  say "build: FAILED (see log.txt)"
  tail -40 "$log"
  exit 1
fi
nosa=$root/$build/launcher/nosa

# ---- tests --------------------------------------------------------------------------------
if [ $tests -eq 1 ]; then
  step "ctest -L gpu"
  t0=$SECONDS
  (cd "$build" && timeout 900 ctest -L gpu -E cuda_check_against_transformers -V -j 1) >"$scratch/ctest.txt" 2>&1
  rc=$?
  cat "$scratch/ctest.txt" >>"$log"
  grep -E "\[ (select|sample|model|generate) +\]" "$scratch/ctest.txt" | sed 's/^[0-9]*: /  /' >>"$summary" || true
  say "ctest -L gpu: $(grep -E 'tests passed|tests failed' "$scratch/ctest.txt" | tail -1) ($((SECONDS - t0)) s)"
  grep -E "^\s+[0-9]+ - .*\((Failed|Timeout|SEGFAULT|Not Run|Exception)\)" "$scratch/ctest.txt" | sed 's/^/  /' | tee -a "$summary"
  [ $rc -ne 0 ] && status=1
  step "numpy Llama reference"
  for dev in cpu cuda; do
    tol=$([ $dev = cpu ] && echo 1e-3 || echo 0.1)
    timeout 300 python3 scripts/check_llama_numpy.py --nosa "$nosa" --device $dev --tol $tol \
      >"$scratch/np.txt" 2>&1 || status=1
    cat "$scratch/np.txt" >>"$log"
    sed 's/^/  /' "$scratch/np.txt" | tail -2 | tee -a "$summary"
  done
  step "transformers check"
  timeout 600 python3 scripts/check_against_transformers.py --nosa "$nosa" \
    --out "$results/transformers_check.json" >"$scratch/check.txt" 2>&1
  rc=$?
  cat "$scratch/check.txt" >>"$log"
  sed 's/^/  /' "$scratch/check.txt" | grep -vE "^\s*$" | tail -6 | tee -a "$summary"
  [ $rc -ne 0 ] && status=1
fi

# ---- benchmarks ---------------------------------------------------------------------------
bench_cmds=()
if [ $bench -eq 1 ]; then
  if [ $prefill -eq 1 ]; then
    bench_cmds+=("--suite prefill --shape nosa-1b-like --mode dense,nosa --prompts 16 --prompt-len 16384")
  elif [ $quick -eq 1 ]; then
    bench_cmds+=("--suite decode --shape nosa-1b-like --mode dense,nosa --batch 16,64 --context 16384")
    bench_cmds+=("--suite prefill --shape nosa-1b-like --mode dense,nosa --prompts 4 --prompt-len 16384")
  else
    bench_cmds+=("--suite decode --shape nosa-1b-like --mode dense,nosa --batch 1,16,64 --context 16384,32768")
    bench_cmds+=("--suite decode --shape nosa-8b-like --mode dense,nosa --batch 1,16,64 --context 16384,32768")
    bench_cmds+=("--suite prefill --shape nosa-1b-like --mode dense,nosa --prompts 16 --prompt-len 16384")
    # Issue 4's comparison: NOSA and InfLLM-V2 with the KV in pinned host memory. Each A/B
    # alternates step by step in one process, on the same tiers and host memory: residency on
    # the device with the copies overlapping attention over the hits or not; on the host,
    # micro-batches at the default threshold (32 sequences) or never.
    bench_cmds+=("--suite offload --shape nosa-8b-like --mode nosa,infllmv2 --batch 16,64 --context 16384 --steps 8 --copy-overlap on,off --micro-batch-min-seqs 32,0 --residency device,host")
  fi
  i=0
  for args in "${bench_cmds[@]}"; do
    if late; then say "skipped (deadline): nosa bench $args"; continue; fi
    step "nosa bench $args"
    # shellcheck disable=SC2086
    timeout 900 "$nosa" bench $args --device cuda --commit "$commit" \
      --json "$scratch/bench$i.json" >>"$log" 2>&1 || { say "bench FAILED: nosa bench $args"; status=1; }
    i=$((i + 1))
  done
fi

peer_cmd=""
if [ $peer -eq 1 ] && [ $bench -eq 1 ]; then
  if [ $prefill -eq 1 ]; then
    peer_cmd="scripts/bench_transformers.py --shape nosa-1b-like --shape nosa-8b-like --batch 16 --context 16384 --decode-steps 1"
  elif [ $quick -eq 1 ]; then
    peer_cmd="scripts/bench_transformers.py --shape nosa-1b-like --batch 16 --context 16384 --decode-steps 8"
  else
    peer_cmd="scripts/bench_transformers.py --shape nosa-1b-like --shape nosa-8b-like --batch 16 --context 16384 --decode-steps 8"
  fi
  if late; then
    say "skipped (deadline): python3 $peer_cmd"
  else
    step "python3 $peer_cmd"
    # shellcheck disable=SC2086
    timeout 900 python3 $peer_cmd --out "$results/peer.json" >>"$log" 2>&1 ||
      say "transformers peer FAILED (see log.txt)"
  fi
fi
# The attention peer: PyTorch SDPA alone on the decode suite's shapes (and 16 x 16K prefill).
if [ $peer -eq 1 ] && [ $bench -eq 1 ] && [ $prefill -eq 0 ]; then
  if [ $quick -eq 1 ]; then
    sdpa_cmd="scripts/bench_sdpa.py --shape nosa-1b-like --batch 16,64 --context 16384 --prompts 4"
  else
    sdpa_cmd="scripts/bench_sdpa.py --shape nosa-1b-like,nosa-8b-like --batch 1,16,64 --context 16384,32768"
  fi
  if late; then
    say "skipped (deadline): python3 $sdpa_cmd"
  else
    step "python3 $sdpa_cmd"
    # shellcheck disable=SC2086
    timeout 300 python3 $sdpa_cmd --commit "$commit" --out "$results/sdpa.json" >>"$log" 2>&1 ||
      say "SDPA peer FAILED (see log.txt)"
  fi
fi
# The 8b prefill last: the longest step.
if [ $bench -eq 1 ] && [ $quick -eq 0 ]; then
  args="--suite prefill --shape nosa-8b-like --mode dense,nosa --prompts 16 --prompt-len 16384"
  bench_cmds+=("$args")
  if late; then
    say "skipped (deadline): nosa bench $args"
  else
    step "nosa bench $args"
    # shellcheck disable=SC2086
    timeout 900 "$nosa" bench $args --device cuda --commit "$commit" \
      --json "$scratch/bench$i.json" >>"$log" 2>&1 || { say "bench FAILED: nosa bench $args"; status=1; }
  fi
fi

# ---- summary ------------------------------------------------------------------------------
python3 - "$scratch" "$results" "$nosa" "$peer_cmd" "${bench_cmds[@]}" <<'EOF' | tee -a "$summary"
import csv, glob, json, os, sys
scratch, results, nosa, peer_cmd, cmds = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
runs = []
for i, cmd in enumerate(cmds):
    path = os.path.join(scratch, f"bench{i}.json")
    if os.path.exists(path):
        with open(path) as f:
            run = json.load(f)
        # The command as given here, after the NOSA_ settings the run recorded in front of its own.
        recorded = run.get("command", "")
        settings = recorded[:recorded.find("nosa bench")] if "nosa bench" in recorded else ""
        run["command"] = f"{settings}nosa bench {cmd} --device cuda"
        runs.append(run)
if not runs:
    sys.exit(0)
with open(os.path.join(results, "bench.json"), "w") as f:
    json.dump({"runs": runs}, f, indent=1)
rows = []
for run in runs:
    for r in run["results"]:
        row = {"commit": run["commit"], "backend": run["machine"]["backend"],
               "date": run["date"], "command": run["command"]}
        row.update(r)
        rows.append(row)
cols = []
for r in rows:
    for k in r:
        if k not in cols:
            cols.append(k)
with open(os.path.join(results, "bench.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=cols)
    w.writeheader()
    for r in rows:
        w.writerow(r)
peer = {}
try:
    with open(os.path.join(results, "peer.json")) as f:
        for r in json.load(f)["results"]:
            peer[(r["shape"], r["batch"], r["context"])] = r
except (OSError, ValueError, KeyError):
    pass
print(f"machine: {runs[0]['machine']['backend']}, commit {runs[0]['commit']}")
print("decode (median step; floor = (weights + KV the attention reads) / 4.3 TB/s):")
print(f"  {'shape':13s} {'mode':8s} {'B':>3s} {'context':>7s} {'ms/step':>8s} {'tok/s':>9s} {'floor ms':>8s} {'x floor':>7s} {'vs transformers':>15s}")
for r in rows:
    if r.get("suite") != "decode":
        continue
    if "skipped" in r:
        print(f"  {r['shape']:13s} {r['mode']:8s} {r['batch']:3d} {r['context']:7d}  skipped: {r['skipped']}")
        continue
    p = peer.get((r["shape"], r["batch"], r["context"]))
    vs = f"{p['decode_step_ms'] / r['step_ms_median']:.1f}x faster" if p and "decode_step_ms" in p else ""
    print(f"  {r['shape']:13s} {r['mode']:8s} {r['batch']:3d} {r['context']:7d} {r['step_ms_median']:8.3f} "
          f"{r['tokens_per_s']:9.1f} {r['floor_ms']:8.3f} {r['ratio_to_floor']:7.2f} {vs:>15s}")
print("prefill:")
for r in rows:
    if r.get("suite") != "prefill":
        continue
    if "skipped" in r:
        print(f"  {r['shape']:13s} {r['mode']:8s} skipped: {r['skipped']}")
        continue
    p = peer.get((r["shape"], 16, r["prompt_len"]))
    vs = f"transformers {p['prefill_tokens_per_s']:.0f} tok/s" if p and "prefill_tokens_per_s" in p else ""
    clocks = (f", SM {r['gpu_sm_mhz_mean']:.0f} MHz (min {r['gpu_sm_mhz_min']:.0f}), "
              f"{r['gpu_power_w_mean']:.0f} W, power-capped {100 * r['gpu_power_capped_share']:.0f}%"
              if "gpu_sm_mhz_mean" in r else "")
    print(f"  {r['shape']:13s} {r['mode']:8s} {r['prompts']} x {r['prompt_len']}: {r['tokens_per_s']:9.0f} tok/s "
          f"({r['seconds']:.2f} s{clocks})  {vs}")
off = [r for r in rows if r.get("suite") == "offload" and "skipped" not in r]
if off:
    print("offloaded decode (floor = PCIe bytes at 51 GB/s, HBM bytes at 4.3 TB/s):")
    for r in off:
        print(f"  {r['shape']:13s} {r['mode']:8s} B={r['batch']} C={r['context']} {r['offload']}: "
              f"{r['step_ms_median']:.3f} ms/step, x{r['ratio_to_floor']:.2f} floor, "
              f"overlap {r['overlap']:.3f}, miss rate {r['miss_rate']:.3f}  {r.get('label', '')}  "
              f"(huge pages {r.get('anon_huge_pages_gib', -1):.1f} GiB, populate {r.get('populate_s', 0):.1f} s)")
    by_mode = {(r["shape"], r["batch"], r["context"], r.get("label", ""), r["mode"]): r for r in off}
    for (shape, b, c, label, mode), r in by_mode.items():
        other = by_mode.get((shape, b, c, label, "infllmv2"))
        if mode == "nosa" and other:
            print(f"  NOSA over InfLLM-V2, both offloaded, B={b} {label}: "
                  f"{other['step_ms_median'] / r['step_ms_median']:.2f}x")
if peer:
    print("transformers peer (" + peer_cmd + "):")
    for (shape, b, c), p in peer.items():
        if "decode_step_ms" in p:
            print(f"  {shape:13s} B={b} C={c}: prefill {p['prefill_tokens_per_s']:.0f} tok/s, "
                  f"decode {p['decode_step_ms']:.1f} ms/step")
print("commands:")
for run in runs:
    print("  " + run["command"])
EOF
say "gpu-check: $([ $status -eq 0 ] && echo passed || echo FAILED)"
exit $status
