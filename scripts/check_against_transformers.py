#!/usr/bin/env python3
"""End-to-end check of the engine against a reference nobody here wrote: Hugging Face transformers.

Builds small random LlamaForCausalLM checkpoints (LlamaConfig -> save_pretrained, safetensors,
bf16), runs them through `nosa generate --device cuda --attention dense --json --logprobs 20`, then
feeds the prompt plus the engine's tokens to transformers (bf16, SDPA) in one forward pass and
compares, at every generated position, the log-probabilities of the engine's token and of its top
20 alternatives with transformers' log_softmax of the same position's logits.

Exits 0 printing "skipped: ..." where PyTorch, transformers or a GPU is missing (CI), 1 when the
engine disagrees beyond the tolerances. --out FILE writes the figures as JSON.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile


def skip(why):
    print(f"skipped: {why}")
    sys.exit(0)


def find_nosa(explicit):
    if explicit:
        return explicit
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for build in ("build-cuda", "build"):
        path = os.path.join(root, build, "launcher", "nosa")
        if os.path.exists(path):
            return path
    skip("no nosa binary found (pass --nosa)")


CONFIGS = [
    # name, hidden, layers, heads, kv heads, head_dim, ffn, vocab, tied embeddings
    ("llama-d128", 1024, 4, 8, 2, 128, 2048, 4096, False),
    ("llama-d64-tied", 512, 3, 8, 2, 64, 1536, 3000, True),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nosa", help="the nosa binary (default: build-cuda/launcher/nosa)")
    ap.add_argument("--prompt-len", type=int, default=300)
    ap.add_argument("--gen", type=int, default=16)
    ap.add_argument("--init-range", type=float, default=0.05,
                    help="initializer_range of the random weights (larger: peakier logits)")
    ap.add_argument("--max-mean-diff", type=float, default=0.05,
                    help="largest mean |logprob difference| allowed")
    ap.add_argument("--max-diff", type=float, default=0.3,
                    help="largest single |logprob difference| allowed")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()

    try:
        import torch
        import transformers
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as e:
        skip(f"PyTorch/transformers not available ({e})")
    if not torch.cuda.is_available():
        skip("no CUDA device for PyTorch")
    nosa = find_nosa(args.nosa)

    results = {"transformers": transformers.__version__, "torch": torch.__version__,
               "configs": []}
    ok = True
    for (name, hidden, layers, heads, kv, head_dim, ffn, vocab, tied) in CONFIGS:
        torch.manual_seed(1234)
        config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                             num_hidden_layers=layers, num_attention_heads=heads,
                             num_key_value_heads=kv, head_dim=head_dim,
                             max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                             tie_word_embeddings=tied, initializer_range=args.init_range,
                             bos_token_id=1, eos_token_id=2)
        config._attn_implementation = "sdpa"
        model = LlamaForCausalLM(config).to(torch.bfloat16).cuda().eval()
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            cfg_path = os.path.join(tmp, "config.json")
            with open(cfg_path) as f:
                cfg = json.load(f)
            cfg.setdefault("rope_theta", 10000.0)  # newer transformers nest it in rope_parameters
            cfg.setdefault("head_dim", head_dim)
            with open(cfg_path, "w") as f:
                json.dump(cfg, f)
            g = torch.Generator().manual_seed(99)
            prompt = torch.randint(3, vocab, (args.prompt_len,), generator=g).tolist()
            ids_file = os.path.join(tmp, "prompt.txt")
            with open(ids_file, "w") as f:
                f.write(",".join(map(str, prompt)))
            cmd = [nosa, "generate", "--model", tmp, "--device", "cuda", "--attention", "dense",
                   "--prompt-ids", "@" + ids_file, "--max-tokens", str(args.gen), "--ignore-eos",
                   "--json", "--logprobs", "20"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{name}: nosa failed ({proc.returncode}):\n{proc.stderr}")
                ok = False
                continue
            out = json.loads(proc.stdout.strip().splitlines()[-1])
        tokens = out["token_ids"]
        seq = torch.tensor([prompt + tokens[:-1]], device="cuda")
        with torch.no_grad():
            logits = model(seq).logits[0, len(prompt) - 1:].float()
        ref = torch.log_softmax(logits, dim=-1).cpu()
        diffs, agree, near_ties = [], 0, 0
        for i, entry in enumerate(out["logprobs"]):
            diffs.append(abs(entry["logprob"] - ref[i, entry["token"]].item()))
            for alt in entry["top"]:
                diffs.append(abs(alt["logprob"] - ref[i, alt["token"]].item()))
            hf_best = int(torch.argmax(ref[i]).item())
            if hf_best == entry["token"]:
                agree += 1
            elif ref[i, hf_best].item() - ref[i, entry["token"]].item() < 0.05:
                near_ties += 1
        mean = sum(diffs) / len(diffs)
        worst = max(diffs)
        passed = mean <= args.max_mean_diff and worst <= args.max_diff and \
            agree + near_ties == len(tokens)
        ok = ok and passed
        row = {"config": name, "hidden": hidden, "layers": layers, "heads": heads,
               "kv_heads": kv, "head_dim": head_dim, "vocab": vocab, "tied": tied,
               "prompt_len": args.prompt_len, "generated": len(tokens),
               "mean_abs_logprob_diff": mean, "max_abs_logprob_diff": worst,
               "argmax_agree": agree, "argmax_near_ties": near_ties, "passed": passed}
        results["configs"].append(row)
        print(f"{name}: {len(tokens)} tokens, logprob |diff| mean {mean:.4f} max {worst:.4f}, "
              f"greedy = transformers' argmax at {agree}/{len(tokens)} "
              f"(+{near_ties} near ties): {'ok' if passed else 'FAILED'}")
        del model
        torch.cuda.empty_cache()
    results["passed"] = ok
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    print("check against transformers:", "passed" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
