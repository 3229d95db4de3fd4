#!/usr/bin/env python3
"""Compares `nosa generate --json --logprobs K` outputs of tensor-parallel runs against TP=1:
greedy tokens equal, and |logprob difference| of the top alternatives up to the first differing
token. Prints one line per run; exit status 0 (the numbers are the result; a missing or broken
output is reported as such).

  tp_logits_check.py --name "tiny nosa" TP1.json 2:TP2.json 4:TP4.json
  tp_logits_check.py --name "tiny nosa" --against "TP=2 direct" TP2D.json "TP=2 graphs:TP2.json"
(a run named by a number is printed as TP=N).
"""
import argparse
import json
import math


def last_json(path):
    with open(path) as f:
        lines = [l for l in f.read().strip().splitlines() if l.strip().startswith("{")]
    return json.loads(lines[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--against", default="TP=1", help="what the reference run is")
    ap.add_argument("reference")
    ap.add_argument("runs", nargs="+", help="TP:PATH")
    args = ap.parse_args()
    try:
        a = last_json(args.reference)
    except (OSError, ValueError, IndexError) as e:
        print(f"  TP check {args.name}: no {args.against} output ({type(e).__name__})")
        return 0
    for spec in args.runs:
        tp, path = spec.split(":", 1)
        label = f"TP={tp}" if tp.isdigit() else tp
        try:
            b = last_json(path)
        except (OSError, ValueError, IndexError) as e:
            print(f"  {label} vs {args.against}, {args.name}: no {label} output ({type(e).__name__})")
            continue
        same = sum(x == y for x, y in zip(a["token_ids"], b["token_ids"]))
        first = next((i for i, (x, y) in enumerate(zip(a["token_ids"], b["token_ids"])) if x != y),
                     len(a["token_ids"]))
        d = []
        for ea, eb in zip(a["logprobs"], b["logprobs"]):
            if ea["token"] != eb["token"]:
                break
            tb = {t["token"]: t["logprob"] for t in eb["top"]}
            d += [abs(t["logprob"] - tb[t["token"]]) for t in ea["top"] if t["token"] in tb]
        mean = sum(d) / len(d) if d else math.nan
        mx = max(d) if d else math.nan
        print(f"  {label} vs {args.against}, {args.name}: {same}/{len(a['token_ids'])} greedy tokens equal "
              f"(first difference at {first}), |logprob diff| mean {mean:.4f} max {mx:.4f} "
              f"(until the first different token)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
