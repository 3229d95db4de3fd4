#!/usr/bin/env python3
"""The peer of `nosa bench`: transformers' generate (random Llama weights of a nosa shape, bf16,
SDPA, static cache, greedy) on the same GPU, batch and context.

For each (shape, batch, context): t1 = generate(max_new_tokens=1) (prefill + 1 token) and
tK = generate(max_new_tokens=1 + K); prefill tokens/s = batch * context / t1 and decode step time =
(tK - t1) / K, each the median of --repeats runs after a warm-up. Writes JSON (--out) with the
machine and the versions; prints "skipped: ..." and exits 0 where torch or a GPU is missing.
"""
import argparse
import json
import socket
import statistics
import sys
import time

from peer_args import reproducible_args

SHAPES = {
    # layers, hidden, heads, kv heads, head_dim, ffn, vocab (docs/performance.md)
    "tiny": (2, 256, 4, 2, 64, 512, 2000),
    "nosa-1b-like": (28, 2048, 16, 2, 128, 6144, 73448),
    "nosa-8b-like": (32, 4096, 32, 2, 128, 16384, 73448),
}


def torch_ready():
    """Whether PyTorch, transformers and a CUDA device are here (else prints why it skips)."""
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as e:
        print(f"skipped: PyTorch/transformers not available ({e})")
        return False
    if not torch.cuda.is_available():
        print("skipped: no CUDA device")
        return False
    return True


def random_llama(shape, layers=None):
    """LlamaForCausalLM of a nosa shape (all its layers, or `layers`), random bf16 weights from
    seed 0, SDPA attention, on the GPU."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    n_layers, hidden, heads, kv, head_dim, ffn, vocab = SHAPES[shape]
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                         num_hidden_layers=layers or n_layers, num_attention_heads=heads,
                         num_key_value_heads=kv, head_dim=head_dim,
                         max_position_embeddings=131072, rope_theta=10000.0,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).eval()
    torch.set_default_dtype(prev)
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", action="append", help="shape (repeatable; default nosa-1b-like)")
    ap.add_argument("--batch", type=int, action="append", help="batch (repeatable; default 16)")
    ap.add_argument("--context", type=int, default=16384)
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--compile", action="store_true", help="let generate compile (slow start)")
    ap.add_argument("--out")
    args = ap.parse_args()
    if not torch_ready():
        return 0
    import torch
    import transformers
    shapes = args.shape or ["nosa-1b-like"]
    batches = args.batch or [16]
    out = {"peer": "transformers generate (static cache, sdpa, greedy, bf16)",
           "machine": {"hostname": socket.gethostname(), "gpu": torch.cuda.get_device_name(0)},
           "transformers": transformers.__version__, "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "command": "python3 scripts/bench_transformers.py " + " ".join(reproducible_args(sys.argv[1:])),
           "results": []}
    for shape in shapes:
        vocab = SHAPES[shape][6]
        model = random_llama(shape)
        gen_cfg = dict(do_sample=False, cache_implementation="static", pad_token_id=0,
                       eos_token_id=None)
        # Eager decoding unless asked (static caches make generate auto-compile otherwise).
        model.generation_config.disable_compile = not args.compile
        for batch in batches:
            ids = torch.randint(3, vocab, (batch, args.context), device="cuda")

            def timed(n_new, length=None):
                x = ids if length is None else ids[:, :length]
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                with torch.no_grad():
                    model.generate(input_ids=x, attention_mask=torch.ones_like(x),
                                   max_new_tokens=n_new, min_new_tokens=n_new, **gen_cfg)
                torch.cuda.synchronize()
                return time.perf_counter() - t0

            row = {"shape": shape, "batch": batch, "context": args.context,
                   "decode_steps": args.decode_steps}
            try:
                timed(2, 512)  # warm-up
                t1 = statistics.median(timed(1) for _ in range(args.repeats))
                tk = statistics.median(timed(1 + args.decode_steps) for _ in range(args.repeats))
                step = (tk - t1) / args.decode_steps
                row.update({"prefill_seconds": t1,
                            "prefill_tokens_per_s": batch * args.context / t1,
                            "decode_step_ms": step * 1e3,
                            "decode_tokens_per_s": batch / step if step > 0 else 0})
                print(f"transformers {shape} B={batch} C={args.context}: prefill "
                      f"{row['prefill_tokens_per_s']:.0f} tok/s, decode {step * 1e3:.1f} ms/step "
                      f"= {row['decode_tokens_per_s']:.0f} tok/s", flush=True)
            except torch.OutOfMemoryError as e:
                row["skipped"] = f"out of memory: {e}"
                print(f"transformers {shape} B={batch}: out of memory", flush=True)
            out["results"].append(row)
            del ids
            torch.cuda.empty_cache()
        del model
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
