"""Abort mode in a ``torch.distributed`` job: one rank's abort ends every rank within a second.

When a rank ends itself on a bad table (``mode = "abort"``), its peers are usually inside a
collective waiting for it: with NCCL they hang until the collective's timeout (minutes by
default), unless a launcher such as torchrun's agent notices the dead worker and kills them,
and a launcher that spawns workers itself (SGLang's TP workers, ``torch.multiprocessing``)
may not. So the aborting rank says so through the job's own rendezvous store (the default
process group's TCP store: every rank already talks to it), and every sanitized rank of the
job watches that store from a daemon thread and ends itself, with the same exit status, when
a peer aborted, a little after the aborting rank (so that a launcher such as torchrun names
that rank as the job's first failure). The thread starts at the first checked call after the
default process group exists, polls one key every ``POLL_S`` seconds (a round trip to the
store), and holds no GIL while it sleeps. ``abort_peers = false`` in the config turns this off.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Optional

KEY = "tsan_paged/abort"
POLL_S = 0.2
GRACE_S = 2.5 * POLL_S  # the aborting rank lingers this long: its process may host the store

_watching = False
_lock = threading.Lock()


def _default_store():
    """The default process group's store, or ``None`` (no ``torch.distributed`` job here)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # a process group without a store this version exposes
        return None


def rank() -> Optional[int]:
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank()
    except Exception:
        pass
    value = os.environ.get("RANK")
    return int(value) if value and value.isdigit() else None


def watch(exit_code: int, on_peer_abort) -> None:
    """Start the watcher thread once the job's default process group exists (cheap when it
    runs already, or when there is no job)."""
    global _watching
    if _watching:
        return
    store = _default_store()
    if store is None:
        return
    with _lock:
        if _watching:
            return
        _watching = True
    own = rank()
    thread = threading.Thread(target=_watch, args=(store, own, exit_code, on_peer_abort),
                              name="tsan_paged-abort-watch", daemon=True)
    thread.start()


def _watch(store, own, exit_code, on_peer_abort) -> None:
    while True:
        try:
            aborted = store.check([KEY])
        except Exception:  # the store is gone (the job is shutting down): stop watching, never exit
            return
        if aborted:
            break
        time.sleep(POLL_S)
    try:
        message = store.get(KEY).decode(errors="replace")
    except Exception:  # the aborting rank hosted the store and is gone already
        message = "a peer rank aborted (its message is gone with it)"
    if message.startswith(f"rank {own}:"):
        return  # our own abort: this process is ending
    try:
        on_peer_abort(message, own)
    except Exception:
        pass
    time.sleep(GRACE_S + POLL_S)  # end after the aborting rank: launchers name the first to exit
    os._exit(exit_code)


def announce(summary: str) -> bool:
    """Tell the job this rank aborts (before it exits). False when there is no job to tell."""
    store = _default_store()
    if store is None:
        return False
    try:
        store.set(KEY, f"rank {rank()}: {summary} (at {time.time():.3f})")
    except Exception:
        return False
    time.sleep(GRACE_S)  # let every watcher read the key before this process (maybe the store's host) ends
    return True
