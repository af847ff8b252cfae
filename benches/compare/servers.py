"""The two sides: Nix's `nix-store --serve` (over stdio, or behind OpenSSH's sshd) and
nixbuild-server (through its relay, or over its own SSH), each started on an empty store."""

import contextlib
import datetime
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from common import (
    PREFIX,
    BenchError,
    GNU_TIME,
    SETSID,
    START_TIMEOUT,
    capture,
    comm,
    field,
    kill_pid,
    rm_tree,
    run,
    shq,
    tail,
)
from client import check_hashes, check_server_nar_hashes, check_texts
from report import (
    NGSSH_SIDE_LABEL,
    NGSTORE_SIDE_LABEL,
    SIDE_LABEL,
    SSH_SIDE_LABEL,
    SUBST_SIDE_LABEL,
    median,
)
from workloads import critical_path


SSHD = "/usr/sbin/sshd"
UNSHARE = "/usr/bin/unshare"
# The account of the benchmark's client key (the first word of its comment).
ACCOUNT = "bench"
# The target of the build service's log lines (`queued`, `building`, `build finished`).
BUILD_LOG_TARGET = "nixbuild::build"


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

    def __init__(self, root, client_conf, conf_name="ref-nix-conf", max_jobs=1):
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
                f"max-jobs = {max_jobs}\n"
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
        outs = [p for b in builds for p in b.outputs()]
        capture(
            ["nix-store", "--store", self.store, "--check-validity"] + outs,
            client.env,
            client.log,
            "reference: outputs valid in its store",
        )
        check_server_nar_hashes("reference store", client, builds, self.server_hashes)
        check_texts(builds, "reference store", self.store)
        return None

    def timeline(self, _builds, _rundir, _started, _ended):
        """Nix logs no timestamps of its builds on the server's side."""
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
    # The daemon's log line for each build answered to the client: the serve driver's
    # (with `micros=`, BuildDerivation received -> BuildResult sent).
    answered = "answered BuildDerivation"

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

    @contextlib.contextmanager
    def verifier(self):
        """The URL of a separate, unmeasured daemon on the same state directory, reached
        through the relay, for the checks after a run; stopped when done."""
        rundir = tempfile.mkdtemp(prefix="verify-", dir=self.root)
        self.start_daemon(rundir, None, None)
        try:
            script = wrapper_script(
                os.path.join(rundir, "plain-serve.sh"), None, None, "", self.relay_env(), self.serve_bin
            )
            yield f"ssh://localhost?remote-program={script}"
        finally:
            self.stop()

    def server_hashes(self, client, paths, what):
        """narHash of each path as the server's store records it."""
        with self.verifier() as url:
            return client.hashes(url, paths, what)

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
        `micros=`, from receiving the request to sending the BuildResult), or None where the
        driver logs no such figure (the worker driver).
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
            elif self.answered in line:
                micros = field(line, "micros")
                if field(line, "status") != "Built" or (micros is not None and not micros.isdigit()):
                    raise BenchError(f"nixbuild: unexpected answer in the daemon log: {line}")
                answered.setdefault(drv, []).append(None if micros is None else int(micros) / 1e6)
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
        return None if None in times else times

    def timeline(self, builds, rundir, started, ended):
        """Where a run's time went, from the daemon's log: the SSH session's start (target
        `nixbuild::ssh`), the graph build's start and each derivation's `queued` (handed to
        the scheduler), `building` (its sandbox helper started) and `build finished` (target
        `nixbuild::build`), against the client command's start and exit (`started`,
        `ended`: seconds since the epoch). Seconds, the per-derivation figures as medians
        over the run's derivations: `connect` client start -> session start (TCP, key
        exchange, authentication, the exec); `plan` session start -> graph build started
        (the protocol's handshake, the .drv upload, the client's queries, the plan);
        `to_first` -> first queued; `span` first queued -> last finished; `levels` builds
        on the graph's longest path; `after_last` last finished -> client exit; `handoff`
        its inputs' last finish -> queued; `wait` queued -> building; `build` building ->
        finished."""
        events = {"queued": {}, "building": {}, "build finished": {}}
        marks = {}  # "session", "graph": the first of each
        with open(os.path.join(rundir, "daemon.log"), errors="replace") as f:
            for line in f.read().splitlines():
                head, sep, rest = line.partition(f" {BUILD_LOG_TARGET}: ")
                if not sep:
                    head, sep, rest = line.partition(" nixbuild::ssh: ")
                    if sep and rest.startswith("session start"):
                        marks.setdefault("session", log_time(head))
                    continue
                if rest.startswith("graph build"):
                    marks.setdefault("graph", log_time(head))
                drv = field(line, "drv")
                event = next((e for e in events if rest.startswith(e)), None)
                if event is not None and drv is not None:
                    events[event].setdefault(drv, log_time(head))
        queued, building, finished = events.values()
        drvs = [b.drv for b in builds]
        missing = [d for d in drvs if not all(d in e for e in events.values())]
        if missing or len(marks) != 2:
            raise BenchError(
                f"nixbuild: the daemon log lacks the session's or graph's start, or queued/building/"
                f"finished of {missing[:1]}"
            )
        first, last = min(queued[d] for d in drvs), max(finished[d] for d in drvs)
        return {
            "connect": marks["session"] - started,
            "plan": marks["graph"] - marks["session"],
            "to_first": first - marks["graph"],
            "span": last - first,
            "levels": critical_path(builds),
            "after_last": ended - last,
            "handoff": median([queued[b.drv] - max(finished[i] for i in b.inputs) for b in builds if b.inputs]),
            "wait": median([building[d] - queued[d] for d in drvs]),
            "build": median([finished[d] - building[d] for d in drvs]),
        }


def log_time(head):
    """Seconds since the epoch of a daemon log line's timestamp (its first word)."""
    return datetime.datetime.fromisoformat(head.split()[0].replace("Z", "+00:00")).timestamp()


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

    def pin(self, alias, clients, port, known_hosts_line, scheme="ssh"):
        """Points `clients` aliases (`alias`, or `alias-0`, `alias-1`, ...: Nix keeps its
        build-slot locks per URL, so clients running at once need URLs of their own) at
        127.0.0.1:`port`, trusting only `known_hosts_line`; returns their URLs
        (`<scheme>://<alias>`: `ssh` runs `nix-store --serve --write`, `ssh-ng`
        `nix-daemon --stdio`)."""
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
        return [f"{scheme}://{a}" for a in names]


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
    scheme = "ssh"
    conf_name = "ref-ssh-nix-conf"
    store_prefix = "ref-ssh-store"

    def __init__(self, root, client_conf, ssh, client, kex=None, max_jobs=1):
        Reference.__init__(self, root, client_conf, self.conf_name, max_jobs)
        self.kex = kex  # sshd's KexAlgorithms, or None for OpenSSH's default
        if not os.access(SSHD, os.X_OK):
            raise BenchError(f"{SSHD} is missing: install openssh-server")
        self.ssh = ssh
        self.client = client
        self.host_key = os.path.join(root, f"sshd_host_ed25519_key-{self.alias}")
        run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", self.alias, "-f", self.host_key],
            client.env,
            client.log,
            "ssh-keygen of sshd's host key",
        )
        with open(self.host_key + ".pub") as f:
            self.host_pub = " ".join(f.read().split()[:2])
        self.empty = os.path.join(root, f"{self.alias}-empty-file")
        open(self.empty, "w").close()
        # sshd's privilege separation directory.
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)

    def fresh_store(self, n):
        if self.store:
            rm_tree(self.store)
        self.store = os.path.join(self.root, f"{self.store_prefix}-{n}")
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
        return self.ssh.pin(
            self.alias, clients, port, f"[127.0.0.1]:{port} {self.host_pub}", self.scheme
        )


class SshNixbuild(Nixbuild):
    """`nixbuild-server` with its SSH front door on a free port (`--listen 127.0.0.1:0`),
    the client's key in its `--authorized-keys`; the host key it generates in each fresh
    state directory is pinned from the lines it prints at start."""

    label = SSH_SIDE_LABEL["nixbuild"]
    alias = "nixbuild-ssh"
    scheme = "ssh"

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
        return self.ssh.pin(self.alias, clients, port, line, self.scheme)


class NgSshReference(SshReference):
    """The reference for ssh-ng (issue 18): the same sshd in its own mount namespace and
    store as `SshReference`, reached as `ssh-ng://<alias>`, so that each connection runs
    Nix's default remote program `nix-daemon --stdio` (through root's `bash -c`).

    In that namespace `/nix/var/nix` is the reference's own and root may write it, so Nix
    2.8's `nix-daemon --stdio` opens the local store itself (it would forward to a daemon
    socket only if it could not) and serves it as a trusted connection: Nix trusts whatever
    is at the other end of its standard streams, which is how BuildDerivation of
    input-addressed derivations (refused to untrusted clients) is allowed at all.
    `trusted-users = root` in its configuration says the same for a socket connection. Nix
    2.8's ssh-ng client sends no SetOptions, so the daemon builds with its own configuration:
    the sandbox, `nixbld` users, one core, as the `ssh` reference."""

    label = NGSSH_SIDE_LABEL["reference"]
    alias = "reference-ngssh"
    scheme = "ssh-ng"
    conf_name = "ref-ngssh-nix-conf"
    store_prefix = "ref-ngssh-store"

    def __init__(self, root, client_conf, ssh, client, kex=None, max_jobs=1):
        super().__init__(root, client_conf, ssh, client, kex, max_jobs)
        with open(os.path.join(self.conf_dir, "nix.conf"), "a") as f:
            f.write("trusted-users = root\n")


class NgSshNixbuild(SshNixbuild):
    """nixbuild's own SSH front door reached as `ssh-ng://<alias>`: the exec command is
    `nix-daemon --stdio`, which nixbuild answers with its worker-protocol driver."""

    label = NGSSH_SIDE_LABEL["nixbuild"]
    alias = "nixbuild-ngssh"
    scheme = "ssh-ng"
    # The worker driver's line once a build's outcome is known (no `micros=`).
    answered = "worker build done"


class NgStoreReference(NgSshReference):
    """The reference for remote-store builds (issue 19): `NgSshReference` with its own alias,
    configuration and store, where the client's `nix build --store` uploads the .drv closure
    and sends BuildPaths of the graph's top, and `nix-daemon --stdio` builds the whole graph
    in its store, running up to `max_jobs` builds at once (the harness's `--jobs`, the slots
    the builders line gives the other build workloads)."""

    label = NGSTORE_SIDE_LABEL["reference"]
    alias = "reference-ngstore"
    conf_name = "ref-ngstore-nix-conf"
    store_prefix = "ref-ngstore-store"


class NgStoreNixbuild(NgSshNixbuild):
    """nixbuild's SSH front door as the store of a remote-store build (issue 19): its
    worker driver builds the graph through the build service, which logs each derivation's
    `build finished ... status=Built` (target `nixbuild::build`). Nothing comes back to the
    client, so after the checks of the log the outputs are fetched (unmeasured) to check
    their bytes."""

    label = NGSTORE_SIDE_LABEL["nixbuild"]
    alias = "nixbuild-ngstore"
    answered = f" {BUILD_LOG_TARGET}: build finished"

    def verify_builds(self, client, builds, rundir):
        times = super().verify_builds(client, builds, rundir)
        outs = [p for b in builds for p in b.outputs()]
        with self.verifier() as url:
            run(["nix", "copy", "--from", url] + outs, client.env, client.log, "nixbuild: fetching the outputs")
        check_texts(builds, "nixbuild store (outputs fetched)")
        return times


# `python3 -m http.server`, with a listen backlog of 1024 instead of socketserver's 5: with 5,
# a burst of connections (a substituter asking for 16 narinfos at once; the server speaks
# HTTP/1.0, a connection per request) overflows the accept queue, the kernel drops the SYNs,
# and each dropped connection waits out TCP's 1 s retransmission timeout. Seen on both sides
# (`TcpExtListenOverflows`: 33 in one nixbuild run, 55 in one of the reference's), costing
# nixbuild about 1 s a run; a real cache's web server has a backlog of hundreds.
HTTP_SERVER = (
    "import runpy, socketserver, sys; socketserver.TCPServer.request_queue_size = 1024; "
    "runpy.run_module('http.server', run_name='__main__', alter_sys=True)"
)

# The daemon's log line for each path it fetched from a cache (target nixbuild::substitute).
SUBSTITUTED = "nixbuild::substitute: substituted path="


class HttpCache:
    """The binary cache both sides substitute from (issue 20), made once per harness run: a
    fresh signing key (`nix-store --generate-binary-cache-key`), the dataset's closure
    written by the real Nix (`nix copy --to 'file://<dir>?secret-key=<key>&compression=xz'`,
    Nix's default xz level, `parallel-compression` to make it sooner), and served over HTTP by
    `python3 -m http.server` (`HTTP_SERVER`: with a larger listen backlog) on 127.0.0.1, the
    one server for both sides, outside every measured cgroup. Its access log tells how many
    NARs each run fetched. Stopped at cleanup.
    """

    def __init__(self, tmp, client, dataset):
        self.dir = os.path.join(tmp, "cache")
        os.mkdir(self.dir)
        secret = os.path.join(tmp, "cache-key.secret")
        public = os.path.join(tmp, "cache-key.public")
        run(
            ["nix-store", "--generate-binary-cache-key", f"{PREFIX}-1", secret, public],
            client.env,
            client.log,
            "nix-store --generate-binary-cache-key",
        )
        with open(public) as f:
            self.public_key = f.read().strip()
        started = time.monotonic()
        run(
            [
                "nix",
                "copy",
                "--to",
                f"file://{self.dir}?secret-key={secret}&compression=xz&parallel-compression=true",
                dataset.top,
            ],
            client.env,
            client.log,
            "nix copy of the closure into the binary cache",
        )
        self.seconds = time.monotonic() - started
        self.nar_size = self.file_size = 0
        infos = [n for n in os.listdir(self.dir) if n.endswith(".narinfo")]
        for name in infos:
            with open(os.path.join(self.dir, name)) as f:
                fields = dict(line.split(": ", 1) for line in f.read().splitlines() if ": " in line)
            if fields.get("Compression") != "xz" or not fields.get("Sig", "").startswith(f"{PREFIX}-1:"):
                raise BenchError(f"cache: {name} is not an xz NAR signed by the harness's key: {fields}")
            self.nar_size += int(fields["NarSize"])
            self.file_size += int(fields["FileSize"])
        if len(infos) != len(dataset.paths):
            raise BenchError(f"cache: {len(infos)} narinfos for {len(dataset.paths)} paths")
        self.access_log = os.path.join(tmp, "cache-access.log")
        self.proc = subprocess.Popen(
            [sys.executable, "-u", "-c", HTTP_SERVER, "--bind", "127.0.0.1", "0", "--directory", self.dir],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=open(self.access_log, "ab"),
        )
        # "Serving HTTP on 127.0.0.1 port 38123 (http://127.0.0.1:38123/) ..."
        words = self.proc.stdout.readline().decode().split()
        port = words[words.index("port") + 1] if "port" in words[:-1] else ""
        if not port.isdigit():
            self.stop()
            raise BenchError(f"python3 -m http.server did not start:\n{tail(self.access_log)}")
        self.url = f"http://127.0.0.1:{port}"

    def mark(self):
        """Where the access log ends now."""
        return os.path.getsize(self.access_log)

    def nar_fetches(self, since):
        """NARs served in full (`GET /nar/... 200`) since `mark` gave `since`."""
        with open(self.access_log, "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        return sum(1 for line in text.splitlines() if '"GET /nar/' in line and '" 200 ' in line)

    def cpu_seconds(self):
        """User + system CPU the HTTP server has used so far (all its threads)."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        # utime and stime, fields 14 and 15 of stat(5), in clock ticks.
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self):
        if self.proc is None:
            return
        kill_pid(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            kill_pid(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc.stdout.close()
        self.proc = None


class SubstituteReference(Reference):
    """Nix 2.8 substituting by itself (issue 20): `nix-store --store <fresh chroot store>
    --realise <top>` (the top is no derivation, so realising it substitutes it, its closure
    first), with the cache as its one substituter and its key trusted, signatures required
    (as nixbuild requires them), `max-jobs` substitutions at once (Nix counts them against
    `max-jobs`; its default is 1), and a fresh `XDG_CACHE_HOME` per run so that no narinfo
    lookup of an earlier run is remembered (nixbuild's daemon is new each run too). The
    process is client and server in one: all of it is the server's figures."""

    label = SUBST_SIDE_LABEL["reference"]

    def __init__(self, root, client_conf, cache, jobs):
        self.root = root
        self.store = None
        self.cache = cache
        self.conf_dir = os.path.join(root, "ref-subst-nix-conf")
        os.mkdir(self.conf_dir)
        with open(client_conf) as f:
            conf = f.read()
        with open(os.path.join(self.conf_dir, "nix.conf"), "w") as f:
            f.write(
                conf
                + f"substituters = {cache.url}\n"
                f"trusted-public-keys = {cache.public_key}\n"
                "require-sigs = true\n"
                f"max-jobs = {jobs}\n"
            )

    def fresh_store(self, n, client):
        if self.store:
            rm_tree(self.store)
        self.store = os.path.join(self.root, f"ref-subst-store-{n}")
        os.makedirs(os.path.join(self.store, "nix"))
        # Its database exists before the run, as nixbuild's daemon opens its store before.
        run(["nix-store", "--store", self.store, "--init"], client.env, client.log, "nix-store --init")

    def substitute_command(self, rundir, group, stats_dir, dataset):
        """The measured command: the wrapper joins the run's cgroup and execs GNU time and
        `nix-store --realise`."""
        cache_home = os.path.join(rundir, "xdg-cache")
        os.mkdir(cache_home)
        env = {"NIX_CONF_DIR": self.conf_dir, "XDG_CACHE_HOME": cache_home}
        script = wrapper_script(
            os.path.join(rundir, "ref-realise.sh"),
            group,
            stats_dir,
            "nix-store",
            env,
            shutil.which("nix-store"),
            foreground=True,
        )
        return [script, "--store", self.store, "--realise", dataset.top]

    def verify_substituted(self, client, dataset, _rundir, _started, _ended):
        """Every path valid in its store with the client's narHash, and on disk hashing to it."""
        self.verify_upload(client, dataset)
        return None


class SubstituteNixbuild(Nixbuild):
    """A fresh `nixbuild-server` on an empty state directory whose `nixbuild.toml` has the
    cache in `[substituters]` (its key trusted; `max_parallel` nixbuild's default unless
    given), reached by the client's `nix copy --substitute-on-destination --to
    ssh-ng://localhost?remote-program=<relay wrapper>`: Nix 2.8 asks which paths the server
    has, with `substitute` (QueryValidPaths), the daemon fetches the closure from the cache
    before answering, and the client then finds nothing to upload."""

    label = SUBST_SIDE_LABEL["nixbuild"]

    def __init__(self, root, bin_dir, client, cache, max_parallel=None):
        super().__init__(root, bin_dir, client)
        self.cache = cache
        self.max_parallel = max_parallel

    def fresh_store(self, n, _client=None):
        super().fresh_store(n)
        with open(os.path.join(self.state, "nixbuild.toml"), "w") as f:
            f.write(
                "[substituters]\n"
                f'urls = ["{self.cache.url}"]\n'
                f'trusted_public_keys = ["{self.cache.public_key}"]\n'
                + (f"max_parallel = {self.max_parallel}\n" if self.max_parallel else "")
            )

    def substitute_command(self, rundir, group, stats_dir, dataset):
        """Starts the daemon in the run's cgroup (under GNU time, as the relay); the
        measured client command."""
        (url,) = self.start(rundir, group, stats_dir)
        url = url.replace("ssh://", "ssh-ng://", 1)
        # Nix 2.8's ssh-ng store sends QueryValidPaths' `substitute` flag from its
        # `builders-use-substitutes` setting, whatever `--substitute-on-destination` says
        # (RemoteStore::queryValidPaths): the flag alone would upload the whole closure.
        return [
            "nix",
            "copy",
            "--substitute-on-destination",
            "--option",
            "builders-use-substitutes",
            "true",
            "--to",
            url,
            dataset.top,
        ]

    def verify_substituted(self, client, dataset, rundir, started, ended):
        """The daemon's log shows each path of the closure substituted once and no upload;
        then every path is valid for the account with the client's narHash and the objects
        on disk hash to them (`verify_upload`). Returns when the daemon logged its first and
        last path substituted, against the client's start and exit (seconds)."""
        with open(os.path.join(rundir, "daemon.log"), errors="replace") as f:
            lines = f.read().splitlines()
        wanted = set(dataset.paths)
        done = {}
        for line in lines:
            if SUBSTITUTED in line:
                path = field(line, "path")
                if path in wanted:
                    done.setdefault(path, []).append(log_time(line))
        twice = [p for p, ts in done.items() if len(ts) != 1]
        if len(done) != len(wanted) or twice:
            raise BenchError(
                f"nixbuild: the daemon log shows {len(done)} of the {len(wanted)} paths substituted"
                + (f", {len(twice)} more than once" if twice else "")
            )
        uploads = [line for line in lines if "registered import" in line]
        if uploads:
            raise BenchError(f"nixbuild: the client uploaded {len(uploads)} paths: {uploads[0]}")
        self.verify_upload(client, dataset)
        times = sorted(ts[0] for ts in done.values())
        return {"first": times[0] - started, "last": times[-1] - started, "after": ended - times[-1]}
