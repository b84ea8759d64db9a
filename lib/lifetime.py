"""The lifetime of the processes a MONAI Label server starts (no MONAI Label or torch import: a task process
calls this first)."""

from __future__ import annotations

import os
import sys

SERVER_PID = "DFM_MONAILABEL_SERVER_PID"  # set by the server for the task processes it starts


def end_with_the_server() -> None:
    """In a process that MONAI Label's server started for a task (training, scoring, batch inference: they build
    this app again): end when the server ends. The server stopped by SIGTERM, ``kill -9`` or a crash left them
    running with no parent (a review: a server stopped 10 s after its start left the scoring of the second model
    running -- started by MONAI Label's task queue after the SIGTERM had reached the first one -- and a training
    would have gone on writing checkpoints and holding the model's run lock, out of reach of ``DELETE /train``).
    Here the kernel sends this process SIGTERM when the server's thread that started it ends (Linux's parent-death
    signal), and a process that starts after the server has ended stops at once. The variable is taken out of the
    environment: this process's own children (DDP workers) are its business."""
    server = os.environ.get(SERVER_PID)
    if not server or not server.isdigit() or int(server) == os.getpid():  # (the server, building its app again)
        return
    del os.environ[SERVER_PID]
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != int(server):  # (after the prctl: the server ending in between is seen here)
        raise SystemExit(f"the MONAI Label server (pid {server}) that started this task has ended: not running it")
