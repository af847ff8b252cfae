//! The streaming NAR reader on arbitrary bytes, fed in chunks whose sizes come from the first
//! four input bytes. A NAR it accepts must re-encode, through the writer, to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nixbuild_core::nar::{NarEvent, NarReader, NarWriter};

fuzz_target!(|data: &[u8]| {
    let Some((sizes, nar)) = data.split_first_chunk::<4>() else {
        return;
    };
    let mut sizes = sizes.iter().map(|&s| usize::from(s) + 1).cycle();
    let (mut reader, mut writer, mut out) = (NarReader::new(), NarWriter::new(), Vec::new());
    let mut start = 0;
    while start < nar.len() {
        let end = nar.len().min(start + sizes.next().unwrap_or(1));
        let mut pos = start;
        loop {
            match reader.feed(&nar[pos..end]) {
                Err(_) => return,
                Ok((_, None)) => break,
                Ok((_, Some(NarEvent::End))) => {
                    assert!(writer.is_complete());
                    assert_eq!(out, nar[..reader.offset() as usize]);
                    return;
                }
                Ok((n, Some(event))) => {
                    pos += n;
                    writer.event(&event, &mut out).expect("accepted NARs are canonical");
                }
            }
        }
        start = end;
    }
});
