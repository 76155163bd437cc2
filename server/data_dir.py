"""What the server itself keeps in its data directory (the engine keeps the sessions, in `sessions/`): the lock
that makes it the directory's only server, and the generated snapshot secret.

One server per data directory: a lock taken at start-up and held for the life of the process.

Two servers over one data dir would each keep their own sessions in memory and overwrite each other's
snapshots (and a session deleted by one would be saved again by the other). The lock is an exclusive
`flock` on `<data_dir>/server.lock`: the kernel drops it when the process ends, however it ends (SIGKILL
included), so a crash never leaves a stale lock to remove by hand. The file names its holder (pid, host, start
time) for the error the next server shows.

`flock` locks an open file, not a process: a second app in the same process is refused as well. Network
filesystems may not honour it across hosts (NFS does since Linux 2.6.12, by emulating it with fcntl locks).
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Any

LOCK_NAME = "server.lock"
SECRET_NAME = "secret"


class DataDirLocked(RuntimeError):
    """Another server holds the data directory."""

    def __init__(self, data_dir: Path, holder: dict[str, Any]):
        self.data_dir, self.holder = data_dir, holder
        if holder:
            who = (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
                   f"started {holder.get('started', '?')}")
        else:
            who = "a process that has not written its details yet"
        super().__init__(f"the data directory {data_dir} is in use by another fam-server ({who}); two servers "
                         "must never share one: stop that server, or give this one another --data-dir "
                         "(FAM_DATA_DIR)")


class DataDirLock:
    """`DataDirLock.acquire(data_dir)` holds the directory until `release()` (or the process's end)."""

    def __init__(self, path: Path, fd: int, holder: dict[str, Any]):
        self.path, self.holder, self._fd = path, holder, fd

    @classmethod
    def acquire(cls, data_dir: Path) -> DataDirLock:
        data_dir.mkdir(parents=True, exist_ok=True)
        path = data_dir / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise DataDirLocked(data_dir, holder) from None
        except BaseException:
            os.close(fd)
            raise
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        return cls(path, fd, holder)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Give the directory up (the file stays; its contents are only read while it is locked)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def snapshot_secret(data_dir: Path, given: str | None) -> bytes:
    """The HMAC key that signs snapshots: `given` (FAM_SECRET), or a random one generated on first use and kept
    (mode 0600) in `data_dir/secret`, so that snapshots signed before a restart still verify after it. Called
    with the directory's lock held, so two servers never race to create it."""
    if given is not None:
        return given.encode()
    path = data_dir / SECRET_NAME
    if not path.is_file():
        data_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{SECRET_NAME}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, secrets.token_hex(32).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)  # a crash leaves no half-written secret
    return path.read_bytes().strip()
