//! Counted slots per key (a peer uid, a caller): at most `max` taken at once per key, each
//! given back when its [`KeyedSlot`] is dropped. For the per-uid connection cap and the
//! per-caller stream cap.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

/// Slots taken per key.
#[derive(Debug)]
pub struct KeyedSlots<K: Hash + Eq + Clone> {
    taken: Mutex<HashMap<K, usize>>,
}

impl<K: Hash + Eq + Clone> Default for KeyedSlots<K> {
    fn default() -> Self {
        Self {
            taken: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq + Clone> KeyedSlots<K> {
    /// Takes one slot of `key`, unless it has `max` taken.
    pub fn try_take(self: &Arc<Self>, key: &K, max: usize) -> Option<KeyedSlot<K>> {
        let mut taken = self
            .taken
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = taken.entry(key.clone()).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(KeyedSlot {
            slots: Arc::clone(self),
            key: key.clone(),
        })
    }

    /// How many slots `key` has taken.
    #[cfg(test)]
    pub fn taken(&self, key: &K) -> usize {
        self.taken
            .lock()
            .map(|t| t.get(key).copied().unwrap_or(0))
            .unwrap_or(0)
    }
}

/// One taken slot; given back when dropped.
#[derive(Debug)]
pub struct KeyedSlot<K: Hash + Eq + Clone> {
    slots: Arc<KeyedSlots<K>>,
    key: K,
}

impl<K: Hash + Eq + Clone> Drop for KeyedSlot<K> {
    fn drop(&mut self) {
        let mut taken = self
            .slots
            .taken
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = taken.get_mut(&self.key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                taken.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_counted_per_key_and_given_back() {
        let slots = Arc::new(KeyedSlots::default());
        let a = slots.try_take(&1u32, 2).unwrap();
        let b = slots.try_take(&1, 2).unwrap();
        assert!(slots.try_take(&1, 2).is_none());
        assert!(
            slots.try_take(&2, 2).is_some(),
            "another key has its own slots"
        );
        drop(a);
        let c = slots.try_take(&1, 2);
        assert!(c.is_some());
        drop((b, c));
        assert_eq!(slots.taken(&1), 0);
        assert!(slots.taken.lock().unwrap().is_empty(), "no entry left");
    }
}
