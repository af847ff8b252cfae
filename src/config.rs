//! The daemon's configuration: one TOML file (DESIGN.md, Configuration), read from
//! `nixbuild-server --config FILE` or, when it exists, `<state-dir>/nixbuild.toml`. Every key is
//! optional and has a documented default; unknown keys are errors, so a typo never silently
//! falls back to a default. Command-line flags override the file through [`Overrides`].
//!
//! `nixbuild.example.toml` at the repository root lists every key with its default and is
//! parsed by a test, so it cannot drift from this schema.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Largest value `max_paths_per_request` may take: the serve codec's own bound on the
/// elements of one list, which it applies before the daemon sees a request.
pub const MAX_PATHS_PER_REQUEST_CEILING: usize = 1 << 20;

/// Smallest `max_request_bytes`: room for any request that names a single path.
pub const MIN_REQUEST_BYTES: usize = 64 << 10;

/// Why the configuration could not be loaded. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read the configuration {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema (the message names the key, line and
    /// column).
    #[error("invalid configuration {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A key has a value outside its range.
    #[error("invalid configuration {source_name}: {key}: {reason}")]
    Invalid {
        /// The file, or `command line` for an override.
        source_name: String,
        /// The key, as `section.key`.
        key: &'static str,
        /// What is wrong with the value.
        reason: String,
    },
}

/// The whole configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[store]`: limits of the store and of requests.
    pub store: StoreConfig,
    /// `[timeouts]`: server-side timeouts.
    pub timeouts: TimeoutConfig,
    /// `[relay]`: who may relay sessions over `serve.sock`.
    pub relay: RelayConfig,
    /// `[limits]`: bounds on the daemon as a whole.
    pub limits: LimitsConfig,
    /// `[builds]`.
    pub builds: BuildsConfig,
    /// `[ssh]`: the embedded SSH server.
    pub ssh: SshConfig,
}

/// `[ssh]`: the embedded SSH server (nixbuild-ssh). Off unless `listen` is set.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SshConfig {
    /// Where to listen for SSH, e.g. `127.0.0.1:2222` (port 0 picks a free port, which the
    /// server prints). Default none: no SSH, only `serve.sock`. Requires `authorized_keys`.
    pub listen: Option<SocketAddr>,
    /// The keys allowed in, in OpenSSH `authorized_keys` format; the first word of a key's
    /// comment names its account. Re-read when it changes and on SIGHUP. Default none.
    pub authorized_keys: Option<PathBuf>,
    /// Key types accepted, by OpenSSH name: `ssh-ed25519`, `ecdsa-sha2-nistp256`,
    /// `ecdsa-sha2-nistp384`, `ecdsa-sha2-nistp521`. Default `["ssh-ed25519"]`.
    pub key_types: Vec<String>,
    /// Connections at once, authenticated or not; more are closed at once. Default 256.
    pub max_connections: usize,
    /// Connections of one account at once; commands on more are refused. Default 64 (the
    /// build hook opens one connection per remote build).
    pub max_connections_per_account: usize,
    /// Sessions (channels) open at once on one connection (ssh ControlMaster). Default 10,
    /// like OpenSSH's MaxSessions.
    pub max_sessions_per_connection: usize,
}

impl Default for SshConfig {
    fn default() -> Self {
        SshConfig {
            listen: None,
            authorized_keys: None,
            key_types: vec![nixbuild_ssh::authorized_keys::DEFAULT_KEY_TYPE.to_owned()],
            max_connections: 256,
            max_connections_per_account: 64,
            max_sessions_per_connection: 10,
        }
    }
}

/// `[limits]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Most sessions relayed over `serve.sock` at once; a connection beyond it gets
    /// `error: ...` and exit status 1. Default 1024. (SSH has its own limits in `[ssh]`.)
    pub max_sessions: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig { max_sessions: 1024 }
    }
}

/// `[store]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Largest NAR accepted for one path, in bytes. Default 64 GiB: far above the largest
    /// paths of a NixOS system, low enough to stop a runaway upload early.
    pub max_nar_size: u64,
    /// Most store paths in one request (QueryValidPaths, QueryPathInfos, QueryClosure,
    /// ExportPaths, BuildPaths) or in one ImportPaths stream. Default 100,000: a NixOS closure
    /// of over 10,000 paths goes in one request. At most 1,048,576.
    pub max_paths_per_request: usize,
    /// Uploads are refused while the state directory's file system has less free space than
    /// this, in bytes. Default 1 GiB.
    pub disk_reserve: u64,
    /// Most bytes a session holds of one request (or ImportPaths trailer) before it is
    /// complete; NAR data does not count, it streams to disk. Also the longest string a
    /// request may carry. Default 64 MiB: a request naming 100,000 paths takes about 8 MiB.
    pub max_request_bytes: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            max_nar_size: 64 << 30,
            max_paths_per_request: 100_000,
            disk_reserve: 1 << 30,
            max_request_bytes: 64 << 20,
        }
    }
}

/// `[timeouts]`, in seconds.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutConfig {
    /// SSH: from TCP connection to successful authentication. Default 60.
    pub auth: u64,
    /// From connection to the end of the protocol handshake (relay header included).
    /// Default 60.
    pub handshake: u64,
    /// Longest wait for the client's next bytes, between requests or inside an upload; also
    /// how long an SSH connection may stay open with no session. Default 1800: clients
    /// compute closures and serialise large paths between requests.
    pub idle: u64,
    /// On SIGTERM or SIGINT, how long running sessions may take to finish before they are
    /// cut off (their unfinished imports are discarded). Default 30.
    pub shutdown: u64,
    /// Longest wait for the client to take the server's next bytes: a client that stops
    /// reading ends its session after this. Default 300.
    pub write: u64,
}

impl Default for TimeoutConfig {
    fn default() -> Self {
        TimeoutConfig {
            auth: 60,
            handshake: 60,
            idle: 1800,
            shutdown: 30,
            write: 300,
        }
    }
}

impl TimeoutConfig {
    /// [`TimeoutConfig::auth`] as a duration.
    pub fn auth(&self) -> Duration {
        Duration::from_secs(self.auth)
    }

    /// [`TimeoutConfig::handshake`] as a duration.
    pub fn handshake(&self) -> Duration {
        Duration::from_secs(self.handshake)
    }

    /// [`TimeoutConfig::idle`] as a duration.
    pub fn idle(&self) -> Duration {
        Duration::from_secs(self.idle)
    }

    /// [`TimeoutConfig::write`] as a duration.
    pub fn write(&self) -> Duration {
        Duration::from_secs(self.write)
    }

    /// [`TimeoutConfig::shutdown`] as a duration.
    pub fn shutdown(&self) -> Duration {
        Duration::from_secs(self.shutdown)
    }
}

/// `[builds]`: how builds run. Time limits are in seconds, sizes in bytes; 0 means no limit.
/// A client's own `--max-silent-time`, `--timeout` and `--max-log-size` apply too: the
/// smaller non-zero value wins.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BuildsConfig {
    /// The first host uid (and gid) given to builds. Default 2000000000, far above the ids
    /// of users and system accounts.
    pub uid_base: u32,
    /// How many host uids builds may use: the most builds that run at once. Default 1024.
    pub uid_count: u32,
    /// Seconds without log output before a build is killed. Default 0 (no limit).
    pub max_silent_time: u64,
    /// Seconds a build may run. Default 86400 (a day).
    pub build_timeout: u64,
    /// Bytes of log a build may write. Default 268435456 (256 MiB).
    pub max_log_size: u64,
    /// Cores a build gets (`NIX_BUILD_CORES`). Default 1.
    pub cores_per_build: u32,
    /// `size=` of each build's `/dev/shm` tmpfs. Default "50%", like Nix.
    pub dev_shm_size: String,
}

impl Default for BuildsConfig {
    fn default() -> Self {
        BuildsConfig {
            uid_base: 2_000_000_000,
            uid_count: 1024,
            max_silent_time: 0,
            build_timeout: 86_400,
            max_log_size: 256 << 20,
            cores_per_build: 1,
            dev_shm_size: "50%".into(),
        }
    }
}

/// `[relay]`: peers of `serve.sock` allowed to name the account of a session. Root always
/// may. The check uses the peer's uid and primary gid from SO_PEERCRED; supplementary groups
/// are not considered: a relay user trusted through `trusted_gids` must have that group as
/// its primary group (the one in /etc/passwd, or the one `sg`/`newgrp`/setgid gives it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// User ids trusted to relay. Default none.
    pub trusted_uids: Vec<u32>,
    /// Primary group ids trusted to relay. Default none.
    pub trusted_gids: Vec<u32>,
    /// The group `serve.sock` belongs to (mode 0660), by name (looked up in /etc/group) or
    /// by gid. Relay users that are not root need to be in it (for the connect itself any of
    /// their groups counts, supplementary ones too) as well as trusted above. Default none:
    /// the socket stays root:root, reachable by root only.
    pub socket_group: Option<GroupRef>,
}

/// A group, by name or by id.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum GroupRef {
    /// A numeric gid.
    Id(u32),
    /// A group name, resolved through /etc/group.
    Name(String),
}

/// The file group names are resolved in.
const GROUP_FILE: &str = "/etc/group";

impl GroupRef {
    /// The gid: the number itself, or the name's entry in /etc/group.
    pub fn resolve(&self) -> Result<u32, ConfigError> {
        let invalid = |reason| ConfigError::Invalid {
            source_name: GROUP_FILE.to_owned(),
            key: "relay.socket_group",
            reason,
        };
        match self {
            GroupRef::Id(gid) if *gid == u32::MAX => Err(invalid(format!("{gid} is not a gid"))),
            GroupRef::Id(gid) => Ok(*gid),
            GroupRef::Name(name) => {
                let text = std::fs::read_to_string(GROUP_FILE)
                    .map_err(|e| invalid(format!("cannot read {GROUP_FILE}: {e}")))?;
                gid_of(&text, name)
                    .ok_or_else(|| invalid(format!("no group {name:?} in {GROUP_FILE}")))
            }
        }
    }
}

/// The gid of group `name` in the text of a group file (`name:password:gid:members`).
fn gid_of(group_file: &str, name: &str) -> Option<u32> {
    group_file.lines().find_map(|line| {
        let mut fields = line.split(':');
        if fields.next()? != name {
            return None;
        }
        fields.nth(1)?.parse().ok().filter(|gid| *gid != u32::MAX)
    })
}

impl RelayConfig {
    /// Whether a peer with this uid and primary gid may relay sessions.
    pub fn trusts(&self, uid: u32, gid: u32) -> bool {
        uid == 0 || self.trusted_uids.contains(&uid) || self.trusted_gids.contains(&gid)
    }
}

/// Command-line values that replace the file's; `None` keeps the file's value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `store.max_nar_size`.
    pub max_nar_size: Option<u64>,
    /// `store.max_paths_per_request`.
    pub max_paths_per_request: Option<usize>,
    /// `store.disk_reserve`.
    pub disk_reserve: Option<u64>,
    /// `timeouts.handshake`.
    pub handshake_timeout: Option<u64>,
    /// `timeouts.idle`.
    pub idle_timeout: Option<u64>,
    /// `timeouts.shutdown`.
    pub shutdown_timeout: Option<u64>,
    /// `relay.trusted_uids`, replaced as a whole when given.
    pub trusted_uids: Option<Vec<u32>>,
    /// `relay.trusted_gids`, replaced as a whole when given.
    pub trusted_gids: Option<Vec<u32>>,
    /// `ssh.listen`.
    pub listen: Option<SocketAddr>,
    /// `ssh.authorized_keys`.
    pub authorized_keys: Option<PathBuf>,
}

impl Config {
    /// Reads and checks the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config = Config::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            ConfigError::Invalid { key, reason, .. } => ConfigError::Invalid {
                source_name: path.display().to_string(),
                key,
                reason,
            },
            other => other,
        })?;
        Ok(config)
    }

    /// The configuration for a daemon: `explicit` (`--config`) when given, else
    /// `<state_dir>/nixbuild.toml` when it exists, else the defaults; then `overrides`.
    pub fn for_daemon(
        state_dir: &Path,
        explicit: Option<&Path>,
        overrides: &Overrides,
    ) -> Result<Config, ConfigError> {
        let default_file = state_dir.join("nixbuild.toml");
        let mut config = match explicit {
            Some(path) => Config::load(path)?,
            None if default_file.exists() => Config::load(&default_file)?,
            None => Config::default(),
        };
        config.apply(overrides)?;
        Ok(config)
    }

    /// Parses TOML text (errors name `<text>` as the file).
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<text>"),
            message: e.to_string(),
        })?;
        config.check("<text>")?;
        Ok(config)
    }

    /// Replaces values with the command line's and checks the result.
    pub fn apply(&mut self, o: &Overrides) -> Result<(), ConfigError> {
        fn set<T: Clone>(slot: &mut T, value: &Option<T>) {
            if let Some(v) = value {
                *slot = v.clone();
            }
        }
        set(&mut self.store.max_nar_size, &o.max_nar_size);
        set(
            &mut self.store.max_paths_per_request,
            &o.max_paths_per_request,
        );
        set(&mut self.store.disk_reserve, &o.disk_reserve);
        set(&mut self.timeouts.handshake, &o.handshake_timeout);
        set(&mut self.timeouts.idle, &o.idle_timeout);
        set(&mut self.timeouts.shutdown, &o.shutdown_timeout);
        set(&mut self.relay.trusted_uids, &o.trusted_uids);
        set(&mut self.relay.trusted_gids, &o.trusted_gids);
        if o.listen.is_some() {
            self.ssh.listen = o.listen;
        }
        if o.authorized_keys.is_some() {
            self.ssh.authorized_keys.clone_from(&o.authorized_keys);
        }
        self.check("command line")?;
        self.check_ssh_pair()
    }

    /// `ssh.listen` and `ssh.authorized_keys` go together (checked once the command line is
    /// applied, since either may come from it).
    fn check_ssh_pair(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: &str| ConfigError::Invalid {
            source_name: "configuration and command line".to_owned(),
            key,
            reason: reason.to_owned(),
        };
        match (&self.ssh.listen, &self.ssh.authorized_keys) {
            (Some(_), None) => Err(invalid(
                "ssh.authorized_keys",
                "required when ssh.listen is set (--authorized-keys FILE)",
            )),
            (None, Some(_)) => Err(invalid(
                "ssh.listen",
                "required when ssh.authorized_keys is set (--listen ADDR)",
            )),
            _ => Ok(()),
        }
    }

    fn check(&self, source_name: &str) -> Result<(), ConfigError> {
        let invalid = |key, reason: String| ConfigError::Invalid {
            source_name: source_name.to_owned(),
            key,
            reason,
        };
        if self.store.max_nar_size == 0 {
            return Err(invalid("store.max_nar_size", "must be at least 1".into()));
        }
        let paths = self.store.max_paths_per_request;
        if !(1..=MAX_PATHS_PER_REQUEST_CEILING).contains(&paths) {
            return Err(invalid(
                "store.max_paths_per_request",
                format!("{paths} is not in 1..={MAX_PATHS_PER_REQUEST_CEILING}"),
            ));
        }
        if self.limits.max_sessions == 0 {
            return Err(invalid("limits.max_sessions", "must be at least 1".into()));
        }
        if self.store.max_request_bytes < MIN_REQUEST_BYTES {
            return Err(invalid(
                "store.max_request_bytes",
                format!("must be at least {MIN_REQUEST_BYTES}"),
            ));
        }
        let b = &self.builds;
        if b.uid_base == 0
            || b.uid_count == 0
            || b.uid_base
                .checked_add(b.uid_count)
                .is_none_or(|end| end > u32::MAX - 1)
        {
            return Err(invalid(
                "builds.uid_base",
                format!(
                    "{} uids from {} must be at least one, non-zero and below 4294967295",
                    b.uid_count, b.uid_base
                ),
            ));
        }
        if b.cores_per_build == 0 {
            return Err(invalid(
                "builds.cores_per_build",
                "must be at least 1".into(),
            ));
        }
        if let Err(e) = nixbuild_ssh::KeyTypes::from_names(&self.ssh.key_types) {
            return Err(invalid("ssh.key_types", e.to_string()));
        }
        for (key, n) in [
            ("ssh.max_connections", self.ssh.max_connections),
            (
                "ssh.max_connections_per_account",
                self.ssh.max_connections_per_account,
            ),
            (
                "ssh.max_sessions_per_connection",
                self.ssh.max_sessions_per_connection,
            ),
        ] {
            if n == 0 {
                return Err(invalid(key, "must be at least 1".into()));
            }
        }
        for (key, secs) in [
            ("timeouts.auth", self.timeouts.auth),
            ("timeouts.handshake", self.timeouts.handshake),
            ("timeouts.idle", self.timeouts.idle),
            ("timeouts.write", self.timeouts.write),
        ] {
            if secs == 0 {
                return Err(invalid(key, "must be at least 1 second".into()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports failure
mod tests {
    use super::*;

    #[test]
    fn example_file_parses_to_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("nixbuild.example.toml");
        assert_eq!(Config::load(&path).unwrap(), Config::default());
        assert_eq!(Config::parse("").unwrap(), Config::default());
    }

    #[test]
    fn values_are_read() {
        let c = Config::parse(
            "[store]\nmax_nar_size = 1000\n[timeouts]\nidle = 5\n\
             [relay]\ntrusted_uids = [1000]\ntrusted_gids = [30000]\n",
        )
        .unwrap();
        assert_eq!(c.store.max_nar_size, 1000);
        assert_eq!(c.store.disk_reserve, StoreConfig::default().disk_reserve);
        assert_eq!(c.timeouts.idle(), Duration::from_secs(5));
        assert!(c.relay.trusts(0, 0));
        assert!(c.relay.trusts(1000, 1));
        assert!(c.relay.trusts(5, 30000));
        assert!(!c.relay.trusts(5, 5));
    }

    #[test]
    fn unknown_key_error_names_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nixbuild.toml");
        std::fs::write(&path, "[store]\nmax_nar_sise = 5\n").unwrap();
        let msg = Config::load(&path).unwrap_err().to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("max_nar_sise"), "{msg}");
        std::fs::write(&path, "[stor]\n").unwrap();
        let msg = Config::load(&path).unwrap_err().to_string();
        assert!(msg.contains("stor"), "{msg}");
    }

    #[test]
    fn wrong_type_and_range_errors_name_the_key() {
        let msg = Config::parse("[timeouts]\nidle = \"long\"\n")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("idle"), "{msg}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[store]\nmax_paths_per_request = 0\n").unwrap();
        let msg = Config::load(&path).unwrap_err().to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("store.max_paths_per_request"), "{msg}");
    }

    #[test]
    fn socket_group_by_name_or_id() {
        let c = Config::parse("[relay]\nsocket_group = \"nixbuild\"\n").unwrap();
        assert_eq!(
            c.relay.socket_group,
            Some(GroupRef::Name("nixbuild".into()))
        );
        let c = Config::parse("[relay]\nsocket_group = 30000\n").unwrap();
        assert_eq!(c.relay.socket_group.unwrap().resolve().unwrap(), 30000);
        let file = "root:x:0:\n# comment\nnix:x:30000:alice,bob\nbad:x:notanumber:\n";
        assert_eq!(gid_of(file, "root"), Some(0));
        assert_eq!(gid_of(file, "nix"), Some(30000));
        assert_eq!(gid_of(file, "ni"), None);
        assert_eq!(gid_of(file, "bad"), None);
        assert_eq!(GroupRef::Name("root".into()).resolve().unwrap(), 0);
        let msg = GroupRef::Name("no-such-group-here".into())
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(msg.contains("relay.socket_group") && msg.contains("no-such-group-here"));
    }

    #[test]
    fn ssh_settings_are_read_and_checked() {
        let c = Config::parse(
            "[ssh]\nlisten = \"127.0.0.1:2222\"\nauthorized_keys = \"/etc/keys\"\n\
             key_types = [\"ssh-ed25519\", \"ecdsa-sha2-nistp256\"]\n[timeouts]\nauth = 5\n",
        )
        .unwrap();
        assert_eq!(c.ssh.listen, Some("127.0.0.1:2222".parse().unwrap()));
        assert_eq!(c.ssh.authorized_keys, Some(PathBuf::from("/etc/keys")));
        assert_eq!(c.timeouts.auth(), Duration::from_secs(5));
        let msg = Config::parse("[ssh]\nkey_types = [\"ssh-rsa\"]\n")
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("ssh.key_types") && msg.contains("ssh-rsa"),
            "{msg}"
        );
        let msg = Config::parse("[ssh]\nlisten = \"nowhere\"\n")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("listen"), "{msg}");

        // Either half may come from the command line; one alone is an error.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("nixbuild.toml"),
            "[ssh]\nlisten = \"127.0.0.1:0\"\n",
        )
        .unwrap();
        let msg = Config::for_daemon(dir.path(), None, &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(msg.contains("ssh.authorized_keys"), "{msg}");
        let keys = Overrides {
            authorized_keys: Some("/k".into()),
            ..Overrides::default()
        };
        let c = Config::for_daemon(dir.path(), None, &keys).unwrap();
        assert_eq!(c.ssh.authorized_keys, Some(PathBuf::from("/k")));
        let empty = tempfile::tempdir().unwrap();
        let msg = Config::for_daemon(empty.path(), None, &keys)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("ssh.listen"), "{msg}");
    }

    #[test]
    fn missing_file_error_names_it() {
        let msg = Config::load(Path::new("/nonexistent/nixbuild.toml"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("/nonexistent/nixbuild.toml"), "{msg}");
    }

    #[test]
    fn flags_override_the_file_and_the_default_file_is_found() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("nixbuild.toml"),
            "[store]\nmax_nar_size = 1000\ndisk_reserve = 7\n",
        )
        .unwrap();
        let o = Overrides {
            max_nar_size: Some(2000),
            trusted_gids: Some(vec![42]),
            ..Overrides::default()
        };
        let c = Config::for_daemon(dir.path(), None, &o).unwrap();
        assert_eq!(c.store.max_nar_size, 2000);
        assert_eq!(c.store.disk_reserve, 7);
        assert_eq!(c.relay.trusted_gids, vec![42]);
        let bad = Overrides {
            idle_timeout: Some(0),
            ..Overrides::default()
        };
        let msg = Config::for_daemon(dir.path(), None, &bad)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("command line") && msg.contains("timeouts.idle"),
            "{msg}"
        );
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(
            Config::for_daemon(empty.path(), None, &Overrides::default()).unwrap(),
            Config::default()
        );
    }
}
