//! The ATerm text of `.drv` files (docs/serve-protocol.md §9): a parser over bytes and the printer
//! Nix uses.
//!
//! The parser accepts exactly what the printer writes, so that parse → print gives back the
//! same bytes. Beyond the grammar it therefore rejects, with [`AtermError`]:
//! - lists that are not strictly ascending (outputs by name, input derivations by path, their
//!   output names, input sources, environment by key): unsorted or duplicate entries;
//! - escapes in fields Nix writes unescaped (output names and fields, paths, `platform`);
//! - in escaped fields (`builder`, `args`, env keys and values), escapes other than `\"`, `\\`,
//!   `\n`, `\r`, `\t`, and raw newline, carriage-return or tab bytes (Nix would write them as
//!   escapes);
//! - anything after the closing `)`.
//!
//! The grammar has a fixed depth and the parser does not recurse; everything it allocates is
//! bounded by the input length.

use std::collections::{BTreeMap, BTreeSet};

use super::{BasicDerivation, Derivation, DerivationError, DerivationOutput};
use crate::store_path::{StorePath, StorePathError};

/// Why an ATerm text was rejected. Positions are byte offsets into the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AtermError {
    /// A byte other than the one the grammar allows here.
    #[error("expected {expected} at byte {pos}, found {found:?}")]
    UnexpectedChar {
        /// What the grammar allows here.
        expected: &'static str,
        /// The byte found, as a char (bytes ≥ 0x80 map to U+0080..U+00FF).
        found: char,
        /// Its position.
        pos: usize,
    },
    /// The input ended early.
    #[error("unexpected end of input at byte {pos}, expected {expected}")]
    UnexpectedEof {
        /// What the grammar expected next.
        expected: &'static str,
        /// The input length.
        pos: usize,
    },
    /// Bytes after the closing `)`.
    #[error("trailing data at byte {pos}")]
    TrailingData {
        /// Where the trailing data starts.
        pos: usize,
    },
    /// An escape in a field Nix writes without escaping.
    #[error("escape in {field} at byte {pos}; Nix writes this field unescaped")]
    EscapeInRawField {
        /// Which field.
        field: &'static str,
        /// Position of the backslash.
        pos: usize,
    },
    /// An escape or raw control byte that Nix's printer would not write.
    #[error("non-canonical escape or raw control byte in {field} at byte {pos}")]
    NonCanonicalEscape {
        /// Which field.
        field: &'static str,
        /// Its position.
        pos: usize,
    },
    /// A list entry that is not strictly after the previous one.
    #[error("{what} at byte {pos} is out of order or duplicated")]
    NotCanonicalOrder {
        /// Which list.
        what: &'static str,
        /// Position of the entry.
        pos: usize,
    },
    /// A name that must be UTF-8 is not.
    #[error("{field} at byte {pos} is not UTF-8")]
    NotUtf8 {
        /// Which field.
        field: &'static str,
        /// Its position.
        pos: usize,
    },
    /// A path that is not a valid store path.
    #[error("invalid store path in {field} at byte {pos}: {source}")]
    StorePath {
        /// Which field.
        field: &'static str,
        /// Its position.
        pos: usize,
        /// What was wrong.
        source: StorePathError,
    },
    /// An output whose fields fit no kind of output.
    #[error("invalid output {name:?} at byte {pos}: {source}")]
    Output {
        /// The output name.
        name: String,
        /// Position of the output.
        pos: usize,
        /// What was wrong.
        source: Box<DerivationError>,
    },
}

/// Parses the ATerm text of a `.drv` file.
pub fn parse(input: &[u8]) -> Result<Derivation, AtermError> {
    let mut p = Parser { input, pos: 0 };
    p.expect(b"Derive(", "\"Derive(\"")?;

    let mut outputs = BTreeMap::new();
    p.list(|p| {
        let pos = p.pos;
        p.expect(b"(", "'('")?;
        let name = p.utf8_raw_string("output name")?;
        p.expect(b",", "','")?;
        let path = p.raw_string("output path")?;
        p.expect(b",", "','")?;
        let hash_algo = p.raw_string("output hashAlgo")?;
        p.expect(b",", "','")?;
        let hash = p.raw_string("output hash")?;
        p.expect(b")", "')'")?;
        let output = DerivationOutput::from_fields(path, hash_algo, hash).map_err(|source| {
            AtermError::Output {
                name: name.clone(),
                pos,
                source: Box::new(source),
            }
        })?;
        insert_ascending(&mut outputs, name, output, "output", pos)
    })?;
    p.expect(b",", "','")?;

    let mut input_drvs = BTreeMap::new();
    p.list(|p| {
        let pos = p.pos;
        p.expect(b"(", "'('")?;
        let path = p.store_path("input derivation")?;
        p.expect(b",", "','")?;
        let mut names = BTreeSet::new();
        p.list(|p| {
            let pos = p.pos;
            let name = p.utf8_raw_string("input derivation output name")?;
            insert_ascending_set(&mut names, name, "input derivation output name", pos)
        })?;
        p.expect(b")", "')'")?;
        insert_ascending(&mut input_drvs, path, names, "input derivation", pos)
    })?;
    p.expect(b",", "','")?;

    let mut input_srcs = BTreeSet::new();
    p.list(|p| {
        let pos = p.pos;
        let path = p.store_path("input source")?;
        insert_ascending_set(&mut input_srcs, path, "input source", pos)
    })?;
    p.expect(b",", "','")?;
    let platform = p.raw_string("platform")?.to_vec();
    p.expect(b",", "','")?;
    let builder = p.escaped_string("builder")?;
    p.expect(b",", "','")?;
    let mut args = Vec::new();
    p.list(|p| {
        args.push(p.escaped_string("argument")?);
        Ok(())
    })?;
    p.expect(b",", "','")?;
    let mut env = BTreeMap::new();
    p.list(|p| {
        let pos = p.pos;
        p.expect(b"(", "'('")?;
        let key = p.escaped_string("environment key")?;
        p.expect(b",", "','")?;
        let value = p.escaped_string("environment value")?;
        p.expect(b")", "')'")?;
        insert_ascending(&mut env, key, value, "environment variable", pos)
    })?;
    p.expect(b")", "')'")?;
    if p.pos != input.len() {
        return Err(AtermError::TrailingData { pos: p.pos });
    }
    Ok(Derivation {
        input_drvs,
        basic: BasicDerivation {
            outputs,
            input_srcs,
            platform,
            builder,
            args,
            env,
        },
    })
}

/// Inserts into a map whose keys must arrive strictly ascending.
fn insert_ascending<K: Ord, V>(
    map: &mut BTreeMap<K, V>,
    key: K,
    value: V,
    what: &'static str,
    pos: usize,
) -> Result<(), AtermError> {
    if map.last_key_value().is_some_and(|(last, _)| *last >= key) {
        return Err(AtermError::NotCanonicalOrder { what, pos });
    }
    map.insert(key, value);
    Ok(())
}

/// Inserts into a set whose elements must arrive strictly ascending.
fn insert_ascending_set<T: Ord>(
    set: &mut BTreeSet<T>,
    value: T,
    what: &'static str,
    pos: usize,
) -> Result<(), AtermError> {
    if set.last().is_some_and(|last| *last >= value) {
        return Err(AtermError::NotCanonicalOrder { what, pos });
    }
    set.insert(value);
    Ok(())
}

struct Parser<'a> {
    input: &'a [u8],
    pos: usize,
}

impl<'a> Parser<'a> {
    fn error(&self, expected: &'static str) -> AtermError {
        match self.input.get(self.pos) {
            Some(&c) => AtermError::UnexpectedChar {
                expected,
                found: char::from(c),
                pos: self.pos,
            },
            None => AtermError::UnexpectedEof {
                expected,
                pos: self.pos,
            },
        }
    }

    fn expect(&mut self, token: &[u8], expected: &'static str) -> Result<(), AtermError> {
        for &b in token {
            if self.input.get(self.pos) != Some(&b) {
                return Err(self.error(expected));
            }
            self.pos += 1;
        }
        Ok(())
    }

    /// `[` elem (`,` elem)* `]`, or `[]`.
    fn list(
        &mut self,
        mut elem: impl FnMut(&mut Self) -> Result<(), AtermError>,
    ) -> Result<(), AtermError> {
        self.expect(b"[", "'['")?;
        if self.input.get(self.pos) == Some(&b']') {
            self.pos += 1;
            return Ok(());
        }
        loop {
            elem(self)?;
            match self.input.get(self.pos) {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(());
                }
                _ => return Err(self.error("',' or ']'")),
            }
        }
    }

    /// A string Nix writes without escaping: any bytes but `"` and `\`.
    fn raw_string(&mut self, field: &'static str) -> Result<&'a [u8], AtermError> {
        self.expect(b"\"", "'\"'")?;
        let start = self.pos;
        let rest = &self.input[start..];
        match memchr::memchr2(b'"', b'\\', rest) {
            Some(n) if rest[n] == b'"' => {
                self.pos = start + n + 1;
                Ok(&rest[..n])
            }
            Some(n) => Err(AtermError::EscapeInRawField {
                field,
                pos: start + n,
            }),
            None => Err(AtermError::UnexpectedEof {
                expected: "'\"'",
                pos: self.input.len(),
            }),
        }
    }

    fn utf8_raw_string(&mut self, field: &'static str) -> Result<String, AtermError> {
        let pos = self.pos;
        let s = self.raw_string(field)?;
        String::from_utf8(s.to_vec()).map_err(|_| AtermError::NotUtf8 { field, pos })
    }

    fn store_path(&mut self, field: &'static str) -> Result<StorePath, AtermError> {
        let pos = self.pos;
        let s = self.raw_string(field)?;
        StorePath::from_absolute_path(s).map_err(|source| AtermError::StorePath {
            field,
            pos,
            source,
        })
    }

    /// A string written by Nix's escaping printer, in its canonical form only.
    fn escaped_string(&mut self, field: &'static str) -> Result<Vec<u8>, AtermError> {
        self.expect(b"\"", "'\"'")?;
        let mut out = Vec::new();
        loop {
            let rest = &self.input[self.pos..];
            let Some(n) = rest
                .iter()
                .position(|&c| matches!(c, b'"' | b'\\' | b'\n' | b'\r' | b'\t'))
            else {
                return Err(AtermError::UnexpectedEof {
                    expected: "'\"'",
                    pos: self.input.len(),
                });
            };
            out.extend_from_slice(&rest[..n]);
            self.pos += n;
            match rest[n] {
                b'"' => {
                    self.pos += 1;
                    return Ok(out);
                }
                b'\\' => {
                    let unescaped = match rest.get(n + 1) {
                        Some(b'n') => b'\n',
                        Some(b'r') => b'\r',
                        Some(b't') => b'\t',
                        Some(&c @ (b'"' | b'\\')) => c,
                        Some(_) => {
                            return Err(AtermError::NonCanonicalEscape {
                                field,
                                pos: self.pos,
                            })
                        }
                        None => {
                            return Err(AtermError::UnexpectedEof {
                                expected: "an escaped character",
                                pos: self.input.len(),
                            })
                        }
                    };
                    out.push(unescaped);
                    self.pos += 2;
                }
                _ => {
                    return Err(AtermError::NonCanonicalEscape {
                        field,
                        pos: self.pos,
                    })
                }
            }
        }
    }
}

/// Prints a derivation exactly as Nix writes its `.drv` file.
pub fn print(drv: &Derivation) -> Vec<u8> {
    let mut out = Vec::with_capacity(estimate_len(&drv.basic));
    let input_drvs = drv
        .input_drvs
        .iter()
        .map(|(path, outputs)| (path.to_absolute(), outputs));
    write(&mut out, &drv.basic, input_drvs, false);
    out
}

/// Prints a derivation that has no input derivations (a [`BasicDerivation`], as
/// BuildDerivation carries it) in the same form, nothing masked: every field that determines
/// what a build of it produces, output paths and the environment variables named after the
/// outputs included.
pub fn print_basic(basic: &BasicDerivation) -> Vec<u8> {
    let mut out = Vec::with_capacity(estimate_len(basic));
    write(
        &mut out,
        basic,
        std::iter::empty::<(&[u8], &BTreeSet<String>)>(),
        false,
    );
    out
}

/// A rough size of the printed derivation, to allocate once.
fn estimate_len(basic: &BasicDerivation) -> usize {
    let env: usize = basic.env.iter().map(|(k, v)| k.len() + v.len() + 8).sum();
    let args: usize = basic.args.iter().map(|a| a.len() + 3).sum();
    64 + basic.outputs.len() * 100 + basic.input_srcs.len() * 80 + env + args
}

/// Writes the ATerm of `basic` with the given input derivations (paths, or hashes when
/// computing `hashDerivationModulo`). With `mask_outputs`, output paths and the env values
/// named after outputs are written empty (docs/serve-protocol.md §8.6).
pub(crate) fn write<'a, K: AsRef<[u8]>>(
    out: &mut Vec<u8>,
    basic: &BasicDerivation,
    input_drvs: impl IntoIterator<Item = (K, &'a BTreeSet<String>)>,
    mask_outputs: bool,
) {
    out.extend_from_slice(b"Derive([");
    for (i, (name, output)) in basic.outputs.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let (path, algo, hash) = output.to_fields();
        out.push(b'(');
        raw(out, name.as_bytes());
        out.push(b',');
        raw(out, if mask_outputs { b"" } else { path.as_bytes() });
        out.push(b',');
        raw(out, algo.as_bytes());
        out.push(b',');
        raw(out, hash.as_bytes());
        out.push(b')');
    }
    out.extend_from_slice(b"],[");
    for (i, (path, names)) in input_drvs.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.push(b'(');
        raw(out, path.as_ref());
        out.extend_from_slice(b",[");
        for (j, name) in names.iter().enumerate() {
            if j > 0 {
                out.push(b',');
            }
            raw(out, name.as_bytes());
        }
        out.extend_from_slice(b"])");
    }
    out.extend_from_slice(b"],[");
    for (i, path) in basic.input_srcs.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        raw(out, path.to_absolute().as_bytes());
    }
    out.extend_from_slice(b"],");
    raw(out, &basic.platform);
    out.push(b',');
    escaped(out, &basic.builder);
    out.extend_from_slice(b",[");
    for (i, arg) in basic.args.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        escaped(out, arg);
    }
    out.extend_from_slice(b"],[");
    for (i, (key, value)) in basic.env.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.push(b'(');
        escaped(out, key);
        out.push(b',');
        let masked =
            mask_outputs && std::str::from_utf8(key).is_ok_and(|k| basic.outputs.contains_key(k));
        escaped(out, if masked { b"" } else { value });
        out.push(b')');
    }
    out.extend_from_slice(b"])");
}

fn raw(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'"');
    out.extend_from_slice(s);
    out.push(b'"');
}

fn escaped(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'"');
    let mut rest = s;
    while let Some(n) = rest
        .iter()
        .position(|&c| matches!(c, b'"' | b'\\' | b'\n' | b'\r' | b'\t'))
    {
        out.extend_from_slice(&rest[..n]);
        out.extend_from_slice(match rest[n] {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            _ => b"\\t",
        });
        rest = &rest[n + 1..];
    }
    out.extend_from_slice(rest);
    out.push(b'"');
}
