//! The soak script (`benches/soak`) in short: a few SSH sessions from a few accounts for six
//! seconds over both protocols (serve and worker), every kind of operation checked against
//! what was uploaded, so that the script cannot rot. It asserts what the long run must show: no unexpected error, the server's
//! descriptors back to their baseline, every acknowledged path in the store with its hash
//! (checked by `load::run`), no ERROR in the server's log.

mod harness;
#[path = "../benches/soak/load.rs"]
mod load;

use std::time::Duration;

use load::{Op, Options, Protocol};

#[test]
fn short_soak_has_no_unexpected_error_and_returns_to_baseline() {
    let (report, _state) = load::run(&Options {
        sessions: 8,
        duration: Duration::from_secs(6),
        accounts: 4,
        keys_per_account: 2,
        think: Duration::from_millis(5),
        seed: 7,
        protocols: Protocol::ALL.to_vec(),
        gc: None,
    });
    println!("{report}");
    assert!(report.problems().is_empty(), "{report}");
    // The run did what it says, in both protocols: sessions came and went, queries, uploads,
    // downloads and builds each ran, and expected failures failed as they must.
    let serve = [Op::QueryPathInfos, Op::ImportPaths, Op::DumpStorePath];
    let daemon = [Op::QueryPathInfo, Op::AddMultipleToStore, Op::NarFromPath];
    let both = [
        Op::Connect,
        Op::QueryValidPaths,
        Op::AddToStoreNar,
        Op::Build,
        Op::Close,
    ];
    let mut ended_on_purpose = 0;
    for (protocol, own) in [(Protocol::Serve, serve), (Protocol::Daemon, daemon)] {
        for op in both.iter().chain(&own) {
            let figures = report.op(protocol, *op);
            assert!(figures.count > 0, "no {} in\n{report}", figures.kind);
        }
        let failing = report.op(protocol, Op::FailingBuild);
        assert_eq!(failing.count, failing.expected_failures, "{report}");
        ended_on_purpose += report.op(protocol, Op::BadUpload).expected_failures
            + report.op(protocol, Op::Abandon).expected_failures;
    }
    assert!(report.sessions_opened > 8, "{report}");
    // Every session the server ended with status 1 is one the client ended on purpose (a
    // wrong hash or an abandoned upload).
    assert!(report.log_failed_sessions <= ended_on_purpose, "{report}");
    assert!(report.paths_acknowledged > 4, "{report}");
}

#[test]
fn short_soak_beside_the_collector_keeps_every_path_in_use() {
    // Retention 4 s and a collection every second over 10 s: paths expire during the run,
    // sessions keep using some, upload busybox again when it may be gone, and never meet a
    // path gone that they used within the retention.
    let (report, _state) = load::run(&Options {
        sessions: 6,
        duration: Duration::from_secs(10),
        accounts: 3,
        keys_per_account: 1,
        think: Duration::from_millis(20),
        seed: 11,
        protocols: Protocol::ALL.to_vec(),
        gc: Some((4, 1)),
    });
    println!("{report}");
    assert!(report.problems().is_empty(), "{report}");
    assert_eq!(report.unexpected(), 0, "{report}");
    for protocol in Protocol::ALL {
        assert!(report.op(protocol, Op::Build).count > 0, "{report}");
    }
    let (collections, grants) = report.collections;
    assert!(collections >= 5, "{report}");
    assert!(
        grants > 0 && report.paths_collected > 0,
        "nothing expired: {report}"
    );
    assert!(report.paths_acknowledged > 4, "{report}");
}
