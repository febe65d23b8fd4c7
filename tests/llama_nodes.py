"""llama.cpp's intermediate tensors, to bisect a difference op by op: the graph nodes llama.cpp
names (llama-graph.cpp's cb: "attn_norm-3", "Vcur-0", "kqv_out-1", "ffn_moe_out-2", "l_out-0",
"result_norm", "result_output", ...) read through llama_context_params.cb_eval, the scheduler's
eval callback (ggml_backend_sched_eval_callback), set with llama-cpp-python's ctypes API.

    nodes, logits = llama_cpp_nodes(path, ids, want=("attn_norm-", "l_out-"))
    nodes["attn_norm-0"][0]   # [T, 256] float32: the first evaluation of that name

A node name can be evaluated more than once (views and in-place ops share it): each evaluation
is kept, in order. Only F32 nodes are read. The context takes llama_cpp.Llama's own parameters
(flash attention off, F32 KV cache as asked), so its logits equal Llama.eval's."""
from __future__ import annotations

import ctypes

import numpy as np


class GgmlTensor(ctypes.Structure):
    """struct ggml_tensor (ggml.h of the llama.cpp that llama-cpp-python 0.3.x vendors)."""
    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64),
                ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8)]


def _read(t: GgmlTensor, rows: int) -> np.ndarray:
    """An F32 node's values (any strides) as [rows, -1] when they divide evenly, else as ggml lays them."""
    ne, nb = list(t.ne), list(t.nb)
    span = sum((n - 1) * s for n, s in zip(ne, nb)) + 4
    raw = np.frombuffer((ctypes.c_uint8 * span).from_address(t.data), dtype=np.float32)
    a = np.lib.stride_tricks.as_strided(raw, shape=ne[::-1], strides=nb[::-1]).copy()
    return a.reshape(rows, -1) if a.size % rows == 0 else a


def llama_cpp_nodes(path, ids: list[int], want: tuple[str, ...] = (), n_threads: int = 2):
    """({name: [array, ...]}, logits [T, vocab]) of one batch of ids through llama.cpp; want:
    name prefixes to keep (empty: every named F32 node)."""
    import llama_cpp

    out: dict[str, list[np.ndarray]] = {}

    def cb(ptr, ask, _user):
        t = ctypes.cast(ptr, ctypes.POINTER(GgmlTensor)).contents
        name = t.name.decode(errors="replace")
        if ask:
            return not want or name.startswith(tuple(want))
        if t.type == 0 and t.data:  # GGML_TYPE_F32, computed on the CPU
            out.setdefault(name, []).append(_read(t, len(ids)))
        return True

    cb_c = llama_cpp.ggml_backend_sched_eval_callback(cb)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(512, len(ids) + 8), n_batch=512, logits_all=True,
                          type_k=0, type_v=0, verbose=False, n_threads=n_threads, seed=0)
    p = llm.context_params
    p.cb_eval = cb_c
    ctx = llama_cpp.llama_init_from_model(llm.model, p)
    if not ctx:
        raise RuntimeError(f"{path}: llama_init_from_model failed")
    batch = llama_cpp.llama_batch_init(len(ids), 0, 1)
    try:
        batch.n_tokens = len(ids)
        for i, tok in enumerate(ids):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, i, 1, 1
            batch.seq_id[i][0] = 0
        rc = llama_cpp.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"{path}: llama_decode returned {rc}")
        vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(llm.model))
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(len(ids), vocab)).copy()
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
    return out, logits
