//! The metrics end to end: a real Prometheus (Debian's `prometheus`, installed by the test
//! command) scrapes the daemon's `/metrics` every second while the real Nix 2.8 builds
//! through it; its HTTP API then has the right build counters and queue gauges, and
//! `promtool check metrics` passes on the raw exposition.

#[path = "../nixbuild-core/tests/common/mod.rs"]
mod common;
mod harness;
mod lab;

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use harness::{free_port, http_get, Daemon};
use lab::{builders, Lab};
use serde_json::Value;

/// A Prometheus scraping `target` every second, with its data in `dir`.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
}

impl Prometheus {
    fn start(dir: &std::path::Path, target: SocketAddr) -> Prometheus {
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: nixbuild\n    static_configs:\n      \
                 - targets: ['{target}']\n"
            ),
        )
        .expect("write prometheus.yml");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("log file");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("run prometheus (Debian's prometheus package; the test command installs it)");
        let p = Prometheus { child, addr };
        p.until("ready", || {
            http_get(p.addr, "/-/ready").is_some_and(|(code, _)| code == 200)
        });
        p
    }

    /// The value of the instant query `query`, if it has exactly one sample.
    fn value(&self, query: &str) -> Option<f64> {
        let encoded: String = query
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        let (code, body) = http_get(self.addr, &format!("/api/v1/query?query={encoded}"))?;
        if code != 200 {
            return None;
        }
        let v: Value = serde_json::from_str(&body).ok()?;
        let result = v["data"]["result"].as_array()?;
        match result.as_slice() {
            [one] => one["value"][1].as_str()?.parse().ok(),
            _ => None,
        }
    }

    /// Waits (up to a minute) until `query` has the value `expected`.
    fn wait_for(&self, query: &str, expected: f64) {
        self.until(&format!("{query} == {expected}"), || {
            self.value(query) == Some(expected)
        });
    }

    fn until(&self, what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !done() {
            assert!(Instant::now() < deadline, "Prometheus never saw {what}");
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn prometheus_scrapes_build_counters_and_the_queue() {
    let lab = Lab::new(
        r#"{
  quick = builtins.genList (i: mk "metrics-quick-${toString i}" "echo ${toString i} > $out" {}) 3;
  fail = mk "metrics-fail" "exit 1" {};
  slow = mk "metrics-slow" "sleep 8; echo slow > $out" {};
  behind = mk "metrics-behind" "echo behind > $out" {};
}"#,
    );
    let d = Daemon::start_with_config(
        "[metrics]\nlisten = \"127.0.0.1:0\"\n\n[accounts.alice]\nmax_running_builds = 1\n",
        &[],
    );
    let line = d.wait_for_log(&["serving metrics at /metrics"]);
    let target: SocketAddr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))
        .expect("the address in the log")
        .parse()
        .expect("an address");
    let dir = tempfile::tempdir().expect("temp dir");
    let prometheus = Prometheus::start(dir.path(), target);
    prometheus.wait_for("up{job=\"nixbuild\"}", 1.0);

    let quick = lab.instantiate(&["quick"]);
    lab.remote_build_ok(&d, "alice", &quick);
    let fail = lab.instantiate(&["fail"]);
    assert!(!lab.remote_build(&d, "alice", &fail, &[]).status.success());
    prometheus.wait_for("nixbuild_builds_finished_total{result=\"built\"}", 3.0);
    prometheus.wait_for(
        "nixbuild_builds_finished_total{result=\"permanent_failure\"}",
        1.0,
    );
    prometheus.wait_for("nixbuild_builds_queued_total", 4.0);

    // One build runs, one waits behind it (alice may run one at a time): the gauges show it.
    let slow = lab.instantiate(&["slow"]);
    let behind = lab.instantiate(&["behind"]);
    let spawn = |drvs: &[String]| {
        lab.remote_command(&d, "alice", &builders(), drvs)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nix-build")
    };
    let mut slow_client = spawn(&slow);
    d.wait_for_log(&["nixbuild::build: building ", "metrics-slow"]);
    let mut behind_client = spawn(&behind);
    prometheus.wait_for("nixbuild_builds_running", 1.0);
    prometheus.wait_for("nixbuild_builds_waiting", 1.0);
    prometheus.wait_for("nixbuild_cores_granted > bool 0", 1.0);
    assert!(slow_client.wait().expect("wait").success());
    assert!(behind_client.wait().expect("wait").success());
    prometheus.wait_for("nixbuild_builds_finished_total{result=\"built\"}", 5.0);
    prometheus.wait_for("nixbuild_builds_waiting", 0.0);
    prometheus.wait_for("nixbuild_builds_running", 0.0);
    prometheus.wait_for("nixbuild_build_duration_seconds_count", 6.0);
    prometheus.wait_for(
        "nixbuild_transfer_bytes_total{direction=\"upload\"} > bool 0",
        1.0,
    );
    prometheus.wait_for("nixbuild_sessions{protocol=\"serve\"}", 0.0);

    // The raw exposition passes promtool's checks.
    let (code, body) = http_get(target, "/metrics").expect("GET /metrics");
    assert_eq!(code, 200);
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    promtool
        .stdin
        .take()
        .expect("stdin")
        .write_all(body.as_bytes())
        .expect("feed promtool");
    let checked = promtool.wait_with_output().expect("promtool");
    assert!(
        checked.status.success() && checked.stdout.is_empty(),
        "promtool check metrics: {}{}\n{body}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    assert!(!body.contains("alice"), "no account as a label:\n{body}");
    d.stop();
}
