//! Account names (DESIGN.md, Accounts): 1 to 64 characters of `[A-Za-z0-9._@+-]`, so that
//! `alice@laptop`, the first token of an `authorized_keys` comment, names an account as it
//! is. The same grammar holds wherever a name comes from: the relay's header, a key's comment.

/// Longest account name, in bytes.
pub const MAX_ACCOUNT_NAME: usize = 64;

/// Whether `name` is a valid account name: 1 to [`MAX_ACCOUNT_NAME`] of
/// `A-Z a-z 0-9 . _ @ + -`.
pub fn is_valid_account_name(name: &str) -> bool {
    (1..=MAX_ACCOUNT_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"._@+-".contains(&c))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn examples() {
        for ok in [
            "a",
            "alice@laptop",
            "ci+nightly",
            "A.B_C-9",
            &"x".repeat(64),
        ] {
            assert!(is_valid_account_name(ok), "{ok:?}");
        }
        for bad in ["", "a b", "a/b", "é", "a\n", "a:b", &"x".repeat(65)] {
            assert!(!is_valid_account_name(bad), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn grammar_matches_the_regex(name in "[A-Za-z0-9._@+-]{1,64}") {
            prop_assert!(is_valid_account_name(&name));
        }

        #[test]
        fn any_other_character_is_refused(
            prefix in "[a-z]{0,10}",
            bad in any::<char>().prop_filter("outside the grammar", |c| {
                !c.is_ascii_alphanumeric() && !"._@+-".contains(*c)
            }),
        ) {
            let name = format!("{prefix}{bad}");
            prop_assert!(!is_valid_account_name(&name));
        }
    }
}
