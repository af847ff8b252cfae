//! What the store keeps, for how long, and how much of it each account may hold: from
//! `[store]` and `[accounts.NAME]` of the configuration, replaced on reload.

use std::collections::BTreeMap;

/// Seconds in a day.
const DAY: u64 = 24 * 60 * 60;

/// Retention and quotas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorePolicy {
    /// Seconds a grant is kept after its last use, for accounts without their own.
    pub retention: u64,
    /// Most NAR bytes an account's grants may hold, for accounts without their own; `None`:
    /// no quota.
    pub quota: Option<u64>,
    /// Seconds a build's stored log is kept after it ended.
    pub log_retention: u64,
    /// Seconds a build's record is kept after it ended.
    pub record_retention: u64,
    /// Per-account settings.
    pub accounts: BTreeMap<String, AccountPolicy>,
}

/// One account's own retention and quota.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccountPolicy {
    /// Its retention in seconds, instead of the server's.
    pub retention: Option<u64>,
    /// Its quota in bytes, instead of the server's.
    pub quota: Option<u64>,
}

impl Default for StorePolicy {
    /// 30 days for grants and logs, 90 for records, no quota.
    fn default() -> Self {
        StorePolicy {
            retention: 30 * DAY,
            quota: None,
            log_retention: 30 * DAY,
            record_retention: 90 * DAY,
            accounts: BTreeMap::new(),
        }
    }
}

impl StorePolicy {
    /// How long `account`'s grants are kept after their last use, in seconds.
    pub fn retention_of(&self, account: &str) -> u64 {
        self.accounts
            .get(account)
            .and_then(|a| a.retention)
            .unwrap_or(self.retention)
    }

    /// `account`'s storage quota in bytes, if it has one.
    pub fn quota_of(&self, account: &str) -> Option<u64> {
        self.accounts
            .get(account)
            .and_then(|a| a.quota)
            .or(self.quota)
    }

    /// Where `account`'s quota comes from, for messages.
    pub fn quota_setting(&self, account: &str) -> String {
        match self.accounts.get(account).and_then(|a| a.quota) {
            Some(_) => format!("quota in [accounts.\"{account}\"]"),
            None => "quota in [store]".to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_account_setting_overrides_the_servers() {
        let mut policy = StorePolicy {
            quota: Some(100),
            ..StorePolicy::default()
        };
        policy.accounts.insert(
            "alice".into(),
            AccountPolicy {
                retention: Some(5),
                quota: None,
            },
        );
        policy.accounts.insert(
            "bob".into(),
            AccountPolicy {
                retention: None,
                quota: Some(7),
            },
        );
        assert_eq!(policy.retention_of("alice"), 5);
        assert_eq!(policy.retention_of("bob"), 30 * DAY);
        assert_eq!(policy.quota_of("alice"), Some(100));
        assert_eq!(policy.quota_of("bob"), Some(7));
        assert_eq!(policy.quota_setting("alice"), "quota in [store]");
        assert_eq!(policy.quota_setting("bob"), "quota in [accounts.\"bob\"]");
    }
}
