/* SIGBUS guard for mappings of objects the server does not own.

       slot = _sigbus_guard.guard(address, length)   # after mmap of a client's object
       ... any load or store in [address, address + length) ...
       if _sigbus_guard.faulted(slot): fail the call   # the object shrank under us
       _sigbus_guard.unguard(slot)                     # before munmap

   A client can truncate (or punch a hole in) an object the server has mapped; the next access to a page
   that no longer has backing raises SIGBUS, whose default action kills the whole daemon. The handler
   below looks the faulting address up in a fixed table of guarded ranges; on a hit it maps anonymous zero
   pages over the whole range (MAP_FIXED replaces the object's pages in place), marks the slot faulted and
   returns, so the faulting instruction retries on memory that can no longer fault. The call that was
   reading gets zeros and is failed afterwards by whoever checks `faulted`. This is what Wayland
   compositors do for client shm pools. A fault outside every guarded range goes to the handler that was
   installed before (or to the default action, which kills as before).

   The handler only reads atomics and calls mmap/sigaction, which are plain system calls; it takes no
   lock, so a fault in a thread that holds the GIL or a malloc lock cannot deadlock. Slots are written
   only by Python callers holding the GIL, so writers never race each other. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* The registry's default max_regions is 1024; room for several times that keeps `guard` from being the
   limit an operator meets first, and a scan of 16384 entries on a fault (a rare event) costs microseconds. */
#define SLOTS 16384

typedef struct {
    _Atomic uintptr_t start; /* 0: slot free */
    _Atomic size_t length;
    _Atomic int faulted;
} Slot;

static Slot slots[SLOTS];
static _Atomic int slots_used; /* high-water mark: the handler scans [0, slots_used) */
static struct sigaction previous;
static int installed;
static size_t page_size;

static void die_as_before(int sig, const siginfo_t *info) {
    /* No earlier handler: put the default action back. A fault retries on return and kills the process
       as it would have without us; a SIGBUS sent with kill() is sent again, so it kills too. */
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(SIGBUS, &dfl, NULL);
    if (info == NULL || info->si_code <= 0) {
        raise(sig);
    }
}

static void on_sigbus(int sig, siginfo_t *info, void *context) {
    /* si_code <= 0: sent by kill/raise, not a memory fault; si_addr means nothing then. */
    if (info != NULL && info->si_code > 0) {
        uintptr_t address = (uintptr_t)info->si_addr;
        int used = atomic_load_explicit(&slots_used, memory_order_acquire);
        for (int i = 0; i < used; i++) {
            uintptr_t start = atomic_load_explicit(&slots[i].start, memory_order_acquire);
            if (start == 0) {
                continue;
            }
            size_t length = atomic_load_explicit(&slots[i].length, memory_order_relaxed);
            if (address - start < length) {
                void *replaced = mmap((void *)start, length, PROT_READ | PROT_WRITE,
                                      MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
                if (replaced != MAP_FAILED) {
                    atomic_store_explicit(&slots[i].faulted, 1, memory_order_release);
                    return;
                }
                break;
            }
        }
    }
    if (previous.sa_flags & SA_SIGINFO) {
        if (previous.sa_sigaction != NULL) {
            previous.sa_sigaction(sig, info, context);
            return;
        }
    } else if (previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN) {
        previous.sa_handler(sig);
        return;
    }
    /* SIG_IGN is no choice for a fault (the access would retry forever), so it is treated as SIG_DFL. */
    die_as_before(sig, info);
}

/* Installed at the first guard, not at import, so a handler set up at start (faulthandler) becomes the
   one a fault outside our ranges is passed to, rather than one that sees our faults first. */
static int install(void) {
    if (installed) {
        return 0;
    }
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = on_sigbus;
    action.sa_flags = SA_SIGINFO | SA_RESTART | SA_ONSTACK;
    sigemptyset(&action.sa_mask);
    if (sigaction(SIGBUS, &action, &previous) != 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    installed = 1;
    return 0;
}

static PyObject *guard(PyObject *Py_UNUSED(module), PyObject *args) {
    unsigned long long address, length;
    if (!PyArg_ParseTuple(args, "KK:guard", &address, &length)) {
        return NULL;
    }
    if (address == 0 || length == 0 || address % page_size != 0 || address + length < address) {
        PyErr_SetString(PyExc_ValueError, "guard needs a page-aligned, non-empty range");
        return NULL;
    }
    if (install() != 0) {
        return NULL;
    }
    /* The handler replaces whole pages, so the range ends on a page boundary. */
    size_t rounded = (size_t)((length + page_size - 1) / page_size * page_size);
    int used = atomic_load_explicit(&slots_used, memory_order_relaxed);
    for (int i = 0; i < SLOTS; i++) {
        if (atomic_load_explicit(&slots[i].start, memory_order_relaxed) != 0) {
            continue;
        }
        atomic_store_explicit(&slots[i].length, rounded, memory_order_relaxed);
        atomic_store_explicit(&slots[i].faulted, 0, memory_order_relaxed);
        if (i >= used) {
            atomic_store_explicit(&slots_used, i + 1, memory_order_release);
        }
        /* Published last: a handler that sees the start also sees the length and the cleared flag. */
        atomic_store_explicit(&slots[i].start, (uintptr_t)address, memory_order_release);
        return PyLong_FromLong(i);
    }
    PyErr_SetString(PyExc_MemoryError, "every SIGBUS guard slot is in use");
    return NULL;
}

/* METH_O and no tuple parsing: `faulted` runs once per region per call, so it stays a flag read. */
static long slot_arg(PyObject *arg) {
    long slot = PyLong_AsLong(arg);
    if (slot == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (slot < 0 || slot >= SLOTS || atomic_load_explicit(&slots[slot].start, memory_order_relaxed) == 0) {
        PyErr_SetString(PyExc_ValueError, "not a guarded slot");
        return -1;
    }
    return slot;
}

static PyObject *faulted(PyObject *Py_UNUSED(module), PyObject *arg) {
    long slot = slot_arg(arg);
    if (slot < 0) {
        return NULL;
    }
    return PyBool_FromLong(atomic_load_explicit(&slots[slot].faulted, memory_order_acquire));
}

static PyObject *unguard(PyObject *Py_UNUSED(module), PyObject *arg) {
    long slot = slot_arg(arg);
    if (slot < 0) {
        return NULL;
    }
    atomic_store_explicit(&slots[slot].start, 0, memory_order_release);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"guard", guard, METH_VARARGS,
     "guard(address, length) -> slot: a SIGBUS in [address, address + length) replaces the range with zero "
     "pages and marks the slot faulted instead of killing the process."},
    {"faulted", faulted, METH_O, "faulted(slot) -> bool: whether a SIGBUS hit the slot's range."},
    {"unguard", unguard, METH_O, "unguard(slot): stop guarding; call it before unmapping the range."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_sigbus_guard",
    "Survive SIGBUS on mappings of objects another process can shrink (see the C source for the design).",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__sigbus_guard(void) {
    page_size = (size_t)sysconf(_SC_PAGESIZE);
    return PyModule_Create(&module_def);
}
