//! Account names (docs/design.md, Accounts): 1 to 64 characters of `[A-Za-z0-9._@+-]`, so that
//! `alice@laptop`, the first token of an `authorized_keys` comment, names an account as it
//! is. The same grammar holds wherever a name comes from: the relay's header, a key's comment.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

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

/// How many of something (connections, sessions, builds) each account holds at once, with
/// a maximum checked when one more is taken.
#[derive(Debug, Default)]
pub struct AccountCounts(Mutex<HashMap<String, usize>>);

/// One of an account's slots, given back when dropped.
#[derive(Debug)]
pub struct AccountSlot {
    counts: Arc<AccountCounts>,
    account: String,
}

impl AccountCounts {
    /// Takes a slot for `account` unless it already holds `max`.
    pub fn acquire(self: &Arc<Self>, account: &str, max: usize) -> Option<AccountSlot> {
        let mut counts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(account.to_owned()).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(AccountSlot {
            counts: self.clone(),
            account: account.to_owned(),
        })
    }
}

impl Drop for AccountSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.account) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.account);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn account_slots_are_counted_and_given_back() {
        let counts = Arc::new(AccountCounts::default());
        let a1 = counts.acquire("a", 2).expect("a slot");
        let a2 = counts.acquire("a", 2).expect("a slot");
        assert!(counts.acquire("a", 2).is_none());
        let b = counts.acquire("b", 2).expect("a slot");
        drop(a1);
        let a3 = counts.acquire("a", 2).expect("a slot");
        drop((a2, a3, b));
        assert!(counts.0.lock().expect("not poisoned").is_empty());
    }

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
