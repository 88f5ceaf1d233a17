//! How large the QUIC packets of an endpoint may be, from the link it is bound to.
//!
//! Most of a bulk transfer's CPU in quinn is per packet (framing, one AEAD call,
//! loss-recovery tracking, acknowledgements), so the packets should be as large as the link
//! carries. quinn sends several packets per `sendmsg` with UDP GSO, but the kernel takes at
//! most 64 KiB per GSO batch (the IP length field); a batch over that fails and quinn counts
//! it as loss. So: the datagram is the link's MTU (less IPv6 and UDP headers, capped at what
//! one IP packet holds), and a GSO batch holds as many as fit in 64 KiB, at most quinn's 10.
//! On a 1500 byte link that is 10 × 1452 (quinn's defaults); on a 9000 byte jumbo-frame link
//! 7 × 8952; on loopback (65536) one datagram of 65487 bytes per `sendmsg`, a tenth of the
//! packets a 6.5 KB datagram needs for the same bytes.
//!
//! MTU discovery still only raises the packet size once a probe of that size got through
//! (the socket never fragments), so a path narrower than the local link keeps working.

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// The most UDP payload bytes one batch (or one datagram) may carry: an IPv6 packet's
/// payload length is 16 bits and holds the UDP header too; IPv4 leaves the same room or more.
const BATCH_BYTES: u16 = u16::MAX - 48;
/// IPv6 + UDP headers: the datagram size for a link MTU holds for both address families.
const HEADERS: u32 = 48;
/// quinn's own cap on datagrams per transmit.
const MAX_SEGMENTS: usize = 10;

/// Packet size and GSO batch for one endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Shape {
    /// Largest UDP payload MTU discovery probes for.
    pub(crate) payload: u16,
    /// Datagrams per `sendmsg` (GSO segments).
    pub(crate) segments: usize,
}

/// What an endpoint on an unknown link uses (bound to a wildcard address, or the link's MTU
/// could not be read): 10 datagrams of 6549 bytes fill a GSO batch.
pub(crate) const UNKNOWN_LINK: Shape = Shape { payload: BATCH_BYTES / MAX_SEGMENTS as u16, segments: MAX_SEGMENTS };

/// The shape for a link of `mtu` bytes (IP packet size).
pub(crate) fn shape_for_mtu(mtu: u32) -> Shape {
    // QUIC needs 1200 byte datagrams; a link below that is rejected by discovery anyway.
    let payload = mtu.saturating_sub(HEADERS).clamp(1200, u32::from(BATCH_BYTES)) as u16;
    let segments = usize::from(BATCH_BYTES / payload).clamp(1, MAX_SEGMENTS);
    Shape { payload, segments }
}

/// The shape for an endpoint bound to `local`.
pub(crate) fn shape_for(local: SocketAddr) -> Shape {
    if local.ip().is_unspecified() {
        return UNKNOWN_LINK;
    }
    match link_mtu(local.ip()) {
        Some(mtu) => shape_for_mtu(mtu),
        None => UNKNOWN_LINK,
    }
}

/// MTU of the interface that holds address `ip` (Linux: from sysfs).
fn link_mtu(ip: IpAddr) -> Option<u32> {
    let addrs = nix::ifaddrs::getifaddrs().ok()?;
    let name = addrs
        .filter(|a| {
            let Some(addr) = a.address.as_ref() else { return false };
            match ip {
                IpAddr::V4(v4) => addr.as_sockaddr_in().is_some_and(|s| s.ip() == v4),
                IpAddr::V6(v6) => addr.as_sockaddr_in6().is_some_and(|s| s.ip() == v6),
            }
        })
        .map(|a| a.interface_name)
        .next()?;
    let text = std::fs::read_to_string(format!("/sys/class/net/{name}/mtu")).ok()?;
    text.trim().parse().ok()
}

/// quinn's socket, sending at most `segments` datagrams per transmit.
pub(crate) struct Segmented {
    inner: Arc<dyn AsyncUdpSocket>,
    segments: usize,
}

impl Segmented {
    pub(crate) fn new(inner: Arc<dyn AsyncUdpSocket>, segments: usize) -> Segmented {
        let segments = segments.min(inner.max_transmit_segments()).max(1);
        Segmented { inner, segments }
    }
}

impl fmt::Debug for Segmented {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Segmented").field("inner", &self.inner).field("segments", &self.segments).finish()
    }
}

impl AsyncUdpSocket for Segmented {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(&self, cx: &mut Context, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta]) -> Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.segments
    }

    /// One: quinn sizes each receive slot as this times the endpoint's largest accepted
    /// payload, which we set to the most one UDP datagram can hold, so a slot takes any
    /// datagram or any GRO batch (also limited to 64 KiB) whatever the packet size.
    fn max_receive_segments(&self) -> usize {
        1
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_fill_the_link_and_batches_stay_within_64k() {
        assert_eq!(shape_for_mtu(1500), Shape { payload: 1452, segments: 10 });
        assert_eq!(shape_for_mtu(9000), Shape { payload: 8952, segments: 7 });
        assert_eq!(shape_for_mtu(65536), Shape { payload: 65487, segments: 1 });
        assert_eq!(shape_for_mtu(1280), Shape { payload: 1232, segments: 10 });
        assert_eq!(shape_for_mtu(600).payload, 1200);
        for mtu in [1280, 1500, 4000, 9000, 16384, 32768, 65535, 65536, 1 << 20] {
            let s = shape_for_mtu(mtu);
            assert!(s.payload as usize * s.segments <= usize::from(BATCH_BYTES), "{mtu}: {s:?}");
            assert!(u32::from(s.payload) + HEADERS <= mtu.max(1248), "{mtu}: {s:?}");
        }
        assert!(UNKNOWN_LINK.payload as usize * UNKNOWN_LINK.segments <= usize::from(BATCH_BYTES));
    }

    #[test]
    fn loopback_is_found_and_wildcards_use_the_default() {
        let lo = shape_for("127.0.0.1:0".parse().unwrap());
        let mtu: u32 = std::fs::read_to_string("/sys/class/net/lo/mtu").unwrap().trim().parse().unwrap();
        assert_eq!(lo, shape_for_mtu(mtu));
        assert_eq!(shape_for("0.0.0.0:0".parse().unwrap()), UNKNOWN_LINK);
    }
}
