//! The Nix Archive (NAR) format (docs/serve-protocol.md §7), sans-IO.
//!
//! - [`NarReader`]: a push-based streaming parser. It is fed chunks of any size, yields
//!   [`NarEvent`]s with file contents borrowed from the input, enforces every rule of the
//!   strict (Nix ≥ 2.35) parser, and never consumes a byte past the end of the NAR, so a NAR
//!   embedded in a larger stream (the NIXE export format) can be delimited.
//! - [`NarValidator`]: the reader plus sha256 and size, the path every import takes.
//! - [`NarWriter`]: produces the canonical NAR from calls that mirror the events, and refuses
//!   anything non-canonical.
//! - [`NarNode`]: a small in-memory tree, for tests and fuzzing.

mod reader;
mod tree;
mod validator;
mod writer;

pub use reader::{NarError, NarEvent, NarReader};
pub use tree::NarNode;
pub use validator::{NarSummary, NarValidator};
pub use writer::{NarWriteError, NarWriter};

/// The magic string every NAR starts with.
pub const NAR_MAGIC: &[u8] = b"nix-archive-1";
/// Longest entry name the strict parser accepts, in bytes.
pub const MAX_NAME_LEN: usize = 255;
/// Longest symlink target the strict parser accepts, in bytes.
pub const MAX_TARGET_LEN: usize = 4095;
/// Nodes nested this deep or deeper (the root is at depth 0) are rejected.
pub const MAX_DEPTH: usize = 64;

/// Checks an entry name against docs/serve-protocol.md §7; on failure says what is wrong with it.
pub fn check_name(name: &[u8]) -> Result<(), &'static str> {
    if name.is_empty() {
        Err("empty name")
    } else if name == b"." || name == b".." {
        Err("name is `.` or `..`")
    } else if name.len() > MAX_NAME_LEN {
        Err("name longer than 255 bytes")
    } else if name.contains(&b'/') {
        Err("name contains `/`")
    } else if name.contains(&0) {
        Err("name contains NUL")
    } else {
        Ok(())
    }
}

/// Checks a symlink target against docs/serve-protocol.md §7; on failure says what is wrong with
/// it.
pub fn check_target(target: &[u8]) -> Result<(), &'static str> {
    if target.is_empty() {
        Err("empty symlink target")
    } else if target.len() > MAX_TARGET_LEN {
        Err("symlink target longer than 4095 bytes")
    } else if target.contains(&0) {
        Err("symlink target contains NUL")
    } else {
        Ok(())
    }
}

/// Number of zero bytes that pad a string of `len` bytes to a multiple of 8.
fn padding(len: u64) -> usize {
    // The value is below 8, so the cast cannot truncate.
    (len.wrapping_neg() % 8) as usize
}

/// Renders bytes from a NAR for an error message, escaping anything not printable ASCII and
/// cutting long values short.
fn show(bytes: &[u8]) -> String {
    const MAX: usize = 64;
    let mut s: String = bytes[..bytes.len().min(MAX)]
        .escape_ascii()
        .map(char::from)
        .collect();
    if bytes.len() > MAX {
        s.push_str("...");
    }
    s
}

#[cfg(any(test, feature = "test"))]
pub mod strategies {
    //! proptest strategies for NAR trees.
    use super::NarNode;
    use proptest::collection::{btree_map, vec};
    use proptest::prelude::*;

    /// A valid entry name: mostly short names mixing lower and upper case, digits, dots and
    /// bytes ≥ 0x80 (so byte order differs from locale order), sometimes up to 255 bytes.
    pub fn arb_name() -> impl Strategy<Value = Vec<u8>> {
        let byte = prop_oneof![
            4 => prop::sample::select(b"abcXYZ019._-".to_vec()),
            1 => 0x80u8..=0xff,
            1 => 1u8..=0x7f,
        ]
        .prop_filter("no slash", |b| *b != b'/');
        prop_oneof![
            8 => vec(byte.clone(), 1..8),
            1 => vec(byte, 200..=255),
        ]
        .prop_filter("valid name", |n| super::check_name(n).is_ok())
    }

    /// A valid symlink target (anything without NUL, 1 to 4095 bytes, usually short).
    pub fn arb_target() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            8 => vec(1u8..=0xff, 1..40),
            1 => vec(1u8..=0xff, 4000..=4095),
        ]
    }

    /// File contents: usually small, sometimes empty, occasionally over 64 KiB.
    pub fn arb_contents() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            2 => Just(Vec::new()),
            8 => vec(any::<u8>(), 1..100),
            1 => (65_537usize..140_000, any::<u8>())
                .prop_map(|(len, seed)| (0..len).map(|i| (i as u8).wrapping_mul(seed | 1)).collect()),
        ]
    }

    /// A leaf: a regular or executable file, or a symlink.
    pub fn arb_leaf() -> impl Strategy<Value = NarNode> {
        prop_oneof![
            3 => (any::<bool>(), arb_contents())
                .prop_map(|(executable, contents)| NarNode::File { executable, contents }),
            1 => arb_target().prop_map(|target| NarNode::Symlink { target }),
        ]
    }

    /// A tree of up to four directory levels with up to six entries per directory.
    pub fn arb_nar_node() -> impl Strategy<Value = NarNode> {
        arb_leaf().prop_recursive(4, 32, 6, |inner| {
            btree_map(arb_name(), inner, 0..6).prop_map(NarNode::Directory)
        })
    }
}

#[cfg(test)]
mod tests;
