//! The `<hash>.narinfo` file of a binary cache, and its `nix-cache-info`.

use std::collections::BTreeSet;
use std::fmt::{self, Write as _};

use crate::content_address::{ContentAddress, ContentAddressError};
use crate::hash::{Hash, HashAlgo, HashError};
use crate::store_path::{StorePath, StorePathError, STORE_DIR};

/// Why a narinfo or `nix-cache-info` could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NarInfoError {
    /// The file is not UTF-8.
    #[error("not UTF-8 text")]
    NotText,
    /// A line without `Key: value`.
    #[error("line {line}: not of the form 'Key: value'")]
    Syntax {
        /// 1-based line number.
        line: usize,
    },
    /// A field that must be present is not.
    #[error("no {0} field")]
    Missing(&'static str),
    /// A field given twice.
    #[error("line {line}: {key} given twice")]
    Duplicate {
        /// 1-based line number.
        line: usize,
        /// The field.
        key: &'static str,
    },
    /// A store path (StorePath, References, Deriver) that is not one.
    #[error("line {line}: {key}: {source}")]
    StorePath {
        /// 1-based line number.
        line: usize,
        /// The field.
        key: &'static str,
        /// What is wrong with it.
        source: StorePathError,
    },
    /// A hash (NarHash, FileHash) that is not one, or NarHash not sha256.
    #[error("line {line}: {key}: {source}")]
    Hash {
        /// 1-based line number.
        line: usize,
        /// The field.
        key: &'static str,
        /// What is wrong with it.
        source: HashError,
    },
    /// NarHash with another algorithm than sha256 (signatures and the store need sha256).
    #[error("line {line}: NarHash must be sha256, not {algo}")]
    NarHashAlgo {
        /// 1-based line number.
        line: usize,
        /// The algorithm given.
        algo: HashAlgo,
    },
    /// A size that is not a decimal number, or a NarSize of 0.
    #[error("line {line}: {key}: {value:?} is not a size")]
    Number {
        /// 1-based line number.
        line: usize,
        /// The field.
        key: &'static str,
        /// The value, cut to 40 characters.
        value: String,
    },
    /// A content address that is not one.
    #[error("line {line}: CA: {source}")]
    Ca {
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        source: ContentAddressError,
    },
    /// A URL other than a relative path inside the cache.
    #[error(
        "line {line}: URL {url:?} is not a relative path inside the cache (letters, digits, \
         '/', '.', '_', '+', '-'; no '..')"
    )]
    Url {
        /// 1-based line number.
        line: usize,
        /// The URL, cut to 80 characters.
        url: String,
    },
}

/// How a cache compressed a NAR (`Compression:`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Compression {
    /// `none`.
    None,
    /// `xz`, Nix's default.
    Xz,
    /// `zstd`.
    Zstd,
    /// `bzip2`, also what a narinfo without `Compression:` means.
    Bzip2,
    /// Anything else (`br`, `gzip`, `lz4`, …), kept as written.
    Other(String),
}

impl Compression {
    /// The method named `name`.
    pub fn parse(name: &str) -> Compression {
        match name {
            "none" => Compression::None,
            "xz" => Compression::Xz,
            "zstd" => Compression::Zstd,
            "bzip2" => Compression::Bzip2,
            other => Compression::Other(other.to_owned()),
        }
    }

    /// Its name as Nix writes it.
    pub fn name(&self) -> &str {
        match self {
            Compression::None => "none",
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
            Compression::Bzip2 => "bzip2",
            Compression::Other(name) => name,
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a binary cache says about one store path: where its NAR is and what the path is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarInfo {
    /// The store path described.
    pub store_path: StorePath,
    /// Where the (compressed) NAR is, relative to the cache's root.
    pub url: String,
    /// How that file is compressed.
    pub compression: Compression,
    /// The hash of the compressed file, when given.
    pub file_hash: Option<Hash>,
    /// The size of the compressed file, when given.
    pub file_size: Option<u64>,
    /// The sha256 of the NAR.
    pub nar_hash: Hash,
    /// The size of the NAR in bytes (never 0).
    pub nar_size: u64,
    /// The path's references.
    pub references: BTreeSet<StorePath>,
    /// The derivation that built it, when known.
    pub deriver: Option<StorePath>,
    /// The system it was built for, when given.
    pub system: Option<String>,
    /// Its signatures, `name:base64`.
    pub sigs: BTreeSet<String>,
    /// Its content address, when it has one.
    pub ca: Option<ContentAddress>,
}

/// Whether `url` is what Nix writes (`nar/<hash>.nar.xz`): a relative path of safe
/// characters that cannot leave the cache. Nix also follows absolute URLs; a narinfo's
/// URL is not covered by its signature, so this substituter never does.
fn safe_relative_url(url: &str) -> bool {
    !url.is_empty()
        && !url.starts_with('/')
        && url
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._+-".contains(&b))
        && url.split('/').all(|part| !part.is_empty() && part != "..")
}

/// The `Key: value` lines of `text`, numbered from 1, skipping empty lines.
fn fields(text: &[u8]) -> Result<Vec<(usize, &str, &str)>, NarInfoError> {
    let text = std::str::from_utf8(text).map_err(|_| NarInfoError::NotText)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.is_empty() {
            continue;
        }
        let (key, value) = line
            .split_once(':')
            .ok_or(NarInfoError::Syntax { line: i + 1 })?;
        out.push((i + 1, key, value.strip_prefix(' ').unwrap_or(value)));
    }
    Ok(out)
}

/// Sets `slot` once, refusing a second value of the same field.
fn set_once<T>(
    slot: &mut Option<T>,
    value: T,
    line: usize,
    key: &'static str,
) -> Result<(), NarInfoError> {
    if slot.is_some() {
        return Err(NarInfoError::Duplicate { line, key });
    }
    *slot = Some(value);
    Ok(())
}

fn number(line: usize, key: &'static str, value: &str) -> Result<u64, NarInfoError> {
    value
        .parse()
        .ok()
        .filter(|_| value.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| NarInfoError::Number {
            line,
            key,
            value: value.chars().take(40).collect(),
        })
}

fn hash(line: usize, key: &'static str, value: &str) -> Result<Hash, NarInfoError> {
    Hash::parse_any(value, None).map_err(|source| NarInfoError::Hash { line, key, source })
}

fn base_name(line: usize, key: &'static str, value: &str) -> Result<StorePath, NarInfoError> {
    StorePath::from_base_name(value.as_bytes()).map_err(|source| NarInfoError::StorePath {
        line,
        key,
        source,
    })
}

impl NarInfo {
    /// Reads a narinfo. Unknown fields are ignored (as Nix does); `StorePath`, `URL`,
    /// `NarHash` (sha256) and `NarSize` (not 0) are required; a missing `Compression` means
    /// bzip2. `Sig` may repeat; every other field appears at most once.
    pub fn parse(text: &[u8]) -> Result<NarInfo, NarInfoError> {
        let mut store_path = None;
        let mut url = None;
        let mut compression = None;
        let mut file_hash = None;
        let mut file_size = None;
        let mut nar_hash = None;
        let mut nar_size = None;
        let mut references = None;
        let mut deriver = None;
        let mut system = None;
        let mut sigs = BTreeSet::new();
        let mut ca = None;
        for (line, key, value) in fields(text)? {
            match key {
                "StorePath" => {
                    let path =
                        StorePath::from_absolute_path(value.as_bytes()).map_err(|source| {
                            NarInfoError::StorePath {
                                line,
                                key: "StorePath",
                                source,
                            }
                        })?;
                    set_once(&mut store_path, path, line, "StorePath")?;
                }
                "URL" => {
                    if !safe_relative_url(value) {
                        return Err(NarInfoError::Url {
                            line,
                            url: value.chars().take(80).collect(),
                        });
                    }
                    set_once(&mut url, value.to_owned(), line, "URL")?;
                }
                "Compression" => set_once(
                    &mut compression,
                    Compression::parse(value),
                    line,
                    "Compression",
                )?,
                "FileHash" => set_once(
                    &mut file_hash,
                    hash(line, "FileHash", value)?,
                    line,
                    "FileHash",
                )?,
                "FileSize" => set_once(
                    &mut file_size,
                    number(line, "FileSize", value)?,
                    line,
                    "FileSize",
                )?,
                "NarHash" => {
                    let h = hash(line, "NarHash", value)?;
                    if h.algo() != HashAlgo::Sha256 {
                        return Err(NarInfoError::NarHashAlgo {
                            line,
                            algo: h.algo(),
                        });
                    }
                    set_once(&mut nar_hash, h, line, "NarHash")?;
                }
                "NarSize" => {
                    let n = number(line, "NarSize", value)?;
                    if n == 0 {
                        return Err(NarInfoError::Number {
                            line,
                            key: "NarSize",
                            value: value.to_owned(),
                        });
                    }
                    set_once(&mut nar_size, n, line, "NarSize")?;
                }
                "References" => {
                    let refs = value
                        .split(' ')
                        .filter(|r| !r.is_empty())
                        .map(|r| base_name(line, "References", r))
                        .collect::<Result<BTreeSet<_>, _>>()?;
                    set_once(&mut references, refs, line, "References")?;
                }
                // Nix writes no Deriver line for an unknown deriver, but older caches have
                // `unknown-deriver`.
                "Deriver" if value == "unknown-deriver" => {}
                "Deriver" => {
                    let d = base_name(line, "Deriver", value)?;
                    set_once(&mut deriver, d, line, "Deriver")?;
                }
                "System" => set_once(&mut system, value.to_owned(), line, "System")?,
                "Sig" => {
                    sigs.insert(value.to_owned());
                }
                "CA" => {
                    let parsed = ContentAddress::parse(value)
                        .map_err(|source| NarInfoError::Ca { line, source })?;
                    set_once(&mut ca, parsed, line, "CA")?;
                }
                _ => {}
            }
        }
        Ok(NarInfo {
            store_path: store_path.ok_or(NarInfoError::Missing("StorePath"))?,
            url: url.ok_or(NarInfoError::Missing("URL"))?,
            compression: compression.unwrap_or(Compression::Bzip2),
            file_hash,
            file_size,
            nar_hash: nar_hash.ok_or(NarInfoError::Missing("NarHash"))?,
            nar_size: nar_size.ok_or(NarInfoError::Missing("NarSize"))?,
            references: references.unwrap_or_default(),
            deriver,
            system,
            sigs,
            ca,
        })
    }

    /// The narinfo as Nix writes it: the same fields in the same order.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        // Writing to a String cannot fail.
        let _ = writeln!(s, "StorePath: {}", self.store_path.to_absolute());
        let _ = writeln!(s, "URL: {}", self.url);
        let _ = writeln!(s, "Compression: {}", self.compression);
        if let Some(h) = &self.file_hash {
            let _ = writeln!(s, "FileHash: {h}");
        }
        if let Some(n) = self.file_size {
            let _ = writeln!(s, "FileSize: {n}");
        }
        let _ = writeln!(s, "NarHash: {}", self.nar_hash);
        let _ = writeln!(s, "NarSize: {}", self.nar_size);
        let refs: Vec<String> = self.references.iter().map(StorePath::base_name).collect();
        let _ = writeln!(s, "References: {}", refs.join(" "));
        if let Some(d) = &self.deriver {
            let _ = writeln!(s, "Deriver: {}", d.base_name());
        }
        if let Some(system) = &self.system {
            let _ = writeln!(s, "System: {system}");
        }
        for sig in &self.sigs {
            let _ = writeln!(s, "Sig: {sig}");
        }
        if let Some(ca) = &self.ca {
            let _ = writeln!(s, "CA: {ca}");
        }
        s
    }

    /// What a signature of this path signs (Nix's `ValidPathInfo::fingerprint`):
    /// `1;<path>;<NarHash>;<NarSize>;<references, comma-separated>`. The URL, compression
    /// and deriver are not covered.
    pub fn fingerprint(&self) -> String {
        let refs: Vec<String> = self.references.iter().map(StorePath::to_absolute).collect();
        format!(
            "1;{};{};{};{}",
            self.store_path.to_absolute(),
            self.nar_hash,
            self.nar_size,
            refs.join(",")
        )
    }
}

/// A cache's `nix-cache-info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheInfo {
    /// The store directory its paths belong to (`StoreDir`); only `/nix/store` is usable.
    pub store_dir: String,
    /// Whether it invites many queries at once (`WantMassQuery`).
    pub want_mass_query: bool,
    /// Its priority (`Priority`, lower is tried first), when given.
    pub priority: Option<u64>,
}

impl CacheInfo {
    /// Reads a `nix-cache-info`; `StoreDir` is required, unknown fields are ignored.
    pub fn parse(text: &[u8]) -> Result<CacheInfo, NarInfoError> {
        let mut store_dir = None;
        let mut want_mass_query = false;
        let mut priority = None;
        for (line, key, value) in fields(text)? {
            match key {
                "StoreDir" => set_once(&mut store_dir, value.to_owned(), line, "StoreDir")?,
                "WantMassQuery" => want_mass_query = value == "1",
                "Priority" => set_once(
                    &mut priority,
                    number(line, "Priority", value)?,
                    line,
                    "Priority",
                )?,
                _ => {}
            }
        }
        Ok(CacheInfo {
            store_dir: store_dir.ok_or(NarInfoError::Missing("StoreDir"))?,
            want_mass_query,
            priority,
        })
    }

    /// Whether its paths are this store's (`/nix/store`).
    pub fn same_store(&self) -> bool {
        self.store_dir.trim_end_matches('/') == STORE_DIR.trim_end_matches('/')
    }
}
