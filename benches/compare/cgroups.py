"""The cgroups each server runs in, so that its CPU and memory are counted for the whole
server process tree and nothing else."""

import os
import signal
import threading
import time

from common import BenchError, kill_pid, log


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
