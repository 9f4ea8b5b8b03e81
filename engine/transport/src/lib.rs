pub mod afpacket;
pub mod link;
mod sys;
pub struct IfaceInfo { pub name: String, pub index: u32, pub mac: [u8;6], pub mtu: usize }
impl IfaceInfo { pub fn max_frame_len(&self) -> usize { self.mtu + 14 } }
