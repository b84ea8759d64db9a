"""Start the MONAI Label server as a user does, in its own process group, and stop everything it started."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy_sample_data(dst: Path) -> Path:
    """The sample datastore (images + labels/final) without the script and the model folder."""
    src = ROOT / "sample_data"
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.is_file() and p.suffix in (".png", ".gz", ".nii"):
            shutil.copy2(p, dst / p.name)
    shutil.copytree(src / "labels", dst / "labels")
    return dst


class Server:
    def __init__(self, studies: str, workdir: Path, conf: dict | None = None, env: dict | None = None,
                 timeout: float = 240, args: tuple = ()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"server_{self.port}.log"
        cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(ROOT / "monailabel_app"),
               "--studies", studies, "--host", "127.0.0.1", "--port", str(self.port)]
        for k, v in (conf or {}).items():
            cmd += ["--conf", k, str(v)]
        cmd += [str(x) for x in args]  # other start_server options (e.g. --workers 2)
        e = {**os.environ, "MONAI_LABEL_AUTO_UPDATE_SCORING": "false", **(env or {})}
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=workdir, stdout=self.log, stderr=subprocess.STDOUT, env=e,
                                     start_new_session=True)
        wait_until_answering(self.proc, f"{self.url}/info/", timeout, self.stop,
                             lambda: f"server exited with {self.proc.returncode}:\n{self.tail()}",
                             lambda: f"server did not answer within {timeout} s:\n{self.tail()}")

    def tail(self, n: int = 60) -> str:
        if not self.log.closed:
            self.log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def alive(self) -> bool:
        return self.proc.poll() is None and requests.get(f"{self.url}/info/", timeout=30).status_code == 200

    def stop(self) -> None:
        stop_process_group(self.proc)
        self.log.close()


def wait_until_answering(proc: subprocess.Popen, url: str, timeout: float, stop, exited_msg, timeout_msg) -> None:
    """Poll ``url`` until it answers 200; raise (after ``stop()``) if the process exits or time runs out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(exited_msg())
        try:
            if requests.get(url, timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    stop()
    raise RuntimeError(timeout_msg())


def stop_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM the whole process group (a server and the subprocesses it started), then SIGKILL what is left."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def process_group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def openmp_teams(pid: int) -> int | None:
    """How many threads of GNU OpenMP teams the process holds (``gdb`` attached for a moment; None where gdb is
    missing or may not attach)."""
    gdb = shutil.which("gdb")
    if not gdb:
        return None
    out = subprocess.run([gdb, "-p", str(pid), "-batch", "-ex", "thread apply all bt 8"], capture_output=True,
                         text=True, timeout=300).stdout
    if "Thread 1 " not in out:
        return None
    return out.count("gomp_thread_start")
