"""Starts leadbot.py for the tests in a few milliseconds instead of a quarter of a second (see fakes.start_bot).

`python -u leadbot.py` spends about 0.25 s importing requests and the standard library and compiling the
program, and the suite starts the bot about 190 times. So fakes.start_fork_server() (called by conftest.py
as pytest starts) runs this script once: it imports the libraries leadbot.py, llm.py, store.py and mailer.py
use (third-party and standard modules only, never the program's own files) and waits on a Unix socket (file
descriptor argv[1]) for start orders: the bot's script, arguments, folder and environment, with the files for
stdin, stdout and stderr attached. For each it forks twice: the grandchild runs the script as
`python -u script args` would (as __main__, with sys.argv and sys.path[0] of the script, the environment
replaced as a whole, the files as its descriptors 0, 1 and 2 and new sys.stdin/stdout/stderr on them, and a
normal interpreter exit), and, the middle process exiting at once, becomes the child of the test process,
which registered as a child subreaper: signals, kill -9 and exit codes are the real ones. The answer to an
order is the pid. The script and the Python files beside it are compiled here once per content (see
_compiled), so a bot compiles only what changed.

fakes.py uses this only when the test's environment, the bot's own settings aside (leadbot reads those
itself, after start-up), is the one this server started with; TESTS_COLD_START=1 starts every bot the plain
way, and so does tests/benchmark.py, which does not call start_fork_server().
"""
import sys

del sys.path[0]  # this folder: the bot's script gets its own folder there, as Python gives it

import importlib.machinery  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import warnings  # noqa: E402

# Whatever these imports print (a library's warning, say) is kept and shown as each bot's own output.
_early_stderr, sys.stderr = sys.stderr, io.StringIO()
for _name in ("requests", "dotenv", "urllib3", "argparse", "collections", "contextlib", "copy", "csv",
              "dataclasses", "datetime", "difflib", "email.message", "email.policy", "email.utils", "logging",
              "pathlib", "queue", "random", "re", "secrets", "signal", "smtplib", "ssl", "statistics",
              "textwrap", "threading", "time", "traceback", "types", "urllib.parse"):
    try:
        __import__(_name)
    except Exception:  # noqa: BLE001 - the bot's own import then fails the way it would have anyway
        pass
_early_output, sys.stderr = sys.stderr.getvalue(), _early_stderr


# Python files compiled here, once per content, and reused by every bot forked later: (path, source) -> code.
# Only what compiles without a warning is kept (a warning must reach the bot's own stderr); a file changed
# since is a new key, so a bot always runs exactly the source it reads.
_compiled = {}
_compile_source = importlib.machinery.SourceFileLoader.source_to_code


def _compile(data, path):
    key = (path, bytes(data))
    if key not in _compiled:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                code = compile(data, path, "exec", dont_inherit=True)
            except SyntaxError:
                code = None  # the bot gets the error itself
        _compiled[key] = None if caught else code
    return _compiled[key]


def _source_to_code(self, data, path, *, _optimize=-1):
    """The import system's compile step, taking the code compiled here when the source is the same."""
    code = _compiled.get((path, bytes(data))) if _optimize == -1 else None
    return code if code is not None else _compile_source(self, data, path, _optimize=_optimize)


importlib.machinery.SourceFileLoader.source_to_code = _source_to_code


def _precompile(script):
    """The script and the Python files beside it (the modules it imports from its folder)."""
    folder = os.path.dirname(os.path.abspath(script))
    try:
        paths = [script] + sorted(os.path.join(folder, name) for name in os.listdir(folder) if name.endswith(".py"))
    except OSError:
        return
    for path in paths[:20]:
        try:
            with open(path, "rb") as f:
                _compile(f.read(), path)
        except OSError:
            pass


def _become(order, files):
    """In the grandchild: turn into `python -u script args` with these stdin, stdout and stderr."""
    for target, fd in enumerate(files):
        os.dup2(fd, target)
        os.close(fd)
    # New stdio objects for the new descriptors, made as Python makes them at start-up with -u (the
    # server's own would remember what its descriptors were, seekable or not).
    for fd, name in enumerate(("stdin", "stdout", "stderr")):
        old = getattr(sys, name)
        binary = io.open(fd, "rb" if fd == 0 else "wb", buffering=-1 if fd == 0 else 0, closefd=False)
        stream = io.TextIOWrapper(binary, encoding=old.encoding, errors=old.errors, newline="\n",
                                  line_buffering=False, write_through=fd != 0)
        stream.mode = "r" if fd == 0 else "w"
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)
    os.chdir(order["cwd"])
    os.environ.clear()
    os.environ.update(order["env"])
    import time
    time.tzset()
    if _early_output:
        sys.stderr.write(_early_output)
    script = order["script"]
    sys.argv = [script, *order["args"]]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    import types
    main = types.ModuleType("__main__")
    main.__file__, main.__builtins__, main.__cached__ = script, __builtins__, None
    sys.modules["__main__"] = main  # kept there until the interpreter exits, as a script's is
    try:
        with open(script, "rb") as f:
            source = f.read()
    except OSError as error:
        sys.stderr.write(f"{sys.executable}: can't open file {script!r}: [Errno {error.errno}] {error.strerror}\n")
        sys.exit(2)
    code = _compiled.get((script, source)) or compile(source, script, "exec", dont_inherit=True)
    exec(code, main.__dict__)
    sys.exit()  # the script ended without sys.exit: exit code 0, as Python gives it


def _serve(server):
    global _serving
    while True:
        message, files, _, _ = socket.recv_fds(server, 1 << 20, 3)
        if not message:
            return  # the test run ended
        order = json.loads(message)
        _precompile(order["script"])
        pid_pipe = os.pipe()
        middle = os.fork()
        if middle == 0:
            bot = os.fork()
            if bot == 0:
                _serving = False
                server.close()
                for fd in pid_pipe:
                    os.close(fd)
                return _become(order, files)
            os.write(pid_pipe[1], str(bot).encode())
            os._exit(0)
        os.close(pid_pipe[1])
        pid = os.read(pid_pipe[0], 64)
        os.close(pid_pipe[0])
        os.waitpid(middle, 0)  # once it is gone, the bot is the test process's child
        for fd in files:
            os.close(fd)
        server.send(pid)


_serving = True  # False in a bot: what it raises is its own
try:
    _serve(socket.socket(fileno=int(sys.argv[1])))
except KeyboardInterrupt:  # Ctrl+C on the test run: the server goes quietly
    if _serving:
        sys.exit(130)
    raise
