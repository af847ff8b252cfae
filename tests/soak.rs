//! The soak script (`benches/soak`) in short: a few SSH sessions from a few accounts for six
//! seconds, every kind of operation checked against what was uploaded, so that the script
//! cannot rot. It asserts what the long run must show: no unexpected error, the server's
//! descriptors back to their baseline, every acknowledged path in the store with its hash
//! (checked by `load::run`), no ERROR in the server's log.

mod harness;
#[path = "../benches/soak/load.rs"]
mod load;

use std::time::Duration;

use load::{Op, Options};

#[test]
fn short_soak_has_no_unexpected_error_and_returns_to_baseline() {
    let (report, _state) = load::run(&Options {
        sessions: 8,
        duration: Duration::from_secs(6),
        accounts: 4,
        keys_per_account: 2,
        think: Duration::from_millis(5),
        seed: 7,
    });
    println!("{report}");
    assert!(report.problems().is_empty(), "{report}");
    // The run did what it says: sessions came and went, queries, uploads, downloads and
    // builds each ran, and expected failures failed as they must.
    for op in [
        Op::Connect,
        Op::QueryValidPaths,
        Op::QueryPathInfos,
        Op::AddToStoreNar,
        Op::ImportPaths,
        Op::DumpStorePath,
        Op::Build,
        Op::Close,
    ] {
        assert!(report.op(op).count > 0, "no {op} in\n{report}");
    }
    assert!(report.sessions_opened > 8, "{report}");
    let failing = report.op(Op::FailingBuild);
    assert_eq!(failing.count, failing.expected_failures, "{report}");
    // Every session the server ended with status 1 is one the client ended on purpose (a
    // wrong hash or an abandoned upload).
    let ended_on_purpose =
        report.op(Op::BadUpload).expected_failures + report.op(Op::Abandon).expected_failures;
    assert!(report.log_failed_sessions <= ended_on_purpose, "{report}");
    assert!(report.paths_acknowledged > 4, "{report}");
}
