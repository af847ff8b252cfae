//! Nix's base-32 encoding ("nix32"): alphabet without `e o u t`, little-endian bit order,
//! most significant digit first (docs/serve-protocol.md §8.2).

/// The 32 digits, in value order.
pub const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Digit value of each byte, or `0xff` for bytes outside [`ALPHABET`].
const DECODE: [u8; 256] = {
    let mut table = [0xffu8; 256];
    let mut i = 0;
    while i < 32 {
        table[ALPHABET[i] as usize] = i as u8;
        i += 1;
    }
    table
};

/// Why a nix32 string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Nixbase32Error {
    /// A character outside [`ALPHABET`].
    #[error("invalid nix32 character {found:?} at position {pos}")]
    InvalidChar {
        /// The offending byte, as a char (bytes ≥ 0x80 map to U+0080..U+00FF).
        found: char,
        /// Its position in the input.
        pos: usize,
    },
    /// The string has the wrong length for the expected number of bytes.
    #[error("nix32 string has length {found}, expected {expected}")]
    BadLength {
        /// The length of the input.
        found: usize,
        /// The length that was expected.
        expected: usize,
    },
    /// Bits set beyond the last byte.
    #[error("nix32 string has bits set beyond the end of the value")]
    TrailingBits,
}

/// Number of nix32 characters that encode `n` bytes: `ceil(8n/5)`.
pub const fn encoded_len(n: usize) -> usize {
    (n * 8).div_ceil(5)
}

/// Number of bytes a nix32 string of `len` characters decodes to, if `len` is a length that
/// [`encode`] can produce.
fn decoded_len(len: usize) -> Option<usize> {
    let n = len * 5 / 8;
    (encoded_len(n) == len).then_some(n)
}

/// Encodes `bytes` in nix32.
pub fn encode(bytes: &[u8]) -> String {
    let len = encoded_len(bytes.len());
    let mut out = vec![0u8; len];
    for (n, slot) in out.iter_mut().enumerate() {
        let b = (len - 1 - n) * 5;
        let (i, j) = (b / 8, b % 8);
        // The digit may straddle two bytes; past the end the value is zero.
        let pair = u16::from(bytes[i]) | u16::from(bytes.get(i + 1).copied().unwrap_or(0)) << 8;
        *slot = ALPHABET[usize::from((pair >> j) & 31)];
    }
    // Only ALPHABET bytes were written.
    String::from_utf8(out).unwrap_or_default()
}

/// Decodes `s` into `out`, whose length must be the decoded length of `s`.
fn decode_into(s: &[u8], out: &mut [u8]) -> Result<(), Nixbase32Error> {
    let len = s.len();
    for (n, &c) in s.iter().rev().enumerate() {
        let digit = DECODE[usize::from(c)];
        if digit == 0xff {
            return Err(Nixbase32Error::InvalidChar {
                found: char::from(c),
                pos: len - 1 - n,
            });
        }
        let b = n * 5;
        let (i, j) = (b / 8, b % 8);
        out[i] |= digit << j;
        let carry = u16::from(digit) << j >> 8;
        if carry != 0 {
            match out.get_mut(i + 1) {
                Some(next) => *next |= carry as u8,
                None => return Err(Nixbase32Error::TrailingBits),
            }
        }
    }
    Ok(())
}

/// Decodes a nix32 string into exactly `N` bytes.
pub fn decode_fixed<const N: usize>(s: &[u8]) -> Result<[u8; N], Nixbase32Error> {
    let expected = encoded_len(N);
    if s.len() != expected {
        return Err(Nixbase32Error::BadLength {
            found: s.len(),
            expected,
        });
    }
    let mut out = [0u8; N];
    decode_into(s, &mut out)?;
    Ok(out)
}

/// Decodes a nix32 string of any valid length.
pub fn decode(s: &[u8]) -> Result<Vec<u8>, Nixbase32Error> {
    let n = decoded_len(s.len()).ok_or(Nixbase32Error::BadLength {
        found: s.len(),
        expected: encoded_len(s.len() * 5 / 8),
    })?;
    let mut out = vec![0u8; n];
    decode_into(s, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    #[test]
    fn golden_vectors() {
        // docs/serve-protocol.md §13.5 (tvix nixbase32.rs vectors)
        let cases = [
            ("", ""),
            ("1f", "0z"),
            (
                "8a12321522fd91efbd60ebb2481af88580f61600",
                "00bgd045z0d4icpbc2yyz4gx48ak44la",
            ),
        ];
        for (bytes, text) in cases {
            assert_eq!(encode(&hex(bytes)), text);
            assert_eq!(decode(text.as_bytes()), Ok(hex(bytes)));
        }
        let d: [u8; 20] = decode_fixed(b"00bgd045z0d4icpbc2yyz4gx48ak44la").expect("valid");
        assert_eq!(d.to_vec(), hex("8a12321522fd91efbd60ebb2481af88580f61600"));
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(
            decode(b"0e"),
            Err(Nixbase32Error::InvalidChar { found: 'e', pos: 1 })
        );
        // "zz" would need bit 8 and 9 set in a 1-byte value.
        assert_eq!(decode(b"zz"), Err(Nixbase32Error::TrailingBits));
        assert!(matches!(
            decode(b"000"),
            Err(Nixbase32Error::BadLength { found: 3, .. })
        ));
        assert_eq!(
            decode_fixed::<20>(b"00"),
            Err(Nixbase32Error::BadLength {
                found: 2,
                expected: 32
            })
        );
        // a sha256 in nix32 always starts with 0 or 1
        let mut s = encode(&[0xff; 32]).into_bytes();
        assert_eq!(s[0], b'1');
        s[0] = b'2';
        assert_eq!(decode_fixed::<32>(&s), Err(Nixbase32Error::TrailingBits));
    }

    proptest! {
        #[test]
        fn round_trip(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            let s = encode(&bytes);
            prop_assert_eq!(s.len(), encoded_len(bytes.len()));
            prop_assert_eq!(decode(s.as_bytes()), Ok(bytes));
        }

        #[test]
        fn round_trip_fixed(bytes in any::<[u8; 20]>()) {
            prop_assert_eq!(decode_fixed::<20>(encode(&bytes).as_bytes()), Ok(bytes));
        }

        #[test]
        fn decode_never_panics(s in proptest::collection::vec(any::<u8>(), 0..80)) {
            if let Ok(bytes) = decode(&s) {
                let text = encode(&bytes);
                prop_assert_eq!(text.as_bytes(), &s[..]);
            }
        }

        #[test]
        fn decode_alphabet_never_panics(s in "[0-9a-z]{0,80}") {
            if let Ok(bytes) = decode(s.as_bytes()) {
                prop_assert_eq!(encode(&bytes), s);
            }
        }
    }
}
