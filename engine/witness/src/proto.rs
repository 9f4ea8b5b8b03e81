//! The witness wire format: a node's lease request and the witness's reply,
//! one UDP datagram each, authenticated with the cluster's witness key
//! (`Key::derive(master, Domain::Witness)`).
//!
//! ```text
//! REQUEST (56 bytes)                      REPLY (72 bytes)
//!  0 magic u16 "MW"                         0 magic u16 "MW"
//!  2 version u8 = 1                         2 version u8 = 1
//!  3 kind u8 = 1                            3 kind u8 = 2
//!  4 cluster_id u64                         4 cluster_id u64
//! 12 node_id u16 (sender)                  12 node_id u16 (addressee)
//! 14 op u8 (1 acquire/renew, 2 release)    14 verdict u8 (0 granted, 1 held,
//! 15 role u8 (msl_wire::Role code)                2 startup, 3 released,
//!                                                 4 behind)
//! 16 epoch u64 (sender's start epoch)      15 flags u8 (0x01: holder is set)
//! 24 counter u64 (per epoch, increasing)   16 holder u16 (0 unless flag)
//! 32 generation u64 (sender's view)        18 reserved u16 = 0
//! 40 tag [16]                              20 lease_us u32 (0 unless granted)
//!                                          24 wait_us u32 (0 if granted)
//!                                          28 reserved u32 = 0
//!                                          32 epoch u64 (echoed)
//!                                          40 counter u64 (echoed)
//!                                          48 witness_epoch u64
//!                                          56 tag [16]
//! ```
//!
//! All integers are big-endian. The tag is the first 16 bytes of
//! `blake3::keyed_hash(key, bytes[..len - 16])`, as for MSL frames. A
//! request can never be read as a reply or the reverse (kind and length
//! differ, and both are under the tag).
//!
//! Decoding is total: every byte string gives a value or a named
//! [`ProtoError`]; nothing panics. The tag is checked before any field
//! beyond the fixed prefix is interpreted, so a forged packet is always
//! reported as [`ProtoError::BadTag`].

use core::fmt;

use msl_wire::{Key, Role};

/// Packet magic, "MW".
pub const MAGIC: u16 = 0x4D57;
/// Wire format version; packets with any other version are refused.
pub const VERSION: u8 = 1;
/// Length of the authentication tag.
pub const TAG_LEN: usize = 16;
/// Length of a request.
pub const REQUEST_LEN: usize = 56;
/// Length of a reply.
pub const REPLY_LEN: usize = 72;

const KIND_REQUEST: u8 = 1;
const KIND_REPLY: u8 = 2;
const FLAG_HOLDER: u8 = 0x01;

/// What a node asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// Grant the lease, or renew it if this node holds it.
    Acquire,
    /// Give the lease up now (clean stop, handover).
    Release,
}

impl Op {
    const fn to_u8(self) -> u8 {
        match self {
            Op::Acquire => 1,
            Op::Release => 2,
        }
    }
    const fn from_u8(n: u8) -> Option<Op> {
        match n {
            1 => Some(Op::Acquire),
            2 => Some(Op::Release),
            _ => None,
        }
    }
}

/// The witness's answer to one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// The addressee holds the lease for `lease_us` from when the witness
    /// received the request.
    Granted,
    /// Another node holds a live lease; it can expire in `wait_us`.
    Held,
    /// The witness started less than its start-up window ago and grants
    /// nothing until `wait_us` has passed.
    Startup,
    /// The addressee asked to release; it holds nothing.
    Released,
    /// The addressee's data generation is not the one the last holder
    /// reported: the holder may have acknowledged writes alone that this
    /// node lacks, so it may not serve alone (until it has them, or the
    /// holder releases the lease).
    Behind,
}

impl Verdict {
    const fn to_u8(self) -> u8 {
        match self {
            Verdict::Granted => 0,
            Verdict::Held => 1,
            Verdict::Startup => 2,
            Verdict::Released => 3,
            Verdict::Behind => 4,
        }
    }
    const fn from_u8(n: u8) -> Option<Verdict> {
        match n {
            0 => Some(Verdict::Granted),
            1 => Some(Verdict::Held),
            2 => Some(Verdict::Startup),
            3 => Some(Verdict::Released),
            4 => Some(Verdict::Behind),
            _ => None,
        }
    }
}

/// A node's lease request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Cluster of the sender (selects the key).
    pub cluster_id: u64,
    /// Sender.
    pub node_id: u16,
    /// Acquire/renew or release.
    pub op: Op,
    /// The sender's role, for the witness's status only.
    pub role: Role,
    /// The sender's data generation, for the witness's status only.
    pub generation: u64,
    /// The sender's start epoch (persisted, one higher at every start).
    pub epoch: u64,
    /// Strictly increasing within `epoch`.
    pub counter: u64,
}

/// The witness's reply to one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply {
    /// Cluster of the addressee.
    pub cluster_id: u64,
    /// The node the reply is for.
    pub node_id: u16,
    /// The answer.
    pub verdict: Verdict,
    /// The lease holder as the witness sees it after this request.
    pub holder: Option<u16>,
    /// Lease duration granted, measured from when the witness received
    /// the request (0 unless granted).
    pub lease_us: u32,
    /// When refused: how long until the witness may grant (0 if granted).
    pub wait_us: u32,
    /// `epoch` of the request answered.
    pub epoch: u64,
    /// `counter` of the request answered.
    pub counter: u64,
    /// Random per witness start: a change tells a node the witness restarted.
    pub witness_epoch: u64,
}

impl Reply {
    /// True if the reply grants (or renews) the lease to its addressee.
    pub fn granted(&self) -> bool {
        self.verdict == Verdict::Granted
    }
}

/// Why bytes were not a valid packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProtoError {
    /// Not the length of this kind of packet.
    Length {
        /// Bytes received.
        got: usize,
        /// Bytes this kind has.
        want: usize,
    },
    /// First two bytes are not "MW".
    Magic(u16),
    /// Unsupported version.
    Version(u8),
    /// Not the kind expected here (a reply sent to the witness, say).
    Kind(u8),
    /// The tag does not verify under the cluster's witness key (forged,
    /// corrupted, or another cluster's or domain's key).
    BadTag,
    /// A reserved byte is not zero.
    Reserved,
    /// Unknown request op code.
    Op(u8),
    /// Unknown reply verdict code.
    Verdict(u8),
    /// Unknown reply flag bits.
    Flags(u8),
    /// Reply fields contradict each other (a grant to someone other than
    /// the holder, a holder id without the holder flag, a lease on a
    /// refusal).
    Inconsistent,
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtoError::Length { got, want } => write!(f, "length {got}, want {want}"),
            ProtoError::Magic(m) => write!(f, "bad magic {m:#06x}"),
            ProtoError::Version(v) => write!(f, "unsupported version {v}"),
            ProtoError::Kind(k) => write!(f, "unexpected packet kind {k}"),
            ProtoError::BadTag => f.write_str("authentication tag does not verify"),
            ProtoError::Reserved => f.write_str("reserved bytes not zero"),
            ProtoError::Op(o) => write!(f, "unknown op {o}"),
            ProtoError::Verdict(v) => write!(f, "unknown verdict {v}"),
            ProtoError::Flags(x) => write!(f, "unknown flags {x:#04x}"),
            ProtoError::Inconsistent => f.write_str("reply fields contradict each other"),
        }
    }
}

impl std::error::Error for ProtoError {}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// The tag over `body` (everything before the tag).
fn tag(key: &Key, body: &[u8]) -> [u8; TAG_LEN] {
    let h = blake3::keyed_hash(&key.0, body);
    let mut t = [0u8; TAG_LEN];
    t.copy_from_slice(&h.as_bytes()[..TAG_LEN]);
    t
}

/// Constant-time comparison of two tags.
#[inline(never)]
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    core::hint::black_box(diff) == 0
}

/// Check length, magic, version and kind (nothing authenticated yet).
fn check_prefix(b: &[u8], kind: u8, len: usize) -> Result<(), ProtoError> {
    if b.len() != len {
        return Err(ProtoError::Length {
            got: b.len(),
            want: len,
        });
    }
    let magic = u16_at(b, 0);
    if magic != MAGIC {
        return Err(ProtoError::Magic(magic));
    }
    if b[2] != VERSION {
        return Err(ProtoError::Version(b[2]));
    }
    if b[3] != kind {
        return Err(ProtoError::Kind(b[3]));
    }
    Ok(())
}

fn check_tag(key: &Key, b: &[u8]) -> Result<(), ProtoError> {
    let (body, t) = b.split_at(b.len() - TAG_LEN);
    if ct_eq(&tag(key, body), t) {
        Ok(())
    } else {
        Err(ProtoError::BadTag)
    }
}

fn seal(key: &Key, b: &mut [u8]) {
    let n = b.len() - TAG_LEN;
    let t = tag(key, &b[..n]);
    b[n..].copy_from_slice(&t);
}

/// The cluster a request claims to come from, read before its tag can be
/// checked (the witness needs it to pick the key). Unauthenticated: use
/// it only to look the key up, then [`Request::decode`].
pub fn request_cluster(b: &[u8]) -> Result<u64, ProtoError> {
    check_prefix(b, KIND_REQUEST, REQUEST_LEN)?;
    Ok(u64_at(b, 4))
}

impl Request {
    /// The request's bytes, tagged under `key`.
    pub fn encode(&self, key: &Key) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..2].copy_from_slice(&MAGIC.to_be_bytes());
        b[2] = VERSION;
        b[3] = KIND_REQUEST;
        b[4..12].copy_from_slice(&self.cluster_id.to_be_bytes());
        b[12..14].copy_from_slice(&self.node_id.to_be_bytes());
        b[14] = self.op.to_u8();
        b[15] = self.role.to_u8();
        b[16..24].copy_from_slice(&self.epoch.to_be_bytes());
        b[24..32].copy_from_slice(&self.counter.to_be_bytes());
        b[32..40].copy_from_slice(&self.generation.to_be_bytes());
        seal(key, &mut b);
        b
    }

    /// Validate and decode a request under `key`.
    pub fn decode(b: &[u8], key: &Key) -> Result<Request, ProtoError> {
        check_prefix(b, KIND_REQUEST, REQUEST_LEN)?;
        check_tag(key, b)?;
        let op = Op::from_u8(b[14]).ok_or(ProtoError::Op(b[14]))?;
        Ok(Request {
            cluster_id: u64_at(b, 4),
            node_id: u16_at(b, 12),
            op,
            role: Role::from_u8(b[15]),
            epoch: u64_at(b, 16),
            counter: u64_at(b, 24),
            generation: u64_at(b, 32),
        })
    }
}

impl Reply {
    /// The reply's bytes, tagged under `key`.
    pub fn encode(&self, key: &Key) -> [u8; REPLY_LEN] {
        let mut b = [0u8; REPLY_LEN];
        b[0..2].copy_from_slice(&MAGIC.to_be_bytes());
        b[2] = VERSION;
        b[3] = KIND_REPLY;
        b[4..12].copy_from_slice(&self.cluster_id.to_be_bytes());
        b[12..14].copy_from_slice(&self.node_id.to_be_bytes());
        b[14] = self.verdict.to_u8();
        if let Some(h) = self.holder {
            b[15] = FLAG_HOLDER;
            b[16..18].copy_from_slice(&h.to_be_bytes());
        }
        b[20..24].copy_from_slice(&self.lease_us.to_be_bytes());
        b[24..28].copy_from_slice(&self.wait_us.to_be_bytes());
        b[32..40].copy_from_slice(&self.epoch.to_be_bytes());
        b[40..48].copy_from_slice(&self.counter.to_be_bytes());
        b[48..56].copy_from_slice(&self.witness_epoch.to_be_bytes());
        seal(key, &mut b);
        b
    }

    /// Validate and decode a reply under `key`.
    pub fn decode(b: &[u8], key: &Key) -> Result<Reply, ProtoError> {
        check_prefix(b, KIND_REPLY, REPLY_LEN)?;
        check_tag(key, b)?;
        let verdict = Verdict::from_u8(b[14]).ok_or(ProtoError::Verdict(b[14]))?;
        let flags = b[15];
        if flags & !FLAG_HOLDER != 0 {
            return Err(ProtoError::Flags(flags));
        }
        if b[18..20] != [0, 0] || b[28..32] != [0, 0, 0, 0] {
            return Err(ProtoError::Reserved);
        }
        let node_id = u16_at(b, 12);
        let raw_holder = u16_at(b, 16);
        let holder = if flags & FLAG_HOLDER != 0 {
            Some(raw_holder)
        } else if raw_holder != 0 {
            return Err(ProtoError::Inconsistent);
        } else {
            None
        };
        let lease_us = u32_at(b, 20);
        let wait_us = u32_at(b, 24);
        let consistent = match verdict {
            Verdict::Granted => holder == Some(node_id) && lease_us > 0 && wait_us == 0,
            _ => lease_us == 0 && holder != Some(node_id),
        };
        if !consistent {
            return Err(ProtoError::Inconsistent);
        }
        Ok(Reply {
            cluster_id: u64_at(b, 4),
            node_id,
            verdict,
            holder,
            lease_us,
            wait_us,
            epoch: u64_at(b, 32),
            counter: u64_at(b, 40),
            witness_epoch: u64_at(b, 48),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(n: u8) -> Key {
        Key::derive(&[n; 32], msl_wire::Domain::Witness)
    }

    fn any_request() -> impl Strategy<Value = Request> {
        (
            any::<u64>(),
            any::<u16>(),
            prop_oneof![Just(Op::Acquire), Just(Op::Release)],
            any::<u8>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
        )
            .prop_map(
                |(cluster_id, node_id, op, role, generation, epoch, counter)| Request {
                    cluster_id,
                    node_id,
                    op,
                    role: Role::from_u8(role),
                    generation,
                    epoch,
                    counter,
                },
            )
    }

    /// Only consistent replies (what the witness sends).
    fn any_reply() -> impl Strategy<Value = Reply> {
        (
            any::<u64>(),
            any::<u16>(),
            0u8..5,
            proptest::option::of(any::<u16>()),
            1u32..,
            any::<u32>(),
            any::<(u64, u64, u64)>(),
        )
            .prop_map(
                |(cluster_id, node_id, v, other, lease, wait, (epoch, counter, we))| {
                    let verdict = Verdict::from_u8(v).unwrap();
                    let granted = verdict == Verdict::Granted;
                    let holder = if granted {
                        Some(node_id)
                    } else {
                        other.filter(|&h| h != node_id)
                    };
                    Reply {
                        cluster_id,
                        node_id,
                        verdict,
                        holder,
                        lease_us: if granted { lease } else { 0 },
                        wait_us: if granted { 0 } else { wait },
                        epoch,
                        counter,
                        witness_epoch: we,
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn prop_request_round_trips(r in any_request()) {
            let k = key(1);
            let b = r.encode(&k);
            prop_assert_eq!(Request::decode(&b, &k), Ok(r));
            prop_assert_eq!(request_cluster(&b), Ok(r.cluster_id));
        }

        #[test]
        fn prop_reply_round_trips(r in any_reply()) {
            let k = key(1);
            prop_assert_eq!(Reply::decode(&r.encode(&k), &k), Ok(r));
        }

        /// Any single flipped bit behind the version/kind prefix fails the
        /// tag (a flip in the prefix fails the prefix check instead).
        #[test]
        fn prop_request_flipped_bit_refused(r in any_request(), bit in 0usize..REQUEST_LEN * 8) {
            let k = key(1);
            let mut b = r.encode(&k);
            b[bit / 8] ^= 1 << (bit % 8);
            let e = Request::decode(&b, &k).unwrap_err();
            if bit >= 32 {
                prop_assert_eq!(e, ProtoError::BadTag);
            }
        }

        #[test]
        fn prop_reply_flipped_bit_refused(r in any_reply(), bit in 0usize..REPLY_LEN * 8) {
            let k = key(1);
            let mut b = r.encode(&k);
            b[bit / 8] ^= 1 << (bit % 8);
            let e = Reply::decode(&b, &k).unwrap_err();
            if bit >= 32 {
                prop_assert_eq!(e, ProtoError::BadTag);
            }
        }

        /// Decoding is total: arbitrary bytes give Ok or an error, never a
        /// panic; random bytes of the right shape never verify.
        #[test]
        fn prop_arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..100)) {
            let k = key(1);
            let _ = request_cluster(&b);
            prop_assert!(Request::decode(&b, &k).is_err());
            prop_assert!(Reply::decode(&b, &k).is_err());
        }

        /// A packet tagged under another key (another cluster, or the
        /// same master key in another domain) does not verify.
        #[test]
        fn prop_other_key_refused(r in any_request()) {
            let b = r.encode(&key(1));
            prop_assert_eq!(Request::decode(&b, &key(2)), Err(ProtoError::BadTag));
            let lan = Key::derive(&[1; 32], msl_wire::Domain::Lan);
            prop_assert_eq!(Request::decode(&r.encode(&lan), &key(1)), Err(ProtoError::BadTag));
        }
    }

    #[test]
    fn test_prefix_errors_are_named() {
        let k = key(1);
        let r = Request {
            cluster_id: 7,
            node_id: 1,
            op: Op::Acquire,
            role: Role::Primary,
            generation: 3,
            epoch: 9,
            counter: 1,
        };
        let b = r.encode(&k);
        assert_eq!(
            Request::decode(&b[..10], &k),
            Err(ProtoError::Length { got: 10, want: 56 })
        );
        let mut m = b;
        m[0] = 0;
        assert_eq!(Request::decode(&m, &k), Err(ProtoError::Magic(0x0057)));
        let mut v = b;
        v[2] = 9;
        assert_eq!(Request::decode(&v, &k), Err(ProtoError::Version(9)));
        // A request is not a reply, even padded to a reply's length.
        let mut long = b.to_vec();
        long.resize(REPLY_LEN, 0);
        assert_eq!(Reply::decode(&long, &k), Err(ProtoError::Kind(1)));
    }

    /// Field errors of authenticated packets are named (a witness bug or
    /// a newer peer), not taken as valid.
    #[test]
    fn test_bad_fields_under_a_good_tag_refused() {
        let k = key(1);
        let r = Request {
            cluster_id: 7,
            node_id: 1,
            op: Op::Acquire,
            role: Role::Secondary,
            generation: 3,
            epoch: 9,
            counter: 1,
        };
        let mut b = r.encode(&k);
        b[14] = 7;
        seal(&k, &mut b);
        assert_eq!(Request::decode(&b, &k), Err(ProtoError::Op(7)));

        let rep = Reply {
            cluster_id: 7,
            node_id: 1,
            verdict: Verdict::Granted,
            holder: Some(1),
            lease_us: 800_000,
            wait_us: 0,
            epoch: 9,
            counter: 1,
            witness_epoch: 5,
        };
        let cases: [(usize, u8, ProtoError); 5] = [
            (14, 9, ProtoError::Verdict(9)),
            (15, 0x03, ProtoError::Flags(0x03)),
            (19, 1, ProtoError::Reserved),
            (31, 1, ProtoError::Reserved),
            // Granted with the holder flag cleared: inconsistent.
            (15, 0x00, ProtoError::Inconsistent),
        ];
        for (at, val, want) in cases {
            let mut b = rep.encode(&k);
            b[at] = val;
            seal(&k, &mut b);
            assert_eq!(Reply::decode(&b, &k), Err(want), "byte {at} = {val}");
        }
        // A grant naming another holder is inconsistent.
        let mut b = rep.encode(&k);
        b[17] = 2;
        seal(&k, &mut b);
        assert_eq!(Reply::decode(&b, &k), Err(ProtoError::Inconsistent));
    }
}
