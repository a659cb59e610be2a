//! A per-pCPU trace of what the hypervisor did, with TSC stamps: turns, VM entries and exits,
//! idle stretches, injections, host interrupts, kicks, faults and resets.
//!
//! Recording is a bounds check and a 16-byte store into a buffer of fixed size allocated
//! before the run; what does not fit is counted, never lost silently (the buffer keeps the
//! first events, so what it holds is a coherent prefix of the run). At the end of the run each
//! buffer is encoded compactly for the console (`encode`: a kind byte and four LEB128 varints
//! per event, stamps as deltas) and a host tool (`scripts/report.py`) turns it into a
//! Chrome/Perfetto trace. The format is written out in docs/records.md.

use alloc::vec::Vec;

/// What happened. The numbers are the wire format (docs/records.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum EventKind {
    /// A vCPU's turn began (`arg`: 1 in its partition's own slot, 0 in lent slack).
    TurnStart = 1,
    /// The turn ended (`arg`: 0 at the slot boundary, 1 halted, 2 yielded, 3 stopped).
    TurnEnd = 2,
    VmEntry = 3,
    /// `arg`: the basic exit reason.
    VmExit = 4,
    IdleStart = 5,
    IdleEnd = 6,
    /// An interrupt injected into the vCPU (`arg`: the vector).
    Inject = 7,
    /// A host interrupt stopped the running guest (`arg`: the host vector).
    HostInterrupt = 8,
    /// This pCPU kicked the pCPU of the vCPU named (`arg`: that pCPU).
    Kick = 9,
    Fault = 10,
    Reset = 11,
    /// `ipi-gang`'s timing pCPU signalled a slot boundary (`arg`: pCPUs signalled).
    BoundaryIpi = 12,
    /// The pCPU started new dispatch tables at this boundary (`arg`: the epoch's number).
    PhaseChange = 13,
}

impl EventKind {
    pub fn from_u8(byte: u8) -> Option<EventKind> {
        use EventKind::*;
        Some(match byte {
            1 => TurnStart,
            2 => TurnEnd,
            3 => VmEntry,
            4 => VmExit,
            5 => IdleStart,
            6 => IdleEnd,
            7 => Inject,
            8 => HostInterrupt,
            9 => Kick,
            10 => Fault,
            11 => Reset,
            12 => BoundaryIpi,
            13 => PhaseChange,
            _ => return None,
        })
    }
}

/// The partition number of events that belong to no partition (idle, boundary IPIs).
pub const NO_PARTITION: u16 = u16::MAX;

/// One event, 16 bytes in the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    pub tsc: u64,
    pub arg: u32,
    pub partition: u16,
    pub vcpu: u8,
    pub kind: EventKind,
}

impl Event {
    pub fn new(kind: EventKind, tsc: u64, partition: u16, vcpu: u8, arg: u32) -> Event {
        Event { tsc, arg, partition, vcpu, kind }
    }

    /// An event of no partition.
    pub fn machine(kind: EventKind, tsc: u64, arg: u32) -> Event {
        Event::new(kind, tsc, NO_PARTITION, 0, arg)
    }
}

/// A fixed-size event buffer: the first `capacity` events, and a count of the rest.
pub struct TraceBuffer {
    events: Vec<Event>,
    capacity: usize,
    dropped: u64,
}

impl TraceBuffer {
    /// Allocates the whole buffer now, so recording never allocates.
    pub fn with_capacity(capacity: usize) -> TraceBuffer {
        TraceBuffer { events: Vec::with_capacity(capacity), capacity, dropped: 0 }
    }

    #[inline]
    pub fn record(&mut self, event: Event) {
        if self.events.len() < self.capacity {
            self.events.push(event);
        } else {
            self.dropped += 1;
        }
    }

    pub fn events(&self) -> &[Event] {
        &self.events
    }

    /// Events that arrived after the buffer was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

/// Encodes `events` (in stamp order) for the console: per event its kind byte, then the stamp
/// as the delta from the previous one (the first from `base_tsc`), the partition, the vCPU
/// and the argument, each an unsigned LEB128 varint. Most events take 4 to 6 bytes.
pub fn encode(events: &[Event], base_tsc: u64, out: &mut Vec<u8>) {
    let mut previous = base_tsc;
    for e in events {
        out.push(e.kind as u8);
        put_varint(out, e.tsc.wrapping_sub(previous));
        put_varint(out, e.partition as u64);
        put_varint(out, e.vcpu as u64);
        put_varint(out, e.arg as u64);
        previous = e.tsc;
    }
}

/// Why bytes are not an encoded trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    UnknownKind { offset: usize, byte: u8 },
    Truncated { offset: usize },
    OutOfRange { offset: usize },
}

/// The inverse of `encode` (host tools and tests).
pub fn decode(bytes: &[u8], base_tsc: u64) -> Result<Vec<Event>, DecodeError> {
    let mut events = Vec::new();
    let mut at = 0;
    let mut tsc = base_tsc;
    while at < bytes.len() {
        let offset = at;
        let kind = EventKind::from_u8(bytes[at]).ok_or(DecodeError::UnknownKind { offset, byte: bytes[at] })?;
        at += 1;
        let mut next = || take_varint(bytes, &mut at);
        let delta = next()?;
        let (partition, vcpu, arg) = (next()?, next()?, next()?);
        let out_of_range = DecodeError::OutOfRange { offset };
        tsc = tsc.wrapping_add(delta);
        events.push(Event {
            tsc,
            kind,
            partition: u16::try_from(partition).map_err(|_| out_of_range)?,
            vcpu: u8::try_from(vcpu).map_err(|_| out_of_range)?,
            arg: u32::try_from(arg).map_err(|_| out_of_range)?,
        });
    }
    Ok(events)
}

// LEB128 by hand: eight lines, where a crate would bring a std-only reader/writer API.
fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn take_varint(bytes: &[u8], at: &mut usize) -> Result<u64, DecodeError> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *bytes.get(*at).ok_or(DecodeError::Truncated { offset: *at })?;
        *at += 1;
        value |= ((byte & 0x7f) as u64) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(DecodeError::OutOfRange { offset: *at })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_events() -> Vec<Event> {
        alloc::vec![
            Event::new(EventKind::TurnStart, 1_000, 0, 1, 1),
            Event::new(EventKind::VmEntry, 1_300, 0, 1, 0),
            Event::new(EventKind::VmExit, 51_300, 0, 1, 48),
            Event::new(EventKind::Inject, 51_900, 0, 1, 0xec),
            Event::new(EventKind::TurnEnd, 60_000, 0, 1, 0),
            Event::machine(EventKind::IdleStart, 60_100, 0),
            Event::machine(EventKind::IdleEnd, u64::MAX / 2, 0),
            Event::new(EventKind::Kick, u64::MAX / 2 + 7, 300, 63, u32::MAX),
        ]
    }

    #[test]
    fn encoded_events_decode_to_the_same_events() {
        let events = sample_events();
        let mut bytes = Vec::new();
        encode(&events, 900, &mut bytes);
        assert_eq!(decode(&bytes, 900), Ok(events.clone()));
        // Stamps are deltas: decoding against another base shifts every stamp by the same.
        let shifted = decode(&bytes, 901).unwrap();
        assert!(shifted.iter().zip(&events).all(|(s, e)| s.tsc == e.tsc + 1));
        // Small deltas and ids make small events.
        assert!(bytes.len() < events.len() * 8, "{} bytes for {} events", bytes.len(), events.len());
    }

    #[test]
    fn every_kind_is_its_own_number() {
        let kinds: Vec<EventKind> = (0..=255).filter_map(EventKind::from_u8).collect();
        assert_eq!(kinds.len(), 13);
        assert!(kinds.iter().all(|&k| EventKind::from_u8(k as u8) == Some(k)));
    }

    #[test]
    fn a_full_buffer_keeps_its_first_events_and_counts_the_rest() {
        let mut buffer = TraceBuffer::with_capacity(3);
        for (i, e) in sample_events().into_iter().enumerate() {
            buffer.record(Event { arg: i as u32, ..e });
        }
        assert_eq!(buffer.events().iter().map(|e| e.arg).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(buffer.dropped(), 5);
    }

    #[test]
    fn damaged_bytes_are_refused_with_where() {
        let mut bytes = Vec::new();
        encode(&sample_events()[..2], 0, &mut bytes);
        assert_eq!(decode(&bytes[..bytes.len() - 1], 0), Err(DecodeError::Truncated { offset: bytes.len() - 1 }));
        let mut bad = bytes.clone();
        bad[0] = 0;
        assert_eq!(decode(&bad, 0), Err(DecodeError::UnknownKind { offset: 0, byte: 0 }));
        // A vCPU number beyond a byte is not an event this encoder writes.
        let mut wide = alloc::vec![EventKind::VmEntry as u8, 0, 0];
        put_varint(&mut wide, 256);
        wide.push(0);
        assert_eq!(decode(&wide, 0), Err(DecodeError::OutOfRange { offset: 0 }));
    }
}
