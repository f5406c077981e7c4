"""A fork server for `run_cli`: one process per test worker imports torch, transformers and compressor once, then
forks a fresh child for every `compress ...` call. Each child is its own process (its own exit status, stdout,
stderr, and a traceback on stderr if one escapes), running `compressor.cli` as `__main__` exactly as
`python -m compressor.cli` would; what it saves is the 2-3 s of imports every CLI start-up paid (about 200 CLI
runs in the suite). conftest.run_cli uses it only when the call's environment is the one the server started
with, and falls back to a plain subprocess otherwise (another env, a concurrent call, a server that died).

Protocol on the server's stdin/stdout, one JSON object a line: the request {"argv": [...], "env": {...}, "out": path,
"err": path}; the replies {"pid": N} when the child has started, then {"status": returncode} (negative: the signal
that ended it, as subprocess reports it)."""
from __future__ import annotations

import json
import os
import sys


def _child(argv: list[str], env: dict, out: str, err: str) -> None:
    import atexit
    import runpy
    import signal
    import traceback

    signal.signal(signal.SIGINT, signal.default_int_handler)  # the handlers a fresh interpreter starts with
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(fd, 0)
    for path, target in ((out, 1), (err, 2)):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, target)
        os.close(fd)
    os.environ.clear()
    os.environ.update(env)  # the server's own but for PYTEST_CURRENT_TEST (conftest.run_cli checks)
    sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__  # fds 1 and 2, now the run's own files
    sys.argv = ["-m", *argv]  # run_module puts the module's file in argv[0], as -m does
    code = 0
    try:
        runpy.run_module("compressor.cli", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:  # as CPython ends on one: the traceback, then killed by SIGINT
        traceback.print_exc()
        code = -signal.SIGINT
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    try:
        atexit._run_exitfuncs()
    finally:
        for s in (sys.stdout, sys.stderr):
            try:
                s.flush()
            except Exception:
                pass
        if code == -signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        os._exit(code & 0xFF)


def main() -> None:
    root = os.getcwd()
    sys.path[0] = root  # what `python -m` puts first: the current directory (the checkout)
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import compressor  # noqa: F401  (the package __init__ imports the API, as `-m compressor.cli` does first)

    from transformers import AutoConfig, PreTrainedModel  # noqa: F401  (resolved lazily otherwise, ~1 s)
    import transformers.models.llama.modeling_llama  # noqa: F401

    reply = sys.stdout
    sys.stdout = sys.stderr  # nothing else may write on the reply channel
    print(json.dumps({"ready": True}), file=reply, flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        sys.stderr.flush()
        reply.flush()
        pid = os.fork()
        if pid == 0:
            try:
                _child(req["argv"], req["env"], req["out"], req["err"])
            finally:
                os._exit(1)
        print(json.dumps({"pid": pid}), file=reply, flush=True)
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(json.dumps({"status": code}), file=reply, flush=True)


if __name__ == "__main__":
    main()
