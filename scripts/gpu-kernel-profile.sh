#!/usr/bin/env bash
# Nsight Compute's full section set for one launch of one kernel in a `nosa` command, as text:
# PREFIX-details.txt (throughput, occupancy, warp states, memory), PREFIX-source.csv (stall
# samples per CUDA source line and SASS instruction; build with CMAKE_CUDA_FLAGS=-lineinfo so the
# lines have names) and PREFIX-stalls.txt (the stall samples by reason and by source line, from
# the CSV). For studying one kernel on the GPU machine; scripts/gpu-profile.sh gives the
# per-kernel times of a whole step.
#   scripts/gpu-kernel-profile.sh KERNEL_REGEX PREFIX NOSA_BINARY ARGS...
#   scripts/gpu-kernel-profile.sh --stalls PREFIX   (PREFIX-stalls.txt again from PREFIX-source.csv)
#   SKIP=N profiles the launch after the first N matching ones (default 1: past a warm-up).
set -uo pipefail

# The stall samples of PREFIX-source.csv: their share by reason (SASS rows), and by CUDA source
# line (each SASS row counted under the source line before it).
stalls() {
  python3 - "$1-source.csv" >"$1-stalls.txt" <<'PY'
import csv, sys
rows = list(csv.reader(open(sys.argv[1], errors="replace")))
hdr = next(i for i, r in enumerate(rows) if any("Warp Stall Sampling (All" in c for c in r))
h = rows[hdr]
addr, total = h.index("Address"), h.index("Warp Stall Sampling (All Samples)")
reasons = [c for c in h if c.startswith("stall_") and "Not Issued" not in c]
by_reason = dict.fromkeys(reasons, 0.0)
by_line, line = {}, ""
def num(x):
    try:
        return float(x.replace(",", ""))
    except ValueError:
        return 0.0
for r in rows[hdr + 1:]:
    if len(r) < len(h):
        continue
    if r[0].strip() and r[1].strip():
        line = r[0] + ": " + r[1].strip()[:90]
    if not r[addr].strip():
        continue
    for c in reasons:
        by_reason[c] += num(r[h.index(c)])
    by_line[line] = by_line.get(line, 0.0) + num(r[total])
s = sum(by_reason.values()) or 1.0
print("stall reasons: " + " ".join(f"{c[6:]}={100 * v / s:.1f}%"
      for c, v in sorted(by_reason.items(), key=lambda x: -x[1]) if v / s > 0.01))
t = sum(by_line.values()) or 1.0
print("source lines by all stall samples:")
for k, v in sorted(by_line.items(), key=lambda x: -x[1])[:12]:
    print(f"  {100 * v / t:5.1f}%  {k}")
PY
}
if [ "${1:-}" = --stalls ] && [ $# -eq 2 ]; then stalls "$2" && cat "$2-stalls.txt"; exit; fi
[ $# -ge 3 ] || { sed -n '2,11p' "$0"; exit 2; }
ncu=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
[ -n "$ncu" ] || { echo "gpu-kernel-profile: ncu not found"; exit 1; }
regex=$1 prefix=$2
shift 2
"$ncu" --set full --import-source yes --kernel-name "regex:$regex" --launch-skip "${SKIP:-1}" \
  --launch-count 1 -f -o "$prefix" "$@" >"$prefix.log" 2>&1 || { tail -20 "$prefix.log"; exit 1; }
"$ncu" -i "$prefix.ncu-rep" --page details >"$prefix-details.txt" 2>&1
"$ncu" -i "$prefix.ncu-rep" --page source --csv --print-source cuda,sass >"$prefix-source.csv" 2>&1 ||
  "$ncu" -i "$prefix.ncu-rep" --page source --csv >"$prefix-source.csv" 2>&1
stalls "$prefix" || echo "gpu-kernel-profile: no stall samples in $prefix-source.csv"
echo "gpu-kernel-profile: $regex -> $prefix-details.txt, $prefix-source.csv, $prefix-stalls.txt"
grep -E "Duration|Achieved Occupancy|Compute \(SM\) Throughput|Memory Throughput" "$prefix-details.txt" | head -8
