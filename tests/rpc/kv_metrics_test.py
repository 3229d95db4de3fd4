"""An offloaded replica's KV counters reach the coordinator's /metrics: `nosa serve` with one CPU
worker that keeps its KV in host memory (`--offload host`) with a small block cache, four
concurrent completions of long token-id prompts; then the selection, overlap,
prefetch and transfer counters, as the worker's heartbeats carry them.

    python3 tests/rpc/kv_metrics_test.py build/launcher/nosa
"""
import json
import random
import re
import sys
import threading
import time
import urllib.error
import urllib.request

from service import Checks, Service, log, nosa_from_argv


def complete(url, prompt, max_tokens, results, i):
    body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": max_tokens,
                       "temperature": 0}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            results[i] = (r.status, json.loads(r.read()))
    except urllib.error.HTTPError as e:  # reported by the caller
        results[i] = (e.code, e.read().decode(errors="replace"))
    except Exception as e:
        results[i] = (None, str(e))


def sample(metrics, family, labels=""):
    """The value of FAMILY{...LABELS...} (the one replica's), or None."""
    m = re.search(r"^" + family + r"\{[^}]*" + labels + r"[^}]*\} ([0-9.e+]+)$", metrics, re.M)
    return float(m.group(1)) if m else None


def main():
    nosa = nosa_from_argv()
    check = Checks()

    with Service(nosa, worker_args=["--offload", "host", "--gpu-kv-gib", "0.015",
                                    "--host-kv-gib", "0.02"]) as svc:
        rng = random.Random(7)
        prompts = [[3 + rng.randrange(1990) for _ in range(n)] for n in (900, 700, 1200, 600)]
        results = [None] * len(prompts)
        threads = [threading.Thread(target=complete, args=(svc.url, p, 24, results, i))
                   for i, p in enumerate(prompts)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        check("the completions succeed", all(r and r[0] == 200 for r in results), results)
        check("each generated its tokens",
              all(r and r[0] == 200 and r[1]["usage"]["completion_tokens"] == 24 for r in results))

        # Heartbeats carry the counters: wait for one after the last step.
        metrics, selected = "", None
        deadline = time.time() + 15
        while time.time() < deadline:
            metrics = svc.metrics()
            selected = sample(metrics, "nosa_kv_selected_chunks_total")
            steps_done = sample(metrics, "nosa_replica_generated_tokens_total")
            if selected and steps_done and steps_done >= 4 * 24:
                break
            time.sleep(0.2)
        overlap = sample(metrics, "nosa_kv_selection_overlap_chunks_total")
        prefetched = sample(metrics, "nosa_kv_prefetched_chunks_total")
        prefetch_hits = sample(metrics, "nosa_kv_prefetch_hits_total")
        h2d = sample(metrics, "nosa_kv_transfer_bytes_total", 'direction="host_to_device"')
        d2h = sample(metrics, "nosa_kv_transfer_bytes_total", 'direction="device_to_host"')
        disk = sample(metrics, "nosa_kv_transfer_bytes_total", 'direction="disk_read"')
        log(f"kv metrics: selected {selected}, overlap {overlap}, prefetched {prefetched} "
            f"({prefetch_hits} selected), host->device {h2d} B, device->host {d2h} B")
        check("chunks were selected", selected is not None and selected > 0)
        check("most of them were selected the step before too",
              overlap is not None and selected and 0.5 * selected < overlap <= selected)
        # The prefetch's counters (their values: the coordinator's test; the 2-layer tiny model
        # has no layer to prefetch).
        check("the prefetch counters are exported",
              prefetched is not None and prefetch_hits is not None)
        # The blocks written on the device are flushed to host memory (this KV fits the block
        # cache, so none has to come back).
        check("written blocks were flushed to host memory", d2h is not None and d2h > 0)
        check("the blocks to the device are counted", h2d is not None)
        check("no disk tier, no disk reads", disk == 0)
    log(f"kv metrics: {check.passed} passed, {check.failed} failed")
    return 0 if check.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
