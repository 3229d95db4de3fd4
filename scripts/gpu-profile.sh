#!/usr/bin/env bash
# Per-kernel GPU time of a `nosa` command under Nsight Compute (one metric, no replay, clocks as
# found): prints the kernels by total time. For finding where a step goes on the GPU machine.
#   scripts/gpu-profile.sh NOSA_BINARY ARGS...      e.g. build-gpu/launcher/nosa bench --suite
#   decode --shape nosa-1b-like --layers 4 --mode nosa --batch 64 --context 16384 --steps 1
set -uo pipefail
ncu=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
[ -n "$ncu" ] || { echo "gpu-profile: ncu not found"; exit 1; }
csv=$(mktemp)
"$ncu" --clock-control none --metrics gpu__time_duration.sum --csv --log-file "$csv" "$@" >/dev/null 2>&1
python3 - "$csv" <<'PY'
import csv, re, sys
from collections import defaultdict
tot, cnt = defaultdict(float), defaultdict(int)
with open(sys.argv[1]) as f:
    lines = [l for l in f if l.startswith('"')]
for r in csv.DictReader(lines):
    if r.get("Metric Name") != "gpu__time_duration.sum":
        continue
    name = re.sub(r"\(.*", "", r["Kernel Name"]).replace("void ", "")
    name = re.sub(r"nosa::(attention|runtime)::cuda::\(anonymous namespace\)::", "", name)[:60]
    v = float(r["Metric Value"].replace(",", ""))
    unit = r["Metric Unit"]
    v *= {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3,
          "second": 1e6, "s": 1e6}.get(unit, 1.0)
    tot[name] += v
    cnt[name] += 1
total = sum(tot.values())
print(f"  {'kernel':60s} {'calls':>6s} {'total us':>10s} {'share':>6s}")
for k in sorted(tot, key=tot.get, reverse=True)[:30]:
    print(f"  {k:60s} {cnt[k]:6d} {tot[k]:10.1f} {100 * tot[k] / total:5.1f}%")
print(f"  {'all kernels':60s} {sum(cnt.values()):6d} {total:10.1f}")
PY
rm -f "$csv"
