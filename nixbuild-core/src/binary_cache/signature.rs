//! Nix's ed25519 signatures of store paths: keys and signatures written `name:base64`, as
//! `nix-store --generate-binary-cache-key` and the narinfo `Sig:` lines have them.

use std::collections::BTreeMap;
use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};

/// Why a key or a signature could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// Not `name:base64`, or an empty name.
    #[error("{what} {text:?} is not of the form NAME:BASE64")]
    Form {
        /// What was read (`public key`, `secret key`, `signature`).
        what: &'static str,
        /// The text, cut to 80 characters.
        text: String,
    },
    /// The part after the colon is not base64.
    #[error("{what} {name:?}: the part after the colon is not base64")]
    Base64 {
        /// What was read.
        what: &'static str,
        /// The key's name.
        name: String,
    },
    /// The decoded bytes have the wrong length.
    #[error("{what} {name:?} has {found} bytes, expected {expected}")]
    Length {
        /// What was read.
        what: &'static str,
        /// The key's name.
        name: String,
        /// The length an ed25519 key or signature has.
        expected: usize,
        /// The decoded length.
        found: usize,
    },
    /// 32 bytes that are not a point of the curve.
    #[error("public key {name:?} is not a valid ed25519 key")]
    InvalidKey {
        /// The key's name.
        name: String,
    },
}

/// Splits `name:base64` and decodes the base64 into exactly `N` bytes.
fn parse_named<const N: usize>(
    what: &'static str,
    text: &str,
) -> Result<(String, [u8; N]), SignatureError> {
    let form = || SignatureError::Form {
        what,
        text: text.chars().take(80).collect(),
    };
    let (name, data) = text.trim().split_once(':').ok_or_else(form)?;
    if name.is_empty() {
        return Err(form());
    }
    let bytes = STANDARD.decode(data).map_err(|_| SignatureError::Base64 {
        what,
        name: name.to_owned(),
    })?;
    let found = bytes.len();
    let array = <[u8; N]>::try_from(bytes).map_err(|_| SignatureError::Length {
        what,
        name: name.to_owned(),
        expected: N,
        found,
    })?;
    Ok((name.to_owned(), array))
}

/// A public key that may sign store paths (`trusted-public-keys`).
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    name: String,
    key: VerifyingKey,
}

impl PublicKey {
    /// Reads `name:base64(32 bytes)`.
    pub fn parse(text: &str) -> Result<PublicKey, SignatureError> {
        let (name, bytes) = parse_named::<32>("public key", text)?;
        let key = VerifyingKey::from_bytes(&bytes)
            .map_err(|_| SignatureError::InvalidKey { name: name.clone() })?;
        Ok(PublicKey { name, key })
    }

    /// The key's name, which signatures made with it carry.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether `signature` (`name:base64`) is this key's signature of `message`. A signature
    /// under another name, or one that cannot be read, is not.
    pub fn verifies(&self, message: &[u8], signature: &str) -> bool {
        match parse_named::<64>("signature", signature) {
            Ok((name, bytes)) if name == self.name => {
                let sig = ed25519_dalek::Signature::from_bytes(&bytes);
                self.key.verify_strict(message, &sig).is_ok()
            }
            _ => false,
        }
    }
}

impl fmt::Display for PublicKey {
    /// `name:base64`, as read.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, STANDARD.encode(self.key.as_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

/// A secret key that signs store paths (`secret-key-files`), `name:base64(64 bytes)`: the
/// 32-byte seed followed by the public key.
pub struct SecretKey {
    name: String,
    key: SigningKey,
}

impl SecretKey {
    /// Reads `name:base64(64 bytes)`; the public half must match the seed.
    pub fn parse(text: &str) -> Result<SecretKey, SignatureError> {
        let (name, bytes) = parse_named::<64>("secret key", text)?;
        let key = SigningKey::from_keypair_bytes(&bytes)
            .map_err(|_| SignatureError::InvalidKey { name: name.clone() })?;
        Ok(SecretKey { name, key })
    }

    /// The signature of `message`, `name:base64`.
    pub fn sign(&self, message: &[u8]) -> String {
        let sig = self.key.sign(message);
        format!("{}:{}", self.name, STANDARD.encode(sig.to_bytes()))
    }

    /// The matching public key.
    pub fn public_key(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }
}

impl fmt::Debug for SecretKey {
    /// The name only: a secret is never printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({}:…)", self.name)
    }
}

/// The keys whose signatures are trusted, by name (`trusted-public-keys`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedKeys {
    keys: BTreeMap<String, PublicKey>,
}

impl TrustedKeys {
    /// The set of `keys`; of two keys with one name, the last counts.
    pub fn new(keys: impl IntoIterator<Item = PublicKey>) -> TrustedKeys {
        TrustedKeys {
            keys: keys.into_iter().map(|k| (k.name.clone(), k)).collect(),
        }
    }

    /// Whether no key is trusted.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The name of the first trusted key among `signatures` that signed `message`, as Nix
    /// accepts a path with one valid signature by a trusted key.
    pub fn signer<'a>(
        &self,
        message: &[u8],
        signatures: impl IntoIterator<Item = &'a String>,
    ) -> Option<&str> {
        signatures.into_iter().find_map(|sig| {
            let (name, _) = sig.split_once(':')?;
            let key = self.keys.get(name)?;
            key.verifies(message, sig).then_some(key.name())
        })
    }
}
