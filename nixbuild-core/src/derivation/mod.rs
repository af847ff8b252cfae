//! Derivations: the ATerm `.drv` format (docs/serve-protocol.md §9), the BasicDerivation sent over
//! the wire, `hashDerivationModulo` and output paths (docs/serve-protocol.md §8.4–8.7).

use std::collections::{BTreeMap, BTreeSet};

use crate::content_address::{ContentAddress, ContentAddressError, ContentAddressMethod};
use crate::hash::{Hash, HashAlgo, HashError};
use crate::store_path::{StorePath, StorePathError};

pub mod aterm;
pub mod options;
mod paths;
pub mod structured;

pub use aterm::AtermError;
pub use paths::{fallback_output_path, hash_placeholder, name_from_drv_path, output_path_name};

/// What a derivation declares for one output (docs/serve-protocol.md §5.1 table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DerivationOutput {
    /// Input-addressed: the path is fixed in advance.
    InputAddressed(StorePath),
    /// Fixed-output: the path and the content address the output must have.
    Fixed {
        /// The output path.
        path: StorePath,
        /// The expected content address.
        ca: ContentAddress,
    },
    /// Floating content-addressed (experimental `ca-derivations`).
    Floating {
        /// How the output will be hashed.
        method: ContentAddressMethod,
        /// With which algorithm.
        algo: HashAlgo,
    },
    /// Input-addressed, but the path depends on a floating CA input and is not known yet.
    Deferred,
    /// Impure (experimental `impure-derivations`).
    Impure {
        /// How the output will be hashed.
        method: ContentAddressMethod,
        /// With which algorithm.
        algo: HashAlgo,
    },
}

/// Why a derivation could not be parsed or checked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DerivationError {
    /// An output's path is not a valid store path.
    #[error("invalid path in derivation output: {0}")]
    OutputPath(#[source] StorePathError),
    /// An output's `hashAlgo` is invalid.
    #[error("invalid hashAlgo in derivation output: {0}")]
    OutputHashAlgo(#[source] ContentAddressError),
    /// An output's `hash` is invalid (it must be lowercase base16, as Nix writes it).
    #[error("invalid hash in derivation output: {0}")]
    OutputHash(#[source] HashError),
    /// An output name that cannot be part of a store path name (Nix puts it in the output
    /// path's name and in `drv!out` strings).
    #[error("invalid output name {name:?}: {source}")]
    OutputName {
        /// The name, lossily decoded.
        name: String,
        /// Why it is not a store path name.
        source: StorePathError,
    },
    /// An output's (path, hashAlgo, hash) triple fits none of the kinds of
    /// docs/serve-protocol.md §5.1.
    #[error("derivation output ({path:?}, {hash_algo:?}, {hash:?}) is of no known kind")]
    OutputFields {
        /// The path field.
        path: String,
        /// The hashAlgo field.
        hash_algo: String,
        /// The hash field.
        hash: String,
    },
    /// An output path could not be computed (e.g. the name is not a valid store path name).
    #[error("cannot compute the path of output {output:?}: {source}")]
    PathComputation {
        /// The output.
        output: String,
        /// What was wrong.
        source: StorePathError,
    },
    /// The `.drv` path could not be computed.
    #[error("cannot compute the .drv path: {0}")]
    DrvPath(#[source] StorePathError),
    /// A fixed output that is not the derivation's only output, named `out`.
    #[error("fixed output {0:?} must be the only output and be named \"out\"")]
    FixedOutputNotAlone(String),
    /// The resolver gave no hash for an input derivation.
    #[error("no hashDerivationModulo for input derivation {0}")]
    UnresolvedInput(StorePath),
    /// A declared output path differs from the computed one.
    #[error("output {output:?} is declared as {declared} but its path is {computed}")]
    OutputPathMismatch {
        /// The output.
        output: String,
        /// The path in the derivation.
        declared: String,
        /// The path Nix computes.
        computed: String,
    },
}

/// A field as text for an error message.
fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Checks an output name: it must be a valid store path name (`[0-9A-Za-z+-._?=]`, not
/// empty, not reserved), since it becomes part of the output path's name.
pub fn validate_output_name(name: &[u8]) -> Result<String, DerivationError> {
    crate::store_path::validate_name(name).map_err(|source| DerivationError::OutputName {
        name: lossy(name),
        source,
    })
}

impl DerivationOutput {
    /// From the (path, hashAlgo, hash) triple of an ATerm output or of the wire
    /// (docs/serve-protocol.md §5.1).
    ///
    /// The hash of a fixed output must be lowercase base16 (what Nix writes), so that
    /// [`DerivationOutput::to_fields`] gives back the same bytes.
    pub fn from_fields(
        path: &[u8],
        hash_algo: &[u8],
        hash: &[u8],
    ) -> Result<Self, DerivationError> {
        let method_algo = || {
            std::str::from_utf8(hash_algo)
                .map_err(|_| {
                    DerivationError::OutputHashAlgo(ContentAddressError::UnknownPrefix(lossy(
                        hash_algo,
                    )))
                })
                .and_then(|s| {
                    ContentAddressMethod::parse_with_algo(s)
                        .map_err(DerivationError::OutputHashAlgo)
                })
        };
        match (path.is_empty(), hash_algo.is_empty(), hash) {
            (false, true, b"") => Ok(DerivationOutput::InputAddressed(
                StorePath::from_absolute_path(path).map_err(DerivationError::OutputPath)?,
            )),
            (false, false, _) if !hash.is_empty() => {
                let path =
                    StorePath::from_absolute_path(path).map_err(DerivationError::OutputPath)?;
                let (method, algo) = method_algo()?;
                let hash = std::str::from_utf8(hash)
                    .map_err(|_| HashError::BadBase16 {
                        algo,
                        text: lossy(hash),
                    })
                    .and_then(|h| {
                        if h.len() == 2 * algo.digest_len() {
                            Hash::parse_encoded(algo, h)
                        } else {
                            Err(HashError::BadBase16 {
                                algo,
                                text: h.to_owned(),
                            })
                        }
                    })
                    .map_err(DerivationError::OutputHash)?;
                Ok(DerivationOutput::Fixed {
                    path,
                    ca: ContentAddress { method, hash },
                })
            }
            (true, false, b"") => {
                let (method, algo) = method_algo()?;
                Ok(DerivationOutput::Floating { method, algo })
            }
            (true, true, b"") => Ok(DerivationOutput::Deferred),
            (true, false, b"impure") => {
                let (method, algo) = method_algo()?;
                Ok(DerivationOutput::Impure { method, algo })
            }
            _ => Err(DerivationError::OutputFields {
                path: lossy(path),
                hash_algo: lossy(hash_algo),
                hash: lossy(hash),
            }),
        }
    }

    /// The (path, hashAlgo, hash) triple, exactly as Nix writes it.
    pub fn to_fields(&self) -> (String, String, String) {
        match self {
            DerivationOutput::InputAddressed(path) => {
                (path.to_absolute(), String::new(), String::new())
            }
            DerivationOutput::Fixed { path, ca } => (
                path.to_absolute(),
                ca.method.render_with_algo(ca.hash.algo()),
                ca.hash.to_base16(),
            ),
            DerivationOutput::Floating { method, algo } => {
                (String::new(), method.render_with_algo(*algo), String::new())
            }
            DerivationOutput::Deferred => (String::new(), String::new(), String::new()),
            DerivationOutput::Impure { method, algo } => (
                String::new(),
                method.render_with_algo(*algo),
                "impure".to_owned(),
            ),
        }
    }

    /// The output path, when it is known in advance (input-addressed and fixed outputs).
    pub fn path(&self) -> Option<&StorePath> {
        match self {
            DerivationOutput::InputAddressed(path) | DerivationOutput::Fixed { path, .. } => {
                Some(path)
            }
            _ => None,
        }
    }

    /// Whether this is a floating content-addressed output, whose path only the build
    /// decides.
    pub fn is_floating(&self) -> bool {
        matches!(self, DerivationOutput::Floating { .. })
    }
}

/// A derivation without `inputDrvs`: what BuildDerivation sends (docs/serve-protocol.md §5.1).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BasicDerivation {
    /// Outputs by name, ascending.
    pub outputs: BTreeMap<String, DerivationOutput>,
    /// Input sources (for BuildDerivation: the whole input closure).
    pub input_srcs: BTreeSet<StorePath>,
    /// The system, e.g. `x86_64-linux`.
    pub platform: Vec<u8>,
    /// The builder program.
    pub builder: Vec<u8>,
    /// The builder's arguments, in order.
    pub args: Vec<Vec<u8>>,
    /// The environment, ascending by key (bytewise).
    pub env: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// A full derivation as in a `.drv` file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Derivation {
    /// Input derivations and the outputs wanted from each.
    pub input_drvs: BTreeMap<StorePath, BTreeSet<String>>,
    /// Everything else.
    pub basic: BasicDerivation,
}

/// Proptest strategies for derivations.
#[cfg(any(test, feature = "test"))]
pub mod strategies {
    use super::*;
    use crate::content_address::strategies::content_address;
    use crate::hash::strategies::hash_algo;
    use crate::store_path::strategies::{drv_path, store_path};
    use proptest::collection::{btree_map, btree_set, vec};
    use proptest::prelude::*;

    fn method() -> impl Strategy<Value = ContentAddressMethod> {
        prop_oneof![
            Just(ContentAddressMethod::Flat),
            Just(ContentAddressMethod::Recursive),
        ]
    }

    /// Any derivation output (text methods only with sha256).
    pub fn derivation_output() -> impl Strategy<Value = DerivationOutput> {
        prop_oneof![
            store_path().prop_map(DerivationOutput::InputAddressed),
            (store_path(), content_address())
                .prop_map(|(path, ca)| DerivationOutput::Fixed { path, ca }),
            (method(), hash_algo())
                .prop_map(|(method, algo)| DerivationOutput::Floating { method, algo }),
            Just(DerivationOutput::Deferred),
            (method(), hash_algo())
                .prop_map(|(method, algo)| DerivationOutput::Impure { method, algo }),
        ]
    }

    /// An output name (Nix's output names are store path name characters).
    pub fn output_name() -> impl Strategy<Value = String> {
        "[a-z][a-zA-Z0-9_-]{0,10}"
    }

    /// Arbitrary bytes, biased towards the ones the ATerm printer escapes.
    pub fn bytes() -> impl Strategy<Value = Vec<u8>> {
        vec(
            prop_oneof![
                any::<u8>(),
                prop::sample::select(b"\"\\\n\r\t()[],".to_vec()),
            ],
            0..24,
        )
    }

    /// Any BasicDerivation whose ATerm Nix could write: `platform` is written unescaped, so it
    /// holds no `"` or `\`.
    pub fn basic_derivation() -> impl Strategy<Value = BasicDerivation> {
        (
            btree_map(output_name(), derivation_output(), 0..4),
            btree_set(store_path(), 0..4),
            vec(
                any::<u8>().prop_filter("unescaped", |&c| c != b'"' && c != b'\\'),
                0..16,
            ),
            bytes(),
            vec(bytes(), 0..4),
            btree_map(bytes(), bytes(), 0..6),
        )
            .prop_map(|(outputs, input_srcs, platform, builder, args, env)| {
                BasicDerivation {
                    outputs,
                    input_srcs,
                    platform,
                    builder,
                    args,
                    env,
                }
            })
    }

    /// Any derivation whose ATerm Nix could write.
    pub fn derivation() -> impl Strategy<Value = Derivation> {
        (
            btree_map(drv_path(), btree_set(output_name(), 1..3), 0..4),
            basic_derivation(),
        )
            .prop_map(|(input_drvs, basic)| Derivation { input_drvs, basic })
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod output_tests {
    use super::strategies::*;
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn output_fields_golden() {
        let p = "/nix/store/4q0pg5zpfmznxscq3avycvf9xdvx50n3-bar";
        let h = "08813cbee9903c62be4c5027726a418a300da4500b2d369d3af9286f4815ceba";
        let cases: [(&str, &str, &str); 5] = [
            (p, "", ""),
            (p, "r:sha256", h),
            ("", "r:sha256", ""),
            ("", "", ""),
            ("", "sha1", "impure"),
        ];
        for (path, algo, hash) in cases {
            let out =
                DerivationOutput::from_fields(path.as_bytes(), algo.as_bytes(), hash.as_bytes())
                    .expect("valid");
            assert_eq!(
                out.to_fields(),
                (path.to_owned(), algo.to_owned(), hash.to_owned())
            );
        }
        let nix32 = "1pqvrg0q9bkr57zf1iz2a7fgqr1lv4ak9yrfi3s68ryxvy9h1zym";
        assert!(matches!(
            DerivationOutput::from_fields(p.as_bytes(), b"r:sha256", nix32.as_bytes()),
            Err(DerivationError::OutputHash(_))
        ));
        assert!(matches!(
            DerivationOutput::from_fields(p.as_bytes(), b"", h.as_bytes()),
            Err(DerivationError::OutputFields { .. })
        ));
        assert!(matches!(
            DerivationOutput::from_fields(b"/tmp/x", b"", b""),
            Err(DerivationError::OutputPath(_))
        ));
    }

    proptest! {
        #[test]
        fn output_fields_round_trip(out in derivation_output()) {
            let (p, a, h) = out.to_fields();
            prop_assert_eq!(
                DerivationOutput::from_fields(p.as_bytes(), a.as_bytes(), h.as_bytes()),
                Ok(out)
            );
        }

        #[test]
        fn from_fields_never_panics(
            p in prop_oneof![Just(String::new()), "/nix/store/[0-9a-z]{32}-[a-z.]{1,5}", ".{0,20}"],
            a in prop_oneof![Just(String::new()), "(r:|text:)?(sha1|sha256|md5)", ".{0,10}"],
            h in prop_oneof![Just(String::new()), Just("impure".to_owned()), "[0-9a-f]{0,70}"],
        ) {
            if let Ok(out) = DerivationOutput::from_fields(p.as_bytes(), a.as_bytes(), h.as_bytes()) {
                prop_assert_eq!(out.to_fields(), (p, a, h));
            }
        }
    }
}
