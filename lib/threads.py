"""Which thread of a server runs torch's CPU work (no MONAI Label import).

torch runs its CPU operators on an OpenMP team per calling thread, and GNU OpenMP keeps every team's threads for
as long as the thread that made it lives. Once the threads of all teams outnumber the CPUs, each team's threads
sleep between parallel regions instead of spinning, and every operator pays their wake-up: an inference of the
sample 3D model took about 25 % longer in a worker thread than the same inference alone (measured: a second
thread that had once run a parallel operator -- a model load, a sum -- was enough, for as long as it lived).
So in the server one thread runs the models (:data:`MODEL_THREAD`: the inferences, Next Sample's scoring, a
model upload's check), and every other thread that may touch torch (``/info`` loading a checkpoint, a label's
check) runs its operators in itself alone (:func:`one_cpu_thread_here`), making no team.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

logger = logging.getLogger(__name__)

MODEL_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dfm-model")  # (its thread starts at first use)
# the datastore's writes, one at a time (lib.datastore.one_write_at_a_time: each checks the store, then writes; they
# ran one after another on the event loop), and an inference that saves a final label holds it from its check to
# its save
DATASTORE_WRITES = threading.RLock()
_HERE = threading.local()


def one_cpu_thread_here() -> None:
    """From now on torch's CPU operators started in the calling thread run in it alone (an OpenMP thread count of
    one for this thread only; the other threads keep theirs). Once per thread; a torch without OpenMP is left as
    it is."""
    if getattr(_HERE, "one", False):
        return
    _HERE.one = True
    import torch

    torch.get_num_threads()  # torch sets a thread's OpenMP count at its first use: before this thread's own
    try:
        ctypes.CDLL(None).omp_set_num_threads(1)
    except (AttributeError, OSError):
        return
    if torch.get_num_threads() != 1:  # another OpenMP runtime than torch's answered
        logger.warning("could not make torch use one CPU thread in %s", threading.current_thread().name)


def in_a_passing_thread(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a new thread that uses one CPU thread and ends with the call (its result or its
    exception comes back): torch work of a thread that must not keep an OpenMP team (the server's main thread,
    reading its checkpoints' settings at start)."""
    out = {}

    def run():
        one_cpu_thread_here()
        try:
            out["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - raised again in the caller
            out["error"] = e

    t = threading.Thread(target=run, name=f"dfm-{getattr(fn, '__name__', 'call')}")
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out.get("value")
