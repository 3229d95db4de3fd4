#!/usr/bin/env bash
# The main job on the embedded default: sets up and builds, makes a small random NOSA model, starts
# the service on the CPU backend (`nosa serve` and one `nosa worker`, in the background), sends a
# real OpenAI-style completion request with curl, prints the answer, and stops both processes.
#   NOSA_HTTP_PORT=8000 scripts/demo.sh    # a fixed port (default: any free port)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
nosa=build/launcher/nosa
model=build/models/tiny-nosa
[ -f "$model/config.json" ] || $nosa make-model --shape tiny --attention nosa --seed 1 --out "$model"

run=$(mktemp -d /tmp/nosa-demo.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$run"
}
trap cleanup EXIT
fail() {
  echo "demo: $*" >&2
  for f in "$run"/*.log; do echo "--- $(basename "$f") ---" >&2; tail -20 "$f" >&2; done
  exit 1
}

$nosa serve --port "${NOSA_HTTP_PORT:-0}" --workers-port 0 --ports-file "$run/ports.json" \
  >"$run/serve.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [ -f "$run/ports.json" ] && break; sleep 0.1; done
[ -f "$run/ports.json" ] || fail "nosa serve did not start"
port() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$run/ports.json" "$1"; }
http_port=$(port http_port)
workers_port=$(port workers_port)
url="http://127.0.0.1:$http_port"

$nosa worker --model "$model" --device cpu --kv-gib 0.25 \
  --coordinator "127.0.0.1:$workers_port" >"$run/worker.log" 2>&1 &
pids+=($!)
echo "demo: nosa serve on $url, one CPU worker serving model 'tiny-nosa'; waiting for /health"
for _ in $(seq 600); do
  [ "$(curl -s -o /dev/null -w '%{http_code}' "$url/health")" = 200 ] && break
  kill -0 "${pids[1]}" 2>/dev/null || fail "the worker exited"
  sleep 0.1
done
[ "$(curl -s -o /dev/null -w '%{http_code}' "$url/health")" = 200 ] || fail "no replica registered"

request='{"model": "tiny-nosa", "prompt": "The lighthouse keeper climbed the stairs", "max_tokens": 32, "temperature": 0}'
echo "demo: curl $url/v1/completions -H 'Content-Type: application/json' -d '$request'"
response=$(curl -sS --fail-with-body "$url/v1/completions" -H 'Content-Type: application/json' \
  -d "$request") || fail "the request failed: $response"
echo "$response"
echo
echo "demo: the answer (a random-weight model, so the words are random):"
python3 -c "import json,sys; r=json.loads(sys.argv[1]); print(repr(r['choices'][0]['text'])); print('finish_reason:', r['choices'][0]['finish_reason'], '| usage:', r['usage'])" "$response"
