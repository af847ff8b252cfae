//! Requests: one typed variant per opcode a client of Nix 2.3 to 2.34 sends
//! (docs/worker-protocol.md §5), the derived paths they name, and the layouts the framer
//! steps over.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

use bytes::BufMut;

use super::{ReadResult, WorkerError, WorkerVersion};
use crate::content_address::ContentAddressMethod;
use crate::derivation::BasicDerivation;
use crate::framer::{Field, Layout, Len};
use crate::hash::HashAlgo;
use crate::serve::derivation::{encode_basic_derivation, read_basic_derivation};
use crate::serve::fields::{parse_store_path, put_store_path, put_store_path_set};
use crate::serve::fields::{store_path, store_path_set};
use crate::serve::framing::{BUILD_DERIVATION, PATH_INFO};
use crate::serve::{AddToStoreNar, ServeError};
use crate::store_path::StorePath;
use crate::wire::{self, BufMutExt, Reader};

use Field::{List, Str, U64s};
use Len::{Long, Short};

macro_rules! opcodes {
    ($($(#[$doc:meta])* $name:ident = $n:literal,)*) => {
        /// The operations this server knows.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum Opcode {
            $($(#[$doc])* $name = $n,)*
        }

        impl Opcode {
            /// The opcode with wire value `n`.
            pub fn from_wire(n: u64) -> Result<Self, WorkerError> {
                match n {
                    $($n => Ok(Opcode::$name),)*
                    _ => Err(WorkerError::UnknownOpcode(n)),
                }
            }

            /// Its name, as upstream spells it.
            pub fn name(self) -> &'static str {
                match self {
                    $(Opcode::$name => stringify!($name),)*
                }
            }
        }
    };
}

opcodes! {
    /// 1: is this path valid.
    IsValidPath = 1,
    /// 3: can this path be substituted.
    HasSubstitutes = 3,
    /// 6: the valid paths that refer to this one.
    QueryReferrers = 6,
    /// 7: add a path from a dump (content-addressed).
    AddToStore = 7,
    /// 8: add a text file (before 1.25).
    AddTextToStore = 8,
    /// 9: realise derived paths.
    BuildPaths = 9,
    /// 10: make this path valid (substituting it if need be).
    EnsurePath = 10,
    /// 11: a temporary GC root for the session.
    AddTempRoot = 11,
    /// 12: an indirect GC root.
    AddIndirectRoot = 12,
    /// 13: wait for a running collection.
    SyncWithGC = 13,
    /// 14: the GC roots.
    FindRoots = 14,
    /// 19: the client's settings.
    SetOptions = 19,
    /// 20: collect garbage.
    CollectGarbage = 20,
    /// 21: what a substituter knows of one path.
    QuerySubstitutablePathInfo = 21,
    /// 22: the output paths of a derivation.
    QueryDerivationOutputs = 22,
    /// 23: every valid path.
    QueryAllValidPaths = 23,
    /// 26: a path's metadata.
    QueryPathInfo = 26,
    /// 28: the output names of a derivation.
    QueryDerivationOutputNames = 28,
    /// 29: the valid path with this hash part.
    QueryPathFromHashPart = 29,
    /// 30: what substituters know of these paths.
    QuerySubstitutablePathInfos = 30,
    /// 31: which of these paths are valid.
    QueryValidPaths = 31,
    /// 32: which of these paths can be substituted.
    QuerySubstitutablePaths = 32,
    /// 33: the derivations known to produce this path.
    QueryValidDerivers = 33,
    /// 34: deduplicate the store.
    OptimiseStore = 34,
    /// 35: check the store.
    VerifyStore = 35,
    /// 36: build a BasicDerivation.
    BuildDerivation = 36,
    /// 37: add signatures to a path.
    AddSignatures = 37,
    /// 38: the NAR of a path.
    NarFromPath = 38,
    /// 39: add a path from its NAR.
    AddToStoreNar = 39,
    /// 40: what realising these paths would build, substitute, or not know.
    QueryMissing = 40,
    /// 41: a derivation's outputs and their paths.
    QueryDerivationOutputMap = 41,
    /// 42: register a realisation.
    RegisterDrvOutput = 42,
    /// 43: the realisation of a derivation output.
    QueryRealisation = 43,
    /// 44: add many paths from one framed stream.
    AddMultipleToStore = 44,
    /// 45: upload a build log.
    AddBuildLog = 45,
    /// 46: realise derived paths and report each result.
    BuildPathsWithResults = 46,
    /// 47: a permanent GC root.
    AddPermRoot = 47,
}

impl Opcode {
    /// The wire value.
    pub fn to_wire(self) -> u64 {
        self as u64
    }

    /// The fields after the opcode for negotiated version `v`, in wire order.
    pub(crate) fn layout(self, v: WorkerVersion) -> Layout {
        let path: &'static [Field] = &[Str(Short)];
        let none: &'static [Field] = &[];
        Cow::Borrowed(match self {
            Opcode::IsValidPath
            | Opcode::HasSubstitutes
            | Opcode::QueryReferrers
            | Opcode::EnsurePath
            | Opcode::AddTempRoot
            | Opcode::AddIndirectRoot
            | Opcode::QuerySubstitutablePathInfo
            | Opcode::QueryDerivationOutputs
            | Opcode::QueryPathInfo
            | Opcode::QueryDerivationOutputNames
            | Opcode::QueryPathFromHashPart
            | Opcode::QueryValidDerivers
            | Opcode::NarFromPath
            | Opcode::QueryDerivationOutputMap
            | Opcode::QueryRealisation
            | Opcode::AddBuildLog => path,
            Opcode::SyncWithGC
            | Opcode::FindRoots
            | Opcode::QueryAllValidPaths
            | Opcode::OptimiseStore => none,
            Opcode::AddToStore if v >= WorkerVersion::V1_25 => {
                &[Str(Short), Str(Short), List(1, Short), U64s(1)]
            }
            Opcode::AddToStore => &[Str(Short), U64s(2), Str(Short)],
            Opcode::AddTextToStore => &[Str(Short), Str(Long), List(1, Short)],
            Opcode::BuildPaths | Opcode::BuildPathsWithResults => &[List(1, Short), U64s(1)],
            Opcode::SetOptions => &[U64s(12), List(2, Long)],
            Opcode::CollectGarbage => &[U64s(1), List(1, Short), U64s(5)],
            Opcode::QuerySubstitutablePathInfos if v >= WorkerVersion::V1_22 => &[List(2, Short)],
            Opcode::QuerySubstitutablePathInfos
            | Opcode::QuerySubstitutablePaths
            | Opcode::QueryMissing => &[List(1, Short)],
            Opcode::QueryValidPaths if v >= WorkerVersion::V1_27 => &[List(1, Short), U64s(1)],
            Opcode::QueryValidPaths => &[List(1, Short)],
            Opcode::VerifyStore | Opcode::AddMultipleToStore => &[U64s(2)],
            // drvPath, the BasicDerivation, buildMode
            Opcode::BuildDerivation => return Cow::Owned([BUILD_DERIVATION, &[U64s(1)]].concat()),
            Opcode::AddSignatures => &[Str(Short), List(1, Short)],
            // The path and its metadata, then repair and dontCheckSigs.
            Opcode::AddToStoreNar => return Cow::Owned([PATH_INFO, &[U64s(2)]].concat()),
            Opcode::RegisterDrvOutput if v >= WorkerVersion::V1_31 => &[Str(Long)],
            Opcode::RegisterDrvOutput => &[Str(Short), Str(Short)],
            Opcode::AddPermRoot => &[Str(Short), Str(Short)],
        })
    }
}

/// Which outputs of a derivation a derived path names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum OutputsSpec {
    /// Every output (`drv!*`, or a bare `.drv` before 1.30).
    All,
    /// These outputs (never empty).
    Names(BTreeSet<String>),
}

/// A path a client asks to realise or asks about: a store path as it is, or outputs of a
/// derivation.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum DerivedPath {
    /// The path itself.
    Opaque(StorePath),
    /// Outputs of the derivation `drv`.
    Built {
        /// The `.drv` path.
        drv: StorePath,
        /// The outputs.
        outputs: OutputsSpec,
    },
}

impl DerivedPath {
    /// Parses the wire form read at `offset` as a client of version `v` sends it: before
    /// 1.30 `path` or `drv!a,b`, where a bare derivation means all of its outputs; from 1.30
    /// on `path`, `drv!a,b` or `drv!*`, where a bare derivation is the file itself.
    pub fn parse(s: &[u8], v: WorkerVersion, offset: usize) -> ReadResult<Self> {
        let field = "derived path";
        let bad = |reason: &str| WorkerError::Malformed {
            field,
            offset,
            reason: reason.to_owned(),
        };
        let Some(i) = s.iter().position(|&c| c == b'!') else {
            let path = parse_store_path(s, field, offset)?;
            if v < WorkerVersion::V1_30 && path.is_derivation() {
                return Ok(DerivedPath::Built {
                    drv: path,
                    outputs: OutputsSpec::All,
                });
            }
            return Ok(DerivedPath::Opaque(path));
        };
        let drv = parse_store_path(&s[..i], field, offset)?;
        if !drv.is_derivation() {
            return Err(bad("outputs of a path that is not a derivation").into());
        }
        let rest = std::str::from_utf8(&s[i + 1..]).map_err(|_| bad("outputs are not UTF-8"))?;
        if rest == "*" {
            return Ok(DerivedPath::Built {
                drv,
                outputs: OutputsSpec::All,
            });
        }
        let mut names = BTreeSet::new();
        for name in rest.split(',').filter(|n| !n.is_empty()) {
            crate::derivation::validate_output_name(name.as_bytes())
                .map_err(|e| bad(&format!("output {name:?}: {e}")))?;
            names.insert(name.to_owned());
        }
        if names.is_empty() {
            return Err(bad("no output names after '!'").into());
        }
        Ok(DerivedPath::Built {
            drv,
            outputs: OutputsSpec::Names(names),
        })
    }

    /// The wire form for version `v` (see [`DerivedPath::parse`]). Before 1.30 an opaque
    /// `.drv` cannot be written apart from all of its outputs; it is written bare.
    pub fn to_wire_string(&self, v: WorkerVersion) -> String {
        match self {
            DerivedPath::Opaque(p) => p.to_absolute(),
            DerivedPath::Built {
                drv,
                outputs: OutputsSpec::All,
            } if v < WorkerVersion::V1_30 => drv.to_absolute(),
            DerivedPath::Built {
                drv,
                outputs: OutputsSpec::All,
            } => format!("{}!*", drv.to_absolute()),
            DerivedPath::Built {
                drv,
                outputs: OutputsSpec::Names(names),
            } => {
                let names: Vec<&str> = names.iter().map(String::as_str).collect();
                format!("{}!{}", drv.to_absolute(), names.join(","))
            }
        }
    }

    fn read_list(
        r: &mut Reader<'_>,
        v: WorkerVersion,
        limits: &wire::Limits,
    ) -> ReadResult<Vec<DerivedPath>> {
        let n = r.count("derived paths", limits.max_list_len)?;
        let mut paths = Vec::with_capacity(r.prealloc(n));
        for _ in 0..n {
            let offset = r.position();
            let s = r.bytes("derived path", limits.max_short_string_len)?;
            paths.push(DerivedPath::parse(s, v, offset)?);
        }
        Ok(paths)
    }

    fn put_list(buf: &mut impl BufMut, paths: &[DerivedPath], v: WorkerVersion) {
        buf.put_wire_strings(paths.iter().map(|p| p.to_wire_string(v)));
    }
}

/// How to build: normally, repairing, or checking that a rebuild gives the same outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildMode {
    /// 0.
    Normal,
    /// 1: rebuild outputs that are corrupt.
    Repair,
    /// 2: rebuild and compare.
    Check,
}

impl BuildMode {
    fn read(r: &mut Reader<'_>) -> ReadResult<Self> {
        let offset = r.position();
        Ok(match r.u64()? {
            0 => BuildMode::Normal,
            1 => BuildMode::Repair,
            2 => BuildMode::Check,
            n => {
                return Err(WorkerError::Malformed {
                    field: "buildMode",
                    offset,
                    reason: format!("unknown mode {n}"),
                }
                .into())
            }
        })
    }

    fn to_wire(self) -> u64 {
        match self {
            BuildMode::Normal => 0,
            BuildMode::Repair => 1,
            BuildMode::Check => 2,
        }
    }
}

/// The settings a client sends with SetOptions, as sent (obsolete fields kept so that the
/// request re-encodes exactly).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientOptions {
    /// keepFailed.
    pub keep_failed: u64,
    /// keepGoing.
    pub keep_going: u64,
    /// tryFallback.
    pub try_fallback: u64,
    /// verbosity.
    pub verbosity: u64,
    /// maxBuildJobs.
    pub max_build_jobs: u64,
    /// maxSilentTime, in seconds.
    pub max_silent_time: u64,
    /// Obsolete useBuildHook.
    pub use_build_hook: u64,
    /// verboseBuild (a verbosity).
    pub verbose_build: u64,
    /// Obsolete logType.
    pub log_type: u64,
    /// Obsolete printBuildTrace.
    pub print_build_trace: u64,
    /// buildCores.
    pub build_cores: u64,
    /// useSubstitutes.
    pub use_substitutes: u64,
    /// Other settings, `name = value`, in the client's order.
    pub overrides: Vec<(String, String)>,
}

impl ClientOptions {
    fn read(r: &mut Reader<'_>, limits: &wire::Limits) -> ReadResult<Self> {
        let mut o = ClientOptions {
            keep_failed: r.u64()?,
            keep_going: r.u64()?,
            try_fallback: r.u64()?,
            verbosity: r.u64()?,
            max_build_jobs: r.u64()?,
            max_silent_time: r.u64()?,
            use_build_hook: r.u64()?,
            verbose_build: r.u64()?,
            log_type: r.u64()?,
            print_build_trace: r.u64()?,
            build_cores: r.u64()?,
            use_substitutes: r.u64()?,
            overrides: Vec::new(),
        };
        let n = r.count("overrides", limits.max_list_len)?;
        o.overrides.reserve(r.prealloc(n));
        for _ in 0..n {
            let name = r.str("setting name", limits.max_short_string_len)?;
            let value = r.str("setting value", limits.max_string_len)?;
            o.overrides.push((name.to_owned(), value.to_owned()));
        }
        Ok(o)
    }

    fn encode(&self, buf: &mut impl BufMut) {
        for n in [
            self.keep_failed,
            self.keep_going,
            self.try_fallback,
            self.verbosity,
            self.max_build_jobs,
            self.max_silent_time,
            self.use_build_hook,
            self.verbose_build,
            self.log_type,
            self.print_build_trace,
            self.build_cores,
            self.use_substitutes,
        ] {
            buf.put_wire_u64(n);
        }
        buf.put_wire_u64(self.overrides.len() as u64);
        for (k, v) in &self.overrides {
            buf.put_wire_bytes(k.as_bytes());
            buf.put_wire_bytes(v.as_bytes());
        }
    }
}

/// How AddToStore says what it adds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddToStoreForm {
    /// From 1.25: the content-address method and hash (`text:sha256`, `fixed:r:sha256`,
    /// `fixed:sha1`), the references and repair; a framed dump follows (a NAR for the
    /// recursive method, the file's bytes otherwise).
    Addressed {
        /// How the path's address is computed.
        method: ContentAddressMethod,
        /// With which hash.
        algo: HashAlgo,
        /// Its references.
        references: BTreeSet<StorePath>,
        /// Repair an existing path.
        repair: bool,
    },
    /// Before 1.25: a NAR follows, whatever the method; for the flat method the file inside
    /// it is what is hashed.
    Legacy {
        /// The obsolete "fixed" flag, as sent.
        fixed: u64,
        /// Recursive (1) or flat (0).
        recursive: bool,
        /// The hash algorithm.
        algo: HashAlgo,
    },
}

/// A request, after its opcode (docs/worker-protocol.md §5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// 1.
    IsValidPath(StorePath),
    /// 3.
    HasSubstitutes(StorePath),
    /// 6.
    QueryReferrers(StorePath),
    /// 7: a dump follows (see [`AddToStoreForm`]).
    AddToStore {
        /// The name of the path.
        name: String,
        /// How it is addressed.
        form: AddToStoreForm,
    },
    /// 8.
    AddTextToStore {
        /// The name of the path.
        name: String,
        /// Its contents.
        text: Vec<u8>,
        /// Its references.
        references: BTreeSet<StorePath>,
    },
    /// 9.
    BuildPaths {
        /// The paths, in the client's order.
        paths: Vec<DerivedPath>,
        /// How to build.
        mode: BuildMode,
    },
    /// 10.
    EnsurePath(StorePath),
    /// 11.
    AddTempRoot(StorePath),
    /// 12: a symlink on the server's file system.
    AddIndirectRoot(String),
    /// 13.
    SyncWithGC,
    /// 14.
    FindRoots,
    /// 19.
    SetOptions(Box<ClientOptions>),
    /// 20.
    CollectGarbage {
        /// The action (0 return live, 1 return dead, 2 delete dead, 3 delete specific).
        action: u64,
        /// The paths of action 3.
        paths: BTreeSet<StorePath>,
        /// ignoreLiveness.
        ignore_liveness: u64,
        /// maxFreed.
        max_freed: u64,
    },
    /// 21.
    QuerySubstitutablePathInfo(StorePath),
    /// 22.
    QueryDerivationOutputs(StorePath),
    /// 23.
    QueryAllValidPaths,
    /// 26.
    QueryPathInfo(StorePath),
    /// 28.
    QueryDerivationOutputNames(StorePath),
    /// 29: a hash part (32 characters).
    QueryPathFromHashPart(String),
    /// 30: paths, with their content addresses from 1.22 on (`""` for none).
    QuerySubstitutablePathInfos(BTreeMap<StorePath, String>),
    /// 31.
    QueryValidPaths {
        /// The paths asked about.
        paths: BTreeSet<StorePath>,
        /// Substitute those that are missing (1.27 on).
        substitute: bool,
    },
    /// 32.
    QuerySubstitutablePaths(BTreeSet<StorePath>),
    /// 33.
    QueryValidDerivers(StorePath),
    /// 34.
    OptimiseStore,
    /// 35.
    VerifyStore {
        /// checkContents.
        check_contents: bool,
        /// repair.
        repair: bool,
    },
    /// 36.
    BuildDerivation {
        /// The derivation's path.
        drv_path: StorePath,
        /// The derivation as sent.
        drv: Box<BasicDerivation>,
        /// How to build.
        mode: BuildMode,
    },
    /// 37.
    AddSignatures {
        /// The path.
        path: StorePath,
        /// The signatures, `keyname:base64`.
        sigs: BTreeSet<String>,
    },
    /// 38.
    NarFromPath(StorePath),
    /// 39: the NAR follows (raw before 1.21 is not served; tunnelled at 1.21 and 1.22,
    /// framed from 1.23 on).
    AddToStoreNar {
        /// The path and what the client claims about it.
        info: Box<AddToStoreNar>,
        /// Repair an existing path.
        repair: bool,
        /// The client asks not to check signatures.
        dont_check_sigs: bool,
    },
    /// 40.
    QueryMissing(Vec<DerivedPath>),
    /// 41.
    QueryDerivationOutputMap(StorePath),
    /// 42: the realisation (JSON from 1.31 on; `id` and output path before).
    RegisterDrvOutput(Vec<String>),
    /// 43: a DrvOutput id, `sha256:<hex>!out`.
    QueryRealisation(String),
    /// 44: a framed stream of paths and their NARs follows.
    AddMultipleToStore {
        /// Repair existing paths.
        repair: bool,
        /// The client asks not to check signatures.
        dont_check_sigs: bool,
    },
    /// 45: a framed log follows (the path is sent as a base name).
    AddBuildLog(StorePath),
    /// 46.
    BuildPathsWithResults {
        /// The paths, in the client's order.
        paths: Vec<DerivedPath>,
        /// How to build.
        mode: BuildMode,
    },
    /// 47.
    AddPermRoot {
        /// The path.
        path: StorePath,
        /// The root's location on the server.
        gc_root: String,
    },
}

/// The content-address method and hash of AddToStore from 1.25 on.
fn parse_method(s: &str, offset: usize) -> ReadResult<(ContentAddressMethod, HashAlgo)> {
    let rest = s.strip_prefix("fixed:").unwrap_or(s);
    let bad = || WorkerError::Malformed {
        field: "content-address method",
        offset,
        reason: format!("{s:?} is not text:sha256, fixed:<algo> or fixed:r:<algo>"),
    };
    if rest.len() == s.len() && !s.starts_with("text:") {
        return Err(bad().into());
    }
    ContentAddressMethod::parse_with_algo(rest).map_err(|_| bad().into())
}

fn render_method(method: ContentAddressMethod, algo: HashAlgo) -> String {
    match method {
        ContentAddressMethod::Text => method.render_with_algo(algo),
        _ => format!("fixed:{}", method.render_with_algo(algo)),
    }
}

fn read_algo(r: &mut Reader<'_>, limits: &wire::Limits) -> ReadResult<HashAlgo> {
    let offset = r.position();
    let s = r.str("hashAlgo", limits.max_short_string_len)?;
    HashAlgo::parse(s).map_err(|e| {
        WorkerError::Malformed {
            field: "hashAlgo",
            offset,
            reason: e.to_string(),
        }
        .into()
    })
}

impl Request {
    /// The opcode of this request.
    pub fn opcode(&self) -> Opcode {
        match self {
            Request::IsValidPath(_) => Opcode::IsValidPath,
            Request::HasSubstitutes(_) => Opcode::HasSubstitutes,
            Request::QueryReferrers(_) => Opcode::QueryReferrers,
            Request::AddToStore { .. } => Opcode::AddToStore,
            Request::AddTextToStore { .. } => Opcode::AddTextToStore,
            Request::BuildPaths { .. } => Opcode::BuildPaths,
            Request::EnsurePath(_) => Opcode::EnsurePath,
            Request::AddTempRoot(_) => Opcode::AddTempRoot,
            Request::AddIndirectRoot(_) => Opcode::AddIndirectRoot,
            Request::SyncWithGC => Opcode::SyncWithGC,
            Request::FindRoots => Opcode::FindRoots,
            Request::SetOptions(_) => Opcode::SetOptions,
            Request::CollectGarbage { .. } => Opcode::CollectGarbage,
            Request::QuerySubstitutablePathInfo(_) => Opcode::QuerySubstitutablePathInfo,
            Request::QueryDerivationOutputs(_) => Opcode::QueryDerivationOutputs,
            Request::QueryAllValidPaths => Opcode::QueryAllValidPaths,
            Request::QueryPathInfo(_) => Opcode::QueryPathInfo,
            Request::QueryDerivationOutputNames(_) => Opcode::QueryDerivationOutputNames,
            Request::QueryPathFromHashPart(_) => Opcode::QueryPathFromHashPart,
            Request::QuerySubstitutablePathInfos(_) => Opcode::QuerySubstitutablePathInfos,
            Request::QueryValidPaths { .. } => Opcode::QueryValidPaths,
            Request::QuerySubstitutablePaths(_) => Opcode::QuerySubstitutablePaths,
            Request::QueryValidDerivers(_) => Opcode::QueryValidDerivers,
            Request::OptimiseStore => Opcode::OptimiseStore,
            Request::VerifyStore { .. } => Opcode::VerifyStore,
            Request::BuildDerivation { .. } => Opcode::BuildDerivation,
            Request::AddSignatures { .. } => Opcode::AddSignatures,
            Request::NarFromPath(_) => Opcode::NarFromPath,
            Request::AddToStoreNar { .. } => Opcode::AddToStoreNar,
            Request::QueryMissing(_) => Opcode::QueryMissing,
            Request::QueryDerivationOutputMap(_) => Opcode::QueryDerivationOutputMap,
            Request::RegisterDrvOutput(_) => Opcode::RegisterDrvOutput,
            Request::QueryRealisation(_) => Opcode::QueryRealisation,
            Request::AddMultipleToStore { .. } => Opcode::AddMultipleToStore,
            Request::AddBuildLog(_) => Opcode::AddBuildLog,
            Request::BuildPathsWithResults { .. } => Opcode::BuildPathsWithResults,
            Request::AddPermRoot { .. } => Opcode::AddPermRoot,
        }
    }

    /// Reads a whole request, opcode first, as a client of negotiated version `v` sends it.
    pub fn read(r: &mut Reader<'_>, v: WorkerVersion, limits: &super::Limits) -> ReadResult<Self> {
        let op = Opcode::from_wire(r.u64()?)?;
        Self::read_args(op, r, v, limits)
    }

    /// Reads the arguments of `op`.
    pub fn read_args(
        op: Opcode,
        r: &mut Reader<'_>,
        v: WorkerVersion,
        limits: &super::Limits,
    ) -> ReadResult<Self> {
        let w = &limits.wire;
        let short = w.max_short_string_len;
        let path = |r: &mut Reader<'_>| store_path(r, "path", w);
        Ok(match op {
            Opcode::IsValidPath => Request::IsValidPath(path(r)?),
            Opcode::HasSubstitutes => Request::HasSubstitutes(path(r)?),
            Opcode::QueryReferrers => Request::QueryReferrers(path(r)?),
            Opcode::AddToStore if v >= WorkerVersion::V1_25 => {
                let name = r.str("name", short)?.to_owned();
                let offset = r.position();
                let (method, algo) = parse_method(r.str("camStr", short)?, offset)?;
                let references = store_path_set(r, "references", w)?;
                let repair = r.bool("repair")?;
                Request::AddToStore {
                    name,
                    form: AddToStoreForm::Addressed {
                        method,
                        algo,
                        references,
                        repair,
                    },
                }
            }
            Opcode::AddToStore => {
                let name = r.str("baseName", short)?.to_owned();
                let fixed = r.u64()?;
                let recursive = r.bool("recursive")?;
                let algo = read_algo(r, w)?;
                Request::AddToStore {
                    name,
                    form: AddToStoreForm::Legacy {
                        fixed,
                        recursive,
                        algo,
                    },
                }
            }
            Opcode::AddTextToStore => Request::AddTextToStore {
                name: r.str("suffix", short)?.to_owned(),
                text: r.bytes("text", w.max_string_len)?.to_vec(),
                references: store_path_set(r, "references", w)?,
            },
            Opcode::BuildPaths => Request::BuildPaths {
                paths: DerivedPath::read_list(r, v, w)?,
                mode: BuildMode::read(r)?,
            },
            Opcode::BuildPathsWithResults => Request::BuildPathsWithResults {
                paths: DerivedPath::read_list(r, v, w)?,
                mode: BuildMode::read(r)?,
            },
            Opcode::EnsurePath => Request::EnsurePath(path(r)?),
            Opcode::AddTempRoot => Request::AddTempRoot(path(r)?),
            Opcode::AddIndirectRoot => Request::AddIndirectRoot(r.str("path", short)?.to_owned()),
            Opcode::SyncWithGC => Request::SyncWithGC,
            Opcode::FindRoots => Request::FindRoots,
            Opcode::SetOptions => Request::SetOptions(Box::new(ClientOptions::read(r, w)?)),
            Opcode::CollectGarbage => {
                let action = r.u64()?;
                let paths = store_path_set(r, "pathsToDelete", w)?;
                let ignore_liveness = r.u64()?;
                let max_freed = r.u64()?;
                for _ in 0..3 {
                    r.u64()?;
                }
                Request::CollectGarbage {
                    action,
                    paths,
                    ignore_liveness,
                    max_freed,
                }
            }
            Opcode::QuerySubstitutablePathInfo => Request::QuerySubstitutablePathInfo(path(r)?),
            Opcode::QueryDerivationOutputs => Request::QueryDerivationOutputs(path(r)?),
            Opcode::QueryAllValidPaths => Request::QueryAllValidPaths,
            Opcode::QueryPathInfo => Request::QueryPathInfo(path(r)?),
            Opcode::QueryDerivationOutputNames => Request::QueryDerivationOutputNames(path(r)?),
            Opcode::QueryPathFromHashPart => {
                Request::QueryPathFromHashPart(r.str("hash part", short)?.to_owned())
            }
            Opcode::QuerySubstitutablePathInfos => {
                let n = r.count("paths", w.max_list_len)?;
                let mut map = BTreeMap::new();
                for _ in 0..n {
                    let p = path(r)?;
                    let ca = match v >= WorkerVersion::V1_22 {
                        true => r.str("ca", short)?.to_owned(),
                        false => String::new(),
                    };
                    map.insert(p, ca);
                }
                Request::QuerySubstitutablePathInfos(map)
            }
            Opcode::QueryValidPaths => Request::QueryValidPaths {
                paths: store_path_set(r, "paths", w)?,
                substitute: v >= WorkerVersion::V1_27 && r.bool("substitute")?,
            },
            Opcode::QuerySubstitutablePaths => {
                Request::QuerySubstitutablePaths(store_path_set(r, "paths", w)?)
            }
            Opcode::QueryValidDerivers => Request::QueryValidDerivers(path(r)?),
            Opcode::OptimiseStore => Request::OptimiseStore,
            Opcode::VerifyStore => Request::VerifyStore {
                check_contents: r.bool("checkContents")?,
                repair: r.bool("repair")?,
            },
            Opcode::BuildDerivation => Request::BuildDerivation {
                drv_path: store_path(r, "drvPath", w)?,
                drv: Box::new(read_basic_derivation(r, w)?),
                mode: BuildMode::read(r)?,
            },
            Opcode::AddSignatures => Request::AddSignatures {
                path: path(r)?,
                sigs: r.string_set("sigs", w, short)?,
            },
            Opcode::NarFromPath => Request::NarFromPath(path(r)?),
            Opcode::AddToStoreNar => Request::AddToStoreNar {
                info: Box::new(AddToStoreNar::read(r, limits)?),
                repair: r.bool("repair")?,
                dont_check_sigs: r.bool("dontCheckSigs")?,
            },
            Opcode::QueryMissing => Request::QueryMissing(DerivedPath::read_list(r, v, w)?),
            Opcode::QueryDerivationOutputMap => Request::QueryDerivationOutputMap(path(r)?),
            Opcode::RegisterDrvOutput if v >= WorkerVersion::V1_31 => {
                Request::RegisterDrvOutput(vec![r.str("realisation", w.max_string_len)?.to_owned()])
            }
            Opcode::RegisterDrvOutput => Request::RegisterDrvOutput(vec![
                r.str("id", short)?.to_owned(),
                r.str("outPath", short)?.to_owned(),
            ]),
            Opcode::QueryRealisation => Request::QueryRealisation(r.str("id", short)?.to_owned()),
            Opcode::AddMultipleToStore => Request::AddMultipleToStore {
                repair: r.bool("repair")?,
                dont_check_sigs: r.bool("dontCheckSigs")?,
            },
            Opcode::AddBuildLog => {
                // A base name, unlike every other path of the protocol.
                let offset = r.position();
                let s = r.bytes("drvPath", short)?;
                let p = StorePath::from_base_name(s).map_err(|source| ServeError::StorePath {
                    field: "drvPath",
                    offset,
                    source,
                })?;
                Request::AddBuildLog(p)
            }
            Opcode::AddPermRoot => Request::AddPermRoot {
                path: path(r)?,
                gc_root: r.str("gcRoot", short)?.to_owned(),
            },
        })
    }

    /// Writes the request, opcode first, for negotiated version `v` (the payload that
    /// follows some requests is not part of it).
    pub fn encode(&self, v: WorkerVersion, buf: &mut impl BufMut) {
        buf.put_wire_u64(self.opcode().to_wire());
        match self {
            Request::IsValidPath(p)
            | Request::HasSubstitutes(p)
            | Request::QueryReferrers(p)
            | Request::EnsurePath(p)
            | Request::AddTempRoot(p)
            | Request::QuerySubstitutablePathInfo(p)
            | Request::QueryDerivationOutputs(p)
            | Request::QueryPathInfo(p)
            | Request::QueryDerivationOutputNames(p)
            | Request::QueryValidDerivers(p)
            | Request::NarFromPath(p)
            | Request::QueryDerivationOutputMap(p) => put_store_path(buf, p),
            Request::AddBuildLog(p) => buf.put_wire_bytes(p.base_name().as_bytes()),
            Request::AddIndirectRoot(s)
            | Request::QueryPathFromHashPart(s)
            | Request::QueryRealisation(s) => buf.put_wire_bytes(s.as_bytes()),
            Request::SyncWithGC
            | Request::FindRoots
            | Request::QueryAllValidPaths
            | Request::OptimiseStore => {}
            Request::AddToStore { name, form } => {
                buf.put_wire_bytes(name.as_bytes());
                match form {
                    AddToStoreForm::Addressed {
                        method,
                        algo,
                        references,
                        repair,
                    } => {
                        buf.put_wire_bytes(render_method(*method, *algo).as_bytes());
                        put_store_path_set(buf, references);
                        buf.put_wire_bool(*repair);
                    }
                    AddToStoreForm::Legacy {
                        fixed,
                        recursive,
                        algo,
                    } => {
                        buf.put_wire_u64(*fixed);
                        buf.put_wire_bool(*recursive);
                        buf.put_wire_bytes(algo.name().as_bytes());
                    }
                }
            }
            Request::AddTextToStore {
                name,
                text,
                references,
            } => {
                buf.put_wire_bytes(name.as_bytes());
                buf.put_wire_bytes(text);
                put_store_path_set(buf, references);
            }
            Request::BuildPaths { paths, mode }
            | Request::BuildPathsWithResults { paths, mode } => {
                DerivedPath::put_list(buf, paths, v);
                buf.put_wire_u64(mode.to_wire());
            }
            Request::SetOptions(o) => o.encode(buf),
            Request::CollectGarbage {
                action,
                paths,
                ignore_liveness,
                max_freed,
            } => {
                buf.put_wire_u64(*action);
                put_store_path_set(buf, paths);
                buf.put_wire_u64(*ignore_liveness);
                buf.put_wire_u64(*max_freed);
                for _ in 0..3 {
                    buf.put_wire_u64(0);
                }
            }
            Request::QuerySubstitutablePathInfos(map) => {
                buf.put_wire_u64(map.len() as u64);
                for (p, ca) in map {
                    put_store_path(buf, p);
                    if v >= WorkerVersion::V1_22 {
                        buf.put_wire_bytes(ca.as_bytes());
                    }
                }
            }
            Request::QueryValidPaths { paths, substitute } => {
                put_store_path_set(buf, paths);
                if v >= WorkerVersion::V1_27 {
                    buf.put_wire_bool(*substitute);
                }
            }
            Request::QuerySubstitutablePaths(paths) => put_store_path_set(buf, paths),
            Request::VerifyStore {
                check_contents,
                repair,
            } => {
                buf.put_wire_bool(*check_contents);
                buf.put_wire_bool(*repair);
            }
            Request::BuildDerivation {
                drv_path,
                drv,
                mode,
            } => {
                put_store_path(buf, drv_path);
                encode_basic_derivation(drv, buf);
                buf.put_wire_u64(mode.to_wire());
            }
            Request::AddSignatures { path, sigs } => {
                put_store_path(buf, path);
                buf.put_wire_strings(sigs);
            }
            Request::AddToStoreNar {
                info,
                repair,
                dont_check_sigs,
            } => {
                info.encode(buf);
                buf.put_wire_bool(*repair);
                buf.put_wire_bool(*dont_check_sigs);
            }
            Request::QueryMissing(paths) => DerivedPath::put_list(buf, paths, v),
            Request::RegisterDrvOutput(fields) => {
                for f in fields {
                    buf.put_wire_bytes(f.as_bytes());
                }
            }
            Request::AddMultipleToStore {
                repair,
                dont_check_sigs,
            } => {
                buf.put_wire_bool(*repair);
                buf.put_wire_bool(*dont_check_sigs);
            }
            Request::AddPermRoot { path, gc_root } => {
                put_store_path(buf, path);
                buf.put_wire_bytes(gc_root.as_bytes());
            }
        }
    }
}
