"""The local server of `python -m monojax.inspect serve`: the run's static inspector site and one
live endpoint, the TextInspector's activations of any text.

  GET  /              site_dir/index.html
  GET  /<path>        a file under site_dir (HEAD too; no listings, no dot-files, nothing outside it)
  GET  /api/status    {"live": true, "units": [...], "seq_len": N, "max_tokens": N}
  POST /api/text      {"text": str, "unit": str} (application/json, ≤ 256 KiB) → live.text_activations
  POST /api/generate  {"unit", "feature", "value", "prompt", "max_new_tokens", "seed"} → live.steer:
                      continuations with the feature clamped to value and without (the steering panel)

A WSGI app (werkzeug) served by waitress. The site shows untrusted corpus text and the server runs
on the reader's machine, so every response carries a strict CSP, and requests that another site
could make are refused: a Host header other than a loopback name (DNS rebinding), a POST from
another Origin, a cross-site subresource load (Sec-Fetch-Site), a POST that is not JSON (a form
post, which needs no CORS preflight). It only reads: nothing is written into the run.
"""
from __future__ import annotations

import errno
import ipaddress
import json
import logging
import os
import re
import signal
import threading
import traceback

import waitress
from waitress import wasyncore
from werkzeug.security import safe_join
from werkzeug.wrappers import Request, Response
from werkzeug.wsgi import wrap_file

from monojax import errors, text as text_lib
from monojax.inspector import live

MAX_BODY = 256 * 1024
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".json": "application/json", ".png": "image/png",
                 ".svg": "image/svg+xml", ".txt": "text/plain; charset=utf-8"}
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
# The site's own file names: ASCII words, dots and dashes. Anything else (%, \, NUL, :, non-ASCII)
# cannot name a file of the site and is refused before the file system sees it.
_SITE_PATH = re.compile(r"[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*")
_HOST = re.compile(r"(\[[0-9a-fA-F:.]+\]|[^\[\]:]+)(:\d{1,5})?")


def is_loopback(host: str) -> bool:
  if host.lower() == "localhost":
    return True
  try:
    return ipaddress.ip_address(host.strip("[]")).is_loopback
  except ValueError:
    return False


class InspectorApp:
  """The WSGI app. `run_loader()` opens the Run on the first request that needs it (once, under a
  lock); `allowed_hosts`: the Host names accepted (None: any, for a server bound to the network)."""

  def __init__(self, site_dir: str, run_loader, *, allowed_hosts=LOOPBACK_NAMES, max_tokens: int = 1024,
               top_k: int = 32, log=logging.warning):
    self.site_dir = os.path.realpath(site_dir)
    self.allowed_hosts = None if allowed_hosts is None else {h.lower().strip("[]") for h in allowed_hosts}
    self.max_tokens, self.top_k, self.log = int(max_tokens), int(top_k), log
    self._run_loader, self._run, self._run_lock = run_loader, None, threading.Lock()
    self._compute_lock = threading.Lock()  # one text at a time: the model's memory is not shared out

  def __call__(self, environ, start_response):
    request = Request(environ)
    try:
      response = self._route(request)
    except Exception as e:  # noqa: BLE001 — one bad request must not take the server down
      self.log(f"inspect: {request.method} {text_lib.visible(request.path)[:200]}: {type(e).__name__}: {e}\n"
               + traceback.format_exc())
      response = _error(500, "internal error (the server's console has the details)")
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Cross-Origin-Resource-Policy"] = "same-origin"
    response.headers["Cache-Control"] = "no-store" if request.path.startswith("/api/") else "no-cache"
    return response(environ, start_response)

  # ---------------------------------------------------------------------------------- routing

  def _route(self, request: Request) -> Response:
    refused = self._refused(request)
    if refused:
      return _error(403, refused)
    path = request.path
    if path == "/api/status":
      return self._status() if request.method in ("GET", "HEAD") else _not_allowed("GET, HEAD")
    if path == "/api/text":
      return self._text(request) if request.method == "POST" else _not_allowed("POST")
    if path == "/api/generate":
      return self._generate(request) if request.method == "POST" else _not_allowed("POST")
    if path.startswith("/api/"):
      return _error(404, "no such API endpoint")
    if request.method not in ("GET", "HEAD"):
      return _not_allowed("GET, HEAD")
    return self._file(request, "index.html" if path == "/" else path[1:])

  def _refused(self, request: Request) -> str | None:
    """Why a request is refused as one another site could have made, or None."""
    host = request.headers.get("Host", "")
    if self.allowed_hosts is not None:
      m = _HOST.fullmatch(host)
      if not m or m.group(1).lower().strip("[]") not in self.allowed_hosts:
        return "Host header not allowed (this server answers loopback names only)"
    origin = request.headers.get("Origin")
    if request.method == "POST" and origin is not None and origin.split("://", 1)[-1].lower() != host.lower():
      return "cross-origin request"
    # A page of another site may load our files as subresources (a <script src>) and read them;
    # top-level navigation to the site is fine (the other site cannot read it).
    site, mode = request.headers.get("Sec-Fetch-Site"), request.headers.get("Sec-Fetch-Mode")
    if site in ("cross-site", "same-site") and not (mode == "navigate" and request.method == "GET"):
      return "cross-site request"
    return None

  # ------------------------------------------------------------------------------- the files

  def _file(self, request: Request, rel: str) -> Response:
    if not _SITE_PATH.fullmatch(rel) or any(part.startswith(".") for part in rel.split("/")):
      return _error(404, "not found")
    full = safe_join(self.site_dir, rel)
    real = os.path.realpath(full) if full else None
    # realpath: a symlink inside the site must not lead out of it
    if real is None or not real.startswith(self.site_dir + os.sep) or not os.path.isfile(real):
      return _error(404, "not found")
    content_type = CONTENT_TYPES.get(os.path.splitext(real)[1].lower(), "application/octet-stream")
    fh = open(real, "rb")  # noqa: SIM115 — closed by the response (wrap_file), HEAD included
    response = Response(wrap_file(request.environ, fh), content_type=content_type, direct_passthrough=True)
    response.content_length = os.fstat(fh.fileno()).st_size
    return response

  # -------------------------------------------------------------------------------- the API

  def run(self):
    """The Run, opened on first use."""
    if self._run is None:
      with self._run_lock:
        if self._run is None:
          self._run = self._run_loader()
    return self._run

  def _status(self) -> Response:
    try:
      run = self.run()
    except errors.UserInputError as e:
      return _error(503, f"the run cannot be opened: {e}")
    return _json({"live": True, "units": live.unit_names(run), "seq_len": int(run.cfg.data.seq_len),
                  "max_tokens": self.max_tokens})

  def _json_body(self, request: Request):
    """(the request's JSON, None) or (None, an error response)."""
    if request.mimetype != "application/json":
      return None, _error(415, "Content-Type must be application/json")
    if request.content_length is not None and request.content_length > MAX_BODY:
      return None, _error(413, f"body over {MAX_BODY // 1024} KiB")
    body = request.stream.read(MAX_BODY + 1)
    if len(body) > MAX_BODY:
      return None, _error(413, f"body over {MAX_BODY // 1024} KiB")
    try:
      query = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      return None, _error(400, f"body: not JSON ({str(e).splitlines()[0][:120]})")
    return query, None

  def _computed(self, fn) -> Response:
    """fn(run)'s JSON, computed one request at a time; the run opened on first use."""
    try:
      run = self.run()
    except errors.UserInputError as e:
      return _error(503, f"the run cannot be opened: {e}")
    try:
      with self._compute_lock:
        result = fn(run)
    except errors.UserInputError as e:
      return _error(400, str(e))
    return _json(result)

  def _generate(self, request: Request) -> Response:
    query, err = self._json_body(request)
    if err is None and not isinstance(query, dict):
      err = _error(400, "body: a JSON object expected")
    return err or self._computed(lambda run: live.steer(run, query))

  def _text(self, request: Request) -> Response:
    query, err = self._json_body(request)
    if err:
      return err
    if not isinstance(query, dict) or not isinstance(query.get("text"), str):
      return _error(400, 'body: {"text": string, "unit": string} expected; text must be a string')
    if not isinstance(query.get("unit"), str):
      return _error(400, 'body: {"text": string, "unit": string} expected; unit must be a string')
    return self._computed(lambda run: live.text_activations(run, query["text"], query["unit"],
                                                             max_tokens=self.max_tokens, top_k=self.top_k))


def make_app(site_dir: str, run_loader, **kw) -> InspectorApp:
  """The WSGI app over `site_dir` (see InspectorApp for the keywords)."""
  return InspectorApp(site_dir, run_loader, **kw)


def _json(obj, status: int = 200) -> Response:
  # ASCII-only JSON (allow_nan=False: what a browser's JSON.parse reads, or an error here)
  return Response(json.dumps(obj, ensure_ascii=True, allow_nan=False, separators=(",", ":")), status=status,
                  content_type="application/json")


def _error(status: int, message: str) -> Response:
  return _json({"error": text_lib.visible(message).replace("\n", " ")}, status)


def _not_allowed(allow: str) -> Response:
  response = _error(405, f"method not allowed (allowed: {allow})")
  response.headers["Allow"] = allow
  return response


# --------------------------------------------------------------------------------- serving

class Serving:
  """A server running in a background thread (tests, notebooks): `url`, `port`; close() stops it."""

  def __init__(self, server, url: str, port: int):
    self.server, self.url, self.port = server, url, port
    self.thread = threading.Thread(target=server.run, name="inspect-server", daemon=True)

  def close(self, timeout: float = 10.0) -> None:
    if self.thread.is_alive():  # once: the trigger's pipe is closed with the loop
      _stop(self.server)
      self.thread.join(timeout)


def create(site_dir: str, run_loader, *, host: str = "127.0.0.1", port: int = 8000, threads: int = 4, **app_kw):
  """A bound (not yet running) waitress server: (server, url, port). Errors: errors.UserInputError."""
  host = "127.0.0.1" if host.lower() == "localhost" else host  # one socket, one port (not v4 + v6)
  allowed = (*LOOPBACK_NAMES, host) if is_loopback(host) else None
  app = make_app(site_dir, run_loader, allowed_hosts=allowed, **app_kw)
  try:
    # max_request_body_size: waitress itself refuses a body far over ours (chunked ones included)
    server = waitress.create_server(app, host=host, port=int(port), threads=int(threads),
                                    max_request_body_size=4 * MAX_BODY)
  except OSError as e:
    if e.errno == errno.EADDRINUSE:
      raise errors.UserInputError(f"--port {port}: already in use; pick another (--port=0 picks a free one)") from None
    raise errors.UserInputError(f"--host {host} --port {port}: cannot listen ({e.strerror or e})") from None
  except ValueError as e:  # waitress: a host or port it cannot parse
    raise errors.UserInputError(f"--host {host} --port {port}: {e}") from None
  bound_host, bound_port = server.effective_host, int(server.effective_port)
  url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
  return server, f"http://{url_host}:{bound_port}/", bound_port


def start(site_dir: str, run_loader, *, host: str = "127.0.0.1", port: int = 0, threads: int = 2, **app_kw) -> Serving:
  """Serves in a background thread; port 0 picks a free port (Serving.port)."""
  server, url, bound_port = create(site_dir, run_loader, host=host, port=port, threads=threads, **app_kw)
  serving = Serving(server, url, bound_port)
  serving.thread.start()
  return serving


def serve(site_dir: str, run_loader, *, host: str = "127.0.0.1", port: int = 8000, log=print, threads: int = 4,
          **app_kw) -> None:
  """Serves until Ctrl-C or SIGTERM."""
  server, url, _ = create(site_dir, run_loader, host=host, port=port, threads=threads, **app_kw)
  for line in banner(site_dir, host, url):
    log(line)
  previous = None
  if threading.current_thread() is threading.main_thread():  # SIGTERM stops it as Ctrl-C does
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
  try:
    server.run()  # waitress returns from run() on KeyboardInterrupt
  except KeyboardInterrupt:
    pass
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)
    server.task_dispatcher.shutdown()
    wasyncore.close_all(server._map)  # the loop has ended: this thread may close its sockets


def banner(site_dir: str, host: str, url: str) -> list[str]:
  """What serve() prints when it starts: where, and a warning when the network can reach it."""
  lines = [f"inspect: serving {text_lib.visible(site_dir)} at {url} (Ctrl-C stops)"]
  if not is_loopback(host):
    lines.append(f"inspect: warning: --host {text_lib.visible(host)} is not a loopback address: the run's corpus "
                 "text and the live model are reachable from the network")
  return lines


def _raise_interrupt(signum, frame):
  raise KeyboardInterrupt


def _stop(server) -> None:
  """From another thread: closes every socket in the server's loop thread (its socket map is not
  thread-safe), which ends run(); then stops the worker threads."""
  server.trigger.pull_trigger(lambda: wasyncore.close_all(server._map))
  server.task_dispatcher.shutdown()
