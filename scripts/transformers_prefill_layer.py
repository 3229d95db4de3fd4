#!/usr/bin/env python3
"""One decoder layer of a nosa shape in transformers (random Llama weights, bf16, SDPA): the
forward of B prompts of --tokens tokens, timed after a first run; with --matmul, torch's bf16
matmul on the shapes of the layer's projections. For comparing a prefill layer kernel by kernel
with `nosa bench --suite prefill --layers 1` under scripts/gpu-profile.sh, e.g.
  scripts/gpu-profile.sh python3 scripts/transformers_prefill_layer.py --shape nosa-8b-like
Prints "skipped: ..." and exits 0 where torch or a GPU is missing.
"""
import argparse
import time

from bench_transformers import SHAPES, random_llama, torch_ready


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="nosa-8b-like", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--matmul", action="store_true", help="also time the projections' matmuls")
    args = ap.parse_args()
    if not torch_ready():
        return 0
    import torch
    _, hidden, heads, kv, head_dim, ffn, vocab = SHAPES[args.shape]
    model = random_llama(args.shape, layers=1)
    ids = torch.randint(3, vocab, (args.batch, args.tokens), device="cuda")
    with torch.no_grad():
        for run in range(2):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.model(input_ids=ids, use_cache=False)
            torch.cuda.synchronize()
            if run == 1:
                print(f"transformers {args.shape}, one layer, {args.batch} x {args.tokens} "
                      f"tokens: {(time.perf_counter() - t0) * 1e3:.1f} ms")
    if args.matmul:
        M = args.batch * args.tokens
        q_out = (heads + 2 * kv) * head_dim
        for K, N, what in ((hidden, q_out, "qkv"), (heads * head_dim, hidden, "o"),
                           (hidden, 2 * ffn, "gate+up"), (ffn, hidden, "down")):
            a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
            for _ in range(3):
                a @ w.t()
            start, end = torch.cuda.Event(True), torch.cuda.Event(True)
            start.record()
            for _ in range(10):
                a @ w.t()
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end) / 10
            print(f"torch matmul {what} M={M} K={K} N={N}: {ms:.3f} ms, "
                  f"{2 * M * K * N / ms / 1e9:.0f} TFLOP/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
