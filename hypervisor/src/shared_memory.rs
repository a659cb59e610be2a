//! Shared memory regions (`[[shared]]`, docs/control.md): host memory its owner partition
//! shares with readers and writers, mapped by EPT at one guest-physical address in each, and
//! revoked at run time (HiRes' alias/remove, with EPT as the mechanism). Revoking unmaps the
//! region from every partition but its owner and then makes every pCPU drop its cached
//! translations (INVEPT) before the revoke completes: the revoker asks each pCPU through a
//! generation number and a kick, each pCPU invalidates the EPTs of the partitions homed on it
//! before its next VM entry (the kick makes its guest exit; between turns and when its idle
//! loop wakes it looks too), and the revoker waits for all of them. A guest that touches the region afterwards takes an EPT violation: its partition is
//! stopped or reset, as its `on_fault` says.

extern crate alloc;

use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use spin::Mutex;

use config::{ChangeError, Placement, SharedRegion, Validated};
use ept::{Access, Ept, MemoryType, PageSizes};

use crate::machine::{HeapFrames, IdentityPhys, Machine};
use crate::partition::Partition;

/// How long a revoke waits for every pCPU's invalidation (a pCPU in a guest is kicked out at
/// once; one whose guest keeps interrupts off under Bochs leaves at its slot's end).
const SHOOTDOWN_TIMEOUT_US: u64 = 1_000_000;

/// The invalidation requested last (a generation number; 0: none yet).
static SHOOTDOWN_REQUESTED: AtomicU64 = AtomicU64::new(0);

struct Region {
    config: SharedRegion,
    revoked: AtomicBool,
}

pub struct SharedMemory {
    regions: Vec<Region>,
    /// Per partition, its EPT (changed only by a revoke, under this lock).
    epts: Vec<Mutex<&'static mut Ept>>,
}

/// What a revoke did.
pub struct Revoked {
    pub region: String,
    /// The partitions it was unmapped from.
    pub unmapped_from: Vec<usize>,
    /// Unmapping, then the invalidation on every pCPU (request to the last one's answer).
    pub unmap_cycles: u64,
    pub shootdown_cycles: u64,
}

impl SharedMemory {
    /// Clears each region's host memory and maps it into its owner (read-write), writers
    /// (read-write) and readers (read-only) at its guest-physical address.
    pub fn map(validated: &Validated, epts: &mut Vec<&'static mut Ept>, sizes: PageSizes) -> Result<Self, String> {
        let mut regions = Vec::new();
        for (config, placement) in validated.config.shared.iter().zip(&validated.shared_memory) {
            let Placement::At(host) = placement.clone() else { unreachable!("placed with the boot's memory map") };
            // SAFETY: host memory validation placed for this region alone, inside usable RAM
            // that no partition and nothing of the hypervisor owns; cleared so that nothing of
            // an earlier occupant shows through.
            unsafe { core::ptr::write_bytes(host.start as *mut u8, 0, (host.end - host.start) as usize) };
            let read_write = Access::READ | Access::WRITE;
            for (partition, access) in core::iter::once((config.owner, read_write))
                .chain(config.aliases().map(|(p, writes)| (p, if writes { read_write } else { Access::READ })))
            {
                epts[partition]
                    .map(
                        &mut IdentityPhys,
                        &mut HeapFrames,
                        config.gpa,
                        host.start,
                        config.size,
                        access,
                        MemoryType::WriteBack,
                        sizes,
                    )
                    .map_err(|e| alloc::format!("{} in partition {partition}: {e}", config.name))?;
            }
            regions.push(Region { config: config.clone(), revoked: AtomicBool::new(false) });
        }
        let epts = epts.drain(..).map(Mutex::new).collect();
        Ok(SharedMemory { regions, epts })
    }

    /// The region `name`, if the config has one.
    fn find(&self, name: &str) -> Result<&Region, String> {
        self.regions.iter().find(|r| r.config.name == name).ok_or_else(|| {
            let names: Vec<&str> = self.regions.iter().map(|r| r.config.name.as_str()).collect();
            alloc::format!("no [[shared]] region is named \"{name}\" (the config has: {})", names.join(", "))
        })
    }

    /// Revokes region `name`: unmapped from every partition but its owner, and every pCPU's
    /// cached translations dropped before this returns. `cpu` is the pCPU doing it,
    /// `requester` who asked (`control`, the owner or its group's manager); a `shared_revoke` record says what
    /// it did.
    pub fn revoke(&self, name: &str, cpu: usize, requester: &str) -> Result<Revoked, String> {
        let result = self.revoke_now(name, cpu);
        let record = crate::console::Record::new("shared_revoke").str("region", name).str("requester", requester);
        match &result {
            Ok(r) => {
                let m = crate::machine::machine();
                record
                    .str_list("unmapped_from", r.unmapped_from.iter().map(|&p| m.partitions[p].name.as_str()))
                    .u64("unmap_cycles", r.unmap_cycles)
                    .u64("shootdown_cycles", r.shootdown_cycles)
                    .emit()
            }
            Err(e) => record.str("error", e).emit(),
        }
        result
    }

    fn revoke_now(&self, name: &str, cpu: usize) -> Result<Revoked, String> {
        let region = self.find(name)?;
        if region.revoked.swap(true, Ordering::AcqRel) {
            return Err(alloc::format!("\"{name}\" is already revoked"));
        }
        let start = crate::tsc::now();
        let mut unmapped_from = Vec::new();
        for (partition, _) in region.config.aliases() {
            self.epts[partition]
                .lock()
                .unmap(&mut IdentityPhys, &mut HeapFrames, region.config.gpa, region.config.size)
                .map_err(|e| alloc::format!("\"{name}\" in partition {partition}: {e}"))?;
            unmapped_from.push(partition);
        }
        let unmapped = crate::tsc::now();
        shoot_down(cpu)?;
        Ok(Revoked {
            region: name.into(),
            unmapped_from,
            unmap_cycles: unmapped - start,
            shootdown_cycles: crate::tsc::now() - unmapped,
        })
    }
}

/// `HYPERCALL_REVOKE_SHARED` from `caller`: revokes the region at `gpa` it owns (`child` 0)
/// or that child `child - 1` of the group it manages owns (`config::LiveConfig::revocable_region`
/// says which); the result for RAX.
pub fn revoke_by_hypercall(m: &Machine, caller: &Partition, gpa: u64, child: u64) -> u64 {
    use firmware::longmode::*;
    let child = child.checked_sub(1).map(|c| usize::try_from(c).unwrap_or(usize::MAX));
    let region = {
        let live = m.live.lock();
        live.revocable_region(&caller.name, gpa, child).map(|r| live.validated.config.shared[r].name.clone())
    };
    match region {
        Err(ChangeError::NotAManager(_)) => DELEGATION_NOT_A_MANAGER,
        Err(ChangeError::NoSuchChild { .. }) => DELEGATION_NO_SUCH_CHILD,
        Err(_) => DELEGATION_NOT_OWNER,
        Ok(region) => match m.shared.revoke(&region, crate::cpu::current_index(), &caller.name) {
            Ok(_) => DELEGATION_OK,
            Err(e) if e.contains("already revoked") => DELEGATION_ALREADY_REVOKED,
            // The shootdown did not complete (the `shared_revoke` record says where).
            Err(_) => DELEGATION_REFUSED,
        },
    }
}

/// Asks every pCPU to drop its cached EPT translations, does it here, and waits until each
/// has (`Err` names those that did not answer in time).
fn shoot_down(cpu: usize) -> Result<(), String> {
    let generation = SHOOTDOWN_REQUESTED.fetch_add(1, Ordering::AcqRel) + 1;
    let cpus = crate::smp::online_count();
    for other in (0..cpus).filter(|&c| c != cpu) {
        crate::apic::send_fixed(crate::cpu::apic_id_of(other), crate::vectors::KICK_VECTOR);
    }
    follow(cpu);
    let deadline = crate::tsc::now() + crate::tsc::us_to_cycles(SHOOTDOWN_TIMEOUT_US);
    loop {
        let late: Vec<usize> =
            (0..cpus).filter(|&c| crate::percpu::of(c).invept_done.load(Ordering::Acquire) < generation).collect();
        if late.is_empty() {
            return Ok(());
        }
        if crate::tsc::now() > deadline {
            return Err(alloc::format!("pCPUs {late:?} did not drop their cached translations"));
        }
        // Another pCPU revoking at the same time waits for this one too.
        follow(cpu);
        core::hint::spin_loop();
    }
}

/// On pCPU `cpu`, between turns, after a host interrupt (the revoker's kick) stopped its
/// guest, and when idle: an invalidation asked for since the last one is done (INVEPT for
/// each partition homed here). Two atomic loads otherwise.
#[inline]
pub fn follow(cpu: usize) {
    let requested = SHOOTDOWN_REQUESTED.load(Ordering::Acquire);
    let done = &crate::percpu::of(cpu).invept_done;
    if done.load(Ordering::Relaxed) >= requested {
        return;
    }
    let m = crate::machine::machine();
    let single = m.controls.paths.invept_single_context;
    let homed = m.homes.iter().enumerate().filter(|(_, homes)| homes.contains(&cpu)).map(|(p, _)| p);
    for partition in homed {
        crate::vmcs::invept(m.partitions[partition].context.eptp, single);
    }
    done.store(requested, Ordering::Release);
}
