"""Starts a real `nosa serve` and `nosa worker` processes on loopback for the service tests.

Ports are picked by the kernel (port 0, reported through --ports-file), so parallel test runs
never collide. Every process is stopped (and killed if it does not stop) when the Service ends.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

SKIP = 77  # ctest SKIP_RETURN_CODE


def log(*args):
    print(*args, flush=True)


class Service:
    def __init__(self, nosa, workers=1, serve_args=(), worker_args=(), model_shape="tiny"):
        self.nosa = nosa
        self.dir = tempfile.mkdtemp(prefix="nosa-service-")
        self.procs = []
        self.workers = []
        self.signalled = set()  # workers the test stopped or killed on purpose
        self.model = os.path.join(self.dir, "tiny")
        subprocess.run([nosa, "make-model", "--shape", model_shape, "--attention", "nosa",
                        "--seed", "3", "--out", self.model], check=True,
                       stdout=subprocess.DEVNULL)
        ports_file = os.path.join(self.dir, "ports.json")
        self.serve = self._spawn("serve", [nosa, "serve", "--port", "0", "--workers-port", "0",
                                           "--ports-file", ports_file, *serve_args])
        deadline = time.time() + 20
        while not os.path.exists(ports_file):
            if self.serve.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError("nosa serve did not start: " + self.logs("serve"))
            time.sleep(0.05)
        with open(ports_file) as f:
            ports = json.load(f)
        self.http_port = ports["http_port"]
        self.workers_port = ports["workers_port"]
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.worker_args = list(worker_args)
        for _ in range(workers):
            self.add_worker()
        self.wait_replicas(workers)

    def _spawn(self, name, argv):
        out = open(os.path.join(self.dir, f"{name}.log"), "wb")
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.procs.append(p)
        return p

    def add_worker(self):
        i = len(self.workers)
        p = self._spawn(f"worker{i}", [self.nosa, "worker", "--model", self.model, "--device", "cpu",
                                       "--threads", "1", "--kv-blocks", "2048",
                                       "--coordinator", f"127.0.0.1:{self.workers_port}",
                                       "--served-model-name", "tiny", *self.worker_args])
        self.workers.append(p)
        return p

    def add_mpi_workers(self, np, tp):
        """`mpirun -np NP nosa worker --tp TP`: NP / TP replicas."""
        i = len(self.workers)
        p = self._spawn(f"worker{i}", ["mpirun", "--allow-run-as-root", "--oversubscribe",
                                       "-np", str(np), self.nosa, "worker", "--tp", str(tp),
                                       "--model", self.model, "--device", "cpu", "--threads", "1",
                                       "--kv-blocks", "1024", "--served-model-name", "tiny",
                                       "--coordinator", f"127.0.0.1:{self.workers_port}"])
        self.workers.append(p)
        return p

    def logs(self, name):
        try:
            with open(os.path.join(self.dir, f"{name}.log"), errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    def health(self):
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as e:
            return e.code, json.load(e)
        except OSError:
            return 0, {}

    def wait_replicas(self, n, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            status, body = self.health()
            if body.get("replicas") == n:
                return
            for i, w in enumerate(self.workers):
                if w.poll() is not None and i not in self.signalled:
                    raise RuntimeError(f"worker {i} exited: " + self.logs(f"worker{i}"))
            time.sleep(0.1)
        raise RuntimeError(f"{n} replicas did not register: " + self.logs("serve"))

    def metrics(self):
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as r:
            return r.read().decode()

    def kill_worker(self, i, sig=signal.SIGKILL):
        self.signalled.add(i)
        self.workers[i].send_signal(sig)

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.time() + 10
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is not None:
            for name in ["serve"] + [f"worker{i}" for i in range(len(self.workers))]:
                log(f"--- {name}.log ---\n{self.logs(name)}")
        self.stop()


class Checks:
    """Named pass/fail checks that log as they go ("ok     name" / "FAILED name detail")."""

    def __init__(self):
        self.passed = self.failed = 0

    def __call__(self, name, cond, detail=""):
        if cond:
            self.passed += 1
            log(f"ok     {name}")
        else:
            self.failed += 1
            log(f"FAILED {name} {detail}")


def percentile(values, p):
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * p / 100.0
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def nosa_from_argv():
    if len(sys.argv) < 2 or not os.access(sys.argv[1], os.X_OK):
        print(f"usage: {sys.argv[0]} PATH/TO/nosa", file=sys.stderr)
        sys.exit(2)
    return sys.argv[1]
