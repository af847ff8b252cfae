//! What a waiting build waits for, in words a client can read in its build log.

use std::fmt;

/// A quantity of memory, shown in the largest binary unit that keeps it readable
/// (`8 GiB`, `1.5 GiB`, `512 MiB`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteCount(pub u64);

impl fmt::Display for ByteCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u64); 4] = [
            ("TiB", 1 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ];
        for (unit, size) in UNITS {
            if self.0 >= size {
                return if self.0 % size == 0 {
                    write!(f, "{} {unit}", self.0 / size)
                } else {
                    // One decimal is enough to tell sizes apart in a message.
                    write!(f, "{:.1} {unit}", self.0 as f64 / size as f64)
                };
            }
        }
        write!(f, "{} bytes", self.0)
    }
}

/// What a waiting build needs that no machine it can use has free right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitReason {
    /// This many free cores on one machine (the build's request there).
    Cores(u32),
    /// This much free memory on a machine that has the cores.
    Memory(u64),
    /// A machine with the cores and the memory has as many builds as its job limit.
    JobSlot,
    /// Every machine that could run it is down (or drained).
    MachineDown,
    /// It would fit on a machine that is kept free for a large build that has waited long
    /// (the anti-starvation rule).
    Reserved,
    /// It fits now; builds of fairer accounts, or earlier ones, go first.
    Turn,
}

/// The status of a waiting build: what it waits for and where it stands.
///
/// Its `Display` is the line the server prints in the client's log after `nixbuild: `, such
/// as `waiting for 4 cores (position 3 of 7; 2 builds running)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitStatus {
    /// What it waits for.
    pub reason: WaitReason,
    /// Its estimated place among the waiting builds, from 1: how many would start before it
    /// in fair-share order if no build ended meanwhile, plus one.
    pub position: usize,
    /// How many builds wait in all.
    pub waiting: usize,
    /// How many builds run on the machines it could use.
    pub running: usize,
    /// On how many machines those builds run (said when more than one).
    pub machines: usize,
}

impl fmt::Display for WaitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("waiting for ")?;
        match self.reason {
            WaitReason::Cores(1) => f.write_str("1 core")?,
            WaitReason::Cores(n) => write!(f, "{n} cores")?,
            WaitReason::Memory(bytes) => write!(f, "{} memory", ByteCount(bytes))?,
            WaitReason::JobSlot => f.write_str("a job slot")?,
            WaitReason::MachineDown => f.write_str("a machine that can build it to be up")?,
            WaitReason::Reserved => f.write_str("a machine kept free for a large build")?,
            WaitReason::Turn => f.write_str("its turn")?,
        }
        let plural = if self.running == 1 { "" } else { "s" };
        write!(
            f,
            " (position {} of {}; {} build{plural} running",
            self.position, self.waiting, self.running
        )?;
        if self.machines > 1 {
            write!(f, " on {} machines", self.machines)?;
        }
        f.write_str(")")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_shown_in_readable_units() {
        assert_eq!(ByteCount(8 << 30).to_string(), "8 GiB");
        assert_eq!(ByteCount(3 << 29).to_string(), "1.5 GiB");
        assert_eq!(ByteCount(512 << 20).to_string(), "512 MiB");
        assert_eq!(ByteCount(2 << 40).to_string(), "2 TiB");
        assert_eq!(ByteCount(1000).to_string(), "1000 bytes");
        assert_eq!(ByteCount(1536).to_string(), "1.5 KiB");
    }

    #[test]
    fn status_lines() {
        let s = WaitStatus {
            reason: WaitReason::Cores(4),
            position: 3,
            waiting: 7,
            running: 2,
            machines: 1,
        };
        assert_eq!(
            s.to_string(),
            "waiting for 4 cores (position 3 of 7; 2 builds running)"
        );
        let fleet = WaitStatus {
            reason: WaitReason::MachineDown,
            running: 5,
            machines: 2,
            ..s
        };
        assert_eq!(
            fleet.to_string(),
            "waiting for a machine that can build it to be up (position 3 of 7; 5 builds \
             running on 2 machines)"
        );
        let s = WaitStatus {
            reason: WaitReason::Memory(8 << 30),
            position: 1,
            waiting: 1,
            running: 1,
            machines: 1,
        };
        assert_eq!(
            s.to_string(),
            "waiting for 8 GiB memory (position 1 of 1; 1 build running)"
        );
        let s = WaitStatus {
            reason: WaitReason::JobSlot,
            ..s
        };
        assert_eq!(
            s.to_string(),
            "waiting for a job slot (position 1 of 1; 1 build running)"
        );
        let s = WaitStatus {
            reason: WaitReason::Cores(1),
            ..s
        };
        assert!(s.to_string().starts_with("waiting for 1 core ("));
    }
}
