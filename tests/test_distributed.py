"""Tensor-parallel selection on 2 gloo ranks (CPU): both ranks select what one rank holding every head
selects, and the sharded sparse verification equals the unsharded one."""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dustin_kernels import attention_scores, select_tokens, sparse_verify
from dustin_kernels.distributed import local_heads, sharded_scores

B, HQ, HKV, T, D, N = 2, 8, 4, 3, 16, 70
HEADS = (1, 2, 3)  # all on rank 0: rank 1 scores no head


def inputs():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, n, D, generator=g) for h, n in ((HQ, T), (HKV, N), (HKV, N)))
    return q, k, v, torch.tensor([70, 41], dtype=torch.int32)


def rank_main(rank, world, path, out):
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    q, k, v, seq_lens = inputs()
    shard = slice(rank * HQ // world, (rank + 1) * HQ // world), slice(rank * HKV // world, (rank + 1) * HKV // world)
    s = sharded_scores(q[:, shard[0]], k[:, shard[1]], seq_lens, HEADS)
    idx, count = select_tokens(s, None, seq_lens, budget=24, m=24, sink=2, recent=4, window=T)
    o = sparse_verify(q[:, shard[0]], k[:, shard[1]], v[:, shard[1]], seq_lens, idx, count)
    parts = [torch.empty_like(o) for _ in range(world)]
    dist.all_gather(parts, o)
    torch.save({"idx": idx, "count": count, "out": torch.cat(parts, 1)}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_two_ranks_select_and_attend_as_one(tmp_path):
    mp.spawn(rank_main, args=(2, tmp_path / "rendezvous", tmp_path / "result"), nprocs=2, join=True)
    q, k, v, seq_lens = inputs()
    s = attention_scores(q, k, seq_lens, heads=HEADS)
    idx, count = select_tokens(s, None, seq_lens, budget=24, m=24, sink=2, recent=4, window=T)
    want = sparse_verify(q, k, v, seq_lens, idx, count)
    for rank in range(2):
        got = torch.load(tmp_path / f"result.{rank}")
        assert torch.equal(got["idx"], idx) and torch.equal(got["count"], count)
        torch.testing.assert_close(got["out"], want, atol=1e-5, rtol=1e-5)


def test_local_heads_and_empty_heads_give_zeros():
    assert local_heads((1, 2, 3, 6), 0, 4) == (1, 2, 3) and local_heads((1, 2, 3, 6), 1, 4) == (2,)
    q, k, _, seq_lens = inputs()
    for backend in ("torch", "triton"):
        zeros = attention_scores(q, k, seq_lens, heads=[], backend=backend)
        assert zeros.shape == (B, N) and not zeros.any()
