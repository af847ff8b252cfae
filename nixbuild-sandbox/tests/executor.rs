//! The executor against the real kernel. `main` calls `maybe_run_helper()` first, like every
//! binary that builds, and each test re-executes this binary as the sandbox helper.
//!
//! Builders are busybox scripts from a fake store path. Probes that busybox cannot make
//! (`setxattr`, abstract unix sockets) run this very binary in probe mode, through a copy of the
//! host's dynamic loader and libraries placed in another fake store path.
//!
//! Needs root, user namespaces and `/bin/busybox` (static), like the daemon.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use libtest_mimic::{Arguments, Failed, Trial};
use nixbuild_sandbox::{
    encode_plan, helper_command, parse_report, plan, BuildRequest, HelperReport, HostSetup,
    InputKind, InputPath, PlanError, ResolverFiles, SandboxPlan,
};

const BUSYBOX: &str = "0c4kxzc8d3gsgz5ahlbxk7n8zylr3kkg-busybox";
const PROBE: &str = "1b9p07z77phvv2hf6gm9f28syp39f1ag-probe";
const GLIBC: &str = "2b9p07z77phvv2hf6gm9f28syp39f1ag-glibc";
const OUT: &str = "7fgb0vvbd7ymwx8rwmgc5vhw1yfw3yhm-test-out";
const PROBE_ARG: &str = "__probe";
/// Far above anything a test needs; only there so a broken executor fails instead of hanging.
const DEADLINE: Duration = Duration::from_secs(60);

fn main() {
    nixbuild_sandbox::maybe_run_helper();
    if std::env::args().nth(1).as_deref() == Some(PROBE_ARG) {
        probe();
    }
    let args = Arguments::from_args();
    let tests: Vec<(&str, fn())> = vec![
        (
            "a_build_writes_its_output_into_the_scratch_store",
            output_appears,
        ),
        (
            "the_builder_sees_nix_identity_environment_and_layout",
            identity_inside,
        ),
        (
            "exit_codes_signals_and_exec_failures_are_reported",
            exit_and_signal,
        ),
        (
            "a_setup_failure_names_the_step_and_leaves_nothing",
            setup_failure,
        ),
        (
            "killing_the_helper_kills_every_process_of_the_build",
            kill_helper,
        ),
        ("background_processes_die_with_the_builder", background_dies),
        ("host_files_outside_the_closure_are_not_visible", host_files),
        ("tcp_to_the_hosts_loopback_is_refused", tcp_refused),
        (
            "fixed_output_builds_share_the_host_network_but_not_abstract_sockets",
            fod_network,
        ),
        ("inputs_are_read_only", inputs_read_only),
        ("device_nodes_cannot_be_created", no_mknod),
        ("mounting_is_refused", no_mount),
        ("setuid_and_setgid_bits_are_refused", no_setid_bits),
        ("extended_attributes_are_refused", no_xattrs),
        ("dev_kvm_only_when_required", kvm_only_when_required),
        (
            "the_root_is_a_read_only_tmpfs_the_host_never_sees",
            root_in_tmpfs,
        ),
        (
            "ptrace_reaches_only_the_builds_own_processes",
            ptrace_outside,
        ),
        ("host_proc_entries_are_out_of_reach", host_proc),
        ("setns_into_host_namespaces_is_refused", setns_refused),
        (
            "a_nested_user_namespace_maps_no_host_root_and_unlocks_no_mount",
            nested_user_namespace,
        ),
        (
            "the_daemons_session_keyring_is_out_of_reach",
            daemon_keyring_out_of_reach,
        ),
        (
            "keys_a_build_adds_are_gone_for_later_builds",
            build_keys_not_shared,
        ),
    ];
    let trials = tests
        .into_iter()
        .map(|(name, f)| {
            Trial::test(name, move || {
                f();
                Ok::<(), Failed>(())
            })
        })
        .collect();
    libtest_mimic::run(&args, trials).exit();
}

/// Probe mode, run inside the sandbox: `__probe setxattr|getxattr|mount-tmpfs PATH`,
/// `__probe abstract-connect NAME`, `__probe ptrace PID`, `__probe setns NS-FILE`. Prints `ok`
/// or `errno N`. `__probe unshare-user ro|rw PATH` prints a line per step. The keyring probes
/// print a line per keyring or key: `__probe keyring-find DESC` searches `@s`, `@u` and `@us`
/// for a `user` key, `__probe keyring-read SERIAL...` reads keys by serial, `__probe
/// keyring-add DESC` adds a `user` key to `@s` and to `@u`.
fn probe() -> ! {
    let args: Vec<String> = std::env::args().skip(2).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["unshare-user", flag, path] => {
            unshare_user(flag == "ro", path);
            std::process::exit(0)
        }
        ["keyring-find", desc] => {
            for (name, ring) in keys::RINGS {
                match keys::search(ring, desc) {
                    Ok(serial) => println!("{name} found {serial}"),
                    Err(e) => println!("{name} errno {}", e.raw_os_error().unwrap_or(-1)),
                }
            }
            std::process::exit(0)
        }
        ["keyring-read", ref serials @ ..] => {
            for serial in serials {
                match keys::read(serial.parse().unwrap_or(-1)) {
                    Ok(payload) => println!("read ok {}", String::from_utf8_lossy(&payload)),
                    Err(e) => println!("read errno {}", e.raw_os_error().unwrap_or(-1)),
                }
            }
            std::process::exit(0)
        }
        ["keyring-add", desc] => {
            for (name, ring) in &keys::RINGS[..2] {
                let payload = format!("secret-of-{desc}");
                match keys::add(desc, payload.as_bytes(), *ring) {
                    Ok(serial) => println!("{name} added {serial}"),
                    Err(e) => println!("{name} errno {}", e.raw_os_error().unwrap_or(-1)),
                }
            }
            std::process::exit(0)
        }
        _ => {}
    }
    let result: std::io::Result<()> = match args.iter().map(String::as_str).collect::<Vec<_>>()[..]
    {
        ["setxattr", path] => {
            rustix::fs::setxattr(path, "user.nixbuild", b"1", rustix::fs::XattrFlags::empty())
                .map_err(Into::into)
        }
        ["getxattr", path] => rustix::fs::getxattr(path, "user.nixbuild", &mut [0u8; 16][..])
            .map(drop)
            .map_err(Into::into),
        ["abstract-connect", name] => connect_abstract(name),
        ["mount-tmpfs", path] => rustix::mount::mount(
            "none",
            path,
            "tmpfs",
            rustix::mount::MountFlags::empty(),
            None,
        )
        .map_err(Into::into),
        ["ptrace", pid] => ptrace_seize(pid.parse().unwrap_or(-1)),
        ["setns", file] => std::fs::File::open(file).and_then(|f| {
            use std::os::fd::AsRawFd;
            // SAFETY: a plain system call on an open descriptor; this process is single-threaded.
            libc_result(unsafe { libc::setns(f.as_raw_fd(), 0) }.into())
        }),
        _ => {
            eprintln!("bad probe {args:?}");
            std::process::exit(2)
        }
    };
    match result {
        Ok(()) => println!("ok"),
        Err(e) => println!("errno {}", e.raw_os_error().unwrap_or(-1)),
    }
    std::process::exit(0)
}

fn libc_result(ret: i64) -> std::io::Result<()> {
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `PTRACE_SEIZE` of `pid`: attaching is the whole test (the tracer's exit detaches it).
fn ptrace_seize(pid: i32) -> std::io::Result<()> {
    // SAFETY: PTRACE_SEIZE takes no pointers (addr and data are 0).
    libc_result(unsafe {
        libc::ptrace(
            libc::PTRACE_SEIZE,
            pid,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_void>(),
        )
    })
}

/// A new user namespace from inside the sandbox: created (as in Nix), but host root cannot be
/// mapped into it; with its own uid mapped to root and a mount namespace of its own, a
/// read-only mount stays read-only (`rw`) while adding the flag works (`ro`, the control).
fn unshare_user(read_only: bool, path: &str) {
    let step = |name: &str, r: std::io::Result<()>| {
        match r {
            Ok(()) => println!("{name} ok"),
            Err(e) => println!("{name} errno {}", e.raw_os_error().unwrap_or(-1)),
        }
        std::io::stdout().flush().expect("flush");
    };
    // The ids outside, before the new namespace hides them.
    let (uid, gid) = (rustix::process::getuid(), rustix::process::getgid());
    // SAFETY: unshare takes no pointers; this process is single-threaded.
    step(
        "unshare",
        libc_result(unsafe { libc::unshare(libc::CLONE_NEWUSER) }.into()),
    );
    let map_root = std::fs::write("/proc/self/uid_map", "0 0 1\n");
    let mapped = map_root.is_ok();
    step("map-host-root", map_root);
    if !mapped {
        step(
            "map-own-uid",
            std::fs::write("/proc/self/uid_map", format!("0 {} 1\n", uid.as_raw())),
        );
        let _ = std::fs::write("/proc/self/setgroups", "deny");
        let _ = std::fs::write("/proc/self/gid_map", format!("0 {} 1\n", gid.as_raw()));
    }
    // SAFETY: as above.
    step(
        "unshare-mount",
        libc_result(unsafe { libc::unshare(libc::CLONE_NEWNS) }.into()),
    );
    let mut flags = rustix::mount::MountFlags::BIND;
    if read_only {
        flags |= rustix::mount::MountFlags::RDONLY;
    }
    step(
        "remount",
        rustix::mount::mount_remount(path, flags, "").map_err(Into::into),
    );
}

/// The kernel's key management calls, which neither rustix nor busybox has.
mod keys {
    use std::ffi::CString;
    use std::io;

    /// The special keyrings a build could reach: session, user, user-session.
    pub const RINGS: [(&str, i32); 3] = [
        ("@s", libc::KEY_SPEC_SESSION_KEYRING),
        ("@u", libc::KEY_SPEC_USER_KEYRING),
        ("@us", libc::KEY_SPEC_USER_SESSION_KEYRING),
    ];

    fn check(ret: libc::c_long) -> io::Result<i64> {
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(ret)
        }
    }

    fn cstr(s: &str) -> CString {
        CString::new(s).expect("no NUL")
    }

    /// `keyctl(KEYCTL_JOIN_SESSION_KEYRING, NULL)`: this thread (and what it spawns) gets a
    /// new, empty session keyring, as a systemd service does.
    pub fn join_new_session() -> io::Result<i64> {
        // SAFETY: a NULL name asks for an anonymous keyring; no other pointer.
        check(unsafe {
            libc::syscall(
                libc::SYS_keyctl,
                libc::KEYCTL_JOIN_SESSION_KEYRING,
                std::ptr::null::<libc::c_char>(),
            )
        })
    }

    /// `add_key("user", desc, payload, ring)`.
    pub fn add(desc: &str, payload: &[u8], ring: i32) -> io::Result<i64> {
        let (kind, desc) = (cstr("user"), cstr(desc));
        // SAFETY: NUL-terminated strings and a payload buffer of the length passed.
        check(unsafe {
            libc::syscall(
                libc::SYS_add_key,
                kind.as_ptr(),
                desc.as_ptr(),
                payload.as_ptr(),
                payload.len(),
                ring,
            )
        })
    }

    /// `keyctl(KEYCTL_SEARCH, ring, "user", desc, 0)`: the serial of a key found in `ring` or
    /// the keyrings linked to it.
    pub fn search(ring: i32, desc: &str) -> io::Result<i64> {
        let (kind, desc) = (cstr("user"), cstr(desc));
        // SAFETY: NUL-terminated strings; no destination keyring.
        check(unsafe {
            libc::syscall(
                libc::SYS_keyctl,
                libc::KEYCTL_SEARCH,
                ring,
                kind.as_ptr(),
                desc.as_ptr(),
                0,
            )
        })
    }

    /// `keyctl(KEYCTL_READ, serial, buf, len)`: a key's payload.
    pub fn read(serial: i64) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; 4096];
        // SAFETY: the buffer is valid for the length passed.
        let n = check(unsafe {
            libc::syscall(
                libc::SYS_keyctl,
                libc::KEYCTL_READ,
                serial,
                buf.as_mut_ptr(),
                buf.len(),
            )
        })?;
        buf.truncate(usize::try_from(n).unwrap_or(0).min(4096));
        Ok(buf)
    }
}

fn connect_abstract(name: &str) -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    std::os::unix::net::UnixStream::connect_addr(&addr).map(drop)
}

// ---------------------------------------------------------------------------------------------
// Fixture: a fake objects directory and a scratch directory per build.

struct Fixture {
    dir: tempfile::TempDir,
    objects: PathBuf,
    inputs: Vec<InputPath>,
    uid: u32,
    builds: AtomicU32,
}

fn next_uid() -> u32 {
    // Distinct per test process and per test, far from real users and nixbld.
    static N: AtomicU32 = AtomicU32::new(0);
    3_000_000 + (std::process::id() % 100_000) * 32 + N.fetch_add(1, Ordering::Relaxed)
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn store(name: &str) -> String {
    format!("/nix/store/{name}")
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        set_mode(dir.path(), 0o700);
        let objects = dir.path().join("objects");
        std::fs::create_dir(&objects).expect("objects");

        // busybox, with every applet as a symlink, plus files for the write probes.
        let bb = objects.join("bb");
        std::fs::create_dir_all(bb.join("bin")).expect("bin");
        std::fs::copy("/bin/busybox", bb.join("bin/busybox")).expect("copy busybox");
        set_mode(&bb.join("bin/busybox"), 0o555);
        let list = Command::new("/bin/busybox")
            .arg("--list")
            .output()
            .expect("busybox --list");
        for applet in String::from_utf8_lossy(&list.stdout).lines() {
            if applet != "busybox" {
                std::os::unix::fs::symlink("busybox", bb.join("bin").join(applet)).expect("applet");
            }
        }
        let share = bb.join("share");
        std::fs::create_dir_all(share.join("wdir")).expect("share");
        std::fs::write(share.join("readable"), "closure-file\n").expect("readable");
        set_mode(&share.join("readable"), 0o444);
        std::fs::write(share.join("writable"), "original\n").expect("writable");
        set_mode(&share.join("writable"), 0o666);
        set_mode(&share.join("wdir"), 0o777);
        for d in [&bb, &bb.join("bin"), &share] {
            set_mode(d, 0o555);
        }

        // This binary as the probe, and the loader and libraries it needs.
        let probe = objects.join("probe");
        std::fs::create_dir(&probe).expect("probe");
        let exe = std::env::current_exe().expect("current_exe");
        if std::fs::hard_link(&exe, probe.join("probe")).is_err() {
            std::fs::copy(&exe, probe.join("probe")).expect("copy probe");
        }
        let glibc = objects.join("glibc");
        std::fs::create_dir(&glibc).expect("glibc");
        let ldd = Command::new("ldd").arg(&exe).output().expect("ldd");
        for line in String::from_utf8_lossy(&ldd.stdout).lines() {
            let lib = match line.split_whitespace().collect::<Vec<_>>()[..] {
                [_, "=>", path, _] | [path, _] if path.starts_with('/') => PathBuf::from(path),
                _ => continue,
            };
            let name = lib.file_name().expect("library name");
            std::fs::copy(&lib, glibc.join(name)).expect("copy library");
        }
        assert!(glibc.join("ld-linux-x86-64.so.2").exists(), "{ldd:?}");

        let dir_input = |base_name: &str, host_path: PathBuf| InputPath {
            base_name: base_name.into(),
            host_path,
            kind: InputKind::Directory,
        };
        Fixture {
            inputs: vec![
                dir_input(BUSYBOX, bb),
                dir_input(PROBE, probe),
                dir_input(GLIBC, glibc),
            ],
            objects,
            uid: next_uid(),
            builds: AtomicU32::new(0),
            dir,
        }
    }

    /// A file outside the closure, like the daemon's state directory.
    fn state_file(&self) -> PathBuf {
        let state = self.dir.path().join("state");
        std::fs::create_dir_all(&state).expect("state");
        let secret = state.join("secret");
        std::fs::write(&secret, "s3cret\n").expect("secret");
        set_mode(&secret, 0o644);
        secret
    }

    fn request(&self, script: &str) -> BuildRequest {
        let builder = format!("{}/bin/sh", store(BUSYBOX));
        let env: BTreeMap<Vec<u8>, Vec<u8>> = [
            ("builder", builder.clone()),
            ("name", "test-out".into()),
            ("out", store(OUT)),
            ("system", "x86_64-linux".into()),
            ("PATH", format!("{}/bin", store(BUSYBOX))),
        ]
        .into_iter()
        .map(|(k, v)| (k.as_bytes().to_vec(), v.into_bytes()))
        .collect();
        BuildRequest {
            builder: builder.into_bytes(),
            args: vec![b"-c".to_vec(), script.as_bytes().to_vec()],
            env,
            system: "x86_64-linux".into(),
            inputs: self.inputs.clone(),
            outputs: [("out".to_string(), store(OUT))].into(),
            fixed_output: false,
            required_features: BTreeSet::new(),
            cores: 1,
            graphs: BTreeMap::new(),
        }
    }

    /// A fresh scratch directory (root, 0700) and the host side for one build.
    fn host(&self) -> HostSetup {
        let n = self.builds.fetch_add(1, Ordering::Relaxed);
        let scratch = self.dir.path().join(format!("scratch{n}"));
        std::fs::create_dir(&scratch).expect("scratch");
        set_mode(&scratch, 0o700);
        HostSetup {
            host_system: "x86_64-linux".into(),
            build_uid: self.uid,
            build_gid: self.uid,
            scratch_dir: scratch,
            objects_dir: self.objects.clone(),
            has_dev_kvm: Path::new("/dev/kvm").exists(),
            resolver: ResolverFiles::default(),
            impure_env: BTreeMap::new(),
            dev_shm_size: "50%".into(),
        }
    }

    fn plan(&self, script: &str) -> SandboxPlan {
        plan(&self.request(script), &self.host()).expect("plan")
    }

    /// The in-sandbox command line that runs the probe binary.
    fn probe_cmd(&self, args: &str) -> String {
        let glibc = store(GLIBC);
        format!(
            "{glibc}/ld-linux-x86-64.so.2 --library-path {glibc} {}/probe {PROBE_ARG} {args}",
            store(PROBE)
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Running the helper.

struct Running {
    child: std::process::Child,
    log: mpsc::Receiver<Vec<u8>>,
    stderr: std::thread::JoinHandle<Vec<u8>>,
    got: Vec<u8>,
}

struct Outcome {
    report: HelperReport,
    log: String,
    stderr: String,
}

impl Running {
    fn start(plan: &SandboxPlan) -> Running {
        let exe = std::env::current_exe().expect("current_exe");
        let mut cmd = helper_command(&exe);
        // Must not reach the builder.
        cmd.env("NIXBUILD_TEST_LEAK", "1");
        let mut child = cmd.spawn().expect("spawn helper");
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(&encode_plan(plan)).expect("write plan");
        drop(stdin);
        let mut stdout = child.stdout.take().expect("stdout");
        let mut stderr = child.stderr.take().expect("stderr");
        let (tx, log) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = stdout.read(&mut buf) {
                if tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut all = Vec::new();
            let _ = stderr.read_to_end(&mut all);
            all
        });
        Running {
            child,
            log,
            stderr,
            got: Vec::new(),
        }
    }

    /// Reads the log until it contains `needle`.
    fn wait_for(&mut self, needle: &str) {
        let end = Instant::now() + DEADLINE;
        while !String::from_utf8_lossy(&self.got).contains(needle) {
            let left = end.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(chunk) => self.got.extend(chunk),
                Err(e) => panic!(
                    "no {needle:?} in the log ({e}): {:?}",
                    String::from_utf8_lossy(&self.got)
                ),
            }
        }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn finish(mut self) -> Outcome {
        let end = Instant::now() + DEADLINE;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            if Instant::now() > end {
                let _ = self.child.kill();
                panic!("the helper did not finish");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        self.got.extend(self.log.iter().flatten());
        let stderr = self.stderr.join().expect("stderr thread");
        Outcome {
            report: parse_report(&stderr, status),
            log: String::from_utf8_lossy(&self.got).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        }
    }
}

fn run(plan: &SandboxPlan) -> Outcome {
    Running::start(plan).finish()
}

/// Runs `script` and expects it to exit 0.
fn run_ok(fx: &Fixture, script: &str) -> Outcome {
    let out = run(&fx.plan(script));
    assert_eq!(
        out.report,
        HelperReport::Exited(0),
        "log: {}\nstderr: {}",
        out.log,
        out.stderr
    );
    out
}

/// The pids of the processes whose real uid is `uid`.
fn processes_of(uid: u32) -> Vec<i32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let real_uid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|u| u.parse::<u32>().ok());
        if real_uid == Some(uid) {
            pids.push(pid);
        }
    }
    pids
}

fn parent_of(pid: i32) -> Option<i32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|p| p.trim().parse().ok())
}

fn assert_no_mounts_under(dir: &Path) {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let dir = dir.to_string_lossy();
    assert!(
        !info.contains(&*dir),
        "a mount under {dir} remains:\n{info}"
    );
}

/// Runs a busybox command on the host, as root: the positive controls.
fn host_sh(script: &str) -> String {
    let out = Command::new("/bin/busybox")
        .args(["sh", "-c", script])
        .stdin(Stdio::null())
        .output()
        .expect("busybox on the host");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn output_path(plan: &SandboxPlan) -> PathBuf {
    plan.outputs[0].1.clone()
}

// ---------------------------------------------------------------------------------------------
// Tests.

fn output_appears() {
    let fx = Fixture::new();
    let plan = fx.plan("echo building; printf 'hello\\n' > $out; echo to-stderr >&2");
    let out = run(&plan);
    assert_eq!(out.report, HelperReport::Exited(0), "{}", out.stderr);
    // The log is the builder's stdout and stderr, without the set-up marker; raw mode keeps
    // newlines as they are.
    assert_eq!(out.log, "building\nto-stderr\n");
    let output = output_path(&plan);
    assert_eq!(output, plan.layout.store.join(OUT));
    assert_eq!(std::fs::read_to_string(&output).expect("output"), "hello\n");
    assert_eq!(std::fs::metadata(&output).expect("stat").uid(), fx.uid);
    // The scratch directory stays for the daemon to take the outputs from.
    assert!(plan.layout.build.exists());
}

fn identity_inside() {
    let fx = Fixture::new();
    let script = "{ id -u; id -g; hostname; pwd; echo $$; umask; \
        cat /proc/self/uid_map /proc/self/gid_map; echo $(ls /); echo $(ls /dev); ls /dev/pts; \
        ip link; cat /etc/passwd /etc/group /etc/hosts; \
        grep -E '^(NoNewPrivs|Seccomp|CapPrm|CapEff|CapBnd|Groups):' /proc/self/status; \
        echo stdin $(stat -L -c %t:%T /proc/self/fd/0); echo core $(ulimit -c); \
        echo ENV; env; } > $out 2>&1";
    let plan = fx.plan(script);
    let out = run(&plan);
    assert_eq!(out.report, HelperReport::Exited(0), "{}", out.stderr);
    let text = std::fs::read_to_string(output_path(&plan)).expect("output");
    let (facts, env) = text.split_once("ENV\n").expect("ENV marker");
    let lines: Vec<String> = facts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    let uid_map = format!("1000 {} 1", fx.uid);
    let gid_map = format!("100 {} 1", fx.uid);
    let expected_head = [
        "1000",
        "100",
        "localhost",
        "/build",
        "1",
        "0022",
        &uid_map,
        &gid_map,
        "build dev etc nix proc tmp",
        "fd full null ptmx pts random shm stderr stdin stdout tty urandom zero",
        "ptmx",
    ];
    assert_eq!(&lines[..expected_head.len()], &expected_head[..], "{text}");
    assert!(text.contains("1: lo: <LOOPBACK,UP,LOWER_UP>"), "{text}");
    assert!(!text.contains("2: "), "only lo: {text}");
    assert!(text.contains("nixbld:x:1000:100:Nix build user:/build:/noshell\n"));
    assert!(text.contains("nixbld:!:100:\n"));
    assert!(text.contains("127.0.0.1 localhost\n::1 localhost\n"));
    // No capability left after execve, no new privileges, the filter loaded, no groups.
    for line in [
        "NoNewPrivs:\t1\n",
        "Seccomp:\t2\n",
        "CapPrm:\t0000000000000000\n",
        "CapEff:\t0000000000000000\n",
        // stdin is /dev/null (character device 1:3), no core dumps.
        "stdin 1:3\n",
        "core 0\n",
    ] {
        assert!(text.contains(line), "{line:?} in {text}");
    }
    assert!(text.lines().any(|l| l.trim_end() == "Groups:"), "{text}");

    let env: BTreeMap<&str, &str> = env.lines().filter_map(|l| l.split_once('=')).collect();
    for (k, v) in &plan.exec.env {
        let (k, v) = (String::from_utf8_lossy(k), String::from_utf8_lossy(v));
        assert_eq!(env.get(&*k), Some(&&*v), "{k}");
    }
    // Only the plan's variables, plus what the shell itself sets.
    let extra: Vec<&&str> = env
        .keys()
        .filter(|k| !plan.exec.env.iter().any(|(pk, _)| pk == k.as_bytes()))
        .collect();
    assert!(
        extra.iter().all(|k| ["SHLVL", "_", "OLDPWD"].contains(k)),
        "{extra:?}"
    );
    assert!(!env.contains_key("NIXBUILD_TEST_LEAK"));
    assert_eq!(env.get("HOME"), Some(&"/homeless-shelter"));
    assert_eq!(env.get("NIX_BUILD_TOP"), Some(&"/build"));
}

fn root_in_tmpfs() {
    let fx = Fixture::new();
    let script = "{ for d in / /etc /dev /build /tmp /nix/store; do \
        echo $d $(stat -f -c %T $d); done; \
        for f in /new /etc/new /dev/new; do touch $f 2>&1 || echo refused $f; done; \
        touch /build/new /tmp/new && echo writable; } > $out 2>&1";
    let plan = fx.plan(script);
    let out = run(&plan);
    assert_eq!(out.report, HelperReport::Exited(0), "{}", out.stderr);
    let text = std::fs::read_to_string(output_path(&plan)).expect("output");
    let disk = host_sh(&format!("stat -f -c %T {}", plan.layout.build.display()));
    for line in [
        "/ tmpfs".to_owned(),
        "/etc tmpfs".to_owned(),
        "/dev tmpfs".to_owned(),
        format!("/build {}", disk.trim()),
        format!("/tmp {}", disk.trim()),
        format!("/nix/store {}", disk.trim()),
    ] {
        assert!(text.lines().any(|l| l == line), "{line:?} in {text}");
    }
    assert_ne!(
        disk.trim(),
        "tmpfs",
        "the positive control needs a disk: {disk}"
    );
    for f in ["/new", "/etc/new", "/dev/new"] {
        assert!(text.contains(&format!("refused {f}")), "{f}: {text}");
    }
    assert!(text.contains("Read-only file system"), "{text}");
    assert!(text.contains("writable\n"), "{text}");
    // The skeleton was made in memory: on the host, the root is an empty directory, and the
    // tmpfs is gone with the build.
    let on_host: Vec<_> = std::fs::read_dir(&plan.layout.root)
        .expect("the root's directory")
        .collect();
    assert!(on_host.is_empty(), "{on_host:?}");
    assert_no_mounts_under(&plan.layout.root);
}

fn exit_and_signal() {
    let fx = Fixture::new();
    let out = run(&fx.plan("echo failing; exit 3"));
    assert_eq!(out.report, HelperReport::Exited(3));
    assert_eq!(out.log, "failing\n");

    // PID 1 ignores signals from inside its namespace, so the signal comes from the host.
    let mut running = Running::start(&fx.plan("echo ready; sleep 1000"));
    running.wait_for("ready");
    let builder = processes_of(fx.uid)
        .into_iter()
        .find(|p| parent_of(*p) == Some(running.pid()))
        .expect("the builder is the helper's child");
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(builder).expect("pid"),
        rustix::process::Signal::KILL,
    )
    .expect("kill");
    let out = running.finish();
    assert_eq!(out.report, HelperReport::Signaled(9), "{}", out.stderr);

    // A builder that cannot be executed fails like in Nix: a message in the log, exit 1.
    let mut req = fx.request("");
    req.builder = format!("{}/bin/no-such-builder", store(BUSYBOX)).into_bytes();
    let out = run(&plan(&req, &fx.host()).expect("plan"));
    assert_eq!(out.report, HelperReport::Exited(1));
    assert!(
        out.log
            .contains("no-such-builder': No such file or directory"),
        "{}",
        out.log
    );
}

fn setup_failure() {
    let fx = Fixture::new();
    let mut req = fx.request("echo should-not-run");
    req.inputs.push(InputPath {
        base_name: "3b9p07z77phvv2hf6gm9f28syp39f1ag-missing".into(),
        host_path: fx.objects.join("missing"),
        kind: InputKind::Directory,
    });
    let host = fx.host();
    let out = run(&plan(&req, &host).expect("plan"));
    match &out.report {
        HelperReport::SetupFailed(msg) => {
            assert!(msg.contains("mount: bind"), "{msg}");
            assert!(msg.contains("missing"), "{msg}");
            assert!(msg.contains("No such file or directory"), "{msg}");
        }
        other => panic!("{other:?}"),
    }
    assert!(!out.log.contains("should-not-run"));
    assert!(processes_of(fx.uid).is_empty());
    assert_no_mounts_under(&host.scratch_dir);

    // A helper-side failure too: the scratch directory must be empty.
    let host = fx.host();
    std::fs::create_dir(host.scratch_dir.join("build")).expect("squat");
    let out = run(&plan(&fx.request("true"), &host).expect("plan"));
    assert!(
        matches!(&out.report, HelperReport::SetupFailed(m) if m.contains("mkdir") && m.contains("File exists")),
        "{:?}",
        out.report
    );
}

fn wait_until_gone(uid: u32) -> Vec<i32> {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let left = processes_of(uid);
        if left.is_empty() || Instant::now() > end {
            return left;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn kill_helper() {
    let fx = Fixture::new();
    let plan = fx.plan("sleep 1000 & (sleep 1000 &); echo ready; wait");
    let mut running = Running::start(&plan);
    running.wait_for("ready");
    assert!(
        processes_of(fx.uid).len() >= 3,
        "{:?}",
        processes_of(fx.uid)
    );
    running.child.kill().expect("SIGKILL the helper");
    let _ = running.child.wait();
    assert_eq!(wait_until_gone(fx.uid), Vec::<i32>::new());
    assert_no_mounts_under(&plan.layout.root);
}

fn background_dies() {
    let fx = Fixture::new();
    let plan =
        fx.plan("sleep 1000 & (sleep 1000 &); nohup sleep 1000 >/dev/null 2>&1 & echo started");
    let out = run(&plan);
    assert_eq!(out.report, HelperReport::Exited(0));
    assert_eq!(out.log, "started\n");
    // The kernel killed and reaped the namespace before the builder's exit status was
    // available, so nothing is left when the helper has reported.
    assert_eq!(processes_of(fx.uid), Vec::<i32>::new());
    assert_no_mounts_under(&plan.layout.root);
}

fn host_files() {
    let fx = Fixture::new();
    let secret = fx.state_file();
    let secret = secret.display();
    // Positive control: the probe itself works on the host.
    assert_eq!(host_sh(&format!("cat {secret}")), "s3cret\n");
    assert!(host_sh("head -c 5 /etc/shadow").starts_with("root:"));
    let out = run_ok(
        &fx,
        &format!(
            "cat {}/share/readable; cat {secret}; cat /etc/shadow; ls {}; echo end",
            store(BUSYBOX),
            fx.objects.display()
        ),
    );
    assert!(out.log.starts_with("closure-file\n"), "{}", out.log);
    assert!(
        out.log.contains(&format!(
            "cat: can't open '{secret}': No such file or directory"
        )),
        "{}",
        out.log
    );
    assert!(
        out.log
            .contains("cat: can't open '/etc/shadow': No such file or directory"),
        "{}",
        out.log
    );
    assert!(out.log.contains("No such file or directory"));
    assert!(!out.log.contains("s3cret"));
}

fn tcp_refused() {
    let fx = Fixture::new();
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    let port = listener.local_addr().expect("addr").port();
    listener.set_nonblocking(true).expect("nonblocking");
    // Positive control: the same probe from the host reaches the listener.
    let server = serve_one_line(&listener);
    host_sh(&format!("echo control | nc 127.0.0.1 {port}"));
    assert_eq!(server.join().expect("server").as_deref(), Some("control\n"));

    let out = run_ok(&fx, &format!("echo inside | nc 127.0.0.1 {port}; echo end"));
    assert!(
        out.log
            .contains("can't connect to remote host (127.0.0.1): Connection refused"),
        "{}",
        out.log
    );
    assert!(listener.accept().is_err(), "the sandbox reached the host");
}

/// Accepts one connection on a thread, reads one line and hangs up (so that `nc` exits).
fn serve_one_line(listener: &TcpListener) -> std::thread::JoinHandle<Option<String>> {
    let listener = listener.try_clone().expect("clone listener");
    std::thread::spawn(move || {
        let end = Instant::now() + DEADLINE;
        while Instant::now() < end {
            if let Ok((conn, _)) = listener.accept() {
                conn.set_nonblocking(false).expect("blocking");
                let mut line = String::new();
                std::io::BufRead::read_line(&mut std::io::BufReader::new(conn), &mut line)
                    .expect("read");
                return Some(line);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    })
}

fn fod_network() {
    let fx = Fixture::new();
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    let port = listener.local_addr().expect("addr").port();
    listener.set_nonblocking(true).expect("nonblocking");
    let name = format!("nixbuild-test-{}", std::process::id());
    let abstract_listener = {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(&name).expect("name");
        std::os::unix::net::UnixListener::bind_addr(&addr).expect("bind abstract")
    };
    // Positive control: the probe binary connects from the host.
    let control = Command::new(std::env::current_exe().expect("exe"))
        .args([PROBE_ARG, "abstract-connect", &name])
        .output()
        .expect("probe");
    assert_eq!(String::from_utf8_lossy(&control.stdout), "ok\n");

    let mut req = fx.request(&format!(
        "echo fod | nc 127.0.0.1 {port}; {}; echo end",
        fx.probe_cmd(&format!("abstract-connect {name}"))
    ));
    req.fixed_output = true;
    let plan = plan(&req, &fx.host()).expect("plan");
    assert!(!plan.namespaces.net);
    let server = serve_one_line(&listener);
    let out = run(&plan);
    assert_eq!(out.report, HelperReport::Exited(0), "{}", out.stderr);
    assert_eq!(server.join().expect("server").as_deref(), Some("fod\n"));
    // Landlock scopes abstract unix sockets (EPERM) where the kernel has the ABI; this one does.
    assert!(out.log.contains("errno 1\n"), "{}\n{}", out.log, out.stderr);
    drop(abstract_listener);
}

fn inputs_read_only() {
    let fx = Fixture::new();
    let share = format!("{}/share", store(BUSYBOX));
    let host_writable = fx.inputs[0].host_path.join("share/writable");
    // Positive control: the files are writable by anyone on the host, so only the read-only
    // mount stops the build.
    assert_eq!(
        std::fs::metadata(&host_writable).expect("stat").mode() & 0o777,
        0o666
    );
    let out = run_ok(
        &fx,
        &format!(
            "echo x > /build/f && echo build-dir-writable; echo x > {share}/writable; \
             touch {share}/wdir/new; echo x > /nix/store/{BUSYBOX}-new; rm -rf {share}; echo end"
        ),
    );
    assert!(out.log.starts_with("build-dir-writable\n"), "{}", out.log);
    assert!(
        out.log
            .contains(&format!("{share}/writable: Read-only file system")),
        "{}",
        out.log
    );
    assert!(
        out.log.contains("touch: new: Read-only file system")
            || out.log.contains("wdir/new: Read-only file system"),
        "{}",
        out.log
    );
    assert_eq!(
        std::fs::read_to_string(&host_writable).expect("read"),
        "original\n"
    );
    assert!(!fx.inputs[0].host_path.join("share/wdir/new").exists());
    assert!(fx.inputs[0].host_path.join("share/readable").exists());
}

fn no_mknod() {
    let fx = Fixture::new();
    // Positive control: root on the host can.
    let dir = fx.dir.path().join("mknod-control");
    std::fs::create_dir(&dir).expect("dir");
    assert_eq!(
        host_sh(&format!("mknod {}/null c 1 3 && echo made", dir.display())),
        "made\n"
    );
    let out = run_ok(
        &fx,
        "mknod /build/fifo p && echo fifo-ok; mknod /build/null c 1 3; echo end",
    );
    assert!(out.log.starts_with("fifo-ok\n"), "{}", out.log);
    assert!(
        out.log
            .contains("mknod: /build/null: Operation not permitted"),
        "{}",
        out.log
    );
}

fn no_mount() {
    let fx = Fixture::new();
    let dir = fx.dir.path().join("mount-control");
    std::fs::create_dir(&dir).expect("dir");
    // Positive control: the probe mounts in a private mount namespace on the host.
    let control = Command::new("unshare")
        .args(["-m", "--propagation", "private"])
        .arg(std::env::current_exe().expect("exe"))
        .args([PROBE_ARG, "mount-tmpfs"])
        .arg(&dir)
        .output()
        .expect("unshare");
    assert_eq!(
        String::from_utf8_lossy(&control.stdout),
        "ok\n",
        "{control:?}"
    );
    let out = run_ok(
        &fx,
        &format!(
            "mkdir /build/m; {}; echo end",
            fx.probe_cmd("mount-tmpfs /build/m")
        ),
    );
    assert_eq!(out.log, "errno 1\nend\n", "{}", out.stderr);
}

fn no_setid_bits() {
    let fx = Fixture::new();
    let file = fx.dir.path().join("setid-control");
    std::fs::write(&file, "").expect("file");
    assert_eq!(
        host_sh(&format!(
            "chmod u+s {0} && chmod g+s {0} && echo set",
            file.display()
        )),
        "set\n"
    );
    assert_eq!(
        std::fs::metadata(&file).expect("stat").mode() & 0o6000,
        0o6000
    );
    // The builder owns the file and is in its group: only the filter refuses.
    let out = run_ok(
        &fx,
        "touch /build/f && chmod 755 /build/f && echo chmod-ok; chmod u+s /build/f; \
         chmod g+s /build/f; mkdir /build/d; chmod g+s /build/d; stat -c %a /build/f; echo end",
    );
    assert!(out.log.starts_with("chmod-ok\n"), "{}", out.log);
    assert!(
        out.log.contains("chmod: /build/f: Operation not permitted"),
        "{}",
        out.log
    );
    assert!(
        out.log.contains("chmod: /build/d: Operation not permitted"),
        "{}",
        out.log
    );
    assert!(out.log.contains("\n755\n"), "{}", out.log);
}

fn no_xattrs() {
    let fx = Fixture::new();
    let file = fx.dir.path().join("xattr-control");
    std::fs::write(&file, "").expect("file");
    let control = Command::new(std::env::current_exe().expect("exe"))
        .args([PROBE_ARG, "setxattr"])
        .arg(&file)
        .output()
        .expect("probe");
    assert_eq!(String::from_utf8_lossy(&control.stdout), "ok\n");
    let out = run_ok(
        &fx,
        &format!(
            "touch /build/f; {0}; {1}; echo end",
            fx.probe_cmd("setxattr /build/f"),
            fx.probe_cmd("getxattr /build/f")
        ),
    );
    assert_eq!(out.log, "errno 95\nerrno 95\nend\n", "{}", out.stderr);
}

fn kvm_only_when_required() {
    let fx = Fixture::new();
    let out = run_ok(&fx, "ls -l /dev/kvm; echo end");
    assert!(
        out.log.contains("/dev/kvm: No such file or directory"),
        "{}",
        out.log
    );

    let mut req = fx.request("ls -l /dev/kvm; echo end");
    req.required_features.insert("kvm".into());
    let host = fx.host();
    if host.has_dev_kvm {
        let out = run(&plan(&req, &host).expect("plan"));
        assert_eq!(out.report, HelperReport::Exited(0));
        assert!(out.log.starts_with("crw"), "{}", out.log);
    } else {
        assert_eq!(
            plan(&req, &host),
            Err(PlanError::MissingFeature("kvm".into()))
        );
    }
}

/// A process on the host running as the build's own uid, so that only the namespaces keep the
/// build from it. Killed when dropped.
struct HostSleeper(std::process::Child);

impl HostSleeper {
    fn start(uid: u32) -> HostSleeper {
        use std::os::unix::process::CommandExt;
        let child = Command::new("/bin/busybox")
            .args(["sleep", "1000"])
            .uid(uid)
            .gid(uid)
            .stdin(Stdio::null())
            .spawn()
            .expect("start a host process");
        HostSleeper(child)
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for HostSleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the probe binary on the host with `args`, as `uid` (root when `None`).
fn host_probe(uid: Option<u32>, args: &[&str]) -> String {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(std::env::current_exe().expect("exe"));
    cmd.arg(PROBE_ARG).args(args).stdin(Stdio::null());
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    let out = cmd.output().expect("probe on the host");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn ptrace_outside() {
    let fx = Fixture::new();
    let host = HostSleeper::start(fx.uid);
    let pid = host.pid().to_string();
    // Positive control: on the host, the same uid may trace it (no Yama restriction here).
    assert_eq!(host_probe(Some(fx.uid), &["ptrace", &pid]), "ok\n");
    // Inside, tracing its own child works, as under Nix (whose filter has no ptrace rule); the
    // host process does not exist in the build's pid namespace.
    let out = run_ok(
        &fx,
        &format!(
            "sleep 1000 & {}; kill $!; {}; echo end",
            fx.probe_cmd("ptrace $!"),
            fx.probe_cmd(&format!("ptrace {pid}"))
        ),
    );
    assert_eq!(out.log, "ok\nerrno 3\nend\n", "{}", out.stderr);
}

fn host_proc() {
    let fx = Fixture::new();
    let host = HostSleeper::start(fx.uid);
    let pid = host.pid();
    // Positive controls: root on the host opens all of these. (This kernel has neither
    // /proc/kcore nor /proc/sysrq-trigger; /proc/kmsg is the root-only file read instead.)
    assert!(std::fs::read(format!("/proc/{pid}/environ")).is_ok());
    std::fs::File::open("/proc/kmsg").expect("open /proc/kmsg on the host");
    for writable in ["/proc/sys/vm/drop_caches", "/proc/sys/kernel/hostname"] {
        std::fs::OpenOptions::new()
            .write(true)
            .open(writable)
            .unwrap_or_else(|e| panic!("{writable} on the host: {e}"));
    }
    let out = run_ok(
        &fx,
        &format!(
            "head -n 1 /proc/self/status; tr '\\0' ' ' < /proc/1/cmdline; echo; \
             cat /proc/{pid}/environ; ls /proc/{pid}; head -c 1 /proc/kmsg; \
             echo 3 > /proc/sys/vm/drop_caches; \
             echo evil > /proc/sys/kernel/hostname; hostname; echo end"
        ),
    );
    let expected = [
        // Its own /proc works: the builder is PID 1 of its namespace.
        "Name:\thead".to_owned(),
        "sh -c head -n 1 /proc/self/status;".to_owned(),
        format!("cat: can't open '/proc/{pid}/environ': No such file or directory"),
        format!("ls: /proc/{pid}: No such file or directory"),
        "head: /proc/kmsg: Permission denied".to_owned(),
        "sh: can't create /proc/sys/vm/drop_caches: Permission denied".to_owned(),
        "sh: can't create /proc/sys/kernel/hostname: Permission denied".to_owned(),
        "localhost".to_owned(),
        "end".to_owned(),
    ];
    let lines: Vec<&str> = out.log.lines().collect();
    assert_eq!(lines.len(), expected.len(), "{}", out.log);
    for (line, want) in lines.iter().zip(&expected) {
        assert!(line.starts_with(want.as_str()), "{want:?} in {}", out.log);
    }
}

fn setns_refused() {
    let fx = Fixture::new();
    let host = HostSleeper::start(fx.uid);
    let pid = host.pid();
    // Positive control: root on the host may enter the host process's mount namespace.
    let host_ns = format!("/proc/{pid}/ns/mnt");
    assert_eq!(host_probe(None, &["setns", &host_ns]), "ok\n");
    // Inside, /proc/1 is the builder itself (no capability to enter even its own
    // namespaces), and the host's processes and their namespace files do not exist.
    let out = run_ok(
        &fx,
        &format!(
            "{}; {}; {}; echo end",
            fx.probe_cmd("setns /proc/1/ns/mnt"),
            fx.probe_cmd("setns /proc/1/ns/net"),
            fx.probe_cmd(&format!("setns /proc/{pid}/ns/mnt"))
        ),
    );
    assert_eq!(
        out.log, "errno 1\nerrno 1\nerrno 2\nend\n",
        "{}",
        out.stderr
    );
}

fn nested_user_namespace() {
    let fx = Fixture::new();
    // Positive control: root on the host maps root into a new user namespace.
    let control = host_probe(None, &["unshare-user", "ro", "/nonexistent"]);
    assert!(
        control.starts_with("unshare ok\nmap-host-root ok\n"),
        "{control}"
    );
    let input = store(BUSYBOX);
    let out = run_ok(
        &fx,
        &format!(
            "{}; {}; echo end",
            fx.probe_cmd("unshare-user ro /build"),
            fx.probe_cmd(&format!("unshare-user rw {input}"))
        ),
    );
    // Nix allows nested user namespaces too; within one, root is only the build's own uid, and
    // the read-only flag of an input's mount is locked (EPERM), while adding it (the control,
    // on /build) works.
    let each = |remount: &str| {
        format!("unshare ok\nmap-host-root errno 1\nmap-own-uid ok\nunshare-mount ok\nremount {remount}\n")
    };
    assert_eq!(
        out.log,
        format!("{}{}end\n", each("ok"), each("errno 1")),
        "{}",
        out.stderr
    );
}

/// Runs `f` on a thread of its own that first joins a new session keyring: session keyrings
/// belong to a thread's credentials, and what it spawns (the helper) inherits them, as the
/// sandbox helper inherits a systemd service's.
fn with_session_keyring<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            keys::join_new_session().expect("join a new session keyring");
            f()
        })
        .join()
        .expect("keyring thread")
    })
}

/// `cat /proc/keys` on the host as `uid`, from the calling thread (its session keyring).
fn host_proc_keys(uid: u32) -> String {
    use std::os::unix::process::CommandExt;
    let out = Command::new("/bin/busybox")
        .args(["cat", "/proc/keys"])
        .uid(uid)
        .gid(uid)
        .stdin(Stdio::null())
        .output()
        .expect("cat /proc/keys on the host");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn daemon_keyring_out_of_reach() {
    let fx = Fixture::new();
    let desc = format!("nixbuild-test-daemon-key-{}", std::process::id());
    with_session_keyring(|| {
        // The daemon's session keyring holds a secret (as a systemd service's may).
        let serial = keys::add(&desc, b"daemon-s3cret", libc::KEY_SPEC_SESSION_KEYRING)
            .expect("add the daemon's key");
        // Positive controls: a host process of the build's own uid, spawned like the helper,
        // possesses the daemon's session keyring, so it finds the key, reads it and sees it
        // in /proc/keys; only the sandbox stops the build.
        let control = host_probe(Some(fx.uid), &["keyring-find", &desc]);
        assert!(control.starts_with("@s found "), "{control}");
        assert_eq!(
            host_probe(Some(fx.uid), &["keyring-read", &serial.to_string()]),
            "read ok daemon-s3cret\n"
        );
        assert!(host_proc_keys(fx.uid).contains(&desc));

        let out = run_ok(
            &fx,
            &format!(
                "{}; {}; cat /proc/keys; echo end",
                fx.probe_cmd(&format!("keyring-find {desc}")),
                fx.probe_cmd(&format!("keyring-read {serial}"))
            ),
        );
        assert!(!out.log.contains("found"), "{}", out.log);
        assert!(!out.log.contains("daemon-s3cret"), "{}", out.log);
        assert!(
            !out.log.contains(&desc),
            "listed in /proc/keys: {}",
            out.log
        );
        // The key exists but the build may not read it (EACCES), not even knowing its serial.
        assert!(out.log.contains("read errno 13\n"), "{}", out.log);
        assert!(out.log.ends_with("end\n"), "{}", out.log);
    });
}

/// The serials a `keyring-add` probe printed.
fn added_serials(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| l.split_once(" added "))
        .map(|(_, serial)| serial.to_owned())
        .collect()
}

fn build_keys_not_shared() {
    let fx = Fixture::new();
    let other = Fixture::new();
    assert_ne!(fx.uid, other.uid);
    let desc = format!("nixbuild-test-build-key-{}", std::process::id());
    with_session_keyring(|| {
        // The first build adds a key to its session and user keyrings and finds both (the
        // positive control).
        let first = run_ok(
            &fx,
            &format!(
                "{}; {}",
                fx.probe_cmd(&format!("keyring-add {desc}")),
                fx.probe_cmd(&format!("keyring-find {desc}"))
            ),
        );
        let serials = added_serials(&first.log);
        assert_eq!(serials.len(), 2, "{}", first.log);
        assert!(first.log.contains("@s found "), "{}", first.log);
        assert!(first.log.contains("@u found "), "{}", first.log);
        let script = |fx: &Fixture| {
            format!(
                "{}; {}; cat /proc/keys; echo end",
                fx.probe_cmd(&format!("keyring-find {desc}")),
                fx.probe_cmd(&format!("keyring-read {}", serials.join(" ")))
            )
        };
        // Later builds, of another uid and of the same uid, find nothing and read nothing:
        // their session keyrings are new, and their user keyrings belong to their own user
        // namespaces (checked here, not assumed: before Linux 5.3 `@u` was per host uid).
        for later in [&other, &fx] {
            let out = run_ok(later, &script(later));
            assert!(!out.log.contains("found"), "uid {}: {}", later.uid, out.log);
            assert!(
                !out.log.contains("read ok"),
                "uid {}: {}",
                later.uid,
                out.log
            );
            assert!(
                !out.log.contains("secret-of"),
                "uid {}: {}",
                later.uid,
                out.log
            );
            assert!(out.log.ends_with("end\n"), "{}", out.log);
            // Another uid never sees the key in /proc/keys (its owner is not mapped in the
            // build's user namespace). The same uid may see its description there (not its
            // payload: owners get only view permission) until the kernel's key garbage
            // collector has run, some milliseconds after the first build's processes ended.
            if later.uid != fx.uid {
                assert!(!out.log.contains(&desc), "uid {}: {}", later.uid, out.log);
            }
        }
    });
}
