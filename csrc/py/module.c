/* cecollm._core — the thin CPython/NumPy binding of the C core.
 *
 * Every method has one shape: convert inputs and allocate outputs with the GIL held, release the GIL
 * around the pure C call (holding the object's lock), map the status to an exception. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_2_0_API_VERSION
#include <numpy/arrayobject.h>
#include <pythread.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif

#include "cecollm/cecollm.h"
#include "cecollm/wire.h"

typedef struct {
    PyTypeObject *model_type;
    PyTypeObject *cache_type;
    PyTypeObject *edge_type;
    PyObject *error; /* cecollm._core.CoreError */
} module_state;

static struct PyModuleDef core_module;

static module_state *state_of_type(PyTypeObject *tp) {
    PyObject *mod = PyType_GetModuleByDef(tp, &core_module);
    return mod ? (module_state *)PyModule_GetState(mod) : NULL;
}

static PyObject *raise_status(PyObject *error, ce_status st, const char *msg) {
    PyObject *exc = st == CE_ENOMEM ? PyExc_MemoryError : st == CE_ERANGE ? PyExc_IndexError
                    : st == CE_EINVAL ? PyExc_ValueError : error;
    PyErr_SetString(exc, msg[0] ? msg : "cecollm core error");
    return NULL;
}

/* A float32 C-contiguous 2-D view of obj with `cols` columns (a 1-D input becomes one row). */
static PyArrayObject *as_rows(PyObject *obj, int cols, const char *what) {
    PyArrayObject *a = (PyArrayObject *)PyArray_FROMANY(obj, NPY_FLOAT32, 1, 2, NPY_ARRAY_IN_ARRAY);
    if (a == NULL) return NULL;
    npy_intp last = PyArray_DIM(a, PyArray_NDIM(a) - 1);
    if (last != cols || PyArray_SIZE(a) == 0) {
        PyErr_Format(PyExc_ValueError, "%s must have shape (n, %d) with n >= 1, got last dimension %zd", what, cols,
                     (Py_ssize_t)last);
        Py_DECREF(a);
        return NULL;
    }
    return a;
}

static npy_intp n_rows(PyArrayObject *a) { return PyArray_NDIM(a) == 2 ? PyArray_DIM(a, 0) : 1; }

/* Fills t from (array, type, rows, cols), checking bytes and alignment. Borrowed: the caller keeps
 * the array alive. */
static int tensor_from_tuple(PyObject *tup, const char *name, ce_tensor *t, PyObject *keep) {
    PyObject *arr;
    int type;
    long long rows, cols;
    if (!PyArg_ParseTuple(tup, "OiLL;tensor must be (array, type, rows, cols)", &arr, &type, &rows, &cols)) return -1;
    if (!PyArray_Check(arr) || !PyArray_IS_C_CONTIGUOUS((PyArrayObject *)arr)) {
        PyErr_Format(PyExc_TypeError, "tensor %s: expected a C-contiguous numpy array", name);
        return -1;
    }
    size_t row_bytes = ce_row_bytes(type, cols);
    if (row_bytes == 0 || rows <= 0) {
        PyErr_Format(PyExc_ValueError, "tensor %s: type %s (id %d) with shape (%lld, %lld) is not supported", name,
                     ce_type_name(type), type, rows, cols);
        return -1;
    }
    npy_intp nbytes = PyArray_NBYTES((PyArrayObject *)arr);
    if ((unsigned long long)rows > (unsigned long long)nbytes / row_bytes || (size_t)nbytes != (size_t)rows * row_bytes) {
        PyErr_Format(PyExc_ValueError, "tensor %s: %zd bytes do not hold (%lld, %lld) of %s", name, (Py_ssize_t)nbytes,
                     rows, cols, ce_type_name(type));
        return -1;
    }
    void *data = PyArray_DATA((PyArrayObject *)arr);
    if ((uintptr_t)data % 4 != 0) {
        PyErr_Format(PyExc_ValueError, "tensor %s: data is not 4-byte aligned", name);
        return -1;
    }
    if (PyList_Append(keep, arr) < 0) return -1;
    t->data = data;
    t->type = type;
    t->rows = rows;
    t->cols = cols;
    return 0;
}

static int tensor_from_dict(PyObject *tensors, const char *name, ce_tensor *t, PyObject *keep, int required) {
    PyObject *tup = PyDict_GetItemString(tensors, name); /* borrowed */
    if (tup == NULL) {
        if (required) PyErr_Format(PyExc_KeyError, "tensor %s is missing", name);
        return required ? -1 : 1;
    }
    return tensor_from_tuple(tup, name, t, keep);
}

/* ======================= Model ======================= */

typedef struct {
    PyObject_HEAD
    ce_model model;
    ce_layer *layers;
    int initialized;
    PyObject *keep;          /* list of the arrays the tensors point into */
    PyThread_type_lock lock; /* guards ws */
    ce_workspace ws;
} ModelObject;

static int cfg_int(PyObject *cfg, const char *key, int *out) {
    PyObject *v = PyDict_GetItemString(cfg, key);
    if (v == NULL) {
        PyErr_Format(PyExc_KeyError, "config key '%s' is missing", key);
        return -1;
    }
    long x = PyLong_AsLong(v);
    if (x == -1 && PyErr_Occurred()) return -1;
    if (x < INT32_MIN || x > INT32_MAX) {
        PyErr_Format(PyExc_OverflowError, "config key '%s' out of range", key);
        return -1;
    }
    *out = (int)x;
    return 0;
}

static int cfg_float(PyObject *cfg, const char *key, float *out) {
    PyObject *v = PyDict_GetItemString(cfg, key);
    if (v == NULL) {
        PyErr_Format(PyExc_KeyError, "config key '%s' is missing", key);
        return -1;
    }
    double x = PyFloat_AsDouble(v);
    if (x == -1.0 && PyErr_Occurred()) return -1;
    *out = (float)x;
    return 0;
}

static const char *const activation_names[] = {[CE_ACT_F32] = "f32", [CE_ACT_Q8] = "q8"};

/* "f32" -> CE_ACT_F32, "q8" -> CE_ACT_Q8; -1 with ValueError otherwise */
static int parse_activations(const char *name) {
    for (int i = 0; i < (int)(sizeof activation_names / sizeof activation_names[0]); i++)
        if (strcmp(name, activation_names[i]) == 0) return i;
    PyErr_Format(PyExc_ValueError, "activations must be 'f32' or 'q8', not '%s'", name);
    return -1;
}

static int Model_init(ModelObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"config", "tensors", "activations", NULL};
    PyObject *cfg, *tensors;
    const char *activations = "f32";
    if (self->initialized) {
        PyErr_SetString(PyExc_RuntimeError, "Model is already initialized");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!O!|s", kwlist, &PyDict_Type, &cfg, &PyDict_Type, &tensors,
                                     &activations))
        return -1;
    if ((self->model.activations = parse_activations(activations)) < 0) return -1;
    ce_config *c = &self->model.cfg;
    if (cfg_int(cfg, "n_layers", &c->n_layers) || cfg_int(cfg, "dim", &c->dim) || cfg_int(cfg, "ffn_dim", &c->ffn_dim) ||
        cfg_int(cfg, "n_heads", &c->n_heads) || cfg_int(cfg, "n_kv_heads", &c->n_kv_heads) ||
        cfg_int(cfg, "head_dim", &c->head_dim) || cfg_int(cfg, "vocab", &c->vocab) ||
        cfg_float(cfg, "rope_theta", &c->rope_theta) || cfg_float(cfg, "norm_eps", &c->norm_eps) ||
        cfg_int(cfg, "rope_style", &c->rope_style))
        return -1;
    if (c->n_layers <= 0 || c->n_layers > 4096) {
        PyErr_Format(PyExc_ValueError, "n_layers %d out of range", c->n_layers);
        return -1;
    }
    self->keep = PyList_New(0);
    self->layers = PyMem_Calloc((size_t)c->n_layers, sizeof(ce_layer));
    self->lock = PyThread_allocate_lock();
    if (self->keep == NULL || self->layers == NULL || self->lock == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->model.layers = self->layers;
    if (tensor_from_dict(tensors, "token_embd.weight", &self->model.token_embd, self->keep, 1) ||
        tensor_from_dict(tensors, "output_norm.weight", &self->model.output_norm, self->keep, 1))
        return -1;
    int r = tensor_from_dict(tensors, "output.weight", &self->model.output, self->keep, 0);
    if (r < 0) return -1;
    if (r == 1) self->model.output = self->model.token_embd; /* tied embeddings */
    if (tensor_from_dict(tensors, "rope_freqs.weight", &self->model.rope_freqs, self->keep, 0) < 0) return -1;
    static const char *names[] = {"attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                  "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"};
    for (int l = 0; l < c->n_layers; l++) {
        ce_layer *L = &self->layers[l];
        ce_tensor *slots[] = {&L->attn_norm, &L->wq, &L->wk, &L->wv, &L->wo, &L->ffn_norm, &L->w_gate, &L->w_up, &L->w_down};
        for (int j = 0; j < 9; j++) {
            char name[64];
            snprintf(name, sizeof name, "blk.%d.%s.weight", l, names[j]);
            if (tensor_from_dict(tensors, name, slots[j], self->keep, 1)) return -1;
        }
        ce_tensor *biases[] = {&L->bq, &L->bk, &L->bv}; /* optional (Qwen2) */
        for (int j = 0; j < 3; j++) {
            char name[64];
            snprintf(name, sizeof name, "blk.%d.%s.bias", l, names[1 + j]);
            if (tensor_from_dict(tensors, name, biases[j], self->keep, 0) < 0) return -1;
        }
    }
    char err[CE_ERRLEN] = "";
    ce_status st = ce_model_init(&self->model, err, sizeof err);
    if (st != CE_OK) {
        raise_status(state_of_type(Py_TYPE(self))->error, st, err);
        return -1;
    }
    self->initialized = 1;
    return 0;
}

static void Model_dealloc(ModelObject *self) {
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    if (self->initialized) ce_model_free(&self->model);
    ce_workspace_free(&self->ws);
    PyMem_Free(self->layers);
    if (self->lock) PyThread_free_lock(self->lock);
    Py_CLEAR(self->keep);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static int Model_traverse(ModelObject *self, visitproc visit, void *arg) {
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->keep);
    return 0;
}

static int Model_clear(ModelObject *self) {
    Py_CLEAR(self->keep);
    return 0;
}

static int model_ready(ModelObject *self) {
    if (!self->initialized) {
        PyErr_SetString(PyExc_RuntimeError, "Model is not initialized");
        return 0;
    }
    return 1;
}

/* embed(tokens) -> float32 (n, dim) */
static PyObject *Model_embed(ModelObject *self, PyObject *arg) {
    if (!model_ready(self)) return NULL;
    PyArrayObject *tok = (PyArrayObject *)PyArray_FROMANY(arg, NPY_INT32, 1, 1, NPY_ARRAY_IN_ARRAY | NPY_ARRAY_FORCECAST);
    if (tok == NULL) return NULL;
    npy_intp n = PyArray_DIM(tok, 0);
    npy_intp dims[2] = {n, self->model.cfg.dim};
    PyArrayObject *out = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_FLOAT32);
    if (out == NULL) goto fail;
    char err[CE_ERRLEN] = "";
    ce_status st;
    Py_BEGIN_ALLOW_THREADS
    st = ce_embed(&self->model, (int)n, PyArray_DATA(tok), PyArray_DATA(out), err, sizeof err);
    Py_END_ALLOW_THREADS
    if (st != CE_OK) {
        raise_status(state_of_type(Py_TYPE(self))->error, st, err);
        goto fail;
    }
    Py_DECREF(tok);
    return (PyObject *)out;
fail:
    Py_XDECREF(tok);
    Py_XDECREF(out);
    return NULL;
}

static int head_from_tuple(PyObject *tup, int dim, ce_exit_head *h, PyObject *keep);

/* head(x, norm=None, rows=vocab, down=None, up=None) -> logits float32 (n, rows) over the first rows
 * vocabulary entries: an exit head (ce_exit_logits), the model's final norm and LM head by default */
static PyObject *Model_head(ModelObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"x", "norm", "rows", "down", "up", NULL};
    PyObject *xo, *normo = Py_None, *downo = Py_None, *upo = Py_None;
    PyArrayObject *x = NULL, *out = NULL;
    float *scratch = NULL;
    int rows = -1;
    if (!model_ready(self) ||
        !PyArg_ParseTupleAndKeywords(args, kwds, "O|OiOO", kwlist, &xo, &normo, &rows, &downo, &upo))
        return NULL;
    if (rows == -1) rows = self->model.cfg.vocab;
    if (rows <= 0 || rows > self->model.cfg.vocab)
        return PyErr_Format(PyExc_ValueError, "rows %d outside [1, %d]", rows, self->model.cfg.vocab);
    const int d = self->model.cfg.dim;
    PyObject *keep = PyList_New(0), *spec = Py_BuildValue("(iOOOOd)", 0, normo, downo, upo, Py_None, 0.0);
    ce_exit_head h;
    if (keep == NULL || spec == NULL || head_from_tuple(spec, d, &h, keep) < 0) goto fail;
    if ((x = as_rows(xo, d, "x")) == NULL) goto fail;
    npy_intp n = n_rows(x);
    npy_intp dims[2] = {n, rows};
    if ((out = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_FLOAT32)) == NULL) goto fail;
    if (h.down != NULL && (scratch = PyMem_Malloc(sizeof(float) * ((size_t)n * d + h.rank))) == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    char err[CE_ERRLEN] = "";
    ce_status st;
    Py_BEGIN_ALLOW_THREADS
    PyThread_acquire_lock(self->lock, WAIT_LOCK);
    st = ce_exit_logits(&self->model, &self->ws, &h, (int)n, PyArray_DATA(x), rows, PyArray_DATA(out), scratch, err,
                        sizeof err);
    PyThread_release_lock(self->lock);
    Py_END_ALLOW_THREADS
    if (st != CE_OK) {
        raise_status(state_of_type(Py_TYPE(self))->error, st, err);
        goto fail;
    }
    PyMem_Free(scratch);
    Py_DECREF(x);
    Py_DECREF(keep);
    Py_DECREF(spec);
    return (PyObject *)out;
fail:
    PyMem_Free(scratch);
    Py_XDECREF(x);
    Py_XDECREF(keep);
    Py_XDECREF(spec);
    Py_XDECREF(out);
    return NULL;
}

static PyObject *Model_get_config(ModelObject *self, void *closure) {
    (void)closure;
    if (!model_ready(self)) return NULL;
    const ce_config *c = &self->model.cfg;
    return Py_BuildValue("{s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:d,s:d,s:i}", "n_layers", c->n_layers, "dim", c->dim, "ffn_dim",
                         c->ffn_dim, "n_heads", c->n_heads, "n_kv_heads", c->n_kv_heads, "head_dim", c->head_dim,
                         "vocab", c->vocab, "rope_theta", (double)c->rope_theta, "norm_eps", (double)c->norm_eps,
                         "rope_style", c->rope_style);
}

static PyObject *Model_get_activations(ModelObject *self, void *closure) {
    (void)closure;
    if (!model_ready(self)) return NULL;
    return PyUnicode_FromString(activation_names[self->model.activations]);
}

/* ======================= KVCache ======================= */

typedef struct {
    PyObject_HEAD
    ModelObject *model;
    ce_kv_cache kv;
    ce_workspace ws;
    PyThread_type_lock lock; /* guards kv and ws */
} CacheObject;

static int Cache_init(CacheObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"model", "capacity", "layer_begin", "layer_end", "dtype", NULL};
    PyObject *model;
    int capacity, begin = 0, end = -1;
    module_state *ms = state_of_type(Py_TYPE(self));
    if (self->model != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "KVCache is already initialized");
        return -1;
    }
    const char *dtype = "f32";
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!i|iis", kwlist, ms->model_type, &model, &capacity, &begin, &end,
                                     &dtype))
        return -1;
    int type = strcmp(dtype, "f32") == 0 ? CE_TYPE_F32 : strcmp(dtype, "f16") == 0 ? CE_TYPE_F16 : -1;
    if (type < 0) {
        PyErr_Format(PyExc_ValueError, "KV cache dtype must be 'f32' or 'f16', not '%s'", dtype);
        return -1;
    }
    if (!model_ready((ModelObject *)model)) return -1;
    if (end < 0) end = ((ModelObject *)model)->model.cfg.n_layers;
    if ((self->lock = PyThread_allocate_lock()) == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    char err[CE_ERRLEN] = "";
    ce_status st =
        ce_kv_cache_init(&self->kv, &((ModelObject *)model)->model.cfg, begin, end, capacity, type, err, sizeof err);
    if (st != CE_OK) {
        raise_status(ms->error, st, err);
        return -1;
    }
    Py_INCREF(model);
    self->model = (ModelObject *)model;
    return 0;
}

static void Cache_dealloc(CacheObject *self) {
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    ce_kv_cache_free(&self->kv);
    ce_workspace_free(&self->ws);
    if (self->lock) PyThread_free_lock(self->lock);
    Py_CLEAR(self->model);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static int Cache_traverse(CacheObject *self, visitproc visit, void *arg) {
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->model);
    return 0;
}

static int cache_ready(CacheObject *self) {
    if (self->model == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "KVCache is not initialized");
        return 0;
    }
    return 1;
}

/* forward(x, pos0, layer_begin=cache's, layer_end=cache's) -> hidden states after layer_end-1 */
static PyObject *Cache_forward(CacheObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"x", "pos0", "layer_begin", "layer_end", NULL};
    PyObject *xo;
    int pos0, begin = -1, end = -1;
    if (!cache_ready(self) || !PyArg_ParseTupleAndKeywords(args, kwds, "Oi|ii", kwlist, &xo, &pos0, &begin, &end))
        return NULL;
    if (begin < 0) begin = self->kv.layer_begin;
    if (end < 0) end = self->kv.layer_end;
    const ce_model *m = &self->model->model;
    PyArrayObject *x = as_rows(xo, m->cfg.dim, "x");
    if (x == NULL) return NULL;
    /* the result is a fresh (n, dim) array: the input is never modified */
    PyArrayObject *out = (PyArrayObject *)PyArray_NewCopy(x, NPY_CORDER);
    Py_DECREF(x);
    if (out == NULL) return NULL;
    npy_intp n = n_rows(out);
    char err[CE_ERRLEN] = "";
    ce_status st;
    Py_BEGIN_ALLOW_THREADS
    PyThread_acquire_lock(self->lock, WAIT_LOCK);
    st = ce_forward(m, &self->kv, &self->ws, begin, end, (int)n, pos0, PyArray_DATA(out), err, sizeof err);
    PyThread_release_lock(self->lock);
    Py_END_ALLOW_THREADS
    if (st != CE_OK) {
        Py_DECREF(out);
        return raise_status(state_of_type(Py_TYPE(self))->error, st, err);
    }
    return (PyObject *)out;
}

/* The data of obj when it is a writable C-contiguous 1-D numpy array of n elements of type; else NULL
 * with a ValueError naming it. */
static void *writable_vector(PyObject *obj, int type, npy_intp n, const char *what) {
    PyArrayObject *a = (PyArrayObject *)obj;
    if (!PyArray_Check(obj) || PyArray_TYPE(a) != type || PyArray_NDIM(a) != 1 || PyArray_DIM(a, 0) != n ||
        !PyArray_IS_C_CONTIGUOUS(a) || !PyArray_ISWRITEABLE(a)) {
        PyErr_Format(PyExc_ValueError, "%s must be a writable contiguous numpy array of %zd %s", what, (Py_ssize_t)n,
                     type == NPY_FLOAT32 ? "float32" : type == NPY_UINT8 ? "uint8" : "uint64");
        return NULL;
    }
    return PyArray_DATA(a);
}

/* generate(logits, seen, rng, pending, pos, n_max, end_ids, temperature=0, top_k=0, top_p=1,
 *          repetition_penalty=1, n_top=-1) -> (tokens, ended, logprobs, top_ids, top_logprobs)
 * The token loop of ce_generate, without the GIL: logits (vocab float32), seen (vocab uint8) and rng
 * (4 uint64) are updated in place. n_top >= 0 records log-probabilities (else the last three are None). */
static PyObject *Cache_generate(CacheObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"logits", "seen", "rng", "pending", "pos", "n_max", "end_ids", "temperature",
                             "top_k", "top_p", "repetition_penalty", "n_top", NULL};
    PyObject *logits_o, *seen_o, *rng_o, *end_o;
    int pending, pos, n_max, n_top = -1;
    ce_sampler sampler = {.temperature = 0.0f, .top_k = 0, .top_p = 1.0f, .repetition_penalty = 1.0f};
    if (!cache_ready(self) ||
        !PyArg_ParseTupleAndKeywords(args, kwds, "OOOiiiO|fiffi", kwlist, &logits_o, &seen_o, &rng_o, &pending, &pos,
                                     &n_max, &end_o, &sampler.temperature, &sampler.top_k, &sampler.top_p,
                                     &sampler.repetition_penalty, &n_top))
        return NULL;
    const ce_model *m = &self->model->model;
    const int vocab = m->cfg.vocab;
    float *logits = writable_vector(logits_o, NPY_FLOAT32, vocab, "logits");
    uint8_t *seen = logits ? writable_vector(seen_o, NPY_UINT8, vocab, "seen") : NULL;
    uint64_t *rng = seen ? writable_vector(rng_o, NPY_UINT64, 4, "rng") : NULL;
    if (rng == NULL) return NULL;
    if (n_max < 1) return PyErr_Format(PyExc_ValueError, "n_max must be at least 1, got %d", n_max);
    PyArrayObject *end = (PyArrayObject *)PyArray_FROMANY(end_o, NPY_INT32, 1, 1, NPY_ARRAY_IN_ARRAY | NPY_ARRAY_FORCECAST);
    if (end == NULL) return NULL;
    const int top = n_top > 0 ? n_top : 0;
    npy_intp n_dims[1] = {n_max}, top_dims[2] = {n_max, top};
    PyArrayObject *out = (PyArrayObject *)PyArray_SimpleNew(1, n_dims, NPY_INT32);
    PyArrayObject *lp = n_top >= 0 ? (PyArrayObject *)PyArray_SimpleNew(1, n_dims, NPY_FLOAT32) : NULL;
    PyArrayObject *top_ids = n_top >= 0 ? (PyArrayObject *)PyArray_SimpleNew(2, top_dims, NPY_INT32) : NULL;
    PyArrayObject *top_lp = n_top >= 0 ? (PyArrayObject *)PyArray_SimpleNew(2, top_dims, NPY_FLOAT32) : NULL;
    PyObject *result = NULL;
    if (out == NULL || (n_top >= 0 && (lp == NULL || top_ids == NULL || top_lp == NULL))) goto done;
    memcpy(sampler.rng, rng, sizeof sampler.rng);
    char err[CE_ERRLEN] = "";
    int n_out = 0, ended = 0;
    ce_status st;
    Py_BEGIN_ALLOW_THREADS
    PyThread_acquire_lock(self->lock, WAIT_LOCK);
    st = ce_generate(m, &self->kv, &self->ws, &sampler, logits, seen, pending, pos, n_max, PyArray_DATA(end),
                     (int)PyArray_DIM(end, 0), top, PyArray_DATA(out), lp ? PyArray_DATA(lp) : NULL,
                     top_ids ? PyArray_DATA(top_ids) : NULL, top_lp ? PyArray_DATA(top_lp) : NULL, &n_out, &ended, err,
                     sizeof err);
    PyThread_release_lock(self->lock);
    Py_END_ALLOW_THREADS
    memcpy(rng, sampler.rng, sizeof sampler.rng);
    if (st != CE_OK) {
        raise_status(state_of_type(Py_TYPE(self))->error, st, err);
        goto done;
    }
    /* the first n_out rows of each output */
    PyObject *tokens = PySequence_GetSlice((PyObject *)out, 0, n_out);
    PyObject *lps = lp ? PySequence_GetSlice((PyObject *)lp, 0, n_out) : Py_NewRef(Py_None);
    PyObject *ids = top_ids ? PySequence_GetSlice((PyObject *)top_ids, 0, n_out) : Py_NewRef(Py_None);
    PyObject *tlps = top_lp ? PySequence_GetSlice((PyObject *)top_lp, 0, n_out) : Py_NewRef(Py_None);
    if (tokens && lps && ids && tlps) result = Py_BuildValue("(NONNN)", tokens, ended ? Py_True : Py_False, lps, ids, tlps);
    else {
        Py_XDECREF(tokens);
        Py_XDECREF(lps);
        Py_XDECREF(ids);
        Py_XDECREF(tlps);
    }
done:
    Py_DECREF(end);
    Py_XDECREF(out);
    Py_XDECREF(lp);
    Py_XDECREF(top_ids);
    Py_XDECREF(top_lp);
    return result;
}

/* fill_kv(x, pos0, layer_begin, layer_end): keys/values of those layers from the same hidden states x */
static PyObject *Cache_fill_kv(CacheObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"x", "pos0", "layer_begin", "layer_end", NULL};
    PyObject *xo;
    int pos0, begin, end;
    if (!cache_ready(self) || !PyArg_ParseTupleAndKeywords(args, kwds, "Oiii", kwlist, &xo, &pos0, &begin, &end))
        return NULL;
    const ce_model *m = &self->model->model;
    PyArrayObject *x = as_rows(xo, m->cfg.dim, "x");
    if (x == NULL) return NULL;
    char err[CE_ERRLEN] = "";
    ce_status st;
    Py_BEGIN_ALLOW_THREADS
    PyThread_acquire_lock(self->lock, WAIT_LOCK);
    st = ce_fill_kv(m, &self->kv, &self->ws, begin, end, (int)n_rows(x), pos0, PyArray_DATA(x), err, sizeof err);
    PyThread_release_lock(self->lock);
    Py_END_ALLOW_THREADS
    Py_DECREF(x);
    if (st != CE_OK) return raise_status(state_of_type(Py_TYPE(self))->error, st, err);
    Py_RETURN_NONE;
}

/* lengths() -> list of filled lengths, one per layer of the cache (read under the cache's lock) */
static PyObject *Cache_lengths(CacheObject *self, PyObject *noargs) {
    (void)noargs;
    if (!cache_ready(self)) return NULL;
    int nl = self->kv.layer_end - self->kv.layer_begin;
    int *len = PyMem_Malloc(sizeof(int) * (size_t)(nl > 0 ? nl : 1));
    if (len == NULL) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    PyThread_acquire_lock(self->lock, WAIT_LOCK);
    memcpy(len, self->kv.len, sizeof(int) * (size_t)nl);
    PyThread_release_lock(self->lock);
    Py_END_ALLOW_THREADS
    PyObject *list = PyList_New(nl);
    for (int i = 0; list && i < nl; i++) {
        PyObject *v = PyLong_FromLong(len[i]);
        if (v == NULL) Py_CLEAR(list);
        else PyList_SET_ITEM(list, i, v);
    }
    PyMem_Free(len);
    return list;
}

/* truncate(n): forgets positions n.. in every layer */
static PyObject *Cache_truncate(CacheObject *self, PyObject *arg) {
    if (!cache_ready(self)) return NULL;
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    if (n < 0) return PyErr_Format(PyExc_ValueError, "truncate to %ld positions: must be >= 0", n);
    Py_BEGIN_ALLOW_THREADS
    PyThread_acquire_lock(self->lock, WAIT_LOCK);
    ce_kv_cache_truncate(&self->kv, n > INT_MAX ? INT_MAX : (int)n);
    PyThread_release_lock(self->lock);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* kv(layer) -> (keys, values), each float32 (n_kv_heads, len, head_dim): a copy, taken under the
 * cache's lock (acquired without the GIL; while it is held here, a thread waiting for it holds no GIL) */
static PyObject *Cache_kv(CacheObject *self, PyObject *arg) {
    if (!cache_ready(self)) return NULL;
    long layer = PyLong_AsLong(arg);
    if (layer == -1 && PyErr_Occurred()) return NULL;
    if (layer < self->kv.layer_begin || layer >= self->kv.layer_end) {
        PyErr_Format(PyExc_IndexError, "layer %ld is not inside [%d, %d)", layer, self->kv.layer_begin,
                     self->kv.layer_end);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    PyThread_acquire_lock(self->lock, WAIT_LOCK);
    Py_END_ALLOW_THREADS
    int len = self->kv.len[layer - self->kv.layer_begin], hd = self->kv.head_dim;
    npy_intp dims[3] = {self->kv.n_kv_heads, len, hd};
    PyArrayObject *k = (PyArrayObject *)PyArray_SimpleNew(3, dims, NPY_FLOAT32);
    PyArrayObject *v = (PyArrayObject *)PyArray_SimpleNew(3, dims, NPY_FLOAT32);
    if (k == NULL || v == NULL) {
        PyThread_release_lock(self->lock);
        Py_XDECREF(k);
        Py_XDECREF(v);
        return NULL;
    }
    const size_t count = (size_t)len * hd; /* as floats, whatever the cache stores */
    for (int g = 0; g < self->kv.n_kv_heads; g++) {
        float *kd = (float *)PyArray_DATA(k) + g * count, *vd = (float *)PyArray_DATA(v) + g * count;
        const void *ks = ce_kv_cache_k(&self->kv, (int)layer, g), *vs = ce_kv_cache_v(&self->kv, (int)layer, g);
        const ce_tensor kt = {ks, self->kv.type, (int64_t)count, 1}, vt = {vs, self->kv.type, (int64_t)count, 1};
        ce_dequantize_row(&kt, 0, kd);
        ce_dequantize_row(&vt, 0, vd);
    }
    PyThread_release_lock(self->lock);
    return Py_BuildValue("(NN)", k, v);
}

static PyObject *Cache_get_int(CacheObject *self, void *which) {
    if (!cache_ready(self)) return NULL;
    switch ((int)(intptr_t)which) {
    case 3: return PyUnicode_FromString(self->kv.type == CE_TYPE_F16 ? "f16" : "f32");
    case 0: return PyLong_FromLong(self->kv.capacity);
    case 1: return PyLong_FromLong(self->kv.layer_begin);
    default: return PyLong_FromLong(self->kv.layer_end);
    }
}

/* ======================= Edge ======================= */

/* An exit head from (layer, norm, down, up, gate_w, gate_b), Nones for absent parts; the float32
 * arrays it points into are appended to keep. */
static int head_from_tuple(PyObject *tup, int dim, ce_exit_head *h, PyObject *keep) {
    PyObject *parts[4];
    double gate_b;
    if (!PyArg_ParseTuple(tup, "iOOOOd", &h->layer, &parts[0], &parts[1], &parts[2], &parts[3], &gate_b)) return -1;
    h->gate_b = (float)gate_b;
    const float *data[4] = {NULL, NULL, NULL, NULL};
    npy_intp shape[4][2] = {{0, 0}};
    for (int i = 0; i < 4; i++) {
        if (parts[i] == Py_None) continue;
        PyArrayObject *a = (PyArrayObject *)PyArray_FROMANY(parts[i], NPY_FLOAT32, 1, 2, NPY_ARRAY_IN_ARRAY);
        if (a == NULL || PyList_Append(keep, (PyObject *)a) < 0) {
            Py_XDECREF(a);
            return -1;
        }
        Py_DECREF(a); /* keep holds it */
        data[i] = PyArray_DATA(a);
        shape[i][0] = PyArray_NDIM(a) == 2 ? PyArray_DIM(a, 0) : 1;
        shape[i][1] = PyArray_DIM(a, PyArray_NDIM(a) - 1);
    }
    h->norm = data[0], h->down = data[1], h->up = data[2], h->gate_w = data[3];
    h->rank = (int)shape[1][0];
    const int bad_norm = data[0] && shape[0][0] * shape[0][1] != dim;
    const int bad_adapter = (data[1] == NULL) != (data[2] == NULL) ||
                            (data[1] && (shape[1][1] != dim || shape[2][0] != dim || shape[2][1] != shape[1][0]));
    const int bad_gate = data[3] && shape[3][0] * shape[3][1] != dim + 1;
    if (bad_norm || bad_adapter || bad_gate) {
        PyErr_Format(PyExc_ValueError, "the exit head at %d: norm (%d,), down (rank, %d) with up (%d, rank), gate_w (%d,)",
                     h->layer, dim, dim, dim, dim + 1);
        return -1;
    }
    return 0;
}

typedef struct {
    PyObject_HEAD
    CacheObject *cache; /* its lock guards the edge too */
    PyObject *keep;     /* the arrays the heads point into */
    ce_exit_head *heads;
    ce_edge edge;
} EdgeObject;

static int Edge_init(EdgeObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"cache", "heads", "metric", "propagate", "precheck_rows", NULL};
    PyObject *cache, *heads;
    int metric, propagate, precheck_rows = 0;
    module_state *ms = state_of_type(Py_TYPE(self));
    if (self->cache != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Edge is already initialized");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!Oip|i", kwlist, ms->cache_type, &cache, &heads, &metric, &propagate,
                                     &precheck_rows) ||
        !cache_ready((CacheObject *)cache))
        return -1;
    PyObject *seq = PySequence_Fast(heads, "heads must be a sequence of (layer, norm, down, up, gate_w, gate_b)");
    if (seq == NULL) return -1;
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    const ce_model *m = &((CacheObject *)cache)->model->model;
    Py_CLEAR(self->keep); /* from an earlier __init__ that failed */
    PyMem_Free(self->heads);
    self->keep = PyList_New(0);
    self->heads = PyMem_Calloc(n > 0 ? (size_t)n : 1, sizeof(ce_exit_head));
    int ok = self->keep != NULL && self->heads != NULL && n <= INT_MAX;
    if (!ok && !PyErr_Occurred()) PyErr_NoMemory();
    for (Py_ssize_t i = 0; ok && i < n; i++)
        ok = head_from_tuple(PySequence_Fast_GET_ITEM(seq, i), m->cfg.dim, &self->heads[i], self->keep) == 0;
    Py_DECREF(seq);
    if (!ok) return -1;
    char err[CE_ERRLEN] = "";
    CacheObject *c = (CacheObject *)cache;
    ce_status st = ce_edge_init(&self->edge, m, &c->kv, &c->ws, self->heads, (int)n, metric, propagate, precheck_rows,
                                err, sizeof err);
    if (st != CE_OK) {
        raise_status(ms->error, st, err);
        return -1;
    }
    Py_INCREF(cache);
    self->cache = c;
    return 0;
}

static void Edge_dealloc(EdgeObject *self) {
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    ce_edge_free(&self->edge);
    PyMem_Free(self->heads);
    Py_CLEAR(self->keep);
    Py_CLEAR(self->cache);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static int Edge_traverse(EdgeObject *self, visitproc visit, void *arg) {
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->cache);
    Py_VISIT(self->keep);
    return 0;
}

static int edge_ready(EdgeObject *self) {
    if (self->cache == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Edge is not initialized");
        return 0;
    }
    return 1;
}

#define EDGE_LOCKED(self, stmt)                                  \
    Py_BEGIN_ALLOW_THREADS                                       \
    PyThread_acquire_lock((self)->cache->lock, WAIT_LOCK);       \
    stmt;                                                        \
    PyThread_release_lock((self)->cache->lock);                  \
    Py_END_ALLOW_THREADS

/* thresholds: one float per head, as a float64 array (a new reference), else NULL with an error */
static PyArrayObject *thresholds_of(EdgeObject *self, PyObject *obj) {
    PyArrayObject *a = (PyArrayObject *)PyArray_FROMANY(obj, NPY_FLOAT64, 1, 1, NPY_ARRAY_IN_ARRAY | NPY_ARRAY_FORCECAST);
    if (a != NULL && PyArray_DIM(a, 0) != self->edge.n_heads) {
        PyErr_Format(PyExc_ValueError, "%zd thresholds for %d exits", (Py_ssize_t)PyArray_DIM(a, 0), self->edge.n_heads);
        Py_CLEAR(a);
    }
    return a;
}

/* (exit_layer, confidence, layers_run, head_checks, prechecks_skipped) */
static PyObject *decision_tuple(const ce_edge_decision *d) {
    return Py_BuildValue("(idiii)", d->exit_layer, (double)d->confidence, d->layers_run, d->head_checks,
                         d->prechecks_skipped);
}

/* prefill(ids): the prompt through every edge layer */
static PyObject *Edge_prefill(EdgeObject *self, PyObject *arg) {
    if (!edge_ready(self)) return NULL;
    PyArrayObject *ids = (PyArrayObject *)PyArray_FROMANY(arg, NPY_INT32, 1, 1, NPY_ARRAY_IN_ARRAY | NPY_ARRAY_FORCECAST);
    if (ids == NULL) return NULL;
    if (PyArray_DIM(ids, 0) > INT_MAX) {
        Py_DECREF(ids);
        return PyErr_Format(PyExc_ValueError, "the prompt is too long");
    }
    char err[CE_ERRLEN] = "";
    ce_status st;
    EDGE_LOCKED(self, st = ce_edge_prefill(&self->edge, (int)PyArray_DIM(ids, 0), PyArray_DATA(ids), err, sizeof err));
    Py_DECREF(ids);
    if (st != CE_OK) return raise_status(state_of_type(Py_TYPE(self))->error, st, err);
    Py_RETURN_NONE;
}

/* step(token, thresholds, finish_at_split) -> (logits or None, decision, segments, split_start) */
static PyObject *Edge_step(EdgeObject *self, PyObject *args) {
    int token, finish;
    PyObject *to;
    if (!edge_ready(self) || !PyArg_ParseTuple(args, "iOp", &token, &to, &finish)) return NULL;
    PyArrayObject *thresholds = thresholds_of(self, to);
    if (thresholds == NULL) return NULL;
    npy_intp dims[1] = {self->edge.m->cfg.vocab};
    PyArrayObject *logits = (PyArrayObject *)PyArray_SimpleNew(1, dims, NPY_FLOAT32);
    if (logits == NULL) {
        Py_DECREF(thresholds);
        return NULL;
    }
    char err[CE_ERRLEN] = "";
    ce_edge_decision d;
    ce_status st;
    EDGE_LOCKED(self, st = ce_edge_step(&self->edge, token, PyArray_DATA(thresholds), finish, PyArray_DATA(logits), &d,
                                        err, sizeof err));
    Py_DECREF(thresholds);
    if (st != CE_OK) {
        Py_DECREF(logits);
        return raise_status(state_of_type(Py_TYPE(self))->error, st, err);
    }
    if (!d.exited) Py_SETREF(logits, (PyArrayObject *)Py_NewRef(Py_None));
    return Py_BuildValue("(NNii)", logits, decision_tuple(&d), d.segments, d.split_start);
}

/* generate(logits, rng, pending, n_max, end_ids, thresholds, temperature=0, top_k=0, top_p=1)
 *   -> (tokens, decisions, ended): ce_edge_generate without the GIL; logits and rng updated in place;
 *   decisions[i] is None where no token was fed */
static PyObject *Edge_generate(EdgeObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"logits", "rng", "pending", "n_max", "end_ids", "thresholds", "temperature", "top_k",
                             "top_p", NULL};
    PyObject *logits_o, *rng_o, *end_o, *to;
    int pending, n_max;
    ce_sampler sampler = {.temperature = 0.0f, .top_k = 0, .top_p = 1.0f, .repetition_penalty = 1.0f};
    if (!edge_ready(self) ||
        !PyArg_ParseTupleAndKeywords(args, kwds, "OOiiOO|fif", kwlist, &logits_o, &rng_o, &pending, &n_max, &end_o, &to,
                                     &sampler.temperature, &sampler.top_k, &sampler.top_p))
        return NULL;
    float *logits = writable_vector(logits_o, NPY_FLOAT32, self->edge.m->cfg.vocab, "logits");
    uint64_t *rng = logits ? writable_vector(rng_o, NPY_UINT64, 4, "rng") : NULL;
    if (rng == NULL) return NULL;
    if (n_max < 1) return PyErr_Format(PyExc_ValueError, "n_max must be at least 1, got %d", n_max);
    PyArrayObject *end = (PyArrayObject *)PyArray_FROMANY(end_o, NPY_INT32, 1, 1, NPY_ARRAY_IN_ARRAY | NPY_ARRAY_FORCECAST);
    PyArrayObject *thresholds = end ? thresholds_of(self, to) : NULL;
    npy_intp dims[1] = {n_max};
    PyArrayObject *out = thresholds ? (PyArrayObject *)PyArray_SimpleNew(1, dims, NPY_INT32) : NULL;
    ce_edge_decision *decisions = out ? PyMem_Malloc(sizeof(ce_edge_decision) * (size_t)n_max) : NULL;
    PyObject *result = NULL;
    if (decisions == NULL) {
        if (out != NULL) PyErr_NoMemory();
        goto done;
    }
    memcpy(sampler.rng, rng, sizeof sampler.rng);
    char err[CE_ERRLEN] = "";
    int n_out = 0, ended = 0;
    ce_status st;
    EDGE_LOCKED(self, st = ce_edge_generate(&self->edge, &sampler, PyArray_DATA(thresholds), logits, pending, n_max,
                                            PyArray_DATA(end), (int)PyArray_DIM(end, 0), PyArray_DATA(out), decisions,
                                            &n_out, &ended, err, sizeof err));
    memcpy(rng, sampler.rng, sizeof sampler.rng);
    if (st != CE_OK) {
        raise_status(state_of_type(Py_TYPE(self))->error, st, err);
        goto done;
    }
    PyObject *tokens = PySequence_GetSlice((PyObject *)out, 0, n_out), *list = PyList_New(n_out);
    for (int i = 0; tokens && list && i < n_out; i++) {
        PyObject *item = decisions[i].exit_layer < 0 ? Py_NewRef(Py_None) : decision_tuple(&decisions[i]);
        if (item == NULL) Py_CLEAR(list);
        else PyList_SET_ITEM(list, i, item);
    }
    if (tokens && list) result = Py_BuildValue("(NNO)", tokens, list, ended ? Py_True : Py_False);
    else {
        Py_XDECREF(tokens);
        Py_XDECREF(list);
    }
done:
    PyMem_Free(decisions);
    Py_XDECREF(out);
    Py_XDECREF(thresholds);
    Py_XDECREF(end);
    return result;
}

/* flush() -> first position whose split state it finished, or -1 when nothing was waiting */
static PyObject *Edge_flush(EdgeObject *self, PyObject *noargs) {
    (void)noargs;
    if (!edge_ready(self)) return NULL;
    char err[CE_ERRLEN] = "";
    int first;
    ce_status st;
    EDGE_LOCKED(self, st = ce_edge_flush(&self->edge, &first, err, sizeof err));
    if (st != CE_OK) return raise_status(state_of_type(Py_TYPE(self))->error, st, err);
    return PyLong_FromLong(first);
}

/* rollback(n): forgets positions n.. */
static PyObject *Edge_rollback(EdgeObject *self, PyObject *arg) {
    if (!edge_ready(self)) return NULL;
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    if (n < 0) return PyErr_Format(PyExc_ValueError, "rollback to %ld positions: must be >= 0", n);
    EDGE_LOCKED(self, ce_edge_rollback(&self->edge, n > INT_MAX ? INT_MAX : (int)n));
    Py_RETURN_NONE;
}

/* pending() -> {position: exit layer} of the positions waiting for catch-up */
static PyObject *Edge_pending(EdgeObject *self, PyObject *noargs) {
    (void)noargs;
    if (!edge_ready(self)) return NULL;
    const int cap = self->edge.kv->capacity;
    int32_t *copy = PyMem_Malloc(sizeof(int32_t) * (size_t)(cap > 0 ? cap : 1));
    if (copy == NULL) return PyErr_NoMemory();
    int n_pos;
    EDGE_LOCKED(self, n_pos = self->edge.n_pos; memcpy(copy, self->edge.pending, sizeof(int32_t) * (size_t)n_pos));
    PyObject *dict = PyDict_New();
    for (int q = 0; dict && q < n_pos; q++) {
        if (copy[q] < 0) continue;
        PyObject *k = PyLong_FromLong(q), *v = PyLong_FromLong(copy[q]);
        if (k == NULL || v == NULL || PyDict_SetItem(dict, k, v) < 0) Py_CLEAR(dict);
        Py_XDECREF(k);
        Py_XDECREF(v);
    }
    PyMem_Free(copy);
    return dict;
}

static PyObject *Edge_get_int(EdgeObject *self, void *which) {
    if (!edge_ready(self)) return NULL;
    long long v;
    EDGE_LOCKED(self, v = which == (void *)0 ? self->edge.n_pos
                        : which == (void *)1 ? self->edge.split_len
                                             : (long long)self->edge.layer_positions);
    return PyLong_FromLongLong(v);
}

/* split_states: a read-only (capacity, dim) view of the hidden states at the split */
static PyObject *Edge_get_split_states(EdgeObject *self, void *closure) {
    if (!edge_ready(self)) return NULL;
    npy_intp dims[2] = {self->edge.kv->capacity, self->edge.m->cfg.dim};
    PyObject *a = PyArray_New(&PyArray_Type, 2, dims, NPY_FLOAT32, NULL, self->edge.split_states, 0, NPY_ARRAY_CARRAY_RO,
                              NULL);
    if (a == NULL) return NULL;
    if (PyArray_SetBaseObject((PyArrayObject *)a, Py_NewRef(self)) < 0) {
        Py_DECREF(a);
        return NULL;
    }
    return a;
}

/* forward_multi(items, layer_begin, layer_end) -> list of outputs; items: [(KVCache, x (n, dim), pos0), ...]
 * with distinct caches of one model. One pass over all rows: the cloud batching sessions. */
static PyObject *core_forward_multi(PyObject *mod, PyObject *args) {
    module_state *ms = PyModule_GetState(mod);
    PyObject *items;
    int begin, end;
    if (!PyArg_ParseTuple(args, "O!ii", &PyList_Type, &items, &begin, &end)) return NULL;
    Py_ssize_t n_seqs = PyList_GET_SIZE(items);
    if (n_seqs < 1 || n_seqs > 4096) return PyErr_Format(PyExc_ValueError, "need 1 to 4096 sequences");
    CacheObject **caches = PyMem_Calloc((size_t)n_seqs, sizeof *caches);
    ce_seq_rows *seqs = PyMem_Calloc((size_t)n_seqs, sizeof *seqs);
    PyArrayObject *x = NULL;
    PyObject *result = NULL, *inputs = PyList_New(0);
    if (caches == NULL || seqs == NULL || inputs == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    npy_intp rows = 0;
    for (Py_ssize_t s = 0; s < n_seqs; s++) {
        PyObject *cache, *xo;
        int pos0;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(items, s), "O!Oi;items are (KVCache, x, pos0)", ms->cache_type, &cache,
                              &xo, &pos0))
            goto done;
        caches[s] = (CacheObject *)cache;
        if (!cache_ready(caches[s])) goto done;
        if (caches[s]->model != caches[0]->model) {
            PyErr_SetString(PyExc_ValueError, "all caches must belong to one model");
            goto done;
        }
        PyArrayObject *xs = as_rows(xo, caches[0]->model->model.cfg.dim, "x");
        if (xs == NULL || PyList_Append(inputs, (PyObject *)xs) < 0) {
            Py_XDECREF(xs);
            goto done;
        }
        Py_DECREF(xs);
        seqs[s] = (ce_seq_rows){&caches[s]->kv, pos0, (int)n_rows(xs)};
        rows += n_rows(xs);
    }
    const ce_model *m = &caches[0]->model->model;
    npy_intp dims[2] = {rows, m->cfg.dim};
    if ((x = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_FLOAT32)) == NULL) goto done;
    for (Py_ssize_t s = 0, at = 0; s < n_seqs; s++) {
        PyArrayObject *xs = (PyArrayObject *)PyList_GET_ITEM(inputs, s);
        memcpy((float *)PyArray_DATA(x) + at * m->cfg.dim, PyArray_DATA(xs), PyArray_NBYTES(xs));
        at += n_rows(xs);
    }
    char err[CE_ERRLEN] = "";
    ce_status st;
    Py_BEGIN_ALLOW_THREADS
    /* every cache's lock, in address order so that concurrent callers cannot deadlock; distinct caches
     * are checked by ce_forward_multi, which runs in the first cache's workspace */
    for (Py_ssize_t s = 0; s < n_seqs; s++) {
        for (Py_ssize_t t = s + 1; t < n_seqs; t++)
            if ((uintptr_t)caches[t] < (uintptr_t)caches[s]) {
                CacheObject *c = caches[s];
                caches[s] = caches[t];
                caches[t] = c;
            }
    }
    Py_ssize_t locked = 0;
    for (; locked < n_seqs; locked++)
        if (locked > 0 && caches[locked] == caches[locked - 1]) break;
        else PyThread_acquire_lock(caches[locked]->lock, WAIT_LOCK);
    if (locked < n_seqs) {
        snprintf(err, sizeof err, "one cache appears twice");
        st = CE_EINVAL;
    } else {
        st = ce_forward_multi(m, &caches[0]->ws, begin, end, (int)n_seqs, seqs, PyArray_DATA(x), err, sizeof err);
    }
    for (Py_ssize_t s = 0; s < locked; s++) PyThread_release_lock(caches[s]->lock);
    Py_END_ALLOW_THREADS
    if (st != CE_OK) {
        raise_status(ms->error, st, err);
        goto done;
    }
    if ((result = PyList_New(n_seqs)) == NULL) goto done;
    for (Py_ssize_t s = 0, at = 0; s < n_seqs; s++) {
        npy_intp d2[2] = {seqs[s].n, m->cfg.dim};
        PyArrayObject *out = (PyArrayObject *)PyArray_SimpleNew(2, d2, NPY_FLOAT32);
        if (out == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        memcpy(PyArray_DATA(out), (float *)PyArray_DATA(x) + at * m->cfg.dim, PyArray_NBYTES(out));
        at += seqs[s].n;
        PyList_SET_ITEM(result, s, (PyObject *)out);
    }
done:
    PyMem_Free(caches);
    PyMem_Free(seqs);
    Py_XDECREF(x);
    Py_XDECREF(inputs);
    return result;
}

/* ======================= module functions (kernels, for tests and research) ======================= */

/* dequantize(raw, type, rows, cols) -> float32 (rows, cols) */
static PyObject *core_dequantize(PyObject *mod, PyObject *args) {
    (void)mod;
    PyObject *tup = args, *keep = PyList_New(0);
    if (keep == NULL) return NULL;
    ce_tensor t;
    if (tensor_from_tuple(tup, "argument", &t, keep) < 0) {
        Py_DECREF(keep);
        return NULL;
    }
    npy_intp dims[2] = {(npy_intp)t.rows, (npy_intp)t.cols};
    PyArrayObject *out = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_FLOAT32);
    if (out != NULL) {
        Py_BEGIN_ALLOW_THREADS
        for (int64_t r = 0; r < t.rows; r++) ce_dequantize_row(&t, r, (float *)PyArray_DATA(out) + r * t.cols);
        Py_END_ALLOW_THREADS
    }
    Py_DECREF(keep);
    return (PyObject *)out;
}

/* quantize(x float32 (rows, cols), type) -> uint8 (rows * row_bytes,): ggml's reference quantizers */
static PyObject *core_quantize(PyObject *mod, PyObject *args) {
    (void)mod;
    PyObject *xo;
    int type;
    if (!PyArg_ParseTuple(args, "Oi", &xo, &type)) return NULL;
    PyArrayObject *x = (PyArrayObject *)PyArray_FROMANY(xo, NPY_FLOAT32, 2, 2, NPY_ARRAY_IN_ARRAY);
    if (x == NULL) return NULL;
    PyArrayObject *out = NULL;
    const int64_t rows = PyArray_DIM(x, 0), cols = PyArray_DIM(x, 1);
    const size_t row_bytes = ce_row_bytes(type, cols);
    if (row_bytes == 0) {
        PyErr_Format(PyExc_ValueError, "cannot quantize rows of %lld elements to %s (id %d)", (long long)cols,
                     ce_type_name(type), type);
        goto fail;
    }
    npy_intp n = (npy_intp)((size_t)rows * row_bytes);
    if ((out = (PyArrayObject *)PyArray_SimpleNew(1, &n, NPY_UINT8)) == NULL) goto fail;
    char err[CE_ERRLEN] = "";
    ce_status st;
    Py_BEGIN_ALLOW_THREADS
    st = ce_quantize_rows(type, PyArray_DATA(x), rows, cols, PyArray_DATA(out), err, sizeof err);
    Py_END_ALLOW_THREADS
    if (st != CE_OK) {
        PyErr_SetString(PyExc_ValueError, err);
        goto fail;
    }
    Py_DECREF(x);
    return (PyObject *)out;
fail:
    Py_XDECREF(out);
    Py_DECREF(x);
    return NULL;
}

/* add_lowrank(w float32 (rows, cols), up (rows, rank), down (rank, cols)) -> w + up · down (new array),
 * summed in a fixed order so a rebuilt model is the same bits everywhere */
static PyObject *core_add_lowrank(PyObject *mod, PyObject *args) {
    (void)mod;
    PyObject *wo, *uo, *dobj;
    if (!PyArg_ParseTuple(args, "OOO", &wo, &uo, &dobj)) return NULL;
    PyArrayObject *w = (PyArrayObject *)PyArray_FROMANY(wo, NPY_FLOAT32, 2, 2, NPY_ARRAY_IN_ARRAY | NPY_ARRAY_ENSURECOPY);
    PyArrayObject *up = (PyArrayObject *)PyArray_FROMANY(uo, NPY_FLOAT32, 2, 2, NPY_ARRAY_IN_ARRAY);
    PyArrayObject *down = (PyArrayObject *)PyArray_FROMANY(dobj, NPY_FLOAT32, 2, 2, NPY_ARRAY_IN_ARRAY);
    if (w == NULL || up == NULL || down == NULL) goto fail;
    const int64_t rows = PyArray_DIM(w, 0), cols = PyArray_DIM(w, 1), rank = PyArray_DIM(up, 1);
    if (PyArray_DIM(up, 0) != rows || PyArray_DIM(down, 0) != rank || PyArray_DIM(down, 1) != cols) {
        PyErr_Format(PyExc_ValueError, "add_lowrank: shapes (%lld, %lld) + (%lld, %lld) @ (%lld, %lld) do not match",
                     (long long)rows, (long long)cols, (long long)PyArray_DIM(up, 0), (long long)rank,
                     (long long)PyArray_DIM(down, 0), (long long)PyArray_DIM(down, 1));
        goto fail;
    }
    Py_BEGIN_ALLOW_THREADS
    ce_add_lowrank(PyArray_DATA(w), rows, cols, PyArray_DATA(up), PyArray_DATA(down), rank);
    Py_END_ALLOW_THREADS
    Py_DECREF(up);
    Py_DECREF(down);
    return (PyObject *)w;
fail:
    Py_XDECREF(w);
    Py_XDECREF(up);
    Py_XDECREF(down);
    return NULL;
}

/* matmul(raw, type, rows, cols, x, activations="f32") -> float32 (n, rows) = x · Wᵀ with the active kernels */
static PyObject *core_matmul(PyObject *mod, PyObject *args) {
    PyObject *raw, *xo;
    int type, act;
    long long rows, cols;
    const char *activations = "f32";
    if (!PyArg_ParseTuple(args, "OiLLO|s", &raw, &type, &rows, &cols, &xo, &activations)) return NULL;
    if ((act = parse_activations(activations)) < 0) return NULL;
    PyObject *tup = Py_BuildValue("(OiLL)", raw, type, rows, cols), *keep = PyList_New(0);
    PyArrayObject *x = NULL, *out = NULL;
    ce_tensor t;
    if (tup == NULL || keep == NULL || tensor_from_tuple(tup, "w", &t, keep) < 0) goto fail;
    if ((x = as_rows(xo, (int)cols, "x")) == NULL) goto fail;
    npy_intp dims[2] = {n_rows(x), (npy_intp)rows};
    if ((out = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_FLOAT32)) == NULL) goto fail;
    ce_workspace ws = {0};
    char err[CE_ERRLEN] = "";
    ce_status st;
    Py_BEGIN_ALLOW_THREADS
    st = ce_matmul(&t, &ws, act, (int)dims[0], PyArray_DATA(x), PyArray_DATA(out), err, sizeof err);
    ce_workspace_free(&ws);
    Py_END_ALLOW_THREADS
    if (st != CE_OK) {
        raise_status(((module_state *)PyModule_GetState(mod))->error, st, err);
        goto fail;
    }
    Py_DECREF(tup);
    Py_DECREF(keep);
    Py_DECREF(x);
    return (PyObject *)out;
fail:
    Py_XDECREF(tup);
    Py_XDECREF(keep);
    Py_XDECREF(x);
    Py_XDECREF(out);
    return NULL;
}

/* quantize_q8a(x) -> (d float32 (blocks,), s float32 (blocks,), q int8 (cols,)): one row of activations
 * in the active kernels' 8-bit blocks */
static PyObject *core_quantize_q8a(PyObject *mod, PyObject *arg) {
    (void)mod;
    PyArrayObject *x = (PyArrayObject *)PyArray_FROMANY(arg, NPY_FLOAT32, 1, 1, NPY_ARRAY_IN_ARRAY);
    if (x == NULL) return NULL;
    const npy_intp cols = PyArray_DIM(x, 0), blocks = cols / CE_QK;
    if (cols == 0 || cols % CE_QK != 0) {
        PyErr_Format(PyExc_ValueError, "x must have a positive multiple of %d elements, got %zd", CE_QK, (Py_ssize_t)cols);
        Py_DECREF(x);
        return NULL;
    }
    ce_block_q8a *b = PyMem_Malloc(sizeof(ce_block_q8a) * (size_t)blocks);
    PyArrayObject *d = (PyArrayObject *)PyArray_SimpleNew(1, &blocks, NPY_FLOAT32);
    PyArrayObject *sum = (PyArrayObject *)PyArray_SimpleNew(1, &blocks, NPY_FLOAT32);
    PyArrayObject *q = (PyArrayObject *)PyArray_SimpleNew(1, &cols, NPY_INT8);
    PyObject *result = NULL;
    if (b == NULL || d == NULL || sum == NULL || q == NULL) {
        if (b == NULL) PyErr_NoMemory();
    } else {
        ce_kernels_active()->quantize_q8a(PyArray_DATA(x), b, cols);
        for (npy_intp i = 0; i < blocks; i++) {
            ((float *)PyArray_DATA(d))[i] = b[i].d;
            ((float *)PyArray_DATA(sum))[i] = b[i].s;
            memcpy((int8_t *)PyArray_DATA(q) + i * CE_QK, b[i].qs, CE_QK);
        }
        result = PyTuple_Pack(3, d, sum, q);
    }
    PyMem_Free(b);
    Py_DECREF(x);
    Py_XDECREF(d);
    Py_XDECREF(sum);
    Py_XDECREF(q);
    return result;
}

/* rmsnorm(x, w, eps) -> rows of x normalized and scaled by w */
static PyObject *core_rmsnorm(PyObject *mod, PyObject *args) {
    (void)mod;
    PyObject *xo, *wo;
    double eps;
    if (!PyArg_ParseTuple(args, "OOd", &xo, &wo, &eps)) return NULL;
    PyArrayObject *w = (PyArrayObject *)PyArray_FROMANY(wo, NPY_FLOAT32, 1, 1, NPY_ARRAY_IN_ARRAY);
    if (w == NULL) return NULL;
    int d = (int)PyArray_DIM(w, 0);
    PyArrayObject *x = as_rows(xo, d, "x");
    PyArrayObject *out = x ? (PyArrayObject *)PyArray_NewLikeArray(x, NPY_CORDER, NULL, 0) : NULL;
    if (out != NULL)
        for (npy_intp i = 0; i < n_rows(x); i++)
            ce_rmsnorm((float *)PyArray_DATA(out) + i * d, (float *)PyArray_DATA(x) + i * d, PyArray_DATA(w), d, (float)eps);
    Py_DECREF(w);
    Py_XDECREF(x);
    return (PyObject *)out;
}

/* rope(x, pos, theta, style) -> x (n_heads, head_dim) rotated for position pos */
static PyObject *core_rope(PyObject *mod, PyObject *args) {
    (void)mod;
    PyObject *xo;
    int pos, style;
    double theta;
    if (!PyArg_ParseTuple(args, "Oidi", &xo, &pos, &theta, &style)) return NULL;
    PyArrayObject *x = (PyArrayObject *)PyArray_FROMANY(xo, NPY_FLOAT32, 2, 2, NPY_ARRAY_ENSURECOPY | NPY_ARRAY_IN_ARRAY);
    if (x == NULL) return NULL;
    int hd = (int)PyArray_DIM(x, 1);
    if (hd % 2 || hd == 0 || hd > 2048 || (style != CE_ROPE_ADJACENT && style != CE_ROPE_HALF) || pos < 0) {
        Py_DECREF(x);
        PyErr_SetString(PyExc_ValueError, "need an even head_dim <= 2048, pos >= 0 and style 0 or 1");
        return NULL;
    }
    float inv_freq[2048];
    for (int i = 0; i < hd / 2; i++) inv_freq[i] = 1.0f / powf((float)theta, (float)(2 * i) / (float)hd);
    for (npy_intp h = 0; h < PyArray_DIM(x, 0); h++) ce_rope((float *)PyArray_DATA(x) + h * hd, hd, pos, inv_freq, style);
    return (PyObject *)x;
}

/* confidence(logits, metric) -> (conf float32 (n,), top1 int64 (n,)) for each row of logits */
static PyObject *core_confidence(PyObject *mod, PyObject *args) {
    PyObject *lo;
    int metric;
    if (!PyArg_ParseTuple(args, "Oi", &lo, &metric)) return NULL;
    PyArrayObject *logits = (PyArrayObject *)PyArray_FROMANY(lo, NPY_FLOAT32, 1, 2, NPY_ARRAY_IN_ARRAY);
    if (logits == NULL) return NULL;
    npy_intp n = n_rows(logits), vocab = PyArray_DIM(logits, PyArray_NDIM(logits) - 1);
    PyArrayObject *conf = (PyArrayObject *)PyArray_SimpleNew(1, &n, NPY_FLOAT32);
    PyArrayObject *top1 = (PyArrayObject *)PyArray_SimpleNew(1, &n, NPY_INT64);
    if (conf == NULL || top1 == NULL || vocab > INT32_MAX) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "too many logits per row");
        goto fail;
    }
    char err[CE_ERRLEN] = "";
    ce_status st = CE_OK;
    Py_BEGIN_ALLOW_THREADS
    for (npy_intp i = 0; i < n && st == CE_OK; i++) {
        int best = 0;
        st = ce_confidence((const float *)PyArray_DATA(logits) + i * vocab, (int)vocab, metric,
                           (float *)PyArray_DATA(conf) + i, &best, err, sizeof err);
        ((int64_t *)PyArray_DATA(top1))[i] = best;
    }
    Py_END_ALLOW_THREADS
    if (st != CE_OK) {
        raise_status(((module_state *)PyModule_GetState(mod))->error, st, err);
        goto fail;
    }
    Py_DECREF(logits);
    return Py_BuildValue("(NN)", conf, top1);
fail:
    Py_DECREF(logits);
    Py_XDECREF(conf);
    Py_XDECREF(top1);
    return NULL;
}

/* ---- wire format ---- */

typedef struct {
    const char *key;
    unsigned bit;
    char kind; /* 'u' unsigned, 'i' signed, 'f' float, 'b' bytes, 's' str */
} wire_field;

static const wire_field WIRE_FIELDS[] = {
    {"seq", CE_F_SEQ, 'u'},     {"sid", CE_F_SID, 'b'},   {"pos", CE_F_POS, 'u'},     {"n", CE_F_N, 'u'},
    {"dim", CE_F_DIM, 'u'},     {"dtype", CE_F_DTYPE, 'u'}, {"data", CE_F_DATA, 'b'}, {"token", CE_F_TOKEN, 'i'},
    {"conf", CE_F_CONF, 'f'},   {"code", CE_F_CODE, 'i'}, {"msg", CE_F_MSG, 's'},     {"nonce", CE_F_NONCE, 'b'},
    {"mac", CE_F_MAC, 'b'},     {"ver", CE_F_VER, 'i'},   {"cap", CE_F_CAP, 'u'},
    {"us", CE_F_US, 'u'},       {"model", CE_F_MODEL, 's'}, {"split", CE_F_SPLIT, 'u'},
};
#define N_WIRE_FIELDS (sizeof WIRE_FIELDS / sizeof WIRE_FIELDS[0])

/* wire_encode(message: dict) -> bytes (a whole frame, length prefix included) */
static PyObject *core_wire_encode(PyObject *mod, PyObject *dict) {
    if (!PyDict_Check(dict)) return PyErr_Format(PyExc_TypeError, "wire_encode takes a dict");
    ce_msg m;
    memset(&m, 0, sizeof m);
    PyObject *hidden = NULL; /* "data" given as float32 (n, dim) hidden states */
    PyObject *t = PyDict_GetItemString(dict, "type");
    if (t == NULL) return PyErr_Format(PyExc_ValueError, "message has no 'type'");
    m.type = (int)PyLong_AsLong(t);
    if (PyErr_Occurred()) return NULL;
    Py_ssize_t pos = 0;
    PyObject *key, *val;
    while (PyDict_Next(dict, &pos, &key, &val)) {
        const char *k = PyUnicode_Check(key) ? PyUnicode_AsUTF8(key) : NULL;
        if (k == NULL) return PyErr_Format(PyExc_TypeError, "message keys must be str");
        if (strcmp(k, "type") == 0) continue;
        const wire_field *f = NULL;
        for (size_t i = 0; i < N_WIRE_FIELDS; i++)
            if (strcmp(WIRE_FIELDS[i].key, k) == 0) f = &WIRE_FIELDS[i];
        if (f == NULL) return PyErr_Format(PyExc_ValueError, "unknown message field '%s'", k);
        m.fields |= f->bit;
        if (f->bit == CE_F_DATA && PyArray_Check(val)) { /* hidden states: encoded below, once dtype is known */
            hidden = val;
            continue;
        }
        if (f->kind == 'b') {
            char *p;
            Py_ssize_t n;
            if (PyBytes_AsStringAndSize(val, &p, &n) < 0) return NULL;
            if (f->bit == CE_F_DATA) {
                m.data = (uint8_t *)p; /* borrowed for the call */
                m.data_len = (size_t)n;
            } else if (f->bit == CE_F_SID) {
                if (n != CE_WIRE_SESSION_BYTES) return PyErr_Format(PyExc_ValueError, "sid must be 16 bytes");
                memcpy(m.sid, p, n);
            } else {
                if (n > CE_WIRE_MAX_BLOB) return PyErr_Format(PyExc_ValueError, "%s longer than %d bytes", k, CE_WIRE_MAX_BLOB);
                memcpy(f->bit == CE_F_NONCE ? m.nonce : m.mac, p, n);
                *(f->bit == CE_F_NONCE ? &m.nonce_len : &m.mac_len) = (size_t)n;
            }
        } else if (f->kind == 's') {
            Py_ssize_t n;
            const char *p = PyUnicode_AsUTF8AndSize(val, &n);
            if (p == NULL) return NULL;
            if (f->bit == CE_F_MODEL) {
                if (n >= CE_WIRE_MAX_MODEL) return PyErr_Format(PyExc_ValueError, "model longer than %d bytes", CE_WIRE_MAX_MODEL - 1);
                memcpy(m.model, p, n);
                m.model[n] = 0;
            } else {
                if (n >= CE_WIRE_MAX_TEXT) n = CE_WIRE_MAX_TEXT - 1; /* messages are truncated, never refused */
                memcpy(m.msg, p, n);
                m.msg[n] = 0;
            }
        } else if (f->kind == 'f') {
            m.conf = (float)PyFloat_AsDouble(val);
        } else {
            long long v = PyLong_AsLongLong(val);
            if (v == -1 && PyErr_Occurred()) {
                if (!PyErr_ExceptionMatches(PyExc_OverflowError)) return NULL;
                PyErr_Clear();
                return PyErr_Format(PyExc_ValueError, "%s does not fit the wire's 64-bit signed range", k);
            }
            if (f->kind == 'u' && v < 0) return PyErr_Format(PyExc_ValueError, "%s must be >= 0", k);
            if (f->kind == 'i' && (v < INT32_MIN || v > INT32_MAX)) return PyErr_Format(PyExc_OverflowError, "%s out of range", k);
            switch (f->bit) {
            case CE_F_SEQ: m.seq = (uint64_t)v; break;
            case CE_F_POS: m.pos = v; break;
            case CE_F_N: m.n = v > INT32_MAX ? INT32_MAX : (int32_t)v; break;
            case CE_F_DIM: m.dim = v > INT32_MAX ? INT32_MAX : (int32_t)v; break;
            case CE_F_DTYPE: m.dtype = v > INT32_MAX ? INT32_MAX : (int32_t)v; break;
            case CE_F_TOKEN: m.token = (int32_t)v; break;
            case CE_F_CODE: m.code = (int32_t)v; break;
            case CE_F_VER: m.ver = (int32_t)v; break;
            case CE_F_CAP: m.cap = v; break;
            case CE_F_US: m.us = (uint64_t)v; break;
            case CE_F_SPLIT: m.split = v > INT32_MAX ? INT32_MAX : (int32_t)v; break;
            }
        }
        if (PyErr_Occurred()) return NULL;
    }
    uint8_t *out = NULL, *payload = NULL;
    size_t out_len = 0;
    char err[CE_ERRLEN] = "";
    ce_status st = CE_OK;
    if (hidden != NULL) { /* the payload straight from the array, in the message's wire dtype */
        PyArrayObject *x = (PyArrayObject *)PyArray_FROMANY(hidden, NPY_FLOAT32, 2, 2, NPY_ARRAY_IN_ARRAY);
        if (x == NULL) return NULL;
        const int64_t n = PyArray_DIM(x, 0), dim = PyArray_DIM(x, 1);
        if (!(m.fields & CE_F_DTYPE) || ((m.fields & CE_F_N) && m.n != n) || ((m.fields & CE_F_DIM) && m.dim != dim)) {
            Py_DECREF(x);
            return PyErr_Format(PyExc_ValueError, "hidden states of shape (%lld, %lld) need a dtype and matching n, dim",
                                (long long)n, (long long)dim);
        }
        m.data_len = ce_wire_hidden_bytes(m.dtype, n, dim);
        if (m.data_len == 0 || (payload = malloc(m.data_len)) == NULL) {
            Py_DECREF(x);
            return m.data_len == 0 ? PyErr_Format(PyExc_ValueError, "hidden states of shape (%lld, %lld) in wire dtype %d",
                                                  (long long)n, (long long)dim, m.dtype)
                                   : PyErr_NoMemory();
        }
        st = ce_wire_hidden_encode(m.dtype, PyArray_DATA(x), n, dim, payload, err, sizeof err);
        Py_DECREF(x);
        m.data = payload;
    }
    if (st == CE_OK) st = ce_wire_encode(&m, &out, &out_len, err, sizeof err);
    free(payload);
    if (st != CE_OK) return raise_status(((module_state *)PyModule_GetState(mod))->error, st, err);
    PyObject *bytes = PyBytes_FromStringAndSize((const char *)out, (Py_ssize_t)out_len);
    free(out);
    return bytes;
}

/* The message's payload as float32 (n, dim) hidden states (its size against n, dim and dtype was
 * checked by the schema); NULL with ValueError when a state is not finite */
static PyObject *hidden_array(const ce_msg *m) {
    npy_intp dims[2] = {m->n, m->dim};
    PyArrayObject *out = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_FLOAT32);
    if (out == NULL) return NULL;
    char err[CE_ERRLEN] = "";
    ce_status st = ce_wire_hidden_decode(m->dtype, m->data, m->data_len, m->n, m->dim, PyArray_DATA(out), err, sizeof err);
    if (st != CE_OK) {
        Py_DECREF(out);
        return raise_status(PyExc_ValueError, st, err);
    }
    return (PyObject *)out;
}

/* wire_decode(body: bytes, max_data, hidden=False) -> dict; ValueError on any frame outside the schema.
 * With hidden, a payload that comes with n, dim and dtype is decoded straight into float32 (n, dim). */
static PyObject *core_wire_decode(PyObject *mod, PyObject *args) {
    Py_buffer body;
    Py_ssize_t max_data;
    int hidden = 0;
    if (!PyArg_ParseTuple(args, "y*n|p", &body, &max_data, &hidden)) return NULL;
    ce_msg m;
    char err[CE_ERRLEN] = "";
    ce_status st;
    Py_BEGIN_ALLOW_THREADS
    st = ce_wire_decode(body.buf, (size_t)body.len, max_data < 0 ? 0 : (size_t)max_data, &m, err, sizeof err);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&body);
    if (st != CE_OK) return raise_status(((module_state *)PyModule_GetState(mod))->error, st, err);
    PyObject *d = PyDict_New(), *v = NULL;
    if (d == NULL || (v = PyLong_FromLong(m.type)) == NULL || PyDict_SetItemString(d, "type", v) < 0) goto fail;
    Py_CLEAR(v);
    for (size_t i = 0; i < N_WIRE_FIELDS; i++) {
        const wire_field *f = &WIRE_FIELDS[i];
        if (!(m.fields & f->bit)) continue;
        switch (f->bit) {
        case CE_F_SEQ: v = PyLong_FromUnsignedLongLong(m.seq); break;
        case CE_F_SID: v = PyBytes_FromStringAndSize((const char *)m.sid, CE_WIRE_SESSION_BYTES); break;
        case CE_F_POS: v = PyLong_FromLongLong(m.pos); break;
        case CE_F_N: v = PyLong_FromLong(m.n); break;
        case CE_F_DIM: v = PyLong_FromLong(m.dim); break;
        case CE_F_DTYPE: v = PyLong_FromLong(m.dtype); break;
        case CE_F_DATA:
            v = hidden && (m.fields & CE_F_N) && (m.fields & CE_F_DIM) && (m.fields & CE_F_DTYPE)
                    ? hidden_array(&m)
                    : PyBytes_FromStringAndSize((const char *)m.data, (Py_ssize_t)m.data_len);
            break;
        case CE_F_TOKEN: v = PyLong_FromLong(m.token); break;
        case CE_F_CONF: v = PyFloat_FromDouble(m.conf); break;
        case CE_F_CODE: v = PyLong_FromLong(m.code); break;
        case CE_F_MSG: v = PyUnicode_DecodeUTF8(m.msg, (Py_ssize_t)strlen(m.msg), "replace"); break;
        case CE_F_NONCE: v = PyBytes_FromStringAndSize((const char *)m.nonce, (Py_ssize_t)m.nonce_len); break;
        case CE_F_MAC: v = PyBytes_FromStringAndSize((const char *)m.mac, (Py_ssize_t)m.mac_len); break;
        case CE_F_VER: v = PyLong_FromLong(m.ver); break;
        case CE_F_CAP: v = PyLong_FromLongLong(m.cap); break;
        case CE_F_US: v = PyLong_FromUnsignedLongLong(m.us); break;
        case CE_F_MODEL: v = PyUnicode_DecodeUTF8(m.model, (Py_ssize_t)strlen(m.model), "replace"); break;
        case CE_F_SPLIT: v = PyLong_FromLong(m.split); break;
        }
        if (v == NULL || PyDict_SetItemString(d, f->key, v) < 0) goto fail;
        Py_CLEAR(v);
    }
    ce_msg_clear(&m);
    return d;
fail:
    ce_msg_clear(&m);
    Py_XDECREF(v);
    Py_XDECREF(d);
    return NULL;
}

/* frame_length(header: 4 bytes, max_body) -> body length; IndexError when outside (0, max_body] */
static PyObject *core_frame_length(PyObject *mod, PyObject *args) {
    Py_buffer header;
    Py_ssize_t max_body;
    if (!PyArg_ParseTuple(args, "y*n", &header, &max_body)) return NULL;
    if (header.len != CE_WIRE_HEADER || max_body < 0) {
        PyBuffer_Release(&header);
        return PyErr_Format(PyExc_ValueError, "a frame header is %d bytes", CE_WIRE_HEADER);
    }
    size_t len = 0;
    char err[CE_ERRLEN] = "";
    ce_status st = ce_wire_frame_length(header.buf, (size_t)max_body, &len, err, sizeof err);
    PyBuffer_Release(&header);
    if (st != CE_OK) return raise_status(((module_state *)PyModule_GetState(mod))->error, st, err);
    return PyLong_FromSize_t(len);
}

/* hidden_encode(x (n, dim) float32, dtype) -> bytes */
static PyObject *core_hidden_encode(PyObject *mod, PyObject *args) {
    PyObject *xo;
    int dtype;
    if (!PyArg_ParseTuple(args, "Oi", &xo, &dtype)) return NULL;
    PyArrayObject *x = (PyArrayObject *)PyArray_FROMANY(xo, NPY_FLOAT32, 2, 2, NPY_ARRAY_IN_ARRAY);
    if (x == NULL) return NULL;
    npy_intp n = PyArray_DIM(x, 0), dim = PyArray_DIM(x, 1);
    size_t nbytes = ce_wire_hidden_bytes(dtype, n, dim);
    if (nbytes == 0) {
        Py_DECREF(x);
        return PyErr_Format(PyExc_ValueError, "cannot encode (%zd, %zd) as wire type %d", (Py_ssize_t)n, (Py_ssize_t)dim, dtype);
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)nbytes);
    if (out == NULL) {
        Py_DECREF(x);
        return NULL;
    }
    char err[CE_ERRLEN] = "";
    ce_status st = ce_wire_hidden_encode(dtype, PyArray_DATA(x), n, dim, (uint8_t *)PyBytes_AS_STRING(out), err, sizeof err);
    Py_DECREF(x);
    if (st != CE_OK) {
        Py_DECREF(out);
        return raise_status(((module_state *)PyModule_GetState(mod))->error, st, err);
    }
    return out;
}

/* hidden_decode(data: bytes, n, dim, dtype) -> float32 (n, dim) */
static PyObject *core_hidden_decode(PyObject *mod, PyObject *args) {
    Py_buffer data;
    Py_ssize_t n, dim;
    int dtype;
    if (!PyArg_ParseTuple(args, "y*nni", &data, &n, &dim, &dtype)) return NULL;
    if (ce_wire_hidden_bytes(dtype, n, dim) == 0) {
        PyBuffer_Release(&data);
        return PyErr_Format(PyExc_ValueError, "(%zd, %zd) is not a shape of wire type %d", n, dim, dtype);
    }
    npy_intp dims[2] = {n, dim};
    PyArrayObject *out = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_FLOAT32);
    char err[CE_ERRLEN] = "";
    ce_status st = out ? ce_wire_hidden_decode(dtype, data.buf, (size_t)data.len, n, dim, PyArray_DATA(out), err, sizeof err)
                       : CE_ENOMEM;
    PyBuffer_Release(&data);
    if (out == NULL) return NULL;
    if (st != CE_OK) {
        Py_DECREF(out);
        return raise_status(((module_state *)PyModule_GetState(mod))->error, st, err);
    }
    return (PyObject *)out;
}

/* exit_gate(h (n, dim), gate_w (dim + 1,), gate_b, prev) -> float64 (n,): ce_exit_gate per row, prev a
 * scalar or one value per row */
static PyObject *core_exit_gate(PyObject *mod, PyObject *args) {
    PyObject *ho, *wo, *prevo;
    double gate_b;
    if (!PyArg_ParseTuple(args, "OOdO", &ho, &wo, &gate_b, &prevo)) return NULL;
    PyArrayObject *h = (PyArrayObject *)PyArray_FROMANY(ho, NPY_FLOAT32, 2, 2, NPY_ARRAY_IN_ARRAY);
    PyArrayObject *w = h ? (PyArrayObject *)PyArray_FROMANY(wo, NPY_FLOAT32, 1, 1, NPY_ARRAY_IN_ARRAY) : NULL;
    PyArrayObject *prev = w ? (PyArrayObject *)PyArray_FROMANY(prevo, NPY_FLOAT64, 0, 1, NPY_ARRAY_IN_ARRAY | NPY_ARRAY_FORCECAST) : NULL;
    PyArrayObject *out = NULL;
    if (prev == NULL) goto done;
    const npy_intp n = PyArray_DIM(h, 0), dim = PyArray_DIM(h, 1), n_prev = PyArray_SIZE(prev);
    if (PyArray_DIM(w, 0) != dim + 1 || (n_prev != 1 && n_prev != n) || dim > INT_MAX) {
        PyErr_Format(PyExc_ValueError, "exit_gate: h (n, dim), gate_w (dim + 1,) and prev a scalar or (n,)");
        goto done;
    }
    if ((out = (PyArrayObject *)PyArray_SimpleNew(1, &n, NPY_FLOAT64)) == NULL) goto done;
    const ce_exit_head head = {.gate_w = PyArray_DATA(w), .gate_b = (float)gate_b};
    const double *p = PyArray_DATA(prev);
    for (npy_intp i = 0; i < n; i++)
        ((double *)PyArray_DATA(out))[i] =
            ce_exit_gate(&head, (int)dim, (const float *)PyArray_DATA(h) + i * dim, p[n_prev == 1 ? 0 : i]);
done:
    Py_XDECREF(h);
    Py_XDECREF(w);
    Py_XDECREF(prev);
    return (PyObject *)out;
}

/* exit_decide(logits (vocab,), metric, threshold) -> (accept: bool, top1, conf) */
static PyObject *core_exit_decide(PyObject *mod, PyObject *args) {
    PyObject *lo;
    int metric;
    double threshold;
    if (!PyArg_ParseTuple(args, "Oid", &lo, &metric, &threshold)) return NULL;
    PyArrayObject *logits = (PyArrayObject *)PyArray_FROMANY(lo, NPY_FLOAT32, 1, 1, NPY_ARRAY_IN_ARRAY);
    if (logits == NULL) return NULL;
    if (PyArray_DIM(logits, 0) > INT32_MAX) {
        Py_DECREF(logits);
        return PyErr_Format(PyExc_ValueError, "too many logits");
    }
    int accept = 0, top1 = 0;
    float conf = 0.0f;
    char err[CE_ERRLEN] = "";
    ce_status st = ce_exit_decide(PyArray_DATA(logits), (int)PyArray_DIM(logits, 0), metric, (float)threshold, &accept,
                                  &conf, &top1, err, sizeof err);
    Py_DECREF(logits);
    if (st != CE_OK) return raise_status(((module_state *)PyModule_GetState(mod))->error, st, err);
    return Py_BuildValue("(Oid)", accept ? Py_True : Py_False, top1, (double)conf);
}

/* row_bytes(type, cols) -> bytes of one row, 0 when the type is unknown or cols do not fill its blocks */
/* pick(logits, rng, temperature=0, top_k=0, top_p=1, repetition_penalty=1, seen=None) -> token
 * ce_pick on float32 logits (penalized in place) with the uint64 (4,) generator state rng (advanced). */
static PyObject *core_pick(PyObject *mod, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"logits", "rng", "temperature", "top_k", "top_p", "repetition_penalty", "seen", NULL};
    PyObject *logits_o, *rng_o, *seen_o = Py_None;
    ce_sampler sampler = {.temperature = 0.0f, .top_k = 0, .top_p = 1.0f, .repetition_penalty = 1.0f};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|fiffO", kwlist, &logits_o, &rng_o, &sampler.temperature,
                                     &sampler.top_k, &sampler.top_p, &sampler.repetition_penalty, &seen_o))
        return NULL;
    const npy_intp vocab = PyArray_Check(logits_o) ? PyArray_SIZE((PyArrayObject *)logits_o) : 0;
    float *logits = writable_vector(logits_o, NPY_FLOAT32, vocab > 0 ? vocab : 1, "logits");
    uint64_t *rng = logits ? writable_vector(rng_o, NPY_UINT64, 4, "rng") : NULL;
    if (rng == NULL) return NULL;
    if (vocab > INT32_MAX) return PyErr_Format(PyExc_ValueError, "%zd logits are too many", (Py_ssize_t)vocab);
    const uint8_t *seen = NULL;
    if (seen_o != Py_None && (seen = writable_vector(seen_o, NPY_UINT8, vocab, "seen")) == NULL) return NULL;
    memcpy(sampler.rng, rng, sizeof sampler.rng);
    char err[CE_ERRLEN] = "";
    int token = -1;
    ce_status st;
    Py_BEGIN_ALLOW_THREADS
    st = ce_pick(&sampler, logits, (int)vocab, seen, NULL, &token, err, sizeof err);
    Py_END_ALLOW_THREADS
    memcpy(rng, sampler.rng, sizeof sampler.rng);
    if (st != CE_OK) return raise_status(PyExc_ValueError, st, err);
    return PyLong_FromLong(token);
}

static PyObject *core_row_bytes(PyObject *mod, PyObject *args) {
    (void)mod;
    int type;
    long long cols;
    if (!PyArg_ParseTuple(args, "iL", &type, &cols)) return NULL;
    return PyLong_FromSize_t(ce_row_bytes(type, cols));
}

/* select_kernels(name="auto") -> name of the active kernel set */
static PyObject *core_select_kernels(PyObject *mod, PyObject *args) {
    const char *name = "auto";
    if (!PyArg_ParseTuple(args, "|s", &name)) return NULL;
    char err[CE_ERRLEN] = "";
    ce_status st = ce_kernels_select(name, err, sizeof err);
    if (st != CE_OK) return raise_status(((module_state *)PyModule_GetState(mod))->error, st, err);
    return PyUnicode_FromString(ce_kernels_active()->name);
}

/* set_threads(n=0) -> threads in use (0: the cores available) */
static PyObject *core_set_threads(PyObject *mod, PyObject *args) {
    int n = 0;
    if (!PyArg_ParseTuple(args, "|i", &n)) return NULL;
    char err[CE_ERRLEN] = "";
    ce_status st;
    Py_BEGIN_ALLOW_THREADS
    st = ce_threads_set(n, err, sizeof err);
    Py_END_ALLOW_THREADS
    if (st != CE_OK) return raise_status(((module_state *)PyModule_GetState(mod))->error, st, err);
    return PyLong_FromLong(ce_threads_get());
}

static PyObject *core_get_threads(PyObject *mod, PyObject *noargs) {
    (void)mod;
    (void)noargs;
    return PyLong_FromLong(ce_threads_get());
}

/* glibc keeps freed heap memory mapped for reuse; after a one-off burst of temporaries (building the
 * tokenizer) that memory would count against the process for its whole life. */
static PyObject *core_trim_heap(PyObject *mod, PyObject *noargs) {
#ifdef __GLIBC__
    return PyBool_FromLong(malloc_trim(0));
#else
    Py_RETURN_FALSE;
#endif
}

static PyObject *core_active_kernels(PyObject *mod, PyObject *noargs) {
    (void)mod;
    (void)noargs;
    return PyUnicode_FromString(ce_kernels_active()->name);
}

static PyMethodDef core_methods[] = {
    {"set_threads", core_set_threads, METH_VARARGS, "set_threads(n=0) -> threads used (0: all available cores)"},
    {"get_threads", core_get_threads, METH_NOARGS, "get_threads() -> threads used by the core"},
    {"active_kernels", core_active_kernels, METH_NOARGS, "active_kernels() -> name of the kernel set in use"},
    {"trim_heap", core_trim_heap, METH_NOARGS,
     "trim_heap() -> whether memory went back: hands the C heap's free pages back to the OS (glibc malloc_trim)"},
    {"dequantize", core_dequantize, METH_VARARGS, "dequantize(raw, type, rows, cols) -> float32 (rows, cols)"},
    {"quantize", core_quantize, METH_VARARGS, "quantize(x float32 (rows, cols), type) -> uint8 raw blocks (ggml's reference rounding)"},
    {"add_lowrank", core_add_lowrank, METH_VARARGS, "add_lowrank(w, up, down) -> w + up @ down (float32, fixed summation order)"},
    {"matmul", core_matmul, METH_VARARGS, "matmul(raw, type, rows, cols, x, activations='f32') -> x @ W.T with the active kernels"},
    {"quantize_q8a", core_quantize_q8a, METH_O, "quantize_q8a(x) -> (d, s, q): 8-bit activation blocks of one row (s = d * sum(q))"},
    {"rmsnorm", core_rmsnorm, METH_VARARGS, "rmsnorm(x, w, eps) -> x / sqrt(mean(x^2) + eps) * w per row"},
    {"rope", core_rope, METH_VARARGS, "rope(x, pos, theta, style) -> heads of x rotated for pos"},
    {"confidence", core_confidence, METH_VARARGS,
     "confidence(logits, metric) -> (conf, top1) per row; metric METRIC_MAX_PROB, METRIC_MARGIN or METRIC_ENTROPY"},
    {"wire_encode", core_wire_encode, METH_O,
     "wire_encode(message: dict) -> frame bytes (length prefix included); data: bytes, or float32 (n, dim) hidden states"},
    {"wire_decode", core_wire_decode, METH_VARARGS,
     "wire_decode(body: bytes, max_data, hidden=False) -> message dict (hidden: payloads as float32 (n, dim))"},
    {"frame_length", core_frame_length, METH_VARARGS, "frame_length(header, max_body) -> body length"},
    {"hidden_encode", core_hidden_encode, METH_VARARGS, "hidden_encode(x, dtype) -> payload bytes"},
    {"hidden_decode", core_hidden_decode, METH_VARARGS, "hidden_decode(data, n, dim, dtype) -> float32 (n, dim)"},
    {"forward_multi", core_forward_multi, METH_VARARGS,
     "forward_multi([(cache, x, pos0), ...], layer_begin, layer_end) -> outputs: sessions in one pass"},
    {"exit_gate", core_exit_gate, METH_VARARGS,
     "exit_gate(h (n, dim), gate_w (dim + 1,), gate_b, prev) -> float64 (n,) gate probabilities"},
    {"exit_decide", core_exit_decide, METH_VARARGS, "exit_decide(logits, metric, threshold) -> (accept, top1, conf)"},
    {"pick", (PyCFunction)(void (*)(void))core_pick, METH_VARARGS | METH_KEYWORDS,
     "pick(logits, rng, temperature=0, top_k=0, top_p=1, repetition_penalty=1, seen=None) -> the next token"},
    {"row_bytes", core_row_bytes, METH_VARARGS, "row_bytes(type, cols) -> bytes per row (0: unsupported)"},
    {"select_kernels", core_select_kernels, METH_VARARGS, "select_kernels(name='auto') -> active kernel set"},
    {NULL, NULL, 0, NULL},
};

static PyMethodDef Model_methods[] = {
    {"embed", (PyCFunction)Model_embed, METH_O, "embed(tokens) -> float32 (n, dim)"},
    {"head", (PyCFunction)(void (*)(void))Model_head, METH_VARARGS | METH_KEYWORDS,
     "head(x, norm=None, rows=vocab, down=None, up=None) -> logits (n, rows): [x + up (down x)], rmsnorm, LM head"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Model_getset[] = {
    {"config", (getter)Model_get_config, NULL, "the model's configuration as a dict", NULL},
    {"activations", (getter)Model_get_activations, NULL, "'f32' or 'q8': how matrix products take activations", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot Model_slots[] = {
    {Py_tp_doc, "Model(config, tensors): a LLaMA-family decoder over caller-owned weight buffers"},
    {Py_tp_init, Model_init},
    {Py_tp_dealloc, Model_dealloc},
    {Py_tp_traverse, Model_traverse},
    {Py_tp_clear, Model_clear},
    {Py_tp_methods, Model_methods},
    {Py_tp_getset, Model_getset},
    {0, NULL},
};

static PyType_Spec Model_spec = {"cecollm._core.Model", sizeof(ModelObject), 0,
                                 Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC, Model_slots};

static PyMethodDef Cache_methods[] = {
    {"forward", (PyCFunction)(void (*)(void))Cache_forward, METH_VARARGS | METH_KEYWORDS,
     "forward(x, pos0, layer_begin=None, layer_end=None) -> hidden states after the layer range"},
    {"fill_kv", (PyCFunction)(void (*)(void))Cache_fill_kv, METH_VARARGS | METH_KEYWORDS,
     "fill_kv(x, pos0, layer_begin, layer_end): keys/values of skipped layers from the same hidden states"},
    {"generate", (PyCFunction)(void (*)(void))Cache_generate, METH_VARARGS | METH_KEYWORDS,
     "generate(logits, seen, rng, pending, pos, n_max, end_ids, temperature=0, top_k=0, top_p=1, "
     "repetition_penalty=1, n_top=-1) -> (tokens, ended, logprobs, top_ids, top_logprobs): the token loop in C"},
    {"lengths", (PyCFunction)Cache_lengths, METH_NOARGS, "lengths() -> filled positions per layer"},
    {"truncate", (PyCFunction)Cache_truncate, METH_O, "truncate(n): forget positions n.. in every layer"},
    {"kv", (PyCFunction)Cache_kv, METH_O, "kv(layer) -> (keys, values) copies, (n_kv_heads, len, head_dim)"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Cache_getset[] = {
    {"capacity", (getter)Cache_get_int, NULL, "positions the cache holds", (void *)0},
    {"layer_begin", (getter)Cache_get_int, NULL, "first layer held", (void *)1},
    {"layer_end", (getter)Cache_get_int, NULL, "one past the last layer held", (void *)2},
    {"dtype", (getter)Cache_get_int, NULL, "'f32' or 'f16': how keys and values are stored", (void *)3},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot Cache_slots[] = {
    {Py_tp_doc, "KVCache(model, capacity, layer_begin=0, layer_end=n_layers): one sequence's keys and values"},
    {Py_tp_init, Cache_init},
    {Py_tp_dealloc, Cache_dealloc},
    {Py_tp_traverse, Cache_traverse},
    {Py_tp_methods, Cache_methods},
    {Py_tp_getset, Cache_getset},
    {0, NULL},
};

static PyType_Spec Cache_spec = {"cecollm._core.KVCache", sizeof(CacheObject), 0,
                                 Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC, Cache_slots};

static PyMethodDef Edge_methods[] = {
    {"prefill", (PyCFunction)Edge_prefill, METH_O, "prefill(ids): the prompt through every edge layer in one batch"},
    {"step", (PyCFunction)Edge_step, METH_VARARGS,
     "step(token, thresholds, finish_at_split) -> (logits or None, (exit_layer, confidence, layers_run, head_checks, "
     "prechecks_skipped), segments, split_start)"},
    {"generate", (PyCFunction)(void (*)(void))Edge_generate, METH_VARARGS | METH_KEYWORDS,
     "generate(logits, rng, pending, n_max, end_ids, thresholds, temperature=0, top_k=0, top_p=1) -> "
     "(tokens, decisions, ended): standalone generation's token loop in C"},
    {"flush", (PyCFunction)Edge_flush, METH_NOARGS, "flush() -> first position finished at the split, or -1"},
    {"rollback", (PyCFunction)Edge_rollback, METH_O, "rollback(n): forget positions n.."},
    {"pending", (PyCFunction)Edge_pending, METH_NOARGS, "pending() -> {position: exit layer} waiting for catch-up"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Edge_getset[] = {
    {"n_pos", (getter)Edge_get_int, NULL, "positions fed", (void *)0},
    {"split_len", (getter)Edge_get_int, NULL, "rows of split_states that are final", (void *)1},
    {"layer_positions", (getter)Edge_get_int, NULL, "position-layers computed so far", (void *)2},
    {"split_states", (getter)Edge_get_split_states, NULL, "read-only (capacity, dim) hidden states at the split", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot Edge_slots[] = {
    {Py_tp_doc, "Edge(cache, heads, metric, propagate, precheck_rows=0): one sequence on an edge device; heads: "
                "(layer, norm, down, up, gate_w, gate_b) per exit, the split's last"},
    {Py_tp_init, Edge_init},
    {Py_tp_dealloc, Edge_dealloc},
    {Py_tp_traverse, Edge_traverse},
    {Py_tp_methods, Edge_methods},
    {Py_tp_getset, Edge_getset},
    {0, NULL},
};

static PyType_Spec Edge_spec = {"cecollm._core.Edge", sizeof(EdgeObject), 0, Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
                                Edge_slots};

static int core_exec(PyObject *mod) {
    if (PyArray_ImportNumPyAPI() < 0) return -1;
    module_state *st = PyModule_GetState(mod);
    char err[CE_ERRLEN] = "";
    if (ce_kernels_select("auto", err, sizeof err) != CE_OK || ce_threads_set(0, err, sizeof err) != CE_OK) {
        PyErr_SetString(PyExc_RuntimeError, err);
        return -1;
    }
    st->model_type = (PyTypeObject *)PyType_FromModuleAndSpec(mod, &Model_spec, NULL);
    st->cache_type = (PyTypeObject *)PyType_FromModuleAndSpec(mod, &Cache_spec, NULL);
    st->edge_type = (PyTypeObject *)PyType_FromModuleAndSpec(mod, &Edge_spec, NULL);
    st->error = PyErr_NewException("cecollm._core.CoreError", PyExc_RuntimeError, NULL);
    if (st->model_type == NULL || st->cache_type == NULL || st->edge_type == NULL || st->error == NULL) return -1;
    if (PyModule_AddType(mod, st->model_type) < 0 || PyModule_AddType(mod, st->cache_type) < 0 ||
        PyModule_AddType(mod, st->edge_type) < 0 ||
        PyModule_AddObjectRef(mod, "CoreError", st->error) < 0)
        return -1;
    if (PyModule_AddIntConstant(mod, "TYPE_F32", CE_TYPE_F32) || PyModule_AddIntConstant(mod, "TYPE_F16", CE_TYPE_F16) ||
        PyModule_AddIntConstant(mod, "TYPE_Q4_0", CE_TYPE_Q4_0) || PyModule_AddIntConstant(mod, "TYPE_Q4_1", CE_TYPE_Q4_1) ||
        PyModule_AddIntConstant(mod, "TYPE_Q8_0", CE_TYPE_Q8_0) || PyModule_AddIntConstant(mod, "TYPE_Q5_0", CE_TYPE_Q5_0) ||
        PyModule_AddIntConstant(mod, "TYPE_Q5_1", CE_TYPE_Q5_1) || PyModule_AddIntConstant(mod, "TYPE_Q4_K", CE_TYPE_Q4_K) ||
        PyModule_AddIntConstant(mod, "TYPE_Q5_K", CE_TYPE_Q5_K) || PyModule_AddIntConstant(mod, "TYPE_Q6_K", CE_TYPE_Q6_K) ||
        PyModule_AddIntConstant(mod, "ROPE_ADJACENT", CE_ROPE_ADJACENT) ||
        PyModule_AddIntConstant(mod, "ROPE_HALF", CE_ROPE_HALF) ||
        PyModule_AddIntConstant(mod, "SMALL_BATCH", CE_SMALL_BATCH) ||
        PyModule_AddIntConstant(mod, "CODE_OK", CE_CODE_OK) || PyModule_AddIntConstant(mod, "CODE_BAD_FRAME", CE_CODE_BAD_FRAME) ||
        PyModule_AddIntConstant(mod, "CODE_AUTH_FAILED", CE_CODE_AUTH_FAILED) ||
        PyModule_AddIntConstant(mod, "CODE_UNKNOWN_SESSION", CE_CODE_UNKNOWN_SESSION) ||
        PyModule_AddIntConstant(mod, "CODE_BUSY", CE_CODE_BUSY) ||
        PyModule_AddIntConstant(mod, "CODE_BAD_POSITION", CE_CODE_BAD_POSITION) ||
        PyModule_AddIntConstant(mod, "CODE_BAD_REQUEST", CE_CODE_BAD_REQUEST) ||
        PyModule_AddIntConstant(mod, "CODE_STALE_SEQUENCE", CE_CODE_STALE_SEQUENCE) ||
        PyModule_AddIntConstant(mod, "CODE_SHUTTING_DOWN", CE_CODE_SHUTTING_DOWN) ||
        PyModule_AddIntConstant(mod, "CODE_MISMATCH", CE_CODE_MISMATCH) ||
        PyModule_AddIntConstant(mod, "BATCH_CHUNK", CE_BATCH_CHUNK) ||
        PyModule_AddIntConstant(mod, "METRIC_MAX_PROB", CE_METRIC_MAX_PROB) ||
        PyModule_AddIntConstant(mod, "METRIC_MARGIN", CE_METRIC_MARGIN) ||
        PyModule_AddIntConstant(mod, "METRIC_ENTROPY", CE_METRIC_ENTROPY) ||
        PyModule_AddIntConstant(mod, "METRIC_GATE", CE_METRIC_GATE) ||
        PyModule_AddIntConstant(mod, "WIRE_F16", CE_WIRE_F16) || PyModule_AddIntConstant(mod, "WIRE_Q8_0", CE_WIRE_Q8_0) ||
        PyModule_AddIntConstant(mod, "WIRE_F32", CE_WIRE_F32) ||
        PyModule_AddIntConstant(mod, "WIRE_VERSION", CE_WIRE_VERSION))
        return -1;
    PyObject *max_seq = PyLong_FromUnsignedLongLong(CE_WIRE_MAX_SEQ);
    int bad = max_seq == NULL || PyModule_AddObjectRef(mod, "WIRE_MAX_SEQ", max_seq) < 0;
    Py_XDECREF(max_seq);
    return bad ? -1 : 0;
}

static int core_traverse(PyObject *mod, visitproc visit, void *arg) {
    module_state *st = PyModule_GetState(mod);
    Py_VISIT(st->model_type);
    Py_VISIT(st->cache_type);
    Py_VISIT(st->edge_type);
    Py_VISIT(st->error);
    return 0;
}

static int core_clear(PyObject *mod) {
    module_state *st = PyModule_GetState(mod);
    Py_CLEAR(st->model_type);
    Py_CLEAR(st->cache_type);
    Py_CLEAR(st->edge_type);
    Py_CLEAR(st->error);
    return 0;
}

static void core_free(void *mod) { core_clear((PyObject *)mod); }

static PyModuleDef_Slot core_slots[] = {
    {Py_mod_exec, core_exec},
#ifdef Py_mod_multiple_interpreters
    /* the C core keeps process-wide state (the thread pool, the kernel choice): one interpreter only */
    {Py_mod_multiple_interpreters, Py_MOD_MULTIPLE_INTERPRETERS_NOT_SUPPORTED},
#endif
    {0, NULL},
};

static struct PyModuleDef core_module = {
    PyModuleDef_HEAD_INIT, "cecollm._core", "C core of cecollm: kernels, layer execution, KV cache.",
    sizeof(module_state),  core_methods,    core_slots,
    core_traverse,         core_clear,      core_free,
};

PyMODINIT_FUNC PyInit__core(void) { return PyModuleDef_Init(&core_module); }
