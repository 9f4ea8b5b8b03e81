//! Reliable, ordered delivery of MSL messages over a lossy link.
//!
//! Pure: the caller passes `now` (microseconds) and moves bytes. The sender
//! side ([`ReliableTx`]) numbers messages, keeps them until acknowledged,
//! bounds the in-flight window and retransmits on timeout with exponential
//! backoff (and early, once, when selective acks show a hole). The receiver
//! side ([`ReliableRx`]) buffers out-of-order arrivals inside its window,
//! drops duplicates and anything outside the window, delivers strictly in
//! order and builds cumulative + selective acknowledgements.
//!
//! Sequence numbers of a session start at a base chosen by the sender (the
//! session id with its low 32 bits cleared), so frames from an earlier
//! session fall outside the receiver's window and are dropped.

use alloc::collections::VecDeque;
use msl_wire::{Ack, MAX_SACK};

use crate::Micros;

/// Sender tunables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxConfig {
    /// Maximum unacknowledged messages in flight.
    pub window: usize,
    /// Retransmission timeout before any RTT sample.
    pub rto_initial_us: Micros,
    /// Lower bound of the computed RTO.
    pub rto_min_us: Micros,
    /// Upper bound of the RTO, including backoff.
    pub rto_max_us: Micros,
}

impl Default for TxConfig {
    fn default() -> Self {
        TxConfig {
            window: 256,
            rto_initial_us: 20_000,
            rto_min_us: 2_000,
            rto_max_us: 200_000,
        }
    }
}

#[derive(Debug)]
struct Slot<M> {
    seq: u64,
    item: M,
    first_sent_us: Micros,
    deadline_us: Micros,
    retries: u32,
    sacked: bool,
    fast_rexmit: bool,
}

/// Sender statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxStats {
    pub sent: u64,
    pub retransmits: u64,
    pub acked: u64,
}

/// Sender half of reliable delivery.
#[derive(Debug)]
pub struct ReliableTx<M> {
    cfg: TxConfig,
    next_seq: u64,
    slots: VecDeque<Slot<M>>,
    srtt_us: Option<Micros>,
    rttvar_us: Micros,
    rto_us: Micros,
    /// Round-trip samples not yet taken by the host (for its histogram),
    /// at most `RTT_SAMPLES_KEPT`: older ones go first.
    rtt_samples: VecDeque<Micros>,
    pub stats: TxStats,
}

/// Round-trip samples kept for the host between two takes.
const RTT_SAMPLES_KEPT: usize = 256;

impl<M> ReliableTx<M> {
    /// `base` is the sequence number before the first one sent (the first
    /// message gets `base + 1`).
    pub fn new(cfg: TxConfig, base: u64) -> Self {
        ReliableTx {
            cfg,
            next_seq: base.wrapping_add(1),
            slots: VecDeque::with_capacity(cfg.window),
            srtt_us: None,
            rttvar_us: 0,
            rto_us: cfg.rto_initial_us,
            rtt_samples: VecDeque::new(),
            stats: TxStats::default(),
        }
    }

    /// Hand every round-trip sample taken since the last call to `f`
    /// (first transmission to acknowledgement, retransmitted messages
    /// excluded), oldest first.
    pub fn take_rtt_samples(&mut self, mut f: impl FnMut(Micros)) {
        for s in self.rtt_samples.drain(..) {
            f(s);
        }
    }

    pub fn config(&self) -> &TxConfig {
        &self.cfg
    }

    /// Messages sent and not yet cumulatively acknowledged.
    pub fn in_flight(&self) -> usize {
        self.slots.len()
    }

    /// Whether one more message fits in the window.
    pub fn has_room(&self) -> bool {
        self.slots.len() < self.cfg.window
    }

    /// The sequence number the next `push` will assign.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Highest sequence number assigned so far.
    pub fn last_seq(&self) -> u64 {
        self.next_seq.wrapping_sub(1)
    }

    /// Current retransmission timeout.
    pub fn rto_us(&self) -> Micros {
        self.rto_us
    }

    /// Smoothed round-trip time, once sampled.
    pub fn srtt_us(&self) -> Option<Micros> {
        self.srtt_us
    }

    /// Take a sequence number for `item` and keep it for retransmission.
    /// The caller transmits it now. Returns the item back if the window is
    /// full.
    pub fn push(&mut self, now: Micros, item: M) -> Result<u64, M> {
        if !self.has_room() {
            return Err(item);
        }
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        self.slots.push_back(Slot {
            seq,
            item,
            first_sent_us: now,
            deadline_us: now.saturating_add(self.rto_us),
            retries: 0,
            sacked: false,
            fast_rexmit: false,
        });
        self.stats.sent += 1;
        Ok(seq)
    }

    /// Process an acknowledgement. `released` is called, in order, for every
    /// message the cumulative point now covers. Acks for sequence numbers
    /// never sent are ignored (and reported as `false`).
    pub fn on_ack(&mut self, now: Micros, ack: &Ack, mut released: impl FnMut(u64, M)) -> bool {
        let last = self.last_seq();
        if ack.cumulative > last {
            return false;
        }
        while let Some(front) = self.slots.front() {
            if front.seq > ack.cumulative {
                break;
            }
            let Some(slot) = self.slots.pop_front() else {
                break;
            };
            if slot.retries == 0 && !slot.sacked {
                // Karn: sample only messages sent once; a SACKed one was
                // sampled when its SACK arrived (its cumulative ack may come
                // much later, after a retransmitted hole below it).
                self.sample_rtt(now.saturating_sub(slot.first_sent_us));
            }
            self.stats.acked += 1;
            released(slot.seq, slot.item);
        }
        let n = usize::from(ack.sack_len).min(MAX_SACK);
        let mut highest_sacked = 0u64;
        for &(first, last_in_range) in &ack.sack[..n] {
            if first > last_in_range || last_in_range > last {
                continue;
            }
            highest_sacked = highest_sacked.max(last_in_range);
            let mut sample = None;
            for slot in self.slots.iter_mut() {
                if slot.seq >= first && slot.seq <= last_in_range && !slot.sacked {
                    slot.sacked = true;
                    if slot.retries == 0 {
                        sample = Some(now.saturating_sub(slot.first_sent_us));
                    }
                }
            }
            if let Some(rtt) = sample {
                self.sample_rtt(rtt);
            }
        }
        // A hole with at least three sacked messages above it was lost, not
        // delayed: retransmit it once now instead of waiting for the timer.
        if highest_sacked > 0 {
            for slot in self.slots.iter_mut() {
                if !slot.sacked
                    && slot.retries == 0
                    && !slot.fast_rexmit
                    && slot.seq.saturating_add(3) <= highest_sacked
                {
                    slot.fast_rexmit = true;
                }
            }
        }
        true
    }

    fn sample_rtt(&mut self, rtt: Micros) {
        if self.rtt_samples.len() == RTT_SAMPLES_KEPT {
            self.rtt_samples.pop_front();
        }
        self.rtt_samples.push_back(rtt);
        // RFC 6298 smoothing.
        match self.srtt_us {
            None => {
                self.srtt_us = Some(rtt);
                self.rttvar_us = rtt / 2;
            }
            Some(srtt) => {
                let diff = srtt.abs_diff(rtt);
                self.rttvar_us = (3 * self.rttvar_us + diff) / 4;
                self.srtt_us = Some((7 * srtt + rtt) / 8);
            }
        }
        let srtt = self.srtt_us.unwrap_or(rtt);
        self.rto_us =
            (srtt + 4 * self.rttvar_us.max(250)).clamp(self.cfg.rto_min_us, self.cfg.rto_max_us);
    }

    /// The next message due for retransmission at `now`, if any. Its timer
    /// is restarted with exponential backoff.
    pub fn poll_retransmit(&mut self, now: Micros) -> Option<(u64, &M)> {
        let rto = self.rto_us;
        let max = self.cfg.rto_max_us;
        let idx = self
            .slots
            .iter()
            .position(|s| !s.sacked && (s.fast_rexmit || s.deadline_us <= now))?;
        let slot = &mut self.slots[idx];
        slot.fast_rexmit = false;
        slot.retries = slot.retries.saturating_add(1);
        let backoff = rto.saturating_mul(1u64 << slot.retries.min(16)).min(max);
        slot.deadline_us = now.saturating_add(backoff);
        self.stats.retransmits += 1;
        Some((slot.seq, &slot.item))
    }

    /// Earliest time a retransmission may be due.
    pub fn poll_timeout(&self) -> Option<Micros> {
        self.slots
            .iter()
            .filter(|s| !s.sacked)
            .map(|s| if s.fast_rexmit { 0 } else { s.deadline_us })
            .min()
    }

    /// Iterate over unacknowledged messages in sequence order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &M)> {
        self.slots.iter().map(|s| (s.seq, &s.item))
    }

    /// Drop everything in flight (session ended); returns the items in
    /// sequence order.
    pub fn drain(&mut self) -> impl Iterator<Item = (u64, M)> + '_ {
        self.slots.drain(..).map(|s| (s.seq, s.item))
    }
}

/// What the receiver did with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxOutcome {
    /// New: buffered (and deliverable once the gap below closes).
    Accepted,
    /// Already received: dropped (the caller should still re-ack).
    Duplicate,
    /// Outside the window (stale session or far future): dropped.
    OutOfWindow,
}

/// Receiver statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RxStats {
    pub accepted: u64,
    pub duplicates: u64,
    pub out_of_window: u64,
    pub delivered: u64,
}

/// Receiver half of reliable delivery.
#[derive(Debug)]
pub struct ReliableRx<M> {
    window: usize,
    /// Last sequence number handed to the caller.
    delivered: u64,
    /// `buf[i]` holds sequence `delivered + 1 + i`.
    buf: VecDeque<Option<M>>,
    /// How many slots of `buf` hold a message (the SACK scan stops there).
    held: usize,
    pub stats: RxStats,
}

impl<M> ReliableRx<M> {
    /// `base`: the sender's base (the first expected sequence is
    /// `base + 1`).
    pub fn new(window: usize, base: u64) -> Self {
        let mut buf = VecDeque::with_capacity(window);
        buf.resize_with(window, || None);
        ReliableRx {
            window,
            delivered: base,
            buf,
            held: 0,
            stats: RxStats::default(),
        }
    }

    /// Offer a received frame.
    pub fn on_frame(&mut self, seq: u64, item: M) -> RxOutcome {
        if seq <= self.delivered {
            self.stats.duplicates += 1;
            return RxOutcome::Duplicate;
        }
        let off = seq - self.delivered - 1;
        if off >= self.window as u64 {
            self.stats.out_of_window += 1;
            return RxOutcome::OutOfWindow;
        }
        let slot = &mut self.buf[off as usize];
        if slot.is_some() {
            self.stats.duplicates += 1;
            return RxOutcome::Duplicate;
        }
        *slot = Some(item);
        self.held += 1;
        self.stats.accepted += 1;
        RxOutcome::Accepted
    }

    /// Next message in order, if it has arrived.
    pub fn pop(&mut self) -> Option<(u64, M)> {
        let item = self.buf.front_mut()?.take()?;
        self.held -= 1;
        self.buf.pop_front();
        self.buf.push_back(None);
        self.delivered += 1;
        self.stats.delivered += 1;
        Some((self.delivered, item))
    }

    /// Last sequence number delivered in order.
    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    /// Highest sequence received with nothing missing below it.
    pub fn cumulative(&self) -> u64 {
        let ready = self.buf.iter().take_while(|s| s.is_some()).count() as u64;
        self.delivered + ready
    }

    /// Build an acknowledgement with the caller's durability points.
    pub fn ack(&self, applied: u64, stable: u64) -> Ack {
        let mut ack = Ack {
            cumulative: self.cumulative(),
            applied,
            stable,
            ..Ack::default()
        };
        let mut n = 0usize;
        let mut run: Option<(u64, u64)> = None;
        let mut seen = 0usize;
        for (i, s) in self.buf.iter().enumerate() {
            // Past the last held message only empty slots remain.
            if seen == self.held && run.is_none() {
                break;
            }
            seen += usize::from(s.is_some());
            let seq = self.delivered + 1 + i as u64;
            match (s.is_some(), run) {
                (true, None) => run = Some((seq, seq)),
                (true, Some((a, _))) => run = Some((a, seq)),
                (false, Some(r)) => {
                    if r.0 > ack.cumulative && n < MAX_SACK {
                        ack.sack[n] = r;
                        n += 1;
                    }
                    run = None;
                }
                (false, None) => {}
            }
        }
        if let Some(r) = run {
            if r.0 > ack.cumulative && n < MAX_SACK {
                ack.sack[n] = r;
                n += 1;
            }
        }
        ack.sack_len = n as u8;
        ack
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::collections::BTreeSet;
    use alloc::vec::Vec;
    use proptest::prelude::*;

    fn cfg(window: usize) -> TxConfig {
        TxConfig {
            window,
            rto_initial_us: 1_000,
            rto_min_us: 500,
            rto_max_us: 8_000,
        }
    }

    #[test]
    fn test_full_window_push_refused() {
        let mut tx = ReliableTx::new(cfg(2), 0);
        assert_eq!(tx.push(0, 'a'), Ok(1));
        assert_eq!(tx.push(0, 'b'), Ok(2));
        assert_eq!(tx.push(0, 'c'), Err('c'));
        let mut got = Vec::new();
        assert!(tx.on_ack(
            10,
            &Ack {
                cumulative: 1,
                ..Ack::default()
            },
            |s, m| got.push((s, m))
        ));
        assert_eq!(got, [(1, 'a')]);
        assert!(tx.has_room());
    }

    #[test]
    fn test_rtt_samples_handed_over_once_retransmissions_excluded() {
        let mut tx = ReliableTx::new(cfg(4), 0);
        tx.push(100, 'a').unwrap();
        tx.push(200, 'b').unwrap();
        let ack = |c| Ack {
            cumulative: c,
            ..Ack::default()
        };
        assert!(tx.on_ack(350, &ack(1), |_, _| {}));
        let mut got = Vec::new();
        tx.take_rtt_samples(|s| got.push(s));
        assert_eq!(got, [250], "first transmission to acknowledgement");
        got.clear();
        tx.take_rtt_samples(|s| got.push(s));
        assert!(got.is_empty(), "each sample is handed over once");
        // 'b' times out and is resent: its ack says nothing of the RTT.
        assert!(tx.poll_retransmit(200 + 1_000).is_some());
        assert!(tx.on_ack(1_500, &ack(2), |_, _| {}));
        tx.take_rtt_samples(|s| got.push(s));
        assert!(
            got.is_empty(),
            "a retransmitted message gives no sample: {got:?}"
        );
    }

    #[test]
    fn test_ack_beyond_sent_ignored() {
        let mut tx = ReliableTx::new(cfg(4), 100);
        tx.push(0, ()).unwrap();
        assert!(!tx.on_ack(
            1,
            &Ack {
                cumulative: 105,
                ..Ack::default()
            },
            |_, _| {}
        ));
        assert_eq!(tx.in_flight(), 1);
    }

    #[test]
    fn test_timeout_retransmits_with_backoff() {
        let mut tx = ReliableTx::new(cfg(4), 0);
        tx.push(0, 'x').unwrap();
        assert!(tx.poll_retransmit(999).is_none());
        assert_eq!(tx.poll_retransmit(1_000).map(|(s, _)| s), Some(1));
        // Backoff: next deadline 1000 + 2*1000.
        assert!(tx.poll_retransmit(2_999).is_none());
        assert_eq!(tx.poll_retransmit(3_000).map(|(s, _)| s), Some(1));
        assert_eq!(tx.stats.retransmits, 2);
    }

    #[test]
    fn test_sack_hole_fast_retransmit() {
        let mut tx = ReliableTx::new(cfg(8), 0);
        for i in 0..5 {
            tx.push(0, i).unwrap();
        }
        let mut ack = Ack {
            cumulative: 1,
            ..Ack::default()
        };
        ack.sack[0] = (3, 5);
        ack.sack_len = 1;
        tx.on_ack(10, &ack, |_, _| {});
        // seq 2 is the hole with 3 sacked above it: due immediately.
        assert_eq!(tx.poll_timeout(), Some(0));
        assert_eq!(tx.poll_retransmit(11).map(|(s, _)| s), Some(2));
        assert!(tx.poll_retransmit(11).is_none());
    }

    #[test]
    fn test_sacked_then_cumulative_late_does_not_inflate_rtt() {
        let mut tx = ReliableTx::new(cfg(8), 0);
        for i in 0..5 {
            tx.push(0, i).unwrap();
        }
        let mut ack = Ack {
            cumulative: 0,
            ..Ack::default()
        };
        ack.sack[0] = (2, 5);
        ack.sack_len = 1;
        tx.on_ack(100, &ack, |_, _| {});
        assert_eq!(tx.srtt_us(), Some(100));
        // Hole 1 retransmitted; the cumulative ack arrives much later.
        let _ = tx.poll_retransmit(1_000_000);
        tx.on_ack(
            2_000_000,
            &Ack {
                cumulative: 5,
                ..Ack::default()
            },
            |_, _| {},
        );
        assert!(
            tx.srtt_us().unwrap() < 1_000,
            "srtt inflated: {:?}",
            tx.srtt_us()
        );
    }

    #[test]
    fn test_rx_out_of_order_delivers_in_order() {
        let mut rx = ReliableRx::new(8, 10);
        assert_eq!(rx.on_frame(13, 'c'), RxOutcome::Accepted);
        assert_eq!(rx.on_frame(11, 'a'), RxOutcome::Accepted);
        assert_eq!(rx.pop(), Some((11, 'a')));
        assert_eq!(rx.pop(), None);
        let ack = rx.ack(0, 0);
        assert_eq!(ack.cumulative, 11);
        assert_eq!(&ack.sack[..usize::from(ack.sack_len)], &[(13, 13)]);
        assert_eq!(rx.on_frame(12, 'b'), RxOutcome::Accepted);
        assert_eq!(rx.on_frame(12, 'b'), RxOutcome::Duplicate);
        assert_eq!(rx.pop(), Some((12, 'b')));
        assert_eq!(rx.pop(), Some((13, 'c')));
        assert_eq!(rx.on_frame(11, 'a'), RxOutcome::Duplicate);
        assert_eq!(rx.on_frame(13 + 9, 'z'), RxOutcome::OutOfWindow);
    }

    #[test]
    fn test_rx_stale_session_out_of_window() {
        let base = 0xABCD_0000_0000u64;
        let mut rx: ReliableRx<()> = ReliableRx::new(64, base);
        assert_eq!(rx.on_frame(0x1234_0000_0005, ()), RxOutcome::Duplicate);
        assert_eq!(rx.on_frame(0xFFFF_0000_0005, ()), RxOutcome::OutOfWindow);
    }

    proptest! {
        /// Any pattern of loss, duplication and reordering delivers every
        /// message exactly once, in order, once the link stops losing.
        #[test]
        fn prop_lossy_link_delivers_exactly_once_in_order(
            seed in any::<u64>(),
            loss in 0u64..40,
            n in 1usize..200,
        ) {
            let mut rng = crate::rng::Rng::new(seed);
            let mut tx = ReliableTx::new(cfg(16), 7 << 32);
            let mut rx = ReliableRx::new(16, 7 << 32);
            let mut wire: Vec<(u64, u64)> = Vec::new(); // data frames (seq, payload)
            let mut acks: Vec<Ack> = Vec::new();
            let mut next = 0u64;
            let mut got = Vec::new();
            let mut now = 0u64;
            let mut seen = BTreeSet::new();
            for step in 0..20_000u64 {
                now += 100;
                let lossy = step < 10_000;
                while (next as usize) < n && tx.has_room() {
                    let seq = tx.push(now, next).unwrap();
                    wire.push((seq, next));
                    next += 1;
                }
                while let Some((seq, m)) = tx.poll_retransmit(now) {
                    wire.push((seq, *m));
                }
                // Shuffle a bit, drop some, duplicate some.
                if wire.len() > 1 {
                    let i = rng.below(wire.len() as u64) as usize;
                    let last = wire.len() - 1;
                    wire.swap(i, last);
                }
                for (seq, m) in wire.drain(..) {
                    if lossy && rng.below(100) < loss { continue; }
                    let _ = rx.on_frame(seq, m);
                    if rng.below(100) < 5 { let _ = rx.on_frame(seq, m); }
                }
                while let Some((seq, m)) = rx.pop() {
                    prop_assert!(seen.insert(seq));
                    got.push(m);
                }
                acks.push(rx.ack(rx.delivered(), rx.delivered()));
                for a in acks.drain(..) {
                    if lossy && rng.below(100) < loss { continue; }
                    tx.on_ack(now, &a, |_, _| {});
                }
                if got.len() == n && tx.in_flight() == 0 { break; }
            }
            prop_assert_eq!(got, (0..n as u64).collect::<Vec<_>>());
            prop_assert_eq!(tx.in_flight(), 0);
        }
    }
}
