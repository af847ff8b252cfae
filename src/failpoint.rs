//! Named failpoints for the crash tests (`tests/faults.rs`): places in the import, build,
//! registration and export code where a test can stop the daemon mid-operation and kill it.
//!
//! The points exist only with the cargo feature `failpoints` (off by default): without it
//! `failpoint!` and `failpoint_async!` expand to nothing, so release builds hold no
//! trace of them. With it, the daemon reads [`ENV`] once at start (`arm_from_env`):
//! `NIXBUILD_FAILPOINT=<name>` arms the point `<name>` (one of [`ALL`]) for its first hit,
//! `<name>:<n>` for its `n`th (earlier hits pass, so that a test can first complete the same
//! operation once). The armed hit logs `failpoint <name> reached` and then blocks that
//! operation forever (a blocking thread parks, an async task waits on a future that never
//! resolves): the test waits for the line, which proves that the daemon is mid-operation,
//! and kills the daemon with `kill -9` exactly there.

/// Every failpoint, in the order an operation reaches them. Each is used exactly once in the
/// source (a unit test checks it both ways).
pub const ALL: &[&str] = &[
    // An import (AddToStoreNar, ImportPaths): the first NAR bytes are in `tmp/`; the whole
    // NAR is there; hash, size and content address are checked; (publish); the client is
    // about to be told.
    "import-stream-started",
    "import-nar-written",
    "import-hash-verified",
    // Registration (`Store::publish`, shared by imports and builds): before and after the
    // objects are renamed into `objects/`, before and after the SQLite commit.
    "publish-before-rename",
    "publish-after-rename",
    "publish-before-commit",
    "publish-after-commit",
    "import-before-ack",
    // A build: its scratch directory and cgroup exist; the builder runs (its first log
    // bytes arrived); the outputs are canonicalised and hashed; before and after they are
    // registered; before the BuildResult goes to the client.
    "build-scratch-created",
    "build-builder-running",
    "build-outputs-canonicalised",
    "build-before-register",
    "build-after-register",
    "build-before-result",
    // An export (DumpStorePath, ExportPaths): part of the NAR has gone to the client.
    "export-mid-stream",
    // A collection step (`Store::collect_step`): its rows are deleted but not committed; it
    // is committed and its objects not yet moved out; they are moved to `tmp/` and not yet
    // deleted.
    "gc-before-commit",
    "gc-after-commit",
    "gc-before-delete",
];

/// The environment variable that arms a failpoint in a daemon built with `failpoints`.
pub const ENV: &str = "NIXBUILD_FAILPOINT";

/// Stops a blocking operation forever at the named point when the daemon was started with
/// it armed; nothing without the `failpoints` feature. With a second argument, only when
/// that condition holds (evaluated only with the feature).
macro_rules! failpoint {
    ($name:literal) => {
        $crate::failpoint::failpoint!($name, true)
    };
    ($name:literal, $when:expr) => {
        #[cfg(feature = "failpoints")]
        {
            if $when {
                $crate::failpoint::hit($name);
            }
        }
    };
}

/// [`failpoint!`] for async code: the task waits forever instead of parking its thread.
macro_rules! failpoint_async {
    ($name:literal) => {
        $crate::failpoint::failpoint_async!($name, true)
    };
    ($name:literal, $when:expr) => {
        #[cfg(feature = "failpoints")]
        {
            if $when {
                $crate::failpoint::hit_async($name).await;
            }
        }
    };
}

pub(crate) use {failpoint, failpoint_async};

#[cfg(feature = "failpoints")]
pub use armed::*;

#[cfg(feature = "failpoints")]
mod armed {
    use std::io;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;

    use super::{ALL, ENV};
    use crate::nar_fs::NarSink;

    /// Why [`ENV`] could not be used.
    #[derive(Debug, thiserror::Error)]
    pub enum FailpointError {
        /// The name is not one of [`ALL`].
        #[error("{ENV}: unknown failpoint {0:?} (known: {known})", known = ALL.join(", "))]
        Unknown(String),
        /// The hit count after `:` is not a number from 1 up.
        #[error("{ENV}: {0:?} is not <name> or <name>:<n> with n >= 1")]
        BadCount(String),
    }

    /// The armed point, and how many times it was reached so far.
    #[derive(Debug)]
    struct Armed {
        name: &'static str,
        at: u64,
        hits: AtomicU64,
    }

    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();

    /// Reads [`ENV`] (once: later calls return the first answer) and arms the point it
    /// names; `Ok(Some((name, n)))` when one is armed for its `n`th hit. Points are inert
    /// until this is called.
    pub fn arm_from_env() -> Result<Option<(&'static str, u64)>, FailpointError> {
        let parsed = match std::env::var(ENV) {
            Ok(value) if !value.is_empty() => parse(&value).map(Some)?,
            _ => None,
        };
        let armed = ARMED.get_or_init(|| {
            parsed.map(|(name, at)| Armed {
                name,
                at,
                hits: AtomicU64::new(0),
            })
        });
        Ok(armed.as_ref().map(|a| (a.name, a.at)))
    }

    fn parse(value: &str) -> Result<(&'static str, u64), FailpointError> {
        let (name, at) = match value.split_once(':') {
            None => (value, 1),
            Some((name, n)) => match n.parse::<u64>() {
                Ok(n) if n >= 1 => (name, n),
                _ => return Err(FailpointError::BadCount(value.to_owned())),
            },
        };
        ALL.iter()
            .find(|known| **known == name)
            .map(|known| (*known, at))
            .ok_or_else(|| FailpointError::Unknown(name.to_owned()))
    }

    /// Whether this hit of `name` is the armed one (then logged).
    fn reached(name: &str) -> bool {
        let Some(Some(armed)) = ARMED.get() else {
            return false;
        };
        if armed.name != name || armed.hits.fetch_add(1, Ordering::SeqCst) + 1 != armed.at {
            return false;
        }
        tracing::warn!("failpoint {name} reached");
        true
    }

    /// A failpoint in blocking code: parks the thread forever when it is the armed hit.
    pub fn hit(name: &'static str) {
        if reached(name) {
            loop {
                std::thread::park();
            }
        }
    }

    /// A failpoint in async code: never resolves when it is the armed hit.
    pub async fn hit_async(name: &'static str) {
        if reached(name) {
            std::future::pending::<()>().await;
        }
    }

    /// A [`NarSink`] that passes everything on, and reaches `export-mid-stream` once per
    /// export, before its second piece: the client has part of the NAR.
    pub struct MidStream<'a> {
        inner: &'a mut dyn NarSink,
        pieces: u64,
    }

    impl<'a> MidStream<'a> {
        /// Wraps `inner`.
        pub fn new(inner: &'a mut dyn NarSink) -> Self {
            MidStream { inner, pieces: 0 }
        }

        fn next_piece(&mut self) {
            super::failpoint!("export-mid-stream", self.pieces == 1);
            self.pieces += 1;
        }
    }

    impl NarSink for MidStream<'_> {
        fn write_buffer(&mut self, buf: &mut Vec<u8>) -> io::Result<()> {
            self.next_piece();
            self.inner.write_buffer(buf)
        }

        fn takes_file(&self, size: u64) -> bool {
            self.inner.takes_file(size)
        }

        fn send_file(&mut self, file: &std::fs::File, size: u64) -> io::Result<u64> {
            self.next_piece();
            self.inner.send_file(file, size)
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn parses_a_name_and_a_hit_count() {
            assert_eq!(
                parse("import-nar-written").ok(),
                Some(("import-nar-written", 1))
            );
            assert_eq!(
                parse("export-mid-stream:3").ok(),
                Some(("export-mid-stream", 3))
            );
            assert!(matches!(
                parse("no-such-point"),
                Err(FailpointError::Unknown(_))
            ));
            for bad in [
                "export-mid-stream:0",
                "export-mid-stream:x",
                "export-mid-stream:",
            ] {
                assert!(
                    matches!(parse(bad), Err(FailpointError::BadCount(_))),
                    "{bad}"
                );
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports failure
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;

    /// The names the two macros are invoked with in the Rust files under `dir`, with where.
    fn uses(dir: &Path, found: &mut BTreeMap<String, Vec<String>>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                uses(&path, found);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for marker in ["failpoint!(\"", "failpoint_async!(\""] {
                for (at, _) in text.match_indices(marker) {
                    let rest = &text[at + marker.len()..];
                    let name = &rest[..rest.find('"').unwrap()];
                    found
                        .entry(name.to_owned())
                        .or_default()
                        .push(path.display().to_string());
                }
            }
        }
    }

    #[test]
    fn every_listed_point_is_used_once_and_every_used_point_is_listed() {
        let mut found = BTreeMap::new();
        uses(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
            &mut found,
        );
        for name in super::ALL {
            let places = found.remove(*name).unwrap_or_default();
            assert_eq!(places.len(), 1, "failpoint {name} is used at {places:?}");
        }
        assert!(
            found.is_empty(),
            "failpoints used but not in ALL: {found:?}"
        );
        let mut sorted = super::ALL.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), super::ALL.len(), "a name is listed twice");
    }
}
