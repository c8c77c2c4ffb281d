/* The sample guest's workload (built with gcc -static by scripts/sample-guest).
 *
 *   load tick                   "tick N T_MS" on stdout every 10 ms: a host reading the serial
 *                               console sees any pause of the guest as a gap in T_MS.
 *   load disk DEV RATE          RATE records a second (O_DSYNC) to DEV, one per 4 KiB block,
 *                               cycling over the device; each record carries its sequence
 *                               number, its block and a checksum, so a host can check afterwards,
 *                               block by block, that every acknowledged record survived. Prints
 *                               "disk acked SEQ" once a second: every record up to SEQ is on disk.
 *   load mem MIB PAGES_PER_S    fills a MIB MiB buffer with random bytes, then dirties
 *                               PAGES_PER_S pages a second over it.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>
#include <linux/fs.h>

#define BLOCK 4096
#define MAGIC 0x48454c494f524543ull /* "HELIOREC" */

static uint64_t now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

static void sleep_until(uint64_t deadline) {
  struct timespec t = {(time_t)(deadline / 1000000000ull), (long)(deadline % 1000000000ull)};
  clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &t, NULL);
}

/* FNV-1a 64: enough to tell a torn or stale record from a whole one. */
static uint64_t fnv(const unsigned char *p, size_t n) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001b3ull;
  return h;
}

static int tick(void) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  uint64_t start = now_ns(), next = start;
  for (uint64_t n = 0;; n++) {
    printf("tick %llu %llu\n", (unsigned long long)n, (unsigned long long)((now_ns() - start) / 1000000));
    next += 10000000ull;
    sleep_until(next);
  }
  return 0;
}

static int disk(const char *dev, long rate) {
  int fd = open(dev, O_RDWR | O_DSYNC);
  if (fd < 0) { perror(dev); return 1; }
  uint64_t size = 0;
  if (ioctl(fd, BLKGETSIZE64, &size) < 0 || size < BLOCK) { perror("BLKGETSIZE64"); return 1; }
  uint64_t blocks = size / BLOCK, boot = now_ns();
  static unsigned char rec[BLOCK];
  uint64_t next = now_ns(), report = next + 1000000000ull, step = 1000000000ull / (uint64_t)rate;
  setvbuf(stdout, NULL, _IOLBF, 0);
  for (uint64_t seq = 1;; seq++) {
    uint64_t block = (seq - 1) % blocks, hdr[4] = {MAGIC, seq, block, boot};
    memset(rec, (int)(seq & 0xff), BLOCK);
    memcpy(rec, hdr, sizeof hdr);
    uint64_t sum = fnv(rec, BLOCK - 8);
    memcpy(rec + BLOCK - 8, &sum, 8);
    if (pwrite(fd, rec, BLOCK, (off_t)(block * BLOCK)) != BLOCK) { perror("pwrite"); return 1; }
    if (now_ns() >= report) {
      printf("disk acked %llu\n", (unsigned long long)seq);
      report += 1000000000ull;
    }
    next += step;
    sleep_until(next);
  }
}

static int mem(long mib, long rate) {
  size_t pages = (size_t)mib * 256;
  volatile unsigned char *buf = malloc(pages * 4096);
  if (!buf) { perror("malloc"); return 1; }
  uint64_t next = now_ns(), x = 1;
  /* Random bytes, not a touched page: a working set of real data does not compress, and a
   * migration that compresses its stream must not look better than it would be. */
  volatile uint64_t *words = (volatile uint64_t *)buf;
  uint64_t r = 0x9e3779b97f4a7c15ull;
  for (size_t i = 0; i < pages * 512; i++) {
    r ^= r << 13; r ^= r >> 7; r ^= r << 17;
    words[i] = r;
  }
  for (;;) {
    /* A batch every 10 ms keeps the rate smooth without a syscall per page. */
    for (long k = 0; k < rate / 100 + 1; k++) {
      x = x * 6364136223846793005ull + 1442695040888963407ull;
      buf[((x >> 17) % pages) * 4096 + (x & 4095)]++;
    }
    next += 10000000ull;
    sleep_until(next);
  }
}

int main(int argc, char **argv) {
  if (argc >= 2 && !strcmp(argv[1], "tick")) return tick();
  if (argc >= 4 && !strcmp(argv[1], "disk")) return disk(argv[2], atol(argv[3]) > 0 ? atol(argv[3]) : 1);
  if (argc >= 4 && !strcmp(argv[1], "mem")) return mem(atol(argv[2]) > 0 ? atol(argv[2]) : 1, atol(argv[3]));
  fprintf(stderr, "usage: load tick | disk DEV RATE | mem MIB PAGES_PER_S\n");
  return 2;
}
