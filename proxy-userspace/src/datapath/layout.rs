//! A map's field layout, read from BTF: the embedded object's for the maps this build makes,
//! the kernel's for a pinned map, so that a restart can tell a pin it may adopt from one an
//! older build made with other fields of the same sizes.
//!
//! The description keeps what decides how bytes are read: member names, offsets and types,
//! integer widths and signedness, array lengths. It leaves out type names (Rust's generic
//! names say nothing the members do not) and resolves typedefs and qualifiers, which aya may
//! rewrite when it adapts the object's BTF to the kernel. Kinds a key or value should never
//! hold are marked with a sigil (`*` a pointer, `~` a float, `()` void, `?` anything else).

use std::fmt::Write as _;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("BTF is truncated or has no BTF header")]
    Malformed,
    #[error("BTF has no type {0}")]
    NoType(u32),
    #[error("BTF type {0} nests deeper than {MAX_DEPTH} levels")]
    TooDeep(u32),
}

const MAGIC: u16 = 0xeb9f;
/// Deeper than any key or value type; bounds the walk of a malformed (cyclic) BTF.
const MAX_DEPTH: usize = 16;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// One BTF type record: its header words, then the words that follow it.
struct Type<'a> {
    name_off: u32,
    info: u32,
    /// The size, or the referenced type id, as the kind says.
    size_or_target: u32,
    extra: &'a [u8],
}

impl Type<'_> {
    const fn kind(&self) -> u32 {
        (self.info >> 24) & 0x1f
    }

    const fn vlen(&self) -> usize {
        (self.info & 0xffff) as usize
    }

    const fn kind_flag(&self) -> bool {
        self.info >> 31 == 1
    }

    fn word(&self, index: usize) -> u32 {
        read_u32(self.extra, index * 4).unwrap_or(0)
    }
}

/// A parsed BTF blob (native byte order, as the kernel and the object both hold it here).
pub struct Btf<'a> {
    /// Type ids start at 1 (0 is void).
    types: Vec<Type<'a>>,
    strings: &'a [u8],
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let word = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_ne_bytes(word.try_into().ok()?))
}

impl<'a> Btf<'a> {
    pub fn parse(raw: &'a [u8]) -> Result<Self, BtfError> {
        let header = |at| read_u32(raw, at).ok_or(BtfError::Malformed);
        if raw.get(..2).map(|m| u16::from_ne_bytes([m[0], m[1]])) != Some(MAGIC) {
            return Err(BtfError::Malformed);
        }
        let hdr_len = header(4)? as usize;
        let section = |off: usize, len: usize| {
            let start = hdr_len
                .checked_add(header(off)? as usize)
                .ok_or(BtfError::Malformed)?;
            let end = start
                .checked_add(header(len)? as usize)
                .ok_or(BtfError::Malformed)?;
            raw.get(start..end).ok_or(BtfError::Malformed)
        };
        let mut rest = section(8, 12)?;
        let strings = section(16, 20)?;
        let mut types = Vec::new();
        while !rest.is_empty() {
            let word = |i: usize| read_u32(rest, i * 4).ok_or(BtfError::Malformed);
            let (name_off, info, size_or_target) = (word(0)?, word(1)?, word(2)?);
            let vlen = (info & 0xffff) as usize;
            let extra_words = match (info >> 24) & 0x1f {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 1,
                KIND_ARRAY => 3,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 3 * vlen,
                KIND_ENUM | KIND_FUNC_PROTO => 2 * vlen,
                _ => 0,
            };
            let end = 12 + 4 * extra_words;
            let extra = rest.get(12..end).ok_or(BtfError::Malformed)?;
            types.push(Type {
                name_off,
                info,
                size_or_target,
                extra,
            });
            rest = &rest[end..];
        }
        Ok(Self { types, strings })
    }

    fn get(&self, id: u32) -> Result<&Type<'a>, BtfError> {
        let index = (id as usize).checked_sub(1).ok_or(BtfError::NoType(id))?;
        self.types.get(index).ok_or(BtfError::NoType(id))
    }

    fn name(&self, offset: u32) -> &str {
        let tail = self.strings.get(offset as usize..).unwrap_or_default();
        let end = tail.iter().position(|b| *b == 0).unwrap_or(tail.len());
        std::str::from_utf8(&tail[..end]).unwrap_or("?")
    }

    /// The layout of type `id` as one line, e.g. `{addr:[u8;4]@0,port:u16@4}`.
    pub fn describe(&self, id: u32) -> Result<String, BtfError> {
        let mut out = String::new();
        self.write(&mut out, id, 0)?;
        Ok(out)
    }

    fn write(&self, out: &mut String, id: u32, depth: usize) -> Result<(), BtfError> {
        if depth > MAX_DEPTH {
            return Err(BtfError::TooDeep(id));
        }
        if id == 0 {
            out.push_str("()");
            return Ok(());
        }
        let ty = self.get(id)?;
        // Writing to a String cannot fail.
        match ty.kind() {
            KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                self.write(out, ty.size_or_target, depth + 1)?;
            }
            KIND_INT => {
                let data = ty.word(0);
                let (encoding, bits) = ((data >> 24) & 0xf, data & 0xff);
                let sign = match encoding {
                    1 => "i",
                    4 => "bool",
                    _ => "u",
                };
                let _ = write!(out, "{sign}{bits}");
            }
            KIND_FLOAT => {
                let _ = write!(out, "~f{}", ty.size_or_target * 8);
            }
            KIND_PTR => out.push('*'),
            KIND_ARRAY => {
                out.push('[');
                self.write(out, ty.word(0), depth + 1)?;
                let _ = write!(out, ";{}]", ty.word(2));
            }
            KIND_STRUCT | KIND_UNION => {
                if ty.kind() == KIND_UNION {
                    out.push_str("union");
                }
                out.push('{');
                for m in 0..ty.vlen() {
                    if m > 0 {
                        out.push(',');
                    }
                    let (name, member, offset) = (ty.word(3 * m), ty.word(3 * m + 1), ty.word(3 * m + 2));
                    let _ = write!(out, "{}:", self.name(name));
                    self.write(out, member, depth + 1)?;
                    // With the kind flag, the top byte is a bitfield's width.
                    let (bits, width) = if ty.kind_flag() {
                        (offset & 0x00ff_ffff, offset >> 24)
                    } else {
                        (offset, 0)
                    };
                    if bits % 8 == 0 && width == 0 {
                        let _ = write!(out, "@{}", bits / 8);
                    } else {
                        let _ = write!(out, "@{bits}b:{width}");
                    }
                }
                let _ = write!(out, "}}{}", ty.size_or_target);
            }
            KIND_ENUM | KIND_ENUM64 => {
                let _ = write!(out, "enum{}{{", ty.size_or_target);
                let per = if ty.kind() == KIND_ENUM { 2 } else { 3 };
                for v in 0..ty.vlen() {
                    if v > 0 {
                        out.push(',');
                    }
                    let low = u64::from(ty.word(per * v + 1));
                    let high = if per == 3 {
                        u64::from(ty.word(per * v + 2))
                    } else {
                        0
                    };
                    let _ = write!(out, "{}={}", self.name(ty.word(per * v)), low | (high << 32));
                }
                out.push('}');
            }
            kind => {
                let _ = write!(out, "?{kind}:{}", self.name(ty.name_off));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob from type records (each: name offset, info, size or type, extra words).
    fn blob(types: &[&[u32]], strings: &[u8]) -> Vec<u8> {
        let type_bytes: Vec<u8> = types
            .iter()
            .flat_map(|t| t.iter())
            .flat_map(|w| w.to_ne_bytes())
            .collect();
        let mut raw = Vec::new();
        raw.extend_from_slice(&MAGIC.to_ne_bytes());
        raw.extend_from_slice(&[1, 0]);
        for word in [
            24,
            0,
            type_bytes.len() as u32,
            type_bytes.len() as u32,
            strings.len() as u32,
        ] {
            raw.extend_from_slice(&word.to_ne_bytes());
        }
        raw.extend_from_slice(&type_bytes);
        raw.extend_from_slice(strings);
        raw
    }

    const fn info(kind: u32, vlen: u32) -> u32 {
        (kind << 24) | vlen
    }

    /// Strings: 1 "u16", 5 "u8", 8 "port", 13 "proto", 19 "k".
    const STRINGS: &[u8] = b"\0u16\0u8\0port\0proto\0k\0";

    /// `{port:u16@0,proto:u8@2,...}` with the two members named `first` and `second`.
    fn two_members(first: u32, second: u32) -> Vec<u8> {
        blob(
            &[
                &[1, info(KIND_INT, 0), 2, 16],
                &[5, info(KIND_INT, 0), 1, 8],
                &[19, info(KIND_STRUCT, 2), 4, first, 1, 0, second, 2, 16],
                // A typedef of the struct, as a qualifier aya may add.
                &[0, info(KIND_TYPEDEF, 0), 3],
            ],
            STRINGS,
        )
    }

    #[test]
    fn a_struct_is_described_by_member_names_types_and_offsets() {
        let raw = two_members(8, 13);
        let btf = Btf::parse(&raw).expect("parses");
        assert_eq!(btf.describe(3).expect("describes"), "{port:u16@0,proto:u8@2}4");
        // Typedefs and qualifiers are looked through.
        assert_eq!(
            btf.describe(4).expect("describes"),
            btf.describe(3).expect("describes")
        );
    }

    #[test]
    fn renamed_members_of_the_same_sizes_describe_another_layout() {
        let (before, after) = (two_members(8, 13), two_members(13, 8));
        let describe = |raw: &[u8]| Btf::parse(raw).and_then(|b| b.describe(3)).expect("describes");
        assert_ne!(describe(&before), describe(&after));
    }

    #[test]
    fn truncated_btf_and_unknown_types_are_errors() {
        let raw = two_members(8, 13);
        assert!(matches!(
            Btf::parse(&raw[..raw.len() - 30]),
            Err(BtfError::Malformed)
        ));
        let btf = Btf::parse(&raw).expect("parses");
        assert!(matches!(btf.describe(9), Err(BtfError::NoType(9))));
    }

    #[test]
    fn a_cyclic_typedef_ends_in_an_error() {
        let raw = blob(&[&[0, info(KIND_TYPEDEF, 0), 1]], STRINGS);
        let btf = Btf::parse(&raw).expect("parses");
        assert!(matches!(btf.describe(1), Err(BtfError::TooDeep(_))));
    }
}
