//! EPT-violation exit qualification (SDM Vol. 3C 28.2.1, Table 28-7), decoded for the record
//! that stops a partition which touched memory it does not own.

use core::fmt;

use crate::tables::{Access, AccessText};

const DATA_READ: u64 = 1 << 0;
const DATA_WRITE: u64 = 1 << 1;
const INSTRUCTION_FETCH: u64 = 1 << 2;
const READABLE: u64 = 1 << 3;
const WRITABLE: u64 = 1 << 4;
const EXECUTABLE: u64 = 1 << 5;
const GUEST_LINEAR_VALID: u64 = 1 << 7;
const NMI_UNBLOCKING: u64 = 1 << 12;

/// Decoded EPT-violation exit qualification plus the faulting GPA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EptViolation {
    /// The guest-physical address field of the VMCS.
    pub gpa: u64,
    /// The guest-linear address field of the VMCS, when the qualification says it is valid.
    pub guest_linear: Option<u64>,
    /// What the access was (several at once for, e.g., a locked read-modify-write).
    pub read: bool,
    pub write: bool,
    pub execute: bool,
    /// What the entries for `gpa` allowed; all false means it is not mapped.
    pub readable: bool,
    pub writable: bool,
    pub executable: bool,
    /// The violation happened during an IRET that unblocked NMIs: NMI blocking must be set
    /// again before re-entering the guest.
    pub nmi_unblocking: bool,
}

impl EptViolation {
    pub fn decode(qualification: u64, gpa: u64, guest_linear: u64) -> Self {
        let bit = |mask: u64| qualification & mask != 0;
        Self {
            gpa,
            guest_linear: bit(GUEST_LINEAR_VALID).then_some(guest_linear),
            read: bit(DATA_READ),
            write: bit(DATA_WRITE),
            execute: bit(INSTRUCTION_FETCH),
            readable: bit(READABLE),
            writable: bit(WRITABLE),
            executable: bit(EXECUTABLE),
            nmi_unblocking: bit(NMI_UNBLOCKING),
        }
    }

    /// What the entries for `gpa` allowed.
    pub fn allowed(&self) -> Access {
        let mut allowed = Access::empty();
        allowed.set(Access::READ, self.readable);
        allowed.set(Access::WRITE, self.writable);
        allowed.set(Access::EXECUTE, self.executable);
        allowed
    }

    pub fn is_mapped(&self) -> bool {
        !self.allowed().is_empty()
    }

    /// One line for the stop record, e.g. "write to GPA 0x8000000 (not mapped)".
    pub fn describe(&self) -> impl fmt::Display + '_ {
        self
    }
}

impl fmt::Display for EptViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kinds = [(self.read, "read"), (self.write, "write"), (self.execute, "instruction fetch")];
        let mut count = 0;
        for (_, name) in kinds.iter().filter(|(happened, _)| *happened) {
            if count > 0 {
                f.write_str("+")?;
            }
            f.write_str(name)?;
            count += 1;
        }
        let preposition = match (count, self.write) {
            (0, _) => "access to",
            (1, true) => "to",
            (1, false) => "from",
            _ => "at",
        };
        if count == 0 {
            f.write_str(preposition)?;
        } else {
            write!(f, " {preposition}")?;
        }
        write!(f, " GPA {:#x}", self.gpa)?;
        if let Some(linear) = self.guest_linear {
            write!(f, " (linear {linear:#x})")?;
        }
        if self.is_mapped() {
            write!(f, " (mapped {})", AccessText(self.allowed()))
        } else {
            f.write_str(" (not mapped)")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn read_of_unmapped_memory_with_a_valid_linear_address() {
        // Bit 0 read, bit 7 linear address valid, bit 8 access to the translated address.
        let v = EptViolation::decode(0x181, 0x800_0000, 0xFFFF_8000_0800_0000);
        assert!(v.read && !v.write && !v.execute);
        assert!(!v.readable && !v.writable && !v.executable && !v.is_mapped());
        assert_eq!(v.guest_linear, Some(0xFFFF_8000_0800_0000));
        assert!(!v.nmi_unblocking);
        assert_eq!(v.describe().to_string(), "read from GPA 0x8000000 (linear 0xffff800008000000) (not mapped)");
    }

    #[test]
    fn write_of_unmapped_memory_without_a_linear_address() {
        let v = EptViolation::decode(0x2, 0x800_0000, 0xDEAD);
        assert!(v.write && !v.read);
        assert_eq!(v.guest_linear, None);
        assert_eq!(v.describe().to_string(), "write to GPA 0x8000000 (not mapped)");
    }

    #[test]
    fn write_to_read_execute_memory_names_what_was_allowed() {
        // Write, readable + executable, linear valid, translated access.
        let v = EptViolation::decode(0x1AA, 0x10_0000, 0x40_0000);
        assert!(v.write && v.readable && !v.writable && v.executable);
        assert_eq!(v.allowed(), Access::READ | Access::EXECUTE);
        assert_eq!(v.describe().to_string(), "write to GPA 0x100000 (linear 0x400000) (mapped r-x)");
    }

    #[test]
    fn instruction_fetch_and_nmi_unblocking() {
        // Fetch, readable + writable, NMI unblocking due to IRET.
        let v = EptViolation::decode(0x101C, 0x2000, 0);
        assert!(v.execute && !v.read && !v.write);
        assert!(v.readable && v.writable && !v.executable);
        assert!(v.nmi_unblocking);
        assert_eq!(v.describe().to_string(), "instruction fetch from GPA 0x2000 (mapped rw-)");
    }

    #[test]
    fn locked_read_modify_write_reports_both() {
        let v = EptViolation::decode(0x3, 0x3000, 0);
        assert_eq!(v.to_string(), "read+write at GPA 0x3000 (not mapped)");
    }

    #[test]
    fn qualification_with_no_access_bits_still_describes_the_address() {
        let v = EptViolation::decode(0, 0x4000, 0);
        assert_eq!(v.to_string(), "access to GPA 0x4000 (not mapped)");
    }
}
