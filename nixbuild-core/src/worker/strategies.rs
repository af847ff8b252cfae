//! proptest strategies for worker-protocol values. Each takes the negotiated version and
//! generates only values that version can carry (fields it lacks are zero / empty, forms it
//! cannot express are left out), so that `read(encode(x, v), v) == x` holds for every
//! generated `x`. The value types the serve protocol shares come from its strategies.

use std::collections::BTreeSet;

use proptest::collection::{btree_map, btree_set, vec};
use proptest::prelude::*;
use proptest::strategy::Union;

use super::handshake::{ClientHello, ServerHello, Trust, WorkerVersion};
use super::request::{AddToStoreForm, BuildMode, ClientOptions, DerivedPath, Opcode};
use super::request::{OutputsSpec, Request};
use super::response::{Missing, PathInfo, Response};
use super::stderr::{ErrorInfo, LogField, StderrMessage};
use crate::content_address::strategies::content_address;
use crate::content_address::ContentAddressMethod;
use crate::derivation::strategies::basic_derivation;
use crate::hash::strategies::{hash_algo, hash_of};
use crate::hash::HashAlgo;
use crate::serve::strategies::{add_to_store_nar, output_name, signature};
use crate::serve::{BuildResult, ProtocolVersion};
use crate::store_path::strategies::{drv_path, store_path};
use crate::store_path::StorePath;
use crate::wire::strategies::{bytes, text};

/// Every version a client may send, 1.21 (Nix 2.3) to 1.38 (Nix 2.34).
pub fn version() -> impl Strategy<Value = WorkerVersion> {
    prop::sample::select(WorkerVersion::all().collect::<Vec<_>>())
}

/// A version with a value of `f(version)`, for round trips at every version.
pub fn versioned<T: std::fmt::Debug>(
    f: impl Fn(WorkerVersion) -> BoxedStrategy<T>,
) -> impl Strategy<Value = (WorkerVersion, T)> {
    version().prop_flat_map(move |v| (Just(v), f(v)))
}

fn path_set() -> impl Strategy<Value = BTreeSet<StorePath>> {
    btree_set(store_path(), 0..4)
}

/// A store path that is not a derivation.
fn non_drv_path() -> impl Strategy<Value = StorePath> {
    store_path().prop_filter("not a .drv", |p| !p.is_derivation())
}

/// A derived path a client of version `v` can send: before 1.30 an opaque `.drv` cannot be
/// told apart from all of its outputs, so it is left out.
pub fn derived_path(v: WorkerVersion) -> impl Strategy<Value = DerivedPath> {
    let opaque = match v >= WorkerVersion::V1_30 {
        true => store_path().boxed(),
        false => non_drv_path().boxed(),
    };
    prop_oneof![
        opaque.prop_map(DerivedPath::Opaque),
        drv_path().prop_map(|drv| DerivedPath::Built {
            drv,
            outputs: OutputsSpec::All
        }),
        (drv_path(), btree_set(output_name(), 1..3)).prop_map(|(drv, names)| {
            DerivedPath::Built {
                drv,
                outputs: OutputsSpec::Names(names),
            }
        }),
    ]
}

/// Any build mode.
pub fn build_mode() -> impl Strategy<Value = BuildMode> {
    prop_oneof![
        Just(BuildMode::Normal),
        Just(BuildMode::Repair),
        Just(BuildMode::Check),
    ]
}

/// SetOptions' settings.
pub fn client_options() -> impl Strategy<Value = ClientOptions> {
    (any::<[u64; 12]>(), vec((text(), text()), 0..4)).prop_map(|(n, overrides)| ClientOptions {
        keep_failed: n[0],
        keep_going: n[1],
        try_fallback: n[2],
        verbosity: n[3],
        max_build_jobs: n[4],
        max_silent_time: n[5],
        use_build_hook: n[6],
        verbose_build: n[7],
        log_type: n[8],
        print_build_trace: n[9],
        build_cores: n[10],
        use_substitutes: n[11],
        overrides,
    })
}

/// AddToStore's form at version `v`: content-addressed from 1.25 on (text only with
/// sha256), the legacy flags before.
pub fn add_to_store_form(v: WorkerVersion) -> impl Strategy<Value = AddToStoreForm> {
    if v >= WorkerVersion::V1_25 {
        let method_algo = prop_oneof![
            Just((ContentAddressMethod::Text, HashAlgo::Sha256)),
            hash_algo().prop_map(|a| (ContentAddressMethod::Flat, a)),
            hash_algo().prop_map(|a| (ContentAddressMethod::Recursive, a)),
        ];
        (method_algo, path_set(), any::<bool>())
            .prop_map(
                |((method, algo), references, repair)| AddToStoreForm::Addressed {
                    method,
                    algo,
                    references,
                    repair,
                },
            )
            .boxed()
    } else {
        (any::<u64>(), any::<bool>(), hash_algo())
            .prop_map(|(fixed, recursive, algo)| AddToStoreForm::Legacy {
                fixed,
                recursive,
                algo,
            })
            .boxed()
    }
}

/// A request with a single store path for an argument, of any such opcode.
fn path_request() -> impl Strategy<Value = Request> {
    let make: [fn(StorePath) -> Request; 13] = [
        Request::IsValidPath,
        Request::HasSubstitutes,
        Request::QueryReferrers,
        Request::EnsurePath,
        Request::AddTempRoot,
        Request::QuerySubstitutablePathInfo,
        Request::QueryDerivationOutputs,
        Request::QueryPathInfo,
        Request::QueryDerivationOutputNames,
        Request::QueryValidDerivers,
        Request::NarFromPath,
        Request::QueryDerivationOutputMap,
        Request::AddBuildLog,
    ];
    (prop::sample::select(make.to_vec()), store_path()).prop_map(|(f, p)| f(p))
}

/// Any request as a client of version `v` sends it, every opcode included.
pub fn request(v: WorkerVersion) -> impl Strategy<Value = Request> {
    let v22 = v >= WorkerVersion::V1_22;
    let v27 = v >= WorkerVersion::V1_27;
    let paths = move || vec(derived_path(v), 0..4);
    let register = match v >= WorkerVersion::V1_31 {
        true => text().prop_map(|json| vec![json]).boxed(),
        false => (text(), text()).prop_map(|(id, out)| vec![id, out]).boxed(),
    };
    let arms: Vec<BoxedStrategy<Request>> = vec![
        path_request().boxed(),
        prop_oneof![
            Just(Request::SyncWithGC),
            Just(Request::FindRoots),
            Just(Request::QueryAllValidPaths),
            Just(Request::OptimiseStore),
        ]
        .boxed(),
        text().prop_map(Request::AddIndirectRoot).boxed(),
        text().prop_map(Request::QueryPathFromHashPart).boxed(),
        text().prop_map(Request::QueryRealisation).boxed(),
        register.prop_map(Request::RegisterDrvOutput).boxed(),
        (text(), add_to_store_form(v))
            .prop_map(|(name, form)| Request::AddToStore { name, form })
            .boxed(),
        (text(), bytes(), path_set())
            .prop_map(|(name, text, references)| Request::AddTextToStore {
                name,
                text,
                references,
            })
            .boxed(),
        (paths(), build_mode())
            .prop_map(|(paths, mode)| Request::BuildPaths { paths, mode })
            .boxed(),
        (paths(), build_mode())
            .prop_map(|(paths, mode)| Request::BuildPathsWithResults { paths, mode })
            .boxed(),
        paths().prop_map(Request::QueryMissing).boxed(),
        client_options()
            .prop_map(|o| Request::SetOptions(Box::new(o)))
            .boxed(),
        (any::<u64>(), path_set(), any::<u64>(), any::<u64>())
            .prop_map(
                |(action, paths, ignore_liveness, max_freed)| Request::CollectGarbage {
                    action,
                    paths,
                    ignore_liveness,
                    max_freed,
                },
            )
            .boxed(),
        btree_map(store_path(), text(), 0..4)
            .prop_map(move |mut m| {
                if !v22 {
                    m.values_mut().for_each(String::clear);
                }
                Request::QuerySubstitutablePathInfos(m)
            })
            .boxed(),
        (path_set(), any::<bool>())
            .prop_map(move |(paths, s)| Request::QueryValidPaths {
                paths,
                substitute: v27 && s,
            })
            .boxed(),
        path_set()
            .prop_map(Request::QuerySubstitutablePaths)
            .boxed(),
        (any::<bool>(), any::<bool>())
            .prop_map(|(check_contents, repair)| Request::VerifyStore {
                check_contents,
                repair,
            })
            .boxed(),
        (drv_path(), basic_derivation(), build_mode())
            .prop_map(|(drv_path, drv, mode)| Request::BuildDerivation {
                drv_path,
                drv: Box::new(drv),
                mode,
            })
            .boxed(),
        (store_path(), btree_set(signature(), 0..3))
            .prop_map(|(path, sigs)| Request::AddSignatures { path, sigs })
            .boxed(),
        (add_to_store_nar(), any::<bool>(), any::<bool>())
            .prop_map(|(info, repair, dont_check_sigs)| Request::AddToStoreNar {
                info: Box::new(info),
                repair,
                dont_check_sigs,
            })
            .boxed(),
        (any::<bool>(), any::<bool>())
            .prop_map(|(repair, dont_check_sigs)| Request::AddMultipleToStore {
                repair,
                dont_check_sigs,
            })
            .boxed(),
        (store_path(), text())
            .prop_map(|(path, gc_root)| Request::AddPermRoot { path, gc_root })
            .boxed(),
    ];
    Union::new(arms)
}

/// A valid path's metadata (sha256 NAR hash, written as base16).
pub fn path_info() -> impl Strategy<Value = PathInfo> {
    (
        proptest::option::of(store_path()),
        hash_of(HashAlgo::Sha256),
        path_set(),
        (any::<u64>(), any::<u64>(), any::<bool>()),
        btree_set(signature(), 0..3),
        proptest::option::of(content_address()),
    )
        .prop_map(
            |(deriver, nar_hash, references, (registration_time, nar_size, ultimate), sigs, ca)| {
                PathInfo {
                    deriver,
                    nar_hash,
                    references,
                    registration_time,
                    nar_size,
                    ultimate,
                    sigs,
                    ca,
                }
            },
        )
}

/// A BuildResult as a server of version `v` sends it: times from 1.29, realisations from 1.28
/// (in the form the serve protocol's 2.6 carries, which the worker protocol shares).
pub fn build_result(v: WorkerVersion) -> impl Strategy<Value = BuildResult> {
    crate::serve::strategies::build_result(ProtocolVersion::V2_7).prop_map(move |mut r| {
        if v < WorkerVersion::V1_29 {
            r.times_built = 0;
            r.is_non_deterministic = false;
            r.start_time = 0;
            r.stop_time = 0;
        }
        if v < WorkerVersion::V1_28 {
            r.built_outputs.clear();
        }
        r
    })
}

/// Every opcode.
pub fn opcode() -> impl Strategy<Value = Opcode> {
    (0u64..=47).prop_filter_map("an opcode", |n| Opcode::from_wire(n).ok())
}

/// An answer to `op` as a server of version `v` sends it; `None` for NarFromPath, whose
/// answer is a raw NAR.
pub fn response(op: Opcode, v: WorkerVersion) -> BoxedStrategy<Option<Response>> {
    let some = |s: BoxedStrategy<Response>| s.prop_map(Some).boxed();
    match op {
        Opcode::NarFromPath => Just(None).boxed(),
        Opcode::SetOptions
        | Opcode::AddToStoreNar
        | Opcode::AddMultipleToStore
        | Opcode::RegisterDrvOutput => Just(Some(Response::Nothing)).boxed(),
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
        | Opcode::OptimiseStore => some(any::<u64>().prop_map(Response::Int).boxed()),
        // Empty maps and sets.
        Opcode::FindRoots
        | Opcode::QuerySubstitutablePathInfos
        | Opcode::QueryRealisation
        | Opcode::QuerySubstitutablePathInfo => Just(Some(Response::Int(0))).boxed(),
        Opcode::CollectGarbage => some(
            (btree_set(text(), 0..4), any::<u64>())
                .prop_map(|(paths, bytes_freed)| Response::Collected { paths, bytes_freed })
                .boxed(),
        ),
        Opcode::AddPermRoot => some(text().prop_map(Response::GcRoot).boxed()),
        Opcode::QueryValidPaths
        | Opcode::QueryReferrers
        | Opcode::QueryAllValidPaths
        | Opcode::QuerySubstitutablePaths
        | Opcode::QueryValidDerivers
        | Opcode::QueryDerivationOutputs => some(path_set().prop_map(Response::Paths).boxed()),
        Opcode::QueryDerivationOutputNames => some(
            btree_set(output_name(), 0..4)
                .prop_map(Response::Strings)
                .boxed(),
        ),
        Opcode::QueryPathFromHashPart => some(
            proptest::option::of(store_path())
                .prop_map(Response::OptPath)
                .boxed(),
        ),
        Opcode::QueryPathInfo => some(
            proptest::option::of(path_info().prop_map(Box::new))
                .prop_map(Response::PathInfo)
                .boxed(),
        ),
        Opcode::AddToStore | Opcode::AddTextToStore => {
            let info = op == Opcode::AddToStore && v >= WorkerVersion::V1_25;
            some(
                (store_path(), path_info())
                    .prop_map(move |(path, i)| Response::Added {
                        path,
                        info: info.then(|| Box::new(i)),
                    })
                    .boxed(),
            )
        }
        Opcode::QueryMissing => some(
            (
                path_set(),
                path_set(),
                path_set(),
                any::<u64>(),
                any::<u64>(),
            )
                .prop_map(|(will_build, will_substitute, unknown, d, n)| {
                    Response::Missing(Box::new(Missing {
                        will_build,
                        will_substitute,
                        unknown,
                        download_size: d,
                        nar_size: n,
                    }))
                })
                .boxed(),
        ),
        Opcode::QueryDerivationOutputMap => some(
            btree_map(output_name(), proptest::option::of(store_path()), 0..4)
                .prop_map(Response::OutputMap)
                .boxed(),
        ),
        Opcode::BuildDerivation => some(
            build_result(v)
                .prop_map(|r| Response::Build(Box::new(r)))
                .boxed(),
        ),
        Opcode::BuildPathsWithResults => some(
            vec((derived_path(v), build_result(v)), 0..3)
                .prop_map(Response::BuildResults)
                .boxed(),
        ),
    }
}

fn log_fields() -> impl Strategy<Value = Vec<LogField>> {
    vec(
        prop_oneof![
            any::<u64>().prop_map(LogField::Int),
            bytes().prop_map(LogField::String),
        ],
        0..4,
    )
}

/// An error as a server of version `v` sends it: level and traces from 1.26, the exit status
/// before.
pub fn error_info(v: WorkerVersion) -> impl Strategy<Value = ErrorInfo> {
    (any::<u64>(), bytes(), vec(bytes(), 0..3), any::<u64>()).prop_map(
        move |(level, msg, traces, status)| match v >= WorkerVersion::V1_26 {
            true => ErrorInfo {
                level,
                msg,
                traces,
                status: 1,
            },
            false => ErrorInfo {
                level: 0,
                msg,
                traces: Vec::new(),
                status,
            },
        },
    )
}

/// Any log-channel message as a server of version `v` sends it.
pub fn stderr_message(v: WorkerVersion) -> impl Strategy<Value = StderrMessage> {
    prop_oneof![
        bytes().prop_map(StderrMessage::Next),
        any::<u64>().prop_map(StderrMessage::Read),
        bytes().prop_map(StderrMessage::Write),
        Just(StderrMessage::Last),
        error_info(v).prop_map(StderrMessage::Error),
        (any::<[u64; 3]>(), bytes(), log_fields(), any::<u64>()).prop_map(
            |([id, level, kind], text, fields, parent)| StderrMessage::StartActivity {
                id,
                level,
                kind,
                text,
                fields,
                parent,
            }
        ),
        any::<u64>().prop_map(|id| StderrMessage::StopActivity { id }),
        (any::<u64>(), any::<u64>(), log_fields())
            .prop_map(|(id, kind, fields)| StderrMessage::Result { id, kind, fields }),
    ]
}

fn features() -> impl Strategy<Value = BTreeSet<String>> {
    btree_set("[a-z][a-z0-9-]{0,15}", 0..3)
}

/// The hello of a client talking to a server of version `server` (features only when both
/// speak 1.38).
pub fn client_hello(server: WorkerVersion) -> impl Strategy<Value = ClientHello> {
    (
        version(),
        features(),
        proptest::option::of(any::<u64>()),
        any::<bool>(),
    )
        .prop_map(move |(version, features, affinity, reserve_space)| {
            let v38 = WorkerVersion::negotiate(version, server) >= WorkerVersion::V1_38;
            ClientHello {
                version,
                features: if v38 { features } else { BTreeSet::new() },
                affinity,
                reserve_space,
            }
        })
}

/// The hello of a server talking to a client of version `client`: features at 1.38, the
/// version string from 1.33, the trust from 1.35 (of the negotiated version).
pub fn server_hello(client: WorkerVersion) -> impl Strategy<Value = ServerHello> {
    let trust = prop_oneof![
        Just(Trust::Unknown),
        Just(Trust::Trusted),
        Just(Trust::NotTrusted),
    ];
    (version(), features(), text(), trust).prop_map(move |(version, features, nix, trust)| {
        let v = WorkerVersion::negotiate(client, version);
        ServerHello {
            version,
            features: match v >= WorkerVersion::V1_38 {
                true => features,
                false => BTreeSet::new(),
            },
            nix_version: match v >= WorkerVersion::V1_33 {
                true => nix,
                false => String::new(),
            },
            trust: match v >= WorkerVersion::V1_35 {
                true => trust,
                false => Trust::Unknown,
            },
        }
    })
}
