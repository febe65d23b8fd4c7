/* Standalone test of csrc/cpu/fm_io.c and crc32c.c, meant to run under AddressSanitizer /
 * ThreadSanitizer (see tests/c/run.sh). Every destination is malloc'd at its exact size so a
 * write past the end of a request is caught. Exit status 0 = all good.
 */
#define _GNU_SOURCE
#include "crc32c.h"
#include "fm_io.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static int failures = 0;
#define CHECK(cond, ...)                                                         \
    do {                                                                         \
        if (!(cond)) {                                                           \
            fprintf(stderr, "%s:%d: CHECK(%s) failed: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                        \
            fprintf(stderr, "\n");                                               \
            failures++;                                                          \
        }                                                                        \
    } while (0)

static uint64_t rng = 0x9e3779b97f4a7c15ull;
static uint64_t next_rand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static void test_crc(void)
{
    CHECK(fm_crc32c(0, "123456789", 9) == 0xE3069283u, "check value");
    CHECK(fm_crc32c_portable(0, "123456789", 9) == 0xE3069283u, "portable check value");
    CHECK(fm_crc32c(0, NULL, 0) == 0, "empty");
    size_t n = 200000;
    unsigned char *buf = malloc(n);
    for (size_t i = 0; i < n; i++)
        buf[i] = (unsigned char)next_rand();
    for (size_t len = 0; len < n - 16; len += 1 + len / 2) {
        for (int off = 0; off < 9; off++) {
            uint32_t a = fm_crc32c(7, buf + off, len), b = fm_crc32c_portable(7, buf + off, len);
            CHECK(a == b, "fast %08x != portable %08x (len %zu off %d)", a, b, len, off);
            size_t cut = len / 3;
            uint32_t c = fm_crc32c_combine(fm_crc32c(0, buf + off, cut), fm_crc32c(0, buf + off + cut, len - cut), len - cut);
            CHECK(c == fm_crc32c(0, buf + off, len), "combine len %zu", len);
            CHECK(fm_crc32c(fm_crc32c(0, buf + off, cut), buf + off + cut, len - cut) == fm_crc32c(0, buf + off, len),
                  "chain len %zu", len);
        }
    }
    free(buf);
    printf("crc32c ok (%s)\n", fm_crc32c_impl());
}

static char path[256];
static unsigned char *data;
static size_t fsize;

static void make_file(void)
{
    snprintf(path, sizeof path, "%s/fm_io_test_%d.bin", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp", (int)getpid());
    fsize = 3 * 1024 * 1024 + 8192; /* a multiple of 4096: O_DIRECT reads up to EOF are whole */
    data = malloc(fsize);
    for (size_t i = 0; i < fsize; i++)
        data[i] = (unsigned char)next_rand();
    FILE *f = fopen(path, "wb");
    fwrite(data, 1, fsize, f);
    fclose(f);
}

static void test_buffered(int nthreads, uint64_t chunk)
{
    fm_reader *r = fm_reader_new(nthreads, 0, chunk);
    CHECK(r != NULL, "reader");
    int direct = -1;
    int fid = fm_open(r, path, 0, &direct);
    CHECK(fid >= 0 && direct == 0, "open %d", fid);
    CHECK(fm_file_size(r, fid) == (int64_t)fsize, "size");
    CHECK(fm_open(r, "/nonexistent/fm_io", 0, NULL) == -ENOENT, "missing file");
    CHECK(fm_open(r, "/tmp", 0, NULL) == -EISDIR, "directory");

    enum { N = 300 };
    fm_request reqs[N];
    fm_result res[N];
    for (int i = 0; i < N; i++) {
        uint64_t len = next_rand() % 300000;
        if (i % 10 == 0)
            len = 0;
        uint64_t off = next_rand() % (fsize - len + 1);
        reqs[i].file = fid;
        reqs[i].offset = off;
        reqs[i].nbytes = len;
        reqs[i].dest = malloc(len ? len : 1);
        reqs[i].flags = (i % 2) ? FM_REQ_VERIFY : 0;
        reqs[i].crc = fm_crc32c(0, data + off, len);
    }
    size_t bad = 99;
    int64_t failed = fm_read(r, reqs, N, res, &bad);
    CHECK(failed == 0, "failed %lld", (long long)failed);
    for (int i = 0; i < N; i++) {
        CHECK(res[i].status == FM_OK, "req %d status %d", i, res[i].status);
        CHECK(memcmp(reqs[i].dest, data + reqs[i].offset, reqs[i].nbytes) == 0, "req %d bytes", i);
        if (reqs[i].flags & FM_REQ_VERIFY)
            CHECK(res[i].crc == reqs[i].crc, "req %d crc", i);
    }

    /* async, several batches with priorities, then errors */
    fm_batch *b[4];
    for (int k = 0; k < 4; k++) {
        CHECK(fm_submit(r, reqs + k * 50, 50, k % 2, &b[k], &bad) == 0, "submit %d", k);
    }
    for (int k = 3; k >= 0; k--) {
        CHECK(fm_wait(b[k]) == 0, "wait %d", k);
        CHECK(fm_poll(b[k]) == 1, "poll %d", k);
        fm_batch_free(b[k]);
    }

    /* errors: past EOF, checksum, and a good one between */
    fm_request e[3];
    unsigned char *d0 = malloc(10000), *d1 = malloc(100), *d2 = malloc(100);
    e[0] = (fm_request){fid, FM_REQ_VERIFY, fsize - 5000, 10000, d0, 0};
    e[1] = (fm_request){fid, FM_REQ_VERIFY, 100, 100, d1, fm_crc32c(0, data + 100, 100) ^ 1};
    e[2] = (fm_request){fid, FM_REQ_VERIFY, 200, 100, d2, fm_crc32c(0, data + 200, 100)};
    fm_result er[3];
    CHECK(fm_read(r, e, 3, er, &bad) == 2, "two failures");
    CHECK(er[0].status == FM_ERR_SHORT && er[0].err_offset == fsize, "short: %d %llu", er[0].status,
          (unsigned long long)er[0].err_offset);
    CHECK(er[1].status == FM_ERR_CHECKSUM && er[1].crc == fm_crc32c(0, data + 100, 100), "checksum");
    CHECK(er[2].status == FM_OK, "ok after errors");
    /* entirely past EOF */
    e[0].offset = fsize + 4096;
    CHECK(fm_read(r, e, 1, er, &bad) == 1 && er[0].status == FM_ERR_SHORT && er[0].err_offset == fsize, "past eof");
    /* bad file id */
    e[1].file = 42;
    CHECK(fm_read(r, e, 2, er, &bad) == -EBADF && bad == 1, "bad file id");
    /* close while idle; a closed id is refused */
    CHECK(fm_close_file(r, fid) == 0, "close");
    CHECK(fm_close_file(r, fid) == -EBADF, "close twice");
    CHECK(fm_read(r, reqs, 1, res, &bad) == -EBADF && bad == 0, "closed id");
    free(d0);
    free(d1);
    free(d2);

    /* cancellation: a batch that is not started by anyone (0 threads) is dropped entirely */
    if (nthreads == 0) {
        fid = fm_open(r, path, 0, NULL);
        for (int i = 0; i < N; i++)
            reqs[i].file = fid;
        fm_batch *c;
        CHECK(fm_submit(r, reqs, N, 0, &c, &bad) == 0, "submit");
        CHECK(fm_close_file(r, fid) == -EBUSY, "busy");
        CHECK(fm_cancel(c) == N, "cancel all");
        CHECK(fm_wait(c) == N, "all cancelled");
        CHECK(fm_batch_results(c)[5].status == FM_ERR_CANCELLED, "status cancelled");
        fm_batch_free(c);
        CHECK(fm_close_file(r, fid) == 0, "not busy after");
    }
    /* batches left for fm_reader_free to drain, freed afterwards */
    fid = fm_open(r, path, 0, NULL);
    for (int i = 0; i < N; i++)
        reqs[i].file = fid;
    fm_batch *late;
    CHECK(fm_submit(r, reqs, N, 0, &late, &bad) == 0, "submit late");
    fm_reader_free(r);
    CHECK(fm_poll(late) == 1 && fm_wait(late) == 0, "drained");
    fm_batch_free(late);
    for (int i = 0; i < N; i++)
        free(reqs[i].dest);
    printf("buffered ok (threads %d, chunk %llu)\n", nthreads, (unsigned long long)chunk);
}

static void test_direct(void)
{
    fm_reader *r = fm_reader_new(3, 1, 1 << 16);
    int direct = -1;
    int fid = fm_open(r, path, -1, &direct);
    CHECK(fid >= 0, "open direct");
    if (!direct) {
        printf("direct: filesystem refuses O_DIRECT, opened buffered (fallback ok)\n");
        fm_reader_free(r);
        return;
    }
    size_t nrec = fsize / 4096;
    enum { N = 64 };
    fm_request reqs[N];
    for (int i = 0; i < N; i++) {
        uint64_t rec = next_rand() % nrec, len = 4096 * (1 + next_rand() % (nrec - rec));
        if (len > 512 * 1024)
            len = 512 * 1024;
        reqs[i] = (fm_request){fid, FM_REQ_VERIFY, rec * 4096, len, fm_alloc_aligned(len, 4096),
                               fm_crc32c(0, data + rec * 4096, len)};
    }
    fm_result res[N];
    size_t bad;
    CHECK(fm_read(r, reqs, N, res, &bad) == 0, "direct reads");
    for (int i = 0; i < N; i++)
        CHECK(res[i].status == FM_OK && memcmp(reqs[i].dest, data + reqs[i].offset, reqs[i].nbytes) == 0,
              "direct %d", i);
    /* misalignment is refused before any I/O, naming the request */
    fm_request m = reqs[7];
    reqs[7].offset += 512;
    CHECK(fm_read(r, reqs, N, res, &bad) == -EINVAL && bad == 7, "misaligned offset");
    reqs[7] = m;
    reqs[9].dest = (char *)reqs[9].dest + 8;
    CHECK(fm_read(r, reqs, N, res, &bad) == -EINVAL && bad == 9, "misaligned dest");
    reqs[9].dest = (char *)reqs[9].dest - 8;
    reqs[11].nbytes -= 1;
    CHECK(fm_read(r, reqs, N, res, &bad) == -EINVAL && bad == 11, "misaligned size");
    reqs[11].nbytes += 1;
    /* read past EOF with O_DIRECT */
    void *tail = fm_alloc_aligned(3 * 4096, 4096);
    fm_request t = {fid, 0, fsize - 4096, 3 * 4096, tail, 0};
    fm_result tr;
    CHECK(fm_read(r, &t, 1, &tr, &bad) == 1 && tr.status == FM_ERR_SHORT && tr.err_offset == fsize, "direct eof");
    fm_free_aligned(tail);
    for (int i = 0; i < N; i++)
        fm_free_aligned(reqs[i].dest);
    fm_reader_free(r);
    printf("direct ok\n");
}

static void test_stress(void)
{
    /* many small batches from the main thread on 8 threads, each request its own buffer */
    fm_reader *r = fm_reader_new(8, 0, 4096);
    int fid = fm_open(r, path, 0, NULL);
    enum { B = 40, N = 64 };
    fm_batch *bs[B];
    fm_request reqs[B][N];
    for (int k = 0; k < B; k++) {
        for (int i = 0; i < N; i++) {
            uint64_t len = 1 + next_rand() % 20000, off = next_rand() % (fsize - len);
            reqs[k][i] = (fm_request){fid, FM_REQ_VERIFY, off, len, malloc(len), fm_crc32c(0, data + off, len)};
        }
        size_t bad;
        CHECK(fm_submit(r, reqs[k], N, (int)(next_rand() % 3), &bs[k], &bad) == 0, "submit");
        if (k % 7 == 3)
            fm_cancel(bs[k]);
    }
    for (int k = 0; k < B; k++) {
        size_t failed = fm_wait(bs[k]);
        const fm_result *res = fm_batch_results(bs[k]);
        for (int i = 0; i < N; i++) {
            if (res[i].status == FM_OK)
                CHECK(memcmp(reqs[k][i].dest, data + reqs[k][i].offset, reqs[k][i].nbytes) == 0, "stress bytes");
            else
                CHECK(res[i].status == FM_ERR_CANCELLED && k % 7 == 3, "stress status %d", res[i].status);
            free(reqs[k][i].dest);
        }
        CHECK(k % 7 == 3 || failed == 0, "stress failed");
        fm_batch_free(bs[k]);
    }
    fm_reader_free(r);
    printf("stress ok\n");
}

/* combine over len_b >= 512 MiB (the x2n table once wrapped at 32 entries): against a direct CRC
 * of A followed by B, B being a 64 MiB random block repeated (chained, so memory stays small) */
static void test_crc_large(void)
{
    size_t blk = (size_t)64 << 20;
    unsigned char *buf = malloc(blk);
    for (size_t i = 0; i < blk; i += 8) {
        uint64_t v = next_rand();
        memcpy(buf + i, &v, 8);
    }
    uint32_t a = fm_crc32c(0, buf, 1000);
    uint32_t direct = a, b = 0;
    uint64_t len_b = 0;
    for (int k = 1; k <= 17; k++) { /* 64 MiB .. 1088 MiB */
        direct = fm_crc32c(direct, buf, blk);
        b = fm_crc32c(b, buf, blk);
        len_b += blk;
        if (k == 8 || k == 9 || k == 16 || k == 17)
            CHECK(fm_crc32c_combine(a, b, len_b) == direct, "combine with len_b %llu MiB",
                  (unsigned long long)(len_b >> 20));
    }
    free(buf);
    printf("crc32c combine > 1 GiB ok\n");
}

/* the item count of a batch must not wrap: 8192 requests of 2^51 chunks each sum to 2^64 */
static void test_submit_overflow(void)
{
    fm_reader *r = fm_reader_new(0, 0, 4096);
    int fid = fm_open(r, path, 0, NULL);
    enum { N = 8192 };
    fm_request *reqs = calloc(N, sizeof(fm_request));
    char one;
    for (int i = 0; i < N; i++)
        reqs[i] = (fm_request){fid, 0, 0, (uint64_t)INT64_MAX, &one, 0};
    fm_batch *b = NULL;
    size_t bad = 99;
    CHECK(fm_submit(r, reqs, N, 0, &b, &bad) == -EINVAL && b == NULL && bad == 0, "huge batch refused");
    /* each request alone within the chunk limit, their sum not */
    for (int i = 0; i < N; i++)
        reqs[i].nbytes = (uint64_t)4096 << 20; /* 2^20 chunks each */
    CHECK(fm_submit(r, reqs, N, 0, &b, &bad) == -EINVAL && b == NULL && bad == 4095, "sum refused at %zu", bad);
    free(reqs);
    fm_reader_free(r);
    printf("submit overflow ok\n");
}

/* fm_reader_free / fm_reader_close while other threads wait on batches */
typedef struct waiter_arg {
    fm_batch *b;
    size_t failed;
} waiter_arg;

static void *waiter(void *p)
{
    waiter_arg *a = (waiter_arg *)p;
    a->failed = fm_wait(a->b);
    fm_batch_free(a->b);
    return NULL;
}

static void test_free_while_waiting(void)
{
    enum { W = 4, N = 16 };
    for (int round = 0; round < 50; round++) {
        fm_reader *r = fm_reader_new(round % 3, 0, 4096);
        int fid = fm_open(r, path, 0, NULL);
        pthread_t th[W];
        waiter_arg args[W];
        unsigned char *bufs[W];
        for (int w = 0; w < W; w++) {
            fm_request reqs[N];
            bufs[w] = malloc((size_t)N * 65536);
            for (int i = 0; i < N; i++)
                reqs[i] = (fm_request){fid, 0, (uint64_t)i * 65536, 65536, bufs[w] + (size_t)i * 65536, 0};
            size_t bad;
            CHECK(fm_submit(r, reqs, N, 0, &args[w].b, &bad) == 0, "submit");
            pthread_create(&th[w], NULL, waiter, &args[w]);
        }
        if (round % 2)
            fm_reader_close(r); /* from another thread, mid-wait; then free */
        fm_reader_free(r);
        fm_request late = {0, 0, 0, 1, bufs[0], 0};
        for (int w = 0; w < W; w++) {
            pthread_join(th[w], NULL);
            CHECK(args[w].failed == 0, "waiter %d failed %zu", w, args[w].failed);
            CHECK(memcmp(bufs[w], data, (size_t)N * 65536) == 0, "bytes");
            free(bufs[w]);
        }
        (void)late;
    }
    /* submit and open after close are refused, not undefined */
    fm_reader *r = fm_reader_new(1, 0, 0);
    int fid = fm_open(r, path, 0, NULL);
    fm_reader_close(r);
    char c;
    fm_request q = {fid, 0, 0, 1, &c, 0};
    fm_batch *b = NULL;
    size_t bad;
    CHECK(fm_submit(r, &q, 1, 0, &b, &bad) == -ESHUTDOWN && b == NULL, "submit after close");
    CHECK(fm_open(r, path, 0, NULL) == -ESHUTDOWN, "open after close");
    fm_reader_close(r);
    fm_reader_free(r);
    printf("free while waiting ok\n");
}

/* a forked child must not hang on a batch whose reads belong to the parent's threads */
static void test_fork(void)
{
    /* one worker thread busy with a 48 MiB batch (whole-file reads, unsplit) at the fork: in the
     * child the item it holds never completes */
    enum { N = 16 };
    fm_reader *r = fm_reader_new(1, 0, 0);
    int fid = fm_open(r, path, 0, NULL);
    fm_request reqs[N];
    unsigned char *buf = malloc((size_t)N * fsize);
    for (int i = 0; i < N; i++)
        reqs[i] = (fm_request){fid, FM_REQ_VERIFY, 0, fsize, buf + (size_t)i * fsize, fm_crc32c(0, data, fsize)};
    fm_batch *b;
    size_t bad;
    CHECK(fm_submit(r, reqs, N, 0, &b, &bad) == 0, "submit");
    pid_t pid = fork();
    if (pid == 0) {
        alarm(10); /* a hang is a failure, not a stuck test */
        size_t failed = fm_wait(b);
        fm_batch_free(b);
        fm_request q = reqs[0];
        fm_batch *c = NULL;
        int rc = fm_submit(r, &q, 1, 0, &c, &bad);
        fm_reader_free(r);
        _exit(failed != 0 && failed != N ? 3 : rc != -ECHILD ? 4 : 0);
    }
    int st = 0;
    waitpid(pid, &st, 0);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "child: %s %d", WIFSIGNALED(st) ? "signal" : "exit",
          WIFSIGNALED(st) ? WTERMSIG(st) : WEXITSTATUS(st));
    CHECK(fm_wait(b) == 0, "parent reads");
    fm_batch_free(b);
    fm_reader_free(r);
    free(buf);
    printf("fork ok\n");
}

static int want(int argc, char **argv, const char *name)
{
    return argc < 2 || strcmp(argv[1], name) == 0; /* `test_fm_io NAME` runs one test */
}

int main(int argc, char **argv)
{
    make_file();
    if (want(argc, argv, "crc"))
        test_crc();
    if (want(argc, argv, "buffered")) {
        test_buffered(4, 1 << 16);
        test_buffered(1, 0);
        test_buffered(0, 4096);
    }
    if (want(argc, argv, "direct"))
        test_direct();
    if (want(argc, argv, "stress"))
        test_stress();
    if (want(argc, argv, "crc_large"))
        test_crc_large();
    if (want(argc, argv, "submit_overflow"))
        test_submit_overflow();
    if (want(argc, argv, "free_while_waiting"))
        test_free_while_waiting();
    if (want(argc, argv, "fork"))
        test_fork();
    void *p = fm_alloc_aligned(0, 4096);
    CHECK(p && ((uintptr_t)p % 4096) == 0, "alloc 0");
    fm_free_aligned(p);
    CHECK(fm_alloc_aligned(10, 3) == NULL && errno == EINVAL, "bad align");
    unlink(path);
    free(data);
    if (failures)
        fprintf(stderr, "%d check(s) failed\n", failures);
    else
        printf("all ok\n");
    return failures ? 1 : 0;
}
