/*
 * THIS IS PART OF A TEST DOUBLE of Firecracker, not Firecracker.
 *
 * metald's jailer execs Firecracker (a static binary) inside an empty chroot
 * after dropping root. The double is a Python script, so it reaches the jail
 * through this small static executable, which metald's jailer execs in
 * Firecracker's place: it execs the Python interpreter on the double, passing
 * on its arguments and its environment unchanged (the jailer gives it an
 * empty one) and the double's knobs as a file. The interpreter is visible in
 * the jail only in tests (tests/firecracker_double/jail_runtime.py).
 *
 * Built by tests/firecracker_double/harness.py with
 *   cc -static -DPYTHON='"..."' -DDOUBLE='"..."' -DKNOBS='"..."' jail_stub.c
 */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

extern char **environ;

int main(int argc, char **argv) {
    char **args = calloc((size_t)argc + 6, sizeof(char *));
    int n = 0;
    if (args == NULL)
        return 127;
    args[n++] = PYTHON;
    args[n++] = "-I";
    args[n++] = DOUBLE;
    args[n++] = "--double-knobs";
    args[n++] = KNOBS;
    for (int i = 1; i < argc; i++)
        args[n++] = argv[i];
    args[n] = NULL;
    execve(PYTHON, args, environ);
    perror("jail_stub: exec " PYTHON);
    return 127;
}
