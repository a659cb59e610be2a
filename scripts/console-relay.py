#!/usr/bin/env python3
"""The host side of an emulated machine's serial console with input.

Creates a pseudo-terminal for the emulator's COM1 (Bochs `mode=term`, QEMU `-serial
/dev/pts/N`), writes its name to --pty-file, and then relays until it is sent SIGTERM:
  - everything the machine prints is appended to --log (and shown on stdout with --interactive);
  - lines written to the --input FIFO (a test's commands) are typed into the machine;
  - with --interactive, the terminal's keystrokes are typed into the machine (raw: Ctrl-C goes
    to the guest); Ctrl-] ends the relay and with it the run (scripts/phalanx stops the emulator).
The hypervisor hands what is typed to the partition `phalanx.console=NAME` names.
"""
import argparse
import errno
import os
import select
import signal
import sys
import termios
import time
import tty

QUIT = b"\x1d"  # Ctrl-]
# Typed bytes go to the machine at most this many at a time, this often (wall clock): the
# emulated UART holds 16, and under Bochs the hypervisor may take their interrupt late (Bochs
# takes external-interrupt exits only while the guest has interrupts enabled). A person types
# slower than this; a pasted line arrives in well under a second.
INPUT_CHUNK = 8
INPUT_INTERVAL_S = 0.02


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--log", required=True, help="file the machine's output is appended to")
    ap.add_argument("--pty-file", required=True, help="file the pseudo-terminal's name is written to")
    ap.add_argument("--input", help="FIFO whose bytes are typed into the machine (created if missing)")
    ap.add_argument("--interactive", action="store_true", help="relay this terminal both ways")
    args = ap.parse_args()

    master, slave = os.openpty()
    # Raw on the machine's side: bytes pass unchanged (no echo, no CR/LF translation).
    tty.setraw(slave)
    name = os.ttyname(slave)
    # The emulator opens the slave by name; ours stays open so the master never reads EIO
    # while the emulator starts or restarts it.
    with open(args.pty_file + ".tmp", "w") as f:
        f.write(name + "\n")
    os.rename(args.pty_file + ".tmp", args.pty_file)

    sources = [master]
    fifo = None
    if args.input:
        if not os.path.exists(args.input):
            os.mkfifo(args.input)
        # Read-write: opening never blocks and the FIFO never reads end-of-file between writers.
        fifo = os.open(args.input, os.O_RDWR | os.O_NONBLOCK)
        sources.append(fifo)
    stdin_attrs = None
    if args.interactive and sys.stdin.isatty():
        stdin_attrs = termios.tcgetattr(0)
        tty.setraw(0)
        sources.append(0)

    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    log = open(args.log, "ab", buffering=0)
    pending = bytearray()  # typed, not yet handed to the machine
    next_input = 0.0
    try:
        while not stopping:
            now = time.monotonic()
            if pending and now >= next_input:
                os.write(master, pending[:INPUT_CHUNK])
                del pending[:INPUT_CHUNK]
                next_input = now + INPUT_INTERVAL_S
            timeout = max(0.0, next_input - now) if pending else 0.2
            try:
                ready, _, _ = select.select(sources, [], [], timeout)
            except InterruptedError:
                continue
            for fd in ready:
                try:
                    data = os.read(fd, 4096)
                except OSError as e:
                    if e.errno in (errno.EAGAIN, errno.EIO):
                        continue
                    raise
                if fd == master:
                    log.write(data)
                    if args.interactive:
                        os.write(1, data)  # the hypervisor's lines already end in CR LF
                elif fd == 0 and QUIT in data:
                    stopping.append(True)
                    break
                else:
                    pending += data
        # Drain what the machine printed last.
        while select.select([master], [], [], 0.1)[0]:
            try:
                data = os.read(master, 4096)
            except OSError:
                break
            if not data:
                break
            log.write(data)
    finally:
        if stdin_attrs is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, stdin_attrs)
        log.close()


if __name__ == "__main__":
    main()
