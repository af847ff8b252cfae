//! The words of `nixbuild <subcommand> [options]` parsed into an [`Invocation`] (pure): what
//! is asked, for whom, and in which format. See docs/operations.md.

use nixbuild_core::store_path::StorePath;

use crate::config::parse_duration;

/// Most entries `builds` and `paths` list when not told (`--max`).
pub const DEFAULT_MAX: usize = 50;
/// Most entries `--max` may ask for.
pub const MAX_ENTRIES: usize = 1000;
/// How far back `usage` looks when not told (`--since`), in seconds.
pub const DEFAULT_SINCE: u64 = 30 * 86_400;

/// What the caller asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    /// The subcommand.
    pub command: Command,
    /// `--json`: one JSON document instead of text.
    pub json: bool,
    /// Whose data (`--account NAME`, `--all`: admins only).
    pub scope: Scope,
}

/// Whose builds, logs, paths and usage a command reads or acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// The caller's own account (the default).
    Own,
    /// `--account NAME`.
    Account(String),
    /// `--all`.
    All,
}

/// A build named on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildRef {
    /// By its id.
    Id(u64),
    /// By its derivation: its newest build.
    Drv(StorePath),
}

/// A subcommand with its arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `help`: what there is.
    Help,
    /// `whoami`: the account, key, limits, quota and usage.
    Whoami,
    /// `builds [--max N]`: queued, running and recent builds.
    Builds {
        /// Most finished builds listed.
        max: usize,
    },
    /// `show BUILD`: one build in full.
    Show(BuildRef),
    /// `log BUILD [--follow]`: its stored log; with `--follow`, until it ends.
    Log {
        /// Which build.
        build: BuildRef,
        /// Keep reading until the build ends.
        follow: bool,
    },
    /// `cancel ID`: stop a queued or running build.
    Cancel(u64),
    /// `usage [--since DURATION]`: use per day.
    Usage {
        /// How far back, in seconds.
        since: u64,
    },
    /// `paths [--max N]`: the paths held, most recently used first.
    Paths {
        /// Most paths listed.
        max: usize,
    },
    /// `accounts` (admin): every account with its holdings and limits.
    Accounts,
    /// `gc` (admin): a collection now.
    Gc,
    /// `status` (admin): capacity, queue, disk, versions.
    Status,
}

impl Command {
    /// Whether only admins may run it.
    pub fn admin_only(&self) -> bool {
        matches!(self, Command::Accounts | Command::Gc | Command::Status)
    }

    /// Whether it reads or acts on one account's or every account's data, so that
    /// `--account` and `--all` mean something for it.
    pub fn scoped(&self) -> bool {
        !matches!(
            self,
            Command::Help | Command::Whoami | Command::Accounts | Command::Gc | Command::Status
        )
    }
}

/// Why the words do not make an invocation. The message is what the caller sees.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// An unknown subcommand.
    #[error("unknown subcommand {0:?}; try `nixbuild help`")]
    UnknownCommand(String),
    /// An option the subcommand does not take.
    #[error("`nixbuild {command}` does not take {option:?}; try `nixbuild help`")]
    UnknownOption {
        /// The subcommand.
        command: &'static str,
        /// The option.
        option: String,
    },
    /// A required argument is missing.
    #[error("`nixbuild {command}` needs {what}")]
    Missing {
        /// The subcommand.
        command: &'static str,
        /// What it needs.
        what: &'static str,
    },
    /// An argument too many.
    #[error("`nixbuild {command}` takes no more arguments than {what}, not {extra:?}")]
    Extra {
        /// The subcommand.
        command: &'static str,
        /// What it takes.
        what: &'static str,
        /// The extra argument.
        extra: String,
    },
    /// Not a build id or a derivation's store path.
    #[error("{0:?} is neither a build id (a number) nor a derivation (/nix/store/…drv)")]
    BadBuild(String),
    /// Not a number in range.
    #[error("{option} takes a number from 1 to {max}, not {value:?}")]
    BadNumber {
        /// The option.
        option: &'static str,
        /// Its largest value.
        max: usize,
        /// What was given.
        value: String,
    },
    /// Not a duration.
    #[error("--since takes a duration such as 7d, 12h or 2w, not {0:?}")]
    BadDuration(String),
    /// Not an account name.
    #[error("--account takes an account name (1 to 64 of A-Z a-z 0-9 . _ @ + -), not {0:?}")]
    BadAccount(String),
    /// `--account` and `--all` together.
    #[error("--account and --all cannot be given together")]
    Conflict,
}

/// Parses the words after `nixbuild`. No words is `help`.
pub fn parse(words: &[String]) -> Result<Invocation, ParseError> {
    let mut json = false;
    let mut scope = Scope::Own;
    let mut follow = false;
    let mut max = None;
    let mut since = None;
    let mut positional: Vec<&str> = Vec::new();
    let Some((name, rest)) = words.split_first() else {
        return Ok(Invocation {
            command: Command::Help,
            json,
            scope,
        });
    };
    let name = canonical(name).ok_or_else(|| ParseError::UnknownCommand(clip(name)))?;
    let mut rest = rest.iter();
    while let Some(word) = rest.next() {
        let unknown = || ParseError::UnknownOption {
            command: name,
            option: clip(word),
        };
        let mut value = |what| {
            rest.next().map(String::as_str).ok_or(ParseError::Missing {
                command: name,
                what,
            })
        };
        match word.as_str() {
            "--json" => json = true,
            "--all" => {
                if matches!(scope, Scope::Account(_)) {
                    return Err(ParseError::Conflict);
                }
                scope = Scope::All;
            }
            "--account" => {
                let account = value("an account name after --account")?;
                if !nixbuild_core::account::is_valid_account_name(account) {
                    return Err(ParseError::BadAccount(clip(account)));
                }
                if scope == Scope::All {
                    return Err(ParseError::Conflict);
                }
                scope = Scope::Account(account.to_owned());
            }
            "--follow" | "-f" if name == "log" => follow = true,
            "--max" if matches!(name, "builds" | "paths") => {
                let v = value("a number after --max")?;
                max = Some(number("--max", v, MAX_ENTRIES)?);
            }
            "--since" if name == "usage" => {
                let v = value("a duration after --since")?;
                since = Some(parse_duration(v).map_err(|_| ParseError::BadDuration(clip(v)))?);
            }
            w if w.starts_with('-') && w.len() > 1 => return Err(unknown()),
            w => positional.push(w),
        }
    }
    let mut positional = positional.into_iter();
    let mut one = |what| {
        let first = positional.next().ok_or(ParseError::Missing {
            command: name,
            what,
        })?;
        Ok::<_, ParseError>(first)
    };
    let command = match name {
        "help" => Command::Help,
        "whoami" => Command::Whoami,
        "builds" => Command::Builds {
            max: max.unwrap_or(DEFAULT_MAX),
        },
        "show" => Command::Show(build_ref(one("a build id or derivation")?)?),
        "log" => Command::Log {
            build: build_ref(one("a build id or derivation")?)?,
            follow,
        },
        "cancel" => {
            let id = one("a build id")?;
            match build_ref(id)? {
                BuildRef::Id(id) => Command::Cancel(id),
                BuildRef::Drv(_) => return Err(ParseError::BadBuild(clip(id))),
            }
        }
        "usage" => Command::Usage {
            since: since.unwrap_or(DEFAULT_SINCE),
        },
        "paths" => Command::Paths {
            max: max.unwrap_or(DEFAULT_MAX),
        },
        "accounts" => Command::Accounts,
        "gc" => Command::Gc,
        _ => Command::Status,
    };
    let takes = match command {
        Command::Show(_) | Command::Log { .. } | Command::Cancel(_) => "one build",
        _ => "its options",
    };
    if let Some(extra) = positional.next() {
        return Err(ParseError::Extra {
            command: name,
            what: takes,
            extra: clip(extra),
        });
    }
    if scope != Scope::Own && !command.scoped() {
        return Err(ParseError::UnknownOption {
            command: name,
            option: match scope {
                Scope::All => "--all".to_owned(),
                _ => "--account".to_owned(),
            },
        });
    }
    Ok(Invocation {
        command,
        json,
        scope,
    })
}

/// The subcommand's name as `'static`, if it is one.
fn canonical(name: &str) -> Option<&'static str> {
    [
        "help", "whoami", "builds", "show", "log", "cancel", "usage", "paths", "accounts", "gc",
        "status",
    ]
    .into_iter()
    .find(|n| *n == name)
}

fn number(option: &'static str, value: &str, max: usize) -> Result<usize, ParseError> {
    value
        .parse::<usize>()
        .ok()
        .filter(|n| (1..=max).contains(n))
        .ok_or_else(|| ParseError::BadNumber {
            option,
            max,
            value: clip(value),
        })
}

fn build_ref(word: &str) -> Result<BuildRef, ParseError> {
    if let Ok(id) = word.parse::<u64>() {
        return Ok(BuildRef::Id(id));
    }
    match StorePath::from_absolute_path(word.as_bytes()) {
        Ok(path) if path.is_derivation() => Ok(BuildRef::Drv(path)),
        _ => Err(ParseError::BadBuild(clip(word))),
    }
}

/// A word as quoted in a message: at most 100 characters of it.
fn clip(word: &str) -> String {
    match word.char_indices().nth(100) {
        Some((i, _)) => format!("{}…", &word[..i]),
        None => word.to_owned(),
    }
}

/// The text of `nixbuild help`.
pub const HELP: &str = "\
usage: ssh HOST nixbuild <subcommand> [options] [--json]

  whoami                     your account, key, limits, quota and usage
  builds [--max N]           queued, running and recent builds
  show BUILD                 one build in full (BUILD: an id, or a /nix/store/…drv)
  log BUILD [--follow]       a build's log as its client saw it; --follow until it ends
  cancel ID                  stop a queued or running build (its clients see why)
  usage [--since 30d]        builds, CPU and core time, memory and bytes moved per day
  paths [--max N]            the store paths you hold, most recently used first
  help                       this text

admins (the server's [admin] accounts) also have:
  --account NAME, --all      another account's data, or everyone's
  accounts                   every account with its holdings and limits
  gc                         collect expired paths, logs and records now
  status                     capacity, queue, disk and versions

--json prints one JSON document (schema version 1, docs/operations.md).
";

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports failure
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    fn ok(s: &str) -> Invocation {
        parse(&words(s)).unwrap()
    }

    const DRV: &str = "/nix/store/0c7ixmd36m0lxkigqcpshbhqkcm6w40l-hello.drv";

    #[test]
    fn subcommands_with_their_options() {
        assert_eq!(ok("").command, Command::Help);
        assert_eq!(ok("whoami").command, Command::Whoami);
        assert_eq!(ok("builds").command, Command::Builds { max: DEFAULT_MAX });
        let i = ok("builds --json --max 7");
        assert_eq!(i.command, Command::Builds { max: 7 });
        assert!(i.json);
        assert_eq!(ok("show 12").command, Command::Show(BuildRef::Id(12)));
        assert_eq!(
            ok(&format!("log {DRV} --follow")).command,
            Command::Log {
                build: BuildRef::Drv(StorePath::from_absolute_path(DRV.as_bytes()).unwrap()),
                follow: true
            }
        );
        assert_eq!(ok("cancel 3").command, Command::Cancel(3));
        assert_eq!(
            ok("usage --since 7d").command,
            Command::Usage { since: 7 * 86_400 }
        );
        assert_eq!(ok("paths").command, Command::Paths { max: DEFAULT_MAX });
        let i = ok("builds --account bob");
        assert_eq!(i.scope, Scope::Account("bob".into()));
        assert_eq!(ok("usage --all").scope, Scope::All);
        assert!(ok("status").command.admin_only());
        assert!(!ok("builds").command.admin_only());
    }

    #[test]
    fn bad_words_get_a_message_naming_them() {
        for (line, expected) in [
            (
                "frobnicate",
                ParseError::UnknownCommand("frobnicate".into()),
            ),
            (
                "builds --follow",
                ParseError::UnknownOption {
                    command: "builds",
                    option: "--follow".into(),
                },
            ),
            (
                "show",
                ParseError::Missing {
                    command: "show",
                    what: "a build id or derivation",
                },
            ),
            (
                "show 1 2",
                ParseError::Extra {
                    command: "show",
                    what: "one build",
                    extra: "2".into(),
                },
            ),
            (
                "show ../../etc/passwd",
                ParseError::BadBuild("../../etc/passwd".into()),
            ),
            (
                "show -1x",
                ParseError::UnknownOption {
                    command: "show",
                    option: "-1x".into(),
                },
            ),
            (
                "show 99999999999999999999999",
                ParseError::BadBuild("99999999999999999999999".into()),
            ),
            (
                "cancel /nix/store/0c7ixmd36m0lxkigqcpshbhqkcm6w40l-hello.drv",
                ParseError::BadBuild(DRV.into()),
            ),
            (
                "builds --max 0",
                ParseError::BadNumber {
                    option: "--max",
                    max: MAX_ENTRIES,
                    value: "0".into(),
                },
            ),
            (
                "builds --max 1001",
                ParseError::BadNumber {
                    option: "--max",
                    max: MAX_ENTRIES,
                    value: "1001".into(),
                },
            ),
            (
                "usage --since yesterday",
                ParseError::BadDuration("yesterday".into()),
            ),
            ("builds --account a/b", ParseError::BadAccount("a/b".into())),
            (
                "builds --account",
                ParseError::Missing {
                    command: "builds",
                    what: "an account name after --account",
                },
            ),
            ("builds --all --account a", ParseError::Conflict),
            (
                "whoami --all",
                ParseError::UnknownOption {
                    command: "whoami",
                    option: "--all".into(),
                },
            ),
            (
                "status --all",
                ParseError::UnknownOption {
                    command: "status",
                    option: "--all".into(),
                },
            ),
        ] {
            assert_eq!(parse(&words(line)), Err(expected), "{line}");
        }
        let huge = "x".repeat(5000);
        let err = parse(&[huge]).unwrap_err().to_string();
        assert!(err.len() < 300, "{err}");
    }

    proptest! {
        #[test]
        fn never_panics(words in proptest::collection::vec(".{0,40}", 0..6)) {
            let _ = parse(&words);
        }
    }
}
