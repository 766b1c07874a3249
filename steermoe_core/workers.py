"""Worker processes that end with the command that started them.

A pool's workers outlive a parent killed with SIGKILL (no clean-up runs in it): `prep`'s shard
workers and `infer`'s audio decoders would then sleep forever, holding memory. Pass
``die_with_parent`` as a ``ProcessPoolExecutor`` initializer (``initargs=(os.getpid(),)``).
"""

from __future__ import annotations

import os
import threading


def die_with_parent(parent: int) -> None:
    """Pool worker initializer: a worker ends when its parent does, even on kill -9. Linux: the kernel
    sends SIGKILL when the parent dies (PR_SET_PDEATHSIG); everywhere: a thread notices the parent is
    gone within half a second."""
    import signal
    import sys

    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        import time

        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)
    threading.Thread(target=watch, name="steermoe-parent-watch", daemon=True).start()
