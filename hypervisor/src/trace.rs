//! This image's trace (`reservations::trace`): one buffer per pCPU, allocated before the run
//! when the config asks for one (`trace_events`), recorded into from anywhere on that pCPU,
//! and printed as `trace` records once the run is over (docs/records.md).

extern crate alloc;

use alloc::vec::Vec;
use base64::Engine;
use core::sync::atomic::{AtomicBool, Ordering};
use reservations::trace::{encode, Event, EventKind, TraceBuffer};

use crate::console::Record;

/// Whether buffers exist: a single load when the trace is off.
static TRACING: AtomicBool = AtomicBool::new(false);
/// Events per `trace` record: about 1.5 KB of base64, a line a terminal still shows.
const EVENTS_PER_RECORD: usize = 256;

/// Allocates a buffer of `capacity` events for each of `cpus` pCPUs (0: no trace).
pub fn allocate(cpus: usize, capacity: usize) {
    if capacity == 0 {
        return;
    }
    for cpu in 0..cpus {
        *crate::percpu::of(cpu).trace.lock() = Some(TraceBuffer::with_capacity(capacity));
    }
    TRACING.store(true, Ordering::Release);
}

/// Whether the run records a trace.
#[inline]
pub fn enabled() -> bool {
    TRACING.load(Ordering::Relaxed)
}

/// Records `event` in pCPU `cpu`'s buffer. Only that pCPU records into it during the run, so
/// its lock is never contended.
#[inline]
pub fn record(cpu: usize, event: Event) {
    if TRACING.load(Ordering::Relaxed) {
        if let Some(buffer) = crate::percpu::of(cpu).trace.lock().as_mut() {
            buffer.record(event);
        }
    }
}

/// Records an event of vCPU `vcpu` of `partition` on the pCPU this runs on, stamped now (for
/// code that has no pCPU at hand: injections, kicks, faults).
pub fn record_here(kind: EventKind, partition: usize, vcpu: u32, arg: u32) {
    if TRACING.load(Ordering::Relaxed) {
        record(crate::cpu::current_index(), Event::new(kind, crate::tsc::now(), partition as u16, vcpu as u8, arg));
    }
}

/// Prints every pCPU's buffer (after the run, when no pCPU records any more): one
/// `trace_info` record, then per pCPU its `trace` chunks and a `trace_end` with what it held
/// and what it dropped.
pub fn dump(cpus: usize, t0: u64) {
    if !TRACING.swap(false, Ordering::AcqRel) {
        return;
    }
    let capacity = crate::percpu::of(0).trace.lock().as_ref().map_or(0, |b| b.capacity());
    Record::new("trace_info").u64("t0_tsc", t0).u64("tsc_hz", crate::tsc::hz()).u64("capacity", capacity as u64).emit();
    let mut bytes = Vec::new();
    let mut text = alloc::string::String::new();
    for cpu in 0..cpus {
        let Some(buffer) = crate::percpu::of(cpu).trace.lock().take() else { continue };
        let mut base_tsc = t0;
        for (chunk, events) in buffer.events().chunks(EVENTS_PER_RECORD).enumerate() {
            bytes.clear();
            encode(events, base_tsc, &mut bytes);
            text.clear();
            base64::engine::general_purpose::STANDARD.encode_string(&bytes, &mut text);
            Record::new("trace")
                .u64("pcpu", cpu as u64)
                .u64("chunk", chunk as u64)
                .u64("base_tsc", base_tsc)
                .u64("events", events.len() as u64)
                .str("data", &text)
                .emit();
            base_tsc = events.last().map_or(base_tsc, |e| e.tsc);
        }
        Record::new("trace_end")
            .u64("pcpu", cpu as u64)
            .u64("events", buffer.events().len() as u64)
            .u64("dropped", buffer.dropped())
            .emit();
    }
}
