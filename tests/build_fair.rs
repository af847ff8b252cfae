//! The scheduler end to end with real Nix 2.8 clients on a daemon with `--cores 2`: fair
//! share between accounts (by the order in which the daemon's log shows builds starting),
//! refusal of a system the server does not build for, and the per-build memory and CPU
//! confinement as the builder sees it.
//!
//! Each test gives its clients store URIs of their own ([`Lab::own_store_uri`]): Nix keeps
//! its job slots per URI, so tests running at once do not take each other's slots.

#[path = "../nixbuild-core/tests/common/mod.rs"]
mod common;
mod harness;
mod lab;

use std::fs::File;
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use common::run_ok;
use harness::Daemon;
use lab::{builds_of, lines, Lab};

/// The client's `nix.conf` for clients with many builds in flight: Nix 2.8 retries a
/// derivation that found every slot busy only when its poll interval has passed (5 s by
/// default), not when a slot frees up (benches/compare/README.md).
const CLIENT_CONF: &str = "build-poll-interval = 0\n";

/// A builders line for `uri` building for `system` with `max_jobs` slots.
fn machine(uri: &str, system: &str, max_jobs: u32) -> String {
    format!("{uri} {system} - {max_jobs} 1 big-parallel,benchmark")
}

/// Starts `nix-build` of `drvs` on the daemon as `account` with stdout and stderr in files of
/// the lab's scratch directory named after `name`.
fn spawn_client(
    lab: &Lab,
    d: &Daemon,
    (account, name): (&str, &str),
    builders: &str,
    drvs: &[String],
) -> Child {
    let file = |ext: &str| {
        File::create(lab.nix.scratch().join(format!("{name}.{ext}"))).expect("create a log file")
    };
    lab.remote_command(d, account, builders, drvs)
        .stdout(Stdio::from(file("out")))
        .stderr(Stdio::from(file("err")))
        .spawn()
        .expect("spawn nix-build")
}

/// Waits for a client started by [`spawn_client`] and checks that it succeeded; its stderr.
fn finish_client(lab: &Lab, d: &Daemon, name: &str, mut child: Child) -> String {
    let status = child.wait().expect("wait for nix-build");
    let stderr = std::fs::read_to_string(lab.nix.scratch().join(format!("{name}.err")))
        .expect("read the client's stderr");
    assert!(
        status.success(),
        "client {name} failed: {stderr}\ndaemon log:\n{}",
        d.log()
    );
    stderr
}

/// The builds the daemon's log shows starting, in order: (account, drv).
fn starts(log: &str) -> Vec<(String, String)> {
    log.lines()
        .filter_map(|l| l.split_once("nixbuild::build: building account="))
        .filter_map(|(_, rest)| {
            let (account, rest) = rest.split_once(" drv=")?;
            let drv = rest.split_whitespace().next()?;
            Some((account.to_owned(), drv.to_owned()))
        })
        .collect()
}

/// Waits until the daemon's log shows `n` builds of `account` queued.
fn wait_until_queued(d: &Daemon, account: &str, n: usize) {
    // The clients submit their builds within seconds; the bound only turns a hang into a
    // failure with the log.
    let until = Instant::now() + Duration::from_secs(60);
    let needle = format!("nixbuild::build: queued account={account} ");
    loop {
        let log = d.log();
        if log.lines().filter(|l| l.contains(&needle)).count() >= n {
            return;
        }
        assert!(
            Instant::now() < until,
            "not {n} builds of {account} queued:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_later_account_starts_before_the_busy_account_drains() {
    // 20 builds of account a and 2 of b, 3 seconds each, on 2 cores of 1 core each.
    let lab = Lab::with_conf(
        r#"let job = n: { name = n; value = mk "fair-${n}" "sleep 3; echo ${n} > $out" {}; };
in builtins.listToAttrs (map job (builtins.genList (i: "a${toString i}") 20 ++ [ "b0" "b1" ]))"#,
        CLIENT_CONF,
    );
    let d = Daemon::start(&["--cores", "2"]);
    let a_attrs: Vec<String> = (0..20).map(|i| format!("a{i}")).collect();
    let a_attrs: Vec<&str> = a_attrs.iter().map(String::as_str).collect();
    let a_drvs = lab.instantiate(&a_attrs);
    let b_drvs = lab.instantiate(&["b0", "b1"]);
    assert_eq!((a_drvs.len(), b_drvs.len()), (20, 2));

    // Four clients of a with five derivations each, sharing one URI with a slot per build;
    // b's client has its own URI, so a's slots do not hold it back on the client side.
    let a_machine = machine(&lab.own_store_uri("relay-a"), "x86_64-linux", 20);
    let b_machine = machine(&lab.own_store_uri("relay-b"), "x86_64-linux", 2);
    let a_clients: Vec<(String, Child)> = a_drvs
        .chunks(5)
        .enumerate()
        .map(|(i, drvs)| {
            let name = format!("a-client-{i}");
            let child = spawn_client(&lab, &d, ("a", &name), &a_machine, drvs);
            (name, child)
        })
        .collect();
    // b arrives once all of a's builds are queued on the server and some have started.
    d.wait_for_log(&["nixbuild::build: building account=a "]);
    wait_until_queued(&d, "a", a_drvs.len());
    let b_client = spawn_client(&lab, &d, ("b", "b-client"), &b_machine, &b_drvs);

    let mut a_stderr = String::new();
    for (name, child) in a_clients {
        a_stderr.push_str(&finish_client(&lab, &d, &name, child));
    }
    let b_stderr = finish_client(&lab, &d, "b-client", b_client);

    let log = d.log();
    for drv in a_drvs.iter().chain(&b_drvs) {
        assert_eq!(builds_of(&log, drv), 1, "{drv} in the daemon log:\n{log}");
    }
    let order = starts(&log);
    let last_of = |account: &str| {
        order
            .iter()
            .rposition(|(a, _)| a == account)
            .unwrap_or_else(|| panic!("no build of {account} started:\n{log}"))
    };
    let first_b = order.iter().position(|(a, _)| a == "b").expect("b started");
    let (last_a, last_b) = (last_of("a"), last_of("b"));
    let sequence: String = order.iter().map(|(a, _)| a.as_str()).collect();
    // b's builds were queued behind all of a's: a first-come-first-served server would start
    // them after a's last.
    assert!(
        last_b < last_a,
        "b's builds started after a's queue drained: start order {sequence}\n\
         a's clients:\n{a_stderr}\nb's client:\n{b_stderr}\ndaemon log:\n{log}"
    );
    // a's clients were told that their builds waited.
    assert!(
        a_stderr.contains("nixbuild: waiting for 1 core (position "),
        "{a_stderr}"
    );
    eprintln!(
        "start order {sequence}: b's builds started as numbers {} and {} of 22, {} of a's \
         after them",
        first_b + 1,
        last_b + 1,
        order[last_b..].iter().filter(|(a, _)| a == "a").count()
    );
}

#[test]
fn a_system_the_server_does_not_build_for_is_refused_at_once() {
    let lab = Lab::new(r#"{ arm = mk "arm" "echo arm > $out" { system = "aarch64-linux"; }; }"#);
    let d = Daemon::start(&["--cores", "2"]);
    let drvs = lab.instantiate(&["arm"]);
    // The client believes the server builds for aarch64-linux.
    let builders = machine(&lab.own_store_uri("relay"), "aarch64-linux", 1);
    let out = lab
        .remote_command(&d, "a", &builders, &drvs)
        .output()
        .expect("run nix-build");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("no machine of this server builds for system 'aarch64-linux'")
            && stderr.contains(&drvs[0]),
        "{stderr}"
    );
    // Refused without waiting for capacity, and nothing ran.
    assert!(!stderr.contains("nixbuild: waiting for"), "{stderr}");
    let log = d.log();
    assert!(!log.contains("nixbuild::build: building "), "{log}");
}

/// Tries to widen the builder's CPU set (affinity of the shell, its cgroup's cpuset file if
/// the sandbox shows one), then records what it may run on.
const WIDEN_SCRIPT: &str = r#"
taskset -p -c 0-1 $$ > /dev/null 2>&1; echo "taskset -c 0-1: $?" > $out
taskset -p ffffffff $$ > /dev/null 2>&1; echo "taskset ffffffff: $?" >> $out
for f in /sys/fs/cgroup/cpuset/cpuset.cpus /sys/fs/cgroup/cpuset.cpus; do
  if [ -e $f ]; then echo 0-1 > $f 2>/dev/null; echo "write $f: $?" >> $out; fi
done
grep Cpus_allowed_list /proc/self/status >> $out
"#;

#[test]
fn a_builder_over_its_memory_fails_and_one_cannot_widen_its_cpus() {
    let lab = Lab::new(&format!(
        r#"{{
  hog = mk "hog" "head -c 400m /dev/zero | tail > /dev/null; echo survived > $out" {{}};
  widen = mk "widen" ''{WIDEN_SCRIPT}'' {{}};
}}"#
    ));
    let d = Daemon::start_with_config("[scheduler]\ndefault_memory = \"64M\"\n", &["--cores", "2"]);
    let drvs = lab.instantiate(&["hog", "widen"]);
    let builders = machine(&lab.own_store_uri("relay"), "x86_64-linux", 2);
    let out: Output = lab
        .remote_command(&d, "a", &builders, &drvs)
        .arg("--keep-going")
        .output()
        .expect("run nix-build");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("out of memory (limit 64 MiB)"),
        "{stderr}\ndaemon log:\n{}",
        d.log()
    );
    assert!(!stderr.contains("survived"), "{stderr}");

    // The other build went on: its output came back, and its CPU set is still its grant.
    let widen = &drvs[1];
    let granted = stderr
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("nixbuild: building '{widen}' on 1 cores ("))?
                .split_once(')')
                .map(|(cpus, _)| cpus.to_owned())
        })
        .unwrap_or_else(|| panic!("no grant of {widen} in the client's output:\n{stderr}"));
    assert!(granted.parse::<u32>().is_ok(), "one core, not {granted}");
    let outputs = lines(
        &run_ok(
            lab.nix
                .command("nix-store")
                .args(["--query", "--outputs", widen]),
        )
        .stdout,
    );
    let record = std::fs::read_to_string(&outputs[0]).expect("read the widening record");
    let allowed = record
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap_or_else(|| panic!("no Cpus_allowed_list in {record}"));
    assert_eq!(allowed.trim(), granted, "{record}");
}
