//! The control channel: one-line commands from the host (`scripts/phalanx ctl`) on COM2 while
//! the machine runs, one-line JSON replies (docs/control.md). COM2's receive interrupt is
//! routed to pCPU 0, which takes the bytes in its interrupt handler and runs complete
//! commands between its turns, in the hypervisor's own time (`Control::poll`).
//!
//! A new reservation is checked by the config check's own code on the config as it runs
//! (`config::LiveConfig`), planned, and published as the next epoch of dispatch tables with
//! a release on a frame boundary (`phases`); the reply waits until every pCPU has switched
//! and run its first frame in the new tables, and reports the switch (`phase_change`).

extern crate alloc;

use alloc::collections::VecDeque;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, Ordering};
use spin::Mutex;

use config::control::{parse_request, Command, Request};
use config::ControlChannel;
use firmware::platform::Platform;

use crate::console::Record;
use crate::json::JsonObject;
use crate::machine::{EndCause, Machine};
use crate::phases::ChangeOrigin;
use crate::serial::{Uart, COM2, COM2_INPUT, COM2_IRQ};

/// How far ahead of its publication a change is released at the least (then at the next
/// frame boundary): every pCPU reads the release at each of its slot boundaries, so the lead
/// only has to cover a store becoming visible and the publisher's way back to its slot loop
/// (a manager's hypercall publishes from inside its exit handling).
const PHASE_CHANGE_LEAD_US: u64 = 2_000;
/// The longest request line taken; a longer one is refused whole.
const MAX_LINE: usize = 512;
/// Reply bytes held for the UART at most.
const OUTPUT_LIMIT: usize = 64 * 1024;
/// Bytes the 16550's transmit FIFO takes when it reports empty.
const UART_FIFO: usize = 16;

/// Replies on their way out, written as the UART takes them (`pump`): a reply written at
/// 115200 baud while pCPU 0 waits would take ~87 us a byte from whoever's slot it is.
static OUTPUT: Mutex<VecDeque<u8>> = Mutex::new(VecDeque::new());
static ENABLED: AtomicBool = AtomicBool::new(false);

/// What `start` found, for the `control` record (`announce`).
static CHANNEL: spin::Once<(ControlChannel, bool, Option<u64>)> = spin::Once::new();

/// Opens the control channel the config asks for: COM2 set up, its receive interrupt routed
/// to pCPU 0 (`apic_id`).
pub fn start(channel: ControlChannel, platform: &Platform, apic_id: u8, run_ms: Option<u64>) -> Result<(), String> {
    let uart = Uart::new(COM2);
    let present = channel == ControlChannel::Com2 && uart.is_present();
    if present {
        uart.init();
        crate::host_irq::route_isa_irq(platform, COM2_IRQ, crate::vectors::CONTROL_INPUT_VECTOR, apic_id)?;
        uart.enable_receive_interrupt();
        ENABLED.store(true, Ordering::Release);
    } else if channel == ControlChannel::Com2 {
        log::warn!("the control channel is COM2, which this machine does not have: no commands can be taken");
    }
    CHANNEL.call_once(|| (channel, present, run_ms));
    Ok(())
}

/// The `control` record, which says whether commands can be taken: written by pCPU 0 as it
/// starts dispatching, from when it takes COM2's bytes (the host tool waits for it: bytes
/// sent while the machine is still being built would overrun the UART's 16-byte FIFO).
pub fn announce() {
    let Some(&(channel, present, run_ms)) = CHANNEL.get() else { return };
    Record::new("control")
        .str("channel", channel.as_str())
        .bool("present", present)
        .str("run_until", if run_ms.is_some() { "run_ms" } else { "end" })
        .emit();
}

/// Writes what COM2 takes now of the replies; never blocks. True while bytes remain.
pub fn pump() -> bool {
    let Some(mut output) = OUTPUT.try_lock() else { return true };
    if output.is_empty() {
        return false;
    }
    let uart = Uart::new(COM2);
    if uart.transmitter_ready() {
        let n = UART_FIFO.min(output.len());
        for byte in output.drain(..n) {
            uart.write_byte_now(byte);
        }
    }
    !output.is_empty()
}

/// The control channel's state on pCPU 0.
pub struct Control {
    line: Vec<u8>,
}

impl Control {
    pub fn new() -> Control {
        Control { line: Vec::new() }
    }

    /// Between pCPU 0's turns: reports a change (the channel's or a manager's) once every pCPU
    /// has switched to it, then runs the commands that have come in (one change at a time: the
    /// next waits for the switch).
    pub fn poll(&mut self, m: &Machine, cpus: usize) {
        // Changes come from managers' hypercalls too: reported with or without a channel.
        if !report_change(m, cpus) || !ENABLED.load(Ordering::Relaxed) {
            return;
        }
        let mut byte = [0u8];
        while m.phases.unreported().is_none() && COM2_INPUT.read(&mut byte) == 1 {
            match byte[0] {
                b'\n' | b'\r' => {
                    let line = core::mem::take(&mut self.line);
                    match core::str::from_utf8(&line) {
                        Ok(text) if text.trim().is_empty() => {}
                        Ok(text) => self.run(m, text),
                        Err(_) => reply_error(None, "", "the request is not UTF-8 text"),
                    }
                }
                b if self.line.len() < MAX_LINE => self.line.push(b),
                _ => {
                    self.line.clear();
                    reply_error(None, "", &alloc::format!("request longer than {MAX_LINE} bytes"));
                }
            }
        }
    }

    /// The run is over: a change still waiting for its switch gets its answer.
    pub fn finish_run(&mut self, m: &Machine) {
        if !report_change(m, crate::smp::online_count()) {
            if let Some((tag, request)) = m.phases.unreported().and_then(|o| o.reply_to) {
                reply_error(tag, &request, "the run ended before every pCPU had run a frame in the new tables");
            }
        }
        // Whatever is left goes out before the machine powers off.
        while pump() {
            core::hint::spin_loop();
        }
    }

    fn run(&mut self, m: &Machine, text: &str) {
        let Request { tag, command } = match parse_request(text) {
            Ok(request) => request,
            Err(e) => return reply_error(tag_of(text), text, &e),
        };
        let reply = || reply_object(tag, text);
        let partition_state =
            |name: &str, p: &crate::partition::Partition| reply().str("partition", name).str("state", p.state()).end();
        let result = match command {
            Command::Status => Ok(status(reply(), m)),
            Command::SetReservation { node, reservation } => {
                let reply_to = Some((tag, text.trim().to_string()));
                match propose(m, reply_to, "control", &node, reservation, |live| {
                    live.with_reservation(&node, reservation)
                }) {
                    // Answered once the change is in force (`report_change`).
                    Ok(_) => return,
                    Err(Refusal::Check(e)) => Err(e.to_string()),
                    Err(Refusal::Busy) => {
                        Err("another change is on its way in; send this one again once it has answered".into())
                    }
                }
            }
            Command::Stop(name) => partition(m, &name)
                .and_then(|p| p.control_stop().map_err(ToString::to_string).map(|()| partition_state(&name, p))),
            Command::Start(name) => {
                partition(m, &name).and_then(|p| p.control_start().map(|()| partition_state(&name, p)))
            }
            Command::Reset(name) => {
                partition(m, &name).and_then(|p| p.control_reset().map(|()| partition_state(&name, p)))
            }
            Command::Revoke(region) => m.shared.revoke(&region, 0, "control").map(|r| {
                reply()
                    .str("region", &r.region)
                    .str_list("unmapped_from", r.unmapped_from.iter().map(|&p| m.partitions[p].name.as_str()))
                    .u64("unmap_cycles", r.unmap_cycles)
                    .u64("shootdown_cycles", r.shootdown_cycles)
                    .end()
            }),
            Command::End => {
                let end = m.end_early(crate::tsc::now(), EndCause::Control);
                Ok(reply().u64("ends_at_ms", ms_since_t0(m, end)).end())
            }
        };
        match result {
            Ok(json) => send(&json, text, None),
            Err(e) => reply_error(tag, text, &e),
        }
    }
}

/// Why a change was not published.
pub enum Refusal {
    /// The config check refused it (or it names what cannot be changed).
    Check(config::ChangeError),
    /// Another change is on its way in.
    Busy,
}

/// Checks a change of `node`'s reservation with `check` (the config check's code, on the
/// config as it runs), plans it, and publishes it as the next epoch of tables, released at a
/// frame boundary ahead; nothing changes when it is refused. Runs where it is asked: between
/// pCPU 0's turns for the control channel, in a manager's own slot for its hypercall (the
/// checking charged to it). Returns the epoch's number.
pub fn propose(
    m: &Machine,
    reply_to: Option<(Option<u64>, String)>,
    requester: &str,
    node: &str,
    reservation: config::Reservation,
    check: impl FnOnce(&config::LiveConfig) -> Result<config::LiveConfig, config::ChangeError>,
) -> Result<u32, Refusal> {
    let request = crate::tsc::now();
    let mut live = m.live.lock();
    if m.phases.unreported().is_some() {
        return Err(Refusal::Busy);
    }
    let next = check(&live).map_err(Refusal::Check)?;
    let tables = next.validated.dispatch.tables.scaled(m.tsc_per_us);
    // Numbered and timed by `publish`.
    let plan = crate::machine::epoch_plan(&next.validated, 0, 0);
    let built = crate::tsc::now();
    let origin = ChangeOrigin {
        reply_to,
        requester: requester.to_string(),
        node: node.to_string(),
        reservation: crate::boot_config::describe(&reservation),
        epoch: 0,
        release: 0,
        request,
        build_cycles: built - request,
    };
    let lead = crate::tsc::us_to_cycles(PHASE_CHANGE_LEAD_US);
    // The old config is freed before the release is chosen: no work after the publication
    // eats into the lead (a pCPU that passes the release late still switches, late).
    let previous = core::mem::replace(&mut *live, next);
    drop(previous);
    let Some((number, _)) = m.phases.publish(tables, lead, plan, origin) else {
        unreachable!("changes are published under the config's lock, after checking that none is unreported")
    };
    Ok(number)
}

/// Once every pCPU has started the unreported change and run a frame in it: the
/// `phase_change` record, and the reply when the control channel asked. `false` while that
/// is still to come; `true` when nothing is left to report.
fn report_change(m: &Machine, cpus: usize) -> bool {
    let Some(w) = m.phases.unreported() else { return true };
    let reports: Vec<crate::phases::SwitchReport> =
        (0..cpus).map(|c| crate::percpu::of(c).phase_switch.lock().clone()).collect();
    if reports.iter().any(|r| r.epoch != w.epoch || !r.first_frame_done) {
        return false;
    }
    // After the first frame (which the skew figure measures): the old tables are freed
    // here, in pCPU 0's own time.
    let settle_start = crate::tsc::now();
    m.phases.settle(cpus);
    let settle_cycles = crate::tsc::now() - settle_start;
    let switch_cycles: Vec<u64> = reports.iter().map(|r| r.cycles).collect();
    let late: Vec<u64> = reports.iter().map(|r| r.late).collect();
    let switched_at = w.release + late.iter().copied().max().unwrap_or(0);
    let figures = ChangeFigures {
        release_ms: ms_since_t0(m, w.release),
        request_to_switch_cycles: switched_at.saturating_sub(w.request),
        change_cycles: w.build_cycles + switch_cycles.iter().sum::<u64>() + settle_cycles,
        on_time: reports.iter().all(|r| r.on_time),
        late,
        skew: first_frame_skew(m, &reports),
        switch_cycles,
        settle_cycles,
    };
    figures.write(&w, Record::new("phase_change")).emit();
    if let Some((tag, request)) = &w.reply_to {
        let reply = figures.write(&w, reply_object(*tag, request)).end();
        send(&reply, request, None);
    }
    m.phases.mark_reported();
    true
}

/// What one phase change took (the `phase_change` record and the reply).
struct ChangeFigures {
    release_ms: u64,
    /// From the request's arrival to the last pCPU's switch.
    request_to_switch_cycles: u64,
    /// Each pCPU's switch, from passing the boundary to the new tables in force.
    switch_cycles: Vec<u64>,
    /// The work of the change on all pCPUs: checking and planning it (pCPU 0), every switch,
    /// settling it (pCPU 0).
    change_cycles: u64,
    /// Every pCPU started the new tables within their first slot.
    on_time: bool,
    /// Per pCPU, how long after the release it started the new tables.
    late: Vec<u64>,
    skew: Option<(u64, u64)>,
    /// pCPU 0 making the new tables the current ones, and freeing the old.
    settle_cycles: u64,
}

impl ChangeFigures {
    fn write<W: core::fmt::Write>(&self, w: &ChangeOrigin, o: JsonObject<W>) -> JsonObject<W> {
        o.u64("epoch", w.epoch as u64)
            .str("requester", &w.requester)
            .str("node", &w.node)
            .str("reservation", &w.reservation)
            .u64("release_ms", self.release_ms)
            .u64("request_to_switch_cycles", self.request_to_switch_cycles)
            .u64("build_cycles", w.build_cycles)
            .u64_list("switch_cycles", self.switch_cycles.iter().copied())
            .u64("switch_cycles_max", self.switch_cycles.iter().copied().max().unwrap_or(0))
            .u64("settle_cycles", self.settle_cycles)
            .u64("change_cycles", self.change_cycles)
            .bool("on_time", self.on_time)
            .u64_list("switch_late_cycles", self.late.iter().copied())
            .u64("first_frame_gang_slots", self.skew.map_or(0, |s| s.0))
            .str("first_frame_skew_max_cycles", &self.skew.map_or("not measured".into(), |s| alloc::format!("{}", s.1)))
    }
}

/// The spread of the first VM entries of each gang slot in the first frame after a switch,
/// across the pCPUs of its partition: (slots measured, the largest spread); `None` when no
/// slot of a partition holding several pCPUs started in that frame.
fn first_frame_skew(m: &Machine, reports: &[crate::phases::SwitchReport]) -> Option<(u64, u64)> {
    if !m.policy.aligned() {
        return None;
    }
    let mut slots: alloc::collections::BTreeMap<(u64, u32), (u64, u64, usize)> = alloc::collections::BTreeMap::new();
    for e in reports.iter().flat_map(|r| r.first_frame.iter()) {
        let s = slots.entry((e.slot_start, e.partition)).or_insert((u64::MAX, 0, 0));
        s.0 = s.0.min(e.entry_tsc);
        s.1 = s.1.max(e.entry_tsc);
        s.2 += 1;
    }
    let spreads: Vec<u64> = slots
        .iter()
        .filter(|((_, p), s)| s.2 == m.pcpus_held(*p as usize) && s.2 > 1)
        .map(|(_, s)| s.1 - s.0)
        .collect();
    (!spreads.is_empty()).then(|| (spreads.len() as u64, spreads.iter().copied().max().unwrap_or(0)))
}

/// A reply's first fields: the request's tag, `ok`, and the request itself.
fn reply_head(tag: Option<u64>, ok: bool, request: &str) -> JsonObject<String> {
    let reply = JsonObject::begin(String::new());
    let reply = match tag {
        Some(tag) => reply.u64("tag", tag),
        None => reply,
    };
    reply.bool("ok", ok).str("request", request.trim())
}

/// An accepted request's reply, its answer's fields to follow.
fn reply_object(tag: Option<u64>, request: &str) -> JsonObject<String> {
    reply_head(tag, true, request)
}

fn reply_error(tag: Option<u64>, request: &str, message: &str) {
    let json = reply_head(tag, false, request).str("error", message).end();
    send(&json, request, Some(message));
}

/// A reply line on its way out on COM2, and a `control_reply` record on the console.
fn send(json: &str, request: &str, error: Option<&str>) {
    {
        let mut output = OUTPUT.lock();
        if output.len() + json.len() < OUTPUT_LIMIT {
            output.extend(json.bytes());
            output.push_back(b'\n');
        }
    }
    let record = Record::new("control_reply").str("request", request.trim()).bool("ok", error.is_none());
    match error {
        Some(message) => record.str("error", message).emit(),
        None => record.emit(),
    }
    pump();
}

/// `@TAG` of a request that did not parse, so that even its error is matched to it.
fn tag_of(text: &str) -> Option<u64> {
    text.split_whitespace().next()?.strip_prefix('@')?.parse().ok()
}

fn partition<'m>(m: &'m Machine, name: &str) -> Result<&'m crate::partition::Partition, String> {
    m.partitions.iter().find(|p| p.name == name).ok_or_else(|| {
        let names: Vec<&str> = m.partitions.iter().map(|p| p.name.as_str()).collect();
        alloc::format!("no partition is named \"{name}\" (the config has: {})", names.join(", "))
    })
}

fn ms_since_t0(m: &Machine, tsc: u64) -> u64 {
    crate::tsc::cycles_to_us(tsc.saturating_sub(m.schedule.t0)) / 1000
}

/// The `status` reply: the machine's epoch of tables, and per partition its state,
/// reservation, what it has had of its pCPUs so far, its progress and its spin-wait figure.
fn status(reply: JsonObject<String>, m: &Machine) -> String {
    let now = crate::tsc::now();
    let elapsed = now.saturating_sub(m.schedule.t0).max(1);
    let live = m.live.lock();
    let config = &live.validated.config;
    let flat = live.validated.tree.flatten();
    let mut partitions = String::from("[");
    for (p, pc) in m.partitions.iter().zip(&config.partitions) {
        let guest: u64 = p.vcpu_run_cycles.iter().map(|c| c.load(Ordering::Relaxed)).sum();
        let capacity = elapsed * m.pcpus_held(p.id) as u64;
        let requested = flat.iter().find(|f| f.id as usize == p.id).map_or(0, |f| f.reservation.ppm());
        let iterations = (0..p.vcpus).map(|v| p.guest_stats(v).iterations).max().unwrap_or(0);
        let pause_loop_exits = p.pause_loop_exits.load(Ordering::Relaxed);
        let spin = m
            .controls
            .pause_loop_exiting()
            .then(|| (pause_loop_exits * vmx::control_set::PLE_WINDOW) as f64 * 100.0 / guest.max(1) as f64);
        if partitions.len() > 1 {
            partitions.push(',');
        }
        let object = JsonObject::begin(core::mem::take(&mut partitions))
            .str("name", &p.name)
            .str("state", p.state())
            .str("group", pc.group.as_deref().unwrap_or(""))
            .str("reservation", &crate::boot_config::describe(&pc.reservation))
            .fmt("requested_pct", format_args!("{:.2}", requested as f64 / 10_000.0))
            .fmt("guest_share_pct", format_args!("{:.2}", guest as f64 * 100.0 / capacity as f64))
            .u64("guest_cycles", guest)
            .u64("iterations", iterations)
            .u64("pause_loop_exits", pause_loop_exits)
            .str("spin_waste_hv_pct", &spin.map_or("not measured".into(), |s| alloc::format!("{s:.2}")))
            .u64("resets", p.resets.load(Ordering::Relaxed));
        partitions = object.end();
    }
    partitions.push(']');
    let mut groups = String::from("[");
    for g in config.groups.iter() {
        if groups.len() > 1 {
            groups.push(',');
        }
        groups = JsonObject::begin(core::mem::take(&mut groups))
            .str("name", &g.name)
            .str("parent", g.parent.as_deref().unwrap_or(""))
            .str("reservation", &crate::boot_config::describe(&g.reservation))
            .end();
    }
    groups.push(']');
    reply
        .u64("t_ms", ms_since_t0(m, now))
        .u64("epoch", m.phases.current().number as u64)
        .str("policy", m.policy.as_str())
        .u64("major_frame_us", config.hypervisor.major_frame_us)
        .raw("partitions", &partitions)
        .raw("groups", &groups)
        .end()
}
