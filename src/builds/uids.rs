//! The pool of host uids builds run as: each running build has one of the configured range
//! to itself, so that no two builds can touch each other's processes or files.

use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The host uids of the configured range not used by a running build.
#[derive(Debug)]
pub(super) struct UidPool {
    free: Mutex<Vec<u32>>,
    available: Arc<Semaphore>,
}

/// A uid taken from the pool, returned when dropped.
pub(super) struct UidLease<'a> {
    pub(super) uid: u32,
    pool: &'a UidPool,
    _permit: OwnedSemaphorePermit,
}

impl UidPool {
    /// The pool of `count` uids from `base`.
    pub(super) fn new(base: u32, count: u32) -> UidPool {
        UidPool {
            free: Mutex::new((base..base + count).rev().collect()),
            available: Arc::new(Semaphore::new(count as usize)),
        }
    }

    /// A free uid, waiting until one is.
    pub(super) async fn take(&self) -> UidLease<'_> {
        // The semaphore is never closed.
        #[allow(clippy::expect_used)]
        let permit = self
            .available
            .clone()
            .acquire_owned()
            .await
            .expect("the uid semaphore is never closed");
        let uid = {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            // A permit guarantees a free uid.
            #[allow(clippy::expect_used)]
            free.pop().expect("a permit guarantees a free uid")
        };
        UidLease {
            uid,
            pool: self,
            _permit: permit,
        }
    }
}

impl Drop for UidLease<'_> {
    fn drop(&mut self) {
        self.pool
            .free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(self.uid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn uid_pool_hands_out_distinct_uids_and_takes_them_back() {
        let pool = UidPool::new(100, 2);
        let a = pool.take().await;
        let b = pool.take().await;
        assert_ne!(a.uid, b.uid);
        assert!((100..102).contains(&a.uid) && (100..102).contains(&b.uid));
        let third = tokio::time::timeout(Duration::from_millis(50), pool.take()).await;
        assert!(third.is_err(), "a third build must wait for a uid");
        let freed = a.uid;
        drop(a);
        assert_eq!(pool.take().await.uid, freed);
    }
}
