/* metald-reseed HEX: mix HEX (the seed metald sends a restored guest) into the
 * kernel's entropy pool, credit it, and force the CRNG to reseed at once, so
 * that clones restored from one snapshot stop sharing RNG state. Writing to
 * /dev/urandom alone would not reseed the CRNG until its next interval. */
#include <fcntl.h>
#include <linux/random.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

static int nibble(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

int main(int argc, char **argv) {
    struct {
        struct rand_pool_info info;
        unsigned char buf[256];
    } req;
    size_t len, i;
    int fd;

    if (argc != 2) {
        fprintf(stderr, "usage: metald-reseed HEX\n");
        return 2;
    }
    len = strlen(argv[1]) / 2;
    if (len == 0 || len > sizeof(req.buf) || strlen(argv[1]) % 2) {
        fprintf(stderr, "metald-reseed: seed must be 2..512 hex digits\n");
        return 2;
    }
    for (i = 0; i < len; i++) {
        int hi = nibble(argv[1][2 * i]), lo = nibble(argv[1][2 * i + 1]);
        if (hi < 0 || lo < 0) {
            fprintf(stderr, "metald-reseed: not hex\n");
            return 2;
        }
        req.buf[i] = (unsigned char)(hi << 4 | lo);
    }
    req.info.entropy_count = (int)(len * 8);
    req.info.buf_size = (int)len;
    fd = open("/dev/urandom", O_RDWR);
    if (fd < 0) {
        perror("metald-reseed: /dev/urandom");
        return 1;
    }
    if (ioctl(fd, RNDADDENTROPY, &req.info) < 0) {
        perror("metald-reseed: RNDADDENTROPY");
        return 1;
    }
    if (ioctl(fd, RNDRESEEDCRNG) < 0) {
        perror("metald-reseed: RNDRESEEDCRNG");
        return 1;
    }
    memset(&req, 0, sizeof(req));
    close(fd);
    return 0;
}
