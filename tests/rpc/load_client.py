"""A bounded load generator for the service: N requests from C concurrent clients (threads of this
process), a mix of plain and streamed completions. Uses the official `openai` client when it is
installed, else Python's http.client. Returns per-request outcomes and timings."""
import http.client
import json
import threading
import time
import urllib.parse

try:
    import openai
except ImportError:
    openai = None


class Outcome:
    __slots__ = ("ok", "stream", "latency", "ttft", "tokens", "error")

    def __init__(self):
        self.ok, self.stream, self.latency, self.ttft, self.tokens, self.error = (
            False, False, 0.0, None, 0, "")


def _http_request(url, body, stream):
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    try:
        conn.request("POST", "/v1/completions", json.dumps(body),
                     {"Content-Type": "application/json"})
        r = conn.getresponse()
        if not stream:
            data = json.loads(r.read())
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}: {data}")
            return data["usage"]["completion_tokens"], None
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]}")
        first, n = None, 0
        t0 = time.perf_counter()
        for line in r:
            line = line.strip()
            if not line.startswith(b"data: "):
                continue
            payload = line[6:]
            if payload == b"[DONE]":
                return n, first
            chunk = json.loads(payload)
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']['message']}")
            if chunk["choices"] and chunk["choices"][0]["text"] and first is None:
                first = time.perf_counter() - t0
            n += 1 if chunk["choices"] and chunk["choices"][0]["text"] else 0
        raise RuntimeError("stream ended without [DONE]")
    finally:
        conn.close()


def run_load(url, n_requests, concurrency, max_tokens=8, stream_every=4, use_openai=True,
             on_progress=None):
    """Sends n_requests; every stream_every-th one streamed. Returns (outcomes, wall seconds)."""
    client = None
    if use_openai and openai is not None:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    outcomes = [Outcome() for _ in range(n_requests)]
    next_index = [0]
    done = [0]
    lock = threading.Lock()

    def one(i):
        o = outcomes[i]
        o.stream = stream_every > 0 and i % stream_every == 0
        body = dict(model="tiny", prompt=f"Request number {i} asks for a few words", 
                    max_tokens=max_tokens, temperature=0.7, seed=i)
        t0 = time.perf_counter()
        try:
            if client is not None:
                extra = {"ignore_eos": True}
                if o.stream:
                    n, first = 0, None
                    for c in client.completions.create(**body, stream=True, extra_body=extra):
                        if c.choices and c.choices[0].text:
                            n += 1
                            if first is None:
                                first = time.perf_counter() - t0
                    o.tokens, o.ttft = n, first
                else:
                    r = client.completions.create(**body, extra_body=extra)
                    o.tokens = r.usage.completion_tokens
                    if o.tokens != max_tokens:
                        raise RuntimeError(f"{o.tokens} tokens instead of {max_tokens}")
            else:
                body["ignore_eos"] = True
                body["stream"] = o.stream
                o.tokens, o.ttft = _http_request(url, body, o.stream)
            o.ok = True
        except Exception as e:  # noqa: BLE001 - every failure is recorded and reported
            o.error = f"{type(e).__name__}: {e}"
        o.latency = time.perf_counter() - t0

    def worker():
        while True:
            with lock:
                i = next_index[0]
                if i >= n_requests:
                    return
                next_index[0] += 1
            one(i)
            with lock:
                done[0] += 1
                d = done[0]
            if on_progress:
                on_progress(d)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    return outcomes, time.perf_counter() - t0


def client_name():
    return f"openai {openai.__version__}" if openai is not None else "http.client"
