//! Pins: the rows the collector must leave alone because someone is using them right now.
//!
//! A [`Pins`] is a set of an account's rows (grants) held by one user of the store: a session
//! holds everything it was told is valid, uploaded or asked the closure of until it ends (a
//! client that heard "valid" goes on to reference or build with the path, like Nix's temporary
//! roots); a build holds its input closure until its outputs are registered; a substitution
//! holds the public paths it found or committed until it has granted them; an export holds
//! the path it streams. Rows are pinned while the caller holds the store lock, in the same
//! step that finds them, and the collector reads the pins under that lock too, so a row is
//! either pinned before the collector looks at it or already gone when the user looks for it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

/// Most rows one holder pins (about 10 MiB of sets): a session told that more paths are
/// valid holds the first ones; the rest are kept by their fresh `last_used` alone, which only
/// a retention shorter than the session's pause between query and use could defeat.
pub const MAX_PINS: usize = 1 << 18;

/// How many holders pin each row; shared by the store and every [`Pins`].
#[derive(Debug, Default)]
pub(super) struct PinTable {
    counts: Mutex<HashMap<i64, u32>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Counts are updated one at a time; a panic between two leaves nothing half-done.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl PinTable {
    /// Whether any holder pins row `id`.
    pub(super) fn is_pinned(&self, id: i64) -> bool {
        lock(&self.counts).contains_key(&id)
    }

    /// How many rows are pinned (tests, status).
    pub(super) fn len(&self) -> usize {
        lock(&self.counts).len()
    }
}

/// A set of pinned rows, released when the last clone is dropped. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Pins {
    inner: Arc<Held>,
}

#[derive(Debug)]
struct Held {
    table: Arc<PinTable>,
    ids: Mutex<HashSet<i64>>,
}

impl Pins {
    pub(super) fn new(table: &Arc<PinTable>) -> Pins {
        Pins {
            inner: Arc::new(Held {
                table: table.clone(),
                ids: Mutex::default(),
            }),
        }
    }

    /// Pins `ids` (each at most once for this holder, at most [`MAX_PINS`] in all). Called
    /// under the store lock.
    pub(super) fn add(&self, ids: impl IntoIterator<Item = i64>) {
        let mut held = lock(&self.inner.ids);
        let mut counts = lock(&self.inner.table.counts);
        for id in ids {
            if held.len() >= MAX_PINS {
                break;
            }
            if held.insert(id) {
                *counts.entry(id).or_default() += 1;
            }
        }
    }

    /// How many rows this holder pins.
    pub fn len(&self) -> usize {
        lock(&self.inner.ids).len()
    }

    /// Whether this holder pins nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let held = std::mem::take(&mut *lock(&self.ids));
        let mut counts = lock(&self.table.counts);
        for id in held {
            if let Some(n) = counts.get_mut(&id) {
                *n -= 1;
                if *n == 0 {
                    counts.remove(&id);
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports failure
mod tests {
    use super::*;

    #[test]
    fn a_row_stays_pinned_until_its_last_holder_is_gone() {
        let table = Arc::new(PinTable::default());
        let a = Pins::new(&table);
        let b = Pins::new(&table);
        a.add([1, 2, 2]);
        b.add([2]);
        assert_eq!(a.len(), 2);
        assert!(table.is_pinned(1) && table.is_pinned(2));
        let a2 = a.clone();
        drop(a);
        assert!(table.is_pinned(1), "a clone still holds it");
        drop(a2);
        assert!(!table.is_pinned(1));
        assert!(table.is_pinned(2), "b still holds it");
        drop(b);
        assert_eq!(table.len(), 0);
    }

    #[test]
    fn one_holder_pins_at_most_max_pins_rows() {
        let table = Arc::new(PinTable::default());
        let pins = Pins::new(&table);
        pins.add(0..(MAX_PINS as i64 + 10));
        assert_eq!(pins.len(), MAX_PINS);
        assert!(!table.is_pinned(MAX_PINS as i64));
    }
}
