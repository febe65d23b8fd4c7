/* fm_io: reader thread pool (see fm_io.h for the model and the contract).
 *
 * One mutex per reader guards the queue, the file table and all batch bookkeeping; it is never held
 * during I/O or checksumming. Work items are (request, chunk) pairs; a batch's items are handed out
 * in order, so the chunks of one request are read roughly together and the requests in submission
 * order. The queue is a list of batches sorted by priority (high first), FIFO within a priority.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* O_DIRECT */
#endif
#include "fm_io.h"
#include "crc32c.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#define MAX_PREAD ((uint64_t)1 << 30) /* Linux returns at most ~2 GiB per call anyway */

typedef struct fm_file {
    int fd;     /* -1 once closed */
    int direct;
    int64_t busy; /* requests of incomplete batches that read this file */
} fm_file;

typedef struct fm_item {
    uint32_t req;
    uint32_t crc; /* CRC-32C of this chunk, when the request is verified */
    uint64_t off; /* within the request */
    uint64_t len;
} fm_item;

typedef struct fm_reqstate {
    int fd;
    int direct;
    uint32_t remaining; /* chunks not completed */
    uint32_t first_item;
    uint32_t nitems;
} fm_reqstate;

struct fm_batch {
    fm_reader *r;
    fm_batch *next; /* in r->pending */
    int priority;
    int queued;
    size_t n;
    fm_request *reqs;
    fm_result *res;
    fm_reqstate *rs;
    size_t nitems;
    fm_item *items;
    size_t next_item; /* first unclaimed item */
    size_t req_left;  /* incomplete requests */
    size_t failed;
    atomic_int done;
};

struct fm_reader {
    pthread_mutex_t mu;
    pthread_cond_t cv_work; /* workers: a batch was queued, or stop */
    pthread_cond_t cv_done; /* waiters: some batch completed */
    int monotonic;          /* cv_done uses CLOCK_MONOTONIC */
    pthread_t *threads;
    int nthreads;
    int stop;
    int default_direct;
    uint64_t chunk;
    fm_batch *pending; /* batches with unclaimed items */
    size_t inflight;   /* batches not complete */
    fm_file *files;
    int nfiles, capfiles;
    int closed;          /* 0 open, 1 closing (draining), 2 closed */
    atomic_size_t refs;  /* the owner's (until fm_reader_free) + one per unreleased batch */
    pid_t pid;           /* the process that owns the threads (see foreign()) */
};

/* After fork() the child has a copy of the reader but none of its threads, and the mutex may have
 * been held by a thread that does not exist there: the child must neither lock nor wait. */
static int foreign(const fm_reader *r) { return getpid() != r->pid; }

/* Frees the memory once the owner and every batch have let go of it, so that a thread still in
 * fm_wait/fm_batch_free of a batch never touches a freed mutex or condition variable. */
static void reader_unref(fm_reader *r)
{
    if (atomic_fetch_sub_explicit(&r->refs, 1, memory_order_acq_rel) != 1)
        return;
    free(r->files);
    free(r->threads);
    if (!foreign(r)) { /* in a forked child they may be in an undefined state: leave them */
        pthread_cond_destroy(&r->cv_work);
        pthread_cond_destroy(&r->cv_done);
        pthread_mutex_destroy(&r->mu);
    }
    free(r);
}

enum { RUN = 0, SKIP_FAILED = 1, SKIP_CANCELLED = 2 };

typedef struct outcome {
    int status;
    int err;
    uint64_t err_offset;
    uint32_t crc;
    int skipped;
} outcome;

/* ------------------------------------------------------------------------------------ queue */

static void enqueue(fm_reader *r, fm_batch *b)
{
    fm_batch **pp = &r->pending;
    while (*pp && (*pp)->priority >= b->priority)
        pp = &(*pp)->next;
    b->next = *pp;
    *pp = b;
    b->queued = 1;
}

static void unlink_batch(fm_reader *r, fm_batch *b)
{
    if (!b->queued)
        return;
    for (fm_batch **pp = &r->pending; *pp; pp = &(*pp)->next) {
        if (*pp == b) {
            *pp = b->next;
            break;
        }
    }
    b->next = NULL;
    b->queued = 0;
}

/* Under r->mu. Takes the next item of b; *mode says whether it must really be read. */
static int claim(fm_reader *r, fm_batch *b, size_t *idx, int *mode)
{
    if (b->next_item >= b->nitems)
        return 0;
    size_t i = b->next_item++;
    if (b->next_item == b->nitems)
        unlink_batch(r, b);
    *idx = i;
    *mode = b->res[b->items[i].req].status != FM_OK ? SKIP_FAILED : RUN;
    return 1;
}

/* --------------------------------------------------------------------------------- execution */

static uint64_t file_end(int fd, uint64_t fallback)
{
    struct stat st;
    if (fstat(fd, &st) == 0 && st.st_size >= 0)
        return (uint64_t)st.st_size;
    return fallback;
}

/* No lock held: the item's memory belongs to this thread until complete(). */
static outcome run_item(const fm_batch *b, size_t i, int mode)
{
    outcome o = {FM_OK, 0, 0, 0, 0};
    if (mode == SKIP_CANCELLED) {
        o.status = FM_ERR_CANCELLED;
        return o;
    }
    if (mode == SKIP_FAILED) {
        o.skipped = 1;
        return o;
    }
    const fm_item *it = &b->items[i];
    const fm_request *rq = &b->reqs[it->req];
    const fm_reqstate *s = &b->rs[it->req];
    char *dst = (char *)rq->dest + it->off;
    uint64_t off = rq->offset + it->off, len = it->len, done = 0;

    while (done < len) {
        uint64_t want = len - done;
        if (want > MAX_PREAD)
            want = MAX_PREAD;
        ssize_t k = pread(s->fd, dst + done, (size_t)want, (off_t)(off + done));
        if (k < 0) {
            if (errno == EINTR)
                continue;
            o.status = FM_ERR_OS;
            o.err = errno;
            o.err_offset = off + done;
            return o;
        }
        if (k == 0) {
            o.status = FM_ERR_SHORT;
            o.err_offset = file_end(s->fd, off + done);
            return o;
        }
        done += (uint64_t)k;
        if (s->direct && ((uint64_t)k % FM_DIRECT_ALIGN) != 0 && done < len) {
            /* O_DIRECT returns a partial block only at end of file; the next pread would be
             * misaligned (EINVAL), so report the short read now. */
            o.status = FM_ERR_SHORT;
            o.err_offset = file_end(s->fd, off + done);
            return o;
        }
    }
    if (rq->flags & FM_REQ_VERIFY)
        o.crc = fm_crc32c(0, dst, (size_t)len);
    return o;
}

/* Under r->mu. Records an item's outcome; finishes its request and batch when they are done. */
static void complete(fm_reader *r, fm_batch *b, size_t i, const outcome *o)
{
    fm_item *it = &b->items[i];
    fm_result *res = &b->res[it->req];
    fm_reqstate *s = &b->rs[it->req];
    const fm_request *rq = &b->reqs[it->req];

    it->crc = o->crc;
    if (!o->skipped && o->status != FM_OK) {
        /* keep one error per request: a real error beats a cancellation; among real errors the
         * lowest file offset wins (it is the first thing wrong in the record) */
        int replace = res->status == FM_OK ||
                      (res->status == FM_ERR_CANCELLED && o->status != FM_ERR_CANCELLED) ||
                      (o->status != FM_ERR_CANCELLED && o->err_offset < res->err_offset);
        if (replace) {
            res->status = o->status;
            res->err = o->err;
            res->err_offset = o->err_offset;
        }
    }
    if (--s->remaining > 0)
        return;

    /* request complete */
    if (res->status == FM_OK && (rq->flags & FM_REQ_VERIFY)) {
        const fm_item *its = &b->items[s->first_item];
        uint32_t crc = its[0].crc;
        for (uint32_t k = 1; k < s->nitems; k++)
            crc = fm_crc32c_combine(crc, its[k].crc, its[k].len);
        res->crc = crc;
        if (crc != rq->crc)
            res->status = FM_ERR_CHECKSUM;
    }
    if (res->status != FM_OK)
        b->failed++;
    if (rq->file >= 0 && rq->file < r->nfiles)
        r->files[rq->file].busy--;
    if (--b->req_left == 0) {
        atomic_store_explicit(&b->done, 1, memory_order_release);
        r->inflight--;
        pthread_cond_broadcast(&r->cv_done);
    }
}

static void *worker(void *arg)
{
    fm_reader *r = (fm_reader *)arg;
    pthread_mutex_lock(&r->mu);
    for (;;) {
        while (!r->stop && !r->pending)
            pthread_cond_wait(&r->cv_work, &r->mu);
        if (!r->pending)
            break; /* stop, and nothing left */
        fm_batch *b = r->pending;
        size_t i;
        int mode;
        if (!claim(r, b, &i, &mode))
            continue; /* cannot happen: a pending batch has unclaimed items */
        pthread_mutex_unlock(&r->mu);
        outcome o = run_item(b, i, mode);
        pthread_mutex_lock(&r->mu);
        complete(r, b, i, &o);
    }
    pthread_mutex_unlock(&r->mu);
    return NULL;
}

/* ------------------------------------------------------------------------------------ reader */

fm_reader *fm_reader_new(int nthreads, int direct, uint64_t chunk_bytes)
{
    if (nthreads < 0 || nthreads > 1024) {
        errno = EINVAL;
        return NULL;
    }
    fm_reader *r = (fm_reader *)calloc(1, sizeof(*r));
    if (!r)
        return NULL;
    r->default_direct = direct ? 1 : 0;
    atomic_init(&r->refs, 1);
    r->pid = getpid();
    if (chunk_bytes)
        chunk_bytes = (chunk_bytes + FM_DIRECT_ALIGN - 1) / FM_DIRECT_ALIGN * FM_DIRECT_ALIGN;
    r->chunk = chunk_bytes;
    pthread_mutex_init(&r->mu, NULL);
    pthread_cond_init(&r->cv_work, NULL);
#if defined(__linux__) || defined(__FreeBSD__)
    {
        pthread_condattr_t ca;
        pthread_condattr_init(&ca);
        r->monotonic = pthread_condattr_setclock(&ca, CLOCK_MONOTONIC) == 0;
        pthread_cond_init(&r->cv_done, &ca);
        pthread_condattr_destroy(&ca);
    }
#else
    pthread_cond_init(&r->cv_done, NULL);
#endif
    if (nthreads > 0) {
        r->threads = (pthread_t *)calloc((size_t)nthreads, sizeof(pthread_t));
        if (!r->threads) {
            fm_reader_free(r);
            errno = ENOMEM;
            return NULL;
        }
        /* workers block all signals: they belong to the application's main thread */
        sigset_t all, old;
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old);
        for (int t = 0; t < nthreads; t++) {
            int rc = pthread_create(&r->threads[t], NULL, worker, r);
            if (rc != 0) {
                pthread_sigmask(SIG_SETMASK, &old, NULL);
                fm_reader_free(r);
                errno = rc;
                return NULL;
            }
            r->nthreads++;
        }
        pthread_sigmask(SIG_SETMASK, &old, NULL);
    }
    return r;
}

void fm_reader_close(fm_reader *r)
{
    if (!r)
        return;
    if (foreign(r)) { /* no threads to stop here: close this process's descriptors */
        if (r->closed != 2)
            for (int f = 0; f < r->nfiles; f++)
                if (r->files[f].fd >= 0)
                    close(r->files[f].fd), r->files[f].fd = -1;
        r->closed = 2;
        return;
    }
    pthread_mutex_lock(&r->mu);
    if (r->closed) { /* another thread closes it (or did): wait until it is done */
        while (r->closed != 2)
            pthread_cond_wait(&r->cv_done, &r->mu);
        pthread_mutex_unlock(&r->mu);
        return;
    }
    r->closed = 1; /* fm_submit and fm_open refuse from now on */
    /* drain: help with queued work (there may be no worker threads), then wait for the rest */
    while (r->inflight > 0) {
        if (r->pending) {
            fm_batch *b = r->pending;
            size_t i;
            int mode;
            if (claim(r, b, &i, &mode)) {
                pthread_mutex_unlock(&r->mu);
                outcome o = run_item(b, i, mode);
                pthread_mutex_lock(&r->mu);
                complete(r, b, i, &o);
            }
            continue;
        }
        pthread_cond_wait(&r->cv_done, &r->mu);
    }
    r->stop = 1;
    pthread_cond_broadcast(&r->cv_work);
    pthread_mutex_unlock(&r->mu);
    for (int t = 0; t < r->nthreads; t++)
        pthread_join(r->threads[t], NULL);
    pthread_mutex_lock(&r->mu);
    for (int f = 0; f < r->nfiles; f++)
        if (r->files[f].fd >= 0)
            close(r->files[f].fd), r->files[f].fd = -1;
    r->closed = 2;
    pthread_cond_broadcast(&r->cv_done);
    pthread_mutex_unlock(&r->mu);
}

void fm_reader_free(fm_reader *r)
{
    if (!r)
        return;
    fm_reader_close(r);
    reader_unref(r);
}

int fm_reader_nthreads(const fm_reader *r) { return r->nthreads; }

uint64_t fm_reader_chunk_bytes(const fm_reader *r) { return r->chunk; }

/* ------------------------------------------------------------------------------------- files */

int fm_open(fm_reader *r, const char *path, int direct, int *is_direct)
{
    int want = direct < 0 ? r->default_direct : (direct != 0);
    int got = 0, fd = -1;
    int flags = O_RDONLY;
#ifdef O_CLOEXEC
    flags |= O_CLOEXEC;
#endif
#if defined(O_DIRECT)
    if (want) {
        fd = open(path, flags | O_DIRECT);
        if (fd >= 0)
            got = 1;
        else if (errno == EINVAL) /* the filesystem refuses O_DIRECT (tmpfs, some FUSE) */
            fd = open(path, flags);
    } else {
        fd = open(path, flags);
    }
#else
    fd = open(path, flags);
#if defined(F_NOCACHE)
    if (fd >= 0 && want && fcntl(fd, F_NOCACHE, 1) == 0)
        got = 1;
#endif
#endif
    if (fd < 0)
        return -errno;
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    if (S_ISDIR(st.st_mode)) {
        close(fd);
        return -EISDIR;
    }

    pthread_mutex_lock(&r->mu);
    if (r->closed) {
        pthread_mutex_unlock(&r->mu);
        close(fd);
        return -ESHUTDOWN;
    }
    if (r->nfiles == r->capfiles) {
        int cap = r->capfiles ? 2 * r->capfiles : 16;
        fm_file *nf = (fm_file *)realloc(r->files, (size_t)cap * sizeof(fm_file));
        if (!nf) {
            pthread_mutex_unlock(&r->mu);
            close(fd);
            return -ENOMEM;
        }
        r->files = nf;
        r->capfiles = cap;
    }
    int id = r->nfiles++;
    r->files[id].fd = fd;
    r->files[id].direct = got;
    r->files[id].busy = 0;
    pthread_mutex_unlock(&r->mu);
    if (is_direct)
        *is_direct = got;
    return id;
}

/* Under r->mu. */
static fm_file *lookup(fm_reader *r, int file)
{
    if (file < 0 || file >= r->nfiles || r->files[file].fd < 0)
        return NULL;
    return &r->files[file];
}

int fm_close_file(fm_reader *r, int file)
{
    int rc = 0;
    pthread_mutex_lock(&r->mu);
    fm_file *f = lookup(r, file);
    if (!f)
        rc = -EBADF;
    else if (f->busy > 0)
        rc = -EBUSY;
    else {
        close(f->fd);
        f->fd = -1;
    }
    pthread_mutex_unlock(&r->mu);
    return rc;
}

int fm_file_direct(fm_reader *r, int file)
{
    pthread_mutex_lock(&r->mu);
    fm_file *f = lookup(r, file);
    int rc = f ? f->direct : -EBADF;
    pthread_mutex_unlock(&r->mu);
    return rc;
}

int64_t fm_file_size(fm_reader *r, int file)
{
    pthread_mutex_lock(&r->mu);
    fm_file *f = lookup(r, file);
    int64_t rc;
    struct stat st;
    if (!f)
        rc = -EBADF;
    else if (fstat(f->fd, &st) != 0)
        rc = -errno;
    else
        rc = (int64_t)st.st_size;
    pthread_mutex_unlock(&r->mu);
    return rc;
}

int fm_file_evict(fm_reader *r, int file)
{
    pthread_mutex_lock(&r->mu);
    fm_file *f = lookup(r, file);
    int rc;
    if (!f)
        rc = -EBADF;
    else {
#if defined(POSIX_FADV_DONTNEED)
        rc = -posix_fadvise(f->fd, 0, 0, POSIX_FADV_DONTNEED);
#else
        rc = -ENOSYS;
#endif
    }
    pthread_mutex_unlock(&r->mu);
    return rc;
}

/* ----------------------------------------------------------------------------------- batches */

static void batch_release(fm_batch *b)
{
    fm_reader *r = b->r;
    free(b->reqs);
    free(b->res);
    free(b->rs);
    free(b->items);
    free(b);
    reader_unref(r);
}

int fm_submit(fm_reader *r, const fm_request *reqs, size_t n, int priority, fm_batch **out, size_t *bad_index)
{
    *out = NULL;
    if (bad_index)
        *bad_index = 0;
    if (n > UINT32_MAX)
        return -EINVAL;
    if (foreign(r))
        return -ECHILD;
    fm_batch *b = (fm_batch *)calloc(1, sizeof(*b));
    if (!b)
        return -ENOMEM;
    atomic_fetch_add_explicit(&r->refs, 1, memory_order_relaxed);
    b->r = r;
    b->priority = priority;
    b->n = n;
    b->req_left = n;
    atomic_init(&b->done, 0);

    /* count the chunks (no lock needed) */
    uint64_t chunk = r->chunk, nitems = 0;
    for (size_t i = 0; i < n; i++) {
        const fm_request *q = &reqs[i];
        if ((q->nbytes > 0 && !q->dest) || q->nbytes > (uint64_t)INT64_MAX ||
            q->offset > (uint64_t)INT64_MAX - q->nbytes) {
            if (bad_index)
                *bad_index = i;
            batch_release(b);
            return -EINVAL;
        }
        /* checked per request: a sum checked once at the end can wrap (then too few items
         * would be allocated and written past) */
        nitems += (chunk && q->nbytes > chunk) ? (q->nbytes + chunk - 1) / chunk : 1;
        if (nitems > UINT32_MAX) {
            if (bad_index)
                *bad_index = i;
            batch_release(b);
            return -EINVAL;
        }
    }
    size_t m = n ? n : 1;
    b->reqs = (fm_request *)malloc(m * sizeof(fm_request));
    b->res = (fm_result *)calloc(m, sizeof(fm_result));
    b->rs = (fm_reqstate *)calloc(m, sizeof(fm_reqstate));
    b->items = (fm_item *)malloc((nitems ? nitems : 1) * sizeof(fm_item));
    if (!b->reqs || !b->res || !b->rs || !b->items) {
        batch_release(b);
        return -ENOMEM;
    }
    if (n)
        memcpy(b->reqs, reqs, n * sizeof(fm_request));
    b->nitems = (size_t)nitems;
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t len = b->reqs[i].nbytes;
        uint64_t step = (chunk && len > chunk) ? chunk : (len ? len : 1);
        b->rs[i].first_item = (uint32_t)k;
        uint64_t off = 0;
        do {
            b->items[k].req = (uint32_t)i;
            b->items[k].crc = 0;
            b->items[k].off = off;
            b->items[k].len = len - off < step ? len - off : step;
            k++;
            off += step;
        } while (off < len);
        b->rs[i].nitems = (uint32_t)(k - b->rs[i].first_item);
        b->rs[i].remaining = b->rs[i].nitems;
    }

    pthread_mutex_lock(&r->mu);
    if (r->closed) {
        pthread_mutex_unlock(&r->mu);
        batch_release(b);
        return -ESHUTDOWN;
    }
    for (size_t i = 0; i < n; i++) {
        const fm_request *q = &b->reqs[i];
        fm_file *f = lookup(r, q->file);
        int rc = 0;
        if (!f)
            rc = -EBADF;
        else if (f->direct && ((q->offset | q->nbytes | (uint64_t)(uintptr_t)q->dest) % FM_DIRECT_ALIGN) != 0)
            rc = -EINVAL;
        if (rc) {
            pthread_mutex_unlock(&r->mu);
            if (bad_index)
                *bad_index = i;
            batch_release(b);
            return rc;
        }
        b->rs[i].fd = f->fd;
        b->rs[i].direct = f->direct;
    }
    for (size_t i = 0; i < n; i++)
        r->files[b->reqs[i].file].busy++;
    if (n == 0) {
        atomic_store_explicit(&b->done, 1, memory_order_release);
    } else {
        r->inflight++;
        enqueue(r, b);
        pthread_cond_broadcast(&r->cv_work);
    }
    pthread_mutex_unlock(&r->mu);
    *out = b;
    return 0;
}

static void deadline_after(const fm_reader *r, int64_t ms, struct timespec *ts)
{
    clock_gettime(r->monotonic ? CLOCK_MONOTONIC : CLOCK_REALTIME, ts);
    ts->tv_sec += (time_t)(ms / 1000);
    ts->tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000L;
    }
}

static int past(const fm_reader *r, const struct timespec *ts)
{
    struct timespec now;
    clock_gettime(r->monotonic ? CLOCK_MONOTONIC : CLOCK_REALTIME, &now);
    return now.tv_sec > ts->tv_sec || (now.tv_sec == ts->tv_sec && now.tv_nsec >= ts->tv_nsec);
}

/* timeout_ms < 0: forever. Returns 1 when the batch is complete. */
static int wait_batch(fm_batch *b, int64_t timeout_ms)
{
    if (atomic_load_explicit(&b->done, memory_order_acquire))
        return 1;
    fm_reader *r = b->r;
    if (foreign(r))
        return 0; /* its reads belonged to the parent's threads: it never completes here */
    struct timespec deadline;
    if (timeout_ms >= 0)
        deadline_after(r, timeout_ms, &deadline);
    pthread_mutex_lock(&r->mu);
    while (!atomic_load_explicit(&b->done, memory_order_relaxed)) {
        size_t i;
        int mode;
        if (claim(r, b, &i, &mode)) {
            pthread_mutex_unlock(&r->mu);
            outcome o = run_item(b, i, mode);
            pthread_mutex_lock(&r->mu);
            complete(r, b, i, &o);
            if (timeout_ms >= 0 && past(r, &deadline))
                break;
            continue;
        }
        if (timeout_ms < 0) {
            pthread_cond_wait(&r->cv_done, &r->mu);
        } else if (pthread_cond_timedwait(&r->cv_done, &r->mu, &deadline) == ETIMEDOUT) {
            break;
        }
    }
    int done = atomic_load_explicit(&b->done, memory_order_relaxed);
    pthread_mutex_unlock(&r->mu);
    return done;
}

size_t fm_wait(fm_batch *b)
{
    if (!wait_batch(b, -1))
        return b->n; /* a forked child: nothing of it is read */
    return b->failed;
}

int fm_wait_timeout(fm_batch *b, int64_t timeout_ms)
{
    return wait_batch(b, timeout_ms < 0 ? 0 : timeout_ms);
}

int fm_poll(const fm_batch *b)
{
    return atomic_load_explicit(&((fm_batch *)b)->done, memory_order_acquire);
}

size_t fm_cancel(fm_batch *b)
{
    if (atomic_load_explicit(&b->done, memory_order_acquire) || foreign(b->r))
        return 0;
    fm_reader *r = b->r;
    size_t affected = 0;
    uint32_t last = UINT32_MAX;
    pthread_mutex_lock(&r->mu);
    while (b->next_item < b->nitems) {
        size_t i = b->next_item++;
        if (b->items[i].req != last) {
            last = b->items[i].req;
            affected++;
        }
        outcome o = run_item(b, i, SKIP_CANCELLED);
        complete(r, b, i, &o);
    }
    unlink_batch(r, b);
    pthread_mutex_unlock(&r->mu);
    return affected;
}

size_t fm_batch_size(const fm_batch *b) { return b->n; }

const fm_result *fm_batch_results(const fm_batch *b) { return b->res; }

void fm_batch_free(fm_batch *b)
{
    if (!b)
        return;
    wait_batch(b, -1);
    batch_release(b);
}

int64_t fm_read(fm_reader *r, const fm_request *reqs, size_t n, fm_result *results, size_t *bad_index)
{
    fm_batch *b;
    int rc = fm_submit(r, reqs, n, 1, &b, bad_index);
    if (rc < 0)
        return rc;
    size_t failed = fm_wait(b);
    if (results && n)
        memcpy(results, b->res, n * sizeof(fm_result));
    batch_release(b);
    return (int64_t)failed;
}

/* ------------------------------------------------------------------------------------ memory */

void *fm_alloc_aligned(size_t nbytes, size_t align)
{
    void *p = NULL;
    if (align < sizeof(void *) || (align & (align - 1)) != 0) {
        errno = EINVAL;
        return NULL;
    }
    int rc = posix_memalign(&p, align, nbytes ? nbytes : align);
    if (rc != 0) {
        errno = rc;
        return NULL;
    }
    return p;
}

void fm_free_aligned(void *p) { free(p); }
