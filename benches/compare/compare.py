#!/usr/bin/env python3
"""Side-by-side benchmark: nixbuild against Nix's own `nix-store --serve`.

Both servers are driven by the same real Nix client (`nix copy`, `nix-build`) over the
stdio transport (`ssh://localhost?remote-program=...`, which Nix runs through `bash -c`, no
sshd), or, for the `ssh-` workloads, over SSH: OpenSSH's sshd running `nix-store --serve`
in a private mount namespace with its own `/nix`, against nixbuild-server's own SSH. Runs
alternate between the two sides, every run does the full work (fresh server store for
uploads, client copies deleted before downloads), and every run is checked: the paths must
be valid on the destination with the narHash the client recorded, and the bytes on the
destination's disk must hash to it.

Measured per run, for the server process tree only (the client is never in the cgroup):
wall time of the client command, server CPU (user+sys) from a fresh cgroup per run, server
peak RSS (GNU time's maxrss of every server process, summed), and the cgroup's memory
high-water mark, which also counts the page cache of the files the server wrote.

See README.md next to this file. Run through `benches/compare/run` (installs what is
missing and builds the examples), as root.
"""

import argparse
import dataclasses
import datetime
import grp
import mmap
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

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


# ---------------------------------------------------------------------------------------
# Workloads


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Client-side test paths: `top` is what `nix copy` is given, `paths` its whole closure."""

    key: str
    title: str
    top: str
    paths: tuple
    nar_hashes: dict  # store path -> "sha256:<nix32>" as the client's Nix recorded it
    size: int  # bytes of file contents in the closure (what throughput is counted in)


@dataclasses.dataclass(frozen=True)
class Workload:
    """A `nix copy` of a dataset to (upload) or from (download) the server."""

    name: str
    direction: str  # "upload" (nix copy --to) or "download" (nix copy --from)
    dataset: str  # key of the Dataset
    cpu_target: float | None  # server CPU ratio nixbuild / reference must be at most this
    rss_target_mib: float | None  # nixbuild peak RSS must stay under this, when set
    transport: str = "stdio"  # "stdio" (remote-program) or "ssh" (sshd / nixbuild's SSH)
    # Issue 8: throughput nixbuild / reference at least this, or, where the client is the
    # bottleneck, server CPU per GiB nixbuild / reference at most `cpu_target`.
    throughput_target: float | None = None
    kind = "copy"


@dataclasses.dataclass(frozen=True)
class BuildWorkload:
    """Fresh derivations built on the server by `nix-build --max-jobs 0 --builders`."""

    name: str
    shape: str  # "one": a nix-build per derivation; "independent", "chain", "big": one nix-build
    count: int  # derivations per client
    clients: int  # nix-build processes running at once, each on its own derivations
    wall_target: float | None  # nixbuild wall time / reference's must be at most this
    transport: str = "stdio"
    # "big": the output's size; throughput and CPU-per-GiB targets as for `Workload`.
    size_mib: int = 0
    throughput_target: float | None = None
    cpu_target: float | None = None
    kind = "build"

    def title(self):
        if self.shape == "one":
            return f"one fresh trivial derivation per nix-build, {self.count} nix-builds in a row"
        if self.shape == "big":
            return f"one derivation whose output is a {self.size_mib} MiB file, fetched back"
        what = (
            f"{self.count} independent trivial derivations"
            if self.shape == "independent"
            else f"a chain of {self.count} dependent derivations"
        )
        if self.clients == 1:
            return f"{what} in one nix-build"
        return f"{self.clients} nix-builds at once, each of {what}"


@dataclasses.dataclass(frozen=True)
class ConnectWorkload:
    """`count` times `nix store ping --store ssh://<alias>`: connection, SSH handshake,
    authentication, exec of `nix-store --serve --write` and the serve handshake."""

    name: str
    count: int
    cpu_target: float  # server CPU per connection, nixbuild / reference, at most this
    transport: str = "ssh"
    kind = "connect"


WORKLOADS = [
    Workload("upload-closure", "upload", "closure", 1 / 2, None),
    Workload("download-closure", "download", "closure", 1 / 3, None),
    Workload("upload-1g", "upload", "big", 1 / 2, 64),
    Workload("download-1g", "download", "big", 1 / 3, 64),
    # Issue 4: server-side time per build (stdio transport).
    BuildWorkload("build-one", "one", 20, 1, None),
    # Issue 5: the SSH transport, against OpenSSH's sshd running nix-store --serve.
    ConnectWorkload("ssh-connect", 20, 1 / 10),
    # Issue 8, workloads 1 to 5, over SSH.
    BuildWorkload("ssh-build-50", "independent", 50, 1, 1 / 2, transport="ssh"),
    BuildWorkload("ssh-build-chain", "chain", 20, 1, 1 / 2, transport="ssh"),
    Workload(
        "ssh-upload-closure", "upload", "closure", 1 / 3, None, transport="ssh", throughput_target=1.5
    ),
    BuildWorkload(
        "ssh-build-1g",
        "big",
        1,
        1,
        None,
        transport="ssh",
        size_mib=1024,
        throughput_target=1.5,
        cpu_target=1 / 3,
    ),
    BuildWorkload("ssh-build-parallel", "independent", 50, 8, 1 / 2, transport="ssh"),
    # Issue 5: the big path over SSH, no target of its own.
    Workload("ssh-upload-1g", "upload", "big", None, None, transport="ssh"),
    Workload("ssh-download-1g", "download", "big", None, None, transport="ssh"),
]
# Names that stand for several workloads in --workloads.
WORKLOAD_GROUPS = {
    "ssh-1g": ["ssh-upload-1g", "ssh-download-1g"],
    "issue8": [
        "ssh-build-50",
        "ssh-build-chain",
        "ssh-upload-closure",
        "ssh-build-1g",
        "ssh-build-parallel",
    ],
}
# Issue 4: BuildDerivation received -> BuildResult sent, median, for a fresh trivial build.
BUILD_ONE_TARGET_MS = 20
# Issue 8: server memory throughout, for the build workloads.
BUILD_MEM_TARGET_MIB = 100
# The system and features every build is offered with (the issue's builders line).
BUILDER_SYSTEM = "x86_64-linux"
BUILDER_FEATURES = "big-parallel,benchmark"

SIDES = ("reference", "nixbuild")
SIDE_LABEL = {"reference": "reference (nix-store --serve)", "nixbuild": "nixbuild"}
SSH_SIDE_LABEL = {"reference": "reference (sshd + nix-store --serve)", "nixbuild": "nixbuild (SSH)"}
SSHD = "/usr/sbin/sshd"
UNSHARE = "/usr/bin/unshare"
# The account of the benchmark's client key (the first word of its comment).
ACCOUNT = "bench"


# ---------------------------------------------------------------------------------------
# Processes and logs


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


# ---------------------------------------------------------------------------------------
# Cgroups


class Cgroups:
    """Per-run cgroups for CPU and memory accounting, v1 or v2 detected per controller.

    v1 (`cpuacct`, `memory` hierarchies): the harness's top cgroup is created under the
    cgroup the harness itself is in, so it stays inside whatever limits apply to it. v2:
    under the root of the unified hierarchy (a non-root cgroup with processes in it cannot
    hand controllers down), with `+memory` enabled for the children when available.
    """

    def __init__(self, top_name):
        mounts = []
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 4 and fields[2] in ("cgroup", "cgroup2"):
                    mounts.append((fields[1], fields[2], fields[3].split(",")))
        own = {}
        with open("/proc/self/cgroup") as f:
            for line in f:
                _id, controllers, path = line.rstrip("\n").split(":", 2)
                for c in controllers.split(",") if controllers else [""]:
                    own[c] = path
        v1 = {}
        v2_mount = None
        for mnt, fstype, opts in mounts:
            if fstype == "cgroup2":
                v2_mount = mnt
            else:
                for c in ("cpuacct", "memory"):
                    if c in opts:
                        v1[c] = mnt
        self.tops = []  # top cgroup directories, removed at the end
        self.cpu = None  # ("v1"|"v2", top dir)
        self.mem = None
        v2_top = None
        if v2_mount is not None and ("cpuacct" not in v1 or "memory" not in v1):
            v2_top = os.path.join(v2_mount, top_name)
        if "cpuacct" in v1:
            self.cpu = ("v1", self._make_top(v1["cpuacct"], own.get("cpuacct", "/"), top_name))
        elif v2_top is not None:
            self.cpu = ("v2", self._make_top(v2_mount, "/", top_name))
        else:
            raise BenchError("no cgroup CPU accounting found (neither v1 cpuacct nor cgroup2)")
        if "memory" in v1:
            self.mem = ("v1", self._make_top(v1["memory"], own.get("memory", "/"), top_name))
        elif v2_top is not None:
            top = self._make_top(v2_mount, "/", top_name)
            if self._enable_v2(top, "memory"):
                self.mem = ("v2", top)

    def _make_top(self, mount, own_path, top_name):
        top = os.path.join(mount, own_path.lstrip("/"), top_name)
        if top not in self.tops:
            os.makedirs(top, exist_ok=True)
            self.tops.append(top)
        return top

    @staticmethod
    def _enable_v2(top, controller):
        try:
            with open(os.path.join(top, "cgroup.controllers")) as f:
                if controller not in f.read().split():
                    return False
            with open(os.path.join(top, "cgroup.subtree_control"), "w") as f:
                f.write("+" + controller)
            return True
        except OSError:
            return False

    def describe(self):
        cpu = f"cgroup {self.cpu[0]} " + (
            "cpuacct.usage" if self.cpu[0] == "v1" else "cpu.stat usage_usec"
        )
        if self.mem is None:
            mem = "no memory cgroup available"
        else:
            mem = f"cgroup {self.mem[0]} " + (
                "memory.max_usage_in_bytes" if self.mem[0] == "v1" else "memory.peak"
            )
        return cpu, mem

    def new_group(self, name):
        return Group(self, name)

    def destroy(self):
        for top in reversed(self.tops):
            destroy_tree(top)


class Group:
    """One fresh cgroup (a directory per hierarchy in use) for one run's server tree."""

    def __init__(self, cgroups, name):
        self.cgroups = cgroups
        self.cpu_dir = os.path.join(cgroups.cpu[1], name)
        self.mem_dir = os.path.join(cgroups.mem[1], name) if cgroups.mem else None
        self.dirs = [d for d in dict.fromkeys([self.cpu_dir, self.mem_dir]) if d]
        for d in self.dirs:
            if os.path.isdir(d):
                destroy_tree(d)
            os.mkdir(d)
        self.sampler = None
        self.stop_sampling = threading.Event()
        self.ws_peak = None

    def working_set(self):
        """Anonymous memory and tmpfs of every process in the cgroup, its descendants
        included (v1 `total_rss` + `total_shmem`, v2 `anon` + `shmem` of `memory.stat`):
        what the servers hold, without the page cache of what they read and wrote and
        without kernel memory. Not usage minus file pages: the file pages of a descendant
        cgroup that was just removed (nixbuild's per-build cgroups) stay in the usage
        while they leave the statistics."""
        keys = ("total_rss", "total_shmem") if self.cgroups.mem[0] == "v1" else ("anon", "shmem")
        try:
            with open(os.path.join(self.mem_dir, "memory.stat")) as f:
                stat = dict(line.split() for line in f if line.strip())
            return sum(int(stat[k]) for k in keys)
        except (OSError, ValueError, KeyError):
            return None

    def sample_working_set(self, interval=0.01):
        """Starts a thread that keeps the highest `working_set` seen, every `interval` s,
        until `working_set_peak`. A spike shorter than the interval can be missed."""
        if self.mem_dir is None:
            return

        def loop():
            while not self.stop_sampling.is_set():
                ws = self.working_set()
                if ws is not None and (self.ws_peak is None or ws > self.ws_peak):
                    self.ws_peak = ws
                self.stop_sampling.wait(interval)

        self.sampler = threading.Thread(target=loop, daemon=True)
        self.sampler.start()

    def working_set_peak(self):
        """Stops the sampling thread; the highest working set it saw (bytes), or None."""
        self.stop_sampling.set()
        if self.sampler is not None:
            self.sampler.join()
            self.sampler = None
        return self.ws_peak

    def procs_files(self):
        return [os.path.join(d, "cgroup.procs") for d in self.dirs]

    def pids(self):
        try:
            with open(os.path.join(self.cpu_dir, "cgroup.procs")) as f:
                return [int(x) for x in f.read().split()]
        except OSError:
            return []

    def cpu_ns(self):
        if self.cgroups.cpu[0] == "v1":
            with open(os.path.join(self.cpu_dir, "cpuacct.usage")) as f:
                return int(f.read())
        with open(os.path.join(self.cpu_dir, "cpu.stat")) as f:
            for line in f:
                k, v = line.split()
                if k == "usage_usec":
                    return int(v) * 1000
        raise BenchError(f"no usage_usec in {self.cpu_dir}/cpu.stat")

    def mem_peak(self):
        if self.mem_dir is None:
            return None
        name = "memory.max_usage_in_bytes" if self.cgroups.mem[0] == "v1" else "memory.peak"
        try:
            with open(os.path.join(self.mem_dir, name)) as f:
                return int(f.read().split()[0])
        except OSError:
            return None

    def wait_empty(self, timeout):
        deadline = time.monotonic() + timeout
        while self.pids():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def destroy(self):
        self.working_set_peak()
        for d in self.dirs:
            destroy_tree(d)


def destroy_tree(top):
    """Kills every process in a cgroup directory tree, then removes the directories."""
    if not os.path.isdir(top):
        return
    dirs = [root for root, _subdirs, _files in os.walk(top)]
    for _attempt in range(100):
        pids = []
        for d in dirs:
            try:
                with open(os.path.join(d, "cgroup.procs")) as f:
                    pids += [int(x) for x in f.read().split()]
            except OSError:
                pass
        if not pids:
            break
        for pid in pids:
            kill_pid(pid, signal.SIGKILL)
        time.sleep(0.05)
    for d in sorted(dirs, key=len, reverse=True):
        try:
            os.rmdir(d)
        except OSError as e:
            log(f"warning: could not remove cgroup {d}: {e}")


# ---------------------------------------------------------------------------------------
# Nix client side


class Client:
    """The real Nix client with a private configuration, and the test paths it owns."""

    def __init__(self, tmp):
        self.tmp = tmp
        conf_dir = os.path.join(tmp, "nix-conf")
        os.mkdir(conf_dir)
        self.conf_file = os.path.join(conf_dir, "nix.conf")
        with open(self.conf_file, "w") as f:
            f.write(
                "experimental-features = nix-command\n"
                "substituters =\n"
                "sandbox = false\n"
                "build-users-group =\n"
                # The generated paths carry no signatures.
                "require-sigs = false\n"
                # A build postponed for want of a free builder slot is retried whenever
                # the client's worker wakes (a build ended), not after Nix's 5 s poll,
                # which would dominate wall time whenever builds outnumber slots.
                "build-poll-interval = 0\n"
            )
        empty = os.path.join(tmp, "empty.conf")
        open(empty, "w").close()
        self.env = dict(os.environ)
        self.env.pop("NIX_REMOTE", None)
        self.env.pop("NIX_PATH", None)
        self.env["NIX_CONF_DIR"] = conf_dir
        self.env["NIX_USER_CONF_FILES"] = empty
        self.log = os.path.join(tmp, "client.log")
        self.owned = set()  # client store paths this run created, deleted at the end

    def nix_store_version(self):
        return capture(["nix-store", "--version"], self.env, self.log, "nix-store --version")

    def store_dir(self):
        return "/nix/store"

    def hashes(self, store, paths, what):
        """narHash of each path as `store` records it (fails if one is not valid there)."""
        cmd = ["nix-store"] + (["--store", store] if store else []) + ["-q", "--hash"]
        out = capture(cmd + list(paths), self.env, self.log, what)
        if len(out) != len(paths):
            raise BenchError(f"{what}: {len(out)} hashes for {len(paths)} paths")
        return dict(zip(paths, out))

    def disk_hashes(self, files, what):
        """NAR hashes of files on disk, computed by Nix's `nix-hash`, as "sha256:<nix32>"."""
        out = []
        files = list(files)
        for i in range(0, len(files), 100):
            chunk = files[i : i + 100]
            out += capture(
                ["nix-hash", "--type", "sha256", "--base32"] + chunk, self.env, self.log, what
            )
        if len(out) != len(files):
            raise BenchError(f"{what}: {len(out)} hashes for {len(files)} files")
        return ["sha256:" + h for h in out]

    def big_output_nar_hash(self, rundir, head, zeros):
        """narHash of a regular file holding `head` followed by `zeros` zero bytes: Nix's own
        `nix-hash` over a sparse file with those contents, as "sha256:<nix32>"."""
        path = os.path.join(rundir, "big-output")
        with open(path, "wb") as f:
            f.write(head)
            f.truncate(len(head) + zeros)
        try:
            return self.disk_hashes([path], "nix-hash of the big output")[0]
        finally:
            os.unlink(path)

    def delete(self, paths, what):
        run(["nix-store", "--delete"] + list(paths), self.env, self.log, what)
        valid = subprocess.run(
            ["nix-store", "--check-validity", "--print-invalid"] + list(paths),
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        still = set(paths) - set(valid.stdout.decode().split())
        if still:
            raise BenchError(f"{what}: still valid after nix-store --delete: {sorted(still)[:3]}")

    def delete_owned(self):
        if not self.owned:
            return
        subprocess.run(
            ["nix-store", "--delete"] + sorted(self.owned),
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.owned.clear()

    def make_closure(self, salt, count, size):
        """Imports `count` paths of `size` bytes each, path i referring to i-1 and i/2.

        Written as an export stream for `nix-store --import` (the only way to give paths
        references without building); the contents are random bytes after the text of the
        referenced paths, so a reference scanner finds exactly the declared references.
        """
        paths = []
        for i in range(count):
            digest = "".join(secrets.choice(NIX32_CHARS) for _ in range(32))
            paths.append(f"{self.store_dir()}/{digest}-{PREFIX}-{salt}-{i:03d}")
        proc = subprocess.Popen(
            ["nix-store", "--import"],
            env=self.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=open(self.log, "ab"),
        )
        try:
            for i, path in enumerate(paths):
                refs = sorted({paths[j] for j in (i - 1, i // 2) if 0 <= j < i})
                head = "".join(r + "\n" for r in refs).encode()
                contents = head + os.urandom(size - len(head))
                entry = [u64(1), nar_regular_file(contents), u64(0x4558494E), wire_str(path)]
                entry += [u64(len(refs))] + [wire_str(r) for r in refs]
                entry += [wire_str(""), u64(0)]
                proc.stdin.write(b"".join(entry))
            proc.stdin.write(u64(0))
            proc.stdin.close()
        finally:
            rc = proc.wait()
        self.owned.update(paths)
        if rc != 0:
            raise BenchError(f"nix-store --import of the closure failed:\n{tail(self.log)}")
        return Dataset(
            "closure",
            f"closure of {count} paths x {size // MIB} MiB",
            paths[-1],
            tuple(paths),
            self.hashes(None, paths, "client narHash of the closure"),
            count * size,
        )

    def make_big(self, salt, size):
        """Adds one regular file of `size` random bytes with `nix-store --add`."""
        src = os.path.join(self.tmp, f"{PREFIX}-{salt}-big")
        with open(src, "wb") as f:
            left = size
            while left:
                n = min(left, 8 * MIB)
                f.write(os.urandom(n))
                left -= n
        try:
            (path,) = capture(["nix-store", "--add", src], self.env, self.log, "nix-store --add")
        finally:
            os.unlink(src)
        self.owned.add(path)
        return Dataset(
            "big",
            f"one path of {size // MIB} MiB",
            path,
            (path,),
            self.hashes(None, [path], "client narHash of the big path"),
            size,
        )

    def make_busybox(self):
        """The builders' shell: a static busybox (`bin/sh` links to it) added to the store.

        Every build derivation takes it as an input source; before each measured run it is
        copied to the server's fresh store (not measured), so the runs time builds only.
        """
        if not os.access(BUSYBOX, os.X_OK):
            raise BenchError(f"{BUSYBOX} is missing: install busybox-static")
        src = os.path.join(self.tmp, f"{PREFIX}-busybox")
        os.makedirs(os.path.join(src, "bin"))
        shutil.copy(BUSYBOX, os.path.join(src, "bin", "busybox"))
        os.symlink("busybox", os.path.join(src, "bin", "sh"))
        (path,) = capture(["nix-store", "--add", src], self.env, self.log, "nix-store --add busybox")
        self.owned.add(path)
        self.busybox_src = src
        return Dataset(
            "busybox",
            "static busybox",
            path,
            (path,),
            self.hashes(None, [path], "client narHash of busybox"),
            os.path.getsize(BUSYBOX),
        )

    def make_builds(self, rundir, workload, salt):
        """Writes and instantiates the run's derivations: one list of `Build`s per client.

        Each derivation's name carries the run's salt, so neither its outputs nor the .drv
        exist anywhere before the run. Independent builds write one line naming themselves;
        in a chain, build i also writes the path of build i-1 (a reference) and the first
        line of its contents (read in the sandbox).
        """
        lines = [
            "let",
            f'  bb = builtins.path {{ path = {self.busybox_src}; name = "{PREFIX}-busybox"; }};',
            "  mk = name: script: extra: derivation ({",
            f'    name = "{PREFIX}-{salt}-${{name}}";',
            f'    system = "{BUILDER_SYSTEM}";',
            '    builder = "${bb}/bin/sh";',
            '    args = [ "-c" script ];',
            '    PATH = "${bb}/bin";',
            "  } // extra);",
        ]
        attrs = []
        for k in range(workload.clients):
            names = []
            for i in range(workload.count):
                name = f"c{k}-{i}"
                first = f"{PREFIX} {salt} {name}"
                if workload.shape == "chain" and i > 0:
                    prev = f"d{k}_{i - 1}"
                    script = f"{{ echo {first}; echo ${{{prev}}}; head -n 1 ${{{prev}}}; }} > $out"
                elif workload.shape == "big":
                    # The second output holds the builder's own CPU times (the shell's
                    # `times`), so that the server's share can be told from the builder's.
                    script = f"{{ echo {first}; {big_builder(workload.size_mib)}; }} > $out; times > $cpu"
                else:
                    script = f"echo {first} > $out"
                extra = '{ outputs = [ "out" "cpu" ]; }' if workload.shape == "big" else "{ }"
                lines.append(f'  d{k}_{i} = mk "{name}" "{script}" {extra};')
                names.append(f"d{k}_{i}")
            attrs.append(f"  c{k} = [ {' '.join(names)} ];")
        lines += ["in {"] + attrs + ["}"]
        expr = os.path.join(rundir, "builds.nix")
        with open(expr, "w") as f:
            f.write("\n".join(lines) + "\n")
        cmd = ["nix-instantiate", expr]
        for k in range(workload.clients):
            cmd += ["-A", f"c{k}"]
        drvs = capture(cmd, self.env, self.log, "nix-instantiate of the build derivations")
        total = workload.clients * workload.count
        if len(drvs) != total:
            raise BenchError(f"nix-instantiate gave {len(drvs)} derivations instead of {total}")
        self.owned.update(drvs)
        outs = capture(
            ["nix-store", "-q", "--outputs"] + drvs, self.env, self.log, "nix-store -q --outputs"
        )
        self.owned.update(outs)
        # The big build's `cpu` outputs (named `<name>-cpu`), in the order of their drvs.
        cpu_outs = [o for o in outs if workload.shape == "big" and o.endswith("-cpu")]
        outs = [o for o in outs if o not in cpu_outs]
        if len(outs) != total or (workload.shape == "big" and len(cpu_outs) != total):
            raise BenchError(f"{len(outs)} outputs for {total} derivations")
        clients = []
        for k in range(workload.clients):
            builds = []
            for i in range(workload.count):
                n = k * workload.count + i
                text = f"{PREFIX} {salt} c{k}-{i}\n"
                if workload.shape == "chain" and i > 0:
                    text += f"{outs[n - 1]}\n{PREFIX} {salt} c{k}-{i - 1}\n"
                if workload.shape == "big":
                    nar_hash = self.big_output_nar_hash(rundir, text.encode(), workload.size_mib * MIB)
                    builds.append(Build(drvs[n], outs[n], None, nar_hash, cpu_outs[n]))
                else:
                    builds.append(Build(drvs[n], outs[n], text))
            clients.append(builds)
        return clients

    def build_command(self, url, jobs, drvs):
        """`nix-build` of `drvs` on the server only: no local build slots."""
        builders = f"{url} {BUILDER_SYSTEM} - {jobs} 1 {BUILDER_FEATURES}"
        return ["nix-build", "--max-jobs", "0", "--no-out-link", "--builders", builders] + drvs

    def check_built(self, builds, printed, what):
        """The outputs nix-build printed are the expected ones, valid, with the expected bytes.
        Returns the CPU seconds the big builds' builders reported (0 without big builds)."""
        want = [b.out for b in builds]
        if sorted(printed) != sorted(want):
            raise BenchError(f"{what}: nix-build printed {len(printed)} paths, not the {len(want)} outputs")
        # nix-build prints the `out` outputs; the big builds' `cpu` outputs came back too.
        want += [b.cpu_out for b in builds if b.cpu_out]
        capture(["nix-store", "--check-validity"] + want, self.env, self.log, f"{what}: validity")
        big = [b for b in builds if b.nar_hash is not None]
        if big:
            # The bytes arrived: the narHash the client recorded and the file on its disk.
            outs = [b.out for b in big]
            recorded = self.hashes(None, outs, f"{what}: client narHash of the outputs")
            disk = self.disk_hashes(outs, f"{what}: re-hash of the fetched outputs")
            for b, h in zip(big, disk):
                if recorded[b.out] != b.nar_hash or h != b.nar_hash:
                    raise BenchError(
                        f"{what}: {b.out} has narHash {recorded[b.out]} recorded and {h} on disk, "
                        f"expected {b.nar_hash}"
                    )
        for b in builds:
            if b.text is None:
                continue
            with open(b.out) as f:
                got = f.read()
            if got != b.text:
                raise BenchError(f"{what}: {b.out} holds {got!r} instead of {b.text!r}")
        return sum(builder_times(b.cpu_out) for b in builds if b.cpu_out)

    def forget(self, paths):
        """Deletes a run's derivations and outputs from the client store (not measured)."""
        self.delete(paths, "deleting the run's derivations and outputs")
        self.owned.difference_update(paths)


def builder_times(path):
    """Seconds in a shell's `times` output (user and system, of the shell and its children)."""
    with open(path) as f:
        text = f.read()
    found = re.findall(r"(\d+)m([\d.]+)s", text)
    if len(found) != 4:
        raise BenchError(f"{path}: not the output of `times`: {text!r}")
    return sum(int(m) * 60 + float(sec) for m, sec in found)


def big_builder(size_mib):
    """The shell command of the big build after its first line: `size_mib` MiB of zeros
    (the cheapest bytes a builder can write; nothing on the way compresses them)."""
    return f"dd if=/dev/zero bs={MIB} count={size_mib} 2>/dev/null"


@dataclasses.dataclass(frozen=True)
class Build:
    """One derivation of a run: its .drv, its output path and the output's expected bytes
    (`text`), or for a big output its expected narHash (computed here, independently)."""

    drv: str
    out: str
    text: str | None
    nar_hash: str | None = None
    cpu_out: str | None = None  # the big build's second output: the builder's `times`


def u64(n):
    return struct.pack("<Q", n)


def wire_str(s):
    b = s.encode() if isinstance(s, str) else s
    return u64(len(b)) + b + b"\0" * (-len(b) % 8)


def nar_regular_file(contents):
    parts = ["nix-archive-1", "(", "type", "regular", "contents"]
    return b"".join(wire_str(p) for p in parts) + wire_str(contents) + wire_str(")")


# ---------------------------------------------------------------------------------------
# Servers


def wrapper_script(path, group, stats_dir, label, env, program, foreground=False):
    """Writes the remote program: join the run's cgroups, run the server under GNU time.

    Nix's client SIGKILLs the process it started when it disconnects, so for sessions the
    server runs under `time` in the background of this shell: the shell dies, `time`
    waits for the server and writes its maxrss. `time` runs in a session of its own
    (`setsid`): a remote build's hook is killed as a whole process group once the build is
    done, which would take `time` with it. The server ends as it would anyway, at the end
    of its input. The daemon, stopped by the harness, gets `exec time` instead. Without a
    `stats_dir` the shell joins the cgroup and execs the server, nothing else.
    """
    lines = ["#!/bin/sh", "set -e"]
    if group is not None:
        lines += [f"echo $$ > {shq(f)}" for f in group.procs_files()]
    # Exported by the shell itself: an `env` process would cost each session a millisecond.
    lines += [f"export {k}={shq(v)}" for k, v in env.items()]
    timed = (
        f"{'' if foreground else SETSID + ' -w '}{GNU_TIME} -o {shq(stats_dir)}/{label}.$$ -f '%M %U %S' "
        f"{shq(program)} \"$@\""
    )
    if stats_dir is None:
        lines.append(f"exec {shq(program)} \"$@\"")
    elif foreground:
        lines.append("exec " + timed)
    else:
        # A background list's stdin would be /dev/null unless redirected explicitly.
        lines += ["exec 3<&0", f"{timed} <&3 3<&- &", "exec 3<&-", "wait $!"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.chmod(path, 0o755)
    return path


def shq(s):
    return "'" + str(s).replace("'", "'\\''") + "'"


def read_stats(stats_dir):
    """Per server process: (label, maxrss bytes, user+sys seconds) from GNU time's files."""
    out = []
    for name in sorted(os.listdir(stats_dir)):
        with open(os.path.join(stats_dir, name)) as f:
            lines = [x for x in f.read().splitlines() if x.strip()]
        # A process killed by a signal gets a "Command terminated by signal" line first.
        fields = lines[-1].split() if lines else []
        if len(fields) != 3:
            raise BenchError(f"unreadable GNU time output in {name}: {lines}")
        out.append((name.split(".")[0], int(fields[0]) * 1024, float(fields[1]) + float(fields[2])))
    return out


class Reference:
    """Nix's `nix-store --serve` on a chroot store of its own (`remote-store=`).

    Its configuration is the client's plus what building needs: Nix's sandbox (a chroot
    store always builds in it on Linux; `sandbox = true` and no fallback make that
    explicit), the `nixbld` build users (we are root), one local build slot per
    `nix-store --serve` process (each builds the one derivation it is sent), one core per
    build as nixbuild gives, and no builders or substituters of its own.
    """

    name = "reference"
    label = SIDE_LABEL["reference"]
    # No process of its own outlives a session.
    resident = 0

    def __init__(self, root, client_conf, conf_name="ref-nix-conf"):
        self.root = root
        self.store = None
        self.conf_dir = os.path.join(root, conf_name)
        os.mkdir(self.conf_dir)
        with open(client_conf) as f:
            conf = f.read()
        with open(os.path.join(self.conf_dir, "nix.conf"), "w") as f:
            f.write(
                conf
                + "sandbox = true\n"
                "sandbox-fallback = false\n"
                "build-users-group = nixbld\n"
                "max-jobs = 1\n"
                "cores = 1\n"
                "builders =\n"
                # Nix's default again: the client's 0 above is a client-side choice.
                "build-poll-interval = 5\n"
            )

    def fresh_store(self, n):
        if self.store:
            rm_tree(self.store)
        self.store = os.path.join(self.root, f"ref-store-{n}")

    def start(self, rundir, group, stats_dir, clients=1, timed_sessions=True):
        """The store URL for each client, each with a remote program of its own.

        Nix's client keeps its build-slot locks per builder URL, so clients running at
        once need distinct URLs to get their own slots. Without `timed_sessions` the
        sessions run without GNU time (no maxrss, and no CPU spent on measuring it).
        """
        prog = shutil.which("nix-store")
        env = {"NIX_CONF_DIR": self.conf_dir}
        stats = stats_dir if timed_sessions else None
        urls = []
        for k in range(clients):
            script = wrapper_script(
                os.path.join(rundir, f"ref-serve-{k}.sh"), group, stats, "nix-store", env, prog
            )
            urls.append(f"ssh://localhost?remote-program={script}&remote-store={self.store}")
        return urls

    def verify_builds(self, client, builds, _rundir):
        """Every output is valid in the reference's store and holds the expected bytes."""
        outs = [b.out for b in builds]
        capture(
            ["nix-store", "--store", self.store, "--check-validity"] + outs,
            client.env,
            client.log,
            "reference: outputs valid in its store",
        )
        check_server_nar_hashes("reference store", client, builds, self.server_hashes)
        for b in builds:
            if b.text is None:
                continue
            with open(self.store + b.out) as f:
                if f.read() != b.text:
                    raise BenchError(f"reference store: {b.out} does not hold the expected bytes")
        return None

    def server_hashes(self, client, paths, what):
        """narHash of each path as the server's store records it."""
        return client.hashes(self.store, paths, what)

    def stop(self, _group=None):
        """Nothing to stop: each session's `nix-store --serve` ends with its client."""

    def verify_upload(self, client, dataset):
        got = self.server_hashes(client, dataset.paths, "reference: narHash on the server")
        check_hashes("reference store", dataset, got)
        disk = client.disk_hashes(
            [self.store + p for p in dataset.paths], "reference: re-hash of the stored files"
        )
        missing = set(dataset.nar_hashes.values()) - set(disk)
        if missing:
            raise BenchError(f"reference store: files on disk do not hash to {len(missing)} narHashes")


class Daemon:
    """A server the harness starts for each run through a foreground wrapper (`exec time`),
    and stops with SIGTERM to the server itself, not to `time`, which must survive to
    report. While no session runs, the run's cgroup holds exactly these two processes."""

    resident = 2
    daemon = None

    def launch(self, cmd, logfile, env):
        self.daemon = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=open(logfile, "ab"),
            stderr=subprocess.STDOUT,
            env=env,
        )

    def daemon_pids(self, group):
        """The server itself, not the `time` that waits for it."""
        return [p for p in group.pids() if comm(p) not in ("time", None)] if group else []

    def stop(self, group=None):
        """SIGTERM to the server (not to `time`); SIGKILL after 30 s."""
        if self.daemon is None:
            return
        targets = self.daemon_pids(group) if group else [self.daemon.pid]
        for pid in targets:
            kill_pid(pid, signal.SIGTERM)
        try:
            self.daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            kill_pid(self.daemon.pid, signal.SIGKILL)
            for pid in targets:
                kill_pid(pid, signal.SIGKILL)
            self.daemon.wait()
        self.daemon = None


class Nixbuild(Daemon):
    """`nixbuild-server` on a temporary state directory, reached through `nixbuild-serve`."""

    name = "nixbuild"
    label = SIDE_LABEL["nixbuild"]

    def __init__(self, root, bin_dir, client):
        self.root = root
        self.server_bin = os.path.join(bin_dir, "nixbuild-server")
        self.serve_bin = os.path.join(bin_dir, "nixbuild-serve")
        for b in (self.server_bin, self.serve_bin):
            if not os.access(b, os.X_OK):
                raise BenchError(f"{b} is missing: build the examples (benches/compare/run does)")
        self.client = client
        self.state = None
        self.daemon = None
        self.daemon_log = None

    def fresh_store(self, n):
        if self.state:
            rm_tree(self.state)
        self.state = os.path.join(self.root, f"nixbuild-state-{n}")
        os.mkdir(self.state)

    def relay_env(self):
        return {"NIXBUILD_STATE_DIR": self.state, "NIXBUILD_ACCOUNT": "bench"}

    def start(self, rundir, group, stats_dir, clients=1, timed_sessions=True):
        """Starts the daemon (always under GNU time); the store URL for each client (see
        `Reference.start`)."""
        self.start_daemon(rundir, group, stats_dir)
        urls = []
        for k in range(clients):
            script = wrapper_script(
                os.path.join(rundir, f"nixbuild-serve-{k}.sh"),
                group,
                stats_dir if timed_sessions else None,
                "relay",
                self.relay_env(),
                self.serve_bin,
            )
            urls.append(f"ssh://localhost?remote-program={script}")
        return urls

    def start_daemon(self, rundir, group, stats_dir, extra_args=()):
        script = wrapper_script(
            os.path.join(rundir, "nixbuild-server.sh"),
            group,
            stats_dir,
            "daemon",
            {},
            self.server_bin,
            foreground=True,
        )
        self.daemon_log = os.path.join(rundir, "daemon.log")
        self.launch([script, "--state-dir", self.state, *extra_args], self.daemon_log, self.client.env)
        sock = os.path.join(self.state, "serve.sock")
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.daemon.poll() is not None:
                raise BenchError(f"nixbuild-server exited at start:\n{tail(self.daemon_log)}")
            if os.path.exists(sock):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.connect(sock)
                    break
                except OSError:
                    pass
                finally:
                    s.close()
            if time.monotonic() > deadline:
                raise BenchError(f"nixbuild-server did not listen:\n{tail(self.daemon_log)}")
            time.sleep(0.02)

    def server_hashes(self, client, paths, what):
        """narHash of each path as the server's store records it: asked through the relay
        of a separate, unmeasured daemon on the same state directory."""
        rundir = tempfile.mkdtemp(prefix="verify-", dir=self.root)
        self.start_daemon(rundir, None, None)
        try:
            script = wrapper_script(
                os.path.join(rundir, "plain-serve.sh"), None, None, "", self.relay_env(), self.serve_bin
            )
            return client.hashes(f"ssh://localhost?remote-program={script}", paths, what)
        finally:
            self.stop()

    def verify_upload(self, client, dataset):
        got = self.server_hashes(client, dataset.paths, "nixbuild: narHash on the server")
        check_hashes("nixbuild store", dataset, got)
        objects = os.path.join(self.state, "objects")
        files = [os.path.join(objects, n) for n in sorted(os.listdir(objects))]
        disk = client.disk_hashes(files, "nixbuild: re-hash of the stored objects")
        missing = set(dataset.nar_hashes.values()) - set(disk)
        if missing:
            raise BenchError(f"nixbuild store: no object hashes to {len(missing)} of the narHashes")


    def verify_builds(self, client, builds, rundir):
        """The daemon's log shows each derivation built once and answered as Built; big
        outputs are in the store with the expected narHash.

        Returns the server-side time of each BuildDerivation in seconds (the log's
        `micros=`, from receiving the request to sending the BuildResult).
        """
        with open(os.path.join(rundir, "daemon.log"), errors="replace") as f:
            lines = f.read().splitlines()
        started = {}
        answered = {}
        for line in lines:
            drv = field(line, "drv")
            if drv is None:
                continue
            if " building " in line:
                started[drv] = started.get(drv, 0) + 1
            elif "answered BuildDerivation" in line:
                micros = field(line, "micros")
                if field(line, "status") != "Built" or micros is None or not micros.isdigit():
                    raise BenchError(f"nixbuild: unexpected answer in the daemon log: {line}")
                answered.setdefault(drv, []).append(int(micros) / 1e6)
        times = []
        for b in builds:
            if started.get(b.drv) != 1:
                raise BenchError(
                    f"nixbuild: the daemon log shows {started.get(b.drv, 0)} builds of {b.drv}, not 1"
                )
            if len(answered.get(b.drv, [])) != 1:
                raise BenchError(f"nixbuild: {b.drv} not answered once as Built in the daemon log")
            times += answered[b.drv]
        check_server_nar_hashes("nixbuild store", client, builds, self.server_hashes)
        return times


class SshClient:
    """The client's side of SSH: one ed25519 key (account `bench`), and an ssh config with
    an alias per server that pins the host key that server has now (`StrictHostKeyChecking
    yes`, a known_hosts file per alias, never host key checking off). Nix gets the config
    through `NIX_SSHOPTS=-F <config>`, in the client's environment."""

    def __init__(self, tmp, client, ciphers=None):
        self.ciphers = ciphers  # the client's `Ciphers`, or None for OpenSSH's default
        self.dir = os.path.join(tmp, "ssh")
        os.mkdir(self.dir, 0o700)
        self.key = os.path.join(self.dir, "id_ed25519")
        run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", ACCOUNT, "-f", self.key],
            client.env,
            client.log,
            "ssh-keygen of the client key",
        )
        self.authorized_keys = os.path.join(self.dir, "authorized_keys")
        shutil.copy(self.key + ".pub", self.authorized_keys)
        self.config = os.path.join(self.dir, "ssh_config")
        self.hosts = {}  # alias -> port
        client.env["NIX_SSHOPTS"] = f"-F {self.config}"

    def pin(self, alias, clients, port, known_hosts_line):
        """Points `clients` aliases (`alias`, or `alias-0`, `alias-1`, ...: Nix keeps its
        build-slot locks per URL, so clients running at once need URLs of their own) at
        127.0.0.1:`port`, trusting only `known_hosts_line`; returns their URLs."""
        names = [alias] if clients == 1 else [f"{alias}-{k}" for k in range(clients)]
        for a in names:
            with open(os.path.join(self.dir, f"known_hosts-{a}"), "w") as f:
                f.write(known_hosts_line + "\n")
            self.hosts[a] = port
        blocks = []
        for a, p in sorted(self.hosts.items()):
            blocks.append(
                f"Host {a}\n  HostName 127.0.0.1\n  Port {p}\n  User root\n"
                f"  IdentityFile {self.key}\n  IdentitiesOnly yes\n"
                f"  UserKnownHostsFile {os.path.join(self.dir, f'known_hosts-{a}')}\n"
                "  GlobalKnownHostsFile /dev/null\n  StrictHostKeyChecking yes\n"
                "  BatchMode yes\n  ControlMaster no\n  ControlPath none\n"
                + (f"  Ciphers {self.ciphers}\n" if self.ciphers else "")
            )
        with open(self.config, "w") as f:
            f.write("".join(blocks))
        return [f"ssh://{a}" for a in names]


def free_port():
    """A TCP port of 127.0.0.1 free a moment ago (for sshd, which cannot report one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SshReference(Daemon, Reference):
    """OpenSSH's sshd running `nix-store --serve --write` in a private mount namespace
    (`unshare -m`) where `<store>/nix` is bind-mounted over `/nix`: the reference's store is
    the ordinary local store `/nix/store` of that namespace, with its own database, built in
    Nix's sandbox with the same settings as the stdio reference (`Reference`). From outside
    it is the chroot store `<store>`, which is how it is checked.

    sshd: its own host key and configuration, public-key authentication of root with the
    client's key only, no PAM, `SetEnv` for Nix's configuration. In the namespace an empty
    file is bind-mounted over root's `~/.bashrc`, which bash reads for every command sshd
    runs: this machine's (pyenv set-up) would otherwise be charged to the reference.
    """

    label = SSH_SIDE_LABEL["reference"]
    alias = "reference-ssh"

    def __init__(self, root, client_conf, ssh, client, kex=None):
        Reference.__init__(self, root, client_conf, "ref-ssh-nix-conf")
        self.kex = kex  # sshd's KexAlgorithms, or None for OpenSSH's default
        if not os.access(SSHD, os.X_OK):
            raise BenchError(f"{SSHD} is missing: install openssh-server")
        self.ssh = ssh
        self.client = client
        self.host_key = os.path.join(root, "sshd_host_ed25519_key")
        run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "reference", "-f", self.host_key],
            client.env,
            client.log,
            "ssh-keygen of sshd's host key",
        )
        with open(self.host_key + ".pub") as f:
            self.host_pub = " ".join(f.read().split()[:2])
        self.empty = os.path.join(root, "ref-ssh-empty-file")
        open(self.empty, "w").close()
        # sshd's privilege separation directory.
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)

    def fresh_store(self, n):
        if self.store:
            rm_tree(self.store)
        self.store = os.path.join(self.root, f"ref-ssh-store-{n}")
        os.makedirs(os.path.join(self.store, "nix"))
        # Its database exists before the runs: the first connection does not create it.
        run(
            ["nix-store", "--store", self.store, "--init"],
            self.client.env,
            self.client.log,
            "nix-store --init of the reference's store",
        )

    def start(self, rundir, group, stats_dir, clients=1, timed_sessions=True):
        """Starts sshd in its namespace on a free port; the URL for each client."""
        port = free_port()
        conf = os.path.join(rundir, "sshd_config")
        with open(conf, "w") as f:
            f.write(
                f"ListenAddress 127.0.0.1:{port}\n"
                f"HostKey {self.host_key}\n"
                f"AuthorizedKeysFile {self.ssh.authorized_keys}\n"
                "AuthenticationMethods publickey\n"
                "PubkeyAuthentication yes\n"
                "PasswordAuthentication no\n"
                "KbdInteractiveAuthentication no\n"
                "PermitRootLogin prohibit-password\n"
                "UsePAM no\n"
                # The key and its directories live under the world-writable $TMPDIR.
                "StrictModes no\n"
                "PidFile none\n"
                "UseDNS no\n"
                "PrintMotd no\n"
                "X11Forwarding no\n"
                "AllowTcpForwarding no\n"
                "AllowAgentForwarding no\n"
                "PermitTTY no\n"
                "LogLevel ERROR\n"
                + (f"KexAlgorithms {self.kex}\n" if self.kex else "")
                + f"SetEnv NIX_CONF_DIR={self.conf_dir} NIX_USER_CONF_FILES={self.empty}\n"
            )
        bashrc = os.path.expanduser("~root/.bashrc")
        inner = [f"mount --bind {shq(self.store + '/nix')} /nix"]
        if os.path.exists(bashrc):
            inner.append(f"mount --bind {shq(self.empty)} {shq(bashrc)}")
        inner.append(f"exec {SSHD} -D -e -f {shq(conf)}")
        script = wrapper_script(
            os.path.join(rundir, "sshd.sh"), group, stats_dir, "sshd", {}, UNSHARE, foreground=True
        )
        log_file = os.path.join(rundir, "sshd.log")
        self.launch(
            [script, "--mount", "--propagation", "private", "/bin/sh", "-c", " && ".join(inner)],
            log_file,
            self.client.env,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.daemon.poll() is not None:
                raise BenchError(f"sshd exited at start:\n{tail(log_file)}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"sshd did not listen:\n{tail(log_file)}")
            time.sleep(0.02)
        return self.ssh.pin(self.alias, clients, port, f"[127.0.0.1]:{port} {self.host_pub}")


class SshNixbuild(Nixbuild):
    """`nixbuild-server` with its SSH front door on a free port (`--listen 127.0.0.1:0`),
    the client's key in its `--authorized-keys`; the host key it generates in each fresh
    state directory is pinned from the lines it prints at start."""

    label = SSH_SIDE_LABEL["nixbuild"]
    alias = "nixbuild-ssh"

    def __init__(self, root, bin_dir, client, ssh, ciphers=None):
        super().__init__(root, bin_dir, client)
        self.ssh = ssh
        self.ciphers = ciphers  # `ssh.ciphers`, or None for nixbuild's default

    def fresh_store(self, n):
        """A fresh state directory; with `ciphers`, its `nixbuild.toml` sets `ssh.ciphers`."""
        super().fresh_store(n)
        if self.ciphers:
            names = ", ".join(f'"{c}"' for c in self.ciphers.split(","))
            with open(os.path.join(self.state, "nixbuild.toml"), "w") as f:
                f.write(f"[ssh]\nciphers = [{names}]\n")

    def start(self, rundir, group, stats_dir, clients=1, timed_sessions=True):
        """Starts the daemon with its SSH listener; the URL for each client."""
        args = ["--listen", "127.0.0.1:0", "--authorized-keys", self.ssh.authorized_keys]
        self.start_daemon(rundir, group, stats_dir, args)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            with open(self.daemon_log, errors="replace") as f:
                text = f.read()
            at = text.rfind("nixbuild-server: SSH on ")
            line = None
            if at >= 0:
                line = next(
                    (
                        x.split("known_hosts line:", 1)[1].strip()
                        for x in text[at:].splitlines()
                        if "known_hosts line:" in x
                    ),
                    None,
                )
            if line:
                break
            if time.monotonic() > deadline or self.daemon.poll() is not None:
                raise BenchError(f"nixbuild-server printed no known_hosts line:\n{tail(self.daemon_log)}")
            time.sleep(0.02)
        port = int(line.split()[0].rsplit(":", 1)[1])
        return self.ssh.pin(self.alias, clients, port, line)


def field(line, key):
    """The value of ` key=value` in a log line, or None."""
    at = line.find(f" {key}=")
    if at < 0:
        return None
    return line[at + len(key) + 2 :].split(" ", 1)[0]


def check_server_nar_hashes(where, client, builds, server_hashes):
    """Big outputs are valid in the server's store with the expected narHash."""
    big = [b for b in builds if b.nar_hash is not None]
    if not big:
        return
    got = server_hashes(client, [b.out for b in big], f"{where}: narHash of the outputs")
    for b in big:
        if got.get(b.out) != b.nar_hash:
            raise BenchError(f"{where}: {b.out} has narHash {got.get(b.out)}, expected {b.nar_hash}")


def check_hashes(where, dataset, got):
    bad = [p for p in dataset.paths if got.get(p) != dataset.nar_hashes[p]]
    if bad:
        p = bad[0]
        raise BenchError(
            f"{where}: {len(bad)} paths with the wrong narHash, e.g. {p}: "
            f"{got.get(p)} instead of {dataset.nar_hashes[p]}"
        )


# ---------------------------------------------------------------------------------------
# Runs


@dataclasses.dataclass
class Sample:
    wall: float  # seconds, client command
    cpu: float  # seconds, user+sys of the server cgroup
    rss: int  # bytes, sum of the server processes' maxrss
    cg_mem: int | None  # bytes, memory cgroup high-water mark (includes page cache)
    procs: list  # (label, maxrss, cpu) per server process
    client_cpu: float  # seconds, user+sys of the client command and everything it waited for
    ws_peak: int | None  # bytes, highest sampled working set (cgroup memory minus file pages)


@dataclasses.dataclass
class BuildSample:
    wall: float  # seconds: the nix-build (all clients'), or the sum of build-one's nix-builds
    cpu: float  # seconds, user+sys of the server cgroup, builds included
    cg_mem: int | None  # bytes, memory cgroup high-water mark
    procs: list  # (label, maxrss, cpu) per server process
    builds: int  # derivations built
    per_build: list  # build-one: (wall, server CPU) of each nix-build, seconds
    server_times: list | None  # nixbuild: BuildDerivation -> BuildResult per build, seconds
    client_cpu: float  # seconds, user+sys of the nix-builds and everything they waited for
    ws_peak: int | None  # bytes, highest sampled working set (cgroup memory minus file pages)
    builder_cpu: float  # seconds the big builds' builders reported (`times`), 0 otherwise


@dataclasses.dataclass
class ConnectSample:
    walls: list  # seconds, each nix store ping
    cpu: float  # seconds, user+sys of the server cgroup over all connections
    cg_mem: int | None  # bytes, memory cgroup high-water mark
    procs: list  # (label, maxrss, cpu): the listening server under GNU time


class Bench:
    def __init__(self, args):
        self.args = args
        self.tmp = tempfile.mkdtemp(prefix=f"{PREFIX}.{os.getpid()}.", dir=args.tmp_dir)
        self.cgroups = Cgroups(f"{PREFIX}.{os.getpid()}")
        self.client = Client(self.tmp)
        self.reference = Reference(self.tmp, self.client.conf_file)
        want_nixbuild = "nixbuild" in args.sides
        self.nixbuild = Nixbuild(self.tmp, args.bin_dir, self.client) if want_nixbuild else None
        self.ssh_reference = self.ssh_nixbuild = None
        if any(w.transport == "ssh" for w in args.workloads):
            ssh = SshClient(self.tmp, self.client, args.ssh_ciphers)
            self.ssh_reference = SshReference(
                self.tmp, self.client.conf_file, ssh, self.client, args.sshd_kex
            )
            if want_nixbuild:
                self.ssh_nixbuild = SshNixbuild(
                    self.tmp, args.bin_dir, self.client, ssh, args.nixbuild_ssh_ciphers
                )
        self.salt = secrets.token_hex(4)
        self.counter = 0
        self.active_group = None

    def cleanup(self):
        for side in (self.nixbuild, self.ssh_nixbuild, self.ssh_reference):
            if side is None:
                continue
            try:
                side.stop(self.active_group)
            except (OSError, subprocess.SubprocessError) as e:
                log(f"warning: stopping the {side.label} server: {e}")
        self.cgroups.destroy()
        self.client.delete_owned()
        if self.args.keep_tmp:
            log(f"kept {self.tmp} (the next run removes it)")
        else:
            rm_tree(self.tmp)

    def side(self, name, transport):
        if transport == "ssh":
            return self.ssh_reference if name == "reference" else self.ssh_nixbuild
        return self.reference if name == "reference" else self.nixbuild

    def dataset(self, key):
        if key == "closure":
            return self.client.make_closure(self.salt, self.args.closure_paths, MIB)
        return self.client.make_big(self.salt, self.args.big_mib * MIB)

    def populate(self, side, dataset):
        """Fills a fresh server store for downloads (an upload, not measured)."""
        self.counter += 1
        side.fresh_store(self.counter)
        rundir = self.rundir("populate")
        group = self.cgroups.new_group(f"populate-{self.counter}")
        self.active_group = group
        try:
            (url,) = side.start(rundir, group, None)
            run(
                ["nix", "copy", "--to", url, dataset.top],
                self.client.env,
                self.client.log,
                f"{side.name}: populating the store",
            )
            side.stop(group)
        finally:
            group.destroy()
            self.active_group = None
        side.verify_upload(self.client, dataset)

    def rundir(self, what):
        d = os.path.join(self.tmp, f"run-{self.counter:03d}-{what}")
        os.mkdir(d)
        return d

    def measure(self, side, workload, dataset):
        self.counter += 1
        if workload.direction == "upload":
            side.fresh_store(self.counter)
        else:
            self.client.delete(dataset.paths, "deleting the client copies")
        rundir = self.rundir(f"{side.name}-{workload.name}")
        stats_dir = os.path.join(rundir, "stats")
        os.mkdir(stats_dir)
        os.sync()  # start from clean page cache writeback, not the previous run's
        group = self.cgroups.new_group(f"run-{self.counter}")
        self.active_group = group
        try:
            (url,) = side.start(rundir, group, stats_dir)
            flag = "--to" if workload.direction == "upload" else "--from"
            cmd = ["nix", "copy", flag, url, dataset.top]
            group.sample_working_set()
            cpu0 = group.cpu_ns()
            client0 = children_cpu()
            t0 = time.monotonic()
            run(cmd, self.client.env, self.client.log, f"{side.name}: {workload.name}")
            wall = time.monotonic() - t0
            client_cpu = children_cpu() - client0
            cpu, cg_mem = self.finish(side, group, cpu0)
            ws_peak = group.working_set_peak()
        finally:
            group.destroy()
            self.active_group = None
        procs = read_stats(stats_dir)
        if not procs:
            raise BenchError(f"{side.name}: no server process statistics in {stats_dir}")
        # Checked after the measurement: the work was really done.
        if workload.direction == "upload":
            side.verify_upload(self.client, dataset)
        else:
            got = self.client.hashes(None, dataset.paths, "client narHash after download")
            check_hashes("client store", dataset, got)
            disk = self.client.disk_hashes(dataset.paths, "client: re-hash of the downloaded paths")
            if disk != [dataset.nar_hashes[p] for p in dataset.paths]:
                raise BenchError("client store: downloaded files do not hash to their narHash")
        return Sample(wall, cpu, sum(p[1] for p in procs), cg_mem, procs, client_cpu, ws_peak)

    def sessions_ended(self, side, group):
        """Waits for the run's sessions to end: nothing left but the daemon and its `time`."""
        keep = side.resident
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while len(group.pids()) > keep:
            if time.monotonic() > deadline:
                raise BenchError(f"{side.name}: sessions still running after the client exited")
            time.sleep(0.01)

    def finish(self, side, group, cpu0):
        """Ends a run: sessions over, the daemon stopped (so any work it does after the
        client returned is counted too), every server process gone. Returns the server CPU
        seconds since `cpu0` and the memory cgroup's peak."""
        self.sessions_ended(side, group)
        side.stop(group)
        if not group.wait_empty(SETTLE_TIMEOUT):
            raise BenchError(f"{side.name}: server processes still running: {group.pids()}")
        return (group.cpu_ns() - cpu0) / 1e9, group.mem_peak()

    def measure_build(self, side, workload, busybox):
        """One run of a build workload, on a fresh server store that holds only busybox."""
        self.populate(side, busybox)
        self.counter += 1
        rundir = self.rundir(f"{side.name}-{workload.name}")
        clients = self.client.make_builds(rundir, workload, secrets.token_hex(4))
        builds = [b for c in clients for b in c]
        stats_dir = os.path.join(rundir, "stats")
        os.mkdir(stats_dir)
        os.sync()
        group = self.cgroups.new_group(f"run-{self.counter}")
        self.active_group = group
        per_build = []  # build-one: (wall, server CPU) of each nix-build
        try:
            # Sessions without GNU time: each build is a session, and timing it would add
            # milliseconds of wrapper CPU to every build on both sides.
            urls = side.start(rundir, group, stats_dir, workload.clients, timed_sessions=False)
            group.sample_working_set()
            cpu0 = group.cpu_ns()
            client0 = children_cpu()
            if workload.shape == "one":
                printed = [[]]
                for i, b in enumerate(clients[0]):
                    c0 = group.cpu_ns()
                    t0 = time.monotonic()
                    (out,) = self.nix_builds(side, rundir, urls, [[b]], f"{i}")
                    w = time.monotonic() - t0
                    # Its session over before the next build: its CPU is all counted.
                    self.sessions_ended(side, group)
                    per_build.append((w, (group.cpu_ns() - c0) / 1e9))
                    printed[0] += out
                wall = sum(w for w, _ in per_build)
            else:
                t0 = time.monotonic()
                printed = self.nix_builds(side, rundir, urls, clients, "all")
                wall = time.monotonic() - t0
            client_cpu = children_cpu() - client0
            cpu, cg_mem = self.finish(side, group, cpu0)
            ws_peak = group.working_set_peak()
        finally:
            group.destroy()
            self.active_group = None
        procs = read_stats(stats_dir)  # the daemon's; sessions were not timed
        # Checked after the measurement: every derivation was built, on the server.
        builder_cpu = 0.0
        for k, (c, out) in enumerate(zip(clients, printed)):
            builder_cpu += self.client.check_built(c, out, f"{side.name}: client {k}")
        server_times = side.verify_builds(self.client, builds, rundir)
        self.client.forget(
            [b.drv for b in builds] + [b.out for b in builds] + [b.cpu_out for b in builds if b.cpu_out]
        )
        return BuildSample(
            wall, cpu, cg_mem, procs, len(builds), per_build, server_times, client_cpu, ws_peak, builder_cpu
        )

    def measure_connect(self, side, workload):
        """`workload.count` connections in a row, each `nix store ping`, to a server
        started on a fresh store (its start-up not measured)."""
        self.counter += 1
        side.fresh_store(self.counter)
        rundir = self.rundir(f"{side.name}-{workload.name}")
        stats_dir = os.path.join(rundir, "stats")
        os.mkdir(stats_dir)
        group = self.cgroups.new_group(f"run-{self.counter}")
        self.active_group = group
        walls = []
        try:
            (url,) = side.start(rundir, group, stats_dir)
            cpu0 = group.cpu_ns()
            for i in range(workload.count):
                t0 = time.monotonic()
                run(
                    ["nix", "store", "ping", "--store", url],
                    self.client.env,
                    self.client.log,
                    f"{side.name}: {workload.name} #{i + 1}",
                )
                walls.append(time.monotonic() - t0)
            cpu, cg_mem = self.finish(side, group, cpu0)
        finally:
            group.destroy()
            self.active_group = None
        return ConnectSample(walls, cpu, cg_mem, read_stats(stats_dir))

    def nix_builds(self, side, rundir, urls, clients, tag):
        """Runs one nix-build per client, all at once; the output paths each printed."""
        slots = build_slots(self.args, len(clients))
        procs = []
        for k, (url, builds) in enumerate(zip(urls, clients)):
            cmd = self.client.build_command(url, slots, [b.drv for b in builds])
            out = os.path.join(rundir, f"client-{k}-{tag}.out")
            err = os.path.join(rundir, f"client-{k}-{tag}.log")
            with open(out, "wb") as o, open(err, "wb") as e:
                procs.append(
                    (subprocess.Popen(cmd, env=self.client.env, stdout=o, stderr=e), out, err)
                )
        failed = []
        for p, _out, err in procs:
            if p.wait() != 0:
                failed.append(f"exit {p.returncode}:\n{tail(err)}")
        if failed:
            raise BenchError(f"{side.name}: nix-build failed ({len(failed)} of {len(procs)}), {failed[0]}")
        printed = []
        for _p, out, _err in procs:
            with open(out) as f:
                printed.append(f.read().split())
        return printed


def children_cpu():
    """User+sys seconds of every child this process has waited for (the client commands,
    with whatever they waited for in turn: Nix's ssh, its build hooks)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def wrapper_cpu_ms(cgroups, tmp, n=20):
    """CPU milliseconds the harness's build-session wrapper (a shell that joins the cgroup
    and execs the server) costs per session, measured with `/bin/true` as the server.
    Counted on both sides: each build is one session on either."""
    d = os.path.join(tmp, "wrapper-probe")
    os.mkdir(d)
    group = cgroups.new_group("wrapper-probe")
    try:
        script = wrapper_script(os.path.join(d, "probe.sh"), group, None, "probe", {"X": "1"}, "/bin/true")
        for _ in range(n):
            subprocess.run([script], stdin=subprocess.DEVNULL, check=True)
        if not group.wait_empty(SETTLE_TIMEOUT):
            raise BenchError("the wrapper probe did not end")
        return group.cpu_ns() / n / 1e6
    finally:
        group.destroy()


def builder_cpu_ms(busybox_src, tmp, n=50):
    """CPU milliseconds of the builder alone: busybox sh writing a trivial output, outside
    any sandbox. What both sides' figures include per build besides the server's work."""
    target = os.path.join(tmp, "builder-probe")
    sh = os.path.join(busybox_src, "bin", "sh")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    for i in range(n):
        subprocess.run([sh, "-c", f"echo {PREFIX} probe {i} > {target}"], check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    os.unlink(target)
    return used / n * 1000


def fmt_mib(b):
    return "n/a" if b is None else f"{b / MIB:.1f}"


def fmt_ratio(a, b):
    if a is None or b is None or b == 0:
        return "n/a"
    return f"{a / b:.2f}x"


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def labels(workload):
    return SSH_SIDE_LABEL if workload.transport == "ssh" else SIDE_LABEL


def report(workload, dataset, samples, reps):
    sides = [s for s in SIDES if samples[s]]
    label = labels(workload)
    gib = dataset.size / GIB
    med = {}
    for side in sides:
        ss = samples[side]
        med[side] = {
            "wall": median([s.wall for s in ss]),
            "mibs": median([dataset.size / MIB / s.wall for s in ss]),
            "cpu": median([s.cpu for s in ss]),
            "cpu_gib": median([s.cpu / gib for s in ss]),
            "client": median([s.client_cpu for s in ss]),
            "rss": median([s.rss for s in ss]),
            "ws": median([s.ws_peak for s in ss]),
            "cg": median([s.cg_mem for s in ss]),
        }
    keys = ["wall", "mibs", "cpu", "cpu_gib", "client", "rss", "ws", "cg"]

    def cell(k, x):
        if x is None:
            return "n/a"
        if k in ("rss", "ws", "cg"):
            return fmt_mib(x)
        return f"{x:.0f}" if k == "mibs" else f"{x:.3f}"

    flag = "--to" if workload.direction == "upload" else "--from"
    over = " over SSH" if workload.transport == "ssh" else ""
    lines = [
        f"### {workload.name}: nix copy {flag}{over}, {dataset.title} (median of {reps} run{'s' if reps > 1 else ''} per side)",
        "",
        "| | wall time (s) | throughput (MiB/s) | server CPU (s) | server CPU per GiB (s) "
        "| client CPU (s) | server peak RSS (MiB) | server working set peak (MiB) "
        "| server cgroup memory peak (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for side in sides:
        lines.append(f"| {label[side]} | " + " | ".join(cell(k, med[side][k]) for k in keys) + " |")
    runs = ["", "Runs, in the order each side ran them:", "", "```"]
    for side in sides:
        for i, s in enumerate(samples[side]):
            detail = ", ".join(f"{lbl} {rss / MIB:.1f} MiB" for lbl, rss, _cpu in s.procs)
            runs.append(
                f"{side:9} #{i + 1}: wall {s.wall:7.3f} s  cpu {s.cpu:7.3f} s  client {s.client_cpu:7.3f} s  "
                f"rss {s.rss / MIB:7.1f} MiB  ws {fmt_mib(s.ws_peak):>6} MiB  "
                f"cgroup {fmt_mib(s.cg_mem):>7} MiB  [{detail}]"
            )
    runs.append("```")
    if len(sides) < 2:
        return "\n".join(lines + runs)
    r, n = med["reference"], med["nixbuild"]
    lines.append("| nixbuild / reference | " + " | ".join(fmt_ratio(n[k], r[k]) for k in keys) + " |")
    targets = [""]
    if workload.throughput_target is not None:
        peak = max((s.ws_peak for s in samples["nixbuild"] if s.ws_peak is not None), default=None)
        targets += throughput_targets(workload, r, n) + [mem_target(peak, "working set")]
    elif workload.cpu_target is None:
        targets.append("- no target for this workload (issue 5 sets none for moving the big path over SSH)")
    else:
        cpu_ratio = n["cpu"] / r["cpu"] if r["cpu"] else None
        wall_ratio = n["wall"] / r["wall"] if r["wall"] else None
        frac = "1/2" if workload.cpu_target == 1 / 2 else "1/3"
        targets.append(
            f"- target server CPU <= {frac} of the reference: "
            + met(cpu_ratio is not None and cpu_ratio <= workload.cpu_target)
            + f" ({fmt_ratio(n['cpu'], r['cpu'])})"
        )
        if workload.rss_target_mib is not None:
            targets.append(
                f"- target server peak RSS < {workload.rss_target_mib} MiB: "
                + met(n["rss"] < workload.rss_target_mib * MIB)
                + f" ({fmt_mib(n['rss'])} MiB)"
            )
        targets.append(
            "- target wall time no worse than the reference: "
            + met(wall_ratio is not None and wall_ratio <= 1.0)
            + f" ({fmt_ratio(n['wall'], r['wall'])})"
        )
    return "\n".join(lines + targets + runs)


def throughput_targets(workload, r, n):
    """Issue 8's targets for moving bytes: throughput (medians `mibs`) at least
    `throughput_target` times the reference's, or, where the client is the bottleneck,
    server CPU per GiB (`cpu_gib`) at most `cpu_target` of the reference's."""
    tput = n["mibs"] / r["mibs"] if r["mibs"] else None
    cpu = n["cpu_gib"] / r["cpu_gib"] if r["cpu_gib"] else None
    return [
        f"- target throughput >= {workload.throughput_target}x the reference's: "
        + met(tput is not None and tput >= workload.throughput_target)
        + f" ({n['mibs']:.0f} vs {r['mibs']:.0f} MiB/s: {fmt_ratio(n['mibs'], r['mibs'])})",
        "- where the client is the bottleneck (see the client CPU): server CPU per GiB"
        + (" (the builder's own CPU, as it reported, taken out)" if workload.kind == "build" else "")
        + " <= 1/3 of the reference's: "
        + met(cpu is not None and cpu <= workload.cpu_target)
        + f" ({n['cpu_gib']:.3f} vs {r['cpu_gib']:.3f} s/GiB: {fmt_ratio(n['cpu_gib'], r['cpu_gib'])})",
    ]


def mem_target(peak, what):
    return (
        f"- target server memory < {BUILD_MEM_TARGET_MIB} MiB (highest {what} of all server "
        "processes and builds together, over the runs): "
        + ("n/a" if peak is None else met(peak < BUILD_MEM_TARGET_MIB * MIB))
        + f" ({fmt_mib(peak)} MiB)"
    )


def report_build(workload, samples, reps, jobs, builder_ms, wrapper_ms):
    sides = [s for s in SIDES if samples[s]]
    label = labels(workload)
    one = workload.shape == "one"
    med = {}
    for side in sides:
        ss = samples[side]
        med[side] = {
            "wall": median([s.wall for s in ss]),
            "cpu": median([s.cpu for s in ss]),
            "cpu_per_build": median([s.cpu / s.builds for s in ss]),
            "client": median([s.client_cpu for s in ss]),
            "ws": median([s.ws_peak for s in ss]),
            "cg": median([s.cg_mem for s in ss]),
            "rss": median([max((p[1] for p in s.procs), default=None) for s in ss]),
            # build-one: medians over every nix-build of every run
            "build_wall": median([w for s in ss for w, _ in s.per_build]),
            "build_cpu": median([c for s in ss for _, c in s.per_build]),
            "server_time": median([t for s in ss for t in s.server_times or []]),
        }
        if workload.shape == "big":
            # The builder writing the bytes is not the server's work: the CPU it reported
            # (`times`, in its second output) is taken out of the CPU per GiB.
            size = workload.size_mib * MIB * workload.count * workload.clients
            med[side]["mibs"] = median([size / MIB / s.wall for s in ss])
            med[side]["cpu_gib"] = median([(s.cpu - s.builder_cpu) / (size / GIB) for s in ss])
            med[side]["builder"] = median([s.builder_cpu for s in ss])
    slots = "" if one else f"; {jobs} build slot{'s' if jobs > 1 else ''} per client"
    lines = [
        f"### {workload.name}: {workload.title()}{' over SSH' if workload.transport == 'ssh' else ''} (median of {reps} run{'s' if reps > 1 else ''} per side{slots})",
        "",
    ]
    common_head = (
        "| client CPU (s) | server working set peak (MiB) | server cgroup memory peak (MiB) "
        "| daemon peak RSS (MiB) |"
    )
    if one:
        lines += [
            "| | wall per nix-build (ms) | server CPU per build (ms) | server time per build (ms) "
            "| total wall (s) | total server CPU (s) " + common_head,
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
    else:
        lines += [
            "| | wall time (s) | server CPU (s) | server CPU per build (ms) " + common_head,
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]

    def ms(x):
        return "n/a" if x is None else f"{x * 1000:.1f}"

    def row(label, m):
        common = f"| {m['client']:.3f} | {fmt_mib(m['ws'])} | {fmt_mib(m['cg'])} | {fmt_mib(m['rss'])} |"
        if one:
            return (
                f"| {label} | {ms(m['build_wall'])} | {ms(m['build_cpu'])} | {ms(m['server_time'])} "
                f"| {m['wall']:.3f} | {m['cpu']:.3f} " + common
            )
        return f"| {label} | {m['wall']:.3f} | {m['cpu']:.3f} | {ms(m['cpu_per_build'])} " + common

    for side in sides:
        lines.append(row(label[side], med[side]))
    if len(sides) == 2:
        r, n = med["reference"], med["nixbuild"]
        keys = (
            ["build_wall", "build_cpu", "server_time", "wall", "cpu"]
            if one
            else ["wall", "cpu", "cpu_per_build"]
        ) + ["client", "ws", "cg", "rss"]
        lines.append(
            "| nixbuild / reference | " + " | ".join(fmt_ratio(n[k], r[k]) for k in keys) + " |"
        )
    notes = [""]
    if "nixbuild" in med:
        n = med["nixbuild"]
        if one:
            t = n["server_time"]
            notes.append(
                f"- target nixbuild server time per build (BuildDerivation received -> BuildResult "
                f"sent, median) <= {BUILD_ONE_TARGET_MS} ms: "
                + met(t is not None and t * 1000 <= BUILD_ONE_TARGET_MS)
                + f" ({ms(t)} ms)"
            )
        if workload.wall_target is not None and "reference" in med:
            r = med["reference"]
            ratio = n["wall"] / r["wall"] if r["wall"] else None
            notes.append(
                "- target wall time <= 1/2 of the reference: "
                + met(ratio is not None and ratio <= workload.wall_target)
                + f" ({fmt_ratio(n['wall'], r['wall'])})"
            )
        if workload.throughput_target is not None and "reference" in med:
            notes += throughput_targets(workload, med["reference"], n)
        peak = max((s.ws_peak for s in samples["nixbuild"] if s.ws_peak is not None), default=None)
        notes.append(mem_target(peak, "working set"))
    if "reference" in med and one:
        notes.append(
            f"- reference server CPU per build: {ms(med['reference']['build_cpu'])} ms "
            "(issue 4 expects about 45 ms)"
        )
    wrapper = (
        "; no harness wrapper (the servers start their sessions)"
        if workload.transport == "ssh"
        else f"; the harness's session wrapper (a shell joining the cgroup), about {wrapper_ms:.1f} ms"
    )
    if workload.shape == "big":
        builder = ", ".join(f"{side} {med[side]['builder']:.3f} s" for side in sides)
        notes.append(
            "- counted in the server CPU (the table), taken out of the CPU per GiB: the builder "
            f"writing the output (it runs in the server's cgroup), as it reported: {builder}" + wrapper
        )
    else:
        notes.append(
            "- counted in the server CPU on both sides alike, per build: the builder itself (it runs "
            f"in the server's cgroup), about {builder_ms:.1f} ms alone" + wrapper
        )
    lines += notes + ["", "Runs, in the order each side ran them:", "", "```"]
    for side in sides:
        for i, s in enumerate(samples[side]):
            detail = ", ".join(f"{lbl} {rss / MIB:.1f} MiB" for lbl, rss, _cpu in s.procs)
            extra = ""
            if one:
                extra = (
                    f"  per build: wall {ms(median([w for w, _ in s.per_build]))} ms"
                    f" cpu {ms(median([c for _, c in s.per_build]))} ms"
                )
                if s.server_times:
                    extra += f" server {ms(median(s.server_times))} ms"
            lines.append(
                f"{side:9} #{i + 1}: wall {s.wall:7.3f} s  cpu {s.cpu:7.3f} s  client {s.client_cpu:7.3f} s  "
                f"ws {fmt_mib(s.ws_peak):>6} MiB  cgroup {fmt_mib(s.cg_mem):>7} MiB{extra}"
                + (f"  [{detail}]" if detail else "")
            )
    lines.append("```")
    return "\n".join(lines)


def report_connect(workload, samples, reps):
    sides = [s for s in SIDES if samples[s]]
    label = labels(workload)
    med = {}
    for side in sides:
        ss = samples[side]
        med[side] = {
            "conn_wall": median([w for s in ss for w in s.walls]),
            "conn_cpu": median([s.cpu / len(s.walls) for s in ss]),
            "wall": median([sum(s.walls) for s in ss]),
            "cpu": median([s.cpu for s in ss]),
            "cg": median([s.cg_mem for s in ss]),
            "rss": median([max((p[1] for p in s.procs), default=None) for s in ss]),
        }
    keys = ["conn_wall", "conn_cpu", "wall", "cpu", "cg", "rss"]

    def cell(k, x):
        if x is None:
            return "n/a"
        if k.startswith("conn_"):
            return f"{x * 1000:.1f}"
        return f"{x:.3f}" if k in ("wall", "cpu") else fmt_mib(x)

    lines = [
        f"### {workload.name}: {workload.count} x nix store ping --store ssh://<alias>, one connection "
        f"each (median of {reps} run{'s' if reps > 1 else ''} per side)",
        "",
        "| | wall per connection (ms) | server CPU per connection (ms) | total wall (s) "
        "| total server CPU (s) | server memory peak (MiB) | largest server process RSS (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for side in sides:
        lines.append(f"| {label[side]} | " + " | ".join(cell(k, med[side][k]) for k in keys) + " |")
    if len(sides) == 2:
        r, n = med["reference"], med["nixbuild"]
        lines.append("| nixbuild / reference | " + " | ".join(fmt_ratio(n[k], r[k]) for k in keys) + " |")
        ratio = n["conn_cpu"] / r["conn_cpu"] if r["conn_cpu"] else None
        lines += [
            "",
            "- target server CPU per connection < 1/10 of sshd plus nix-store: "
            + met(ratio is not None and ratio < workload.cpu_target)
            + f" ({fmt_ratio(n['conn_cpu'], r['conn_cpu'])})",
        ]
    lines += ["", "Runs, in the order each side ran them:", "", "```"]
    for side in sides:
        for i, s in enumerate(samples[side]):
            lines.append(
                f"{side:9} #{i + 1}: wall {sum(s.walls):7.3f} s  cpu {s.cpu:7.3f} s  "
                f"per connection: wall {median(s.walls) * 1000:.1f} ms cpu {s.cpu / len(s.walls) * 1000:.1f} ms  "
                f"cgroup {fmt_mib(s.cg_mem):>7} MiB"
            )
    lines.append("```")
    return "\n".join(lines)


def met(ok):
    return "met" if ok else "NOT met"


def machine_description(client):
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) // 1024} MiB RAM"
    return f"{cpu}, {os.cpu_count()} CPUs, {mem}, Linux {platform.release()}"


def ssh_version():
    out = subprocess.run(["ssh", "-V"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return out.stdout.decode().strip().split(",")[0] or "unknown ssh"


# Linux's free page reporting: a VM's balloon device is told which free pages the guest no
# longer uses, and the host takes them back; a page handed out again is then faulted in from
# the host, costing each run that allocates it (the client's store writes, the builder's
# output) a random share of up to 2.5 s per GiB on the machine of BENCHMARKS.md.
PAGE_REPORTING_ORDER = "/sys/module/page_reporting/parameters/page_reporting_order"
# Above the largest block order (10), no free block is ever reported.
PAGE_REPORTING_OFF = "11"


class VmMemory:
    """Pauses free page reporting for the harness's lifetime (restored by `restore`); with
    `warm`, both sides then run on memory the host backs."""

    def __init__(self, keep):
        self.saved = None
        self.note = "no free page reporting here (nothing changed)"
        if keep:
            self.note = "free page reporting left as it is (--keep-page-reporting)"
            return
        try:
            with open(PAGE_REPORTING_ORDER) as f:
                saved = f.read().strip()
        except OSError:
            return
        try:
            with open(PAGE_REPORTING_ORDER, "w") as f:
                f.write(PAGE_REPORTING_OFF)
        except OSError as e:
            self.note = f"free page reporting left on: pausing it failed ({e})"
            return
        self.saved = saved
        log(
            f"free page reporting paused ({PAGE_REPORTING_ORDER}: {saved} -> {PAGE_REPORTING_OFF}); "
            f"if the harness is killed, restore it with: echo {saved} > {PAGE_REPORTING_ORDER}"
        )

    def warm(self):
        """Touches the free memory once, when reporting is paused (else it would be taken
        back again)."""
        if self.saved is None:
            return
        touched, secs = touch_free_memory()
        self.note = (
            f"free page reporting paused for the run (page_reporting_order {self.saved} -> "
            f"{PAGE_REPORTING_OFF}, restored at the end), {touched / GIB:.1f} GiB of free memory "
            f"touched once first ({secs:.1f} s)"
        )

    def restore(self):
        if self.saved is None:
            return
        with open(PAGE_REPORTING_ORDER, "w") as f:
            f.write(self.saved)
        self.saved = None


# At most this much memory is touched (about 80 s at the 2.6 s per GiB measured here).
TOUCH_MAX = 32 * GIB


def touch_free_memory():
    """Writes to all free memory but 1 GiB (at most TOUCH_MAX) once and frees it; returns
    (bytes, seconds)."""
    with open("/proc/meminfo") as f:
        free = next(int(l.split()[1]) * 1024 for l in f if l.startswith("MemFree:"))
    size = min(max(0, free - GIB), TOUCH_MAX) // MIB * MIB
    started = time.monotonic()
    if size:
        chunk = bytes(MIB)
        with mmap.mmap(-1, size) as m:
            for _ in range(size // MIB):
                m.write(chunk)
    return size, time.monotonic() - started


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def git_commit(repo):
    try:
        out = subprocess.run(
            ["git", "-C", repo, "describe", "--always", "--dirty"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        return out.stdout.decode().strip() or "unknown"
    except OSError:
        return "unknown"


# ---------------------------------------------------------------------------------------
# Leftovers of an interrupted run


def sweep():
    """Removes cgroups, temp dirs and client paths left by harness runs that are gone."""

    def dead_owner(name):
        rest = name[len(PREFIX) + 1 :].split(".")[0]
        return rest.isdigit() and not pid_alive(int(rest))

    roots = set()
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 3 and fields[2] in ("cgroup", "cgroup2"):
                roots.add(fields[1])
    for root in roots:
        for dirpath, dirnames, _files in os.walk(root):
            for d in list(dirnames):
                if d.startswith(PREFIX + "."):
                    dirnames.remove(d)
                    if dead_owner(d):
                        destroy_tree(os.path.join(dirpath, d))
    tmp = tempfile.gettempdir()
    for name in os.listdir(tmp):
        if name.startswith(PREFIX + ".") and dead_owner(name):
            rm_tree(os.path.join(tmp, name))


def sweep_client_paths(client):
    """Deletes generated paths from earlier, interrupted runs (nothing else uses them)."""
    stale = [
        os.path.join("/nix/store", n)
        for n in os.listdir("/nix/store")
        if f"-{PREFIX}-" in n and not n.endswith(".lock")
    ]
    if stale:
        subprocess.run(
            ["nix-store", "--delete"] + stale,
            env=client.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


# ---------------------------------------------------------------------------------------


def parse_args(argv):
    names = [w.name for w in WORKLOADS]
    p = argparse.ArgumentParser(
        description="nixbuild against nix-store --serve, side by side (see README.md)."
    )
    p.add_argument("--reps", type=int, default=5, help="repetitions per side (default 5)")
    p.add_argument(
        "--workloads",
        default=",".join(names),
        help="comma-separated, from: "
        + ", ".join(names + list(WORKLOAD_GROUPS))
        + " (default: all)",
    )
    p.add_argument(
        "--sides",
        default=",".join(SIDES),
        help="comma-separated subset of reference,nixbuild (default both; ratios need both)",
    )
    p.add_argument("--bin-dir", required=True, help="where nixbuild-server and nixbuild-serve are")
    p.add_argument("--closure-paths", type=int, default=200, help="paths in the closure (200)")
    p.add_argument("--big-mib", type=int, default=1024, help="size of the big path in MiB (1024)")
    p.add_argument(
        "--build-one-count", type=int, default=20, help="nix-builds per build-one run (20)"
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=8,
        help="build slots in the builders line for one client, both sides (8)",
    )
    p.add_argument(
        "--parallel-jobs",
        type=int,
        default=1,
        help="build slots per client in build-parallel, both sides (1: 8 clients x 1)",
    )
    p.add_argument(
        "--sshd-kex",
        default=None,
        help="KexAlgorithms of the reference's sshd (default: OpenSSH's own, which puts "
        "sntrup761x25519-sha512 first; nixbuild negotiates curve25519-sha256)",
    )
    p.add_argument(
        "--ssh-ciphers",
        default=None,
        help="the client's Ciphers for both sides (default: OpenSSH's own, which puts "
        "chacha20-poly1305@openssh.com first)",
    )
    p.add_argument(
        "--nixbuild-ssh-ciphers",
        default=None,
        help="ssh.ciphers of nixbuild, comma-separated (default: nixbuild's own, AES-256-GCM alone)",
    )
    p.add_argument("--tmp-dir", default=None, help="where the server stores go (default $TMPDIR)")
    p.add_argument(
        "--keep-tmp",
        action="store_true",
        help="keep the temporary directory (logs, stores) for inspection",
    )
    p.add_argument(
        "--keep-page-reporting",
        action="store_true",
        help="leave the VM's free page reporting on (by default it is paused for the run and "
        "the free memory touched once, so that neither side pays for pages the host took back)",
    )
    p.add_argument("--command", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    chosen = []
    for w in (w.strip() for w in args.workloads.split(",")):
        if w:
            chosen += WORKLOAD_GROUPS.get(w, [w])
    unknown = set(chosen) - set(names)
    if unknown or not chosen:
        p.error(f"unknown workloads {sorted(unknown)}; choose from {names}")
    args.workloads = [w for w in WORKLOADS if w.name in chosen]
    if min(args.build_one_count, args.jobs, args.parallel_jobs) < 1:
        p.error("--build-one-count, --jobs and --parallel-jobs must be at least 1")
    args.workloads = [
        dataclasses.replace(w, count=args.build_one_count)
        if w.kind == "build" and w.shape == "one"
        else dataclasses.replace(w, size_mib=args.big_mib)
        if w.kind == "build" and w.shape == "big"
        else w
        for w in args.workloads
    ]
    args.sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if not args.sides or set(args.sides) - set(SIDES):
        p.error("--sides takes reference, nixbuild or both")
    if args.reps < 1:
        p.error("--reps must be at least 1")
    return args


def main(argv):
    args = parse_args(argv)
    if os.geteuid() != 0:
        raise BenchError("run as root: the harness creates cgroups and uses the root Nix store")

    def interrupted(signum, _frame):
        raise Interrupted(signal.Signals(signum).name)

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, interrupted)

    sweep()
    bench = None
    vm = None
    try:
        vm = VmMemory(args.keep_page_reporting)
        vm.warm()
        bench = Bench(args)
        sweep_client_paths(bench.client)
        return bench_main(bench, args, vm)
    finally:
        # No interruption while cleaning up.
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        if bench is not None:
            bench.cleanup()
        if vm is not None:
            vm.restore()


def build_slots(args, clients):
    """Build slots in each client's builders line: --jobs alone, --parallel-jobs when many."""
    return args.jobs if clients == 1 else args.parallel_jobs


def check_build_users(needed):
    """The reference needs a free nixbld user per build running at once: without one, Nix
    2.8 polls for a free user every 5 seconds, which would measure the pool, not the server."""
    try:
        users = grp.getgrnam("nixbld").gr_mem
    except KeyError:
        raise BenchError("the reference builds as nixbld users: no group nixbld") from None
    if len(users) < needed:
        raise BenchError(
            f"the reference needs {needed} nixbld users for the builds running at once "
            f"(--jobs, or 8 x --parallel-jobs), the group has {len(users)}: lower them"
        )


def bench_main(bench, args, vm):
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cpu_src, mem_src = bench.cgroups.describe()
    started = datetime.datetime.now(datetime.timezone.utc)
    header = [
        f"benches/compare, {started:%Y-%m-%d %H:%M} UTC",
        f"- command: {args.command or ' '.join(sys.argv)}",
        f"- machine: {machine_description(bench.client)}",
        f"- load average at start: {loadavg()}",
        f"- client and reference: {' '.join(bench.client.nix_store_version())}; nixbuild: {git_commit(repo)} (release build)",
        f"- server CPU: {cpu_src}; server peak RSS: GNU time maxrss per server process, summed "
        f"(copies; builds: the daemon's alone, sessions untimed); cgroup memory peak: {mem_src} "
        "(includes page cache)",
        f"- {args.reps} run(s) per side and workload, alternating sides, the side that goes first switching every repetition",
        f"- memory: {vm.note}",
    ]
    if any(w.transport == "ssh" for w in args.workloads):
        header.append(
            f"- SSH: {ssh_version()}; sshd KexAlgorithms: {args.sshd_kex or 'OpenSSH default'}; "
            f"client Ciphers: {args.ssh_ciphers or 'OpenSSH default'}; "
            f"nixbuild ssh.ciphers: {args.nixbuild_ssh_ciphers or 'default'}; "
            "the reference is sshd (no PAM) running nix-store --serve --write "
            "in a private mount namespace with its own /nix; nixbuild is nixbuild-server --listen; "
            "one client ssh config (NIX_SSHOPTS=-F), ed25519 client key, host keys pinned"
        )
    builds = [w for w in args.workloads if w.kind == "build"]
    if builds:
        header.append(
            f"- builds: nix-build --max-jobs 0 --builders '<side's URL> {BUILDER_SYSTEM} - <slots> 1 "
            f"{BUILDER_FEATURES}', both sides alike: {args.jobs} slots for one client, "
            f"{args.parallel_jobs} per client when 8 run at once; client build-poll-interval = 0; "
            "the reference builds in Nix's sandbox as nixbld users"
        )
        if "reference" in args.sides:
            check_build_users(max(w.clients * build_slots(args, w.clients) for w in builds))
    for line in header:
        log(line)
    log("")
    datasets = {}
    sections = []
    builder_ms = wrapper_ms = None
    for workload in args.workloads:
        if workload.kind == "connect":
            samples = {s: [] for s in SIDES}
            for rep in range(args.reps):
                order = list(args.sides) if rep % 2 == 0 else list(reversed(args.sides))
                for name in order:
                    s = bench.measure_connect(bench.side(name, workload.transport), workload)
                    samples[name].append(s)
                    log(
                        f"{workload.name} {name:9} #{rep + 1}: wall {sum(s.walls):.3f} s, server CPU {s.cpu:.3f} s "
                        f"({s.cpu / len(s.walls) * 1000:.1f} ms per connection), cgroup memory {fmt_mib(s.cg_mem)} MiB"
                    )
            sections.append(report_connect(workload, samples, args.reps))
            continue
        if workload.kind == "build":
            if "busybox" not in datasets:
                datasets["busybox"] = bench.client.make_busybox()
                builder_ms = builder_cpu_ms(bench.client.busybox_src, bench.tmp)
                wrapper_ms = wrapper_cpu_ms(bench.cgroups, bench.tmp)
            samples = {s: [] for s in SIDES}
            for rep in range(args.reps):
                order = list(args.sides) if rep % 2 == 0 else list(reversed(args.sides))
                for name in order:
                    side = bench.side(name, workload.transport)
                    s = bench.measure_build(side, workload, datasets["busybox"])
                    samples[name].append(s)
                    log(
                        f"{workload.name} {name:9} #{rep + 1}: wall {s.wall:.3f} s, server CPU {s.cpu:.3f} s "
                        f"({s.cpu / s.builds * 1000:.1f} ms per build), client CPU {s.client_cpu:.3f} s, "
                        f"working set {fmt_mib(s.ws_peak)} MiB, cgroup memory {fmt_mib(s.cg_mem)} MiB"
                    )
            slots = build_slots(args, workload.clients)
            sections.append(
                report_build(workload, samples, args.reps, slots, builder_ms, wrapper_ms)
            )
            continue
        if workload.dataset not in datasets:
            log(f"generating the {workload.dataset} dataset on the client...")
            datasets[workload.dataset] = bench.dataset(workload.dataset)
        dataset = datasets[workload.dataset]
        if workload.direction == "download":
            for name in args.sides:
                log(f"{workload.name}: filling the {name} store (not measured)...")
                bench.populate(bench.side(name, workload.transport), dataset)
        samples = {s: [] for s in SIDES}
        for rep in range(args.reps):
            order = list(args.sides) if rep % 2 == 0 else list(reversed(args.sides))
            for name in order:
                s = bench.measure(bench.side(name, workload.transport), workload, dataset)
                samples[name].append(s)
                log(
                    f"{workload.name} {name:9} #{rep + 1}: wall {s.wall:.3f} s, server CPU {s.cpu:.3f} s, "
                    f"client CPU {s.client_cpu:.3f} s, peak RSS {s.rss / MIB:.1f} MiB, "
                    f"working set {fmt_mib(s.ws_peak)} MiB, cgroup memory {fmt_mib(s.cg_mem)} MiB"
                )
        sections.append(report(workload, dataset, samples, args.reps))
    header.append(f"- load average at end: {loadavg()}")
    log("")
    log("=" * 30 + " results " + "=" * 30)
    log("")
    for line in header:
        log(line)
    log("")
    for sec in sections:
        log(sec)
        log("")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except Interrupted as e:
        print(f"interrupted ({e}); cleaned up", file=sys.stderr)
        sys.exit(130)
