/* ClaudeFS: a thin C shim over libfabric (the `fi_*` calls are static inline functions in
 * the headers, so Rust cannot call them directly). libfabric itself is loaded at run time
 * with dlopen: a binary built here starts on a machine without libfabric and falls back to
 * TCP. Every function returns 0 or a negative libfabric error code (-FI_E*), and writes a
 * message into `err` when it fails. Objects are opaque to Rust (see src/ofi/sys.rs). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <rdma/fabric.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_errno.h>
#include <rdma/fi_rma.h>

typedef int (*getinfo_fn)(uint32_t, const char *, const char *, uint64_t,
                          const struct fi_info *, struct fi_info **);
typedef void (*freeinfo_fn)(struct fi_info *);
typedef struct fi_info *(*dupinfo_fn)(const struct fi_info *);
typedef int (*fabric_fn)(struct fi_fabric_attr *, struct fid_fabric **, void *);
typedef const char *(*strerror_fn)(int);

static struct {
    pthread_once_t once;
    int loaded;
    char why[256];
    getinfo_fn getinfo;
    freeinfo_fn freeinfo;
    dupinfo_fn dupinfo;
    fabric_fn fabric;
    strerror_fn strerror;
} lib = {PTHREAD_ONCE_INIT, 0, "", 0, 0, 0, 0, 0};

static void load_once(void) {
    void *h = dlopen("libfabric.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        snprintf(lib.why, sizeof lib.why, "libfabric is not installed (%s)", dlerror());
        return;
    }
    lib.getinfo = (getinfo_fn)dlsym(h, "fi_getinfo");
    lib.freeinfo = (freeinfo_fn)dlsym(h, "fi_freeinfo");
    lib.dupinfo = (dupinfo_fn)dlsym(h, "fi_dupinfo");
    lib.fabric = (fabric_fn)dlsym(h, "fi_fabric");
    lib.strerror = (strerror_fn)dlsym(h, "fi_strerror");
    if (!lib.getinfo || !lib.freeinfo || !lib.dupinfo || !lib.fabric || !lib.strerror) {
        snprintf(lib.why, sizeof lib.why, "libfabric.so.1 lacks fi_getinfo/fi_fabric/...");
        return;
    }
    lib.loaded = 1;
}

static void set_err(char *err, size_t errlen, const char *what, int rc) {
    if (err && errlen)
        snprintf(err, errlen, "%s: %s (%d)", what, lib.loaded ? lib.strerror(-rc) : "?", rc);
}

/* libfabric's initialisation (seen with the tcp and rxm providers of Debian's 1.x) installs
 * handlers for these signals that clean up and exit(1): a SIGTERM would then end the program
 * without its own orderly shutdown. The program owns its signals: what was there before a call
 * into libfabric that may initialise providers is put back after it. */
static const int kept_signals[] = {SIGINT, SIGTERM, SIGHUP, SIGSEGV, SIGBUS, SIGILL, SIGABRT};
#define NKEPT (sizeof kept_signals / sizeof kept_signals[0])

static void save_signals(struct sigaction *saved) {
    for (size_t i = 0; i < NKEPT; i++) sigaction(kept_signals[i], NULL, &saved[i]);
}

static void restore_signals(const struct sigaction *saved) {
    for (size_t i = 0; i < NKEPT; i++) sigaction(kept_signals[i], &saved[i], NULL);
}

int cfs_ofi_load(char *err, size_t errlen) {
    struct sigaction saved[NKEPT];
    save_signals(saved);
    pthread_once(&lib.once, load_once);
    restore_signals(saved);
    if (!lib.loaded) {
        if (err && errlen) snprintf(err, errlen, "%s", lib.why);
        return -FI_ENOSYS;
    }
    return 0;
}

struct cfs_ofi {
    struct fi_info *info;
    struct fid_fabric *fabric;
    struct fid_domain *domain;
    struct fid_av *av;
    struct fid_cq *cq;
    struct fid_ep *ep;
};

void cfs_ofi_close(struct cfs_ofi *o) {
    if (!o) return;
    if (o->ep) fi_close(&o->ep->fid);
    if (o->cq) fi_close(&o->cq->fid);
    if (o->av) fi_close(&o->av->fid);
    if (o->domain) fi_close(&o->domain->fid);
    if (o->fabric) fi_close(&o->fabric->fid);
    if (o->info) lib.freeinfo(o->info);
    free(o);
}

/* Opens a reliable-datagram endpoint of provider `prov` (NULL: the first that offers RMA) on
 * the address `node` (e.g. "127.0.0.1"). */
static int open_endpoint(const char *prov, const char *node, struct cfs_ofi **out, char *err,
                         size_t errlen);

int cfs_ofi_open(const char *prov, const char *node, struct cfs_ofi **out, char *err,
                 size_t errlen) {
    struct sigaction saved[NKEPT];
    save_signals(saved);
    int rc = open_endpoint(prov, node, out, err, errlen);
    restore_signals(saved);
    return rc;
}

static int open_endpoint(const char *prov, const char *node, struct cfs_ofi **out, char *err,
                         size_t errlen) {
    int rc = cfs_ofi_load(err, errlen);
    if (rc) return rc;
    struct fi_info *hints = lib.dupinfo(NULL);
    if (!hints) {
        set_err(err, errlen, "fi_dupinfo", -FI_ENOMEM);
        return -FI_ENOMEM;
    }
    hints->caps = FI_MSG | FI_RMA | FI_READ | FI_REMOTE_READ;
    hints->ep_attr->type = FI_EP_RDM;
    hints->domain_attr->mr_mode =
        FI_MR_LOCAL | FI_MR_VIRT_ADDR | FI_MR_ALLOCATED | FI_MR_PROV_KEY | FI_MR_ENDPOINT;
    hints->domain_attr->threading = FI_THREAD_DOMAIN;
    hints->mode = FI_CONTEXT;
    if (prov) hints->fabric_attr->prov_name = strdup(prov);
    struct fi_info *info = NULL;
    rc = lib.getinfo(FI_VERSION(1, 9), node, NULL, node ? FI_SOURCE : 0, hints, &info);
    lib.freeinfo(hints);
    if (rc) {
        set_err(err, errlen, "fi_getinfo", rc);
        return rc;
    }
    struct cfs_ofi *o = calloc(1, sizeof *o);
    if (!o) {
        lib.freeinfo(info);
        set_err(err, errlen, "calloc", -FI_ENOMEM);
        return -FI_ENOMEM;
    }
    o->info = lib.dupinfo(info); /* the first match only */
    lib.freeinfo(info);
    if (!o->info) {
        free(o);
        set_err(err, errlen, "fi_dupinfo", -FI_ENOMEM);
        return -FI_ENOMEM;
    }
    if (o->info->next) {
        lib.freeinfo(o->info->next);
        o->info->next = NULL;
    }
    const char *step = "fi_fabric";
    rc = lib.fabric(o->info->fabric_attr, &o->fabric, NULL);
    if (!rc) { step = "fi_domain"; rc = fi_domain(o->fabric, o->info, &o->domain, NULL); }
    if (!rc) {
        struct fi_av_attr av_attr = {.type = FI_AV_MAP};
        step = "fi_av_open";
        rc = fi_av_open(o->domain, &av_attr, &o->av, NULL);
    }
    if (!rc) {
        struct fi_cq_attr cq_attr = {.format = FI_CQ_FORMAT_MSG, .size = 1024};
        step = "fi_cq_open";
        rc = fi_cq_open(o->domain, &cq_attr, &o->cq, NULL);
    }
    if (!rc) { step = "fi_endpoint"; rc = fi_endpoint(o->domain, o->info, &o->ep, NULL); }
    if (!rc) { step = "fi_ep_bind(av)"; rc = fi_ep_bind(o->ep, &o->av->fid, 0); }
    if (!rc) {
        step = "fi_ep_bind(cq)";
        rc = fi_ep_bind(o->ep, &o->cq->fid, FI_TRANSMIT | FI_RECV);
    }
    if (!rc) { step = "fi_enable"; rc = fi_enable(o->ep); }
    if (rc) {
        set_err(err, errlen, step, rc);
        cfs_ofi_close(o);
        return rc;
    }
    *out = o;
    return 0;
}

const char *cfs_ofi_provider(const struct cfs_ofi *o) { return o->info->fabric_attr->prov_name; }
const char *cfs_ofi_domain_name(const struct cfs_ofi *o) { return o->info->domain_attr->name; }
uint64_t cfs_ofi_mr_mode(const struct cfs_ofi *o) { return (uint64_t)o->info->domain_attr->mr_mode; }
uint64_t cfs_ofi_max_msg(const struct cfs_ofi *o) { return (uint64_t)o->info->ep_attr->max_msg_size; }

int cfs_ofi_name(struct cfs_ofi *o, void *buf, size_t *len, char *err, size_t errlen) {
    int rc = fi_getname(&o->ep->fid, buf, len);
    if (rc) set_err(err, errlen, "fi_getname", rc);
    return rc;
}

int cfs_ofi_av_insert(struct cfs_ofi *o, const void *addr, uint64_t *fi_addr, char *err,
                      size_t errlen) {
    fi_addr_t a = FI_ADDR_UNSPEC;
    int n = fi_av_insert(o->av, addr, 1, &a, 0, NULL);
    if (n != 1) {
        int rc = n < 0 ? n : -FI_EINVAL;
        set_err(err, errlen, "fi_av_insert", rc);
        return rc;
    }
    *fi_addr = (uint64_t)a;
    return 0;
}

int cfs_ofi_av_remove(struct cfs_ofi *o, uint64_t fi_addr) {
    fi_addr_t a = (fi_addr_t)fi_addr;
    return fi_av_remove(o->av, &a, 1, 0);
}

/* Registers `len` bytes at `buf`: for local use (the target of our reads) and/or remote reads
 * by peers (`remote`). Binds it to the endpoint when the provider wants that. */
int cfs_ofi_mr_reg(struct cfs_ofi *o, void *buf, size_t len, int remote, uint64_t requested_key,
                   struct fid_mr **mr, uint64_t *key, void **desc, char *err, size_t errlen) {
    uint64_t access = FI_READ | (remote ? FI_REMOTE_READ : 0);
    int rc = fi_mr_reg(o->domain, buf, len, access, 0, requested_key, 0, mr, NULL);
    if (rc) {
        set_err(err, errlen, "fi_mr_reg", rc);
        return rc;
    }
    if (o->info->domain_attr->mr_mode & FI_MR_ENDPOINT) {
        rc = fi_mr_bind(*mr, &o->ep->fid, 0);
        if (!rc) rc = fi_mr_enable(*mr);
        if (rc) {
            set_err(err, errlen, "fi_mr_bind/enable", rc);
            fi_close(&(*mr)->fid);
            *mr = NULL;
            return rc;
        }
    }
    *key = fi_mr_key(*mr);
    *desc = fi_mr_desc(*mr);
    return 0;
}

int cfs_ofi_mr_close(struct fid_mr *mr) { return fi_close(&mr->fid); }

/* Posts a one-sided read of `len` bytes at the peer's (`addr`, `key`) into `buf` (registered,
 * `desc`). `ctx` must stay valid until its completion is read (at least sizeof(struct
 * fi_context) bytes: FI_CONTEXT mode). -FI_EAGAIN: the queue is full, poll and retry. */
ssize_t cfs_ofi_read(struct cfs_ofi *o, void *buf, size_t len, void *desc, uint64_t peer,
                     uint64_t addr, uint64_t key, void *ctx) {
    return fi_read(o->ep, buf, len, desc, (fi_addr_t)peer, addr, key, ctx);
}

/* Posts a two-sided send of `buf` (registered, `desc`) to the peer; `ctx` as for reads. */
ssize_t cfs_ofi_send(struct cfs_ofi *o, void *buf, size_t len, void *desc, uint64_t peer,
                     void *ctx) {
    return fi_send(o->ep, buf, len, desc, (fi_addr_t)peer, ctx);
}

/* Posts a receive buffer for a message from any peer; `ctx` as for reads. */
ssize_t cfs_ofi_recv(struct cfs_ofi *o, void *buf, size_t len, void *desc, void *ctx) {
    return fi_recv(o->ep, buf, len, desc, FI_ADDR_UNSPEC, ctx);
}

size_t cfs_ofi_context_size(void) { return sizeof(struct fi_context); }

/* Reads up to `count` completions: their contexts into `ctxs`, the bytes a receive got into
 * `lens`, and 0 into `errs`; a failed operation gives its context and a negative error code
 * (its message into `err`). Returns the number of entries, 0 if none, or a negative error. */
ssize_t cfs_ofi_cq_read(struct cfs_ofi *o, void **ctxs, size_t *lens, int *errs, size_t count,
                        char *err, size_t errlen) {
    struct fi_cq_msg_entry entries[64];
    if (count > 64) count = 64;
    ssize_t n = fi_cq_read(o->cq, entries, count);
    if (n == -FI_EAGAIN) return 0;
    if (n == -FI_EAVAIL) {
        struct fi_cq_err_entry e;
        memset(&e, 0, sizeof e);
        ssize_t r = fi_cq_readerr(o->cq, &e, 0);
        if (r < 0) {
            set_err(err, errlen, "fi_cq_readerr", (int)r);
            return r;
        }
        ctxs[0] = e.op_context;
        lens[0] = 0;
        errs[0] = e.err ? -e.err : -FI_EOTHER;
        if (err && errlen)
            snprintf(err, errlen, "%s", fi_cq_strerror(o->cq, e.prov_errno, e.err_data, NULL, 0));
        return 1;
    }
    if (n < 0) {
        set_err(err, errlen, "fi_cq_read", (int)n);
        return n;
    }
    for (ssize_t i = 0; i < n; i++) {
        ctxs[i] = entries[i].op_context;
        lens[i] = entries[i].len;
        errs[i] = 0;
    }
    return n;
}

const char *cfs_ofi_strerror(int rc) { return lib.loaded ? lib.strerror(-rc) : "libfabric not loaded"; }
