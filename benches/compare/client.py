"""The Nix client side: its own store and configuration, the data sets it creates, the
derivations it instantiates, and the checks that the work was really done (NAR hashes from
Nix's own `nix-store` and `nix-hash`)."""

import os
import random
import secrets
import shutil
import struct
import subprocess

from common import BUSYBOX, BenchError, MIB, NIX32_CHARS, PREFIX, capture, run, tail
from workloads import BUILDER_FEATURES, BUILDER_SYSTEM, Build, Dataset, big_builder, builder_times


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

    def valid(self, paths):
        """Those of `paths` that are valid in the client's store."""
        invalid = subprocess.run(
            ["nix-store", "--check-validity", "--print-invalid"] + list(paths),
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        return set(paths) - set(invalid.stdout.decode().split())

    def delete(self, paths, what):
        run(["nix-store", "--delete"] + list(paths), self.env, self.log, what)
        still = self.valid(paths)
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

    def make_closure(self, salt, count, size, key="closure", shape="chain", compressible=False):
        """Imports `count` paths of `size` bytes each, with references among them.

        `shape` "chain": path i refers to i-1 and i/2 (a closure 200 deep); "tree": a
        binary tree whose root is the last path, path i referring to the two paths below it
        (`tree_refs`, about log2(count) deep, as wide as real closures are). The last path
        is the top either way, and every path is in its closure.

        Written as an export stream for `nix-store --import` (the only way to give paths
        references without building); the contents are the text of the referenced paths
        followed by random bytes, or with `compressible` by `compressible_bytes` (about half
        of it is what xz keeps), so a reference scanner finds exactly the declared references.
        """
        tag = "" if key == "closure" else f"{key}-"
        paths = []
        for i in range(count):
            digest = "".join(secrets.choice(NIX32_CHARS) for _ in range(32))
            paths.append(f"{self.store_dir()}/{digest}-{PREFIX}-{salt}-{tag}{i:03d}")
        filler = CompressibleFiller() if compressible else None
        proc = subprocess.Popen(
            ["nix-store", "--import"],
            env=self.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=open(self.log, "ab"),
        )
        try:
            for i, path in enumerate(paths):
                ref_ids = tree_refs(count, i) if shape == "tree" else (i - 1, i // 2)
                refs = sorted({paths[j] for j in ref_ids if 0 <= j < i})
                head = "".join(r + "\n" for r in refs).encode()
                rest = size - len(head)
                contents = head + (filler.bytes(rest) if filler else os.urandom(rest))
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
        nar_size = 0
        if key != "closure":
            sizes = capture(
                ["nix-store", "-q", "--size"] + paths, self.env, self.log, "client NAR sizes"
            )
            nar_size = sum(int(x) for x in sizes)
        what = "binary tree" if shape == "tree" else "closure"
        kind = ", contents about half compressible" if compressible else ""
        return Dataset(
            key,
            f"{what} of {count} paths x {size / MIB:g} MiB{kind}",
            paths[-1],
            tuple(paths),
            self.hashes(None, paths, "client narHash of the closure"),
            count * size,
            nar_size,
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
        exist anywhere before the run. A derivation without inputs writes one line naming
        itself; one with inputs (the chain's previous build, the diamond's two below) also
        writes, for each input, its path (a reference) and the first line of its contents
        (read in the sandbox). The diamond's derivations have a second output, dev, naming
        them and holding the path of each input's dev (so every output of an input is used).
        With `remote_store` the file also has `top<k>`: the one derivation nothing depends
        on, which is what the client asks for (`top.nix`, see `build_command`).
        """
        dev = workload.shape == "graph"
        inputs = workload.inputs()
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
                deps = [f"d{k}_{j}" for j in inputs[i]]
                script = f"{{ echo {first};" + "".join(f" echo ${{{d}}}; head -n 1 ${{{d}}};" for d in deps)
                if workload.shape == "big":
                    # The second output holds the builder's own CPU times (the shell's
                    # `times`), so that the server's share can be told from the builder's.
                    script += f" {big_builder(workload.size_mib)}; }} > $out; times > $cpu"
                    extra = '{ outputs = [ "out" "cpu" ]; }'
                elif dev:
                    script += f" }} > $out; {{ echo {first} dev;"
                    script += "".join(f" echo ${{{d}.dev}};" for d in deps) + " } > $dev"
                    extra = '{ outputs = [ "out" "dev" ]; }'
                else:
                    script = f"{script} }} > $out" if deps else f"echo {first} > $out"
                    extra = "{ }"
                lines.append(f'  d{k}_{i} = mk "{name}" "{script}" {extra};')
                names.append(f"d{k}_{i}")
            attrs.append(f"  c{k} = [ {' '.join(names)} ];")
            if workload.remote_store:
                used = {j for ins in inputs for j in ins}
                (top,) = [i for i in range(workload.count) if i not in used]
                attrs.append(f"  top{k} = d{k}_{top};")
        lines += ["in {"] + attrs + ["}"]
        expr = os.path.join(rundir, "builds.nix")
        with open(expr, "w") as f:
            f.write("\n".join(lines) + "\n")
        for k in range(workload.clients if workload.remote_store else 0):
            with open(os.path.join(rundir, f"top-{k}.nix"), "w") as f:
                f.write(f"(import ./builds.nix).top{k}\n")
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
        # The second outputs (named `<name>-cpu`, `<name>-dev`), in the order of their drvs.
        second = {"big": "-cpu", "graph": "-dev"}.get(workload.shape)
        seconds = [o for o in outs if second and o.endswith(second)]
        outs = [o for o in outs if o not in seconds]
        if len(outs) != total or (second and len(seconds) != total):
            raise BenchError(f"{len(outs)} outputs for {total} derivations")
        clients = []
        for k in range(workload.clients):
            builds = []
            for i in range(workload.count):
                n = k * workload.count + i
                ins = [k * workload.count + j for j in inputs[i]]
                text = f"{PREFIX} {salt} c{k}-{i}\n"
                text += "".join(f"{outs[j]}\n{PREFIX} {salt} c{k}-{j - k * workload.count}\n" for j in ins)
                deps = tuple(drvs[j] for j in ins)
                if workload.shape == "big":
                    nar_hash = self.big_output_nar_hash(rundir, text.encode(), workload.size_mib * MIB)
                    builds.append(Build(drvs[n], outs[n], None, nar_hash, seconds[n], inputs=deps))
                elif dev:
                    dev_text = f"{PREFIX} {salt} c{k}-{i} dev\n" + "".join(f"{seconds[j]}\n" for j in ins)
                    builds.append(Build(drvs[n], outs[n], text, extra=((seconds[n], dev_text),), inputs=deps))
                else:
                    builds.append(Build(drvs[n], outs[n], text, inputs=deps))
            clients.append(builds)
        return clients

    def build_command(self, workload, url, jobs, rundir, k, builds):
        """Client `k`'s command: `nix-build` of its derivations on the server only (no local
        build slots), or with `remote_store` `nix build` of `top-<k>.nix` in the server's
        store, evaluated (and the .drv files written) in the client's own store."""
        if workload.remote_store:
            top = os.path.join(rundir, f"top-{k}.nix")
            return ["nix", "build", "--store", url, "--eval-store", "auto", "-f", top, "--no-link"]
        builders = f"{url} {BUILDER_SYSTEM} - {jobs} 1 {BUILDER_FEATURES}"
        return ["nix-build", "--max-jobs", "0", "--no-out-link", "--builders", builders] + [
            b.drv for b in builds
        ]

    def check_built(self, builds, printed, what):
        """The outputs nix-build printed are the expected ones, valid, with the expected bytes.
        Returns the CPU seconds the big builds' builders reported (0 without big builds)."""
        want = [b.out for b in builds]
        if sorted(printed) != sorted(want):
            raise BenchError(f"{what}: nix-build printed {len(printed)} paths, not the {len(want)} outputs")
        # nix-build prints the `out` outputs; the others (the big builds' `cpu`) came back too.
        want = [p for b in builds for p in b.outputs()]
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
        check_texts(builds, what)
        return sum(builder_times(b.cpu_out) for b in builds if b.cpu_out)

    def check_not_fetched(self, builds, printed, what):
        """After a remote-store build (`nix build --no-link`): nothing printed, and no output
        valid in the client's store: it neither built nor fetched any. The side checks its
        store (`verify_builds`)."""
        if printed:
            raise BenchError(f"{what}: nix build printed {printed[:3]}")
        here = self.valid([p for b in builds for p in b.outputs()])
        if here:
            raise BenchError(f"{what}: outputs valid in the client's store: {sorted(here)[:3]}")

    def forget(self, paths):
        """Deletes a run's derivations and outputs from the client store (not measured)."""
        self.delete(paths, "deleting the run's derivations and outputs")
        self.owned.difference_update(paths)


def tree_refs(count, i):
    """The references of path i of a `count`-path binary tree rooted at the last path: with
    heap index h = count-1-i (the root 0), the paths of heap indices 2h+1 and 2h+2, both
    below i, so the export stream lists every path after its references."""
    h = count - 1 - i
    return [count - 1 - c for c in (2 * h + 1, 2 * h + 2) if c < count]


class CompressibleFiller:
    """Moderately compressible file contents, made fast: segments of 64 KiB, each with
    probability 0.3 random bytes, else a slice at a random offset of 16 MiB of text (random
    words of a vocabulary of 4096 made-up words, lower case, 2 to 10 letters). Nix's xz keeps
    about half of it (52 % of substitute-200's NARs: the random segments whole, the text at
    about a quarter), and Debian 12's xz 5.4 decompresses it at about 50 MiB/s on the machine
    of BENCHMARKS.md, in the range of real NARs."""

    SEGMENT = 64 * 1024
    RANDOM_SHARE = 0.3

    def __init__(self):
        rng = random.Random(secrets.randbits(64))
        letters = "abcdefghijklmnopqrstuvwxyz"
        vocab = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 10))) for _ in range(4096)]
        words = []
        size = 0
        while size < 16 * MIB:
            chunk = rng.choices(vocab, k=100_000)
            words.append(" ".join(chunk))
            size += len(words[-1]) + 1
        self.pool = " ".join(words).encode()
        self.rng = rng

    def bytes(self, n):
        out = []
        left = n
        while left > 0:
            k = min(self.SEGMENT, left)
            if self.rng.random() < self.RANDOM_SHARE:
                out.append(os.urandom(k))
            else:
                at = self.rng.randrange(len(self.pool) - k)
                out.append(self.pool[at : at + k])
            left -= k
        return b"".join(out)


def u64(n):
    return struct.pack("<Q", n)


def wire_str(s):
    b = s.encode() if isinstance(s, str) else s
    return u64(len(b)) + b + b"\0" * (-len(b) % 8)


def nar_regular_file(contents):
    parts = ["nix-archive-1", "(", "type", "regular", "contents"]
    return b"".join(wire_str(p) for p in parts) + wire_str(contents) + wire_str(")")


def check_texts(builds, what, root=""):
    """Every output whose bytes are known holds them: under `root`, a chroot store's
    directory, or in the client's store."""
    for b in builds:
        for path, text in b.texts():
            with open(root + path) as f:
                got = f.read()
            if got != text:
                raise BenchError(f"{what}: {path} holds {got!r} instead of {text!r}")


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
