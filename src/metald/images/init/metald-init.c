/*
 * metald-init: PID 1 of a VM that runs a container image.
 *
 * Two stages, one static binary:
 *  1. As /init of the initramfs (the bundled one with this binary appended):
 *     load the virtio/ACPI modules listed in /etc/modules.order, mount the
 *     root drive /dev/vda read-write and make it the root, then exec
 *     /.metald/init inside it (the copy the image conversion put there).
 *  2. As /.metald/init in the image: mount /proc /sys /dev /dev/pts /dev/shm
 *     /run /tmp, set the hostname to the VM id, configure eth0 from the
 *     kernel's ip= argument, write /etc/resolv.conf, then run the workload
 *     (ENTRYPOINT + CMD with Env, WorkingDir and User from /.metald/config,
 *     overridden by the base64 metald.overrides= kernel argument) as its child.
 *     PID 1 reaps zombies, forwards SIGTERM/SIGINT/SIGHUP, turns the ACPI
 *     power button into SIGTERM, and powers the VM off when the workload ends.
 *
 * Console protocol (one line each, read by metald):
 *   METALD_IMAGE_START vm_id=<id>
 *   METALD_WORKLOAD_EXIT code=<n>            exited with status n
 *   METALD_WORKLOAD_EXIT signal=<n>          killed by signal n
 *   METALD_WORKLOAD_EXIT error=<text>        could not be started
 *
 * Config format (/.metald/config and the decoded overrides): one entry per
 * line, "<key>\t<value>", value escaped with \\ \n \t. Keys: entrypoint, cmd
 * (one line per word; "entrypoint-reset"/"cmd-reset" empty them), env
 * (NAME=value), workdir, user.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/input.h>
#include <linux/reboot.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAXV 512
#define MAXEV 16

static void say(const char *fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if (n > (int)sizeof buf - 2) n = sizeof buf - 2;
    buf[n++] = '\n';
    if (write(1, buf, n) < 0) { /* nothing to do */ }
}

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static char *read_file(const char *path) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return NULL;
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap);
    for (;;) {
        if (len + 1 >= cap) buf = realloc(buf, cap *= 2);
        ssize_t n = read(fd, buf + len, cap - len - 1);
        if (n <= 0) break;
        len += (size_t)n;
    }
    close(fd);
    buf[len] = 0;
    return buf;
}

static void power_off(void) {
    sync();
    mount(NULL, "/", NULL, MS_REMOUNT | MS_RDONLY, NULL);
    sync();
    reboot(LINUX_REBOOT_CMD_POWER_OFF);
    for (;;) pause();
}

static void fatal(const char *what) {
    say("METALD_WORKLOAD_EXIT error=%s: %s", what, strerror(errno));
    power_off();
}

/* ---- stage 1: initramfs ------------------------------------------------- */
static void stage1(void) {
    mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
    mkdir("/proc", 0755);
    mount("proc", "/proc", "proc", 0, NULL);
    int cfd = open("/dev/console", O_RDWR);
    if (cfd >= 0) { dup2(cfd, 0); dup2(cfd, 1); dup2(cfd, 2); if (cfd > 2) close(cfd); }
    char *order = read_file("/etc/modules.order");
    if (order) {
        for (char *line = strtok(order, "\n"); line; line = strtok(NULL, "\n")) {
            char path[512];
            snprintf(path, sizeof path, "/lib/modules/%s", line);
            int fd = open(path, O_RDONLY | O_CLOEXEC);
            if (fd < 0) { say("metald-init: %s: %s", path, strerror(errno)); continue; }
            if (syscall(SYS_finit_module, fd, "", 0) != 0 && errno != EEXIST)
                say("metald-init: loading %s: %s", line, strerror(errno));
            close(fd);
        }
    }
    int i;
    for (i = 0; i < 200 && access("/dev/vda", F_OK) != 0; i++) sleep_ms(50);
    mkdir("/newroot", 0755);
    if (mount("/dev/vda", "/newroot", "ext4", MS_NOATIME, NULL) != 0) fatal("mount /dev/vda");
    umount2("/proc", MNT_DETACH);
    umount2("/dev", MNT_DETACH);
    if (chdir("/newroot") != 0) fatal("chdir /newroot");
    if (mount(".", "/", NULL, MS_MOVE, NULL) != 0) fatal("move root");
    if (chroot(".") != 0) fatal("chroot");
    if (chdir("/") != 0) fatal("chdir /");
    char *argv[] = {"/.metald/init", NULL};
    execv(argv[0], argv);
    fatal("exec /.metald/init");
}

/* ---- config ------------------------------------------------------------ */
struct list { char *v[MAXV]; int n; };
struct config {
    struct list entrypoint, cmd, env;
    char *workdir, *user;
};

static void list_add(struct list *l, char *s) { if (l->n < MAXV - 1) l->v[l->n++] = s; l->v[l->n] = NULL; }

static char *unescape(char *s) {
    char *o = s, *r = s;
    while (*r) {
        if (*r == '\\' && r[1]) {
            r++;
            *o++ = *r == 'n' ? '\n' : *r == 't' ? '\t' : *r;
            r++;
        } else {
            *o++ = *r++;
        }
    }
    *o = 0;
    return s;
}

static void env_set(struct list *env, char *entry) {
    char *eq = strchr(entry, '=');
    size_t klen = eq ? (size_t)(eq - entry) : strlen(entry);
    for (int i = 0; i < env->n; i++) {
        if (strncmp(env->v[i], entry, klen) == 0 && env->v[i][klen] == '=') { env->v[i] = entry; return; }
    }
    list_add(env, entry);
}

static const char *env_get(struct list *env, const char *name) {
    size_t k = strlen(name);
    for (int i = 0; i < env->n; i++)
        if (strncmp(env->v[i], name, k) == 0 && env->v[i][k] == '=') return env->v[i] + k + 1;
    return NULL;
}

static void parse_config(struct config *c, char *text) {
    for (char *line = strtok(text, "\n"); line; line = strtok(NULL, "\n")) {
        char *tab = strchr(line, '\t');
        char *val = tab ? (*tab = 0, unescape(tab + 1)) : line + strlen(line);
        if (!strcmp(line, "entrypoint")) list_add(&c->entrypoint, val);
        else if (!strcmp(line, "cmd")) list_add(&c->cmd, val);
        else if (!strcmp(line, "entrypoint-reset")) c->entrypoint.n = 0, c->entrypoint.v[0] = NULL;
        else if (!strcmp(line, "cmd-reset")) c->cmd.n = 0, c->cmd.v[0] = NULL;
        else if (!strcmp(line, "env")) env_set(&c->env, val);
        else if (!strcmp(line, "workdir")) c->workdir = val;
        else if (!strcmp(line, "user")) c->user = val;
    }
}

static char *b64decode(const char *in) {
    size_t n = strlen(in);
    unsigned char *out = malloc(n + 1);
    size_t o = 0;
    unsigned v = 0;
    int bits = 0;
    for (size_t i = 0; i < n; i++) {
        char ch = in[i];
        int d = ch >= 'A' && ch <= 'Z' ? ch - 'A' : ch >= 'a' && ch <= 'z' ? ch - 'a' + 26
              : ch >= '0' && ch <= '9' ? ch - '0' + 52 : ch == '+' || ch == '-' ? 62
              : ch == '/' || ch == '_' ? 63 : -1;
        if (d < 0) continue;
        v = (v << 6) | (unsigned)d;
        bits += 6;
        if (bits >= 8) { bits -= 8; out[o++] = (unsigned char)(v >> bits); }
    }
    out[o] = 0;
    return (char *)out;
}

/* ---- network ----------------------------------------------------------- */
static int set_addr(int s, unsigned long req, const char *dev, const char *addr) {
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strncpy(ifr.ifr_name, dev, IFNAMSIZ - 1);
    struct sockaddr_in *sin = (struct sockaddr_in *)&ifr.ifr_addr;
    sin->sin_family = AF_INET;
    if (inet_pton(AF_INET, addr, &sin->sin_addr) != 1) return -1;
    return ioctl(s, req, &ifr);
}

static void link_up(int s, const char *dev) {
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strncpy(ifr.ifr_name, dev, IFNAMSIZ - 1);
    if (ioctl(s, SIOCGIFFLAGS, &ifr) == 0) {
        ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
        if (ioctl(s, SIOCSIFFLAGS, &ifr) != 0) say("metald-init: %s up: %s", dev, strerror(errno));
    }
}

/* ip=<client>:<server>:<gw>:<netmask>:<hostname>:<device>:<autoconf>:<dns0>:<dns1> */
static void network(char *iparg) {
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0) return;
    link_up(s, "lo");
    if (!iparg) { close(s); return; }
    char *f[9] = {0};
    char *p = iparg;
    for (int i = 0; i < 9; i++) { f[i] = p; char *c = p ? strchr(p, ':') : NULL; if (c) { *c = 0; p = c + 1; } else p = NULL; }
    const char *dev = f[5] && *f[5] ? f[5] : "eth0";
    char sysdev[128];
    snprintf(sysdev, sizeof sysdev, "/sys/class/net/%s", dev);
    for (int i = 0; i < 100 && access(sysdev, F_OK) != 0; i++) sleep_ms(50);
    if (f[0] && *f[0] && set_addr(s, SIOCSIFADDR, dev, f[0]) != 0) say("metald-init: address %s: %s", f[0], strerror(errno));
    if (f[3] && *f[3] && set_addr(s, SIOCSIFNETMASK, dev, f[3]) != 0) say("metald-init: netmask: %s", strerror(errno));
    link_up(s, dev);
    if (f[2] && *f[2]) {
        struct rtentry rt;
        memset(&rt, 0, sizeof rt);
        struct sockaddr_in *gw = (struct sockaddr_in *)&rt.rt_gateway;
        gw->sin_family = AF_INET;
        inet_pton(AF_INET, f[2], &gw->sin_addr);
        ((struct sockaddr_in *)&rt.rt_dst)->sin_family = AF_INET;
        ((struct sockaddr_in *)&rt.rt_genmask)->sin_family = AF_INET;
        rt.rt_flags = RTF_UP | RTF_GATEWAY;
        rt.rt_dev = (char *)dev;
        if (ioctl(s, SIOCADDRT, &rt) != 0) say("metald-init: default route: %s", strerror(errno));
    }
    close(s);
    if ((f[7] && *f[7]) || (f[8] && *f[8])) {
        mkdir("/etc", 0755);
        unlink("/etc/resolv.conf"); /* may be a dangling symlink */
        FILE *r = fopen("/etc/resolv.conf", "w");
        if (r) {
            if (f[7] && *f[7]) fprintf(r, "nameserver %s\n", f[7]);
            if (f[8] && *f[8]) fprintf(r, "nameserver %s\n", f[8]);
            fclose(r);
        }
    }
}

/* ---- user -------------------------------------------------------------- */
static int all_digits(const char *s) { if (!*s) return 0; for (; *s; s++) if (*s < '0' || *s > '9') return 0; return 1; }

/* Find a line of /etc/passwd or /etc/group whose field 0 (name) or field 2 (id) matches. */
static char *lookup(const char *file, const char *key, int by_id, char **fields, int nf) {
    char *text = read_file(file);
    if (!text) return NULL;
    for (char *line = strtok(text, "\n"); line; line = strtok(NULL, "\n")) {
        int i = 0;
        char *p = line;
        for (; i < nf; i++) { fields[i] = p; char *c = p ? strchr(p, ':') : NULL; if (c) { *c = 0; p = c + 1; } else p = NULL; }
        if (fields[2] && !strcmp(by_id ? fields[2] : fields[0], key)) return text;
    }
    return NULL;
}

static int resolve_user(const char *spec, uid_t *uid, gid_t *gid, const char **home) {
    char buf[256];
    snprintf(buf, sizeof buf, "%s", spec);
    char *group = strchr(buf, ':');
    if (group) *group++ = 0;
    char *pw[7] = {0};
    *home = "/";
    if (all_digits(buf)) {
        *uid = (uid_t)atol(buf);
        *gid = 0; /* as Docker: a uid without a passwd entry runs with gid 0 */
        if (lookup("/etc/passwd", buf, 1, pw, 7)) { *gid = (gid_t)atol(pw[3]); if (pw[5] && *pw[5]) *home = strdup(pw[5]); }
    } else {
        if (!lookup("/etc/passwd", buf, 0, pw, 7)) return -1;
        *uid = (uid_t)atol(pw[2]);
        *gid = (gid_t)atol(pw[3]);
        if (pw[5] && *pw[5]) *home = strdup(pw[5]);
    }
    if (group && *group) {
        if (all_digits(group)) *gid = (gid_t)atol(group);
        else {
            char *gr[4] = {0};
            if (!lookup("/etc/group", group, 0, gr, 4)) return -2;
            *gid = (gid_t)atol(gr[2]);
        }
    }
    return 0;
}

/* ---- stage 2: the image ------------------------------------------------ */
static void mnt(const char *src, const char *dst, const char *type, unsigned long flags, const char *data) {
    mkdir(dst, 0755);
    if (mount(src, dst, type, flags, data) != 0 && errno != EBUSY)
        say("metald-init: mount %s: %s", dst, strerror(errno));
}

static int open_buttons(struct pollfd *fds, int start) {
    int n = start;
    DIR *d = opendir("/dev/input");
    if (!d) return n;
    struct dirent *e;
    while ((e = readdir(d)) && n < MAXEV) {
        if (strncmp(e->d_name, "event", 5)) continue;
        char path[300];
        snprintf(path, sizeof path, "/dev/input/%s", e->d_name);
        int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
        if (fd >= 0) { fds[n].fd = fd; fds[n].events = POLLIN; n++; }
    }
    closedir(d);
    return n;
}

static void stage2(void) {
    mnt("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    mnt("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    mnt("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, NULL);
    int cfd = open("/dev/console", O_RDWR);
    if (cfd >= 0) { dup2(cfd, 0); dup2(cfd, 1); dup2(cfd, 2); if (cfd > 2) close(cfd); }
    mnt("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=620,ptmxmode=666");
    mnt("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
    mnt("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=755");
    mnt("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
    reboot(LINUX_REBOOT_CMD_CAD_OFF); /* ctrl-alt-del becomes SIGINT to us */

    char *cmdline = read_file("/proc/cmdline");
    char *vm_id = "metald-vm", *iparg = NULL, *over = NULL;
    if (cmdline) {
        for (char *w = strtok(cmdline, " \n"); w; w = strtok(NULL, " \n")) {
            if (!strncmp(w, "metald.vm_id=", 13)) vm_id = w + 13;
            else if (!strncmp(w, "ip=", 3)) iparg = w + 3;
            else if (!strncmp(w, "metald.overrides=", 17)) over = w + 17;
        }
    }
    say("METALD_IMAGE_START vm_id=%s", vm_id);
    sethostname(vm_id, strlen(vm_id));
    network(iparg);

    struct config c;
    memset(&c, 0, sizeof c);
    char *text = read_file("/.metald/config");
    if (text) parse_config(&c, text);
    if (over) parse_config(&c, b64decode(over));
    struct list argv;
    memset(&argv, 0, sizeof argv);
    for (int i = 0; i < c.entrypoint.n; i++) list_add(&argv, c.entrypoint.v[i]);
    for (int i = 0; i < c.cmd.n; i++) list_add(&argv, c.cmd.v[i]);
    if (argv.n == 0) { errno = EINVAL; fatal("the image has no entrypoint or cmd"); }
    uid_t uid = 0;
    gid_t gid = 0;
    const char *home = "/root";
    if (c.user && *c.user) {
        int r = resolve_user(c.user, &uid, &gid, &home);
        if (r) { errno = ENOENT; fatal(r == -1 ? "user not in /etc/passwd" : "group not in /etc/group"); }
    }
    if (!env_get(&c.env, "PATH")) env_set(&c.env, "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    char hostenv[300];
    snprintf(hostenv, sizeof hostenv, "HOSTNAME=%s", vm_id);
    if (!env_get(&c.env, "HOSTNAME")) env_set(&c.env, hostenv);
    char homeenv[300];
    snprintf(homeenv, sizeof homeenv, "HOME=%s", home);
    if (!env_get(&c.env, "HOME")) env_set(&c.env, homeenv);

    struct pollfd fds[MAXEV];
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGCHLD);
    sigaddset(&mask, SIGTERM);
    sigaddset(&mask, SIGINT);
    sigaddset(&mask, SIGHUP);
    sigprocmask(SIG_BLOCK, &mask, NULL);
    fds[0].fd = signalfd(-1, &mask, SFD_CLOEXEC);
    fds[0].events = POLLIN;
    int nfds = open_buttons(fds, 1);

    pid_t child = fork();
    if (child < 0) fatal("fork");
    if (child == 0) {
        sigprocmask(SIG_UNBLOCK, &mask, NULL);
        setsid();
        ioctl(0, TIOCSCTTY, 0);
        if (c.workdir && *c.workdir) {
            mkdir(c.workdir, 0755);
            if (chdir(c.workdir) != 0) { say("METALD_WORKLOAD_EXIT error=workdir %s: %s", c.workdir, strerror(errno)); _exit(126); }
        }
        if (setgroups(1, &gid) != 0 || setgid(gid) != 0 || setuid(uid) != 0) { say("METALD_WORKLOAD_EXIT error=user: %s", strerror(errno)); _exit(126); }
        environ = c.env.v;
        execvp(argv.v[0], argv.v);
        say("METALD_WORKLOAD_EXIT error=exec %s: %s", argv.v[0], strerror(errno));
        _exit(127);
    }
    int status = 0;
    for (;;) {
        if (poll(fds, (nfds_t)nfds, -1) < 0) continue;
        for (int i = 1; i < nfds; i++) {
            struct input_event ev;
            while (fds[i].revents & POLLIN && read(fds[i].fd, &ev, sizeof ev) == sizeof ev) {
                if (ev.type == EV_KEY && ev.code == KEY_POWER && ev.value == 1) kill(child, SIGTERM);
            }
        }
        if (!(fds[0].revents & POLLIN)) continue;
        struct signalfd_siginfo si;
        if (read(fds[0].fd, &si, sizeof si) != sizeof si) continue;
        if (si.ssi_signo != SIGCHLD) { kill(child, (int)si.ssi_signo); continue; }
        int st, done = 0;
        pid_t p;
        while ((p = waitpid(-1, &st, WNOHANG)) > 0) if (p == child) { status = st; done = 1; }
        if (done) break;
    }
    if (WIFEXITED(status)) say("METALD_WORKLOAD_EXIT code=%d", WEXITSTATUS(status));
    else say("METALD_WORKLOAD_EXIT signal=%d", WTERMSIG(status));
    kill(-1, SIGTERM);
    sleep_ms(200);
    kill(-1, SIGKILL);
    while (waitpid(-1, NULL, WNOHANG) > 0) {}
    power_off();
}

int main(void) {
    if (access("/.metald/config", F_OK) != 0 && access("/etc/modules.order", F_OK) == 0) stage1();
    stage2();
    return 0;
}
