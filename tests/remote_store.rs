//! Remote-store builds (issue 19): `nix build --store ssh-ng://… --eval-store auto -f FILE
//! ATTRS --no-link` evaluates on the client, uploads the `.drv` closure, and asks the server
//! to build; the server builds the whole graph itself, in dependency order, each derivation
//! once, and nothing comes back until the client asks for it.
//!
//! With each of the three Nix client generations (tests/harness/clients.rs) and both ways in
//! (the relay and the SSH server, tests/harness/ssh_ng.rs), as tests
//! `<client>_<way>::<graph>`:
//!
//! - a chain of 20 derivations and a diamond of 50 derivations with three outputs each, whose
//!   dependents use `out` of some inputs and `dev` of others, built by one client command
//!   that selects outputs of the diamond's top (`top.dev` on Nix 2.8, `top^dev,doc` on the
//!   newer clients); afterwards `nix copy --from` fetches the requested outputs, and the
//!   server's log shows that those, and only those, NARs were sent;
//! - a graph where one derivation fails, with and without the client's `--keep-going` (Nix's
//!   ssh-ng store does not pass the client's options on; the server keeps going by default):
//!   every branch that can succeed is built, the failure's dependents are not, the client's
//!   error shows the failing builder's log; then `nix build --dry-run` (QueryMissing, the
//!   `.drv` files being on the server) lists exactly the derivations still to build.
//!
//! With the host's Nix 2.8 through the relay only: 200 derivations under one top never run
//! on more cores than the server has; a client killed mid-graph leaves no build running
//! (the running ones killed, the waiting one never started) and nothing half-registered, and
//! the same command again builds only what was missing.
//!
//! Everything is checked from the server's log (tests/harness/build_log.rs): each
//! derivation's `building` comes after the `build finished` of each of its inputs, and
//! counts of `building` per derivation. The derivations are salted for the run and built
//! with the busybox every client store holds; each writes one line into each of its outputs
//! after reading each of its inputs, and no output refers to another path, so the closure of
//! an output is the output itself.

mod harness;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use harness::build_log::{
    build_events, field, most_at_once, records, sent_nars, starts_of, BuildEvent, Kind,
};
use harness::clients::{busybox, read_client_file, Client};
use harness::salt;
use harness::ssh::run;
use harness::ssh_ng::{must, Setup, Way, ALICE};

/// One derivation of a test graph.
struct Node {
    /// Its attribute in the expression (and its name, `rs-<attr>-<salt>`).
    attr: String,
    /// Its outputs, `out` first.
    outputs: &'static [&'static str],
    /// Its inputs: an earlier node's index and the output used.
    inputs: Vec<(usize, &'static str)>,
    /// Shell lines run before the outputs are written (a sleep, a failure).
    before: String,
}

/// A graph of derivations, each node's inputs before it.
#[derive(Default)]
struct Graph {
    nodes: Vec<Node>,
}

/// What the client's evaluation says of one node: its `.drv` and output paths.
#[derive(Debug, Clone)]
struct Paths {
    drv: String,
    outs: BTreeMap<String, String>,
}

impl Graph {
    /// Adds a node; returns its index.
    fn add(
        &mut self,
        attr: &str,
        outputs: &'static [&'static str],
        inputs: Vec<(usize, &'static str)>,
        before: &str,
    ) -> usize {
        for (i, o) in &inputs {
            assert!(self.nodes[*i].outputs.contains(o), "{attr}: no output {o}");
        }
        self.nodes.push(Node {
            attr: attr.to_owned(),
            outputs,
            inputs,
            before: before.to_owned(),
        });
        self.nodes.len() - 1
    }

    /// The index of the node `attr`.
    fn index(&self, attr: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| n.attr == attr)
            .unwrap_or_else(|| panic!("no node {attr}"))
    }

    /// Adds a chain of `n` nodes `<prefix>0` … `<prefix>{n-1}`, each depending on the one
    /// before; returns the last one's index.
    fn chain(&mut self, prefix: &str, n: usize, before: &str) -> usize {
        let mut last = None;
        for i in 0..n {
            let inputs = last.map(|l| vec![(l, "out")]).unwrap_or_default();
            last = Some(self.add(&format!("{prefix}{i}"), &["out"], inputs, before));
        }
        last.expect("a chain of at least one")
    }

    /// Adds a diamond of nodes `<prefix>0`, … with outputs `out`, `dev` and `doc`, in layers
    /// of `widths` (one node at the bottom and one at the top): each node of a layer is an
    /// input of node `i % width` of the layer above, and node `j` above also takes node
    /// `j % width` of the layer below, using `dev` when `i + j` is even and `out` otherwise.
    /// Returns the top's index.
    fn diamond(&mut self, prefix: &str, widths: &[usize]) -> usize {
        const OUTPUTS: &[&str] = &["out", "dev", "doc"];
        assert_eq!((widths[0], widths[widths.len() - 1]), (1, 1));
        let mut below: Vec<usize> = Vec::new();
        let mut n = 0;
        for &width in widths {
            let mut layer = Vec::new();
            for j in 0..width {
                let mut picked = BTreeSet::new();
                if !below.is_empty() {
                    picked.extend((0..below.len()).filter(|i| i % width == j));
                    picked.insert(j % below.len());
                }
                let inputs = picked
                    .into_iter()
                    .map(|i| (below[i], if (i + j) % 2 == 0 { "dev" } else { "out" }))
                    .collect();
                layer.push(self.add(&format!("{prefix}{n}"), OUTPUTS, inputs, ""));
                n += 1;
            }
            below = layer;
        }
        below[0]
    }

    /// The Nix expression: an attribute set of every node.
    fn expression(&self, salt: &str, bb: &str) -> String {
        let mut text = format!("let bb = builtins.storePath \"{bb}\"; in\nrec {{\n");
        for node in &self.nodes {
            let deps: Vec<String> = node
                .inputs
                .iter()
                .map(|&(i, o)| match o {
                    "out" => self.nodes[i].attr.clone(),
                    o => format!("{}.{o}", self.nodes[i].attr),
                })
                .collect();
            let mut script = vec![
                "set -e".to_owned(),
                "for d in $deps; do cat $d > /dev/null; done".to_owned(),
            ];
            if !node.before.is_empty() {
                script.push(node.before.clone());
            }
            for o in node.outputs {
                script.push(format!("echo '{}' > ${o}", contents(&node.attr, o, salt)));
            }
            let outputs: Vec<String> = node.outputs.iter().map(|o| format!("{o:?}")).collect();
            text.push_str(&format!(
                "  {attr} = derivation {{\n    name = \"rs-{attr}-{salt}\";\n    \
                 system = \"x86_64-linux\";\n    builder = \"${{bb}}/bin/sh\";\n    \
                 PATH = \"${{bb}}/bin\";\n    outputs = [ {outputs} ];\n    \
                 deps = [ {deps} ];\n    args = [ \"-c\" {script:?} ];\n  }};\n",
                attr = node.attr,
                outputs = outputs.join(" "),
                deps = deps.join(" "),
                script = script.join("\n"),
            ));
        }
        text.push_str("}\n");
        text
    }

    /// Writes the expression into the client's scratch directory; returns its path and, from
    /// the client's evaluation, each node's paths by attribute.
    fn write(&self, s: &Setup, salt: &str) -> (PathBuf, BTreeMap<String, Paths>) {
        let file = s.nix.scratch().join(format!("graph-{salt}.nix"));
        std::fs::write(&file, self.expression(salt, &busybox())).expect("write the graph");
        let expr = format!(
            "builtins.mapAttrs (n: d: {{ drv = d.drvPath; outs = builtins.listToAttrs (map (o: \
             {{ name = o; value = d.${{o}}.outPath; }}) d.outputs); }}) (import {})",
            file.display()
        );
        let out = s.nix.ok(s
            .nix
            .command("nix-instantiate")
            .args(["--eval", "--strict", "--json", "-E", &expr]));
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        let paths = json
            .as_object()
            .expect("an object")
            .iter()
            .map(|(attr, v)| {
                let outs = v["outs"]
                    .as_object()
                    .expect("outs")
                    .iter()
                    .map(|(o, p)| (o.clone(), p.as_str().expect("a path").to_owned()))
                    .collect();
                let drv = v["drv"].as_str().expect("drvPath").to_owned();
                (attr.clone(), Paths { drv, outs })
            })
            .collect::<BTreeMap<_, _>>();
        assert_eq!(paths.len(), self.nodes.len());
        (file, paths)
    }
}

/// What output `o` of node `attr` holds.
fn contents(attr: &str, o: &str, salt: &str) -> String {
    format!("{attr} {o} {salt}")
}

/// `nix build --eval-store auto --no-link -f FILE ATTRS… [EXTRA…] --store <uri>` as alice.
fn nix_build(s: &Setup, file: &Path, attrs: &[&str], extra: &[&str]) -> Command {
    let file = file.to_str().expect("a UTF-8 path");
    let mut words = vec!["build", "--eval-store", "auto", "--no-link", "-f", file];
    words.extend(attrs);
    words.extend(extra);
    s.nix(ALICE, &words)
}

/// Waits until `done` holds of the daemon's log; the bound only turns a hang into a failure.
fn wait_for_log(s: &Setup, what: &str, done: impl Fn(&str) -> bool) -> String {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let log = s.server.daemon.log();
        if done(&log) {
            return log;
        }
        assert!(Instant::now() < until, "{what}: not in the log:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Checks that each of `built` (attributes) was built once for alice and finished `Built`,
/// each start after the end of each of its inputs' builds.
fn assert_built_once_in_order(
    g: &Graph,
    paths: &BTreeMap<String, Paths>,
    built: &[&str],
    events: &[BuildEvent],
    log: &str,
) {
    let position = |kind: Kind, drv: &str| {
        events
            .iter()
            .position(|e| e.kind == kind && e.drv == drv)
            .unwrap_or_else(|| panic!("no {kind:?} of {drv} in the log:\n{log}"))
    };
    for attr in built {
        let drv = &paths[*attr].drv;
        assert_eq!(
            starts_of(events, drv),
            1,
            "{attr} ({drv}) not built exactly once:\n{log}"
        );
        let start = position(Kind::Building, drv);
        assert_eq!(events[start].account, ALICE, "{attr}");
        let end = position(Kind::Finished, drv);
        assert!(end > start, "{attr}: finished before it started:\n{log}");
        assert_eq!(
            events[end].status.as_deref(),
            Some("Built"),
            "{attr} ({drv}) did not end Built:\n{log}"
        );
        for &(i, _) in &g.nodes[g.index(attr)].inputs {
            let input = &g.nodes[i].attr;
            let input_end = position(Kind::Finished, &paths[input].drv);
            assert!(
                input_end < start,
                "{attr} started before its input {input} finished:\n{log}"
            );
        }
    }
}

/// The attributes of every node of `g`.
fn attrs(g: &Graph) -> Vec<&str> {
    g.nodes.iter().map(|n| n.attr.as_str()).collect()
}

/// (a) and (b) in one client command: the chain of 20 and the 50-node diamond, selecting
/// outputs of the diamond's top; then the requested outputs, and only they, come back.
fn chain_and_diamond(client: Client, way: Way) {
    let s = Setup::new(client, way);
    let salt = salt();
    let mut g = Graph::default();
    let chain = g.chain("c", 20, "");
    let top = g.diamond("d", &[1, 4, 8, 12, 12, 8, 4, 1]);
    assert_eq!(g.nodes.len(), 70);
    let (file, paths) = g.write(&s, &salt);
    let (chain, top) = (g.nodes[chain].attr.clone(), g.nodes[top].attr.clone());
    // Nix 2.8 reads `top.dev` as the derivation's `dev` output; the newer clients take a
    // list of outputs after `^`.
    let (diamond_attr, top_outputs) = if client == Client::Host {
        (format!("{top}.dev"), vec!["dev"])
    } else {
        (format!("{top}^dev,doc"), vec!["dev", "doc"])
    };
    let started = Instant::now();
    must(
        &s,
        "nix build of the chain and the diamond",
        &mut nix_build(&s, &file, &[&chain, &diamond_attr], &[]),
    );
    let took = started.elapsed();

    let log = s.server.daemon.log();
    let events = build_events(&log);
    assert_built_once_in_order(&g, &paths, &attrs(&g), &events, &log);
    assert!(
        sent_nars(&log).is_empty(),
        "the build sent NARs to the client:\n{log}"
    );

    // The requested outputs come back; nothing else was sent.
    let mut requested = vec![(chain.as_str(), "out")];
    requested.extend(top_outputs.iter().map(|o| (top.as_str(), *o)));
    let wanted: BTreeSet<String> = requested
        .iter()
        .map(|(a, o)| paths[*a].outs[*o].clone())
        .collect();
    let uri = s.uri(ALICE);
    must(
        &s,
        "nix copy --from of the requested outputs",
        s.cmd(ALICE, "nix")
            .args(["copy", "--from", &uri])
            .args(&wanted),
    );
    for (a, o) in &requested {
        assert_eq!(
            read_client_file(client, &paths[*a].outs[*o]).trim(),
            contents(a, o, &salt)
        );
    }
    let log = wait_for_log(&s, "a sent NAR of each requested output", |log| {
        let sent: BTreeSet<String> = sent_nars(log).into_iter().collect();
        wanted.is_subset(&sent)
    });
    let sent: BTreeSet<String> = sent_nars(&log).into_iter().collect();
    assert_eq!(sent, wanted, "NARs sent other than the requested outputs");
    eprintln!(
        "{} ({:?}): 70 derivations built in {:.1} s",
        s.nix.version,
        s.way,
        took.as_secs_f64()
    );
    s.stop();
}

/// The graph of (c): `f` fails at once; `g` (on `f` and `a0`) and `h` (on `g`) depend on
/// it; `a0` (2 s) … `a3` and `b0`, `b1` (on `a0`) can succeed and mostly start after `f`
/// failed; `top` takes `a3`, `b1` and `h`.
fn failing_graph(salt: &str) -> Graph {
    let mut g = Graph::default();
    let a0 = g.add("a0", &["out"], vec![], "sleep 2");
    let a1 = g.add("a1", &["out"], vec![(a0, "out")], "");
    let a2 = g.add("a2", &["out"], vec![(a1, "out")], "");
    let a3 = g.add("a3", &["out"], vec![(a2, "out")], "");
    let f = g.add(
        "f",
        &["out"],
        vec![],
        &format!("echo 'f-{salt} about to fail'; exit 1"),
    );
    let gg = g.add("g", &["out"], vec![(f, "out"), (a0, "out")], "");
    let h = g.add("h", &["out"], vec![(gg, "out")], "");
    let b0 = g.add("b0", &["out"], vec![(a0, "out")], "");
    let b1 = g.add("b1", &["out"], vec![(b0, "out")], "");
    g.add(
        "top",
        &["out"],
        vec![(a3, "out"), (b1, "out"), (h, "out")],
        "",
    );
    g
}

/// (c): one failing node, with or without the client's `--keep-going`.
fn failing_node(client: Client, way: Way, keep_going: bool) {
    let s = Setup::new(client, way);
    let salt = salt();
    let g = failing_graph(&salt);
    let (file, paths) = g.write(&s, &salt);
    let extra: &[&str] = if keep_going { &["--keep-going"] } else { &[] };
    let out = run(&mut nix_build(&s, &file, &["top"], extra));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let log = s.server.daemon.log();
    assert!(
        !out.status.success(),
        "{} ({:?}): the build of a failing graph succeeded:\n{stderr}",
        s.nix.version,
        s.way
    );
    let events = build_events(&log);
    let can_succeed = ["a0", "a1", "a2", "a3", "b0", "b1"];
    assert_built_once_in_order(&g, &paths, &can_succeed, &events, &log);
    let f = &paths["f"].drv;
    assert_eq!(starts_of(&events, f), 1, "f:\n{log}");
    let f_end = events
        .iter()
        .position(|e| e.kind == Kind::Finished && e.drv == *f)
        .unwrap_or_else(|| panic!("f did not finish:\n{log}"));
    assert_ne!(events[f_end].status.as_deref(), Some("Built"), "{log}");
    for attr in ["g", "h", "top"] {
        assert_eq!(
            starts_of(&events, &paths[attr].drv),
            0,
            "{attr} depends on the failed f, yet it was built:\n{log}"
        );
    }
    // a1 waits for a0's 2 s, f fails at once: builds went on starting after the failure.
    assert!(
        events[f_end..].iter().any(|e| e.kind == Kind::Building),
        "no build started after f failed: the server did not keep going:\n{log}"
    );
    assert!(sent_nars(&log).is_empty(), "NARs sent:\n{log}");

    // The `.drv` files are on the server now: QueryMissing says what is left to build.
    let dry_run = must(
        &s,
        "nix build --dry-run",
        &mut nix_build(&s, &file, &["top"], &["--dry-run"]),
    );
    let listing = String::from_utf8_lossy(&dry_run.stderr);
    for (attr, p) in &paths {
        let listed = listing.contains(&p.drv);
        let missing = ["f", "g", "h", "top"].contains(&attr.as_str());
        assert_eq!(
            listed, missing,
            "{} ({:?}): {attr} ({}) listed by --dry-run: {listed}, expected {missing}:\n{listing}",
            s.nix.version, s.way, p.drv
        );
    }
    assert_eq!(
        build_events(&s.server.daemon.log())
            .iter()
            .filter(|e| e.kind == Kind::Building)
            .count(),
        can_succeed.len() + 1,
        "the dry run built something"
    );
    // Last, so that a failure here says that everything else held: as with Nix's own daemon,
    // the client shows the failed builder and its log's tail, not only the dependent's
    // "dependency … failed".
    assert!(
        stderr.contains(&format!("builder for '{f}' failed"))
            && stderr.contains(&format!("f-{salt} about to fail")),
        "{} ({:?}): the client's error does not show the failed build and its log:\n{stderr}\n\
         daemon log:\n{log}",
        s.nix.version,
        s.way
    );
    s.stop();
}

/// The tests of one client and way in.
macro_rules! suite {
    ($module:ident, $client:ident, $way:ident) => {
        mod $module {
            use super::*;

            #[test]
            fn a_chain_of_20_and_a_diamond_of_50_with_selected_outputs() {
                chain_and_diamond(Client::$client, Way::$way);
            }

            #[test]
            fn a_failing_node_without_keep_going() {
                failing_node(Client::$client, Way::$way, false);
            }

            #[test]
            fn a_failing_node_with_keep_going() {
                failing_node(Client::$client, Way::$way, true);
            }
        }
    };
}

suite!(nix_2_8_host_relay, Host, Relay);
suite!(nix_2_8_host_ssh, Host, Ssh);
suite!(nix_2_26_trixie_relay, Trixie, Relay);
suite!(nix_2_26_trixie_ssh, Trixie, Ssh);
suite!(nix_2_34_sid_relay, Sid, Relay);
suite!(nix_2_34_sid_ssh, Sid, Ssh);

/// (d): 200 leaves under one top, on a server with the host's cores (its default capacity,
/// as its log states it): from the log, never more builds (nor cores granted) at once than
/// it has, and more than one at a time when it has more than one.
#[test]
fn two_hundred_derivations_never_run_on_more_than_the_cores() {
    let s = Setup::new(Client::Host, Way::Relay);
    let capacity = records(&s.server.daemon.log())
        .into_iter()
        .find(|r| r.contains(" build capacity "))
        .unwrap_or_else(|| panic!("no build capacity in the log:\n{}", s.server.daemon.log()));
    let number = |key: &str| -> u32 {
        field(&capacity, key)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key}= in {capacity}"))
    };
    let (cores, max_jobs) = (number("cores"), number("max_jobs"));
    let salt = salt();
    let mut g = Graph::default();
    let leaves: Vec<(usize, &str)> = (0..200)
        .map(|i| (g.add(&format!("l{i}"), &["out"], vec![], ""), "out"))
        .collect();
    g.add("top", &["out"], leaves, "");
    let (file, paths) = g.write(&s, &salt);
    let started = Instant::now();
    must(
        &s,
        "nix build of 200 leaves",
        &mut nix_build(&s, &file, &["top"], &[]),
    );
    let took = started.elapsed();
    let log = s.server.daemon.log();
    let events = build_events(&log);
    assert_built_once_in_order(&g, &paths, &attrs(&g), &events, &log);
    for e in events.iter().filter(|e| e.kind == Kind::Building) {
        assert!(
            e.cores.is_some(),
            "no cores= in the start of {}:\n{log}",
            e.drv
        );
    }
    let (builds, granted) = most_at_once(&events);
    assert!(
        builds <= max_jobs as usize && granted <= cores,
        "{builds} builds on {granted} cores at once, on a server of {cores} cores and \
         {max_jobs} jobs:\n{log}"
    );
    if cores > 1 && max_jobs > 1 {
        assert!(builds > 1, "the leaves were built one at a time:\n{log}");
    }
    eprintln!(
        "201 derivations in {:.1} s, at most {builds} at once on {cores} cores",
        took.as_secs_f64()
    );
    s.stop();
}

/// (e): the client killed while the graph builds, on a server of two job slots: the two
/// running builds are killed, the one waiting for a slot never starts, nothing is
/// half-registered, and the same command again builds only what was missing.
#[test]
fn a_client_killed_mid_graph_leaves_nothing_running_and_a_rerun_builds_the_rest() {
    let s = Setup::with_config(
        Client::Host,
        Way::Relay,
        "[capacity]\ncores = 2\nmax_jobs = 2\n",
    );
    let salt = salt();
    let mut g = Graph::default();
    let quick: Vec<(usize, &str)> = (0..4)
        .map(|i| (g.add(&format!("q{i}"), &["out"], vec![], ""), "out"))
        .collect();
    let slow: Vec<(usize, &str)> = (0..3)
        .map(|i| {
            (
                g.add(&format!("s{i}"), &["out"], quick.clone(), "sleep 3"),
                "out",
            )
        })
        .collect();
    g.add("top", &["out"], slow, "");
    let (file, paths) = g.write(&s, &salt);
    let scratch = s.nix.scratch();
    let output = |name: &str| File::create(scratch.join(name)).expect("create a client log");
    let mut client = nix_build(&s, &file, &["top"], &[])
        .stdout(Stdio::from(output("killed.out")))
        .stderr(Stdio::from(output("killed.err")))
        .spawn()
        .expect("spawn nix build");
    let slow_attrs = ["s0", "s1", "s2"];
    let slow_starts = |events: &[BuildEvent]| -> Vec<usize> {
        slow_attrs
            .iter()
            .map(|a| starts_of(events, &paths[*a].drv))
            .collect()
    };
    // Both slots taken by slow builds (the quick ones are over: they are the slow ones'
    // inputs); the third slow build waits.
    wait_for_log(&s, "two slow builds running", |log| {
        slow_starts(&build_events(log)).iter().sum::<usize>() == 2
    });
    client.kill().expect("kill the client");
    let _ = client.wait();

    harness::assert_no_build_left(&s.server.daemon);
    // Every build the graph had submitted has ended (killed, or cancelled while it waited).
    let log = wait_for_log(&s, "the end of each submitted build", |log| {
        let events = build_events(log);
        events.iter().filter(|e| e.kind == Kind::Queued).all(|q| {
            events
                .iter()
                .any(|e| e.kind == Kind::Finished && e.drv == q.drv)
        })
    });
    assert!(
        log.contains("no client waits for the build any more"),
        "the server did not kill the builds no one waits for:\n{log}"
    );
    let events = build_events(&log);
    let quick_attrs = ["q0", "q1", "q2", "q3"];
    assert_built_once_in_order(&g, &paths, &quick_attrs, &events, &log);
    let first = slow_starts(&events);
    assert_eq!(
        first.iter().sum::<usize>(),
        2,
        "the waiting slow build started after the client had gone:\n{log}"
    );
    for attr in slow_attrs {
        let drv = &paths[attr].drv;
        let ended = events
            .iter()
            .filter(|e| e.kind == Kind::Finished && e.drv == *drv)
            .all(|e| e.status.as_deref() != Some("Built"));
        assert!(ended, "{attr} was built for a client that had gone:\n{log}");
    }
    assert_eq!(starts_of(&events, &paths["top"].drv), 0, "{log}");
    // Nothing half-registered: no import or build left in tmp/, no object without its row,
    // and only the finished outputs valid.
    let state = s.server.daemon.state_dir();
    assert!(
        s.server.daemon.snapshot().tmp.is_empty(),
        "left in tmp/ after the kill"
    );
    let orphans = harness::orphan_objects(&state);
    assert!(orphans.is_empty(), "objects without a row: {orphans:?}");
    let valid = |attr: &str| {
        run(&mut s.nix(ALICE, &["path-info", &paths[attr].outs["out"]]))
            .status
            .success()
    };
    for attr in quick_attrs {
        assert!(valid(attr), "{attr}'s output is not valid on the server");
    }
    for attr in slow_attrs.iter().chain(&["top"]) {
        assert!(
            !valid(attr),
            "{attr}'s output is valid, yet it was not built"
        );
    }

    must(
        &s,
        "the same nix build again",
        &mut nix_build(&s, &file, &["top"], &[]),
    );
    let log = s.server.daemon.log();
    let events = build_events(&log);
    for attr in quick_attrs {
        assert_eq!(
            starts_of(&events, &paths[attr].drv),
            1,
            "{attr} was built again:\n{log}"
        );
    }
    let again: Vec<usize> = slow_starts(&events)
        .iter()
        .zip(&first)
        .map(|(all, before)| all - before)
        .collect();
    assert_eq!(again, [1, 1, 1], "slow builds of the rerun:\n{log}");
    assert_eq!(starts_of(&events, &paths["top"].drv), 1, "top:\n{log}");
    assert!(valid("top"), "top's output is not valid after the rerun");
    s.stop();
}
