"""The LLM backends of autointerp: Anthropic's Messages API or any OpenAI-compatible chat endpoint, through the
vendors' own clients, with our own retries, a worker pool, cost accounting with a hard `max_cost`, and an on-disk
cache (sqlite) that makes a re-run free and an interrupted run resumable.

  client = LLMClient("anthropic", "claude-haiku-4-5", cache_path=workdir / "autointerp" / "llm_cache.sqlite")
  replies = client.complete_many([Request(system=..., messages=({"role": "user", "content": ...},), max_tokens=64)])
  print(client.summary_line())

The key is read from the environment only (ANTHROPIC_API_KEY / OPENAI_API_KEY). It is never logged, never written
to the cache, and every error line that could carry it (a vendor's error body) is scrubbed of it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import json
import os
import random
import re
import sqlite3
import sys
import threading
import time
import urllib.parse
from concurrent import futures

from monojax import errors

BACKENDS = {"anthropic": ("ANTHROPIC_API_KEY", "https://api.anthropic.com"),
            "openai": ("OPENAI_API_KEY", "https://api.openai.com/v1")}
# USD per million tokens (input, output): the vendors' list prices for standard (non-batch, uncached) requests, from
# https://www.anthropic.com/pricing and https://openai.com/api/pricing as of November 2025. Prices change: --price_in
# and --price_out override them. A model matches the longest entry that is its name or a dash-prefix of it (dated
# snapshots such as claude-haiku-4-5-20251001 or gpt-4o-mini-2024-07-18).
PRICES = {
  "claude-haiku-4-5": (1.0, 5.0), "claude-sonnet-4-5": (3.0, 15.0), "claude-sonnet-4": (3.0, 15.0),
  "claude-opus-4-5": (5.0, 25.0), "claude-opus-4-1": (15.0, 75.0), "claude-opus-4": (15.0, 75.0),
  "claude-3-7-sonnet": (3.0, 15.0), "claude-3-5-sonnet": (3.0, 15.0), "claude-3-5-haiku": (0.8, 4.0),
  "claude-3-haiku": (0.25, 1.25),
  "gpt-4o-mini": (0.15, 0.6), "gpt-4o": (2.5, 10.0), "gpt-4.1-nano": (0.1, 0.4), "gpt-4.1-mini": (0.4, 1.6),
  "gpt-4.1": (2.0, 8.0),
}
RETRY_AFTER_CAP_S = 60.0
LOCAL_PLACEHOLDER_KEY = "not-needed"  # what a local OpenAI-compatible server (vLLM, llama.cpp, Ollama) is sent
RETRYABLE_STATUS = (408, 409, 429)  # and every 5xx (529: Anthropic overloaded)
_SK_PATTERN = re.compile(r"sk-[A-Za-z0-9_\-*.]{6,}")
_MAX_LOGGED = 5  # retry and failure notes logged per kind before they go quiet


@dataclasses.dataclass(frozen=True)
class Request:
  system: str
  messages: tuple  # of {"role": "user"|"assistant", "content": str} dicts, alternating, the last a "user" one
  max_tokens: int
  temperature: float = 0.0
  purpose: str = ""  # "explain", "simulate", ...: accounting only, not part of the cache key


@dataclasses.dataclass
class Reply:
  text: str | None  # None when the request failed
  input_tokens: int = 0
  output_tokens: int = 0
  cached: bool = False  # served from the on-disk cache (or a duplicate in the same batch): cost 0 this run
  cost_usd: float = 0.0
  error: str | None = None  # one line, why it failed; never contains the key


def price_for(model: str) -> tuple[float, float] | None:
  best = None
  for name, price in PRICES.items():
    if (model == name or model.startswith(name + "-")) and (best is None or len(name) > len(best[0])):
      best = (name, price)
  return best[1] if best else None


def is_local_url(url: str | None) -> bool:
  """A base_url on this machine or a private network: a local server (no key needed, no price)."""
  if not url:
    return False
  host = (urllib.parse.urlsplit(url).hostname or "").lower()
  if host == "localhost" or host.endswith(".localhost"):
    return True
  try:
    ip = ipaddress.ip_address(host)
  except ValueError:
    return False
  return ip.is_loopback or ip.is_private or ip.is_link_local


def cache_key(backend: str, model: str, req: Request) -> str:
  blob = json.dumps({"backend": backend, "model": model, "system": req.system,
                     "messages": [{"role": m["role"], "content": m["content"]} for m in req.messages],
                     "max_tokens": int(req.max_tokens), "temperature": float(req.temperature)},
                    sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(blob.encode("ascii")).hexdigest()


def _texts(req: Request) -> list[str]:
  return [req.system] + [m["content"] for m in req.messages]


def worst_input_tokens(req: Request) -> int:
  """A generous bound on a request's input tokens for the max_cost reservation: UTF-8 bytes / 2 plus 10 a message
  (English runs ~4 characters a token; code, numbers and non-Latin text fewer)."""
  return sum(len(t.encode("utf-8", "replace")) // 2 + 10 for t in _texts(req))


def _cut(s: str, n: int = 200) -> str:
  s = " ".join(str(s).split())
  return s if len(s) <= n else s[:n - 1] + "…"


def _error_detail(response) -> str:
  """The message of a vendor's error body ({"error": {"message": ...}} for both), else the body's text."""
  try:
    text = response.text
  except Exception:  # noqa: BLE001 (an unread or undecodable body)
    return ""
  try:
    err = json.loads(text)
    err = err.get("error", err) if isinstance(err, dict) else err
    return str(err.get("message", err) if isinstance(err, dict) else err)
  except ValueError:  # HTML from a proxy, plain text
    return text


def _human(n: float) -> str:
  if n < 1000:
    return f"{n:,.0f}"
  if n < 1e6:
    return f"{n / 1e3:.1f}k" if n < 1e4 else f"{n / 1e3:.0f}k"
  return f"{n / 1e6:.1f}M"


class _Cache:
  """Successful replies by cache_key: (text, input_tokens, output_tokens). One connection under a lock; each put
  commits, so what finished before a Ctrl-C is kept."""

  def __init__(self, path: str):
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    try:
      self._db = sqlite3.connect(path, check_same_thread=False, timeout=30)
      self._db.execute("PRAGMA journal_mode=WAL")
      self._db.execute("CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, text TEXT NOT NULL, "
                       "input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL, created REAL NOT NULL)")
      self._db.commit()
    except sqlite3.DatabaseError as e:
      raise errors.UserInputError(f"the LLM cache {path} cannot be opened: {e}") from None
    self._lock = threading.Lock()

  def get(self, key: str):
    with self._lock:
      return self._db.execute("SELECT text, input_tokens, output_tokens FROM replies WHERE key = ?", (key,)).fetchone()

  def put(self, key: str, text: str, input_tokens: int, output_tokens: int):
    with self._lock:
      self._db.execute("INSERT OR REPLACE INTO replies VALUES (?, ?, ?, ?, ?)",
                       (key, text, int(input_tokens), int(output_tokens), time.time()))
      self._db.commit()

  def close(self):
    with self._lock:
      self._db.close()


class _Refused(Exception):
  """The request was not sent (max cost, a rejected key, an interrupt); the message is the Reply's error."""


class LLMClient:
  """Completions of many Requests through one backend. Thread-safe accounting; see the module docstring."""

  def __init__(self, backend: str, model: str, *, base_url: str | None = None, cache_path: str | None,
               concurrency: int = 8, max_retries: int = 5, timeout_s: float = 120.0, backoff_s: float = 1.0,
               max_cost: float | None = None, price_in: float | None = None, price_out: float | None = None,
               env=os.environ, log=print, progress: bool = True):
    if backend not in BACKENDS:
      raise errors.UserInputError(f"--backend {backend!r} is not an LLM backend; use one of {', '.join(BACKENDS)}")
    self.backend, self.model = backend, model
    self.key_var, default_url = BACKENDS[backend]
    self.base_url = base_url or default_url
    self.local = is_local_url(self.base_url)
    key = env.get(self.key_var) or ""
    if not key:
      if backend == "openai" and self.local:
        key = LOCAL_PLACEHOLDER_KEY
      else:
        raise errors.MissingInputError(f"--backend {backend} needs an API key: set {self.key_var} in the environment")
    self._key = key
    self.concurrency, self.max_retries = max(1, int(concurrency)), max(0, int(max_retries))
    self.timeout_s, self.backoff_s = float(timeout_s), float(backoff_s)
    table = (0.0, 0.0) if self.local else price_for(model)
    self.price_in = price_in if price_in is not None else (table[0] if table else None)
    self.price_out = price_out if price_out is not None else (table[1] if table else None)
    self.cost_known = self.price_in is not None and self.price_out is not None
    self.max_cost = max_cost
    if max_cost is not None and not self.cost_known:
      raise errors.UserInputError(f"--max_cost needs the price of {model!r}, which monojax does not know: pass "
                                  "--price_in and --price_out (USD per million input / output tokens)")
    self.log, self.progress = log, progress
    self._lock = threading.Condition()
    self._stats = {"requests": 0, "cache_hits": 0, "sent": 0, "retries": 0, "failures": 0, "input_tokens": 0,
                   "output_tokens": 0, "cost_usd": 0.0, "usage_estimated": 0}
    self._by_purpose: dict[str, dict] = {}
    self._reserved, self._in_flight = 0.0, 0  # the worst cases of the requests in flight, and their number
    self._maybe_spent = 0.0  # worst cases of attempts that timed out (the API may have billed them)
    self._stopped_by_max_cost = False
    self._auth_error: str | None = None
    self._interrupted = False
    # Newer models refuse a temperature other than the default (Anthropic's after Opus 4.6; OpenAI's reasoning
    # models) and OpenAI's reasoning models refuse max_tokens: the first HTTP 400 that says so switches these off.
    self._send_temperature, self._openai_limit_arg = True, "max_tokens"
    self._logged = {"retry": 0, "failure": 0}
    self._cache = _Cache(str(cache_path)) if cache_path is not None else None
    if backend == "anthropic":
      import anthropic
      self._mod = anthropic
      self._client = anthropic.Anthropic(api_key=key, base_url=self.base_url, max_retries=0, timeout=self.timeout_s)
    else:
      import openai
      self._mod = openai
      self._client = openai.OpenAI(api_key=key, base_url=self.base_url, max_retries=0, timeout=self.timeout_s)

  def __repr__(self):
    return f"LLMClient({self.backend!r}, {self.model!r}, base_url={self._public_url()!r})"

  def _public_url(self) -> str:
    return self._scrub(re.sub(r"//[^/@]*@", "//", self.base_url))

  def _scrub(self, s: str) -> str:
    s = str(s)
    if self._key and self._key != LOCAL_PLACEHOLDER_KEY:
      s = s.replace(self._key, "***")
    return _SK_PATTERN.sub("sk-***", s)

  def _note(self, kind: str, msg: str):
    with self._lock:
      self._logged[kind] += 1
      n = self._logged[kind]
    if n <= _MAX_LOGGED:
      self.log(self._scrub(f"autointerp: {msg}" + (f" (further {kind} notes not shown)" if n == _MAX_LOGGED else "")))

  # --- the API calls

  def _call(self, req: Request) -> tuple[str, int, int, bool]:
    """One attempt: (text, input_tokens, output_tokens, usage_estimated). Raises the vendor's exceptions."""
    msgs = [{"role": m["role"], "content": m["content"]} for m in req.messages]
    temp = {"temperature": float(req.temperature)} if self._send_temperature else {}
    if self.backend == "anthropic":
      # anthropic>=1.0 dropped `temperature` from create()'s arguments (the API still takes it on the models that
      # support sampling options): send it in the body, which works with every release.
      kwargs = {"system": req.system} if req.system else {}
      resp = self._client.messages.create(model=self.model, messages=msgs, max_tokens=int(req.max_tokens),
                                          extra_body=temp or None, **kwargs)
      text = "".join(getattr(b, "text", "") or "" for b in (resp.content or []) if getattr(b, "type", "") == "text")
      usage = getattr(resp, "usage", None)
      tin, tout = getattr(usage, "input_tokens", None), getattr(usage, "output_tokens", None)
    else:
      if req.system:
        msgs.insert(0, {"role": "system", "content": req.system})
      limit = {self._openai_limit_arg: int(req.max_tokens)}
      resp = self._client.chat.completions.create(model=self.model, messages=msgs, **limit, **temp)
      if not resp.choices:
        raise ValueError("the reply has no choices")
      text = resp.choices[0].message.content or ""
      usage = getattr(resp, "usage", None)
      tin, tout = getattr(usage, "prompt_tokens", None), getattr(usage, "completion_tokens", None)
    estimated = tin is None or tout is None
    if tin is None:
      tin = sum(len(t) for t in _texts(req)) // 4 + 1
    if tout is None:
      tout = len(text) // 4 + 1
    leaked = self._key != LOCAL_PLACEHOLDER_KEY and self._key in text
    return text.replace(self._key, "***") if leaked else text, int(tin), int(tout), estimated

  def _classify(self, e: Exception) -> tuple[str, str, float | None]:
    """(kind, one-line error, retry-after seconds): kind is "retry", "auth" or "fatal"."""
    m = self._mod
    if isinstance(e, m.APITimeoutError):
      return "retry", f"timed out after {self.timeout_s:g} s", None
    if isinstance(e, m.APIConnectionError):
      cause = e.__cause__ or e
      return "retry", _cut(f"connection error: {type(cause).__name__}: {cause}"), None
    if isinstance(e, m.APIStatusError):
      status = e.status_code
      detail = _error_detail(e.response)
      msg = _cut(f"HTTP {status}: {detail}" if detail else f"HTTP {status}")
      if status in (401, 403):
        return "auth", msg, None
      if status in RETRYABLE_STATUS or status >= 500:
        retry_after = None
        try:
          ra = e.response.headers.get("retry-after")
          retry_after = min(max(float(ra), 0.0), RETRY_AFTER_CAP_S) if ra is not None else None
        except (TypeError, ValueError):
          pass
        return "retry", msg, retry_after
      return "fatal", msg, None
    return "fatal", _cut(f"{type(e).__name__}: {e}"), None

  def _adapt(self, msg: str) -> bool:
    """Whether an HTTP 400 was about a parameter this model does not take, now switched off (retry at once)."""
    low = msg.lower()
    with self._lock:
      if "max_completion_tokens" in low and self.backend == "openai" and self._openai_limit_arg == "max_tokens":
        self._openai_limit_arg = "max_completion_tokens"
      elif "temperature" in low and self._send_temperature:
        self._send_temperature = False
      else:
        return "max_completion_tokens" in low and self._openai_limit_arg != "max_tokens" or (
            "temperature" in low and not self._send_temperature)  # another thread switched it already
    self._note("retry", f"{msg}; sending the request again without that parameter for this model")
    return True

  # --- max_cost

  def _cost(self, tin: int, tout: int) -> float:
    if not self.cost_known:
      return 0.0
    return (tin * self.price_in + tout * self.price_out) / 1e6

  def _reserve(self, req: Request) -> float:
    """Reserve the request's worst-case cost, waiting for the requests in flight to settle when it does not fit.
    Raises _Refused when it cannot fit (max_cost reached), the key was rejected, or the run was interrupted."""
    worst = self._cost(worst_input_tokens(req), int(req.max_tokens))
    with self._lock:
      while True:
        if self._auth_error or self._interrupted:
          raise _Refused("not sent: " + ("the API rejected the key" if self._auth_error else "interrupted"))
        if self.max_cost is None:
          break
        committed = self._stats["cost_usd"] + self._maybe_spent
        if not self._stopped_by_max_cost and committed + self._reserved + worst <= self.max_cost:
          break
        if self._stopped_by_max_cost or not self._in_flight:
          self._stopped_by_max_cost = True
          raise _Refused("max-cost reached")
        self._lock.wait(1.0)
      self._reserved += worst
      self._in_flight += 1
    return worst

  def _release(self, worst: float):
    with self._lock:
      self._reserved -= worst
      self._in_flight -= 1
      self._lock.notify_all()

  # --- one request

  def _send(self, req: Request, key: str) -> Reply:
    try:
      worst = self._reserve(req)
    except _Refused as e:
      return Reply(None, error=str(e))
    try:
      with self._lock:
        self._stats["sent"] += 1
      attempt, adapted = 0, 0
      while True:
        try:
          text, tin, tout, estimated = self._call(req)
        except Exception as e:  # noqa: BLE001 (classified: retried or reported in the Reply)
          kind, msg, retry_after = self._classify(e)
          if isinstance(e, self._mod.APITimeoutError):
            with self._lock:
              self._maybe_spent += worst
          if kind == "fatal" and msg.startswith("HTTP 400") and adapted < 2 and self._adapt(msg):
            adapted += 1
            continue
          if kind == "auth":
            with self._lock:
              if self._auth_error is None:
                self._auth_error = msg
            return Reply(None, error=self._scrub(msg))
          stop = self._auth_error or self._interrupted
          if kind == "fatal" or attempt == self.max_retries or stop:
            if kind == "retry" and attempt:
              msg = (f"timed out after {attempt} retries" if isinstance(e, self._mod.APITimeoutError)
                     else f"{msg} (after {attempt} retries)")
            self._note("failure", f"a request failed: {msg}")
            return Reply(None, error=self._scrub(msg))
          delay = self.backoff_s * 2 ** attempt * (1 + 0.25 * random.random())
          delay = retry_after if retry_after is not None else delay
          with self._lock:
            self._stats["retries"] += 1
          self._note("retry", f"{msg}; retrying in {delay:.1f} s")
          time.sleep(delay)
          attempt += 1
          continue
        cost = self._cost(tin, tout)
        with self._lock:
          s = self._stats
          s["input_tokens"] += tin
          s["output_tokens"] += tout
          s["cost_usd"] += cost
          s["usage_estimated"] += int(estimated)
          p = self._purpose(req.purpose)
          p["input_tokens"] += tin
          p["output_tokens"] += tout
          p["cost_usd"] += cost
        if self._cache is not None:
          self._cache.put(key, text, tin, tout)
        return Reply(text, tin, tout, cached=False, cost_usd=cost)
    finally:
      self._release(worst)

  def _purpose(self, purpose: str) -> dict:
    return self._by_purpose.setdefault(purpose, {"requests": 0, "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0})

  # --- the public calls

  def complete_many(self, requests: list[Request], label: str = "") -> list[Reply]:
    """The replies, in the order of `requests`. Failed ones have text None and an error line. Raises
    errors.UserInputError (after the others have finished) when the API rejected the key."""
    from tqdm import tqdm
    for r in requests:
      roles = [m["role"] for m in r.messages]
      if not roles or roles[-1] != "user" or any(x not in ("user", "assistant") for x in roles):
        raise ValueError(f"a Request's messages must be user/assistant turns ending with a user one, not {roles}")
    if self._auth_error:
      raise self._auth_exception()
    self._interrupted = False
    replies: list[Reply | None] = [None] * len(requests)
    todo: dict[str, list[int]] = {}  # cache key → the indices asking for it
    for i, r in enumerate(requests):
      key = cache_key(self.backend, self.model, r)
      hit = self._cache.get(key) if self._cache is not None and key not in todo else None
      with self._lock:
        self._stats["requests"] += 1
        self._purpose(r.purpose)["requests"] += 1
        if hit is not None:
          self._stats["cache_hits"] += 1
      if hit is not None:
        replies[i] = Reply(hit[0], hit[1], hit[2], cached=True)
      else:
        todo.setdefault(key, []).append(i)
    if todo:
      bar = tqdm(total=len(todo), desc=label or "autointerp", unit="req", file=sys.stderr, disable=not self.progress,
                 dynamic_ncols=True)
      pool = futures.ThreadPoolExecutor(max_workers=min(self.concurrency, len(todo)), thread_name_prefix="llm")
      try:
        jobs = {pool.submit(self._send, requests[idx[0]], key): idx for key, idx in todo.items()}
        for job in futures.as_completed(jobs):
          reply, idx = job.result(), jobs[job]
          replies[idx[0]] = reply
          for j in idx[1:]:  # the same request again in this batch: served once
            replies[j] = dataclasses.replace(reply, cost_usd=0.0, cached=reply.text is not None)
          with self._lock:
            self._stats["cache_hits"] += sum(1 for j in idx[1:] if reply.text is not None)
          bar.update(1)
          if self.cost_known:
            bar.set_postfix_str(f"${self._stats['cost_usd']:.2f}", refresh=False)
      except BaseException:  # Ctrl-C: what finished is cached; send nothing more, do not wait for what is in flight
        with self._lock:
          self._interrupted = True
          self._lock.notify_all()
        pool.shutdown(wait=False, cancel_futures=True)
        bar.close()
        raise
      pool.shutdown(wait=True)
      bar.close()
    failed = sum(1 for r in replies if r.text is None)
    with self._lock:
      self._stats["failures"] += failed
    if self._auth_error:
      raise self._auth_exception()
    return replies

  def _auth_exception(self) -> errors.UserInputError:
    status, _, detail = self._auth_error.removeprefix("HTTP ").partition(": ")
    who = (f"the API rejected the key in {self.key_var}" if self._key != LOCAL_PLACEHOLDER_KEY
           else f"the server at {self._public_url()} wants a key: set {self.key_var}")
    return errors.UserInputError(self._scrub(f"{who} (HTTP {status})" + (f": {detail}" if detail else "")))

  def summary(self) -> dict:
    with self._lock:
      s = dict(self._stats)
      by_purpose = {k: dict(v) for k, v in self._by_purpose.items()}
    return {"backend": self.backend, "model": self.model, "base_url": self._public_url(), **s,
            "cost_known": self.cost_known, "price_in": self.price_in, "price_out": self.price_out,
            "max_cost": self.max_cost, "stopped_by_max_cost": self._stopped_by_max_cost, "by_purpose": by_purpose}

  def summary_line(self) -> str:
    s = self.summary()
    if s["cost_known"]:
      cost = f"${s['cost_usd']:,.2f}" + (f" (max ${self.max_cost:,.2f})" if self.max_cost is not None else "")
    else:
      cost = "cost unknown (no price for this model: pass --price_in/--price_out)"
    line = (f"autointerp: {self.backend} {self.model}: {s['requests']:,} requests "
            f"({s['cache_hits']:,} from the cache), {_human(s['input_tokens'])} tokens in, "
            f"{_human(s['output_tokens'])} out, {cost}, "
            f"{s['retries']:,} retries, {s['failures']:,} failures")
    if s["usage_estimated"]:
      line += f", {s['usage_estimated']:,} usages estimated from characters"
    if s["stopped_by_max_cost"]:
      line += ", stopped at --max_cost"
    return line

  def close(self):
    if self._cache is not None:
      self._cache.close()
      self._cache = None
    self._client.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
