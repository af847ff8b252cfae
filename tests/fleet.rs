//! The fleet (issue 23), end to end over loopback SSH with the real OpenSSH client and
//! pinned host keys. A front whose `[fleet] machines` file names a second nixbuild server
//! probes it and `nixbuild status` shows it; wrong pins, hostile machines, a stopped builder
//! and broken files are handled. Builds from Nix 2.8 and 2.34 run across a nixbuild builder
//! and a stock Nix builder (OpenSSH and `nix-store --serve` or `nix-daemon --stdio` in a
//! mount namespace with its own /nix), with features, job limits, sessions reused, inputs
//! copied once, a builder killed mid-build, a machine drained; hostile machines fail their
//! builds and nothing of theirs is registered.

#[path = "../nixbuild-core/tests/common/mod.rs"]
mod common;
mod harness;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine as _;
use harness::build_log::{build_events, most_at_once, starts_of};
use harness::clients::{busybox, read_client_file, Client, ClientNix};
use harness::ssh::{run, Key, SshServer};
use harness::stock::StockBuilder;
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

/// A machines-file line for a builder at `port` reached as `user` with `identity`.
fn line(
    user: &str,
    port: u16,
    identity: &Key,
    max_jobs: u32,
    features: &str,
    mandatory: &str,
    host_key: &str,
) -> String {
    format!(
        "ssh://{user}@127.0.0.1:{port} x86_64-linux {} {max_jobs} 1 {features} {mandatory} \
         {host_key}\n",
        identity.private.display()
    )
}

/// `nix-build` of `drvs` by `nix` on the front only, as `account`, with the README's
/// builders line through the relay.
fn build_on(nix: &ClientNix, front: &SshServer, account: &str, drvs: &[String]) -> Command {
    let mut cmd = nix.relayed(&front.daemon, account, "nix-build");
    cmd.args(["--max-jobs", "0", "--no-out-link", "--builders"])
        .arg(harness::builders())
        .args(drvs);
    cmd
}

/// Two derivations: one that says `started`, sleeps `seconds` and writes `word`, and a
/// quick one.
fn slow_then_quick(nix: &ClientNix, salt: &str, word: &str, seconds: u32) -> Vec<String> {
    nix.derivations(
        &format!("{salt}-{word}"),
        &[
            (
                "",
                format!("echo started; sleep {seconds}; echo {word} > $out"),
            ),
            ("", format!("echo {word} again > $out")),
        ],
    )
}

/// Starts `build` (a `nix-build` of `drv`) and waits until the nixbuild builder `builder`
/// builds `drv`.
fn started_on(builder: &SshServer, mut build: Command, drv: &str) -> std::process::Child {
    let child = build
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("nix-build");
    builder
        .daemon
        .wait_for_log(&["nixbuild::build: building", drv]);
    child
}

/// A front: a nixbuild server whose admin is `ops` and whose `[fleet] machines` file holds
/// `file`; `fleet` is the rest of its `[fleet]` section, `before` the sections before it.
struct Front {
    server: SshServer,
    /// The admin's ssh config (host `front-ops`).
    ops_config: std::path::PathBuf,
    /// The machines file.
    machines: std::path::PathBuf,
}

impl Front {
    fn start(file: &str, before: &str, fleet: &str) -> Front {
        let files = tempfile::tempdir().expect("temp dir");
        let ops = SshServer::key(files.path(), "id_ops", "ed25519", "ops");
        let machines = files.path().join("machines");
        std::fs::write(&machines, file).expect("write machines");
        let config = format!(
            "[admin]\naccounts = [\"ops\"]\n\n{before}[fleet]\nmachines = \"{}\"\n{fleet}",
            machines.display()
        );
        let server = SshServer::start(&config, files, &[&ops]);
        let ops_config = server.ssh_config("front-ops", &ops);
        Front {
            server,
            ops_config,
            machines,
        }
    }
}

/// The builders of a test: the front's identity, a nixbuild server that lets it in as its
/// account `front`, and a stock Nix builder with `stock_jobs` jobs that lets it in as root.
fn builders(stock_jobs: u32) -> (Key, SshServer, StockBuilder) {
    let files = tempfile::tempdir().expect("temp dir");
    let identity = SshServer::key(files.path(), "id_front", "ed25519", "front");
    let builder = SshServer::start("", files, &[&identity]);
    let stock = StockBuilder::start(&identity, stock_jobs);
    (identity, builder, stock)
}

#[test]
fn builds_run_across_a_nixbuild_builder_and_a_stock_nix_builder() {
    // (1) a nixbuild server letting the front in as its account `front`; (2) OpenSSH with
    // the stock Nix 2.8 `nix-store --serve` in a namespace with its own /nix.
    let (identity, mut builder, stock) = builders(2);

    // Plain and big-parallel builds can only go to (1), benchmark builds only to (2),
    // where the feature is mandatory; this host builds nothing itself.
    let nixbuild_line = line(
        "front",
        builder.pins.port,
        &identity,
        2,
        "big-parallel",
        "-",
        &builder.pins.machines_key,
    );
    let mandatory = line(
        "root",
        stock.port,
        &identity,
        2,
        "benchmark",
        "benchmark",
        &stock.host_key,
    );
    let Front {
        server: front,
        ops_config,
        machines,
    } = Front::start(
        &format!("{nixbuild_line}{mandatory}"),
        "",
        "probe_interval = 1\nconnect_timeout = 5\nbuild_locally = false\n",
    );
    wait_for(&front, &ops_config, "up", |f| {
        f["machines"][0]["state"] == "up" && f["machines"][1]["state"] == "up"
    });

    // Two clients, Nix 2.8 and Nix 2.34, 20 builds each: 8 plain, 4 big-parallel and 8
    // benchmark builds.
    let clients = [Client::Host, Client::Sid].map(|c| ClientNix::new(c, ""));
    let salt = common::Nix::salt();
    let plans: Vec<Vec<(usize, String)>> = clients
        .iter()
        .map(|nix| {
            let kinds: Vec<(&str, String)> = (0..20)
                .map(|i| {
                    let features = match i % 5 {
                        2 => "\"big-parallel\"",
                        3 | 4 => "\"benchmark\"",
                        _ => "",
                    };
                    let script = format!("echo {salt} {} {i} > $out", nix.client.name());
                    (features, script)
                })
                .collect();
            let drvs = nix.derivations(&format!("{salt}-{}", nix.client.name()), &kinds);
            drvs.into_iter().enumerate().collect()
        })
        .collect();
    let done = std::sync::atomic::AtomicBool::new(false);
    let (outputs, most) = std::thread::scope(|scope| {
        // The front's view of each machine while the builds run: the most running at once.
        let sampler = scope.spawn(|| {
            let mut most = [0u64; 2];
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let fleet = status(&ops_config)["fleet"].clone();
                for (m, most) in most.iter_mut().enumerate() {
                    *most = (*most).max(fleet["machines"][m]["running"].as_u64().unwrap_or(0));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            most
        });
        let builds: Vec<_> = clients
            .iter()
            .zip(&plans)
            .map(|(nix, plan)| {
                let drvs: Vec<String> = plan.iter().map(|(_, d)| d.clone()).collect();
                let mut cmd = build_on(nix, &front, "alice", &drvs);
                let name = nix.client.name();
                scope.spawn(move || {
                    let out = cmd.output().expect("nix-build");
                    assert!(
                        out.status.success(),
                        "the {name} client: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                    harness::lines(&out.stdout)
                })
            })
            .collect();
        let outputs: Vec<Vec<String>> = builds
            .into_iter()
            .map(|b| b.join().expect("a client"))
            .collect();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        (outputs, sampler.join().expect("the sampler"))
    });

    let builder_log = builder.daemon.log();
    let events = build_events(&builder_log);
    for ((nix, plan), outs) in clients.iter().zip(&plans).zip(&outputs) {
        assert_eq!(outs.len(), 20, "{outs:?}");
        for ((i, drv), out) in plan.iter().zip(outs) {
            assert_eq!(
                read_client_file(nix.client, out).trim(),
                format!("{salt} {} {i}", nix.client.name())
            );
            let on_stock = stock.has(out);
            let on_nixbuild = starts_of(&events, drv);
            if i % 5 >= 3 {
                assert!(on_stock, "benchmark build {drv} not on the stock builder");
                assert_eq!(on_nixbuild, 0, "{drv} on the nixbuild builder");
            } else {
                assert!(!on_stock, "{drv} on the stock builder");
                assert_eq!(
                    on_nixbuild, 1,
                    "{drv} not built once on the nixbuild builder"
                );
            }
        }
    }
    // The builder ran them as the front's account, never more than its 2 jobs at once;
    // the front never had more than 2 on either machine.
    assert!(events.iter().all(|e| e.account == "front"), "{events:?}");
    assert!(most_at_once(&events).0 <= 2, "{builder_log}");
    assert!(most[0] <= 2 && most[1] <= 2, "{most:?}");
    // Sessions were kept and reused: at most one per job slot was ever opened.
    let front_log = front.daemon.log();
    for port in [builder.pins.port, stock.port] {
        let opened = front_log
            .lines()
            .filter(|l| l.contains("opened a session") && l.contains(&format!(":{port}")))
            .count();
        assert!((1..=2).contains(&opened), "{opened} sessions to :{port}");
    }
    let fleet = status(&ops_config)["fleet"].clone();
    // Their one input, busybox, crossed to each machine once, however many builds needed
    // it at the same time.
    let info = clients[0].ok(clients[0]
        .command("nix")
        .args(["path-info", "--json", &busybox()]));
    let info: Value = serde_json::from_slice(&info.stdout).expect("JSON");
    let busybox_nar = info[0]["narSize"].as_u64().expect("narSize");
    for (m, builds) in [(0, 24), (1, 16)] {
        let machine = &fleet["machines"][m];
        assert_eq!(machine["builds"], builds, "{machine}");
        assert_eq!(machine["running"], 0, "{machine}");
        assert_eq!(
            machine["bytes_sent"].as_u64(),
            Some(busybox_nar),
            "{machine}"
        );
        assert!(machine["bytes_received"].as_u64() > Some(0), "{machine}");
    }
    // What the machines built is what Nix's own sandbox builds.
    let sid = &clients[1];
    for (i, drv) in [&plans[1][0], &plans[1][3]] {
        let out = sid
            .sandboxed("nix-build")
            .args([
                "--check",
                "--no-out-link",
                "--max-jobs",
                "1",
                "--builders",
                "",
            ])
            .arg(drv)
            .output()
            .expect("nix-build --check");
        assert!(
            out.status.success(),
            "build {i} differs from Nix's sandbox: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // What no machine builds is refused at once, saying why.
    let host = &clients[0];
    let arm = {
        let expr = host.scratch().join("arm.nix");
        std::fs::write(
            &expr,
            format!(
                "derivation {{ name = \"arm-{salt}\"; system = \"aarch64-linux\"; \
                 builder = \"/bin/sh\"; }}\n"
            ),
        )
        .expect("write");
        host.instantiate(&expr)
    };
    let started = Instant::now();
    let out = host
        .relayed(&front.daemon, "alice", "nix-build")
        .args(["--max-jobs", "0", "--no-out-link", "--builders"])
        .arg(harness::builders().replace("x86_64-linux", "aarch64-linux,x86_64-linux"))
        .arg(&arm)
        .output()
        .expect("nix-build");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("nixbuild cannot build") && stderr.contains("aarch64-linux"),
        "{stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(30), "{stderr}");

    // The stock builder takes plain builds too (the file is read again); builder (1) is
    // killed in the middle of one: the build completes on (2), the client hears once why.
    std::fs::write(
        &machines,
        format!(
            "{nixbuild_line}{}",
            line(
                "root",
                stock.port,
                &identity,
                2,
                "benchmark",
                "-",
                &stock.host_key
            )
        ),
    )
    .expect("write machines");
    wait_for(&front, &ops_config, "re-read", |f| {
        f["machines"][1]["mandatory_features"] == serde_json::json!([])
            && f["machines"][1]["state"] == "up"
    });
    let slow = slow_then_quick(host, &salt, "slow", 4);
    let build = started_on(
        &builder,
        build_on(host, &front, "alice", &slow[..1]),
        &slow[0],
    );
    builder.daemon.kill();
    let out = build.wait_with_output().expect("nix-build");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}\n{}", front.daemon.log());
    let slow_out = harness::lines(&out.stdout)[0].clone();
    assert_eq!(read_client_file(Client::Host, &slow_out).trim(), "slow");
    assert!(stock.has(&slow_out), "not rebuilt on the stock builder");
    assert_eq!(
        stderr.matches("again on another machine").count(),
        1,
        "{stderr}"
    );
    // The second machine's log reached the client.
    let retried = stderr.find("again on another machine").expect("the notice");
    assert!(stderr[retried..].contains("\nstarted\n"), "{stderr}");
    let fleet = status(&ops_config)["fleet"].clone();
    assert_eq!(fleet["machines"][0]["state"], "down", "{fleet}");

    // Back, it is used again.
    let listen = format!("127.0.0.1:{}", builder.pins.port);
    builder.daemon.start_again(&[
        "--listen",
        &listen,
        "--authorized-keys",
        builder.authorized_keys.to_str().expect("UTF-8 path"),
    ]);
    wait_for(&front, &ops_config, "up again", |f| {
        f["machines"][0]["state"] == "up"
    });
    host.ok(&mut build_on(host, &front, "alice", &slow[1..]));
    assert_eq!(starts_of(&build_events(&builder.daemon.log()), &slow[1]), 1);

    // Drained: its line removed while it builds, builder (1) finishes that build, and the
    // next one goes to (2).
    let drain = slow_then_quick(host, &salt, "drained", 3);
    let build = started_on(
        &builder,
        build_on(host, &front, "alice", &drain[..1]),
        &drain[0],
    );
    // An operator sees where it runs.
    let builds = run(&mut SshServer::ssh(
        &ops_config,
        "front-ops",
        &["nixbuild", "builds", "--all", "--json"],
    ));
    let builds: Value = serde_json::from_slice(&builds.stdout).expect("JSON");
    let running = builds["builds"]
        .as_array()
        .and_then(|b| b.iter().find(|b| b["drv"] == drain[0].as_str()))
        .cloned()
        .unwrap_or_default();
    assert_eq!(running["state"], "running", "{builds}");
    assert_eq!(
        running["machine"],
        format!("ssh://front@127.0.0.1:{}", builder.pins.port),
        "{running}"
    );
    assert!(running["cpus"].is_null(), "{running}");
    std::fs::write(
        &machines,
        line(
            "root",
            stock.port,
            &identity,
            2,
            "benchmark",
            "-",
            &stock.host_key,
        ),
    )
    .expect("write machines");
    wait_for(&front, &ops_config, "one machine", |f| {
        f["machines"].as_array().map(Vec::len) == Some(1)
    });
    let out = build.wait_with_output().expect("nix-build");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let drained_out = harness::lines(&out.stdout)[0].clone();
    assert!(!stock.has(&drained_out), "the drained build moved");
    let out = host.ok(&mut build_on(host, &front, "alice", &drain[1..]));
    assert!(stock.has(&harness::lines(&out.stdout)[0]));
    assert_eq!(
        starts_of(&build_events(&builder.daemon.log()), &drain[1]),
        0
    );
    assert!(!front.daemon.log().contains("panicked"));
}

/// A program for the stock sshd to run as a machine's `remote-program`: it prints the
/// bytes of `replies` whatever it is asked, then reads its stdin to the end.
fn fake_machine(dir: &Path, name: &str, replies: &[u8]) -> std::path::PathBuf {
    let data = dir.join(format!("{name}.bin"));
    std::fs::write(&data, replies).expect("write replies");
    let program = dir.join(name);
    std::fs::write(
        &program,
        format!("#!/bin/sh\ncat {}\nexec cat > /dev/null\n", data.display()),
    )
    .expect("write program");
    std::fs::set_permissions(
        &program,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    program
}

#[test]
fn hostile_machines_fail_their_builds_and_nothing_of_theirs_is_registered() {
    use nixbuild_core::nar::NarNode;
    use nixbuild_core::serve::handshake::ServerHello;
    use nixbuild_core::serve::{BuildResult, BuildStatus, ProtocolVersion, Response};

    let (identity, builder, sshd) = builders(1);

    // What the fakes say: the serve protocol's hello (2.5), then: nothing more (silent);
    // 1 MiB of 0xff (garbage); or "I have the inputs", "built", and an output NAR of 3 MiB
    // (over the front's 1 MiB for a build's outputs).
    let v = ProtocolVersion::V2_5;
    let mut hello = Vec::new();
    ServerHello { version: v }.encode(&mut hello);
    let fakes = tempfile::tempdir().expect("temp dir");
    let silent = fake_machine(fakes.path(), "silent", &hello);
    let garbage = fake_machine(
        fakes.path(),
        "garbage",
        &[hello.clone(), vec![0xff; 1 << 20]].concat(),
    );
    let mut huge_replies = hello.clone();
    let bb = nixbuild_core::store_path::StorePath::from_absolute_path(busybox().as_bytes())
        .expect("a store path");
    Response::ValidPaths([bb].into()).encode(v, &mut huge_replies);
    Response::Build(Box::new(BuildResult {
        start_time: 1,
        stop_time: 2,
        times_built: 1,
        ..BuildResult::without_build(BuildStatus::Built, Vec::new())
    }))
    .encode(v, &mut huge_replies);
    huge_replies.extend(
        NarNode::File {
            executable: false,
            contents: vec![b'x'; 3 << 20],
        }
        .to_nar()
        .expect("a NAR"),
    );
    let huge = fake_machine(fakes.path(), "huge", &huge_replies);

    // Big-parallel builds go only to the huge one; plain builds to the silent one first,
    // then the garbage one, then the nixbuild builder.
    let fake_line = |program: &Path, features: &str| {
        line(
            "root",
            sshd.port,
            &identity,
            1,
            features,
            features,
            &sshd.host_key,
        )
        .replacen(
            &format!(":{} ", sshd.port),
            &format!(":{}?remote-program={} ", sshd.port, program.display()),
            1,
        )
    };
    let Front {
        server: front,
        ops_config,
        ..
    } = Front::start(
        &[
            fake_line(&huge, "big-parallel"),
            fake_line(&silent, "-"),
            fake_line(&garbage, "-"),
            line(
                "front",
                builder.pins.port,
                &identity,
                1,
                "-",
                "-",
                &builder.pins.machines_key,
            ),
        ]
        .concat(),
        "[builds]\nmax_output_size = 1048576\n\n",
        "probe_interval = 60\nconnect_timeout = 5\nio_timeout = 2\nbuild_locally = false\n",
    );
    wait_for(&front, &ops_config, "probed", |f| {
        (0..4).all(|m| f["machines"][m]["state"] == "up")
    });

    let nix = ClientNix::new(Client::Host, "");
    let salt = common::Nix::salt();
    let drvs = nix.derivations(
        &salt,
        &[
            ("", "echo plain > $out".to_owned()),
            ("\"big-parallel\"", "echo big > $out".to_owned()),
        ],
    );

    // The plain build: the silent machine times out, the garbage one is caught, the third
    // machine builds it; the client hears of both.
    let out = build_on(&nix, &front, "alice", &drvs[..1])
        .output()
        .expect("nix-build");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}\n{}", front.daemon.log());
    assert_eq!(
        stderr.matches("again on another machine").count(),
        2,
        "{stderr}"
    );
    assert!(stderr.contains("answered nothing for 2s"), "{stderr}");
    assert!(stderr.contains("a wrong answer"), "{stderr}");
    assert_eq!(starts_of(&build_events(&builder.daemon.log()), &drvs[0]), 1);
    let fleet = status(&ops_config)["fleet"].clone();
    assert_eq!(fleet["machines"][1]["state"], "down", "{fleet}");
    assert_eq!(fleet["machines"][2]["state"], "down", "{fleet}");

    // The big one: its outputs are refused while they arrive, as a local build's would be;
    // a build failure, not the machine's, so it is not tried elsewhere, and nothing is
    // registered.
    let out = build_on(&nix, &front, "alice", &drvs[1..])
        .output()
        .expect("nix-build");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("larger than this server takes"), "{stderr}");
    assert!(!stderr.contains("again on another machine"), "{stderr}");
    let output = {
        let out = nix.ok(nix.command("nix-store").args(["-q", "--outputs", &drvs[1]]));
        harness::lines(&out.stdout)[0].clone()
    };
    let valid = nix
        .relayed(&front.daemon, "alice", "nix-store")
        .args([
            "--store",
            &harness::store_uri(),
            "--check-validity",
            &output,
        ])
        .output()
        .expect("nix-store");
    assert!(!valid.status.success(), "the refused output is valid");
    let log = front.daemon.log();
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn ssh_ng_machines_build_too() {
    // The same two kinds of builder, reached over the daemon protocol: a nixbuild server's
    // `nix-daemon --stdio`, and the stock Nix 2.8 `nix-daemon --stdio` behind OpenSSH.
    let (identity, builder, stock) = builders(2);
    let ng = |l: String| l.replacen("ssh://", "ssh-ng://", 1);
    let Front {
        server: front,
        ops_config,
        ..
    } = Front::start(
        &[
            ng(line(
                "front",
                builder.pins.port,
                &identity,
                2,
                "big-parallel",
                "big-parallel",
                &builder.pins.machines_key,
            )),
            ng(line(
                "root",
                stock.port,
                &identity,
                2,
                "-",
                "-",
                &stock.host_key,
            )),
        ]
        .concat(),
        "",
        "probe_interval = 1\nbuild_locally = false\n",
    );
    let fleet = wait_for(&front, &ops_config, "up", |f| {
        f["machines"][0]["state"] == "up" && f["machines"][1]["state"] == "up"
    });
    assert_eq!(fleet["machines"][0]["protocol_version"], "1.38", "{fleet}");
    assert!(
        fleet["machines"][1]["protocol_version"]
            .as_str()
            .is_some_and(|v| v.starts_with("1.")),
        "{fleet}"
    );

    let nix = ClientNix::new(Client::Sid, "");
    let salt = common::Nix::salt();
    let kinds: Vec<(&str, String)> = (0..6)
        .map(|i| {
            let features = if i % 2 == 0 { "\"big-parallel\"" } else { "" };
            (
                features,
                format!("echo building {i}; echo {salt} {i} > $out"),
            )
        })
        .collect();
    let drvs = nix.derivations(&salt, &kinds);
    let out = build_on(&nix, &front, "alice", &drvs)
        .output()
        .expect("nix-build");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}\n{}", front.daemon.log());
    let outs = harness::lines(&out.stdout);
    let events = build_events(&builder.daemon.log());
    for (i, (drv, out)) in drvs.iter().zip(&outs).enumerate() {
        assert_eq!(
            read_client_file(Client::Sid, out).trim(),
            format!("{salt} {i}")
        );
        // The log of each machine reached the client.
        assert!(stderr.contains(&format!("building {i}")), "{stderr}");
        if i % 2 == 0 {
            assert_eq!(starts_of(&events, drv), 1, "{drv} on the nixbuild builder");
            assert!(!stock.has(out));
        } else {
            assert_eq!(starts_of(&events, drv), 0, "{drv} on the nixbuild builder");
            assert!(stock.has(out), "{drv} on the stock builder");
        }
    }
    builder
        .daemon
        .wait_for_log(&["session start", "account=front", "protocol=\"daemon\""]);
    assert!(!front.daemon.log().contains("panicked"));
}
