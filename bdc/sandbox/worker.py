"""The sandbox worker: a warm zygote that prepares isolated processes for untrusted programs.

Started by the host as ``python -E -s -S -B -c "...import worker; worker.main()" SOCKET_FD
CONFIG_JSON`` with a scrubbed environment; it imports only the standard library and
``protocol.py`` beside it::

    host --unix socket-- worker (zygote: isolated once at start-up, then only clones)
      |                    +- program process (one per run: PID 1 of new PID + mount
      +---- pipes + pidfd ---+                  namespaces, own empty /tmp, no capabilities)

The worker keeps a few program processes prepared ahead of time and passes the host one's
pipe ends and pidfd (SCM_RIGHTS) per request; the host supervises it directly: it sends the
job and calls, reads the replies, enforces time and output limits and kills through the
pidfd. As root, the host also puts the worker in a cgroup of its own before it clones.

Why this shape: cloning a warm interpreter costs well under a millisecond where starting one
costs tens; a zygote that touches almost no memory per run keeps cloning cheap; and a program
that is PID 1 of its own PID namespace takes every process it spawned (fork bombs, detached
daemons) with it when killed. Expected outputs never enter any of these processes.
"""

from __future__ import annotations

import builtins
import contextlib
import ctypes
import json
import os
import resource
import signal
import socket
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
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_SECUREBITS = 1, 4, 28
PR_GET_NO_NEW_PRIVS, PR_SET_NO_NEW_PRIVS = 39, 38
SECBIT_LOCKED_NOROOT = 0x0F  # NOROOT + NO_SETUID_FIXUP, both locked
SYS_CLONE, SYS_PIVOT_ROOT = 56, 155  # x86_64
# Program processes cloned in one go. Every clone write-protects the zygote's pages, and the
# zygote's own bookkeeping between two clones then faults each page it touches; serving
# several requests from stock between batches pays that once per batch (measured: 4 in stock
# cut ~0.15 ms of 2 ms CPU per program; 8 barely more).
SPARES = 4

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


def isolate(cfg: dict, features: dict) -> dict:
    """Apply every other isolation feature this machine allows; report what is enforced."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    expose = sorted({sys.base_prefix, sys.base_exec_prefix} - {"/usr", "/"})
    is_root = os.geteuid() == 0
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
            if not features.get("private_filesystem"):
                # Without the private view the uid below may be unable to read the Python
                # install (e.g. under /root): import now what runs without namespaces need.
                import shutil  # noqa: F401
                import tempfile  # noqa: F401
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
        if not isolated:  # isolated runs all use /tmp/work, already in the environment
            os.environ["HOME"] = os.environ["TMPDIR"] = scratch
        _limit(cfg)
        # sys.std* already wrap fds 0-2 (now this run's pipes) and have never buffered
        # anything: the zygote's own standard streams are /dev/null and never used.
        job = protocol.read_frame(3)  # ready and waiting: everything above is off the clock
        if job is None:
            os._exit(0)
        cpu = max(1, int(job["cpu_seconds"] + 1))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        if job["mode"] == "stdio":
            stdin_path = os.path.join(base, "stdin")
            with open(stdin_path, "w", encoding="utf-8") as f:
                f.write(job.get("stdin") or "")
        else:
            stdin_path = os.devnull
        fd = os.open(stdin_path, os.O_RDONLY)
        os.dup2(fd, 0)
        os.close(fd)
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


# --------------------------------------------------------------------------- zygote

def _spawn(flags: int) -> int:
    """fork(), or with namespace flags a raw clone() that puts the child in new namespaces.

    The raw syscall skips CPython's after-fork hooks; that is safe here because the zygote is
    single-threaded and the child never returns into the zygote's code.
    """
    if not flags:
        return os.fork()
    pid = _libc.syscall(SYS_CLONE, ctypes.c_ulong(flags | signal.SIGCHLD), None, None, None,
                        None)
    if pid < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"clone into new namespaces: {os.strerror(err)}")
    return pid


class _Program:
    """A prepared program process and the host's ends of its pipes."""

    def __init__(self, cfg: dict, isolated: bool) -> None:
        if isolated:
            self.base = "/tmp"
        else:  # imported here: isolated workers (the usual case) never need it
            import tempfile  # already loaded by ``isolate`` where it had to be

            self.base = tempfile.mkdtemp(prefix="bdc-run-")
        req_r, req_w = os.pipe()
        resp_r, resp_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            self.pid = _spawn(CLONE_NEWPID | CLONE_NEWNS if isolated else 0)
        except OSError:
            for fd in (req_r, req_w, resp_r, resp_w, out_r, out_w, err_r, err_w):
                os.close(fd)
            raise
        if self.pid == 0:
            for src, dst in ((out_w, 1), (err_w, 2), (req_r, 3), (resp_w, 4)):
                os.dup2(src, dst + 100)
            for dst in range(1, 5):
                os.dup2(dst + 100, dst)
            os.closerange(5, 1 << 16)
            _run_program(cfg, isolated, self.base)
        for fd in (req_r, resp_w, out_w, err_w):
            os.close(fd)
        self.fds = [req_w, resp_r, out_r, err_r, os.pidfd_open(self.pid)]

    def release(self) -> None:
        """Close the zygote's copies once the host has its own."""
        for fd in self.fds:
            os.close(fd)


def _prepare(cfg: dict, isolated: bool, patience: float = 0.0) -> _Program | None:
    """A program process waiting for its job, or None if the uid's process budget is spent
    (a fork bomb not yet reaped); with ``patience``, retry that long."""
    deadline = time.monotonic() + patience
    while True:
        try:
            return _Program(cfg, isolated)
        except OSError:
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.005)


def _prepare_spares(cfg: dict, isolated: bool) -> list[_Program]:
    """Up to SPARES program processes, cloned back to back."""
    spares = []
    for _ in range(SPARES):
        program = _prepare(cfg, isolated)
        if program is None:  # the uid's process budget is spent for now
            break
        spares.append(program)
    return spares


def serve_forever(sock: socket.socket, cfg: dict, features: dict) -> None:
    """Hand the host one prepared program process per request, until the host hangs up.

    The zygote touches little memory per request (so forking it stays cheap), keeps
    prepared program processes in stock, and reaps exited ones lazily, remembering exit
    codes for the host to ask about.
    """
    isolated = bool(features.get("pid_namespace"))
    spares = _prepare_spares(cfg, isolated)
    exit_codes: dict[int, int] = {}
    scratch: dict[int, str] = {}
    while True:
        try:
            message = sock.recv(1 << 16)
        except OSError:
            break
        if not message:
            break
        request = json.loads(message)
        _reap(exit_codes, scratch)
        if request["op"] == "spawn":
            program = spares.pop() if spares else _prepare(
                cfg, isolated, patience=request.get("patience", 0.0))
            if program is None:
                sock.send(json.dumps({"error": "cannot start a program process: "
                                               "process limit reached"}).encode())
                continue
            socket.send_fds(sock, [json.dumps({"pid": program.pid}).encode()], program.fds)
            program.release()
            if not isolated:
                scratch[program.pid] = program.base
            if not spares:
                spares = _prepare_spares(cfg, isolated)
        elif request["op"] == "status":
            pid = request["pid"]
            if pid not in exit_codes:
                with contextlib.suppress(ChildProcessError):
                    _, status = os.waitpid(pid, 0)
                    exit_codes[pid] = os.waitstatus_to_exitcode(status)
                    _forget_scratch(scratch, pid)
            sock.send(json.dumps({"exit_code": exit_codes.pop(pid, None)}).encode())
    for spare in spares:
        os.kill(spare.pid, signal.SIGKILL)
        if not isolated:
            scratch[spare.pid] = spare.base
    while True:  # reap everything before leaving: no zombies for an init that won't
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break
    for path in scratch.values():
        _rmtree(path)


def _rmtree(path: str) -> None:
    import shutil  # only workers without namespaces keep scratch folders (see ``isolate``)

    shutil.rmtree(path, ignore_errors=True)


def _forget_scratch(scratch: dict[int, str], pid: int) -> None:
    """Without namespaces a run's scratch is an ordinary folder: remove it once it is done."""
    if pid in scratch:
        _rmtree(scratch.pop(pid))


def _reap(exit_codes: dict[int, int], scratch: dict[int, str]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        exit_codes[pid] = os.waitstatus_to_exitcode(status)
        _forget_scratch(scratch, pid)
        while len(exit_codes) > 256:  # codes nobody asked for
            exit_codes.pop(next(iter(exit_codes)))


def preload(modules: list[str]) -> None:
    """Import what programs commonly use while the full Python install is still readable.

    In a fork server an import done once here is free in every run; it also keeps those
    imports working where the install is unreadable to the sandbox uid.
    """
    import importlib

    for name in modules:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def _prepare_zygote(cfg: dict) -> None:
    """Do once here what every program process would otherwise redo: each page a run
    touches costs a copy-on-write fault."""
    os.environ.clear()
    os.environ.update({"PATH": "/usr/bin:/bin", "HOME": "/tmp/work", "TMPDIR": "/tmp/work",
                       "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8"})
    # The builtin compile() checks whether its input is an AST, which builds the ~120 ast
    # node types on first use (~1 ms and 130 page copies per program process otherwise). A
    # worker whose imports all came from bytecode caches has never called it.
    compile("", "<warm-up>", "exec")
    _prctl(PR_GET_NO_NEW_PRIVS, 0)  # first use of each ctypes call path allocates
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)
    _libc.capget(header, (ctypes.c_uint32 * 6)())
    preload(cfg.get("preload", []))


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    cfg = json.loads(sys.argv[2])
    _prepare_zygote(cfg)
    # Meanwhile the host has put this process in its cgroup (see the host's start): nothing
    # is cloned before it says how that went.
    start = sock.recv(1 << 16)
    if not start:
        return
    features = json.loads(start)["features"]
    import gc

    gc.collect()
    gc.freeze()  # children's collections then skip inherited objects: no copy-on-write storm
    try:
        features = isolate(cfg, features)
    except OSError as exc:
        sock.send(json.dumps({"error": _short_error(exc)}).encode())
        return
    sock.send(json.dumps({"features": features}).encode())
    serve_forever(sock, cfg, features)


if __name__ == "__main__":
    main()
