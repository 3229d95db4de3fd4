#!/usr/bin/env python3
"""The attention peer of `nosa bench`: PyTorch's scaled_dot_product_attention on the shapes of the
decode and prefill suites, timed alone (no model around it), KV in HBM, bf16.

Rows (one JSON document with "peer" and "results"; `nosa bench --report-from` reads it):
  decode  mode "sdpa":        dense decode attention, 1 query token per sequence, GQA, over the
                              whole context; the best of `enable_gqa=True` and the query heads of
                              a KV head folded into the query length (no mask is needed for one
                              token), over every SDPA backend that runs.
          mode "sdpa-sparse": what a PyTorch user would write for NOSA / InfLLM-V2 decoding: gather
                              the selected 64-token blocks (64 of them: 4096 tokens per sequence
                              and KV head) by advanced indexing, then SDPA over them
                              ("attn_*": gather + SDPA), and with the selection before it
                              ("select_*": scores of the block keys summed over the group's heads,
                              top-k, gather, SDPA).
  prefill mode "sdpa":        causal attention of P prompts of L tokens (flash / cuDNN /
                              memory-efficient backends only: the math one would need P*H*L*L
                              scores).
A decode measurement runs the model's layers back to back (each on its own K and V where the KV of
one layer would fit in L2), between CUDA events, after warm-up; the median of --repeats.
"attn_layer_ms" is one layer, "attn_step_ms" all layers of one decoding step. Prefill times one
layer (compute-bound) and scales by the layer count ("attn_seconds").

Prints "skipped: ..." and exits 0 where torch or a GPU is missing (--device cpu runs tiny shapes
on the CPU, to check the script).
"""
import argparse
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import time

from peer_args import reproducible_args

SHAPES = {
    # layers, query heads, KV heads, head_dim (docs/performance.md)
    "tiny": (2, 4, 2, 64),
    "nosa-1b-like": (28, 16, 2, 128),
    "nosa-8b-like": (32, 32, 2, 128),
}
BLOCK = 64      # tokens per KV block (selection unit)
TOPK = 64       # selected blocks per (sequence, KV head): 4096 tokens
L2_BYTES = 256 << 20  # distinct per-layer KV until this much, so that L2 (50 MB) cannot hold it


def log(msg):
    print(msg, flush=True)


def machine(torch, device):
    m = {"hostname": socket.gethostname(), "backend": f"pytorch {torch.__version__} sdpa"}
    if device == "cuda":
        m["gpu"] = torch.cuda.get_device_name(0)
        m["gpus"] = torch.cuda.device_count()
        m["backend"] += f" on {m['gpu']}"
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if smi.returncode == 0 and smi.stdout.strip():
            m["nvidia_smi"] = smi.stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        pass
    return m


class Timer:
    """Median milliseconds of fn() over repeats, after warm-up (CUDA events on the GPU)."""

    def __init__(self, torch, device, warmup, repeats):
        self.torch, self.device, self.warmup, self.repeats = torch, device, warmup, repeats

    def __call__(self, fn):
        torch = self.torch
        for _ in range(self.warmup):
            fn()
        times = []
        if self.device == "cuda":
            torch.cuda.synchronize()
            for _ in range(self.repeats):
                a = torch.cuda.Event(enable_timing=True)
                b = torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
        else:
            for _ in range(self.repeats):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def backends(torch):
    """SDPA backends by name (all that this torch knows)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return None, {}
    names = {}
    for name, attr in (("flash", "FLASH_ATTENTION"), ("cudnn", "CUDNN_ATTENTION"),
                       ("efficient", "EFFICIENT_ATTENTION"), ("math", "MATH")):
        if hasattr(SDPBackend, attr):
            names[name] = getattr(SDPBackend, attr)
    return sdpa_kernel, names


def fast_backends(bk, dev):
    """(name, backend) pairs to try first: flash, cuDNN, memory-efficient on the GPU; on the CPU
    whatever torch picks (None)."""
    if dev != "cuda" or not bk:
        return [("default", None)]
    return [(n, bk[n]) for n in ("flash", "cudnn", "efficient") if n in bk]


def decode_rows(torch, args, timer, shape, B, C):
    """Dense and sparse decode attention rows of one (shape, batch, context)."""
    F = torch.nn.functional
    sdpa_kernel, bk = backends(torch)
    layers, hq, hkv, d = SHAPES[shape]
    g = hq // hkv
    dev, dt = args.device, torch.bfloat16
    base = {"suite": "decode", "shape": shape, "batch": B, "context": C, "layers": layers,
            "q_heads": hq, "kv_heads": hkv, "head_dim": d, "tp": 1, "offload": "none"}
    dense = dict(base, mode="sdpa")
    sparse = dict(base, mode="sdpa-sparse", block_size=BLOCK,
                  selected_tokens=min(TOPK, C // BLOCK) * BLOCK)
    out = [dense, sparse]
    C = (C // BLOCK) * BLOCK  # whole blocks (the engine's context C attends to C + 1 tokens)
    layer_bytes = 2 * B * hkv * C * d * 2
    copies = max(1, min(layers, math.ceil(L2_BYTES / layer_bytes)))
    try:
        kv = [(torch.randn(B, hkv, C, d, device=dev, dtype=dt),
               torch.randn(B, hkv, C, d, device=dev, dtype=dt)) for _ in range(copies)]
        q = torch.randn(B, hq, 1, d, device=dev, dtype=dt)
        qg = q.view(B, hkv, g, d)  # the heads of a KV head as the query length (one token: no mask)
        scale = 1.0 / math.sqrt(d)

        # Dense: every variant and backend that runs; the best one is the row's figure.
        variants = {
            "enable_gqa": lambda k, v: F.scaled_dot_product_attention(q, k, v, scale=scale,
                                                                      enable_gqa=True),
            "grouped": lambda k, v: F.scaled_dot_product_attention(qg, k, v, scale=scale),
        }
        times = {}
        # The math backend only where no other runs (it would expand K and V per query head).
        for tier in (fast_backends(bk, dev), [("math", bk.get("math"))]):
            for vname, fn in variants.items():
                for bname, b in tier:
                    try:
                        def step(fn=fn, b=b):
                            with (sdpa_kernel([b]) if b is not None else _null()):
                                for layer in range(layers):
                                    fn(*kv[layer % copies])
                        times[f"{vname}/{bname}"] = timer(step)
                    except Exception as e:  # noqa: BLE001 (a backend that does not run: recorded)
                        times[f"{vname}/{bname}"] = f"failed: {str(e).splitlines()[0][:120]}"
            if any(isinstance(t, float) for t in times.values()):
                break
        ok = {k: v for k, v in times.items() if isinstance(v, float)}
        if not ok:
            dense["skipped"] = "no SDPA variant ran: " + "; ".join(f"{k} {v}" for k, v in times.items())
        else:
            best = min(ok, key=ok.get)
            dense.update({"kernel": best, "attn_step_ms": ok[best],
                          "attn_layer_ms": ok[best] / layers,
                          "kv_bytes_layer": layer_bytes,
                          "kv_gb_per_s": layer_bytes / (ok[best] / layers * 1e-3) / 1e9,
                          "variants_step_ms": times})

        # Sparse: gather the selected blocks, SDPA over them (grouped queries, the best backend).
        nb = C // BLOCK
        k_sel = min(TOPK, nb)
        ck = [torch.randn(B, hkv, nb, d, device=dev, dtype=dt) for _ in range(copies)]
        bi = torch.arange(B, device=dev)[:, None, None]
        hi = torch.arange(hkv, device=dev)[None, :, None]
        gen = torch.Generator(device=dev)
        gen.manual_seed(1)
        fixed = torch.rand(B, hkv, nb, device=dev, generator=gen).topk(k_sel, dim=-1).indices
        fixed = fixed.sort(dim=-1).values

        def attend(k, v, idx):
            ks = k.view(B, hkv, nb, BLOCK, d)[bi, hi, idx].reshape(B, hkv, k_sel * BLOCK, d)
            vs = v.view(B, hkv, nb, BLOCK, d)[bi, hi, idx].reshape(B, hkv, k_sel * BLOCK, d)
            return F.scaled_dot_product_attention(qg, ks, vs, scale=scale)

        def select(c):
            scores = torch.einsum("bhgd,bhnd->bhn", qg, c)  # summed over the group's heads
            return scores.topk(k_sel, dim=-1).indices.sort(dim=-1).values

        def gathered():
            for layer in range(layers):
                k, v = kv[layer % copies]
                attend(k, v, fixed)

        def selected():
            for layer in range(layers):
                k, v = kv[layer % copies]
                attend(k, v, select(ck[layer % copies]))

        # The dense winner's backend first, then the others, then whatever torch picks.
        best_name = dense["kernel"].split("/")[1] if ok else None
        tries = [(n, b) for n, b in fast_backends(bk, dev) if n == best_name]
        tries += [(n, b) for n, b in fast_backends(bk, dev) if n != best_name and b is not None]
        tries.append(("default", None))
        failures = []
        for bname, b in tries:
            try:
                with (sdpa_kernel([b]) if b is not None else _null()):
                    a = timer(gathered)
                    s = timer(selected)
                sparse.update({"kernel": f"grouped/{bname}", "attn_step_ms": a,
                               "attn_layer_ms": a / layers, "select_step_ms": s,
                               "select_layer_ms": s / layers})
                break
            except Exception as e:  # noqa: BLE001 (a backend that does not run: recorded)
                failures.append(f"{bname}: {str(e).splitlines()[0][:120]}")
        if "attn_step_ms" not in sparse:
            sparse["skipped"] = "failed: " + "; ".join(failures)
        elif failures:
            sparse["failed_backends"] = failures
        del kv, ck, q
    except torch.OutOfMemoryError as e:
        for r in out:
            r.setdefault("skipped", f"out of memory: {str(e).splitlines()[0][:160]}")
    if dev == "cuda":
        torch.cuda.empty_cache()
    for r in out:
        if "skipped" in r:
            log(f"sdpa decode {r['mode']:11s} {shape} B={B} C={C}: skipped ({r['skipped']})")
        else:
            extra = f", with selection {r['select_step_ms']:.3f} ms" if "select_step_ms" in r else ""
            log(f"sdpa decode {r['mode']:11s} {shape} B={B:3d} C={C:6d}: {r['attn_step_ms']:8.3f} ms "
                f"per step ({r['attn_layer_ms'] * 1e3:8.1f} us/layer){extra}  [{r.get('kernel')}]")
    return out


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def prefill_row(torch, args, ptimer, shape, P, L):
    F = torch.nn.functional
    sdpa_kernel, bk = backends(torch)
    layers, hq, hkv, d = SHAPES[shape]
    dev, dt = args.device, torch.bfloat16
    row = {"suite": "prefill", "shape": shape, "mode": "sdpa", "prompts": P, "prompt_len": L,
           "layers": layers, "q_heads": hq, "kv_heads": hkv, "head_dim": d, "tp": 1}
    fast = fast_backends(bk, dev)
    try:
        q = torch.randn(P, hq, L, d, device=dev, dtype=dt)
        k = torch.randn(P, hkv, L, d, device=dev, dtype=dt)
        v = torch.randn(P, hkv, L, d, device=dev, dtype=dt)
        times = {}
        for vname in ("enable_gqa", "expanded"):
            if vname == "expanded":
                if times and any(isinstance(t, float) for t in times.values()):
                    break  # only when enable_gqa ran nowhere
                k = k.repeat_interleave(hq // hkv, dim=1)
                v = v.repeat_interleave(hq // hkv, dim=1)
            for bname, b in fast:
                name = f"{vname}/{bname}"
                try:
                    def once(b=b, gqa=vname == "enable_gqa"):
                        with (sdpa_kernel([b]) if b is not None else _null()):
                            if gqa:
                                F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                            else:
                                F.scaled_dot_product_attention(q, k, v, is_causal=True)
                    times[name] = ptimer(once)
                except Exception as e:  # noqa: BLE001 (a backend that does not run: recorded)
                    times[name] = f"failed: {str(e).splitlines()[0][:120]}"
        ok = {n: t for n, t in times.items() if isinstance(t, float)}
        if ok:
            best = min(ok, key=ok.get)
            flops = 4.0 * P * hq * d * L * (L + 1) / 2  # QK^T and PV over the causal half
            row.update({"kernel": best, "attn_layer_ms": ok[best],
                        "attn_seconds": ok[best] * layers / 1e3,
                        "tflops": flops / (ok[best] * 1e-3) / 1e12, "variants_layer_ms": times})
        else:
            row["skipped"] = "no SDPA backend ran: " + "; ".join(f"{n} {t}" for n, t in times.items())
        del q, k, v
    except torch.OutOfMemoryError as e:
        row["skipped"] = f"out of memory: {str(e).splitlines()[0][:160]}"
    if dev == "cuda":
        torch.cuda.empty_cache()
    if "skipped" in row:
        log(f"sdpa prefill {shape} {P} x {L}: skipped ({row['skipped']})")
    else:
        log(f"sdpa prefill {shape} {P} x {L}: {row['attn_layer_ms']:.2f} ms/layer, "
            f"{row['attn_seconds']:.3f} s for {layers} layers, {row['tflops']:.0f} TFLOP/s  [{row['kernel']}]")
    return row


def ints(text):
    return [int(x) for x in text.split(",") if x]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="nosa-1b-like,nosa-8b-like", help="shapes, comma-separated")
    ap.add_argument("--batch", default="1,16,64", help="decode batch sizes")
    ap.add_argument("--context", default="16384,32768", help="decode contexts")
    ap.add_argument("--prompts", type=int, default=16, help="prefill prompts (0: no prefill)")
    ap.add_argument("--prompt-len", type=int, default=16384)
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10, help="timed decode steps")
    ap.add_argument("--prefill-repeats", type=int, default=3, help="timed prefill layers")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu to check the script (tiny shapes)")
    ap.add_argument("--commit", default=os.environ.get("NOSA_COMMIT", ""), help="commit to record")
    ap.add_argument("--out", help="write the JSON document here (one line: .jsonl appends)")
    args = ap.parse_args()
    import warnings
    warnings.filterwarnings("ignore", category=UserWarning)  # a backend that cannot run says why
    try:
        import torch
    except ImportError as e:
        log(f"skipped: PyTorch not available ({e})")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        log("skipped: no CUDA device")
        return 0
    shapes = [s for s in args.shape.split(",") if s]
    for s in shapes:
        if s not in SHAPES:
            ap.error(f"unknown shape {s} (use {', '.join(SHAPES)})")
    timer = Timer(torch, args.device, args.warmup, args.repeats)
    ptimer = Timer(torch, args.device, 1, args.prefill_repeats)
    doc = {"peer": "pytorch sdpa", "suite": "sdpa", "commit": args.commit or "unknown",
           "machine": machine(torch, args.device), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "command": "python3 scripts/bench_sdpa.py " + " ".join(reproducible_args(sys.argv[1:])),
           "results": []}
    t0 = time.time()
    with torch.no_grad():
        for shape in shapes:
            if not args.no_decode:
                for C in ints(args.context):
                    for B in ints(args.batch):
                        doc["results"] += decode_rows(torch, args, timer, shape, B, C)
            if args.prompts > 0:
                doc["results"].append(prefill_row(torch, args, ptimer, shape, args.prompts,
                                                  args.prompt_len))
    log(f"sdpa peer: {len(doc['results'])} rows in {time.time() - t0:.1f} s")
    if args.out:
        mode = "a" if args.out.endswith(".jsonl") else "w"
        with open(args.out, mode) as f:
            f.write(json.dumps(doc) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
