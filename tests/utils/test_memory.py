"""Writing weights over memory-mapped checkpoints, and malloc's thresholds."""

import copy
import hashlib
import mmap
import sys

import pytest
import torch
from datasets import Dataset
from transformers import LlamaForCausalLM

from compressor import oneshot
from compressor.modifiers import GPTQModifier
from compressor.utils import memory
from compressor.utils.memory import _intersect, _private_file_mappings, overwrite_
from conftest import tiny_llama_config

PAGE = mmap.PAGESIZE


def _private_file_ranges(low, high):
    """The parts of ``[low, high)`` mapped privately from a file (copy-on-write)."""
    return _intersect(_private_file_mappings(), low, high)


def mapped(path, values, shared):
    """``values`` written to ``path`` and mapped back (privately or shared) as a tensor."""
    values.numpy().tofile(path)
    storage = torch.UntypedStorage.from_file(str(path), shared=shared, nbytes=values.numel() * 4)
    return torch.tensor([], dtype=torch.float32).set_(storage)


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_private_file_mapping_is_written_through_fresh_pages(tmp_path):
    """The pages wholly inside the target are replaced by anonymous ones, then written: the
    tensor holds the new values, its neighbours on the edge pages the old ones, and the
    file is untouched (a private mapping never writes back)."""
    path = tmp_path / "weights.bin"
    values = torch.randn(40 * PAGE // 4)
    whole = mapped(path, values, shared=False)
    before = digest(path)
    target = whole[1000 : 30 * PAGE // 4 + 7]  # starts and ends inside a page
    low, high = target.data_ptr(), target.data_ptr() + target.numel() * 4
    assert _private_file_ranges(low, high) == [(low, high)]
    new = torch.randn(target.shape)
    assert overwrite_(target, new) is target
    assert torch.equal(target, new)
    assert torch.equal(whole[:1000], values[:1000])
    assert torch.equal(whole[30 * PAGE // 4 + 7 :], values[30 * PAGE // 4 + 7 :])
    left = _private_file_ranges(low, high)  # only the two partial edge pages
    assert len(left) == 2 and sum(b - a for a, b in left) < 2 * PAGE
    assert digest(path) == before
    assert torch.equal(mapped(tmp_path / "again.bin", values, shared=False), values)


def test_a_shared_mapping_heap_memory_and_an_overlapping_source_are_plain_copies(tmp_path):
    path = tmp_path / "shared.bin"
    values = torch.randn(20 * PAGE // 4)
    shared = mapped(path, values, shared=True)
    new = torch.randn(values.shape)
    overwrite_(shared, new)
    assert torch.equal(shared, new)
    # as with copy_: a shared mapping writes through to its file
    assert torch.equal(torch.from_file(str(path), size=values.numel()), new)
    heap = values.clone()
    overwrite_(heap, new)
    assert torch.equal(heap, new)
    private = mapped(tmp_path / "private.bin", values, shared=False)
    overwrite_(private, private.flip(0))  # the source reads the target's own pages
    assert torch.equal(private, values.flip(0))


def test_gptq_on_a_memory_mapped_checkpoint_equals_the_in_memory_run(tmp_path):
    """transformers maps safetensors checkpoints privately: GPTQ writes each quantized weight
    through fresh pages, with the result of a model held in ordinary memory, and leaves the
    checkpoint file as it was."""
    torch.manual_seed(0)
    config = tiny_llama_config(hidden_size=128, intermediate_size=256, num_attention_heads=4)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    checkpoint = tmp_path / "model.safetensors"
    before = digest(checkpoint)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    in_memory = copy.deepcopy(loaded)
    down = loaded.model.layers[1].mlp.down_proj.weight
    low = down.data_ptr()
    high = low + down.numel() * 4
    assert _private_file_ranges(low, high), "the checkpoint is no longer memory-mapped"
    assert not _private_file_ranges(
        in_memory.model.layers[1].mlp.down_proj.weight.data_ptr(),
        in_memory.model.layers[1].mlp.down_proj.weight.data_ptr() + 4,
    )
    gen = torch.Generator().manual_seed(1)
    data = Dataset.from_dict({"input_ids": torch.randint(0, 128, (8, 32), generator=gen)})
    recipe = GPTQModifier(targets=["Linear"], ignore=["lm_head"], scheme="W4A16")
    for model in (loaded, in_memory):
        oneshot(model, [recipe.model_copy()], data, pipeline="sequential")
    got, want = loaded.state_dict(), in_memory.state_dict()
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert torch.equal(got[name], value), name
    assert down.data_ptr() == low  # written in place
    assert sum(b - a for a, b in _private_file_ranges(low, high)) < 2 * PAGE
    assert digest(checkpoint) == before


def test_malloc_settings_of_the_user_are_left_alone(monkeypatch):
    unwrapped = memory.keep_freed_tensors_in_heap.__wrapped__
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")
    assert unwrapped() is False
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536")
    assert unwrapped() is False
    monkeypatch.delenv("GLIBC_TUNABLES")
    if memory._libc() is None:
        pytest.skip("not glibc")
    assert unwrapped() is True


def test_writes_in_one_call_keep_copy_order_when_a_source_reads_another_target(tmp_path):
    """``overwrite_all_`` reads the mappings once for many writes: a target that another
    write still reads from keeps its pages, so every write sees what copies in order would."""
    from compressor.utils.memory import overwrite_all_

    path = tmp_path / "weights.bin"
    values = torch.randn(64 * PAGE // 4)
    whole = mapped(path, values, shared=False)
    before = digest(path)
    first, second = whole[: 32 * PAGE // 4], whole[32 * PAGE // 4 :]
    new = torch.randn(first.shape)
    overwrite_all_([(second, first), (first, new)])  # second takes first's old values
    assert torch.equal(second, values[: 32 * PAGE // 4])
    assert torch.equal(first, new)
    assert digest(path) == before


_FREED_YET_RESIDENT = """
import torch
from compressor.utils import memory


def anonymous_mb():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no RssAnon in /proc/self/status")


def freed_yet_resident_mb():
    before = anonymous_mb()
    large, small = [], []
    for _ in range(40):
        large.append(torch.ones(1 << 18))  # 1 MB, written
        small.append(torch.ones(256))  # stays alive: a hole no trim of the top gives back
    large.clear()
    left = anonymous_mb() - before
    small.clear()
    memory.release_free_memory()
    return left


import sys

if sys.argv[1] == "kept":
    memory.keep_freed_tensors_in_heap()
memory.release_free_memory()
with memory.freed_memory_returned():
    inside = freed_yet_resident_mb()
after = freed_yet_resident_mb()  # the process's own thresholds again
print(inside, after)
"""


def test_freed_blocks_go_back_to_the_system_inside_the_block_and_stay_in_the_heap_after():
    """40 tensors of 1 MB, each followed by a small one that stays alive, then the large ones
    freed: inside ``freed_memory_returned`` they leave nothing resident, after it (freed
    blocks kept in the heap) they stay. Measured in a fresh process: in a long-lived one,
    free chunks already in the heap serve the allocations before any mapping would."""
    import subprocess
    import sys

    if memory._libc() is None or memory._user_tuned_malloc():
        pytest.skip("needs glibc's malloc with its thresholds left to the library")

    def measure(mode: str) -> tuple[float, ...]:
        done = subprocess.run(
            [sys.executable, "-c", _FREED_YET_RESIDENT, mode],
            capture_output=True,
            text=True,
            check=True,
        )
        return tuple(float(v) for v in done.stdout.split())

    inside, after = measure("kept")
    assert inside < 8, inside
    assert after > 30, after
    # a process that never kept freed blocks (a save without the pipeline) gets glibc's back
    inside, after = measure("default")
    assert inside < 8 and after < 8, (inside, after)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_resident_bytes_follows_memory_the_process_touches_and_frees():
    before = memory.resident_bytes()
    block = torch.ones(64 << 18)  # 64 MB, every page written
    held = memory.resident_bytes()
    del block
    memory.release_free_memory()
    after = memory.resident_bytes()
    assert held - before >= 56 << 20
    assert held - after >= 56 << 20
