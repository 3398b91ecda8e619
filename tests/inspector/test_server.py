"""The inspector's local server (monojax/inspector/server.py) through werkzeug's test client: files
of the site only (every traversal refused, the secret next to the site never served), content types,
security headers, the live text endpoint and its refusals, the Host/Origin checks; and once over a
real socket (waitress on a free port), with the port-in-use error."""
import http.client
import json
import os
import socket
import threading
import time
import urllib.request

import pytest
from werkzeug.test import Client

from monojax import errors
from monojax.inspector import live, server
from monojax.run import Run

SECRET = "TOP-SECRET-do-not-serve"
TEXT = "The quick brown fox jumps over the lazy dog.\nThen def f(x): return x + 1 " * 3
FILES = {"index.html": "<!doctype html><title>inspector</title>", "app.js": "console.log('hi');",
         "style.css": "body{}", "data/feature.json": '{"id": 1}', "img/a.png": "\x89PNG", "icon.svg": "<svg/>",
         "notes.txt": "notes", "blob.bin": "\x00\x01", ".hidden": SECRET}


@pytest.fixture(scope="module")
def run(inspector_run):
  return Run.open(inspector_run)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
  base = tmp_path_factory.mktemp("isite")
  (base / "secret.txt").write_text(SECRET)
  site = base / "inspector"
  for rel, text in FILES.items():
    (site / rel).parent.mkdir(parents=True, exist_ok=True)
    (site / rel).write_text(text, encoding="latin-1")
  os.symlink(base / "secret.txt", site / "link.txt")  # inside the site, pointing out of it
  return str(site)


class Loader:
  """Counts how often the app opens the run."""

  def __init__(self, run, delay=0.0):
    self.run, self.delay, self.calls = run, delay, 0

  def __call__(self):
    self.calls += 1
    time.sleep(self.delay)
    return self.run


@pytest.fixture
def loader(run):
  return Loader(run)


@pytest.fixture
def client(site, loader):
  return Client(server.make_app(site, loader))


def _post(client, body, content_type="application/json", **kw):
  data = body if isinstance(body, (str, bytes)) else json.dumps(body)
  return client.post("/api/text", data=data, content_type=content_type, **kw)


def test_index_and_headers(client, loader):
  r = client.get("/")
  assert r.status_code == 200 and r.get_data(as_text=True) == FILES["index.html"]
  assert r.headers["Content-Type"] == "text/html; charset=utf-8"
  assert r.headers["Content-Security-Policy"] == server.CSP
  assert "script-src 'self';" in server.CSP and "frame-ancestors 'none'" in server.CSP
  assert r.headers["X-Content-Type-Options"] == "nosniff" and r.headers["Referrer-Policy"] == "no-referrer"
  assert r.headers["Cache-Control"] != "no-store"
  assert loader.calls == 0, "serving files must not open the run"


@pytest.mark.parametrize("rel,content_type", [
    ("app.js", "text/javascript; charset=utf-8"), ("style.css", "text/css; charset=utf-8"),
    ("data/feature.json", "application/json"), ("img/a.png", "image/png"), ("icon.svg", "image/svg+xml"),
    ("notes.txt", "text/plain; charset=utf-8"), ("blob.bin", "application/octet-stream")])
def test_file_types(client, rel, content_type):
  r = client.get("/" + rel)
  assert r.status_code == 200 and r.headers["Content-Type"] == content_type
  assert r.get_data() == FILES[rel].encode("latin-1")
  assert r.headers["Content-Security-Policy"] == server.CSP


def test_head_missing_and_methods(client):
  r = client.head("/app.js")
  assert r.status_code == 200 and r.get_data() == b"" and int(r.headers["Content-Length"]) == len(FILES["app.js"])
  for path in ("/missing.html", "/data/", "/data", "/img/nope.png"):
    r = client.get(path)
    assert r.status_code == 404 and r.json == {"error": "not found"}, path
  for method in ("post", "put", "delete", "patch"):
    r = getattr(client, method)("/app.js")
    assert r.status_code == 405 and r.headers["Allow"] == "GET, HEAD", method
  assert client.get("/api/text").status_code == 405 and client.get("/api/nope").status_code == 404


TRAVERSALS = ["/../secret.txt", "/%2e%2e/secret.txt", "/%2E%2E%2Fsecret.txt", "/..%2fsecret.txt",
              "/..%5csecret.txt", "/..\\secret.txt", "/%252e%252e/secret.txt", "/data/../../secret.txt",
              "/data/%2e%2e/%2e%2e/secret.txt", "/%c0%ae%c0%ae/secret.txt", "/link.txt", "/.hidden",
              "/%2ehidden", "/index.html%00.txt", "/..", "/.", "/data/.."]


def test_traversal_refused(client, site):
  secret_path = os.path.join(os.path.dirname(site), "secret.txt")
  attempts = TRAVERSALS + ["/" + secret_path, "//" + secret_path.lstrip("/"), "/" + secret_path.replace("/", "%2f")]
  for path in attempts:
    r = client.get(path)
    assert r.status_code in (400, 404), path
    assert SECRET not in r.get_data(as_text=True), path
  # PATH_INFO exactly as a server might pass it, bypassing any normalisation by the test client
  for raw in ("/../secret.txt", "/data/../../secret.txt", "/..\\secret.txt", "/x\x00", secret_path,
              "/" + secret_path, "/../inspector/../secret.txt"):
    r = client.get("/", environ_overrides={"PATH_INFO": raw})
    assert r.status_code in (400, 404) and SECRET not in r.get_data(as_text=True), repr(raw)


def test_status_opens_the_run_once(site, run):
  slow = Loader(run, delay=0.2)
  app = server.make_app(site, slow, max_tokens=256)
  threads = [threading.Thread(target=lambda: Client(app).get("/api/status")) for _ in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  r = Client(app).get("/api/status")
  assert r.status_code == 200 and slow.calls == 1
  assert r.json == {"live": True, "units": ["neurons", "sae0", "sae1"], "seq_len": 16, "max_tokens": 256}
  assert r.headers["Cache-Control"] == "no-store" and r.headers["Content-Security-Policy"] == server.CSP


def test_text_matches_text_activations(client, run):
  r = _post(client, {"text": TEXT, "unit": "sae0"})
  assert r.status_code == 200 and r.headers["Content-Type"] == "application/json"
  assert r.headers["Cache-Control"] == "no-store"
  assert r.json == live.text_activations(run, TEXT, "sae0")
  assert r.json["n_tokens"] > 16 and any(r.json["features"])
  r = _post(client, {"text": TEXT, "unit": "neurons"}, content_type="application/json; charset=utf-8")
  assert r.status_code == 200 and r.json == live.text_activations(run, TEXT, "neurons")


def test_text_refusals(client):
  good = {"text": "hi", "unit": "sae0"}
  for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", ""):
    assert _post(client, json.dumps(good), content_type=content_type).status_code == 415, content_type
  big = json.dumps({"text": "a" * (server.MAX_BODY + 10), "unit": "sae0"})
  r = _post(client, big)
  assert r.status_code == 413 and "error" in r.json
  for body, needle in (("{", "not JSON"), (b"\xff\xfe", "not JSON"), ([1, 2], "text must be a string"),
                       ({"text": 5, "unit": "sae0"}, "text must be a string"), ({"unit": "sae0"}, "text must be a string"),
                       ({"text": "hi"}, "unit must be a string"), ({"text": "hi", "unit": "sae9"}, "neurons, sae0, sae1")):
    r = _post(client, body)
    assert r.status_code == 400 and needle in r.json["error"] and "\n" not in r.json["error"], body


def test_host_origin_and_fetch_site_checks(site, loader):
  client = Client(server.make_app(site, loader))
  for host in ("127.0.0.1:8000", "localhost", "LOCALHOST:1", "[::1]:8000", "127.0.0.1"):
    assert client.get("/", headers={"Host": host}).status_code == 200, host
  for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", "localhost.evil.example:80", "[::2]:8000",
               "127.0.0.1:8000@evil.example", ""):
    r = client.get("/", headers={"Host": host})
    assert r.status_code == 403 and r.headers["Content-Security-Policy"] == server.CSP, host
    assert _post(client, {"text": "hi", "unit": "sae0"}, headers={"Host": host}).status_code == 403, host
  r = _post(client, {"text": "hi", "unit": "sae0"}, headers={"Origin": "http://evil.example"})
  assert r.status_code == 403
  assert _post(client, {"text": "hi", "unit": "sae0"}, headers={"Origin": "http://localhost"}).status_code == 200
  r = client.get("/app.js", headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"})
  assert r.status_code == 403 and "console.log" not in r.get_data(as_text=True)
  assert client.get("/", headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}).status_code == 200
  assert client.get("/app.js", headers={"Sec-Fetch-Site": "same-origin"}).status_code == 200
  # bound to the network: any Host (serve() warns instead)
  open_client = Client(server.make_app(site, loader, allowed_hosts=None))
  assert open_client.get("/", headers={"Host": "evil.example"}).status_code == 200


def test_banner():
  assert server.banner("RUN/inspector", "127.0.0.1", "http://127.0.0.1:8000/") == [
      "inspect: serving RUN/inspector at http://127.0.0.1:8000/ (Ctrl-C stops)"]
  lines = server.banner("RUN/inspector", "0.0.0.0", "http://0.0.0.0:8000/")
  assert len(lines) == 2 and "reachable from the network" in lines[1]
  assert server.is_loopback("::1") and server.is_loopback("127.0.0.2") and not server.is_loopback("0.0.0.0")


def test_real_socket(site, loader, run):
  serving = server.start(site, loader, port=0)
  try:
    assert serving.port > 0 and serving.url == f"http://127.0.0.1:{serving.port}/"
    with urllib.request.urlopen(serving.url, timeout=30) as r:
      assert r.status == 200 and r.read().decode() == FILES["index.html"]
      assert r.headers["Content-Security-Policy"] == server.CSP
    req = urllib.request.Request(serving.url + "api/text", data=json.dumps({"text": TEXT, "unit": "sae1"}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=60) as r:
      assert json.loads(r.read()) == live.text_activations(run, TEXT, "sae1")
    # raw request lines, exactly as sent (no client-side normalisation), through waitress's decoding
    for path, host, status in (("/%2e%2e/secret.txt", None, 404), ("/../secret.txt", None, 404),
                               ("/data/%2E%2E/..%2fsecret.txt", None, 404), ("/app.js", "evil.example", 403),
                               ("/app.js", None, 200)):
      conn = http.client.HTTPConnection("127.0.0.1", serving.port, timeout=30)
      conn.putrequest("GET", path, skip_host=host is not None)
      if host is not None:
        conn.putheader("Host", host)
      conn.endheaders()
      r = conn.getresponse()
      body = r.read().decode("latin-1")
      conn.close()
      assert r.status == status and SECRET not in body, (path, host)
    with pytest.raises(errors.UserInputError, match=f"--port {serving.port}: already in use.*--port=0"):
      server.start(site, loader, port=serving.port)
  finally:
    serving.close()
  assert not serving.thread.is_alive()
  with pytest.raises(OSError):
    urllib.request.urlopen(serving.url, timeout=5)


def test_port_in_use(site, loader):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    s.listen()
    port = s.getsockname()[1]
    with pytest.raises(errors.UserInputError, match=f"^--port {port}: already in use; pick another"):
      server.create(site, loader, port=port)


def test_run_that_cannot_open(site):
  def broken():
    raise errors.RunFormatError("RUN: no complete checkpoint")
  client = Client(server.make_app(site, broken))
  r = client.get("/api/status")
  assert r.status_code == 503 and r.json == {"error": "the run cannot be opened: RUN: no complete checkpoint"}
  assert _post(client, {"text": "hi", "unit": "sae0"}).status_code == 503
  assert client.get("/").status_code == 200  # the static site still serves
  logged = []
  client = Client(server.make_app(site, lambda: 1 / 0, log=logged.append))
  r = client.get("/api/status")
  assert r.status_code == 500 and "ZeroDivisionError" not in r.get_data(as_text=True)
  assert len(logged) == 1 and "ZeroDivisionError" in logged[0]


def test_generate_steers_and_refuses_bad_queries(client, run):
  """POST /api/generate (the steering panel): the same draws with and without the clamp, the shift
  after the prompt, and a one-line 400 for each malformed field."""
  def post(body):
    return client.post("/api/generate", data=json.dumps(body), content_type="application/json")
  ok = {"unit": "sae0", "feature": 3, "value": 50.0, "prompt": "The list " * 20, "max_new_tokens": 4, "seed": 1}
  r = post(ok)
  assert r.status_code == 200, r.get_json()
  j = r.get_json()
  assert j["feature"] == 3 and j["prompt_cut"] and j["prompt_tokens"] + j["new_tokens"] <= 16 and isinstance(j["clean"], str) and isinstance(j["edited"], str)
  assert j["kl"] > 0 and len(j["up"]) == 5 and len(j["down"]) == 5
  assert all(after > before for _, before, after in j["up"]) and all(after < before for _, before, after in j["down"])
  assert post(ok).get_json()["edited"] == j["edited"]   # seeded: the same continuation again
  for bad in ({"unit": "neurons"}, {"unit": "sae9"}, {"feature": -1}, {"feature": 10**6}, {"feature": "3"},
              {"value": float("inf")}, {"value": "5"}, {"prompt": ""}, {"prompt": 7}, {"prompt": "x" * 5000},
              {"max_new_tokens": 0}, {"max_new_tokens": 10**6}, {"seed": -1}):
    r = post(dict(ok, **bad) if "inf" not in str(bad.get("value")) else {**ok, "value": 1e9})
    assert r.status_code == 400 and "\n" not in r.get_json()["error"], (bad, r.get_json())
  assert client.get("/api/generate").status_code == 405
