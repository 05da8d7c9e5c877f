"""A process's compiled kernels loaded off its callers' path.

Loading numba and a worker's cached kernels costs 0.3-0.6 s of CPU, once per process. A
worker that waited for it inside its first long pull or push spent that half second there
(the old, pandas-based worker did not). Instead, code with a NumPy path and a compiled one
asks :func:`use_kernels` which to take: the compiled one once the process's loader (the
worker's, registered by :mod:`paramserver.client.warm`) has run; before that, the NumPy one,
while the loader runs on a daemon thread, started by the first call that asked. Both paths
give the same values bit for bit (tests/unit/test_loading.py), so nothing but speed depends
on which one a request took. A process with no loader registered (a server, which loads its
kernels as it starts; the coordinator) always takes the compiled path.

Example:
    if use_kernels():
        out = compiled(keys)
    else:
        out = in_numpy(keys)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

__all__ = ["hold", "loaded", "ready", "register", "start", "use_kernels"]

log = logging.getLogger(__name__)

_lock = threading.Lock()
_loader: Callable[[], None] | None = None
_started = False
_held = False
_done = threading.Event()


def register(loader: Callable[[], None]) -> None:
    """Make ``loader`` this process's kernel loader (the last registration wins).

    Example:
        register(warm_kernels)
    """
    global _loader
    _loader = loader


def loaded(timeout: float | None = None) -> bool:
    """Whether the loader has run (waiting up to ``timeout`` seconds for it when given).

    Example:
        loaded(timeout=5.0)
    """
    return _done.wait(timeout) if timeout else _done.is_set()


def ready() -> bool:
    """Whether the compiled path is ready: the loader has run, or none is registered (starts
    nothing: for work too short to start the loads for).

    Example:
        fast = ready()
    """
    return _done.is_set() or _loader is None


def _run(loader: Callable[[], None]) -> None:
    try:
        loader()
    except Exception:  # only an optimization: the compiled path loads what it needs itself
        log.debug("loading the kernels failed", exc_info=True)
    finally:
        _done.set()


def _start_locked() -> None:
    global _started
    if _started or _loader is None:
        return
    _started = True
    threading.Thread(target=_run, args=(_loader,), name="load-kernels", daemon=True).start()


def start() -> None:
    """Load the kernels ahead of need, on a daemon thread, once (nothing after :func:`hold`).

    Example:
        start()  # from connect(): the loads overlap the registration
    """
    with _lock:
        if not _held:
            _start_locked()


def hold() -> None:
    """Load nothing ahead of need from now on (:func:`start` does nothing): for a process whose
    cores are busy starting the servers it connects to. :func:`use_kernels` still starts the
    loader when a request first needs it.

    Example:
        hold()
    """
    global _held
    with _lock:
        _held = True


def use_kernels() -> bool:
    """Whether to take the compiled path now: True once the loader has run, or where none is
    registered. Otherwise starts the loader (once) and says False: take the NumPy path.

    Example:
        fast = use_kernels()
    """
    if ready():
        return True
    with _lock:
        _start_locked()
    return False
