#!/usr/bin/env python3
"""Side-by-side benchmark: nixbuild against Nix's own `nix-store --serve`.

Both servers are driven by the same real Nix client (`nix copy`, `nix-build`) over the
stdio transport (`ssh://localhost?remote-program=...`, which Nix runs through `bash -c`, no
sshd), or, for the `ssh-` workloads, over SSH: OpenSSH's sshd running `nix-store --serve`
in a private mount namespace with its own `/nix`, against nixbuild-server's own SSH; for the
`ngssh-` workloads (issue 18) the same over ssh-ng, with sshd running `nix-daemon --stdio`, and
for the `ngstore-` ones (issue 19) that server as the store of `nix build --store`; for
`substitute-200` (issue 20) Nix's own `nix-store --realise` and nixbuild each fill an empty
store from the same binary cache over HTTP (nixbuild asked by `nix copy
--substitute-on-destination`). Runs
alternate between the two sides, every run does the full work (fresh server store for
uploads, client copies deleted before downloads), and every run is checked: the paths must
be valid on the destination with the narHash the client recorded, and the bytes on the
destination's disk must hash to it.

Measured per run, for the server process tree only (the client is never in the cgroup):
wall time of the client command, server CPU (user+sys) from a fresh cgroup per run, server
peak RSS (GNU time's maxrss of every server process, summed), and the cgroup's memory
high-water mark, which also counts the page cache of the files the server wrote.

This is the entry point; the harness is split into modules next to it: `workloads`,
`client` (the Nix client and its checks), `servers` (the two sides), `cgroups` and
`measurement` (the runs), `report`, and `common`. See README.md next to this file. Run
through `benches/compare/run` (installs what is missing and builds the examples), as root.
"""

import argparse
import dataclasses
import datetime
import grp
import os
import signal
import subprocess
import sys
import tempfile

from common import BenchError, Interrupted, MIB, PREFIX, SIDES, kill_pid, log, pid_alive, rm_tree
from workloads import BUILDER_FEATURES, BUILDER_SYSTEM, SSH_TRANSPORTS, WORKLOADS, WORKLOAD_GROUPS
from cgroups import destroy_tree
from measurement import Bench, VmMemory, build_slots, builder_cpu_ms, loadavg, wrapper_cpu_ms
from report import (
    fmt_client_view,
    fmt_mib,
    fmt_subst_timeline,
    fmt_timeline,
    git_commit,
    machine_description,
    report,
    report_build,
    report_connect,
    report_substitute,
    ssh_version,
)


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
    # The cache's HTTP server of a dead run (issue 20): python3 -m http.server serving a
    # directory of that run's temporary directory.
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any("http.server" in a for a in args) and "--directory" in args[:-1]:
            served = args[args.index("--directory") + 1]
            run_dir = next((c for c in served.split("/") if c.startswith(PREFIX + ".")), None)
            if run_dir and dead_owner(run_dir):
                kill_pid(pid, signal.SIGKILL)
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
        "--substitute-mib",
        type=int,
        default=500,
        help="file contents of substitute-200's closure in MiB, over --closure-paths paths (500)",
    )
    p.add_argument(
        "--substitute-ref-jobs",
        type=int,
        default=1,
        help="max-jobs of the substituting reference: substitutions at once (1, Nix's default)",
    )
    p.add_argument(
        "--substitute-max-parallel",
        type=int,
        default=None,
        help="[substituters] max_parallel of nixbuild (default: nixbuild's own, 16; max_downloads stays at its default, 4)",
    )
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
    if min(args.build_one_count, args.jobs, args.parallel_jobs, args.substitute_ref_jobs) < 1:
        p.error("--build-one-count, --jobs, --parallel-jobs and --substitute-ref-jobs must be at least 1")
    if args.substitute_max_parallel is not None and args.substitute_max_parallel < 1:
        p.error("--substitute-max-parallel must be at least 1")
    if args.substitute_mib < 1 or args.closure_paths < 1:
        p.error("--substitute-mib and --closure-paths must be at least 1")
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
    if any(w.transport in SSH_TRANSPORTS for w in args.workloads):
        transports = {w.transport for w in args.workloads}
        servers = " and ".join(
            p
            for t, p in (("ssh", "nix-store --serve --write"), ("ssh-ng", "nix-daemon --stdio (ssh-ng)"))
            if t in transports
        )
        header.append(
            f"- SSH: {ssh_version()}; sshd KexAlgorithms: {args.sshd_kex or 'OpenSSH default'}; "
            f"client Ciphers: {args.ssh_ciphers or 'OpenSSH default'}; "
            f"nixbuild ssh.ciphers: {args.nixbuild_ssh_ciphers or 'default'}; "
            f"the reference is sshd (no PAM) running {servers} "
            "in a private mount namespace with its own /nix; nixbuild is nixbuild-server --listen; "
            "one client ssh config (NIX_SSHOPTS=-F), ed25519 client key, host keys pinned"
        )
    builds = [w for w in args.workloads if w.kind == "build"]
    if any(not w.remote_store for w in builds):
        header.append(
            f"- builds: nix-build --max-jobs 0 --builders '<side's URL> {BUILDER_SYSTEM} - <slots> 1 "
            f"{BUILDER_FEATURES}', both sides alike: {args.jobs} slots for one client, "
            f"{args.parallel_jobs} per client when 8 run at once; client build-poll-interval = 0; "
            "the reference builds in Nix's sandbox as nixbld users"
        )
    if any(w.remote_store for w in builds):
        header.append(
            "- remote-store builds: nix build --store ssh-ng://<alias> --eval-store auto -f <file> --no-link "
            "of the graph's top, both sides alike (the .drv closure uploaded, the graph built on the "
            f"server, nothing fetched); the reference's nix-daemon builds with max-jobs = {args.jobs} "
            "(--jobs) in Nix's sandbox as nixbld users; nixbuild with its default configuration"
        )
    if any(w.kind == "substitute" for w in args.workloads):
        header.append(
            "- substitution: a binary cache made once per harness run by the client's Nix "
            "(nix copy --to 'file://<dir>?secret-key=<fresh key>&compression=xz'), served by "
            "python3 -m http.server on 127.0.0.1 (listen backlog 1024; outside the measured cgroups); into an empty store "
            "each run: the reference is nix-store --store <fresh chroot store> --realise <top> with the "
            f"cache as its substituter, signatures required, max-jobs = {args.substitute_ref_jobs}, "
            "a fresh XDG_CACHE_HOME; nixbuild is a fresh daemon with [substituters] (max_parallel "
            f"{args.substitute_max_parallel or 'default'}), driven by nix copy --substitute-on-destination "
            "--option builders-use-substitutes true --to ssh-ng://localhost?remote-program=<relay> <top>"
        )
    if builds:
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
                    s = bench.measure_connect(bench.side(name, workload), workload)
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
                    side = bench.side(name, workload)
                    s = bench.measure_build(side, workload, datasets["busybox"])
                    samples[name].append(s)
                    log(
                        f"{workload.name} {name:9} #{rep + 1}: wall {s.wall:.3f} s, server CPU {s.cpu:.3f} s "
                        f"({s.cpu / s.builds * 1000:.1f} ms per derivation), client CPU {s.client_cpu:.3f} s, "
                        f"working set {fmt_mib(s.ws_peak)} MiB, cgroup memory {fmt_mib(s.cg_mem)} MiB"
                        + (f"; client: {fmt_client_view(s.client_view)}" if s.client_view else "")
                        + (f"; log: {fmt_timeline(s.timeline)}" if s.timeline else "")
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
        if workload.kind == "substitute":
            if bench.cache is None:
                log("making the binary cache (xz, once per harness run; not measured)...")
                bench.make_cache(dataset)
                c = bench.cache
                log(
                    f"cache at {c.url}: {len(dataset.paths)} paths, NAR {c.nar_size / MIB:.1f} MiB, "
                    f"xz {c.file_size / MIB:.1f} MiB ({c.file_size / c.nar_size:.0%}), made in {c.seconds:.0f} s"
                )
            samples = {s: [] for s in SIDES}
            for rep in range(args.reps):
                order = list(args.sides) if rep % 2 == 0 else list(reversed(args.sides))
                for name in order:
                    s = bench.measure_substitute(bench.side(name, workload), workload, dataset)
                    samples[name].append(s)
                    log(
                        f"{workload.name} {name:9} #{rep + 1}: wall {s.wall:.3f} s "
                        f"({dataset.nar_size / MIB / s.wall:.0f} MiB/s), server CPU {s.cpu:.3f} s, "
                        + (f"client CPU {s.client_cpu:.3f} s, " if s.client_cpu is not None else "")
                        + f"peak RSS {s.rss / MIB:.1f} MiB, working set {fmt_mib(s.ws_peak)} MiB, "
                        f"cgroup memory {fmt_mib(s.cg_mem)} MiB, HTTP server CPU {s.cache_cpu:.3f} s"
                        + (f"; log: {fmt_subst_timeline(s.timeline)}" if s.timeline else "")
                    )
            sections.append(report_substitute(workload, dataset, bench.cache, samples, args, args.reps))
            continue
        if workload.direction == "download":
            for name in args.sides:
                log(f"{workload.name}: filling the {name} store (not measured)...")
                bench.populate(bench.side(name, workload), dataset)
        samples = {s: [] for s in SIDES}
        for rep in range(args.reps):
            order = list(args.sides) if rep % 2 == 0 else list(reversed(args.sides))
            for name in order:
                s = bench.measure(bench.side(name, workload), workload, dataset)
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
