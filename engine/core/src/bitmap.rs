//! Block bitmap: one bit per volume block (the dirty / out-of-sync map).

use alloc::vec;
use alloc::vec::Vec;

/// A fixed-size bitmap of `len` bits, allocated once.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Bitmap {
    words: Vec<u64>,
    len: u64,
    ones: u64,
}

impl Bitmap {
    pub fn new(len: u64) -> Self {
        Bitmap {
            words: vec![0; len.div_ceil(64) as usize],
            len,
            ones: 0,
        }
    }

    /// Build from raw words (e.g. decoded metadata); bits past `len` are
    /// cleared so a corrupt tail cannot invent blocks.
    pub fn from_words(len: u64, mut words: Vec<u64>) -> Option<Self> {
        if words.len() as u64 != len.div_ceil(64) {
            return None;
        }
        if !len.is_multiple_of(64) {
            if let Some(last) = words.last_mut() {
                *last &= (1u64 << (len % 64)) - 1;
            }
        }
        let ones = words.iter().map(|w| u64::from(w.count_ones())).sum();
        Some(Bitmap { words, len, ones })
    }

    pub fn words(&self) -> &[u64] {
        &self.words
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.ones
    }

    pub fn get(&self, i: u64) -> bool {
        i < self.len && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Set bit `i`; returns true if it was clear.
    pub fn set(&mut self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        let w = &mut self.words[(i / 64) as usize];
        let m = 1u64 << (i % 64);
        let was_clear = *w & m == 0;
        *w |= m;
        self.ones += u64::from(was_clear);
        was_clear
    }

    /// Clear bit `i`; returns true if it was set.
    pub fn clear(&mut self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        let w = &mut self.words[(i / 64) as usize];
        let m = 1u64 << (i % 64);
        let was_set = *w & m != 0;
        *w &= !m;
        self.ones -= u64::from(was_set);
        was_set
    }

    /// Set `count` bits from `first`; returns how many were newly set.
    pub fn set_range(&mut self, first: u64, count: u64) -> u64 {
        let end = first.saturating_add(count).min(self.len);
        let mut i = first;
        let mut newly = 0u64;
        // A word at a time: mask the bits of [i, end) inside word i / 64.
        while i < end {
            let bit = i % 64;
            let n = (64 - bit).min(end - i);
            let mask = if n == 64 {
                !0u64
            } else {
                ((1u64 << n) - 1) << bit
            };
            let w = &mut self.words[(i / 64) as usize];
            newly += u64::from((mask & !*w).count_ones());
            *w |= mask;
            i += n;
        }
        self.ones += newly;
        newly
    }

    pub fn set_all(&mut self) {
        let len = self.len;
        self.set_range(0, len);
    }

    pub fn clear_all(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
        self.ones = 0;
    }

    /// `self |= other` (same length); returns newly set bits.
    pub fn union(&mut self, other: &Bitmap) -> u64 {
        let before = self.ones;
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= *b;
        }
        self.ones = self.words.iter().map(|w| u64::from(w.count_ones())).sum();
        self.ones - before
    }

    /// First set bit at or after `from`.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        if from >= self.len {
            return None;
        }
        let mut wi = (from / 64) as usize;
        let mut w = self.words[wi] & (!0u64 << (from % 64));
        loop {
            if w != 0 {
                let i = wi as u64 * 64 + u64::from(w.trailing_zeros());
                return (i < self.len).then_some(i);
            }
            wi += 1;
            if wi >= self.words.len() {
                return None;
            }
            w = self.words[wi];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn test_tail_bits_masked_on_decode() {
        let b = Bitmap::from_words(70, vec![0, !0]).unwrap();
        assert_eq!(b.count(), 6);
        assert_eq!(b.next_set(0), Some(64));
        assert!(Bitmap::from_words(70, vec![0]).is_none());
    }

    proptest! {
        #[test]
        fn prop_bitmap_matches_set_oracle(len in 1u64..500, ops in proptest::collection::vec((0u8..3, 0u64..600, 0u64..200), 0..200)) {
            let mut b = Bitmap::new(len);
            let mut oracle = alloc::collections::BTreeSet::new();
            for (op, i, n) in ops {
                match op {
                    0 => { b.set(i); if i < len { oracle.insert(i); } }
                    1 => { b.clear(i); oracle.remove(&i); }
                    _ => {
                        let before = oracle.len() as u64;
                        for k in i..(i + n).min(len) { oracle.insert(k); }
                        prop_assert_eq!(b.set_range(i, n), oracle.len() as u64 - before);
                    }
                }
            }
            prop_assert_eq!(b.count(), oracle.len() as u64);
            let mut got = alloc::vec::Vec::new();
            let mut at = 0;
            while let Some(i) = b.next_set(at) { got.push(i); at = i + 1; }
            prop_assert_eq!(got, oracle.into_iter().collect::<alloc::vec::Vec<_>>());
        }
    }
}
