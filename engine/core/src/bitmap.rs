//! Block bitmap: one bit per volume block (the dirty / out-of-sync map).
//!
//! Besides the bits, the map keeps two small indexes, both maintained by
//! every mutating method:
//!
//! * a **summary**: the number of set bits per page ([`PAGE_WORDS`] words)
//!   and per group of [`GROUP_PAGES`] pages, so [`Bitmap::next_set`] skips
//!   empty regions without reading them and [`Bitmap::count_range`] reads
//!   only the partial pages at its ends. At 4 KiB blocks a TiB of volume is
//!   32 MiB of bits and about 32 KiB of summary.
//! * **change tracking**: a change counter, and per page (and per group)
//!   the counter value of its last change, so the host can write only the
//!   pages that changed since its last persist
//!   ([`Bitmap::changed_pages_since`]). The values are meaningful only
//!   within one lineage ([`Bitmap::origin`]): a clone shares its parent's
//!   lineage until it is itself modified, then it starts a lineage of its
//!   own, so a host comparing against an older clone never mistakes a
//!   diverged copy for a descendant.
//!
//! A page is the unit the metadata file stores with its own header:
//! 508 words (4064 bytes) of bits plus a 32-byte header fill one 4 KiB
//! block.

use alloc::vec;
use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

/// Words per bitmap page (4064 bytes: a 4 KiB on-disk block minus its
/// 32-byte header).
pub const PAGE_WORDS: usize = 508;
/// Bits per bitmap page.
pub const PAGE_BITS: u64 = PAGE_WORDS as u64 * 64;
/// Pages per summary group.
pub const GROUP_PAGES: usize = 512;

/// Lineage numbers: unique per process, never 0.
static NEXT_ORIGIN: AtomicU64 = AtomicU64::new(1);

fn fresh_origin() -> u64 {
    NEXT_ORIGIN.fetch_add(1, Ordering::Relaxed)
}

/// A fixed-size bitmap of `len` bits, allocated once.
#[derive(Default)]
pub struct Bitmap {
    words: Vec<u64>,
    len: u64,
    ones: u64,
    /// Set bits per page.
    page_ones: Vec<u32>,
    /// Set bits per group of pages.
    group_ones: Vec<u64>,
    /// Change counter value of each page's (group's) last change.
    page_seq: Vec<u64>,
    group_seq: Vec<u64>,
    /// Change counter: bumped once per mutating call that changed a bit.
    seq: u64,
    /// Lineage the `*_seq` values belong to.
    origin: u64,
    /// False for a clone that has not been modified yet (it still shares
    /// its parent's lineage).
    owner: bool,
}

impl Clone for Bitmap {
    fn clone(&self) -> Self {
        Bitmap {
            words: self.words.clone(),
            len: self.len,
            ones: self.ones,
            page_ones: self.page_ones.clone(),
            group_ones: self.group_ones.clone(),
            page_seq: self.page_seq.clone(),
            group_seq: self.group_seq.clone(),
            seq: self.seq,
            origin: self.origin,
            owner: false,
        }
    }
}

/// Two maps are equal when they hold the same bits; the indexes and the
/// change history do not take part.
impl PartialEq for Bitmap {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.words == other.words
    }
}

impl Eq for Bitmap {}

impl fmt::Debug for Bitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The bits only, as the derived form printed them before the
        // indexes existed (traces compare Debug output).
        f.debug_struct("Bitmap")
            .field("words", &self.words)
            .field("len", &self.len)
            .field("ones", &self.ones)
            .finish()
    }
}

impl Bitmap {
    pub fn new(len: u64) -> Self {
        Self::build(len, vec![0; len.div_ceil(64) as usize])
    }

    fn build(len: u64, words: Vec<u64>) -> Self {
        let pages = words.len().div_ceil(PAGE_WORDS);
        let groups = pages.div_ceil(GROUP_PAGES);
        let mut b = Bitmap {
            words,
            len,
            ones: 0,
            page_ones: vec![0; pages],
            group_ones: vec![0; groups],
            page_seq: vec![0; pages],
            group_seq: vec![0; groups],
            seq: 0,
            origin: fresh_origin(),
            owner: true,
        };
        b.recount();
        b
    }

    /// Recompute every count from the words.
    fn recount(&mut self) {
        self.ones = 0;
        self.group_ones.iter_mut().for_each(|g| *g = 0);
        for (p, chunk) in self.words.chunks(PAGE_WORDS).enumerate() {
            let n: u32 = chunk.iter().map(|w| w.count_ones()).sum();
            self.page_ones[p] = n;
            self.group_ones[p / GROUP_PAGES] += u64::from(n);
            self.ones += u64::from(n);
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
        Some(Self::build(len, words))
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

    /// Number of pages ([`PAGE_WORDS`] words each, the last one partial).
    pub fn page_count(&self) -> usize {
        self.page_ones.len()
    }

    /// The words of page `p` (shorter for the last page; empty past the end).
    pub fn page_words(&self, p: usize) -> &[u64] {
        let start = (p * PAGE_WORDS).min(self.words.len());
        let end = (start + PAGE_WORDS).min(self.words.len());
        &self.words[start..end]
    }

    /// Set bits in page `p`.
    pub fn page_ones(&self, p: usize) -> u64 {
        self.page_ones.get(p).map_or(0, |&n| u64::from(n))
    }

    /// Replace the words of page `p` (e.g. loading metadata page by page);
    /// bits past `len` are cleared. Returns false if `p` or `words.len()`
    /// does not fit the map.
    pub fn set_page_words(&mut self, p: usize, words: &[u64]) -> bool {
        if words.len() != self.page_words(p).len() || p >= self.page_count() {
            return false;
        }
        let start = p * PAGE_WORDS;
        let mut changed = false;
        for (i, &w) in words.iter().enumerate() {
            let mut w = w;
            if start + i + 1 == self.words.len() && !self.len.is_multiple_of(64) {
                w &= (1u64 << (self.len % 64)) - 1;
            }
            let old = core::mem::replace(&mut self.words[start + i], w);
            if old != w {
                changed = true;
                let (a, b) = (u64::from(old.count_ones()), u64::from(w.count_ones()));
                self.ones = self.ones + b - a;
                self.page_ones[p] = (u64::from(self.page_ones[p]) + b - a) as u32;
                self.group_ones[p / GROUP_PAGES] = self.group_ones[p / GROUP_PAGES] + b - a;
            }
        }
        if changed {
            let s = self.begin_change();
            self.mark(p, s);
        }
        true
    }

    /// The lineage this map's change counters belong to (see the module
    /// documentation).
    pub fn origin(&self) -> u64 {
        self.origin
    }

    /// The change counter: strictly increases with every call that changed
    /// a bit.
    pub fn change_seq(&self) -> u64 {
        self.seq
    }

    /// Pages changed after the change counter was `since` (within this
    /// lineage), in ascending order. Reads one counter per group of
    /// [`GROUP_PAGES`] pages plus the pages of the groups that changed.
    pub fn changed_pages_since(&self, since: u64) -> impl Iterator<Item = usize> + '_ {
        self.group_seq
            .iter()
            .enumerate()
            .filter(move |(_, &s)| s > since)
            .flat_map(move |(g, _)| {
                let first = g * GROUP_PAGES;
                let end = (first + GROUP_PAGES).min(self.page_seq.len());
                (first..end).filter(move |&p| self.page_seq[p] > since)
            })
    }

    fn begin_change(&mut self) -> u64 {
        if !self.owner {
            // A modified clone: its counters no longer follow the parent's.
            self.origin = fresh_origin();
            self.owner = true;
        }
        self.seq += 1;
        self.seq
    }

    fn mark(&mut self, page: usize, seq: u64) {
        self.page_seq[page] = seq;
        self.group_seq[page / GROUP_PAGES] = seq;
    }

    /// Account for word `wi` going from `old` to `new`.
    fn account(&mut self, wi: usize, old: u64, new: u64, seq: &mut Option<u64>) {
        if old == new {
            return;
        }
        let p = wi / PAGE_WORDS;
        let (a, b) = (u64::from(old.count_ones()), u64::from(new.count_ones()));
        self.ones = self.ones + b - a;
        self.page_ones[p] = (u64::from(self.page_ones[p]) + b - a) as u32;
        self.group_ones[p / GROUP_PAGES] = self.group_ones[p / GROUP_PAGES] + b - a;
        let s = match *seq {
            Some(s) => s,
            None => {
                let s = self.begin_change();
                *seq = Some(s);
                s
            }
        };
        self.mark(p, s);
    }

    pub fn get(&self, i: u64) -> bool {
        i < self.len && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Set bit `i`; returns true if it was clear.
    pub fn set(&mut self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        let wi = (i / 64) as usize;
        let old = self.words[wi];
        let new = old | 1u64 << (i % 64);
        self.words[wi] = new;
        self.account(wi, old, new, &mut None);
        old != new
    }

    /// Clear bit `i`; returns true if it was set.
    pub fn clear(&mut self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        let wi = (i / 64) as usize;
        let old = self.words[wi];
        let new = old & !(1u64 << (i % 64));
        self.words[wi] = new;
        self.account(wi, old, new, &mut None);
        old != new
    }

    /// Set `count` bits from `first`; returns how many were newly set.
    pub fn set_range(&mut self, first: u64, count: u64) -> u64 {
        let end = first.saturating_add(count).min(self.len);
        let mut i = first;
        let before = self.ones;
        let mut seq = None;
        // A word at a time: mask the bits of [i, end) inside word i / 64.
        while i < end {
            let bit = i % 64;
            let n = (64 - bit).min(end - i);
            let mask = if n == 64 {
                !0u64
            } else {
                ((1u64 << n) - 1) << bit
            };
            let wi = (i / 64) as usize;
            let old = self.words[wi];
            self.words[wi] = old | mask;
            self.account(wi, old, old | mask, &mut seq);
            i += n;
        }
        self.ones - before
    }

    pub fn set_all(&mut self) {
        let len = self.len;
        self.set_range(0, len);
    }

    pub fn clear_all(&mut self) {
        if self.ones == 0 {
            return;
        }
        let s = self.begin_change();
        for p in 0..self.page_ones.len() {
            if self.page_ones[p] != 0 {
                let start = p * PAGE_WORDS;
                let end = (start + PAGE_WORDS).min(self.words.len());
                self.words[start..end].iter_mut().for_each(|w| *w = 0);
                self.page_ones[p] = 0;
                self.mark(p, s);
            }
        }
        self.group_ones.iter_mut().for_each(|g| *g = 0);
        self.ones = 0;
    }

    /// `self |= other` (same length); returns newly set bits.
    pub fn union(&mut self, other: &Bitmap) -> u64 {
        let before = self.ones;
        let mut seq = None;
        for wi in 0..self.words.len().min(other.words.len()) {
            let old = self.words[wi];
            let new = old | other.words[wi];
            self.words[wi] = new;
            self.account(wi, old, new, &mut seq);
        }
        self.ones - before
    }

    /// Set bits among the `count` bits from `first`. Reads the partial
    /// pages at either end and the summary in between.
    pub fn count_range(&self, first: u64, count: u64) -> u64 {
        let end = first.saturating_add(count).min(self.len);
        if first >= end {
            return 0;
        }
        let count_bits = |a: u64, b: u64| -> u64 {
            // Bits in [a, b), both inside the map.
            let mut n = 0u64;
            let mut i = a;
            while i < b {
                let bit = i % 64;
                let k = (64 - bit).min(b - i);
                let mask = if k == 64 {
                    !0u64
                } else {
                    ((1u64 << k) - 1) << bit
                };
                n += u64::from((self.words[(i / 64) as usize] & mask).count_ones());
                i += k;
            }
            n
        };
        let first_full = first.div_ceil(PAGE_BITS);
        let end_full = end / PAGE_BITS;
        if first_full >= end_full {
            return count_bits(first, end);
        }
        let mut n =
            count_bits(first, first_full * PAGE_BITS) + count_bits(end_full * PAGE_BITS, end);
        let (mut p, pe) = (first_full as usize, end_full as usize);
        while p < pe {
            if p.is_multiple_of(GROUP_PAGES) && p + GROUP_PAGES <= pe {
                n += self.group_ones[p / GROUP_PAGES];
                p += GROUP_PAGES;
            } else {
                n += u64::from(self.page_ones[p]);
                p += 1;
            }
        }
        n
    }

    /// First set bit at or after `from`. Skips empty pages and groups
    /// through the summary.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        if from >= self.len {
            return None;
        }
        let nwords = self.words.len();
        let mut wi = (from / 64) as usize;
        let mut w = self.words[wi] & (!0u64 << (from % 64));
        if self.page_ones[wi / PAGE_WORDS] == 0 {
            let p = self.next_nonempty_page(wi / PAGE_WORDS + 1)?;
            wi = p * PAGE_WORDS;
            w = self.words[wi];
        }
        loop {
            if w != 0 {
                let i = wi as u64 * 64 + u64::from(w.trailing_zeros());
                return (i < self.len).then_some(i);
            }
            wi += 1;
            if wi >= nwords {
                return None;
            }
            if wi.is_multiple_of(PAGE_WORDS) {
                let p = self.next_nonempty_page(wi / PAGE_WORDS)?;
                wi = p * PAGE_WORDS;
            }
            w = self.words[wi];
        }
    }

    /// First page at or after `p` with a set bit.
    fn next_nonempty_page(&self, mut p: usize) -> Option<usize> {
        let pages = self.page_ones.len();
        while p < pages {
            if p.is_multiple_of(GROUP_PAGES) && self.group_ones[p / GROUP_PAGES] == 0 {
                p += GROUP_PAGES;
                continue;
            }
            if self.page_ones[p] != 0 {
                return Some(p);
            }
            p += 1;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::collections::{BTreeMap, BTreeSet};
    use proptest::prelude::*;

    #[test]
    fn test_tail_bits_masked_on_decode() {
        let b = Bitmap::from_words(70, vec![0, !0]).unwrap();
        assert_eq!(b.count(), 6);
        assert_eq!(b.next_set(0), Some(64));
        assert!(Bitmap::from_words(70, vec![0]).is_none());
    }

    #[test]
    fn test_next_set_and_count_skip_empty_groups() {
        // Three groups and a bit; a sparse map at the scale of a large volume.
        let len = 3 * GROUP_PAGES as u64 * PAGE_BITS + 100;
        let mut b = Bitmap::new(len);
        assert_eq!(b.next_set(0), None);
        let far = 2 * GROUP_PAGES as u64 * PAGE_BITS + 7 * PAGE_BITS + 3;
        b.set(far);
        b.set(len - 1);
        assert_eq!(b.next_set(0), Some(far));
        assert_eq!(b.next_set(far + 1), Some(len - 1));
        assert_eq!(b.count_range(0, len), 2);
        assert_eq!(b.count_range(0, far), 0);
        assert_eq!(b.count_range(far, 1), 1);
        assert_eq!(b.count_range(1, len - 2), 1);
    }

    #[test]
    fn test_clone_diverges_into_its_own_lineage() {
        let mut a = Bitmap::new(3 * PAGE_BITS);
        a.set(1);
        let c = a.clone();
        assert_eq!((c.origin(), c.change_seq()), (a.origin(), a.change_seq()));
        a.set(PAGE_BITS + 1);
        assert_eq!(
            a.changed_pages_since(c.change_seq()).collect::<Vec<_>>(),
            [1]
        );
        let mut d = a.clone();
        d.set(2 * PAGE_BITS);
        assert_ne!(d.origin(), a.origin(), "a modified clone starts a lineage");
        // The parent keeps its lineage.
        let o = a.origin();
        a.set(5);
        assert_eq!(a.origin(), o);
        // Equality is about bits only.
        let mut e = Bitmap::new(3 * PAGE_BITS);
        e.set(1);
        e.set(PAGE_BITS + 1);
        e.set(5);
        assert_eq!(e, a);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Set(u64),
        Clear(u64),
        Range(u64, u64),
        Union(Vec<u64>),
        ClearAll,
        SetAll,
        Page(usize, u64),
    }

    fn op(len: u64) -> impl Strategy<Value = Op> {
        let i = 0..len + 70;
        prop_oneof![
            8 => i.clone().prop_map(Op::Set),
            4 => i.clone().prop_map(Op::Clear),
            3 => (i.clone(), 0..3 * PAGE_BITS / 2).prop_map(|(a, n)| Op::Range(a, n)),
            1 => proptest::collection::vec(0..len, 0..8).prop_map(Op::Union),
            1 => Just(Op::ClearAll),
            1 => Just(Op::SetAll),
            1 => (0usize..4, any::<u64>()).prop_map(|(p, w)| Op::Page(p, w)),
        ]
    }

    fn page_of(i: u64) -> usize {
        (i / PAGE_BITS) as usize
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(40))]
        #[test]
        fn prop_bitmap_matches_set_oracle(
            len in 1u64..4 * PAGE_BITS,
            ops in proptest::collection::vec(op(4 * PAGE_BITS), 0..60),
            probes in proptest::collection::vec((0u64..4 * PAGE_BITS, 0u64..4 * PAGE_BITS), 8),
        ) {
            let mut b = Bitmap::new(len);
            let mut oracle = BTreeSet::new();
            // Oracle of change tracking: page -> step of its last change.
            let mut changed: BTreeMap<usize, usize> = BTreeMap::new();
            let mut seqs = alloc::vec![b.change_seq()];
            for (step, op) in ops.into_iter().enumerate() {
                let before = oracle.clone();
                match op {
                    Op::Set(i) => {
                        prop_assert_eq!(b.set(i), i < len && oracle.insert(i));
                    }
                    Op::Clear(i) => {
                        prop_assert_eq!(b.clear(i), oracle.remove(&i));
                    }
                    Op::Range(i, n) => {
                        let was = oracle.len() as u64;
                        for k in i..(i + n).min(len) { oracle.insert(k); }
                        prop_assert_eq!(b.set_range(i, n), oracle.len() as u64 - was);
                    }
                    Op::Union(bits) => {
                        let mut o = Bitmap::new(len);
                        for &k in &bits { if o.set(k) { oracle.insert(k); } }
                        b.union(&o);
                    }
                    Op::ClearAll => { b.clear_all(); oracle.clear(); }
                    Op::SetAll => { b.set_all(); oracle.extend(0..len); }
                    Op::Page(p, w) => {
                        let n = b.page_words(p).len();
                        let words = alloc::vec![w; n];
                        prop_assert_eq!(b.set_page_words(p, &words), n > 0);
                        for wi in 0..n {
                            for bit in 0..64 {
                                let k = (p * PAGE_WORDS + wi) as u64 * 64 + bit;
                                if k < len {
                                    if w >> bit & 1 == 1 { oracle.insert(k); } else { oracle.remove(&k); }
                                }
                            }
                        }
                    }
                }
                for k in before.symmetric_difference(&oracle) {
                    changed.insert(page_of(*k), step);
                }
                seqs.push(b.change_seq());
            }
            prop_assert_eq!(b.count(), oracle.len() as u64);
            let mut got = alloc::vec::Vec::new();
            let mut at = 0;
            while let Some(i) = b.next_set(at) { got.push(i); at = i + 1; }
            prop_assert_eq!(got, oracle.iter().copied().collect::<alloc::vec::Vec<_>>());
            for (a, n) in probes {
                let want = oracle.range(a..a.saturating_add(n)).count() as u64;
                prop_assert_eq!(b.count_range(a, n), want);
                prop_assert_eq!(b.next_set(a), oracle.range(a..).next().copied());
            }
            for p in 0..b.page_count() {
                let want = oracle.range(p as u64 * PAGE_BITS..(p as u64 + 1) * PAGE_BITS).count() as u64;
                prop_assert_eq!(b.page_ones(p), want);
            }
            // Pages changed after step k are exactly those the oracle saw change.
            for (k, &since) in seqs.iter().enumerate() {
                let want: alloc::vec::Vec<usize> =
                    changed.iter().filter(|(_, &s)| s >= k).map(|(&p, _)| p).collect();
                let got: alloc::vec::Vec<usize> = b.changed_pages_since(since).collect();
                prop_assert_eq!(got, want, "since step {}", k);
            }
        }
    }
}
