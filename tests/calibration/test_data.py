import pytest
import torch
from datasets import Dataset
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from compressor.calibration.arguments import CalibrationArguments
from compressor.calibration.data import build_calibration_batches, collate


def _args(**kw):
    return CalibrationArguments(**kw)


def test_collate_pads_only_batches_that_need_it():
    seqs = [torch.arange(1, 5), torch.arange(1, 3), torch.arange(1, 5)]
    first, second = collate(seqs, batch_size=2, pad_id=9)
    assert first["input_ids"].tolist() == [[1, 2, 3, 4], [1, 2, 9, 9]]
    assert first["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert set(second) == {"input_ids"} and second["input_ids"].shape == (1, 4)


def test_dataset_of_input_ids_is_truncated_counted_and_batched():
    ds = Dataset.from_dict({"input_ids": [list(range(1, 20))] * 5})
    batches = build_calibration_batches(
        ds, _args(num_calibration_samples=3, max_seq_length=8, batch_size=2)
    )
    assert [b["input_ids"].shape for b in batches] == [(2, 8), (1, 8)]
    assert batches[0]["input_ids"][0].tolist() == list(range(1, 9))


def test_dataset_padding_is_removed_and_unread_columns_are_named():
    """A pre-padded dataset (tokenized with padding, either side) calibrates on its real
    tokens only; a ``loss_mask`` column (llm-compressor's AWQ) is not used, and a warning says
    so; other unread columns are named; a mask with holes is refused naming the row."""
    from loguru import logger

    ds = Dataset.from_dict(
        {
            "input_ids": [[0, 0, 5, 6, 7, 8], [1, 2, 3, 4, 0, 0], [1, 2, 3, 4, 5, 6]],
            "attention_mask": [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1] * 6],
            "loss_mask": [[0, 0, 0, 1, 1, 1]] * 3,
            "messages": ["a", "b", "c"],
        }
    )
    lines: list[str] = []
    handle = logger.add(lambda m: lines.append(str(m)), level="INFO", format="{message}")
    try:
        batches = build_calibration_batches(
            ds, _args(num_calibration_samples=3, max_seq_length=8, batch_size=1)
        )
    finally:
        logger.remove(handle)
    assert [b["input_ids"].tolist() for b in batches] == [[[5, 6, 7, 8]], [[1, 2, 3, 4]],
                                                          [[1, 2, 3, 4, 5, 6]]]  # fmt: skip
    assert any("'loss_mask' column is not used" in line for line in lines)
    assert any("['messages'] are not used" in line for line in lines)
    holes = Dataset.from_dict({"input_ids": [[1, 2, 3, 4]], "attention_mask": [[1, 0, 1, 1]]})
    with pytest.raises(ValueError, match="row 0: its attention_mask has zeros between ones"):
        build_calibration_batches(holes, _args(num_calibration_samples=1, max_seq_length=8))


def test_dataloader_batches_are_used_as_given_up_to_the_sample_count():
    rows = torch.randint(0, 100, (10, 6))
    loader = DataLoader([{"input_ids": r} for r in rows], batch_size=4)
    batches = build_calibration_batches(loader, _args(num_calibration_samples=5))
    assert len(batches) == 2 and torch.equal(batches[0]["input_ids"], rows[:4])
    plain = build_calibration_batches(DataLoader(rows, batch_size=3), _args())
    assert torch.equal(plain[0]["input_ids"], rows[:3]) and len(plain) == 4


def test_text_sources_need_a_tokenizer_and_tokenize(tmp_path, stories_model_path):
    tok = AutoTokenizer.from_pretrained(stories_model_path)
    with pytest.raises(ValueError, match="no tokenizer was given"):
        build_calibration_batches(["once upon a time"], _args())
    texts = ["Once upon a time there was a cat.", "The dog ran home."]
    batches = build_calibration_batches(texts, _args(batch_size=2), tokenizer=tok)
    assert batches[0]["input_ids"][0, :5].tolist() == tok(texts[0])["input_ids"][:5]
    assert batches[0]["attention_mask"][1].sum() == len(tok(texts[1])["input_ids"])
    ds = Dataset.from_dict({"text": texts})
    from_ds = build_calibration_batches(ds, _args(batch_size=2), tokenizer=tok)
    assert torch.equal(from_ds[0]["input_ids"], batches[0]["input_ids"])
    # a text file is cut into consecutive windows of max_seq_length tokens
    path = tmp_path / "corpus.txt"
    path.write_text(" ".join(texts * 40))
    windows = build_calibration_batches(
        path, _args(max_seq_length=16, num_calibration_samples=3), tokenizer=tok
    )
    ids = tok(path.read_text(), return_tensors="pt")["input_ids"][0]
    assert len(windows) == 3 and torch.equal(windows[1]["input_ids"][0], ids[16:32])


def test_bad_sources_name_what_is_accepted(tmp_path):
    with pytest.raises(ValueError, match="dataset='data.txt' is neither"):
        build_calibration_batches("data.txt", _args())
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        build_calibration_batches(tmp_path / "missing.txt", _args(), tokenizer=object())
    with pytest.raises(ValueError, match="expected an 'input_ids' or a 'text' column"):
        build_calibration_batches(Dataset.from_dict({"words": ["a"]}), _args())
    with pytest.raises(TypeError, match="dataset must be a datasets.Dataset"):
        build_calibration_batches(42, _args())


def test_self_sampling_is_reproducible_and_leaves_the_rng_alone(tiny_llama):
    args = _args(num_calibration_samples=3, max_seq_length=10, batch_size=2)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first = build_calibration_batches("self", args, model=tiny_llama)
    after = torch.rand(1)
    assert torch.equal(before, after)  # the caller's random stream is untouched
    second = build_calibration_batches("self", args, model=tiny_llama)
    assert [b["input_ids"].shape for b in first] == [(2, 10), (1, 10)]
    assert all(
        torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, second, strict=True)
    )
    # sampled, not constant
    assert first[0]["input_ids"][:, 1:].unique().numel() > 5


def test_arguments_are_validated_with_the_field_named():
    with pytest.raises(ValueError, match="num_calibration_samples"):
        CalibrationArguments(num_calibration_samples=0)
    with pytest.raises(ValueError, match="pipeline"):
        CalibrationArguments(pipeline="layerwise")


def test_self_sampling_progress_counts_tokens(tiny_llama, monkeypatch):
    """The bar counts generated tokens, advancing step by step within one generate call."""
    from tqdm.auto import tqdm

    import compressor.calibration.data as data

    positions: list[tuple[int, int]] = []

    class Recording(tqdm):
        def update(self, n=1):
            out = super().update(n)
            positions.append((self.n, self.total))
            return out

    monkeypatch.setattr(data, "tqdm", Recording)
    args = _args(num_calibration_samples=3, max_seq_length=10, batch_size=1)
    build_calibration_batches("self", args, model=tiny_llama)
    assert positions[-1] == (3 * 10, 3 * 10)
    # one group of 3 rows: the bar moved with each generated token, not once per group
    assert len({n for n, _ in positions}) >= 9
    assert all(b >= a for (a, _), (b, _) in zip(positions, positions[1:], strict=False))


def test_self_sampling_runs_on_one_cpu_thread_and_restores_the_count(tiny_llama):
    """Token-by-token generation on several OpenMP threads stalls at every barrier when other
    processes share the cores; it runs on one, and the caller's count comes back."""
    seen: list[int] = []
    hook = tiny_llama.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        build_calibration_batches("self", _args(num_calibration_samples=2, max_seq_length=6),
                                  model=tiny_llama)  # fmt: skip
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2
    finally:
        hook.remove()
        torch.set_num_threads(previous)
