//! The server-side serve request decoder. The first input byte picks the client version
//! (serve 2.0 to 2.8); the rest is decoded request after request until an error or
//! "incomplete". Each decoded request must re-encode and decode again to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nixbuild_core::serve::{Limits, ProtocolVersion, Request};

fuzz_target!(|data: &[u8]| {
    let Some((&b, mut rest)) = data.split_first() else {
        return;
    };
    let client = ProtocolVersion::from_wire(0x200 | u64::from(b % 9)).expect("major 2");
    let v = ProtocolVersion::negotiate(client);
    let limits = Limits::default();
    while let Ok(Some((req, n))) = Request::decode(rest, v, &limits) {
        let mut enc = Vec::new();
        req.encode(v, &mut enc);
        let again = Request::decode(&enc, v, &limits).expect("re-encoded request decodes");
        assert_eq!(again, Some((req.clone(), enc.len())));
        rest = &rest[n..];
        // AddToStoreNar's NAR follows its header as raw bytes.
        if let Request::AddToStoreNar(h) = &req {
            match usize::try_from(h.nar_size) {
                Ok(size) if size <= rest.len() => rest = &rest[size..],
                _ => return,
            }
        }
    }
});
