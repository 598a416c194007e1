"""Run untrusted Python (a model's code completion and its tests) in its own process with limits.

A GUARD AGAINST ACCIDENTS, NOT A SECURITY BOUNDARY. It stops the usual ways a wrong completion hurts an
evaluation run (an infinite loop, a memory bomb, a runaway file, a stray network call, a completion that exits
early to look like a pass), but code that sets out to escape can: it runs as the same user, with the same
file-system view (it starts in an empty temporary folder, nothing more), and can read the runner's memory.
Run evaluations of models you do not trust in a container or VM.

Each program runs in a fresh `python -I` (isolated: no user site, no PYTHON* variables, no current folder on
sys.path) in a new session (its whole process group is killed at the end), in an empty temporary folder, with:

  - wall-clock timeout (`timeout` seconds; the process group is killed),
  - RLIMIT_CPU (CPU seconds), RLIMIT_AS (address space = memory), RLIMIT_FSIZE (largest file it may write),
    RLIMIT_CORE 0 and a small RLIMIT_NOFILE,
  - no network: a new, empty network namespace via `unshare -rn` where the kernel allows it, and in every
    case `socket.socket` / `socket.create_connection` / `socket.getaddrinfo` replaced by functions that raise
    before the program runs,
  - stdout/stderr to files in the folder (bounded by RLIMIT_FSIZE; only their tails are read back).

A program passes only if it runs to its end: the runner writes a nonce (sent on stdin, unknown to the
program's text) to a result file after the program returns, so `sys.exit(0)`, `os._exit(0)` or a kill
before the end of the tests is a failure, never a pass.
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

# Runs inside the child, before the program. Reads the nonce, cuts the network, runs the program, and only
# after it returned writes the nonce to the result file.
_RUNNER = r"""
import resource, sys
for _name, _value in {limits}.items():
    resource.setrlimit(getattr(resource, _name), _value)
_nonce = sys.stdin.readline().strip()
sys.stdin.close()
import socket as _socket
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in the evaluation sandbox")
_socket.socket = _no_network
_socket.create_connection = _no_network
_socket.getaddrinfo = _no_network
_socket.socketpair = _no_network
import traceback
_globals = {"__name__": "__main__", "__builtins__": __builtins__}
try:
    with open("program.py", encoding="utf-8") as _f:
        _code = compile(_f.read(), "program.py", "exec")
    exec(_code, _globals)
except BaseException:  # noqa: B036 (SystemExit too: exiting early is not passing)
    _globals.clear()  # frees what a memory bomb holds, so the traceback can be printed
    traceback.print_exc()
    sys.stderr.flush()
    import os
    os._exit(3)
with open("result", "w") as _f:
    _f.write(_nonce)
"""


@dataclass
class Limits:
    timeout: float = 10.0  # wall-clock seconds
    cpu_seconds: int = 10
    memory_bytes: int = 1 << 30  # address space: 1 GiB
    file_bytes: int = 16 << 20  # largest file the program may write (stdout/stderr included)
    open_files: int = 64

    def __post_init__(self):
        if self.timeout <= 0 or self.cpu_seconds < 1 or self.memory_bytes < (64 << 20) or self.file_bytes < 4096:
            raise ValueError(f"sandbox limits out of range: {self}")


@dataclass
class Outcome:
    passed: bool
    status: str  # "passed", "failed", "timed out", "memory", "exited early"
    detail: str  # last line of stderr, or why it was stopped
    seconds: float


def _rlimits(limits: Limits) -> dict:  # set by the runner itself, first thing in the child
    return {"RLIMIT_CPU": (limits.cpu_seconds, limits.cpu_seconds + 1),
            "RLIMIT_AS": (limits.memory_bytes, limits.memory_bytes),
            "RLIMIT_FSIZE": (limits.file_bytes, limits.file_bytes),
            "RLIMIT_CORE": (0, 0), "RLIMIT_NOFILE": (limits.open_files, limits.open_files)}  # fmt: skip


@functools.cache
def network_namespace() -> bool:
    """True when `unshare -rn` can give a child an empty network namespace here (probed once)."""
    exe = shutil.which("unshare")
    if exe is None or not sys.platform.startswith("linux"):
        return False
    try:
        r = subprocess.run([exe, "-rn", sys.executable, "-I", "-c", "import socket; socket.socket().connect(('1.1.1.1', 53))"],
                           capture_output=True, timeout=20)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return False
    # inside an empty namespace the connect fails with "Network is unreachable"; anything else: not usable
    return r.returncode != 0 and b"unreachable" in r.stderr.lower()


def guard_description() -> str:
    net = "empty network namespace (unshare -rn) + socket guard" if network_namespace() else "socket guard only"
    return f"own process per program, rlimits (CPU, memory, file size), wall timeout, {net}"


def _tail(path: str, n: int = 4096) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def run_program(source: str, limits: Limits | None = None) -> Outcome:
    """Run `source` (a whole Python program) under the guard; passed iff it ran to its end."""
    import time

    limits = limits or Limits()
    nonce = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="deepseek-sandbox-") as work:
        with open(os.path.join(work, "program.py"), "w", encoding="utf-8") as f:
            f.write(source)
        cmd = [sys.executable, "-I", "-c", _RUNNER.replace("{limits}", repr(_rlimits(limits)))]
        if network_namespace():
            cmd = [shutil.which("unshare"), "-rn", *cmd]
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": work, "TMPDIR": work,
               "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}  # fmt: skip
        out_path, err_path = os.path.join(work, "stdout"), os.path.join(work, "stderr")
        start = time.perf_counter()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.PIPE, stdout=out, stderr=err,
                                    start_new_session=True)  # fmt: skip
            timed_out = False
            try:
                proc.communicate((nonce + "\n").encode(), timeout=limits.timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the program's children too
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
        seconds = time.perf_counter() - start
        try:
            with open(os.path.join(work, "result")) as f:
                finished = f.read() == nonce
        except OSError:
            finished = False
        err_tail = _tail(err_path)
    last = next((line for line in reversed(err_tail.strip().splitlines()) if line.strip()), "")
    rc = proc.returncode
    if finished and not timed_out:
        return Outcome(True, "passed", "", seconds)
    if timed_out:
        return Outcome(False, "timed out", f"killed after {limits.timeout:g} s wall clock", seconds)
    if rc == -signal.SIGXCPU:
        return Outcome(False, "timed out", f"CPU limit {limits.cpu_seconds} s", seconds)
    if "MemoryError" in err_tail:
        return Outcome(False, "memory", last, seconds)
    if rc == 3:
        return Outcome(False, "exited early" if "SystemExit" in last else "failed", last, seconds)
    if rc < 0:
        return Outcome(False, "failed", f"killed by {signal.Signals(-rc).name}", seconds)
    return Outcome(False, "exited early", f"the program ended before its tests finished (exit status {rc})", seconds)


def run_programs(sources: list[str], limits: Limits | None = None, workers: int | None = None,
                 show_progress: bool = False) -> list[Outcome]:  # fmt: skip
    """run_program over many programs, `workers` at a time (default: the CPU count), results in order."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    workers = workers or max(1, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        it = pool.map(functools.partial(run_program, limits=limits), sources)
        return list(tqdm(it, total=len(sources), desc="execute", unit="prog", disable=not show_progress))
