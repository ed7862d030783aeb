"""Input handling of prepare: folders with hidden and binary files, BOMs, lone surrogates, a corpus that
carries its tokenizer and can be moved, checksums, and the --domain flag's forms."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from aioli_fast.cli import main, parse_domains
from aioli_fast.data import load_manifest, prepare
from aioli_fast.data.shards import read_shard
from aioli_fast.errors import AioliError

TEXT = "the quick brown fox jumps over the lazy dog. " * 8


def _tokens(out: Path, domain: str = "d", split: str = "train") -> list[int]:
    """The packed token stream of a split (samples overlap by one token)."""
    manifest = load_manifest(out)
    samples = [
        row.tolist()
        for s in manifest.split_shards(domain, split)
        for row in read_shard(s.path, sample_len=manifest.sample_len, vocab_size=manifest.vocab_size)[1]
    ]
    return samples[0] + [t for row in samples[1:] for t in row[1:]]


def _hf_tokenizer(path: Path):
    """A small byte-level BPE tokenizer.json with an <|endoftext|> token, saved at ``path``."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "[UNK]"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TEXT] * 4, trainer)
    tok.save(str(path))
    return tok


def test_folder_inputs_skip_hidden_pycache_and_binary_files(tmp_path):
    src = tmp_path / "repo"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "a.py").write_text(TEXT)
    (src / "b.txt").write_text(TEXT.upper())
    (src / ".git" / "objects").mkdir(parents=True)
    (src / ".git" / "objects" / "pack").write_bytes(b"\x00\x01binary" * 100)
    (src / ".hidden.txt").write_text("secret " * 50)
    (src / "__pycache__").mkdir()
    (src / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\x00" * 64)
    (src / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00" + bytes(range(256)))
    manifest = prepare(
        {"d": [str(src)]}, tmp_path / "out", seq_len=16, val_fraction=0, test_fraction=0, progress=False
    )
    entry = manifest["domains"][0]
    assert sorted(Path(p).name for p in entry["inputs"]) == ["a.py", "b.txt"]
    assert entry["skipped_files"] == 4 and len(entry["skipped_examples"]) == 4
    assert entry["documents"] == 2
    assert 0 not in _tokens(tmp_path / "out")  # no NUL byte from a binary file reached the shards


def test_an_explicit_binary_file_is_an_error(tmp_path):
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\x00\xff" * 100)
    with pytest.raises(AioliError, match=f"domain 'd': input '{binary}' is a binary file"):
        prepare(
            {"d": [str(binary)]}, tmp_path / "out", seq_len=8, val_fraction=0, test_fraction=0, progress=False
        )


def test_a_folder_of_only_hidden_or_binary_files_is_an_error(tmp_path):
    (tmp_path / "src" / ".cache").mkdir(parents=True)
    (tmp_path / "src" / ".cache" / "x.txt").write_text(TEXT)
    with pytest.raises(AioliError, match=r"no text file among its inputs .* \(1 hidden or binary"):
        prepare({"d": [str(tmp_path / "src")]}, tmp_path / "out", seq_len=8, progress=False)


def test_byte_order_marks_are_dropped(tmp_path):
    (tmp_path / "a.txt").write_bytes("\ufeff".encode() + TEXT.encode())
    (tmp_path / "b.jsonl").write_bytes("\ufeff".encode() + json.dumps({"text": TEXT}).encode() + b"\n")
    for name in ("a.txt", "b.jsonl"):
        out = tmp_path / f"out-{name}"
        prepare(
            {"d": [str(tmp_path / name)]}, out, seq_len=16, val_fraction=0, test_fraction=0, progress=False
        )
        tokens = _tokens(out)
        assert len(tokens) > 300 and tokens[:300] == list(TEXT.encode())[:300]  # the text, not EF BB BF


def test_lone_surrogates_in_json_become_replacement_characters(tmp_path):
    _hf_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "s.jsonl").write_text(json.dumps({"text": TEXT + "\ud800 end"}) + "\n")
    for tokenizer in ("byte", str(tmp_path / "tokenizer.json")):
        out = tmp_path / f"out-{Path(tokenizer).stem}"
        prepare(
            {"d": [str(tmp_path / "s.jsonl")]},
            out,
            seq_len=8,
            tokenizer=tokenizer,
            val_fraction=0,
            test_fraction=0,
            progress=False,
        )
        assert load_manifest(out).num_sequences("d", "train") > 0


def test_corpus_carries_its_tokenizer_and_can_be_moved(tmp_path, capsys):
    source = tmp_path / "src-tokenizer.json"
    tok = _hf_tokenizer(source)
    docs = [f"{TEXT} number {i}" for i in range(40)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = tmp_path / "corpus"
    manifest = prepare(
        {"d": [str(tmp_path / "d.jsonl")]},
        out,
        seq_len=8,
        tokenizer=str(source),
        val_fraction=0.2,
        test_fraction=0.2,
        progress=False,
    )
    assert manifest["tokenizer"]["path"] == "tokenizer.json"
    assert (out / "tokenizer.json").read_bytes() == source.read_bytes()

    from aioli_fast.data.tokenizers import load_tokenizer

    source.unlink()  # the corpus no longer depends on the original file
    moved = tmp_path / "elsewhere" / "corpus"
    shutil.move(str(out), str(moved))
    rebuilt = load_tokenizer(load_manifest(moved).tokenizer, root=moved)
    assert rebuilt.encode(docs[0]) == tok.encode(docs[0], add_special_tokens=False).ids

    # a run trained on the moved corpus evaluates on a byte-identical copy of it at another path
    assert (
        main(
            [
                "train",
                f"data.path={moved}",
                f"train.out_dir={tmp_path / 'runs'}",
                "train.name=r",
                "train.steps=2",
                "train.batch_size=2",
                "train.progress=false",
                "model.preset=tiny",
            ]
        )
        == 0
    )
    copy = tmp_path / "copy"
    shutil.copytree(moved, copy)
    assert main(["eval", "--checkpoint", str(tmp_path / "runs" / "r"), "--data", str(copy)]) == 0
    assert "average" in capsys.readouterr().out


def test_eos_token_is_refused_with_the_byte_tokenizer(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT)
    with pytest.raises(AioliError, match="--eos-token applies to an HF tokenizer.json"):
        prepare({"d": [str(tmp_path / "a.txt")]}, tmp_path / "out", eos_token="</s>", progress=False)


def test_verify_checks_every_shard_against_its_checksum(tmp_path, capsys):
    (tmp_path / "a.txt").write_text(TEXT * 20)
    out = tmp_path / "corpus"
    prepare(
        {"d": [str(tmp_path / "a.txt")]},
        out,
        seq_len=16,
        val_fraction=0,
        test_fraction=0,
        shard_sequences=4,
        progress=False,
    )
    n_shards = len(load_manifest(out).split_shards("d", "train"))
    assert main(["verify", str(out), "--quiet"]) == 0
    assert f"{n_shards} shards match their checksums" in capsys.readouterr().out

    shard = out / "d" / "train-00001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0x01  # one flipped bit inside a sample: still a valid tar and a valid .npy
    shard.write_bytes(bytes(data))
    assert main(["verify", str(out), "--quiet"]) == 2
    assert f"shard {shard} does not match its sha256" in capsys.readouterr().err
    check = load_manifest(out).verify(progress=False)
    assert check.problems >= 1 and any("does not match its sha256" in line for line in check.lines)


@pytest.mark.parametrize(
    "specs, expected",
    [
        (["a=x.txt,y.txt"], {"a": ["x.txt", "y.txt"]}),
        (["a=x.txt", "b=y/", "a=z.jsonl"], {"a": ["x.txt", "z.jsonl"], "b": ["y/"]}),
    ],
    ids=["comma-list", "repeated-name-adds"],
)
def test_domain_flags(specs, expected):
    assert parse_domains(specs) == (expected, {})


def test_a_domain_flag_names_its_text_field(tmp_path):
    specs = ["web=web/*.parquet:content", "code=a.jsonl,b.jsonl:body", "plain=c.txt"]
    assert parse_domains(specs) == (
        {"web": ["web/*.parquet"], "code": ["a.jsonl", "b.jsonl"], "plain": ["c.txt"]},
        {"web": "content", "code": "body"},
    )
    with pytest.raises(AioliError, match="two text fields"):
        parse_domains(["a=x.jsonl:one", "a=y.jsonl:two"])


def test_a_path_with_a_comma_or_colon_is_one_path(tmp_path):
    odd = tmp_path / "report,2024:v2.txt"
    odd.write_text(TEXT)
    assert parse_domains([f"a={odd}"]) == ({"a": [str(odd)]}, {})


def test_eval_and_demo_check_their_output_paths_first(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["eval", "--checkpoint", str(tmp_path / "none.pt"), "--out", str(blocker / "r.json")]) == 2
    assert "is not writable" in capsys.readouterr().err  # before looking for the checkpoint
    assert main(["demo", "--out", str(blocker / "demo")]) == 2
    assert f"demo output directory {blocker / 'demo'} is not writable" in capsys.readouterr().err
