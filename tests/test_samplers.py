"""Batch samplers: P x K batches, coverage, reshuffling, rank sharding, resuming."""
import collections

import numpy as np
import pytest
import torch

from datasets.sampler import IdentityBatchSampler, RandomBatchSampler


def epoch_batches(sampler, epoch, start_batch=0):
    sampler.set_epoch(epoch, start_batch=start_batch)
    return list(sampler)


def make_pids(rng_seed=0, num_ids=13):
    """Identities with 1..7 items each, interleaved in dataset order."""
    rng = np.random.default_rng(rng_seed)
    pids = [pid for pid in range(num_ids) for _ in range(int(rng.integers(1, 8)))]
    return rng.permutation(pids).tolist()


def test_random_sampler_covers_every_index_once_and_reshuffles():
    sampler = RandomBatchSampler(40, batch_size=8, seed=1)
    first = epoch_batches(sampler, 0)
    assert len(sampler) == len(first) == 5 and all(len(b) == 8 for b in first)
    assert sorted(i for b in first for i in b) == list(range(40))
    assert epoch_batches(sampler, 0) == first
    assert epoch_batches(sampler, 1) != first
    assert epoch_batches(RandomBatchSampler(40, 8, seed=2), 0) != first


def test_random_sampler_drop_last_and_padding():
    dropped = epoch_batches(RandomBatchSampler(43, 8, seed=0, drop_last=True), 0)
    assert len(dropped) == 5 and len({i for b in dropped for i in b}) == 40
    padded = epoch_batches(RandomBatchSampler(43, 8, seed=0, drop_last=False), 0)
    assert len(padded) == 6 and all(len(b) == 8 for b in padded)
    assert {i for b in padded for i in b} == set(range(43))
    with pytest.raises(ValueError, match="num_samples=5 < batch_size=8"):
        RandomBatchSampler(5, 8, seed=0)


def test_identity_sampler_yields_p_by_k_batches_and_covers_identities():
    pids = make_pids()
    sampler = IdentityBatchSampler(pids, batch_size=12, num_instances=4, seed=0)
    batches = epoch_batches(sampler, 0)
    assert len(sampler) == len(batches) == -(-13 // 3)
    items_of = collections.defaultdict(list)
    for index, pid in enumerate(pids):
        items_of[pid].append(index)
    seen = set()
    for batch in batches:
        assert len(batch) == 12
        groups = [batch[i:i + 4] for i in range(0, 12, 4)]
        group_pids = [{pids[i] for i in g} for g in groups]
        assert all(len(p) == 1 for p in group_pids)                       # K items of one identity
        assert len(set.union(*group_pids)) == 3                           # P distinct identities
        for group, (pid,) in zip(groups, group_pids):
            if len(items_of[pid]) >= 4:
                assert len(set(group)) == 4                               # no repeats when avoidable
            else:
                assert set(group) == set(items_of[pid])                   # all of a small identity's items
        seen |= set.union(*group_pids)
    assert seen == set(pids)                                              # every identity each epoch
    assert epoch_batches(sampler, 0) == batches and epoch_batches(sampler, 1) != batches


def test_identity_sampler_rejects_bad_sizes():
    pids = make_pids()
    with pytest.raises(ValueError, match="batch_size=10 is not a multiple of num_instances=4"):
        IdentityBatchSampler(pids, batch_size=10, num_instances=4, seed=0)
    with pytest.raises(ValueError, match="batch_size=12 .*world_size=5"):
        IdentityBatchSampler(pids, batch_size=12, num_instances=4, seed=0, world_size=5)
    with pytest.raises(ValueError, match="6 per rank|gives 6 samples per rank"):
        IdentityBatchSampler(pids, batch_size=12, num_instances=4, seed=0, world_size=2)
    with pytest.raises(ValueError, match="13 identities cannot fill"):
        IdentityBatchSampler(pids, batch_size=56, num_instances=4, seed=0)


@pytest.mark.parametrize("kind", ["random", "identity"])
def test_ranks_split_the_single_process_batches(kind):
    pids = make_pids(3, num_ids=20)

    def build(rank, world_size, **kw):
        if kind == "random":
            return RandomBatchSampler(len(pids), 16, seed=7, rank=rank, world_size=world_size, **kw)
        return IdentityBatchSampler(pids, 16, 4, seed=7, rank=rank, world_size=world_size, **kw)

    single = epoch_batches(build(0, 1), 3)
    ranks = [epoch_batches(build(r, 2), 3) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(single) == len(build(1, 2))
    for step, batch in enumerate(single):
        assert all(len(r[step]) == 8 for r in ranks)
        assert ranks[0][step] + ranks[1][step] == batch
    # Sample seeds belong to the global slot, not to the rank.
    seeded = epoch_batches(build(0, 1, yield_seeds=True), 3)
    seeded_ranks = [epoch_batches(build(r, 2, yield_seeds=True), 3) for r in range(2)]
    assert [i for i, _ in seeded[0]] == single[0]
    assert seeded_ranks[0][0] + seeded_ranks[1][0] == seeded[0]
    assert len({s for _, s in seeded[0]}) == 16
    with pytest.raises(ValueError, match="batch_size=16 .*not divisible by world_size=3"):
        build(0, 3)


@pytest.mark.parametrize("kind", ["random", "identity"])
def test_start_batch_skips_done_batches(kind):
    pids = make_pids(4, num_ids=30)
    sampler = (RandomBatchSampler(len(pids), 8, seed=0) if kind == "random"
               else IdentityBatchSampler(pids, 8, 2, seed=0))
    full = epoch_batches(sampler, 2)
    resumed = epoch_batches(sampler, 2, start_batch=3)
    assert len(sampler) == len(full) - 3 == len(resumed) and resumed == full[3:]
    with pytest.raises(ValueError, match="start_batch"):
        sampler.set_epoch(0, start_batch=len(full) + 1)


def test_samplers_leave_global_random_state_alone():
    np_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state()
    epoch_batches(RandomBatchSampler(100, 10, seed=0, yield_seeds=True), 0)
    epoch_batches(IdentityBatchSampler(make_pids(), 12, 4, seed=0), 0)
    assert (np.random.get_state()[1] == np_state).all() and torch.equal(torch.get_rng_state(), torch_state)
    np.random.seed(123)  # and do not depend on it
    a = epoch_batches(IdentityBatchSampler(make_pids(), 12, 4, seed=0), 0)
    np.random.seed(456)
    assert epoch_batches(IdentityBatchSampler(make_pids(), 12, 4, seed=0), 0) == a
