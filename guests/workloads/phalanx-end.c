/* phalanx-end: ends the guest machine cleanly once /init has printed its last record.
 * Waits until the console UART has sent everything (tcdrain: the tty layer waits for the
 * transmitter-empty bit), then resets. /init selects the triple-fault reset method
 * (/sys/kernel/reboot/type, like `reboot=t`): Bochs with reset_on_triple_fault=0, QEMU with
 * -no-reboot and a hypervisor (VM exit "triple fault") all treat that as "machine ended". */
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
    reboot(RB_AUTOBOOT);
    perror("phalanx-end: reboot");
    return 1;
}
