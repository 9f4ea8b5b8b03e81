//! msld's control protocol, shared by the daemon (server side) and `mslctl`
//! (client side), so that the admin tool does not link the daemon.
//!
//! The control socket is a Unix stream socket, mode 0600 (root only): one
//! JSON [`Request`] per line, one JSON [`Answer`] per line. An `events`
//! request is answered `{"ok":true,"streaming":true}` and then one
//! [`Event`] per line until the client hangs up.
//!
//! * [`proto`]: the request, answer, event and status types (the JSON on
//!   the socket; unknown fields are kept or ignored, never an error, so an
//!   older tool talks to a newer daemon).
//! * [`client`]: [`request`] (and [`request_value`] for hand-built JSON),
//!   [`EventStream`] and [`follow_events`].
//! * [`socket`]: where the socket is: `--socket`, the `control_socket` key
//!   of the node's config, or the default.

pub mod client;
pub mod proto;
pub mod socket;

pub use client::{follow_events, request, request_value, ClientError, EventStream};
pub use proto::{Answer, Event, Request, StatusView};
pub use socket::{find_socket, socket_from_config, DEFAULT_SOCKET, SOCKET_DIR};
