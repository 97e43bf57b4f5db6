"""What a Firecracker exit status means.

Firecracker v1.16.1 exits on purpose with its own codes (``FcExitCode`` in
``src/vmm/src/lib.rs``): 148 when its seccomp filter caught a system call it
does not allow, 149-157 when it intercepted a fatal signal, 152/153 for bad
configuration or arguments. Those lie in 129-191, where a shell's "128+N
killed by signal N" convention would misread them, so they are named as
Firecracker's own and never as signals. A VMM killed by a signal shows as a
negative Popen return code (metald's jailer launcher dies by the same signal
as the VMM it waits for, so the code reaches metald unchanged).
"""

from __future__ import annotations

from metald.backends.process import describe_status

FC_EXIT_CODES: dict[int, str] = {
    1: "Firecracker error",
    2: "Firecracker unexpected error",
    148: "seccomp violation: Firecracker called a system call its filter forbids",
    149: "Firecracker intercepted SIGBUS",
    150: "Firecracker intercepted SIGSEGV",
    151: "Firecracker intercepted SIGXFSZ (file size limit)",
    152: "bad configuration",
    153: "command-line arguments rejected",
    154: "Firecracker intercepted SIGXCPU (CPU time limit)",
    155: "Firecracker intercepted SIGPIPE",
    156: "Firecracker intercepted SIGHUP",
    157: "Firecracker intercepted SIGILL",
}


def describe_exit(returncode: int | None) -> str:
    """``exit code N (meaning)`` for Firecracker's codes, else the generic description."""
    text = describe_status(returncode)
    if returncode is not None and returncode in FC_EXIT_CODES:
        return f"{text} ({FC_EXIT_CODES[returncode]})"
    return text
