#!/usr/bin/env python3
"""Plain-text summary of a GPU benchmark run: the `nosa bench` documents of BENCH (JSONL, one run a
line) and the peers' documents of PEERS (JSONL: transformers generate, PyTorch SDPA).

  bench_summary.py BENCH.jsonl [PEERS.jsonl]

Tables: decode with KV in HBM (with the engine's attention alone against SDPA and transformers),
prefill, offloaded decode, tensor-parallel scaling (tokens/s at 1, 2, 4 GPUs and the efficiency
tok/s(TP=n) / (n x tok/s(TP=1))), and runs with KV on disk.
"""
import json
import sys


def docs(path):
    out = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        print(f"  (a line of {path} is not JSON)")
    except OSError:
        pass
    return out


def rows_of(ds):
    rows = []
    for d in ds:
        for r in d.get("results", []):
            r = dict(r)
            r.setdefault("tp", d.get("tp", 1))
            r.setdefault("suite", d.get("suite"))
            r.setdefault("offload", "none")
            rows.append(r)
    return rows


def f(v, fmt="{:.2f}"):
    return fmt.format(v) if isinstance(v, (int, float)) else "-"


def main():
    bench = docs(sys.argv[1]) if len(sys.argv) > 1 else []
    peers = docs(sys.argv[2]) if len(sys.argv) > 2 else []
    rows = rows_of(bench)
    if bench:
        m = bench[0].get("machine", {})
        print(f"machine: {m.get('gpu', m.get('backend', '?'))}; commit {bench[0].get('commit')}")
    sdpa, tf = {}, {}
    for d in peers:
        for r in d.get("results", []):
            if str(r.get("mode", "")).startswith("sdpa"):
                key = (r.get("suite"), r["mode"], r["shape"], r.get("batch", r.get("prompts")),
                       r.get("context", r.get("prompt_len")))
                sdpa[key] = r
            elif "peer" in d:
                tf[(r.get("shape"), r.get("batch"), r.get("context"))] = r

    dec = [r for r in rows if r["suite"] == "decode" and r.get("tp", 1) == 1 and not r.get("label")]
    if dec:
        print("\ndecode, KV in HBM, one GPU (attention = the engine's selection + attention alone, "
              "all layers; SDPA = PyTorch, dense: over the context, sparse modes: select + gather + "
              "SDPA):")
        print(f"  {'shape':13s} {'mode':8s} {'B':>3s} {'context':>7s} {'ms/step':>8s} {'tok/s':>9s} "
              f"{'x floor':>7s} {'attn ms':>8s} {'SDPA ms':>8s} {'SDPA/attn':>9s} {'vs transformers':>15s}")
        for r in dec:
            if "skipped" in r:
                print(f"  {r['shape']:13s} {r['mode']:8s} {r['batch']:3d} {r['context']:7d}  skipped: "
                      f"{r['skipped']}")
                continue
            sparse = r["mode"] != "dense"
            s = sdpa.get(("decode", "sdpa-sparse" if sparse else "sdpa", r["shape"], r["batch"],
                          r["context"]), {})
            s_ms = s.get("select_step_ms" if sparse else "attn_step_ms")
            a_ms = r.get("attention_ms_median")
            ratio = f"{s_ms / a_ms:.2f}x" if isinstance(s_ms, float) and a_ms else "-"
            p = tf.get((r["shape"], r["batch"], r["context"]), {})
            vs = (f"{p['decode_step_ms'] / r['step_ms_median']:.1f}x faster"
                  if "decode_step_ms" in p else "")
            print(f"  {r['shape']:13s} {r['mode']:8s} {r['batch']:3d} {r['context']:7d} "
                  f"{r['step_ms_median']:8.3f} {r['tokens_per_s']:9.1f} {r['ratio_to_floor']:7.2f} "
                  f"{f(a_ms, '{:.3f}'):>8s} {f(s_ms, '{:.3f}'):>8s} {ratio:>9s} {vs:>15s}")

    pre = [r for r in rows if r["suite"] == "prefill"]
    if pre:
        print("\nprefill (SDPA = PyTorch's causal attention alone, all layers):")
        for r in pre:
            if "skipped" in r:
                print(f"  {r['shape']:13s} {r['mode']:8s} skipped: {r['skipped']}")
                continue
            s = sdpa.get(("prefill", "sdpa", r["shape"], r["prompts"], r["prompt_len"]), {})
            p = tf.get((r["shape"], r["prompts"], r["prompt_len"]), {})
            extra = ""
            if "attn_seconds" in s:
                extra += f"  SDPA attention {s['attn_seconds']:.2f} s"
            if "prefill_tokens_per_s" in p:
                extra += f"  transformers {p['prefill_tokens_per_s']:.0f} tok/s"
            print(f"  {r['shape']:13s} {r['mode']:8s} {r['prompts']} x {r['prompt_len']}: "
                  f"{r['tokens_per_s']:9.0f} tok/s ({r['seconds']:.2f} s){extra}")

    off = [r for r in rows if r["suite"] == "offload" and r.get("tp", 1) == 1 and not r.get("label")]
    if off:
        print("\noffloaded decode, one GPU:")
        for r in off:
            miss = r.get("controlled_miss_rate")
            tag = "model" if miss is None else f"{miss:.2f}"
            head = (f"  {r['shape']:13s} {r['mode']:8s} {r.get('offload', ''):9s} B={r['batch']:3d} "
                    f"C={r['context']:6d} miss={tag:5s}")
            if "skipped" in r or "tokens_per_s" not in r:
                print(f"{head} skipped: {r.get('skipped', '?')}")
                continue
            print(f"{head} {r['step_ms_median']:8.2f} ms {r['tokens_per_s']:8.1f} tok/s  overlap "
                  f"{r.get('overlap', 0):.3f} miss {r.get('miss_rate', 0):.3f}  PCIe "
                  f"{r.get('pcie_bytes_per_step', 0) / 1e6:7.1f} MB/step  x{r.get('ratio_to_floor', 0):.2f}"
                  f"  host {r.get('host_gib', 0):.1f} GiB disk {r.get('disk_gib', 0):.1f} GiB"
                  f"  populate {r.get('populate_s', 0):.1f} s")

    tp_rows = [r for r in rows if r.get("label") == "tp" and "tokens_per_s" in r]
    if tp_rows:
        print("\ntensor-parallel scaling (tok/s; efficiency = tok/s(TP=n) / (n x tok/s(TP=1))):")
        keys = []
        for r in tp_rows:
            k = (r["suite"], r["shape"], r["mode"], r.get("offload", "none"), r["batch"], r["context"])
            if k not in keys:
                keys.append(k)
        for k in keys:
            by_tp = {r["tp"]: r["tokens_per_s"] for r in tp_rows
                     if (r["suite"], r["shape"], r["mode"], r.get("offload", "none"), r["batch"],
                         r["context"]) == k}
            base = by_tp.get(1)
            parts = []
            for n in sorted(by_tp):
                eff = f" (eff {by_tp[n] / (n * base):.2f})" if base and n > 1 else ""
                parts.append(f"TP={n} {by_tp[n]:.0f}{eff}")
            where = "KV in HBM" if k[3] == "none" else f"offloaded ({k[3]})"
            print(f"  {k[1]} {k[2]} B={k[4]} C={k[5]} {where}: " + ", ".join(parts))

    disk = [r for r in rows if r["suite"] == "offload" and r.get("offload") == "host+disk"]
    if disk:
        print("\nKV on disk (beyond HBM):")
        for r in disk:
            if "tokens_per_s" not in r:
                print(f"  {r['shape']} {r['mode']} B={r['batch']} C={r['context']}: skipped: "
                      f"{r.get('skipped', '?')}")
                continue
            print(f"  {r['shape']} {r['mode']} B={r['batch']} C={r['context']}: "
                  f"{r['step_ms_median']:.1f} ms/step, {r['tokens_per_s']:.1f} tok/s, host "
                  f"{r.get('host_gib', 0):.1f} GiB, disk {r.get('disk_gib', 0):.1f} GiB, GPU cache "
                  f"{r.get('gpu_cache_gib', 0):.1f} GiB, miss rate {r.get('miss_rate', 0):.3f}, "
                  f"populate {r.get('populate_s', 0):.1f} s")
    if not bench:
        print("no nosa bench results")
    return 0


if __name__ == "__main__":
    sys.exit(main())
