# Provenance of sparse_verify_splits.jsonl (one JSON line per launch config: p20/p50/p80 in us): run on an
# H200 (torch 2.11, triton 3.6) at commit 2b4eec3, through the launcher under dispatch.override, CUDA-graph
# replays timed with triton.testing.do_bench; Qwen2.5-72B shape, batch 16, 32K history, budget 512.
import itertools, json, os, time
import torch, triton.testing
from dustin_kernels import dispatch
from dustin_kernels.ops import verify
out = open(os.path.join(os.environ["OUT"], "sweep.jsonl"), "w")
B, Hq, Hkv, D, T, ctx = 16, 64, 8, 128, 5, 32768
torch.manual_seed(0)
q = torch.randn(B, Hq, T, D, device="cuda", dtype=torch.bfloat16)
k = torch.randn(B, Hkv, ctx + T + 11, D, device="cuda", dtype=torch.bfloat16)
v = torch.randn_like(k)
seq = torch.full((B,), ctx + T, dtype=torch.int32, device="cuda")
t0 = time.time()
def bench(cfg, budget):
    idx = torch.stack([torch.randperm(ctx, device="cuda")[:budget].sort().values for _ in range(B)]).int()
    count = torch.full((B,), budget, dtype=torch.int32, device="cuda")
    f = lambda: verify._triton_sparse_verify(q, k, v, seq, idx, count, None, block_size=1, scale=D ** -0.5, variant="")
    with dispatch.override(cfg, kernel="sparse_verify"):
        f(); torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            f()
    return triton.testing.do_bench(g.replay, quantiles=[0.2, 0.5, 0.8])
default = verify.default_config(verify._spec(q, k, block_size=1, variant=""), batch=B, context=512, kv_heads=Hkv)
cfgs = [default] + [dict(BLOCK_N=bn, num_warps=w, num_stages=s, num_splits=sp)
        for sp, bn, w, s in itertools.product([4, 8, 16, 2], [32, 64, 16], [4, 8], [2, 3])]
for budget in (512,):
    for cfg in cfgs:
        try:
            r = bench(cfg, budget)
        except Exception as e:
            r = repr(e)[:200]
        out.write(json.dumps(dict(budget=budget, cfg=cfg, us=r if isinstance(r, str) else [x * 1e3 for x in r], t=time.time() - t0)) + "\n"); out.flush()
        print(budget, cfg, r, flush=True)
for cfg in [default, dict(BLOCK_N=32, num_warps=4, num_stages=2, num_splits=16), dict(BLOCK_N=64, num_warps=4, num_stages=2, num_splits=8)]:
    r = bench(cfg, 2048)
    out.write(json.dumps(dict(budget=2048, cfg=cfg, us=[x * 1e3 for x in r])) + "\n"); out.flush()
