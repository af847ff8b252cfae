//! The sandbox's first process, between `clone` and `execve`: it performs the plan's child
//! steps in order and reports a failure through the set-up error pipe.

use std::convert::Infallible;
use std::ffi::CString;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use rustix::event::{poll, PollFd, PollFlags};
use rustix::fs::{openat, Mode, OFlags, StatVfsMountFlags, CWD};
use rustix::mount::{MountFlags, MountPropagationFlags, UnmountFlags};
use rustix::process::{Resource, Rlimit, Signal};
use rustix::thread::{set_thread_gid, set_thread_uid};

use super::{io_err, sys, sys_err, ExecError};
use crate::seccomp::BpfInsn;
use crate::{MountOp, RlimitResource, RlimitValue, SandboxPlan, Step, SETUP_DONE};

/// `execve`'s arguments, converted before `clone` so that a NUL byte is a set-up error.
pub(super) struct ExecArgs {
    pub(super) path: CString,
    pub(super) argv: Vec<CString>,
    pub(super) env: Vec<CString>,
}

/// What the child needs, owned by it after `clone`.
pub(super) struct Child<'a> {
    pub(super) plan: &'a SandboxPlan,
    pub(super) steps: &'a [Step],
    pub(super) filter: &'a [BpfInsn],
    pub(super) exec: &'a ExecArgs,
    /// The log pty's slave side, which becomes stdout and stderr.
    pub(super) slave: Option<OwnedFd>,
    /// Close-on-exec: a message written here is a set-up failure; EOF without one means the
    /// `execve` happened.
    pub(super) err_w: OwnedFd,
    /// The helper writes one byte once the id maps are in place; after that, the pipe hangs up
    /// only when the helper is gone.
    pub(super) sync_r: OwnedFd,
}

impl Child<'_> {
    /// Runs the child steps; never returns. `parent_fds` are the helper's ends of the pipes
    /// and the pty master, closed first.
    pub(super) fn run(mut self, parent_fds: Vec<OwnedFd>) -> ! {
        drop(parent_fds);
        let result = catch_unwind(AssertUnwindSafe(|| self.setup()));
        let msg = match result {
            Ok(Err(e)) => e.to_string(),
            Err(_) => "the sandbox child panicked during set-up".to_string(),
        };
        let _ = rustix::io::write(&self.err_w, msg.as_bytes());
        sys::exit_now(1)
    }

    fn setup(&mut self) -> Result<Infallible, ExecError> {
        // Armed before waiting for the helper, so that the helper dying at any later point
        // kills this process (PID 1 of the sandbox), and with it everything in the sandbox.
        self.arm_parent_death_signal()?;
        let mut byte = [0u8];
        let n = loop {
            match rustix::io::read(&self.sync_r, &mut byte) {
                Err(rustix::io::Errno::INTR) => continue,
                r => break r.map_err(sys_err("waiting for the helper to write the id maps"))?,
            }
        };
        if n == 0 {
            return Err(ExecError::HelperGone);
        }
        for &step in self.steps {
            self.step(step)?;
        }
        Err(ExecError::StepOrder(
            "the child steps do not end with Exec".into(),
        ))
    }

    /// `PR_SET_PDEATHSIG`, then a check that the helper did not die before it was armed (the
    /// sync pipe then has no writer left). A change of uid or gid disarms it, so it is armed
    /// again after each.
    fn arm_parent_death_signal(&self) -> Result<(), ExecError> {
        rustix::process::set_parent_process_death_signal(Some(Signal::KILL))
            .map_err(sys_err("prctl(PR_SET_PDEATHSIG, SIGKILL)"))?;
        let mut fds = [PollFd::new(&self.sync_r, PollFlags::IN)];
        let zero = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        poll(&mut fds, Some(&zero)).map_err(sys_err("polling the helper's pipe"))?;
        if fds[0].revents().intersects(PollFlags::HUP | PollFlags::ERR) {
            return Err(ExecError::HelperGone);
        }
        Ok(())
    }

    fn step(&mut self, step: Step) -> Result<(), ExecError> {
        let plan = self.plan;
        match step {
            Step::Stdio => self.stdio(),
            Step::SessionKeyring => sys::join_new_session_keyring().map_err(io_err(
                "keyctl(KEYCTL_JOIN_SESSION_KEYRING, NULL): a new session keyring",
            )),
            Step::LoopbackUp => {
                if plan.loopback_up {
                    sys::loopback_up().map_err(io_err("bringing up lo"))?;
                }
                Ok(())
            }
            Step::Hostname => {
                rustix::system::sethostname(plan.hostname.as_bytes())
                    .map_err(sys_err(format!("sethostname({:?})", plan.hostname)))?;
                rustix::system::setdomainname(plan.domainname.as_bytes())
                    .map_err(sys_err(format!("setdomainname({:?})", plan.domainname)))
            }
            Step::Mounts => plan.mounts.iter().try_for_each(mount_op),
            Step::NoNewPrivs => {
                if plan.no_new_privs {
                    rustix::thread::set_no_new_privs(true)
                        .map_err(sys_err("prctl(PR_SET_NO_NEW_PRIVS)"))?;
                }
                Ok(())
            }
            Step::Seccomp => {
                sys::load_seccomp(self.filter).map_err(io_err("loading the seccomp filter"))
            }
            Step::Landlock => {
                if !plan.landlock_scope_abstract_unix_sockets {
                    return Ok(());
                }
                match sys::landlock_abi().map_err(io_err("querying the Landlock ABI"))? {
                    Some(abi) if abi >= sys::LANDLOCK_ABI_SCOPES => {
                        sys::landlock_scope_abstract_unix_sockets()
                            .map_err(io_err("Landlock: scoping abstract unix sockets"))
                    }
                    // Like Nix: without the scope ABI the build runs without it (the helper
                    // logged this before cloning).
                    _ => Ok(()),
                }
            }
            Step::Personality => {
                let p = plan.personality;
                let persona = if p.linux32 { sys::PER_LINUX32 } else { 0 }
                    | if p.addr_no_randomize {
                        sys::ADDR_NO_RANDOMIZE
                    } else {
                        0
                    };
                sys::personality(persona).map_err(io_err(format!("personality({persona:#x})")))
            }
            Step::Chdir => {
                rustix::process::chdir(plan.cwd).map_err(sys_err(format!("chdir({:?})", plan.cwd)))
            }
            Step::CloseFds => {
                sys::cloexec_from(3).map_err(io_err("close_range(3.., CLOSE_RANGE_CLOEXEC)"))
            }
            Step::Rlimits => plan
                .rlimits
                .iter()
                .try_for_each(|r| set_rlimit(r.resource, r.soft, r.hard)),
            Step::Umask => {
                rustix::process::umask(Mode::from_raw_mode(plan.umask));
                Ok(())
            }
            Step::SetGid => {
                set_thread_gid(rustix::process::Gid::from_raw(plan.gid))
                    .map_err(sys_err(format!("setgid({})", plan.gid)))?;
                self.arm_parent_death_signal()
            }
            Step::SetUid => {
                set_thread_uid(rustix::process::Uid::from_raw(plan.uid))
                    .map_err(sys_err(format!("setuid({})", plan.uid)))?;
                self.arm_parent_death_signal()
            }
            Step::SetupDone => std::io::stderr()
                .write_all(SETUP_DONE)
                .map_err(io_err("writing the set-up marker")),
            Step::Exec => {
                sys::reset_signals();
                let e = sys::execve(&self.exec.path, &self.exec.argv, &self.exec.env);
                // The marker is out: like Nix, this is the builder's failure, told in its log.
                let _ = writeln!(
                    std::io::stderr(),
                    "error: executing '{}': {e}",
                    self.exec.path.to_string_lossy()
                );
                sys::exit_now(1)
            }
            Step::PrivateMounts
            | Step::HostOps
            | Step::DropSupplementaryGroups
            | Step::Clone
            | Step::WriteIdMaps => Err(ExecError::StepOrder(format!("{step:?} in the child"))),
        }
    }

    /// A new session; stdin `/dev/null`; stdout and stderr the log pty's slave.
    fn stdio(&mut self) -> Result<(), ExecError> {
        rustix::process::setsid().map_err(sys_err("setsid"))?;
        let null = openat(
            CWD,
            "/dev/null",
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(sys_err("opening /dev/null"))?;
        let slave = self
            .slave
            .take()
            .ok_or_else(|| ExecError::StepOrder("Stdio twice".into()))?;
        rustix::stdio::dup2_stdin(&null).map_err(sys_err("dup2(/dev/null, 0)"))?;
        rustix::stdio::dup2_stdout(&slave).map_err(sys_err("dup2(pty, 1)"))?;
        rustix::stdio::dup2_stderr(&slave).map_err(sys_err("dup2(pty, 2)"))
    }
}

/// The flags a remount must keep: the kernel locks them on mounts a user namespace inherited.
fn locked_flags(target: &Path) -> Result<MountFlags, ExecError> {
    let st =
        rustix::fs::statvfs(target).map_err(sys_err(format!("statvfs({})", target.display())))?;
    let mut flags = MountFlags::empty();
    for (st_flag, flag) in [
        (StatVfsMountFlags::NOSUID, MountFlags::NOSUID),
        (StatVfsMountFlags::NODEV, MountFlags::NODEV),
        (StatVfsMountFlags::NOEXEC, MountFlags::NOEXEC),
        (StatVfsMountFlags::NOATIME, MountFlags::NOATIME),
        (StatVfsMountFlags::NODIRATIME, MountFlags::NODIRATIME),
        (StatVfsMountFlags::RELATIME, MountFlags::RELATIME),
    ] {
        if st.f_flag.contains(st_flag) {
            flags |= flag;
        }
    }
    Ok(flags)
}

pub(super) fn mount_data(options: &str) -> Result<CString, ExecError> {
    CString::new(options).map_err(|_| ExecError::Nul("mount options"))
}

fn mount_op(op: &MountOp) -> Result<(), ExecError> {
    use rustix::mount::{mount, mount_bind, mount_bind_recursive, mount_change, mount_remount};
    match op {
        MountOp::MakeRootPrivate => mount_change(
            "/",
            MountPropagationFlags::PRIVATE | MountPropagationFlags::REC,
        )
        .map_err(sys_err("mount: making / private (MS_PRIVATE | MS_REC)")),
        MountOp::Bind {
            source,
            target,
            recursive,
        } => {
            let what = format!("mount: bind {} onto {}", source.display(), target.display());
            if *recursive {
                mount_bind_recursive(source, target).map_err(sys_err(what))
            } else {
                mount_bind(source, target).map_err(sys_err(what))
            }
        }
        MountOp::RemountReadOnly { target } => {
            let flags = MountFlags::BIND | MountFlags::RDONLY | locked_flags(target)?;
            mount_remount(target, flags, "").map_err(sys_err(format!(
                "mount: remount {} read-only",
                target.display()
            )))
        }
        MountOp::Tmpfs { target, options } => mount(
            "tmpfs",
            target,
            "tmpfs",
            MountFlags::empty(),
            Some(&*mount_data(options)?),
        )
        .map_err(sys_err(format!(
            "mount: tmpfs ({options}) on {}",
            target.display()
        ))),
        MountOp::Devpts { target, options } => mount(
            "devpts",
            target,
            "devpts",
            MountFlags::empty(),
            Some(&*mount_data(options)?),
        )
        .map_err(sys_err(format!(
            "mount: devpts ({options}) on {}",
            target.display()
        ))),
        MountOp::Proc { target } => mount("proc", target, "proc", MountFlags::empty(), None)
            .map_err(sys_err(format!("mount: proc on {}", target.display()))),
        MountOp::Chmod { path, mode } => rustix::fs::chmod(path, Mode::from_raw_mode(*mode))
            .map_err(sys_err(format!("chmod({}, {mode:o})", path.display()))),
        MountOp::PivotRoot { new_root, put_old } => {
            rustix::process::chdir(new_root)
                .map_err(sys_err(format!("pivot: chdir({})", new_root.display())))?;
            rustix::fs::mkdirat(CWD, put_old, Mode::from_raw_mode(0o500))
                .map_err(sys_err(format!("pivot: mkdir({})", put_old.display())))?;
            rustix::process::pivot_root(".", put_old)
                .map_err(sys_err(format!("pivot_root(., {})", put_old.display())))?;
            rustix::process::chroot(".").map_err(sys_err("pivot: chroot(.)"))
        }
        MountOp::DetachOldRoot { path } => {
            rustix::mount::unmount(path, UnmountFlags::DETACH)
                .map_err(sys_err(format!("umount2({}, MNT_DETACH)", path.display())))?;
            rustix::fs::unlinkat(CWD, path, rustix::fs::AtFlags::REMOVEDIR)
                .map_err(sys_err(format!("rmdir({})", path.display())))
        }
    }
}

fn set_rlimit(
    resource: RlimitResource,
    soft: RlimitValue,
    hard: RlimitValue,
) -> Result<(), ExecError> {
    let value = |v| match v {
        RlimitValue::Value(n) => Some(n),
        RlimitValue::Infinity => None,
    };
    let res = match resource {
        RlimitResource::Core => Resource::Core,
    };
    let mut limit = Rlimit {
        current: value(soft),
        maximum: value(hard),
    };
    // Raising a hard limit needs CAP_SYS_RESOURCE on the host, which a user namespace does not
    // give. If the daemon runs under a lower hard limit, keep it: the soft limit is what counts.
    let current_max = rustix::process::getrlimit(res).maximum;
    let above = |want: Option<u64>| match (want, current_max) {
        (_, None) => false,
        (None, Some(_)) => true,
        (Some(w), Some(m)) => w > m,
    };
    if above(limit.maximum) {
        limit.maximum = current_max;
        if above(limit.current) {
            limit.current = current_max;
        }
    }
    rustix::process::setrlimit(res, limit).map_err(sys_err(format!("setrlimit({resource:?})")))
}
