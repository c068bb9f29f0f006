//! The verifier's bound on the stack of a whole BPF-to-BPF call chain, checked on the embedded
//! object without loading it, for the oldest kernel we claim. The verifier adds up the frames
//! of every chain from each program's entry: each frame rounded up to 32 bytes (at least 32)
//! on Linux 6.1, to 16 on kernels that JIT with 6.7's accounting. A chain over 512 bytes makes
//! the whole program fail to load, so the datapath would not start on those kernels.

use std::collections::{BTreeMap, BTreeSet};

use object::{Object as _, ObjectSection as _, ObjectSymbol as _, RelocationTarget, SectionKind};

use crate::datapath::loader::{EBPF_OBJECT, SOCKET_PROGRAMS};

const MAX_BPF_STACK: u32 = 512;
/// Linux 6.1's per-frame rounding (the interpreter's stack granularity).
const LINUX_6_1_FRAME: u32 = 32;

const INSN: usize = 8;
const R10: u8 = 10;
const BPF_CALL: u8 = 0x85;
const BPF_PSEUDO_CALL: u8 = 1;
const MOV64_REG: u8 = 0xbf;
const ADD64_IMM: u8 = 0x07;

/// One function of the object: the deepest stack byte it touches and whom it calls.
#[derive(Default)]
struct Frame {
    depth: u32,
    calls: BTreeSet<String>,
}

/// Every function of every code section, by symbol name.
fn frames() -> BTreeMap<String, Frame> {
    let file = object::File::parse(EBPF_OBJECT).expect("the embedded object is ELF");
    // (section, offset) -> (size, name) of every function.
    let functions: BTreeMap<(usize, u64), (u64, String)> = file
        .symbols()
        .filter(|s| s.kind() == object::SymbolKind::Text)
        .filter_map(|s| {
            let section = s.section_index()?.0;
            Some(((section, s.address()), (s.size(), s.name().ok()?.to_string())))
        })
        .collect();
    let mut frames = BTreeMap::new();
    for section in file.sections().filter(|s| s.kind() == SectionKind::Text) {
        let code = section.data().expect("section data");
        let relocations: BTreeMap<u64, (RelocationTarget, i64)> = section
            .relocations()
            .map(|(at, r)| (at, (r.target(), r.addend())))
            .collect();
        let here = section.index().0;
        for ((_, start), (size, name)) in functions.range((here, 0)..(here + 1, 0)) {
            let mut frame = Frame::default();
            let mut from_r10: BTreeSet<u8> = BTreeSet::new();
            for at in (*start..start + size).step_by(INSN) {
                let insn = &code[at as usize..at as usize + INSN];
                let (opcode, dst, src) = (insn[0], insn[1] & 0x0f, insn[1] >> 4);
                let off = i16::from_le_bytes([insn[2], insn[3]]);
                let imm = i32::from_le_bytes([insn[4], insn[5], insn[6], insn[7]]);
                match opcode {
                    BPF_CALL if src == BPF_PSEUDO_CALL => {
                        let target = match relocations.get(&at) {
                            // A call into another section names its symbol (or the section,
                            // with the callee's instruction index in the immediate).
                            Some((RelocationTarget::Symbol(index), _)) => {
                                let symbol = file.symbol_by_index(*index).expect("relocated symbol");
                                let section = symbol.section_index().expect("callee section").0;
                                if symbol.kind() == object::SymbolKind::Section {
                                    (section, ((i64::from(imm) + 1) * INSN as i64) as u64)
                                } else {
                                    (section, symbol.address())
                                }
                            }
                            _ => (here, (at as i64 + (i64::from(imm) + 1) * INSN as i64) as u64),
                        };
                        let (_, callee) = functions
                            .get(&target)
                            .unwrap_or_else(|| panic!("{name}: call to {target:?}"));
                        frame.calls.insert(callee.clone());
                    }
                    MOV64_REG if src == R10 => {
                        from_r10.insert(dst);
                    }
                    ADD64_IMM if from_r10.contains(&dst) && imm < 0 => {
                        frame.depth = frame.depth.max(imm.unsigned_abs());
                    }
                    _ => {
                        // Loads and stores relative to the frame pointer.
                        let memory = matches!(opcode & 0x07, 0x01..=0x03);
                        let base = if opcode & 0x07 == 0x01 { src } else { dst };
                        if memory && base == R10 && off < 0 {
                            frame.depth = frame.depth.max(u32::from(off.unsigned_abs()));
                        }
                        if dst != R10 && opcode & 0x07 != 0x02 && opcode & 0x07 != 0x03 {
                            from_r10.remove(&dst);
                        }
                    }
                }
            }
            frames.insert(name.clone(), frame);
        }
    }
    frames
}

/// The deepest chain from `function`, with each frame rounded up to `granularity`.
fn deepest(frames: &BTreeMap<String, Frame>, function: &str, granularity: u32) -> (u32, Vec<String>) {
    let frame = &frames[function];
    let own = frame.depth.max(1).div_ceil(granularity) * granularity;
    let (below, mut chain) = frame
        .calls
        .iter()
        .map(|callee| deepest(frames, callee, granularity))
        .max_by_key(|(depth, _)| *depth)
        .unwrap_or_default();
    chain.insert(0, format!("{function}({})", frame.depth));
    (own + below, chain)
}

#[test]
fn every_program_fits_the_stack_bound_of_linux_6_1() {
    let frames = frames();
    let programs: Vec<&String> = frames.keys().filter(|name| name.starts_with("bkp_")).collect();
    assert!(
        SOCKET_PROGRAMS.iter().all(|p| frames.contains_key(*p))
            && programs.iter().any(|p| p.starts_with("bkp_tc_")),
        "expected the socket and tc programs, found {programs:?}"
    );
    for program in programs {
        let (depth, chain) = deepest(&frames, program, LINUX_6_1_FRAME);
        println!("{program}: {depth} bytes on 6.1 ({})", chain.join(" -> "));
        assert!(
            depth <= MAX_BPF_STACK,
            "{program}: a call chain needs {depth} bytes of stack on Linux 6.1 (limit {MAX_BPF_STACK}): {}",
            chain.join(" -> ")
        );
    }
}
