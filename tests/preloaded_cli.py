"""``python -m diffusion_rl`` for the tests, without paying its imports on every run.

A smoke run spends ~80 % of its CPU importing torch, Lightning and the rest (measured: 5.2 s
of a 6.3 s warm-cache run), and the suite starts over a hundred of them. A server process
imports the package once; for each request it forks a child that runs the CLI exactly as
``python -m diffusion_rl`` would (``runpy`` with ``__main__``, the request's argv, working
directory and environment, stdout / stderr in files), shuts down as an interpreter does
(non-daemon threads joined, ``atexit`` handlers run) and exits with the CLI's status. The
child starts from the server's pristine state, never from an earlier run's.

Protocol (one request at a time per server; the tests keep a pool): the client writes one
JSON line ``{"argv", "cwd", "env", "stdout", "stderr"}``; the server answers
``{"pid": ...}`` when the child starts and ``{"status": ...}`` (``os.waitpid``'s) when it ends.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import sys
import threading
import traceback


def _exit_code(err: SystemExit) -> int:
    code = err.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)  # sys.exit("message"): Python prints it and exits with 1
    return 1


def _child(request: dict) -> None:
    """Runs in the forked child; never returns."""
    code = 1
    try:
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        sys.stdin = open(os.devnull)
        sys.argv = ["diffusion_rl", *request["argv"]]
        sys.path[0] = request["cwd"]  # what `python -m` puts first
        try:
            runpy.run_module("diffusion_rl", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as err:
            code = _exit_code(err)
        except BaseException:  # an uncaught exception: the traceback and status 1, as Python does
            traceback.print_exc()
            code = 1
        threading._shutdown()  # the interpreter's own shutdown: join non-daemon threads,
        atexit._run_exitfuncs()  # then the exit handlers (loggers flushing their files)
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def serve() -> None:
    import diffusion_rl.cli  # noqa: F401  (the imports every run pays: torch, Lightning, Hydra)
    import diffusion_rl.runner  # noqa: F401

    reply = sys.stdout
    print(json.dumps({"ready": True}), file=reply, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        print(json.dumps({"pid": pid}), file=reply, flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"status": status}), file=reply, flush=True)


if __name__ == "__main__":
    serve()
