"""Test harness: run the corpusforge CLI and stop it dead at a chosen filesystem operation.

    python tests/kill_at.py ACTION EVENT ARG GLOB -- <corpusforge arguments>

Before running ``corpusforge <arguments>`` it installs a `sys.addaudithook` hook that, the first
time the audit event EVENT (``os.rename``, ``os.mkdir``, ``os.remove``, ``open``,
``shutil.rmtree``...) fires with its argument number ARG matching GLOB (`fnmatch` on the full
path), sends the process ACTION: ``kill`` (SIGKILL: no cleanup, no ``finally``, exactly what a
crash or an OOM kill leaves) or ``stop`` (SIGSTOP: frozen where it is, to be continued by the test
with SIGCONT). Audit events fire *before* the operation, so ``os.rename ... 1 */index/dense`` stops
the process after the old ``dense`` was moved aside and before the new one is renamed into place.

It touches nothing in the library: the kill points are the library's real filesystem operations,
so the same harness works on any version of the code. Matching is on the operation's path only.
"""

from __future__ import annotations

import fnmatch
import os
import signal
import sys


def main() -> None:
    action, event, arg, pattern = sys.argv[1:5]
    assert sys.argv[5] == "--", "usage: kill_at.py ACTION EVENT ARG GLOB -- <corpusforge arguments>"
    sig = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}[action]
    index = int(arg)
    fired = False

    def hook(name: str, args: tuple) -> None:
        nonlocal fired
        if fired or name != event or len(args) <= index:
            return
        try:
            path = os.fsdecode(args[index])
        except TypeError:  # a file descriptor, not a path
            return
        if fnmatch.fnmatchcase(path, pattern):
            fired = True
            os.kill(os.getpid(), sig)

    sys.addaudithook(hook)
    sys.argv = ["corpusforge", *sys.argv[6:]]
    from corpusforge.cli import app

    app()


if __name__ == "__main__":
    main()
