//! The fleet's machines (issue 23, first part), end to end over loopback SSH: a front whose
//! `[fleet] machines` file names a second nixbuild server (its pinned host key, an identity
//! that server lets in) probes it, and `nixbuild status` (real OpenSSH client, pinned host
//! key, admin account) shows it up with the serve protocol's version, and the builder's log
//! shows the front's sessions. A line pinned with another key is down, saying so, and so is
//! a hostile machine that answers junk; a stopped builder goes down and comes back up; a
//! file with an error keeps the machines it had.

#[path = "../nixbuild-core/tests/common/mod.rs"]
mod common;
mod harness;

use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use harness::ssh::{run, Key, SshServer};
use harness::{free_port, http_get};
use serde_json::Value;

/// `nixbuild status --json` on the front, as the admin.
fn status(config: &Path) -> Value {
    let out = run(&mut SshServer::ssh(
        config,
        "front-ops",
        &["nixbuild", "status", "--json"],
    ));
    assert!(
        out.status.success(),
        "status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["kind"], "status", "{v}");
    v
}

/// Waits until the front's status satisfies `ready`; returns its `fleet`.
fn wait_for(front: &SshServer, config: &Path, what: &str, ready: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let fleet = status(config)["fleet"].clone();
        if ready(&fleet) {
            return fleet;
        }
        assert!(
            Instant::now() < deadline,
            "never {what}: {fleet}\n{}",
            front.daemon.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn machine_line(port: u16, identity: &Key, host_key: &str) -> String {
    format!(
        "ssh://front@127.0.0.1:{port} x86_64-linux {} 2 1 big-parallel,benchmark - {host_key}\n",
        identity.private.display()
    )
}

#[test]
fn a_front_probes_its_machines_and_shows_them() {
    // The builder: a nixbuild server that lets the front's identity in.
    let builder_files = tempfile::tempdir().expect("temp dir");
    let identity = SshServer::key(builder_files.path(), "id_front", "ed25519", "front");
    let mut builder = SshServer::start("", builder_files, &[&identity]);
    let port = builder.pins.port;

    // A hostile machine: whatever connects gets junk instead of SSH.
    let junk = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let junk_port = junk.local_addr().expect("address").port();
    std::thread::spawn(move || {
        for stream in junk.incoming().flatten() {
            let mut stream = stream;
            let _ = std::io::Write::write_all(&mut stream, &[0xff; 300_000]);
        }
    });

    // The front, with the builder pinned right, the builder pinned with a key that is not
    // its own, and the hostile machine.
    let front_files = tempfile::tempdir().expect("temp dir");
    let ops = SshServer::key(front_files.path(), "id_ops", "ed25519", "ops");
    let wrong_pin = base64::engine::general_purpose::STANDARD.encode(&ops.public);
    let machines = front_files.path().join("machines");
    let file = format!(
        "# the fleet\n{}{}{}",
        machine_line(port, &identity, &builder.pins.machines_key),
        machine_line(port, &identity, &wrong_pin).replace("front@", "nobody@"),
        machine_line(junk_port, &identity, &builder.pins.machines_key),
    );
    std::fs::write(&machines, &file).expect("write machines");
    let metrics: std::net::SocketAddr = format!("127.0.0.1:{}", free_port())
        .parse()
        .expect("address");
    let config = format!(
        "[admin]\naccounts = [\"ops\"]\n\n[metrics]\nlisten = \"{metrics}\"\n\n[fleet]\n\
         machines = \"{}\"\nprobe_interval = 1\nconnect_timeout = 5\n",
        machines.display()
    );
    let front = SshServer::start(&config, front_files, &[&ops]);
    let ops_config = front.ssh_config("front-ops", &ops);

    let fleet = wait_for(&front, &ops_config, "probed", |f| {
        f["machines"][0]["state"] == "up"
            && f["machines"][1]["state"] == "down"
            && f["machines"][2]["state"] == "down"
    });
    assert_eq!(fleet["file"], machines.display().to_string());
    let up = &fleet["machines"][0];
    assert_eq!(up["uri"], format!("ssh://front@127.0.0.1:{port}"));
    assert_eq!(up["protocol_version"], "2.7", "{up}");
    assert_eq!(up["systems"], serde_json::json!(["x86_64-linux"]));
    assert_eq!(up["max_jobs"], 2);
    assert_eq!(
        up["features"],
        serde_json::json!(["benchmark", "big-parallel"])
    );
    let down = &fleet["machines"][1];
    assert!(
        down["error"]
            .as_str()
            .is_some_and(|e| e.contains("not the pinned")),
        "{down}"
    );
    let hostile = &fleet["machines"][2];
    assert!(
        hostile["error"]
            .as_str()
            .is_some_and(|e| e.contains(&format!("cannot connect to 127.0.0.1:{junk_port}"))),
        "{hostile}"
    );
    // The builder served the front's probes as its account.
    builder
        .daemon
        .wait_for_log(&["session start", "account=front", "protocol=\"serve\""]);
    let text = String::from_utf8(
        run(&mut SshServer::ssh(
            &ops_config,
            "front-ops",
            &["nixbuild", "status"],
        ))
        .stdout,
    )
    .expect("UTF-8");
    assert!(text.contains("machines:   3 from "), "{text}");
    assert!(text.contains("up (protocol 2.7"), "{text}");
    assert!(text.contains("DOWN"), "{text}");
    let (code, exposition) = http_get(metrics, "/metrics").expect("GET /metrics");
    assert_eq!(code, 200);
    for sample in [
        "nixbuild_fleet_machines{state=\"unknown\"} 0",
        "nixbuild_fleet_machines{state=\"up\"} 1",
        "nixbuild_fleet_machines{state=\"down\"} 2",
    ] {
        assert!(
            exposition.lines().any(|l| l == sample),
            "{sample}:\n{exposition}"
        );
    }

    // Stopped, the builder goes down; started again, it is up again.
    builder.daemon.kill();
    let fleet = wait_for(&front, &ops_config, "down", |f| {
        f["machines"][0]["state"] == "down"
    });
    assert!(
        fleet["machines"][0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("cannot connect to 127.0.0.1:")),
        "{fleet}"
    );
    let listen = format!("127.0.0.1:{port}");
    builder.daemon.start_again(&[
        "--listen",
        &listen,
        "--authorized-keys",
        builder.authorized_keys.to_str().expect("UTF-8 path"),
    ]);
    // A failed machine is tried again after 2, 4, … probe intervals.
    wait_for(&front, &ops_config, "up again", |f| {
        f["machines"][0]["state"] == "up"
    });

    // A broken file changes nothing but says why; a fixed one is read again.
    std::fs::write(&machines, "ssh://b x86_64-linux - four\n").expect("write machines");
    let fleet = wait_for(&front, &ops_config, "the file error", |f| {
        f["file_error"]
            .as_str()
            .is_some_and(|e| e.contains("line 1"))
    });
    assert_eq!(
        fleet["machines"].as_array().map(Vec::len),
        Some(3),
        "{fleet}"
    );
    std::fs::write(
        &machines,
        machine_line(port, &identity, &builder.pins.machines_key),
    )
    .expect("write machines");
    let fleet = wait_for(&front, &ops_config, "one machine", |f| {
        f["machines"].as_array().map(Vec::len) == Some(1) && f["file_error"].is_null()
    });
    assert_eq!(fleet["machines"][0]["state"], "up", "{fleet}");
    assert!(!front.daemon.log().contains("panicked"));
}
