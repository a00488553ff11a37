# Dumps every f32 graph tensor of llama.cpp for one batch of tokens into OUT/<name>.<k>.npy (k = occurrence).
import ctypes, sys, os, numpy as np, llama_cpp
model_path, out = sys.argv[1], sys.argv[2]
ids = [int(t) for t in sys.argv[3].split(",")]
os.makedirs(out, exist_ok=True)
base = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
base.ggml_get_name.restype = ctypes.c_char_p; base.ggml_get_name.argtypes = [ctypes.c_void_p]
base.ggml_nbytes.restype = ctypes.c_size_t; base.ggml_nbytes.argtypes = [ctypes.c_void_p]
base.ggml_is_contiguous.restype = ctypes.c_bool; base.ggml_is_contiguous.argtypes = [ctypes.c_void_p]
seen = {}
def cb(t, ask, ud):
    if ask:
        return True
    name = base.ggml_get_name(t).decode()
    ty = ctypes.c_int32.from_address(t).value
    ne = [ctypes.c_int64.from_address(t + 16 + 8 * i).value for i in range(4)]
    data = ctypes.c_void_p.from_address(t + 248).value
    if ty == 0 and base.ggml_is_contiguous(t) and data:
        n = base.ggml_nbytes(t) // 4
        a = np.ctypeslib.as_array((ctypes.c_float * n).from_address(data)).copy()
        k = seen.get(name, 0); seen[name] = k + 1
        np.save(f"{out}/{name}.{k}.npy", a.reshape([d for d in reversed(ne) if True]))
    return True
cbf = llama_cpp.ggml_backend_sched_eval_callback(cb)
mp = llama_cpp.llama_model_default_params()
model = llama_cpp.llama_model_load_from_file(model_path.encode(), mp)
cp = llama_cpp.llama_context_default_params()
cp.n_ctx = 2048; cp.n_batch = 512; cp.n_ubatch = 512; cp.n_threads = 2; cp.n_threads_batch = 2
cp.cb_eval = cbf
ctx = llama_cpp.llama_init_from_model(model, cp)
arr = (llama_cpp.llama_token * len(ids))(*ids)
rc = llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(arr, len(ids)))
print("decode", rc, "tensors", sum(seen.values()))
print(sorted(seen.items())[:80])
