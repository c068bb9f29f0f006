//! Host builds see only this empty library: `proxy-userspace` names `proxy-ebpf` as a
//! build-dependency so cargo rebuilds the programs when they change, and that compiles the crate
//! for the host. The programs themselves are the `proxy-ebpf` binary, built for BPF.
#![no_std]
