//! The client side: one request and its answer, or the event stream.

use std::fmt;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::proto::{Answer, Event, Request};

/// How long one request waits for its answer (the daemon asks its core
/// thread, which answers within two seconds or not at all).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a request got no usable answer.
#[derive(Debug)]
pub enum ClientError {
    /// The socket is not there or nobody listens (msld not running, not
    /// root, wrong socket).
    Connect {
        socket: PathBuf,
        err: std::io::Error,
    },
    /// Connected, but no (complete) answer in time or the daemon hung up.
    NoAnswer { socket: PathBuf, why: String },
    /// An answer that is not the protocol's JSON.
    BadAnswer { socket: PathBuf, why: String },
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Connect { socket, err } => write!(
                f,
                "cannot connect to {}: {err} (is msld running? are you root? \
                 give --config FILE or --socket PATH)",
                socket.display()
            ),
            ClientError::NoAnswer { socket, why } => {
                write!(f, "no answer from msld on {}: {why}", socket.display())
            }
            ClientError::BadAnswer { socket, why } => {
                write!(f, "bad answer from msld on {}: {why}", socket.display())
            }
        }
    }
}

impl std::error::Error for ClientError {}

fn connect(socket: &Path) -> Result<UnixStream, ClientError> {
    UnixStream::connect(socket).map_err(|err| ClientError::Connect {
        socket: socket.to_path_buf(),
        err,
    })
}

fn no_answer(socket: &Path, why: impl fmt::Display) -> ClientError {
    ClientError::NoAnswer {
        socket: socket.to_path_buf(),
        why: why.to_string(),
    }
}

fn bad_answer(socket: &Path, why: impl fmt::Display) -> ClientError {
    ClientError::BadAnswer {
        socket: socket.to_path_buf(),
        why: why.to_string(),
    }
}

/// Send one request, read one answer (waits at most [`ANSWER_TIMEOUT`]).
/// An answer with `ok: false` is still an answer: the caller decides.
pub fn request(socket: &Path, req: &Request) -> Result<Answer, ClientError> {
    let mut s = connect(socket)?;
    s.set_read_timeout(Some(ANSWER_TIMEOUT))
        .map_err(|e| no_answer(socket, e))?;
    writeln!(s, "{}", req.to_line()).map_err(|e| no_answer(socket, e))?;
    let mut line = String::new();
    let n = BufReader::new(s)
        .read_line(&mut line)
        .map_err(|e| no_answer(socket, e))?;
    if n == 0 {
        return Err(no_answer(socket, "the daemon closed the connection"));
    }
    serde_json::from_str(&line).map_err(|e| bad_answer(socket, e))
}

/// One request given as JSON, its answer as JSON, errors as text: for
/// callers that build requests by hand (test harnesses, the daemon's own
/// tests) and for requests newer than this crate's [`Request`].
pub fn request_value(socket: &Path, req: &serde_json::Value) -> Result<serde_json::Value, String> {
    let mut s = connect(socket).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(ANSWER_TIMEOUT))
        .map_err(|e| e.to_string())?;
    writeln!(s, "{req}").map_err(|e| no_answer(socket, e).to_string())?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .map_err(|e| no_answer(socket, e).to_string())?;
    serde_json::from_str(&line).map_err(|e| bad_answer(socket, e).to_string())
}

/// A subscription to the event stream. Events published after
/// [`EventStream::open`] returns are all seen (the daemon subscribes before
/// it confirms), so a command sent afterwards cannot outrun its events.
pub struct EventStream {
    socket: PathBuf,
    reader: BufReader<UnixStream>,
    /// A line read in part when a read timed out.
    partial: Vec<u8>,
}

impl EventStream {
    pub fn open(socket: &Path) -> Result<Self, ClientError> {
        let mut s = connect(socket)?;
        s.set_read_timeout(Some(ANSWER_TIMEOUT))
            .map_err(|e| no_answer(socket, e))?;
        writeln!(s, "{}", Request::Events.to_line()).map_err(|e| no_answer(socket, e))?;
        let mut stream = EventStream {
            socket: socket.to_path_buf(),
            reader: BufReader::new(s),
            partial: Vec::new(),
        };
        let first = stream
            .line(Instant::now() + ANSWER_TIMEOUT)?
            .ok_or_else(|| no_answer(socket, "no confirmation of the subscription"))?;
        let a: Answer = serde_json::from_slice(&first).map_err(|e| bad_answer(socket, e))?;
        if !a.ok {
            return Err(bad_answer(
                socket,
                a.error.unwrap_or_else(|| "events refused".into()),
            ));
        }
        Ok(stream)
    }

    /// The next full line before `deadline`; `None` at the deadline.
    fn line(&mut self, deadline: Instant) -> Result<Option<Vec<u8>>, ClientError> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            // A zero timeout means "block forever" to the socket.
            let t = left.max(Duration::from_millis(1));
            self.reader
                .get_ref()
                .set_read_timeout(Some(t))
                .map_err(|e| no_answer(&self.socket, e))?;
            match self.reader.read_until(b'\n', &mut self.partial) {
                Ok(0) => return Err(no_answer(&self.socket, "the daemon ended the event stream")),
                Ok(_) if self.partial.ends_with(b"\n") => {
                    return Ok(Some(std::mem::take(&mut self.partial)));
                }
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(no_answer(&self.socket, e)),
            }
        }
    }

    /// The next event, or `None` if none arrived by `deadline`. Lines that
    /// are not events (a newer daemon's other messages) are skipped.
    pub fn next_before(&mut self, deadline: Instant) -> Result<Option<Event>, ClientError> {
        while let Some(line) = self.line(deadline)? {
            if let Ok(e) = serde_json::from_slice::<Event>(&line) {
                return Ok(Some(e));
            }
        }
        Ok(None)
    }
}

/// Stream events to `f` until the daemon goes away (then `Err` naming it).
pub fn follow_events(socket: &Path, mut f: impl FnMut(&Event)) -> Result<(), ClientError> {
    let mut s = EventStream::open(socket)?;
    // Far enough to be "forever", near enough not to overflow `Instant`.
    let year = Duration::from_secs(365 * 24 * 3600);
    loop {
        if let Some(e) = s.next_before(Instant::now() + year)? {
            f(&e);
        }
    }
}
