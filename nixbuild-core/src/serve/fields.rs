//! Reading and writing the value types every serve message shares: store paths, optional
//! store paths, path sets, hashes and content addresses.

use std::collections::BTreeSet;

use bytes::BufMut;

use super::{ReadResult, ServeError};
use crate::content_address::ContentAddress;
use crate::hash::{Hash, HashAlgo};
use crate::store_path::StorePath;
use crate::wire::{self, BufMutExt, Reader};

/// Reads an absolute store path.
pub(crate) fn store_path(
    r: &mut Reader<'_>,
    field: &'static str,
    limits: &wire::Limits,
) -> ReadResult<StorePath> {
    let offset = r.position();
    let s = r.bytes(field, limits.max_short_string_len)?;
    parse_store_path(s, field, offset)
}

/// Parses an absolute store path read at `offset`.
pub(crate) fn parse_store_path(
    s: &[u8],
    field: &'static str,
    offset: usize,
) -> ReadResult<StorePath> {
    StorePath::from_absolute_path(s).map_err(|source| {
        ServeError::StorePath {
            field,
            offset,
            source,
        }
        .into()
    })
}

/// Reads a store path or `""` for none.
pub(crate) fn opt_store_path(
    r: &mut Reader<'_>,
    field: &'static str,
    limits: &wire::Limits,
) -> ReadResult<Option<StorePath>> {
    let offset = r.position();
    let s = r.bytes(field, limits.max_short_string_len)?;
    if s.is_empty() {
        return Ok(None);
    }
    parse_store_path(s, field, offset).map(Some)
}

/// Reads a set of store paths; duplicates collapse.
pub(crate) fn store_path_set(
    r: &mut Reader<'_>,
    field: &'static str,
    limits: &wire::Limits,
) -> ReadResult<BTreeSet<StorePath>> {
    let n = r.count(field, limits.max_list_len)?;
    let mut set = BTreeSet::new();
    for _ in 0..n {
        set.insert(store_path(r, field, limits)?);
    }
    Ok(set)
}

/// Reads a hash in any form Nix accepts (`Hash::parseAny`, sha256 when unprefixed), or `""`
/// for none.
pub(crate) fn hash(
    r: &mut Reader<'_>,
    field: &'static str,
    limits: &wire::Limits,
) -> ReadResult<Option<Hash>> {
    let offset = r.position();
    let s = r.str(field, limits.max_short_string_len)?;
    if s.is_empty() {
        return Ok(None);
    }
    Hash::parse_any(s, Some(HashAlgo::Sha256))
        .map(Some)
        .map_err(|source| {
            ServeError::Hash {
                field,
                offset,
                source,
            }
            .into()
        })
}

/// Reads a content address or `""` for none.
pub(crate) fn opt_ca(
    r: &mut Reader<'_>,
    field: &'static str,
    limits: &wire::Limits,
) -> ReadResult<Option<ContentAddress>> {
    let offset = r.position();
    let s = r.str(field, limits.max_short_string_len)?;
    if s.is_empty() {
        return Ok(None);
    }
    ContentAddress::parse(s).map(Some).map_err(|source| {
        ServeError::ContentAddress {
            field,
            offset,
            source,
        }
        .into()
    })
}

/// Writes an absolute store path.
pub(crate) fn put_store_path(buf: &mut impl BufMut, p: &StorePath) {
    buf.put_wire_bytes(p.to_absolute().as_bytes());
}

/// Writes a store path or `""`.
pub(crate) fn put_opt_store_path(buf: &mut impl BufMut, p: Option<&StorePath>) {
    match p {
        Some(p) => put_store_path(buf, p),
        None => buf.put_wire_bytes(b""),
    }
}

/// Writes a set of store paths in ascending order.
pub(crate) fn put_store_path_set(buf: &mut impl BufMut, set: &BTreeSet<StorePath>) {
    buf.put_wire_u64(set.len() as u64);
    for p in set {
        put_store_path(buf, p);
    }
}

/// Writes a content address or `""`.
pub(crate) fn put_opt_ca(buf: &mut impl BufMut, ca: Option<&ContentAddress>) {
    match ca {
        Some(ca) => buf.put_wire_bytes(ca.to_string().as_bytes()),
        None => buf.put_wire_bytes(b""),
    }
}
