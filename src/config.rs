//! The daemon's configuration: one TOML file (docs/design.md, Configuration), read from
//! `nixbuild-server --config FILE` or, when it exists, `<state-dir>/nixbuild.toml`. Every key is
//! optional and has a documented default; unknown keys are errors, so a typo never silently
//! falls back to a default. Command-line flags override the file through [`Overrides`].
//!
//! `nixbuild.example.toml` at the repository root lists every key with its default and is
//! parsed by a test, so it cannot drift from this schema.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nixbuild_core::scheduler::{Machine, SchedulerConfig};
use serde::{Deserialize, Deserializer};

use crate::host::HostFacts;
use crate::store::{AccountPolicy, StorePolicy};

/// Largest value `max_paths_per_request` may take: the serve codec's own bound on the
/// elements of one list, which it applies before the daemon sees a request.
pub const MAX_PATHS_PER_REQUEST_CEILING: usize = 1 << 20;

/// Smallest `max_request_bytes`: room for any request that names a single path.
pub const MIN_REQUEST_BYTES: usize = 64 << 10;

/// The share of the host's memory `max_buffered_bytes` defaults to: an eighth.
pub const BUFFERED_SHARE_OF_MEMORY: u64 = 8;

/// Least default `max_buffered_bytes`: room for one request of the default
/// `max_request_bytes` while its buffer moves to a larger allocation (both are counted),
/// even on a small VM.
pub const MIN_DEFAULT_BUFFERED_BYTES: u64 = 64 << 20;

/// Most default `max_buffered_bytes`: over a hundred requests of the default 32 MiB at once,
/// far more than clients hold mid-request (a request is normally a few KiB and complete in one read);
/// a larger machine keeps the rest of its eighth for builds.
pub const MAX_DEFAULT_BUFFERED_BYTES: u64 = 8 << 30;

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
    /// `[capacity]`: what this server offers to builds.
    pub capacity: CapacityConfig,
    /// `[scheduler]`: how builds share the capacity.
    pub scheduler: SchedulerSection,
    /// `[substituters]`: binary caches the server fetches paths from.
    pub substituters: SubstitutersConfig,
    /// `[accounts.NAME]`: one account's own retention and quota.
    pub accounts: BTreeMap<String, AccountConfig>,
    /// `[admin]`: who may see and act on every account (`nixbuild` over SSH).
    pub admin: AdminConfig,
    /// `[metrics]`: the Prometheus endpoint.
    pub metrics: MetricsConfig,
    /// `[fleet]`: other machines this server sends builds to.
    pub fleet: FleetConfig,
}

/// `[fleet]`: the builders behind this server. Taken into account on reload.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetConfig {
    /// A file in Nix's machines format (`ssh://[user@]host[:port]` or `ssh-ng://…`
    /// machines, each with its SSH identity file and pinned host key), re-read when it
    /// changes. Default none: this host builds alone.
    pub machines: Option<PathBuf>,
    /// How often a machine that is up is probed (SSH, login, protocol handshake). A machine
    /// that is down is tried again after twice as long each time, up to 10 minutes.
    /// Seconds or a duration. Default 30 s.
    #[serde(deserialize_with = "duration")]
    pub probe_interval: u64,
    /// Longest time for reaching a machine, logging in and the handshake. Default 10 s.
    #[serde(deserialize_with = "duration")]
    pub connect_timeout: u64,
    /// Longest wait for a machine's answer outside a build's run (the copies of inputs and
    /// outputs, queries); a machine silent for longer fails the build there, which goes to
    /// another machine. Taken for machines read after a change. Default 60 s.
    #[serde(deserialize_with = "duration")]
    pub io_timeout: u64,
    /// Whether this host builds too, beside the machines. Default true; with false every
    /// build goes to a machine (and what no machine can build is refused).
    pub build_locally: bool,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            machines: None,
            probe_interval: 30,
            connect_timeout: 10,
            io_timeout: 60,
            build_locally: true,
        }
    }
}

/// `[admin]`: the operators' accounts. Taken into account on reload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Accounts that may run `nixbuild accounts`, `gc` and `status`, and read or cancel any
    /// account's builds with `--account NAME` or `--all`. Default none.
    pub accounts: Vec<String>,
}

impl AdminConfig {
    /// Whether `account` is an admin.
    pub fn is_admin(&self, account: &str) -> bool {
        self.accounts.iter().any(|a| a == account)
    }
}

/// `[metrics]`: metrics in the Prometheus text format at `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Where to serve them, e.g. `127.0.0.1:9469`. Default none: no metrics endpoint. It has
    /// no authentication: keep it on a loopback or private address. Needs a restart.
    pub listen: Option<SocketAddr>,
}

/// `[accounts.NAME]`: settings of one account that replace the server's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccountConfig {
    /// Instead of `[store] retention`.
    #[serde(deserialize_with = "duration_opt")]
    pub retention: Option<u64>,
    /// Instead of `[store] quota`.
    #[serde(deserialize_with = "size_opt")]
    pub quota: Option<u64>,
    /// Instead of `[limits] max_builds_per_account`.
    pub max_builds: Option<usize>,
    /// Instead of `[limits] max_running_builds_per_account`.
    pub max_running_builds: Option<usize>,
}

/// `[substituters]`: binary caches the server fetches paths from instead of having clients
/// upload them (a client's `builds-use-substitutes`, `--substitute-on-destination`, and the
/// missing inputs of builds). Off while `urls` is empty. What a cache serves is used only
/// with a signature by one of `trusted_public_keys`; it is then public content, stored once
/// and granted to every account that asks for it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SubstitutersConfig {
    /// The caches: `https://…`, `http://…` or `file:///dir`, each with an optional
    /// `?priority=N` (lower is tried first; otherwise the cache's own `nix-cache-info`, else
    /// 50, as Nix). Default none.
    pub urls: Vec<String>,
    /// Keys whose signatures are trusted, in Nix's `name:base64` form. Default none (then
    /// nothing can be substituted).
    pub trusted_public_keys: Vec<String>,
    /// Requests to caches at once, for the whole server (narinfos and NARs). Default 16.
    pub max_parallel: usize,
    /// NARs downloaded at once, for the whole server (within `max_parallel`), and threads
    /// one substitution downloads on: each holds a decompressor (up to about 9 MiB for xz),
    /// so this bounds the memory substitution takes. Default 4, which keeps 2 cores busy
    /// (raise it with the cores, or for caches far away).
    pub max_downloads: usize,
    /// Idle connections kept open per cache host for reuse. Default 16.
    pub max_connections: usize,
    /// Seconds to connect to a cache. Default 10.
    pub connect_timeout: u64,
    /// Seconds a cache may stay silent while answering before the request fails. Default 60.
    pub read_timeout: u64,
    /// Seconds a narinfo found is remembered. Default 2592000 (30 days, as Nix).
    pub narinfo_positive_ttl: u64,
    /// Seconds a path no cache has is remembered as missing. Default 3600 (as Nix).
    pub narinfo_negative_ttl: u64,
    /// Most narinfo lookups remembered. Default 65536.
    pub narinfo_cache_entries: usize,
}

impl Default for SubstitutersConfig {
    fn default() -> Self {
        SubstitutersConfig {
            urls: Vec::new(),
            trusted_public_keys: Vec::new(),
            max_parallel: 16,
            max_downloads: 4,
            max_connections: 16,
            connect_timeout: 10,
            read_timeout: 60,
            narinfo_positive_ttl: 30 * 86_400,
            narinfo_negative_ttl: 3600,
            narinfo_cache_entries: 65_536,
        }
    }
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
    /// Ciphers offered, by OpenSSH name: `aes256-gcm@openssh.com`,
    /// `chacha20-poly1305@openssh.com`, `aes256-ctr`, `aes192-ctr`, `aes128-ctr`. A client
    /// takes the first of its own list that is offered (OpenSSH's puts ChaCha20 first), so
    /// the default offers AES-256-GCM alone, much the cheaper on both ends with AES-NI.
    /// Default `["aes256-gcm@openssh.com"]`.
    pub ciphers: Vec<String>,
    /// Authenticated connections at once; a client authenticating beyond it is disconnected
    /// with a message naming this setting. Connections not yet authenticated do not count
    /// here (see `max_unauthenticated`), so they can never lock accounts out. Default 256.
    pub max_connections: usize,
    /// Connections not yet authenticated at once (from accept until successful
    /// authentication, at most `timeouts.auth`). When all are taken, a newcomer is still
    /// admitted: the oldest unauthenticated connection of the source holding the most is
    /// closed instead. Like OpenSSH's MaxStartups. Default 256: room for two clients' bursts
    /// of `max_unauthenticated_per_source`.
    pub max_unauthenticated: usize,
    /// Connections not yet authenticated at once from one source (an IPv4 address, an IPv6
    /// /64); more from it are closed at once. Like OpenSSH's PerSourceMaxStartups. Default
    /// 128: a Nix client with the recommended builders line (`- 100 1`) starts up to 100
    /// build hooks at once, each connecting on its own.
    pub max_unauthenticated_per_source: usize,
    /// Connections of one account at once; commands on more are refused. Default 128 (the
    /// build hook opens one connection per remote build, up to 100 with the recommended
    /// builders line).
    pub max_connections_per_account: usize,
    /// Sessions (channels) open at once on one connection (ssh ControlMaster). Default 128,
    /// so that the build hooks of one client fit through one shared connection; an account's
    /// sessions are bounded as a whole by `[limits] max_sessions_per_account`.
    pub max_sessions_per_connection: usize,
}

impl Default for SshConfig {
    fn default() -> Self {
        SshConfig {
            listen: None,
            authorized_keys: None,
            key_types: vec![nixbuild_ssh::authorized_keys::DEFAULT_KEY_TYPE.to_owned()],
            ciphers: nixbuild_ssh::ciphers::DEFAULT_CIPHERS
                .iter()
                .map(|c| (*c).to_owned())
                .collect(),
            max_connections: 256,
            max_unauthenticated: 256,
            max_unauthenticated_per_source: 128,
            max_connections_per_account: 128,
            max_sessions_per_connection: 128,
        }
    }
}

/// `[capacity]`: the cores, memory, systems and features builds run on. Unset values come
/// from the host ([`HostFacts`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CapacityConfig {
    /// Cores builds may use. Default: every CPU this daemon may run on (its cpuset). At most
    /// that many unless `allow_unenforced_limits`.
    pub cores: Option<u32>,
    /// Memory builds may use, in bytes, or a size such as `"16G"` (see [`parse_size`]).
    /// Default: the host's total memory (`MemTotal`).
    #[serde(deserialize_with = "size_opt")]
    pub memory: Option<u64>,
    /// Systems builds may be for. Default: the host's (`x86_64-linux` and `i686-linux` on
    /// x86_64).
    pub systems: Option<Vec<String>>,
    /// Features offered to derivations that require them. Default: `benchmark`,
    /// `big-parallel`, `ca-derivations` (content-addressed derivations, which require it
    /// implicitly), and `kvm` and `nixos-test` when builds can use `/dev/kvm`
    /// ([`crate::host::kvm_usable`]); `kvm` and `nixos-test` are left out without it, even
    /// when listed here.
    pub features: Option<Vec<String>>,
    /// Features only derivations that require them may use (Nix's mandatory features).
    /// Default none.
    pub mandatory_features: Vec<String>,
    /// Most builds running at once. Default: `cores` (each build holds at least one core).
    pub max_jobs: Option<u32>,
    /// Most processes and threads of one build at once (cgroup `pids.max`). Default 16384.
    pub pids_per_build: u64,
    /// Start even when a limit (cores, memory, processes, swap) cannot be enforced with
    /// cgroups, with a warning. Default false: the daemon refuses to start.
    pub allow_unenforced_limits: bool,
}

impl Default for CapacityConfig {
    fn default() -> Self {
        CapacityConfig {
            cores: None,
            memory: None,
            systems: None,
            features: None,
            mandatory_features: Vec::new(),
            max_jobs: None,
            pids_per_build: 16384,
            allow_unenforced_limits: false,
        }
    }
}

impl CapacityConfig {
    /// The machine the scheduler places this server's builds on: configured values, else
    /// the host's.
    pub fn machine(&self, host: &HostFacts) -> Machine {
        let cores = self.cores.unwrap_or(host.cpus);
        let default_features = || {
            let mut features: Vec<String> = ["benchmark", "big-parallel", "ca-derivations"]
                .map(str::to_owned)
                .into();
            if host.kvm {
                // A NixOS VM test needs KVM: without it, nixos-test is not offered either.
                features.extend(["kvm".to_owned(), "nixos-test".to_owned()]);
            }
            features
        };
        Machine {
            systems: self.systems.clone().unwrap_or_else(|| host.systems.clone()),
            supported_features: match &self.features {
                None => default_features(),
                Some(features) => features
                    .iter()
                    .filter(|f| {
                        let needs_kvm = matches!(f.as_str(), "kvm" | "nixos-test");
                        if needs_kvm && !host.kvm {
                            tracing::warn!(
                                "capacity.features: not offering {f}: builds cannot use /dev/kvm \
                                 on this host"
                            );
                        }
                        host.kvm || !needs_kvm
                    })
                    .cloned()
                    .collect(),
            },
            mandatory_features: self.mandatory_features.clone(),
            cores,
            memory: self.memory.unwrap_or(host.memory),
            max_jobs: self.max_jobs.unwrap_or(cores),
            speed: Machine::NORMAL_SPEED,
        }
    }
}

/// `[scheduler]`: fair share and the defaults of build requests.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerSection {
    /// Seconds in which an account's past usage (core-seconds) halves. Default 3600.
    pub half_life: u64,
    /// Cores a build gets unless it asks. Default 1.
    pub default_cores: u32,
    /// Memory a build gets unless it asks, in bytes or a size such as `"2G"`. Default unset:
    /// the machine's memory in proportion to the cores granted.
    #[serde(deserialize_with = "size_opt")]
    pub default_memory: Option<u64>,
    /// Percent of the machine's cores (rounded up) a `big-parallel` build gets unless it
    /// asks. Default 100: all of them. 1 to 100.
    pub big_parallel_percent: u32,
    /// Seconds a build may be bypassed by later, smaller builds before a machine is kept
    /// free for it (the anti-starvation rule; see `nixbuild_core::scheduler`). Default 300.
    pub starvation_after: u64,
    /// Fair-share weight by account name; unlisted accounts weigh 1. Default none.
    pub weights: BTreeMap<String, u32>,
}

impl Default for SchedulerSection {
    fn default() -> Self {
        SchedulerSection {
            half_life: 3600,
            default_cores: 1,
            default_memory: None,
            big_parallel_percent: 100,
            starvation_after: 300,
            weights: BTreeMap::new(),
        }
    }
}

impl SchedulerSection {
    /// The scheduler's configuration.
    pub fn scheduler_config(&self) -> SchedulerConfig {
        SchedulerConfig {
            half_life: Duration::from_secs(self.half_life),
            default_cores: self.default_cores,
            default_memory: self.default_memory,
            big_parallel_percent: self.big_parallel_percent,
            starvation_after: Duration::from_secs(self.starvation_after),
            weights: self.weights.clone(),
        }
    }
}

/// Why a size setting does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// No number where one was expected.
    #[error("{0:?} is not a size such as 16G or 512M")]
    NotASize(String),
    /// A suffix other than the units [`parse_size`] knows.
    #[error("{unit:?} in {text:?} is not a unit: use K, M, G or T (powers of 1024)")]
    UnknownUnit {
        /// The suffix.
        unit: String,
        /// The whole setting.
        text: String,
    },
    /// More bytes than a `u64` holds.
    #[error("{0:?} is too large")]
    TooLarge(String),
}

/// Parses a size in bytes: a number, optionally followed by `K`, `M`, `G` or `T` (powers of
/// 1024; `KiB`, `MiB`, `GiB`, `TiB` too), such as `16G` or `512M`.
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let number: u64 = number
        .parse()
        .map_err(|_| SizeError::NotASize(text.to_owned()))?;
    let shift = match unit.trim() {
        "" => 0,
        "K" | "KiB" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        "T" | "TiB" => 40,
        other => {
            return Err(SizeError::UnknownUnit {
                unit: other.to_owned(),
                text: text.to_owned(),
            })
        }
    };
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| SizeError::TooLarge(text.to_owned()))
}

/// Seconds in a day.
const DAY: u64 = 24 * 60 * 60;

/// Why a duration setting does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a duration such as 90s, 30m, 12h, 30d or 2w (or a number of seconds)")]
pub struct DurationError(pub String);

/// Parses a duration in seconds: a number, optionally followed by `s`, `m`, `h`, `d` or `w`.
pub fn parse_duration(text: &str) -> Result<u64, DurationError> {
    let text = text.trim();
    let bad = || DurationError(text.to_owned());
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let number: u64 = number.parse().map_err(|_| bad())?;
    let unit = match unit.trim() {
        "" | "s" => 1,
        "m" => 60,
        "h" => 60 * 60,
        "d" => DAY,
        "w" => 7 * DAY,
        _ => return Err(bad()),
    };
    number.checked_mul(unit).ok_or_else(bad)
}

/// Deserializes a duration given as seconds or as a [`parse_duration`] string.
fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Secs {
        Number(u64),
        Text(String),
    }
    match Secs::deserialize(deserializer)? {
        Secs::Number(n) => Ok(n),
        Secs::Text(t) => parse_duration(&t).map_err(serde::de::Error::custom),
    }
}

/// [`duration`], for a setting that may be left out.
fn duration_opt<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    duration(deserializer).map(Some)
}

/// Deserializes an optional size given as a number of bytes or as a [`parse_size`] string.
fn size_opt<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    match Size::deserialize(deserializer)? {
        Size::Bytes(n) => Ok(Some(n)),
        Size::Text(t) => parse_size(&t).map(Some).map_err(serde::de::Error::custom),
    }
}

/// `[limits]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Most sessions at once, relayed over `serve.sock` and over SSH together; one beyond it
    /// gets `error: ...` and exit status 1. Default 1024. (SSH connections have their own
    /// limits in `[ssh]`.)
    pub max_sessions: usize,
    /// Most sessions of one account at once, relayed and over SSH together; more are refused
    /// with `error: ...`. Default 128: the recommended builders line (`- 100 1`) runs up to
    /// 100 build hooks, each a session.
    pub max_sessions_per_account: usize,
    /// Most builds of one account queued or running at once; more fail at once with a
    /// message saying so. Default 1024. `[accounts.NAME] max_builds` overrides it.
    pub max_builds_per_account: usize,
    /// Most builds of one account handed to the scheduler at once (running, or waiting for
    /// cores); the account's further builds wait their turn, and the client is told why.
    /// Default none: the scheduler's fair share alone decides. `[accounts.NAME]
    /// max_running_builds` overrides it.
    pub max_running_builds_per_account: Option<usize>,
    /// Most NAR bytes one session may upload (AddToStoreNar and ImportPaths together); the
    /// session ends with an error past it. Default 1 TiB.
    pub max_upload_bytes_per_session: u64,
    /// Most bytes all sessions together, relayed and over SSH, may hold of requests not yet
    /// complete, in bytes or a size such as `"512M"`. A session whose buffer would pass it
    /// ends with `error: ...` naming this setting; other sessions carry on. (NAR data is
    /// never held: it streams to disk.) `store.max_request_bytes` bounds one session; this
    /// bounds their sum, which the session limits alone (1024 sessions, relayed and over
    /// SSH) would let reach tens of GiB. A buffer that
    /// grows counts its old and new allocations until it has moved, so this is at least
    /// twice `store.max_request_bytes`, or the largest request could never be held. Default:
    /// an eighth of the host's memory (`MemTotal`), at least 64 MiB and at most 8 GiB (and
    /// never below twice `store.max_request_bytes`): the daemon's own share, beside builds,
    /// which `[capacity] memory` gives the whole machine.
    #[serde(deserialize_with = "size_opt")]
    pub max_buffered_bytes: Option<u64>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_sessions: 1024,
            max_sessions_per_account: 128,
            max_builds_per_account: 1024,
            max_running_builds_per_account: None,
            max_upload_bytes_per_session: 1 << 40,
            max_buffered_bytes: None,
        }
    }
}

/// The default `max_buffered_bytes` on a host with `memory` bytes (see
/// [`LimitsConfig::max_buffered_bytes`]), at least twice `max_request_bytes`.
pub fn default_buffered_bytes(memory: u64, max_request_bytes: usize) -> u64 {
    (memory / BUFFERED_SHARE_OF_MEMORY)
        .clamp(MIN_DEFAULT_BUFFERED_BYTES, MAX_DEFAULT_BUFFERED_BYTES)
        .max(2 * max_request_bytes as u64)
}

impl Config {
    /// The daemon's budget of buffered request bytes: `limits.max_buffered_bytes`, or its
    /// default from the host's memory (read only then).
    pub fn buffered_budget(&self) -> Result<u64, ConfigError> {
        match self.limits.max_buffered_bytes {
            Some(n) => Ok(n),
            None => Ok(default_buffered_bytes(
                host_memory("limits.max_buffered_bytes")?,
                self.store.max_request_bytes,
            )),
        }
    }
}

/// The host's total memory in bytes (`MemTotal` in `/proc/meminfo`); an error names `key`,
/// the setting whose default needs it.
pub fn host_memory(key: &'static str) -> Result<u64, ConfigError> {
    let invalid = |reason| ConfigError::Invalid {
        source_name: "/proc/meminfo".to_owned(),
        key,
        reason,
    };
    let meminfo = std::fs::read_to_string("/proc/meminfo")
        .map_err(|e| invalid(format!("cannot read it: {e}")))?;
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .and_then(|kib| kib.checked_mul(1024))
        .ok_or_else(|| invalid(format!("no MemTotal in kB: set {key}")))
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
    /// request may carry. Default 32 MiB: a request naming 100,000 paths takes about 8 MiB,
    /// and the kernel does not `execve` a builder with an environment much over 2 MiB (or a
    /// variable over 128 KiB), so only `passAsFile` values come near it. The sum over all sessions is bounded by
    /// `[limits] max_buffered_bytes`.
    pub max_request_bytes: usize,
    /// How long an account keeps a path it no longer uses: a grant unused (not uploaded,
    /// built, queried as valid, used as a build input or downloaded) for longer is collected,
    /// unless a kept path needs it. Seconds, or a duration such as `"30d"`. Default 30 days.
    /// `[accounts.NAME] retention` overrides it for one account.
    #[serde(deserialize_with = "duration")]
    pub retention: u64,
    /// Most NAR bytes one account's paths may hold (each path counted in full for every
    /// account holding it, shared or not); an upload past it, or a build while the account
    /// is at it, is refused once the account's expired paths are collected. Bytes or a size
    /// such as `"50G"`. Default none. `[accounts.NAME] quota` overrides it.
    #[serde(deserialize_with = "size_opt")]
    pub quota: Option<u64>,
    /// How long a build's stored log is kept after the build ended. Default 30 days.
    #[serde(deserialize_with = "duration")]
    pub log_retention: u64,
    /// How long a build's record is kept after the build ended. Default 90 days.
    #[serde(deserialize_with = "duration")]
    pub record_retention: u64,
    /// How often the collector runs. Default 1 hour.
    #[serde(deserialize_with = "duration")]
    pub gc_interval: u64,
    /// The collector also runs (checked every 10 s) while free space on the state
    /// directory's file system is below this, before uploads are refused at
    /// `disk_reserve`. Default twice `disk_reserve`.
    #[serde(deserialize_with = "size_opt")]
    pub gc_free_space: Option<u64>,
}

impl StoreConfig {
    /// The retention and quotas for the store, with `accounts`' own.
    pub fn policy(&self, accounts: &BTreeMap<String, AccountConfig>) -> StorePolicy {
        StorePolicy {
            retention: self.retention,
            quota: self.quota,
            log_retention: self.log_retention,
            record_retention: self.record_retention,
            accounts: accounts
                .iter()
                .map(|(name, a)| {
                    let policy = AccountPolicy {
                        retention: a.retention,
                        quota: a.quota,
                    };
                    (name.clone(), policy)
                })
                .collect(),
        }
    }

    /// Free space below which the collector runs.
    pub fn gc_free_space(&self) -> u64 {
        self.gc_free_space
            .unwrap_or(self.disk_reserve.saturating_mul(2))
    }

    /// The settings a running daemon puts in force on reload: retention, quota and the
    /// collector's. `self` with those taken from `new`.
    pub fn with_live_from(&self, new: &StoreConfig) -> StoreConfig {
        StoreConfig {
            retention: new.retention,
            quota: new.quota,
            log_retention: new.log_retention,
            record_retention: new.record_retention,
            gc_interval: new.gc_interval,
            gc_free_space: new.gc_free_space,
            ..self.clone()
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            max_nar_size: 64 << 30,
            max_paths_per_request: 100_000,
            disk_reserve: 1 << 30,
            max_request_bytes: 32 << 20,
            retention: 30 * DAY,
            quota: None,
            log_retention: 30 * DAY,
            record_retention: 90 * DAY,
            gc_interval: 60 * 60,
            gc_free_space: None,
        }
    }
}

/// `[timeouts]`, in seconds.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutConfig {
    /// SSH: from TCP connection to successful authentication, like OpenSSH's LoginGraceTime.
    /// Default 20: a client authenticates in well under a second, and an unauthenticated
    /// connection holds a place in `ssh.max_unauthenticated` until then.
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
            auth: 20,
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
    /// Most bytes all the outputs of one build may hold together, as NARs; each output is
    /// also held to `[store] max_nar_size`. Checked while the outputs are walked and hashed,
    /// which stop at the first byte over (a build that leaves a huge sparse file fails at
    /// once). Default 68719476736 (64 GiB); at least 1.
    pub max_output_size: u64,
    /// Whether a derivation may ask for its cores and memory with the attributes
    /// `NIXBUILD_CORES` (a number) and `NIXBUILD_MEMORY` (bytes or a size such as `4G`).
    /// Default false: builds get `[scheduler]`'s defaults.
    pub derivation_requests: bool,
    /// `size=` of each build's `/dev/shm` tmpfs. Default "50%", like Nix.
    pub dev_shm_size: String,
    /// Whether a graph build (BuildPaths of derivations whose inputs are not built yet)
    /// goes on after a derivation fails, building every branch that can still succeed, as
    /// Nix's `--keep-going`. Default true: Nix's ssh-ng store never sends the client's
    /// setting. A worker-protocol client that sends SetOptions chooses for its session.
    pub keep_going: bool,
    /// Most builds one graph build has queued or running at once; the rest wait in the
    /// graph. Default 64; at least 1. Builds are also held to `[limits]
    /// max_builds_per_account`.
    pub graph_jobs: u64,
}

impl Default for BuildsConfig {
    fn default() -> Self {
        BuildsConfig {
            uid_base: 2_000_000_000,
            uid_count: 1024,
            max_silent_time: 0,
            build_timeout: 86_400,
            max_log_size: 256 << 20,
            max_output_size: 64 << 30,
            derivation_requests: false,
            dev_shm_size: "50%".into(),
            keep_going: true,
            graph_jobs: 64,
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
    /// `capacity.cores`.
    pub cores: Option<u32>,
    /// `capacity.memory`, in bytes.
    pub memory: Option<u64>,
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
        if o.cores.is_some() {
            self.capacity.cores = o.cores;
        }
        if o.memory.is_some() {
            self.capacity.memory = o.memory;
        }
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
        if self.fleet.probe_interval == 0
            || self.fleet.connect_timeout == 0
            || self.fleet.io_timeout == 0
        {
            return Err(invalid(
                "fleet.probe_interval",
                "probe_interval, connect_timeout and io_timeout must be at least 1 s".into(),
            ));
        }
        for (name, account) in &self.accounts {
            if !nixbuild_core::account::is_valid_account_name(name) {
                return Err(invalid(
                    "accounts",
                    format!("{name:?} is not an account name ([A-Za-z0-9._@+-], 1 to 64)"),
                ));
            }
            if account.retention == Some(0) {
                return Err(invalid("accounts.retention", "must be at least 1".into()));
            }
            if account.max_builds == Some(0) || account.max_running_builds == Some(0) {
                return Err(invalid(
                    "accounts.max_builds",
                    "max_builds and max_running_builds must be at least 1".into(),
                ));
            }
        }
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
        for (key, n) in [
            ("limits.max_sessions", self.limits.max_sessions as u64),
            (
                "limits.max_sessions_per_account",
                self.limits.max_sessions_per_account as u64,
            ),
            (
                "limits.max_builds_per_account",
                self.limits.max_builds_per_account as u64,
            ),
            (
                "limits.max_upload_bytes_per_session",
                self.limits.max_upload_bytes_per_session,
            ),
            ("builds.max_output_size", self.builds.max_output_size),
            ("builds.graph_jobs", self.builds.graph_jobs),
            (
                "substituters.max_parallel",
                self.substituters.max_parallel as u64,
            ),
            (
                "substituters.max_downloads",
                self.substituters.max_downloads as u64,
            ),
            (
                "substituters.connect_timeout",
                self.substituters.connect_timeout,
            ),
            ("substituters.read_timeout", self.substituters.read_timeout),
            ("store.retention", self.store.retention),
            ("store.log_retention", self.store.log_retention),
            ("store.record_retention", self.store.record_retention),
            ("store.gc_interval", self.store.gc_interval),
            (
                "limits.max_running_builds_per_account",
                self.limits
                    .max_running_builds_per_account
                    .map_or(1, |n| n as u64),
            ),
        ] {
            if n == 0 {
                return Err(invalid(key, "must be at least 1".into()));
            }
        }
        if self.store.max_request_bytes < MIN_REQUEST_BYTES {
            return Err(invalid(
                "store.max_request_bytes",
                format!("must be at least {MIN_REQUEST_BYTES}"),
            ));
        }
        if let Some(budget) = self.limits.max_buffered_bytes {
            if budget < 2 * self.store.max_request_bytes as u64 {
                return Err(invalid(
                    "limits.max_buffered_bytes",
                    format!(
                        "{budget} is less than twice store.max_request_bytes ({}): a buffer \
                         counts its old and new allocations while it grows, so no request \
                         that large could ever be held",
                        self.store.max_request_bytes
                    ),
                ));
            }
        }
        for url in &self.substituters.urls {
            crate::substitute::CacheUrl::parse(url).map_err(|e| invalid("substituters.urls", e))?;
        }
        for key in &self.substituters.trusted_public_keys {
            nixbuild_core::binary_cache::PublicKey::parse(key)
                .map_err(|e| invalid("substituters.trusted_public_keys", e.to_string()))?;
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
        if let Err(e) = nixbuild_ssh::KeyTypes::from_names(&self.ssh.key_types) {
            return Err(invalid("ssh.key_types", e.to_string()));
        }
        if let Err(e) = nixbuild_ssh::Ciphers::from_names(&self.ssh.ciphers) {
            return Err(invalid("ssh.ciphers", e.to_string()));
        }
        for (key, n) in [
            ("ssh.max_connections", self.ssh.max_connections),
            ("ssh.max_unauthenticated", self.ssh.max_unauthenticated),
            (
                "ssh.max_unauthenticated_per_source",
                self.ssh.max_unauthenticated_per_source,
            ),
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
        let capacity = &self.capacity;
        for (key, value) in [
            ("capacity.cores", capacity.cores.map(u64::from)),
            ("capacity.memory", capacity.memory),
            ("capacity.max_jobs", capacity.max_jobs.map(u64::from)),
            ("capacity.pids_per_build", Some(capacity.pids_per_build)),
        ] {
            if value == Some(0) {
                return Err(invalid(key, "must be at least 1".into()));
            }
        }
        if capacity.systems.as_ref().is_some_and(Vec::is_empty) {
            return Err(invalid(
                "capacity.systems",
                "must name at least one system".into(),
            ));
        }
        let named: [(&'static str, Vec<&String>); 2] = [
            ("admin.accounts", self.admin.accounts.iter().collect()),
            ("scheduler.weights", self.scheduler.weights.keys().collect()),
        ];
        for (key, names) in named {
            if let Some(account) = names
                .iter()
                .find(|a| !nixbuild_core::account::is_valid_account_name(a))
            {
                return Err(invalid(
                    key,
                    format!("{account:?} is not an account name ([A-Za-z0-9._@+-]{{1,64}})"),
                ));
            }
        }
        if let Err(nixbuild_core::scheduler::SchedError::Config { field, reason }) =
            self.scheduler.scheduler_config().check()
        {
            let key = match field {
                "half_life" => "scheduler.half_life",
                "default_cores" => "scheduler.default_cores",
                "default_memory" => "scheduler.default_memory",
                "big_parallel_percent" => "scheduler.big_parallel_percent",
                _ => "scheduler.weights",
            };
            return Err(invalid(key, reason));
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
    fn durations_retention_quotas_and_account_settings() {
        for (text, secs) in [
            ("7", 7),
            ("90s", 90),
            ("15m", 900),
            ("2h", 7200),
            ("30d", 30 * DAY),
        ] {
            assert_eq!(parse_duration(text), Ok(secs), "{text}");
        }
        assert_eq!(parse_duration("2w"), Ok(14 * DAY));
        for bad in ["", "d", "5x", "1.5d", "-3s", "99999999999999999999w"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        let c = Config::parse(
            "[store]\nretention = \"2h\"\nquota = \"1G\"\ngc_interval = 60\n\
             [accounts.\"ci@b\"]\nretention = \"1d\"\nquota = 5\n",
        )
        .unwrap();
        let policy = c.store.policy(&c.accounts);
        assert_eq!(policy.retention_of("ci@b"), DAY);
        assert_eq!(policy.retention_of("other"), 7200);
        assert_eq!(policy.quota_of("ci@b"), Some(5));
        assert_eq!(policy.quota_of("other"), Some(1 << 30));
        assert_eq!(c.store.gc_free_space(), 2 * c.store.disk_reserve);
        for (text, key) in [
            ("[accounts.\"a b\"]\nquota = 1\n", "accounts"),
            ("[accounts.x]\nretention = 0\n", "accounts.retention"),
            ("[store]\nretention = 0\n", "store.retention"),
            ("[store]\ngc_interval = \"0s\"\n", "store.gc_interval"),
        ] {
            let msg = Config::parse(text).unwrap_err().to_string();
            assert!(msg.contains(key), "{text}: {msg}");
        }
        let msg = Config::parse("[store]\nretention = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("not a duration"), "{msg}");
    }

    #[test]
    fn buffered_budget_defaults_to_an_eighth_of_memory_within_bounds() {
        const GIB: u64 = 1 << 30;
        let default_request = StoreConfig::default().max_request_bytes;
        assert_eq!(default_request, 32 << 20);
        assert_eq!(default_buffered_bytes(24 * GIB, default_request), 3 * GIB);
        assert_eq!(default_buffered_bytes(GIB / 2, default_request), 64 << 20);
        assert_eq!(default_buffered_bytes(256 * GIB, default_request), 8 * GIB);
        // Never below twice a full request.
        assert_eq!(default_buffered_bytes(GIB, 1 << 30), 2 * GIB);
        let c = Config::parse("[limits]\nmax_buffered_bytes = \"256M\"\n").unwrap();
        assert_eq!(c.limits.max_buffered_bytes, Some(256 << 20));
        assert_eq!(c.buffered_budget().unwrap(), 256 << 20);
        let host = host_memory("limits.max_buffered_bytes").unwrap();
        assert_eq!(
            Config::default().buffered_budget().unwrap(),
            default_buffered_bytes(host, default_request)
        );
        let msg = Config::parse(
            "[store]\nmax_request_bytes = 1048576\n[limits]\nmax_buffered_bytes = 2097151\n",
        )
        .unwrap_err()
        .to_string();
        assert!(msg.contains("limits.max_buffered_bytes"), "{msg}");
        assert!(
            msg.contains("twice store.max_request_bytes (1048576)"),
            "{msg}"
        );
        Config::parse(
            "[store]\nmax_request_bytes = 1048576\n[limits]\nmax_buffered_bytes = 2097152\n",
        )
        .unwrap();
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
        assert_eq!(c.ssh.ciphers, ["aes256-gcm@openssh.com"]);
        let c = Config::parse("[ssh]\nciphers = [\"chacha20-poly1305@openssh.com\"]\n").unwrap();
        assert_eq!(c.ssh.ciphers, ["chacha20-poly1305@openssh.com"]);
        let msg = Config::parse("[ssh]\nciphers = [\"aes128-cbc\"]\n")
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("ssh.ciphers") && msg.contains("aes128-cbc"),
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
    fn sizes() {
        assert_eq!(parse_size("16G"), Ok(16 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("3 K"), Ok(3 << 10));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert_eq!(parse_size("1000"), Ok(1000));
        for bad in [
            "",
            "G",
            "16X",
            "-1G",
            "1.5G",
            "99999999999999999999",
            "20000000T",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn capacity_and_scheduler_sections() {
        let c = Config::parse(
            "[capacity]\ncores = 2\nmemory = \"8G\"\nfeatures = [\"kvm\"]\n\
             mandatory_features = [\"benchmark\"]\nallow_unenforced_limits = true\n\
             [scheduler]\nhalf_life = 60\ndefault_memory = 1073741824\n\
             big_parallel_percent = 50\nstarvation_after = 10\n\
             [scheduler.weights]\n\"alice@laptop\" = 3\n",
        )
        .unwrap();
        assert_eq!(c.capacity.cores, Some(2));
        assert_eq!(c.capacity.memory, Some(8 << 30));
        assert!(c.capacity.allow_unenforced_limits);
        let host = HostFacts {
            cpus: 4,
            memory: 32 << 30,
            systems: vec!["x86_64-linux".into(), "i686-linux".into()],
            kvm: true,
            ..HostFacts::default()
        };
        let m = c.capacity.machine(&host);
        assert_eq!((m.cores, m.memory, m.max_jobs), (2, 8 << 30, 2));
        assert_eq!(m.systems, host.systems);
        assert_eq!(m.supported_features, vec!["kvm".to_owned()]);
        assert_eq!(m.mandatory_features, vec!["benchmark".to_owned()]);
        let s = c.scheduler.scheduler_config();
        assert_eq!(s.half_life, Duration::from_secs(60));
        assert_eq!(s.default_memory, Some(1 << 30));
        assert_eq!(s.big_parallel_percent, 50);
        assert_eq!(s.starvation_after, Duration::from_secs(10));
        assert_eq!(s.weights.get("alice@laptop"), Some(&3));

        // Defaults come from the host: kvm and nixos-test only with a usable /dev/kvm.
        let without_kvm = HostFacts {
            kvm: false,
            ..host.clone()
        };
        let m = Config::default().capacity.machine(&without_kvm);
        assert_eq!((m.cores, m.memory, m.max_jobs), (4, 32 << 30, 4));
        assert_eq!(
            m.supported_features,
            vec!["benchmark", "big-parallel", "ca-derivations"]
        );
        let m = Config::default().capacity.machine(&host);
        assert_eq!(
            m.supported_features,
            vec![
                "benchmark",
                "big-parallel",
                "ca-derivations",
                "kvm",
                "nixos-test"
            ]
        );
        assert!(c
            .capacity
            .machine(&without_kvm)
            .supported_features
            .is_empty());
        assert_eq!(
            Config::default().scheduler.scheduler_config(),
            SchedulerConfig::default()
        );
    }

    #[test]
    fn ssh_connection_budgets_are_read_and_each_must_be_at_least_1() {
        let d = Config::default();
        assert_eq!(d.ssh.max_unauthenticated, 256);
        assert_eq!(d.ssh.max_unauthenticated_per_source, 128);
        assert_eq!(d.timeouts.auth(), Duration::from_secs(20));
        let c = Config::parse(
            "[ssh]\nmax_connections = 5\nmax_unauthenticated = 3\n\
             max_unauthenticated_per_source = 2\n",
        )
        .unwrap();
        assert_eq!(
            (
                c.ssh.max_connections,
                c.ssh.max_unauthenticated,
                c.ssh.max_unauthenticated_per_source
            ),
            (5, 3, 2)
        );
        for key in [
            "max_connections",
            "max_unauthenticated",
            "max_unauthenticated_per_source",
            "max_connections_per_account",
            "max_sessions_per_connection",
        ] {
            let msg = Config::parse(&format!("[ssh]\n{key} = 0\n"))
                .unwrap_err()
                .to_string();
            assert!(
                msg.contains(&format!("ssh.{key}")) && msg.contains("at least 1"),
                "{key}: {msg}"
            );
        }
        let msg = Config::parse("[timeouts]\nauth = 0\n")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("timeouts.auth"), "{msg}");
    }

    #[test]
    fn capacity_and_scheduler_errors_name_the_key() {
        for (text, key) in [
            ("[capacity]\ncores = 0\n", "capacity.cores"),
            ("[capacity]\nsystems = []\n", "capacity.systems"),
            (
                "[scheduler]\nbig_parallel_percent = 0\n",
                "scheduler.big_parallel_percent",
            ),
            ("[scheduler]\nhalf_life = 0\n", "scheduler.half_life"),
            ("[scheduler.weights]\nbob = 0\n", "scheduler.weights"),
            ("[scheduler.weights]\n\"a b\" = 1\n", "scheduler.weights"),
        ] {
            let msg = Config::parse(text).unwrap_err().to_string();
            assert!(msg.contains(key), "{text}: {msg}");
        }
        let msg = Config::parse("[capacity]\nmemory = \"16X\"\n")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("memory") && msg.contains("16X"), "{msg}");
        let mut c = Config::default();
        c.apply(&Overrides {
            cores: Some(3),
            memory: Some(1 << 30),
            ..Overrides::default()
        })
        .unwrap();
        assert_eq!(
            (c.capacity.cores, c.capacity.memory),
            (Some(3), Some(1 << 30))
        );
        let msg = c
            .apply(&Overrides {
                cores: Some(0),
                ..Overrides::default()
            })
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("command line") && msg.contains("capacity.cores"),
            "{msg}"
        );
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
