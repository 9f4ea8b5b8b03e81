//! Online verify as the node drives it: the primary's run (`crate::verify`)
//! asks for chunks, reads them here and on the peer (VERIFY_REQ on the
//! stream), and with `resync` marks differing blocks dirty.

use super::*;

impl<H: Payload> Node<H> {
    /// Request the next verify chunks (local read first, then VERIFY_REQ
    /// on the stream), or report the end of the run.
    pub(super) fn verify_progress(&mut self) {
        for b in self.verify.take_differing() {
            if self.verify_resync {
                self.meta.dirty.set_range(b, 1);
                // On disk within `BITMAP_PERSIST_INTERVAL_US` (with the
                // resync's progress writes, `persist_progress`): a verify
                // of a large volume runs for hours, and a crash must not
                // forget what it found; once per chunk would write the
                // whole map for every 1 MiB checked.
                self.bitmap_unpersisted = true;
            }
        }
        if !self.verify.status.active {
            let st = self.verify.status;
            if st.runs > self.verify_notified && st.aborted.is_none() {
                self.verify_notified = st.runs;
                self.notify(Notice::VerifyFinished {
                    checked: st.checked_blocks,
                    differing: st.differing_blocks,
                    first: (st.first_len > 0).then_some(st.first_differing[0]),
                });
                if self.verify_resync && st.differing_blocks > 0 {
                    // The marked blocks go to the peer through the normal
                    // resync: a new session from the primary's dirty map.
                    self.end_session("online verify found differing blocks: resyncing them");
                }
            }
            return;
        }
        let busy = self.now < self.writes.last_write_us + self.cfg.resync_idle_us;
        while let Some((start, count)) = self.verify.next_chunk(busy) {
            let io = self.ios.start(io::Purpose::VerifyRead {
                start,
                count,
                reply: false,
            });
            self.emit(Action::Read {
                io,
                block: start,
                count: u64::from(count),
            });
            let v = Verify {
                start_block: start,
                count,
            };
            self.send_reliable(Message::VerifyReq(v), None);
        }
    }
}
