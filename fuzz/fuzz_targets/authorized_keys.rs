//! The `authorized_keys` parser on arbitrary file contents: never panics; every key it keeps
//! is found again by lookup, under an account name of `[A-Za-z0-9._@+-]{1,64}`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nixbuild_ssh::authorized_keys::{parse_line, AuthorizedKeys, KeyTypes, SUPPORTED_KEY_TYPES};

fuzz_target!(|data: &[u8]| {
    let types = KeyTypes::from_names(SUPPORTED_KEY_TYPES).expect("supported key types");
    let keys = AuthorizedKeys::parse(data, &types);
    for line in data.split(|b| *b == b'\n') {
        if let Ok(Some(k)) = parse_line(line) {
            let account = &k.account;
            assert!((1..=64).contains(&account.len()), "{account:?}");
            assert!(account
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"._@+-".contains(&c)));
            if types.allows(&k.key) {
                assert!(keys.lookup(&k.key).is_some());
            }
        }
    }
});
