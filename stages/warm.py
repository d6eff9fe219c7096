"""The ``cmds-ad`` entry point, and a fork server for stage commands (``cmds-ad warm``).

Every DVC stage instance is a fresh ``cmds-ad`` process that spends seconds importing torch,
diffusers, transformers and timm before its work. ``cmds-ad warm -- dvc repro`` starts a server
that imports them once (imports only: a process that has computed with threads must not fork),
runs the command with ``CMDS_AD_SERVER=<socket>`` in its environment, and stops the server after
it. A ``cmds-ad`` stage command that sees the variable sends its argv, working folder,
environment and stdin/stdout/stderr to the server, which forks a child that runs the same
command line in-process; the client relays SIGINT/SIGTERM/SIGHUP to the child and exits as the
child did. The client runs the command in its own process instead (the same outputs, only
slower) whenever the server cannot promise the result of a fresh process: no answer, the
project's Python sources changed since the server started, an environment variable that
differs (beside ``ALLOWED_ENV``, what DVC and the shell add to a stage's environment), other
resource limits or CPUs, a second thread or a CUDA driver in the server. With
``CMDS_AD_TIMINGS`` or ``CMDS_AD_VERBOSE`` set it says why on stderr (one line).

This module's top level imports the standard library only: it is what every ``cmds-ad`` process
imports first. docs/decisions.md says why a fork server and what it guarantees.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys
from pathlib import Path

from stages.commands import STAGE_COMMANDS, STAGE_NAMES
from stages.project_code import installed_root, other_project_code, rerun_with

SERVER_ENV = "CMDS_AD_SERVER"
# Variables that may differ between the server's start and a stage: what DVC adds to a stage's
# environment (`dvc repro`, `dvc exp run`; printed by a stage `cmd: env`), what the shell that
# runs the stage's cmd sets, and ours that are read at run time only. Nothing else: any other
# variable may be read at import time (OMP_NUM_THREADS, HF_HUB_OFFLINE, ...).
ALLOWED_ENV = frozenset({
    SERVER_ENV, "CMDS_AD_TIMINGS", "CMDS_AD_VERBOSE", "CMDS_AD_DVC_PID",
    "DVC_ROOT", "DVC_STAGE", "DVC_EXP_BASELINE_REV", "DVC_EXP_NAME",
    "SHLVL", "_", "PWD", "OLDPWD",
})
ALLOWED_ENV_PREFIXES = ("DVC_EXP_", "DVC_STUDIO_")  # `dvc exp run` (queue): its name, Studio
# The project's packages whose .py files the server digests (a stale server never runs old code).
PACKAGES = ("pipeline", "stages", "scheduler", "experiments", "tools")
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
REPLY_TIMEOUT_S = 900.0  # the first answer comes after the server's imports (minutes when loaded)


def main() -> object:
    """``cmds-ad``: a command that DVC runs in a project whose sources differ from the
    installed ones runs again with the project's code (stages/project_code.py); then a stage
    command goes to the warm server when there is one, else (and for every other command) the
    command line of stages/cli.py runs in this process."""
    argv = sys.argv
    other = other_project_code(os.environ, Path.cwd())
    if other is not None:
        project, rel = other
        sys.stderr.write(f"cmds-ad: running the code of the DVC workspace {project}: its {rel} "
                         f"differs from the installed code's ({installed_root()})\n")
        rerun_with(project, argv)
    path = os.environ.get(SERVER_ENV)
    if path and len(argv) > 1 and argv[1] in STAGE_NAMES:
        status = _client(path, argv)
        if status is not None:
            _exit_as(*status)
    elif path and len(argv) > 1:
        _say(f"{argv[1]} is not a stage command")
    from stages.cli import app

    return app()


# ------------------------------------------------------------------------------ client

def _verbose() -> bool:
    return any(os.environ.get(v, "") not in ("", "0") for v in ("CMDS_AD_TIMINGS", "CMDS_AD_VERBOSE"))


def _say(why: str) -> None:
    if _verbose():
        sys.stderr.write(f"cmds-ad: not using the warm server: {why}; running in this process\n")


def _die_with_parent() -> None:
    """Linux: this client dies with the process that started it (as stages/cli.py's own
    process does); the server then kills the child whose connection closed."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        os._exit(1)


def _request(argv: list[str]) -> bytes:
    limits = {name: _resource_limit(name) for name in _limit_names()}
    body = json.dumps({
        "argv": argv, "cwd": os.getcwd(), "env": dict(os.environ), "umask": _umask(),
        "pid": os.getpid(), "uid": os.getuid(), "executable": sys.executable,
        "path": sys.path, "limits": limits, "cpus": _cpus(),
    }).encode()
    return struct.pack("!I", len(body)) + body


def _client(path: str, argv: list[str]) -> tuple[str, int] | None:
    """Run ``argv`` in a child of the server at ``path``: ("exit", code) or ("signal", number)
    as the child ended; None when the server cannot run it (this process runs it then)."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            _say(f"file descriptor {fd} is closed")
            return None
    _die_with_parent()
    child: list[int] = []
    pending: list[int] = []

    def relay(number: int, _frame: object) -> None:
        if child:
            try:
                os.killpg(child[0], number)
            except ProcessLookupError:
                pass
        else:
            pending.append(number)

    previous = {s: signal.signal(s, relay) for s in SIGNALS}
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(10)
        sock.connect(path)
        data = _request(argv)
        sent = socket.send_fds(sock, [data], [0, 1, 2])
        if sent < len(data):
            sock.sendall(data[sent:])
        sock.settimeout(REPLY_TIMEOUT_S)
        reader = sock.makefile("rb")
        first = reader.readline().decode().split(" ", 1)
        sock.settimeout(None)
    except OSError as err:
        _say(f"{path} does not answer ({err})")
        sock.close()
        _restore(previous, pending)
        return None
    if first[0] != "started":
        _say(first[1].strip() if len(first) > 1 else "the server closed the connection")
        sock.close()
        _restore(previous, pending)
        return None
    child.append(int(first[1]))
    for number in pending:
        relay(number, None)
    last = reader.readline().decode().split()
    if len(last) != 2 or last[0] not in ("exit", "signal"):
        sys.stderr.write("error: the warm server stopped while it ran this stage\n")
        return ("exit", 1)
    return (last[0], int(last[1]))


def _restore(previous: dict, pending: list[int]) -> None:
    for number, handler in previous.items():
        signal.signal(number, handler)
    for number in pending:  # a signal that came before the server answered
        os.kill(os.getpid(), number)


def _exit_as(how: str, number: int) -> None:
    """Exit with the child's code, or die of the signal that ended it (as a fresh process)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if how == "signal":
        signal.signal(number, signal.SIG_DFL)
        os.kill(os.getpid(), number)
        number = 128 + number
    os._exit(number)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _limit_names() -> list[str]:
    import resource

    return sorted(n for n in dir(resource) if n.startswith("RLIMIT_"))


def _resource_limit(name: str) -> list[int]:
    import resource

    return list(resource.getrlimit(getattr(resource, name)))


def _cpus() -> list[int] | None:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


# ------------------------------------------------------------------------------ server

def source_digest() -> str:
    """A digest of the path, size and modification time of every .py file of the project's
    packages (where they are imported from)."""
    import hashlib
    import importlib.util

    digest = hashlib.sha256()
    for package in PACKAGES:
        spec = importlib.util.find_spec(package)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            for root, dirs, files in os.walk(folder):
                dirs[:] = sorted(d for d in dirs if d != "__pycache__")
                for name in sorted(f for f in files if f.endswith(".py")):
                    stat = os.stat(os.path.join(root, name))
                    digest.update(f"{root}/{name} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


# What the stages import, lazily included: the server imports it all once.
WARM_MODULES = (
    "stages.cli", "pipeline.params", "pipeline.errors", "pipeline.limits", "pipeline.outputs",
    *(f"stages.{module}" for module in STAGE_COMMANDS),
    "torch", "torchvision", "timm", "safetensors.torch", "safetensors", "peft", "peft.utils",
    "transformers", "diffusers", "diffusers.optimization", "diffusers.utils",
    "diffusers.pipelines.marigold.marigold_image_processing",
    "scipy.ndimage", "scipy.sparse", "scipy.sparse.csgraph", "zarr",
    "pipeline.data", "pipeline.data.preprocess", "pipeline.bundle",
)
WARM_ATTRIBUTES = {  # lazy packages: the attribute access imports the class's module
    "diffusers": ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
                  "MarigoldNormalsPipeline", "AutoencoderKL", "UNet2DConditionModel",
                  "DDIMScheduler", "DDPMScheduler", "EulerAncestralDiscreteScheduler"),
    "transformers": ("CLIPTextConfig", "CLIPTextModel", "CLIPTokenizer"),
    "peft": ("LoraConfig", "inject_adapter_in_model"),
}


def _warm_up() -> str | None:
    """Import WARM_MODULES (one that fails is left to the stage, which reports it); a reason
    to refuse every request, or None."""
    import importlib

    for name in WARM_MODULES:
        try:
            module = importlib.import_module(name)
            for attribute in WARM_ATTRIBUTES.get(name, ()):
                getattr(module, attribute)
        except Exception as err:  # noqa: BLE001 - the stage's own import reports it
            if _verbose():
                sys.stderr.write(f"cmds-ad warm: importing {name} failed: {err}\n")
    try:
        with open("/proc/self/maps") as maps:
            if "libcuda.so" in maps.read():
                return "the server loaded the CUDA driver (a forked child cannot use it)"
    except OSError:
        pass
    return None


def _stop_blas_threads() -> None:
    """Shut down OpenBLAS's idle thread pools (numpy's and scipy's start theirs when loaded),
    as OpenBLAS's own fork handler does; a BLAS call starts them again."""
    import ctypes

    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split(None, 5)[-1].strip() for line in maps if "openblas" in line}
    except OSError:
        return
    for path in sorted(paths):
        try:
            ctypes.CDLL(path).blas_thread_shutdown_()
        except (OSError, AttributeError):
            pass


def _threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        import threading

        return threading.active_count()


class _Start:
    """What the server was started with, against which a request is compared."""

    def __init__(self) -> None:
        self.digest = source_digest()
        self.env = dict(os.environ)
        self.path = list(sys.path)
        self.executable = os.path.realpath(sys.executable)
        self.limits = {name: _resource_limit(name) for name in _limit_names()}
        self.cpus = _cpus()

    def mismatch(self, request: dict) -> str | None:
        """Why a fresh process could behave otherwise than a child of this server, or None."""
        env = request["env"]
        for key in sorted(set(env) | set(self.env)):
            if (key not in ALLOWED_ENV and not key.startswith(ALLOWED_ENV_PREFIXES)
                    and env.get(key) != self.env.get(key)):
                return f"the environment variable {key} differs from the server's"
        if request["uid"] != os.getuid():
            return "another user"
        if os.path.realpath(request["executable"]) != self.executable:
            return f"another Python ({request['executable']})"
        if request["path"][1:] != self.path:
            return "another sys.path"
        if request["limits"] != self.limits:
            return "other resource limits (ulimit)"
        if request["cpus"] != self.cpus:
            return "another CPU affinity"
        if source_digest() != self.digest:
            return "the project's sources changed since the server started"
        return None


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    conn.settimeout(30)
    data, fds, _flags, _addr = socket.recv_fds(conn, 1 << 16, 3)
    if len(fds) != 3 or len(data) < 4:
        for fd in fds:
            os.close(fd)
        raise OSError("a request without its three file descriptors")
    size = struct.unpack("!I", data[:4])[0]
    while len(data) < 4 + size:
        more = conn.recv(1 << 16)
        if not more:
            raise OSError("the request ended early")
        data += more
    conn.settimeout(None)
    return json.loads(data[4:4 + size]), fds


def serve(path: str) -> None:
    """The server's main loop: one child per request, reaped on SIGCHLD; the exit status goes
    back to the client; a client that goes away takes its child with it (SIGKILL)."""
    import selectors

    start = _Start()
    children: dict[int, socket.socket] = {}
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".tmp")
    listener.listen(64)
    os.rename(path + ".tmp", path)  # clients queue from here on, while the imports run
    _die_with_parent()
    refusal = _warm_up()
    import gc

    gc.collect()
    gc.freeze()  # the children's collections skip (and do not copy) the server's objects
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    os.set_blocking(wake_r, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGTERM, lambda *_: _stop(children))
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, "accept")
    selector.register(wake_r, selectors.EVENT_READ, "signal")
    while True:
        for key, _ in selector.select():
            if key.data == "accept":
                conn, _ = listener.accept()
                _answer(conn, start, refusal, children, selector,
                        [listener, wake_r, wake_w, selector])
            elif key.data == "signal":
                while True:
                    try:
                        if not os.read(wake_r, 512):
                            break
                    except BlockingIOError:
                        break
                _reap(children, selector)
            else:  # a client's connection: it closed, or wrote what it must not
                pid = key.data
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                selector.unregister(key.fileobj)


def _stop(children: dict[int, socket.socket]) -> None:
    for pid in children:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    os._exit(0)


def _answer(conn, start: _Start, refusal: str | None, children: dict, selector,
            inherited: list) -> None:
    """Fork a child for the request on ``conn``, or tell the client why not."""
    import selectors

    try:
        request, fds = _receive(conn)
    except (OSError, ValueError) as err:
        _reply(conn, f"fallback the request could not be read ({err})")
        conn.close()
        return
    _stop_blas_threads()
    threads = _threads()
    why = refusal or start.mismatch(request) or (
        f"the server runs {threads} threads" if threads != 1 else None)
    if why:
        _reply(conn, f"fallback {why}")
        conn.close()
        for fd in fds:
            os.close(fd)
        return
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    pid = os.fork()
    if pid == 0:
        _child(request, fds, [conn, *children.values(), *inherited], blocked)
    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    for fd in fds:
        os.close(fd)
    children[pid] = conn
    _reply(conn, f"started {pid}")
    selector.register(conn, selectors.EVENT_READ, pid)


def _reply(conn: socket.socket, line: str) -> None:
    try:
        conn.sendall(line.encode() + b"\n")
    except OSError:
        pass


def _reap(children: dict, selector) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is None:
            continue
        if os.WIFSIGNALED(status):
            _reply(conn, f"signal {os.WTERMSIG(status)}")
        else:
            _reply(conn, f"exit {os.waitstatus_to_exitcode(status)}")
        try:
            selector.unregister(conn)
        except (KeyError, ValueError):
            pass
        conn.close()


# ------------------------------------------------------------------------------ child

def _child(request: dict, fds: list[int], inherited: list, blocked: set) -> None:
    """In the forked child: become the client's process (stdio, folder, environment, argv,
    signals), run the command line as ``cmds-ad`` would, and exit as a fresh process would."""
    code = 1
    try:
        for item in inherited:
            item.close() if hasattr(item, "close") else os.close(item)
        signal.set_wakeup_fd(-1)
        _default_signals()
        os.setpgid(0, 0)  # the client signals this group; the server kills it
        _die_with_parent()  # the server
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        _become(request, fds)
        if _verbose():
            sys.stderr.write(f"cmds-ad: running in a child of the warm server (pid {os.getpid()})\n")
        code = _run_cli(request["pid"])
    except BaseException:  # noqa: BLE001 - before the command line ran: say why, exit 1
        import traceback

        traceback.print_exc()
    finally:
        _exit_child(code)


def _default_signals() -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for number in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(number, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as Python sets it at start


def _become(request: dict, fds: list[int]) -> None:
    import io

    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    for target, fd in zip((0, 1, 2), fds):
        os.dup2(fd, target)
    for fd in fds:
        if fd > 2:
            os.close(fd)
    os.chdir(request["cwd"])
    os.umask(request["umask"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = list(request["argv"])
    sys.path.insert(0, request["path"][0])
    for name, fd in (("stdin", 0), ("stdout", 1), ("stderr", 2)):
        old = getattr(sys, name)
        raw = io.FileIO(fd, "rb" if fd == 0 else "wb", closefd=False)
        buffered = io.BufferedReader(raw) if fd == 0 else io.BufferedWriter(raw)
        stream = io.TextIOWrapper(buffered, encoding=old.encoding, errors=old.errors,
                                  line_buffering=fd == 2 or raw.isatty(),
                                  write_through=old.write_through)
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)


def _run_cli(client_pid: int) -> int:
    """Run stages/cli.py's command line; the exit code a fresh interpreter would return."""
    import pipeline.outputs
    import stages.cli as cli

    cli._CALLER = client_pid
    pipeline.outputs.COMMAND_WORDS = [sys.executable, *sys.argv]  # the client's, as it runs
    try:
        cli.app(prog_name="cmds-ad")
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or 0
        sys.stderr.write(f"{stop.code}\n")
        return 1
    except KeyboardInterrupt:
        sys.excepthook(*sys.exc_info())
        _finish()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:  # noqa: BLE001 - as the interpreter would: traceback, exit 1
        sys.excepthook(*sys.exc_info())
        return 1
    return 0


def _finish() -> None:
    """What a fresh interpreter does at exit: wait for non-daemon threads, run atexit."""
    import atexit
    import threading

    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()


def _exit_child(code: int) -> None:
    try:
        _finish()
    finally:
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                stream.flush()
            except (OSError, ValueError, AttributeError):
                pass
        os._exit(code)


# ------------------------------------------------------------------------------ cmds-ad warm

SERVE = "import sys; from stages.warm import serve; serve(sys.argv[1])"


def run_warm(command: list[str]) -> int:
    """Start a server, run ``command`` with CMDS_AD_SERVER set, stop the server; the
    command's exit code (128 + N for a command killed by signal N)."""
    import shutil
    import subprocess
    import tempfile
    import time

    folder = tempfile.mkdtemp(prefix="cmds-ad-warm-")  # mode 0700: this user's only
    path = os.path.join(folder, "server.sock")
    server = subprocess.Popen([sys.executable, "-P", "-c", SERVE, path], start_new_session=True)
    proc = None
    stop = signal.getsignal(signal.SIGTERM)
    try:
        while not os.path.exists(path) and server.poll() is None:
            time.sleep(0.01)
        env = dict(os.environ)
        if server.poll() is None:
            env[SERVER_ENV] = path
        else:
            sys.stderr.write("cmds-ad warm: the server did not start; running without it\n")
        signal.signal(signal.SIGTERM, lambda n, _f: proc and proc.send_signal(n))
        try:
            proc = subprocess.Popen(command, env=env)
        except OSError as err:
            sys.stderr.write(f"error: cannot run {command[0]}: {err}\n")
            return 127
        while True:
            try:
                code = proc.wait()
                break
            except KeyboardInterrupt:  # Ctrl-C reached the command too: wait for it
                continue
        return code if code >= 0 else 128 - code
    finally:
        signal.signal(signal.SIGTERM, stop)
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        shutil.rmtree(folder, ignore_errors=True)
