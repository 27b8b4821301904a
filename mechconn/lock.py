"""The lock of a workdir: one live mechconn job at a time, and whose it is.

`lock(workdir)` holds an `fcntl.flock` on workdir/.mechconn.lock while inside;
the file records the holder (pid, host, start time, command line), so a second
job is refused naming it, and the lock of a killed job is taken over (the
kernel releases a flock when its process dies). `workdir.claim` takes it.
"""

from collections.abc import Iterator
import contextlib
import fcntl
import json
import os
import socket
import sys
import time

from absl import logging

LOCK_FILE = ".mechconn.lock"


class WorkdirBusyError(RuntimeError):
  """Another live job holds the workdir's lock."""


_HELD: set[str] = set()  # workdirs this process has locked


def _holder_text(record: dict | None) -> str:
  if not record:
    return "owner unknown"
  return (f"pid {record.get('pid')} on host {record.get('host')!r}, since "
          f"{record.get('since')}: {' '.join(record.get('argv', []))}")


@contextlib.contextmanager
def lock(workdir: str) -> Iterator[None]:
  """Holds the workdir's lock (an `fcntl.flock` on workdir/.mechconn.lock) while inside.

  The lock file records the holder's pid, host, start time and command line.
  A second job is refused with `WorkdirBusyError` naming the holder. The
  kernel releases a flock when its process dies, so the lock of a killed job
  is stale by construction: the next job takes it over (and logs whose it was).

  Raises:
    WorkdirBusyError: another live process (or this one) holds the lock.
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise FileExistsError(f"The workdir {workdir} is a file, not a directory; use another "
                          "--workdir. Nothing was changed.")
  os.makedirs(workdir, exist_ok=True)
  key = os.path.realpath(workdir)
  path = os.path.join(workdir, LOCK_FILE)
  if os.path.lexists(path) and not os.path.isfile(path):  # a directory, a dangling link
    raise FileExistsError(f"{path} is a directory (or another non-file), where mechconn keeps "
                          "the workdir's lock file; move it away or use another --workdir. "
                          "Nothing was changed.")
  if key in _HELD:
    raise WorkdirBusyError(f"{workdir} is already claimed by this process (pid {os.getpid()}).")
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise WorkdirBusyError(
          f"{workdir} is in use by another mechconn job ({_holder_text(_read_lock(fd))}). "
          "Wait for it to finish or stop it, or use another --workdir. Nothing was "
          "changed.") from None
    previous = _read_lock(fd)
    if previous and (previous.get("pid"), previous.get("host")) != (os.getpid(),
                                                                     socket.gethostname()):
      logging.warning("Taking over the lock of %s from a job that ended without releasing "
                      "it (%s).", workdir, _holder_text(previous))
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    _HELD.add(key)
    try:
      yield
    finally:
      _HELD.discard(key)
      os.ftruncate(fd, 0)  # released cleanly: a record left behind means a killed holder
  finally:
    os.close(fd)  # releases the flock


def _read_lock(fd: int) -> dict | None:
  try:
    record = json.loads(os.pread(fd, 65536, 0).decode() or "null")
  except ValueError:
    return None
  return record if isinstance(record, dict) else None
