//! What happens to a build's outputs once the builder has exited: Nix's
//! `LocalDerivationGoal::registerOutputs` and `checkOutputs` for a sandboxed build, whose
//! output paths are known in advance (input-addressed and fixed-output derivations) or
//! computed here from what the builder wrote at temporary paths (floating content-addressed
//! derivations, [`super::floating`]).
//!
//! [`process_outputs`] takes the trees the builder left at `<scratch>/store/<base name>`,
//! owned by the build's host uid, and for every output not yet valid for the account, in the
//! order Nix does it:
//!
//! 1. requires the output to exist (`failed to produce output path`), not to be group- or
//!    world-writable unless it is a symlink, and to be owned by the build's uid (`suspicious
//!    ownership or permission`);
//! 2. canonicalises it in place like Nix's `canonicalisePathMetaData`: only regular files,
//!    directories and symlinks (`unsupported type`); extended attributes and ACLs removed
//!    (except `security.selinux`, `system.nfs4_acl` and `security.csm`, Nix's default
//!    `ignored-acls`); every node owned by the build's uid, or a hard link to a file of this
//!    build already canonicalised (`invalid ownership`); files 0444, or 0555 when the owner
//!    could execute them, directories 0555 (setuid, setgid and sticky bits are dropped, as
//!    Nix does, rather than refused); mtime 1; owner root:root. A tree deeper than a NAR may
//!    be ([`nixbuild_core::nar::MAX_DEPTH`], current Nix's bound) is refused here;
//! 3. dumps it once as a NAR ([`crate::nar_fs::dump_to`]), computing the NAR's sha256 and
//!    size and scanning it for references ([`nixbuild_core::refscan`]) to the input closure
//!    and to every output of the build, itself included (an output of 8 MiB or more is
//!    hashed on a second thread meanwhile, handed the dumper's buffers whole);
//!
//! then refuses reference cycles between the new outputs, gives floating outputs their final
//! paths (rewriting the temporary ones in the trees), checks fixed outputs (flat: a
//! non-executable regular file hashed flat; recursive: the NAR hashed with the given
//! algorithm; no references at all, as current Nix requires), applies the derivation's
//! checks (`maxSize`, `maxClosureSize`, `allowedReferences`, `allowedRequisites`,
//! `disallowedReferences` and `disallowedRequisites`, for all outputs or, with structured
//! attributes, per output; `unsafeDiscardReferences` registers an output without references),
//! and registers all new outputs for the account in one transaction
//! ([`Store::register_built`]), with the `.drv` as deriver and a content address on fixed
//! outputs. Any refusal registers nothing.
//!
//! Preconditions (the build service's side): every process of the build is gone (its pid
//! namespace has died), so nothing changes the trees while they are checked; the scratch
//! directory is on the state directory's file system, since registration renames the trees
//! into `objects/`; the build's uid is not 0.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;

use nixbuild_core::content_address::{ContentAddress, ContentAddressMethod};
use nixbuild_core::derivation::options::{DerivationOptions, OutputChecks, RefSpec};
use nixbuild_core::derivation::{fallback_output_path, output_path_name, DerivationOutput};
use nixbuild_core::hash::{Hash, HashAlgo, Hasher};
use nixbuild_core::nar::MAX_DEPTH;
use nixbuild_core::refscan::RefScanner;
use nixbuild_core::serve::{BuildStatus, ValidPathInfo};
use nixbuild_core::store_path::make_fixed_output_path;
use nixbuild_core::store_path::{StorePath, StorePathError};
use rustix::fs::{AtFlags, Gid, Uid, CWD};
use rustix::io::Errno;

use super::floating;
use crate::failpoint::failpoint;
use crate::nar_fs::{dump_to, NarFsError, NarSink, CHUNK};
use crate::store::{fsutil, BuiltPath, Store, StoreError};

/// Extended attributes left in place, as Nix's default `ignored-acls` setting.
const IGNORED_XATTRS: [&[u8]; 3] = [b"security.selinux", b"system.nfs4_acl", b"security.csm"];

/// An output the build must produce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedOutput {
    /// The output's name (`out`, `dev`, ...).
    pub name: String,
    /// Its store path, known in advance; for a floating content-addressed output, the
    /// temporary path the builder wrote it at ([`fallback_output_path`]).
    pub path: StorePath,
    /// For a fixed output: the method and the hash the contents must have (the path was
    /// already checked against it with the derivation). The hash's algorithm is the one
    /// the output is hashed with.
    pub fixed: Option<ContentAddress>,
    /// For a floating content-addressed output: the method and algorithm its final path is
    /// computed with ([`super::floating`]).
    pub floating: Option<(ContentAddressMethod, HashAlgo)>,
}

impl ExpectedOutput {
    /// The expectation for output `name` of the derivation at `drv_path`; `None` for
    /// outputs a build cannot produce (deferred, impure).
    pub fn from_derivation(
        drv_path: &StorePath,
        name: &str,
        output: &DerivationOutput,
    ) -> Option<ExpectedOutput> {
        let (path, fixed, floating) = match output {
            DerivationOutput::InputAddressed(path) => (path.clone(), None, None),
            DerivationOutput::Fixed { path, ca } => (path.clone(), Some(*ca), None),
            DerivationOutput::Floating { method, algo } => (
                fallback_output_path(drv_path, name).ok()?,
                None,
                Some((*method, *algo)),
            ),
            DerivationOutput::Deferred | DerivationOutput::Impure { .. } => return None,
        };
        Some(ExpectedOutput {
            name: name.to_owned(),
            path,
            fixed,
            floating,
        })
    }
}

/// Everything [`process_outputs`] needs to know about one finished build.
#[derive(Debug, Clone, Copy)]
pub struct OutputsRequest<'a> {
    /// The account the build ran for: the outputs are registered in its view, and the input
    /// closure must be valid in it.
    pub account: &'a str,
    /// The other accounts that joined the build (their derivation and input closure are
    /// identical to the account's, [`super::sharing`]). Each gets, from this build's own
    /// files, the outputs it does not have yet; what it has already stays its own.
    pub sharers: &'a [String],
    /// The derivation, recorded as the outputs' deriver and named in messages.
    pub drv_path: &'a StorePath,
    /// The directory the sandbox showed as `/nix/store`: output `p` is at
    /// `<scratch_store>/<base name of p>`.
    pub scratch_store: &'a Path,
    /// The host uid the builder ran as; every file of an output must be owned by it.
    pub build_uid: u32,
    /// The outputs, with distinct names and paths.
    pub outputs: &'a [ExpectedOutput],
    /// The input closure the sandbox showed: with the outputs, the paths an output may
    /// refer to.
    pub input_closure: &'a BTreeSet<StorePath>,
    /// The derivation's options: the reference and size checks on each output, and the
    /// outputs whose references are discarded.
    pub options: &'a DerivationOptions,
    /// How large the outputs may be.
    pub limits: OutputLimits,
    /// Set by the build service to stop the work (the build's time is up, no client waits
    /// for it, the server shuts down): checked for every node and every buffer dumped.
    pub abort: &'a AtomicBool,
}

/// How large the outputs of one build may be, as NARs. Checked while the outputs are walked
/// (the sizes of their files, so that a sparse file costs nothing to refuse) and while they
/// are dumped (the NAR bytes), which stops at the first byte over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputLimits {
    /// Largest NAR of one output: `[store] max_nar_size`, as for uploads.
    pub max_nar_size: u64,
    /// Most NAR bytes of all the outputs of one build: `[builds] max_output_size`.
    pub max_output_size: u64,
}

impl OutputLimits {
    /// No limit.
    pub const NONE: OutputLimits = OutputLimits {
        max_nar_size: u64::MAX,
        max_output_size: u64::MAX,
    };
}

/// One output after [`process_outputs`]: valid for the account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessedOutput {
    /// The output's name.
    pub name: String,
    /// Its store path.
    pub path: StorePath,
    /// Its metadata as the account's view of the store now holds it (NAR hash and size,
    /// references, deriver, content address).
    pub info: ValidPathInfo,
    /// Whether this build registered it; `false` when it was valid for the account already
    /// (its new files were then left in the scratch directory, unexamined, as Nix does).
    pub registered: bool,
}

/// Why the outputs of a build were refused or could not be registered. The messages of the
/// refusals are Nix's (with paths as the build saw them, under `/nix/store`), so the client
/// shows what it would show for a local build; [`OutputError::build_status`] gives the
/// status for the BuildResult.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// An output the builder did not create.
    #[error("builder for '{drv}' failed to produce output path for output '{output}' at '{path}'")]
    Missing {
        /// The derivation.
        drv: Box<StorePath>,
        /// The output's name.
        output: String,
        /// Where it should be.
        path: Box<StorePath>,
    },
    /// The root of an output is group- or world-writable (and not a symlink), or not owned
    /// by the build's uid.
    #[error(
        "suspicious ownership or permission on '{path}' for output '{output}'; rejecting this \
         build output"
    )]
    Suspicious {
        /// The output's path.
        path: Box<StorePath>,
        /// The output's name.
        output: String,
    },
    /// A node that is not a regular file, directory or symlink (a fifo, socket or device).
    #[error("file '{}' has an unsupported type", path.display())]
    UnsupportedType {
        /// The node, as the build saw it.
        path: PathBuf,
    },
    /// A node not owned by the build's uid that is not a hard link to a file of this build
    /// (say, a hard link to a file the build did not create).
    #[error("invalid ownership on file '{}'", path.display())]
    InvalidOwnership {
        /// The node, as the build saw it.
        path: PathBuf,
    },
    /// A node nested deeper than a NAR may hold (current Nix's bound and message).
    #[error("path '{}' exceeds maximum NAR directory depth of {MAX_DEPTH}", path.display())]
    TooDeep {
        /// The first node found too deep, as the build saw it.
        path: PathBuf,
    },
    /// Two outputs refer to each other, directly or through other outputs.
    #[error(
        "cycle detected in build of '{drv}' in the references of output '{output}' from \
         output '{parent}'"
    )]
    Cycle {
        /// The derivation.
        drv: Box<StorePath>,
        /// The output reached again.
        output: String,
        /// The output whose reference closed the cycle.
        parent: String,
    },
    /// A flat (or text) fixed output that is not a single non-executable regular file.
    #[error(
        "output path '{path}' should be a non-executable regular file since recursive \
         hashing is not enabled (outputHashMode=flat)"
    )]
    NotAFlatFile {
        /// The output's path.
        path: Box<StorePath>,
    },
    /// A fixed output whose contents do not have the declared hash.
    #[error(
        "hash mismatch in fixed-output derivation '{drv}':\n  specified: {}\n     got:    {}",
        specified.to_sri(),
        got.to_sri()
    )]
    HashMismatch {
        /// The derivation.
        drv: Box<StorePath>,
        /// The declared hash.
        specified: Box<Hash>,
        /// The contents' hash, with the declared method and algorithm.
        got: Box<Hash>,
    },
    /// A fixed output that refers to store paths (itself included).
    #[error(
        "fixed-output derivations must not reference store paths: '{drv}' references {count} \
         distinct paths, e.g. '{example}'"
    )]
    FixedReferences {
        /// The derivation.
        drv: Box<StorePath>,
        /// How many paths it refers to.
        count: usize,
        /// The first of them.
        example: Box<StorePath>,
    },
    /// An output or its closure is larger than the derivation's `maxSize` or
    /// `maxClosureSize` allows.
    #[error("{what} '{path}' is too large at {size} bytes; limit is {limit} bytes")]
    CheckedSize {
        /// `path` or `closure of path`.
        what: &'static str,
        /// The output's path.
        path: Box<StorePath>,
        /// Its NAR size, or its closure's.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// A reference check names something that is neither a store path nor an output.
    #[error("derivation contains an illegal reference specifier '{spec}'")]
    IllegalSpecifier {
        /// The element, lossily decoded.
        spec: String,
    },
    /// An output refers (directly or through its closure) to paths a check forbids.
    #[error(
        "output '{path}' is not allowed to refer to the following paths:{}",
        list_paths(bad)
    )]
    NotAllowed {
        /// The output's path.
        path: Box<StorePath>,
        /// The forbidden paths it refers to, in order.
        bad: BTreeSet<StorePath>,
    },
    /// A floating content-addressed output has no path with its method and references (a
    /// `flat` or `text` output may not refer to other paths, nor to itself).
    #[error("output '{output}' of '{drv}' has no content-addressed path: {source}")]
    ContentAddressed {
        /// The derivation.
        drv: Box<StorePath>,
        /// The output's name.
        output: String,
        /// Why.
        source: StorePathError,
    },
    /// Reading, changing or dumping the output trees failed on the server's side.
    #[error("{action} '{}': {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The host path concerned.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// Serialising an output as a NAR failed.
    #[error("reading output '{path}' as a NAR: {source}")]
    Dump {
        /// The output.
        path: Box<StorePath>,
        /// What went wrong.
        source: Box<NarFsError>,
    },
    /// An output, or all of them together, is larger than the server accepts.
    #[error(
        "output '{path}' of '{drv}' is too large: {what} more than {limit} bytes, the most \
         this server accepts ({setting} of the server's configuration)"
    )]
    TooLarge {
        /// The derivation.
        drv: Box<StorePath>,
        /// The output being processed when the limit was passed.
        path: Box<StorePath>,
        /// What passed it: "its files hold", "its NAR has", ...
        what: &'static str,
        /// The limit, in bytes.
        limit: u64,
        /// The setting that gives the limit.
        setting: &'static str,
    },
    /// The build service stopped the work ([`OutputsRequest::abort`]).
    #[error("processing the outputs was stopped")]
    Aborted,
    /// The store refused the registration or failed (an input not valid for the account,
    /// the database, moving the files into place).
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn list_paths(paths: &BTreeSet<StorePath>) -> String {
    paths.iter().map(|p| format!("\n  {p}")).collect()
}

impl OutputError {
    /// The BuildResult status for this error: OutputRejected (5) for the refusals of what
    /// the builder produced (what Nix reports for a builder that exited successfully), and
    /// MiscFailure (9) for the server's own failures.
    pub fn build_status(&self) -> BuildStatus {
        match self {
            OutputError::Io { .. }
            | OutputError::Dump { .. }
            | OutputError::Aborted
            | OutputError::Store(_) => BuildStatus::MiscFailure,
            _ => BuildStatus::OutputRejected,
        }
    }
}

pub(super) fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> OutputError + 'a {
    move |source| OutputError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// Checks, canonicalises, hashes and registers the outputs of a finished build (see the
/// module documentation for the steps and the preconditions), for the account and for each
/// sharer. Returns every output of `request.outputs`, in that order, as now valid for the
/// account. On error nothing is registered for the account and no object is added; the
/// trees stay in the scratch directory (perhaps canonicalised) for the caller to remove with
/// the rest of it. A sharer whose registration fails is logged and left without the outputs,
/// as after a failed copy.
///
/// The outputs processed are those that the account or a sharer does not have yet; each
/// account then gets those it lacks, with this build's files, hashes and references. An
/// output that every account has already is left unexamined, as Nix does.
///
/// Blocks (file system and store); the async daemon calls it with `spawn_blocking`.
pub fn process_outputs(
    store: &Store,
    request: &OutputsRequest<'_>,
) -> Result<Vec<ProcessedOutput>, OutputError> {
    let all: BTreeSet<StorePath> = request.outputs.iter().map(|o| o.path.clone()).collect();
    let mut needed = BTreeSet::new();
    for account in
        std::iter::once(request.account).chain(request.sharers.iter().map(String::as_str))
    {
        let valid = store.query_valid_paths(account, &all)?;
        needed.extend(all.difference(&valid).cloned());
    }
    let mut todo: Vec<&ExpectedOutput> = request
        .outputs
        .iter()
        .filter(|o| needed.contains(&o.path))
        .collect();
    todo.sort_by(|a, b| a.name.cmp(&b.name));

    let candidates = Candidates::new(request.input_closure.iter().chain(&all));
    let mut canon = Canonicaliser {
        build_uid: request.build_uid,
        seen: HashSet::new(),
        file_bytes: 0,
        output_bytes: 0,
        drv: request.drv_path,
        limits: request.limits,
        abort: request.abort,
    };
    let mut bound = DumpBound::new(request.limits, request.abort);
    let mut scanned = Vec::with_capacity(todo.len());
    for output in &todo {
        scanned.push(scan_output(
            request,
            output,
            &mut canon,
            &mut bound,
            &candidates,
        )?);
    }
    failpoint!("build-outputs-canonicalised");
    check_cycles(request.drv_path, &scanned)?;
    for out in &scanned {
        check_fixed(request.drv_path, out)?;
    }
    finalise_floating(request, &mut scanned)?;
    // Each output's path from now on: the final one of a floating output.
    let paths: BTreeMap<String, StorePath> = request
        .outputs
        .iter()
        .map(|o| (o.name.clone(), o.path.clone()))
        .chain(
            scanned
                .iter()
                .map(|o| (o.expected.name.clone(), o.expected.path.clone())),
        )
        .collect();
    check_references(store, request, &scanned, &paths)?;

    let built: Vec<BuiltPath> = scanned
        .into_iter()
        .map(|out| BuiltPath {
            path: out.expected.path.clone(),
            files: out.files,
            nar_hash: out.nar_hash,
            nar_size: out.nar_size,
            references: out.references,
            deriver: Some(request.drv_path.clone()),
            ca: out.ca,
        })
        .collect();
    failpoint!("build-before-register");
    let registered = store.register_built(request.account, &built)?;
    failpoint!("build-after-register");
    // The same paths, files and hashes for each sharer: what it lacks is registered from
    // this build (the objects placed above are found, the others moved now), what it has
    // stays as it is.
    for sharer in request.sharers {
        match store.register_built(sharer, &built) {
            Ok(fresh) => tracing::info!(
                account = %sharer,
                drv = %request.drv_path,
                outputs = fresh.iter().filter(|f| **f).count(),
                "registered the outputs of a shared build"
            ),
            Err(e) => tracing::error!(
                account = %sharer,
                drv = %request.drv_path,
                "cannot register the outputs of a shared build: {e}"
            ),
        }
    }
    let newly: HashSet<&StorePath> = built
        .iter()
        .zip(registered)
        .filter(|(_, fresh)| *fresh)
        .map(|(b, _)| &b.path)
        .collect();
    request
        .outputs
        .iter()
        .map(|o| {
            let name = o.name.clone();
            let path = paths.get(&o.name).unwrap_or(&o.path).clone();
            let info = store
                .query_path_info(request.account, &path)?
                .ok_or_else(|| StoreError::NotValid {
                    path: path.clone(),
                    account: request.account.to_owned(),
                })?;
            let registered = newly.contains(&path);
            Ok(ProcessedOutput {
                name,
                path,
                info,
                registered,
            })
        })
        .collect()
}

/// Bounds one build's output dump: the NAR bytes of each output and of all of them, and the
/// build service's abort flag, checked for every buffer.
struct DumpBound<'a> {
    limits: OutputLimits,
    abort: &'a AtomicBool,
    /// NAR bytes of the output being dumped.
    output: u64,
    /// NAR bytes of all outputs dumped so far.
    total: u64,
    /// Why the dump was stopped, once it was.
    stopped: Option<Stopped>,
}

/// Why [`DumpBound`] stopped a dump.
#[derive(Debug, Clone, Copy)]
enum Stopped {
    OutputSize,
    TotalSize,
    Aborted,
}

impl<'a> DumpBound<'a> {
    fn new(limits: OutputLimits, abort: &'a AtomicBool) -> DumpBound<'a> {
        DumpBound {
            limits,
            abort,
            output: 0,
            total: 0,
            stopped: None,
        }
    }

    /// Counts `len` more bytes of the current output's NAR; an error stops the dump.
    fn admit(&mut self, len: usize) -> io::Result<()> {
        let len = len as u64;
        self.output += len;
        self.total += len;
        self.stopped = if self.abort.load(Ordering::Relaxed) {
            Some(Stopped::Aborted)
        } else if self.output > self.limits.max_nar_size {
            Some(Stopped::OutputSize)
        } else if self.total > self.limits.max_output_size {
            Some(Stopped::TotalSize)
        } else {
            return Ok(());
        };
        Err(io::Error::other("the output dump was stopped"))
    }

    /// The error for a dump of `path` that [`DumpBound::admit`] stopped, if it did.
    fn error(&self, drv: &StorePath, path: &StorePath) -> Option<OutputError> {
        let too_large = |limit, setting| OutputError::TooLarge {
            drv: Box::new(drv.clone()),
            path: Box::new(path.clone()),
            what: "its NAR has",
            limit,
            setting,
        };
        Some(match self.stopped? {
            Stopped::Aborted => OutputError::Aborted,
            Stopped::OutputSize => too_large(self.limits.max_nar_size, MAX_NAR_SIZE_SETTING),
            Stopped::TotalSize => too_large(self.limits.max_output_size, MAX_OUTPUT_SIZE_SETTING),
        })
    }
}

/// The settings named when an output is too large.
const MAX_NAR_SIZE_SETTING: &str = "max_nar_size in [store]";
const MAX_OUTPUT_SIZE_SETTING: &str = "max_output_size in [builds], for all outputs of a build";

/// The paths an output may refer to, by hash part.
struct Candidates {
    by_hash: HashMap<String, StorePath>,
    scanner: RefScanner,
}

impl Candidates {
    fn new<'a>(paths: impl Iterator<Item = &'a StorePath>) -> Candidates {
        let by_hash: HashMap<String, StorePath> = paths
            .map(|p| (p.hash_part().to_owned(), p.clone()))
            .collect();
        let scanner = RefScanner::new(by_hash.keys())
            // Store paths' hash parts are 32 nix32 characters by construction.
            .unwrap_or_else(|e| unreachable!("a store path's hash part is refused: {e}"));
        Candidates { by_hash, scanner }
    }
}

/// One new output after its tree was checked, canonicalised and dumped.
struct Scanned {
    /// What was expected; a floating output's final path replaces the temporary one once
    /// [`finalise_floating`] has computed it.
    expected: ExpectedOutput,
    /// Its content address: a fixed output's, or a floating output's once computed.
    ca: Option<ContentAddress>,
    /// The host path of its tree.
    files: PathBuf,
    /// Whether the root is a regular file without the owner-execute bit.
    plain_file: bool,
    nar_hash: Hash,
    nar_size: u64,
    /// The hash the fixed output's content address needs, when it is not `nar_hash`.
    ca_hash: Option<Hash>,
    references: BTreeSet<StorePath>,
}

/// Steps 1 to 3 of the module documentation for one output.
fn scan_output(
    request: &OutputsRequest<'_>,
    expected: &ExpectedOutput,
    canon: &mut Canonicaliser<'_>,
    bound: &mut DumpBound<'_>,
    candidates: &Candidates,
) -> Result<Scanned, OutputError> {
    let path = &expected.path;
    let files = request.scratch_store.join(path.base_name());
    let meta = match fs::symlink_metadata(&files) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(OutputError::Missing {
                drv: Box::new(request.drv_path.clone()),
                output: expected.name.clone(),
                path: Box::new(path.clone()),
            })
        }
        Err(e) => return Err(io_err("stat", &files)(e)),
    };
    if (!meta.file_type().is_symlink() && meta.mode() & 0o022 != 0)
        || meta.uid() != request.build_uid
    {
        return Err(OutputError::Suspicious {
            path: Box::new(path.clone()),
            output: expected.name.clone(),
        });
    }
    let plain_file = meta.file_type().is_file() && meta.mode() & 0o100 == 0;
    canon.output_bytes = 0;
    canon.tree(path, &files, Path::new(&path.to_absolute()), 0)?;

    let hashers = NarHashers {
        nar: Hasher::new(HashAlgo::Sha256),
        ca: match expected.fixed {
            Some(ca)
                if ca.method == ContentAddressMethod::Recursive
                    && ca.hash.algo() != HashAlgo::Sha256 =>
            {
                Some(Hasher::new(ca.hash.algo()))
            }
            _ => None,
        },
    };
    let aside = canon.output_bytes >= HASH_ASIDE_MIN;
    bound.output = 0;
    let dumped = dump_and_hash(&files, hashers, candidates.scanner.clone(), bound, aside);
    let (nar_size, hashers, scanner) = dumped.map_err(|source| {
        bound
            .error(request.drv_path, path)
            .unwrap_or_else(|| OutputError::Dump {
                path: Box::new(path.clone()),
                source: Box::new(source),
            })
    })?;
    let references = if request.options.discards_references(&expected.name) {
        BTreeSet::new()
    } else {
        scanner
            .found()
            .into_iter()
            .filter_map(|part| {
                let part = std::str::from_utf8(part).ok()?;
                candidates.by_hash.get(part).cloned()
            })
            .collect()
    };
    Ok(Scanned {
        expected: expected.clone(),
        ca: expected.fixed,
        files,
        plain_file,
        nar_hash: hashers.nar.finish(),
        nar_size,
        ca_hash: hashers.ca.map(Hasher::finish),
        references,
    })
}

/// Outputs with at least this many bytes in regular files are hashed on a second thread
/// while the dumper reads and scans them: SHA-256 is about nine tenths of the work (0.53 of
/// 0.59 s for 1 GiB), and the rest then runs beside it instead of before it.
const HASH_ASIDE_MIN: u64 = 8 << 20;

/// The hashes an output's NAR needs: sha256, and the fixed output's algorithm when
/// different.
struct NarHashers {
    nar: Hasher,
    ca: Option<Hasher>,
}

impl NarHashers {
    fn update(&mut self, buf: &[u8]) {
        self.nar.update(buf);
        if let Some(h) = &mut self.ca {
            h.update(buf);
        }
    }
}

/// Dumps the tree at `files` once, scanning it for references and hashing it, the hashing
/// on a second thread when `aside`; returns the NAR's size.
fn dump_and_hash(
    files: &Path,
    mut hashers: NarHashers,
    scanner: RefScanner,
    bound: &mut DumpBound<'_>,
    aside: bool,
) -> Result<(u64, NarHashers, RefScanner), NarFsError> {
    if aside {
        let (full_tx, full_rx) = mpsc::sync_channel::<Vec<u8>>(2);
        let (empty_tx, empty_rx) = mpsc::channel::<Vec<u8>>();
        return std::thread::scope(|scope| {
            let hashing = std::thread::Builder::new()
                .name("nixbuild-hash".into())
                .spawn_scoped(scope, move || {
                    for mut buf in full_rx {
                        hashers.update(&buf);
                        buf.clear();
                        // The dumper may be done with its spares already.
                        let _ = empty_tx.send(buf);
                    }
                    hashers
                })
                .map_err(|source| NarFsError::Io {
                    path: files.to_owned(),
                    source,
                })?;
            let mut sink = AsideSink {
                scanner,
                bound,
                full: full_tx,
                empty: empty_rx,
            };
            let size = dump_to(files, &mut sink);
            let AsideSink { scanner, full, .. } = sink;
            // Closing the channel ends the hashing thread.
            drop(full);
            let hashers = hashing
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            Ok((size?, hashers, scanner))
        });
    }
    let mut sink = ScanSink {
        scanner,
        hashers,
        bound,
    };
    let size = dump_to(files, &mut sink)?;
    Ok((size, sink.hashers, sink.scanner))
}

/// Where a small output's NAR goes: scanned for references and hashed, in one pass.
struct ScanSink<'b, 'a> {
    scanner: RefScanner,
    hashers: NarHashers,
    bound: &'b mut DumpBound<'a>,
}

impl NarSink for ScanSink<'_, '_> {
    fn write_buffer(&mut self, buf: &mut Vec<u8>) -> io::Result<()> {
        self.bound.admit(buf.len())?;
        self.scanner.feed(buf);
        self.hashers.update(buf);
        buf.clear();
        Ok(())
    }
}

/// Where a big output's NAR goes: scanned for references here, and each full buffer handed
/// to the hashing thread whole (no copy), for one of the buffers it gives back.
struct AsideSink<'b, 'a> {
    scanner: RefScanner,
    bound: &'b mut DumpBound<'a>,
    full: mpsc::SyncSender<Vec<u8>>,
    empty: mpsc::Receiver<Vec<u8>>,
}

impl NarSink for AsideSink<'_, '_> {
    fn write_buffer(&mut self, buf: &mut Vec<u8>) -> io::Result<()> {
        self.bound.admit(buf.len())?;
        self.scanner.feed(buf);
        let spare = self
            .empty
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(CHUNK));
        self.full
            .send(std::mem::replace(buf, spare))
            .map_err(|_| io::Error::other("the hashing thread has stopped"))
    }
}

/// Nix's `canonicalisePathMetaData` with the build's uid, over all outputs of one build
/// (hard links between outputs are allowed, as in Nix), within the output limits.
struct Canonicaliser<'a> {
    build_uid: u32,
    /// (device, inode) of the files canonicalised so far.
    seen: HashSet<(u64, u64)>,
    /// Bytes in the regular files canonicalised so far (each hard-linked file once).
    file_bytes: u64,
    /// The same for the output being canonicalised.
    output_bytes: u64,
    drv: &'a StorePath,
    limits: OutputLimits,
    abort: &'a AtomicBool,
}

impl Canonicaliser<'_> {
    /// Canonicalises the node at `host` of `output`, shown in messages as `shown`, `depth`
    /// directories below the output's root. A NAR holds at least the bytes of the files'
    /// sizes, so the limits are checked against those as each file is met: a file too
    /// large (sparse or not) is refused before any of it is read.
    fn tree(
        &mut self,
        output: &StorePath,
        host: &Path,
        shown: &Path,
        depth: usize,
    ) -> Result<(), OutputError> {
        if self.abort.load(Ordering::Relaxed) {
            return Err(OutputError::Aborted);
        }
        if depth >= MAX_DEPTH {
            return Err(OutputError::TooDeep {
                path: shown.to_owned(),
            });
        }
        let meta = fs::symlink_metadata(host).map_err(io_err("stat", host))?;
        let ty = meta.file_type();
        if !(ty.is_file() || ty.is_dir() || ty.is_symlink()) {
            return Err(OutputError::UnsupportedType {
                path: shown.to_owned(),
            });
        }
        strip_xattrs(host)?;
        if meta.uid() != self.build_uid {
            // Only a second link to a file canonicalised above (now root's) may be.
            if ty.is_dir() || !self.seen.contains(&(meta.dev(), meta.ino())) {
                return Err(OutputError::InvalidOwnership {
                    path: shown.to_owned(),
                });
            }
            return Ok(());
        }
        self.seen.insert((meta.dev(), meta.ino()));
        if ty.is_file() {
            self.file_bytes += meta.len();
            self.output_bytes += meta.len();
            self.check_size(output)?;
        }
        if ty.is_symlink() {
            fsutil::set_canonical_mtime(host)?;
        } else {
            let executable = ty.is_dir() || meta.mode() & 0o100 != 0;
            fsutil::canonicalise(host, if executable { 0o555 } else { 0o444 })?;
        }
        rustix::fs::chownat(
            CWD,
            host,
            Some(Uid::ROOT),
            Some(Gid::ROOT),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| io_err("change owner of", host)(e.into()))?;
        if ty.is_dir() {
            let mut names: Vec<OsString> = Vec::new();
            for entry in fs::read_dir(host).map_err(io_err("list", host))? {
                names.push(entry.map_err(io_err("list", host))?.file_name());
            }
            names.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
            for name in names {
                self.tree(output, &host.join(&name), &shown.join(&name), depth + 1)?;
            }
        }
        Ok(())
    }

    fn check_size(&self, output: &StorePath) -> Result<(), OutputError> {
        let (limit, setting) = if self.output_bytes > self.limits.max_nar_size {
            (self.limits.max_nar_size, MAX_NAR_SIZE_SETTING)
        } else if self.file_bytes > self.limits.max_output_size {
            (self.limits.max_output_size, MAX_OUTPUT_SIZE_SETTING)
        } else {
            return Ok(());
        };
        Err(OutputError::TooLarge {
            drv: Box::new(self.drv.clone()),
            path: Box::new(output.clone()),
            what: "its files hold",
            limit,
            setting,
        })
    }
}

/// Removes the extended attributes (ACLs included) of `path`, not following a symlink,
/// except those Nix leaves by default.
fn strip_xattrs(path: &Path) -> Result<(), OutputError> {
    let failed = |e: Errno| io_err("list extended attributes of", path)(e.into());
    let len = match rustix::fs::llistxattr_query(path) {
        Ok(len) => len,
        Err(Errno::NOTSUP | Errno::NODATA) => return Ok(()),
        Err(e) => return Err(failed(e)),
    };
    if len == 0 {
        return Ok(());
    }
    // The kernel bounds a list at 64 KiB (XATTR_LIST_MAX).
    let mut names = vec![0u8; len];
    let len = rustix::fs::llistxattr(path, &mut names[..]).map_err(failed)?;
    for name in names[..len].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        if IGNORED_XATTRS.contains(&name) {
            continue;
        }
        rustix::fs::lremovexattr(path, name)
            .map_err(|e| io_err("remove an extended attribute of", path)(e.into()))?;
    }
    Ok(())
}

/// Where the cycle check's walk stands with an output.
#[derive(Clone, Copy, PartialEq)]
enum Mark {
    New,
    OnPath,
    Done,
}

/// Refuses references that make the new outputs a cycle, with Nix's message: a depth-first
/// walk over the outputs by name, each output's referenced outputs by name, reporting the
/// first output reached again while on the walk's path. Self-references do not count.
fn check_cycles(drv: &StorePath, outputs: &[Scanned]) -> Result<(), OutputError> {
    let index: BTreeMap<&StorePath, usize> = outputs
        .iter()
        .enumerate()
        .map(|(i, o)| (&o.expected.path, i))
        .collect();
    // Indices follow the names' order, so sorted indices visit children by name.
    let children: Vec<Vec<usize>> = outputs
        .iter()
        .enumerate()
        .map(|(i, o)| {
            let mut c: Vec<usize> = o
                .references
                .iter()
                .filter_map(|r| index.get(r).copied())
                .filter(|&j| j != i)
                .collect();
            c.sort_unstable();
            c
        })
        .collect();
    let mut marks = vec![Mark::New; outputs.len()];
    // `outputs` is sorted by name, so the roots are taken in Nix's order.
    for root in 0..outputs.len() {
        if marks[root] != Mark::New {
            continue;
        }
        marks[root] = Mark::OnPath;
        // (node, index of the next child to visit); iterative, so no output count can
        // exhaust the stack.
        let mut path = vec![(root, 0usize)];
        while let Some((node, next)) = path.last_mut() {
            let node = *node;
            let Some(&child) = children[node].get(*next) else {
                marks[node] = Mark::Done;
                path.pop();
                continue;
            };
            *next += 1;
            match marks[child] {
                Mark::OnPath => {
                    return Err(OutputError::Cycle {
                        drv: Box::new(drv.clone()),
                        output: outputs[child].expected.name.clone(),
                        parent: outputs[node].expected.name.clone(),
                    })
                }
                Mark::Done => {}
                Mark::New => {
                    marks[child] = Mark::OnPath;
                    path.push((child, 0));
                }
            }
        }
    }
    Ok(())
}

/// Checks a fixed output against its content address: the flat form's file type, the
/// hash, and the absence of references.
fn check_fixed(drv: &StorePath, out: &Scanned) -> Result<(), OutputError> {
    let Some(ca) = out.expected.fixed else {
        return Ok(());
    };
    let got = match ca.method {
        ContentAddressMethod::Flat | ContentAddressMethod::Text => {
            if !out.plain_file {
                return Err(OutputError::NotAFlatFile {
                    path: Box::new(out.expected.path.clone()),
                });
            }
            fsutil::hash_file(&out.files, ca.hash.algo())?
        }
        ContentAddressMethod::Recursive => out.ca_hash.unwrap_or(out.nar_hash),
    };
    if got != ca.hash {
        return Err(OutputError::HashMismatch {
            drv: Box::new(drv.clone()),
            specified: Box::new(ca.hash),
            got: Box::new(got),
        });
    }
    if let Some(example) = out.references.first() {
        return Err(OutputError::FixedReferences {
            drv: Box::new(drv.clone()),
            count: out.references.len(),
            example: Box::new(example.clone()),
        });
    }
    Ok(())
}

/// Gives each floating content-addressed output its final path ([`super::floating`]), each
/// after the outputs it refers to (there is no cycle: [`check_cycles`] ran), and rewrites
/// the temporary paths in the trees, the references and the hashes.
fn finalise_floating(
    request: &OutputsRequest<'_>,
    outputs: &mut [Scanned],
) -> Result<(), OutputError> {
    // Temporary path → final path of each output finished so far.
    let mut finals: BTreeMap<StorePath, StorePath> = BTreeMap::new();
    let mut left: Vec<usize> = (0..outputs.len())
        .filter(|&i| outputs[i].expected.floating.is_some())
        .collect();
    let temporary: BTreeSet<StorePath> = left
        .iter()
        .map(|&i| outputs[i].expected.path.clone())
        .collect();
    while !left.is_empty() {
        // The first (by name) whose references to the others are all final.
        let at = left
            .iter()
            .position(|&i| {
                let own = &outputs[i].expected.path;
                outputs[i]
                    .references
                    .iter()
                    .all(|r| r == own || !temporary.contains(r) || finals.contains_key(r))
            })
            .unwrap_or_else(|| unreachable!("check_cycles refused cycles between outputs"));
        let i = left.remove(at);
        let out = &mut outputs[i];
        let (final_path, rewrote) = finalise_one(request, out, &finals)?;
        if rewrote {
            let (nar_hash, nar_size) = nar_hash(&final_path, &out.files, request.abort)?;
            out.nar_hash = nar_hash;
            out.nar_size = nar_size;
        }
        finals.insert(out.expected.path.clone(), final_path.clone());
        out.expected.path = final_path;
    }
    Ok(())
}

/// One floating output: its final path, and whether its files changed.
fn finalise_one(
    request: &OutputsRequest<'_>,
    out: &mut Scanned,
    finals: &BTreeMap<StorePath, StorePath>,
) -> Result<(StorePath, bool), OutputError> {
    let Some((method, algo)) = out.expected.floating else {
        unreachable!("only floating outputs are finalised")
    };
    let temporary = out.expected.path.clone();
    let hash_part = |p: &StorePath| p.hash_part().as_bytes().to_vec();
    // The other outputs' temporary paths, rewritten to their final ones first.
    let others: Vec<floating::Rewrite> = out
        .references
        .iter()
        .filter_map(|r| finals.get(r).map(|f| (hash_part(r), hash_part(f))))
        .collect();
    if !others.is_empty() {
        floating::rewrite_tree(&out.files, &others, request.abort)?;
    }
    let (hash, self_reference) = floating::hash_modulo(
        &temporary,
        &out.files,
        out.plain_file,
        method,
        algo,
        temporary.hash_part().as_bytes(),
        request.abort,
    )?;
    let references: BTreeSet<StorePath> = out
        .references
        .iter()
        .filter(|r| **r != temporary)
        .map(|r| finals.get(r).unwrap_or(r).clone())
        .collect();
    let ca = ContentAddress { method, hash };
    let name = output_path_name(
        nixbuild_core::derivation::name_from_drv_path(request.drv_path),
        &out.expected.name,
    );
    let final_path =
        make_fixed_output_path(&name, &ca, &references, self_reference).map_err(|source| {
            OutputError::ContentAddressed {
                drv: Box::new(request.drv_path.clone()),
                output: out.expected.name.clone(),
                source,
            }
        })?;
    let rewrite_self = self_reference && final_path != temporary;
    if rewrite_self {
        floating::rewrite_tree(
            &out.files,
            &[(hash_part(&temporary), hash_part(&final_path))],
            request.abort,
        )?;
    }
    out.references = references;
    if self_reference {
        out.references.insert(final_path.clone());
    }
    out.ca = Some(ca);
    Ok((final_path, rewrite_self || !others.is_empty()))
}

/// The sha256 and size of the NAR of `path`'s files at `files`.
fn nar_hash(
    path: &StorePath,
    files: &Path,
    abort: &AtomicBool,
) -> Result<(Hash, u64), OutputError> {
    let mut bound = DumpBound::new(OutputLimits::NONE, abort);
    let hashers = NarHashers {
        nar: Hasher::new(HashAlgo::Sha256),
        ca: None,
    };
    let scanner = RefScanner::new(std::iter::empty::<&str>())
        .unwrap_or_else(|e| unreachable!("no hash part to refuse: {e}"));
    let (size, hashers, _) =
        dump_and_hash(files, hashers, scanner, &mut bound, false).map_err(|source| {
            bound
                .error(path, path)
                .unwrap_or_else(|| OutputError::Dump {
                    path: Box::new(path.clone()),
                    source: Box::new(source),
                })
        })?;
    Ok((hashers.nar.finish(), size))
}

/// Applies the derivation's checks to each new output, as Nix's `checkOutputs` does: its
/// NAR size and closure size, then the four reference lists (the output itself is left out
/// of its requisites only in the environment form).
fn check_references(
    store: &Store,
    request: &OutputsRequest<'_>,
    outputs: &[Scanned],
    paths: &BTreeMap<String, StorePath>,
) -> Result<(), OutputError> {
    let new: HashMap<&StorePath, (&BTreeSet<StorePath>, u64)> = outputs
        .iter()
        .map(|o| (&o.expected.path, (&o.references, o.nar_size)))
        .collect();
    for out in outputs {
        let Some(checks) = request.options.output_checks.for_output(&out.expected.name) else {
            continue;
        };
        let path = &out.expected.path;
        if let Some(limit) = checks.max_size {
            if out.nar_size > limit {
                return Err(OutputError::CheckedSize {
                    what: "path",
                    path: Box::new(path.clone()),
                    size: out.nar_size,
                    limit,
                });
            }
        }
        let needs_closure = checks.max_closure_size.is_some()
            || checks.allowed_requisites.is_some()
            || !checks.disallowed_requisites.is_empty();
        let closure = if needs_closure {
            output_closure(store, request.account, path, &new)?
        } else {
            BTreeMap::new()
        };
        if let Some(limit) = checks.max_closure_size {
            let size = closure.values().fold(0u64, |a, s| a.saturating_add(*s));
            if size > limit {
                return Err(OutputError::CheckedSize {
                    what: "closure of path",
                    path: Box::new(path.clone()),
                    size,
                    limit,
                });
            }
        }
        let mut requisites: BTreeSet<StorePath> = closure.into_keys().collect();
        if checks.ignore_self_refs {
            requisites.remove(path);
        }
        check_lists(paths, checks, path, &out.references, &requisites)?;
    }
    Ok(())
}

/// The four reference lists of `checks` on one output.
fn check_lists(
    paths: &BTreeMap<String, StorePath>,
    checks: &OutputChecks,
    path: &StorePath,
    references: &BTreeSet<StorePath>,
    requisites: &BTreeSet<StorePath>,
) -> Result<(), OutputError> {
    let lists = [
        (checks.allowed_references.as_deref(), true, references),
        (checks.allowed_requisites.as_deref(), true, requisites),
        (Some(&checks.disallowed_references[..]), false, references),
        (Some(&checks.disallowed_requisites[..]), false, requisites),
    ];
    for (list, allowed, used) in lists {
        let Some(list) = list else {
            continue;
        };
        let spec = resolve_specs(list, paths)?;
        let bad: BTreeSet<StorePath> = used
            .iter()
            .filter(|p| spec.contains(*p) != allowed)
            .cloned()
            .collect();
        if !bad.is_empty() {
            return Err(OutputError::NotAllowed {
                path: Box::new(path.clone()),
                bad,
            });
        }
    }
    Ok(())
}

/// The paths a check names: store paths as they are, output names as their `paths`.
fn resolve_specs(
    list: &[RefSpec],
    paths: &BTreeMap<String, StorePath>,
) -> Result<BTreeSet<StorePath>, OutputError> {
    list.iter()
        .map(|spec| match spec {
            RefSpec::Path(path) => Ok(path.clone()),
            RefSpec::Name(name) => paths
                .get(name)
                .cloned()
                .ok_or_else(|| OutputError::IllegalSpecifier { spec: name.clone() }),
        })
        .collect()
}

/// The closure of a new output with each path's NAR size: through the new outputs' scanned
/// references, then through the account's view of the store for everything else (inputs,
/// outputs already valid).
fn output_closure(
    store: &Store,
    account: &str,
    start: &StorePath,
    new: &HashMap<&StorePath, (&BTreeSet<StorePath>, u64)>,
) -> Result<BTreeMap<StorePath, u64>, OutputError> {
    let mut closure = BTreeMap::new();
    let mut outside = BTreeSet::new();
    let mut queue = vec![start];
    while let Some(path) = queue.pop() {
        if closure.contains_key(path) || outside.contains(path) {
            continue;
        }
        match new.get(path) {
            Some((refs, size)) => {
                closure.insert(path.clone(), *size);
                queue.extend(refs.iter());
            }
            None => {
                outside.insert(path.clone());
            }
        }
    }
    if !outside.is_empty() {
        let rest = store.query_closure(account, &outside, false)?;
        for (path, info) in store.query_path_infos(account, &rest, None)? {
            closure.insert(path, info.nar_size);
        }
    }
    Ok(closure)
}
