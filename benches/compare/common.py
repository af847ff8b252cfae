"""Shared by every part of the side-by-side harness: constants, errors, and running and
logging processes."""

import os
import shutil
import subprocess


PREFIX = "nixbuild-compare"
MIB = 1024 * 1024
GIB = 1024 * MIB
GNU_TIME = "/usr/bin/time"
SETSID = "/usr/bin/setsid"
BUSYBOX = "/bin/busybox"
NIX32_CHARS = "0123456789abcdfghijklmnpqrsvwxyz"
# How long a server gets to finish after the client returned, and a daemon to start.
SETTLE_TIMEOUT = 120.0
START_TIMEOUT = 60.0


class BenchError(Exception):
    """A failed step, with what was being done and the tail of its log."""


class Interrupted(Exception):
    """SIGINT/SIGTERM/SIGHUP: unwind so that the cleanup runs."""


SIDES = ("reference", "nixbuild")


def log(msg):
    print(msg, flush=True)


def tail(path, lines=20):
    try:
        with open(path, "rb") as f:
            data = f.read()[-8192:]
    except OSError:
        return ""
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


def run(cmd, env, logfile, what, stdin=None):
    """Runs a command to completion, its output appended to `logfile`; raises on failure."""
    with open(logfile, "ab") as out:
        out.write(("$ " + " ".join(cmd) + "\n").encode())
        out.flush()
        proc = subprocess.run(cmd, env=env, stdin=stdin, stdout=out, stderr=out)
    if proc.returncode != 0:
        raise BenchError(f"{what} failed (exit {proc.returncode}):\n{tail(logfile)}")


def capture(cmd, env, logfile, what):
    """Runs a command and returns its stdout lines; stderr goes to `logfile`."""
    with open(logfile, "ab") as err:
        err.write(("$ " + " ".join(cmd) + "\n").encode())
        err.flush()
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=err)
    if proc.returncode != 0:
        raise BenchError(f"{what} failed (exit {proc.returncode}):\n{tail(logfile)}")
    return proc.stdout.decode().split()


def kill_pid(pid, sig):
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def comm(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return None


def rm_tree(path):
    """Removes a tree even where Nix or nixbuild made it read-only (0555 directories)."""
    if not os.path.lexists(path):
        return

    def make_writable(func, p, _exc):
        parent = os.path.dirname(p)
        try:
            os.chmod(parent, 0o755)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, 0o755)
        except OSError:
            pass
        func(p)

    shutil.rmtree(path, onerror=make_writable)


def shq(s):
    return "'" + str(s).replace("'", "'\\''") + "'"


def field(line, key):
    """The value of ` key=value` in a log line, or None."""
    at = line.find(f" {key}=")
    if at < 0:
        return None
    return line[at + len(key) + 2 :].split(" ", 1)[0]
