//! An ordered map for keys handed out in increasing order and mostly
//! retired oldest first: I/O ids, write ids, message sequence numbers.
//!
//! `SeqMap` keeps its entries sorted in a `VecDeque`: adding the newest key
//! is a push at the back, retiring the oldest a pop at the front, and any
//! other key is found by binary search and moved into place. It iterates
//! in key order like `BTreeMap` and behaves the same for any order of
//! keys. Unlike `BTreeMap`, whose nodes split and merge (an allocation or
//! a free each time) as a window of in-flight ids slides through it, it
//! keeps its capacity: a core with a steady number of writes in flight
//! does not allocate for them. Written here because the sorted-vector map
//! crates keep a `Vec`, which moves every entry to retire the oldest.

use alloc::collections::VecDeque;
use core::fmt;

/// A map kept sorted by key in one ring buffer (see the module).
#[derive(Clone, PartialEq, Eq)]
pub struct SeqMap<K, V> {
    items: VecDeque<(K, V)>,
}

impl<K, V> Default for SeqMap<K, V> {
    fn default() -> Self {
        SeqMap {
            items: VecDeque::new(),
        }
    }
}

impl<K: fmt::Debug, V: fmt::Debug> fmt::Debug for SeqMap<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.items.iter().map(|(k, v)| (k, v)))
            .finish()
    }
}

impl<K: Ord, V> SeqMap<K, V> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Where `key` is (`Ok`) or would go (`Err`); a key above every other
    /// is found without a search.
    fn find(&self, key: &K) -> Result<usize, usize> {
        match self.items.back() {
            None => Err(0),
            Some((last, _)) if *last < *key => Err(self.items.len()),
            Some(_) => self.items.binary_search_by(|(k, _)| k.cmp(key)),
        }
    }

    /// Insert; returns the value `key` had.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        match self.find(&key) {
            Ok(i) => Some(core::mem::replace(&mut self.items[i].1, value)),
            Err(i) => {
                self.items.insert(i, (key, value));
                None
            }
        }
    }

    pub fn get(&self, key: &K) -> Option<&V> {
        let i = self.find(key).ok()?;
        Some(&self.items[i].1)
    }

    pub fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        let i = self.find(key).ok()?;
        Some(&mut self.items[i].1)
    }

    pub fn contains_key(&self, key: &K) -> bool {
        self.find(key).is_ok()
    }

    pub fn remove(&mut self, key: &K) -> Option<V> {
        let i = self.find(key).ok()?;
        self.items.remove(i).map(|(_, v)| v)
    }

    /// The smallest key.
    pub fn first_key(&self) -> Option<&K> {
        self.items.front().map(|(k, _)| k)
    }

    /// Entries in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.items.iter().map(|(k, v)| (k, v))
    }

    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.items.iter().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.items.iter().map(|(_, v)| v)
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut V> {
        self.items.iter_mut().map(|(_, v)| v)
    }

    /// Keep the entries `f` says to, in key order.
    pub fn retain(&mut self, mut f: impl FnMut(&K, &mut V) -> bool) {
        self.items.retain_mut(|(k, v)| f(k, v));
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Remove every entry, keeping the capacity.
    pub fn clear(&mut self) {
        self.items.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::SeqMap;
    use alloc::collections::BTreeMap;
    use alloc::vec::Vec;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Op {
        Insert(u16, u32),
        InsertNext(u32),
        Remove(u16),
        RemoveOldest,
        Retain(u16),
        Clear,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            2 => (any::<u16>(), any::<u32>()).prop_map(|(k, v)| Op::Insert(k % 512, v)),
            4 => any::<u32>().prop_map(Op::InsertNext),
            2 => any::<u16>().prop_map(|k| Op::Remove(k % 512)),
            3 => Just(Op::RemoveOldest),
            1 => any::<u16>().prop_map(|m| Op::Retain(m % 7 + 2)),
            1 => Just(Op::Clear),
        ]
    }

    proptest! {
        /// Any sequence of operations leaves the same entries, in the same
        /// order, with the same answers as a `BTreeMap`.
        #[test]
        fn prop_same_as_btreemap(ops in proptest::collection::vec(op(), 0..300)) {
            let mut m = SeqMap::new();
            let mut b = BTreeMap::new();
            let mut next = 1000u16;
            for o in ops {
                match o {
                    Op::Insert(k, v) => prop_assert_eq!(m.insert(k, v), b.insert(k, v)),
                    Op::InsertNext(v) => {
                        next += 1;
                        prop_assert_eq!(m.insert(next, v), b.insert(next, v));
                    }
                    Op::Remove(k) => prop_assert_eq!(m.remove(&k), b.remove(&k)),
                    Op::RemoveOldest => {
                        let k = b.keys().next().copied();
                        prop_assert_eq!(m.first_key().copied(), k);
                        if let Some(k) = k {
                            prop_assert_eq!(m.remove(&k), b.remove(&k));
                        }
                    }
                    Op::Retain(d) => {
                        m.retain(|k, _| k % d != 0);
                        b.retain(|k, _| k % d != 0);
                    }
                    Op::Clear => {
                        m.clear();
                        b.clear();
                    }
                }
                prop_assert_eq!(m.len(), b.len());
                let got: Vec<(u16, u32)> = m.iter().map(|(k, v)| (*k, *v)).collect();
                let want: Vec<(u16, u32)> = b.iter().map(|(k, v)| (*k, *v)).collect();
                prop_assert_eq!(got, want);
                for k in [0u16, 5, 511, next] {
                    prop_assert_eq!(m.get(&k), b.get(&k));
                    prop_assert_eq!(m.contains_key(&k), b.contains_key(&k));
                }
            }
        }
    }

    /// A window of keys sliding through the map (newest in, oldest out)
    /// reuses the map's room instead of growing it.
    #[test]
    fn test_sliding_window_keeps_its_capacity() {
        let mut m = SeqMap::new();
        for k in 0..33u64 {
            m.insert(k, k);
        }
        m.remove(&0);
        let cap = m.items.capacity();
        for k in 33..100_000u64 {
            m.insert(k, k);
            assert_eq!(m.remove(&(k - 32)), Some(k - 32));
            assert_eq!(m.len(), 32);
        }
        assert_eq!(m.items.capacity(), cap);
        assert_eq!(m.first_key(), Some(&(100_000 - 32)));
    }
}
