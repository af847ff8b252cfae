//! Cross-check against the real Nix: for proptest-generated trees written to disk, our NAR
//! dump is byte-identical to `nix-store --dump`, and our reader parses Nix's NAR back into the
//! same tree.

#[path = "../nixbuild-core/tests/common/mod.rs"]
mod common;

use common::Nix;
use nixbuild::nar_fs::dump_path;
use nixbuild_core::nar::strategies::arb_nar_node;
use nixbuild_core::nar::NarNode;
use proptest::prelude::*;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Creates `node` at `path`.
fn materialise(node: &NarNode, path: &Path) {
    match node {
        NarNode::File {
            executable,
            contents,
        } => {
            fs::write(path, contents).expect("write file");
            let mode = if *executable { 0o755 } else { 0o644 };
            fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
        }
        NarNode::Symlink { target } => {
            std::os::unix::fs::symlink(OsStr::from_bytes(target), path).expect("symlink")
        }
        NarNode::Directory(entries) => {
            fs::create_dir(path).expect("mkdir");
            for (name, child) in entries {
                materialise(child, &path.join(OsStr::from_bytes(name)));
            }
        }
    }
}

#[test]
fn dump_matches_nix_store_dump() {
    let nix = Nix::new();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(48));
    runner
        .run(&arb_nar_node(), |tree| {
            let dir = tempfile::tempdir_in(nix.scratch()).expect("tempdir");
            let root = dir.path().join("root");
            materialise(&tree, &root);
            let theirs = nix.dump(&root);
            let mut ours = Vec::new();
            dump_path(&root, &mut ours).expect("dump");
            prop_assert!(ours == theirs, "our NAR differs from nix-store --dump");
            prop_assert_eq!(NarNode::from_nar(&theirs), Ok(tree));
            Ok(())
        })
        .expect("every tree matches Nix");
}
