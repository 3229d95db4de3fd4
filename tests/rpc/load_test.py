"""Bounded load test: 500 requests from 64 concurrent clients (threads of this second process) on
loopback against `nosa serve` with one CPU worker on a tiny model; a quarter are streamed. Passes
when no request is lost or fails, and prints throughput and latency percentiles.

    python3 tests/rpc/load_test.py build/launcher/nosa [--requests N] [--concurrency C]
"""
import argparse
import re
import sys

from load_client import client_name, run_load
from service import Service, log, percentile


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("nosa")
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--workers", type=int, default=1)
    a = ap.parse_args()

    with Service(a.nosa, workers=a.workers) as svc:
        outcomes, wall = run_load(svc.url, a.requests, a.concurrency, max_tokens=a.max_tokens)
        failed = [o for o in outcomes if not o.ok]
        lat = [o.latency for o in outcomes if o.ok]
        ttft = [o.ttft for o in outcomes if o.ok and o.ttft is not None]
        tokens = sum(o.tokens for o in outcomes if o.ok and not o.stream)
        tokens += sum(o.tokens for o in outcomes if o.ok and o.stream)
        log(f"load: {a.requests} requests, {a.concurrency} concurrent clients ({client_name()}), "
            f"{a.workers} worker(s), max_tokens {a.max_tokens}")
        log(f"load: {len(outcomes) - len(failed)} ok, {len(failed)} failed in {wall:.2f} s: "
            f"{len(lat) / wall:.1f} requests/s, {tokens / wall:.1f} generated tokens/s")
        log("load: latency p50 {:.3f} s, p90 {:.3f} s, p99 {:.3f} s, max {:.3f} s".format(
            percentile(lat, 50), percentile(lat, 90), percentile(lat, 99), max(lat or [0])))
        if ttft:
            log("load: streamed time to first token p50 {:.3f} s, p99 {:.3f} s".format(
                percentile(ttft, 50), percentile(ttft, 99)))
        for o in failed[:10]:
            log(f"load: FAILED: {o.error}")

        metrics = svc.metrics()
        m = re.search(r'^nosa_requests_total\{endpoint="completions",outcome="success"\} (\d+)$',
                      metrics, re.M)
        served = int(m.group(1)) if m else -1
        log(f"load: the server counted {served} successful completions")
        ok = not failed and served == a.requests and len(outcomes) == a.requests
        ok = ok and "nosa_time_to_first_token_seconds_bucket" in metrics
        ok = ok and "nosa_step_duration_seconds_bucket" in metrics
        status, body = svc.health()
        ok = ok and status == 200
    log(f"load: {1 if ok else 0} passed, {0 if ok else 1} failed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
