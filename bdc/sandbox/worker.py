"""The sandbox worker: a warm fork server that runs untrusted programs in isolation.

Run by the host as ``python -E -s -S worker.py CONFIG_JSON`` with a scrubbed environment; it
imports only the standard library and ``protocol.py`` beside it. Process layout::

    host ──frames── worker (fork server and supervisor; isolated once at start-up)
                      └─ program process (one per run: PID 1 of new PID + mount namespaces,
                                          own empty /tmp, no capabilities, rlimits)

Why this shape: cloning a warm interpreter costs well under a millisecond, starting one costs
tens, and a program that is PID 1 of its own PID namespace takes every process it spawned
(fork bombs, detached daemons) with it when it is killed. Expected outputs never enter any of these
processes: the host sends only programs and call arguments and compares results itself.
"""

from __future__ import annotations

import builtins
import contextlib
import ctypes
import io
import json
import os
import resource
import selectors
import shutil
import signal
import sys
import tempfile
import time
import traceback

try:  # imported as part of the package (tests, tooling)
    from bdc.sandbox import protocol
except ImportError:  # run as a script inside the sandbox, where only this folder is visible
    import protocol  # type: ignore[no-redef]

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_SECUREBITS, PR_SET_NO_NEW_PRIVS = 1, 4, 28, 38
SECBIT_LOCKED_NOROOT = 0x0F  # NOROOT + NO_SETUID_FIXUP, both locked
SYS_CLONE, SYS_PIVOT_ROOT = 56, 155  # x86_64
STDERR_TAIL = 4096

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None):
    def enc(s):
        return (s.encode() if s is not None else None)
    _check(_libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {src or fstype} on {target}")


def _prctl(option: int, arg: int) -> int:
    return _libc.prctl(option, ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0),
                       ctypes.c_ulong(0))


# --------------------------------------------------------------------------- isolation (once)

def _join_cgroup(name: str, memory_mb: int, pids: int) -> str:
    """Put the worker (and so every program it runs) under a memory and process ceiling."""
    own = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for c in controllers.split(","):
                own[c] = path
    root = "/sys/fs/cgroup"
    if os.path.exists(f"{root}/cgroup.controllers"):  # cgroup v2
        d = f"{root}{own['']}/{name}".replace("//", "/")
        os.makedirs(d, exist_ok=True)
        for knob, value in (("memory.max", memory_mb << 20), ("pids.max", pids)):
            with open(f"{d}/{knob}", "w") as f:
                f.write(str(value))
        with open(f"{d}/cgroup.procs", "w") as f:
            f.write(str(os.getpid()))
        return d
    dirs = []
    for ctl, knob, value in (("memory", "memory.limit_in_bytes", memory_mb << 20),
                             ("pids", "pids.max", pids)):
        d = f"{root}/{ctl}{own.get(ctl, '/')}/{name}".replace("//", "/")
        os.makedirs(d, exist_ok=True)
        with open(f"{d}/{knob}", "w") as f:
            f.write(str(value))
        with open(f"{d}/cgroup.procs", "w") as f:
            f.write(str(os.getpid()))
        dirs.append(d)
    return ",".join(dirs)


def _build_root(newroot: str, expose: list[str]) -> None:
    """A read-only view of the system and the Python install, and nothing of the host's data."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount("tmpfs", newroot, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")

    def bind(src: str, writable: bool = False) -> None:
        dst = newroot + src
        if os.path.isdir(src):
            os.makedirs(dst, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            open(dst, "a").close()
        _mount(src, dst, None, MS_BIND | MS_REC)
        if not writable:
            flags = os.statvfs(dst).f_flag & (MS_NOSUID | MS_NODEV | MS_NOEXEC)
            _mount(None, dst, None, MS_BIND | MS_REMOUNT | MS_RDONLY | flags)

    for path in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/usr", *expose):
        if os.path.islink(path) and path.count("/") == 1:
            os.symlink(os.readlink(path), newroot + path)
        elif os.path.exists(path) and not os.path.exists(newroot + path):
            bind(path)
    for dev in ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"):
        bind(dev, writable=True)
    os.makedirs(newroot + "/tmp")
    os.makedirs(newroot + "/.oldroot")
    _check(_libc.syscall(SYS_PIVOT_ROOT, newroot.encode(), (newroot + "/.oldroot").encode()),
           "pivot_root")
    os.chdir("/")
    _check(_libc.umount2(b"/.oldroot", 2), "detach old root")
    os.rmdir("/.oldroot")
    _mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _enter_user_namespace(flags: int, proc_fd: int) -> None:
    uid, gid = os.getuid(), os.getgid()
    _prctl(PR_SET_DUMPABLE, 1)  # a set-uid change cleared it; /proc/self/*_map need it
    _check(_libc.unshare(CLONE_NEWUSER | flags), "unshare user namespace")
    for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"),
                       ("gid_map", f"0 {gid} 1")):
        fd = os.open(f"self/{name}", os.O_WRONLY, dir_fd=proc_fd)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)


def isolate(cfg: dict) -> dict:
    """Apply every isolation feature this machine allows; report what is enforced."""
    features: dict[str, str | bool] = {}
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    expose = sorted({sys.base_prefix, sys.base_exec_prefix} - {"/usr", "/"})
    is_root = os.geteuid() == 0
    if is_root and cfg.get("cgroup"):
        try:
            features["cgroup"] = _join_cgroup(cfg["cgroup"], cfg["worker_memory_mb"],
                                              cfg["worker_pids"])
        except OSError as exc:
            features["cgroup"] = False
            features["cgroup_error"] = str(exc)
    proc_fd = os.open("/proc", os.O_RDONLY | os.O_DIRECTORY)
    try:
        if cfg["isolate"] and is_root:
            # Build the mount view as real root, then drop to an unprivileged uid of our own.
            try:
                _check(_libc.unshare(CLONE_NEWNS), "unshare mount namespace")
                _build_root(cfg["newroot"], expose)
                features["private_filesystem"] = True
            except OSError as exc:
                features["private_filesystem"] = False
                features["filesystem_error"] = str(exc)
        if is_root:
            os.setgroups([])
            os.setgid(cfg["uid"])
            os.setuid(cfg["uid"])
            features["unprivileged_uid"] = cfg["uid"]
        if cfg["isolate"]:
            flags = CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
            try:
                _enter_user_namespace(flags | (0 if is_root else CLONE_NEWNS), proc_fd)
                features["user_namespace"] = features["network_namespace"] = True
                if not is_root:
                    _build_root(cfg["newroot"], expose)
                    features["private_filesystem"] = True
            except OSError as exc:
                features.setdefault("private_filesystem", False)
                features["user_namespace"] = features["network_namespace"] = False
                features["namespace_error"] = str(exc)
    finally:
        os.close(proc_fd)
    _prctl(PR_SET_DUMPABLE, 0)
    # Per-run PID namespaces need the user namespace (or real root) to create them.
    features["pid_namespace"] = bool(features.get("user_namespace"))
    return features


# --------------------------------------------------------------------------- program (Y)

def _drop_privileges() -> None:
    """No capabilities now, and none regained by exec (root's implicit ones included)."""
    _prctl(PR_SET_SECUREBITS, SECBIT_LOCKED_NOROOT)
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)
    data = (ctypes.c_uint32 * 6)()
    _libc.capset(header, data)


def _limit(cfg: dict) -> None:
    for res, value in ((resource.RLIMIT_AS, cfg["memory_mb"] << 20),
                       (resource.RLIMIT_NPROC, cfg["nproc"]),
                       (resource.RLIMIT_FSIZE, cfg["file_mb"] << 20),
                       (resource.RLIMIT_NOFILE, cfg["nofile"]),
                       (resource.RLIMIT_CORE, 0)):
        try:
            resource.setrlimit(res, (value, value))
        except (ValueError, OSError):
            soft, hard = resource.getrlimit(res)
            resource.setrlimit(res, (min(value, hard) if hard >= 0 else value, hard))


def _resolve(namespace: dict, name: str):
    """The entry point, or a LeetCode-style ``Solution().name`` method (APPS starter code)."""
    fn = namespace.get(name)
    if callable(fn) and not isinstance(fn, type):
        return fn
    cls = namespace.get("Solution")
    if isinstance(cls, type) and hasattr(cls, name):
        return getattr(cls(), name)
    raise NameError(f"the program defines no function {name!r}")


def _short_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:2000]


def _run_program(cfg: dict, isolated: bool, base: str) -> None:
    """Y: prepare, wait for a job on fd 3, become the untrusted program. Never returns.

    Standard output and error are pipes to the worker, fd 3 brings the job and then call
    requests, fd 4 takes replies. In isolated mode it is PID 1 of fresh PID and mount
    namespaces, mounts its own empty /tmp, and drops every capability before reading the job.
    """
    code = 1
    try:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the worker gone: so are we
        os.setsid()
        if isolated:
            _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV,
                   f"size={cfg['tmp_mb']}m,mode=0700")
        scratch = os.path.join(base, "work")
        os.mkdir(scratch, 0o700)
        _drop_privileges()
        os.chdir(scratch)
        os.environ.clear()
        os.environ.update({"PATH": "/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch,
                           "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8"})
        _limit(cfg)
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8")
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8",
                                      line_buffering=True)
        job = protocol.read_frame(3)  # ready and waiting: everything above is off the clock
        if job is None:
            os._exit(0)
        cpu = max(1, int(job["cpu_seconds"] + 1))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        stdin_path = os.path.join(base, "stdin")
        with open(stdin_path, "w", encoding="utf-8") as f:
            f.write(job.get("stdin") or "")
        fd = os.open(stdin_path, os.O_RDONLY)
        os.dup2(fd, 0)
        os.close(fd)
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
        if job["mode"] == "stdio":
            code = _run_stdio(job["program"])
        else:
            _serve(job["program"], job.get("calls") or [])
            code = 0
    except BaseException:  # noqa: BLE001 - report anything to the supervisor, then die
        traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _run_stdio(program: str) -> int:
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    try:
        exec(compile(program, "<program>", "exec"), namespace)
    except SystemExit as exc:
        if exc.code not in (None, 0):
            print(f"SystemExit: {exc.code}", file=sys.stderr)
            return 1
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        return 1
    return 0


def _call(namespace: dict, name: str, args: object) -> dict:
    try:
        fn = _resolve(namespace, name)
        return {"value": protocol.encode(fn(*protocol.decode(args)))}
    except BaseException as exc:  # noqa: BLE001 - includes SystemExit from the program
        return {"error": _short_error(exc)}


def _serve(program: str, first_calls: list) -> None:
    """Define the program, run the calls sent with the job, then answer more until closed.

    Each call's reply is written as soon as it returns, so the worker can time every call.
    """
    namespace = {"__name__": "__solution__", "__builtins__": builtins}
    try:
        exec(compile(program, "<program>", "exec"), namespace)
    except BaseException as exc:  # noqa: BLE001 - a broken program is a result, not a crash
        protocol.write_frame(4, {"event": "ready", "error": _short_error(exc)})
        return
    names = sorted(k for k, v in list(namespace.items())
                   if callable(v) and not k.startswith("__"))
    protocol.write_frame(4, {"event": "ready", "names": names})
    calls = first_calls
    while True:
        for name, args in calls:
            reply = _call(namespace, name, args)
            sys.stdout.flush()
            protocol.write_frame(4, {"event": "return", **reply})
        request = protocol.read_frame(3)
        if request is None:
            return
        calls = request["calls"]


# --------------------------------------------------------------------------- supervisor

def _spawn(flags: int) -> int:
    """fork(), or with namespace flags a raw clone() that puts the child in new namespaces.

    The raw syscall skips CPython's after-fork hooks; that is safe here because the worker is
    single-threaded and the child never returns into the worker's code.
    """
    if not flags:
        return os.fork()
    pid = _libc.syscall(SYS_CLONE, ctypes.c_ulong(flags | signal.SIGCHLD), None, None, None,
                        None)
    if pid < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"clone into new namespaces: {os.strerror(err)}")
    return pid


class _Run:
    """The worker's view of one program process: pipes, deadline, what it said."""

    def __init__(self, cfg: dict, features: dict) -> None:
        self.cfg = cfg
        self.isolated = bool(features.get("pid_namespace"))
        self.stdout = bytearray()
        self.stdout_bytes = 0
        self.stderr = bytearray()
        self.replies = protocol.FrameBuffer()
        self.ended: str | None = None  # why the program process ended, once it has
        self.exit_code: int | None = None
        self.pid: int | None = None
        self.spawn()

    def begin(self, job: dict) -> None:
        """Hand the waiting program process its job; the clock starts now."""
        self.job = job
        self.serving = job["mode"] == "serve"
        self.expected = 1 + len(job.get("calls") or []) if self.serving else 0
        self.final = bool(job.get("final"))
        self.started = False  # has the program said "ready" yet
        self.deadline = time.monotonic() + job["timeout"]
        try:
            protocol.write_frame(self.req_w, job)
        except BrokenPipeError:
            self.ended = "exited"  # it died while waiting; the watch loop reports it

    def spawn(self) -> None:
        self.base = "/tmp" if self.isolated else tempfile.mkdtemp(prefix="bdc-run-")
        req_r, self.req_w = os.pipe()
        self.resp_r, resp_w = os.pipe()
        self.out_r, out_w = os.pipe()
        self.err_r, err_w = os.pipe()
        self.pid = _spawn(CLONE_NEWPID | CLONE_NEWNS if self.isolated else 0)
        if self.pid == 0:
            for src, dst in ((out_w, 1), (err_w, 2), (req_r, 3), (resp_w, 4)):
                os.dup2(src, dst + 100)
            for dst in range(1, 5):
                os.dup2(dst + 100, dst)
            os.closerange(5, 1 << 16)
            _run_program(self.cfg, self.isolated, self.base)
        for fd in (req_r, resp_w, out_w, err_w):
            os.close(fd)

    def kill(self) -> None:
        if self.pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            if self.isolated:
                os.kill(self.pid, signal.SIGKILL)  # PID 1: the kernel kills its namespace
            else:
                os.killpg(self.pid, signal.SIGKILL)

    def reap(self) -> None:
        if self.pid is not None:
            os.waitpid(self.pid, 0)
            self.pid = None

    def close(self) -> None:
        for fd in (self.req_w, self.resp_r, self.out_r, self.err_r):
            with contextlib.suppress(OSError):
                os.close(fd)
        if not self.isolated:  # isolated runs' /tmp vanishes with their mount namespace
            shutil.rmtree(self.base, ignore_errors=True)

    def on_reply(self, frame: object) -> None:
        """Relay one reply. The worker, not the program, decides what kind of event it is:
        the first reply of a job is "ready", every later one a "return"."""
        if self.expected <= 0 or type(frame) is not dict:
            self.ended = "protocol violation"
            return
        first = not self.started
        self.started = True
        self.expected -= 1
        self.deadline = time.monotonic() + self.job["timeout"]
        error = frame.get("error")
        if first:
            names = frame.get("names") if error is None else None
            if error is None and not (type(names) is list
                                      and all(type(n) is str for n in names)):
                self.ended = "protocol violation"
                return
            _send({"event": "ready", "error": None if error is None else str(error),
                   "names": names})
            if error is not None:
                self.expected = 0  # the program failed to load: no call replies will come
        else:
            _send({"event": "return", "value": frame.get("value"),
                   "error": None if error is None else str(error)})
        if self.expected == 0 and self.final:
            self.ended = "closed"  # the host said these were the last calls

    def on_host(self, msg: dict) -> None:
        if msg.get("op") == "calls" and self.serving and self.expected == 0:
            os.set_blocking(self.req_w, True)
            protocol.write_frame(self.req_w, {"calls": msg["calls"]})
            self.expected = len(msg["calls"])
            self.final = bool(msg.get("final"))
            self.deadline = time.monotonic() + self.job["timeout"]
        else:
            self.ended = "closed"


def _send(obj: dict) -> None:
    protocol.write_frame(1, obj)


def supervise(run: _Run, job: dict) -> None:
    """Run one job to the end: relay calls, enforce time and output limits, report."""
    run.begin(job)
    try:
        _watch(run)
    finally:
        run.kill()
        for fd in (run.out_r, run.err_r):
            _drain(run, fd)
        _send({"event": "done", "reason": run.ended, "exit_code": run.exit_code,
               "stdout": None if run.serving else run.stdout.decode("utf-8", "replace"),
               "stdout_bytes": run.stdout_bytes,
               "stderr": run.stderr.decode("utf-8", "replace")})
        run.close()


def _watch(run: _Run) -> None:
    pidfd = os.pidfd_open(run.pid)
    sel = selectors.DefaultSelector()
    try:
        for fd in (run.resp_r, run.out_r, run.err_r):
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        sel.register(pidfd, selectors.EVENT_READ)
        os.set_blocking(0, False)
        sel.register(0, selectors.EVENT_READ)
        host = protocol.FrameBuffer()
        while run.ended is None:
            waiting = run.expected > 0 or not run.serving
            timeout = max(0.0, run.deadline - time.monotonic()) if waiting else None
            events = sel.select(timeout)
            if waiting and not events and time.monotonic() >= run.deadline:
                run.ended = "timeout"
            for key, _ in events:
                if run.ended:
                    break
                if key.fd == pidfd:
                    _, status = os.waitpid(run.pid, 0)
                    run.pid, run.ended = None, "exited"
                    run.exit_code = os.waitstatus_to_exitcode(status)
                elif key.fd == 0:
                    data = os.read(0, 1 << 20)
                    for msg in host.feed(data) if data else [{"op": "end"}]:
                        run.on_host(msg)
                elif key.fd == run.resp_r:
                    for frame in _program_frames(run):
                        run.on_reply(frame)
                else:
                    _drain(run, key.fd)
    finally:
        sel.close()
        os.close(pidfd)
        os.set_blocking(0, True)


def _program_frames(run: _Run) -> list:
    try:
        data = os.read(run.resp_r, 1 << 20)
        return run.replies.feed(data) if data else []
    except BlockingIOError:
        return []
    except protocol.ProtocolError:
        run.ended = "protocol violation"
        return []


def _drain(run: _Run, fd: int) -> None:
    """Read what a pipe holds now; stdout counts against the output limit."""
    limit = run.cfg["output_bytes"]
    while True:
        try:
            data = os.read(fd, 1 << 16)
        except (BlockingIOError, OSError):
            return
        if not data:
            return
        if fd == run.err_r:
            run.stderr = (run.stderr + data)[-STDERR_TAIL:]
            continue
        run.stdout_bytes += len(data)
        if not run.serving and len(run.stdout) < limit:
            run.stdout += data[: limit - len(run.stdout)]
        if run.stdout_bytes > limit:
            run.ended = run.ended or "output limit"
            return


# --------------------------------------------------------------------------- fork server

def serve_forever(cfg: dict, features: dict) -> None:
    """Answer jobs until the host closes the pipe, always keeping one program process ready.

    Killed program processes are reaped lazily: tearing down a PID namespace takes a
    while, and nobody needs to wait for it.
    """
    spare = _Run(cfg, features)
    dying: list[int] = []
    while True:
        job = protocol.read_frame(0)
        if job is None:
            spare.kill()
            spare.reap()
            for pid in dying:
                os.waitpid(pid, 0)
            return
        run, spare = spare, None
        try:
            supervise(run, job)
        except Exception as exc:  # noqa: BLE001 - tell the host, never hang it
            _send({"event": "done", "reason": "supervisor error", "error": _short_error(exc),
                   "exit_code": None})
        if run.pid is not None:
            dying.append(run.pid)
        dying = [pid for pid in dying if os.waitpid(pid, os.WNOHANG)[0] == 0]
        while len(dying) > 4:  # bounded: never let killed runs pile up
            os.waitpid(dying.pop(0), 0)
        spare = _Run(cfg, features)


def preload(modules: list[str]) -> None:
    """Import what programs commonly use while the full Python install is still readable.

    In a fork server an import done once here is free in every run; it also keeps those
    imports working where the install is unreadable to the sandbox uid.
    """
    import importlib

    for name in modules:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def main() -> None:
    cfg = json.loads(sys.argv[1])
    preload(cfg.get("preload", []))
    import gc

    gc.collect()
    gc.freeze()  # children's collections then skip inherited objects: no copy-on-write storm
    try:
        features = isolate(cfg)
    except OSError as exc:
        protocol.write_frame(1, {"event": "hello", "error": _short_error(exc)})
        return
    protocol.write_frame(1, {"event": "hello", "features": features})
    serve_forever(cfg, features)


if __name__ == "__main__":
    main()
