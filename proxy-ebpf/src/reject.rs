//! Refusing external traffic to a frontend with no usable endpoint, as kube-proxy's REJECT
//! does: a TCP segment is answered with a RST, a UDP datagram with an ICMP port unreachable,
//! each built in place and sent back out of the device it came in on, so the client fails at
//! once instead of retrying into silence.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{__sk_buff, TC_ACT_SHOT},
    helpers::{bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use proxy_common::proto;

use crate::tc::Packet;

const SHOT: i32 = TC_ACT_SHOT;
const ETH_HLEN: usize = 14;
const IP_HLEN: usize = 20;
const TCP_HLEN: usize = 20;
const TCP_SYN: u8 = 0x02;
const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

const ICMP: u8 = 1;
const ICMP_HLEN: usize = 8;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
/// RFC 792: an ICMP error quotes the offending IP header and the first 8 bytes of its payload.
const QUOTED: usize = IP_HLEN + 8;

/// Answers a TCP packet with a RST and a UDP one with an ICMP port unreachable; a RST itself,
/// or a packet with IPv4 options, is dropped.
#[inline(always)]
pub fn refuse(ctx: &TcContext, packet: &Packet) -> i32 {
    if packet.l4 != ETH_HLEN + IP_HLEN {
        return SHOT;
    }
    let answered = match packet.proto {
        proto::TCP if packet.tcp_flags & TCP_RST == 0 => reset(ctx, packet),
        proto::UDP => unreachable(ctx, packet),
        _ => return SHOT,
    };
    answered.unwrap_or(SHOT)
}

/// Rewrites the packet into an ICMP port unreachable from the frontend back to the client.
#[inline(always)]
fn unreachable(ctx: &TcContext, packet: &Packet) -> Result<i32, i64> {
    let quoted: [u8; QUOTED] = ctx.load(ETH_HLEN)?;
    resize(ctx, ETH_HLEN + IP_HLEN + ICMP_HLEN + QUOTED)?;
    swap_macs(ctx)?;
    ctx.store(ETH_HLEN, &ip_header(packet, ICMP, ICMP_HLEN + QUOTED), 0)?;
    let mut icmp = [0u8; ICMP_HLEN];
    icmp[0] = ICMP_DEST_UNREACH;
    icmp[1] = ICMP_PORT_UNREACH;
    let sum = checksum(partial(0, &quoted), &icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    ctx.store(ETH_HLEN + IP_HLEN, &icmp, 0)?;
    ctx.store(ETH_HLEN + IP_HLEN + ICMP_HLEN, &quoted, 0)?;
    Ok(back_out(ctx))
}

#[inline(always)]
fn resize(ctx: &TcContext, len: usize) -> Result<(), i64> {
    // SAFETY: the context is this program's own skb; the helper only resizes it.
    let done = unsafe { bpf_skb_change_tail(ctx.as_ptr() as *mut __sk_buff, len as u32, 0) };
    if done == 0 { Ok(()) } else { Err(done) }
}

#[inline(always)]
fn swap_macs(ctx: &TcContext) -> Result<(), i64> {
    let macs: [u8; 12] = ctx.load(0)?;
    let mut swapped = [0u8; 12];
    swapped[..6].copy_from_slice(&macs[6..]);
    swapped[6..].copy_from_slice(&macs[..6]);
    ctx.store(0, &swapped, 0)
}

/// An IPv4 header from the packet's destination back to its source, checksum filled in.
#[inline(always)]
fn ip_header(packet: &Packet, protocol: u8, payload: usize) -> [u8; IP_HLEN] {
    let mut ip = [0u8; IP_HLEN];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((IP_HLEN + payload) as u16).to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64; // TTL
    ip[9] = protocol;
    ip[12..16].copy_from_slice(&packet.daddr);
    ip[16..20].copy_from_slice(&packet.saddr);
    let sum = checksum(0, &ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    ip
}

/// Sends the rewritten packet back out of the device it arrived on.
#[inline(always)]
fn back_out(ctx: &TcContext) -> i32 {
    // SAFETY: the skb pointer is this program's context; the helper reads its ifindex field.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: bpf_redirect only records the target; the kernel sends the packet after return.
    unsafe { bpf_redirect(ifindex, 0) as i32 }
}

#[inline(always)]
fn reset(ctx: &TcContext, packet: &Packet) -> Result<i32, i64> {
    let l4 = packet.l4;
    let total_len = usize::from(u16::from_be(ctx.load::<u16>(ETH_HLEN + 2)?));
    let data_offset = usize::from(ctx.load::<u8>(l4 + 12)? >> 4) * 4;
    let seq = u32::from_be(ctx.load::<u32>(l4 + 4)?);
    let ack = u32::from_be(ctx.load::<u32>(l4 + 8)?);
    let payload = total_len.saturating_sub(IP_HLEN + data_offset) as u32;
    let flags = packet.tcp_flags;
    // RFC 793 reset generation: answer an ACK with its own ack number as our sequence number,
    // anything else with sequence 0 and an ACK of everything the segment occupied.
    let (reply_seq, reply_ack, reply_flags) = if flags & TCP_ACK != 0 {
        (ack, 0, TCP_RST)
    } else {
        let occupied = payload + u32::from(flags & TCP_SYN != 0) + u32::from(flags & TCP_FIN != 0);
        (0, seq.wrapping_add(occupied), TCP_RST | TCP_ACK)
    };

    // SAFETY: the context is this program's own skb; the helper only resizes it.
    let resized = unsafe {
        bpf_skb_change_tail(
            ctx.as_ptr() as *mut __sk_buff,
            (ETH_HLEN + IP_HLEN + TCP_HLEN) as u32,
            0,
        )
    };
    if resized != 0 {
        return Err(resized);
    }
    let macs: [u8; 12] = ctx.load(0)?;
    let mut swapped = [0u8; 12];
    swapped[..6].copy_from_slice(&macs[6..]);
    swapped[6..].copy_from_slice(&macs[..6]);
    ctx.store(0, &swapped, 0)?;

    let mut ip = [0u8; IP_HLEN];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((IP_HLEN + TCP_HLEN) as u16).to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64; // TTL
    ip[9] = proto::TCP;
    ip[12..16].copy_from_slice(&packet.daddr);
    ip[16..20].copy_from_slice(&packet.saddr);
    let ip_sum = checksum(0, &ip);
    ip[10..12].copy_from_slice(&ip_sum.to_be_bytes());
    ctx.store(ETH_HLEN, &ip, 0)?;

    let mut tcp = [0u8; TCP_HLEN];
    tcp[0..2].copy_from_slice(&packet.dport.to_be_bytes());
    tcp[2..4].copy_from_slice(&packet.sport.to_be_bytes());
    tcp[4..8].copy_from_slice(&reply_seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&reply_ack.to_be_bytes());
    tcp[12] = ((TCP_HLEN / 4) as u8) << 4;
    tcp[13] = reply_flags;
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&packet.daddr);
    pseudo[4..8].copy_from_slice(&packet.saddr);
    pseudo[9] = proto::TCP;
    pseudo[10..12].copy_from_slice(&(TCP_HLEN as u16).to_be_bytes());
    let tcp_sum = checksum(partial(0, &pseudo), &tcp);
    tcp[16..18].copy_from_slice(&tcp_sum.to_be_bytes());
    ctx.store(l4, &tcp, 0)?;
    Ok(back_out(ctx))
}

/// One's-complement sum of big-endian 16-bit words, not yet folded.
#[inline(always)]
fn partial<const N: usize>(mut sum: u32, bytes: &[u8; N]) -> u32 {
    let mut i = 0;
    while i + 1 < N {
        sum += u32::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    sum
}

#[inline(always)]
fn checksum<const N: usize>(sum: u32, bytes: &[u8; N]) -> u16 {
    let mut sum = partial(sum, bytes);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
