//! Online verify as the node drives it: the primary's run (`crate::verify`)
//! asks for chunks, reads them here and on the peer (VERIFY_REQ on the
//! stream), and with `resync` marks differing blocks dirty.

use super::*;
use msl_wire::verify_flags;

/// The primary's online verify run and how its end is reported.
pub(super) struct OnlineVerify {
    pub(super) run: VerifyRun,
    pub(super) notified: u64,
    pub(super) resync: bool,
}

impl<H: Payload> Node<H> {
    /// Request the next verify chunks (local read first, then VERIFY_REQ
    /// on the stream), or report the end of the run.
    pub(super) fn verify_progress(&mut self) {
        for b in self.online.run.take_differing() {
            if self.online.resync {
                self.meta.dirty.set_range(b, 1);
                // On disk within `BITMAP_PERSIST_INTERVAL_US` (with the
                // resync's progress writes, `persist_progress`): a verify
                // of a large volume runs for hours, and a crash must not
                // forget what it found; once per chunk would write the
                // whole map for every 1 MiB checked.
                self.progress.unpersisted = true;
            }
        }
        if !self.online.run.status.active {
            let st = self.online.run.status;
            if st.runs > self.online.notified && st.aborted.is_none() {
                self.online.notified = st.runs;
                self.notify(Notice::VerifyFinished {
                    checked: st.checked_blocks,
                    differing: st.differing_blocks,
                    first: (st.first_len > 0).then_some(st.first_differing[0]),
                });
                if self.online.resync && st.differing_blocks > 0 {
                    // The marked blocks go to the peer through the normal
                    // resync: a new session from the primary's dirty map.
                    self.end_session("online verify found differing blocks: resyncing them");
                }
            }
            return;
        }
        if let Some((start, count)) = self.online.run.next_zero_range() {
            let v = Verify {
                start_block: start,
                count,
                flags: verify_flags::ZERO_RANGE,
            };
            self.send_reliable(Message::VerifyReq(v), None);
        }
        let busy = self.now < self.writes.last_write_us + self.cfg.resync_idle_us;
        while let Some((start, count)) = self.online.run.next_chunk(busy) {
            let io = self.ios.start(io::Purpose::VerifyRead {
                start,
                count,
                reply: false,
                zero_range: false,
            });
            self.emit(Action::Read {
                io,
                block: start,
                count: u64::from(count),
            });
            let v = Verify {
                start_block: start,
                count,
                flags: 0,
            };
            self.send_reliable(Message::VerifyReq(v), None);
        }
    }

    /// A verify read completed: its data, or `hole`, the blocks from its
    /// first that are a hole (its own are then digests of zeroes, without
    /// hashing them). The primary's run covers the rest of a hole with
    /// zero ranges (`verify_progress`); the secondary answers the peer.
    pub(super) fn verify_read_done(&mut self, io: IoId, payload: Option<H>, hole: Option<u64>) {
        let Some(io::Purpose::VerifyRead {
            start,
            count,
            reply,
            zero_range,
        }) = self.ios.take(io)
        else {
            unreachable!("io {io} is a verify read");
        };
        if zero_range {
            // No hole: its first block holds data here.
            self.verify_reply_zero(start, count, hole.unwrap_or(0));
            return;
        }
        let d = if hole.is_some() {
            verify::zero_digests(count as usize)
        } else {
            // `count` blocks of equal size (`block_size` bytes from msld;
            // a host may represent a block otherwise, as the simulator's
            // one tag per block).
            let data = payload.as_ref().map_or(&[][..], |p| p.bytes());
            if data.is_empty() || !data.len().is_multiple_of(count as usize) {
                self.counters.frames_unexpected += 1;
                return;
            }
            verify::digests(data, data.len() / count as usize)
        };
        if reply {
            let v = Verify {
                start_block: start,
                count,
                flags: 0,
            };
            self.send_reliable(Message::VerifyReply(v), Some(H::from_bytes(&d)));
            return;
        }
        if let Some(h) = hole {
            self.online.run.local_hole(start, h);
        }
        self.online.run.local(start, d);
        self.verify_progress();
    }

    /// The secondary: a VERIFY_REQ in stream order. A zero range reads its
    /// first block only (a hole reports its extent without being read).
    pub(super) fn verify_request(&mut self, v: Verify) {
        let zero_range = v.flags & verify_flags::ZERO_RANGE != 0;
        let max = if zero_range {
            verify::MAX_ZERO_RANGE_BLOCKS
        } else {
            4 * verify::CHUNK_BLOCKS
        };
        let in_volume = v
            .start_block
            .checked_add(u64::from(v.count))
            .is_some_and(|end| end <= self.cfg.volume_blocks);
        if self.role != Role::Secondary || !in_volume || v.count == 0 || v.count > max {
            self.counters.frames_unexpected += 1;
            return;
        }
        let io = self.ios.start(io::Purpose::VerifyRead {
            start: v.start_block,
            count: v.count,
            reply: true,
            zero_range,
        });
        self.emit(Action::Read {
            io,
            block: v.start_block,
            count: if zero_range { 1 } else { u64::from(v.count) },
        });
    }

    /// The secondary's answer to a zero range: `hole` blocks from its
    /// first are a hole here (0: the first holds data).
    pub(super) fn verify_reply_zero(&mut self, start: u64, count: u32, hole: u64) {
        let v = Verify {
            start_block: start,
            count: hole.min(u64::from(count)) as u32,
            flags: verify_flags::ZERO_RANGE,
        };
        self.send_reliable(Message::VerifyReply(v), None);
    }

    /// The primary: a VERIFY_REPLY (digests, or a zero range's answer).
    pub(super) fn verify_reply(&mut self, v: Verify, digests: &[u8]) {
        let ok = if v.flags & verify_flags::ZERO_RANGE != 0 {
            digests.is_empty() && self.online.run.remote_zero(v.start_block, v.count)
        } else {
            self.online.run.remote(v.start_block, v.count, digests)
        };
        if ok {
            self.verify_progress();
        } else {
            self.counters.frames_unexpected += 1;
        }
    }
}
