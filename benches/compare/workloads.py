"""The workloads: what each one moves or builds, its data sets and derivations, and the
issues' targets."""

import dataclasses
import re

from common import BenchError, MIB


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Client-side test paths: `top` is what `nix copy` is given, `paths` its whole closure."""

    key: str
    title: str
    top: str
    paths: tuple
    nar_hashes: dict  # store path -> "sha256:<nix32>" as the client's Nix recorded it
    size: int  # bytes of file contents in the closure (what throughput is counted in)
    nar_size: int = 0  # bytes of the paths' NARs (`nix-store -q --size`), where needed


@dataclasses.dataclass(frozen=True)
class Workload:
    """A `nix copy` of a dataset to (upload) or from (download) the server."""

    name: str
    direction: str  # "upload" (nix copy --to) or "download" (nix copy --from)
    dataset: str  # key of the Dataset
    cpu_target: float | None  # server CPU ratio nixbuild / reference must be at most this
    rss_target_mib: float | None  # nixbuild peak RSS must stay under this, when set
    # "stdio" (remote-program), "ssh" (sshd running nix-store --serve / nixbuild's SSH) or
    # "ssh-ng" (sshd running nix-daemon --stdio / nixbuild's SSH, the worker protocol)
    transport: str = "stdio"
    # Issue 8: throughput nixbuild / reference at least this, or, where the client is the
    # bottleneck, server CPU per GiB nixbuild / reference at most `cpu_target`.
    throughput_target: float | None = None
    kind = "copy"
    remote_store = False


@dataclasses.dataclass(frozen=True)
class BuildWorkload:
    """Fresh derivations built on the server: by `nix-build --max-jobs 0 --builders`, or
    with `remote_store` by `nix build --store <url> --eval-store auto` (the server builds
    the whole graph in its own store, issue 19)."""

    name: str
    # "one": a nix-build per derivation; "independent", "chain", "big", "graph": one client
    # command ("graph": the diamond of GRAPH_LAYERS, outputs out and dev)
    shape: str
    count: int  # derivations per client
    clients: int  # client commands running at once, each on its own derivations
    wall_target: float | None  # nixbuild wall time / reference's must be at most this
    transport: str = "stdio"
    # "big": the output's size; throughput and CPU-per-GiB targets as for `Workload`.
    size_mib: int = 0
    throughput_target: float | None = None
    cpu_target: float | None = None
    # Issue 19: the server is the store (`nix build --store`), not a builder; only the
    # graph's top is asked for, and nothing comes back to the client.
    remote_store: bool = False
    kind = "build"

    def title(self):
        if self.shape == "one":
            return f"one fresh trivial derivation per nix-build, {self.count} nix-builds in a row"
        if self.shape == "big":
            return f"one derivation whose output is a {self.size_mib} MiB file, fetched back"
        what = {
            "independent": f"{self.count} independent trivial derivations",
            "chain": f"a chain of {self.count} dependent derivations",
            "graph": f"a diamond of {self.count} derivations in {len(GRAPH_LAYERS)} layers "
            f"({'-'.join(map(str, GRAPH_LAYERS))} wide), outputs out and dev, each on two of the layer below",
        }[self.shape]
        if self.remote_store:
            return f"{what}, one nix build --store (built on the server, nothing fetched)"
        if self.clients == 1:
            return f"{what} in one nix-build"
        return f"{self.clients} nix-builds at once, each of {what}"

    def inputs(self):
        """For each derivation of a client, the indices of the ones it takes as inputs."""
        if self.shape == "chain":
            return [[i - 1] if i else [] for i in range(self.count)]
        if self.shape == "graph":
            return graph_inputs(self.count)
        return [[] for _ in range(self.count)]


@dataclasses.dataclass(frozen=True)
class ConnectWorkload:
    """`count` times `nix store ping --store ssh://<alias>`: connection, SSH handshake,
    authentication, exec of `nix-store --serve --write` and the serve handshake."""

    name: str
    count: int
    cpu_target: float  # server CPU per connection, nixbuild / reference, at most this
    transport: str = "ssh"
    kind = "connect"
    remote_store = False


@dataclasses.dataclass(frozen=True)
class SubstituteWorkload:
    """A closure substituted from a binary cache served over HTTP into an empty store
    (issue 20): on the reference's side Nix 2.8's own `nix-store --realise` of the top path
    into a fresh chroot store; on nixbuild's, a fresh daemon with `[substituters]`, asked by
    the client's `nix copy --substitute-on-destination --to ssh-ng://...` (through the
    relay), which fetches the closure itself while the client uploads nothing."""

    name: str
    throughput_target: float  # NAR MiB/s nixbuild / reference at least this
    cpu_target: float  # server CPU nixbuild / reference at most this
    mem_target_mib: float  # nixbuild's peak RSS (daemon + relay) under this
    dataset: str = "substitute"
    transport: str = "stdio"
    kind = "substitute"
    remote_store = False


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
    # Issue 18: ssh-ng (the Nix daemon protocol, `nix-daemon --stdio`), against OpenSSH's sshd
    # running `nix-daemon --stdio`. Throughput targets without issue 8's CPU alternative.
    BuildWorkload("ngssh-build-50", "independent", 50, 1, 0.3, transport="ssh-ng"),
    Workload(
        "ngssh-upload-200", "upload", "closure", None, None, transport="ssh-ng", throughput_target=1.5
    ),
    Workload(
        "ngssh-download-200", "download", "closure", None, None, transport="ssh-ng", throughput_target=1.5
    ),
    # Issue 19: remote-store builds over ssh-ng, the server building the whole graph, against
    # OpenSSH's sshd running `nix-daemon --stdio` on its own store.
    BuildWorkload("ngstore-chain-20", "chain", 20, 1, 0.3, transport="ssh-ng", remote_store=True),
    BuildWorkload("ngstore-graph-50", "graph", 50, 1, 0.3, transport="ssh-ng", remote_store=True),
    # Issue 20: substitution from a binary cache over HTTP into an empty store.
    SubstituteWorkload("substitute-200", 1.5, 1.0, 128),
]

# The transports that go through sshd on the reference's side (the client's ssh config).
SSH_TRANSPORTS = ("ssh", "ssh-ng")

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
    "issue18": ["ngssh-build-50", "ngssh-upload-200", "ngssh-download-200"],
    "issue19": ["ngstore-chain-20", "ngstore-graph-50"],
    "issue20": ["substitute-200"],
}

# The diamond of `ngstore-graph-50`: the width of each layer, from the bottom (no inputs) to
# the top (the one derivation the client asks for). Its critical path is one build a layer.
GRAPH_LAYERS = (1, 2, 4, 6, 8, 8, 8, 6, 4, 2, 1)


def graph_inputs(count):
    """The diamond's inputs: node j of a layer of width w, over a layer of width p, takes
    nodes j*p//w and the next one (modulo p) of the layer below, or its one node. Every node
    but the top is an input of some node above, so asking for the top builds them all."""
    if sum(GRAPH_LAYERS) != count:
        raise BenchError(f"the diamond has {sum(GRAPH_LAYERS)} derivations, not {count}")
    inputs = []
    first = 0  # index of the current layer's first node
    for depth, width in enumerate(GRAPH_LAYERS):
        below = GRAPH_LAYERS[depth - 1] if depth else 0
        base = first - below  # the layer below's first node
        for j in range(width):
            if below <= 1:
                inputs.append(list(range(base, base + below)))
            else:
                a = j * below // width
                inputs.append(sorted([base + a, base + (a + 1) % below]))
        first += width
    used = {i for ins in inputs for i in ins}
    if used != set(range(count - 1)):
        raise BenchError("the diamond leaves derivations out of the top's closure")
    return inputs

# Issue 4: BuildDerivation received -> BuildResult sent, median, for a fresh trivial build.
BUILD_ONE_TARGET_MS = 20
# Issues 8 and 18: server memory throughout, for the build workloads and issue 8's and 18's copies.
BUILD_MEM_TARGET_MIB = 100
# The system and features every build is offered with (the builders line).
BUILDER_SYSTEM = "x86_64-linux"
BUILDER_FEATURES = "big-parallel,benchmark"


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
    # Other outputs whose bytes are known (the graph's dev): (path, text) each.
    extra: tuple = ()
    inputs: tuple = ()  # the .drv paths of the derivations it takes as inputs

    def texts(self):
        """(output path, expected bytes) of every output whose bytes are known."""
        return ([(self.out, self.text)] if self.text is not None else []) + list(self.extra)

    def outputs(self):
        return [self.out] + [p for p, _ in self.extra] + ([self.cpu_out] if self.cpu_out else [])


def critical_path(builds):
    """Builds on the longest path through the inputs of `builds` (inputs listed first)."""
    depth = {}
    for b in builds:
        depth[b.drv] = 1 + max((depth[i] for i in b.inputs), default=0)
    return max(depth.values())
