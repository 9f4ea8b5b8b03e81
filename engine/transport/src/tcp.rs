//! Kernel-TCP backend: the same Ethernet frames, each prefixed by its
//! length (u32, big-endian), over one TCP connection on the MSL. It exists to
//! compare the raw backends against the kernel's own stack in benchmarks;
//! reliable delivery still runs above it (and sees no losses unless the
//! fault layer makes some).

use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

use crate::link::{RxLink, RxStats, TxLink, TxStats, MAX_BATCH};
use crate::sys;

const LEN_PREFIX: usize = 4;

/// Transmit half: frames of one batch are written with one `write_all`.
pub struct TcpTx {
    stream: TcpStream,
    max_frame: usize,
    buf: Vec<u8>,
    stats: TxStats,
}

/// Receive half: a fixed buffer refilled with non-blocking reads.
pub struct TcpRx {
    stream: TcpStream,
    max_frame: usize,
    buf: Vec<u8>,
    /// Bytes `[start, end)` of `buf` are received and not yet consumed.
    start: usize,
    end: usize,
    stats: RxStats,
}

fn split(stream: TcpStream, max_frame: usize) -> io::Result<(TcpTx, TcpRx)> {
    stream.set_nodelay(true)?;
    sys::set_bufs(stream.as_raw_fd(), 4 << 20);
    let rx = stream.try_clone()?;
    Ok((
        TcpTx {
            stream,
            max_frame,
            buf: vec![0u8; MAX_BATCH * (LEN_PREFIX + max_frame)],
            stats: TxStats::default(),
        },
        TcpRx {
            stream: rx,
            max_frame,
            buf: vec![0u8; 64 * (LEN_PREFIX + max_frame)],
            start: 0,
            end: 0,
            stats: RxStats::default(),
        },
    ))
}

/// Connect to the peer's listener.
pub fn connect(addr: SocketAddr, max_frame: usize) -> io::Result<(TcpTx, TcpRx)> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| io::Error::new(e.kind(), format!("TCP backend: connecting to {addr}: {e}")))?;
    split(s, max_frame)
}

/// Accept one connection from `listener` (within `timeout`).
pub fn accept(
    listener: &TcpListener,
    max_frame: usize,
    timeout: Duration,
) -> io::Result<(TcpTx, TcpRx)> {
    if !sys::poll_in(listener.as_raw_fd(), timeout)? {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "TCP backend: no connection from the peer",
        ));
    }
    let (s, _) = listener.accept()?;
    split(s, max_frame)
}

impl TxLink for TcpTx {
    fn max_frame_len(&self) -> usize {
        self.max_frame
    }

    fn send_with(
        &mut self,
        max: usize,
        emit: &mut dyn FnMut(usize, &mut [u8]) -> Option<usize>,
    ) -> io::Result<usize> {
        let mut off = 0usize;
        let mut n = 0usize;
        while n < max.min(MAX_BATCH) {
            let body = off + LEN_PREFIX;
            let Some(len) = emit(n, &mut self.buf[body..body + self.max_frame]) else {
                break;
            };
            let len = len.min(self.max_frame);
            self.buf[off..body].copy_from_slice(&(len as u32).to_be_bytes());
            off = body + len;
            n += 1;
        }
        if off > 0 {
            self.stream.write_all(&self.buf[..off])?;
            self.stats.frames += n as u64;
        }
        Ok(n)
    }

    fn stats(&self) -> TxStats {
        self.stats
    }
}

impl RxLink for TcpRx {
    fn recv(
        &mut self,
        max: usize,
        timeout: Duration,
        f: &mut dyn FnMut(&[u8]),
    ) -> io::Result<usize> {
        let mut n = 0usize;
        // Frames already buffered come first; wait only if there are none.
        if !self.has_frame() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let fd = self.stream.as_raw_fd();
            if !timeout.is_zero() && !sys::poll_in(fd, timeout)? {
                return Ok(0);
            }
            match sys::recv_dontwait(fd, &mut self.buf[self.end..]) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "TCP backend: peer closed the connection",
                    ))
                }
                Ok(k) => self.end += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        while n < max && self.has_frame() {
            let s = self.start;
            let len = u32::from_be_bytes([
                self.buf[s],
                self.buf[s + 1],
                self.buf[s + 2],
                self.buf[s + 3],
            ]) as usize;
            f(&self.buf[s + LEN_PREFIX..s + LEN_PREFIX + len]);
            self.start = s + LEN_PREFIX + len;
            n += 1;
        }
        self.stats.frames += n as u64;
        Ok(n)
    }

    fn stats(&mut self) -> RxStats {
        self.stats
    }
}

impl TcpRx {
    fn has_frame(&mut self) -> bool {
        let avail = self.end - self.start;
        if avail < LEN_PREFIX {
            return false;
        }
        let s = self.start;
        let len = u32::from_be_bytes([
            self.buf[s],
            self.buf[s + 1],
            self.buf[s + 2],
            self.buf[s + 3],
        ]) as usize;
        // A length beyond the largest frame means the stream is garbage;
        // clamp so the buffer arithmetic stays in range (the frame will
        // then fail its checks and be counted as malformed).
        if len > self.max_frame {
            self.buf[s..s + LEN_PREFIX].copy_from_slice(&(self.max_frame as u32).to_be_bytes());
            return avail >= LEN_PREFIX + self.max_frame;
        }
        avail >= LEN_PREFIX + len
    }
}
