"""Who is labelling an image right now: the claims that let ranks and jobs share one store.

A claim is a small file ``claims/<image_id>.claim`` created with ``O_EXCL`` (see
:meth:`~lightning_clipes.data.store.PseudoLabelStore.claim`) that names its owner: host, process, SLURM job
and restart count, labelling pass. A claim whose owner is provably gone is taken over at once; one that
is merely old, after a timeout.
"""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class ClaimOwner:
    """Who holds a claim: host, process, SLURM job and restart count, and the labelling pass."""

    host: str
    pid: int
    job: str
    restart: int
    pass_id: str

    @classmethod
    def here(cls, pass_id: str) -> "ClaimOwner":
        job = os.environ.get("SLURM_ARRAY_JOB_ID", os.environ.get("SLURM_JOB_ID", ""))
        if os.environ.get("SLURM_ARRAY_TASK_ID") and os.environ.get("SLURM_ARRAY_JOB_ID"):
            job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        return cls(socket.gethostname(), os.getpid(), job, int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0), pass_id)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def is_stale_claim(self, path: Path, timeout: float) -> bool:
        try:
            age = time.time() - path.stat().st_mtime
            other = json.loads(path.read_text())
        except FileNotFoundError:
            return True
        except (OSError, ValueError):  # being written right now, or garbage
            return age > 5.0
        if other.get("host") == self.host:
            if other.get("pid") == self.pid and other.get("pass_id") != self.pass_id:
                return True  # an earlier pass of this very process, which stopped without releasing it
            if other.get("pid") != self.pid and not _alive(int(other.get("pid", -1))):
                return True
        if self.job and other.get("job") == self.job and int(other.get("restart", 0)) < self.restart:
            return True
        return age > timeout


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
