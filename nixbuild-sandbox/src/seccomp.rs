//! The seccomp filter as data (docs/sandbox.md C.7): default allow; setuid/setgid bits refused on
//! the chmod family with `EPERM`; extended attributes refused with `ENOTSUP`; for x86_64 hosts the
//! x86_64, i386 and x32 ABIs. The executor compiles this table to BPF (or feeds libseccomp).

use serde::{Deserialize, Serialize};

/// `EPERM`.
pub const EPERM: i32 = 1;
/// `ENOTSUP` (= `EOPNOTSUPP` on Linux).
pub const ENOTSUP: i32 = 95;
/// `S_ISUID`.
pub const S_ISUID: u64 = 0o4000;
/// `S_ISGID`.
pub const S_ISGID: u64 = 0o2000;

/// What the filter does with a system call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// Let the call through.
    Allow,
    /// Fail the call with this errno, without running it.
    Errno(i32),
    /// Kill the process: the action for an ABI the filter does not know.
    KillProcess,
}

/// A system-call ABI the filter covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArgMaskedEq {
    /// Which argument (0-based).
    pub index: u8,
    /// The mask applied to the argument.
    pub mask: u64,
    /// The value the masked argument must equal for the rule to apply.
    pub value: u64,
}

/// One rule: when `syscall` is made (and `arg` matches, if given), do `action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeccompRule {
    /// The system call.
    pub syscall: Syscall,
    /// An argument condition, or `None` for every call.
    pub arg: Option<ArgMaskedEq>,
    /// What to do.
    pub action: Action,
}

/// The whole filter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

/// One classic BPF instruction, laid out like the kernel's `struct sock_filter`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct BpfInsn {
    /// Opcode.
    pub code: u16,
    /// Jump offset when the condition holds.
    pub jt: u8,
    /// Jump offset when it does not.
    pub jf: u8,
    /// Operand.
    pub k: u32,
}

/// Why a [`SeccompPlan`] could not be compiled to BPF.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SeccompError {
    /// A rule block is longer than a conditional BPF jump can skip (255 instructions).
    #[error("a seccomp rule block of {0} instructions is too long for a BPF jump")]
    JumpTooFar(usize),
    /// The program exceeds the kernel's limit of 4096 instructions.
    #[error("the seccomp program has {0} instructions, more than the kernel's 4096")]
    TooLong(usize),
}

/// Opcodes of the BPF subset the compiler emits (`linux/filter.h`).
pub mod bpf {
    /// `BPF_LD | BPF_W | BPF_ABS`: load a 32-bit word of `seccomp_data`.
    pub const LD_W_ABS: u16 = 0x20;
    /// `BPF_JMP | BPF_JEQ | BPF_K`.
    pub const JEQ_K: u16 = 0x15;
    /// `BPF_JMP | BPF_JGE | BPF_K`.
    pub const JGE_K: u16 = 0x35;
    /// `BPF_JMP | BPF_JA`: jump `k` instructions forward.
    pub const JA: u16 = 0x05;
    /// `BPF_ALU | BPF_AND | BPF_K`.
    pub const AND_K: u16 = 0x54;
    /// `BPF_RET | BPF_K`.
    pub const RET_K: u16 = 0x06;
    /// Offset of `seccomp_data.nr`.
    pub const OFF_NR: u32 = 0;
    /// Offset of `seccomp_data.arch`.
    pub const OFF_ARCH: u32 = 4;
    /// Offset of the low word of `seccomp_data.args[i]` (little endian): `16 + 8 * i`.
    pub const OFF_ARGS: u32 = 16;
    /// `SECCOMP_RET_ALLOW`.
    pub const RET_ALLOW: u32 = 0x7fff_0000;
    /// `SECCOMP_RET_ERRNO`, or-ed with the errno.
    pub const RET_ERRNO: u32 = 0x0005_0000;
    /// `SECCOMP_RET_KILL_PROCESS`.
    pub const RET_KILL_PROCESS: u32 = 0x8000_0000;
}

fn insn(code: u16, jt: u8, jf: u8, k: u32) -> BpfInsn {
    BpfInsn { code, jt, jf, k }
}

impl Action {
    /// The `SECCOMP_RET_*` value of this action.
    pub fn ret_value(self) -> u32 {
        match self {
            Action::Allow => bpf::RET_ALLOW,
            // The kernel keeps the low 16 bits as the errno.
            Action::Errno(e) => bpf::RET_ERRNO | (e as u32 & 0xffff),
            Action::KillProcess => bpf::RET_KILL_PROCESS,
        }
    }
}

impl SeccompPlan {
    /// Compiles the filter to a BPF program for `seccomp(SECCOMP_SET_MODE_FILTER)`.
    ///
    /// Layout: one section per audit architecture, reached by a check of `seccomp_data.arch`
    /// (anything else gets [`SeccompPlan::bad_arch_action`]). In a section, each rule is a block
    /// that loads the syscall number, compares it, checks the argument condition on both 32-bit
    /// halves and returns the rule's action; the section ends with the default action. x86_64 and
    /// x32 share an audit architecture; if only one of them is listed, calls of the other
    /// (told apart by [`X32_SYSCALL_BIT`]) get the bad-arch action.
    pub fn to_bpf(&self) -> Result<Vec<BpfInsn>, SeccompError> {
        let mut audit_arches: Vec<u32> = Vec::new();
        for arch in &self.arches {
            if !audit_arches.contains(&arch.audit_arch()) {
                audit_arches.push(arch.audit_arch());
            }
        }
        let mut prog = vec![insn(bpf::LD_W_ABS, 0, 0, bpf::OFF_ARCH)];
        for audit in audit_arches {
            let section = self.section(audit)?;
            // Enter the section if the arch matches, else jump over it (`ja` has a 32-bit offset).
            prog.push(insn(bpf::JEQ_K, 1, 0, audit));
            prog.push(insn(bpf::JA, 0, 0, section.len() as u32));
            prog.extend(section);
        }
        prog.push(insn(bpf::RET_K, 0, 0, self.bad_arch_action.ret_value()));
        if prog.len() > 4096 {
            return Err(SeccompError::TooLong(prog.len()));
        }
        Ok(prog)
    }

    /// The rules of every listed ABI with this audit architecture, ending in the default action.
    fn section(&self, audit: u32) -> Result<Vec<BpfInsn>, SeccompError> {
        let arches: Vec<Arch> = self
            .arches
            .iter()
            .copied()
            .filter(|a| a.audit_arch() == audit)
            .collect();
        let mut out = Vec::new();
        let has = |a| arches.contains(&a);
        if has(Arch::X86_64) != has(Arch::X32) {
            // Only one of the two ABIs sharing this audit arch is allowed.
            let x32 = has(Arch::X32);
            out.push(insn(bpf::LD_W_ABS, 0, 0, bpf::OFF_NR));
            let (jt, jf) = if x32 { (1, 0) } else { (0, 1) };
            out.push(insn(bpf::JGE_K, jt, jf, X32_SYSCALL_BIT));
            out.push(insn(bpf::RET_K, 0, 0, self.bad_arch_action.ret_value()));
        }
        for arch in arches {
            for rule in &self.rules {
                let Some(nr) = arch.syscall_nr(rule.syscall) else {
                    continue;
                };
                let mut checks = Vec::new();
                if let Some(c) = rule.arg {
                    let off = bpf::OFF_ARGS + 8 * u32::from(c.index);
                    for (half, shift) in [(0, 0), (4, 32)] {
                        let (mask, value) = ((c.mask >> shift) as u32, (c.value >> shift) as u32);
                        if mask == 0 && value == 0 {
                            continue;
                        }
                        checks.push((off + half, mask, value));
                    }
                }
                // ld nr; jeq nr; [ld arg; and mask; jeq value]*; ret action
                let len = 2 + 3 * checks.len() + 1;
                let skip = u8::try_from(len - 2).map_err(|_| SeccompError::JumpTooFar(len))?;
                out.push(insn(bpf::LD_W_ABS, 0, 0, bpf::OFF_NR));
                out.push(insn(bpf::JEQ_K, 0, skip, nr));
                for (i, (off, mask, value)) in checks.iter().enumerate() {
                    // On a mismatch, skip the remaining checks and the return.
                    let rest = u8::try_from(len - 2 - 3 * (i + 1))
                        .map_err(|_| SeccompError::JumpTooFar(len))?;
                    out.push(insn(bpf::LD_W_ABS, 0, 0, *off));
                    out.push(insn(bpf::AND_K, 0, 0, *mask));
                    out.push(insn(bpf::JEQ_K, 0, rest, *value));
                }
                out.push(insn(bpf::RET_K, 0, 0, rule.action.ret_value()));
            }
        }
        out.push(insn(bpf::RET_K, 0, 0, self.default_action.ret_value()));
        Ok(out)
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

    /// Runs `prog` on a `seccomp_data` like the kernel's classic BPF interpreter, for the
    /// opcodes the compiler emits; panics on anything else or on a jump out of the program.
    fn run_bpf(prog: &[BpfInsn], arch: u32, nr: u32, args: &[u64; 6]) -> u32 {
        let mut data = Vec::new();
        data.extend_from_slice(&nr.to_le_bytes());
        data.extend_from_slice(&arch.to_le_bytes());
        data.extend_from_slice(&0u64.to_le_bytes());
        for a in args {
            data.extend_from_slice(&a.to_le_bytes());
        }
        let (mut acc, mut pc) = (0u32, 0usize);
        loop {
            let i = prog[pc];
            pc += 1;
            match i.code {
                bpf::LD_W_ABS => {
                    let k = i.k as usize;
                    acc = u32::from_le_bytes(data[k..k + 4].try_into().expect("4 bytes"));
                }
                bpf::AND_K => acc &= i.k,
                bpf::JA => pc += i.k as usize,
                bpf::JEQ_K => pc += usize::from(if acc == i.k { i.jt } else { i.jf }),
                bpf::JGE_K => pc += usize::from(if acc >= i.k { i.jt } else { i.jf }),
                bpf::RET_K => return i.k,
                other => panic!("opcode {other:#x}"),
            }
        }
    }

    const ALL: [Syscall; 13] = [
        Syscall::Chmod,
        Syscall::Fchmod,
        Syscall::Fchmodat,
        Syscall::Fchmodat2,
        Syscall::Setxattr,
        Syscall::Lsetxattr,
        Syscall::Fsetxattr,
        Syscall::Getxattr,
        Syscall::Lgetxattr,
        Syscall::Fgetxattr,
        Syscall::Listxattr,
        Syscall::Llistxattr,
        Syscall::Flistxattr,
    ];

    #[test]
    fn compiled_filter_decides_like_the_table_on_every_abi() {
        let f = SeccompPlan::x86_64_host();
        let prog = f.to_bpf().expect("compiles");
        let modes = [
            0,
            0o755,
            0o4755,
            0o2755,
            0o6000,
            0o1777,
            0o4000 | (1 << 40),
            1 << 40,
        ];
        for arch in [Arch::X86_64, Arch::X86, Arch::X32] {
            for call in ALL {
                let nr = arch.syscall_nr(call).expect("numbered");
                for index in 0..4 {
                    for mode in modes {
                        let args = with_arg(index, mode);
                        assert_eq!(
                            run_bpf(&prog, arch.audit_arch(), nr, &args),
                            f.decide(call, &args).ret_value(),
                            "{arch:?} {call:?} arg{index}={mode:o}"
                        );
                    }
                }
            }
            // Calls without a rule (read, write, open on x86_64) are allowed.
            for nr in [0, 1, 2, 59] {
                let nr = if arch == Arch::X32 {
                    nr | X32_SYSCALL_BIT
                } else {
                    nr
                };
                assert_eq!(
                    run_bpf(&prog, arch.audit_arch(), nr, &[0; 6]),
                    bpf::RET_ALLOW
                );
            }
        }
        // An ABI not in the table (aarch64) is killed.
        assert_eq!(
            run_bpf(&prog, 0xc000_00b7, 90, &[0; 6]),
            bpf::RET_KILL_PROCESS
        );
        assert_eq!(Action::Errno(EPERM).ret_value(), 0x0005_0001);
    }

    #[test]
    fn an_unlisted_abi_sharing_the_audit_arch_is_killed() {
        let mut f = SeccompPlan::x86_64_host();
        f.arches = vec![Arch::X86_64];
        let prog = f.to_bpf().expect("compiles");
        let chmod = Arch::X86_64.syscall_nr(Syscall::Chmod).expect("numbered");
        let audit = Arch::X86_64.audit_arch();
        assert_eq!(run_bpf(&prog, audit, 1, &[0; 6]), bpf::RET_ALLOW);
        assert_eq!(
            run_bpf(&prog, audit, chmod, &with_arg(1, 0o4755)),
            Action::Errno(EPERM).ret_value()
        );
        assert_eq!(
            run_bpf(&prog, audit, X32_SYSCALL_BIT | 1, &[0; 6]),
            bpf::RET_KILL_PROCESS
        );
        // i386 is not listed either.
        assert_eq!(
            run_bpf(&prog, Arch::X86.audit_arch(), 1, &[0; 6]),
            bpf::RET_KILL_PROCESS
        );
        f.arches = vec![Arch::X32];
        let prog = f.to_bpf().expect("compiles");
        assert_eq!(run_bpf(&prog, audit, 1, &[0; 6]), bpf::RET_KILL_PROCESS);
        assert_eq!(
            run_bpf(&prog, audit, X32_SYSCALL_BIT | 1, &[0; 6]),
            bpf::RET_ALLOW
        );
    }
}
