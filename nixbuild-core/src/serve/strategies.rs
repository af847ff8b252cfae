//! proptest strategies for serve messages. Each takes the protocol version and generates only
//! values that version can carry (fields it lacks are zero / empty), so that
//! `decode(encode(x, v), v) == x` holds for every generated `x`.

use std::collections::{BTreeMap, BTreeSet};

use proptest::collection::{btree_map, btree_set, vec};
use proptest::prelude::*;

use super::build::{BuildOptions, BuildResult, BuildStatus, BuiltOutput};
use super::export::ExportTrailer;
use super::handshake::ProtocolVersion;
use super::request::{AddToStoreNar, PathWithOutputs, Request};
use super::response::{BuildPathsResult, Response, ValidPathInfo};
use crate::content_address::strategies::content_address;
use crate::derivation::strategies::basic_derivation;
use crate::hash::strategies::{hash, hash_of};
use crate::hash::HashAlgo;
use crate::store_path::strategies::{drv_path, store_path};
use crate::wire::strategies::bytes;

/// Every version a client may send, serve 2.0 to 2.8.
pub fn version() -> impl Strategy<Value = ProtocolVersion> {
    (0u64..=8).prop_map(|m| ProtocolVersion::from_wire(0x200 + m).expect("major 2"))
}

/// An output name (no `!` or `,`, which BuildPaths entries and DrvOutput ids use).
pub fn output_name() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9_-]{0,8}"
}

/// A signature-like string, including characters JSON must escape.
pub fn signature() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z.-]{1,12}:[A-Za-z0-9+/]{4,24}={0,2}",
        "[ -~\n\t\u{1}é]{0,16}"
    ]
}

fn path_set() -> impl Strategy<Value = BTreeSet<StorePath>> {
    btree_set(store_path(), 0..4)
}

use crate::store_path::StorePath;

/// BuildOptions as a client of version `v` sends them.
pub fn build_options(v: ProtocolVersion) -> impl Strategy<Value = BuildOptions> {
    (
        any::<u32>(),
        any::<u32>(),
        any::<u64>(),
        any::<u32>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(move |(a, b, c, d, e, f)| BuildOptions {
            max_silent_time: a,
            build_timeout: b,
            max_log_size: if v >= ProtocolVersion::V2_2 { c } else { 0 },
            nr_repeats: if v >= ProtocolVersion::V2_3 { d } else { 0 },
            enforce_determinism: v >= ProtocolVersion::V2_3 && e,
            keep_failed: v >= ProtocolVersion::V2_7 && f,
        })
}

/// Any BuildStatus.
pub fn build_status() -> impl Strategy<Value = BuildStatus> {
    (0u64..15).prop_map(|n| BuildStatus::from_wire(n).expect("0..15"))
}

/// A BuildResult as a server of version `v` sends it.
pub fn build_result(v: ProtocolVersion) -> impl Strategy<Value = BuildResult> {
    let outputs = btree_map(
        output_name(),
        (
            proptest::option::of(hash_of(HashAlgo::Sha256)),
            store_path(),
            btree_set(signature(), 0..3),
        ),
        0..3,
    );
    (
        build_status(),
        bytes(),
        (any::<u32>(), any::<bool>(), any::<u64>(), any::<u64>()),
        outputs,
    )
        .prop_map(move |(status, error_msg, (tb, nd, start, stop), outs)| {
            let v23 = v >= ProtocolVersion::V2_3;
            let built_outputs = if v >= ProtocolVersion::V2_6 {
                outs.into_iter()
                    .map(|(name, (h, out_path, signatures))| {
                        let drv_hash = h.filter(|_| v < ProtocolVersion::V2_8);
                        let o = BuiltOutput {
                            drv_hash,
                            out_path,
                            signatures,
                        };
                        (name, o)
                    })
                    .collect()
            } else {
                BTreeMap::new()
            };
            BuildResult {
                status,
                error_msg,
                times_built: if v23 { tb } else { 0 },
                is_non_deterministic: v23 && nd,
                start_time: if v23 { start } else { 0 },
                stop_time: if v23 { stop } else { 0 },
                built_outputs,
            }
        })
}

/// A ValidPathInfo as a server of version `v` sends it.
pub fn valid_path_info(v: ProtocolVersion) -> impl Strategy<Value = ValidPathInfo> {
    (
        proptest::option::of(store_path()),
        path_set(),
        any::<u64>(),
        any::<u64>(),
        proptest::option::of(hash()),
        proptest::option::of(content_address()),
        btree_set(signature(), 0..3),
    )
        .prop_map(
            move |(deriver, references, download_size, nar_size, h, ca, sigs)| {
                let v24 = v >= ProtocolVersion::V2_4;
                ValidPathInfo {
                    deriver,
                    references,
                    download_size,
                    nar_size,
                    nar_hash: h.filter(|_| v24),
                    ca: ca.filter(|_| v24),
                    sigs: if v24 { sigs } else { BTreeSet::new() },
                }
            },
        )
}

/// An AddToStoreNar header (sha256 NAR hash, as clients send).
pub fn add_to_store_nar() -> impl Strategy<Value = AddToStoreNar> {
    (
        (store_path(), proptest::option::of(store_path())),
        hash_of(HashAlgo::Sha256),
        path_set(),
        (any::<u64>(), 1u64..1 << 40, any::<bool>()),
        btree_set(signature(), 0..3),
        proptest::option::of(content_address()),
    )
        .prop_map(
            |((path, deriver), nar_hash, references, (rt, nar_size, ultimate), sigs, ca)| {
                AddToStoreNar {
                    path,
                    deriver,
                    nar_hash,
                    references,
                    registration_time: rt,
                    nar_size,
                    ultimate,
                    sigs,
                    ca,
                }
            },
        )
}

/// A BuildPaths entry.
pub fn path_with_outputs() -> impl Strategy<Value = PathWithOutputs> {
    prop_oneof![
        store_path().prop_map(|path| PathWithOutputs {
            path,
            outputs: BTreeSet::new()
        }),
        (drv_path(), btree_set(output_name(), 1..3))
            .prop_map(|(path, outputs)| PathWithOutputs { path, outputs }),
    ]
}

/// Any request as a client of version `v` sends it.
pub fn request(v: ProtocolVersion) -> impl Strategy<Value = Request> {
    prop_oneof![
        (any::<bool>(), any::<bool>(), path_set()).prop_map(|(lock, substitute, paths)| {
            Request::QueryValidPaths {
                lock,
                substitute,
                paths,
            }
        }),
        path_set().prop_map(|paths| Request::QueryPathInfos { paths }),
        store_path().prop_map(|path| Request::DumpStorePath { path }),
        Just(Request::ImportPaths),
        (any::<u64>(), path_set()).prop_map(|(sign, paths)| Request::ExportPaths { sign, paths }),
        (vec(path_with_outputs(), 0..3), build_options(v))
            .prop_map(|(paths, options)| Request::BuildPaths { paths, options }),
        (any::<bool>(), path_set()).prop_map(|(include_outputs, paths)| {
            Request::QueryClosure {
                include_outputs,
                paths,
            }
        }),
        (drv_path(), basic_derivation(), build_options(v)).prop_map(|(drv_path, drv, options)| {
            Request::BuildDerivation {
                drv_path,
                drv: Box::new(drv),
                options,
            }
        }),
        add_to_store_nar().prop_map(|h| Request::AddToStoreNar(Box::new(h))),
    ]
}

/// Any fixed-shape response as a server of version `v` sends it.
pub fn response(v: ProtocolVersion) -> impl Strategy<Value = Response> {
    prop_oneof![
        path_set().prop_map(Response::ValidPaths),
        btree_map(store_path(), valid_path_info(v), 0..3).prop_map(Response::PathInfos),
        Just(Response::Imported),
        Just(Response::BuildPaths(BuildPathsResult::Success)),
        (1u64..200, bytes())
            .prop_map(|(code, msg)| Response::BuildPaths(BuildPathsResult::Failure { code, msg })),
        path_set().prop_map(Response::Closure),
        build_result(v).prop_map(|r| Response::Build(Box::new(r))),
        Just(Response::Added),
    ]
}

/// An export-stream trailer.
pub fn export_trailer() -> impl Strategy<Value = ExportTrailer> {
    (
        store_path(),
        path_set(),
        proptest::option::of(store_path()),
        proptest::option::of(bytes()),
    )
        .prop_map(
            |(path, references, deriver, legacy_signature)| ExportTrailer {
                path,
                references,
                deriver,
                legacy_signature,
            },
        )
}
