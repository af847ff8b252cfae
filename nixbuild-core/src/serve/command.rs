//! What a `nix-store` command line asks for (docs/serve-protocol.md §1.1, "Arguments the server
//! receives"): `--serve`, `--write`, and general options that a replacement accepts and ignores
//! (`--store URI`, `--builders ""`, `--option NAME VALUE`, …). Shared by the stdio relay
//! and the SSH front door, which both stand in for `nix-store --serve`.

/// `nix-store` options that take one value, skipped together with it (`--option` takes two).
pub const VALUE_OPTIONS: &[&str] = &[
    "--store",
    "--builders",
    "--max-jobs",
    "-j",
    "--cores",
    "--log-format",
    "--max-silent-time",
    "--timeout",
    "--eval-store",
    "--include",
    "-I",
];

/// Which of Nix's remote protocols a session speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Protocol {
    /// `nix-store --serve` (`ssh://`).
    #[default]
    Serve,
    /// `nix-daemon --stdio`, the worker protocol (`ssh-ng://`).
    Daemon,
}

impl Protocol {
    /// Its name in logs and in the relay's header.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Serve => "serve",
            Protocol::Daemon => "daemon",
        }
    }
}

/// The mode a `nix-store` (or `nix-daemon`) command line selects.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServeArgs {
    /// `--serve` is present.
    pub serve: bool,
    /// `--write` is present.
    pub write: bool,
    /// `--stdio` is present (`nix-daemon --stdio`).
    pub stdio: bool,
}

impl ServeArgs {
    /// Scans `nix-store`'s arguments (without the program name) for `--serve` and `--write`,
    /// skipping the values of options that take them, so `--store --write` does not count as
    /// `--write`.
    pub fn scan<'a>(args: impl IntoIterator<Item = &'a str>) -> ServeArgs {
        let mut mode = ServeArgs::default();
        let mut args = args.into_iter();
        while let Some(a) = args.next() {
            match a {
                "--serve" => mode.serve = true,
                "--write" => mode.write = true,
                "--stdio" => mode.stdio = true,
                "--option" => {
                    args.next();
                    args.next();
                }
                _ if VALUE_OPTIONS.contains(&a) => {
                    args.next();
                }
                _ => {}
            }
        }
        mode
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(line: &str) -> ServeArgs {
        ServeArgs::scan(line.split_whitespace())
    }

    #[test]
    fn what_nix_and_hydra_send() {
        let rw = ServeArgs {
            serve: true,
            write: true,
            stdio: false,
        };
        assert_eq!(scan("--serve --write"), rw);
        assert_eq!(scan("--serve --write --store /x"), rw);
        assert_eq!(
            ServeArgs::scan(["--serve", "--write", "--builders", ""]),
            rw
        );
        assert_eq!(
            scan("--serve"),
            ServeArgs {
                serve: true,
                write: false,
                stdio: false,
            }
        );
        assert!(!scan("--option foo --write --serve").write);
        assert!(!scan("--store --write --serve").write);
        assert_eq!(scan("--export /nix/store/x"), ServeArgs::default());
        assert!(scan("--stdio --store /x").stdio);
        assert!(!scan("--store --stdio").stdio);
    }
}
