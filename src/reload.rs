//! Reloading (SIGHUP, `systemctl reload nixbuild`): the daemon reads its configuration again
//! from where it came ([`ConfigSource`]) and puts in force the settings a running daemon can
//! change ([`LiveConfig`]): the timeouts, the per-account and per-connection limits, the
//! trusted relay peers. The others (what was bound, opened or sized at start: the listening
//! address, the store, the build uids, the capacity and scheduler, the memory budget) keep
//! their running values and are named in the log as needing a restart. A file that does not
//! load changes nothing.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use crate::config::{Config, ConfigError, Overrides};

/// Where the daemon's configuration comes from, so that it can be read again.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    /// The state directory (its `nixbuild.toml` is the default file).
    pub state_dir: PathBuf,
    /// `--config FILE`, when given.
    pub file: Option<PathBuf>,
    /// The command line's values, which override the file's every time.
    pub overrides: Overrides,
}

impl ConfigSource {
    /// Reads and checks the configuration as at start ([`Config::for_daemon`]).
    pub fn load(&self) -> Result<Config, ConfigError> {
        Config::for_daemon(&self.state_dir, self.file.as_deref(), &self.overrides)
    }
}

/// The configuration in force, read by each new session and connection.
#[derive(Debug)]
pub struct LiveConfig(RwLock<Arc<Config>>);

impl LiveConfig {
    /// The configuration the daemon started with.
    pub fn new(config: Config) -> LiveConfig {
        LiveConfig(RwLock::new(Arc::new(config)))
    }

    /// The configuration in force now.
    pub fn get(&self) -> Arc<Config> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Puts in force what `new` sets of the settings that can change while the daemon runs
    /// (see [`merge`]); returns the settings `new` changes that need a restart.
    pub fn update(&self, new: &Config) -> Vec<&'static str> {
        let mut current = self.0.write().unwrap_or_else(|p| p.into_inner());
        let (merged, restart) = merge(&current, new);
        *current = Arc::new(merged);
        restart
    }
}

/// `running` with the settings a running daemon can change taken from `new`: `[timeouts]`,
/// `[limits] max_builds_per_account` and `max_running_builds_per_account`,
/// `[store]` retention, quota and collector settings (see [`crate::config::StoreConfig::with_live_from`]),
/// `[accounts]`, `[admin]`, `[builds]` but its uid range,
/// `[limits] max_sessions_per_account` and `max_upload_bytes_per_session`, `[relay]
/// trusted_uids` and `trusted_gids`, `[ssh] max_connections`, `max_connections_per_account`
/// and `max_sessions_per_connection`. Also the names of the other settings that `new`
/// changes, which keep their running values until a restart.
pub fn merge(running: &Config, new: &Config) -> (Config, Vec<&'static str>) {
    let mut merged = running.clone();
    merged.timeouts = new.timeouts.clone();
    merged.limits.max_sessions_per_account = new.limits.max_sessions_per_account;
    merged.limits.max_upload_bytes_per_session = new.limits.max_upload_bytes_per_session;
    merged.limits.max_builds_per_account = new.limits.max_builds_per_account;
    merged.limits.max_running_builds_per_account = new.limits.max_running_builds_per_account;
    merged
        .relay
        .trusted_uids
        .clone_from(&new.relay.trusted_uids);
    merged
        .relay
        .trusted_gids
        .clone_from(&new.relay.trusted_gids);
    merged.ssh.max_connections = new.ssh.max_connections;
    merged.ssh.max_connections_per_account = new.ssh.max_connections_per_account;
    merged.ssh.max_sessions_per_connection = new.ssh.max_sessions_per_connection;
    merged.store = running.store.with_live_from(&new.store);
    merged.accounts.clone_from(&new.accounts);
    merged.admin.clone_from(&new.admin);
    // The uid range is the pool the running builds hold their uids from.
    merged.builds = crate::config::BuildsConfig {
        uid_base: running.builds.uid_base,
        uid_count: running.builds.uid_count,
        ..new.builds.clone()
    };
    let (r, n) = (running, new);
    let restart = [
        ("[store]", merged.store != n.store),
        ("builds.uid_base", r.builds.uid_base != n.builds.uid_base),
        ("builds.uid_count", r.builds.uid_count != n.builds.uid_count),
        ("[capacity]", r.capacity != n.capacity),
        ("[scheduler]", r.scheduler != n.scheduler),
        ("[substituters]", r.substituters != n.substituters),
        (
            "limits.max_sessions",
            r.limits.max_sessions != n.limits.max_sessions,
        ),
        (
            "limits.max_buffered_bytes",
            r.limits.max_buffered_bytes != n.limits.max_buffered_bytes,
        ),
        (
            "relay.socket_group",
            r.relay.socket_group != n.relay.socket_group,
        ),
        ("ssh.listen", r.ssh.listen != n.ssh.listen),
        ("metrics.listen", r.metrics.listen != n.metrics.listen),
        (
            "ssh.authorized_keys",
            r.ssh.authorized_keys != n.ssh.authorized_keys,
        ),
        ("ssh.key_types", r.ssh.key_types != n.ssh.key_types),
        ("ssh.ciphers", r.ssh.ciphers != n.ssh.ciphers),
        (
            "ssh.max_unauthenticated",
            r.ssh.max_unauthenticated != n.ssh.max_unauthenticated,
        ),
        (
            "ssh.max_unauthenticated_per_source",
            r.ssh.max_unauthenticated_per_source != n.ssh.max_unauthenticated_per_source,
        ),
    ]
    .into_iter()
    .filter_map(|(key, changed)| changed.then_some(key))
    .collect();
    (merged, restart)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports failure
mod tests {
    use super::*;

    /// One changed key per line, each either live or needing a restart, covering every key
    /// of every section.
    const LIVE: &[&str] = &[
        "[timeouts]\nauth = 7",
        "[timeouts]\nhandshake = 7",
        "[timeouts]\nidle = 7",
        "[timeouts]\nwrite = 7",
        "[timeouts]\nshutdown = 7",
        "[limits]\nmax_sessions_per_account = 7",
        "[limits]\nmax_upload_bytes_per_session = 7",
        "[limits]\nmax_builds_per_account = 7",
        "[limits]\nmax_running_builds_per_account = 7",
        "[accounts.bob]\nmax_builds = 7\nmax_running_builds = 7",
        "[relay]\ntrusted_uids = [7]",
        "[relay]\ntrusted_gids = [7]",
        "[ssh]\nmax_connections = 7",
        "[ssh]\nmax_connections_per_account = 7",
        "[ssh]\nmax_sessions_per_connection = 7",
        "[store]\nretention = \"7d\"",
        "[store]\nquota = \"7G\"",
        "[store]\nlog_retention = 7",
        "[store]\nrecord_retention = 7",
        "[store]\ngc_interval = 7",
        "[store]\ngc_free_space = 7",
        "[accounts.alice]\nretention = 7\nquota = 7",
        "[admin]\naccounts = [\"ops\"]",
        "[builds]\nmax_silent_time = 7",
        "[builds]\nbuild_timeout = 7",
        "[builds]\nmax_log_size = 7",
        "[builds]\nmax_output_size = 7",
        "[builds]\nderivation_requests = true",
        "[builds]\ndev_shm_size = \"7m\"",
        "[builds]\nkeep_going = false",
        "[builds]\ngraph_jobs = 7",
    ];
    const RESTART: &[(&str, &str)] = &[
        ("[store]\nmax_nar_size = 7", "[store]"),
        ("[store]\nmax_paths_per_request = 7", "[store]"),
        ("[store]\ndisk_reserve = 7", "[store]"),
        ("[store]\nmax_request_bytes = 70000", "[store]"),
        ("[builds]\nuid_base = 7", "builds.uid_base"),
        ("[builds]\nuid_count = 7", "builds.uid_count"),
        ("[capacity]\ncores = 7", "[capacity]"),
        ("[capacity]\nmemory = 7", "[capacity]"),
        ("[capacity]\nsystems = [\"i686-linux\"]", "[capacity]"),
        ("[capacity]\nfeatures = [\"kvm\"]", "[capacity]"),
        ("[capacity]\nmandatory_features = [\"kvm\"]", "[capacity]"),
        ("[capacity]\nmax_jobs = 7", "[capacity]"),
        ("[capacity]\npids_per_build = 7", "[capacity]"),
        ("[capacity]\nallow_unenforced_limits = true", "[capacity]"),
        ("[scheduler]\nhalf_life = 7", "[scheduler]"),
        ("[scheduler]\ndefault_cores = 7", "[scheduler]"),
        ("[scheduler]\ndefault_memory = 7", "[scheduler]"),
        ("[scheduler]\nbig_parallel_percent = 7", "[scheduler]"),
        ("[scheduler]\nstarvation_after = 7", "[scheduler]"),
        ("[scheduler.weights]\nalice = 7", "[scheduler]"),
        ("[limits]\nmax_sessions = 7", "limits.max_sessions"),
        (
            "[limits]\nmax_buffered_bytes = \"1G\"",
            "limits.max_buffered_bytes",
        ),
        ("[relay]\nsocket_group = 7", "relay.socket_group"),
        ("[metrics]\nlisten = \"127.0.0.1:7\"", "metrics.listen"),
        (
            "[ssh]\nlisten = \"127.0.0.1:7\"\nauthorized_keys = \"/k\"",
            "ssh.listen",
        ),
        (
            "[ssh]\nkey_types = [\"ecdsa-sha2-nistp256\"]",
            "ssh.key_types",
        ),
        (
            "[ssh]\nciphers = [\"chacha20-poly1305@openssh.com\"]",
            "ssh.ciphers",
        ),
        ("[ssh]\nmax_unauthenticated = 7", "ssh.max_unauthenticated"),
        (
            "[ssh]\nmax_unauthenticated_per_source = 7",
            "ssh.max_unauthenticated_per_source",
        ),
    ];

    #[test]
    fn each_setting_is_either_put_in_force_or_named_for_a_restart() {
        let running = Config::default();
        for text in LIVE {
            let new = Config::parse(text).unwrap();
            assert_ne!(new, running, "{text} changes nothing");
            let (merged, restart) = merge(&running, &new);
            assert_eq!(merged, new, "{text} is not put in force");
            assert!(restart.is_empty(), "{text}: {restart:?}");
        }
        for (text, key) in RESTART {
            let new = Config::parse(text).unwrap();
            assert_ne!(new, running, "{text} changes nothing");
            let (merged, restart) = merge(&running, &new);
            assert_eq!(merged, running, "{text} is put in force");
            assert_eq!(restart.first(), Some(key), "{text}: {restart:?}");
        }
    }

    #[test]
    fn a_mixed_change_applies_the_live_part_and_names_the_rest() {
        let running = Config::parse("[limits]\nmax_sessions_per_account = 2").unwrap();
        let live = LiveConfig::new(running);
        let new = Config::parse(
            "[limits]\nmax_sessions_per_account = 5\nmax_sessions = 9\n\
             [builds]\nuid_count = 3",
        )
        .unwrap();
        let restart = live.update(&new);
        assert_eq!(restart, ["builds.uid_count", "limits.max_sessions"]);
        let now = live.get();
        assert_eq!(now.limits.max_sessions_per_account, 5);
        assert_eq!(
            now.limits.max_sessions,
            Config::default().limits.max_sessions
        );
        assert_eq!(now.builds.uid_count, Config::default().builds.uid_count);
        // Reading the same file again changes nothing more and names the same settings,
        // which still differ from what runs.
        assert_eq!(live.update(&new), restart);
        assert_eq!(*live.get(), *now);
    }

    #[test]
    fn the_source_reads_the_file_and_the_command_line_again() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("nixbuild.toml");
        std::fs::write(&file, "[timeouts]\nidle = 5\n").unwrap();
        let source = ConfigSource {
            state_dir: dir.path().to_owned(),
            file: Some(file.clone()),
            overrides: Overrides {
                handshake_timeout: Some(9),
                ..Overrides::default()
            },
        };
        let first = source.load().unwrap();
        assert_eq!((first.timeouts.idle, first.timeouts.handshake), (5, 9));
        std::fs::write(&file, "[timeouts]\nidle = 6\nhandshake = 1\n").unwrap();
        let second = source.load().unwrap();
        assert_eq!((second.timeouts.idle, second.timeouts.handshake), (6, 9));
        std::fs::write(&file, "[timeouts]\nidle = \"soon\"\n").unwrap();
        let e = source.load().unwrap_err();
        assert!(e.to_string().contains("nixbuild.toml"), "{e}");
    }
}
