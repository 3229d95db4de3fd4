"""The service through the official `openai` Python client, unchanged: completions (text and
token-id prompts, logprobs, stop), chat completions, streaming of both, the model list, and
errors raised as the client's typed exceptions. Skips (exit 77) when the package is missing:
install it with `python3 -m pip install openai` (scripts/setup.sh --test does)."""
import sys
import traceback

from service import SKIP, Service, log, nosa_from_argv

try:
    import openai
except ImportError:
    print("SKIPPED: the openai Python package is not installed "
          "(python3 -m pip install openai); the openai-client tests did not run")
    sys.exit(SKIP)


def main():
    nosa = nosa_from_argv()
    passed, failed = 0, 0
    with Service(nosa, workers=1, serve_args=["--api-key", "sk-test"]) as svc:
        client = openai.OpenAI(base_url=svc.url + "/v1", api_key="sk-test", max_retries=0,
                               timeout=60)

        def completion_text_prompt():
            r = client.completions.create(model="tiny", prompt="The lighthouse keeper",
                                          max_tokens=6, temperature=0)
            assert r.object == "text_completion" and r.model == "tiny"
            assert len(r.choices) == 1 and isinstance(r.choices[0].text, str)
            assert r.choices[0].finish_reason in ("stop", "length")
            assert r.usage.prompt_tokens > 0 and 1 <= r.usage.completion_tokens <= 6
            assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
            # Greedy is deterministic.
            again = client.completions.create(model="tiny", prompt="The lighthouse keeper",
                                              max_tokens=6, temperature=0)
            assert again.choices[0].text == r.choices[0].text

        def completion_token_ids_and_logprobs():
            r = client.completions.create(model="tiny", prompt=[1, 100, 200, 300], max_tokens=4,
                                          logprobs=3, extra_body={"ignore_eos": True})
            lp = r.choices[0].logprobs
            assert r.usage.prompt_tokens == 4 and r.usage.completion_tokens == 4
            assert len(lp.tokens) == 4 and len(lp.token_logprobs) == 4
            assert all(x <= 0 for x in lp.token_logprobs)
            assert all(len(t) == 3 for t in lp.top_logprobs)

        def completion_seeded_sampling():
            kw = dict(model="tiny", prompt="Once", max_tokens=8, temperature=0.9, top_p=0.9,
                      seed=42, extra_body={"top_k": 50, "ignore_eos": True})
            a = client.completions.create(**kw).choices[0].text
            b = client.completions.create(**kw).choices[0].text
            assert a == b, (a, b)

        def completion_stop_string():
            base = client.completions.create(model="tiny", prompt="Once upon", max_tokens=12,
                                             extra_body={"ignore_eos": True}).choices[0].text
            if len(base) < 4:
                return
            stop = base[2:4]
            r = client.completions.create(model="tiny", prompt="Once upon", max_tokens=12,
                                          stop=[stop], extra_body={"ignore_eos": True})
            assert r.choices[0].finish_reason == "stop"
            assert r.choices[0].text == base[:base.find(stop)], (r.choices[0].text, base, stop)

        def completion_stream():
            full = client.completions.create(model="tiny", prompt="Stream me", max_tokens=10,
                                             extra_body={"ignore_eos": True}).choices[0].text
            chunks = list(client.completions.create(model="tiny", prompt="Stream me",
                                                    max_tokens=10, stream=True,
                                                    extra_body={"ignore_eos": True}))
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            assert text == full, (text, full)
            assert chunks[-1].choices[0].finish_reason == "length"

        def chat_completion():
            r = client.chat.completions.create(
                model="tiny", max_tokens=5,
                messages=[{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "Hello there"}])
            assert r.object == "chat.completion"
            assert r.choices[0].message.role == "assistant"
            assert isinstance(r.choices[0].message.content, str)
            assert r.usage.completion_tokens <= 5

        def chat_stream_with_usage_and_logprobs():
            stream = client.chat.completions.create(
                model="tiny", max_tokens=6, stream=True, logprobs=True, top_logprobs=2,
                stream_options={"include_usage": True},
                messages=[{"role": "user", "content": "Count to three"}])
            chunks = list(stream)
            assert chunks[0].choices[0].delta.role == "assistant"
            finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
            assert len(finish) == 1
            assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
            with_lp = [c for c in chunks if c.choices and c.choices[0].logprobs]
            assert with_lp and all(len(t.top_logprobs) == 2
                                   for c in with_lp for t in c.choices[0].logprobs.content)

        def models_list():
            ids = [m.id for m in client.models.list()]
            assert ids == ["tiny"], ids

        def errors_are_typed():
            try:
                client.completions.create(model="nope", prompt="x", max_tokens=2)
                raise AssertionError("unknown model accepted")
            except openai.NotFoundError as e:
                assert e.status_code == 404 and e.code == "model_not_found"
            try:
                client.completions.create(model="tiny", prompt="x", max_tokens=-3)
                raise AssertionError("negative max_tokens accepted")
            except openai.BadRequestError as e:
                assert e.status_code == 400 and e.param == "max_tokens"
            try:
                client.completions.create(model="tiny", prompt="x", max_tokens=10**9)
                raise AssertionError("huge max_tokens accepted")
            except openai.BadRequestError as e:
                assert "context" in str(e)
            try:
                client.chat.completions.create(model="tiny", max_tokens=2, n=2,
                                               messages=[{"role": "user", "content": "x"}])
                raise AssertionError("n = 2 accepted")
            except openai.BadRequestError as e:
                assert e.param == "n"
            bad = openai.OpenAI(base_url=svc.url + "/v1", api_key="wrong", max_retries=0)
            try:
                bad.models.list()
                raise AssertionError("wrong API key accepted")
            except openai.AuthenticationError as e:
                assert e.status_code == 401

        tests = [completion_text_prompt, completion_token_ids_and_logprobs,
                 completion_seeded_sampling, completion_stop_string, completion_stream,
                 chat_completion, chat_stream_with_usage_and_logprobs, models_list,
                 errors_are_typed]
        for t in tests:
            try:
                t()
                passed += 1
                log(f"ok     {t.__name__}")
            except Exception:
                failed += 1
                log(f"FAILED {t.__name__}\n{traceback.format_exc()}")
        if failed:
            log("--- serve.log ---\n" + svc.logs("serve"))
    log(f"openai client {openai.__version__}: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
