//! Online verify as the node drives it: the primary's run (`crate::verify`)
//! asks for chunks, reads them here and on the peer (VERIFY_REQ on the
//! stream), and with `resync` marks differing blocks dirty.

use super::*;

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
        let busy = self.now < self.writes.last_write_us + self.cfg.resync_idle_us;
        while let Some((start, count)) = self.online.run.next_chunk(busy) {
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
