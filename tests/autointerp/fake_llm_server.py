"""A local fake of the two LLM wire formats, for the tests of monojax.autointerp.llm: Anthropic's Messages API
(POST /v1/messages) and OpenAI chat completions (POST /v1/chat/completions), with each vendor's reply and error
bodies. It records every request (path, headers, JSON body) and is scripted:

  with FakeLLMServer(responder=lambda body: "yes") as fake:   # the default: a reply text from the request's JSON
    fake.script(Error(429, retry_after="0"), Text("hello", input_tokens=12, output_tokens=3), Sleep(1.0))
    ... LLMClient("anthropic", "m", base_url=fake.anthropic_url, ...) ...   # openai: fake.openai_url
    fake.requests   # [Recorded(path, headers (lower-case names), body)]

The scripted behaviours answer the next requests in arrival order; when the script is empty, `responder(body)`
answers (a str is a reply text; it may also return a Text, Error or Sleep). `expected_key`, when set, makes the
server check the key header as the vendor would and answer 401 otherwise (echoing the key it got, so that tests can
see the client scrub it).
"""
from __future__ import annotations

import collections
import dataclasses
import http.server
import itertools
import json
import threading
import time

ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                         404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                         529: "overloaded_error"}
OPENAI_ERROR_TYPES = {400: ("invalid_request_error", None), 401: ("invalid_request_error", "invalid_api_key"),
                      403: ("invalid_request_error", "unsupported_country_region_territory"),
                      404: ("invalid_request_error", "model_not_found"), 429: ("requests", "rate_limit_exceeded"),
                      500: ("server_error", None)}


@dataclasses.dataclass
class Text:
  text: str
  input_tokens: int | None = None  # None: ~chars/4 of the request's texts
  output_tokens: int | None = None  # None: ~chars/4 of the text
  usage: bool = True  # False: a reply without usage


@dataclasses.dataclass
class Error:
  status: int
  message: str = ""
  retry_after: str | None = None
  headers: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Sleep:
  seconds: float
  then: object = None  # what to answer after the sleep (None: the responder), if the client is still there


@dataclasses.dataclass
class Recorded:
  path: str
  headers: dict
  body: dict | None


class FakeLLMServer:

  def __init__(self, responder=None, expected_key: str | None = None):
    self.responder = responder or (lambda body: "ok")
    self.expected_key = expected_key
    self.requests: list[Recorded] = []
    self._script: collections.deque = collections.deque()
    self._lock = threading.Lock()
    self._stop = threading.Event()
    self._ids = itertools.count(1)
    self._httpd = None

  def script(self, *behaviours):
    with self._lock:
      self._script.extend(behaviours)

  @property
  def url(self) -> str:
    return f"http://127.0.0.1:{self._httpd.server_address[1]}"

  @property
  def anthropic_url(self) -> str:
    return self.url

  @property
  def openai_url(self) -> str:
    return self.url + "/v1"

  def start(self) -> FakeLLMServer:
    fake = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def log_message(self, *args):
        pass

      def do_POST(self):
        try:
          fake._handle(self)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and went away
          pass

    self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self._httpd.daemon_threads = True
    threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return self

  def stop(self):
    self._stop.set()
    if self._httpd is not None:
      self._httpd.shutdown()
      self._httpd.server_close()

  def __enter__(self):
    return self.start()

  def __exit__(self, *exc):
    self.stop()

  # --- serving

  def _handle(self, h):
    raw = h.rfile.read(int(h.headers.get("content-length") or 0))
    try:
      body = json.loads(raw)
    except ValueError:
      body = None
    headers = {k.lower(): v for k, v in h.headers.items()}
    with self._lock:
      self.requests.append(Recorded(h.path, headers, body))
      behaviour = self._script.popleft() if self._script else None
    if h.path == "/v1/messages":
      fmt = "anthropic"
    elif h.path == "/v1/chat/completions":
      fmt = "openai"
    else:
      return self._send(h, 404, {"error": {"message": f"no route {h.path}"}})
    problem = self._check(fmt, headers, body)
    if problem is not None:
      return self._error(h, fmt, Error(*problem))
    if behaviour is None:
      behaviour = self.responder(body)
    while isinstance(behaviour, Sleep):
      if self._stop.wait(behaviour.seconds):
        return
      behaviour = behaviour.then if behaviour.then is not None else self.responder(body)
    if isinstance(behaviour, str):
      behaviour = Text(behaviour)
    if isinstance(behaviour, Error):
      return self._error(h, fmt, behaviour)
    return self._reply(h, fmt, body, behaviour)

  def _check(self, fmt, headers, body):
    """Refuse what the vendor would refuse: a missing/wrong key (401), a malformed body (400)."""
    auth = headers.get("authorization", "")
    key = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
    if fmt == "anthropic":
      # anthropic < 2 sends the key as x-api-key, later releases as a Bearer token: the API takes either
      key = headers.get("x-api-key", key)
      if "anthropic-version" not in headers:
        return 400, "anthropic-version: header is required"
    if self.expected_key is not None and key != self.expected_key:
      return 401, f"invalid x-api-key: {key}" if fmt == "anthropic" else f"Incorrect API key provided: {key}."
    if not isinstance(body, dict) or not isinstance(body.get("model"), str) or not isinstance(body.get("messages"),
                                                                                                 list):
      return 400, "the body needs model and messages"
    if fmt == "anthropic" and not isinstance(body.get("max_tokens"), int):
      return 400, "max_tokens: Field required"
    return None

  def _reply(self, h, fmt, body, t: Text):
    texts = [m.get("content", "") for m in body["messages"]] + [body.get("system") or ""]
    tin = t.input_tokens if t.input_tokens is not None else sum(len(str(x)) for x in texts) // 4 + 1
    tout = t.output_tokens if t.output_tokens is not None else len(t.text) // 4 + 1
    n = next(self._ids)
    if fmt == "anthropic":
      out = {"id": f"msg_fake{n:06d}", "type": "message", "role": "assistant", "model": body["model"],
             "content": [{"type": "text", "text": t.text}], "stop_reason": "end_turn", "stop_sequence": None}
      if t.usage:
        out["usage"] = {"input_tokens": tin, "output_tokens": tout}
    else:
      out = {"id": f"chatcmpl-fake{n:06d}", "object": "chat.completion", "created": int(time.time()),
             "model": body["model"], "choices": [{"index": 0, "message": {"role": "assistant", "content": t.text},
                                                  "logprobs": None, "finish_reason": "stop"}]}
      if t.usage:
        out["usage"] = {"prompt_tokens": tin, "completion_tokens": tout, "total_tokens": tin + tout}
    self._send(h, 200, out, {"request-id" if fmt == "anthropic" else "x-request-id": f"req_{n}"})

  def _error(self, h, fmt, e: Error):
    if fmt == "anthropic":
      kind = ANTHROPIC_ERROR_TYPES.get(e.status, "api_error")
      out = {"type": "error", "error": {"type": kind, "message": e.message or kind}, "request_id": "req_fake"}
    else:
      kind, code = OPENAI_ERROR_TYPES.get(e.status, ("server_error", None))
      out = {"error": {"message": e.message or kind, "type": kind, "param": None, "code": code}}
    headers = dict(e.headers)
    if e.retry_after is not None:
      headers["retry-after"] = e.retry_after
    # Tell the vendors' clients not to retry on their own (they are built with max_retries=0 anyway).
    headers.setdefault("x-should-retry", "false")
    self._send(h, e.status, out, headers)

  @staticmethod
  def _send(h, status, obj, headers=None):
    data = json.dumps(obj).encode()
    h.send_response(status)
    h.send_header("content-type", "application/json")
    h.send_header("content-length", str(len(data)))
    for k, v in (headers or {}).items():
      h.send_header(k, v)
    h.end_headers()
    h.wfile.write(data)
    h.wfile.flush()
