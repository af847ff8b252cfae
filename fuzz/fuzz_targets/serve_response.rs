//! The client-side serve response decoder, what a front reads from the machines of its
//! fleet. The first input byte picks the server version (serve 2.0 to 2.8) and the
//! opcode answered; the rest is decoded as that answer. A decoded answer must re-encode and
//! decode again to the same value; DumpStorePath and ExportPaths, whose answers are streams,
//! must be refused.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nixbuild_core::serve::{Limits, Opcode, ProtocolVersion, Response};

fuzz_target!(|data: &[u8]| {
    let Some((&b, rest)) = data.split_first() else {
        return;
    };
    let v = ProtocolVersion::from_wire(0x200 | u64::from(b % 9)).expect("major 2");
    let Ok(op) = Opcode::from_wire(u64::from(b / 9 % 9 + 1)) else {
        return;
    };
    let limits = Limits::default();
    match Response::decode(op, rest, v, &limits) {
        Ok(Some((response, _))) => {
            let mut enc = Vec::new();
            response.encode(v, &mut enc);
            let again = Response::decode(op, &enc, v, &limits).expect("re-encoded answer decodes");
            assert_eq!(again, Some((response, enc.len())));
        }
        Ok(None) => {}
        Err(_) => {}
    }
});
