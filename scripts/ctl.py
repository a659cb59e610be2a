#!/usr/bin/env python3
"""scripts/phalanx ctl: one command to a running Phalanx machine's control channel.

The machine's COM2 is relayed by scripts/console-relay.py (`scripts/phalanx boot --ctl --out
DIR`, or `scripts/phalanx run`, whose DIR is build/run): bytes written to DIR/ctl.in reach it,
what it sends is appended to DIR/ctl.log. The request goes out as `@TAG COMMAND` with a fresh
tag; the reply is the log line that carries that tag. It is printed as it came (one line of
JSON); the exit status is 0 when it says "ok": true, 1 when it says false, 2 when no reply came.
docs/control.md lists the commands and the replies.
"""
import argparse
import json
import os
import random
import sys
import time


def fail(message):
    """No reply can come: exit status 2, as when none came in time."""
    print(f"phalanx ctl: {message}", file=sys.stderr)
    sys.exit(2)


def wait_until_open(directory, deadline):
    """Waits until the machine has opened its control channel (its `control` record): bytes
    sent earlier would be lost when it resets the UART. Fails if it has none."""
    console = os.path.join(directory, "serial.log")
    while time.monotonic() < deadline:
        try:
            with open(console, errors="replace") as f:
                for line in f:
                    if line.startswith('{"type":"control",'):
                        if '"present":true' in line:
                            return
                        fail(f"the machine at {directory} has no control channel: {line.strip()}")
        except OSError:
            pass
        time.sleep(0.2)
    fail(f"the machine at {directory} did not open its control channel in time")


def open_fifo(directory, deadline):
    """The relay's input FIFO, for writing; the relay keeps it open for reading while it runs,
    so the open never blocks (it is retried while the relay starts)."""
    fifo_path = os.path.join(directory, "ctl.in")
    while True:
        try:
            return os.open(fifo_path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            if time.monotonic() >= deadline:
                fail(f"no control channel at {directory} ({e.strerror}): boot with --ctl, or `scripts/phalanx run`")
        time.sleep(0.2)


def send(directory, command, timeout_s):
    log_path = os.path.join(directory, "ctl.log")
    start_wait = time.monotonic()
    fd = open_fifo(directory, start_wait + min(timeout_s, 60))
    wait_until_open(directory, start_wait + timeout_s)
    tag = random.randrange(1, 1 << 31)
    start = os.path.getsize(log_path) if os.path.exists(log_path) else 0
    with os.fdopen(fd, "wb") as fifo:
        fifo.write(f"@{tag} {command}\n".encode())
    deadline = start_wait + timeout_s
    pending = b""
    offset = start
    while time.monotonic() < deadline:
        if os.path.exists(log_path):
            with open(log_path, "rb") as log:
                log.seek(offset)
                chunk = log.read()
            offset += len(chunk)
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace").strip()
                try:
                    reply = json.loads(line)
                except ValueError:
                    continue
                if reply.get("tag") == tag:
                    return line, reply
        time.sleep(0.05)
    return None, None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", help="the run's directory (default: build/run)")
    ap.add_argument("--default-dir", help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the reply (default 300)")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="the command and its arguments")
    args = ap.parse_args()
    if not args.command:
        ap.error("give a command: status, set-reservation, stop, start, reset, end")
    directory = args.dir or args.default_dir or "build/run"
    line, reply = send(directory, " ".join(args.command), args.timeout)
    if reply is None:
        print(f"phalanx ctl: no reply within {args.timeout:.0f} s", file=sys.stderr)
        return 2
    print(line)
    return 0 if reply.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
