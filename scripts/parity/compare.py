import numpy as np, sys, os
ref, ours, n_layers = sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 2
def load_ref(name):
    for cand in [name + ".npy", name + ".0.npy"]:
        p = os.path.join(ref, cand)
        if os.path.exists(p): return np.load(p).astype(np.float32).ravel()
def load_ours(name):
    p = os.path.join(ours, name + ".f32")
    if os.path.exists(p): return np.fromfile(p, dtype="<f4")
names = []
for il in range(n_layers):
    names += [f"attn_norm-{il}", f"Qcur-{il}.0", f"Kcur-{il}.0", f"Vcur-{il}.0", f"Qcur-{il}.2", f"Kcur-{il}.2",
              f"kqv_out-{il}", f"attn_out-{il}", f"ffn_inp-{il}", f"ffn_norm-{il}", f"ffn_gate-{il}", f"ffn_up-{il}",
              f"ffn_swiglu-{il}", f"ffn_out-{il}", f"l_out-{il}"]
for nm in names:
    a, b = load_ref(nm), load_ours(nm)
    if a is None or b is None:
        print(f"{nm:16s} missing ref={a is not None} ours={b is not None}"); continue
    if a.size != b.size:
        print(f"{nm:16s} size {a.size} vs {b.size}"); continue
    diff = np.abs(a - b); ne = np.count_nonzero(a.view(np.uint32) != b.view(np.uint32))
    print(f"{nm:16s} n={a.size:6d} bit-diff {ne:6d}  max|d| {diff.max():.3e}  max|a| {np.abs(a).max():.3e}")
