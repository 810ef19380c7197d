"""The sandbox worker: a warm fork server that runs untrusted programs in isolation.

Run by the host as ``python -E -s -S worker.py CONFIG_JSON`` with a scrubbed environment; it
imports only the standard library and ``protocol.py`` beside it. Process layout::

    host ──frames── worker (fork server, isolated once at start-up)
                      └─ supervisor X (one per run: new PID + mount namespace, fresh /tmp)
                           └─ program Y (PID 1 of that namespace, no capabilities, rlimits)

Why this shape: forking a warm interpreter costs about a millisecond, starting one costs tens,
and a program that is PID 1 of its own PID namespace takes every process it spawned (fork
bombs, detached daemons) with it when it is killed. Expected outputs never enter any of these
processes: the host sends only programs and call arguments and compares results itself.
"""

from __future__ import annotations

import builtins
import ctypes
import io
import json
import os
import resource
import selectors
import signal
import sys
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
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 4, 24, 38
SYS_PIVOT_ROOT = 155  # x86_64
STDERR_TAIL = 4096

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None):
    enc = (lambda s: s.encode() if s is not None else None)
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
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    for cap in range(64):
        _prctl(PR_CAPBSET_DROP, cap)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)
    data = (ctypes.c_uint32 * 6)()
    _libc.capset(header, data)


def _limit(cfg: dict, cpu_seconds: float) -> None:
    cpu = max(1, int(cpu_seconds + 1))
    for res, value in ((resource.RLIMIT_AS, cfg["memory_mb"] << 20),
                       (resource.RLIMIT_CPU, cpu),
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


def _run_program(job: dict, cfg: dict, scratch: str) -> None:
    """Y: become the untrusted program. Never returns."""
    code = 1
    try:
        os.setsid()
        _drop_privileges()
        os.chdir(scratch)
        os.environ.clear()
        os.environ.update({"PATH": "/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch,
                           "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8"})
        _limit(cfg, job["cpu_seconds"])
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8")
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8",
                                      line_buffering=True)
        if job["mode"] == "stdio":
            code = _run_stdio(job["program"])
        else:
            _serve(job["program"])
            code = 0
    except BaseException:  # noqa: BLE001 - report anything to the supervisor, then die
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:  # noqa: BLE001
            pass
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


def _serve(program: str) -> None:
    """Define the program, then answer call requests until the supervisor closes the pipe."""
    namespace = {"__name__": "__solution__", "__builtins__": builtins}
    try:
        exec(compile(program, "<program>", "exec"), namespace)
    except BaseException as exc:  # noqa: BLE001 - a broken program is a result, not a crash
        protocol.write_frame(4, {"event": "ready", "error": _short_error(exc)})
        return
    names = sorted(k for k, v in list(namespace.items())
                   if callable(v) and not k.startswith("__"))
    protocol.write_frame(4, {"event": "ready", "names": names})
    while True:
        request = protocol.read_frame(3)
        if request is None:
            return
        try:
            fn = _resolve(namespace, request["call"])
            args = protocol.decode(request["args"])
            reply = {"event": "return", "value": protocol.encode(fn(*args))}
        except BaseException as exc:  # noqa: BLE001 - includes SystemExit from the program
            reply = {"event": "return", "error": _short_error(exc)}
        sys.stdout.flush()
        protocol.write_frame(4, reply)


# --------------------------------------------------------------------------- supervisor (X)

class _Run:
    """X's view of one program process: pipes, limits, what it said."""

    def __init__(self, job: dict, cfg: dict, features: dict) -> None:
        self.job, self.cfg = job, cfg
        self.isolated = bool(features.get("pid_namespace"))
        self.stdout = bytearray()
        self.stdout_bytes = 0
        self.stderr = bytearray()
        self.replies = protocol.FrameBuffer()
        self.pending_call = False
        self.deadline = time.monotonic() + job["timeout"]
        self.ended: str | None = None  # why the program process ended, once it has
        self.pid: int | None = None

    def start(self) -> None:
        if self.isolated:
            _check(_libc.unshare(CLONE_NEWPID | CLONE_NEWNS), "unshare per-run namespaces")
            _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV,
                   f"size={self.cfg['tmp_mb']}m,mode=0700")
            base = "/tmp"
        else:
            import tempfile
            base = tempfile.mkdtemp(prefix="bdc-run-")
        self.base = base
        scratch = os.path.join(base, "work")
        os.mkdir(scratch, 0o700)
        stdin_path = os.path.join(base, "stdin")
        with open(stdin_path, "w", encoding="utf-8") as f:
            f.write(self.job.get("stdin") or "")
        req_r, self.req_w = os.pipe()
        self.resp_r, resp_w = os.pipe()
        self.out_r, out_w = os.pipe()
        self.err_r, err_w = os.pipe()
        stdin_fd = os.open(stdin_path, os.O_RDONLY)
        self.pid = os.fork()
        if self.pid == 0:
            for src, dst in ((stdin_fd, 0), (out_w, 1), (err_w, 2), (req_r, 3), (resp_w, 4)):
                os.dup2(src, dst + 100)
            for dst in range(5):
                os.dup2(dst + 100, dst)
            os.closerange(5, 1 << 16)
            _run_program(self.job, self.cfg, scratch)
        for fd in (req_r, resp_w, out_w, err_w, stdin_fd):
            os.close(fd)

    def kill(self) -> None:
        if self.pid is None:
            return
        try:
            if self.isolated:
                os.kill(self.pid, signal.SIGKILL)  # PID 1: the kernel kills its namespace
            else:
                os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def reap(self) -> int | None:
        """Wait for the program process; its exit code, or None if it was never running."""
        if self.pid is None:
            return None
        _, status = os.waitpid(self.pid, 0)
        self.pid = None
        return os.waitstatus_to_exitcode(status)

    def cleanup(self) -> None:
        if not self.isolated:  # isolated runs' /tmp vanishes with their mount namespace
            import shutil
            shutil.rmtree(self.base, ignore_errors=True)


def _send(obj: dict) -> None:
    protocol.write_frame(1, obj)


def supervise(job: dict, cfg: dict, features: dict) -> None:
    """X: run one job to the end, relaying calls and enforcing time and output limits."""
    run = _Run(job, cfg, features)
    run.start()
    pidfd = os.pidfd_open(run.pid)
    sel = selectors.DefaultSelector()
    for fd in (run.resp_r, run.out_r, run.err_r):
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    sel.register(pidfd, selectors.EVENT_READ)
    os.set_blocking(0, False)
    sel.register(0, selectors.EVENT_READ)
    host = protocol.FrameBuffer()
    serving = job["mode"] == "serve"
    waiting = True  # for the program: its "ready", a call's return, or (stdio) its exit
    exit_code = None
    while run.ended is None:
        timeout = max(0.0, run.deadline - time.monotonic()) if waiting else None
        events = sel.select(timeout)
        if waiting and not events and time.monotonic() >= run.deadline:
            run.ended = "timeout"
        for key, _ in events:
            if run.ended:
                break
            fd = key.fd
            if fd == pidfd:
                exit_code = run.reap()
                run.ended = "exited"
            elif fd == 0:
                data = os.read(0, 1 << 20)
                for msg in host.feed(data) if data else [{"op": "end"}]:
                    if msg.get("op") == "call" and serving and not waiting:
                        os.set_blocking(run.req_w, True)
                        protocol.write_frame(run.req_w, {"call": msg["name"],
                                                         "args": msg["args"]})
                        waiting = True
                        run.deadline = time.monotonic() + job["timeout"]
                    else:
                        run.ended = "closed"
            elif fd == run.resp_r:
                for frame in _program_frames(run, fd):
                    if not waiting or type(frame) is not dict:
                        run.ended = "protocol violation"
                        break
                    waiting = False
                    _send({"event": frame.get("event"), "value": frame.get("value"),
                           "error": frame.get("error"), "names": frame.get("names")})
            else:
                _drain(run, fd, serving)
    run.kill()
    run.reap()
    run.cleanup()
    for fd in (run.out_r, run.err_r):
        _drain(run, fd, serving)
    _send({"event": "done", "reason": run.ended, "exit_code": exit_code,
           "stdout": run.stdout.decode("utf-8", "replace") if not serving else None,
           "stdout_bytes": run.stdout_bytes,
           "stderr": run.stderr.decode("utf-8", "replace")})


def _program_frames(run: _Run, fd: int) -> list:
    try:
        data = os.read(fd, 1 << 20)
        return run.replies.feed(data) if data else []
    except BlockingIOError:
        return []
    except protocol.ProtocolError:
        run.ended = "protocol violation"
        return []


def _drain(run: _Run, fd: int, serving: bool) -> None:
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
        if not serving and len(run.stdout) < limit:
            run.stdout += data[: limit - len(run.stdout)]
        if run.stdout_bytes > limit:
            run.ended = run.ended or "output limit"
            return


# --------------------------------------------------------------------------- fork server

def serve_forever(cfg: dict, features: dict) -> None:
    while True:
        os.set_blocking(0, True)
        job = protocol.read_frame(0)
        if job is None:
            return
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
                supervise(job, cfg, features)
            except BaseException as exc:  # noqa: BLE001 - tell the host, never hang it
                try:
                    _send({"event": "done", "reason": "supervisor error",
                           "error": _short_error(exc), "exit_code": None})
                except OSError:
                    pass
                code = 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) not in (0, 1):
            _send({"event": "done", "reason": "supervisor died", "exit_code": None})


def main() -> None:
    cfg = json.loads(sys.argv[1])
    try:
        features = isolate(cfg)
    except OSError as exc:
        protocol.write_frame(1, {"event": "hello", "error": _short_error(exc)})
        return
    protocol.write_frame(1, {"event": "hello", "features": features})
    serve_forever(cfg, features)


if __name__ == "__main__":
    main()
