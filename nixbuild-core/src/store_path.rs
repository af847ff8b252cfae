//! Store paths: syntax (docs/serve-protocol.md §8.1) and computation from fingerprints
//! (docs/serve-protocol.md §8.3).

use std::collections::BTreeSet;
use std::fmt;

use crate::content_address::{ContentAddress, ContentAddressMethod};
use crate::hash::{Hash, HashAlgo};
use crate::nixbase32;

/// The only store directory nixbuild serves.
pub const STORE_DIR: &str = "/nix/store";

/// Length of the nix32 hash part of a store path.
pub const HASH_PART_LEN: usize = 32;

/// Longest name Nix accepts.
pub const MAX_NAME_LEN: usize = 211;

/// A valid store path: a 20-byte digest and a name. Ordered like its absolute path string.
///
/// The digest is kept as its 32 nix32 characters so that the derived `Ord` (hash part, then
/// name) is the byte order of `/nix/store/<hash>-<name>`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePath {
    hash_part: [u8; HASH_PART_LEN],
    name: String,
}

/// Why a store path was rejected or could not be computed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorePathError {
    /// The absolute path does not start with `/nix/store/`.
    #[error("path {0:?} is not in {STORE_DIR}")]
    NotInStore(String),
    /// The base name is too short to hold a hash part, a `-` and a name.
    #[error("store path base name {0:?} is too short")]
    TooShort(String),
    /// A character of the hash part is outside the nix32 alphabet.
    #[error("invalid character {found:?} at position {pos} of the hash part of {path:?}")]
    InvalidHashChar {
        /// The base name.
        path: String,
        /// The character.
        found: char,
        /// Its position in the base name.
        pos: usize,
    },
    /// The hash part is not followed by `-`.
    #[error("store path base name {0:?} has no '-' after the hash part")]
    MissingDash(String),
    /// The name is empty.
    #[error("store path name is empty")]
    EmptyName,
    /// The name is longer than [`MAX_NAME_LEN`].
    #[error("store path name is {0} bytes long, the limit is {MAX_NAME_LEN}")]
    NameTooLong(usize),
    /// A character of the name is outside `[0-9A-Za-z+-._?=]`.
    #[error("invalid character {found:?} at position {pos} of store path name {name:?}")]
    InvalidNameChar {
        /// The name.
        name: String,
        /// The character.
        found: char,
        /// Its position in the name.
        pos: usize,
    },
    /// `.`, `..`, or a name starting with `.-` or `..-` (rejected by Nix ≥ 2.21).
    #[error("store path name {0:?} is reserved")]
    ReservedName(String),
    /// A fixed-output path other than `fixed:r:sha256` or `text:` cannot have references.
    #[error("content address {0} cannot have references")]
    ReferencesNotAllowed(String),
    /// Text paths are always sha256 and never self-referencing.
    #[error("text paths need a sha256 hash and no self reference, got {0}")]
    BadTextHash(String),
}

/// Checks a store path name (docs/serve-protocol.md §8.1, as Nix ≥ 2.21 does) and returns it as a
/// string.
pub fn validate_name(name: &[u8]) -> Result<String, StorePathError> {
    if name.is_empty() {
        return Err(StorePathError::EmptyName);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(StorePathError::NameTooLong(name.len()));
    }
    if let Some(pos) = name.iter().position(|&c| !is_name_char(c)) {
        return Err(StorePathError::InvalidNameChar {
            name: String::from_utf8_lossy(name).into_owned(),
            found: char::from(name[pos]),
            pos,
        });
    }
    // All ASCII from here on, so the lossy conversion is exact.
    let name = String::from_utf8_lossy(name).into_owned();
    if name == "." || name == ".." || name.starts_with(".-") || name.starts_with("..-") {
        return Err(StorePathError::ReservedName(name));
    }
    Ok(name)
}

fn is_name_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'+' | b'-' | b'.' | b'_' | b'?' | b'=')
}

impl StorePath {
    /// Parses `/nix/store/<hash>-<name>`.
    pub fn from_absolute_path(s: &[u8]) -> Result<StorePath, StorePathError> {
        s.strip_prefix(STORE_DIR.as_bytes())
            .and_then(|rest| rest.strip_prefix(b"/"))
            .ok_or_else(|| StorePathError::NotInStore(String::from_utf8_lossy(s).into_owned()))
            .and_then(StorePath::from_base_name)
    }

    /// Parses `<hash>-<name>`.
    pub fn from_base_name(s: &[u8]) -> Result<StorePath, StorePathError> {
        let lossy = || String::from_utf8_lossy(s).into_owned();
        if s.len() < HASH_PART_LEN + 2 {
            return Err(StorePathError::TooShort(lossy()));
        }
        let mut hash_part = [0u8; HASH_PART_LEN];
        hash_part.copy_from_slice(&s[..HASH_PART_LEN]);
        if let Some(pos) = hash_part
            .iter()
            .position(|c| !nixbase32::ALPHABET.contains(c))
        {
            return Err(StorePathError::InvalidHashChar {
                path: lossy(),
                found: char::from(s[pos]),
                pos,
            });
        }
        if s[HASH_PART_LEN] != b'-' {
            return Err(StorePathError::MissingDash(lossy()));
        }
        let name = validate_name(&s[HASH_PART_LEN + 1..])?;
        Ok(StorePath { hash_part, name })
    }

    /// A store path from its digest and name.
    pub fn from_digest(digest: [u8; 20], name: &str) -> Result<StorePath, StorePathError> {
        let name = validate_name(name.as_bytes())?;
        let mut hash_part = [0u8; HASH_PART_LEN];
        hash_part.copy_from_slice(nixbase32::encode(&digest).as_bytes());
        Ok(StorePath { hash_part, name })
    }

    /// The 20-byte digest.
    pub fn digest(&self) -> [u8; 20] {
        // The hash part was checked against the alphabet; only trailing bits can fail, and a
        // 32-character nix32 string has none (160 bits exactly).
        nixbase32::decode_fixed(&self.hash_part).unwrap_or([0; 20])
    }

    /// The 32 nix32 characters of the hash part.
    pub fn hash_part(&self) -> &str {
        // Always ASCII (checked on construction).
        std::str::from_utf8(&self.hash_part).unwrap_or_default()
    }

    /// The name after the hash part.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `<hash>-<name>`.
    pub fn base_name(&self) -> String {
        format!("{}-{}", self.hash_part(), self.name)
    }

    /// `/nix/store/<hash>-<name>`.
    pub fn to_absolute(&self) -> String {
        format!("{STORE_DIR}/{}-{}", self.hash_part(), self.name)
    }

    /// Whether the name ends in `.drv`.
    pub fn is_derivation(&self) -> bool {
        self.name.ends_with(".drv")
    }
}

impl fmt::Display for StorePath {
    /// The absolute path.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{STORE_DIR}/{}-{}", self.hash_part(), self.name)
    }
}

impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePath({self})")
    }
}

/// `makeStorePath`: the path for a fingerprint `<type>:<algo>:<hex>:/nix/store:<name>`.
pub fn make_store_path(
    path_type: &str,
    inner_sha256: &Hash,
    name: &str,
) -> Result<StorePath, StorePathError> {
    validate_name(name.as_bytes())?;
    let fingerprint = format!(
        "{path_type}:{}:{}:{STORE_DIR}:{name}",
        inner_sha256.algo(),
        inner_sha256.to_base16()
    );
    let h = Hash::compute(HashAlgo::Sha256, fingerprint.as_bytes());
    let mut digest = [0u8; 20];
    for (i, b) in h.digest().iter().enumerate() {
        digest[i % 20] ^= b;
    }
    StorePath::from_digest(digest, name)
}

/// Appends `:<ref>` for each reference, in order, and `:self` if asked.
fn type_with_references(
    base: &str,
    references: &BTreeSet<StorePath>,
    self_reference: bool,
) -> String {
    let mut ty = base.to_owned();
    for r in references {
        ty.push(':');
        ty.push_str(&r.to_absolute());
    }
    if self_reference {
        ty.push_str(":self");
    }
    ty
}

/// `makeTextPath`: a text file (`.drv`, `builtins.toFile`) with these references.
pub fn make_text_path(
    name: &str,
    contents_sha256: &Hash,
    references: &BTreeSet<StorePath>,
) -> Result<StorePath, StorePathError> {
    if contents_sha256.algo() != HashAlgo::Sha256 {
        return Err(StorePathError::BadTextHash(contents_sha256.to_string()));
    }
    make_store_path(
        &type_with_references("text", references, false),
        contents_sha256,
        name,
    )
}

/// `makeFixedOutputPath`: the path of content-addressed data (docs/serve-protocol.md §8.3).
///
/// `text:` addresses use the text rule, `fixed:r:sha256` the source rule (with references and
/// `self`), and everything else the `output:out` rule, which admits no references.
pub fn make_fixed_output_path(
    name: &str,
    ca: &ContentAddress,
    references: &BTreeSet<StorePath>,
    self_reference: bool,
) -> Result<StorePath, StorePathError> {
    match (ca.method, ca.hash.algo()) {
        (ContentAddressMethod::Text, _) => {
            if self_reference {
                return Err(StorePathError::BadTextHash(ca.to_string()));
            }
            make_text_path(name, &ca.hash, references)
        }
        (ContentAddressMethod::Recursive, HashAlgo::Sha256) => make_store_path(
            &type_with_references("source", references, self_reference),
            &ca.hash,
            name,
        ),
        (method, _) => {
            if !references.is_empty() || self_reference {
                return Err(StorePathError::ReferencesNotAllowed(ca.to_string()));
            }
            let inner = format!(
                "fixed:out:{}:{}:",
                method.render_with_algo(ca.hash.algo()),
                ca.hash.to_base16()
            );
            make_store_path(
                "output:out",
                &Hash::compute(HashAlgo::Sha256, inner.as_bytes()),
                name,
            )
        }
    }
}

/// Proptest strategies for store paths.
#[cfg(any(test, feature = "test"))]
pub mod strategies {
    use super::*;
    use proptest::prelude::*;

    /// A valid store path name (Nix ≥ 2.21 rules).
    pub fn name() -> impl Strategy<Value = String> {
        "[0-9A-Za-z+\\-._?=]{1,211}"
            .prop_filter("reserved name", |n| validate_name(n.as_bytes()).is_ok())
    }

    /// Any valid store path.
    pub fn store_path() -> impl Strategy<Value = StorePath> {
        (any::<[u8; 20]>(), name())
            .prop_map(|(d, n)| StorePath::from_digest(d, &n).expect("valid name"))
    }

    /// A valid `.drv` store path.
    pub fn drv_path() -> impl Strategy<Value = StorePath> {
        (
            any::<[u8; 20]>(),
            "[0-9A-Za-z+_?=][0-9A-Za-z+\\-._?=]{0,40}",
        )
            .prop_map(|(d, n)| StorePath::from_digest(d, &format!("{n}.drv")).expect("valid name"))
    }
}

#[cfg(test)]
mod tests {
    use super::strategies::*;
    use super::*;
    use proptest::prelude::*;

    fn sp(s: &str) -> StorePath {
        StorePath::from_absolute_path(s.as_bytes()).expect("valid path")
    }

    #[test]
    fn parses_and_prints() {
        let p = sp("/nix/store/vxjiwkjkn7x4079qvh1jkl5pn05j2aw0-foo");
        assert_eq!(p.hash_part(), "vxjiwkjkn7x4079qvh1jkl5pn05j2aw0");
        assert_eq!(p.name(), "foo");
        assert_eq!(p.base_name(), "vxjiwkjkn7x4079qvh1jkl5pn05j2aw0-foo");
        assert_eq!(
            p.to_string(),
            "/nix/store/vxjiwkjkn7x4079qvh1jkl5pn05j2aw0-foo"
        );
        assert_eq!(
            nixbase32::encode(&p.digest()),
            "vxjiwkjkn7x4079qvh1jkl5pn05j2aw0"
        );
        assert!(!p.is_derivation());
        assert!(sp("/nix/store/4wvvbi4jwn0prsdxb7vs673qa5h9gr7x-foo.drv").is_derivation());
    }

    #[test]
    fn text_path_golden() {
        // docs/serve-protocol.md §13.5: builtins.toFile "foo" "bar", then "baz" referring to it
        let foo = make_text_path(
            "foo",
            &Hash::compute(HashAlgo::Sha256, b"bar"),
            &BTreeSet::new(),
        )
        .expect("valid");
        assert_eq!(
            foo.to_string(),
            "/nix/store/vxjiwkjkn7x4079qvh1jkl5pn05j2aw0-foo"
        );
        assert_eq!(
            foo.digest().to_vec(),
            Hash::parse_any("sha1:802b210bb0b7d02903dc381d40fab1534e1e65df", None)
                .expect("hex")
                .digest()
        );
        let baz = make_text_path(
            "baz",
            &Hash::compute(HashAlgo::Sha256, foo.to_string().as_bytes()),
            &BTreeSet::from([foo]),
        )
        .expect("valid");
        assert_eq!(
            baz.to_string(),
            "/nix/store/5xd714cbfnkz02h2vbsj4fm03x3f15nf-baz"
        );
        // docs/serve-protocol.md §13.4: builtins.toFile "hello" "hello"
        let hello = make_text_path(
            "hello",
            &Hash::compute(HashAlgo::Sha256, b"hello"),
            &BTreeSet::new(),
        )
        .expect("valid");
        assert_eq!(
            hello.to_string(),
            "/nix/store/i4f75pn3bxkxdk2kld86k5qazq4cqj8i-hello"
        );
    }

    #[test]
    fn fixed_output_paths_golden() {
        let none = BTreeSet::new();
        let cases = [
            // docs/serve-protocol.md §13.4: the NAR of "hello" as source, and the flat file
            (
                ContentAddressMethod::Recursive,
                "sha256:0a430879c266f8b57f4092a0f935cf3facd48bbccde5760d4748ca405171e969",
                "hello",
                "/nix/store/yqi18hzk6wxzj2ksv7x9k8rnnzwirzz9-hello",
            ),
            (
                ContentAddressMethod::Flat,
                "sha256:094qif9n4cq4fdg459qzbhg1c6wywawwaaivx0k0x8xhbyx4vwic",
                "hello",
                "/nix/store/3fhdhfqli6qm669f7sz8d8v6xz24zrqc-hello",
            ),
            // docs/serve-protocol.md §13.5
            (
                ContentAddressMethod::Recursive,
                "sha256:08813cbee9903c62be4c5027726a418a300da4500b2d369d3af9286f4815ceba",
                "bar",
                "/nix/store/4q0pg5zpfmznxscq3avycvf9xdvx50n3-bar",
            ),
            (
                ContentAddressMethod::Recursive,
                "sha1:0beec7b5ea3f0fdbc95d0dd47f3c5bc275da8a33",
                "bar",
                "/nix/store/mp57d33657rf34lzvlbpfa1gjfv5gmpg-bar",
            ),
        ];
        for (method, hash, name, expected) in cases {
            let ca = ContentAddress {
                method,
                hash: Hash::parse_any(hash, None).expect("hash"),
            };
            let p = make_fixed_output_path(name, &ca, &none, false).expect("valid");
            assert_eq!(p.to_string(), expected, "{ca}");
        }
        let flat = ContentAddress {
            method: ContentAddressMethod::Flat,
            hash: Hash::compute(HashAlgo::Sha1, b""),
        };
        let refs = BTreeSet::from([sp("/nix/store/vxjiwkjkn7x4079qvh1jkl5pn05j2aw0-foo")]);
        assert!(matches!(
            make_fixed_output_path("x", &flat, &refs, false),
            Err(StorePathError::ReferencesNotAllowed(_))
        ));
    }

    #[test]
    fn rejects_bad_paths() {
        let h = "vxjiwkjkn7x4079qvh1jkl5pn05j2aw0";
        type Check = fn(&StorePathError) -> bool;
        let bad: &[(String, Check)] = &[
            (format!("/nix/stor/{h}-foo"), |e| {
                matches!(e, StorePathError::NotInStore(_))
            }),
            (format!("/nix/store/{h}-"), |e| {
                matches!(e, StorePathError::TooShort(_))
            }),
            (format!("/nix/store/{h}_foo"), |e| {
                matches!(e, StorePathError::MissingDash(_))
            }),
            (
                "/nix/store/exjiwkjkn7x4079qvh1jkl5pn05j2aw0-foo".into(),
                |e| {
                    matches!(
                        e,
                        StorePathError::InvalidHashChar {
                            pos: 0,
                            found: 'e',
                            ..
                        }
                    )
                },
            ),
            (format!("/nix/store/{h}-fo/o"), |e| {
                matches!(e, StorePathError::InvalidNameChar { pos: 2, .. })
            }),
            (format!("/nix/store/{h}-fo o"), |e| {
                matches!(e, StorePathError::InvalidNameChar { pos: 2, .. })
            }),
            (format!("/nix/store/{h}-{}", "a".repeat(212)), |e| {
                matches!(e, StorePathError::NameTooLong(212))
            }),
            (format!("/nix/store/{h}-."), |e| {
                matches!(e, StorePathError::ReservedName(_))
            }),
            (format!("/nix/store/{h}-.."), |e| {
                matches!(e, StorePathError::ReservedName(_))
            }),
            (format!("/nix/store/{h}-.-x"), |e| {
                matches!(e, StorePathError::ReservedName(_))
            }),
            (format!("/nix/store/{h}-..-x"), |e| {
                matches!(e, StorePathError::ReservedName(_))
            }),
        ];
        for (path, check) in bad {
            let err = StorePath::from_absolute_path(path.as_bytes()).expect_err(path);
            assert!(check(&err), "{path}: {err:?}");
        }
        for ok in [".x", "..x", "...", ".gitignore", "a-.-b", "?=+_"] {
            assert!(
                StorePath::from_absolute_path(format!("/nix/store/{h}-{ok}").as_bytes()).is_ok(),
                "{ok}"
            );
        }
        assert!(StorePath::from_absolute_path(
            format!("/nix/store/{h}-{}", "a".repeat(211)).as_bytes()
        )
        .is_ok());
    }

    proptest! {
        #[test]
        fn round_trip(p in store_path()) {
            let abs = p.to_absolute();
            prop_assert_eq!(StorePath::from_absolute_path(abs.as_bytes()), Ok(p.clone()));
            prop_assert_eq!(StorePath::from_base_name(p.base_name().as_bytes()), Ok(p.clone()));
            prop_assert_eq!(StorePath::from_digest(p.digest(), p.name()), Ok(p));
        }

        #[test]
        fn ord_is_absolute_path_byte_order(a in store_path(), b in store_path()) {
            prop_assert_eq!(a.cmp(&b), a.to_absolute().as_bytes().cmp(b.to_absolute().as_bytes()));
        }

        #[test]
        fn ord_with_shared_hash_part(d in any::<[u8; 20]>(), a in name(), b in name()) {
            let a = StorePath::from_digest(d, &a).expect("valid");
            let b = StorePath::from_digest(d, &b).expect("valid");
            prop_assert_eq!(a.cmp(&b), a.to_absolute().cmp(&b.to_absolute()));
        }

        #[test]
        fn parse_never_panics(s in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(p) = StorePath::from_base_name(&s) {
                let base = p.base_name();
                prop_assert_eq!(base.as_bytes(), &s[..]);
            }
        }

        #[test]
        fn parse_plausible_never_panics(s in "/nix/store/[0-9a-z]{32}-[ -~]{0,20}") {
            if let Ok(p) = StorePath::from_absolute_path(s.as_bytes()) {
                prop_assert_eq!(p.to_absolute(), s);
            }
        }
    }
}
