//! The SSH exec command parser (what a client asks the server to run) on arbitrary bytes:
//! never panics, and whatever it accepts is a `nix-store --serve` command whose words split
//! again to the same words.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nixbuild_ssh::exec::{parse_exec, split_words, MAX_COMMAND};

fuzz_target!(|data: &[u8]| {
    if parse_exec(data).is_ok() {
        assert!(data.len() <= MAX_COMMAND);
        let text = std::str::from_utf8(data).expect("accepted commands are UTF-8");
        let words = split_words(text).expect("accepted commands split");
        assert!(words.iter().any(|w| w == "--serve"));
        let again = words
            .iter()
            .map(|w| format!("'{}'", w.replace('\'', r"'\''")))
            .collect::<Vec<_>>()
            .join(" ");
        assert_eq!(split_words(&again).expect("re-quoted words split"), words);
    }
});
