//! Nix's machines format (`/etc/nix/machines`, the `builders` setting), which describes the
//! builders a front sends builds to: one machine per line (or per `;`-separated entry),
//! whitespace-separated fields
//!
//! ```text
//! URI  systems  ssh-key  max-jobs  speed-factor  supported-features  mandatory-features  host-key
//! ```
//!
//! where a missing field or `-` means its default, `#` starts a comment, systems and features
//! are comma-separated, and the host key is the base64 of the builder's public host key line
//! (`ssh-ed25519 AAAA…`). Nix's own parser takes a URI without scheme as `ssh://`; so does
//! this one. What nixbuild does not do, it refuses with the line's number rather than
//! ignoring it: stores that are not reached over SSH, `@file` includes (the operator's file
//! is read as it is, without further I/O), unknown URI parameters.

use std::collections::BTreeSet;
use std::fmt;

use base64::Engine as _;

/// Most machines one file may list.
pub const MAX_MACHINES: usize = 1024;

/// Longest field, in bytes (a path, a URI, a base64 host key).
pub const MAX_FIELD: usize = 4096;

/// A machines file that cannot be used, with the (1-based) line it failed on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("machines file, line {line}: {problem}")]
pub struct MachinesError {
    /// The line, counting from 1.
    pub line: usize,
    /// What is wrong with it.
    pub problem: String,
}

/// How the front talks to a builder once SSH is up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// `ssh://`: `nix-store --serve --write` (the serve protocol).
    Serve,
    /// `ssh-ng://`: `nix-daemon --stdio` (the daemon protocol).
    Daemon,
}

impl Protocol {
    /// The URI scheme.
    pub fn scheme(self) -> &'static str {
        match self {
            Protocol::Serve => "ssh",
            Protocol::Daemon => "ssh-ng",
        }
    }
}

/// Where a builder is: `ssh://[user@]host[:port][?remote-program=…]` or the same with
/// `ssh-ng://`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BuilderUri {
    /// The protocol after the SSH connection.
    pub protocol: Protocol,
    /// The user to log in as (none: SSH's default).
    pub user: Option<String>,
    /// The host name or address (an IPv6 address without its brackets).
    pub host: String,
    /// The port (none: 22).
    pub port: Option<u16>,
    /// The command run on the builder instead of `nix-store` / `nix-daemon`
    /// (`?remote-program=`).
    pub remote_program: Option<String>,
}

impl BuilderUri {
    /// Parses a machines-file URI; one without a scheme is `ssh://`, as in Nix.
    pub fn parse(uri: &str) -> Result<BuilderUri, String> {
        let (protocol, rest) = match uri.split_once("://") {
            Some(("ssh", rest)) => (Protocol::Serve, rest),
            Some(("ssh-ng", rest)) => (Protocol::Daemon, rest),
            Some((scheme, _)) => {
                return Err(format!(
                    "{uri:?}: nixbuild reaches builders over SSH only (ssh:// or ssh-ng://), \
                     not {scheme}://"
                ))
            }
            None if uri.contains('/') || ["auto", "daemon", "local"].contains(&uri) => {
                return Err(format!(
                    "{uri:?} is a local store: nixbuild reaches builders over SSH only"
                ))
            }
            None => (Protocol::Serve, uri),
        };
        let (authority, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (user, host_port) = match authority.rsplit_once('@') {
            Some((user, host_port)) => (Some(user), host_port),
            None => (None, authority),
        };
        if let Some(user) = user {
            if !is_name(user) {
                return Err(format!(
                    "{uri:?}: the user {user:?} is not a plain user name"
                ));
            }
        }
        let (host, port) = split_host_port(host_port).ok_or_else(|| {
            format!("{uri:?}: {host_port:?} is not a host name, an address or host:port")
        })?;
        let mut remote_program = None;
        for param in query.split('&').filter(|p| !p.is_empty()) {
            match param.split_once('=') {
                Some(("remote-program", value)) if is_command(value) => {
                    remote_program = Some(value.to_owned());
                }
                Some(("remote-program", value)) => {
                    return Err(format!(
                        "{uri:?}: remote-program {value:?} must be printable ASCII without \
                         spaces, quotes or backslashes"
                    ))
                }
                _ => {
                    return Err(format!(
                        "{uri:?}: unknown parameter {param:?} (nixbuild knows remote-program=)"
                    ))
                }
            }
        }
        Ok(BuilderUri {
            protocol,
            user: user.map(str::to_owned),
            host: host.to_owned(),
            port,
            remote_program,
        })
    }
}

impl fmt::Display for BuilderUri {
    /// The canonical URI: scheme always written, IPv6 addresses in brackets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://", self.protocol.scheme())?;
        if let Some(user) = &self.user {
            write!(f, "{user}@")?;
        }
        if self.host.contains(':') {
            write!(f, "[{}]", self.host)?;
        } else {
            f.write_str(&self.host)?;
        }
        if let Some(port) = self.port {
            write!(f, ":{port}")?;
        }
        if let Some(program) = &self.remote_program {
            write!(f, "?remote-program={program}")?;
        }
        Ok(())
    }
}

/// A builder's public host key, as the 8th field pins it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostKey {
    /// The key type, such as `ssh-ed25519`.
    pub algorithm: String,
    /// The key in SSH's wire encoding (what the base64 of a `known_hosts` line holds).
    pub blob: Vec<u8>,
}

impl HostKey {
    /// Parses a public key line, `ssh-ed25519 AAAA… [comment]`.
    pub fn parse_public_key(line: &str) -> Result<HostKey, String> {
        let mut words = line.split_whitespace();
        let (Some(algorithm), Some(key)) = (words.next(), words.next()) else {
            return Err(format!(
                "{line:?} is not a public key line (type and base64 key)"
            ));
        };
        let blob = base64::engine::general_purpose::STANDARD
            .decode(key)
            .map_err(|e| format!("the key of {algorithm} is not base64: {e}"))?;
        // The wire encoding starts with the key type as an SSH string.
        let named = blob
            .get(..4)
            .and_then(|n| <[u8; 4]>::try_from(n).ok())
            .map(u32::from_be_bytes)
            .and_then(|n| blob.get(4..4 + usize::try_from(n).ok()?));
        if named != Some(algorithm.as_bytes()) {
            return Err(format!(
                "the {algorithm} key does not encode a key of that type"
            ));
        }
        Ok(HostKey {
            algorithm: algorithm.to_owned(),
            blob,
        })
    }

    /// The public key line, `ssh-ed25519 AAAA…`.
    pub fn public_key_line(&self) -> String {
        format!(
            "{} {}",
            self.algorithm,
            base64::engine::general_purpose::STANDARD.encode(&self.blob)
        )
    }
}

/// One builder of a machines file.
#[derive(Debug, Clone, PartialEq)]
pub struct MachineLine {
    /// The line of the file it is on, counting from 1.
    pub line: usize,
    /// Where it is.
    pub uri: BuilderUri,
    /// The systems it builds for; empty when the field is unset, which in Nix means the
    /// front's own system.
    pub systems: Vec<String>,
    /// The SSH private key file to log in with (none: SSH's default).
    pub ssh_key: Option<String>,
    /// Most builds at once (default 1; 0 takes nothing).
    pub max_jobs: u32,
    /// How much faster than others it is, for the choice among machines (default 1).
    pub speed_factor: f64,
    /// Features it offers.
    pub supported_features: BTreeSet<String>,
    /// Features it offers only to derivations that require them all (supported too).
    pub mandatory_features: BTreeSet<String>,
    /// Its pinned public host key.
    pub host_key: Option<HostKey>,
}

impl MachineLine {
    /// The line as this module writes it: every field present, `-` for unset ones, the
    /// host key as base64 of its public key line. It parses back to the same machine.
    pub fn to_line(&self) -> String {
        let list = |items: &mut dyn Iterator<Item = &String>| {
            let joined: Vec<&str> = items.map(String::as_str).collect();
            if joined.is_empty() {
                "-".to_owned()
            } else {
                joined.join(",")
            }
        };
        format!(
            "{} {} {} {} {} {} {} {}",
            self.uri,
            list(&mut self.systems.iter()),
            self.ssh_key.as_deref().unwrap_or("-"),
            self.max_jobs,
            self.speed_factor,
            list(&mut self.supported_features.iter()),
            list(&mut self.mandatory_features.iter()),
            self.host_key.as_ref().map_or_else(
                || "-".to_owned(),
                |k| base64::engine::general_purpose::STANDARD.encode(k.public_key_line())
            ),
        )
    }

    /// Whether it offers `feature`, as supported or mandatory.
    pub fn offers(&self, feature: &str) -> bool {
        self.supported_features.contains(feature) || self.mandatory_features.contains(feature)
    }
}

/// Parses a machines file: every machine, in order.
pub fn parse_machines(text: &str) -> Result<Vec<MachineLine>, MachinesError> {
    let mut machines = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        let error = |problem: String| MachinesError {
            line: number,
            problem,
        };
        let line = line.split('#').next().unwrap_or("");
        for entry in line.split(';').map(str::trim).filter(|e| !e.is_empty()) {
            if entry.starts_with('@') {
                return Err(error(format!(
                    "{entry:?}: includes are not supported here; list the machines in this file"
                )));
            }
            if machines.len() == MAX_MACHINES {
                return Err(error(format!("more than {MAX_MACHINES} machines")));
            }
            machines.push(parse_entry(number, entry).map_err(error)?);
        }
    }
    Ok(machines)
}

/// One machine's fields.
fn parse_entry(line: usize, entry: &str) -> Result<MachineLine, String> {
    let fields: Vec<&str> = entry.split_whitespace().collect();
    if fields.len() > 8 {
        return Err(format!(
            "{} fields, at most 8: URI systems ssh-key max-jobs speed-factor \
             supported-features mandatory-features host-key",
            fields.len()
        ));
    }
    if let Some(long) = fields.iter().find(|f| f.len() > MAX_FIELD) {
        return Err(format!(
            "a field of {} bytes, longer than {MAX_FIELD}",
            long.len()
        ));
    }
    // A field that is there and not `-`.
    let field = |i: usize| fields.get(i).copied().filter(|f| *f != "-");
    let uri = field(0).ok_or("no URI in the first field")?;
    let uri = BuilderUri::parse(uri)?;
    let systems = field(1).map_or_else(Vec::new, |s| list(s).map(str::to_owned).collect());
    if let Some(bad) = systems.iter().find(|s| !is_name(s)) {
        return Err(format!("{bad:?} is not a system name"));
    }
    let max_jobs = field(3).map_or(Ok(1), |n| {
        n.parse::<u32>()
            .map_err(|_| format!("max-jobs {n:?} is not a whole number"))
    })?;
    let speed_factor = field(4).map_or(Ok(1.0), |n| {
        n.parse::<f64>()
            .ok()
            .filter(|f| f.is_finite() && *f > 0.0)
            .ok_or_else(|| format!("speed-factor {n:?} is not a positive number"))
    })?;
    let features = |i: usize| -> Result<BTreeSet<String>, String> {
        let set: BTreeSet<String> =
            field(i).map_or_else(BTreeSet::new, |s| list(s).map(str::to_owned).collect());
        match set.iter().find(|f| !is_name(f)) {
            Some(bad) => Err(format!("{bad:?} is not a feature name")),
            None => Ok(set),
        }
    };
    let host_key = match field(7) {
        None => None,
        Some(encoded) => {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .map_err(|e| format!("the host key is not base64: {e}"))?;
            let text = String::from_utf8(decoded)
                .map_err(|_| "the host key is not the base64 of a public key line".to_owned())?;
            Some(HostKey::parse_public_key(&text).map_err(|e| format!("host key: {e}"))?)
        }
    };
    Ok(MachineLine {
        line,
        uri,
        systems,
        ssh_key: field(2).map(str::to_owned),
        max_jobs,
        speed_factor,
        supported_features: features(5)?,
        mandatory_features: features(6)?,
        host_key,
    })
}

/// The non-empty items of a comma-separated list.
fn list(s: &str) -> impl Iterator<Item = &str> {
    s.split(',').filter(|i| !i.is_empty())
}

/// A user, system or feature name: 1 to 128 of `A-Z a-z 0-9 . _ + -`.
fn is_name(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"._+-".contains(&c))
}

/// A remote program: printable ASCII without spaces, quotes, backslashes or the URI's own
/// separators.
fn is_command(s: &str) -> bool {
    (1..=MAX_FIELD).contains(&s.len())
        && s.bytes()
            .all(|c| (b'!'..=b'~').contains(&c) && !b"'\"\\&?#;".contains(&c))
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
fn split_host_port(s: &str) -> Option<(&str, Option<u16>)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (v6, after) = rest.split_once(']')?;
        if v6.is_empty()
            || !v6
                .bytes()
                .all(|c| c.is_ascii_hexdigit() || c == b':' || c == b'.')
        {
            return None;
        }
        match after {
            "" => (v6, None),
            _ => (v6, Some(after.strip_prefix(':')?)),
        }
    } else {
        let (host, port) = match s.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        };
        if host.is_empty()
            || host.len() > 253
            || !host
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b".-_".contains(&c))
        {
            return None;
        }
        (host, port)
    };
    let port = match port {
        None => None,
        Some(p) => Some(p.parse::<u16>().ok().filter(|p| *p != 0)?),
    };
    Some((host, port))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports failure
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The ed25519 host key of a test machine, as `ssh-keygen -t ed25519` wrote it.
    const KEY_LINE: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKqhV1kGewb8EMRLQia2a4jJTrpK9qYTiiGcMPZr+Oyy";

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn a_line_as_nixos_writes_it() {
        // NixOS's nix.buildMachines renders user@host, systems, key, jobs, speed, supported
        // (mandatory included), mandatory, and the base64 of the host key line.
        let text = format!(
            "nixbuild@builder.example x86_64-linux,i686-linux /root/.ssh/builder 8 2 \
             kvm,nixos-test,big-parallel,benchmark kvm {}\n",
            b64(KEY_LINE)
        );
        let m = parse_machines(&text).unwrap();
        assert_eq!(m.len(), 1);
        let m = &m[0];
        assert_eq!(m.line, 1);
        assert_eq!(
            m.uri,
            BuilderUri {
                protocol: Protocol::Serve,
                user: Some("nixbuild".into()),
                host: "builder.example".into(),
                port: None,
                remote_program: None,
            }
        );
        assert_eq!(m.systems, ["x86_64-linux", "i686-linux"]);
        assert_eq!(m.ssh_key.as_deref(), Some("/root/.ssh/builder"));
        assert_eq!((m.max_jobs, m.speed_factor), (8, 2.0));
        assert!(m.offers("nixos-test") && m.offers("kvm") && !m.offers("ca-derivations"));
        assert_eq!(m.mandatory_features, BTreeSet::from(["kvm".to_owned()]));
        let key = m.host_key.as_ref().unwrap();
        assert_eq!(key.algorithm, "ssh-ed25519");
        assert_eq!(key.blob.len(), 51);
        assert_eq!(key.public_key_line(), KEY_LINE);
    }

    #[test]
    fn defaults_comments_separators_and_both_protocols() {
        let text = "# the fleet\n\
                    \n\
                    ssh://b1:2222 x86_64-linux - 4 ; ssh-ng://root@[::1]:2200 - - - 1.5 - -  # two\n\
                    \tb3\n";
        let m = parse_machines(text).unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!((m[0].line, m[1].line, m[2].line), (3, 3, 4));
        assert_eq!(m[0].uri.to_string(), "ssh://b1:2222");
        assert_eq!((m[0].max_jobs, m[0].speed_factor), (4, 1.0));
        assert_eq!(m[1].uri.protocol, Protocol::Daemon);
        assert_eq!(m[1].uri.host, "::1");
        assert_eq!(m[1].uri.to_string(), "ssh-ng://root@[::1]:2200");
        assert!(m[1].systems.is_empty() && m[1].ssh_key.is_none());
        assert_eq!((m[1].max_jobs, m[1].speed_factor), (1, 1.5));
        assert_eq!(m[2].uri.to_string(), "ssh://b3");
        assert!(m[2].host_key.is_none() && m[2].supported_features.is_empty());
        assert_eq!(parse_machines("# nothing\n\n").unwrap(), []);
    }

    #[test]
    fn remote_program_is_kept() {
        let m = parse_machines(
            "ssh://localhost?remote-program=/opt/nixbuild/bin/nixbuild-serve x86_64-linux",
        )
        .unwrap();
        assert_eq!(
            m[0].uri.remote_program.as_deref(),
            Some("/opt/nixbuild/bin/nixbuild-serve")
        );
        assert_eq!(
            m[0].uri.to_string(),
            "ssh://localhost?remote-program=/opt/nixbuild/bin/nixbuild-serve"
        );
    }

    #[test]
    fn what_cannot_be_used_is_refused_with_its_line() {
        let bad_key = b64("ssh-ed25519 AAAAB3NzaC1yc2EAAAADAQABAAABAQ==");
        for (text, line, needle) in [
            ("local x86_64-linux", 1, "local store"),
            ("/nix/store x86_64-linux", 1, "local store"),
            ("http://cache", 1, "not http://"),
            (
                "\n\n@/etc/nix/more-machines",
                3,
                "includes are not supported",
            ),
            ("- x86_64-linux", 1, "no URI"),
            ("b x86_64-linux - four", 1, "max-jobs \"four\""),
            ("b x86_64-linux - 1 0", 1, "speed-factor \"0\""),
            ("b x86_64-linux - 1 NaN", 1, "speed-factor"),
            ("b x86_64-linux - 1 1 a b !notbase64", 1, "not base64"),
            ("b x86_64-linux - 1 1 a b c d", 1, "9 fields"),
            ("b x86_64-linux - 1 1 a,b$ -", 1, "feature name"),
            ("b x86/64", 1, "system name"),
            ("ssh://u$er@b", 1, "plain user name"),
            ("ssh://b!x", 1, "host:port"),
            ("ssh://b:0", 1, "host:port"),
            ("ssh://b:65536", 1, "host:port"),
            ("ssh://[zz]:22", 1, "host:port"),
            ("ssh://b?ssh-key=/k", 1, "unknown parameter"),
            ("ssh://b?remote-program='x'", 1, "remote-program"),
        ] {
            let e = parse_machines(text).unwrap_err();
            assert_eq!(e.line, line, "{text}: {e}");
            assert!(e.to_string().contains(needle), "{text}: {e}");
        }
        let e = parse_machines(&format!("b x86_64-linux - 1 1 - - {bad_key}")).unwrap_err();
        assert!(e.problem.contains("does not encode"), "{e}");
        let e = parse_machines(&"b\n".repeat(MAX_MACHINES + 1)).unwrap_err();
        assert_eq!(e.line, MAX_MACHINES + 1);
        let e =
            parse_machines(&format!("b x86_64-linux {}", "k".repeat(MAX_FIELD + 1))).unwrap_err();
        assert!(e.problem.contains("longer than"), "{e}");
    }

    fn name() -> impl Strategy<Value = String> {
        "[a-z0-9][a-z0-9._+-]{0,10}"
    }

    fn machine() -> impl Strategy<Value = MachineLine> {
        (
            (
                prop_oneof![Just(Protocol::Serve), Just(Protocol::Daemon)],
                proptest::option::of(name()),
                prop_oneof![
                    "[a-z][a-z0-9.-]{0,20}",
                    Just("::1".to_owned()),
                    Just("fe80::1".to_owned())
                ],
                proptest::option::of(1u16..),
                proptest::option::of("/[a-z/]{1,20}"),
            ),
            proptest::collection::vec(name(), 0..3),
            proptest::option::of("/[a-zA-Z0-9/._-]{1,30}"),
            any::<u32>(),
            prop_oneof![Just(1.0), Just(2.5), 0.01f64..1000.0],
            proptest::collection::btree_set(name(), 0..4),
            proptest::collection::btree_set(name(), 0..2),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 32)),
        )
            .prop_map(
                |(
                    (protocol, user, host, port, program),
                    systems,
                    key,
                    jobs,
                    speed,
                    sup,
                    man,
                    hk,
                )| {
                    MachineLine {
                        line: 1,
                        uri: BuilderUri {
                            protocol,
                            user,
                            host,
                            port,
                            remote_program: program,
                        },
                        systems,
                        ssh_key: key,
                        max_jobs: jobs,
                        speed_factor: speed,
                        supported_features: sup,
                        mandatory_features: man,
                        host_key: hk.map(|raw| {
                            let mut blob = vec![0, 0, 0, 11];
                            blob.extend_from_slice(b"ssh-ed25519");
                            blob.extend_from_slice(&[0, 0, 0, 32]);
                            blob.extend_from_slice(&raw);
                            HostKey {
                                algorithm: "ssh-ed25519".into(),
                                blob,
                            }
                        }),
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn a_written_line_parses_back(m in machine()) {
            let parsed = parse_machines(&m.to_line()).unwrap();
            prop_assert_eq!(parsed, vec![m]);
        }

        #[test]
        fn any_text_parses_or_is_refused(text in "[ -~\t\n;#@]{0,200}") {
            let _ = parse_machines(&text);
        }
    }
}
