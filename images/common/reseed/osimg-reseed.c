/*
 * osimg-reseed: mix the entropy bytes read on stdin into the kernel's RNG and force the CRNG to
 * reseed at once (RNDADDENTROPY + RNDRESEEDCRNG on /dev/urandom; needs CAP_SYS_ADMIN).
 *
 * Why: a warm swap restores one golden memory state into many guests, and every one of them
 * resumes with the same RNG state. The host runs this through the guest agent right after each
 * page-in, with fresh bytes from its own os.urandom on stdin, before anything else runs in the
 * guest. Guest images have no compiler or Python, so the host builds it statically at image build.
 * Exit codes: 0 reseeded, 1 an ioctl or open failed, 2 too few bytes on stdin.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/random.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#define MAX_BYTES 512
#define MIN_BYTES 32

/* struct rand_pool_info with room for the bytes (the kernel's has a flexible array member) */
struct pool {
    int entropy_count;
    int buf_size;
    unsigned char buf[MAX_BYTES];
};

int main(void)
{
    struct pool p;
    size_t n = 0;
    while (n < MAX_BYTES) {
        ssize_t r = read(0, p.buf + n, MAX_BYTES - n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        n += (size_t)r;
    }
    if (n < MIN_BYTES) {
        fprintf(stderr, "osimg-reseed: %zu bytes of entropy on stdin, expected at least %d\n", n, MIN_BYTES);
        return 2;
    }
    int fd = open("/dev/urandom", O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        perror("osimg-reseed: /dev/urandom");
        return 1;
    }
    p.entropy_count = (int)n * 8;
    p.buf_size = (int)n;
    int rc = 0;
    if (ioctl(fd, RNDADDENTROPY, &p) < 0) {
        perror("osimg-reseed: RNDADDENTROPY");
        rc = 1;
    } else if (ioctl(fd, RNDRESEEDCRNG) < 0) {
        perror("osimg-reseed: RNDRESEEDCRNG");
        rc = 1;
    }
    explicit_bzero(&p, sizeof p);
    close(fd);
    return rc;
}
