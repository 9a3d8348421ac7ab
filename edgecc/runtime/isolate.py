"""Running a compiled module where a crash in it cannot take edgecc down.

A module that faults (an integer division by zero, an out-of-bounds access) kills its process
with a signal; verification must report that as an error, not die with it. The module runs in
a forked child: fork costs milliseconds here, where a fresh interpreter importing TVM costs
seconds, and the child shares the parent's loaded libraries and memory copy-on-write.
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import signal
import threading
from typing import Any

from edgecc.errors import EdgeccError


class ModuleCrash(EdgeccError):
    """The compiled module killed its process (a signal) or did not finish in time."""


def _child(artifact, feeds: dict[str, Any], conn) -> None:
    faulthandler.disable()  # the parent reports a crash; an inherited handler would dump a traceback

    def run() -> None:
        try:
            conn.send(("ok", artifact.run(feeds)))
        except BaseException as e:  # the parent re-raises it; nothing may escape a forked child
            conn.send(("raised", e))

    # TVM's thread pool is per calling thread. The one the fork copied belongs to a parent that
    # may have run parallel kernels: it counts on worker threads the child does not have, and a
    # parallel kernel launched from it spins forever. A new thread starts a pool of its own.
    thread = threading.Thread(target=run)
    thread.start()
    thread.join()


def run_isolated(artifact, feeds: dict[str, Any], timeout: float = 600.0) -> dict[str, Any]:
    """`artifact.run(feeds)` in a forked child; its exceptions are re-raised here, and a signal
    or a run past `timeout` seconds becomes a ModuleCrash."""
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(artifact, feeds, send), daemon=True)
    proc.start()
    send.close()
    try:
        if not receive.poll(timeout):
            proc.kill()
            raise ModuleCrash(f"{artifact.path}: compiled module did not finish within {timeout:g} s")
        kind, value = receive.recv()
    except EOFError:  # the child died before it could answer
        proc.join()
        code = proc.exitcode
        how = f"signal {signal.Signals(-code).name}" if code and code < 0 else f"exit code {code}"
        raise ModuleCrash(f"{artifact.path}: compiled module crashed ({how})") from None
    finally:
        receive.close()
        proc.join()
    if kind == "raised":
        raise value
    return value
