"""torch.distributed DDP and FSDP2 (gloo, 2 processes) train a patched model like one process on the whole batch."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

HERE = Path(__file__).resolve().parent
STEPS, PER_RANK = 3, 2


def _model():
    sys.path.insert(0, str(HERE))
    from conftest import tiny_model

    import fastprompt

    model = fastprompt.patch(tiny_model("llama", kind="seqcls"), num_tokens=3, num_tasks=2, start_layer=1)
    return model.train()


def _batch(step):
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(3, 99, (2 * PER_RANK, 7), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 3, (2 * PER_RANK,), generator=g),
            "prompt_ids": torch.tensor([0, 1] * PER_RANK)}


def _train(model, rank=None):
    import fastprompt

    opt = torch.optim.SGD(fastprompt.prompt_parameters(model), lr=0.5)
    for step in range(STEPS):
        batch = _batch(step)
        if rank is not None:  # this rank's shard of the global batch
            batch = {k: v[rank * PER_RANK:(rank + 1) * PER_RANK] for k, v in batch.items()}
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()


def _in_group(rank, init_file, body):
    """Runs body() as one of 2 gloo ranks, one thread each."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        body()
        dist.barrier()  # both ranks done (and rank 0's files written) before either leaves
    except BaseException:
        dist.destroy_process_group()
        raise
    sys.stdout.flush()
    sys.stderr.flush()
    # leave without tearing down: gloo's and DeepSpeed's C++ threads can abort the process at
    # teardown ("terminate called without an active exception", seen once in CI on ZeRO-3)
    os._exit(0)


def _worker(rank, init_file, out_dir):
    from torch.nn.parallel import DistributedDataParallel as DDP

    def body():
        import safetensors.torch

        import fastprompt

        model = _model()
        _train(DDP(model), rank)
        state = {f"p{i}": p.detach().clone() for i, p in enumerate(fastprompt.prompt_parameters(model))}
        safetensors.torch.save_file(state, os.path.join(out_dir, f"rank{rank}.safetensors"))

    _in_group(rank, init_file, body)


def test_ddp_two_ranks_equal_one_process_on_the_combined_batch(tmp_path):
    import safetensors.torch

    import fastprompt

    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [safetensors.torch.load_file(tmp_path / f"rank{r}.safetensors") for r in range(2)]
    torch.manual_seed(0)
    single = _model()
    before = [p.detach().clone() for p in fastprompt.prompt_parameters(single)]
    _train(single)
    for i, p in enumerate(fastprompt.prompt_parameters(single)):
        assert torch.equal(ranks[0][f"p{i}"], ranks[1][f"p{i}"])  # replicas stay identical
        torch.testing.assert_close(ranks[0][f"p{i}"], p.detach(), atol=1e-5, rtol=1e-4)
        assert not torch.equal(p.detach(), before[i])


def _fsdp_worker(rank, init_file, out_dir):
    from torch.distributed.fsdp import fully_shard

    def body():
        import fastprompt

        model = _model()
        for layer in model.model.layers:  # the frozen backbone sharded layer by layer, then the rest
            fully_shard(layer)
        fully_shard(model)
        assert all(hasattr(p, "device_mesh") for p in fastprompt.prompt_parameters(model))  # the prompts are sharded too
        _train(model, rank)
        fastprompt.save_prompts(model, os.path.join(out_dir, "prompts"))  # every rank calls it; rank 0 writes

    _in_group(rank, init_file, body)


def _saved_prompts_equal_one_process(folder):
    """The prompts saved in `folder` by the ranks equal one process trained on the combined batch;
    returns (that process's model, the saved prompts loaded into a fresh plain model)."""
    import fastprompt

    torch.manual_seed(0)
    single = _model()
    before = [p.detach().clone() for p in fastprompt.prompt_parameters(single)]
    _train(single)
    sys.path.insert(0, str(HERE))
    from conftest import tiny_model

    loaded = fastprompt.load_prompts(tiny_model("llama", kind="seqcls"), folder)
    for mine, theirs, start in zip(fastprompt.prompt_parameters(single), fastprompt.prompt_parameters(loaded), before):
        torch.testing.assert_close(theirs.detach(), mine.detach(), atol=1e-5, rtol=1e-4)
        assert not torch.equal(mine.detach(), start)
    return single, loaded


def test_fsdp2_sharded_backbone_trains_like_one_process_and_saves_prompts(tmp_path):
    """FSDP2 (`fully_shard` on each decoder layer and the model, gloo on CPU): the prompts trained on
    two ranks' shards equal one process on the combined batch, and the prompts saved from the
    sharded model load into a plain one with the same outputs."""
    mp.spawn(_fsdp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    single, loaded = _saved_prompts_equal_one_process(tmp_path / "prompts")
    batch = _batch(0)
    single.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, single(**batch).logits, atol=1e-5, rtol=1e-4)


def _zero3_worker(rank, init_file, out_dir):
    def body():
        import deepspeed

        import fastprompt

        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
        model = _model()
        opt = torch.optim.SGD(fastprompt.prompt_parameters(model), lr=0.5)  # the same optimizer as _train
        config = {"train_micro_batch_size_per_gpu": PER_RANK, "zero_optimization": {"stage": 3},
                  "zero_allow_untested_optimizer": True,  # a plain torch optimizer, not one of DeepSpeed's
                  "gradient_clipping": 0.0}  # DeepSpeed clips at 1.0 unless told; the one-process run does not clip
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
        for step in range(STEPS):
            batch = {k: v[rank * PER_RANK:(rank + 1) * PER_RANK] for k, v in _batch(step).items()}
            engine.backward(engine(**batch).loss)
            engine.step()
        fastprompt.save_prompts(engine, os.path.join(out_dir, "prompts"))  # every rank calls it; rank 0 writes
        engine.destroy()  # DeepSpeed's own teardown before the process group goes

    _in_group(rank, init_file, body)


def test_deepspeed_zero3_trains_like_one_process_and_saves_prompts(tmp_path):
    """DeepSpeed ZeRO-3 on CPU (gloo): every parameter, the prompts included, partitioned across 2
    ranks; the prompts saved from the engine equal one process trained on the combined batch."""
    pytest.importorskip("deepspeed")
    mp.spawn(_zero3_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    _saved_prompts_equal_one_process(tmp_path / "prompts")
