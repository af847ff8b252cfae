//! Responses with a fixed shape (docs/serve-protocol.md §4, §6.1). DumpStorePath (a raw NAR) and
//! ExportPaths (an export stream) answer with streams the driver writes itself.

use std::collections::{BTreeMap, BTreeSet};

use bytes::BufMut;

use super::build::BuildResult;
use super::fields::{hash, opt_ca, opt_store_path, put_opt_ca, put_opt_store_path};
use super::fields::{parse_store_path, put_store_path, put_store_path_set, store_path_set};
use super::{Limits, Opcode, ProtocolVersion, ReadResult, ServeError};
use crate::content_address::ContentAddress;
use crate::hash::Hash;
use crate::store_path::StorePath;
use crate::wire::{self, BufMutExt, Reader};

/// Metadata of a valid path, as a QueryPathInfos entry carries it after the path
/// (docs/serve-protocol.md §6.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidPathInfo {
    /// The deriver, if any.
    pub deriver: Option<StorePath>,
    /// References; may include the path itself.
    pub references: BTreeSet<StorePath>,
    /// Real servers send `nar_size` here.
    pub download_size: u64,
    /// NAR size in bytes.
    pub nar_size: u64,
    /// NAR hash, written `sha256:<nix32>` (v ≥ 2.4; `None` is written `""`, which Nix ≥ 2.4
    /// clients reject).
    pub nar_hash: Option<Hash>,
    /// Content address, if any (v ≥ 2.4).
    pub ca: Option<ContentAddress>,
    /// Signatures (v ≥ 2.4).
    pub sigs: BTreeSet<String>,
}

impl ValidPathInfo {
    /// Reads the fields that follow the path, as a server of version `v` sends them.
    pub fn read(r: &mut Reader<'_>, v: ProtocolVersion, limits: &wire::Limits) -> ReadResult<Self> {
        let mut info = ValidPathInfo {
            deriver: opt_store_path(r, "deriver", limits)?,
            references: store_path_set(r, "references", limits)?,
            download_size: r.u64()?,
            nar_size: r.u64()?,
            nar_hash: None,
            ca: None,
            sigs: BTreeSet::new(),
        };
        if v >= ProtocolVersion::V2_4 {
            info.nar_hash = hash(r, "narHash", limits)?;
            info.ca = opt_ca(r, "ca", limits)?;
            info.sigs = r.string_set("sigs", limits, limits.max_short_string_len)?;
        }
        Ok(info)
    }

    /// Writes the fields that follow the path, for version `v`.
    pub fn encode(&self, v: ProtocolVersion, buf: &mut impl BufMut) {
        put_opt_store_path(buf, self.deriver.as_ref());
        put_store_path_set(buf, &self.references);
        buf.put_wire_u64(self.download_size);
        buf.put_wire_u64(self.nar_size);
        if v >= ProtocolVersion::V2_4 {
            match &self.nar_hash {
                Some(h) => buf.put_wire_bytes(h.to_string().as_bytes()),
                None => buf.put_wire_bytes(b""),
            }
            put_opt_ca(buf, self.ca.as_ref());
            buf.put_wire_strings(&self.sigs);
        }
    }
}

/// The answer to BuildPaths (docs/serve-protocol.md §4.6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildPathsResult {
    /// `u64 0`.
    Success,
    /// `u64 code`, `string msg`. The code is a process exit code, not a status: send 100
    /// (build failure) or 101 (timeout); codes 1, 2 and 13 desynchronise old clients.
    Failure {
        /// The exit code.
        code: u64,
        /// The message.
        msg: Vec<u8>,
    },
}

/// A response with a fixed shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// QueryValidPaths: the valid subset.
    ValidPaths(BTreeSet<StorePath>),
    /// QueryPathInfos: one entry per valid path, then the `""` terminator.
    PathInfos(BTreeMap<StorePath, ValidPathInfo>),
    /// ImportPaths: `u64 1`.
    Imported,
    /// BuildPaths: success, or code and message.
    BuildPaths(BuildPathsResult),
    /// QueryClosure: the closure.
    Closure(BTreeSet<StorePath>),
    /// BuildDerivation: the result.
    Build(Box<BuildResult>),
    /// AddToStoreNar: `u64 1`.
    Added,
}

impl Response {
    /// The opcode this response answers.
    pub fn opcode(&self) -> Opcode {
        match self {
            Response::ValidPaths(_) => Opcode::QueryValidPaths,
            Response::PathInfos(_) => Opcode::QueryPathInfos,
            Response::Imported => Opcode::ImportPaths,
            Response::BuildPaths(_) => Opcode::BuildPaths,
            Response::Closure(_) => Opcode::QueryClosure,
            Response::Build(_) => Opcode::BuildDerivation,
            Response::Added => Opcode::AddToStoreNar,
        }
    }

    /// Writes the response for version `v`.
    pub fn encode(&self, v: ProtocolVersion, buf: &mut impl BufMut) {
        match self {
            Response::ValidPaths(s) | Response::Closure(s) => put_store_path_set(buf, s),
            Response::PathInfos(m) => {
                for (path, info) in m {
                    put_store_path(buf, path);
                    info.encode(v, buf);
                }
                buf.put_wire_bytes(b"");
            }
            Response::Imported | Response::Added => buf.put_wire_u64(1),
            Response::BuildPaths(BuildPathsResult::Success) => buf.put_wire_u64(0),
            Response::BuildPaths(BuildPathsResult::Failure { code, msg }) => {
                buf.put_wire_u64(*code);
                buf.put_wire_bytes(msg);
            }
            Response::Build(r) => r.encode(v, buf),
        }
    }

    /// Decodes the response to a request with opcode `op` from the start of `buf` (the client
    /// side): the response and the bytes it used, `None` when more bytes are needed, or the
    /// error. DumpStorePath and ExportPaths answer with streams, not with a `Response`, and
    /// are rejected.
    pub fn decode(
        op: Opcode,
        buf: &[u8],
        v: ProtocolVersion,
        limits: &Limits,
    ) -> Result<Option<(Self, usize)>, ServeError> {
        let mut r = Reader::new(buf);
        wire::complete(Self::read(op, &mut r, v, limits).map(|x| (x, r.position())))
    }

    /// Reads the response to a request with opcode `op`.
    pub fn read(
        op: Opcode,
        r: &mut Reader<'_>,
        v: ProtocolVersion,
        limits: &Limits,
    ) -> ReadResult<Self> {
        let w = &limits.wire;
        Ok(match op {
            Opcode::QueryValidPaths => Response::ValidPaths(store_path_set(r, "valid paths", w)?),
            Opcode::QueryClosure => Response::Closure(store_path_set(r, "closure", w)?),
            Opcode::QueryPathInfos => {
                let mut m = BTreeMap::new();
                loop {
                    let offset = r.position();
                    let s = r.bytes("path info path", w.max_short_string_len)?;
                    if s.is_empty() {
                        break;
                    }
                    if m.len() >= w.max_list_len {
                        return Err(wire::WireError::TooManyElements {
                            field: "path infos",
                            offset,
                            count: m.len() as u64 + 1,
                            max: w.max_list_len,
                        }
                        .into());
                    }
                    let path = parse_store_path(s, "path info path", offset)?;
                    m.insert(path, ValidPathInfo::read(r, v, w)?);
                }
                Response::PathInfos(m)
            }
            Opcode::ImportPaths => {
                ack(r)?;
                Response::Imported
            }
            Opcode::AddToStoreNar => {
                ack(r)?;
                Response::Added
            }
            Opcode::BuildPaths => match r.u64()? {
                0 => Response::BuildPaths(BuildPathsResult::Success),
                code => Response::BuildPaths(BuildPathsResult::Failure {
                    code,
                    msg: r.bytes("BuildPaths message", w.max_string_len)?.to_vec(),
                }),
            },
            Opcode::BuildDerivation => Response::Build(Box::new(BuildResult::read(r, v, w)?)),
            Opcode::DumpStorePath | Opcode::ExportPaths => {
                return Err(
                    ServeError::Misuse("DumpStorePath and ExportPaths answer with streams").into(),
                )
            }
        })
    }
}

/// Reads the `u64 1` that acknowledges ImportPaths and AddToStoreNar.
fn ack(r: &mut Reader<'_>) -> ReadResult<()> {
    let offset = r.position();
    match r.u64()? {
        1 => Ok(()),
        value => Err(ServeError::BadAck { offset, value }.into()),
    }
}
