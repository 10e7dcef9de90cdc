import json

import numpy as np
import pytest
import torch

from sentcode.data import DataDir, WindowLoader, eval_batches, prepare_data, read_tokens, write_tokens
from sentcode.errors import DataError


def test_shard_roundtrip(tmp_path):
    tokens = np.array([0, 1, 258, 65534, 7], dtype=np.int64)
    write_tokens(tmp_path / "a.bin", tokens, vocab_size=65535)
    back = read_tokens(tmp_path / "a.bin")
    assert back.dtype == np.uint16 and back.tolist() == tokens.tolist()
    assert (tmp_path / "a.bin").read_bytes()[:8] == b"SCTOK\x00\x01\x00"
    write_tokens(tmp_path / "b.bin", np.array([70000, 3]), vocab_size=100000)
    assert read_tokens(tmp_path / "b.bin").dtype == np.uint32
    write_tokens(tmp_path / "e.bin", np.zeros(0, dtype=np.int64), vocab_size=259)
    assert read_tokens(tmp_path / "e.bin").size == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_corrupt_shards(tmp_path):
    path = tmp_path / "a.bin"
    write_tokens(path, np.arange(100), vocab_size=259)
    data = path.read_bytes()
    path.write_bytes(data[:-3])
    with pytest.raises(DataError, match=r"corrupt token shard .*a\.bin"):
        read_tokens(path)
    path.write_bytes(b"XXTOK\x00\x01\x00" + data[8:])
    with pytest.raises(DataError, match="bad magic"):
        read_tokens(path)
    path.write_bytes(data[:10])
    with pytest.raises(DataError, match="header"):
        read_tokens(path)
    with pytest.raises(DataError, match="not found"):
        read_tokens(tmp_path / "missing.bin")


def test_loader_shapes_and_reach():
    # 20 documents of 50 tokens, EOS (=999) after each: windows must start anywhere, not only after EOS.
    tokens = np.tile(np.append(np.arange(50), 999), 20)
    loader = WindowLoader(tokens, seq_len=16, batch_size=32, seed=1)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (32, 16) and x.dtype == y.dtype == torch.int64
    assert (x[:, 1:] == y[:, :-1]).all()
    starts = np.concatenate([loader.starts(i) for i in range(200)])
    assert starts.min() == 0 and starts.max() == loader.max_start == len(tokens) - 17
    assert len(np.unique(starts)) > 0.9 * (loader.max_start + 1)
    doc_starts = set(range(0, len(tokens), 51))
    assert sum(s not in doc_starts for s in starts) > 0.9 * len(starts)
    counts = np.histogram(starts, bins=10, range=(0, loader.max_start + 1))[0]
    assert counts.min() > 0.7 * counts.mean()


def test_loader_resume_and_ranks():
    tokens = np.arange(5000)
    a = WindowLoader(tokens, 8, 4, seed=3)
    batches = [a.next_batch() for _ in range(5)]
    state = a.state_dict()
    assert state == {"seed": 3, "step": 5, "rank": 0, "world_size": 1}
    after = [a.next_batch() for _ in range(3)]
    b = WindowLoader(tokens, 8, 4, seed=99)
    b.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(after, [b.next_batch() for _ in range(3)], strict=True):
        assert (x1 == x2).all() and (y1 == y2).all()
    r0 = WindowLoader(tokens, 8, 4, seed=3, rank=0, world_size=2)
    r1 = WindowLoader(tokens, 8, 4, seed=3, rank=1, world_size=2)
    assert (r0.next_batch()[0] == batches[0][0]).all()
    assert not np.array_equal(r0.starts(0), r1.starts(0))
    with pytest.raises(DataError, match="shorter than one window"):
        WindowLoader(np.arange(8), 8, 1)


@pytest.mark.parametrize(
    "n,seq_len,stride", [(1000, 64, None), (1000, 64, 64), (37, 8, 3), (5, 16, None), (2, 4, 1)]
)
def test_eval_batches_score_each_token_once(n, seq_len, stride):
    tokens = np.random.default_rng(0).integers(0, 300, size=n)
    scored, targets = 0, []
    for x, y, mask in eval_batches(tokens, seq_len, batch_size=3, stride=stride, pad_value=258):
        assert x.shape == y.shape == mask.shape and x.shape[1] == seq_len
        scored += int(mask.sum())
        targets.append(y[mask].numpy())
    assert scored == n - 1
    assert np.array_equal(np.concatenate(targets), tokens[1:])


def test_eval_batches_context():
    # Positions are their own token ids, so each scored target's context length is readable from x.
    seq_len, stride = 16, 4
    for i, (_x, _y, mask) in enumerate(eval_batches(np.arange(200), seq_len, 1, stride)):
        if i > 0:
            cols = np.flatnonzero(mask[0].numpy())
            assert cols.min() + 1 >= seq_len - stride


@pytest.fixture(scope="module", params=["bytes", "bpe", "unigram"])
def prepared(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / request.param
    meta = prepare_data("sample", out, tokenizer=request.param, vocab_size=512, progress=False)
    return out, meta


def test_prepare_meta_consistent(prepared):
    out, meta = prepared
    data = DataDir(out)
    assert data.meta == meta and meta["format"] == "sentcode-data" and meta["corpus"] == "sample"
    tok = data.tokenizer
    assert tok.kind == meta["tokenizer"]["kind"] and tok.vocab_size == meta["tokenizer"]["vocab_size"]
    for split in ("train", "val", "test"):
        tokens = data.tokens(split)
        docs = data.documents(split)
        info = meta["splits"][split]
        assert info["tokens"] == tokens.size and info["documents"] == len(docs) > 0
        assert (
            info["bytes"]
            == data.split_bytes(split)
            == sum(len(d.encode("utf-8", "surrogateescape")) for d in docs)
        )
        assert int((np.asarray(tokens) == tok.eos_id).sum()) == len(docs) and tokens[-1] == tok.eos_id
        assert tok.decode(np.asarray(tokens).tolist()) == b"".join(d.encode() for d in docs)
    assert meta["splits"]["test"]["documents"] == 2
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".")]


def test_heldout_jsonl_keeps_invalid_bytes(tmp_path):
    raw = [b"Para %d text \xff\xfe end" % i for i in range(30)]
    lines = [json.dumps({"text": r.decode("utf-8", "surrogateescape")}) + "\n" for r in raw]
    (tmp_path / "c.jsonl").write_text("".join(lines))
    prepare_data(tmp_path / "c.jsonl", tmp_path / "out", progress=False)
    data = DataDir(tmp_path / "out")
    docs = [d.encode("utf-8", "surrogateescape") for s in ("train", "val", "test") for d in data.documents(s)]
    assert sorted(docs) == sorted(raw)


def test_datadir_errors(tmp_path):
    with pytest.raises(DataError, match="no data directory at .*sentcode data prepare"):
        DataDir(tmp_path / "nothing")
    (tmp_path / "meta.json").write_text('{"format": "other"}')
    with pytest.raises(DataError, match="not a sentcode data directory"):
        DataDir(tmp_path)
