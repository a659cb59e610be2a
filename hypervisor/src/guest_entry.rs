//! The VM entry/exit stub: loads the guest's general registers and FPU/SSE state, enters the
//! guest, and on the next VM exit saves them back and restores the host's. Hand-written
//! assembly because nothing else can run between VMLAUNCH/VMRESUME and the exit.

use core::arch::global_asm;

/// Guest general-purpose registers not kept in the VMCS, plus the FXSAVE areas the stub
/// switches. The assembly below addresses the fields through `offset_of!` constants, so a
/// change to this struct cannot leave it reading the wrong slot.
#[repr(C)]
#[derive(Debug, Default)]
pub struct GuestRegs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    /// 512-byte, 16-aligned FXSAVE area holding the guest's x87/SSE state while it is out.
    pub guest_fx: u64,
    /// Scratch FXSAVE area for the host's state while the guest runs.
    pub host_fx: u64,
}

impl GuestRegs {
    /// A general register by its x86 encoding number except RSP (4), which lives in the VMCS.
    pub fn gpr(&self, index: u8) -> &u64 {
        match index {
            0 => &self.rax,
            1 => &self.rcx,
            2 => &self.rdx,
            3 => &self.rbx,
            5 => &self.rbp,
            6 => &self.rsi,
            7 => &self.rdi,
            8 => &self.r8,
            9 => &self.r9,
            10 => &self.r10,
            11 => &self.r11,
            12 => &self.r12,
            13 => &self.r13,
            14 => &self.r14,
            _ => &self.r15,
        }
    }

    pub fn gpr_mut(&mut self, index: u8) -> &mut u64 {
        match index {
            0 => &mut self.rax,
            1 => &mut self.rcx,
            2 => &mut self.rdx,
            3 => &mut self.rbx,
            5 => &mut self.rbp,
            6 => &mut self.rsi,
            7 => &mut self.rdi,
            8 => &mut self.r8,
            9 => &mut self.r9,
            10 => &mut self.r10,
            11 => &mut self.r11,
            12 => &mut self.r12,
            13 => &mut self.r13,
            14 => &mut self.r14,
            _ => &mut self.r15,
        }
    }
}

global_asm!(
    r#"
.section .text
.global vmx_run
/* u64 vmx_run(GuestRegs *regs, u64 launched): 0 after a VM exit, 1 if the entry failed. */
vmx_run:
    push rbp
    push rbx
    push r12
    push r13
    push r14
    push r15
    push rdi
    mov rax, {host_rsp}
    vmwrite rax, rsp
    mov rax, [rdi + {off_host_fx}]
    fxsave [rax]
    mov rax, [rdi + {off_guest_fx}]
    fxrstor [rax]
    test rsi, rsi
    mov rax, [rdi + {off_rax}]
    mov rbx, [rdi + {off_rbx}]
    mov rcx, [rdi + {off_rcx}]
    mov rdx, [rdi + {off_rdx}]
    mov rsi, [rdi + {off_rsi}]
    mov rbp, [rdi + {off_rbp}]
    mov r8, [rdi + {off_r8}]
    mov r9, [rdi + {off_r9}]
    mov r10, [rdi + {off_r10}]
    mov r11, [rdi + {off_r11}]
    mov r12, [rdi + {off_r12}]
    mov r13, [rdi + {off_r13}]
    mov r14, [rdi + {off_r14}]
    mov r15, [rdi + {off_r15}]
    mov rdi, [rdi + {off_rdi}]
    jz 2f
    vmresume
    jmp 3f
2:
    vmlaunch
3:
    /* Entry failed: the guest registers are in the host's; recover ours. */
    pop rdi
    mov rax, [rdi + {off_guest_fx}]
    fxsave [rax]
    mov rax, [rdi + {off_host_fx}]
    fxrstor [rax]
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbx
    pop rbp
    mov eax, 1
    ret

.global vmx_exit_entry
vmx_exit_entry:
    push rdi
    mov rdi, [rsp + 8]
    mov [rdi + {off_rax}], rax
    mov [rdi + {off_rbx}], rbx
    mov [rdi + {off_rcx}], rcx
    mov [rdi + {off_rdx}], rdx
    mov [rdi + {off_rsi}], rsi
    mov [rdi + {off_rbp}], rbp
    mov [rdi + {off_r8}], r8
    mov [rdi + {off_r9}], r9
    mov [rdi + {off_r10}], r10
    mov [rdi + {off_r11}], r11
    mov [rdi + {off_r12}], r12
    mov [rdi + {off_r13}], r13
    mov [rdi + {off_r14}], r14
    mov [rdi + {off_r15}], r15
    pop rax
    mov [rdi + {off_rdi}], rax
    mov rax, [rdi + {off_guest_fx}]
    fxsave [rax]
    mov rax, [rdi + {off_host_fx}]
    fxrstor [rax]
    pop rdi
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbx
    pop rbp
    xor eax, eax
    ret
"#,
    off_rax = const core::mem::offset_of!(GuestRegs, rax),
    off_rbx = const core::mem::offset_of!(GuestRegs, rbx),
    off_rcx = const core::mem::offset_of!(GuestRegs, rcx),
    off_rdx = const core::mem::offset_of!(GuestRegs, rdx),
    off_rsi = const core::mem::offset_of!(GuestRegs, rsi),
    off_rdi = const core::mem::offset_of!(GuestRegs, rdi),
    off_rbp = const core::mem::offset_of!(GuestRegs, rbp),
    off_r8 = const core::mem::offset_of!(GuestRegs, r8),
    off_r9 = const core::mem::offset_of!(GuestRegs, r9),
    off_r10 = const core::mem::offset_of!(GuestRegs, r10),
    off_r11 = const core::mem::offset_of!(GuestRegs, r11),
    off_r12 = const core::mem::offset_of!(GuestRegs, r12),
    off_r13 = const core::mem::offset_of!(GuestRegs, r13),
    off_r14 = const core::mem::offset_of!(GuestRegs, r14),
    off_r15 = const core::mem::offset_of!(GuestRegs, r15),
    off_guest_fx = const core::mem::offset_of!(GuestRegs, guest_fx),
    off_host_fx = const core::mem::offset_of!(GuestRegs, host_fx),
    host_rsp = const x86::vmx::vmcs::host::RSP,
);

extern "C" {
    fn vmx_run(regs: *mut GuestRegs, launched: u64) -> u64;
    fn vmx_exit_entry();
}

/// Address for the VMCS host-RIP field.
pub fn exit_entry_address() -> u64 {
    vmx_exit_entry as *const () as u64
}

/// Enters the guest whose VMCS is current; returns after its next VM exit, or `Err` with
/// the VM-instruction error when the entry itself failed.
pub fn enter(regs: &mut GuestRegs, launched: bool) -> Result<(), u64> {
    // SAFETY: the current VMCS is fully set up for this vCPU (host state points back at
    // `vmx_exit_entry` on this CPU, host RSP is written by the stub itself), and `regs`
    // holds valid FXSAVE area pointers.
    match unsafe { vmx_run(regs, launched as u64) } {
        0 => Ok(()),
        _ => Err(crate::vmcs::instruction_error()),
    }
}
