//! ATerm `.drv` parser: never panics, and whatever parses prints back to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nixbuild_core::derivation::aterm;

fuzz_target!(|data: &[u8]| {
    if let Ok(drv) = aterm::parse(data) {
        let printed = aterm::print(&drv);
        assert_eq!(printed, data);
        assert_eq!(aterm::parse(&printed).as_ref(), Ok(&drv));
    }
});
