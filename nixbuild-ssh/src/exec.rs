//! Exec requests: the command string an SSH client asks to run. The server runs no shell and
//! no program; it serves exactly three commands, `nix-store --serve [--write]` (Nix's `ssh://`
//! stores) and `nix-daemon --stdio` (`ssh-ng://`), with whatever options Nix appends
//! (docs/serve-protocol.md §1.1, docs/worker-protocol.md §1), and `nixbuild <subcommand>`, the
//! operations interface (docs/operations.md), whose words go to the service as they are; it
//! refuses everything else with a message that says what is served.
//!
//! The command is split into words the way a POSIX shell would for a simple command (blanks,
//! single and double quotes, backslashes), because Nix quotes its arguments for the remote
//! login shell (`--store '<remote-store>'`). Anything that would make a shell do more than run
//! one command (`;`, `|`, `&`, redirections, `$`, backquotes, parentheses, a comment) is
//! refused rather than guessed at.

use nixbuild_core::serve::{Protocol, ServeArgs};

/// Longest command accepted, in bytes (Nix's are under 200).
pub const MAX_COMMAND: usize = 4096;

/// What is served, for messages.
pub const SERVED: &str = "this server runs only `nix-store --serve [--write]` and \
                          `nix-daemon --stdio`, the remote ends of Nix's ssh:// and ssh-ng:// \
                          stores and remote builders, and `nixbuild <subcommand>` (try \
                          `nixbuild help`)";

/// An accepted exec request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exec {
    /// A session of one of Nix's two protocols.
    Session(ServeExec),
    /// `nixbuild <words>`: the operations interface, with the words after `nixbuild`.
    Command(Vec<String>),
}

/// An accepted exec request: a session of one of the two protocols.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeExec {
    /// `--write` was given (always for `nix-daemon --stdio`): the session may add paths and
    /// build.
    pub write: bool,
    /// Which protocol the session speaks.
    pub protocol: Protocol,
}

/// Why an exec request is refused. The message is what the client sees after `error: `.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExecRefusal {
    /// The command is not UTF-8.
    #[error("the command is not UTF-8; {SERVED}")]
    NotUtf8,
    /// The command is longer than [`MAX_COMMAND`].
    #[error("the command is longer than {MAX_COMMAND} bytes; {SERVED}")]
    TooLong,
    /// The command is empty.
    #[error("an empty command is not served; {SERVED}")]
    Empty,
    /// An unterminated quote or a trailing backslash.
    #[error("the command has an unterminated quote or escape; {SERVED}")]
    Unterminated,
    /// Shell syntax beyond a simple command.
    #[error("the command uses shell syntax ({0:?}), but no shell runs here; {SERVED}")]
    ShellSyntax(char),
    /// `nix-daemon` without `--stdio`.
    #[error("`nix-daemon` without --stdio is not served; {SERVED}")]
    NotStdio,
    /// `nix-store` without `--serve`.
    #[error("`nix-store` without --serve is not served; {SERVED}")]
    NotServe,
    /// Any other program.
    #[error("`{0}` is not served; {SERVED}")]
    Other(String),
}

/// Parses an exec request's command.
pub fn parse_exec(command: &[u8]) -> Result<Exec, ExecRefusal> {
    if command.len() > MAX_COMMAND {
        return Err(ExecRefusal::TooLong);
    }
    let command = std::str::from_utf8(command).map_err(|_| ExecRefusal::NotUtf8)?;
    let words = split_words(command)?;
    let Some((program, args)) = words.split_first() else {
        return Err(ExecRefusal::Empty);
    };
    // Nix's remote-program may be a path (`/run/current-system/sw/bin/nix-store`).
    let name = program.rsplit('/').next().unwrap_or(program);
    match name {
        "nix-store" => {
            let mode = ServeArgs::scan(args.iter().map(String::as_str));
            if mode.serve {
                Ok(Exec::Session(ServeExec {
                    write: mode.write,
                    protocol: Protocol::Serve,
                }))
            } else {
                Err(ExecRefusal::NotServe)
            }
        }
        "nix-daemon" => match ServeArgs::scan(args.iter().map(String::as_str)).stdio {
            true => Ok(Exec::Session(ServeExec {
                write: true,
                protocol: Protocol::Daemon,
            })),
            false => Err(ExecRefusal::NotStdio),
        },
        // Only the bare name: it is not a program on a path.
        "nixbuild" if program == "nixbuild" => Ok(Exec::Command(args.to_vec())),
        _ => Err(ExecRefusal::Other(program.clone())),
    }
}

/// Splits a command into words like a POSIX shell splits a simple command, refusing what
/// would make it more than that (see the module documentation).
pub fn split_words(command: &str) -> Result<Vec<String>, ExecRefusal> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = command.chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' | '\n' => {
                if let Some(w) = word.take() {
                    words.push(w);
                }
            }
            '\'' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => w.push(c),
                        None => return Err(ExecRefusal::Unterminated),
                    }
                }
            }
            '"' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => w.push(c),
                            Some('\n') => {}
                            Some(c) => {
                                w.push('\\');
                                w.push(c);
                            }
                            None => return Err(ExecRefusal::Unterminated),
                        },
                        Some(c @ ('$' | '`')) => return Err(ExecRefusal::ShellSyntax(c)),
                        Some(c) => w.push(c),
                        None => return Err(ExecRefusal::Unterminated),
                    }
                }
            }
            '\\' => match chars.next() {
                Some('\n') => {}
                Some(c) => word.get_or_insert_with(String::new).push(c),
                None => return Err(ExecRefusal::Unterminated),
            },
            '#' if word.is_none() => return Err(ExecRefusal::ShellSyntax('#')),
            ';' | '|' | '&' | '<' | '>' | '(' | ')' | '$' | '`' => {
                return Err(ExecRefusal::ShellSyntax(c))
            }
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    if let Some(w) = word {
        words.push(w);
    }
    Ok(words)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports failure
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn serve(write: bool) -> Result<Exec, ExecRefusal> {
        Ok(Exec::Session(ServeExec {
            write,
            protocol: Protocol::Serve,
        }))
    }

    #[test]
    fn what_nix_sends_is_served() {
        assert_eq!(parse_exec(b"nix-store --serve --write"), serve(true));
        assert_eq!(parse_exec(b"nix-store --serve"), serve(false));
        assert_eq!(
            parse_exec(b"nix-store --serve --write --store '/tmp/some store'"),
            serve(true)
        );
        assert_eq!(
            parse_exec(b"/run/current-system/sw/bin/nix-store --serve --write"),
            serve(true)
        );
        // Nix >= 2.20 sends separate words that ssh joins with spaces; Hydra adds --builders "".
        assert_eq!(
            parse_exec(b"nix-store --serve --write --builders \"\""),
            serve(true)
        );
        assert_eq!(parse_exec(b"  nix-store\t--serve  "), serve(false));
        let daemon = Ok(Exec::Session(ServeExec {
            write: true,
            protocol: Protocol::Daemon,
        }));
        assert_eq!(parse_exec(b"nix-daemon --stdio"), daemon);
        assert_eq!(
            parse_exec(b"/nix/var/nix/profiles/default/bin/nix-daemon --stdio --store 'local'"),
            daemon
        );
        assert_eq!(
            parse_exec(b"nix-store --store --write --serve"),
            serve(false)
        );
    }

    #[test]
    fn nixbuild_commands_pass_their_words_on() {
        let words = |w: &[&str]| Ok(Exec::Command(w.iter().map(|w| w.to_string()).collect()));
        assert_eq!(parse_exec(b"nixbuild"), words(&[]));
        assert_eq!(
            parse_exec(b"nixbuild builds --json"),
            words(&["builds", "--json"])
        );
        assert_eq!(
            parse_exec(b"nixbuild log 'a b' --follow"),
            words(&["log", "a b", "--follow"])
        );
        assert_eq!(
            parse_exec(b"/usr/bin/nixbuild builds"),
            Err(ExecRefusal::Other("/usr/bin/nixbuild".into()))
        );
        assert_eq!(
            parse_exec(b"nixbuild builds; sh"),
            Err(ExecRefusal::ShellSyntax(';'))
        );
    }

    #[test]
    fn everything_else_is_refused_naming_what_is_served() {
        for (command, refusal) in [
            ("sh", ExecRefusal::Other("sh".into())),
            ("ls -la /", ExecRefusal::Other("ls".into())),
            ("/bin/sh -c id", ExecRefusal::Other("/bin/sh".into())),
            ("nix-daemon", ExecRefusal::NotStdio),
            ("nix-daemon --store --stdio", ExecRefusal::NotStdio),
            ("nix-store --export /nix/store/x", ExecRefusal::NotServe),
            ("", ExecRefusal::Empty),
            ("   ", ExecRefusal::Empty),
            ("nix-store --serve; sh", ExecRefusal::ShellSyntax(';')),
            ("nix-store --serve | sh", ExecRefusal::ShellSyntax('|')),
            ("nix-store --serve > /tmp/x", ExecRefusal::ShellSyntax('>')),
            (
                "nix-store --serve --store $HOME",
                ExecRefusal::ShellSyntax('$'),
            ),
            (
                "nix-store --serve --store \"$HOME\"",
                ExecRefusal::ShellSyntax('$'),
            ),
            ("nix-store --serve `id`", ExecRefusal::ShellSyntax('`')),
            ("# nix-store --serve", ExecRefusal::ShellSyntax('#')),
            ("nix-store --serve 'unterminated", ExecRefusal::Unterminated),
            ("nix-store --serve \\", ExecRefusal::Unterminated),
        ] {
            let got = parse_exec(command.as_bytes());
            assert_eq!(got, Err(refusal), "{command:?}");
            let msg = got.unwrap_err().to_string();
            assert!(
                msg.contains("nix-store --serve") || msg.contains("ssh://"),
                "{command:?}: {msg}"
            );
        }
        assert_eq!(parse_exec(&[0xff]), Err(ExecRefusal::NotUtf8));
        assert_eq!(
            parse_exec(format!("nix-store --serve {}", "x".repeat(MAX_COMMAND)).as_bytes()),
            Err(ExecRefusal::TooLong)
        );
    }

    #[test]
    fn words_split_like_a_shell() {
        assert_eq!(
            split_words(r#"a 'b c' "d \"e\" \$f \x" g\ h i#j ''"#).unwrap(),
            vec!["a", "b c", r#"d "e" $f \x"#, "g h", "i#j", ""]
        );
        assert_eq!(split_words("a\\\nb").unwrap(), vec!["ab"]);
    }

    /// Quotes a word for a POSIX shell.
    fn quote(w: &str) -> String {
        format!("'{}'", w.replace('\'', r"'\''"))
    }

    proptest! {
        #[test]
        fn never_panics(command in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_exec(&command);
        }

        #[test]
        fn quoted_words_come_back(words in proptest::collection::vec(any::<String>(), 0..8)) {
            let command: Vec<String> = words.iter().map(|w| quote(w)).collect();
            prop_assert_eq!(split_words(&command.join(" ")).unwrap(), words);
        }

        #[test]
        fn write_follows_the_flag_whatever_options_come_with_it(
            write in any::<bool>(),
            store in "[a-z/?=&:]{0,20}",
            extra in proptest::sample::subsequence(vec!["-v", "--quiet", "--builders ''", "--option a b"], 0..4),
        ) {
            let mut command = format!("nix-store --serve --store {}", quote(&store));
            if write {
                command.push_str(" --write");
            }
            for e in extra {
                command.push(' ');
                command.push_str(e);
            }
            prop_assert_eq!(parse_exec(command.as_bytes()), serve(write));
        }
    }
}
