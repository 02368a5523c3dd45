"""The training and evaluation streams: fixed batch counts, disjoint slots, determinism, cheap exact resume."""

import itertools

import pytest
from torch.utils.data import DataLoader

from capline.data.buffers import join_worker_parts
from capline.data.counting import shard_counts
from capline.data.datamodule import expand_shards
from capline.data.elastic import ElasticOrder
from capline.data.pipeline import EvalStream, TrainStream


def keys_only(raw_samples, counter, epoch, place=None):
    return {"keys": [r["__key__"] for r in raw_samples], "epoch": epoch}


def run(stream, num_workers=0):
    loader = DataLoader(stream, batch_size=None, num_workers=num_workers)
    return [b["keys"] for b in join_worker_parts(iter(loader))]


def train_stream(urls, rank=0, world_size=1, batches=6, batch_size=16, make_batch=keys_only, **kw):
    """A rank's training stream; `batch_size` images per rank."""
    order = ElasticOrder(tuple(shard_counts(urls)), batch_size * world_size, batches, **kw)
    return TrainStream(urls, make_batch, order, rank, world_size)


@pytest.mark.parametrize("num_shards,world_size,num_workers", [(4, 2, 0), (4, 2, 2), (1, 2, 2), (3, 2, 1)])
def test_every_rank_yields_the_same_number_of_batches_with_disjoint_keys(
    synthetic_data, num_shards, world_size, num_workers
):
    urls = expand_shards(synthetic_data["train_shards"], "train_shards")[:num_shards]
    # An epoch of 2 ranks x 4 batches x 8 = 64 samples: fewer than the 128 in one shard.
    per_rank = [run(train_stream(urls, r, world_size, batches=4, batch_size=8), num_workers) for r in range(world_size)]
    assert [len(b) for b in per_rank] == [4] * world_size
    keys = [set(itertools.chain(*batches)) for batches in per_rank]
    assert all(len(k) == 4 * 8 for k in keys)  # no sample twice within a rank's epoch
    assert not keys[0] & keys[1]  # no sample on two ranks


def test_order_is_a_function_of_seed_and_epoch(synthetic_data):
    urls = expand_shards(synthetic_data["train_shards"], "train_shards")
    first, again = run(train_stream(urls)), run(train_stream(urls))
    assert first == again
    other = train_stream(urls)
    other.set_epoch(1)
    assert run(other) != first
    assert run(train_stream(urls, seed=7)) != first


@pytest.mark.parametrize("num_workers", [0, 2, 3])
@pytest.mark.parametrize("start", [1, 4])
def test_resuming_mid_epoch_continues_the_same_stream(synthetic_data, num_workers, start):
    urls = expand_shards(synthetic_data["train_shards"], "train_shards")
    full = run(train_stream(urls, batches=7), num_workers)
    resumed = train_stream(urls, batches=7)
    resumed.start_batch = start
    assert run(resumed, num_workers) == full[start:]


def test_skipped_batches_are_never_decoded(synthetic_data):
    urls = expand_shards(synthetic_data["train_shards"], "train_shards")
    calls = []

    def counting(raw, counter, epoch, place=None):
        calls.append(1)
        return keys_only(raw, counter, epoch)

    stream = train_stream(urls, make_batch=counting)
    stream.start_batch = 4
    assert len(run(stream)) == 2 and len(calls) == 2


@pytest.mark.parametrize("world_size,num_workers", [(1, 0), (2, 0), (2, 2), (3, 2)])
def test_evaluation_sees_every_sample_exactly_once(synthetic_data, world_size, num_workers):
    urls = expand_shards(synthetic_data["val_shards"], "val_shards")
    seen = []
    for rank in range(world_size):
        stream = EvalStream(urls, keys_only, 10, rank, world_size)
        seen += list(itertools.chain(*run(stream, num_workers)))
    assert len(seen) == synthetic_data["num_val"] == len(set(seen))


def test_shard_pattern_matching_nothing_names_the_pattern(tmp_path):
    from capline.data.datamodule import DataConfigError

    with pytest.raises(DataConfigError, match="nothing-.*matches no file"):
        expand_shards(str(tmp_path / "nothing-{000..003}.tar"), "train_shards")


def test_local_shards_read_like_webdatasets_streaming_reader(synthetic_data, tmp_path):
    """Local files take a seekable fast path; plain, file:// and gzipped shards give webdataset's samples."""
    import gzip
    import shutil

    import webdataset as wds

    from capline.data.decode import SkipCounter
    from capline.data.pipeline import _Stream

    shard = expand_shards(synthetic_data["val_shards"], "val_shards")[0]
    expected = list(wds.tariterators.tarfile_samples([{"url": shard}]))
    gzipped = tmp_path / "val.tar.gz"
    with open(shard, "rb") as src, gzip.open(gzipped, "wb") as dst:
        shutil.copyfileobj(src, dst)
    for url in (shard, f"file://{shard}", str(gzipped)):
        counter = SkipCounter()
        got = list(_Stream._read_shard(url, counter))
        assert [s["__key__"] for s in got] == [s["__key__"] for s in expected]
        assert all(g["jpg"] == e["jpg"] and g["json"] == e["json"] for g, e in zip(got, expected))
        assert counter.take().sum() == 0
