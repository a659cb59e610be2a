//! Device interrupts the partitions own: the one table the hypervisor programs the physical
//! IO-APIC from and demultiplexes arriving interrupts by. Each owned IRQ gets its own host
//! vector (so the vector alone names the IRQ and its owner) and is aimed at the pCPU that is
//! home to the owner's vCPU 0, where Linux points its IO-APIC entries first: the interrupt
//! then usually arrives where the vCPU it is for runs. Built from the validated config and the
//! dispatch plan's homes, by `check` and at boot alike.

use alloc::vec::Vec;

use crate::dispatch_plan::PlanFailure;
use crate::Config;

/// The host vectors device interrupts arrive on (the hypervisor's own are below 0x50).
pub const DEVICE_VECTOR_FIRST: u8 = 0x50;
pub const DEVICE_VECTOR_LAST: u8 = 0xEF;

/// One owned IRQ: where it arrives and whose it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IrqRoute {
    /// The IRQ (ISA IRQ, or GSI above 15) as the config names it.
    pub irq: u32,
    /// The owner (index in `config.partitions`).
    pub partition: usize,
    /// The host vector the physical IO-APIC delivers it as.
    pub vector: u8,
    /// The pCPU it is delivered to.
    pub pcpu: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IrqPlan {
    routes: Vec<IrqRoute>,
}

impl IrqPlan {
    /// Every IRQ the config's partitions own, in partition order, one vector each.
    /// `homes[p][v]`: the pCPU of partition p's vCPU v (the dispatch plan's).
    pub fn new(config: &Config, homes: &[Vec<usize>]) -> Result<IrqPlan, PlanFailure> {
        let capacity = (DEVICE_VECTOR_LAST - DEVICE_VECTOR_FIRST) as usize + 1;
        let mut routes = Vec::new();
        for (partition, p) in config.partitions.iter().enumerate() {
            for &irq in &p.devices.irqs {
                if routes.len() == capacity {
                    return Err(PlanFailure {
                        partition: Some(partition),
                        field: "devices.irqs",
                        message: alloc::format!(
                            "the partitions own more than {capacity} device IRQs, one host vector each"
                        ),
                    });
                }
                let vector = DEVICE_VECTOR_FIRST + routes.len() as u8;
                let pcpu = homes.get(partition).and_then(|h| h.first()).copied().unwrap_or(p.pcpus[0] as usize);
                routes.push(IrqRoute { irq, partition, vector, pcpu });
            }
        }
        Ok(IrqPlan { routes })
    }

    pub fn routes(&self) -> &[IrqRoute] {
        &self.routes
    }

    /// The IRQ a host vector belongs to, if it is a device vector in use.
    pub fn by_vector(&self, vector: u8) -> Option<&IrqRoute> {
        let index = vector.checked_sub(DEVICE_VECTOR_FIRST)? as usize;
        self.routes.get(index)
    }

    /// Its position in `routes` (per-IRQ state is kept in this order).
    pub fn index_of_vector(&self, vector: u8) -> Option<usize> {
        let index = vector.checked_sub(DEVICE_VECTOR_FIRST)? as usize;
        (index < self.routes.len()).then_some(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Config, Devices};

    /// A config whose partition p owns `irqs[p]`, with partition p's vCPU 0 homed on pCPU
    /// `homes[p]`.
    fn plan(irqs: &[&[u32]], homes: &[usize]) -> Result<IrqPlan, PlanFailure> {
        let text = irqs
            .iter()
            .enumerate()
            .map(|(p, _)| {
                alloc::format!(
                    "[[partition]]\nname = \"p{p}\"\nvcpus = 1\npcpus = [{}]\nmemory_mb = 16\n\
                     reservation = {{ weight = 1 }}\nguest = {{ module = \"testguest\" }}\n",
                    homes[p]
                )
            })
            .collect::<alloc::string::String>();
        let text = alloc::format!("[hypervisor]\nmajor_frame_us = 10000\n\n{text}");
        let mut config: Config = crate::load("irqs.toml", &text, None).expect("a valid config").config;
        for (p, owned) in irqs.iter().enumerate() {
            config.partitions[p].devices = Devices { irqs: owned.to_vec(), ..Devices::default() };
        }
        let homes: Vec<Vec<usize>> = homes.iter().map(|&h| alloc::vec![h]).collect();
        IrqPlan::new(&config, &homes)
    }

    #[test]
    fn each_owned_irq_gets_its_own_vector_aimed_at_its_owners_first_vcpu() {
        let p = plan(&[&[3, 5], &[], &[7]], &[1, 0, 2]).unwrap();
        let routes: Vec<(u32, usize, u8, usize)> =
            p.routes().iter().map(|r| (r.irq, r.partition, r.vector, r.pcpu)).collect();
        assert_eq!(routes, [(3, 0, 0x50, 1), (5, 0, 0x51, 1), (7, 2, 0x52, 2)]);
        assert_eq!(p.by_vector(0x52).map(|r| r.irq), Some(7));
        assert_eq!(p.index_of_vector(0x51), Some(1));
        for unused in [0x41, 0x4F, 0x53, 0xFF] {
            assert_eq!(p.by_vector(unused), None, "{unused:#x}");
        }
    }

    #[test]
    fn more_irqs_than_device_vectors_are_refused_at_the_partition_that_tips_it_over() {
        let many: Vec<u32> = (0..100).collect();
        let more: Vec<u32> = (100..161).collect();
        let e = plan(&[&many, &more], &[0, 0]).unwrap_err();
        assert_eq!((e.partition, e.field), (Some(1), "devices.irqs"));
        assert!(e.message.contains("160"), "{}", e.message);
        let fits: Vec<u32> = (100..160).collect();
        assert_eq!(plan(&[&many, &fits], &[0, 0]).unwrap().routes().last().map(|r| r.vector), Some(DEVICE_VECTOR_LAST));
    }
}
