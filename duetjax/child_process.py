"""A child process linked to this one by a private socket: how the duet workers and the
data-parallel replicas start.

A fresh interpreter (``subprocess.Popen``, not ``multiprocessing``'s spawn, which would
re-import the parent's ``__main__`` and its JAX first) gets ``env`` at exec, so variables such
as ``CUDA_VISIBLE_DEVICES`` or MPS's thread percentage hold before anything imports JAX. Its
own process group keeps a Ctrl-C at the terminal from reaching it before the parent decides.
"""
from __future__ import annotations

import socket
import subprocess
import sys
from multiprocessing.connection import Connection


def start_child(module: str, env: dict[str, str]) -> tuple[subprocess.Popen, Connection]:
    """Runs ``python -m module FD`` with ``env``; FD is its end of the socket, the returned
    Connection ours."""
    ours, theirs = socket.socketpair()
    try:
        process = subprocess.Popen([sys.executable, "-m", module, str(theirs.fileno())],
                                   pass_fds=(theirs.fileno(),), env=env, start_new_session=True)
    finally:
        theirs.close()
    return process, Connection(ours.detach())
