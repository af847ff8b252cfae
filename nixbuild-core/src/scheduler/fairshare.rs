//! Fair-share accounting: each account's usage in core-seconds, decaying exponentially.
//!
//! An account's usage `U` grows by the cores its running builds hold, per second, and decays
//! with the configured half-life `H`: `dU/dt = R - U/τ` with `τ = H / ln 2`, where `R` is the
//! cores running now. Its *standing* is `U + P`, where `P` charges each running build its
//! cores times the expected build duration (a moving average of the durations of completed
//! builds, taken when it started). The account with the lowest standing divided by its
//! weight goes next. `U` alone would give every core freed at one instant to the same
//! account, since nothing has run yet; the charge makes each start count at once, about as
//! much as the build will, so simultaneous starts are spread the way the usage they cause
//! will be. Over time `U` decides: shares of core-seconds follow the weights.
//!
//! To compare many accounts at one instant without an exponential per account, each stores
//! `W = (U - R·τ)·e^{(t - t0)/τ}`, which stays constant while `R` does; then
//! `U(t) = W·e^{-(t - t0)/τ} + R·τ`. The origin `t0` moves forward now and then so that the
//! factor stays within floating-point range.

/// Time origin and decay constant shared by every account.
#[derive(Debug, Clone)]
pub(super) struct Clock {
    /// `τ = H / ln 2`, in seconds.
    tau: f64,
    /// The origin `t0`, in seconds.
    origin: f64,
}

/// Past this many `τ` since the origin, the origin moves (e^64 ≈ 6·10^27).
const REBASE_AFTER: f64 = 64.0;

impl Clock {
    /// A clock for a half-life in seconds (positive).
    pub(super) fn new(half_life_secs: f64) -> Clock {
        Clock {
            tau: half_life_secs / std::f64::consts::LN_2,
            origin: 0.0,
        }
    }

    /// `τ`, in seconds.
    #[cfg(test)]
    pub(super) fn tau(&self) -> f64 {
        self.tau
    }

    /// `e^{(t - t0)/τ}`.
    pub(super) fn growth(&self, t: f64) -> f64 {
        ((t - self.origin) / self.tau).exp()
    }

    /// Whether the origin should move to `t` (then every account is [`Usage::rebase`]d).
    pub(super) fn needs_rebase(&self, t: f64) -> bool {
        (t - self.origin) / self.tau > REBASE_AFTER
    }

    /// Moves the origin to `t`, returning the factor every `W` must be divided by.
    pub(super) fn rebase(&mut self, t: f64) -> f64 {
        let factor = self.growth(t);
        self.origin = t;
        factor
    }
}

/// One account's decaying usage.
#[derive(Debug, Clone, Default)]
pub(super) struct Usage {
    /// `(U - R·τ)·e^{(t - t0)/τ}`.
    w: f64,
    /// Cores running now (`R`).
    running: u64,
    /// The charges of the running builds (`P`), in core-seconds.
    pending: f64,
}

impl Usage {
    /// Cores the account's builds hold now.
    #[cfg(test)]
    pub(super) fn running(&self) -> u64 {
        self.running
    }

    /// Usage in core-seconds at the time whose [`Clock::growth`] is `growth`.
    pub(super) fn usage(&self, clock: &Clock, growth: f64) -> f64 {
        self.w / growth + self.running as f64 * clock.tau
    }

    /// Usage plus the charges of the running builds: the fair-share key.
    pub(super) fn standing(&self, clock: &Clock, growth: f64) -> f64 {
        self.usage(clock, growth) + self.pending
    }

    /// A build holding `cores`, charged `charge` core-seconds, starts at the time of `growth`.
    pub(super) fn start(&mut self, clock: &Clock, growth: f64, cores: u32, charge: f64) {
        self.w -= f64::from(cores) * clock.tau * growth;
        self.running += u64::from(cores);
        self.pending += charge;
    }

    /// A build started with [`Usage::start`] ends at the time of `growth`.
    pub(super) fn end(&mut self, clock: &Clock, growth: f64, cores: u32, charge: f64) {
        self.w += f64::from(cores) * clock.tau * growth;
        self.running = self.running.saturating_sub(u64::from(cores));
        // Rounding must not leave a charge without a running build.
        self.pending = if self.running == 0 {
            0.0
        } else {
            (self.pending - charge).max(0.0)
        };
    }

    /// Follows a [`Clock::rebase`] that returned `factor`.
    pub(super) fn rebase(&mut self, factor: f64) {
        self.w /= factor;
    }
}

/// The expected duration of a build: the mean of the first completed builds, then a moving
/// average.
#[derive(Debug, Clone)]
pub(super) struct DurationEstimate {
    seconds: f64,
    /// Completed builds seen, up to `AVERAGED`.
    seen: u32,
}

/// The estimate before any build has completed, in seconds.
const FIRST_ESTIMATE: f64 = 60.0;

/// The first this many durations are averaged; later ones weigh 1/8 each.
const AVERAGED: u32 = 8;

impl DurationEstimate {
    /// The estimate before any observation.
    pub(super) fn new() -> DurationEstimate {
        DurationEstimate {
            seconds: FIRST_ESTIMATE,
            seen: 0,
        }
    }

    /// The expected duration, in seconds.
    pub(super) fn seconds(&self) -> f64 {
        self.seconds
    }

    /// Takes a completed build's duration into account.
    pub(super) fn observe(&mut self, seconds: f64) {
        self.seen = (self.seen + 1).min(AVERAGED);
        self.seconds += (seconds.max(0.0) - self.seconds) / f64::from(self.seen);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-6 * a.abs().max(b.abs()).max(1.0)
    }

    #[test]
    fn usage_halves_after_one_half_life_and_accrues_while_running() {
        let clock = Clock::new(100.0);
        let mut u = Usage::default();
        u.start(&clock, clock.growth(0.0), 2, 30.0);
        // Running 2 cores from 0 to 10 s: ∫ 2·e^{-(10-s)/τ} ds = 2τ(1 - e^{-10/τ}).
        let expected = 2.0 * clock.tau() * (1.0 - (-10.0 / clock.tau()).exp());
        assert!(close(u.usage(&clock, clock.growth(10.0)), expected));
        assert!(close(
            u.standing(&clock, clock.growth(10.0)),
            expected + 30.0
        ));
        u.end(&clock, clock.growth(10.0), 2, 30.0);
        assert_eq!(u.running(), 0);
        // One half-life later, half of it is left.
        assert!(close(u.usage(&clock, clock.growth(110.0)), expected / 2.0));
        assert!(close(
            u.standing(&clock, clock.growth(110.0)),
            expected / 2.0
        ));
    }

    #[test]
    fn rebasing_keeps_the_values() {
        let mut clock = Clock::new(1.0);
        let mut u = Usage::default();
        u.start(&clock, clock.growth(0.0), 1, 1.0);
        u.end(&clock, clock.growth(3.0), 1, 1.0);
        let t = 100.0;
        assert!(clock.needs_rebase(t));
        let before = u.usage(&clock, clock.growth(t));
        let factor = clock.rebase(t);
        u.rebase(factor);
        assert!(!clock.needs_rebase(t));
        assert!(close(u.usage(&clock, clock.growth(t)), before));
        assert!(u.usage(&clock, clock.growth(t)) >= 0.0);
    }

    #[test]
    fn duration_estimate_follows_completed_builds() {
        let mut d = DurationEstimate::new();
        assert_eq!(d.seconds(), FIRST_ESTIMATE);
        // The first duration replaces the guess.
        d.observe(2.0);
        assert_eq!(d.seconds(), 2.0);
        d.observe(4.0);
        assert_eq!(d.seconds(), 3.0);
        for _ in 0..100 {
            d.observe(4.0);
        }
        assert!((d.seconds() - 4.0).abs() < 0.01, "{}", d.seconds());
        d.observe(12.0);
        assert!((d.seconds() - 5.0).abs() < 0.01, "{}", d.seconds());
    }
}
