//! Answers with a fixed shape (docs/worker-protocol.md §5), written after `STDERR_LAST`.
//! NarFromPath answers with a raw NAR the driver streams itself.

use std::collections::{BTreeMap, BTreeSet};

use bytes::BufMut;

use super::request::{DerivedPath, Opcode};
use super::{ReadResult, WorkerError, WorkerVersion};
use crate::content_address::ContentAddress;
use crate::hash::Hash;
use crate::serve::build::{put_outputs_v26, read_outputs_v26};
use crate::serve::fields::{hash, opt_ca, opt_store_path, put_opt_ca, put_opt_store_path};
use crate::serve::fields::{put_store_path, put_store_path_set, store_path, store_path_set};
use crate::serve::BuildResult;
use crate::store_path::StorePath;
use crate::wire::{self, BufMutExt, Reader};

/// A valid path's metadata, without the path (`UnkeyedValidPathInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    /// The deriver, if any.
    pub deriver: Option<StorePath>,
    /// The NAR's sha256, written as unprefixed base16.
    pub nar_hash: Hash,
    /// References; may include the path itself.
    pub references: BTreeSet<StorePath>,
    /// Unix seconds of registration.
    pub registration_time: u64,
    /// NAR size in bytes.
    pub nar_size: u64,
    /// Built by this store.
    pub ultimate: bool,
    /// Signatures.
    pub sigs: BTreeSet<String>,
    /// Content address, if any.
    pub ca: Option<ContentAddress>,
}

impl PathInfo {
    /// Reads the metadata as a server sends it.
    pub fn read(r: &mut Reader<'_>, limits: &wire::Limits) -> ReadResult<Self> {
        let deriver = opt_store_path(r, "deriver", limits)?;
        let offset = r.position();
        let nar_hash = hash(r, "narHash", limits)?.ok_or(WorkerError::Malformed {
            field: "narHash",
            offset,
            reason: "empty".to_owned(),
        })?;
        Ok(PathInfo {
            deriver,
            nar_hash,
            references: store_path_set(r, "references", limits)?,
            registration_time: r.u64()?,
            nar_size: r.u64()?,
            ultimate: r.bool("ultimate")?,
            sigs: r.string_set("sigs", limits, limits.max_short_string_len)?,
            ca: opt_ca(r, "ca", limits)?,
        })
    }

    /// Writes the metadata.
    pub fn encode(&self, buf: &mut impl BufMut) {
        put_opt_store_path(buf, self.deriver.as_ref());
        buf.put_wire_bytes(self.nar_hash.to_base16().as_bytes());
        put_store_path_set(buf, &self.references);
        buf.put_wire_u64(self.registration_time);
        buf.put_wire_u64(self.nar_size);
        buf.put_wire_bool(self.ultimate);
        buf.put_wire_strings(&self.sigs);
        put_opt_ca(buf, self.ca.as_ref());
    }
}

/// What realising some paths would take (QueryMissing).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Missing {
    /// Derivations that would be built.
    pub will_build: BTreeSet<StorePath>,
    /// Paths that would be substituted.
    pub will_substitute: BTreeSet<StorePath>,
    /// Paths nothing is known of.
    pub unknown: BTreeSet<StorePath>,
    /// Bytes to download.
    pub download_size: u64,
    /// Bytes of NAR to unpack.
    pub nar_size: u64,
}

/// An answer with a fixed shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// Nothing after `STDERR_LAST` (SetOptions, AddToStoreNar, AddMultipleToStore,
    /// RegisterDrvOutput).
    Nothing,
    /// One u64: a boolean (IsValidPath, HasSubstitutes, VerifyStore), the `1` of EnsurePath,
    /// AddTempRoot, AddIndirectRoot, SyncWithGC, BuildPaths, AddSignatures, AddBuildLog,
    /// OptimiseStore, or the count 0 of an empty map or set (FindRoots,
    /// QuerySubstitutablePathInfos, QueryRealisation, QuerySubstitutablePathInfo's "not
    /// found").
    Int(u64),
    /// A set of paths (QueryValidPaths, QueryReferrers, QueryAllValidPaths,
    /// QuerySubstitutablePaths, QueryValidDerivers, QueryDerivationOutputs).
    Paths(BTreeSet<StorePath>),
    /// A set of strings (QueryDerivationOutputNames).
    Strings(BTreeSet<String>),
    /// A path or `""` (QueryPathFromHashPart).
    OptPath(Option<StorePath>),
    /// CollectGarbage: the paths deleted (or found, for the actions that only return them) and
    /// the bytes freed; an obsolete `0` follows on the wire.
    Collected {
        /// The paths, as the server prints them.
        paths: BTreeSet<String>,
        /// Bytes freed.
        bytes_freed: u64,
    },
    /// AddPermRoot: the root's location on the server (not a store path).
    GcRoot(String),
    /// QueryPathInfo: the metadata, or none for an invalid path.
    PathInfo(Option<Box<PathInfo>>),
    /// AddToStore and AddTextToStore: the path; from 1.25 AddToStore adds its metadata.
    Added {
        /// The path added.
        path: StorePath,
        /// Its metadata (AddToStore from 1.25 on).
        info: Option<Box<PathInfo>>,
    },
    /// QueryMissing.
    Missing(Box<Missing>),
    /// QueryDerivationOutputMap: output name → path, if known.
    OutputMap(BTreeMap<String, Option<StorePath>>),
    /// BuildDerivation.
    Build(Box<BuildResult>),
    /// BuildPathsWithResults: one result per path asked for.
    BuildResults(Vec<(DerivedPath, BuildResult)>),
}

/// Writes a BuildResult for version `v`: status and message; times from 1.29; CPU times
/// (none known) from 1.37; the realisations of the built outputs from 1.28.
pub fn put_build_result(res: &BuildResult, v: WorkerVersion, buf: &mut impl BufMut) {
    res.put_head(buf);
    if v >= WorkerVersion::V1_29 {
        res.put_times(buf);
    }
    if v >= WorkerVersion::V1_37 {
        buf.put_wire_u64(0); // cpuUser: none
        buf.put_wire_u64(0); // cpuSystem: none
    }
    if v >= WorkerVersion::V1_28 {
        put_outputs_v26(buf, &res.built_outputs);
    }
}

/// Reads a BuildResult as a server of version `v` sends it.
pub fn read_build_result(
    r: &mut Reader<'_>,
    v: WorkerVersion,
    limits: &wire::Limits,
) -> ReadResult<BuildResult> {
    let mut res = BuildResult::read_head(r, limits)?;
    if v >= WorkerVersion::V1_29 {
        res.read_times(r)?;
    }
    if v >= WorkerVersion::V1_37 {
        for field in ["cpuUser", "cpuSystem"] {
            if r.bool(field)? {
                r.u64()?;
            }
        }
    }
    if v >= WorkerVersion::V1_28 {
        res.built_outputs = read_outputs_v26(r, limits)?;
    }
    Ok(res)
}

impl Response {
    /// Writes the answer (without the `STDERR_LAST` before it) for version `v`.
    pub fn encode(&self, v: WorkerVersion, buf: &mut impl BufMut) {
        match self {
            Response::Nothing => {}
            Response::Int(n) => buf.put_wire_u64(*n),
            Response::Paths(paths) => put_store_path_set(buf, paths),
            Response::Strings(s) => buf.put_wire_strings(s),
            Response::OptPath(p) => put_opt_store_path(buf, p.as_ref()),
            Response::Collected { paths, bytes_freed } => {
                buf.put_wire_strings(paths);
                buf.put_wire_u64(*bytes_freed);
                buf.put_wire_u64(0); // obsolete
            }
            Response::GcRoot(root) => buf.put_wire_bytes(root.as_bytes()),
            Response::PathInfo(None) => buf.put_wire_u64(0),
            Response::PathInfo(Some(info)) => {
                buf.put_wire_u64(1);
                info.encode(buf);
            }
            Response::Added { path, info } => {
                put_store_path(buf, path);
                if let Some(info) = info {
                    info.encode(buf);
                }
            }
            Response::Missing(m) => {
                put_store_path_set(buf, &m.will_build);
                put_store_path_set(buf, &m.will_substitute);
                put_store_path_set(buf, &m.unknown);
                buf.put_wire_u64(m.download_size);
                buf.put_wire_u64(m.nar_size);
            }
            Response::OutputMap(map) => {
                buf.put_wire_u64(map.len() as u64);
                for (name, p) in map {
                    buf.put_wire_bytes(name.as_bytes());
                    put_opt_store_path(buf, p.as_ref());
                }
            }
            Response::Build(res) => put_build_result(res, v, buf),
            Response::BuildResults(results) => {
                buf.put_wire_u64(results.len() as u64);
                for (p, res) in results {
                    buf.put_wire_bytes(p.to_wire_string(v).as_bytes());
                    put_build_result(res, v, buf);
                }
            }
        }
    }

    /// Reads the answer to `op` (after `STDERR_LAST`) as a client of version `v` does; `None`
    /// for NarFromPath, whose answer is a raw NAR.
    pub fn read(
        r: &mut Reader<'_>,
        op: Opcode,
        v: WorkerVersion,
        limits: &wire::Limits,
    ) -> ReadResult<Option<Self>> {
        Ok(Some(match op {
            Opcode::SetOptions
            | Opcode::AddToStoreNar
            | Opcode::AddMultipleToStore
            | Opcode::RegisterDrvOutput => Response::Nothing,
            Opcode::NarFromPath => return Ok(None),
            Opcode::IsValidPath
            | Opcode::HasSubstitutes
            | Opcode::VerifyStore
            | Opcode::EnsurePath
            | Opcode::AddTempRoot
            | Opcode::AddIndirectRoot
            | Opcode::SyncWithGC
            | Opcode::BuildPaths
            | Opcode::AddSignatures
            | Opcode::AddBuildLog
            | Opcode::OptimiseStore => Response::Int(r.u64()?),
            // Maps and sets this server always sends empty: only their count, 0, is read.
            Opcode::FindRoots
            | Opcode::QuerySubstitutablePathInfos
            | Opcode::QueryRealisation
            | Opcode::QuerySubstitutablePathInfo => {
                let offset = r.position();
                let n = r.u64()?;
                if n != 0 {
                    return Err(WorkerError::Malformed {
                        field: "answer",
                        offset,
                        reason: format!("{} answers with entries; only 0 is read", op.name()),
                    }
                    .into());
                }
                Response::Int(n)
            }
            Opcode::QueryValidPaths
            | Opcode::QueryReferrers
            | Opcode::QueryAllValidPaths
            | Opcode::QuerySubstitutablePaths
            | Opcode::QueryValidDerivers
            | Opcode::QueryDerivationOutputs => {
                Response::Paths(store_path_set(r, "paths", limits)?)
            }
            Opcode::QueryDerivationOutputNames => {
                Response::Strings(r.string_set("names", limits, limits.max_short_string_len)?)
            }
            Opcode::QueryPathFromHashPart => Response::OptPath(opt_store_path(r, "path", limits)?),
            Opcode::CollectGarbage => {
                let short = limits.max_short_string_len;
                let paths = r.string_set("paths", limits, short)?;
                let bytes_freed = r.u64()?;
                r.u64()?; // obsolete
                Response::Collected { paths, bytes_freed }
            }
            Opcode::AddPermRoot => {
                Response::GcRoot(r.str("gcRoot", limits.max_short_string_len)?.to_owned())
            }
            Opcode::QueryPathInfo => match r.bool("valid")? {
                true => Response::PathInfo(Some(Box::new(PathInfo::read(r, limits)?))),
                false => Response::PathInfo(None),
            },
            Opcode::AddToStore => Response::Added {
                path: store_path(r, "path", limits)?,
                info: match v >= WorkerVersion::V1_25 {
                    true => Some(Box::new(PathInfo::read(r, limits)?)),
                    false => None,
                },
            },
            Opcode::AddTextToStore => Response::Added {
                path: store_path(r, "path", limits)?,
                info: None,
            },
            Opcode::QueryMissing => Response::Missing(Box::new(Missing {
                will_build: store_path_set(r, "willBuild", limits)?,
                will_substitute: store_path_set(r, "willSubstitute", limits)?,
                unknown: store_path_set(r, "unknown", limits)?,
                download_size: r.u64()?,
                nar_size: r.u64()?,
            })),
            Opcode::QueryDerivationOutputMap => {
                let n = r.count("outputs", limits.max_list_len)?;
                let mut map = BTreeMap::new();
                for _ in 0..n {
                    let name = r
                        .str("output name", limits.max_short_string_len)?
                        .to_owned();
                    map.insert(name, opt_store_path(r, "output path", limits)?);
                }
                Response::OutputMap(map)
            }
            Opcode::BuildDerivation => Response::Build(Box::new(read_build_result(r, v, limits)?)),
            Opcode::BuildPathsWithResults => {
                let n = r.count("results", limits.max_list_len)?;
                let mut results = Vec::with_capacity(r.prealloc(n));
                for _ in 0..n {
                    let offset = r.position();
                    let s = r.bytes("derived path", limits.max_short_string_len)?;
                    let p = DerivedPath::parse(s, v, offset)?;
                    results.push((p, read_build_result(r, v, limits)?));
                }
                Response::BuildResults(results)
            }
        }))
    }
}
