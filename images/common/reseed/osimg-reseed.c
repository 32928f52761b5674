/*
 * osimg-reseed: mix the entropy bytes read on stdin into the kernel's RNG and force the CRNG to
 * reseed at once (RNDADDENTROPY + RNDRESEEDCRNG on /dev/urandom; needs CAP_SYS_ADMIN); then,
 * when 8 more bytes follow (the host's time in nanoseconds since the epoch, little-endian), set
 * the clock to it.
 *
 * Why: a warm swap restores one golden memory state into many guests, and every one of them
 * resumes with the same RNG state. The host runs this through the guest agent right after each
 * page-in, with fresh bytes from its own os.urandom on stdin, before anything else runs in the
 * guest. The golden state's clock also stopped at capture time: setting it here spares the warm
 * swap a second agent call in its downtime window. Guest images have no compiler or Python, so
 * the host builds this statically at image build.
 * stdin: exactly 64 bytes of entropy, optionally followed by 8 bytes of time.
 * Exit codes: 0 done, 1 an ioctl, open or clock_settime failed, 2 malformed stdin.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/random.h>
#include <stdio.h>
#include <string.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#define ENTROPY_BYTES 64
#define TIME_BYTES 8

/* struct rand_pool_info with room for the bytes (the kernel's has a flexible array member) */
struct pool {
    int entropy_count;
    int buf_size;
    unsigned char buf[ENTROPY_BYTES + TIME_BYTES];
};

int main(void)
{
    struct pool p;
    size_t n = 0;
    char extra;
    while (n < sizeof p.buf) {
        ssize_t r = read(0, p.buf + n, sizeof p.buf - n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        n += (size_t)r;
    }
    if ((n != ENTROPY_BYTES && n != ENTROPY_BYTES + TIME_BYTES) || read(0, &extra, 1) > 0) {
        fprintf(stderr, "osimg-reseed: expected %d bytes of entropy (and optionally %d of time) on stdin\n",
                ENTROPY_BYTES, TIME_BYTES);
        return 2;
    }
    int64_t ns = 0;
    for (int i = TIME_BYTES - 1; n > ENTROPY_BYTES && i >= 0; i--)
        ns = (ns << 8) | p.buf[ENTROPY_BYTES + i];
    int fd = open("/dev/urandom", O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        perror("osimg-reseed: /dev/urandom");
        return 1;
    }
    p.entropy_count = ENTROPY_BYTES * 8;
    p.buf_size = ENTROPY_BYTES;
    int rc = 0;
    if (ioctl(fd, RNDADDENTROPY, &p) < 0) {
        perror("osimg-reseed: RNDADDENTROPY");
        rc = 1;
    } else if (ioctl(fd, RNDRESEEDCRNG) < 0) {
        perror("osimg-reseed: RNDRESEEDCRNG");
        rc = 1;
    }
    if (rc == 0 && n > ENTROPY_BYTES) {
        struct timespec ts = {.tv_sec = ns / 1000000000, .tv_nsec = ns % 1000000000};
        if (clock_settime(CLOCK_REALTIME, &ts) < 0) {
            perror("osimg-reseed: clock_settime");
            rc = 1;
        }
    }
    explicit_bzero(&p, sizeof p);
    close(fd);
    return rc;
}
