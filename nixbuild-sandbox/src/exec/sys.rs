//! The system calls rustix does not wrap, each behind a small safe function. This file holds
//! all of the workspace's `unsafe` code (the crate denies it everywhere else).

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr;

use crate::seccomp::BpfInsn;

fn check(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// What [`clone_process`] returned in this process.
pub(super) enum Forked {
    /// We are the parent; this is the child's pid.
    Parent(i32),
    /// We are the child.
    Child,
}

/// `clone(flags | SIGCHLD)` without a new stack: like `fork`, plus the namespace flags.
///
/// The calling process must be single-threaded (the helper is), so that the child's copy of
/// the memory has no lock held by a thread that does not exist in it. This is checked first
/// (fail closed): with more than one thread, nothing is cloned and the error says how many
/// there are. (Only this thread could start another, so the count cannot grow before the
/// `clone`.)
pub(super) fn clone_process(namespace_flags: u64) -> io::Result<Forked> {
    let threads = thread_count()?;
    if threads != 1 {
        return Err(io::Error::other(format!(
            "the sandbox helper has {threads} threads; it must be single-threaded to clone"
        )));
    }
    let flags = namespace_flags | libc::SIGCHLD as u64;
    // SAFETY: a raw clone with a null stack behaves like fork; the process has a single
    // thread (checked above). The remaining pointer arguments are unused without CLONE_*TID/SETTLS flags.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone,
            flags,
            ptr::null_mut::<libc::c_void>(),
            ptr::null_mut::<libc::c_int>(),
            ptr::null_mut::<libc::c_int>(),
            0usize,
        )
    };
    match check(ret)? {
        0 => Ok(Forked::Child),
        pid => Ok(Forked::Parent(pid as i32)),
    }
}

/// The number of threads of this process: the entries of `/proc/self/task`.
fn thread_count() -> io::Result<usize> {
    let tasks = std::fs::read_dir("/proc/self/task").map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("counting the threads in /proc/self/task: {e}"),
        )
    })?;
    Ok(tasks.count())
}

/// `unshare(CLONE_NEWNS)`: the calling process gets a mount namespace of its own.
pub(super) fn unshare_mount_namespace() -> io::Result<()> {
    // SAFETY: the only flag is CLONE_NEWNS, which leaves the file descriptor table (the
    // reason `unshare` is unsafe: CLONE_FILES) alone.
    unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNS) }
        .map_err(io::Error::from)
}

/// `_exit(code)`: leaves the child without running the parent's atexit handlers or unwinding
/// into the helper's code.
pub(super) fn exit_now(code: i32) -> ! {
    // SAFETY: _exit has no preconditions.
    unsafe { libc::_exit(code) }
}

#[repr(C)]
struct SockFprog {
    len: libc::c_ushort,
    filter: *const BpfInsn,
}

/// `seccomp(SECCOMP_SET_MODE_FILTER, 0, prog)`.
pub(super) fn load_seccomp(prog: &[BpfInsn]) -> io::Result<()> {
    let len = libc::c_ushort::try_from(prog.len())
        .map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?;
    let fprog = SockFprog {
        len,
        filter: prog.as_ptr(),
    };
    const SECCOMP_SET_MODE_FILTER: libc::c_long = 1;
    // SAFETY: fprog points at `len` valid sock_filter-layout instructions for the call.
    check(unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            SECCOMP_SET_MODE_FILTER,
            0 as libc::c_long,
            &fprog as *const SockFprog,
        )
    })?;
    Ok(())
}

const LANDLOCK_CREATE_RULESET_VERSION: libc::c_long = 1;
const LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET: u64 = 1;
/// The first Landlock ABI with `scoped`.
pub(super) const LANDLOCK_ABI_SCOPES: i64 = 6;

#[repr(C)]
struct LandlockRulesetAttr {
    handled_access_fs: u64,
    handled_access_net: u64,
    scoped: u64,
}

/// The kernel's Landlock ABI version, or `None` if Landlock is not built in or not enabled.
pub(super) fn landlock_abi() -> io::Result<Option<i64>> {
    // SAFETY: the version query takes no attribute pointer.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            ptr::null::<LandlockRulesetAttr>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    match check(ret) {
        Ok(abi) => Ok(Some(abi)),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EOPNOTSUPP)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Restricts this process (and what it executes) from connecting to abstract unix sockets
/// created outside its Landlock domain. Needs `no_new_privs` or `CAP_SYS_ADMIN`.
pub(super) fn landlock_scope_abstract_unix_sockets() -> io::Result<()> {
    let attr = LandlockRulesetAttr {
        handled_access_fs: 0,
        handled_access_net: 0,
        scoped: LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET,
    };
    // SAFETY: attr is a valid landlock_ruleset_attr of the size passed.
    let fd = check(unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            &attr as *const LandlockRulesetAttr,
            std::mem::size_of::<LandlockRulesetAttr>(),
            0u32,
        )
    })?;
    // SAFETY: the call returned a new file descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: plain syscall on a descriptor we own.
    check(unsafe { libc::syscall(libc::SYS_landlock_restrict_self, fd.as_raw_fd(), 0u32) })?;
    Ok(())
}

/// `keyctl(KEYCTL_JOIN_SESSION_KEYRING, NULL)`: this process leaves the session keyring it
/// inherited for a new, empty, anonymous one (which nothing else can join by name). A kernel
/// built without keyrings (`ENOSYS`) has none to leave, so there is nothing to do.
pub(super) fn join_new_session_keyring() -> io::Result<()> {
    // SAFETY: a NULL name asks for an anonymous keyring; no other argument is a pointer.
    let joined = check(unsafe {
        libc::syscall(
            libc::SYS_keyctl,
            libc::KEYCTL_JOIN_SESSION_KEYRING,
            ptr::null::<libc::c_char>(),
        )
    });
    match joined {
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => Ok(()),
        other => other.map(drop),
    }
}

/// `PER_LINUX32`.
pub(super) const PER_LINUX32: u64 = 0x0008;
/// `ADDR_NO_RANDOMIZE`.
pub(super) const ADDR_NO_RANDOMIZE: u64 = 0x0040000;

/// `personality(persona)`.
pub(super) fn personality(persona: u64) -> io::Result<()> {
    // SAFETY: personality only sets a flag word of this process.
    let ret = unsafe { libc::personality(persona as libc::c_ulong) };
    check(ret.into()).map(drop)
}

/// Brings `lo` up with `IFF_UP | IFF_LOOPBACK | IFF_RUNNING`, like Nix.
pub(super) fn loopback_up() -> io::Result<()> {
    use rustix::net::{socket, AddressFamily, SocketType};
    let sock = socket(AddressFamily::INET, SocketType::DGRAM, None)?;
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(b"lo") {
        *d = *s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags =
        (libc::IFF_UP | libc::IFF_LOOPBACK | libc::IFF_RUNNING) as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads an ifreq, which we pass.
    let ret = unsafe {
        libc::ioctl(
            sock.as_raw_fd(),
            libc::SIOCSIFFLAGS,
            &ifr as *const libc::ifreq,
        )
    };
    check(ret.into()).map(drop)
}

/// Marks every descriptor from `first` on close-on-exec (`close_range` with
/// `CLOSE_RANGE_CLOEXEC`), so they are usable until `execve` and gone after it.
pub(super) fn cloexec_from(first: u32) -> io::Result<()> {
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    // SAFETY: only changes descriptor flags.
    check(unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, CLOSE_RANGE_CLOEXEC) })
        .map(drop)
}

/// Every signal back to its default action and none blocked: the builder must not inherit the
/// helper's ignored `SIGPIPE` (Rust ignores it) or anything the daemon blocked.
pub(super) fn reset_signals() {
    // SAFETY: setting default dispositions and an empty mask has no memory-safety conditions;
    // failures (SIGKILL, SIGSTOP, the C library's reserved signals) are harmless and ignored.
    unsafe {
        for sig in 1..libc::SIGRTMAX() {
            libc::signal(sig, libc::SIG_DFL);
        }
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, ptr::null_mut());
    }
}

/// `execve(path, argv, envp)`; returns only on failure.
pub(super) fn execve(path: &CStr, argv: &[CString], env: &[CString]) -> io::Error {
    let argv: Vec<*const libc::c_char> = argv
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(ptr::null()))
        .collect();
    let env: Vec<*const libc::c_char> = env
        .iter()
        .map(|e| e.as_ptr())
        .chain(std::iter::once(ptr::null()))
        .collect();
    // SAFETY: path, argv and envp are NUL-terminated strings in NULL-terminated arrays that
    // outlive the call.
    unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), env.as_ptr()) };
    io::Error::last_os_error()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports failure
mod tests {
    use super::*;

    #[test]
    fn clone_refuses_a_process_with_another_thread() {
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || {
            started_tx.send(()).unwrap();
            let _ = stop_rx.recv();
        });
        started_rx.recv().unwrap();
        assert!(thread_count().unwrap() >= 2);
        // Nothing is cloned: this process goes on alone (a child would run the rest too).
        let err = match clone_process(0) {
            Err(e) => e,
            Ok(_) => panic!("clone ran in a multi-threaded process"),
        };
        assert!(err.to_string().contains("must be single-threaded"), "{err}");
        stop_tx.send(()).unwrap();
        other.join().unwrap();
    }
}
