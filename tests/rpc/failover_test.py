"""Replica failures: with two workers under load, SIGKILL one mid-run. Requests that had sent
nothing to their client are retried on the other replica, streams already under way end with a
clear error, nothing hangs, and the service keeps answering. Then a worker that stops
heartbeating (SIGSTOP) is removed within the timeout, and when it resumes it registers again."""
import signal
import sys
import threading
import time

from load_client import run_load
from service import Checks, Service, log


def main():
    nosa = sys.argv[1]
    check = Checks()

    with Service(nosa, workers=2, serve_args=["--worker-timeout", "1.5", "--heartbeat-ms", "200"],
                 worker_args=["--connect-timeout", "30"]) as svc:
        n = 240
        killed = threading.Event()

        def progress(done):
            if done >= n // 4 and not killed.is_set():
                killed.set()
                svc.kill_worker(0, signal.SIGKILL)

        outcomes, wall = run_load(svc.url, n, 32, max_tokens=24, stream_every=3,
                                  on_progress=progress)
        check("the worker was killed mid-run", killed.is_set())
        plain_failed = [o for o in outcomes if not o.ok and not o.stream]
        stream_failed = [o for o in outcomes if not o.ok and o.stream]
        log(f"failover: {n} requests in {wall:.1f} s; plain failed {len(plain_failed)}, "
            f"streams failed {len(stream_failed)}")
        check("every plain request succeeded (retried on the other replica)", not plain_failed,
              [o.error for o in plain_failed[:3]])
        check("streams that failed say why",
              all("replica" in o.error for o in stream_failed),
              [o.error for o in stream_failed[:3]])
        status, body = svc.health()
        check("the service still answers with one replica", status == 200 and
              body.get("replicas") == 1, (status, body))
        after, _ = run_load(svc.url, 20, 4, max_tokens=4)
        check("new requests succeed after the failure", all(o.ok for o in after),
              [o.error for o in after if not o.ok][:3])
        metrics = svc.metrics()
        check("metrics count the lost replica", "nosa_replicas_lost_total 1" in metrics)

        # A worker that stops heartbeating is removed, and comes back when it resumes.
        svc.add_worker()
        svc.wait_replicas(2)
        t0 = time.time()
        svc.kill_worker(2, signal.SIGSTOP)
        while time.time() - t0 < 10 and svc.health()[1].get("replicas") != 1:
            time.sleep(0.1)
        removed_after = time.time() - t0
        check("a silent replica is removed within the timeout",
              svc.health()[1].get("replicas") == 1 and removed_after < 5,
              f"{removed_after:.1f} s")
        during, _ = run_load(svc.url, 10, 2, max_tokens=4)
        check("requests succeed while it is frozen", all(o.ok for o in during),
              [o.error for o in during if not o.ok][:3])
        svc.kill_worker(2, signal.SIGCONT)
        try:
            svc.wait_replicas(2, timeout=20)
            check("the resumed worker registers again", True)
        except RuntimeError as e:
            check("the resumed worker registers again", False, str(e)[:300])
        if check.failed:
            log("--- serve.log ---\n" + svc.logs("serve"))
    log(f"failover: {check.passed} passed, {check.failed} failed")
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
