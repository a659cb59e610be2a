//! Application processors: INIT-SIPI-SIPI start-up through the real-mode trampoline, and a
//! per-CPU mailbox through which the BSP hands each AP work during bring-up.

extern crate alloc;

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::boot::AP_TRAMPOLINE_BASE;
use crate::cpu::MAX_CPUS;

const AP_STACK_SIZE: usize = 64 * 1024;

static ONLINE_COUNT: AtomicUsize = AtomicUsize::new(1);

pub fn online_count() -> usize {
    ONLINE_COUNT.load(Ordering::Acquire)
}

pub fn is_online(cpu: usize) -> bool {
    cpu == 0 || crate::percpu::of(cpu).mailbox.online.load(Ordering::Acquire)
}

/// Outcome of starting one AP.
pub struct ApStart {
    pub cpu: usize,
    pub apic_id: u32,
    pub online: bool,
    /// TSC cycles from INIT to the AP reporting in.
    pub cycles: u64,
}

/// Starts every AP in `apic_ids[1..]` (index = pCPU number), one at a time.
pub fn start_aps(apic_ids: &[u32]) -> Vec<ApStart> {
    let (code, params_offset) = crate::boot::ap_trampoline();
    // SAFETY: low memory below 1 MiB is reserved from every allocator for the trampoline;
    // it is identity-mapped and no other CPU runs yet.
    unsafe {
        core::ptr::copy_nonoverlapping(code.as_ptr(), AP_TRAMPOLINE_BASE as *mut u8, code.len());
    }
    let params = (AP_TRAMPOLINE_BASE + params_offset as u64) as *mut u64;
    let mut results = Vec::new();
    for (cpu, &apic_id) in apic_ids.iter().enumerate().skip(1).take(MAX_CPUS - 1) {
        let stack: &'static mut [u8] = alloc::boxed::Box::leak(alloc::vec![0u8; AP_STACK_SIZE].into_boxed_slice());
        let stack_top = (stack.as_ptr() as u64 + AP_STACK_SIZE as u64) & !0xF;
        // SAFETY: the parameter block inside the copied trampoline; the previous AP has
        // already read its copy (we wait for it to come online before the next start).
        unsafe {
            params.write_volatile(crate::boot::boot_page_table());
            params.add(1).write_volatile(stack_top);
            params.add(2).write_volatile(ap_main as extern "C" fn(u64) -> ! as usize as u64);
            params.add(3).write_volatile(cpu as u64);
        }
        let start = crate::tsc::now();
        crate::apic::send_init(apic_id);
        crate::tsc::delay_us(10_000);
        let vector = (AP_TRAMPOLINE_BASE >> 12) as u8;
        crate::apic::send_startup(apic_id, vector);
        crate::tsc::delay_us(200);
        if !wait_online(cpu, 1_000) {
            crate::apic::send_startup(apic_id, vector);
        }
        let online = wait_online(cpu, 100_000);
        if online {
            ONLINE_COUNT.fetch_add(1, Ordering::AcqRel);
        }
        results.push(ApStart { cpu, apic_id, online, cycles: crate::tsc::now() - start });
    }
    results
}

fn wait_online(cpu: usize, us: u64) -> bool {
    let deadline = crate::tsc::now() + crate::tsc::us_to_cycles(us);
    while crate::tsc::now() < deadline {
        if crate::percpu::of(cpu).mailbox.online.load(Ordering::Acquire) {
            return true;
        }
        core::hint::spin_loop();
    }
    false
}

/// First Rust code on an AP (called by the trampoline on its own stack).
extern "C" fn ap_main(cpu: u64) -> ! {
    let cpu = cpu as usize;
    crate::cpu::init_this_cpu();
    crate::interrupts::load_idt();
    crate::apic::init_this_cpu();
    let mailbox = &crate::percpu::of(cpu).mailbox;
    mailbox.online.store(true, Ordering::Release);
    let mut seen = 0;
    loop {
        let posted = mailbox.posted.load(Ordering::Acquire);
        if posted == seen {
            core::hint::spin_loop();
            continue;
        }
        seen = posted;
        let work = mailbox.work.load(Ordering::Acquire);
        // SAFETY: `post` only stores addresses of `fn(usize)` items.
        let work: fn(usize) = unsafe { core::mem::transmute::<usize, fn(usize)>(work) };
        work(cpu);
        mailbox.done.store(seen, Ordering::Release);
    }
}

/// Hands `work` to an online AP; returns at once.
pub fn post(cpu: usize, work: fn(usize)) {
    let mailbox = &crate::percpu::of(cpu).mailbox;
    mailbox.work.store(work as usize, Ordering::Release);
    mailbox.posted.fetch_add(1, Ordering::AcqRel);
}

/// Waits until the AP has finished the work last posted to it.
pub fn wait(cpu: usize) {
    let mailbox = &crate::percpu::of(cpu).mailbox;
    while mailbox.done.load(Ordering::Acquire) != mailbox.posted.load(Ordering::Acquire) {
        core::hint::spin_loop();
    }
}

/// Waits up to `us` microseconds for the AP to finish its posted work.
pub fn wait_timeout(cpu: usize, us: u64) -> bool {
    let mailbox = &crate::percpu::of(cpu).mailbox;
    let deadline = crate::tsc::now() + crate::tsc::us_to_cycles(us);
    while mailbox.done.load(Ordering::Acquire) != mailbox.posted.load(Ordering::Acquire) {
        if crate::tsc::now() > deadline {
            return false;
        }
        core::hint::spin_loop();
    }
    true
}

/// How long a bring-up step may take on an AP before that AP is declared stopped.
const STEP_TIMEOUT_US: u64 = 2_000_000;

/// Runs `work` on every online CPU, the BSP included, and waits for all of them; returns
/// the APs that did not finish in time (an AP stopped by an exception never answers).
pub fn run_on_all(cpus: usize, work: fn(usize)) -> Vec<usize> {
    run_on_all_within(cpus, work, STEP_TIMEOUT_US)
}

/// As `run_on_all`, for work that takes up to `timeout_us` (measured after the BSP's part).
pub fn run_on_all_within(cpus: usize, work: fn(usize), timeout_us: u64) -> Vec<usize> {
    for cpu in 1..cpus {
        if is_online(cpu) {
            post(cpu, work);
        }
    }
    work(0);
    (1..cpus).filter(|&cpu| is_online(cpu) && !wait_timeout(cpu, timeout_us)).collect()
}

/// TSC synchronisation between the BSP and one AP, by ping-pong on a shared line.
pub struct TscSync {
    pub cpu: usize,
    /// AP TSC minus the midpoint of the BSP's bracket, at the tightest round trip.
    pub offset: i64,
    /// That tightest round trip, in cycles: the measurement's uncertainty is half of it.
    pub round_trip: u64,
}

static PING: AtomicU64 = AtomicU64::new(0);
static PONG_TSC: AtomicU64 = AtomicU64::new(0);
const SYNC_ROUNDS: u64 = 64;

fn tsc_sync_ap_side(_cpu: usize) {
    for round in 0..SYNC_ROUNDS {
        while PING.load(Ordering::Acquire) != round * 2 + 1 {
            core::hint::spin_loop();
        }
        PONG_TSC.store(crate::tsc::now(), Ordering::Relaxed);
        PING.store(round * 2 + 2, Ordering::Release);
    }
}

pub fn check_tsc_sync(cpu: usize) -> TscSync {
    PING.store(0, Ordering::Release);
    post(cpu, tsc_sync_ap_side);
    let mut best = TscSync { cpu, offset: 0, round_trip: u64::MAX };
    for round in 0..SYNC_ROUNDS {
        let before = crate::tsc::now();
        PING.store(round * 2 + 1, Ordering::Release);
        while PING.load(Ordering::Acquire) != round * 2 + 2 {
            core::hint::spin_loop();
        }
        let after = crate::tsc::now();
        let theirs = PONG_TSC.load(Ordering::Relaxed);
        let round_trip = after - before;
        if round_trip < best.round_trip {
            best.round_trip = round_trip;
            best.offset = theirs as i64 - (before + round_trip / 2) as i64;
        }
    }
    wait(cpu);
    best
}
