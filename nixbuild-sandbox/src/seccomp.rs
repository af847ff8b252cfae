//! The seccomp filter as data (spec C.7): default allow; setuid/setgid bits refused on the
//! chmod family with `EPERM`; extended attributes refused with `ENOTSUP`; for x86_64 hosts the
//! x86_64, i386 and x32 ABIs. The executor compiles this table to BPF (or feeds libseccomp).

/// `EPERM`.
pub const EPERM: i32 = 1;
/// `ENOTSUP` (= `EOPNOTSUPP` on Linux).
pub const ENOTSUP: i32 = 95;
/// `S_ISUID`.
pub const S_ISUID: u64 = 0o4000;
/// `S_ISGID`.
pub const S_ISGID: u64 = 0o2000;

/// What the filter does with a system call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Let the call through.
    Allow,
    /// Fail the call with this errno, without running it.
    Errno(i32),
    /// Kill the process: the action for an ABI the filter does not know.
    KillProcess,
}

/// A system-call ABI the filter covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Arch {
    /// x86_64 (`AUDIT_ARCH_X86_64`).
    X86_64,
    /// i386 (`AUDIT_ARCH_I386`), reachable from an x86_64 host through `int 0x80`.
    X86,
    /// x32: `AUDIT_ARCH_X86_64` with [`X32_SYSCALL_BIT`] set in the syscall number.
    X32,
}

/// The bit that marks an x32 system call number.
pub const X32_SYSCALL_BIT: u32 = 0x4000_0000;

impl Arch {
    /// The `AUDIT_ARCH_*` value in `seccomp_data.arch` for this ABI.
    pub fn audit_arch(self) -> u32 {
        match self {
            // EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE
            Arch::X86_64 | Arch::X32 => 0xc000_003e,
            // EM_386 | __AUDIT_ARCH_LE
            Arch::X86 => 0x4000_0003,
        }
    }

    /// The number of `call` in this ABI, as it appears in `seccomp_data.nr`, or `None` if the
    /// ABI has no such call.
    pub fn syscall_nr(self, call: Syscall) -> Option<u32> {
        // x86_64 and x32 share these numbers (x32 adds the bit); i386 has its own table.
        // fchmodat2 (Linux 6.6) is 452 in every table.
        let (x86_64, i386) = match call {
            Syscall::Chmod => (90, 15),
            Syscall::Fchmod => (91, 94),
            Syscall::Fchmodat => (268, 306),
            Syscall::Fchmodat2 => (452, 452),
            Syscall::Setxattr => (188, 226),
            Syscall::Lsetxattr => (189, 227),
            Syscall::Fsetxattr => (190, 228),
            Syscall::Getxattr => (191, 229),
            Syscall::Lgetxattr => (192, 230),
            Syscall::Fgetxattr => (193, 231),
            Syscall::Listxattr => (194, 232),
            Syscall::Llistxattr => (195, 233),
            Syscall::Flistxattr => (196, 234),
        };
        Some(match self {
            Arch::X86_64 => x86_64,
            Arch::X32 => X32_SYSCALL_BIT | x86_64,
            Arch::X86 => i386,
        })
    }
}

/// A system call the filter has a rule for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[allow(missing_docs)] // the variants are the system calls of the same name
pub enum Syscall {
    Chmod,
    Fchmod,
    Fchmodat,
    Fchmodat2,
    Setxattr,
    Lsetxattr,
    Fsetxattr,
    Getxattr,
    Lgetxattr,
    Fgetxattr,
    Listxattr,
    Llistxattr,
    Flistxattr,
}

/// `(arg[index] & mask) == value`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArgMaskedEq {
    /// Which argument (0-based).
    pub index: u8,
    /// The mask applied to the argument.
    pub mask: u64,
    /// The value the masked argument must equal for the rule to apply.
    pub value: u64,
}

/// One rule: when `syscall` is made (and `arg` matches, if given), do `action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeccompRule {
    /// The system call.
    pub syscall: Syscall,
    /// An argument condition, or `None` for every call.
    pub arg: Option<ArgMaskedEq>,
    /// What to do.
    pub action: Action,
}

/// The whole filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeccompPlan {
    /// The action for calls no rule matches.
    pub default_action: Action,
    /// The action for an ABI not in `arches`.
    pub bad_arch_action: Action,
    /// The ABIs the rules are installed for.
    pub arches: Vec<Arch>,
    /// The rules, identical for every ABI.
    pub rules: Vec<SeccompRule>,
}

impl SeccompPlan {
    /// The filter for an x86_64 host (the only host the plan supports so far).
    pub fn x86_64_host() -> SeccompPlan {
        let mut rules = Vec::new();
        for perm in [S_ISUID, S_ISGID] {
            // The mode is the second argument of chmod/fchmod, the third of the *at forms.
            for (syscall, index) in [
                (Syscall::Chmod, 1),
                (Syscall::Fchmod, 1),
                (Syscall::Fchmodat, 2),
                (Syscall::Fchmodat2, 2),
            ] {
                rules.push(SeccompRule {
                    syscall,
                    arg: Some(ArgMaskedEq {
                        index,
                        mask: perm,
                        value: perm,
                    }),
                    action: Action::Errno(EPERM),
                });
            }
        }
        for syscall in [
            Syscall::Setxattr,
            Syscall::Lsetxattr,
            Syscall::Fsetxattr,
            Syscall::Getxattr,
            Syscall::Lgetxattr,
            Syscall::Fgetxattr,
            Syscall::Listxattr,
            Syscall::Llistxattr,
            Syscall::Flistxattr,
        ] {
            rules.push(SeccompRule {
                syscall,
                arg: None,
                action: Action::Errno(ENOTSUP),
            });
        }
        SeccompPlan {
            default_action: Action::Allow,
            bad_arch_action: Action::KillProcess,
            arches: vec![Arch::X86_64, Arch::X86, Arch::X32],
            rules,
        }
    }

    /// The action for `call` with arguments `args`, as the filter would decide it; used by tests
    /// and meant as the reference model for tests of the filter the executor compiles.
    pub fn decide(&self, call: Syscall, args: &[u64; 6]) -> Action {
        self.rules
            .iter()
            .find(|r| {
                r.syscall == call
                    && r.arg
                        .is_none_or(|c| args[usize::from(c.index)] & c.mask == c.value)
            })
            .map_or(self.default_action, |r| r.action)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_arg(index: usize, value: u64) -> [u64; 6] {
        let mut a = [0; 6];
        a[index] = value;
        a
    }

    #[test]
    fn setuid_and_setgid_bits_are_refused_with_eperm_on_the_chmod_family() {
        let f = SeccompPlan::x86_64_host();
        for (call, i) in [
            (Syscall::Chmod, 1),
            (Syscall::Fchmod, 1),
            (Syscall::Fchmodat, 2),
            (Syscall::Fchmodat2, 2),
        ] {
            for mode in [0o4755, 0o2755, 0o6755, 0o4000, 0o2000] {
                assert_eq!(f.decide(call, &with_arg(i, mode)), Action::Errno(EPERM));
            }
            for mode in [0o755, 0o1777, 0o644, 0] {
                assert_eq!(f.decide(call, &with_arg(i, mode)), Action::Allow);
            }
            // The bit in another argument (e.g. the fd or dirfd) does not trigger the rule.
            assert_eq!(f.decide(call, &with_arg(i - 1, 0o4000)), Action::Allow);
        }
    }

    #[test]
    fn xattr_calls_are_refused_with_enotsup() {
        let f = SeccompPlan::x86_64_host();
        for call in [
            Syscall::Setxattr,
            Syscall::Lsetxattr,
            Syscall::Fsetxattr,
            Syscall::Getxattr,
            Syscall::Lgetxattr,
            Syscall::Fgetxattr,
            Syscall::Listxattr,
            Syscall::Llistxattr,
            Syscall::Flistxattr,
        ] {
            assert_eq!(f.decide(call, &[0; 6]), Action::Errno(ENOTSUP));
        }
        assert_eq!(ENOTSUP, 95);
        assert_eq!(EPERM, 1);
    }

    #[test]
    fn table_shape() {
        let f = SeccompPlan::x86_64_host();
        assert_eq!(f.default_action, Action::Allow);
        assert_eq!(f.bad_arch_action, Action::KillProcess);
        assert_eq!(f.arches, [Arch::X86_64, Arch::X86, Arch::X32]);
        assert_eq!(f.rules.len(), 8 + 9);
    }

    #[test]
    fn syscall_numbers_match_the_kernel_tables() {
        // From asm/unistd_64.h, unistd_32.h and unistd_x32.h.
        assert_eq!(Arch::X86_64.syscall_nr(Syscall::Chmod), Some(90));
        assert_eq!(Arch::X86_64.syscall_nr(Syscall::Fchmodat), Some(268));
        assert_eq!(Arch::X86_64.syscall_nr(Syscall::Flistxattr), Some(196));
        assert_eq!(Arch::X86.syscall_nr(Syscall::Chmod), Some(15));
        assert_eq!(Arch::X86.syscall_nr(Syscall::Fchmod), Some(94));
        assert_eq!(Arch::X86.syscall_nr(Syscall::Fchmodat), Some(306));
        assert_eq!(Arch::X86.syscall_nr(Syscall::Setxattr), Some(226));
        assert_eq!(Arch::X32.syscall_nr(Syscall::Chmod), Some(0x4000_0000 + 90));
        assert_eq!(
            Arch::X32.syscall_nr(Syscall::Fchmodat2),
            Some(0x4000_0000 + 452)
        );
        assert_eq!(Arch::X86.audit_arch(), 0x4000_0003);
        assert_eq!(Arch::X86_64.audit_arch(), Arch::X32.audit_arch());
    }
}
