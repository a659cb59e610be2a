//! Host-physical range bookkeeping: what is free after the firmware's memory map has been
//! cut by everything that must never be handed out (the image, the boot information, the
//! modules, real-mode firmware areas).

use core::ops::Range;

/// Up to `N` disjoint, sorted, half-open physical ranges, without heap allocation (it is
/// used before the heap exists).
#[derive(Clone, Debug)]
pub struct RangeSet<const N: usize> {
    ranges: [Range<u64>; N],
    len: usize,
}

/// The set is full: the firmware reported more fragments than the fixed capacity.
#[derive(Debug, PartialEq, Eq)]
pub struct RangeSetFull;

impl<const N: usize> Default for RangeSet<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> RangeSet<N> {
    pub const fn new() -> Self {
        const EMPTY: Range<u64> = 0..0;
        Self { ranges: [EMPTY; N], len: 0 }
    }

    pub fn as_slice(&self) -> &[Range<u64>] {
        &self.ranges[..self.len]
    }

    pub fn total(&self) -> u64 {
        self.as_slice().iter().map(|r| r.end - r.start).sum()
    }

    /// Adds a range, merging with neighbours it touches or overlaps.
    pub fn insert(&mut self, range: Range<u64>) -> Result<(), RangeSetFull> {
        if range.start >= range.end {
            return Ok(());
        }
        let mut merged = range;
        let mut kept = Self::new();
        let mut placed = false;
        for r in self.as_slice() {
            if r.end < merged.start {
                kept.push(r.clone())?;
            } else if r.start > merged.end {
                if !placed {
                    kept.push(merged.clone())?;
                    placed = true;
                }
                kept.push(r.clone())?;
            } else {
                merged = merged.start.min(r.start)..merged.end.max(r.end);
            }
        }
        if !placed {
            kept.push(merged)?;
        }
        *self = kept;
        Ok(())
    }

    /// Removes a range (a hole may split one range in two).
    pub fn remove(&mut self, hole: Range<u64>) -> Result<(), RangeSetFull> {
        if hole.start >= hole.end {
            return Ok(());
        }
        let mut kept = Self::new();
        for r in self.as_slice() {
            if r.end <= hole.start || r.start >= hole.end {
                kept.push(r.clone())?;
                continue;
            }
            if r.start < hole.start {
                kept.push(r.start..hole.start)?;
            }
            if r.end > hole.end {
                kept.push(hole.end..r.end)?;
            }
        }
        *self = kept;
        Ok(())
    }

    /// Takes `size` bytes aligned to `align` (a power of two) from the lowest range that
    /// fits, and returns its start.
    pub fn take(&mut self, size: u64, align: u64) -> Option<u64> {
        debug_assert!(align.is_power_of_two());
        let start = self.as_slice().iter().find_map(|r| {
            let start = r.start.checked_add(align - 1)? & !(align - 1);
            (start.checked_add(size)? <= r.end).then_some(start)
        })?;
        self.remove(start..start + size).ok()?;
        Some(start)
    }

    fn push(&mut self, range: Range<u64>) -> Result<(), RangeSetFull> {
        if self.len == N {
            return Err(RangeSetFull);
        }
        self.ranges[self.len] = range;
        self.len += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_merges_touching_and_overlapping_ranges() {
        let mut s = RangeSet::<8>::new();
        s.insert(0x1000..0x2000).unwrap();
        s.insert(0x3000..0x4000).unwrap();
        s.insert(0x2000..0x3000).unwrap();
        assert_eq!(s.as_slice(), &[0x1000..0x4000]);
        s.insert(0x8000..0x9000).unwrap();
        s.insert(0x500..0x1800).unwrap();
        assert_eq!(s.as_slice(), &[0x500..0x4000, 0x8000..0x9000]);
    }

    #[test]
    fn remove_splits_and_never_leaves_reserved_bytes() {
        let mut s = RangeSet::<8>::new();
        s.insert(0..0x10_0000).unwrap();
        s.remove(0x1000..0x2000).unwrap();
        s.remove(0xF_F000..0x20_0000).unwrap();
        assert_eq!(s.as_slice(), &[0..0x1000, 0x2000..0xF_F000]);
        assert_eq!(s.total(), 0x1000 + 0xF_D000);
    }

    #[test]
    fn take_is_aligned_first_fit_and_removes_what_it_gives() {
        let mut s = RangeSet::<8>::new();
        s.insert(0x1000..0x3000).unwrap();
        s.insert(0x10_0000..0x80_0000).unwrap();
        assert_eq!(s.take(0x20_0000, 0x20_0000), Some(0x20_0000));
        assert_eq!(s.as_slice(), &[0x1000..0x3000, 0x10_0000..0x20_0000, 0x40_0000..0x80_0000]);
        assert_eq!(s.take(0x1000, 0x1000), Some(0x1000));
        assert_eq!(s.take(0x100_0000, 0x1000), None);
    }

    #[test]
    fn capacity_overflow_is_an_error_not_a_silent_loss() {
        let mut s = RangeSet::<2>::new();
        s.insert(0..10).unwrap();
        s.insert(20..30).unwrap();
        assert_eq!(s.insert(40..50), Err(RangeSetFull));
        assert_eq!(s.remove(2..4), Err(RangeSetFull));
    }
}
