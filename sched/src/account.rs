//! Accounting: every tick a pCPU spends is charged to exactly one account: a partition's guest
//! time, hypervisor work done on a partition's behalf, or the hypervisor's own idle/overhead.
//! Account ids are dense and resolved at plan time, so a charge is an array add.

use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use crate::spec::{PartitionId, PartitionSpec, Tick};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccountId(pub u32);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountKind {
    /// Idle time and overhead not attributable to any partition.
    Hypervisor,
    Guest(PartitionId),
    /// VM-exit handling, interrupt demux, switch cost done for this partition.
    HypervisorFor(PartitionId),
}

/// Maps partitions to dense account ids: 0 = hypervisor, then (guest, hypervisor-for) pairs.
#[derive(Debug, Clone)]
pub struct AccountMap {
    ids: Vec<PartitionId>,
}

impl AccountMap {
    pub const HYPERVISOR: AccountId = AccountId(0);

    pub fn new(parts: &[PartitionSpec]) -> Self {
        let mut ids: Vec<PartitionId> = parts.iter().map(|p| p.id).collect();
        ids.sort_unstable();
        ids.dedup();
        AccountMap { ids }
    }
    pub fn len(&self) -> usize {
        1 + 2 * self.ids.len()
    }
    pub fn is_empty(&self) -> bool {
        false
    }
    pub fn guest(&self, p: PartitionId) -> Option<AccountId> {
        self.ids.binary_search(&p).ok().map(|i| AccountId(1 + 2 * i as u32))
    }
    pub fn hypervisor_for(&self, p: PartitionId) -> Option<AccountId> {
        self.ids.binary_search(&p).ok().map(|i| AccountId(2 + 2 * i as u32))
    }
    pub fn kind(&self, a: AccountId) -> Option<AccountKind> {
        if a.0 == 0 {
            return Some(AccountKind::Hypervisor);
        }
        let i = ((a.0 - 1) / 2) as usize;
        let p = *self.ids.get(i)?;
        Some(if a.0 % 2 == 1 { AccountKind::Guest(p) } else { AccountKind::HypervisorFor(p) })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChargeError {
    UnknownPcpu { pcpu: usize },
    UnknownAccount { account: AccountId },
    /// `start` is not where the previous charge on this pCPU ended: ticks would be lost (gap)
    /// or counted twice (overlap).
    NotContiguous { pcpu: usize, expected_start: Tick, start: Tick },
    Backwards { pcpu: usize, start: Tick, end: Tick },
}

impl fmt::Display for ChargeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChargeError::UnknownPcpu { pcpu } => write!(f, "charge: no pCPU {pcpu}"),
            ChargeError::UnknownAccount { account } => write!(f, "charge: no account {}", account.0),
            ChargeError::NotContiguous { pcpu, expected_start, start } => write!(
                f,
                "charge on pCPU {pcpu}: interval starts at {start} but the last one ended at {expected_start}"
            ),
            ChargeError::Backwards { pcpu, start, end } => {
                write!(f, "charge on pCPU {pcpu}: interval [{start}, {end}) runs backwards")
            }
        }
    }
}

/// Per-account totals plus, per pCPU, where its charges have reached; charges on a pCPU must be
/// contiguous, so the totals always sum to the elapsed time exactly.
#[derive(Debug, Clone)]
pub struct Ledger {
    totals: Vec<Tick>,
    charged_until: Vec<Tick>,
    start: Tick,
}

impl Ledger {
    pub fn new(accounts: usize, pcpus: usize, start: Tick) -> Self {
        Ledger { totals: vec![0; accounts], charged_until: vec![start; pcpus], start }
    }

    pub fn charge(&mut self, pcpu: usize, start: Tick, end: Tick, account: AccountId) -> Result<(), ChargeError> {
        let until = self.charged_until.get_mut(pcpu).ok_or(ChargeError::UnknownPcpu { pcpu })?;
        if end < start {
            return Err(ChargeError::Backwards { pcpu, start, end });
        }
        if start != *until {
            return Err(ChargeError::NotContiguous { pcpu, expected_start: *until, start });
        }
        let total = self.totals.get_mut(account.0 as usize).ok_or(ChargeError::UnknownAccount { account })?;
        *total += end - start;
        *until = end;
        Ok(())
    }

    pub fn total(&self, account: AccountId) -> Tick {
        self.totals.get(account.0 as usize).copied().unwrap_or(0)
    }
    pub fn charged_until(&self, pcpu: usize) -> Tick {
        self.charged_until[pcpu]
    }
    /// Sum over accounts; equals the sum over pCPUs of `charged_until - start`.
    pub fn sum(&self) -> Tick {
        self.totals.iter().sum()
    }
    pub fn elapsed(&self) -> Tick {
        self.charged_until.iter().map(|&u| u - self.start).sum()
    }
}
