//! What the end-to-end tests of both protocols share about a client's store: a salted
//! closure imported in one `nix-store --import`, and `nix path-info --json` parsed.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::process::{Command, Stdio};

use nixbuild_core::nar::NarNode;
use nixbuild_core::store_path::StorePath;

/// Imports `n` salted paths named `<prefix>closure-<i>` with the client's `nix-store`
/// (`import`, a `nix-store --import` command of the client's): path i references path i-1
/// and path i/2 (by name in its contents, and in its trailer). Cheap: one process, no build,
/// no hashing of large data.
pub fn import_closure(mut import: Command, prefix: &str, salt: &str, n: usize) -> Vec<StorePath> {
    let paths: Vec<StorePath> = (0..n)
        .map(|i| {
            super::test_path(
                &format!("{prefix}{salt}-{i}"),
                &format!("{prefix}closure-{i}"),
            )
        })
        .collect();
    let entries: Vec<_> = paths
        .iter()
        .enumerate()
        .map(|(i, path)| {
            let refs: BTreeSet<StorePath> = if i == 0 {
                BTreeSet::new()
            } else {
                [paths[i - 1].clone(), paths[i / 2].clone()].into()
            };
            let mut contents = format!("{salt} {i}\n");
            for r in &refs {
                contents.push_str(&format!("{}\n", r.to_absolute()));
            }
            let nar = NarNode::File {
                executable: false,
                contents: contents.into_bytes(),
            }
            .to_nar()
            .expect("nar");
            (path.clone(), nar, refs)
        })
        .collect();
    let stream = super::export_stream(&entries);
    let mut child = import
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nix-store --import");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(&stream)
        .expect("write the export stream");
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "nix-store --import: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    paths
}

/// narHash, narSize and references of one path, from `nix path-info --json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    /// `narHash`, as printed.
    pub nar_hash: String,
    /// `narSize`.
    pub nar_size: u64,
    /// `references`, as printed.
    pub references: BTreeSet<String>,
}

/// Parses `nix path-info --json` output (an array of objects with `path` up to Nix 2.18, an
/// object keyed by path since); invalid paths are left out.
pub fn parse_infos(json: &[u8]) -> BTreeMap<String, Info> {
    let v: serde_json::Value = serde_json::from_slice(json)
        .unwrap_or_else(|e| panic!("path-info JSON ({e}): {}", String::from_utf8_lossy(json)));
    let entries: Vec<(String, &serde_json::Value)> = match &v {
        serde_json::Value::Array(a) => a
            .iter()
            .map(|e| (e["path"].as_str().expect("path").to_owned(), e))
            .collect(),
        serde_json::Value::Object(o) => o.iter().map(|(k, e)| (k.clone(), e)).collect(),
        other => panic!("unexpected path-info JSON: {other}"),
    };
    let mut out = BTreeMap::new();
    for (path, e) in entries {
        if e.is_null() || e.get("valid") == Some(&serde_json::Value::Bool(false)) {
            continue;
        }
        let refs = e["references"].as_array().expect("references");
        out.insert(
            path,
            Info {
                nar_hash: e["narHash"].as_str().expect("narHash").to_owned(),
                nar_size: e["narSize"].as_u64().expect("narSize"),
                references: refs
                    .iter()
                    .map(|r| r.as_str().expect("reference").to_owned())
                    .collect(),
            },
        );
    }
    out
}
