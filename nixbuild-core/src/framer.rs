//! Finding where a request ends without decoding it, resumably, so that a protocol session
//! (serve or worker) decodes each request once, when all of it is there, however many pieces
//! it arrives in.
//!
//! A request's layout is a short list of [`Field`]s: enough to step over it by its length
//! prefixes. [`Framer::advance`] remembers how far it got, so each input byte is looked at
//! once. Anything it cannot step over (an unknown opcode, a refused command, a length or
//! count over the limits) ends the scan early and leaves the error to the decoder, as soon as
//! the offending length or count is in: strings that are short by nature (store paths, output
//! names, hashes, content addresses, signatures) are held to `max_short_string_len`, so a
//! bogus multi-MiB "path" is refused after its 8-byte prefix.

use std::borrow::Cow;

use crate::wire::{padding, Limits};

/// The shape of one part of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Field {
    /// `n` plain u64s.
    U64s(usize),
    /// One string.
    Str(Len),
    /// A count, then `count × n` strings (a list, a set, or a map with `n - 1` values).
    List(u64, Len),
    /// The legacy signature of an export trailer: a flag, and a string when it is 1.
    Signature,
}

/// Which limit a string is held to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Len {
    /// `max_short_string_len`: store paths, names, hashes, content addresses, signatures.
    Short,
    /// `max_string_len`: builder, arguments, environment, text.
    Long,
}

use Field::{List, Signature, Str, U64s};
use Len::{Long, Short};

/// A request's fields after its opcode, in wire order.
pub(crate) type Layout = Cow<'static, [Field]>;

/// A resumable scan for the end of the request at the start of the input.
#[derive(Debug, Clone, Default)]
pub(crate) struct Framer {
    /// Bytes of the request stepped over so far.
    pub(crate) pos: usize,
    /// The layout, once the opcode is in.
    fields: Option<Layout>,
    /// The field being stepped over.
    field: usize,
    /// Strings left in the current list, once its count is in.
    left: Option<u64>,
}

impl Framer {
    /// A scan for a message with no opcode, laid out as `fields`, from its first byte.
    pub(crate) fn with_layout(fields: &'static [Field]) -> Self {
        Framer {
            fields: Some(Cow::Borrowed(fields)),
            ..Framer::default()
        }
    }

    /// Steps over what `input` (the request's bytes so far, from its first byte) allows.
    /// Until the layout is known, the first u64 is the opcode and `layout` gives its fields,
    /// or `None` when the decoder should run at once because it will refuse the opcode.
    /// Returns true when the whole request is present, or when the decoder should run anyway
    /// because it will fail; false when more bytes are needed.
    pub(crate) fn advance(
        &mut self,
        input: &[u8],
        limits: &Limits,
        layout: impl FnOnce(u64) -> Option<Layout>,
    ) -> bool {
        if self.fields.is_none() {
            let Some(n) = u64_at(input, 0) else {
                return false;
            };
            let Some(fields) = layout(n) else {
                return true;
            };
            self.pos = 8;
            self.fields = Some(fields);
        }
        let Some(fields) = &self.fields else {
            return true;
        };
        while let Some(&field) = fields.get(self.field) {
            let step = match field {
                U64s(n) => Step::Skip(8 * n),
                Str(len) => string_len(input, self.pos, len, limits),
                Signature => match u64_at(input, self.pos) {
                    None => Step::Wait,
                    Some(1) => match string_len(input, self.pos + 8, Long, limits) {
                        Step::Skip(n) => Step::Skip(8 + n),
                        other => other,
                    },
                    Some(_) => Step::Skip(8),
                },
                List(per_item, len) => match self.left {
                    Some(0) => {
                        self.left = None;
                        Step::Skip(0)
                    }
                    Some(left) => match string_len(input, self.pos, len, limits) {
                        Step::Skip(n) if self.pos + n <= input.len() => {
                            self.pos += n;
                            self.left = Some(left - 1);
                            continue;
                        }
                        other => other,
                    },
                    None => match u64_at(input, self.pos) {
                        None => Step::Wait,
                        Some(count) if count > limits.max_list_len as u64 => Step::Fail,
                        Some(count) => {
                            self.pos += 8;
                            self.left = Some(count.saturating_mul(per_item));
                            continue;
                        }
                    },
                },
            };
            match step {
                Step::Fail => return true,
                Step::Skip(n) if self.pos + n <= input.len() => {
                    self.pos += n;
                    self.field += 1;
                }
                Step::Skip(_) | Step::Wait => return false,
            }
        }
        true
    }
}

/// What the next item needs.
enum Step {
    /// It is this many bytes long.
    Skip(usize),
    /// Its length is not in yet.
    Wait,
    /// It breaks a limit; the decoder will report it.
    Fail,
}

fn u64_at(input: &[u8], pos: usize) -> Option<u64> {
    let b = input.get(pos..pos + 8)?;
    Some(u64::from_le_bytes(b.try_into().ok()?))
}

/// The wire length of the string at `pos`, held to the limit of its kind.
fn string_len(input: &[u8], pos: usize, kind: Len, limits: &Limits) -> Step {
    let max = match kind {
        Short => limits.max_short_string_len,
        Long => limits.max_string_len,
    };
    match u64_at(input, pos) {
        None => Step::Wait,
        Some(len) => match usize::try_from(len) {
            Ok(n) if n <= max => Step::Skip(8 + n + padding(n)),
            _ => Step::Fail,
        },
    }
}
