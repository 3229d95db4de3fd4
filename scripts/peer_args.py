"""What the peer benchmarks (bench_sdpa.py, bench_transformers.py) record as their command."""


def reproducible_args(args):
    """The arguments without the output file (--out PATH): what reproduces the numbers."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == "--out":
            skip = True
        elif not a.startswith("--out="):
            out.append(a)
    return out
