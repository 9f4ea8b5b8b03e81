//! Block bitmap: one bit per volume block (the dirty / out-of-sync map).
//!
//! The bits are kept in pages of [`PAGE_WORDS`] words, shared
//! copy-on-write: cloning a map copies one pointer per page (about 8 KiB
//! per TiB of volume at 4 KiB blocks, instead of 32 MiB of bits), a page
//! is copied only when one of two sharers changes it, and uniform pages
//! share one page: every page without a set bit shares the map's zero
//! page, every page with all its bits set shares its full page. So the
//! core can hand the host a snapshot of its metadata on every persist, a
//! fresh map of a large volume costs almost nothing until it fills, and
//! neither does a map marked wholly dirty for a full sync (setting it is
//! one pointer per page): a map's memory is that of its mixed pages.
//!
//! Besides the bits, the map keeps two small indexes, both maintained by
//! every mutating method:
//!
//! * a **summary**: the number of set bits per page and per group of
//!   [`GROUP_PAGES`] pages, so [`Bitmap::next_set`] skips empty regions
//!   without reading them and [`Bitmap::count_range`] reads only the
//!   partial pages at its ends.
//! * **change tracking**: a change counter, and per page (and per group)
//!   the counter value of its last change, so the host can write only the
//!   pages that changed since its last persist
//!   ([`Bitmap::changed_pages_since`]). The values are meaningful only
//!   within one lineage ([`Bitmap::origin`]): a clone shares its parent's
//!   lineage until it is itself modified, then it starts a lineage of its
//!   own, so a host comparing against an older clone never mistakes a
//!   diverged copy for a descendant.
//!
//! A page is also the unit the metadata file stores with its own header:
//! 508 words (4064 bytes) of bits plus a 32-byte header fill one 4 KiB
//! block.

use alloc::sync::Arc;
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

type Page = [u64; PAGE_WORDS];

/// Lineage numbers: unique per process, never 0.
static NEXT_ORIGIN: AtomicU64 = AtomicU64::new(1);

fn fresh_origin() -> u64 {
    NEXT_ORIGIN.fetch_add(1, Ordering::Relaxed)
}

/// For bit `i` and a range ending at `end` (> `i`): the index of `i`'s
/// word, the mask of the range's bits in it, and how many those are.
fn word_span(i: u64, end: u64) -> (usize, u64, u64) {
    let bit = i % 64;
    let n = (64 - bit).min(end - i);
    let mask = if n == 64 {
        !0u64
    } else {
        ((1u64 << n) - 1) << bit
    };
    ((i / 64) as usize, mask, n)
}

/// A fixed-size bitmap of `len` bits, allocated once.
pub struct Bitmap {
    pages: Vec<Arc<Page>>,
    /// The pages every page without a set bit, and every page of
    /// [`PAGE_BITS`] bits inside the map with all of them set, share.
    zero: Arc<Page>,
    full: Arc<Page>,
    nwords: usize,
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
            pages: self.pages.clone(),
            zero: self.zero.clone(),
            full: self.full.clone(),
            nwords: self.nwords,
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
        self.len == other.len
            && self
                .pages
                .iter()
                .zip(&other.pages)
                .all(|(a, b)| Arc::ptr_eq(a, b) || a[..] == b[..])
    }
}

impl Eq for Bitmap {}

impl fmt::Debug for Bitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The fields in the order (and the words in the form) the derived
        // implementation printed before pages existed: traces compare
        // Debug output.
        struct Words<'a>(&'a Bitmap);
        impl fmt::Debug for Words<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_list().entries(self.0.words()).finish()
            }
        }
        f.debug_struct("Bitmap")
            .field("words", &Words(self))
            .field("len", &self.len)
            .field("ones", &self.ones)
            .finish()
    }
}

/// The words of a [`Bitmap`] in order ([`Bitmap::words`]).
#[derive(Clone)]
pub struct Words<'a> {
    map: &'a Bitmap,
    at: usize,
}

impl<'a> Iterator for Words<'a> {
    type Item = &'a u64;

    fn next(&mut self) -> Option<&'a u64> {
        if self.at >= self.map.nwords {
            return None;
        }
        let w = &self.map.pages[self.at / PAGE_WORDS][self.at % PAGE_WORDS];
        self.at += 1;
        Some(w)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.map.nwords - self.at;
        (n, Some(n))
    }
}

impl ExactSizeIterator for Words<'_> {}

impl Default for Bitmap {
    fn default() -> Self {
        Bitmap::new(0)
    }
}

impl Bitmap {
    pub fn new(len: u64) -> Self {
        let nwords = len.div_ceil(64) as usize;
        let npages = nwords.div_ceil(PAGE_WORDS);
        let groups = npages.div_ceil(GROUP_PAGES);
        let zero = Arc::new([0; PAGE_WORDS]);
        Bitmap {
            pages: vec![zero.clone(); npages],
            zero,
            full: Arc::new([!0; PAGE_WORDS]),
            nwords,
            len,
            ones: 0,
            page_ones: vec![0; npages],
            group_ones: vec![0; groups],
            page_seq: vec![0; npages],
            group_seq: vec![0; groups],
            seq: 0,
            origin: fresh_origin(),
            owner: true,
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
        let mut b = Bitmap::new(len);
        for (p, chunk) in words.chunks(PAGE_WORDS).enumerate() {
            let n: u32 = chunk.iter().map(|w| w.count_ones()).sum();
            if n != 0 {
                b.pages[p] = if u64::from(n) == PAGE_BITS {
                    b.full.clone()
                } else {
                    let mut page = [0u64; PAGE_WORDS];
                    page[..chunk.len()].copy_from_slice(chunk);
                    Arc::new(page)
                };
                b.page_ones[p] = n;
                b.group_ones[p / GROUP_PAGES] += u64::from(n);
                b.ones += u64::from(n);
            }
        }
        Some(b)
    }

    /// The words, in order (`len.div_ceil(64)` of them).
    pub fn words(&self) -> Words<'_> {
        Words { map: self, at: 0 }
    }

    /// Word `i` (bits `64 i .. 64 i + 63`).
    pub fn word(&self, i: usize) -> u64 {
        self.pages[i / PAGE_WORDS][i % PAGE_WORDS]
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
        self.pages.len()
    }

    /// The words of page `p` (shorter for the last page; empty past the end).
    pub fn page_words(&self, p: usize) -> &[u64] {
        match self.pages.get(p) {
            Some(page) => &page[..(self.nwords - p * PAGE_WORDS).min(PAGE_WORDS)],
            None => &[],
        }
    }

    /// Set bits in page `p`.
    pub fn page_ones(&self, p: usize) -> u64 {
        self.page_ones.get(p).map_or(0, |&n| u64::from(n))
    }

    /// Replace the words of page `p` (e.g. loading metadata page by page);
    /// bits past `len` are cleared. Returns false if `p` or `words.len()`
    /// does not fit the map.
    pub fn set_page_words(&mut self, p: usize, words: &[u64]) -> bool {
        if p >= self.page_count() || words.len() != self.page_words(p).len() {
            return false;
        }
        let mut seq = None;
        if self.page_bits(p) == PAGE_BITS && words.iter().all(|&w| w == !0) {
            self.fill_page(p, &mut seq);
            return true;
        }
        for (i, &w) in words.iter().enumerate() {
            let wi = p * PAGE_WORDS + i;
            let mut w = w;
            if wi + 1 == self.nwords && !self.len.is_multiple_of(64) {
                w &= (1u64 << (self.len % 64)) - 1;
            }
            self.store(wi, w, &mut seq);
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

    /// Store `new` into word `wi`, keeping the counts and the change
    /// tracking (one counter value per call: `seq`). Touches (and, if
    /// shared, copies) the page only when the word changes.
    fn store(&mut self, wi: usize, new: u64, seq: &mut Option<u64>) {
        let (p, i) = (wi / PAGE_WORDS, wi % PAGE_WORDS);
        let old = self.pages[p][i];
        if old == new {
            return;
        }
        Arc::make_mut(&mut self.pages[p])[i] = new;
        let (a, b) = (u64::from(old.count_ones()), u64::from(new.count_ones()));
        self.ones = self.ones + b - a;
        self.page_ones[p] = (u64::from(self.page_ones[p]) + b - a) as u32;
        // A page that became uniform goes back to the shared page (its
        // memory is freed).
        if self.page_ones[p] == 0 {
            self.pages[p] = self.zero.clone();
        } else if u64::from(self.page_ones[p]) == PAGE_BITS {
            self.pages[p] = self.full.clone();
        }
        self.group_ones[p / GROUP_PAGES] = self.group_ones[p / GROUP_PAGES] + b - a;
        let s = match *seq {
            Some(s) => s,
            None => {
                let s = self.begin_change();
                *seq = Some(s);
                s
            }
        };
        self.page_seq[p] = s;
        self.group_seq[p / GROUP_PAGES] = s;
    }

    /// Bits of page `p` inside the map ([`PAGE_BITS`] but for the last).
    fn page_bits(&self, p: usize) -> u64 {
        self.len.saturating_sub(p as u64 * PAGE_BITS).min(PAGE_BITS)
    }

    /// Set every bit of page `p`, which lies wholly inside the map: it
    /// becomes the shared full page.
    fn fill_page(&mut self, p: usize, seq: &mut Option<u64>) {
        debug_assert_eq!(self.page_bits(p), PAGE_BITS);
        let n = u64::from(self.page_ones[p]);
        if n == PAGE_BITS {
            return;
        }
        let s = *seq.get_or_insert_with(|| self.begin_change());
        self.pages[p] = self.full.clone();
        self.page_ones[p] = PAGE_BITS as u32;
        self.group_ones[p / GROUP_PAGES] += PAGE_BITS - n;
        self.ones += PAGE_BITS - n;
        self.page_seq[p] = s;
        self.group_seq[p / GROUP_PAGES] = s;
    }

    /// Page `p` has [`PAGE_BITS`] bits inside the map, all set.
    pub fn page_full(&self, p: usize) -> bool {
        self.page_ones(p) == PAGE_BITS
    }

    /// Page `p` has [`PAGE_BITS`] bits inside the map (all but a partial
    /// last page), so it can be full.
    pub fn page_may_fill(&self, p: usize) -> bool {
        p < self.page_count() && self.page_bits(p) == PAGE_BITS
    }

    /// Pages of this map holding their own memory (neither the shared
    /// zero page nor the shared full page).
    pub fn mixed_pages(&self) -> usize {
        self.pages
            .iter()
            .filter(|p| !Arc::ptr_eq(p, &self.zero) && !Arc::ptr_eq(p, &self.full))
            .count()
    }

    pub fn get(&self, i: u64) -> bool {
        i < self.len && self.word((i / 64) as usize) & (1 << (i % 64)) != 0
    }

    /// Set bit `i`; returns true if it was clear.
    pub fn set(&mut self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        let wi = (i / 64) as usize;
        let old = self.word(wi);
        self.store(wi, old | 1u64 << (i % 64), &mut None);
        old & 1u64 << (i % 64) == 0
    }

    /// Clear bit `i`; returns true if it was set.
    pub fn clear(&mut self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        let wi = (i / 64) as usize;
        let old = self.word(wi);
        self.store(wi, old & !(1u64 << (i % 64)), &mut None);
        old & 1u64 << (i % 64) != 0
    }

    /// Set `count` bits from `first`; returns how many were newly set.
    /// Whole pages become the shared full page (one pointer each).
    pub fn set_range(&mut self, first: u64, count: u64) -> u64 {
        let end = first.saturating_add(count).min(self.len);
        let mut i = first;
        let before = self.ones;
        let mut seq = None;
        // A page or a word at a time: mask the bits of [i, end) inside
        // word i / 64.
        while i < end {
            if i.is_multiple_of(PAGE_BITS) && end - i >= PAGE_BITS {
                self.fill_page((i / PAGE_BITS) as usize, &mut seq);
                i += PAGE_BITS;
                continue;
            }
            let (wi, mask, n) = word_span(i, end);
            let old = self.word(wi);
            self.store(wi, old | mask, &mut seq);
            i += n;
        }
        self.ones - before
    }

    /// Clear `count` bits from `first`; returns how many were set. Whole
    /// pages go back to the shared zero page (their memory is freed).
    pub fn clear_range(&mut self, first: u64, count: u64) -> u64 {
        let end = first.saturating_add(count).min(self.len);
        let mut i = first;
        let before = self.ones;
        let mut seq = None;
        while i < end {
            let p = (i / PAGE_BITS) as usize;
            if i.is_multiple_of(PAGE_BITS) && end - i >= PAGE_BITS {
                let n = u64::from(self.page_ones[p]);
                if n != 0 {
                    let s = *seq.get_or_insert_with(|| self.begin_change());
                    self.pages[p] = self.zero.clone();
                    self.page_ones[p] = 0;
                    self.group_ones[p / GROUP_PAGES] -= n;
                    self.ones -= n;
                    self.page_seq[p] = s;
                    self.group_seq[p / GROUP_PAGES] = s;
                }
                i += PAGE_BITS;
                continue;
            }
            let (wi, mask, n) = word_span(i, end);
            let old = self.word(wi);
            if old & mask != 0 {
                self.store(wi, old & !mask, &mut seq);
            }
            i += n;
        }
        before - self.ones
    }

    /// The number of consecutive set bits from `from`, at most `max`.
    pub fn run_len(&self, from: u64, max: u64) -> u64 {
        let end = from.saturating_add(max).min(self.len);
        let mut i = from;
        while i < end {
            let bit = i % 64;
            let avail = (64 - bit).min(end - i);
            // Ones from bit `bit` on: the shifted-in high bits are zeroes,
            // so the run never counts past the word.
            let ones = u64::from((!(self.word((i / 64) as usize) >> bit)).trailing_zeros());
            if ones < avail {
                return i + ones - from;
            }
            i += avail;
        }
        end.saturating_sub(from)
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
        let zero = self.zero.clone();
        for p in 0..self.pages.len() {
            if self.page_ones[p] != 0 {
                self.pages[p] = zero.clone();
                self.page_ones[p] = 0;
                self.page_seq[p] = s;
                self.group_seq[p / GROUP_PAGES] = s;
            }
        }
        self.group_ones.iter_mut().for_each(|g| *g = 0);
        self.ones = 0;
    }

    /// `self |= other` (same length); returns newly set bits.
    pub fn union(&mut self, other: &Bitmap) -> u64 {
        let before = self.ones;
        let mut seq = None;
        for p in 0..self.pages.len().min(other.pages.len()) {
            if other.page_ones[p] == 0 || Arc::ptr_eq(&self.pages[p], &other.pages[p]) {
                continue;
            }
            let n = self.page_words(p).len().min(other.page_words(p).len());
            for i in 0..n {
                let wi = p * PAGE_WORDS + i;
                let new = self.word(wi) | other.word(wi);
                self.store(wi, new, &mut seq);
            }
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
                let (wi, mask, k) = word_span(i, b);
                n += u64::from((self.word(wi) & mask).count_ones());
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
        let mut wi = (from / 64) as usize;
        let mut w = self.word(wi) & (!0u64 << (from % 64));
        if self.page_ones[wi / PAGE_WORDS] == 0 {
            let p = self.next_nonempty_page(wi / PAGE_WORDS + 1)?;
            wi = p * PAGE_WORDS;
            w = self.word(wi);
        }
        loop {
            if w != 0 {
                let i = wi as u64 * 64 + u64::from(w.trailing_zeros());
                return (i < self.len).then_some(i);
            }
            wi += 1;
            if wi >= self.nwords {
                return None;
            }
            if wi.is_multiple_of(PAGE_WORDS) {
                let p = self.next_nonempty_page(wi / PAGE_WORDS)?;
                wi = p * PAGE_WORDS;
            }
            w = self.word(wi);
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
    fn test_a_64tib_map_marked_and_cleared_whole_stays_small() {
        // 64 TiB of 4 KiB blocks: 2^34 bits, 528,416 pages.
        let len = 1u64 << 34;
        let mut b = Bitmap::new(len);
        b.set_all();
        assert_eq!((b.count(), b.mixed_pages()), (len, 1));
        // A resync that cleared all but a few runs.
        let keep = [(5 * PAGE_BITS + 3, 10), (len / 2, 1), (len - 7, 7)];
        b.clear_range(0, len);
        for &(at, n) in &keep {
            b.set_range(at, n);
        }
        assert_eq!(b.count(), 18);
        assert!(b.mixed_pages() <= 3);
        assert_eq!(b.next_set(0), Some(5 * PAGE_BITS + 3));
        assert_eq!(b.next_set(5 * PAGE_BITS + 13), Some(len / 2));
        assert_eq!(b.next_set(len / 2 + 1), Some(len - 7));
        assert_eq!(b.count_range(PAGE_BITS, len - 2 * PAGE_BITS), 11);
    }

    #[test]
    fn test_uniform_pages_share_memory() {
        // 8 TiB of 4 KiB blocks, less a partial last page.
        let len = (8u64 << 40) / 4096 - 100;
        let mut b = Bitmap::new(len);
        b.set_all();
        assert_eq!(b.count(), len);
        // Only the partial last page holds memory of its own.
        assert_eq!(b.mixed_pages(), 1);
        let snapshot = b.clone();
        // A resync clears runs: a page cleared bit by bit, one word at a
        // time, and one cleared whole, end up shared again.
        for k in 0..PAGE_WORDS as u64 {
            b.clear_range(PAGE_BITS + k * 64, 64);
            if k + 1 < PAGE_WORDS as u64 {
                assert_eq!(b.mixed_pages(), 2, "page 1 partly cleared");
            }
        }
        assert_eq!(b.mixed_pages(), 1, "page 1 wholly clear: shared again");
        b.clear_range(2 * PAGE_BITS, PAGE_BITS);
        assert_eq!(b.mixed_pages(), 1);
        assert_eq!(b.count(), len - 2 * PAGE_BITS);
        assert_eq!(b.next_set(PAGE_BITS), Some(3 * PAGE_BITS));
        // A bit set back makes a page full again.
        b.clear(5);
        assert_eq!(b.mixed_pages(), 2);
        b.set(5);
        assert_eq!(b.mixed_pages(), 1);
        // The snapshot kept its bits.
        assert_eq!(snapshot.count(), len);
        assert!(snapshot.get(PAGE_BITS + 3) && !b.get(PAGE_BITS + 3));
        // Loading a full page's words shares the full page.
        let mut c = Bitmap::new(len);
        assert!(c.set_page_words(3, &[!0; PAGE_WORDS]));
        assert_eq!((c.mixed_pages(), c.count()), (0, PAGE_BITS));
        let w = Bitmap::from_words(2 * PAGE_BITS, vec![!0; 2 * PAGE_WORDS]).unwrap();
        assert_eq!((w.mixed_pages(), w.count()), (0, 2 * PAGE_BITS));
    }

    proptest! {
        /// `clear_range` and `run_len` agree with bit-at-a-time models,
        /// across pages (whole pages freed) and partial words.
        #[test]
        fn prop_clear_range_and_run_len_match_bits(
            len in 1u64..3 * PAGE_BITS,
            sets in proptest::collection::vec((0u64..3 * PAGE_BITS, 0u64..2 * PAGE_BITS), 0..6),
            first in 0u64..3 * PAGE_BITS,
            count in 0u64..3 * PAGE_BITS,
            from in 0u64..3 * PAGE_BITS,
            max in 0u64..3 * PAGE_BITS,
        ) {
            let mut b = Bitmap::new(len);
            for (a, n) in sets {
                b.set_range(a, n);
            }
            let mut model: Vec<bool> = (0..len).map(|i| b.get(i)).collect();
            let run = (from..len.min(from.saturating_add(max)))
                .take_while(|&i| model[i as usize])
                .count() as u64;
            prop_assert_eq!(b.run_len(from, max), run);
            let end = first.saturating_add(count).min(len);
            let mut cleared = 0;
            for i in first..end {
                cleared += u64::from(core::mem::replace(&mut model[i as usize], false));
            }
            let changed = b.change_seq();
            prop_assert_eq!(b.clear_range(first, count), cleared);
            prop_assert_eq!(b.count(), model.iter().filter(|&&x| x).count() as u64);
            prop_assert_eq!(b.count_range(0, len), b.count());
            for (i, &m) in model.iter().enumerate() {
                prop_assert_eq!(b.get(i as u64), m);
            }
            // A change is seen by whoever persists changed pages.
            prop_assert_eq!(b.change_seq() != changed, cleared > 0);
        }
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

    #[test]
    fn test_clones_share_pages_until_written() {
        let len = 5 * PAGE_BITS;
        let mut a = Bitmap::new(len);
        a.set(3);
        a.set(4 * PAGE_BITS + 9);
        let snapshot = a.clone();
        let mut b = a.clone();
        b.set(PAGE_BITS);
        b.clear(3);
        a.set(2 * PAGE_BITS);
        a.clear_all();
        assert_eq!(snapshot.count(), 2);
        assert!(snapshot.get(3) && snapshot.get(4 * PAGE_BITS + 9));
        assert!(!snapshot.get(PAGE_BITS) && !snapshot.get(2 * PAGE_BITS));
        assert_eq!(b.count(), 2);
        assert!(b.get(PAGE_BITS) && !b.get(3) && b.get(4 * PAGE_BITS + 9));
        assert_eq!(a.count(), 0);
        assert_eq!(a.next_set(0), None);
        let words: Vec<u64> = snapshot.words().copied().collect();
        assert_eq!(words.len(), snapshot.words().len());
        assert_eq!(Bitmap::from_words(len, words), Some(snapshot));
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
