//! A handle for front ends (NBD): submit client writes and flushes to the
//! core's inbox, wait for (or be called with) the core's answer.

use std::sync::mpsc::sync_channel;
use std::sync::Arc;
use std::time::Duration;

use msl_core::node::{ClientError, IoKind, Status};

use crate::counters::Shared;
use crate::inbox::Inbox;
use crate::input::{Block, Input, Reply, ReplyTo};

/// A handle for front ends (NBD): submit writes and flushes, wait for the
/// core's answer.
#[derive(Clone)]
pub struct Client {
    pub inputs: Inbox,
    pub shared: Arc<Shared>,
    pub block_size: u64,
}

impl Client {
    /// Write whole blocks (offset and length multiples of the block size).
    pub fn write_blocks(&self, offset: u64, data: &[u8], fua: bool) -> Reply {
        self.submit(offset, data.len() as u64, IoKind::Write, fua, Some(data))
    }

    /// Submit a block-aligned write, trim or write-zeroes and wait for the
    /// core's answer.
    pub fn submit(
        &self,
        offset: u64,
        len: u64,
        kind: IoKind,
        fua: bool,
        data: Option<&[u8]>,
    ) -> Reply {
        let (tx, rx) = sync_channel(1);
        let payload = data.map(Block::from);
        self.send_write(offset, len, kind, fua, payload, ReplyTo::Wait(tx))?;
        rx.recv().unwrap_or(Err(ClientError::NotPrimary))
    }

    /// Submit a block-aligned write without waiting: `reply` is answered
    /// on the thread that runs the core when the outcome is known (a
    /// [`ReplyTo::Call`] must not block).
    pub fn submit_async(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
        data: Block,
        reply: ReplyTo,
    ) -> Result<(), ClientError> {
        self.send_write(offset, len, IoKind::Write, fua, Some(data), reply)
    }

    fn send_write(
        &self,
        offset: u64,
        len: u64,
        kind: IoKind,
        fua: bool,
        payload: Option<Block>,
        reply: ReplyTo,
    ) -> Result<(), ClientError> {
        let input = Input::Write {
            block: offset / self.block_size,
            count: len / self.block_size,
            kind,
            fua,
            payload,
            reply,
        };
        self.inputs.send(input).map_err(|_| ClientError::NotPrimary)
    }

    pub fn flush(&self) -> Reply {
        let (tx, rx) = sync_channel(1);
        self.inputs
            .send(Input::Flush { reply: tx })
            .map_err(|_| ClientError::NotPrimary)?;
        rx.recv().unwrap_or(Err(ClientError::NotPrimary))
    }

    pub fn status(&self) -> Option<Status> {
        let (tx, rx) = sync_channel(1);
        self.inputs.send(Input::Status(tx)).ok()?;
        rx.recv_timeout(Duration::from_secs(2)).ok()
    }
}
