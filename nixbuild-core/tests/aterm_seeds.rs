//! Golden test over the fuzz seeds: real `.drv` files written by Nix 2.8 (and the spec's
//! tvix examples), each named after its store path.

use nixbuild_core::derivation::Derivation;
use nixbuild_core::store_path::StorePath;

#[test]
fn seeds_round_trip_and_have_their_drv_paths() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/aterm");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).expect("seed directory") {
        let path = entry.expect("dir entry").path();
        let file_name = path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("utf-8 name");
        let text = std::fs::read(&path).expect("read seed");
        let drv = Derivation::from_aterm(&text).unwrap_or_else(|e| panic!("{file_name}: {e}"));
        assert_eq!(drv.to_aterm(), text, "{file_name}: print(parse(x)) == x");

        let base = file_name.strip_prefix("spec-").unwrap_or(file_name);
        let expected = StorePath::from_base_name(base.as_bytes()).expect("named after its path");
        let drv_name = expected.name().strip_suffix(".drv").expect(".drv");
        assert_eq!(drv.drv_path(drv_name), Ok(expected), "{file_name}");
        count += 1;
    }
    assert!(count >= 9, "expected the seeds in {}", dir.display());
}
