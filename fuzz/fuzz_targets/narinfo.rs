//! narinfo and `nix-cache-info` parsers: never panic, and a parsed narinfo printed and read
//! again is the same narinfo, with the same fingerprint.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nixbuild_core::binary_cache::{CacheInfo, NarInfo};

fuzz_target!(|data: &[u8]| {
    let _ = CacheInfo::parse(data);
    if let Ok(info) = NarInfo::parse(data) {
        let again = NarInfo::parse(info.to_text().as_bytes()).expect("printed narinfo parses");
        assert_eq!(again, info);
        assert_eq!(again.fingerprint(), info.fingerprint());
    }
});
