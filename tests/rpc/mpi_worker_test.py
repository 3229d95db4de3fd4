"""Workers under mpirun: `-np 2 --tp 1` registers two replicas and `-np 2 --tp 2` one replica of two
ranks; each serves requests with the tokens of a single-rank worker. Skips (exit 77) without
mpirun."""
import json
import shutil
import signal
import sys
import urllib.request

from service import SKIP, Service, log


def complete(url):
    body = json.dumps({"prompt": [1, 2, 3, 4], "max_tokens": 6, "ignore_eos": True}).encode()
    req = urllib.request.Request(url + "/v1/completions", body,
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)["choices"][0]["text"]


def main():
    if shutil.which("mpirun") is None:
        print("SKIPPED: mpirun is not installed")
        return SKIP
    nosa = sys.argv[1]
    passed, failed = 0, 0
    with Service(nosa, workers=1) as svc:
        expected = complete(svc.url)
        svc.kill_worker(0, signal.SIGTERM)
        svc.workers[0].wait(10)
        svc.wait_replicas(0)
        for np, tp, replicas in [(2, 1, 2), (2, 2, 1)]:
            w = svc.add_mpi_workers(np, tp)
            try:
                svc.wait_replicas(replicas, timeout=90)
                texts = {complete(svc.url) for _ in range(4)}
                ok = texts == {expected}
                detail = texts
            except Exception as e:  # noqa: BLE001
                ok, detail = False, e
            name = f"mpirun -np {np} --tp {tp}: {replicas} replica(s) with single-rank tokens"
            if ok:
                passed += 1
                log(f"ok     {name}")
            else:
                failed += 1
                log(f"FAILED {name}: {detail}\n" + svc.logs(f"worker{len(svc.workers) - 1}"))
            svc.kill_worker(len(svc.workers) - 1, signal.SIGTERM)
            w.wait(30)
            svc.wait_replicas(0)
    log(f"mpi workers: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
