/* The worker's side of one push with its pull on the shared-memory data plane, in C.

   ``shm_transport.ShmCall.push_pull_now`` calls it for the common push of a small dense model
   (``paramserver.v1.shm``: the request in the stream's segment, a SHARED frame each way): it writes
   the request into the segment, sends the frame, waits up to ``wait_ms`` for the answer's frame,
   walks the PushGradientResponse in the segment and copies each pulled tensor into the caller's
   array of its name. Everything else (a status, an inline or published answer, a delta, a tensor
   it holds no array of, the rest of a pull in several messages) it leaves to the Python path,
   which reads the same bytes: the protocol is the Python one's, byte for byte. Measured: issue
   17's small push costs 0.27 ms of CPU outside the gradient with it, 0.36 without
   (bench/RESULTS.md, Performance round 2, section 19).

   push_pull(fd, region, at, push_head, clock, grads, prefixes, loss, pull_head, wait_field,
             since_version, since_lineage, param_version, names, outs, wait_ms)
   writes the PushGradientRequest ``wire.push_request_parts`` would (``push_head``: its fields
   before the clock, ``wire.push_fields``; then the clock, each tensor's prefix and data, final,
   the loss, then_pull: ``pull_head`` (``wire.pull_fields``), the clock after, ``wait_field`` (``wire.wait_field``) and
   the since fields, as ``wire.pull_request_bytes``; and ``param_version`` unless it is -1) and
   returns
     an ``Answer`` (clock, duplicate, min_clock, run_state, staleness, lr_scale, guaranteed_clock,
       version, final, pulled_run_state, lineage, pulled_staleness, answer_at, answer_len: a named
       tuple): the answer, decoded, its tensors copied (the optional fields None when absent);
     (answer_at, answer_len): an answer in the segment it does not decode (the frame was read);
     None: no frame came within wait_ms; False: the next frame is not an answer in the segment
       (left in the socket); bytes: the part of the request's frame that did not go (the
       caller's to send). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>

#define FRAME_BYTES 32 /* tcp.FRAME (16) + shm.REGION (16) */
#define SHARED 4
#define MAX_TENSORS 64

static int varint(const uint8_t **p, const uint8_t *end, uint64_t *out) {
    uint64_t v = 0;
    for (int shift = 0; *p < end && shift < 64; shift += 7) {
        uint8_t b = *(*p)++;
        v |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *out = v;
            return 0;
        }
    }
    return -1;
}

static int field(const uint8_t **p, const uint8_t *end, const uint8_t **body, uint64_t *len) {
    if (varint(p, end, len) || (uint64_t)(end - *p) < *len) return -1;
    *body = *p;
    *p += *len;
    return 0;
}

static int skip(const uint8_t **p, const uint8_t *end, int wire_type) {
    uint64_t v;
    const uint8_t *body;
    switch (wire_type) {
    case 0: return varint(p, end, &v);
    case 1: if (end - *p < 8) return -1; *p += 8; return 0;
    case 2: return field(p, end, &body, &v);
    case 5: if (end - *p < 4) return -1; *p += 4; return 0;
    }
    return -1;
}

typedef struct {
    uint64_t clock, duplicate, min_clock, run_state, guaranteed, version, final, p_run_state, lineage;
    int64_t staleness, p_staleness;
    double lr_scale;
    int has_staleness, has_lr_scale, has_p_staleness, has_pulled, copied[MAX_TENSORS];
} Answer;

typedef struct {
    Py_ssize_t n;
    const char *name[MAX_TENSORS];
    Py_ssize_t name_len[MAX_TENSORS];
    Py_buffer out[MAX_TENSORS];
} Outs;

/* One TensorChunk of the answer: a whole float32 tensor, copied into the array of its name. */
static int chunk(const uint8_t *p, const uint8_t *end, Outs *outs, Answer *a) {
    const uint8_t *name = NULL, *data = NULL, *body;
    uint64_t name_len = 0, data_len = 0, len, v;
    while (p < end) {
        uint64_t tag;
        if (varint(&p, end, &tag)) return -1;
        int f = (int)(tag >> 3), wt = (int)(tag & 7);
        if (f == 1 && wt == 2) { if (field(&p, end, &name, &name_len)) return -1; }
        else if (f == 5 && wt == 2) { if (field(&p, end, &data, &data_len)) return -1; }
        else if (f == 3 && wt == 0) { if (varint(&p, end, &v) || v > 1) return -1; }     /* dtype: float32 (or unset) */
        else if (f == 4 && wt == 0) { if (varint(&p, end, &v) || v) return -1; }         /* a part of a tensor */
        else if ((f == 6 || f == 7) && wt == 2) { if (field(&p, end, &body, &len) || len) return -1; } /* rows, a delta */
        else if (skip(&p, end, wt)) return -1;                                              /* shape, padding */
    }
    for (Py_ssize_t i = 0; i < outs->n; i++)
        if ((uint64_t)outs->name_len[i] == name_len && !memcmp(outs->name[i], name, name_len)) {
            if ((uint64_t)outs->out[i].len != data_len || a->copied[i]) return -1;
            memcpy(outs->out[i].buf, data, data_len);
            a->copied[i] = 1;
            return 0;
        }
    return -1;
}

static int pulled(const uint8_t *p, const uint8_t *end, Outs *outs, Answer *a) {
    const uint8_t *body;
    uint64_t len, v;
    a->has_pulled = 1;
    while (p < end) {
        uint64_t tag;
        if (varint(&p, end, &tag)) return -1;
        int f = (int)(tag >> 3), wt = (int)(tag & 7);
        if (f == 3 && wt == 2) { if (field(&p, end, &body, &len) || chunk(body, body + len, outs, a)) return -1; }
        else if (f == 1 && wt == 0) { if (varint(&p, end, &a->guaranteed)) return -1; }
        else if (f == 2 && wt == 0) { if (varint(&p, end, &a->version)) return -1; }
        else if (f == 4 && wt == 0) { if (varint(&p, end, &a->final)) return -1; }
        else if (f == 5 && wt == 0) { if (varint(&p, end, &a->p_run_state)) return -1; }
        else if (f == 6 && wt == 0) { if (varint(&p, end, &v) || v) return -1; }          /* a delta */
        else if (f == 7 && wt == 0) { if (varint(&p, end, &a->lineage)) return -1; }
        else if (f == 8 && wt == 0) { if (varint(&p, end, &v)) return -1; a->p_staleness = (int32_t)v; a->has_p_staleness = 1; }
        else return -1; /* a field this does not know: the Python path decides */
    }
    return 0;
}

static int answer(const uint8_t *p, const uint8_t *end, Outs *outs, Answer *a) {
    const uint8_t *body;
    uint64_t len, v;
    while (p < end) {
        uint64_t tag;
        if (varint(&p, end, &tag)) return -1;
        int f = (int)(tag >> 3), wt = (int)(tag & 7);
        if (f == 5 && wt == 2) { if (field(&p, end, &body, &len) || pulled(body, body + len, outs, a)) return -1; }
        else if (f == 1 && wt == 0) { if (varint(&p, end, &a->clock)) return -1; }
        else if (f == 2 && wt == 0) { if (varint(&p, end, &a->duplicate)) return -1; }
        else if (f == 3 && wt == 0) { if (varint(&p, end, &a->min_clock)) return -1; }
        else if (f == 4 && wt == 0) { if (varint(&p, end, &a->run_state)) return -1; }
        else if (f == 6 && wt == 0) { if (varint(&p, end, &v)) return -1; a->staleness = (int32_t)v; a->has_staleness = 1; }
        else if (f == 7 && wt == 1) {
            if (end - p < 8) return -1;
            memcpy(&a->lr_scale, p, 8);
            p += 8;
            a->has_lr_scale = 1;
        }
        else return -1;
    }
    if (!a->has_pulled || !a->final) return -1; /* (the rest of a pull in several messages: the Python path) */
    for (Py_ssize_t i = 0; i < outs->n; i++)
        if (!a->copied[i]) return -1; /* (an array the answer did not fill: the Python path says what) */
    return 0;
}

static size_t put_varint(uint8_t *out, uint64_t v) {
    size_t n = 0;
    while (v >= 0x80) {
        out[n++] = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    out[n++] = (uint8_t)v;
    return n;
}

/* The answer, decoded: ``Answer`` (a named tuple: the PushGradientResponse's acknowledgement, then its
   pulled PullParamsResponse's fields, then where the answer was in the segment). */
static PyStructSequence_Field answer_fields[] = {
    {"clock", NULL}, {"duplicate", NULL}, {"min_clock", NULL}, {"run_state", NULL},
    {"staleness", "None when absent"}, {"lr_scale", "None when absent"}, {"guaranteed_clock", NULL},
    {"version", NULL}, {"final", NULL}, {"pulled_run_state", NULL}, {"lineage", NULL},
    {"pulled_staleness", "None when absent"}, {"answer_at", NULL}, {"answer_len", NULL}, {NULL, NULL}};
#define ANSWER_FIELDS 14
static PyStructSequence_Desc answer_desc = {
    "paramserver._exchange.Answer", "A push's acknowledgement and its pull's fields, decoded in the segment.",
    answer_fields, ANSWER_FIELDS};
static PyTypeObject *AnswerType;

static PyObject *optional_int(int has, int64_t v) { return has ? PyLong_FromLongLong(v) : Py_NewRef(Py_None); }

static PyObject *push_pull(PyObject *Py_UNUSED(self), PyObject *args) {
    int fd, wait_ms;
    Py_ssize_t at;
    unsigned long long clock, since_version, since_lineage;
    long long param_version;
    double loss;
    Py_buffer region, head, pull_head, wait_field;
    PyObject *grads, *prefixes, *names, *outs_seq, *ret = NULL;
    Outs outs;
    outs.n = 0;
    if (!PyArg_ParseTuple(args, "iw*ny*KO!O!dy*y*KKLO!O!i", &fd, &region, &at, &head, &clock, &PyTuple_Type, &grads,
                          &PyTuple_Type, &prefixes, &loss, &pull_head, &wait_field, &since_version, &since_lineage,
                          &param_version, &PyTuple_Type, &names, &PyTuple_Type, &outs_seq, &wait_ms))
        return NULL;
    /* then_pull, a PullParamsRequest (wire.pull_request_bytes) */
    uint8_t then[1024];
    size_t then_len = 0;
    if (pull_head.len + wait_field.len > (Py_ssize_t)sizeof then - 40) {
        PyErr_SetString(PyExc_ValueError, "push_pull: a pull request this long is the Python path's");
        PyBuffer_Release(&region);
        PyBuffer_Release(&head);
        PyBuffer_Release(&pull_head);
        PyBuffer_Release(&wait_field);
        return NULL;
    }
    memcpy(then, pull_head.buf, pull_head.len);
    then_len = pull_head.len;
    if (clock + 1) {
        then[then_len++] = 0x20;  /* clock = 4 */
        then_len += put_varint(then + then_len, clock + 1);
    }
    memcpy(then + then_len, wait_field.buf, wait_field.len);
    then_len += wait_field.len;
    if (since_version) {
        then[then_len++] = 0x40;  /* since_version = 8 */
        then_len += put_varint(then + then_len, since_version);
    }
    if (since_lineage) {
        then[then_len++] = 0x48;  /* since_lineage = 9 */
        then_len += put_varint(then + then_len, since_lineage);
    }
    /* the PushGradientRequest's fields around its tensors (as wire.push_request_parts writes them) */
    uint8_t clock_field[11], tail[64];
    size_t clock_len = 0, tail_len = 0;
    if (clock) {
        clock_field[clock_len++] = 0x20;  /* clock = 4 */
        clock_len += put_varint(clock_field + clock_len, clock);
    }
    tail[tail_len++] = 0x30;  /* final = 6 */
    tail[tail_len++] = 1;
    uint64_t loss_bits;
    memcpy(&loss_bits, &loss, 8);
    if (loss_bits) {
        tail[tail_len++] = 0x39;  /* loss = 7, a double */
        memcpy(tail + tail_len, &loss, 8);
        tail_len += 8;
    }
    tail[tail_len++] = 0x42;  /* then_pull = 8 */
    tail_len += put_varint(tail + tail_len, then_len);
    uint8_t tail_after[11];
    size_t after_len = 0;
    if (param_version >= 0) {
        tail_after[after_len++] = 0x48;  /* param_version = 9 */
        after_len += put_varint(tail_after + after_len, (uint64_t)param_version);
    }
    Py_ssize_t n = PyTuple_GET_SIZE(grads), m = PyTuple_GET_SIZE(outs_seq);
    uint8_t *r = region.buf;
    if (PyTuple_GET_SIZE(prefixes) != n || PyTuple_GET_SIZE(names) != m || m > MAX_TENSORS || at < 0 ||
        at > region.len) {
        PyErr_SetString(PyExc_ValueError, "push_pull: mismatched arguments");
        goto done;
    }
    for (; outs.n < m; outs.n++) {
        if (PyBytes_AsStringAndSize(PyTuple_GET_ITEM(names, outs.n), (char **)&outs.name[outs.n],
                                    &outs.name_len[outs.n]) ||
            PyObject_GetBuffer(PyTuple_GET_ITEM(outs_seq, outs.n), &outs.out[outs.n],
                               PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS))
            goto done;
    }
    /* the request, at ``at`` of the region */
    Py_ssize_t i = at, cap = region.len;
#define PUT(src, len)                                                                   \
    do {                                                                                \
        if ((len) > cap - i) {                                                          \
            PyErr_SetString(PyExc_ValueError, "push_pull: the request overruns the segment"); \
            goto done;                                                                  \
        }                                                                               \
        memcpy(r + i, (src), (len));                                                    \
        i += (len);                                                                     \
    } while (0)
    PUT(head.buf, head.len);
    PUT(clock_field, (Py_ssize_t)clock_len);
    for (Py_ssize_t k = 0; k < n; k++) {
        char *pre;
        Py_ssize_t pre_len;
        Py_buffer g;
        if (PyBytes_AsStringAndSize(PyTuple_GET_ITEM(prefixes, k), &pre, &pre_len)) goto done;
        PUT(pre, pre_len);
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(grads, k), &g, PyBUF_C_CONTIGUOUS)) goto done;
        if (g.len > cap - i) {
            PyBuffer_Release(&g);
            PyErr_SetString(PyExc_ValueError, "push_pull: the request overruns the segment");
            goto done;
        }
        memcpy(r + i, g.buf, g.len);
        i += g.len;
        PyBuffer_Release(&g);
    }
    PUT(tail, (Py_ssize_t)tail_len);
    PUT(then, (Py_ssize_t)then_len);
    PUT(tail_after, (Py_ssize_t)after_len);
    uint8_t frame[FRAME_BYTES] = {SHARED};
    uint64_t body = 16, where = (uint64_t)at, size = (uint64_t)(i - at);
    memcpy(frame + 8, &body, 8);
    memcpy(frame + 16, &where, 8);
    memcpy(frame + 24, &size, 8);
    ssize_t sent, got = -1;
    int ready = 1;
    Py_BEGIN_ALLOW_THREADS
    sent = send(fd, frame, FRAME_BYTES, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (sent == FRAME_BYTES) {
        struct pollfd pfd = {fd, POLLIN, 0};
        ready = poll(&pfd, 1, wait_ms) > 0;
        if (ready) got = recv(fd, frame, FRAME_BYTES, MSG_PEEK | MSG_DONTWAIT);
        if (got == FRAME_BYTES && frame[0] == SHARED) got = recv(fd, frame, FRAME_BYTES, MSG_DONTWAIT);
        else if (got >= 0) got = -2;
    }
    Py_END_ALLOW_THREADS
    if (sent != FRAME_BYTES) {
        if (sent < 0) sent = 0;
        ret = PyBytes_FromStringAndSize((const char *)frame + sent, FRAME_BYTES - sent);
        goto done;
    }
    if (!ready || got == -1) {  /* nothing yet (or a read error, which the Python read says) */
        ret = Py_NewRef(Py_None);
        goto done;
    }
    if (got != FRAME_BYTES) {
        ret = Py_NewRef(Py_False);
        goto done;
    }
    uint64_t aat, alen, blen;
    memcpy(&blen, frame + 8, 8);
    memcpy(&aat, frame + 16, 8);
    memcpy(&alen, frame + 24, 8);
    if (blen != 16 || aat > (uint64_t)cap || alen > (uint64_t)cap - aat) {
        PyErr_SetString(PyExc_ConnectionError, "the data plane connection broke (the server's message is outside the segment)");
        goto done;
    }
    Answer a;
    memset(&a, 0, sizeof a);
    if (answer(r + aat, r + aat + alen, &outs, &a)) {
        ret = Py_BuildValue("(KK)", (unsigned long long)aat, (unsigned long long)alen);
        goto done;
    }
    ret = PyStructSequence_New(AnswerType);
    if (ret == NULL) goto done;
    PyObject *items[ANSWER_FIELDS] = {
        PyLong_FromUnsignedLongLong(a.clock), Py_NewRef(a.duplicate ? Py_True : Py_False),
        PyLong_FromUnsignedLongLong(a.min_clock), PyLong_FromUnsignedLongLong(a.run_state),
        optional_int(a.has_staleness, a.staleness),
        a.has_lr_scale ? PyFloat_FromDouble(a.lr_scale) : Py_NewRef(Py_None),
        PyLong_FromUnsignedLongLong(a.guaranteed), PyLong_FromUnsignedLongLong(a.version),
        Py_NewRef(a.final ? Py_True : Py_False), PyLong_FromUnsignedLongLong(a.p_run_state),
        PyLong_FromUnsignedLongLong(a.lineage), optional_int(a.has_p_staleness, a.p_staleness),
        PyLong_FromUnsignedLongLong(aat), PyLong_FromUnsignedLongLong(alen)};
    for (int k = 0; k < ANSWER_FIELDS; k++) {
        if (items[k] == NULL) {  /* (out of memory: the rest are let go with the answer) */
            for (int j = k + 1; j < ANSWER_FIELDS; j++) Py_XDECREF(items[j]);
            Py_CLEAR(ret);
            goto done;
        }
        PyStructSequence_SET_ITEM(ret, k, items[k]);
    }
done:
    for (Py_ssize_t k = 0; k < outs.n; k++) PyBuffer_Release(&outs.out[k]);
    PyBuffer_Release(&region);
    PyBuffer_Release(&head);
    PyBuffer_Release(&pull_head);
    PyBuffer_Release(&wait_field);
    return ret;
}

static PyMethodDef methods[] = {
    {"push_pull", push_pull, METH_VARARGS, "A push with its pull on the shared-memory data plane (see the module)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "paramserver._exchange",
                                    "The worker's push with its pull on the shared-memory data plane, in C.", -1,
                                    methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__exchange(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    AnswerType = PyStructSequence_NewType(&answer_desc);
    if (AnswerType == NULL || PyModule_AddObjectRef(m, "Answer", (PyObject *)AnswerType)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
