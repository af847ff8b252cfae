//! The NIXE export stream (docs/serve-protocol.md §6.3) of ImportPaths and ExportPaths:
//!
//! ```text
//! repeat: u64 1, <NAR>, trailer      (dependencies first)
//! u64 0
//! ```
//!
//! The NAR in between delimits itself; the driver runs it through the NAR reader and then
//! decodes the [`ExportTrailer`].

use std::collections::BTreeSet;

use bytes::BufMut;

use super::fields::{opt_store_path, put_opt_store_path, put_store_path, put_store_path_set};
use super::fields::{store_path, store_path_set};
use super::{ReadResult, ServeError};
use crate::store_path::StorePath;
use crate::wire::{self, BufMutExt, Reader};

/// `exportMagic`, the bytes "NIXE" read as a little-endian u64.
pub const EXPORT_MAGIC: u64 = 0x4558_494e;

/// The `u64` before each entry of an export stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportMarker {
    /// `1`: a NAR and its trailer follow.
    Entry,
    /// `0`: the stream ends.
    End,
}

impl ExportMarker {
    /// Reads a marker; any value but 0 and 1 is an error.
    pub fn read(r: &mut Reader<'_>) -> ReadResult<Self> {
        let offset = r.position();
        match r.u64()? {
            1 => Ok(ExportMarker::Entry),
            0 => Ok(ExportMarker::End),
            value => Err(ServeError::BadExportMarker { offset, value }.into()),
        }
    }

    /// Writes the marker.
    pub fn encode(self, buf: &mut impl BufMut) {
        buf.put_wire_u64(match self {
            ExportMarker::Entry => 1,
            ExportMarker::End => 0,
        });
    }
}

/// What follows each NAR in an export stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportTrailer {
    /// The path the NAR belongs to.
    pub path: StorePath,
    /// Its references.
    pub references: BTreeSet<StorePath>,
    /// Its deriver, if any.
    pub deriver: Option<StorePath>,
    /// A legacy signature (flag 1 and a string; upstream ignores it), kept so that the
    /// trailer re-encodes byte for byte.
    pub legacy_signature: Option<Vec<u8>>,
}

impl ExportTrailer {
    /// Reads a trailer: magic, path, references, deriver, signature flag.
    pub fn read(r: &mut Reader<'_>, limits: &wire::Limits) -> ReadResult<Self> {
        let offset = r.position();
        let magic = r.u64()?;
        if magic != EXPORT_MAGIC {
            return Err(ServeError::Malformed {
                field: "export magic",
                offset,
                reason: format!("expected {EXPORT_MAGIC:#x} (\"NIXE\"), got {magic:#x}"),
            }
            .into());
        }
        let path = store_path(r, "export path", limits)?;
        let references = store_path_set(r, "export references", limits)?;
        let deriver = opt_store_path(r, "export deriver", limits)?;
        // Upstream reads the flag with readInt and takes only 1 to mean "a string follows";
        // Nix writes 0, and like every boolean here anything but 0 or 1 is refused.
        let legacy_signature = if r.bool("export signature flag")? {
            Some(r.bytes("export signature", limits.max_string_len)?.to_vec())
        } else {
            None
        };
        Ok(ExportTrailer {
            path,
            references,
            deriver,
            legacy_signature,
        })
    }

    /// Decodes a trailer from the start of `buf`: the value and the bytes it used, or `None`
    /// when more bytes are needed.
    pub fn decode(buf: &[u8], limits: &wire::Limits) -> Result<Option<(Self, usize)>, ServeError> {
        let mut r = Reader::new(buf);
        wire::complete(Self::read(&mut r, limits).map(|t| (t, r.position())))
    }

    /// Writes the trailer.
    pub fn encode(&self, buf: &mut impl BufMut) {
        buf.put_wire_u64(EXPORT_MAGIC);
        put_store_path(buf, &self.path);
        put_store_path_set(buf, &self.references);
        put_opt_store_path(buf, self.deriver.as_ref());
        match &self.legacy_signature {
            Some(s) => {
                buf.put_wire_bool(true);
                buf.put_wire_bytes(s);
            }
            None => buf.put_wire_bool(false),
        }
    }
}
