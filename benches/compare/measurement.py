"""Runs and their measurements: one `Bench` drives both sides through each workload,
alternating, and records wall time, server CPU and memory per run; the machine's state
(VM memory, load) around them."""

import dataclasses
import mmap
import os
import re
import resource
import secrets
import subprocess
import tempfile
import threading
import time

from common import BenchError, GIB, MIB, PREFIX, SETTLE_TIMEOUT, log, rm_tree, run, tail
from cgroups import Cgroups
from client import Client, check_hashes
from servers import (
    NgSshNixbuild,
    NgSshReference,
    NgStoreNixbuild,
    NgStoreReference,
    Nixbuild,
    Reference,
    SshClient,
    SshNixbuild,
    SshReference,
    HttpCache,
    SubstituteNixbuild,
    SubstituteReference,
    read_stats,
    wrapper_script,
)
from workloads import SSH_TRANSPORTS, critical_path

# The two sides per (SSH transport, remote-store build): their classes.
SSH_SIDES = {
    ("ssh", False): (SshReference, SshNixbuild),
    ("ssh-ng", False): (NgSshReference, NgSshNixbuild),
    ("ssh-ng", True): (NgStoreReference, NgStoreNixbuild),
}


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
class SubstituteSample(Sample):
    # nixbuild: when its log shows the first and last path substituted (`verify_substituted`)
    timeline: dict | None = None
    cache_cpu: float | None = None  # seconds of CPU the cache's HTTP server used in the run
    overflows: int | None = None  # connections the machine's listen queues dropped in the run


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
    timeline: dict | None = None  # remote-store builds, nixbuild: its log's timings (`timeline`)
    client_view: dict | None = None  # remote-store builds: the client's `building` lines (`client_view`)


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
        # Per SSH transport ("ssh", "ssh-ng") and whether the server is the store of a
        # remote-store build: (reference, nixbuild), sharing one ssh config.
        self.ssh_sides = {}
        keys = {(w.transport, w.remote_store) for w in args.workloads if w.transport in SSH_TRANSPORTS}
        if keys:
            ssh = SshClient(self.tmp, self.client, args.ssh_ciphers)
        for key in sorted(keys):
            ref_cls, nb_cls = SSH_SIDES[key]
            # The reference's builds at once: one per session, or `--jobs` when it builds a
            # whole graph itself.
            max_jobs = args.jobs if key[1] else 1
            self.ssh_sides[key] = (
                ref_cls(self.tmp, self.client.conf_file, ssh, self.client, args.sshd_kex, max_jobs),
                nb_cls(self.tmp, args.bin_dir, self.client, ssh, args.nixbuild_ssh_ciphers)
                if want_nixbuild
                else None,
            )
        self.salt = secrets.token_hex(4)
        self.counter = 0
        self.active_group = None
        # Issue 20: the binary cache and the two sides that substitute from it (`make_cache`).
        self.cache = None
        self.subst_sides = None

    def cleanup(self):
        ssh_sides = [s for pair in self.ssh_sides.values() for s in pair]
        ssh_sides += list(self.subst_sides or [])
        for side in [self.nixbuild] + ssh_sides:
            if side is None:
                continue
            try:
                side.stop(self.active_group)
            except (OSError, subprocess.SubprocessError) as e:
                log(f"warning: stopping the {side.label} server: {e}")
        if self.cache is not None:
            try:
                self.cache.stop()
            except (OSError, subprocess.SubprocessError) as e:
                log(f"warning: stopping the cache's HTTP server: {e}")
        self.cgroups.destroy()
        self.client.delete_owned()
        if self.args.keep_tmp:
            log(f"kept {self.tmp} (the next run removes it)")
        else:
            rm_tree(self.tmp)

    def side(self, name, workload):
        if workload.kind == "substitute":
            reference, nixbuild = self.subst_sides
            return reference if name == "reference" else nixbuild
        key = (workload.transport, workload.remote_store)
        if key in self.ssh_sides:
            reference, nixbuild = self.ssh_sides[key]
            return reference if name == "reference" else nixbuild
        return self.reference if name == "reference" else self.nixbuild

    def dataset(self, key):
        if key == "closure":
            return self.client.make_closure(self.salt, self.args.closure_paths, MIB)
        if key == "substitute":
            n = self.args.closure_paths
            return self.client.make_closure(
                self.salt, n, self.args.substitute_mib * MIB // n, key, shape="tree", compressible=True
            )
        return self.client.make_big(self.salt, self.args.big_mib * MIB)

    def make_cache(self, dataset):
        """The binary cache of `dataset`, served over HTTP, and the sides using it (once)."""
        self.cache = HttpCache(self.tmp, self.client, dataset)
        self.subst_sides = (
            SubstituteReference(self.tmp, self.client.conf_file, self.cache, self.args.substitute_ref_jobs),
            SubstituteNixbuild(
                self.tmp, self.args.bin_dir, self.client, self.cache, self.args.substitute_max_parallel
            )
            if "nixbuild" in self.args.sides
            else None,
        )

    def measure_substitute(self, side, workload, dataset):
        """One substitution of `dataset`'s closure from the cache into an empty store."""
        self.counter += 1
        side.fresh_store(self.counter, self.client)
        rundir = self.rundir(f"{side.name}-{workload.name}")
        stats_dir = os.path.join(rundir, "stats")
        os.mkdir(stats_dir)
        os.sync()
        group = self.cgroups.new_group(f"run-{self.counter}")
        self.active_group = group
        mark = self.cache.mark()
        try:
            cmd = side.substitute_command(rundir, group, stats_dir, dataset)
            group.sample_working_set()
            cpu0 = group.cpu_ns()
            client0 = children_cpu()
            http0 = self.cache.cpu_seconds()
            overflows0 = listen_overflows()
            started = time.time()  # for the daemon log's timestamps
            t0 = time.monotonic()
            run(cmd, self.client.env, os.path.join(rundir, "client.log"), f"{side.name}: {workload.name}")
            wall = time.monotonic() - t0
            client_cpu = children_cpu() - client0
            cache_cpu = self.cache.cpu_seconds() - http0
            overflows1 = listen_overflows()
            cpu, cg_mem = self.finish(side, group, cpu0)
            ws_peak = group.working_set_peak()
        finally:
            group.destroy()
            self.active_group = None
        procs = read_stats(stats_dir)
        if not procs:
            raise BenchError(f"{side.name}: no server process statistics in {stats_dir}")
        # Checked after the measurement: every NAR came from the cache, once, and every path
        # is in the side's store with its narHash.
        fetched = self.cache.nar_fetches(mark)
        if fetched != len(dataset.paths):
            raise BenchError(f"{side.name}: {fetched} NARs fetched from the cache, not {len(dataset.paths)}")
        timeline = side.verify_substituted(self.client, dataset, rundir, started, started + wall)
        return SubstituteSample(
            wall,
            cpu,
            sum(p[1] for p in procs),
            cg_mem,
            procs,
            # The reference is its own client: its command is all server.
            client_cpu if side.name == "nixbuild" else None,
            ws_peak,
            timeline,
            cache_cpu,
            None if None in (overflows0, overflows1) else overflows1 - overflows0,
        )

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
        started = ended = None  # seconds since the epoch, one client command's start and exit
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
                    (out,) = self.nix_builds(side, workload, rundir, urls, [[b]], f"{i}")
                    w = time.monotonic() - t0
                    # Its session over before the next build: its CPU is all counted.
                    self.sessions_ended(side, group)
                    per_build.append((w, (group.cpu_ns() - c0) / 1e9))
                    printed[0] += out
                wall = sum(w for w, _ in per_build)
            else:
                started = time.time()  # for the server log's timestamps
                t0 = time.monotonic()
                printed = self.nix_builds(side, workload, rundir, urls, clients, "all")
                wall = time.monotonic() - t0
                ended = started + wall
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
            if workload.remote_store:
                self.client.check_not_fetched(c, out, f"{side.name}: client {k}")
            else:
                builder_cpu += self.client.check_built(c, out, f"{side.name}: client {k}")
        server_times = side.verify_builds(self.client, builds, rundir)
        timeline = view = None
        if workload.remote_store:
            timeline = side.timeline(builds, rundir, started, ended)
            view = client_view(os.path.join(rundir, "client-0-all.log"), builds, started, ended)
        self.client.forget([b.drv for b in builds] + [p for b in builds for p in b.outputs()])
        return BuildSample(
            wall,
            cpu,
            cg_mem,
            procs,
            len(builds),
            per_build,
            server_times,
            client_cpu,
            ws_peak,
            builder_cpu,
            timeline,
            view,
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

    def nix_builds(self, side, workload, rundir, urls, clients, tag):
        """Runs one client command (nix-build, or nix build --store) per client, all at
        once; the output paths each printed."""
        slots = build_slots(self.args, len(clients))
        procs = []
        stampers = []
        for k, (url, builds) in enumerate(zip(urls, clients)):
            cmd = self.client.build_command(workload, url, slots, rundir, k, builds)
            out = os.path.join(rundir, f"client-{k}-{tag}.out")
            err = os.path.join(rundir, f"client-{k}-{tag}.log")
            with open(out, "wb") as o, open(err, "wb") as e:
                # Remote-store builds: each line of the client's log stamped with the time
                # it arrived (`client_view`); the others write straight to the file.
                stderr = subprocess.PIPE if workload.remote_store else e
                p = subprocess.Popen(cmd, env=self.client.env, stdout=o, stderr=stderr)
            if workload.remote_store:
                stampers.append(threading.Thread(target=stamp_lines, args=(p.stderr, err), daemon=True))
                stampers[-1].start()
            procs.append((p, out, err))
        failed = []
        for p, _out, err in procs:
            p.wait()
        for t in stampers:
            t.join()
        for p, _out, err in procs:
            if p.returncode != 0:
                failed.append(f"exit {p.returncode}:\n{tail(err)}")
        if failed:
            raise BenchError(f"{side.name}: the client command failed ({len(failed)} of {len(procs)}), {failed[0]}")
        printed = []
        for _p, out, _err in procs:
            with open(out) as f:
                printed.append(f.read().split())
        return printed


def stamp_lines(stream, path):
    """Copies `stream` to `path` line by line, each line prefixed with the time it arrived
    (seconds since the epoch)."""
    with open(path, "ab") as f:
        for line in stream:
            f.write(f"{time.time():.6f} ".encode() + line)
    stream.close()


BUILDING_LINE = re.compile(r"^(\d+\.\d+) building '(/nix/store/[^']+\.drv)'")


def client_view(path, builds, started, ended):
    """When the client printed each derivation's `building '<drv>'...` line (stamped by
    `stamp_lines`), against its start and exit (seconds since the epoch): `first` start ->
    the first line, `per_level` the time between the first and the last line over the
    levels of the graph's longest path after the first, `after` the last line -> exit.
    None unless every derivation has its line (the server sent its start)."""
    seen = {}
    with open(path, errors="replace") as f:
        for line in f:
            m = BUILDING_LINE.match(line)
            if m:
                seen.setdefault(m.group(2), float(m.group(1)))
    if any(b.drv not in seen for b in builds):
        return None
    first, last = min(seen[b.drv] for b in builds), max(seen[b.drv] for b in builds)
    levels = critical_path(builds)
    return {
        "first": first - started,
        "per_level": (last - first) / (levels - 1) if levels > 1 else None,
        "after": ended - last,
    }


def listen_overflows():
    """The kernel's count of connections dropped because a listening socket's accept queue
    was full (`TcpExtListenOverflows`, the whole machine), or None."""
    try:
        with open("/proc/net/netstat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            row = dict(zip(names.split()[1:], values.split()[1:]))
            return int(row["ListenOverflows"]) if "ListenOverflows" in row else None
    return None


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


def build_slots(args, clients):
    """Build slots in each client's builders line: --jobs alone, --parallel-jobs when many."""
    return args.jobs if clients == 1 else args.parallel_jobs
