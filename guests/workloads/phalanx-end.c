/* phalanx-end: ends the guest machine cleanly once /init has printed its last record.
 * Waits until the console UART has sent everything (tcdrain: the tty layer waits for the
 * transmitter-empty bit), then powers off (ACPI S5: a partition stops with a
 * `partition_poweroff` record; Bochs and QEMU without a hypervisor end). Where power-off is not
 * available (a kernel booted with acpi=off) it resets instead: /init selects the triple-fault
 * method, which Bochs with reset_on_triple_fault=0, QEMU with -no-reboot and a hypervisor
 * (VM exit "triple fault") all treat as "machine ended". */
#include <fcntl.h>
#include <stdio.h>
#include <sys/reboot.h>
#include <termios.h>
#include <unistd.h>

int main(void)
{
    sync();
    tcdrain(STDOUT_FILENO);
    int fd = open("/dev/console", O_WRONLY | O_NOCTTY);
    if (fd >= 0) tcdrain(fd);
    /* Without ACPI the kernel turns power-off into a halt that never returns. */
    if (access("/sys/firmware/acpi", F_OK) == 0) reboot(RB_POWER_OFF);
    reboot(RB_AUTOBOOT);
    perror("phalanx-end: reboot");
    return 1;
}
