"""monojax.autointerp.llm against a local fake of the Anthropic and OpenAI wire formats (no network):
tests/autointerp/fake_llm_server.py, imported as a top-level module (pytest puts this folder on sys.path)."""
import logging
import os
import signal
import threading
import time

import pytest
from fake_llm_server import Error, FakeLLMServer, Sleep, Text

from monojax import errors
from monojax.autointerp import llm
from monojax.autointerp.llm import LLMClient, Request

KEY = "sk-test-SECRET-do-not-leak-123"
ENV = {"ANTHROPIC_API_KEY": KEY, "OPENAI_API_KEY": KEY}
BACKENDS = ["anthropic", "openai"]


@pytest.fixture
def fake():
  with FakeLLMServer(responder=lambda body: "echo: " + body["messages"][-1]["content"], expected_key=KEY) as f:
    yield f


def url(fake, backend):
  return fake.anthropic_url if backend == "anthropic" else fake.openai_url


def client(fake, backend, logs=None, **kw):
  kw = {"cache_path": None, "concurrency": 1, "max_retries": 3, "timeout_s": 5.0, "backoff_s": 0.001,
        "env": ENV, "log": (logs.append if logs is not None else lambda *a: None), "progress": False, **kw}
  return LLMClient(backend, "test-model", base_url=url(fake, backend), **kw)


def req(text, system="You explain features.", max_tokens=32, purpose="explain"):
  return Request(system=system, messages=({"role": "user", "content": text},), max_tokens=max_tokens, purpose=purpose)


def api_requests(fake):
  return [r for r in fake.requests if r.path.endswith(("/messages", "/completions"))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_plain_reply_and_wire_format(fake, backend):
  fake.script(Text("a feature about French", input_tokens=11, output_tokens=4))
  c = client(fake, backend)
  r = Request(system="SYS", messages=({"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                                      {"role": "user", "content": "explain"}), max_tokens=40, temperature=0.5)
  [reply] = c.complete_many([r])
  assert reply.text == "a feature about French" and reply.error is None and not reply.cached
  assert (reply.input_tokens, reply.output_tokens) == (11, 4)
  [rec] = fake.requests
  body = rec.body
  assert body["model"] == "test-model" and body["max_tokens"] == 40 and body["temperature"] == 0.5
  if backend == "anthropic":
    assert rec.path == "/v1/messages"
    assert rec.headers["anthropic-version"]
    # anthropic < 2 sends the key as x-api-key, later releases as a Bearer token
    assert rec.headers.get("x-api-key", rec.headers.get("authorization", "").removeprefix("Bearer ")) == KEY
    assert body["system"] == "SYS"
    assert body["messages"] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                                {"role": "user", "content": "explain"}]
  else:
    assert rec.path == "/v1/chat/completions"
    assert rec.headers["authorization"] == f"Bearer {KEY}"
    assert "system" not in body
    assert body["messages"] == [{"role": "system", "content": "SYS"}, {"role": "user", "content": "hi"},
                                {"role": "assistant", "content": "yo"}, {"role": "user", "content": "explain"}]
  s = c.summary()
  assert s["requests"] == 1 and s["retries"] == 0 and s["failures"] == 0 and s["cost_known"] and s["cost_usd"] == 0
  c.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_order_preserved_under_concurrency(fake, backend):
  # Early requests sleep longest, so they finish last.
  fake.responder = lambda body: Sleep(0.01 * (20 - int(body["messages"][-1]["content"])),
                                      then="r" + body["messages"][-1]["content"])
  c = client(fake, backend, concurrency=4)
  replies = c.complete_many([req(str(i)) for i in range(20)])
  assert [r.text for r in replies] == [f"r{i}" for i in range(20)]
  assert len(fake.requests) == 20


@pytest.mark.parametrize("backend", BACKENDS)
def test_429_then_success(fake, backend):
  logs = []
  fake.script(Error(429, "slow down", retry_after="0"))
  c = client(fake, backend, logs)
  [reply] = c.complete_many([req("x")])
  assert reply.text == "echo: x"
  assert c.summary()["retries"] == 1 and len(fake.requests) == 2
  assert any("429" in line for line in logs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_500_twice_then_success(fake, backend):
  fake.script(Error(500), Error(529 if backend == "anthropic" else 503))
  c = client(fake, backend)
  [reply] = c.complete_many([req("x")])
  assert reply.text == "echo: x" and c.summary()["retries"] == 2 and c.summary()["failures"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_500_always_fails_after_max_retries_others_unaffected(fake, backend):
  fake.responder = lambda body: Error(500, "boom") if "BAD" in body["messages"][-1]["content"] else "fine"
  c = client(fake, backend, max_retries=2, concurrency=3)
  replies = c.complete_many([req("a"), req("BAD"), req("c")])
  assert [r.text for r in replies] == ["fine", None, "fine"]
  assert replies[1].error == "HTTP 500: boom (after 2 retries)"
  bad = [r for r in fake.requests if r.body["messages"][-1]["content"] == "BAD"]
  assert len(bad) == 3
  s = c.summary()
  assert s["retries"] == 2 and s["failures"] == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_timeout_then_success(fake, backend):
  fake.script(Sleep(1.5, then="too late"))
  c = client(fake, backend, timeout_s=0.3)
  [reply] = c.complete_many([req("x")])
  assert reply.text == "echo: x" and c.summary()["retries"] == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_timeout_always(fake, backend):
  fake.responder = lambda body: Sleep(1.5)
  c = client(fake, backend, timeout_s=0.2, max_retries=1)
  [reply] = c.complete_many([req("x")])
  assert reply.text is None and reply.error == "timed out after 1 retries"


@pytest.mark.parametrize("backend", BACKENDS)
def test_400_fails_without_retry(fake, backend):
  fake.script(Error(400, "max_tokens: too large"))
  c = client(fake, backend)
  replies = c.complete_many([req("x"), req("y")])
  assert replies[0].text is None and replies[0].error == "HTTP 400: max_tokens: too large"
  assert replies[1].text == "echo: y"
  assert len(fake.requests) == 2 and c.summary()["retries"] == 0 and c.summary()["failures"] == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_unsupported_temperature_is_dropped(fake, backend):
  # newer models take only the default temperature: the first 400 that says so switches it off for the client
  fake.script(Error(400, "temperature: is deprecated for this model. Use only the default value."))
  c = client(fake, backend, max_retries=0)
  replies = c.complete_many([req("x"), req("y")])
  assert [r.text for r in replies] == ["echo: x", "echo: y"]
  assert ["temperature" in r.body for r in fake.requests] == [True, False, False]
  assert c.summary()["failures"] == 0


def test_openai_max_completion_tokens(fake):
  fake.script(Error(400, "Unsupported parameter: 'max_tokens' is not supported with this model. "
                    "Use 'max_completion_tokens' instead."))
  c = client(fake, "openai", max_retries=0)
  assert c.complete_many([req("x", max_tokens=50)])[0].text == "echo: x"
  assert [("max_tokens" in r.body, r.body.get("max_completion_tokens")) for r in fake.requests] == [(True, None),
                                                                                                    (False, 50)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_401_raises_user_input_error_once(fake, backend, capsys):
  logs = []
  env = {"ANTHROPIC_API_KEY": KEY + "-wrong", "OPENAI_API_KEY": KEY + "-wrong"}
  c = client(fake, backend, logs, env=env, concurrency=2)
  with pytest.raises(errors.UserInputError) as e:
    c.complete_many([req(str(i)) for i in range(10)])
  var = "ANTHROPIC_API_KEY" if backend == "anthropic" else "OPENAI_API_KEY"
  msg = str(e.value)
  assert f"the API rejected the key in {var} (HTTP 401)" in msg and "\n" not in msg
  assert KEY not in msg and "wrong" not in msg  # the server echoed the key: scrubbed
  assert len(fake.requests) <= 2  # the others were not sent
  with pytest.raises(errors.UserInputError):
    c.complete_many([req("again")])
  assert len(fake.requests) <= 2
  out = capsys.readouterr()
  assert KEY not in out.out + out.err + "".join(logs) + repr(c) + str(c.summary())


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_and_cost_accounting(fake, backend):
  fake.script(Text("a", input_tokens=1000, output_tokens=100), Text("b", input_tokens=2000, output_tokens=50),
              Text("c", input_tokens=300, output_tokens=7))
  c = client(fake, backend, price_in=3.0, price_out=15.0)
  replies = c.complete_many([req("1"), req("2", purpose="simulate"), req("3", purpose="simulate")])
  assert replies[0].cost_usd == pytest.approx((1000 * 3 + 100 * 15) / 1e6)
  s = c.summary()
  assert (s["input_tokens"], s["output_tokens"]) == (3300, 157)
  assert s["cost_usd"] == pytest.approx((3300 * 3 + 157 * 15) / 1e6) and s["cost_known"]
  assert s["by_purpose"]["explain"] == {"requests": 1, "input_tokens": 1000, "output_tokens": 100,
                                        "cost_usd": pytest.approx(0.0045)}
  assert s["by_purpose"]["simulate"]["input_tokens"] == 2300 and s["by_purpose"]["simulate"]["requests"] == 2
  line = c.summary_line()
  assert line.startswith(f"autointerp: {backend} test-model: 3 requests (0 from the cache), 3.3k tokens in, 157 out, "
                         "$0.01, 0 retries, 0 failures"), line


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_usage_is_estimated(fake, backend):
  fake.script(Text("abcdefgh", usage=False))
  c = client(fake, backend, price_in=1.0, price_out=1.0)
  [reply] = c.complete_many([req("x" * 40, system="")])
  assert reply.text == "abcdefgh" and reply.input_tokens == 11 and reply.output_tokens == 3
  assert c.summary()["usage_estimated"] == 1 and "estimated" in c.summary_line()


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_cost_stops_before_exceeding(fake, backend):
  fake.responder = lambda body: Text("ok", input_tokens=20, output_tokens=100)
  # At $10 / $10 per M, a reply costs 120 tokens = $0.0012, and its worst case (system 21 bytes → 20, "qN" → 11,
  # max_tokens 100) 131 tokens = $0.00131: 7 fit in $0.009 (7 × 0.0012 + 0.00131 > 0.009 stops the 8th).
  c = client(fake, backend, price_in=10.0, price_out=10.0, max_cost=0.009, concurrency=3)
  replies = c.complete_many([req(f"q{i}", max_tokens=100) for i in range(10)])
  s = c.summary()
  ok = [r for r in replies if r.text is not None]
  refused = [r for r in replies if r.text is None]
  assert len(ok) == 7 and len(refused) == 3 and all(r.error == "max-cost reached" for r in refused)
  assert s["cost_usd"] == pytest.approx(7 * 0.0012) and s["cost_usd"] <= 0.009
  assert s["stopped_by_max_cost"] and "stopped at --max_cost" in c.summary_line() and "(max $0.01)" in c.summary_line()
  assert len(fake.requests) == 7
  # stopped: nothing more is sent, but the cache (none here) would still serve
  assert c.complete_many([req("late")])[0].error == "max-cost reached" and len(fake.requests) == 7


@pytest.mark.parametrize("backend", BACKENDS)
def test_cache_second_run_is_free(fake, backend, tmp_path):
  path = tmp_path / "cache" / "llm.sqlite"
  reqs = [req(f"q{i}") for i in range(6)] + [req("q0")]  # a duplicate: sent once
  c = client(fake, backend, cache_path=str(path), price_in=1.0, price_out=2.0, concurrency=3)
  first = c.complete_many(reqs)
  assert len(fake.requests) == 6 and first[6].text == first[0].text and first[6].cached
  cost = c.summary()["cost_usd"]
  assert cost > 0
  c.close()
  n = len(fake.requests)
  c2 = client(fake, backend, cache_path=str(path), price_in=1.0, price_out=2.0)
  second = c2.complete_many(reqs)
  assert len(fake.requests) == n
  assert [r.text for r in second] == [r.text for r in first] and all(r.cached for r in second)
  assert [(r.input_tokens, r.output_tokens) for r in second] == [(r.input_tokens, r.output_tokens) for r in first]
  s = c2.summary()
  assert s["cost_usd"] == 0 and s["cache_hits"] == 7 and s["requests"] == 7
  # purpose is not part of the key; the system prompt, model and max_tokens are
  c2.complete_many([req("q1", purpose="other")])
  assert len(fake.requests) == n
  c2.complete_many([req("q1", max_tokens=33), req("q1", system="other")])
  assert len(fake.requests) == n + 2
  c2.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_sends_only_the_unfinished(fake, backend, tmp_path):
  path = str(tmp_path / "llm.sqlite")
  reqs = [req(f"q{i}") for i in range(10)]
  fake.responder = lambda body: Error(500) if int(body["messages"][-1]["content"][1:]) >= 5 else "done"
  c = client(fake, backend, cache_path=path, max_retries=0, concurrency=4)
  replies = c.complete_many(reqs)
  assert sum(r.text is None for r in replies) == 5 and c.summary()["failures"] == 5
  c.close()
  fake.requests.clear()
  fake.responder = lambda body: "done"
  c2 = client(fake, backend, cache_path=path, max_retries=0, concurrency=4)
  replies = c2.complete_many(reqs)
  assert all(r.text == "done" for r in replies)
  assert sorted(r.body["messages"][-1]["content"] for r in fake.requests) == [f"q{i}" for i in range(5, 10)]
  assert c2.summary()["cache_hits"] == 5
  c2.close()


def test_ctrl_c_keeps_what_finished(fake, tmp_path):
  """A Ctrl-C mid-run: what finished is in the cache, and the next run sends only the rest."""
  path = str(tmp_path / "llm.sqlite")
  reqs = [req(f"q{i}") for i in range(6)]
  fake.responder = lambda body: "fast" if body["messages"][-1]["content"] in ("q0", "q1") else Sleep(0.6)
  c = client(fake, "openai", cache_path=path, concurrency=2)
  timer = threading.Timer(0.3, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
  timer.start()
  t0 = time.monotonic()
  with pytest.raises(KeyboardInterrupt):
    c.complete_many(reqs)
  assert time.monotonic() - t0 < 0.55  # did not wait for the requests in flight
  sent_first = {r.body["messages"][-1]["content"] for r in fake.requests}
  assert sent_first == {"q0", "q1", "q2", "q3"}  # q4, q5 never sent
  fake.responder = lambda body: "fast"
  c2 = client(fake, "openai", cache_path=path, concurrency=2)
  assert all(r.text for r in c2.complete_many(reqs))
  resent = [r.body["messages"][-1]["content"] for r in fake.requests[4:]]
  assert "q0" not in resent and "q1" not in resent and {"q4", "q5"} <= set(resent)


@pytest.mark.parametrize("backend", BACKENDS)
def test_key_never_leaks(fake, backend, tmp_path, capsys, caplog):
  caplog.set_level(logging.DEBUG)
  logs = []
  path = tmp_path / "llm.sqlite"
  fake.responder = lambda body: (Error(400, f"bad request from {KEY}") if "bad" in body["messages"][-1]["content"]
                                 else Error(503, f"overloaded {KEY}") if "flaky" in body["messages"][-1]["content"]
                                 else f"the key is {KEY}")
  c = client(fake, backend, logs, cache_path=str(path), max_retries=1, progress=True)
  replies = c.complete_many([req("good"), req("bad"), req("flaky")], label="leak test")
  assert replies[0].text is not None and replies[1].error and replies[2].error
  texts = [str(r) for r in replies] + logs + [c.summary_line(), str(c.summary()), repr(c)]
  c.close()
  out = capsys.readouterr()
  texts += [out.out, out.err, caplog.text]
  for t in texts:
    assert KEY not in t
  assert any("HTTP 503" in line for line in logs)
  for f in tmp_path.iterdir():
    assert KEY.encode() not in f.read_bytes(), f


def test_missing_key(fake):
  for backend, var in (("anthropic", "ANTHROPIC_API_KEY"), ("openai", "OPENAI_API_KEY")):
    with pytest.raises(errors.MissingInputError, match=var):
      LLMClient(backend, "claude-haiku-4-5", cache_path=None, env={})
    # a loopback anthropic URL still needs one
  with pytest.raises(errors.MissingInputError, match="ANTHROPIC_API_KEY"):
    LLMClient("anthropic", "m", base_url=fake.anthropic_url, cache_path=None, env={"OPENAI_API_KEY": KEY})


def test_local_openai_server_without_key():
  with FakeLLMServer(responder=lambda body: "local") as f:
    c = LLMClient("openai", "llama-3-8b", base_url=f.openai_url, cache_path=None, env={}, progress=False,
                  max_cost=1.0)
    [reply] = c.complete_many([req("x")])
    assert reply.text == "local" and f.requests[0].headers["authorization"] == "Bearer not-needed"
    s = c.summary()
    assert s["cost_known"] and s["price_in"] == 0 and s["cost_usd"] == 0


def test_prices():
  assert llm.price_for("claude-haiku-4-5-20251001") == (1.0, 5.0)
  assert llm.price_for("claude-opus-4-1-20250805") == (15.0, 75.0)
  assert llm.price_for("gpt-4o-mini-2024-07-18") == (0.15, 0.6)
  assert llm.price_for("gpt-4o") == (2.5, 10.0)
  assert llm.price_for("gpt-4.1-nano") == (0.1, 0.4)
  assert llm.price_for("gpt-4o1") is None and llm.price_for("my-model") is None
  assert llm.is_local_url("http://127.0.0.1:8000/v1") and llm.is_local_url("http://localhost:1/v1")
  assert llm.is_local_url("http://192.168.1.5/v1") and not llm.is_local_url("https://api.openai.com/v1")
  c = LLMClient("openai", "my-model", cache_path=None, env=ENV, progress=False)
  s = c.summary()
  assert not s["cost_known"] and s["price_in"] is None and "cost unknown" in c.summary_line()
  c = LLMClient("anthropic", "claude-sonnet-4-5", cache_path=None, env=ENV, progress=False, price_out=20.0)
  assert (c.price_in, c.price_out) == (3.0, 20.0)


def test_unknown_model_with_max_cost():
  with pytest.raises(errors.UserInputError, match="--price_in"):
    LLMClient("openai", "my-model", cache_path=None, env=ENV, max_cost=5.0)
  LLMClient("openai", "my-model", cache_path=None, env=ENV, max_cost=5.0, price_in=1.0, price_out=2.0)


def test_unknown_backend():
  with pytest.raises(errors.UserInputError, match="--backend"):
    LLMClient("gemini", "x", cache_path=None, env=ENV)


def test_bad_request_shape(fake):
  c = client(fake, "openai")
  with pytest.raises(ValueError):
    c.complete_many([Request(system="", messages=({"role": "assistant", "content": "x"},), max_tokens=5)])


def test_env_base_url_is_ignored(fake, monkeypatch):
  # the vendor clients read ANTHROPIC_BASE_URL / OPENAI_BASE_URL; we always pass base_url explicitly
  monkeypatch.setenv("ANTHROPIC_BASE_URL", "http://203.0.113.1:9")
  monkeypatch.setenv("OPENAI_BASE_URL", "http://203.0.113.1:9")
  for backend in BACKENDS:
    c = client(fake, backend, timeout_s=2.0)
    assert c.complete_many([req("x")])[0].text == "echo: x"
  assert os.environ["ANTHROPIC_BASE_URL"]
