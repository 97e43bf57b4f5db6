/* metald-agent IFACE VM_ID HOSTNAME: the bundled guest's listener for a new
 * identity after a snapshot restore (started by /init, stdin/stdout on the
 * console ttyS0).
 *
 * metald writes one line to the console:
 *   METALD_IDENTITY [vm_id=ID] [host=NAME] [ip=A.B.C.D/N] [gw=A.B.C.D]
 *                   [mac=MAC] [dns=IP,IP] [time=EPOCH] [seed=HEX] [ack=WORD]
 * and the agent applies it with system calls only (a freshly restored TCG
 * guest runs every code path cold, so a fork/exec per step costs ~0.1 s):
 * the seed is credited to the kernel's pool and the CRNG reseeded at once
 * (RNDADDENTROPY + RNDRESEEDCRNG: clones of one snapshot must not share RNG
 * state), MAC, address and default route set by ioctl, hostname, /www and
 * /etc files rewritten, then it prints
 *   METALD_GUEST_IDENTITY ack=WORD vm_id=ID host=NAME
 * and sets the clock last. Echo is off so the seed never reaches the log. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/random.h>
#include <net/if.h>
#include <net/if_arp.h>
#include <net/route.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <termios.h>
#include <unistd.h>

#define MAXV 128

static char iface[IFNAMSIZ] = "eth0";
static char vm_id[MAXV] = "";
static char host[MAXV] = "";

static void say(const char *fmt, const char *a) {
    printf("metald-agent: ");
    printf(fmt, a);
    printf("\n");
    fflush(stdout);
}

static int nibble(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static void reseed(const char *hex) {
    struct {
        struct rand_pool_info info;
        unsigned char buf[256];
    } req;
    size_t len = strlen(hex) / 2, i;
    int fd;

    if (len == 0 || len > sizeof(req.buf) || strlen(hex) % 2) {
        say("bad seed length%s", "");
        return;
    }
    for (i = 0; i < len; i++) {
        int hi = nibble(hex[2 * i]), lo = nibble(hex[2 * i + 1]);
        if (hi < 0 || lo < 0) {
            say("seed is not hex%s", "");
            return;
        }
        req.buf[i] = (unsigned char)(hi << 4 | lo);
    }
    req.info.entropy_count = (int)(len * 8);
    req.info.buf_size = (int)len;
    fd = open("/dev/urandom", O_RDWR | O_CLOEXEC);
    if (fd < 0 || ioctl(fd, RNDADDENTROPY, &req.info) < 0 || ioctl(fd, RNDRESEEDCRNG) < 0)
        say("reseed failed: %s", strerror(errno));
    if (fd >= 0) close(fd);
    memset(&req, 0, sizeof(req));
}

static void set_in(struct sockaddr *sa, in_addr_t addr) {
    struct sockaddr_in *in = (struct sockaddr_in *)sa;
    memset(in, 0, sizeof(*in));
    in->sin_family = AF_INET;
    in->sin_addr.s_addr = addr;
}

static void set_mac(int sock, const char *mac) {
    struct ifreq ifr;
    unsigned int b[6];
    int i;

    if (sscanf(mac, "%x:%x:%x:%x:%x:%x", &b[0], &b[1], &b[2], &b[3], &b[4], &b[5]) != 6) {
        say("bad mac %s", mac);
        return;
    }
    memset(&ifr, 0, sizeof(ifr));
    strncpy(ifr.ifr_name, iface, IFNAMSIZ - 1);
    ifr.ifr_hwaddr.sa_family = ARPHRD_ETHER;
    for (i = 0; i < 6; i++) ifr.ifr_hwaddr.sa_data[i] = (char)b[i];
    if (ioctl(sock, SIOCSIFHWADDR, &ifr) < 0) say("mac: %s", strerror(errno));
}

static void set_ip(int sock, const char *cidr) {
    char buf[32];
    char *slash;
    int prefix = 32;
    struct in_addr addr;
    struct ifreq ifr;

    snprintf(buf, sizeof(buf), "%s", cidr);
    slash = strchr(buf, '/');
    if (slash) {
        *slash = 0;
        prefix = atoi(slash + 1);
    }
    if (!inet_aton(buf, &addr) || prefix < 0 || prefix > 32) {
        say("bad ip %s", cidr);
        return;
    }
    memset(&ifr, 0, sizeof(ifr));
    strncpy(ifr.ifr_name, iface, IFNAMSIZ - 1);
    set_in(&ifr.ifr_addr, addr.s_addr); /* replaces the primary address */
    if (ioctl(sock, SIOCSIFADDR, &ifr) < 0) say("ip: %s", strerror(errno));
    set_in(&ifr.ifr_netmask, prefix ? htonl(~0u << (32 - prefix)) : 0);
    if (ioctl(sock, SIOCSIFNETMASK, &ifr) < 0) say("netmask: %s", strerror(errno));
    ifr.ifr_flags = 0;
    if (ioctl(sock, SIOCGIFFLAGS, &ifr) == 0 && !(ifr.ifr_flags & IFF_UP)) {
        ifr.ifr_flags |= IFF_UP;
        ioctl(sock, SIOCSIFFLAGS, &ifr);
    }
}

static void set_gateway(int sock, const char *gw) {
    struct rtentry rt;
    struct in_addr addr;

    if (!inet_aton(gw, &addr)) {
        say("bad gw %s", gw);
        return;
    }
    memset(&rt, 0, sizeof(rt));
    set_in(&rt.rt_dst, 0);
    set_in(&rt.rt_genmask, 0);
    rt.rt_dev = iface;
    ioctl(sock, SIOCDELRT, &rt); /* the old default route, if the address change left it */
    set_in(&rt.rt_gateway, addr.s_addr);
    rt.rt_flags = RTF_UP | RTF_GATEWAY;
    if (ioctl(sock, SIOCADDRT, &rt) < 0 && errno != EEXIST) say("route: %s", strerror(errno));
}

static void write_file(const char *path, const char *a, const char *b) {
    FILE *f = fopen(path, "w");
    if (!f) return;
    fputs(a, f);
    if (b) fputs(b, f);
    fclose(f);
}

static void write_info(void) {
    char head[2 * MAXV + 32], extra[1024] = "";
    FILE *f = fopen("/run/metald-info", "r");
    if (f) {
        size_t n = fread(extra, 1, sizeof(extra) - 1, f);
        extra[n] = 0;
        fclose(f);
    }
    snprintf(head, sizeof(head), "vm_id=%s\nhostname=%s\n", vm_id, host);
    write_file("/www/info", head, extra);
}

static void apply(char *words) {
    char *save = NULL, *w, *ack = "", *when = NULL;
    char *ip = NULL, *gw = NULL, *mac = NULL, *seed = NULL, *dns = NULL;
    char buf[MAXV + 2];
    int sock;

    for (w = strtok_r(words, " \t\r", &save); w; w = strtok_r(NULL, " \t\r", &save)) {
        char *v = strchr(w, '=');
        if (!v) continue;
        *v++ = 0;
        if (!strcmp(w, "vm_id")) snprintf(vm_id, sizeof(vm_id), "%s", v);
        else if (!strcmp(w, "host")) snprintf(host, sizeof(host), "%s", v);
        else if (!strcmp(w, "ip")) ip = v;
        else if (!strcmp(w, "gw")) gw = v;
        else if (!strcmp(w, "mac")) mac = v;
        else if (!strcmp(w, "dns")) dns = v;
        else if (!strcmp(w, "time")) when = v;
        else if (!strcmp(w, "seed")) seed = v;
        else if (!strcmp(w, "ack")) ack = v;
    }
    if (seed) reseed(seed); /* first: nothing after the restore may draw from the shared state */
    sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (sock >= 0) {
        if (mac) set_mac(sock, mac);
        if (ip) set_ip(sock, ip);
        if (gw) set_gateway(sock, gw);
        close(sock);
    }
    if (dns) {
        FILE *f = fopen("/etc/resolv.conf", "w");
        char *d, *s2 = NULL;
        for (d = strtok_r(dns, ",", &s2); f && d; d = strtok_r(NULL, ",", &s2)) fprintf(f, "nameserver %s\n", d);
        if (f) fclose(f);
    }
    if (sethostname(host, strlen(host)) < 0) say("hostname: %s", strerror(errno));
    snprintf(buf, sizeof(buf), "%s\n", host);
    write_file("/etc/hostname", buf, NULL);
    snprintf(buf, sizeof(buf), "%s\n", vm_id);
    write_file("/www/index.html", buf, NULL);
    write_info();
    printf("METALD_GUEST_IDENTITY ack=%s vm_id=%s host=%s\n", ack, vm_id, host);
    fflush(stdout);
    if (when) {
        struct timeval tv = {.tv_sec = atol(when), .tv_usec = 0};
        if (settimeofday(&tv, NULL) < 0) say("clock: %s", strerror(errno));
    }
}

int main(int argc, char **argv) {
    char line[4096];
    struct termios t;

    if (argc > 1) snprintf(iface, sizeof(iface), "%s", argv[1]);
    if (argc > 2) snprintf(vm_id, sizeof(vm_id), "%s", argv[2]);
    if (argc > 3) snprintf(host, sizeof(host), "%s", argv[3]);
    if (tcgetattr(0, &t) == 0) {
        t.c_lflag &= ~(ECHO | ECHONL);
        t.c_lflag |= ICANON;
        tcsetattr(0, TCSANOW, &t);
    }
    for (;;) {
        ssize_t n = read(0, line, sizeof(line) - 1);
        char *p, *nl;
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
            sleep(1);
            continue;
        }
        line[n] = 0;
        for (p = line; *p; p = nl + 1) {
            nl = strchr(p, '\n');
            if (nl) *nl = 0;
            if (!strncmp(p, "METALD_IDENTITY", 15) && (p[15] == ' ' || p[15] == 0)) apply(p + 15);
            if (!nl) break;
        }
    }
}
