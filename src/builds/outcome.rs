//! How a build that ran ended, as a BuildResult says it: a pure function from how the log
//! loop stopped, the sandbox helper's report, an out-of-memory kill, refused forks and whether
//! the derivation is fixed-output, to a status and a message.

use std::process::ExitStatus;

use nixbuild_core::serve::BuildStatus;
use nixbuild_core::store_path::StorePath;
use nixbuild_sandbox::HelperReport;

use super::monitor::Overrun;

/// Why the log loop (or the outputs' processing after it) stopped.
#[derive(Debug)]
pub(super) enum Ended {
    /// The helper exited.
    Exited(ExitStatus),
    /// No log for this many seconds.
    Silent(u64),
    /// The build ran longer than this many seconds.
    TimedOut(u64),
    /// The log grew beyond this many bytes.
    LogLimit(u64),
    /// Cancelled, for the reason given (no client waits for it any more, or `nixbuild
    /// cancel`): the words after "cancelled".
    Cancelled(String),
    /// The watcher stopped it (disk reserve, fork bomb).
    Overrun(Overrun),
}

impl Ended {
    /// The status and message of a build stopped by one of its limits or because no client
    /// waits for it; `None` for the other stops.
    pub(super) fn limit_failure(&self, drv_path: &StorePath) -> Option<(BuildStatus, String)> {
        Some(match self {
            Ended::Silent(secs) => (
                BuildStatus::TimedOut,
                format!("building of '{drv_path}' timed out after {secs} seconds of silence"),
            ),
            Ended::TimedOut(secs) => (
                BuildStatus::TimedOut,
                format!("building of '{drv_path}' timed out after {secs} seconds"),
            ),
            Ended::LogLimit(max) => (
                BuildStatus::LogLimitExceeded,
                format!(
                    "building of '{drv_path}' killed after writing more than {max} bytes of \
                     log output"
                ),
            ),
            Ended::Cancelled(why) => (
                BuildStatus::MiscFailure,
                format!("building of '{drv_path}' was cancelled{why}"),
            ),
            Ended::Exited(_) | Ended::Overrun(_) => return None,
        })
    }
}

/// What is known of a build once its helper is gone.
#[derive(Debug)]
pub(super) struct Ending<'a> {
    /// The `.drv` built, for the messages.
    pub(super) drv_path: &'a StorePath,
    /// How the log loop stopped.
    pub(super) ended: &'a Ended,
    /// What the helper reported.
    pub(super) report: HelperReport,
    /// The build cgroup's memory limit in bytes, when the kernel killed the build for
    /// exceeding it.
    pub(super) oom_limit: Option<u64>,
    /// The process limit and the forks it refused, when it refused any.
    pub(super) refused_forks: Option<(u64, u64)>,
    /// Whether the derivation is fixed-output (its failures are transient: a download may
    /// work next time).
    pub(super) fixed_output: bool,
    /// The log's last lines as the message quotes them ([`super::run`]'s `Tail::render`).
    pub(super) tail: &'a str,
}

/// What a build's [`Ending`] comes to.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// The builder ran and failed, or was stopped.
    Failed(BuildStatus, String),
    /// The builder never ran: the sandbox could not be set up.
    NotBuilt(BuildStatus, String),
    /// The builder exited 0: its outputs are to be checked and registered.
    CheckOutputs,
}

/// Classifies how a build ended.
pub(super) fn classify(ending: Ending<'_>) -> Verdict {
    let Ending {
        drv_path,
        ended,
        report,
        oom_limit,
        refused_forks,
        fixed_output,
        tail,
    } = ending;
    if let Some((status, message)) = ended.limit_failure(drv_path) {
        return Verdict::Failed(status, message);
    }
    // A builder that failed after forks were refused (a fork bomb whose shell gave up) says so.
    let pids_note = refused_forks.map_or(String::new(), |(limit, refused)| {
        format!(
            " after hitting its limit of {limit} processes ({refused} forks refused; \
             pids_per_build in [capacity] of the server's configuration)"
        )
    });
    let builder_failed = if fixed_output {
        BuildStatus::TransientFailure
    } else {
        BuildStatus::PermanentFailure
    };
    // Like out of memory: the same build would overrun again.
    if let Ended::Overrun(overrun) = ended {
        return Verdict::Failed(
            BuildStatus::PermanentFailure,
            format!("builder for '{drv_path}' was stopped: {overrun}{tail}"),
        );
    }
    // As docs/design.md says: a permanent failure, which clients do not retry.
    if let Some(limit) = oom_limit {
        return Verdict::Failed(
            BuildStatus::PermanentFailure,
            format!(
                "builder for '{drv_path}' failed: out of memory (limit {} MiB){tail}",
                limit >> 20
            ),
        );
    }
    match report {
        HelperReport::SetupFailed(msg) => Verdict::NotBuilt(
            BuildStatus::MiscFailure,
            format!("nixbuild: cannot set up the sandbox for '{drv_path}': {msg}"),
        ),
        HelperReport::Signaled(sig) => Verdict::Failed(
            builder_failed,
            format!("builder for '{drv_path}' failed due to signal {sig}{pids_note}{tail}"),
        ),
        HelperReport::Exited(code) if code != 0 => Verdict::Failed(
            builder_failed,
            format!("builder for '{drv_path}' failed with exit code {code}{pids_note}{tail}"),
        ),
        HelperReport::Exited(_) => Verdict::CheckOutputs,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    use BuildStatus::{
        LogLimitExceeded, MiscFailure, PermanentFailure, TimedOut, TransientFailure,
    };
    use HelperReport::{Exited, SetupFailed, Signaled};

    const DRV: &str = "/nix/store/00000000000000000000000000000000-x.drv";
    const TAIL: &str = ";\nlast 1 log lines:\n> boom";

    fn exited() -> Ended {
        Ended::Exited(ExitStatus::from_raw(0))
    }

    /// The verdict on a build of [`DRV`] whose log ended with [`TAIL`].
    fn verdict(
        ended: Ended,
        report: HelperReport,
        oom: bool,
        forks: bool,
        fixed_output: bool,
    ) -> Verdict {
        let drv_path = StorePath::from_absolute_path(DRV.as_bytes()).unwrap();
        classify(Ending {
            drv_path: &drv_path,
            ended: &ended,
            report,
            oom_limit: oom.then_some(512 << 20),
            refused_forks: forks.then_some((64, 3)),
            fixed_output,
            tail: TAIL,
        })
    }

    fn failed(status: BuildStatus, message: &str) -> Verdict {
        Verdict::Failed(status, message.replace("DRV", DRV))
    }

    const FORKS: &str = " after hitting its limit of 64 processes (3 forks refused; \
                         pids_per_build in [capacity] of the server's configuration)";

    #[test]
    fn limits_and_cancels_win_over_everything_the_builder_did() {
        for (oom, forks, fixed) in [(false, false, false), (true, true, true)] {
            for report in [Exited(0), Exited(1), Signaled(9), SetupFailed("x".into())] {
                let table = [
                    (
                        Ended::Silent(7),
                        failed(
                            TimedOut,
                            "building of 'DRV' timed out after 7 seconds of silence",
                        ),
                    ),
                    (
                        Ended::TimedOut(9),
                        failed(TimedOut, "building of 'DRV' timed out after 9 seconds"),
                    ),
                    (
                        Ended::LogLimit(100),
                        failed(
                            LogLimitExceeded,
                            "building of 'DRV' killed after writing more than 100 bytes of log \
                             output",
                        ),
                    ),
                    (
                        Ended::Cancelled(super::super::waiters::NO_WAITER.into()),
                        failed(
                            MiscFailure,
                            "building of 'DRV' was cancelled: no client waits for it",
                        ),
                    ),
                ];
                for (ended, expected) in table {
                    let got = verdict(ended, report.clone(), oom, forks, fixed);
                    assert_eq!(got, expected);
                }
            }
        }
    }

    #[test]
    fn an_overrun_is_permanent_even_out_of_memory_or_fixed_output() {
        let overrun = Overrun::Processes { limit: 64 };
        let expected = failed(
            PermanentFailure,
            &format!("builder for 'DRV' was stopped: {overrun}{TAIL}"),
        );
        for (oom, forks, fixed) in [(false, false, false), (true, true, true)] {
            let got = verdict(
                Ended::Overrun(overrun.clone()),
                Signaled(9),
                oom,
                forks,
                fixed,
            );
            assert_eq!(got, expected);
        }
    }

    #[test]
    fn out_of_memory_is_permanent_whatever_the_helper_reports() {
        let expected = failed(
            PermanentFailure,
            &format!("builder for 'DRV' failed: out of memory (limit 512 MiB){TAIL}"),
        );
        for report in [Exited(0), Exited(137), Signaled(9), SetupFailed("x".into())] {
            for (forks, fixed) in [(false, false), (true, true)] {
                assert_eq!(
                    verdict(exited(), report.clone(), true, forks, fixed),
                    expected
                );
            }
        }
    }

    #[test]
    fn a_sandbox_that_could_not_be_set_up_is_not_a_build() {
        for (forks, fixed) in [(false, false), (true, true)] {
            assert_eq!(
                verdict(
                    exited(),
                    SetupFailed("mount /proc: EPERM".into()),
                    false,
                    forks,
                    fixed
                ),
                Verdict::NotBuilt(
                    MiscFailure,
                    format!("nixbuild: cannot set up the sandbox for '{DRV}': mount /proc: EPERM")
                )
            );
        }
    }

    #[test]
    fn a_failing_builder_is_permanent_unless_fixed_output_and_names_refused_forks() {
        let table = [
            (
                Exited(2),
                false,
                false,
                PermanentFailure,
                "failed with exit code 2",
            ),
            (
                Exited(2),
                true,
                false,
                TransientFailure,
                "failed with exit code 2",
            ),
            (
                Signaled(11),
                false,
                false,
                PermanentFailure,
                "failed due to signal 11",
            ),
            (
                Signaled(11),
                true,
                false,
                TransientFailure,
                "failed due to signal 11",
            ),
            (
                Exited(1),
                false,
                true,
                PermanentFailure,
                "failed with exit code 1FORKS",
            ),
            (
                Signaled(9),
                true,
                true,
                TransientFailure,
                "failed due to signal 9FORKS",
            ),
        ];
        for (report, fixed, forks, status, how) in table {
            let message = format!("builder for 'DRV' {}{TAIL}", how.replace("FORKS", FORKS));
            assert_eq!(
                verdict(exited(), report, false, forks, fixed),
                failed(status, &message)
            );
        }
    }

    #[test]
    fn a_builder_that_exited_0_has_its_outputs_checked() {
        for (forks, fixed) in [(false, false), (true, false), (false, true)] {
            assert_eq!(
                verdict(exited(), Exited(0), false, forks, fixed),
                Verdict::CheckOutputs
            );
        }
    }
}
