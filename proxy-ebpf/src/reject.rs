//! Refusing external traffic to a frontend with no usable endpoint, as kube-proxy's REJECT
//! does: a TCP segment is answered with a RST, a UDP datagram with an ICMP (ICMPv6) port
//! unreachable, each built in place and sent back out of the device it came in on, so the
//! client fails at once instead of retrying into silence.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{__sk_buff, TC_ACT_SHOT},
    helpers::{bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use proxy_common::{
    checksum::{finish_le, le_seed, partial},
    maps::{AddrV4, AddrV6},
    proto,
};

use crate::{
    frame::Frame as _,
    packet::{Packet, csum_of},
};

const SHOT: i32 = TC_ACT_SHOT;
const IP_HLEN: usize = 20;
const IP6_HLEN: usize = 40;
const TCP_HLEN: usize = 20;
const TCP_SYN: u8 = 0x02;
const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const TTL: u8 = 64;

const ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
const ICMP6: u8 = 58;
const ICMP6_DEST_UNREACH: u8 = 1;
const ICMP6_PORT_UNREACH: u8 = 4;
/// Quoted after an ICMP error header: the offending IP header and the first 8 bytes of its
/// payload (RFC 792; RFC 4443 allows more, but the ports are what a client matches on).
const QUOTED_TAIL: usize = 8;

/// An ICMP or ICMPv6 error message: type, code, checksum, four unused bytes, the quote.
#[repr(C)]
#[derive(Clone, Copy)]
struct IcmpError<const Q: usize> {
    header: [u8; 8],
    quoted: [u8; Q],
}

/// Answers an IPv4 TCP packet with a RST and a UDP one with an ICMP port unreachable; a RST
/// itself, or a packet with IP options, is dropped. Each answer is built on a stack frame of
/// its own (its builder is not inlined), so only one of them is on the stack at a time.
#[inline(always)]
pub fn refuse_v4(ctx: &TcContext, packet: &Packet<AddrV4>) -> i32 {
    answer(
        packet,
        IP_HLEN,
        || reset_v4(ctx, packet),
        || unreachable_v4(ctx, packet),
    )
}

/// As [`refuse_v4`], for IPv6 (a packet with extension headers is dropped).
#[inline(always)]
pub fn refuse_v6(ctx: &TcContext, packet: &Packet<AddrV6>) -> i32 {
    answer(
        packet,
        IP6_HLEN,
        || reset_v6(ctx, packet),
        || unreachable_v6(ctx, packet),
    )
}

/// Picks the answer for `packet`, whose IP header without options or extension headers is
/// `ip_hlen` bytes: a RST for TCP (but never for a RST), a port unreachable for UDP.
#[inline(always)]
fn answer<A>(
    packet: &Packet<A>,
    ip_hlen: usize,
    reset: impl FnOnce() -> Result<i32, i64>,
    unreachable: impl FnOnce() -> Result<i32, i64>,
) -> i32 {
    if packet.l4 != packet.ip(ip_hlen) {
        return SHOT;
    }
    let answered = match packet.proto {
        proto::TCP if packet.tcp_flags & TCP_RST == 0 => reset(),
        proto::UDP => unreachable(),
        _ => return SHOT,
    };
    answered.unwrap_or(SHOT)
}

#[inline(never)]
fn reset_v4(ctx: &TcContext, packet: &Packet<AddrV4>) -> Result<i32, i64> {
    let total_len = usize::from(u16::from_be(ctx.load::<u16>(packet.ip(2))?));
    let mut tcp = rst_segment(ctx, packet, total_len.saturating_sub(IP_HLEN))?;
    let sum = checksum(pseudo_v4(packet, proto::TCP, TCP_HLEN), &tcp)?;
    tcp[16..18].copy_from_slice(&sum);
    send(ctx, packet, &ipv4_header(packet, proto::TCP, TCP_HLEN)?, &tcp)
}

#[inline(never)]
fn reset_v6(ctx: &TcContext, packet: &Packet<AddrV6>) -> Result<i32, i64> {
    let payload_len = usize::from(u16::from_be(ctx.load::<u16>(packet.ip(4))?));
    let mut tcp = rst_segment(ctx, packet, payload_len)?;
    let sum = checksum(pseudo_v6(packet, proto::TCP, TCP_HLEN), &tcp)?;
    tcp[16..18].copy_from_slice(&sum);
    send(ctx, packet, &ipv6_header(packet, proto::TCP, TCP_HLEN), &tcp)
}

#[inline(never)]
fn unreachable_v4(ctx: &TcContext, packet: &Packet<AddrV4>) -> Result<i32, i64> {
    let mut icmp = IcmpError::<{ IP_HLEN + QUOTED_TAIL }> {
        header: [ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, 0, 0, 0, 0, 0, 0],
        quoted: [0; IP_HLEN + QUOTED_TAIL],
    };
    ctx.load_into(packet.ip(0), &mut icmp.quoted)?;
    let sum = checksum(0, &icmp)?;
    icmp.header[2..4].copy_from_slice(&sum);
    send(
        ctx,
        packet,
        &ipv4_header(packet, ICMP, size_of_val(&icmp))?,
        &icmp,
    )
}

#[inline(never)]
fn unreachable_v6(ctx: &TcContext, packet: &Packet<AddrV6>) -> Result<i32, i64> {
    let mut icmp = IcmpError::<{ IP6_HLEN + QUOTED_TAIL }> {
        header: [ICMP6_DEST_UNREACH, ICMP6_PORT_UNREACH, 0, 0, 0, 0, 0, 0],
        quoted: [0; IP6_HLEN + QUOTED_TAIL],
    };
    ctx.load_into(packet.ip(0), &mut icmp.quoted)?;
    // ICMPv6, unlike ICMP, covers a pseudo-header.
    let pseudo = pseudo_v6(packet, ICMP6, size_of_val(&icmp));
    let sum = checksum(pseudo, &icmp)?;
    icmp.header[2..4].copy_from_slice(&sum);
    send(
        ctx,
        packet,
        &ipv6_header(packet, ICMP6, size_of_val(&icmp)),
        &icmp,
    )
}

/// The RST answering the segment at `packet.l4` (checksum left zero), given the length of the
/// IP payload it arrived in. RFC 793 reset generation: answer an ACK with its own ack number
/// as our sequence number, anything else with sequence 0 and an ACK of everything the segment
/// occupied.
#[inline(always)]
fn rst_segment<A>(ctx: &TcContext, packet: &Packet<A>, ip_payload_len: usize) -> Result<[u8; TCP_HLEN], i64> {
    let l4 = packet.l4;
    let data_offset = usize::from(ctx.load::<u8>(l4 + 12)? >> 4) * 4;
    let seq = u32::from_be(ctx.load::<u32>(l4 + 4)?);
    let ack = u32::from_be(ctx.load::<u32>(l4 + 8)?);
    let payload = ip_payload_len.saturating_sub(data_offset) as u32;
    let flags = packet.tcp_flags;
    let (reply_seq, reply_ack, reply_flags) = if flags & TCP_ACK != 0 {
        (ack, 0, TCP_RST)
    } else {
        let occupied = payload + u32::from(flags & TCP_SYN != 0) + u32::from(flags & TCP_FIN != 0);
        (0, seq.wrapping_add(occupied), TCP_RST | TCP_ACK)
    };
    let mut tcp = [0u8; TCP_HLEN];
    tcp[0..2].copy_from_slice(&packet.dport.to_be_bytes());
    tcp[2..4].copy_from_slice(&packet.sport.to_be_bytes());
    tcp[4..8].copy_from_slice(&reply_seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&reply_ack.to_be_bytes());
    tcp[12] = ((TCP_HLEN / 4) as u8) << 4;
    tcp[13] = reply_flags;
    Ok(tcp)
}

/// An IPv4 header from the packet's destination back to its source, checksum filled in.
#[inline(always)]
fn ipv4_header(packet: &Packet<AddrV4>, protocol: u8, payload: usize) -> Result<[u8; IP_HLEN], i64> {
    let mut ip = [0u8; IP_HLEN];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((IP_HLEN + payload) as u16).to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = TTL;
    ip[9] = protocol;
    ip[12..16].copy_from_slice(&packet.daddr);
    ip[16..20].copy_from_slice(&packet.saddr);
    let sum = checksum(0, &ip)?;
    ip[10..12].copy_from_slice(&sum);
    Ok(ip)
}

/// An IPv6 header from the packet's destination back to its source.
#[inline(always)]
fn ipv6_header(packet: &Packet<AddrV6>, next: u8, payload: usize) -> [u8; IP6_HLEN] {
    let mut ip = [0u8; IP6_HLEN];
    ip[0] = 0x60;
    ip[4..6].copy_from_slice(&(payload as u16).to_be_bytes());
    ip[6] = next;
    ip[7] = TTL;
    ip[8..24].copy_from_slice(&packet.daddr);
    ip[24..40].copy_from_slice(&packet.saddr);
    ip
}

/// The partial sum of the pseudo-header of an answer to `packet` (RFC 793), summed in place
/// rather than built.
#[inline(always)]
fn pseudo_v4(packet: &Packet<AddrV4>, protocol: u8, len: usize) -> u32 {
    partial(partial(0, &packet.daddr), &packet.saddr) + u32::from(protocol) + len as u32
}

/// As [`pseudo_v4`], for IPv6 (RFC 8200 section 8.1: a 32-bit length, the next header).
#[inline(always)]
fn pseudo_v6(packet: &Packet<AddrV6>, next: u8, len: usize) -> u32 {
    let len = len as u32;
    partial(partial(0, &packet.daddr), &packet.saddr) + u32::from(next) + (len >> 16) + (len & 0xffff)
}

/// Replaces `packet` with `ip` and `l4` (behind the swapped Ethernet addresses, on a device
/// that has them) and sends it back out of the device it arrived on.
#[inline(always)]
fn send<A, H: Copy, L: Copy>(ctx: &TcContext, packet: &Packet<A>, ip: &H, l4: &L) -> Result<i32, i64> {
    let ip_len = core::mem::size_of::<H>();
    let l3 = packet.ip(0);
    let len = l3 + ip_len + core::mem::size_of::<L>();
    // SAFETY: the context is this program's own skb; the helper only resizes it.
    let resized = unsafe { bpf_skb_change_tail(ctx.as_ptr().cast::<__sk_buff>(), len as u32, 0) };
    if resized != 0 {
        return Err(resized);
    }
    if packet.has_ethernet() {
        let macs: [u8; 12] = ctx.load(0)?;
        let mut swapped = [0u8; 12];
        swapped[..6].copy_from_slice(&macs[6..]);
        swapped[6..].copy_from_slice(&macs[..6]);
        ctx.store(0, &swapped, 0)?;
    }
    ctx.store(l3, ip, 0)?;
    ctx.store(l3 + ip_len, l4, 0)?;
    // SAFETY: the skb pointer is this program's context; the helper reads its ifindex field.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: bpf_redirect only records the target; the kernel sends the packet after return.
    Ok(unsafe { bpf_redirect(ifindex, 0) as i32 })
}

/// The checksum field's bytes for `value` (its own checksum field zero) behind a
/// pseudo-header whose big-endian partial sum is `pseudo`. The kernel sums `value`: an
/// unrolled sum of a 56-byte answer keeps every word live at once, and the spilled words made
/// this the deepest frame of the program.
#[inline(always)]
fn checksum<T>(pseudo: u32, value: &T) -> Result<[u8; 2], i64> {
    Ok(finish_le(csum_of(value, le_seed(pseudo))?))
}
