//! The operations interface end to end: `ssh HOST nixbuild <subcommand>` with the real
//! OpenSSH client (host key pinned) against builds sent by the real Nix 2.8 over the same
//! SSH server. A finished, a failed, a running and a queued build are seen by every
//! subcommand in text and JSON; `log` is what the client printed; `cancel` ends the running
//! build and its client says why; another account sees none of it; an admin sees all; and
//! every argument an attacker can send gets a clear refusal while the server goes on.

#[path = "../nixbuild-core/tests/common/mod.rs"]
mod common;
mod harness;
mod lab;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use harness::clients::{Client, ClientNix};
use harness::ssh::{ok, run, Key, SshServer};
use lab::Lab;
use serde_json::Value;

const CONFIG: &str = "[admin]\naccounts = [\"ops\"]\n\n[accounts.alice]\nmax_running_builds = 1\n";

const DERIVATIONS: &str = r#"{
  ok = mk "ops-ok" "echo hello from the ok build; echo $SALT > $out" { SALT = salt; };
  fail = mk "ops-fail" "echo about to fail; exit 3" {};
  slow = mk "ops-slow" "echo slow build started; sleep 120; echo done > $out" {};
  queued = mk "ops-queued" "echo queued build ran; echo q > $out" {};
}"#;

/// Paths copied from the server carry no signatures.
const CLIENT_CONF: &str = "require-sigs = false\n";

struct Setup {
    server: SshServer,
    lab: Lab,
    /// The ssh config of each account, by name.
    configs: Vec<(&'static str, PathBuf)>,
}

impl Setup {
    fn new() -> Setup {
        let client = tempfile::tempdir().expect("temp dir");
        let keys: Vec<(&'static str, Key)> = ["alice", "bob", "ops"]
            .into_iter()
            .map(|a| {
                (
                    a,
                    SshServer::key(client.path(), &format!("id_{a}"), "ed25519", a),
                )
            })
            .collect();
        let server = SshServer::start(
            CONFIG,
            client,
            &keys.iter().map(|(_, k)| k).collect::<Vec<_>>(),
        );
        let configs = keys
            .iter()
            .map(|(a, k)| (*a, server.ssh_config(&format!("nixbuild-{a}"), k)))
            .collect();
        let lab = Lab::with_conf(DERIVATIONS, CLIENT_CONF);
        Setup {
            server,
            lab,
            configs,
        }
    }

    fn config(&self, account: &str) -> &Path {
        &self
            .configs
            .iter()
            .find(|(a, _)| *a == account)
            .expect("an account")
            .1
    }

    /// `ssh … nixbuild WORDS` as `account`.
    fn nixbuild(&self, account: &str, words: &[&str]) -> Output {
        let mut command = vec!["nixbuild"];
        command.extend_from_slice(words);
        run(&mut SshServer::ssh(
            self.config(account),
            &format!("nixbuild-{account}"),
            &command,
        ))
    }

    /// Like [`Setup::nixbuild`], which must succeed; its stdout.
    fn text(&self, account: &str, words: &[&str]) -> String {
        let out = self.nixbuild(account, words);
        assert!(
            out.status.success(),
            "nixbuild {words:?} as {account}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("UTF-8 output")
    }

    /// `nixbuild WORDS --json` as `account`, parsed, checked for the schema's version.
    fn json(&self, account: &str, words: &[&str]) -> Value {
        let mut words = words.to_vec();
        words.push("--json");
        let v: Value = serde_json::from_str(&self.text(account, &words)).expect("JSON");
        assert_eq!(v["version"], 1, "{v}");
        v
    }

    /// `nix-build DRV` as alice through the SSH server with the README's builders line.
    fn build(&self, drv: &str) -> Command {
        self.build_as("alice", &self.lab, drv)
    }

    /// `nix-build DRV` from `lab`'s client as `account`.
    fn build_as(&self, account: &str, lab: &Lab, drv: &str) -> Command {
        let mut cmd = lab.nix.command("nix-build");
        cmd.env(
            "NIX_SSHOPTS",
            format!("-F {}", self.config(account).display()),
        )
        .args(["--max-jobs", "0", "--no-out-link", "--builders"])
        .arg(format!(
            "ssh://nixbuild-{account} x86_64-linux - 100 1 big-parallel,benchmark"
        ))
        .arg(drv);
        cmd
    }

    /// Alice's builds as `builds --json` lists them.
    fn builds(&self, account: &str, extra: &[&str]) -> Vec<Value> {
        let mut words = vec!["builds"];
        words.extend_from_slice(extra);
        let v = self.json(account, &words);
        assert_eq!(v["kind"], "builds");
        v["builds"].as_array().expect("a list").clone()
    }

    /// Waits until alice's build of `drv` satisfies `ready`; returns it.
    fn wait_for(&self, drv: &str, what: &str, ready: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(b) = self
                .builds("alice", &[])
                .into_iter()
                .find(|b| b["drv"] == drv && ready(b))
            {
                return b;
            }
            assert!(Instant::now() < deadline, "{drv} never {what}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn spawn(mut cmd: Command) -> Child {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn")
}

fn id(build: &Value) -> String {
    build["id"].as_u64().expect("an id").to_string()
}

#[test]
fn builds_logs_cancel_and_accounts_over_ssh() {
    let s = Setup::new();
    let drvs = s.lab.instantiate(&["ok", "fail", "slow", "queued"]);
    let (ok_drv, fail_drv, slow_drv, queued_drv) = (&drvs[0], &drvs[1], &drvs[2], &drvs[3]);

    // A finished and a failed build.
    let ok_out = ok(&mut s.build(ok_drv));
    let fail_out = run(&mut s.build(fail_drv));
    assert!(!fail_out.status.success());
    // A running one, and one queued behind it (alice may run one build at a time).
    let slow = spawn(s.build(slow_drv));
    // Running, with its CPU time and peak memory so far read from its cgroup.
    let running = s.wait_for(slow_drv, "ran", |b| {
        b["state"] == "running"
            && b["cpu_seconds"].as_f64().is_some()
            && b["peak_memory_bytes"].as_u64().is_some_and(|m| m > 0)
    });
    let queued = spawn(s.build(queued_drv));
    let waiting = s.wait_for(queued_drv, "waited", |b| b["state"] == "waiting");
    assert!(
        waiting["waiting_for"]
            .as_str()
            .is_some_and(|w| w.contains("max_running_builds")),
        "{waiting}"
    );

    // builds: all four, newest first, in JSON and as text.
    let list = s.builds("alice", &[]);
    let finished = list
        .iter()
        .find(|b| b["drv"] == *ok_drv)
        .expect("the ok build");
    let failed = list
        .iter()
        .find(|b| b["drv"] == *fail_drv)
        .expect("the failed build");
    assert_eq!(finished["status"], "Built", "{finished}");
    assert_eq!(failed["status"], "PermanentFailure", "{failed}");
    assert_eq!(finished["accounts"], serde_json::json!(["alice"]));
    assert!(
        finished["cores"].as_u64().is_some_and(|c| c >= 1),
        "{finished}"
    );
    assert!(finished["cpu_seconds"].as_f64().is_some(), "{finished}");
    assert!(
        finished["peak_memory_bytes"]
            .as_u64()
            .is_some_and(|m| m > 0),
        "{finished}"
    );
    assert!(running["cpus"].as_str().is_some(), "{running}");
    let ids: Vec<u64> = list.iter().map(|b| b["id"].as_u64().expect("id")).collect();
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "newest first: {ids:?}");
    let text = s.text("alice", &["builds"]);
    for (b, word) in [
        (finished, "Built"),
        (failed, "PermanentFailure"),
        (&running, "running"),
        (&waiting, "waiting"),
    ] {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{} ", id(b))))
            .unwrap_or_else(|| panic!("no line for {b} in\n{text}"));
        assert!(line.contains(word), "{line}");
    }
    assert!(
        text.contains("max_running_builds"),
        "the queued build's reason:\n{text}"
    );

    // show, by id and by derivation.
    let shown = s.json("alice", &["show", &id(failed)]);
    assert_eq!(shown["kind"], "build");
    assert!(
        shown["build"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("exit")),
        "{shown}"
    );
    let by_drv = s.json("alice", &["show", ok_drv]);
    assert_eq!(by_drv["build"]["id"], finished["id"]);
    let text = s.text("alice", &["show", &id(finished)]);
    assert!(text.contains("state:          Built"), "{text}");
    let text = s.text("alice", &["show", &id(&waiting)]);
    assert!(text.contains("waiting for:"), "{text}");

    // log: what the client printed, in text and JSON.
    let log = s.text("alice", &["log", &id(finished)]);
    assert!(log.contains("hello from the ok build"), "{log}");
    let client = String::from_utf8_lossy(&ok_out.stderr);
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        assert!(
            client.contains(line),
            "{line:?} not in what the client printed:\n{client}"
        );
    }
    let fail_log = s.json("alice", &["log", &id(failed)]);
    assert!(fail_log["log"]
        .as_str()
        .is_some_and(|l| l.contains("about to fail")));
    assert_eq!(fail_log["complete"], true);

    // log --follow of the running build, then cancel it: the follower ends, the client says
    // why.
    let follower = spawn(SshServer::ssh(
        s.config("alice"),
        "nixbuild-alice",
        &["nixbuild", "log", &id(&running), "--follow"],
    ));
    std::thread::sleep(Duration::from_millis(500));
    // Not bob's to cancel, nor to see.
    let refused = s.nixbuild("bob", &["cancel", &id(&running)]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("no build"),
        "{refused:?}"
    );
    let cancelled = s.json("alice", &["cancel", &id(&running)]);
    assert_eq!(cancelled["kind"], "cancelled");
    let followed = follower.wait_with_output().expect("wait");
    assert!(followed.status.success(), "{followed:?}");
    let followed = String::from_utf8_lossy(&followed.stdout);
    assert!(followed.contains("slow build started"), "{followed}");
    let slow_out = slow.wait_with_output().expect("wait");
    assert!(!slow_out.status.success());
    let said = String::from_utf8_lossy(&slow_out.stderr);
    assert!(
        said.contains("cancelled by account alice (nixbuild cancel"),
        "{said}"
    );
    // The queued build runs once the slow one is gone.
    let queued_out = queued.wait_with_output().expect("wait");
    assert!(
        queued_out.status.success(),
        "{}",
        String::from_utf8_lossy(&queued_out.stderr)
    );
    let done = s.wait_for(queued_drv, "finished", |b| b["status"] == "Built");
    let cancelled = s.wait_for(slow_drv, "was recorded", |b| b["state"] == "finished");
    assert_eq!(cancelled["status"], "MiscFailure");
    assert!(done["started_ms"].as_u64() >= cancelled["ended_ms"].as_u64().map(|e| e - 1000));

    // Account bob sees none of it.
    assert!(s.builds("bob", &[]).is_empty());
    for words in [
        vec!["show", &id(finished)],
        vec!["log", &id(finished)],
        vec!["show", ok_drv.as_str()],
    ] {
        let out = s.nixbuild("bob", &words);
        assert_eq!(out.status.code(), Some(1), "{words:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("no build"),
            "{out:?}"
        );
    }
    assert_eq!(s.json("bob", &["paths"])["paths"], serde_json::json!([]));
    for words in [["builds", "--all"], ["builds", "--account"]] {
        let out = s.nixbuild("bob", &words);
        assert!(!out.status.success(), "{words:?}");
    }
    let out = s.nixbuild("bob", &["builds", "--account", "alice"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("only admins"),
        "{out:?}"
    );

    // whoami, usage and paths for alice.
    let me = s.json("alice", &["whoami"]);
    assert_eq!(me["account"], "alice");
    assert!(
        me["key"].as_str().is_some_and(|k| k.starts_with("SHA256:")),
        "{me}"
    );
    assert_eq!(me["max_running_builds"], 1);
    assert_eq!(me["admin"], false);
    let usage = s.json("alice", &["usage", "--since", "1d"]);
    let days = usage["days"].as_array().expect("days");
    let builds: u64 = days
        .iter()
        .map(|d| d["builds"].as_u64().expect("builds"))
        .sum();
    let failed_n: u64 = days
        .iter()
        .map(|d| d["failed"].as_u64().expect("failed"))
        .sum();
    assert_eq!((builds, failed_n), (4, 2), "{usage}");
    let uploaded: u64 = days
        .iter()
        .map(|d| d["uploaded_bytes"].as_u64().expect("up"))
        .sum();
    let downloaded: u64 = days
        .iter()
        .map(|d| d["downloaded_bytes"].as_u64().expect("down"))
        .sum();
    assert!(uploaded > 0 && downloaded > 0, "{usage}");
    assert!(s.text("alice", &["usage"]).contains("BUILDS"));
    let ok_path = String::from_utf8_lossy(&ok_out.stdout).trim().to_owned();
    let paths = s.json("alice", &["paths"]);
    assert!(
        paths["paths"]
            .as_array()
            .expect("paths")
            .iter()
            .any(|p| p["path"] == ok_path),
        "{paths}"
    );
    assert!(s.text("alice", &["paths"]).contains(&ok_path));

    // The admin sees everyone's, and the server's state.
    let all = s.builds("ops", &["--all"]);
    assert!(all.iter().any(|b| b["drv"] == *ok_drv), "{all:?}");
    assert!(s.builds("ops", &[]).is_empty(), "ops's own builds: none");
    let as_alice = s.builds("ops", &["--account", "alice"]);
    assert_eq!(as_alice.len(), 4);
    let log = s.text("ops", &["log", &id(finished), "--all"]);
    assert!(log.contains("hello from the ok build"));
    let accounts = s.json("ops", &["accounts"]);
    let alice = accounts["accounts"]
        .as_array()
        .expect("accounts")
        .iter()
        .find(|a| a["account"] == "alice")
        .expect("alice")
        .clone();
    assert!(alice["paths"].as_u64().is_some_and(|p| p >= 2), "{alice}");
    let status = s.json("ops", &["status"]);
    assert!(status["cores"].as_u64().is_some_and(|c| c >= 1), "{status}");
    assert_eq!(status["builds_running"], 0);
    assert!(s.text("ops", &["status"]).contains("capacity:"));
    let gc = s.json("ops", &["gc"]);
    assert_eq!(gc["kind"], "collected");
    s.server
        .daemon
        .wait_for_log(&["collection done", "requested (nixbuild gc)"]);
    for admin_only in ["accounts", "gc", "status"] {
        let out = s.nixbuild("alice", &[admin_only]);
        assert_eq!(out.status.code(), Some(1), "{admin_only}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("only admins"));
    }
    s.server.daemon.stop();
}

/// A build two accounts' requests share, one from the host's Nix 2.8 over `ssh://`, the
/// other from Nix 2.34 over `ssh-ng://`: neither account may cancel it (it would end the
/// other's), an admin may, and both clients then say who did.
#[test]
fn only_an_admin_cancels_a_build_two_accounts_share() {
    let s = Setup::new();
    let salt = common::Nix::salt();
    let script = "echo shared build started; sleep 120; echo done > $out";
    let clients = [
        ("alice", ClientNix::new(Client::Host, ""), "ssh"),
        ("bob", ClientNix::new(Client::Sid, ""), "ssh-ng"),
    ];
    let drvs: Vec<String> = clients
        .iter()
        .map(|(_, nix, _)| nix.instantiate(&nix.derivation("ops-shared", &salt, script)))
        .collect();
    assert_eq!(drvs[0], drvs[1], "the same derivation for both");
    let drv = &drvs[0];
    let mut running = Value::Null;
    let mut children = Vec::new();
    for (account, nix, scheme) in &clients {
        let mut cmd = nix.over_ssh(s.config(account), "nix-build");
        cmd.args(["--max-jobs", "0", "--no-out-link", "--builders"])
            .arg(format!(
                "{scheme}://nixbuild-{account} x86_64-linux - 100 1 big-parallel,benchmark"
            ))
            .arg(drv);
        children.push(spawn(cmd));
        // Alice's view: running, and shared once bob's request joined.
        let joined = account == &"bob";
        running = s.wait_for(drv, "ran", |b| {
            b["state"] == "running" && b["shared"] == joined
        });
    }
    // Each account's view names itself only; the admin's names both.
    assert_eq!(running["accounts"], serde_json::json!(["alice"]));
    let bobs = &s.builds("bob", &[])[0];
    assert_eq!(bobs["accounts"], serde_json::json!(["bob"]));
    assert_eq!(bobs["shared"], true);
    let all = s.builds("ops", &["--all"]);
    assert_eq!(
        all[0]["accounts"],
        serde_json::json!(["alice", "bob"]),
        "one shared build"
    );
    assert_eq!(all[0]["id"], running["id"]);
    assert_eq!(s.builds("bob", &[])[0]["id"], running["id"]);
    for account in ["alice", "bob"] {
        let out = s.nixbuild(account, &["cancel", &id(&running)]);
        assert_eq!(out.status.code(), Some(1), "{account}");
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(said.contains("only an admin may cancel it"), "{said}");
    }
    s.json("ops", &["cancel", &id(&running)]);
    for child in children {
        let out = child.wait_with_output().expect("wait");
        assert!(!out.status.success());
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            said.contains("cancelled by admin ops (nixbuild cancel"),
            "{said}"
        );
    }
    s.server.daemon.stop();
}

/// Every argument an attacker can send: each gets a clear refusal (exit status 2 for words
/// that are no command, 1 for what is not found or not allowed) and the server goes on.
#[test]
fn hostile_arguments_are_refused_and_the_server_goes_on() {
    let s = Setup::new();
    let drvs = s.lab.instantiate(&["ok"]);
    ok(&mut s.build(&drvs[0]));
    let alice_build = id(&s.builds("alice", &[])[0]);
    let huge = "9".repeat(3000);
    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (vec!["frobnicate"], 2, "unknown subcommand"),
        (vec!["show"], 2, "needs a build id"),
        (vec!["show", "0"], 1, "no build 0"),
        (vec!["show", "18446744073709551615"], 1, "no build"),
        (
            vec!["show", "18446744073709551616"],
            2,
            "neither a build id",
        ),
        (vec!["show", "-5"], 2, "does not take"),
        (vec!["show", "../../../etc/shadow"], 2, "neither a build id"),
        (vec!["show", &huge], 2, "neither a build id"),
        (vec!["log", &alice_build], 1, "no build"),
        (vec!["show", &alice_build], 1, "no build"),
        (vec!["show", &drvs[0]], 1, "no build"),
        (vec!["cancel", &alice_build], 1, "no build"),
        (
            vec!["builds", "--max", "99999999999999999999"],
            2,
            "--max takes",
        ),
        (
            vec!["usage", "--since", "99999999999999999999d"],
            2,
            "--since takes",
        ),
        (vec!["builds", "--account", "alice"], 1, "only admins"),
        (vec!["paths", "--all"], 1, "only admins"),
        (vec!["gc"], 1, "only admins"),
        (vec!["builds", "--account", "../alice"], 2, "account name"),
    ];
    for (words, status, needle) in &cases {
        let out = s.nixbuild("bob", words);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(*status), "{words:?}: {stderr}");
        assert!(stderr.contains(needle), "{words:?}: {stderr}");
        assert!(stderr.len() < 600, "{words:?}: a bounded message: {stderr}");
    }
    // The server served them all and serves on.
    assert_eq!(
        s.json("alice", &["show", &alice_build])["build"]["status"],
        "Built"
    );
    let log = s.server.daemon.log();
    assert!(!log.contains("panicked"), "{log}");
    s.server.daemon.stop();
}

/// `--log-format json`: every line of the daemon's log is a JSON object, and a build's lines
/// carry the spans of its session and its build id (the id `nixbuild builds` shows).
#[test]
fn json_logs_carry_the_session_and_build_ids() {
    let lab = Lab::new(r#"{ one = mk "json-log" "echo $SALT > $out" { SALT = salt; }; }"#);
    let d = harness::Daemon::start_with_config("", &["--log-format", "json"]);
    let drvs = lab.instantiate(&["one"]);
    lab.remote_build_ok(&d, "alice", &drvs);
    d.wait_for_log(&["build finished"]);
    let lines: Vec<Value> = d
        .log()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let finished = lines
        .iter()
        .find(|l| {
            l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("build finished"))
        })
        .expect("a build finished line");
    assert_eq!(finished["fields"]["account"], "alice", "{finished}");
    let spans = finished["spans"].as_array().expect("spans");
    let span = |name: &str| spans.iter().find(|s| s["name"] == name).cloned();
    assert!(
        span("relay").and_then(|s| s["session"].as_u64()).is_some(),
        "{finished}"
    );
    let id = span("build")
        .and_then(|s| s["id"].as_u64())
        .expect("the build's id");
    let record: i64 = rusqlite::Connection::open(d.state_dir().join("db.sqlite"))
        .expect("open")
        .query_row(
            "SELECT build FROM builds WHERE account = 'alice'",
            [],
            |r| r.get(0),
        )
        .expect("the record");
    assert_eq!(id, record as u64);
    let started = lines
        .iter()
        .find(|l| l["fields"]["message"] == "session start")
        .expect("a session start line");
    assert!(started["span"]["session"].as_u64().is_some(), "{started}");
    d.stop();
}

/// Behind OpenSSH with a forced command (`command="nixbuild-serve --account alice"`), the
/// client's `nixbuild …` arrives in `SSH_ORIGINAL_COMMAND`; the relay passes it to the
/// daemon, which answers as for its own SSH server, as the forced command's account.
#[test]
fn a_forced_command_relays_nixbuild_commands() {
    let lab = Lab::new(
        r#"{ one = mk "ops-relayed" "echo relayed build; echo $SALT > $out" { SALT = salt; }; }"#,
    );
    let d = harness::Daemon::start_with_config(CONFIG, &[]);
    let drvs = lab.instantiate(&["one"]);
    lab.remote_build_ok(&d, "alice", &drvs);
    let relayed = |account: &str, command: &str| {
        run(Command::new(harness::example_bin("nixbuild-serve"))
            .arg("--state-dir")
            .arg(d.state_dir())
            .args(["--account", account])
            .env("SSH_ORIGINAL_COMMAND", command)
            .stdin(Stdio::null()))
    };
    let out = relayed("alice", "nixbuild builds --json");
    assert!(out.status.success(), "{out:?}");
    let builds: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let build = &builds["builds"][0];
    assert_eq!(build["drv"], drvs[0]);
    assert_eq!(build["status"], "Built");
    let log = relayed("alice", &format!("nixbuild log {}", id(build)));
    assert!(
        String::from_utf8_lossy(&log.stdout).contains("relayed build"),
        "{log:?}"
    );
    let me: Value =
        serde_json::from_slice(&relayed("alice", "nixbuild whoami --json").stdout).expect("JSON");
    assert_eq!(me["account"], "alice");
    assert!(
        me["key"].as_str().is_some_and(|k| k.contains("OpenSSH")),
        "{me}"
    );
    // The forced command's account, never another.
    let theirs = relayed("bob", &format!("nixbuild show {}", id(build)));
    assert_eq!(theirs.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&theirs.stderr).contains("no build"));
    let all = relayed("bob", "nixbuild builds --all");
    assert!(
        String::from_utf8_lossy(&all.stderr).contains("only admins"),
        "{all:?}"
    );
    let shell = relayed("alice", "nixbuild builds; rm -rf /");
    assert_eq!(shell.status.code(), Some(2), "{shell:?}");
    assert!(
        String::from_utf8_lossy(&shell.stderr).contains("shell syntax"),
        "{shell:?}"
    );
    let long = relayed("alice", &format!("nixbuild show {}", "1".repeat(5000)));
    assert!(!long.status.success());
    assert!(
        String::from_utf8_lossy(&long.stderr).contains("longer than"),
        "{long:?}"
    );
    let ops = relayed("ops", "nixbuild builds --all --json");
    let all: Value = serde_json::from_slice(&ops.stdout).expect("JSON");
    assert_eq!(all["builds"][0]["id"], build["id"]);
    d.stop();
}
