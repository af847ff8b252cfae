//! A shared budget of bytes: many holders reserve against one limit, each through a
//! [`Reservation`] that gives its bytes back when it shrinks or is dropped.
//!
//! The daemon holds one [`MemoryBudget`] for the bytes its sessions keep of unfinished
//! requests (`[limits] max_buffered_bytes`): every session of every front door reserves
//! against it as its buffer grows, so that many sessions each within their own cap cannot
//! together take the machine's memory. Reservations are lock-free (one atomic counter) and
//! never block: a reservation that does not fit fails at once, and the caller decides what
//! that means (the session ends with an error).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A limit on the bytes all [`Reservation`]s against it hold together.
#[derive(Debug)]
pub struct MemoryBudget {
    limit: u64,
    used: AtomicU64,
}

/// A reservation did not fit in its budget.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{wanted} more bytes do not fit: {used} of {limit} bytes are reserved (this reservation \
     holds {held})"
)]
pub struct BudgetExhausted {
    /// The bytes asked for on top of what the reservation held.
    pub wanted: u64,
    /// What the reservation held (and still holds).
    pub held: u64,
    /// What all reservations held when it failed.
    pub used: u64,
    /// The budget's limit.
    pub limit: u64,
}

impl MemoryBudget {
    /// A budget of `limit` bytes, nothing reserved.
    pub fn new(limit: u64) -> Self {
        MemoryBudget {
            limit,
            used: AtomicU64::new(0),
        }
    }

    /// The limit.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// The bytes reserved now, by all reservations.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Adds `n` to what is reserved unless the total would pass the limit; returns the total
    /// before, as found by the failed attempt.
    fn try_take(&self, n: u64) -> Result<(), u64> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|total| *total <= self.limit)
            })
            .map(drop)
    }

    fn give_back(&self, n: u64) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }
}

/// Bytes held against a [`MemoryBudget`]; starts empty, gives everything back when dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<MemoryBudget>,
    held: u64,
}

impl Reservation {
    /// An empty reservation against `budget`.
    pub fn new(budget: Arc<MemoryBudget>) -> Self {
        Reservation { budget, held: 0 }
    }

    /// The bytes this reservation holds.
    pub fn held(&self) -> u64 {
        self.held
    }

    /// The budget it holds them against.
    pub fn budget(&self) -> &MemoryBudget {
        &self.budget
    }

    /// Holds exactly `bytes`: takes the difference from the budget when growing (failing,
    /// and holding what it held, when that does not fit), gives it back when shrinking.
    pub fn resize(&mut self, bytes: u64) -> Result<(), BudgetExhausted> {
        if bytes > self.held {
            let wanted = bytes - self.held;
            self.budget
                .try_take(wanted)
                .map_err(|used| BudgetExhausted {
                    wanted,
                    held: self.held,
                    used,
                    limit: self.budget.limit,
                })?;
        } else {
            self.budget.give_back(self.held - bytes);
        }
        self.held = bytes;
        Ok(())
    }

    /// Gives everything back (a shrink, which cannot fail).
    pub fn clear(&mut self) {
        self.budget.give_back(self.held);
        self.held = 0;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.give_back(self.held);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(limit: u64) -> Arc<MemoryBudget> {
        Arc::new(MemoryBudget::new(limit))
    }

    #[test]
    fn reservations_share_the_limit_and_give_back_when_dropped() {
        let b = budget(100);
        let mut r1 = Reservation::new(b.clone());
        let mut r2 = Reservation::new(b.clone());
        assert_eq!(r1.resize(60), Ok(()));
        assert_eq!(b.used(), 60);
        let err = r2.resize(50).expect_err("60 + 50 > 100");
        assert_eq!(
            err,
            BudgetExhausted {
                wanted: 50,
                held: 0,
                used: 60,
                limit: 100
            }
        );
        assert_eq!(r2.held(), 0, "a failed resize holds what it held");
        assert_eq!(b.used(), 60, "and takes nothing");
        assert_eq!(r2.resize(40), Ok(()), "exactly the limit fits");
        assert_eq!(b.used(), 100);
        drop(r1);
        assert_eq!(b.used(), 40);
        assert_eq!(r2.resize(100), Ok(()));
        drop(r2);
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn growing_takes_only_the_difference_and_shrinking_gives_it_back() {
        let b = budget(10);
        let mut r = Reservation::new(b.clone());
        r.resize(4).expect("4");
        r.resize(10).expect("10: 6 more");
        assert_eq!(b.used(), 10);
        let err = r.resize(11).expect_err("11 > 10");
        assert_eq!((err.wanted, err.held), (1, 10));
        assert_eq!(r.held(), 10);
        r.resize(3).expect("shrink");
        assert_eq!((r.held(), b.used()), (3, 3));
        r.resize(0).expect("empty");
        assert_eq!(b.used(), 0);
        r.resize(7).expect("7");
        r.clear();
        assert_eq!((r.held(), b.used()), (0, 0));
        assert!(
            err.to_string().contains("10 of 10 bytes are reserved"),
            "{err}"
        );
    }

    #[test]
    fn no_overflow_near_u64_max() {
        let b = budget(u64::MAX);
        let mut r1 = Reservation::new(b.clone());
        let mut r2 = Reservation::new(b.clone());
        r1.resize(u64::MAX - 1).expect("fits");
        assert!(
            r2.resize(2).is_err(),
            "the sum overflows: refused, not wrapped"
        );
        r2.resize(1).expect("the last byte");
        assert_eq!(b.used(), u64::MAX);
    }

    #[test]
    fn concurrent_holders_never_exceed_the_limit() {
        let b = budget(1000);
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let b = b.clone();
                std::thread::spawn(move || {
                    let mut r = Reservation::new(b.clone());
                    let mut granted = 0u64;
                    for i in 0..10_000u64 {
                        if r.resize(i % 300).is_ok() {
                            granted += 1;
                        }
                        assert!(b.used() <= 1000);
                    }
                    granted
                })
            })
            .collect();
        let granted: u64 = threads.into_iter().map(|t| t.join().expect("thread")).sum();
        assert!(granted > 0);
        assert_eq!(b.used(), 0, "every reservation was dropped");
    }
}
