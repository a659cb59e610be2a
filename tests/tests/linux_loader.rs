//! The Linux boot-protocol loader (`firmware::linux`) on the real guest bzImage the project
//! builds (scripts/build-guest), not only on synthetic headers.

use firmware::linux::{boot_vcpu_state, load_linux, BzImage, LinuxParams, ZERO_PAGE_GPA};
use firmware::longmode::VecGuestMemory as Memory;
use std::process::Command;

fn guest_bzimage() -> Vec<u8> {
    let root = e2e::repo_root();
    let status = Command::new(root.join("scripts/build-guest")).status().expect("run scripts/build-guest");
    assert!(status.success(), "scripts/build-guest failed");
    std::fs::read(root.join("build/guest/bzImage")).expect("build/guest/bzImage")
}

#[test]
fn the_guest_bzimage_loads_for_a_64_bit_entry() {
    let bytes = guest_bzimage();
    let kernel = BzImage::parse(&bytes).expect("the project's guest kernel is a bootable bzImage");
    assert!(kernel.version >= 0x020F, "Linux 6.1 speaks boot protocol 2.15: {:#x}", kernel.version);
    // tinyconfig builds a non-relocatable kernel: it must run at its preferred address.
    assert_eq!(kernel.pref_address, 0x100_0000, "CONFIG_PHYSICAL_START");
    assert!(kernel.init_size > 1 << 20 && kernel.init_size < 64 << 20, "init_size {}", kernel.init_size);

    let mut mem = Memory(vec![0; 128 << 20]);
    let cmdline = "console=ttyS0,115200 phalanx.workload=barrier";
    let layout =
        load_linux(&mut mem, &LinuxParams { kernel: &kernel, cmdline, initrd: None, acpi_rsdp: None }).unwrap();
    assert_eq!(layout.kernel_gpa, kernel.pref_address);
    let protected = &bytes[kernel.kernel_offset()..];
    let at = layout.kernel_gpa as usize;
    assert_eq!(&mem.0[at..at + protected.len()], protected, "the protected-mode kernel at its load address");
    let zero_page = &mem.0[ZERO_PAGE_GPA as usize..ZERO_PAGE_GPA as usize + 4096];
    assert_eq!(&zero_page[0x202..0x206], b"HdrS");
    let state = boot_vcpu_state(&layout);
    assert_eq!(state.rip, layout.kernel_gpa + 0x200);
    // The VMCS this state makes passes the SDM's entry checks on every Bochs model and under
    // nested KVM.
    for (model, caps) in vmx::fixtures::BOCHS_MODELS.iter().chain([&("nested KVM", vmx::fixtures::NESTED_KVM_SKYLAKE)])
    {
        let vmcs = vmx::fixtures::initial_vmcs(caps, &state, false);
        vmx::entry_check::check(&vmcs).unwrap_or_else(|e| panic!("{model}: {e}"));
    }

    // A partition too small for the kernel is refused with its sizes.
    let mut small = Memory(vec![0; 24 << 20]);
    let e =
        load_linux(&mut small, &LinuxParams { kernel: &kernel, cmdline, initrd: None, acpi_rsdp: None }).unwrap_err();
    assert!(e.to_string().contains("MiB of guest memory"), "{e}");
}
