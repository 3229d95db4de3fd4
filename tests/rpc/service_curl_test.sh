#!/usr/bin/env bash
# The HTTP API with curl against a real `nosa serve` and one CPU `nosa worker` (tiny model,
# context limited to 2048 tokens, body limit 10 KiB): every kind of bad input gets the right status
# code and an OpenAI-style error body, good requests and streams work, a client that disconnects
# cancels its request, and bytes that are not the RPC protocol on the workers port harm nothing.
#   tests/rpc/service_curl_test.sh PATH/TO/nosa
set -uo pipefail
nosa=${1:?usage: $0 PATH/TO/nosa}
command -v curl >/dev/null || { echo "SKIPPED: curl is not installed"; exit 77; }
tmp=$(mktemp -d /tmp/nosa-curl-test.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null; done
  rm -rf "$tmp"
}
trap cleanup EXIT

"$nosa" make-model --shape tiny --attention nosa --seed 3 --out "$tmp/tiny" >/dev/null 2>&1 ||
  { echo "make-model failed"; exit 1; }
"$nosa" serve --port 0 --workers-port 0 --ports-file "$tmp/ports.json" --max-body-mib 0.01 \
  >"$tmp/serve.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [ -f "$tmp/ports.json" ] && break; sleep 0.1; done
http_port=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['http_port'])" "$tmp/ports.json")
workers_port=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['workers_port'])" "$tmp/ports.json")
url="http://127.0.0.1:$http_port"

passed=0
failed=0
# expect NAME WANT_STATUS PYTHON_CONDITION_ON_j (the JSON body): checks the last response.
expect() {
  local name=$1 want=$2 cond=${3:-True}
  if [ "$code" = "$want" ] && python3 - "$tmp/body" "$cond" <<'EOF'
import json, sys
j = json.load(open(sys.argv[1]))
sys.exit(0 if eval(sys.argv[2]) else 1)
EOF
  then
    passed=$((passed + 1)); echo "ok     $name"
  else
    failed=$((failed + 1)); echo "FAILED $name: status $code (want $want), body: $(head -c 400 "$tmp/body")"
  fi
}
# An OpenAI error body: {"error": {"message": str, "type": str, "param", "code"}}.
err='isinstance(j["error"]["message"], str) and j["error"]["message"] and j["error"]["type"] and "param" in j["error"] and "code" in j["error"]'
post() {  # post PATH BODY
  code=$(curl -s -o "$tmp/body" -w '%{http_code}' -H 'Content-Type: application/json' \
    --data-binary "$2" "$url$1")
}
get() { code=$(curl -s -o "$tmp/body" -w '%{http_code}' "$url$1"); }

get /health
expect "health is 503 before any replica registers" 503 'j["replicas"] == 0'
post /v1/completions '{"model":"tiny","prompt":"hi"}'
expect "a request with no replica is 503" 503 "$err and j['error']['code'] == 'no_replica'"

"$nosa" worker --model "$tmp/tiny" --device cpu --threads 1 --kv-blocks 2048 --max-context 2048 \
  --served-model-name tiny --coordinator "127.0.0.1:$workers_port" >"$tmp/worker.log" 2>&1 &
pids+=($!)
for _ in $(seq 200); do
  [ "$(curl -s -o /dev/null -w '%{http_code}' "$url/health")" = 200 ] && break
  sleep 0.1
done

get /health
expect "health is 200 with a replica" 200 'j["status"] == "ok" and j["replicas"] == 1'
get /v1/models
expect "models lists the served model" 200 'j["object"] == "list" and [m["id"] for m in j["data"]] == ["tiny"]'

post /v1/completions '{"model":"tiny","prompt":"The lighthouse","max_tokens":5}'
expect "a completion" 200 'j["object"] == "text_completion" and j["choices"][0]["finish_reason"] in ("stop","length") and 1 <= j["usage"]["completion_tokens"] <= 5 and j["id"].startswith("cmpl-")'
post /v1/completions '{"prompt":[1,5,6,7],"max_tokens":3,"ignore_eos":true}'
expect "token-id prompt, model omitted" 200 'j["usage"] == {"prompt_tokens":4,"completion_tokens":3,"total_tokens":7}'
post /v1/chat/completions '{"model":"tiny","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":[{"type":"text","text":"Hi"}]}],"max_tokens":4}'
expect "a chat completion" 200 'j["object"] == "chat.completion" and j["choices"][0]["message"]["role"] == "assistant"'

# Bad input.
post /v1/completions '{"model":"tiny","prompt":"hi",'
expect "malformed JSON is 400" 400 "$err and j['error']['type'] == 'invalid_request_error'"
post /v1/completions '["not","an","object"]'
expect "a body that is not an object is 400" 400 "$err"
post /v1/completions '{"model":"tiny","prompt":"hi","max_tokens":"ten"}'
expect "max_tokens of the wrong type is 400" 400 "$err and j['error']['param'] == 'max_tokens'"
post /v1/completions '{"model":"tiny","prompt":"hi","max_tokens":2.5}'
expect "a fractional max_tokens is 400" 400 "$err and j['error']['param'] == 'max_tokens'"
post /v1/completions '{"model":"tiny","prompt":"hi","temperature":"hot"}'
expect "temperature of the wrong type is 400" 400 "$err and j['error']['param'] == 'temperature'"
post /v1/completions '{"model":"tiny","prompt":{"text":"hi"}}'
expect "a prompt of the wrong type is 400" 400 "$err and j['error']['param'] == 'prompt'"
post /v1/completions '{"model":"tiny","prompt":"hi","max_token":5}'
expect "an unknown field is 400" 400 "$err and 'max_token' in j['error']['message']"
post /v1/completions '{"model":"tiny","prompt":"hi","n":3}'
expect "n > 1 is 400" 400 "$err and j['error']['param'] == 'n'"
post /v1/completions '{"model":"tiny","prompt":"hi","presence_penalty":0.5}'
expect "an unsupported penalty is 400" 400 "$err and j['error']['param'] == 'presence_penalty'"
post /v1/completions '{"model":"tiny"}'
expect "a missing prompt is 400" 400 "$err and j['error']['param'] == 'prompt'"
post /v1/completions '{"model":"tiny","prompt":"hi","max_tokens":-5}'
expect "negative max_tokens is 400" 400 "$err and j['error']['param'] == 'max_tokens'"
post /v1/completions '{"model":"tiny","prompt":"hi","max_tokens":0}'
expect "zero max_tokens is 400" 400 "$err"
post /v1/completions '{"model":"tiny","prompt":"hi","max_tokens":1000000000000}'
expect "huge max_tokens is 400" 400 "$err and 'context' in j['error']['message']"
post /v1/completions '{"model":"tiny","prompt":"hi","temperature":5}'
expect "an out-of-range temperature is 400" 400 "$err and j['error']['param'] == 'temperature'"
post /v1/completions '{"model":"tiny","prompt":[1,2,99999]}'
expect "a token id outside the vocabulary is 400" 400 "$err and 'vocabulary' in j['error']['message']"
long=$(python3 -c "print(','.join(['7']*2100))")
post /v1/completions "{\"model\":\"tiny\",\"prompt\":[$long],\"max_tokens\":4}"
expect "a prompt over the context limit is 400" 400 "$err and 'maximum context length' in j['error']['message']"
post /v1/completions "{\"model\":\"tiny\",\"prompt\":[$long],\"max_tokens\":4,\"stream\":true}"
expect "a streamed prompt over the context limit is a plain 400" 400 "$err"
post /v1/completions '{"model":"tiny","prompt":[1,2,3],"max_tokens":2047}'
expect "prompt plus max_tokens over the context is 400" 400 "$err and 'maximum context length' in j['error']['message']"
big=$(python3 -c "print('x' * 20000)")
post /v1/completions "{\"model\":\"tiny\",\"prompt\":\"$big\"}"
expect "a body over the size limit is 413" 413 "$err"
post /v1/completions '{"model":"gpt-9","prompt":"hi"}'
expect "an unknown model is 404" 404 "$err and j['error']['code'] == 'model_not_found'"
post /v1/chat/completions '{"model":"tiny","messages":[]}'
expect "empty messages are 400" 400 "$err and j['error']['param'] == 'messages'"
post /v1/chat/completions '{"model":"tiny","messages":[{"role":"wizard","content":"hi"}]}'
expect "an unknown role is 400" 400 "$err"
post /v1/chat/completions '{"model":"tiny","messages":[{"role":"user","content":"hi"}],"tools":[{"type":"function"}]}'
expect "tools are 400" 400 "$err and j['error']['param'] == 'tools'"
get /v1/nothing
expect "an unknown path is 404" 404 "$err"
get /v1/completions
expect "the wrong method is 405" 405 "$err"
code=$(curl -s -o "$tmp/body" -w '%{http_code}' -X POST --data-binary 'x' "$url/health")
expect "POST on /health is 405" 405 "$err"

# Malformed HTTP.
exec 3<>"/dev/tcp/127.0.0.1/$http_port"
printf 'THIS IS NOT HTTP\r\n\r\n' >&3
reply=$(timeout 5 head -c 200 <&3 | head -1)
exec 3>&-
case "$reply" in
  "HTTP/1.1 400"*) passed=$((passed + 1)); echo "ok     malformed HTTP is 400" ;;
  *) failed=$((failed + 1)); echo "FAILED malformed HTTP is 400: got '$reply'" ;;
esac

# Streaming.
curl -sN -H 'Content-Type: application/json' "$url/v1/completions" \
  -d '{"model":"tiny","prompt":"Stream","max_tokens":6,"stream":true,"ignore_eos":true}' >"$tmp/sse"
if python3 - "$tmp/sse" <<'EOF'
import json, sys
lines = [l for l in open(sys.argv[1]).read().split("\n") if l]
assert all(l.startswith("data: ") for l in lines), lines
assert lines[-1] == "data: [DONE]", lines[-1]
chunks = [json.loads(l[6:]) for l in lines[:-1]]
assert all(c["object"] == "text_completion" for c in chunks)
assert chunks[-1]["choices"][0]["finish_reason"] == "length"
assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
EOF
then passed=$((passed + 1)); echo "ok     a completion streams as server-sent events"
else failed=$((failed + 1)); echo "FAILED a completion streams as server-sent events: $(head -c 600 "$tmp/sse")"
fi

# A client that disconnects cancels its request on the replica.
# A stream read until its second chunk, then closed; a plain request given up after 0.5 s. Each
# asks for 2000 tokens, seconds of work for the tiny model.
curl -sN -H 'Content-Type: application/json' "$url/v1/completions" \
  -d '{"model":"tiny","prompt":"Go on and on","max_tokens":2000,"stream":true,"ignore_eos":true}' |
  head -c 300 >/dev/null
curl -s -m 0.5 -H 'Content-Type: application/json' "$url/v1/completions" \
  -d '{"model":"tiny","prompt":[1,2,3],"max_tokens":2000,"ignore_eos":true}' >/dev/null
cancelled=0
for _ in $(seq 50); do
  curl -s "$url/metrics" >"$tmp/metrics"
  if grep -q '^nosa_requests_total{endpoint="completions",outcome="cancelled"} 2$' "$tmp/metrics" &&
     grep -q '^nosa_requests_in_flight 0$' "$tmp/metrics"; then
    cancelled=1; break
  fi
  sleep 0.1
done
if [ $cancelled = 1 ]; then passed=$((passed + 1)); echo "ok     disconnected clients cancel their requests"
else failed=$((failed + 1)); echo "FAILED disconnected clients cancel their requests: $(grep -E 'requests_total|in_flight' "$tmp/metrics")"
fi

# Bytes that are not the RPC protocol on the workers port: the connection is refused, the
# coordinator stays up and keeps its replica.
curl -s -m 2 "http://127.0.0.1:$workers_port/" >/dev/null 2>&1
get /health
expect "HTTP on the workers port harms nothing" 200 'j["replicas"] == 1'
if grep -q "bad frame" "$tmp/serve.log" || grep -q "refusing worker connection" "$tmp/serve.log"; then
  passed=$((passed + 1)); echo "ok     the coordinator names the bad frame"
else
  failed=$((failed + 1)); echo "FAILED the coordinator names the bad frame"
fi

# Metrics in Prometheus' text format.
get /metrics
for family in nosa_requests_total nosa_prompt_tokens_total nosa_generation_tokens_total \
  nosa_queue_depth nosa_running_batch_size nosa_kv_blocks nosa_kv_cache_hits_total \
  nosa_kv_cache_misses_total nosa_step_duration_seconds_bucket \
  nosa_time_to_first_token_seconds_bucket nosa_replicas; do
  if grep -q "^$family" "$tmp/body"; then passed=$((passed + 1))
  else failed=$((failed + 1)); echo "FAILED /metrics has $family"
  fi
done
echo "ok     /metrics families checked"

if [ $failed -gt 0 ]; then
  echo "--- serve.log ---"; tail -30 "$tmp/serve.log"
  echo "--- worker.log ---"; tail -30 "$tmp/worker.log"
fi
echo "curl: $passed passed, $failed failed"
[ $failed -eq 0 ]
