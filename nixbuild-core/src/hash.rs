//! Hashes as Nix uses them: algorithms, digests and their string forms (base16, nix32,
//! base64, SRI; docs/serve-protocol.md §6.5), and a streaming hasher.

use std::fmt;

use base64::Engine as _;
use sha2::Digest as _;

use crate::nixbase32;

/// A hash algorithm Nix knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HashAlgo {
    /// MD5, 16 bytes.
    Md5,
    /// SHA-1, 20 bytes.
    Sha1,
    /// SHA-256, 32 bytes.
    Sha256,
    /// SHA-512, 64 bytes.
    Sha512,
}

impl HashAlgo {
    /// All algorithms, in order.
    pub const ALL: [HashAlgo; 4] = [
        HashAlgo::Md5,
        HashAlgo::Sha1,
        HashAlgo::Sha256,
        HashAlgo::Sha512,
    ];

    /// The name Nix uses: `md5`, `sha1`, `sha256`, `sha512`.
    pub fn name(self) -> &'static str {
        match self {
            HashAlgo::Md5 => "md5",
            HashAlgo::Sha1 => "sha1",
            HashAlgo::Sha256 => "sha256",
            HashAlgo::Sha512 => "sha512",
        }
    }

    /// Parses an algorithm name (exactly as [`HashAlgo::name`] writes it).
    pub fn parse(s: &str) -> Result<Self, HashError> {
        HashAlgo::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| HashError::UnknownAlgo(s.to_owned()))
    }

    /// Length of a digest in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            HashAlgo::Md5 => 16,
            HashAlgo::Sha1 => 20,
            HashAlgo::Sha256 => 32,
            HashAlgo::Sha512 => 64,
        }
    }
}

impl fmt::Display for HashAlgo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A digest together with its algorithm. Stored inline, no allocation.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Hash {
    algo: HashAlgo,
    /// The digest in the first `algo.digest_len()` bytes, zeros after.
    bytes: [u8; 64],
}

/// Why a hash string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HashError {
    /// The algorithm name is not one Nix knows.
    #[error("unknown hash algorithm {0:?}")]
    UnknownAlgo(String),
    /// A digest of the wrong length for its algorithm.
    #[error("{algo} digest must be {expected} bytes, got {found}")]
    BadDigestLength {
        /// The algorithm.
        algo: HashAlgo,
        /// Its digest length.
        expected: usize,
        /// The length given.
        found: usize,
    },
    /// The string has no `algo:` or `algo-` prefix and no default algorithm was given.
    #[error("hash {0:?} has no algorithm prefix")]
    MissingAlgo(String),
    /// The encoded digest has a length that fits none of base16, nix32, base64.
    #[error("{algo} hash {text:?} has length {len}, which is not base16, nix32 or base64")]
    BadEncodedLength {
        /// The algorithm.
        algo: HashAlgo,
        /// The encoded digest.
        text: String,
        /// Its length.
        len: usize,
    },
    /// Invalid base16 digest.
    #[error("invalid base16 in {algo} hash {text:?}")]
    BadBase16 {
        /// The algorithm.
        algo: HashAlgo,
        /// The encoded digest.
        text: String,
    },
    /// Invalid nix32 digest.
    #[error("invalid nix32 in {algo} hash {text:?}: {source}")]
    BadNix32 {
        /// The algorithm.
        algo: HashAlgo,
        /// The encoded digest.
        text: String,
        /// What was wrong.
        source: nixbase32::Nixbase32Error,
    },
    /// Invalid base64 digest.
    #[error("invalid base64 in {algo} hash {text:?}")]
    BadBase64 {
        /// The algorithm.
        algo: HashAlgo,
        /// The encoded digest.
        text: String,
    },
}

impl Hash {
    /// A hash from an algorithm and a digest of the right length.
    pub fn new(algo: HashAlgo, digest: &[u8]) -> Result<Hash, HashError> {
        if digest.len() != algo.digest_len() {
            return Err(HashError::BadDigestLength {
                algo,
                expected: algo.digest_len(),
                found: digest.len(),
            });
        }
        let mut bytes = [0u8; 64];
        bytes[..digest.len()].copy_from_slice(digest);
        Ok(Hash { algo, bytes })
    }

    /// Hashes `data` in one go.
    pub fn compute(algo: HashAlgo, data: &[u8]) -> Hash {
        let mut h = Hasher::new(algo);
        h.update(data);
        h.finish()
    }

    /// The algorithm.
    pub fn algo(&self) -> HashAlgo {
        self.algo
    }

    /// The digest bytes.
    pub fn digest(&self) -> &[u8] {
        &self.bytes[..self.algo.digest_len()]
    }

    /// Parses `algo:<base16|nix32|base64>`, SRI `algo-<base64>`, or, when `default_algo` is
    /// given, an unprefixed digest in any of the three encodings (told apart by length).
    pub fn parse_any(s: &str, default_algo: Option<HashAlgo>) -> Result<Hash, HashError> {
        if let Some((algo, rest)) = s.split_once(':') {
            return Hash::parse_encoded(HashAlgo::parse(algo)?, rest);
        }
        if let Some((algo, rest)) = s.split_once('-') {
            let algo = HashAlgo::parse(algo)?;
            return Hash::parse_base64(algo, rest);
        }
        match default_algo {
            Some(algo) => Hash::parse_encoded(algo, s),
            None => Err(HashError::MissingAlgo(s.to_owned())),
        }
    }

    /// Parses an unprefixed digest of `algo` in base16, nix32 or base64, told apart by length.
    pub fn parse_encoded(algo: HashAlgo, s: &str) -> Result<Hash, HashError> {
        let n = algo.digest_len();
        let len = s.len();
        if len == 2 * n {
            Hash::parse_base16(algo, s)
        } else if len == nixbase32::encoded_len(n) {
            let mut bytes = [0u8; 64];
            let digest = nixbase32::decode(s.as_bytes()).map_err(|source| HashError::BadNix32 {
                algo,
                text: s.to_owned(),
                source,
            })?;
            bytes[..n].copy_from_slice(&digest);
            Ok(Hash { algo, bytes })
        } else if len == base64_len(n) {
            Hash::parse_base64(algo, s)
        } else {
            Err(HashError::BadEncodedLength {
                algo,
                text: s.to_owned(),
                len,
            })
        }
    }

    fn parse_base16(algo: HashAlgo, s: &str) -> Result<Hash, HashError> {
        let bad = || HashError::BadBase16 {
            algo,
            text: s.to_owned(),
        };
        if s.len() != 2 * algo.digest_len() {
            return Err(bad());
        }
        let mut bytes = [0u8; 64];
        for (out, pair) in bytes.iter_mut().zip(s.as_bytes().chunks_exact(2)) {
            let hi = hex_digit(pair[0]).ok_or_else(bad)?;
            let lo = hex_digit(pair[1]).ok_or_else(bad)?;
            *out = hi << 4 | lo;
        }
        Ok(Hash { algo, bytes })
    }

    fn parse_base64(algo: HashAlgo, s: &str) -> Result<Hash, HashError> {
        let bad = || HashError::BadBase64 {
            algo,
            text: s.to_owned(),
        };
        if s.len() != base64_len(algo.digest_len()) {
            return Err(bad());
        }
        let mut bytes = [0u8; 66];
        let n = base64::engine::general_purpose::STANDARD
            .decode_slice(s, &mut bytes)
            .map_err(|_| bad())?;
        if n != algo.digest_len() {
            return Err(bad());
        }
        Hash::new(algo, &bytes[..n])
    }

    /// Lowercase base16 digest, without prefix.
    pub fn to_base16(&self) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(2 * self.digest().len());
        for &b in self.digest() {
            s.push(HEX[usize::from(b >> 4)] as char);
            s.push(HEX[usize::from(b & 15)] as char);
        }
        s
    }

    /// nix32 digest, without prefix.
    pub fn to_nix32(&self) -> String {
        nixbase32::encode(self.digest())
    }

    /// Standard padded base64 digest, without prefix.
    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.digest())
    }

    /// SRI form `algo-<base64>`.
    pub fn to_sri(&self) -> String {
        format!("{}-{}", self.algo, self.to_base64())
    }
}

/// Length of padded base64 for `n` bytes.
fn base64_len(n: usize) -> usize {
    n.div_ceil(3) * 4
}

/// Value of a lowercase base16 digit (Nix writes lowercase; its parser accepts only that).
fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

impl fmt::Display for Hash {
    /// `algo:<nix32>`, the form of `narHash` and `ca`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algo, self.to_nix32())
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({}:{})", self.algo, self.to_base16())
    }
}

/// A streaming hasher for any [`HashAlgo`].
#[derive(Clone)]
pub struct Hasher(HasherState);

#[derive(Clone)]
enum HasherState {
    Md5(md5::Md5),
    Sha1(sha1::Sha1),
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl Hasher {
    /// A fresh hasher for `algo`.
    pub fn new(algo: HashAlgo) -> Hasher {
        Hasher(match algo {
            HashAlgo::Md5 => HasherState::Md5(md5::Md5::new()),
            HashAlgo::Sha1 => HasherState::Sha1(sha1::Sha1::new()),
            HashAlgo::Sha256 => HasherState::Sha256(sha2::Sha256::new()),
            HashAlgo::Sha512 => HasherState::Sha512(sha2::Sha512::new()),
        })
    }

    /// The algorithm this hasher computes.
    pub fn algo(&self) -> HashAlgo {
        match self.0 {
            HasherState::Md5(_) => HashAlgo::Md5,
            HasherState::Sha1(_) => HashAlgo::Sha1,
            HasherState::Sha256(_) => HashAlgo::Sha256,
            HasherState::Sha512(_) => HashAlgo::Sha512,
        }
    }

    /// Feeds more bytes.
    pub fn update(&mut self, data: &[u8]) {
        match &mut self.0 {
            HasherState::Md5(h) => h.update(data),
            HasherState::Sha1(h) => h.update(data),
            HasherState::Sha256(h) => h.update(data),
            HasherState::Sha512(h) => h.update(data),
        }
    }

    /// The hash of everything fed so far.
    pub fn finish(self) -> Hash {
        let algo = self.algo();
        let mut bytes = [0u8; 64];
        let n = algo.digest_len();
        match self.0 {
            HasherState::Md5(h) => bytes[..n].copy_from_slice(&h.finalize()),
            HasherState::Sha1(h) => bytes[..n].copy_from_slice(&h.finalize()),
            HasherState::Sha256(h) => bytes[..n].copy_from_slice(&h.finalize()),
            HasherState::Sha512(h) => bytes[..n].copy_from_slice(&h.finalize()),
        }
        Hash { algo, bytes }
    }
}

impl fmt::Debug for Hasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Hasher").field(&self.algo()).finish()
    }
}

/// Proptest strategies for hashes.
#[cfg(any(test, feature = "test"))]
pub mod strategies {
    use super::*;
    use proptest::prelude::*;

    /// Any algorithm.
    pub fn hash_algo() -> impl Strategy<Value = HashAlgo> {
        prop::sample::select(HashAlgo::ALL.to_vec())
    }

    /// A hash of the given algorithm with an arbitrary digest.
    pub fn hash_of(algo: HashAlgo) -> impl Strategy<Value = Hash> {
        any::<[u8; 64]>().prop_map(move |bytes| {
            Hash::new(algo, &bytes[..algo.digest_len()]).expect("digest_len bytes")
        })
    }

    /// A hash of any algorithm with an arbitrary digest.
    pub fn hash() -> impl Strategy<Value = Hash> {
        hash_algo().prop_flat_map(hash_of)
    }
}

#[cfg(test)]
mod tests {
    use super::strategies::*;
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn golden_empty_and_abc() {
        // docs/serve-protocol.md §13.5
        let cases = [
            (
                HashAlgo::Sha256,
                &b""[..],
                "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73",
            ),
            (
                HashAlgo::Sha256,
                b"abc",
                "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s",
            ),
            (HashAlgo::Md5, b"", "3y8bwfr609h3lh9ch0izcqq7fl"),
            (HashAlgo::Sha1, b"", "143xibwh31h9bvxzalr0sjvbbvpa6ffs"),
        ];
        for (algo, data, nix32) in cases {
            let h = Hash::compute(algo, data);
            assert_eq!(h.to_nix32(), nix32);
            assert_eq!(h.to_string(), format!("{algo}:{nix32}"));
            assert_eq!(Hash::parse_any(&h.to_string(), None), Ok(h));
        }
        let h = Hash::compute(HashAlgo::Sha256, b"");
        assert_eq!(
            h.to_base16(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            h.to_sri(),
            "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
        );
        for s in [
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "sha256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=",
            "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=",
        ] {
            assert_eq!(Hash::parse_any(s, None), Ok(h), "{s}");
        }
        assert_eq!(
            Hash::parse_any(
                "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73",
                Some(HashAlgo::Sha256)
            ),
            Ok(h)
        );
    }

    #[test]
    fn streaming_equals_one_shot() {
        let mut hasher = Hasher::new(HashAlgo::Sha512);
        hasher.update(b"ab");
        hasher.update(b"c");
        assert_eq!(hasher.finish(), Hash::compute(HashAlgo::Sha512, b"abc"));
    }

    #[test]
    fn rejects_bad_strings() {
        assert!(matches!(
            Hash::parse_any("sha256:", None),
            Err(HashError::BadEncodedLength { len: 0, .. })
        ));
        assert!(matches!(
            Hash::parse_any("sha3:00", None),
            Err(HashError::UnknownAlgo(_))
        ));
        assert!(matches!(
            Hash::parse_any("abcd", None),
            Err(HashError::MissingAlgo(_))
        ));
        let upper = "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855";
        assert!(matches!(
            Hash::parse_any(upper, None),
            Err(HashError::BadBase16 { .. })
        ));
        assert!(matches!(
            Hash::new(HashAlgo::Md5, &[0; 20]),
            Err(HashError::BadDigestLength { found: 20, .. })
        ));
    }

    proptest! {
        #[test]
        fn string_forms_round_trip(h in hash()) {
            let algo = h.algo();
            prop_assert_eq!(Hash::parse_any(&h.to_string(), None), Ok(h));
            prop_assert_eq!(Hash::parse_any(&h.to_sri(), None), Ok(h));
            for enc in [h.to_base16(), h.to_nix32(), h.to_base64()] {
                prop_assert_eq!(Hash::parse_any(&format!("{algo}:{enc}"), None), Ok(h));
                prop_assert_eq!(Hash::parse_any(&enc, Some(algo)), Ok(h));
            }
        }

        #[test]
        fn parse_never_panics(s in ".{0,140}", algo in proptest::option::of(hash_algo())) {
            if let Ok(h) = Hash::parse_any(&s, algo) {
                prop_assert_eq!(Hash::parse_any(&h.to_string(), None), Ok(h));
            }
        }
    }
}
