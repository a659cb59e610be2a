//! Delegation (HiRes): the partition a group names as its `manager` reads what the group holds
//! and re-divides it among the group's children by hypercall (`firmware::longmode`'s
//! `HYPERCALL_GROUP_INFO` and `HYPERCALL_SET_CHILD_RESERVATION`, from the guest's kernel;
//! docs/control.md). A change goes through the config check's own code on the config as it
//! runs, restricted to the group's children (`config::LiveConfig::with_child_reservation`:
//! the group cannot give out more than it holds, nothing outside it can be named), and is
//! published as the next epoch of dispatch tables like a control-channel change. The check
//! runs in the manager's own slot, as its exit handling: the manager pays for it.

extern crate alloc;

use alloc::string::ToString;
use config::Reservation;
use firmware::longmode::*;

use crate::console::Record;
use crate::control::{propose, Refusal};
use crate::machine::Machine;
use crate::partition::Partition;

/// `HYPERCALL_GROUP_INFO`: (RAX, RBX, RCX, RDX) for the guest.
pub fn group_info(m: &Machine, partition: &Partition) -> [u64; 4] {
    let live = m.live.lock();
    match live.managed_by(&partition.name) {
        Some((group, children)) => [
            DELEGATION_OK,
            live.group_capacity_us(group),
            children.len() as u64,
            live.validated.config.hypervisor.major_frame_us,
        ],
        None => [DELEGATION_NOT_A_MANAGER, 0, 0, 0],
    }
}

/// `HYPERCALL_SET_CHILD_RESERVATION`: (RAX, RBX) for the guest; a `delegation` record says
/// what was asked and what came of it.
pub fn set_child_reservation(m: &Machine, partition: &Partition, child: u64, kind: u64, a: u64, b: u64) -> [u64; 2] {
    let reservation = match (kind, u32::try_from(a)) {
        (RESERVATION_HARD, _) => Some(Reservation::Hard { budget_us: a, period_us: b }),
        (RESERVATION_FIXED_SHARE, Ok(percent)) => Some(Reservation::FixedShare { percent }),
        (RESERVATION_WEIGHT, Ok(weight)) => Some(Reservation::Weight(weight)),
        _ => None,
    };
    let Some(reservation) = reservation else {
        delegation_record(partition, child, None, None, DELEGATION_BAD_KIND, Err("unknown kind of reservation"));
        return [DELEGATION_BAD_KIND, 0];
    };
    let node = {
        let live = m.live.lock();
        live.managed_by(&partition.name).and_then(|(_, children)| children.get(child as usize).map(|c| c.to_string()))
    };
    let index = child as usize;
    let outcome = propose(m, None, &partition.name, node.as_deref().unwrap_or(""), reservation, |live| {
        live.with_child_reservation(&partition.name, index, reservation)
    });
    let (answer, result) = match outcome {
        Ok(epoch) => ([DELEGATION_OK, epoch as u64], Ok(epoch)),
        Err(refusal) => {
            let (code, error) = match refusal {
                Refusal::Busy => (DELEGATION_BUSY, "another change is on its way in".to_string()),
                Refusal::Check(e @ config::ChangeError::NotAManager(_)) => (DELEGATION_NOT_A_MANAGER, e.to_string()),
                Refusal::Check(e @ config::ChangeError::NoSuchChild { .. }) => {
                    (DELEGATION_NO_SUCH_CHILD, e.to_string())
                }
                Refusal::Check(e) => (DELEGATION_REFUSED, e.to_string()),
            };
            ([code, 0], Err(error))
        }
    };
    // Written after the work: a record holds the console while it is built.
    match &result {
        Ok(epoch) => delegation_record(partition, child, Some(&reservation), node.as_deref(), answer[0], Ok(*epoch)),
        Err(error) => delegation_record(partition, child, Some(&reservation), node.as_deref(), answer[0], Err(error)),
    }
    answer
}

/// The `delegation` record of one `HYPERCALL_SET_CHILD_RESERVATION`.
fn delegation_record(
    manager: &Partition,
    child: u64,
    reservation: Option<&Reservation>,
    node: Option<&str>,
    code: u64,
    result: Result<u32, &str>,
) {
    let described = reservation.map(crate::boot_config::describe);
    let record = Record::new("delegation")
        .str("manager", &manager.name)
        .u64("child", child)
        .str("reservation", described.as_deref().unwrap_or(""))
        .str("node", node.unwrap_or(""))
        .u64("result", code);
    match result {
        Ok(epoch) => record.u64("epoch", epoch as u64).emit(),
        Err(error) => record.str("error", error).emit(),
    }
}
