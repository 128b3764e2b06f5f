"""Shard sets are trusted only when they are whole and counted the same everywhere: a shard that cannot be read
is an error naming it (never a short count), counts are made once and shared by every rank, a partial set
(no complete manifest, a pattern naming absent files) is an error unless allowed, and a sample key that
appears twice is an error naming both places."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from mmlatent.config_io import ConfigError
from mmlatent.data import shards as shards_module
from mmlatent.data.shard_writer import RawSample, write_shards
from mmlatent.data.shards import expand_shards, shard_sizes, shared


def raw(i: int, prefix: str = "s") -> RawSample:
    meta = {"id": f"{prefix}{i}", "source": "test", "answer": "A", "messages": [
        {"role": "user", "content": [{"type": "image", "ref": "img0"}, {"type": "text", "text": f"Q {i}?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A"}]}]}
    return RawSample(key=f"{prefix}{i:04d}", meta=meta, images={"img0": Image.new("RGB", (4, 4), (i, 0, 0))})


def shards(folder: Path, n: int, per_shard: int, prefix: str = "s") -> list[str]:
    return write_shards((raw(i, prefix) for i in range(n)), folder, samples_per_shard=per_shard, progress=False).shards


# ------------------------------------------------------------------------------- counting (item 2)


def test_a_shard_that_cannot_be_read_is_an_error_naming_it_never_a_short_count(tmp_path):
    good = shards(tmp_path / "a", 6, 3)
    folder = tmp_path / "b" / "shard-000009.tar"
    folder.mkdir(parents=True)  # a path that is not a readable file
    with pytest.raises(ConfigError, match=r"shard-000009.tar.*cannot be read"):
        shard_sizes([*good, str(folder)])
    # a stream that breaks off (the command fails after 2000 bytes): not a quietly shorter shard
    broken = f"pipe:sh -c 'head -c 2000 {good[0]}; exit 3'"
    with pytest.raises(ConfigError, match="cannot be read"):
        shard_sizes([broken])
    assert shard_sizes([f"pipe:cat {good[0]}", good[1]]) == [3, 3]


def test_counts_are_made_on_rank_0_and_shared_with_the_others():
    """Rank 0 counts and broadcasts; another rank never counts (a transient error there cannot change its plan),
    and an error on rank 0 reaches every rank."""
    sent = []

    def broadcast(obj):  # what a collective hands every rank: rank 0's object
        if obj is not None:
            sent.append(obj)
        return sent[-1]

    assert shared(lambda: [16, 16, 7], 0, broadcast) == [16, 16, 7]
    assert shared(lambda: pytest.fail("rank 1 counted"), 1, broadcast) == [16, 16, 7]

    def fails():
        raise ConfigError("data.train.shards: shard x.tar cannot be read")

    with pytest.raises(ConfigError, match="x.tar cannot be read"):
        shared(fails, 0, broadcast)
    with pytest.raises(ConfigError, match="x.tar cannot be read"):
        shared(lambda: pytest.fail("rank 1 counted"), 1, broadcast)


# -------------------------------------------------------------------------- partial sets (item 18)


def test_a_folder_without_a_complete_manifest_is_an_error_unless_allowed(tmp_path):
    folder = tmp_path / "convert"
    shards(folder, 6, 2)  # shards written, the conversion stopped before its manifest
    (folder / ".convert_state.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"data.train.shards=.*unfinished conversion.*allow_partial"):
        expand_shards(str(folder), "data.train.shards")
    (folder / ".convert_state.json").unlink()
    with pytest.raises(ConfigError, match=r"no manifest.json"):
        expand_shards(str(folder), "data.train.shards")
    assert len(expand_shards(str(folder), "data.train.shards", allow_partial=True)) == 3
    # a manifest naming a shard that is gone, or not naming one that is there
    (folder / "manifest.json").write_text(json.dumps({"written": 6, "complete": True, "shards": [
        "shard-000000.tar", "shard-000001.tar", "shard-000002.tar", "shard-000003.tar"]}))
    with pytest.raises(ConfigError, match=r"names 1 shard\(s\) that are missing, e.g. .*shard-000003.tar"):
        expand_shards(str(folder), "data.train.shards")
    (folder / "manifest.json").write_text(json.dumps({"written": 4, "complete": True, "shards": [
        "shard-000000.tar", "shard-000001.tar"]}))
    with pytest.raises(ConfigError, match=r"1 shard\(s\) are not in its manifest.*shard-000002.tar"):
        expand_shards(str(folder), "data.train.shards")


def test_a_synthetic_or_converted_folder_is_complete(synth_dir):
    assert len(expand_shards(str(synth_dir / "train"), "data.train.shards")) == 4


def test_a_brace_pattern_naming_absent_files_is_an_error_unless_allowed(tmp_path):
    shards(tmp_path, 2, 2)  # shard-000000.tar only
    pattern = str(tmp_path / "shard-{000000..000002}.tar")
    with pytest.raises(ConfigError, match=r"2 of its 3 files do not exist.*shard-000001.tar"):
        expand_shards(pattern, "data.train.shards")
    assert expand_shards(pattern, "data.train.shards", allow_partial=True) == [str(tmp_path / "shard-000000.tar")]


# ---------------------------------------------------------------------------- duplicates (item 19)


def test_a_key_twice_in_one_shard_is_an_error_naming_it(tmp_path):
    [path] = shards(tmp_path, 3, 3)
    with tarfile.open(path) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    with tarfile.open(path, "w") as tf:  # s0000 again after s0002
        for m, data in members + [x for x in members if x[0].name.startswith("s0000.")]:
            tf.addfile(m, io.BytesIO(data))
    with pytest.raises(ConfigError, match=r"sample key 's0000' appears twice.*shard-000000.tar.*sample 0.*sample 3"):
        shard_sizes([path])


def test_a_key_in_two_shards_is_an_error_naming_both(tmp_path):
    a = shards(tmp_path / "a", 2, 2)
    b = shards(tmp_path / "b", 2, 2)
    copy = tmp_path / "a" / "shard-000001.tar"
    shutil.copyfile(b[0], copy)
    with pytest.raises(ConfigError, match=r"sample key 's0000' appears twice.*a/shard-000000.tar.*a/shard-000001.tar"):
        shard_sizes([*a, str(copy)])


def test_duplicate_response_ids_are_an_error_naming_the_lines(tmp_path):
    from mmlatent.evaluation.runner import read_responses

    path = tmp_path / "r.jsonl"
    path.write_text('{"id": "q1", "response": "A"}\n{"id": "q2", "response": "B"}\n{"id": "q1", "response": "C"}\n')
    with pytest.raises(ValueError, match=r"r.jsonl:3: response id 'q1' appears twice \(first on line 1\)"):
        read_responses(path)


def test_the_counts_cache_keeps_the_keys(tmp_path, monkeypatch):
    """A second count reads the cache, and a duplicate is still found there (no header pass)."""
    a = shards(tmp_path / "a", 2, 2)
    shutil.copyfile(a[0], tmp_path / "a" / "shard-000001.tar")
    urls = sorted(str(p) for p in (tmp_path / "a").glob("*.tar"))
    with pytest.raises(ConfigError, match="appears twice"):
        shard_sizes(urls)
    monkeypatch.setattr(shards_module, "sample_keys", lambda url: pytest.fail(f"{url} counted again"))
    with pytest.raises(ConfigError, match="appears twice"):
        shard_sizes(urls)


def test_a_counts_cache_of_the_earlier_format_is_read_again(tmp_path):
    """A cache entry written before keys were kept ([size, mtime_ns, count]) is recounted, not read as keys."""
    urls = shards(tmp_path / "a", 4, 2)
    file = shards_module._cache_file(str(tmp_path / "a"))
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps({Path(u).name: [*shards_module._stamp(u), 2] for u in urls}))
    assert shard_sizes(urls) == [2, 2]


def _count_on_two_ranks(rank: int, port: int, urls: list[str], out: str) -> None:
    """One of two gloo processes: count through `shared`, each rank with a different view of the shards."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)

    def broadcast(obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    mine = urls if rank == 0 else urls[:1]  # what a transient read error would show rank 1
    sizes = shared(lambda: shard_sizes(mine), rank, broadcast)
    Path(out, f"rank{rank}.json").write_text(json.dumps(sizes))
    dist.destroy_process_group()


@pytest.mark.distributed
def test_two_gloo_ranks_plan_from_the_same_counts(tmp_path):
    import socket

    import torch.multiprocessing as mp

    urls = shards(tmp_path / "a", 7, 3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_count_on_two_ranks, args=(port, urls, str(tmp_path)), nprocs=2)
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)] == [[3, 3, 1]] * 2
