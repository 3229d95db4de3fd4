#!/usr/bin/env python3
"""An independent float64 reference of the Llama forward pass in numpy (embedding, RMSNorm, RoPE
with rotate_half, grouped-query causal attention, SiLU MLP, final norm, LM head), read straight
from a checkpoint's config.json and single model.safetensors. It runs `nosa generate` (dense
attention, --logprobs 20) and compares the engine's logprobs at every generated position, teacher
forced on the engine's own tokens. Needs numpy only (no PyTorch); prints "skipped: ..." and exits
0 without it.

    scripts/check_llama_numpy.py --nosa build/launcher/nosa --model DIR [--device cpu] [--tol 1e-3]
A fresh random checkpoint when --model is not given: `nosa make-model --shape tiny --attention
dense` into a temporary directory.
"""
import argparse
import json
import os
import random
import struct
import subprocess
import sys
import tempfile


def load(model_dir, np):
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(model_dir, "model.safetensors"), "rb") as f:
        raw = f.read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    weights = {}
    for name, v in header.items():
        if name == "__metadata__":
            continue
        a, b = v["data_offsets"]
        buf = raw[8 + n + a:8 + n + b]
        if v["dtype"] == "BF16":
            bits = np.frombuffer(buf, dtype=np.uint16).astype(np.uint32) << 16
            arr = bits.view(np.float32)
        elif v["dtype"] == "F16":
            arr = np.frombuffer(buf, dtype=np.float16)
        else:
            arr = np.frombuffer(buf, dtype=np.float32)
        weights[name] = arr.astype(np.float64).reshape(v["shape"])
    return cfg, weights


def logprobs(cfg, W, ids, np):
    H, L = cfg["hidden_size"], cfg["num_hidden_layers"]
    nh = cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads", nh)
    hd = cfg.get("head_dim") or H // nh
    eps = cfg.get("rms_norm_eps", 1e-6)
    theta = cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    T = len(ids)

    def rms(x, w):
        return w * (x / np.sqrt((x * x).mean(-1, keepdims=True) + eps))

    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    ang = np.arange(T)[:, None] * inv[None, :]
    cos = np.concatenate([np.cos(ang)] * 2, -1)[:, None]
    sin = np.concatenate([np.sin(ang)] * 2, -1)[:, None]

    def rope(x):
        x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
        return x * cos + np.concatenate([-x2, x1], -1) * sin

    mask = np.triu(np.full((T, T), -np.inf), 1)
    x = W["model.embed_tokens.weight"][ids]
    for layer in range(L):
        p = f"model.layers.{layer}."
        h = rms(x, W[p + "input_layernorm.weight"])
        q = rope((h @ W[p + "self_attn.q_proj.weight"].T).reshape(T, nh, hd))
        k = rope((h @ W[p + "self_attn.k_proj.weight"].T).reshape(T, nkv, hd))
        v = (h @ W[p + "self_attn.v_proj.weight"].T).reshape(T, nkv, hd)
        out = np.zeros((T, nh, hd))
        for head in range(nh):
            g = head // (nh // nkv)
            s = q[:, head] @ k[:, g].T / np.sqrt(hd) + mask
            s = np.exp(s - s.max(-1, keepdims=True))
            out[:, head] = (s / s.sum(-1, keepdims=True)) @ v[:, g]
        x = x + out.reshape(T, nh * hd) @ W[p + "self_attn.o_proj.weight"].T
        h = rms(x, W[p + "post_attention_layernorm.weight"])
        gate = h @ W[p + "mlp.gate_proj.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * (h @ W[p + "mlp.up_proj.weight"].T)) @ \
            W[p + "mlp.down_proj.weight"].T
    x = rms(x, W["model.norm.weight"])
    logits = x @ W.get("lm_head.weight", W["model.embed_tokens.weight"]).T
    logits -= logits.max(-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nosa", required=True)
    ap.add_argument("--model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompt-len", type=int, default=120)
    ap.add_argument("--gen", type=int, default=6)
    ap.add_argument("--tol", type=float, default=1e-3, help="largest |logprob difference|")
    args = ap.parse_args()
    try:
        import numpy as np
    except ImportError:
        print("skipped: numpy is not installed")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if not model:
            model = os.path.join(tmp, "m")
            subprocess.run([args.nosa, "make-model", "--shape", "tiny", "--attention", "dense",
                            "--seed", "5", "--out", model], check=True, capture_output=True)
        cfg, W = load(model, np)
        rng = random.Random(3)
        prompt = [rng.randrange(3, cfg["vocab_size"]) for _ in range(args.prompt_len)]
        proc = subprocess.run([args.nosa, "generate", "--model", model, "--device", args.device,
                               "--attention", "dense", "--prompt-ids", ",".join(map(str, prompt)),
                               "--max-tokens", str(args.gen), "--ignore-eos", "--json",
                               "--logprobs", "20"], capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr)
            return 1
        out = json.loads(proc.stdout.strip().splitlines()[-1])
    tokens = out["token_ids"]
    ref = logprobs(cfg, W, prompt + tokens[:-1], np)[len(prompt) - 1:]
    worst = 0.0
    for i, e in enumerate(out["logprobs"]):
        for t, lp in [(e["token"], e["logprob"])] + [(a["token"], a["logprob"]) for a in e["top"]]:
            worst = max(worst, abs(lp - ref[i, t]))
    ok = worst <= args.tol
    print(f"nosa --device {args.device} vs float64 numpy Llama: max |logprob diff| {worst:.2e} over "
          f"{len(tokens)} positions x 21 tokens: {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
