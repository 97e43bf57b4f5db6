"""Jailing QEMU: the launcher does the outside, QEMU finishes the inside.

QEMU is dynamically linked and opens libraries, firmware, the kernel, initrd,
drives, /dev/kvm and the TAP at start, so it cannot be chrooted or stripped of
root before exec. Instead:

* ``metald.jailer.exec`` (via ``qemu_launch_argv``): network namespace, private
  mount namespace, cgroup, RLIMIT_NOFILE, closed fds, empty environment,
  no_new_privs, umask 077; it keeps root and does not chroot or fork.
* QEMU itself, once every file is open (``os_setup_post``): chroots into the
  jail root and drops to uid:gid, under a seccomp filter.

Flags verified with QEMU 7.2 (Debian 12) on a microvm guest under TCG::

    -chroot <jail.root> -runas <uid>:<gid>
    -sandbox on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny

Observed in /proc/<pid>: Uid/Gid all = uid/gid, Groups = <gid> (numeric
``-runas`` calls ``setgroups(1, [gid])``: only the primary group, no others),
root -> the jail root, ns/net = the VM's namespace, the VM's cgroups, Max open
files = the fd limit, environ empty, NoNewPrivs 1, Seccomp 2. QMP answers.

``elevateprivileges`` must be ``allow``: QEMU 7.2 installs the seccomp filter
before it runs ``-runas``, so ``elevateprivileges=deny`` (or ``children``)
kills QEMU with SIGSYS at its own setgid/setuid. This costs little: after
``-runas`` the real, effective and saved uids are all unprivileged, so set*id
calls cannot regain root, and no_new_privs plus ``spawn=deny`` stop any exec.
Filters stack, so the backend must not add a second ``-sandbox`` with
``elevateprivileges=deny`` (build the QEMU argv with ``sandbox=False`` and
append these args). ``-run-with`` does not exist in 7.2.

Paths the backend passes: keep host paths for everything QEMU opens at start
(kernel, initrd, drives, ``-chardev file`` console log, ``-qmp unix:`` socket,
``-pidfile``), e.g. under ``/run/metald/<vm_id>/``: they are opened or bound as
root before the chroot, and metald reaches them at the same host paths. The
pid file holds QEMU's host pid (no PID namespace). Caveats: QEMU cannot unlink
its pid file or QMP socket at exit (they are outside its chroot), so the backend
removes them; anything QEMU would open *later* (QMP ``blockdev-add``,
``screendump``, migration to a file) is resolved inside the chroot as the jailed
uid, so such files must be placed under the jail root and named by their
in-jail path (``Jailer.path_in_jail``).
"""

from __future__ import annotations

from metald.jailer.jailer import Jailer
from metald.jailer.layout import Jail

SANDBOX = "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny"


def qemu_confinement_args(jail: Jail, *, sandbox: bool = True) -> list[str]:
    """Arguments appended to QEMU's argv so it chroots and drops root itself."""
    args = ["-chroot", str(jail.root), "-runas", f"{jail.uid}:{jail.gid}"]
    if sandbox:
        args += ["-sandbox", SANDBOX]
    return args


def qemu_launch_argv(jailer: Jailer, jail: Jail, argv: list[str], netns: str | None) -> list[str]:
    """The launcher command for a QEMU argv that already has the confinement args."""
    if "-runas" not in argv or "-chroot" not in argv:
        raise ValueError("QEMU argv lacks -chroot/-runas: append qemu_confinement_args(jail)")
    return jailer.launch_argv(jail, argv, netns, chroot=False, new_pid_ns=False, drop_privileges=False)
