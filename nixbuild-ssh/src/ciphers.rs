//! The ciphers the server offers (`ssh.ciphers`). An SSH client takes the first cipher of its
//! own list that the server offers, so the server chooses only by what it leaves out:
//! OpenSSH's client puts `chacha20-poly1305@openssh.com` first, and gets AES-GCM only from a
//! server that does not offer ChaCha20. On a CPU with AES-NI and carry-less multiplication,
//! AES-256-GCM costs both ends much less per byte than ChaCha20-Poly1305 (BENCHMARKS.md,
//! issue 8: about a fifth of the server's cipher time, a third of OpenSSH's), hence the
//! default.

use russh::cipher;

/// The ciphers offered when `ssh.ciphers` is not set: AES-256-GCM alone.
pub const DEFAULT_CIPHERS: &[&str] = &["aes256-gcm@openssh.com"];

/// The ciphers that may be offered: the authenticated or CTR ciphers russh implements with
/// a MAC-free or encrypt-then-MAC construction (no CBC, no 3DES, no `none`).
const SUPPORTED: &[(&str, cipher::Name)] = &[
    ("aes256-gcm@openssh.com", cipher::AES_256_GCM),
    ("chacha20-poly1305@openssh.com", cipher::CHACHA20_POLY1305),
    ("aes256-ctr", cipher::AES_256_CTR),
    ("aes192-ctr", cipher::AES_192_CTR),
    ("aes128-ctr", cipher::AES_128_CTR),
];

/// The ciphers offered, in the server's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ciphers(Vec<(&'static str, cipher::Name)>);

/// Why a list of cipher names is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CipherError {
    /// No cipher at all: no client could connect.
    #[error("no cipher given: at least one of {} is needed", supported_names())]
    Empty,
    /// A name that is not one of the supported ciphers.
    #[error("cipher {:?} is not supported (supported: {})", .0, supported_names())]
    Unsupported(String),
}

fn supported_names() -> String {
    SUPPORTED
        .iter()
        .map(|(n, _)| *n)
        .collect::<Vec<_>>()
        .join(", ")
}

impl Ciphers {
    /// The ciphers named, by OpenSSH name, in that order; duplicates are dropped.
    pub fn from_names<S: AsRef<str>>(names: &[S]) -> Result<Ciphers, CipherError> {
        let mut out: Vec<(&'static str, cipher::Name)> = Vec::new();
        for name in names {
            let name = name.as_ref();
            let found = SUPPORTED
                .iter()
                .find(|(n, _)| *n == name)
                .ok_or_else(|| CipherError::Unsupported(name.to_owned()))?;
            if !out.contains(found) {
                out.push(*found);
            }
        }
        if out.is_empty() {
            return Err(CipherError::Empty);
        }
        Ok(Ciphers(out))
    }

    /// The names, in order.
    pub fn names(&self) -> Vec<&'static str> {
        self.0.iter().map(|(n, _)| *n).collect()
    }

    /// russh's negotiation preferences: its defaults with these ciphers.
    pub(crate) fn preferred(&self) -> russh::Preferred {
        russh::Preferred {
            cipher: self.0.iter().map(|(_, c)| *c).collect::<Vec<_>>().into(),
            ..russh::Preferred::default()
        }
    }
}

impl Default for Ciphers {
    fn default() -> Self {
        Ciphers(vec![SUPPORTED[0]])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_and_kept_in_order() {
        let c = Ciphers::from_names(&[
            "chacha20-poly1305@openssh.com",
            "aes256-gcm@openssh.com",
            "chacha20-poly1305@openssh.com",
        ])
        .expect("supported");
        assert_eq!(
            c.names(),
            ["chacha20-poly1305@openssh.com", "aes256-gcm@openssh.com"]
        );
        assert_eq!(
            Ciphers::from_names(&["aes128-cbc"]),
            Err(CipherError::Unsupported("aes128-cbc".into()))
        );
        assert_eq!(
            Ciphers::from_names(&["none"]),
            Err(CipherError::Unsupported("none".into()))
        );
        assert_eq!(Ciphers::from_names::<&str>(&[]), Err(CipherError::Empty));
    }

    #[test]
    fn names_are_russh_names() {
        for (name, c) in SUPPORTED {
            assert_eq!(*name, c.as_ref());
        }
    }

    #[test]
    fn the_default_is_aes_gcm_alone() {
        assert_eq!(Ciphers::default().names(), DEFAULT_CIPHERS);
        let preferred = Ciphers::default().preferred();
        assert_eq!(&*preferred.cipher, &[cipher::AES_256_GCM]);
        // Everything else stays russh's default.
        assert_eq!(preferred.kex, russh::Preferred::default().kex);
    }
}
