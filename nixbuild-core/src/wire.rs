//! The primitives of the Nix wire format (docs/serve-protocol.md §2): `u64`, booleans, "int"
//! fields, padded byte strings, string lists and sets.
//!
//! Decoding is sans-IO and works over a byte slice through a [`Reader`]. Every read either
//! yields a value, stops with [`Stop::Incomplete`] when the slice ends before the item does (the
//! caller retries with more bytes, from the start of the message), or fails with a
//! [`WireError`] that names the field, the byte offset and the bound that was broken. Every
//! length read from the input is checked against a caller-given bound before anything is
//! allocated, and preallocation never exceeds what the remaining input could hold, so a peer
//! claiming a 2^63-byte string gets an error, not an allocation.
//!
//! Encoding goes through [`BufMutExt`], a few extension methods over [`bytes::BufMut`].

use bytes::BufMut;

/// Why a read stopped without a value: the input ended early, or it is invalid.
///
/// `Incomplete` is not an error: it means "call again with more bytes". Decoders of other
/// modules use `Stop<TheirError>` so that one `?` carries both outcomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop<E = WireError> {
    /// The input ends before the item does.
    Incomplete,
    /// The input is invalid.
    Invalid(E),
}

impl<E> From<E> for Stop<E> {
    fn from(e: E) -> Self {
        Stop::Invalid(e)
    }
}

impl<E> Stop<E> {
    /// Converts the error side with `f`, keeping `Incomplete` as it is.
    pub fn map_invalid<F>(self, f: impl FnOnce(E) -> F) -> Stop<F> {
        match self {
            Stop::Incomplete => Stop::Incomplete,
            Stop::Invalid(e) => Stop::Invalid(f(e)),
        }
    }
}

/// The result of one read: a value, or a [`Stop`].
pub type ReadResult<T, E = WireError> = Result<T, Stop<E>>;

/// Turns a whole-message read into the driver-facing form: `Ok(Some(value))`, `Ok(None)` when
/// more bytes are needed, or the error.
pub fn complete<T, E>(r: ReadResult<T, E>) -> Result<Option<T>, E> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(Stop::Incomplete) => Ok(None),
        Err(Stop::Invalid(e)) => Err(e),
    }
}

/// Runs a whole-message decoder `f` over `buf` and advances `buf` past the message only when
/// it is complete: `Ok(Some(value))`, `Ok(None)` (need more bytes; nothing consumed) or the
/// error.
///
/// Only the first chunk of `buf` is decoded, so the buffer must be contiguous (`BytesMut`,
/// `Bytes`, `&[u8]`), as drivers keep it; a chained buffer whose first chunk ends mid-message
/// reads as incomplete.
pub fn decode_buf<B, T, E>(
    buf: &mut B,
    f: impl FnOnce(&mut Reader<'_>) -> ReadResult<T, E>,
) -> Result<Option<T>, E>
where
    B: bytes::Buf + ?Sized,
{
    let mut r = Reader::new(buf.chunk());
    let out = complete(f(&mut r));
    let n = r.position();
    if let Ok(Some(_)) = out {
        buf.advance(n);
    }
    out
}

/// Malformed wire data. Each variant names the field and the byte offset of the bad item,
/// counted from the start of the slice given to the [`Reader`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// A boolean other than 0 or 1 (Nix clients reject these too).
    #[error("{field} at offset {offset}: boolean must be 0 or 1, got {value}")]
    BadBool {
        /// The field being read.
        field: &'static str,
        /// Offset of the u64.
        offset: usize,
        /// The value found.
        value: u64,
    },
    /// An "int" field (`readInt` upstream) at or above 2^32.
    #[error("{field} at offset {offset}: value {value} does not fit in 32 bits")]
    IntTooLarge {
        /// The field being read.
        field: &'static str,
        /// Offset of the u64.
        offset: usize,
        /// The value found.
        value: u64,
    },
    /// A string longer than the caller's bound.
    #[error("{field} at offset {offset}: string of {len} bytes exceeds the limit of {max}")]
    StringTooLong {
        /// The field being read.
        field: &'static str,
        /// Offset of the length prefix.
        offset: usize,
        /// The claimed length.
        len: u64,
        /// The bound.
        max: usize,
    },
    /// A list, set or map with more elements than the caller's bound.
    #[error("{field} at offset {offset}: {count} elements exceed the limit of {max}")]
    TooManyElements {
        /// The field being read.
        field: &'static str,
        /// Offset of the count.
        offset: usize,
        /// The claimed count.
        count: u64,
        /// The bound.
        max: usize,
    },
    /// Padding after a string that is not all zero bytes.
    #[error("{field} at offset {offset}: non-zero padding")]
    NonZeroPadding {
        /// The field being read.
        field: &'static str,
        /// Offset of the padding.
        offset: usize,
    },
    /// A string that must be UTF-8 and is not.
    #[error("{field} at offset {offset}: not valid UTF-8")]
    NotUtf8 {
        /// The field being read.
        field: &'static str,
        /// Offset of the string's length prefix.
        offset: usize,
    },
}

/// Bounds on what a decoder accepts, checked before allocation.
///
/// The defaults accept real workloads: a NixOS system closure is over 10,000 paths in one
/// request, and structured-attrs derivations carry large `__json` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest general string: environment values, builder arguments, messages.
    pub max_string_len: usize,
    /// Longest short string: store paths, hashes, content addresses, signatures, names.
    pub max_short_string_len: usize,
    /// Most elements in one list, set or map (paths per request, env entries, ...).
    pub max_list_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_string_len: 64 << 20,
            max_short_string_len: 4096,
            max_list_len: 1 << 20,
        }
    }
}

/// Number of zero bytes that follow a string of `len` bytes on the wire.
pub const fn padding(len: usize) -> usize {
    (8 - len % 8) % 8
}

/// Encoded size of a string of `len` bytes: the prefix, the bytes and the padding.
pub const fn string_wire_len(len: usize) -> usize {
    8 + len + padding(len)
}

/// A cursor over a byte slice. Reads advance it only when they succeed; after a `Stop` the
/// position is unspecified and the caller restarts the message from its beginning.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// A reader at the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    /// Bytes consumed so far (the offset that errors report).
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Bytes left in the slice.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Takes the next `n` raw bytes, with no prefix or padding.
    pub fn take(&mut self, n: usize) -> ReadResult<&'a [u8]> {
        if self.remaining() < n {
            return Err(Stop::Incomplete);
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    /// Reads a little-endian `u64`.
    pub fn u64(&mut self) -> ReadResult<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    /// Reads a boolean: a `u64` that must be 0 or 1.
    pub fn bool(&mut self, field: &'static str) -> ReadResult<bool> {
        let offset = self.pos;
        match self.u64()? {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(WireError::BadBool {
                field,
                offset,
                value,
            }
            .into()),
        }
    }

    /// Reads an "int" field: a `u64` that must be below 2^32.
    pub fn int(&mut self, field: &'static str) -> ReadResult<u32> {
        let offset = self.pos;
        let value = self.u64()?;
        u32::try_from(value).map_err(|_| {
            WireError::IntTooLarge {
                field,
                offset,
                value,
            }
            .into()
        })
    }

    /// Reads a padded byte string of at most `max` bytes, borrowing it from the input.
    pub fn bytes(&mut self, field: &'static str, max: usize) -> ReadResult<&'a [u8]> {
        let offset = self.pos;
        let len = self.u64()?;
        let n = match usize::try_from(len) {
            Ok(n) if n <= max => n,
            _ => {
                return Err(WireError::StringTooLong {
                    field,
                    offset,
                    len,
                    max,
                }
                .into())
            }
        };
        let s = self.take(n)?;
        let pad_at = self.pos;
        let pad = self.take(padding(n))?;
        if pad.iter().any(|&b| b != 0) {
            return Err(WireError::NonZeroPadding {
                field,
                offset: pad_at,
            }
            .into());
        }
        Ok(s)
    }

    /// Reads a padded string of at most `max` bytes that must be UTF-8.
    pub fn str(&mut self, field: &'static str, max: usize) -> ReadResult<&'a str> {
        let offset = self.pos;
        let b = self.bytes(field, max)?;
        std::str::from_utf8(b).map_err(|_| WireError::NotUtf8 { field, offset }.into())
    }

    /// Reads the element count of a list, set or map, bounded by `max`. The caller then reads
    /// the elements; [`Reader::prealloc`] gives a safe capacity for them.
    pub fn count(&mut self, field: &'static str, max: usize) -> ReadResult<usize> {
        let offset = self.pos;
        let count = self.u64()?;
        match usize::try_from(count) {
            Ok(n) if n <= max => Ok(n),
            _ => Err(WireError::TooManyElements {
                field,
                offset,
                count,
                max,
            }
            .into()),
        }
    }

    /// A capacity for `count` elements of at least 8 wire bytes each that never exceeds what
    /// the rest of the input could hold.
    pub fn prealloc(&self, count: usize) -> usize {
        count.min(self.remaining() / 8)
    }

    /// Reads a list of byte strings, each of at most `max_len` bytes.
    pub fn bytes_list(
        &mut self,
        field: &'static str,
        limits: &Limits,
        max_len: usize,
    ) -> ReadResult<Vec<Vec<u8>>> {
        let n = self.count(field, limits.max_list_len)?;
        let mut v = Vec::with_capacity(self.prealloc(n));
        for _ in 0..n {
            v.push(self.bytes(field, max_len)?.to_vec());
        }
        Ok(v)
    }

    /// Reads a set of UTF-8 strings, each of at most `max_len` bytes; duplicates collapse.
    pub fn string_set(
        &mut self,
        field: &'static str,
        limits: &Limits,
        max_len: usize,
    ) -> ReadResult<std::collections::BTreeSet<String>> {
        let n = self.count(field, limits.max_list_len)?;
        let mut set = std::collections::BTreeSet::new();
        for _ in 0..n {
            set.insert(self.str(field, max_len)?.to_owned());
        }
        Ok(set)
    }
}

/// Encoding of the wire primitives, for any [`BufMut`].
pub trait BufMutExt: BufMut {
    /// Writes a little-endian `u64`.
    fn put_wire_u64(&mut self, n: u64) {
        self.put_u64_le(n);
    }

    /// Writes a boolean as `u64` 0 or 1.
    fn put_wire_bool(&mut self, b: bool) {
        self.put_u64_le(u64::from(b));
    }

    /// Writes a byte string: length, bytes, zero padding to a multiple of 8.
    fn put_wire_bytes(&mut self, s: &[u8]) {
        self.put_u64_le(s.len() as u64);
        self.put_slice(s);
        self.put_bytes(0, padding(s.len()));
    }

    /// Writes a list or set of strings: count, then each string.
    fn put_wire_strings<I>(&mut self, items: I)
    where
        I: IntoIterator,
        I::IntoIter: ExactSizeIterator,
        I::Item: AsRef<[u8]>,
    {
        let it = items.into_iter();
        self.put_u64_le(it.len() as u64);
        for s in it {
            self.put_wire_bytes(s.as_ref());
        }
    }
}

impl<B: BufMut + ?Sized> BufMutExt for B {}

#[cfg(any(test, feature = "test"))]
pub mod strategies {
    //! proptest strategies for wire-level values.
    use proptest::prelude::*;

    /// Arbitrary byte strings up to 40 bytes (covers every padding length).
    pub fn bytes() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), 0..40)
    }

    /// Arbitrary printable ASCII strings up to 40 bytes.
    pub fn text() -> impl Strategy<Value = String> {
        "[ -~]{0,40}"
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports failure
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn enc(f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut v = Vec::new();
        f(&mut v);
        v
    }

    #[test]
    fn string_layout_and_padding() {
        let b = enc(|v| v.put_wire_bytes(b"abc"));
        assert_eq!(b, [3, 0, 0, 0, 0, 0, 0, 0, b'a', b'b', b'c', 0, 0, 0, 0, 0]);
        let b = enc(|v| v.put_wire_bytes(b""));
        assert_eq!(b, [0; 8]);
        let b = enc(|v| v.put_wire_bytes(b"12345678"));
        assert_eq!(b.len(), 16);
        assert_eq!(string_wire_len(3), 16);
        assert_eq!(string_wire_len(8), 16);
        assert_eq!(string_wire_len(0), 8);
    }

    #[test]
    fn bool_accepts_only_zero_and_one() {
        assert_eq!(Reader::new(&1u64.to_le_bytes()).bool("f"), Ok(true));
        assert_eq!(Reader::new(&0u64.to_le_bytes()).bool("f"), Ok(false));
        let mut buf = vec![0u8; 8];
        buf.extend_from_slice(&2u64.to_le_bytes());
        let mut r = Reader::new(&buf);
        r.u64().unwrap();
        assert_eq!(
            r.bool("ultimate"),
            Err(Stop::Invalid(WireError::BadBool {
                field: "ultimate",
                offset: 8,
                value: 2
            }))
        );
    }

    #[test]
    fn int_must_fit_32_bits() {
        let max = u32::MAX as u64;
        assert_eq!(Reader::new(&max.to_le_bytes()).int("f"), Ok(u32::MAX));
        assert_eq!(
            Reader::new(&(max + 1).to_le_bytes()).int("opcode"),
            Err(Stop::Invalid(WireError::IntTooLarge {
                field: "opcode",
                offset: 0,
                value: max + 1
            }))
        );
    }

    #[test]
    fn nonzero_padding_is_rejected_with_its_offset() {
        let mut b = enc(|v| v.put_wire_bytes(b"abc"));
        b[13] = 1;
        assert_eq!(
            Reader::new(&b).bytes("name", 100),
            Err(Stop::Invalid(WireError::NonZeroPadding {
                field: "name",
                offset: 11
            }))
        );
    }

    #[test]
    fn huge_string_claim_is_an_error_before_any_allocation() {
        // A 2^63-byte claim followed by nothing: the bound check fires before the reader even
        // looks for the bytes, so it is an error, not "incomplete" and not an allocation.
        let b = (1u64 << 63).to_le_bytes();
        assert_eq!(
            Reader::new(&b).bytes("path", usize::MAX >> 1),
            Err(Stop::Invalid(WireError::StringTooLong {
                field: "path",
                offset: 0,
                len: 1 << 63,
                max: usize::MAX >> 1
            }))
        );
        let limits = Limits::default();
        assert!(matches!(
            Reader::new(&u64::MAX.to_le_bytes()).bytes_list("args", &limits, 10),
            Err(Stop::Invalid(WireError::TooManyElements { .. }))
        ));
    }

    #[test]
    fn big_count_with_little_input_preallocates_little() {
        let limits = Limits::default();
        let mut b = (limits.max_list_len as u64).to_le_bytes().to_vec();
        b.extend_from_slice(&[0u8; 16]);
        let mut r = Reader::new(&b);
        let n = r.count("paths", limits.max_list_len).unwrap();
        assert_eq!(n, limits.max_list_len);
        assert_eq!(r.prealloc(n), 2);
        assert_eq!(
            Reader::new(&b).bytes_list("paths", &limits, 10),
            Err(Stop::Incomplete)
        );
    }

    #[test]
    fn not_utf8_is_named() {
        let b = enc(|v| v.put_wire_bytes(&[0xff]));
        assert_eq!(
            Reader::new(&b).str("output name", 10),
            Err(Stop::Invalid(WireError::NotUtf8 {
                field: "output name",
                offset: 0
            }))
        );
    }

    #[test]
    fn decode_buf_advances_only_on_a_complete_value() {
        let mut b: &[u8] = &[1, 0, 0, 0, 0, 0, 0, 0, 9];
        assert_eq!(decode_buf(&mut b, |r| r.u64()), Ok(Some(1)));
        assert_eq!(b, &[9]);
        assert_eq!(decode_buf(&mut b, |r| r.u64()), Ok(None));
        assert_eq!(b, &[9]);
    }

    #[test]
    fn complete_maps_incomplete_to_none() {
        assert_eq!(complete(Reader::new(&[1, 2, 3]).u64()), Ok(None));
        assert_eq!(complete(Reader::new(&[0u8; 8]).u64()), Ok(Some(0)));
    }

    proptest! {
        #[test]
        fn string_list_round_trips_and_every_prefix_is_incomplete(
            items in proptest::collection::vec(strategies::bytes(), 0..6)
        ) {
            let b = enc(|v| v.put_wire_strings(&items));
            let limits = Limits::default();
            let mut r = Reader::new(&b);
            prop_assert_eq!(&r.bytes_list("l", &limits, 64).unwrap(), &items);
            prop_assert_eq!(r.remaining(), 0);
            for cut in 0..b.len() {
                prop_assert_eq!(
                    Reader::new(&b[..cut]).bytes_list("l", &limits, 64),
                    Err(Stop::Incomplete)
                );
            }
        }

        #[test]
        fn string_set_round_trips(items in proptest::collection::btree_set(strategies::text(), 0..6)) {
            let b = enc(|v| v.put_wire_strings(&items));
            let mut r = Reader::new(&b);
            prop_assert_eq!(r.string_set("s", &Limits::default(), 64).unwrap(), items);
            prop_assert_eq!(r.remaining(), 0);
        }

        #[test]
        fn scalars_round_trip(n in any::<u64>(), b in any::<bool>(), i in any::<u32>()) {
            let buf = enc(|v| { v.put_wire_u64(n); v.put_wire_bool(b); v.put_wire_u64(i.into()) });
            let mut r = Reader::new(&buf);
            prop_assert_eq!(r.u64(), Ok(n));
            prop_assert_eq!(r.bool("b"), Ok(b));
            prop_assert_eq!(r.int("i"), Ok(i));
        }

        #[test]
        fn readers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let limits = Limits { max_string_len: 32, max_short_string_len: 16, max_list_len: 4 };
            let _ = Reader::new(&bytes).bytes_list("l", &limits, 16);
            let _ = Reader::new(&bytes).string_set("s", &limits, 16);
            let _ = Reader::new(&bytes).bool("b");
            let _ = Reader::new(&bytes).int("i");
        }
    }
}
