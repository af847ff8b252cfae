//! Content addresses (`ca` strings, docs/serve-protocol.md §6.4) and the methods fixed-output
//! derivations use.

use std::fmt;

use crate::hash::{Hash, HashAlgo, HashError};

/// How content-addressed data was hashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ContentAddressMethod {
    /// A text file (`.drv`, `builtins.toFile`): sha256 of the contents, may have references.
    Text,
    /// A single file, hashed flat.
    Flat,
    /// The NAR serialisation of a file tree (`r:`).
    Recursive,
}

/// A content address: a method and a hash (`ca` field, docs/serve-protocol.md §6.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ContentAddress {
    /// How the data was hashed.
    pub method: ContentAddressMethod,
    /// The hash.
    pub hash: Hash,
}

/// Why a content address or method string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContentAddressError {
    /// Neither `text:` nor `fixed:`.
    #[error("content address {0:?} starts with neither \"text:\" nor \"fixed:\"")]
    UnknownPrefix(String),
    /// The `algo:digest` part has no `:`.
    #[error("content address {0:?} has no algorithm")]
    MissingAlgo(String),
    /// Text content addresses are always sha256.
    #[error("text content address {0:?} must use sha256")]
    TextNotSha256(String),
    /// The algorithm or digest is invalid.
    #[error("invalid hash in content address {text:?}: {source}")]
    Hash {
        /// The whole input.
        text: String,
        /// What was wrong.
        source: HashError,
    },
}

impl ContentAddressMethod {
    /// The prefix of the method in a derivation output's `hashAlgo` field.
    fn algo_prefix(self) -> &'static str {
        match self {
            ContentAddressMethod::Text => "text:",
            ContentAddressMethod::Flat => "",
            ContentAddressMethod::Recursive => "r:",
        }
    }

    /// Parses a derivation output's `hashAlgo` field: `sha256`, `r:sha1`, `text:sha256`.
    pub fn parse_with_algo(
        s: &str,
    ) -> Result<(ContentAddressMethod, HashAlgo), ContentAddressError> {
        let (method, algo) = if let Some(rest) = s.strip_prefix("r:") {
            (ContentAddressMethod::Recursive, rest)
        } else if let Some(rest) = s.strip_prefix("text:") {
            (ContentAddressMethod::Text, rest)
        } else {
            (ContentAddressMethod::Flat, s)
        };
        let algo = HashAlgo::parse(algo).map_err(|source| ContentAddressError::Hash {
            text: s.to_owned(),
            source,
        })?;
        if method == ContentAddressMethod::Text && algo != HashAlgo::Sha256 {
            return Err(ContentAddressError::TextNotSha256(s.to_owned()));
        }
        Ok((method, algo))
    }

    /// The `hashAlgo` field for this method and algorithm, as Nix writes it.
    pub fn render_with_algo(self, algo: HashAlgo) -> String {
        format!("{}{}", self.algo_prefix(), algo.name())
    }
}

impl ContentAddress {
    /// Parses `text:sha256:<hash>` or `fixed:[r:]<algo>:<hash>`, the hash in base16, nix32 or
    /// base64.
    pub fn parse(s: &str) -> Result<Self, ContentAddressError> {
        let (method, rest) = if let Some(rest) = s.strip_prefix("text:") {
            (ContentAddressMethod::Text, rest)
        } else if let Some(rest) = s.strip_prefix("fixed:r:") {
            (ContentAddressMethod::Recursive, rest)
        } else if let Some(rest) = s.strip_prefix("fixed:") {
            (ContentAddressMethod::Flat, rest)
        } else {
            return Err(ContentAddressError::UnknownPrefix(s.to_owned()));
        };
        let (algo, digest) = rest
            .split_once(':')
            .ok_or_else(|| ContentAddressError::MissingAlgo(s.to_owned()))?;
        let hash_err = |source| ContentAddressError::Hash {
            text: s.to_owned(),
            source,
        };
        let algo = HashAlgo::parse(algo).map_err(hash_err)?;
        if method == ContentAddressMethod::Text && algo != HashAlgo::Sha256 {
            return Err(ContentAddressError::TextNotSha256(s.to_owned()));
        }
        let hash = Hash::parse_encoded(algo, digest).map_err(hash_err)?;
        Ok(ContentAddress { method, hash })
    }
}

impl fmt::Display for ContentAddress {
    /// `text:sha256:<nix32>` or `fixed:[r:]<algo>:<nix32>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.method {
            ContentAddressMethod::Text => write!(f, "text:{}", self.hash),
            ContentAddressMethod::Flat => write!(f, "fixed:{}", self.hash),
            ContentAddressMethod::Recursive => write!(f, "fixed:r:{}", self.hash),
        }
    }
}

/// Proptest strategies for content addresses.
#[cfg(any(test, feature = "test"))]
pub mod strategies {
    use super::*;
    use crate::hash::strategies::{hash, hash_of};
    use proptest::prelude::*;

    /// Any content address (text ones always sha256).
    pub fn content_address() -> impl Strategy<Value = ContentAddress> {
        prop_oneof![
            hash_of(HashAlgo::Sha256).prop_map(|hash| ContentAddress {
                method: ContentAddressMethod::Text,
                hash
            }),
            hash().prop_map(|hash| ContentAddress {
                method: ContentAddressMethod::Flat,
                hash
            }),
            hash().prop_map(|hash| ContentAddress {
                method: ContentAddressMethod::Recursive,
                hash
            }),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::strategies::*;
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn golden() {
        // docs/serve-protocol.md §13.3 and §13.7
        let text = "text:sha256:1fcgpy7vc4ammr7s17j2xq88scswkgz23dqzc04g8sx5vcp2pppw";
        let ca = ContentAddress::parse(text).expect("valid");
        assert_eq!(ca.method, ContentAddressMethod::Text);
        assert_eq!(ca.hash, Hash::compute(HashAlgo::Sha256, b"bar"));
        assert_eq!(ca.to_string(), text);

        let fixed = "fixed:r:sha256:1pqvrg0q9bkr57zf1iz2a7fgqr1lv4ak9yrfi3s68ryxvy9h1zym";
        let ca = ContentAddress::parse(fixed).expect("valid");
        assert_eq!(ca.method, ContentAddressMethod::Recursive);
        assert_eq!(ca.to_string(), fixed);
        let b16 = format!("fixed:r:sha256:{}", ca.hash.to_base16());
        assert_eq!(ContentAddress::parse(&b16), Ok(ca));

        let flat = "fixed:sha1:143xibwh31h9bvxzalr0sjvbbvpa6ffs";
        let ca = ContentAddress::parse(flat).expect("valid");
        assert_eq!(ca.method, ContentAddressMethod::Flat);
        assert_eq!(ca.hash, Hash::compute(HashAlgo::Sha1, b""));
    }

    #[test]
    fn hash_algo_field() {
        for (s, method, algo) in [
            ("sha256", ContentAddressMethod::Flat, HashAlgo::Sha256),
            ("r:sha1", ContentAddressMethod::Recursive, HashAlgo::Sha1),
            ("text:sha256", ContentAddressMethod::Text, HashAlgo::Sha256),
            ("md5", ContentAddressMethod::Flat, HashAlgo::Md5),
        ] {
            assert_eq!(ContentAddressMethod::parse_with_algo(s), Ok((method, algo)));
            assert_eq!(method.render_with_algo(algo), s);
        }
        assert!(ContentAddressMethod::parse_with_algo("text:sha1").is_err());
        assert!(ContentAddressMethod::parse_with_algo("r:").is_err());
        assert!(ContentAddressMethod::parse_with_algo("git:sha1").is_err());
    }

    #[test]
    fn rejects_bad() {
        for s in [
            "",
            "fixed:",
            "fixed:sha256",
            "text:sha1:143xibwh31h9bvxzalr0sjvbbvpa6ffs",
            "source:sha256:1fcgpy7vc4ammr7s17j2xq88scswkgz23dqzc04g8sx5vcp2pppw",
            "fixed:sha256:1fcgpy7vc4ammr7s17j2xq88scswkgz23dqzc04g8sx5vcp2ppp",
        ] {
            assert!(ContentAddress::parse(s).is_err(), "{s}");
        }
    }

    proptest! {
        #[test]
        fn round_trip(ca in content_address()) {
            prop_assert_eq!(ContentAddress::parse(&ca.to_string()), Ok(ca));
            let field = ca.method.render_with_algo(ca.hash.algo());
            prop_assert_eq!(
                ContentAddressMethod::parse_with_algo(&field),
                Ok((ca.method, ca.hash.algo()))
            );
        }

        #[test]
        fn parse_never_panics(s in "(text:|fixed:|fixed:r:)?(sha256:|md5:)?[0-9a-z+/=]{0,100}") {
            if let Ok(ca) = ContentAddress::parse(&s) {
                prop_assert_eq!(ContentAddress::parse(&ca.to_string()), Ok(ca));
            }
        }

        #[test]
        fn parse_arbitrary_never_panics(s in ".{0,100}") {
            let _ = ContentAddress::parse(&s);
            let _ = ContentAddressMethod::parse_with_algo(&s);
        }
    }
}
