#!/usr/bin/env bash
# Nsight Compute's full section set for one launch of one kernel in a `nosa` command, as text:
# PREFIX-details.txt (throughput, occupancy, warp states, memory) and PREFIX-source.csv (stall
# samples per CUDA source line and SASS instruction; build with CMAKE_CUDA_FLAGS=-lineinfo so the
# lines have names). For studying one kernel on the GPU machine; scripts/gpu-profile.sh gives the
# per-kernel times of a whole step.
#   scripts/gpu-kernel-profile.sh KERNEL_REGEX PREFIX NOSA_BINARY ARGS...
#   SKIP=N profiles the launch after the first N matching ones (default 1: past a warm-up).
set -uo pipefail
[ $# -ge 3 ] || { sed -n '2,8p' "$0"; exit 2; }
ncu=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
[ -n "$ncu" ] || { echo "gpu-kernel-profile: ncu not found"; exit 1; }
regex=$1 prefix=$2
shift 2
"$ncu" --set full --import-source yes --kernel-name "regex:$regex" --launch-skip "${SKIP:-1}" \
  --launch-count 1 -f -o "$prefix" "$@" >"$prefix.log" 2>&1 || { tail -20 "$prefix.log"; exit 1; }
"$ncu" -i "$prefix.ncu-rep" --page details >"$prefix-details.txt" 2>&1
"$ncu" -i "$prefix.ncu-rep" --page source --csv --print-source cuda,sass >"$prefix-source.csv" 2>&1 ||
  "$ncu" -i "$prefix.ncu-rep" --page source --csv >"$prefix-source.csv" 2>&1
echo "gpu-kernel-profile: $regex -> $prefix-details.txt, $prefix-source.csv"
grep -E "Duration|Achieved Occupancy|Compute \(SM\) Throughput|Memory Throughput" "$prefix-details.txt" | head -8
