//! The executor: the helper mode of the daemon's own executable performs a [`SandboxPlan`]
//! (`docs/design.md`: "The sandbox helper is a mode of the same executable").
//!
//! The daemon spawns [`helper_command`], writes [`encode_plan`](crate::encode_plan) to its
//! stdin and closes it. The helper, a fresh single-threaded process, then:
//!
//! 1. performs the plan's helper steps before `clone` ([`Step::PrivateMounts`],
//!    [`Step::HostOps`], [`Step::DropSupplementaryGroups`]) as root on the host, in a mount
//!    namespace of its own (the root's tmpfs is mounted there);
//! 2. opens the log pty (raw mode), the set-up error pipe and the sync pipe, and `clone`s the
//!    child with the plan's namespaces ([`Step::Clone`]);
//! 3. writes the id maps ([`Step::WriteIdMaps`]) and releases the child through the sync pipe;
//! 4. the child arms `PR_SET_PDEATHSIG` (SIGKILL), waits for the release, performs the child
//!    steps in the plan's order and `execve`s the builder, which is PID 1 of its PID namespace;
//! 5. the helper copies the pty to its stdout (without the [`SETUP_DONE`] marker) until the
//!    builder exits, then writes the report line on stderr and exits.
//!
//! Killing the helper (SIGKILL) kills the builder through the parent-death signal, and the
//! kernel kills everything else in its PID namespace. The mounts exist only in the helper's
//! and the child's mount namespaces, so they go with their last process. The helper never removes
//! the scratch directory: the daemon takes the outputs out of `<scratch>/store` first.

mod child;
// The system calls: the only module of the workspace allowed `unsafe` code.
#[allow(unsafe_code)]
mod sys;

use std::ffi::{CString, OsStr};
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::{Command, Stdio};

use rustix::event::{poll, PollFd, PollFlags};
use rustix::fs::{fchmod, fchown, mkdirat, openat, symlinkat, Mode, OFlags, CWD};
use rustix::io::Errno;
use rustix::mount::{MountFlags, MountPropagationFlags};
use rustix::process::{
    pidfd_open, pidfd_send_signal, Gid, Pid, PidfdFlags, Signal, Uid, WaitOptions,
};

use crate::helper_messages::{decode_plan, HelperReport, PlanDecodeError};
use crate::seccomp::SeccompError;
use crate::{HostOp, IdMaps, SandboxPlan, Step, SETUP_DONE};
use child::{Child, ExecArgs};

/// `argv[1]` that puts the executable in helper mode.
pub const HELPER_ARG: &str = "__nixbuild-sandbox-helper";

/// The largest plan the helper reads (a closure of 10,000 paths is a few MiB).
const MAX_PLAN_LEN: u64 = 256 << 20;
/// The largest set-up error message the helper reads from the child.
const MAX_SETUP_ERROR_LEN: u64 = 64 << 10;

/// Why the helper could not run the plan. Every variant ends up as
/// [`HelperReport::SetupFailed`] with this text.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// Reading stdin failed.
    #[error("reading the plan from stdin: {0}")]
    ReadPlan(#[source] std::io::Error),
    /// The plan is larger than the helper accepts.
    #[error("the plan on stdin is larger than {MAX_PLAN_LEN} bytes")]
    PlanTooLarge,
    /// The plan could not be decoded.
    #[error("decoding the plan: {0}")]
    DecodePlan(#[from] PlanDecodeError),
    /// The plan's steps are not in an order the executor can perform.
    #[error("the plan's steps are out of order: {0}")]
    StepOrder(String),
    /// The seccomp table could not be compiled.
    #[error("compiling the seccomp filter: {0}")]
    Seccomp(#[from] SeccompError),
    /// The builder, an argument or an environment entry contains a NUL byte.
    #[error("{0} contains a NUL byte")]
    Nul(&'static str),
    /// A system call failed; `what` names the step and its arguments.
    #[error("{what}: {source}")]
    Sys {
        /// The step.
        what: String,
        /// The error, with its errno.
        source: std::io::Error,
    },
    /// The child reported a set-up failure (its message).
    #[error("{0}")]
    Child(String),
    /// The child ended before it started the builder, without a message.
    #[error("the sandbox's first process ended ({0}) before starting the builder")]
    ChildDied(String),
    /// The helper died while the child was setting up.
    #[error("the helper process is gone")]
    HelperGone,
}

/// Names a failed system call (rustix's errors).
fn sys_err(what: impl Into<String>) -> impl FnOnce(Errno) -> ExecError {
    let what = what.into();
    move |e| ExecError::Sys {
        what,
        source: e.into(),
    }
}

/// Names a failed system call (std's errors).
fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ExecError {
    let what = what.into();
    move |source| ExecError::Sys { what, source }
}

/// The first line of `main()` of every binary that may build. Returns at once unless
/// `argv[1]` is [`HELPER_ARG`]; in helper mode it runs the plan read from stdin and exits the
/// process (never returns).
pub fn maybe_run_helper() {
    if std::env::args_os().nth(1).as_deref() != Some(OsStr::new(HELPER_ARG)) {
        return;
    }
    let report = match run_helper() {
        Ok(report) => report,
        Err(e) => HelperReport::SetupFailed(e.to_string()),
    };
    eprintln!("{}", report.line());
    std::process::exit(match report {
        HelperReport::SetupFailed(_) => 1,
        HelperReport::Exited(_) | HelperReport::Signaled(_) => 0,
    })
}

/// `exe HELPER_ARG` with stdin, stdout and stderr piped, ready to spawn. `exe` is normally
/// `/proc/self/exe`.
///
/// The caller writes the plan to stdin and closes it, streams stdout (the builder's output)
/// and collects stderr (diagnostics, then the report line for
/// [`parse_report`](crate::parse_report)). To kill the build, SIGKILL the helper.
pub fn helper_command(exe: &Path) -> Command {
    let mut cmd = Command::new(exe);
    cmd.arg(HELPER_ARG)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Where each step runs.
struct StepOrder<'a> {
    before_clone: &'a [Step],
    after_clone: &'a [Step],
    child: &'a [Step],
}

fn runs_in_helper(step: Step) -> bool {
    matches!(
        step,
        Step::PrivateMounts
            | Step::HostOps
            | Step::DropSupplementaryGroups
            | Step::Clone
            | Step::WriteIdMaps
    )
}

impl<'a> StepOrder<'a> {
    /// Helper steps, `Clone`, helper steps, child steps ending with `Exec`.
    fn split(steps: &'a [Step]) -> Result<StepOrder<'a>, ExecError> {
        let err = |m: &str| Err(ExecError::StepOrder(format!("{m}: {steps:?}")));
        let Some(at) = steps.iter().position(|s| *s == Step::Clone) else {
            return err("no Clone step");
        };
        let (before_clone, rest) = (&steps[..at], &steps[at + 1..]);
        let helper_after = rest.iter().take_while(|s| runs_in_helper(**s)).count();
        let (after_clone, child) = rest.split_at(helper_after);
        if before_clone
            .iter()
            .chain(after_clone)
            .any(|s| *s == Step::Clone)
        {
            return err("more than one Clone step");
        }
        if child.iter().any(|s| runs_in_helper(*s)) {
            return err("a helper step among the child steps");
        }
        if child.last() != Some(&Step::Exec)
            || child.iter().filter(|s| **s == Step::Exec).count() != 1
        {
            return err("the child steps must end with the only Exec");
        }
        if before_clone.iter().any(|s| !runs_in_helper(*s)) {
            return err("a child step before Clone");
        }
        Ok(StepOrder {
            before_clone,
            after_clone,
            child,
        })
    }
}

fn read_plan() -> Result<SandboxPlan, ExecError> {
    let mut bytes = Vec::new();
    std::io::stdin()
        .lock()
        .take(MAX_PLAN_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(ExecError::ReadPlan)?;
    if bytes.len() as u64 > MAX_PLAN_LEN {
        return Err(ExecError::PlanTooLarge);
    }
    Ok(decode_plan(&bytes)?)
}

fn cstring(what: &'static str, bytes: &[u8]) -> Result<CString, ExecError> {
    CString::new(bytes).map_err(|_| ExecError::Nul(what))
}

fn exec_args(plan: &SandboxPlan) -> Result<ExecArgs, ExecError> {
    let exec = &plan.exec;
    Ok(ExecArgs {
        path: cstring("the builder", &exec.path)?,
        argv: exec
            .argv
            .iter()
            .map(|a| cstring("an argument", a))
            .collect::<Result<_, _>>()?,
        env: exec
            .env
            .iter()
            .map(|(k, v)| cstring("an environment entry", &[k.as_slice(), b"=", v].concat()))
            .collect::<Result<_, _>>()?,
    })
}

/// A host-side step, as root, creating exactly the path named (never following a symlink at
/// it: `mkdir`, `O_CREAT | O_EXCL | O_NOFOLLOW` and `symlink` all fail on an existing entry).
/// The owner is set before the mode, because `chown` clears set-id bits. A `tmpfs` is
/// mounted only in a mount namespace of the helper's own (`private_mounts`).
fn host_op(op: &HostOp, private_mounts: bool) -> Result<(), ExecError> {
    let owner = |fd: &OwnedFd, path: &Path, mode: u32, uid: u32, gid: u32| {
        fchown(fd, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid))).map_err(sys_err(
            format!("host: chown({}, {uid}, {gid})", path.display()),
        ))?;
        fchmod(fd, Mode::from_raw_mode(mode)).map_err(sys_err(format!(
            "host: chmod({}, {mode:o})",
            path.display()
        )))
    };
    match op {
        HostOp::CreateDir {
            path,
            mode,
            uid,
            gid,
        } => {
            mkdirat(CWD, path, Mode::from_raw_mode(0o700))
                .map_err(sys_err(format!("host: mkdir({})", path.display())))?;
            let fd = openat(
                CWD,
                path,
                OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(sys_err(format!("host: open({})", path.display())))?;
            owner(&fd, path, *mode, *uid, *gid)
        }
        HostOp::CreateFile {
            path,
            contents,
            mode,
            uid,
            gid,
        } => {
            let fd = openat(
                CWD,
                path,
                OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::WRONLY | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
            .map_err(sys_err(format!("host: create({})", path.display())))?;
            let mut file = std::fs::File::from(fd);
            file.write_all(contents)
                .map_err(io_err(format!("host: write({})", path.display())))?;
            owner(&OwnedFd::from(file), path, *mode, *uid, *gid)
        }
        HostOp::Symlink { path, target } => symlinkat(target, CWD, path).map_err(sys_err(format!(
            "host: symlink({} -> {})",
            path.display(),
            target.display()
        ))),
        HostOp::Tmpfs { path, .. } if !private_mounts => Err(ExecError::StepOrder(format!(
            "a tmpfs on {} before the helper's private mount namespace",
            path.display()
        ))),
        HostOp::Tmpfs { path, options } => {
            let data = child::mount_data(options)?;
            rustix::mount::mount(
                "tmpfs",
                path,
                "tmpfs",
                MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
                Some(&*data),
            )
            .map_err(sys_err(format!(
                "host: mount tmpfs ({options}) on {}",
                path.display()
            )))
        }
    }
}

/// [`Step::PrivateMounts`]: a mount namespace of the helper's own, with nothing propagating
/// to or from the host.
fn private_mounts() -> Result<(), ExecError> {
    sys::unshare_mount_namespace().map_err(io_err("unshare(CLONE_NEWNS)"))?;
    rustix::mount::mount_change(
        "/",
        MountPropagationFlags::PRIVATE | MountPropagationFlags::REC,
    )
    .map_err(sys_err("host: making / private (MS_PRIVATE | MS_REC)"))
}

fn write_id_maps(pid: i32, maps: &IdMaps) -> Result<(), ExecError> {
    for (file, text) in [
        ("uid_map", maps.uid_map.line()),
        ("setgroups", maps.setgroups.to_string()),
        ("gid_map", maps.gid_map.line()),
    ] {
        let path = format!("/proc/{pid}/{file}");
        std::fs::write(&path, &text).map_err(io_err(format!("writing {text:?} to {path}")))?;
    }
    Ok(())
}

/// The pty that carries the builder's stdout and stderr: `(master, slave)`, slave in raw mode.
fn open_pty() -> Result<(OwnedFd, OwnedFd), ExecError> {
    use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
    use rustix::termios::{tcgetattr, tcsetattr, OptionalActions};
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)
        .map_err(sys_err("opening /dev/ptmx"))?;
    grantpt(&master).map_err(sys_err("grantpt"))?;
    unlockpt(&master).map_err(sys_err("unlockpt"))?;
    let name = ptsname(&master, Vec::new()).map_err(sys_err("ptsname"))?;
    let slave = openat(
        CWD,
        name.as_c_str(),
        OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(sys_err(format!("opening {}", name.to_string_lossy())))?;
    let mut termios = tcgetattr(&slave).map_err(sys_err("tcgetattr(pty)"))?;
    termios.make_raw();
    tcsetattr(&slave, OptionalActions::Now, &termios).map_err(sys_err("tcsetattr(pty, raw)"))?;
    Ok((master, slave))
}

/// The cloned child, killed and reaped if the helper gives up on it.
struct ChildProcess {
    pid: Pid,
    pidfd: OwnedFd,
    reaped: bool,
}

impl ChildProcess {
    fn kill(&self) {
        // Fails only if it is already a zombie, which is the goal.
        let _ = pidfd_send_signal(&self.pidfd, Signal::KILL);
    }

    fn wait(&mut self) -> Result<rustix::process::WaitStatus, ExecError> {
        loop {
            match rustix::process::waitpid(Some(self.pid), WaitOptions::empty()) {
                Ok(Some((_, status))) => {
                    self.reaped = true;
                    return Ok(status);
                }
                Ok(None) | Err(Errno::INTR) => continue,
                Err(e) => return Err(sys_err("waitpid")(e)),
            }
        }
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if !self.reaped {
            self.kill();
            let _ = self.wait();
        }
    }
}

/// Strips [`SETUP_DONE`] from the start of the pty's output.
struct Marker {
    /// Bytes seen so far while the marker may still be arriving.
    head: Vec<u8>,
    seen: Option<bool>,
}

impl Marker {
    /// The part of `chunk` to forward.
    fn strip<'a>(&mut self, chunk: &'a [u8]) -> std::borrow::Cow<'a, [u8]> {
        if self.seen.is_some() {
            return chunk.into();
        }
        let need = SETUP_DONE.len() - self.head.len();
        let take = need.min(chunk.len());
        self.head.extend_from_slice(&chunk[..take]);
        if self.head.len() < SETUP_DONE.len() && SETUP_DONE.starts_with(&self.head) {
            return (&[][..]).into();
        }
        if self.head == SETUP_DONE {
            self.seen = Some(true);
            return chunk[take..].into();
        }
        // Not the marker: forward everything.
        self.seen = Some(false);
        let mut all = std::mem::take(&mut self.head);
        all.extend_from_slice(&chunk[take..]);
        all.into()
    }
}

/// Copies the builder's output to stdout until the child has exited and the pty is drained.
/// Returns whether the set-up marker arrived.
fn pump(master: OwnedFd, child: &ChildProcess) -> Result<bool, ExecError> {
    let mut marker = Marker {
        head: Vec::new(),
        seen: None,
    };
    let mut stdout = std::io::stdout().lock();
    let mut stdout_open = true;
    let mut master_open = true;
    let mut buf = vec![0u8; 64 << 10];
    let mut forward = |data: &[u8], stdout_open: &mut bool| {
        let data = marker.strip(data);
        if *stdout_open && !data.is_empty() {
            if let Err(e) = stdout.write_all(&data).and_then(|()| stdout.flush()) {
                // Nobody reads the log any more: the daemon is gone or gave up on the build.
                eprintln!(
                    "nixbuild-sandbox: writing the build log failed ({e}); killing the build"
                );
                *stdout_open = false;
                child.kill();
            }
        }
    };
    // The log pipe is watched too: when its reader (the daemon) is gone, even a silent
    // build must not outlive it.
    let log_pipe = std::io::stdout();
    loop {
        let (exited, reader_gone, readable) = {
            let mut fds = vec![PollFd::new(&child.pidfd, PollFlags::IN)];
            if master_open {
                fds.push(PollFd::new(&master, PollFlags::IN));
            }
            if stdout_open {
                fds.push(PollFd::new(&log_pipe, PollFlags::empty()));
            }
            match poll(&mut fds, None) {
                Ok(_) | Err(Errno::INTR) => {}
                Err(e) => return Err(sys_err("poll")(e)),
            }
            (
                fds[0].revents().contains(PollFlags::IN),
                stdout_open
                    && fds[fds.len() - 1]
                        .revents()
                        .intersects(PollFlags::ERR | PollFlags::HUP),
                master_open && !fds[1].revents().is_empty(),
            )
        };
        if reader_gone {
            eprintln!("nixbuild-sandbox: nobody reads the build log any more; killing the build");
            stdout_open = false;
            child.kill();
        }
        if readable {
            match rustix::io::read(&master, &mut buf) {
                Ok(0) | Err(Errno::IO) => master_open = false,
                Ok(n) => forward(&buf[..n], &mut stdout_open),
                Err(Errno::INTR | Errno::AGAIN) => {}
                Err(e) => return Err(sys_err("reading the pty")(e)),
            }
        }
        if exited {
            break;
        }
    }
    // PID 1 is gone, so is everything else in its namespace: what is left in the pty is all
    // there will be. Non-blocking, in case a descriptor of the slave escaped the namespace.
    let mut flags = rustix::fs::fcntl_getfl(&master).map_err(sys_err("fcntl(pty, F_GETFL)"))?;
    flags |= OFlags::NONBLOCK;
    rustix::fs::fcntl_setfl(&master, flags).map_err(sys_err("fcntl(pty, F_SETFL)"))?;
    while master_open {
        match rustix::io::read(&master, &mut buf) {
            Ok(0) | Err(Errno::IO | Errno::AGAIN) => master_open = false,
            Ok(n) => forward(&buf[..n], &mut stdout_open),
            Err(Errno::INTR) => {}
            Err(e) => return Err(sys_err("reading the pty")(e)),
        }
    }
    Ok(marker.seen == Some(true))
}

fn run_helper() -> Result<HelperReport, ExecError> {
    let plan = read_plan()?;
    let order = StepOrder::split(&plan.steps)?;
    let mut private = false;
    for &step in order.before_clone {
        match step {
            Step::PrivateMounts if !private => {
                private_mounts()?;
                private = true;
            }
            Step::HostOps => plan
                .host_ops
                .iter()
                .try_for_each(|op| host_op(op, private))?,
            Step::DropSupplementaryGroups => {
                rustix::thread::set_thread_groups(&[]).map_err(sys_err("setgroups(0, NULL)"))?
            }
            other => return Err(ExecError::StepOrder(format!("{other:?} before Clone"))),
        }
    }

    // Everything the child needs is prepared here, so that its failures are only system calls.
    let filter = plan.seccomp.to_bpf()?;
    let exec = exec_args(&plan)?;
    if plan.landlock_scope_abstract_unix_sockets && order.child.contains(&Step::Landlock) {
        match sys::landlock_abi() {
            Ok(Some(abi)) if abi >= sys::LANDLOCK_ABI_SCOPES => {}
            other => eprintln!(
                "nixbuild-sandbox: Landlock ABI {other:?} has no abstract unix socket scope; \
                 the build runs without it"
            ),
        }
    }
    let (master, slave) = open_pty()?;
    let (err_r, err_w) =
        rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(sys_err("pipe"))?;
    let (sync_r, sync_w) =
        rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(sys_err("pipe"))?;

    let flags = plan.namespaces.clone_flags();
    // The helper runs first in main, before anything that could start a thread;
    // `clone_process` checks that, and fails the build otherwise.
    let forked = sys::clone_process(flags).map_err(io_err(format!(
        "clone with namespaces {:?} (flags {flags:#x})",
        plan.namespaces
    )))?;
    let pid = match forked {
        sys::Forked::Child => Child {
            plan: &plan,
            steps: order.child,
            filter: &filter,
            exec: &exec,
            slave: Some(slave),
            err_w,
            sync_r,
        }
        .run(vec![master, err_r, sync_w]),
        sys::Forked::Parent(pid) => pid,
    };
    drop((slave, err_w, sync_r));
    let pid = Pid::from_raw(pid)
        .ok_or_else(|| ExecError::ChildDied(format!("clone returned pid {pid}")))?;
    let pidfd = pidfd_open(pid, PidfdFlags::empty()).map_err(sys_err("pidfd_open"))?;
    let mut child = ChildProcess {
        pid,
        pidfd,
        reaped: false,
    };

    for &step in order.after_clone {
        match step {
            Step::WriteIdMaps => write_id_maps(pid.as_raw_nonzero().get(), &plan.id_maps)?,
            other => return Err(ExecError::StepOrder(format!("{other:?} right after Clone"))),
        }
    }
    // Release the child. `sync_w` stays open until the helper exits: the child watches it.
    rustix::io::write(&sync_w, b"1").map_err(sys_err("releasing the child"))?;
    let mut message = Vec::new();
    std::fs::File::from(err_r)
        .take(MAX_SETUP_ERROR_LEN)
        .read_to_end(&mut message)
        .map_err(io_err("reading the set-up error pipe"))?;
    if !message.is_empty() {
        return Err(ExecError::Child(
            String::from_utf8_lossy(&message).into_owned(),
        ));
    }

    let marker_seen = pump(master, &child)?;
    let status = child.wait()?;
    drop(sync_w);
    if !marker_seen {
        return Err(ExecError::ChildDied(format!("{status:?}")));
    }
    match (status.exit_status(), status.terminating_signal()) {
        (Some(code), _) => Ok(HelperReport::Exited(code)),
        (_, Some(sig)) => Ok(HelperReport::Signaled(sig)),
        _ => Err(ExecError::ChildDied(format!("{status:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan;
    use crate::tests::{sample_host, sample_request};

    #[test]
    fn the_plan_steps_split_at_clone() {
        let plan = plan(&sample_request(), &sample_host()).expect("plan");
        let order = StepOrder::split(&plan.steps).expect("valid order");
        assert_eq!(
            order.before_clone,
            [
                Step::PrivateMounts,
                Step::HostOps,
                Step::DropSupplementaryGroups
            ]
        );
        assert_eq!(order.after_clone, [Step::WriteIdMaps]);
        assert_eq!(order.child.first(), Some(&Step::Stdio));
        assert_eq!(order.child.last(), Some(&Step::Exec));
    }

    #[test]
    fn misordered_steps_are_refused() {
        let plan = plan(&sample_request(), &sample_host()).expect("plan");
        let bad: Vec<Vec<Step>> = vec![
            plan.steps
                .iter()
                .copied()
                .filter(|s| *s != Step::Clone)
                .collect(),
            plan.steps
                .iter()
                .copied()
                .filter(|s| *s != Step::Exec)
                .collect(),
            [&[Step::Seccomp][..], &plan.steps].concat(),
            [&plan.steps[..], &[Step::HostOps]].concat(),
            [&plan.steps[..], &[Step::Exec]].concat(),
            [&[Step::Clone][..], &plan.steps].concat(),
        ];
        for steps in bad {
            assert!(
                matches!(StepOrder::split(&steps), Err(ExecError::StepOrder(_))),
                "{steps:?}"
            );
        }
    }

    #[test]
    fn the_marker_is_stripped_even_when_split() {
        let feed = |chunks: &[&[u8]]| {
            let mut m = Marker {
                head: Vec::new(),
                seen: None,
            };
            let out: Vec<u8> = chunks
                .iter()
                .flat_map(|c| m.strip(c).into_owned())
                .collect();
            (out, m.seen)
        };
        assert_eq!(feed(&[b"\x02\nhello"]), (b"hello".to_vec(), Some(true)));
        assert_eq!(
            feed(&[b"\x02", b"\nhi", b"\x02\n"]),
            (b"hi\x02\n".to_vec(), Some(true))
        );
        assert_eq!(feed(&[b"\x02", b"x"]), (b"\x02x".to_vec(), Some(false)));
        assert_eq!(feed(&[b"oops"]), (b"oops".to_vec(), Some(false)));
        assert_eq!(feed(&[b"\x02"]), (Vec::new(), None));
    }
}
