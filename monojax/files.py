"""Atomic file writes: a file is written under a temporary name in its own directory and renamed
into place, so a reader (or a resumed job after kill -9) sees the old file or the new one, never
half of one (a folder: `replace_dir`). The temporary name carries the process id, so two processes writing the same path
do not write into each other's temporary file."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[str]:
  """Yields a temporary path beside `path`; renames it onto `path` when the block succeeds and
  removes it when the block fails. For writers that need a file name (savefig, np.save); `suffix`
  keeps an extension such writers look at (".png")."""
  path = os.fspath(path)
  tmp = f"{path}.tmp-{os.getpid()}{suffix}"
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
  """Writes text (UTF-8) or bytes to `path` atomically."""
  with atomic_path(path) as tmp:
    with open(tmp, "wb" if isinstance(data, bytes) else "w", encoding=None if isinstance(data, bytes) else "utf-8") as fh:
      fh.write(data)


def atomic_write_json(path: str | os.PathLike, obj, **dump_kwargs) -> None:
  """json.dumps(obj, **dump_kwargs) written to `path` atomically."""
  atomic_write(path, json.dumps(obj, **dump_kwargs))


def replace_dir(tmp: str, final: str) -> None:
  """Puts a completely written folder `tmp` in place of `final` (which may not exist): the old folder
  is moved aside first and removed only once the new one is in place."""
  old = None
  if os.path.exists(final):
    old = f"{final}.old-{os.getpid()}"
    os.rename(final, old)
  os.rename(tmp, final)
  if old:
    shutil.rmtree(old, ignore_errors=True)


def replace_refusal(final: str, marker: str, schema_prefix: str) -> str | None:
  """Why a folder that a verb writes whole must not replace `final`, or None: it may replace an
  earlier one of its kind (its `marker` JSON file names a schema starting with `schema_prefix`) or an
  empty folder; anything else there is somebody's files. Returns "foreign" or "not a folder"."""
  if os.path.isdir(final) and os.listdir(final):
    try:
      with open(os.path.join(final, marker)) as f:
        ours = str(json.load(f).get("schema", "")).startswith(schema_prefix)
    except (OSError, ValueError, AttributeError):
      ours = False
    return None if ours else "foreign"
  if os.path.exists(final) and not os.path.isdir(final):
    return "not a folder"
  return None
