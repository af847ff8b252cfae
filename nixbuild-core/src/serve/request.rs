//! Requests: one typed variant per opcode (docs/serve-protocol.md §4), and the `--write` check.

use std::collections::BTreeSet;

use bytes::BufMut;

use super::build::BuildOptions;
use super::derivation::{encode_basic_derivation, read_basic_derivation};
use super::fields::{
    hash, opt_ca, opt_store_path, parse_store_path, put_opt_ca, put_opt_store_path, put_store_path,
    put_store_path_set, store_path, store_path_set,
};
use super::{Limits, ProtocolVersion, ReadResult, ServeError};
use crate::content_address::ContentAddress;
use crate::derivation::BasicDerivation;
use crate::hash::Hash;
use crate::store_path::StorePath;
use crate::wire::{self, BufMutExt, Reader};
use crate::worker::{DerivedPath, OutputsSpec};

/// The serve commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    /// 1: which of these paths are valid.
    QueryValidPaths = 1,
    /// 2: metadata of the valid ones among these paths.
    QueryPathInfos = 2,
    /// 3: the NAR of a path.
    DumpStorePath = 3,
    /// 4: an export stream to add (needs `--write`).
    ImportPaths = 4,
    /// 5: an export stream of these paths (legacy).
    ExportPaths = 5,
    /// 6: realise these paths (needs `--write`).
    BuildPaths = 6,
    /// 7: the reference closure of these paths.
    QueryClosure = 7,
    /// 8: build this BasicDerivation (needs `--write`).
    BuildDerivation = 8,
    /// 9: add one path from its NAR (needs `--write`).
    AddToStoreNar = 9,
}

impl Opcode {
    /// The opcode with wire value `n`; anything outside 1–9 is `unknown serve command N`.
    pub fn from_wire(n: u64) -> Result<Self, ServeError> {
        Ok(match n {
            1 => Opcode::QueryValidPaths,
            2 => Opcode::QueryPathInfos,
            3 => Opcode::DumpStorePath,
            4 => Opcode::ImportPaths,
            5 => Opcode::ExportPaths,
            6 => Opcode::BuildPaths,
            7 => Opcode::QueryClosure,
            8 => Opcode::BuildDerivation,
            9 => Opcode::AddToStoreNar,
            _ => return Err(ServeError::UnknownOpcode(n)),
        })
    }

    /// The wire value.
    pub fn to_wire(self) -> u64 {
        self as u64
    }

    /// Reads an opcode. (Upstream's `readInt` fails differently on values of 2^32 and
    /// above; either way the session ends, so they are all unknown commands here.)
    pub fn read(r: &mut Reader<'_>) -> ReadResult<Self> {
        Ok(Self::from_wire(r.u64()?)?)
    }

    /// Checks that the command may run: opcodes 4, 6, 8 and 9 need `--write`, and fail with
    /// upstream's exact messages without it.
    pub fn check_write(self, write_allowed: bool) -> Result<(), ServeError> {
        match self {
            _ if write_allowed => Ok(()),
            Opcode::ImportPaths | Opcode::AddToStoreNar => {
                Err(ServeError::NotAllowed("importing paths is not allowed"))
            }
            Opcode::BuildPaths | Opcode::BuildDerivation => {
                Err(ServeError::NotAllowed("building paths is not allowed"))
            }
            _ => Ok(()),
        }
    }
}

/// A BuildPaths entry: `/nix/store/p`, or `/nix/store/x.drv!out1,out2`; no `!` (an empty
/// `outputs`) means the path itself, or every output of a derivation.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PathWithOutputs {
    /// The store path.
    pub path: StorePath,
    /// The outputs wanted; empty for all.
    pub outputs: BTreeSet<String>,
}

impl PathWithOutputs {
    /// Parses an entry read at `offset`. Like upstream, empty names between commas are
    /// skipped.
    fn parse(s: &[u8], offset: usize) -> ReadResult<Self> {
        let (path, outputs) = match s.iter().position(|&c| c == b'!') {
            None => (s, &b""[..]),
            Some(i) => (&s[..i], &s[i + 1..]),
        };
        let path = parse_store_path(path, "BuildPaths entry", offset)?;
        let outputs = std::str::from_utf8(outputs)
            .map_err(|_| ServeError::Malformed {
                field: "BuildPaths entry",
                offset,
                reason: "output names are not UTF-8".to_owned(),
            })?
            .split(',')
            .filter(|n| !n.is_empty())
            .map(str::to_owned)
            .collect();
        Ok(PathWithOutputs { path, outputs })
    }

    /// The wire form.
    pub fn to_wire_string(&self) -> String {
        let mut s = self.path.to_absolute();
        if !self.outputs.is_empty() {
            s.push('!');
            let names: Vec<&str> = self.outputs.iter().map(String::as_str).collect();
            s.push_str(&names.join(","));
        }
        s
    }

    /// What the entry asks for, as the worker protocol says it (as upstream's
    /// `toDerivedPath`): a `.drv` means its outputs named, or all of them when none is;
    /// any other path means itself.
    pub fn into_derived(self) -> DerivedPath {
        match self.path.is_derivation() {
            true => DerivedPath::Built {
                drv: self.path,
                outputs: match self.outputs.is_empty() {
                    true => OutputsSpec::All,
                    false => OutputsSpec::Names(self.outputs),
                },
            },
            false => DerivedPath::Opaque(self.path),
        }
    }
}

/// The header of AddToStoreNar (opcode 9). Exactly `nar_size` raw NAR bytes follow it on the
/// wire; the driver streams them, they are not part of this value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddToStoreNar {
    /// The path to add.
    pub path: StorePath,
    /// Its deriver, if any.
    pub deriver: Option<StorePath>,
    /// The NAR's sha256. Clients send unprefixed base16; any form `Hash::parseAny` takes is
    /// accepted, and it is written back as unprefixed base16.
    pub nar_hash: Hash,
    /// Its references.
    pub references: BTreeSet<StorePath>,
    /// Unix seconds of registration on the client (0 means now).
    pub registration_time: u64,
    /// Length of the NAR that follows (1..=`Limits::max_nar_size`).
    pub nar_size: u64,
    /// Whether the client built it itself (clients send false).
    pub ultimate: bool,
    /// Signatures, `keyname:base64`.
    pub sigs: BTreeSet<String>,
    /// Its content address, if any.
    pub ca: Option<ContentAddress>,
}

impl AddToStoreNar {
    /// Reads the header's fields (the worker protocol's AddToStoreNar and AddMultipleToStore
    /// carry the same ones).
    pub fn read(r: &mut Reader<'_>, limits: &Limits) -> ReadResult<Self> {
        let w = &limits.wire;
        let path = store_path(r, "path", w)?;
        let deriver = opt_store_path(r, "deriver", w)?;
        let hash_offset = r.position();
        let nar_hash = hash(r, "narHash", w)?.ok_or(ServeError::Malformed {
            field: "narHash",
            offset: hash_offset,
            reason: "empty".to_owned(),
        })?;
        let references = store_path_set(r, "references", w)?;
        let registration_time = r.u64()?;
        let size_offset = r.position();
        let nar_size = r.u64()?;
        if nar_size == 0 || nar_size > limits.max_nar_size {
            return Err(ServeError::BadNarSize {
                offset: size_offset,
                size: nar_size,
                max: limits.max_nar_size,
            }
            .into());
        }
        Ok(AddToStoreNar {
            path,
            deriver,
            nar_hash,
            references,
            registration_time,
            nar_size,
            ultimate: r.bool("ultimate")?,
            sigs: r.string_set("sigs", w, w.max_short_string_len)?,
            ca: opt_ca(r, "ca", w)?,
        })
    }

    /// Writes the header's fields.
    pub fn encode(&self, buf: &mut impl BufMut) {
        put_store_path(buf, &self.path);
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

/// A request, after its opcode (docs/serve-protocol.md §4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// 1: which of `paths` are valid. `lock` and `substitute` only matter with `--write`.
    QueryValidPaths {
        /// Hold the paths as temporary GC roots for the session (Hydra sends 1).
        lock: bool,
        /// Try the server's substituters first.
        substitute: bool,
        /// The paths asked about.
        paths: BTreeSet<StorePath>,
    },
    /// 2: metadata of the valid ones among `paths`.
    QueryPathInfos {
        /// The paths asked about.
        paths: BTreeSet<StorePath>,
    },
    /// 3: the NAR of `path`.
    DumpStorePath {
        /// The path to dump.
        path: StorePath,
    },
    /// 4: an export stream follows (see [`super::export`]).
    ImportPaths,
    /// 5: send an export stream of `paths`.
    ExportPaths {
        /// The obsolete "sign" flag (ignored, kept for exact re-encoding).
        sign: u64,
        /// The paths to export.
        paths: BTreeSet<StorePath>,
    },
    /// 6: realise `paths`.
    BuildPaths {
        /// The paths, in the client's order.
        paths: Vec<PathWithOutputs>,
        /// The build settings.
        options: BuildOptions,
    },
    /// 7: the closure of `paths`.
    QueryClosure {
        /// Also include the valid outputs of derivations in the closure.
        include_outputs: bool,
        /// The starting paths.
        paths: BTreeSet<StorePath>,
    },
    /// 8: build `drv`, whose `.drv` path is `drv_path` (not validated, docs/serve-protocol.md §5).
    BuildDerivation {
        /// The derivation's path; its name part names fixed-output outputs.
        drv_path: StorePath,
        /// The derivation as sent.
        drv: Box<BasicDerivation>,
        /// The build settings.
        options: BuildOptions,
    },
    /// 9: add a path; `nar_size` NAR bytes follow.
    AddToStoreNar(Box<AddToStoreNar>),
}

impl Request {
    /// The request's opcode.
    pub fn opcode(&self) -> Opcode {
        match self {
            Request::QueryValidPaths { .. } => Opcode::QueryValidPaths,
            Request::QueryPathInfos { .. } => Opcode::QueryPathInfos,
            Request::DumpStorePath { .. } => Opcode::DumpStorePath,
            Request::ImportPaths => Opcode::ImportPaths,
            Request::ExportPaths { .. } => Opcode::ExportPaths,
            Request::BuildPaths { .. } => Opcode::BuildPaths,
            Request::QueryClosure { .. } => Opcode::QueryClosure,
            Request::BuildDerivation { .. } => Opcode::BuildDerivation,
            Request::AddToStoreNar(_) => Opcode::AddToStoreNar,
        }
    }

    /// Decodes one request (opcode and arguments) from the start of `buf`, as a client of
    /// version `v` sends it: the request and the bytes it used, `None` when more bytes are
    /// needed, or the error. For AddToStoreNar only the header is decoded; for ImportPaths
    /// only the opcode.
    pub fn decode(
        buf: &[u8],
        v: ProtocolVersion,
        limits: &Limits,
    ) -> Result<Option<(Self, usize)>, ServeError> {
        let mut r = Reader::new(buf);
        wire::complete(Self::read(&mut r, v, limits).map(|req| (req, r.position())))
    }

    /// Like [`Request::decode`], over a contiguous `Buf`, which is advanced past the request
    /// when it is complete.
    pub fn decode_buf(
        buf: &mut impl bytes::Buf,
        v: ProtocolVersion,
        limits: &Limits,
    ) -> Result<Option<Self>, ServeError> {
        wire::decode_buf(buf, |r| Self::read(r, v, limits))
    }

    /// Reads one request.
    pub fn read(r: &mut Reader<'_>, v: ProtocolVersion, limits: &Limits) -> ReadResult<Self> {
        let op = Opcode::read(r)?;
        Self::read_args(op, r, v, limits)
    }

    /// Reads the arguments of a request whose opcode has been read.
    pub fn read_args(
        op: Opcode,
        r: &mut Reader<'_>,
        v: ProtocolVersion,
        limits: &Limits,
    ) -> ReadResult<Self> {
        let w = &limits.wire;
        Ok(match op {
            Opcode::QueryValidPaths => Request::QueryValidPaths {
                lock: r.bool("lock")?,
                substitute: r.bool("substitute")?,
                paths: store_path_set(r, "paths", w)?,
            },
            Opcode::QueryPathInfos => Request::QueryPathInfos {
                paths: store_path_set(r, "paths", w)?,
            },
            Opcode::DumpStorePath => Request::DumpStorePath {
                path: store_path(r, "path", w)?,
            },
            Opcode::ImportPaths => Request::ImportPaths,
            Opcode::ExportPaths => Request::ExportPaths {
                sign: r.u64()?,
                paths: store_path_set(r, "paths", w)?,
            },
            Opcode::BuildPaths => {
                let n = r.count("BuildPaths entries", w.max_list_len)?;
                let mut paths = Vec::with_capacity(r.prealloc(n));
                for _ in 0..n {
                    let offset = r.position();
                    let s = r.bytes("BuildPaths entry", w.max_short_string_len)?;
                    paths.push(PathWithOutputs::parse(s, offset)?);
                }
                Request::BuildPaths {
                    paths,
                    options: BuildOptions::read(r, v)?,
                }
            }
            Opcode::QueryClosure => Request::QueryClosure {
                include_outputs: r.bool("includeOutputs")?,
                paths: store_path_set(r, "paths", w)?,
            },
            Opcode::BuildDerivation => Request::BuildDerivation {
                drv_path: store_path(r, "drvPath", w)?,
                drv: Box::new(read_basic_derivation(r, w)?),
                options: BuildOptions::read(r, v)?,
            },
            Opcode::AddToStoreNar => {
                Request::AddToStoreNar(Box::new(AddToStoreNar::read(r, limits)?))
            }
        })
    }

    /// Writes the request (opcode and arguments) as a client of version `v` sends it.
    pub fn encode(&self, v: ProtocolVersion, buf: &mut impl BufMut) {
        buf.put_wire_u64(self.opcode().to_wire());
        match self {
            Request::QueryValidPaths {
                lock,
                substitute,
                paths,
            } => {
                buf.put_wire_bool(*lock);
                buf.put_wire_bool(*substitute);
                put_store_path_set(buf, paths);
            }
            Request::QueryPathInfos { paths } => put_store_path_set(buf, paths),
            Request::DumpStorePath { path } => put_store_path(buf, path),
            Request::ImportPaths => {}
            Request::ExportPaths { sign, paths } => {
                buf.put_wire_u64(*sign);
                put_store_path_set(buf, paths);
            }
            Request::BuildPaths { paths, options } => {
                buf.put_wire_strings(paths.iter().map(PathWithOutputs::to_wire_string));
                options.encode(v, buf);
            }
            Request::QueryClosure {
                include_outputs,
                paths,
            } => {
                buf.put_wire_bool(*include_outputs);
                put_store_path_set(buf, paths);
            }
            Request::BuildDerivation {
                drv_path,
                drv,
                options,
            } => {
                put_store_path(buf, drv_path);
                encode_basic_derivation(drv, buf);
                options.encode(v, buf);
            }
            Request::AddToStoreNar(h) => h.encode(buf),
        }
    }
}
