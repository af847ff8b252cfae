//! The `--authorized-keys` file (docs/design.md, Accounts): OpenSSH `authorized_keys` format, one
//! key per line, and the account of a key is the first word of its comment, so
//! `ssh-ed25519 AAAA… alice@laptop` lets its holder in as account `alice@laptop`.
//!
//! OpenSSH options at the start of a line are accepted and ignored, except those whose meaning
//! nixbuild cannot honour: `command=` (the server decides what runs), and the restrictions
//! `from=` and `expiry-time=` and the `cert-authority` marker, which, ignored, would let a key
//! in from anywhere, at any time, or as a plain key. A line with one of them is skipped, as is
//! any line that does not parse, has no valid account name, repeats a key, or holds a key type
//! that is not enabled; each skip names its line number, for the log.
//!
//! Parsing is pure: [`parse_line`] for one line, [`AuthorizedKeys::parse`] for a file's bytes.

use std::collections::HashMap;
use std::fmt;

use nixbuild_core::account::is_valid_account_name;
use russh::keys::ssh_key::PublicKey;

/// Largest `authorized_keys` file read, in bytes.
pub const MAX_FILE_SIZE: u64 = 16 << 20;

/// Longest line considered, in bytes (an RSA-16384 key is under 3 KiB).
pub const MAX_LINE: usize = 16 << 10;

/// The key types this build can verify signatures of, by their OpenSSH names.
pub const SUPPORTED_KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
];

/// The key type enabled when the configuration names none.
pub const DEFAULT_KEY_TYPE: &str = "ssh-ed25519";

/// A key type named in the configuration that this build cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyTypeError {
    /// Not one of [`SUPPORTED_KEY_TYPES`].
    #[error(
        "key type {0:?} is not supported: this build accepts {supported}",
        supported = SUPPORTED_KEY_TYPES.join(", ")
    )]
    Unsupported(String),
    /// The list is empty: no key could ever log in.
    #[error("no key type is enabled; name at least one of {}", SUPPORTED_KEY_TYPES.join(", "))]
    Empty,
}

/// The key types a server accepts (ed25519 unless the configuration enables more).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyTypes(Vec<&'static str>);

impl Default for KeyTypes {
    fn default() -> Self {
        KeyTypes(vec![DEFAULT_KEY_TYPE])
    }
}

impl KeyTypes {
    /// The key types named, each one of [`SUPPORTED_KEY_TYPES`].
    pub fn from_names<S: AsRef<str>>(names: &[S]) -> Result<KeyTypes, KeyTypeError> {
        if names.is_empty() {
            return Err(KeyTypeError::Empty);
        }
        let mut types = Vec::new();
        for name in names {
            let name = name.as_ref();
            let known = SUPPORTED_KEY_TYPES
                .iter()
                .find(|t| **t == name)
                .ok_or_else(|| KeyTypeError::Unsupported(name.to_owned()))?;
            if !types.contains(known) {
                types.push(*known);
            }
        }
        Ok(KeyTypes(types))
    }

    /// Whether keys of `key`'s type are accepted.
    pub fn allows(&self, key: &PublicKey) -> bool {
        self.0.contains(&key.algorithm().as_str())
    }

    /// The enabled names, for messages.
    pub fn names(&self) -> &[&'static str] {
        &self.0
    }
}

/// Why a line was skipped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    /// The line is not UTF-8.
    #[error("not UTF-8")]
    NotUtf8,
    /// The line is longer than [`MAX_LINE`].
    #[error("longer than {MAX_LINE} bytes")]
    TooLong,
    /// The line does not have the shape `[options] keytype base64 [comment]`.
    #[error("malformed: {0}")]
    Malformed(&'static str),
    /// The key type and base64 data do not make a public key.
    #[error("invalid {key_type} key: {reason}")]
    BadKey {
        /// The key type named on the line.
        key_type: String,
        /// What the decoder said.
        reason: String,
    },
    /// An option nixbuild refuses (the module documentation says why).
    #[error("option {option} is refused: {why}")]
    RefusedOption {
        /// The option's name as written.
        option: String,
        /// Why.
        why: &'static str,
    },
    /// No comment, so no account.
    #[error(
        "no account: the account is the first word of the comment, as in \
         `ssh-ed25519 AAAA… alice@laptop`"
    )]
    NoAccount,
    /// The comment's first word is not a valid account name.
    #[error(
        "invalid account name {0:?} (the comment's first word): expected 1 to 64 of \
         A-Z a-z 0-9 . _ @ + -"
    )]
    BadAccount(String),
    /// The key type is not enabled in the configuration.
    #[error("key type {key_type} is not enabled (ssh.key_types enables {enabled})")]
    KeyTypeNotEnabled {
        /// The line's key type.
        key_type: String,
        /// The enabled types, comma-separated.
        enabled: String,
    },
    /// The same key appeared on an earlier line.
    #[error("the same key is already on line {first_line} (account {account:?})")]
    Duplicate {
        /// Where the key was first seen.
        first_line: usize,
        /// The account it belongs to.
        account: String,
    },
}

/// One usable line: a key and its account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyLine {
    /// The public key (its comment is the line's whole comment).
    pub key: PublicKey,
    /// The account: the comment's first word.
    pub account: String,
}

/// How the refused options are named and why they are refused.
const REFUSED_OPTIONS: &[(&str, &str)] = &[
    (
        "command",
        "the server decides what runs (only nix-store --serve), so a forced command would be \
         silently ignored",
    ),
    (
        "from",
        "nixbuild does not check source addresses, so ignoring it would let the key in from \
         anywhere",
    ),
    (
        "expiry-time",
        "nixbuild does not check key expiry, so ignoring it would keep the key valid forever",
    ),
    (
        "cert-authority",
        "certificates are not accepted, and the line's key is a CA, not a user key",
    ),
];

/// Parses one line of an `authorized_keys` file (without its newline): `Ok(None)` for a blank
/// or comment line.
pub fn parse_line(line: &[u8]) -> Result<Option<KeyLine>, LineError> {
    if line.len() > MAX_LINE {
        return Err(LineError::TooLong);
    }
    let line = std::str::from_utf8(line).map_err(|_| LineError::NotUtf8)?;
    let line = line.strip_suffix('\r').unwrap_or(line);
    let rest = line.trim_start_matches([' ', '\t']);
    if rest.is_empty() || rest.starts_with('#') {
        return Ok(None);
    }
    let (first, _) = next_field(rest);
    // OpenSSH's own rule: the line starts with options unless its first field is a key type.
    let rest = if looks_like_key_type(first) {
        rest
    } else {
        let (options, after) = split_options(rest)?;
        check_options(options)?;
        let after = after.trim_start_matches([' ', '\t']);
        if after.is_empty() {
            return Err(LineError::Malformed("no key after the options"));
        }
        after
    };
    let (key_type, rest) = next_field(rest);
    let (base64, comment) = next_field(rest);
    if base64.is_empty() {
        return Err(LineError::Malformed(
            "no base64 key data after the key type",
        ));
    }
    let key = PublicKey::from_openssh(&format!("{key_type} {base64} {comment}")).map_err(|e| {
        LineError::BadKey {
            key_type: key_type.to_owned(),
            reason: e.to_string(),
        }
    })?;
    let (account, _) = next_field(comment);
    if account.is_empty() {
        return Err(LineError::NoAccount);
    }
    if !is_valid_account_name(account) {
        return Err(LineError::BadAccount(account.to_owned()));
    }
    Ok(Some(KeyLine {
        key,
        account: account.to_owned(),
    }))
}

/// The next whitespace-separated field and what follows it (leading blanks removed).
fn next_field(s: &str) -> (&str, &str) {
    let s = s.trim_start_matches([' ', '\t']);
    match s.find([' ', '\t']) {
        Some(end) => (&s[..end], s[end..].trim_start_matches([' ', '\t'])),
        None => (s, ""),
    }
}

/// Whether a field is an OpenSSH key type name rather than options (`ssh-ed25519`,
/// `ecdsa-sha2-nistp256`, `sk-ssh-ed25519@openssh.com`, `ssh-rsa`, …): options always contain
/// `=` or are one of a few bare words, none of which starts like a key type.
fn looks_like_key_type(field: &str) -> bool {
    ["ssh-", "ecdsa-", "sk-"]
        .iter()
        .any(|p| field.starts_with(p))
        && !field.contains(['=', ',', '"'])
}

/// Splits the options field off the line: it ends at the first blank outside double quotes.
fn split_options(line: &str) -> Result<(&str, &str), LineError> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in line.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ' ' | '\t' if !quoted => return Ok((&line[..i], &line[i..])),
            _ => {}
        }
    }
    if quoted {
        Err(LineError::Malformed("unbalanced quote in the options"))
    } else {
        Err(LineError::Malformed("no key after the options"))
    }
}

/// Refuses the options of [`REFUSED_OPTIONS`]; every other option is ignored.
fn check_options(options: &str) -> Result<(), LineError> {
    let mut quoted = false;
    let mut escaped = false;
    let mut start = 0;
    let mut names = Vec::new();
    for (i, c) in options.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                names.push(&options[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    names.push(&options[start..]);
    for option in names {
        let name = option.split('=').next().unwrap_or(option);
        if let Some((refused, why)) = REFUSED_OPTIONS
            .iter()
            .find(|(r, _)| r.eq_ignore_ascii_case(name))
        {
            let option = if option.contains('=') {
                format!("{refused}=")
            } else {
                (*refused).to_owned()
            };
            return Err(LineError::RefusedOption { option, why });
        }
    }
    Ok(())
}

/// A line that was skipped, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The 1-based line number.
    pub line: usize,
    /// Why.
    pub reason: LineError,
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {} skipped: {}", self.line, self.reason)
    }
}

/// A key's entry: its account and where it was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The account the key logs in as.
    pub account: String,
    /// The 1-based line number.
    pub line: usize,
}

/// A parsed `authorized_keys` file: keys by their wire encoding, and the skipped lines.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthorizedKeys {
    by_key: HashMap<Vec<u8>, Entry>,
    /// Lines that were skipped, in order.
    pub skipped: Vec<Skipped>,
}

impl AuthorizedKeys {
    /// Parses a whole file's bytes, keeping the lines whose key type `types` allows.
    pub fn parse(text: &[u8], types: &KeyTypes) -> AuthorizedKeys {
        let mut keys = AuthorizedKeys::default();
        for (i, line) in text.split(|b| *b == b'\n').enumerate() {
            let n = i + 1;
            let parsed = parse_line(line).and_then(|parsed| match parsed {
                Some(k) if !types.allows(&k.key) => Err(LineError::KeyTypeNotEnabled {
                    key_type: k.key.algorithm().as_str().to_owned(),
                    enabled: types.names().join(", "),
                }),
                other => Ok(other),
            });
            let parsed = parsed.and_then(|parsed| {
                let Some(k) = parsed else { return Ok(None) };
                let blob = key_blob(&k.key).map_err(|reason| LineError::BadKey {
                    key_type: k.key.algorithm().as_str().to_owned(),
                    reason,
                })?;
                if let Some(first) = keys.by_key.get(&blob) {
                    return Err(LineError::Duplicate {
                        first_line: first.line,
                        account: first.account.clone(),
                    });
                }
                Ok(Some((blob, k.account)))
            });
            match parsed {
                Ok(Some((blob, account))) => {
                    keys.by_key.insert(blob, Entry { account, line: n });
                }
                Ok(None) => {}
                Err(reason) => keys.skipped.push(Skipped { line: n, reason }),
            }
        }
        keys
    }

    /// The entry of `key`, if it is authorized.
    pub fn lookup(&self, key: &PublicKey) -> Option<&Entry> {
        self.by_key.get(&key_blob(key).ok()?)
    }

    /// How many keys are authorized.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Whether no key is authorized.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

/// The key's SSH wire encoding, which identifies it whatever its comment.
fn key_blob(key: &PublicKey) -> Result<Vec<u8>, String> {
    key.to_bytes().map_err(|e| e.to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports failure
mod tests {
    use super::*;
    use proptest::prelude::*;
    use russh::keys::ssh_key::private::{Ed25519Keypair, PrivateKey};

    /// An ed25519 public key from a seed, in OpenSSH form without comment.
    fn ed25519(seed: u8) -> String {
        let key = PrivateKey::from(Ed25519Keypair::from_seed(&[seed; 32]));
        key.public_key().to_openssh().unwrap()
    }

    /// A 2048-bit RSA public key line (the modulus is not a real one: only its shape counts).
    fn rsa() -> String {
        use base64::Engine;
        let mut blob = Vec::new();
        for field in [
            &b"ssh-rsa"[..],
            &[1, 0, 1],
            &[&[0u8, 0xc5][..], &[0x5a; 255]].concat(),
        ] {
            blob.extend_from_slice(&(field.len() as u32).to_be_bytes());
            blob.extend_from_slice(field);
        }
        format!(
            "ssh-rsa {}",
            base64::engine::general_purpose::STANDARD.encode(blob)
        )
    }

    fn account_of(line: &str) -> Result<Option<String>, LineError> {
        parse_line(line.as_bytes()).map(|k| k.map(|k| k.account))
    }

    #[test]
    fn account_is_the_first_word_of_the_comment() {
        let k = ed25519(1);
        assert_eq!(
            account_of(&format!("{k} alice@laptop")).unwrap().unwrap(),
            "alice@laptop"
        );
        assert_eq!(
            account_of(&format!("  {k}\tbob+ci  some words after")).unwrap(),
            Some("bob+ci".into())
        );
        assert_eq!(account_of(&k), Err(LineError::NoAccount));
        assert_eq!(account_of(&format!("{k}   ")), Err(LineError::NoAccount));
        assert_eq!(
            account_of(&format!("{k} a/b")),
            Err(LineError::BadAccount("a/b".into()))
        );
        assert_eq!(
            account_of(&format!("{k} {}", "x".repeat(65))),
            Err(LineError::BadAccount("x".repeat(65)))
        );
        assert_eq!(
            account_of(&format!("{k} alice\r")).unwrap().unwrap(),
            "alice"
        );
    }

    #[test]
    fn blank_and_comment_lines_are_nothing() {
        for line in [
            "",
            "   ",
            "\t",
            "# a comment",
            "   # indented comment",
            "\r",
        ] {
            assert_eq!(parse_line(line.as_bytes()), Ok(None), "{line:?}");
        }
    }

    #[test]
    fn options_are_ignored_except_the_refused_ones() {
        let k = ed25519(2);
        for options in [
            "no-pty",
            "restrict,no-port-forwarding",
            "environment=\"A=b c\",no-agent-forwarding",
            "permitopen=\"host:22\",no-X11-forwarding",
            "no-pty,environment=\"quoted \\\" quote, and comma\"",
        ] {
            assert_eq!(
                account_of(&format!("{options} {k} alice")).unwrap(),
                Some("alice".into()),
                "{options}"
            );
        }
        for (options, refused) in [
            ("command=\"nixbuild-serve --account x\"", "command="),
            ("no-pty,COMMAND=\"sh\"", "command="),
            ("from=\"10.0.0.0/8\"", "from="),
            ("restrict,expiry-time=\"20300101\"", "expiry-time="),
            ("cert-authority", "cert-authority"),
        ] {
            match parse_line(format!("{options} {k} alice").as_bytes()) {
                Err(LineError::RefusedOption { option, .. }) => assert_eq!(option, refused),
                other => panic!("{options}: {other:?}"),
            }
        }
        assert!(matches!(
            parse_line(format!("command=\"unterminated {k} alice").as_bytes()),
            Err(LineError::Malformed(_))
        ));
        assert!(matches!(
            parse_line(b"no-pty"),
            Err(LineError::Malformed(_))
        ));
        assert!(matches!(
            parse_line(b"no-pty   "),
            Err(LineError::Malformed(_))
        ));
    }

    #[test]
    fn bad_keys_are_errors() {
        assert!(matches!(
            parse_line(b"ssh-ed25519 AAAA alice"),
            Err(LineError::BadKey { .. })
        ));
        assert!(matches!(
            parse_line(b"ssh-ed25519"),
            Err(LineError::Malformed(_))
        ));
        // The type named on the line must be the one inside the base64 data.
        let k = ed25519(3);
        let lying = k.replacen("ssh-ed25519", "ecdsa-sha2-nistp256", 1);
        assert!(matches!(
            parse_line(format!("{lying} alice").as_bytes()),
            Err(LineError::BadKey { .. })
        ));
        assert_eq!(parse_line(&[b'a', 0xff, b' ']), Err(LineError::NotUtf8));
        assert_eq!(
            parse_line(&vec![b'a'; MAX_LINE + 1]),
            Err(LineError::TooLong)
        );
    }

    #[test]
    fn a_file_keeps_enabled_keys_and_names_skipped_lines() {
        let (a, b, rsa) = (ed25519(4), ed25519(5), rsa());
        let text = format!(
            "# keys\n{a} alice\n\ncommand=\"x\" {b} mallory\n{rsa} carol\n{a} alice-again\n\
             {b} bob@laptop extra words\nnonsense\n"
        );
        let keys = AuthorizedKeys::parse(text.as_bytes(), &KeyTypes::default());
        assert_eq!(keys.len(), 2, "{:?}", keys.skipped);
        let key = |s: &str| PublicKey::from_openssh(s).unwrap();
        assert_eq!(
            keys.lookup(&key(&a)),
            Some(&Entry {
                account: "alice".into(),
                line: 2
            })
        );
        assert_eq!(keys.lookup(&key(&b)).unwrap().account, "bob@laptop");
        assert_eq!(keys.lookup(&key(&ed25519(6))), None);
        let skipped: Vec<usize> = keys.skipped.iter().map(|s| s.line).collect();
        assert_eq!(skipped, vec![4, 5, 6, 8]);
        assert!(matches!(
            keys.skipped[1].reason,
            LineError::KeyTypeNotEnabled { ref key_type, .. } if key_type == "ssh-rsa"
        ));
        assert_eq!(
            keys.skipped[2].reason,
            LineError::Duplicate {
                first_line: 2,
                account: "alice".into()
            }
        );
        assert!(keys.skipped[0]
            .to_string()
            .starts_with("line 4 skipped: option command="));
    }

    #[test]
    fn key_types_are_checked() {
        assert_eq!(
            KeyTypes::from_names(&["ssh-ed25519", "ecdsa-sha2-nistp256", "ssh-ed25519"])
                .unwrap()
                .names(),
            &["ssh-ed25519", "ecdsa-sha2-nistp256"]
        );
        assert_eq!(
            KeyTypes::from_names(&["ssh-rsa"]),
            Err(KeyTypeError::Unsupported("ssh-rsa".into()))
        );
        assert_eq!(KeyTypes::from_names::<&str>(&[]), Err(KeyTypeError::Empty));
        let rsa = PublicKey::from_openssh(&rsa()).unwrap();
        assert!(!KeyTypes::default().allows(&rsa));
        let ed = PublicKey::from_openssh(&ed25519(7)).unwrap();
        assert!(KeyTypes::default().allows(&ed));
    }

    proptest! {
        #[test]
        fn parse_never_panics(line in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_line(&line);
            let _ = AuthorizedKeys::parse(&line, &KeyTypes::default());
        }

        #[test]
        fn any_valid_account_and_ignored_options_round_trip(
            seed in any::<u8>(),
            account in "[A-Za-z0-9._@+-]{1,64}",
            rest in "( [ -~]{0,20}){0,3}",
            options in proptest::sample::subsequence(
                vec!["no-pty", "restrict", "no-agent-forwarding", "environment=\"X=1 2,3\""],
                0..4,
            ),
        ) {
            let k = ed25519(seed);
            let prefix = if options.is_empty() { String::new() } else { options.join(",") + " " };
            let line = format!("{prefix}{k} {account}{rest}");
            let parsed = parse_line(line.as_bytes()).unwrap().unwrap();
            prop_assert_eq!(parsed.account, account);
            let expected = PublicKey::from_openssh(&k).unwrap();
            prop_assert_eq!(parsed.key.key_data(), expected.key_data());
        }

        #[test]
        fn garbage_in_the_key_field_is_skipped_with_its_line_number(
            junk in "[A-Za-z0-9+/=]{1,40}",
            before in 0usize..5,
        ) {
            let text = format!("{}ssh-ed25519 {junk} alice\n", "\n".repeat(before));
            let keys = AuthorizedKeys::parse(text.as_bytes(), &KeyTypes::default());
            prop_assert!(keys.is_empty());
            prop_assert_eq!(keys.skipped.len(), 1);
            prop_assert_eq!(keys.skipped[0].line, before + 1);
        }
    }
}
