"""One run per run directory: rank 0 holds an exclusive lock on `<run_dir>/.lock` while it trains.

`fcntl.flock` locks belong to the open file: the kernel drops them when the process dies, however it
dies, so a lock left by a killed run is simply taken over by the next. The file records who holds it,
for the message a second run gets. (On network filesystems without flock support the lock is
advisory at best: give concurrent runs their own run_dir there.)
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from ldm.errors import LdmError

LOCK_NAME = ".lock"


class RunDirLockedError(LdmError):
    """Another live process trains in this run directory."""


class RunDirLock:
    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._file = None

    def acquire(self) -> "RunDirLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunDirLockedError(
                f"run_dir={self.path.parent} is in use by {holder}: two runs in one directory would overwrite each "
                "other's checkpoints and logs. Wait for it to end, stop it, or give this run another run_dir=."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"PID {os.getpid()} on host {socket.gethostname()} (since {time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        handle.flush()
        self._file = handle
        return self

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
