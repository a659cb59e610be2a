//! What a partition's payload is and whether it fits the partition: the classification the
//! loader makes (a bzImage goes through the Linux boot protocol; anything without the setup
//! header is the flat test guest) and every check either loader makes before it writes. The
//! config check runs `fits` on the boot modules (at boot, and on the host when `phalanx-check`
//! is given them), so a partition whose payload cannot load is refused at the check, naming
//! the partition, not stopped at start.

use alloc::format;
use alloc::string::String;

use crate::linux::{self, BzImage, LinuxError};
use crate::longmode;

/// How a partition's payload is loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadKind {
    /// A Linux bzImage, entered at `startup_64` through the boot protocol.
    Linux,
    /// The flat long-mode test guest, entered at its first byte on every vCPU.
    TestGuest,
}

/// A payload image, as the loader sees it.
pub enum Payload<'a> {
    Linux(BzImage<'a>),
    TestGuest,
}

/// The payload `image` is, or why the loader cannot take it (a bzImage it cannot boot).
pub fn classify(image: &[u8]) -> Result<Payload<'_>, LinuxError> {
    match BzImage::parse(image) {
        Ok(kernel) => Ok(Payload::Linux(kernel)),
        Err(e @ (LinuxError::ProtocolTooOld { .. } | LinuxError::No64BitEntry)) => Err(e),
        Err(_) => Ok(Payload::TestGuest),
    }
}

/// Whether `image` (with an initrd of `initrd_len` bytes) loads into a partition of
/// `memory_size` bytes with `vcpus` vCPUs and `cmdline`: the loader's own checks, in its words.
pub fn fits(
    image: &[u8],
    initrd_len: Option<usize>,
    memory_size: u64,
    vcpus: u32,
    cmdline: &str,
) -> Result<PayloadKind, String> {
    match classify(image).map_err(|e| format!("{e}"))? {
        Payload::Linux(kernel) => linux::place_linux(&kernel, memory_size, cmdline.len(), initrd_len)
            .map(|_| PayloadKind::Linux)
            .map_err(|e| format!("Linux: {e}")),
        Payload::TestGuest if initrd_len.is_some() => {
            Err("test guest: it takes no initrd (only a Linux bzImage does)".into())
        }
        Payload::TestGuest => longmode::check_test_guest(image.len(), vcpus, cmdline, memory_size)
            .map(|_| PayloadKind::TestGuest)
            .map_err(|e| format!("test guest: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn the_test_guest_fits_by_size_vcpus_and_command_line() {
        let image = [0x90u8; 8192];
        assert_eq!(fits(&image, None, 16 * MIB, 2, "mode=idle"), Ok(PayloadKind::TestGuest));
        let too_small = fits(&image, None, MIB + 4096, 2, "mode=idle").unwrap_err();
        assert!(too_small.starts_with("test guest: ") && too_small.contains("too small"), "{too_small}");
        assert!(fits(&image, None, 16 * MIB, 57, "mode=idle").unwrap_err().contains("at most 56"));
        assert!(fits(&image, None, 16 * MIB, 2, "mode=idle é").unwrap_err().contains("ASCII"));
        assert!(fits(&image, Some(100), 16 * MIB, 2, "mode=idle").unwrap_err().contains("no initrd"));
    }

    #[test]
    fn a_bzimage_fits_from_its_load_address_and_init_size() {
        // The real guest kernel when it has been built (scripts/build-guest), as the linux
        // module's own tests use it.
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../build/guest/bzImage");
        let Ok(image) = std::fs::read(path) else {
            return;
        };
        assert_eq!(fits(&image, None, 64 * MIB, 2, "console=ttyS0"), Ok(PayloadKind::Linux));
        assert_eq!(fits(&image, Some(8 << 20), 64 * MIB, 2, "console=ttyS0"), Ok(PayloadKind::Linux));
        let small = fits(&image, None, 16 * MIB, 2, "console=ttyS0").unwrap_err();
        assert!(small.starts_with("Linux: "), "{small}");
        let initrd = fits(&image, Some(60 << 20), 64 * MIB, 2, "console=ttyS0").unwrap_err();
        assert!(initrd.contains("initrd of 62914560 bytes does not fit"), "{initrd}");
    }
}
