"""The report: medians and ratios per workload as Markdown tables, the targets met or not,
and the machine's description, ready to paste into BENCHMARKS.md."""

import os
import platform
import statistics
import subprocess

from common import GIB, MIB, SIDES
from workloads import BUILD_MEM_TARGET_MIB, BUILD_ONE_TARGET_MS, SSH_TRANSPORTS


SIDE_LABEL = {"reference": "reference (nix-store --serve)", "nixbuild": "nixbuild"}
SSH_SIDE_LABEL = {"reference": "reference (sshd + nix-store --serve)", "nixbuild": "nixbuild (SSH)"}
NGSSH_SIDE_LABEL = {
    "reference": "reference (sshd + nix-daemon --stdio)",
    "nixbuild": "nixbuild (SSH, nix-daemon --stdio)",
}
NGSTORE_SIDE_LABEL = {
    "reference": "reference (sshd + nix-daemon --stdio, its store)",
    "nixbuild": "nixbuild (SSH, nix-daemon --stdio, its store)",
}
SUBST_SIDE_LABEL = {
    "reference": "reference (nix-store --realise)",
    "nixbuild": "nixbuild (nix copy --substitute-on-destination, ssh-ng)",
}
# How the report says which transport a workload went over.
OVER = {"stdio": "", "ssh": " over SSH", "ssh-ng": " over ssh-ng"}


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
    if workload.remote_store:
        return NGSTORE_SIDE_LABEL
    return {"ssh": SSH_SIDE_LABEL, "ssh-ng": NGSSH_SIDE_LABEL}.get(workload.transport, SIDE_LABEL)


def fmt_ms(x):
    """Seconds as whole milliseconds, or n/a."""
    return "n/a" if x is None else f"{x * 1000:.0f}"


def fmt_client_view(v):
    """When the client printed its `building` lines (`client_view`), in one line."""
    return (
        f"start->1st building line {fmt_ms(v['first'])} ms, then {fmt_ms(v['per_level'])} ms a level, "
        f"last one->exit {fmt_ms(v['after'])} ms"
    )


def fmt_timeline(t):
    """A run's timings from nixbuild's log (`Nixbuild.timeline`), in one line."""
    ms = {k: fmt_ms(t[k]) for k in t if k != "levels"}
    return (
        f"start->session {ms['connect']} ms, ->graph build {ms['plan']} ms, ->1st queued {ms['to_first']} ms, "
        f"graph {ms['span']} ms over {t['levels']:g} levels "
        f"({fmt_ms(t['span'] / t['levels'])} ms a level), last finished->exit {ms['after_last']} ms; "
        f"per derivation: inputs done->queued {ms['handoff']} ms, queued->building {ms['wait']} ms, "
        f"building->finished {ms['build']} ms"
    )


# The columns of a copy's (or a substitution's) table, in order.
COPY_KEYS = ["wall", "mibs", "cpu", "cpu_gib", "client", "rss", "ws", "cg"]


def copy_medians(samples, sides, mib):
    """Per side, the medians of a copy's runs that moved `mib` MiB: wall time, throughput,
    server CPU (also per GiB), client CPU, peak RSS, working set and cgroup memory."""
    med = {}
    for side in sides:
        ss = samples[side]
        med[side] = {
            "wall": median([s.wall for s in ss]),
            "mibs": median([mib / s.wall for s in ss]),
            "cpu": median([s.cpu for s in ss]),
            "cpu_gib": median([s.cpu / (mib / 1024) for s in ss]),
            "client": median([s.client_cpu for s in ss]),
            "rss": median([s.rss for s in ss]),
            "ws": median([s.ws_peak for s in ss]),
            "cg": median([s.cg_mem for s in ss]),
        }
    return med


def copy_cell(k, x):
    """One cell of a copy's table."""
    if x is None:
        return "n/a"
    if k in ("rss", "ws", "cg"):
        return fmt_mib(x)
    return f"{x:.0f}" if k == "mibs" else f"{x:.3f}"


def fmt_subst_timeline(t):
    """When nixbuild's log shows its first and last path substituted, in one line."""
    return (
        f"start->1st path substituted {fmt_ms(t['first'])} ms, ->last {fmt_ms(t['last'])} ms, "
        f"last->client exit {fmt_ms(t['after'])} ms"
    )


def report_substitute(workload, dataset, cache, samples, args, reps):
    """Issue 20: throughput in NAR MiB per second, server CPU, nixbuild's peak memory."""
    sides = [s for s in SIDES if samples[s]]
    nar_mib = dataset.nar_size / MIB
    med = copy_medians(samples, sides, nar_mib)
    keys = COPY_KEYS
    cell = copy_cell

    label = SUBST_SIDE_LABEL
    lines = [
        f"### {workload.name}: substituting from a binary cache over HTTP into an empty store, "
        f"{dataset.title} (median of {reps} run{'s' if reps > 1 else ''} per side)",
        "",
        f"The cache: {len(dataset.paths)} paths, NAR {nar_mib:.1f} MiB, xz {cache.file_size / MIB:.1f} MiB "
        f"({cache.file_size / cache.nar_size:.0%} of the NAR), made once by the client's Nix in "
        f"{cache.seconds:.0f} s (not measured); reference max-jobs {args.substitute_ref_jobs}, nixbuild "
        f"max_parallel {args.substitute_max_parallel or 'default (16; max_downloads default 4)'}.",
        "",
        "| | wall time (s) | throughput (NAR MiB/s) | server CPU (s) | server CPU per NAR GiB (s) "
        "| client CPU (s) | server peak RSS (MiB) | server working set peak (MiB) "
        "| server cgroup memory peak (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for side in sides:
        lines.append(f"| {label[side]} | " + " | ".join(cell(k, med[side][k]) for k in keys) + " |")
    notes = [""]
    if len(sides) == 2:
        r, n = med["reference"], med["nixbuild"]
        lines.append("| nixbuild / reference | " + " | ".join(fmt_ratio(n[k], r[k]) for k in keys) + " |")
        tput = n["mibs"] / r["mibs"] if r["mibs"] else None
        cpu = n["cpu"] / r["cpu"] if r["cpu"] else None
        notes += [
            f"- target throughput >= {workload.throughput_target}x the reference's: "
            + met(tput is not None and tput >= workload.throughput_target)
            + f" ({n['mibs']:.0f} vs {r['mibs']:.0f} NAR MiB/s: {fmt_ratio(n['mibs'], r['mibs'])})",
            f"- target server CPU <= {workload.cpu_target:g}x the reference's: "
            + met(cpu is not None and cpu <= workload.cpu_target)
            + f" ({n['cpu']:.3f} vs {r['cpu']:.3f} s: {fmt_ratio(n['cpu'], r['cpu'])})",
        ]
    if "nixbuild" in med:
        peak = max(s.rss for s in samples["nixbuild"])
        ws = max((s.ws_peak for s in samples["nixbuild"] if s.ws_peak is not None), default=None)
        notes.append(
            f"- target nixbuild server memory < {workload.mem_target_mib:g} MiB (highest peak RSS of any "
            "run, daemon and relay summed): "
            + met(peak < workload.mem_target_mib * MIB)
            + f" ({fmt_mib(peak)} MiB; highest working set {fmt_mib(ws)} MiB)"
        )
        timelines = [s.timeline for s in samples["nixbuild"] if s.timeline]
        if timelines:
            t = {k: median([x[k] for x in timelines]) for k in timelines[0]}
            notes.append(f"- nixbuild's log (medians over the runs): {fmt_subst_timeline(t)}")
    notes.append(
        "- the reference's figures are the whole `nix-store --realise` (it is its own client); "
        "nixbuild's are the daemon and the relay, the client's `nix copy` beside them (client CPU); "
        "the cache's HTTP server (python3 -m http.server, in no measured cgroup) used, medians: "
        + ", ".join(f"{side} {median([s.cache_cpu for s in samples[side]]):.3f} s" for side in sides)
        + " of CPU per run; `listen overflows` in the runs below counts the connections any "
        "listening socket of the machine dropped during the run (`TcpExtListenOverflows`), which "
        "should be 0: a dropped connection waits 1 s for TCP to try again"
    )
    runs = ["", "Runs, in the order each side ran them:", "", "```"]
    for side in sides:
        for i, s in enumerate(samples[side]):
            detail = ", ".join(f"{lbl} {rss / MIB:.1f} MiB {cpu:.2f} s" for lbl, rss, cpu in s.procs)
            client = "n/a" if s.client_cpu is None else f"{s.client_cpu:.3f} s"
            runs.append(
                f"{side:9} #{i + 1}: wall {s.wall:7.3f} s  {nar_mib / s.wall:5.0f} MiB/s  cpu {s.cpu:7.3f} s  "
                f"client {client}  rss {s.rss / MIB:7.1f} MiB  ws {fmt_mib(s.ws_peak):>6} MiB  "
                f"cgroup {fmt_mib(s.cg_mem):>7} MiB  http {s.cache_cpu:.2f} s  "
                f"listen overflows {'n/a' if s.overflows is None else s.overflows}  [{detail}]"
                + (f"\n    log: {fmt_subst_timeline(s.timeline)}" if s.timeline else "")
            )
    runs.append("```")
    return "\n".join(lines + notes + runs)


def fmt_fraction(x):
    """A target's fraction as the issues write it: 1/2, 1/3, or 0.3."""
    for d in (2, 3, 10):
        if abs(x - 1 / d) < 1e-9:
            return f"1/{d}"
    return f"{x:g}"


def report(workload, dataset, samples, reps):
    sides = [s for s in SIDES if samples[s]]
    label = labels(workload)
    med = copy_medians(samples, sides, dataset.size / MIB)
    keys = COPY_KEYS
    cell = copy_cell

    flag = "--to" if workload.direction == "upload" else "--from"
    over = OVER[workload.transport]
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
    lines = [
        f"- target throughput >= {workload.throughput_target}x the reference's: "
        + met(tput is not None and tput >= workload.throughput_target)
        + f" ({n['mibs']:.0f} vs {r['mibs']:.0f} MiB/s: {fmt_ratio(n['mibs'], r['mibs'])})",
    ]
    if workload.cpu_target is None:
        # Issue 18 sets throughput alone, with no CPU alternative.
        return lines
    return lines + [
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
    if workload.remote_store:
        slots = f"; the reference's max-jobs {jobs}"
    lines = [
        f"### {workload.name}: {workload.title()}{OVER[workload.transport]} (median of {reps} run{'s' if reps > 1 else ''} per side{slots})",
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
            "| | wall time (s) | server CPU (s) | server CPU per derivation (ms) " + common_head,
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
                f"- target wall time <= {fmt_fraction(workload.wall_target)} of the reference: "
                + met(ratio is not None and ratio <= workload.wall_target)
                + f" ({fmt_ratio(n['wall'], r['wall'])})"
            )
        if workload.throughput_target is not None and "reference" in med:
            notes += throughput_targets(workload, med["reference"], n)
        peak = max((s.ws_peak for s in samples["nixbuild"] if s.ws_peak is not None), default=None)
        notes.append(mem_target(peak, "working set"))
    for side in sides:
        views = [s.client_view for s in samples[side] if s.client_view]
        if views:
            v = {k: median([x[k] for x in views]) for k in views[0]}
            notes.append(
                f"- {side}, the client's view (when it printed each derivation's `building` line, "
                f"medians over the runs that had them all, {len(views)} of {len(samples[side])}): "
                + fmt_client_view(v)
            )
    timelines = [s.timeline for s in samples.get("nixbuild", []) if s.timeline]
    if timelines:
        t = {k: median([x[k] for x in timelines]) for k in timelines[0]}
        notes.append(
            f"- nixbuild's log (`queued`, `building`, `build finished` of each derivation, medians over the "
            f"runs): {fmt_timeline(t)}"
        )
    if "reference" in med and one:
        notes.append(
            f"- reference server CPU per build: {ms(med['reference']['build_cpu'])} ms "
            "(issue 4 expects about 45 ms)"
        )
    wrapper = (
        "; no harness wrapper (the servers start their sessions)"
        if workload.transport in SSH_TRANSPORTS
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
            else:
                extra = f"  per derivation: cpu {ms(s.cpu / s.builds)} ms"
            lines.append(
                f"{side:9} #{i + 1}: wall {s.wall:7.3f} s  cpu {s.cpu:7.3f} s  client {s.client_cpu:7.3f} s  "
                f"ws {fmt_mib(s.ws_peak):>6} MiB  cgroup {fmt_mib(s.cg_mem):>7} MiB{extra}"
                + (f"  [{detail}]" if detail else "")
                + (f"\n    client: {fmt_client_view(s.client_view)}" if s.client_view else "")
                + (f"\n    log: {fmt_timeline(s.timeline)}" if s.timeline else "")
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
