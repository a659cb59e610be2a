//! The few AML (ACPI Machine Language, ACPI 6.4 chapter 20) constructs a partition's DSDT
//! needs, encoded by hand: names, integers, packages, buffers, a device in a scope. No crate
//! here encodes AML (the `aml` crate parses it, and needs a nightly compiler), and these are
//! a handful of fixed encodings.

use alloc::vec::Vec;

const ZERO_OP: u8 = 0x00;
const ONE_OP: u8 = 0x01;
const NAME_OP: u8 = 0x08;
const BYTE_PREFIX: u8 = 0x0A;
const WORD_PREFIX: u8 = 0x0B;
const DWORD_PREFIX: u8 = 0x0C;
const SCOPE_OP: u8 = 0x10;
const BUFFER_OP: u8 = 0x11;
const PACKAGE_OP: u8 = 0x12;
const EXT_OP_PREFIX: u8 = 0x5B;
const DEVICE_OP: u8 = 0x82;

/// A PkgLength (20.2.4) for `content` bytes that follow it: the encoded length counts itself.
pub fn pkg_length(content: usize) -> Vec<u8> {
    // One byte holds up to 63; with n more bytes the low nibble is in the first byte.
    for extra in 0..4usize {
        let total = content + 1 + extra;
        let fits = if extra == 0 { total < 0x40 } else { total < 1 << (4 + 8 * extra) };
        if fits {
            if extra == 0 {
                return alloc::vec![total as u8];
            }
            let mut bytes = alloc::vec![((extra as u8) << 6) | (total & 0xF) as u8];
            bytes.extend((0..extra).map(|i| (total >> (4 + 8 * i)) as u8));
            return bytes;
        }
    }
    unreachable!("AML packages are far below 256 MiB")
}

/// `op` (one or two bytes), the PkgLength of what follows, then `content`.
fn with_length(op: &[u8], content: Vec<u8>) -> Vec<u8> {
    let mut out = op.to_vec();
    out.extend(pkg_length(content.len()));
    out.extend(content);
    out
}

/// An integer constant in its shortest encoding.
pub fn integer(value: u64) -> Vec<u8> {
    match value {
        0 => alloc::vec![ZERO_OP],
        1 => alloc::vec![ONE_OP],
        v if v <= 0xFF => alloc::vec![BYTE_PREFIX, v as u8],
        v if v <= 0xFFFF => [&[WORD_PREFIX][..], &(v as u16).to_le_bytes()].concat(),
        v => [&[DWORD_PREFIX][..], &(v as u32).to_le_bytes()].concat(),
    }
}

/// An EISA ID (`EisaId ("PNP0A03")`) as the DWord AML compresses it to.
pub fn eisa_id(id: &[u8; 7]) -> Vec<u8> {
    let letter = |c: u8| (c - b'@') as u32 & 0x1F;
    let hex = |c: u8| (c as char).to_digit(16).expect("an EISA ID's last four are hex digits");
    let vendor = (letter(id[0]) << 10) | (letter(id[1]) << 5) | letter(id[2]);
    let product = (hex(id[3]) << 12) | (hex(id[4]) << 8) | (hex(id[5]) << 4) | hex(id[6]);
    // Stored big-endian within the DWord.
    let value = ((vendor as u16).swap_bytes() as u32) | ((product as u16).swap_bytes() as u32) << 16;
    [&[DWORD_PREFIX][..], &value.to_le_bytes()].concat()
}

/// `Name (NAME, object)`; `name` is a 4-character name segment.
pub fn name(name: &[u8; 4], object: Vec<u8>) -> Vec<u8> {
    [&[NAME_OP][..], name, &object].concat()
}

/// `Package () { elements }`.
pub fn package(elements: &[Vec<u8>]) -> Vec<u8> {
    let mut content = alloc::vec![elements.len() as u8];
    elements.iter().for_each(|e| content.extend_from_slice(e));
    with_length(&[PACKAGE_OP], content)
}

/// `Buffer () { bytes }`.
pub fn buffer(bytes: &[u8]) -> Vec<u8> {
    let mut content = integer(bytes.len() as u64);
    content.extend_from_slice(bytes);
    with_length(&[BUFFER_OP], content)
}

/// `Device (NAME) { body }`.
pub fn device(name: &[u8; 4], body: Vec<u8>) -> Vec<u8> {
    with_length(&[EXT_OP_PREFIX, DEVICE_OP], [&name[..], &body].concat())
}

/// `Scope (\NAME) { body }`, a scope under the root.
pub fn root_scope(name: &[u8; 4], body: Vec<u8>) -> Vec<u8> {
    with_length(&[SCOPE_OP], [&[b'\\'][..], name, &body].concat())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_lengths_count_themselves_in_one_to_four_bytes() {
        assert_eq!(pkg_length(8), [9]);
        assert_eq!(pkg_length(62), [63]);
        // 63 + 2 = 65 = 0x41: low nibble 1 in the lead byte (one more byte), then 0x04.
        assert_eq!(pkg_length(63), [0x41, 0x04]);
        // 0x1000 + 3 = 0x1003 needs two more bytes: lead 0x80 | 3, then 0x00, 0x01.
        assert_eq!(pkg_length(0x1000), [0x83, 0x00, 0x01]);
    }

    #[test]
    fn integers_and_eisa_ids_take_their_aml_forms() {
        assert_eq!(integer(0), [0x00]);
        assert_eq!(integer(1), [0x01]);
        assert_eq!(integer(9), [0x0A, 9]);
        assert_eq!(integer(0x1234), [0x0B, 0x34, 0x12]);
        assert_eq!(integer(0x0002_FFFF), [0x0C, 0xFF, 0xFF, 0x02, 0x00]);
        // EisaId ("PNP0A03") is 0x030AD041, as iasl compiles it.
        assert_eq!(eisa_id(b"PNP0A03"), [0x0C, 0x41, 0xD0, 0x0A, 0x03]);
    }

    #[test]
    fn the_s5_package_encodes_as_iasl_does() {
        let s5 = name(b"_S5_", package(&[integer(5), integer(5), integer(0), integer(0)]));
        assert_eq!(s5, [0x08, b'_', b'S', b'5', b'_', 0x12, 0x08, 0x04, 0x0A, 5, 0x0A, 5, 0x00, 0x00]);
    }
}
