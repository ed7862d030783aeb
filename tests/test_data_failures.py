"""How ``prepare`` and ``verify`` fail: held-out top-ups that would move a huge document, lone surrogates,
a full disk (a file-size limit), Ctrl-C with tokenizer workers, manifests that contradict their shards,
and the permissions of the files written.

Real files and real processes throughout: the disk-full and Ctrl-C cases run ``python3 -m aioli_fast``
in a child process (under ``RLIMIT_FSIZE``, or sent SIGINT).
"""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import run_cli, train_bpe_tokenizer

from aioli_fast.cli import main
from aioli_fast.data import load_manifest, prepare
from aioli_fast.data.prepare import _load_state, document_hash
from aioli_fast.errors import AioliError
from aioli_fast.fileio import atomic_write, atomic_write_json

WORDS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta")


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


def small_docs(n: int, *, above: float, stem: str = "small") -> list[str]:
    """``n`` distinct short documents whose hash (seed 0) is at least ``above``."""
    found, i = [], 0
    while len(found) < n:
        text = f"{stem} {i}: " + " ".join(WORDS[(i * 3 + j) % len(WORDS)] for j in range(30))
        if document_hash(text, 0) >= above:
            found.append(text)
        i += 1
    return found


def big_doc(n_bytes: int, low: float, high: float) -> str:
    """A one-line document of about ``n_bytes`` whose hash (seed 0) lies in [low, high)."""
    filler = " ".join(WORDS) + " "
    body = filler * (n_bytes // len(filler))
    for i in range(10_000):
        text = f"big {i}: {body}"
        if low <= document_hash(text, 0) < high:
            return text
    raise AssertionError("no document found in the hash range")


def stream_of(corpus: Path, domain: str, split: str) -> list[int]:
    """The packed token stream of a split (samples overlap by one token)."""
    m = load_manifest(corpus)
    rows = [r.tolist() for s in m.split_shards(domain, split) for r in m.read(s)[1]]
    return rows[0] + [t for row in rows[1:] for t in row[1:]]


# ---------------------------------------------------------------------------------------------------------
# held-out top-ups are bounded


def test_a_top_up_passes_over_a_document_too_large_to_move(tmp_path, capsys):
    # every document lands in train by its hash; the large one is the nearest to val's range [0, 0.2),
    # so an unbounded top-up moves it (and with it almost every token of the domain) into val
    smalls = small_docs(30, above=0.6)
    big = big_doc(300_000, 0.2, 0.6)
    write_jsonl(tmp_path / "d.jsonl", [*smalls, big])
    manifest = prepare(
        {"web": [str(tmp_path / "d.jsonl")]},
        tmp_path / "corpus",
        seq_len=64,
        val_fraction=0.2,
        test_fraction=0.0,
        progress=False,
    )
    splits = manifest["domains"][0]["splits"]
    total = sum(s["tokens"] for s in splits.values())
    assert splits["train"]["tokens"] > len(big)  # the large document stayed in train
    assert 64 < splits["val"]["tokens"] <= 2 * 0.2 * total  # val holds small documents only
    assert splits["val"]["documents"] >= 1
    val_tokens = stream_of(tmp_path / "corpus", "web", "val")
    assert bytes(t for t in val_tokens if t < 256).decode().startswith("small ")
    err = capsys.readouterr().err
    assert "warning" in err and "'web'" in err and "val" in err
    assert f"{len(big.encode()) + 1:,} tokens" in err  # the size of the document passed over


def test_a_lone_document_too_large_to_hold_out_fails_with_advice_that_helps(tmp_path, capsys):
    book = big_doc(60_000, 0.3, 1.0)
    (tmp_path / "book.txt").write_text(book)
    with pytest.raises(AioliError) as info:
        prepare(
            {"books": [str(tmp_path / "book.txt")]},
            tmp_path / "corpus",
            seq_len=64,
            val_fraction=0.05,
            test_fraction=0.05,
            progress=False,
        )
    message = str(info.value)
    assert "'books'" in message and "the val and test splits cannot be filled" in message
    assert "add text" not in message  # more text does not help a single document
    assert "split" in message and "into several documents" in message
    assert "--val-fraction 0 --test-fraction 0" in message
    assert f"{len(book) + 1:,} tokens" in message  # the size of the document
    assert not (tmp_path / "corpus" / "manifest.json").exists()
    # through the command line: one line, exit status 2
    code = main(
        ["prepare", "--out", str(tmp_path / "c2"), "--domain", f"books={tmp_path / 'book.txt'}", "--quiet"]
    )
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "into several documents" in err


# ---------------------------------------------------------------------------------------------------------
# lone surrogates


def test_lone_surrogates_become_the_replacement_character(tmp_path):
    (tmp_path / "s.jsonl").write_text(json.dumps({"text": "before \ud800 after " * 4}) + "\n")
    prepare(
        {"d": [str(tmp_path / "s.jsonl")]},
        tmp_path / "out",
        seq_len=8,
        val_fraction=0,
        test_fraction=0,
        progress=False,
    )
    tokens = stream_of(tmp_path / "out", "d", "train")
    expected = list("before \ufffd after".encode())
    assert tokens[: len(expected)] == expected  # EF BF BD, not "?"
    assert ord("?") not in tokens


def test_lone_surrogates_become_the_replacement_character_with_an_hf_tokenizer(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    train_bpe_tokenizer(tmp_path / "tokenizer.json", ["before and after the text"] * 4, "<|endoftext|>")
    tok = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    (tmp_path / "s.jsonl").write_text(json.dumps({"text": "before \ud800 after " * 8}) + "\n")
    prepare(
        {"d": [str(tmp_path / "s.jsonl")]},
        tmp_path / "out",
        seq_len=8,
        tokenizer=str(tmp_path / "tokenizer.json"),
        val_fraction=0,
        test_fraction=0,
        progress=False,
    )
    text = tok.decode(stream_of(tmp_path / "out", "d", "train"))
    assert "before \ufffd after" in text and "?" not in text


# ---------------------------------------------------------------------------------------------------------
# a full disk: the write fails (EFBIG under a file-size limit, like ENOSPC)


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_write_failure_is_one_line_and_a_rerun_continues(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    write_jsonl(raw / "a.jsonl", small_docs(20, above=0.0, stem="a"))  # ~20 samples: one small shard
    write_jsonl(raw / "b.jsonl", small_docs(200, above=0.0, stem="b"))  # 200-sample shards: ~200 KB
    out = tmp_path / "corpus"
    args = ["prepare", "--out", str(out), "--domain", f"a={raw / 'a.jsonl'}"]
    args += ["--domain", f"b={raw / 'b.jsonl'}", "--seq-len", "64", "--shard-sequences", "200"]
    args += ["--val-fraction", "0", "--test-fraction", "0", "--workers", "1"]
    failed = run_cli(*args, "--quiet", preexec_fn=_limit_file_size(100_000), timeout=120)
    assert failed.returncode == 2, failed.stderr
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in failed.stderr, failed.stderr
    line = lines[0]
    assert line.startswith("aioli-fast prepare: error: ")
    assert os.strerror(errno.EFBIG) in line and "b/train-00000.tar" in line
    assert "again" in line  # says that a re-run continues
    # nothing looks complete: no corpus, no temporary file; every shard under its final name is whole
    staging = tmp_path / ".corpus.partial"
    assert not (out / "manifest.json").exists() and staging.is_dir()
    kept = (".prepare-state.json", ".block-")  # the run's state and each block's finished shards
    assert not [p for p in staging.rglob(".*") if not p.name.startswith(kept)]
    state = _load_state(staging / ".prepare-state.json")
    shards = sorted(staging.rglob("*.tar"))
    assert [str(p.relative_to(staging)) for p in shards] == ["a/train-00000.tar"]
    (shard,) = state["blocks"]["a/0"]["entry"]["splits"]["train"]["shards"]
    assert shard["path"] == "a/train-00000.tar" and shard["bytes"] == shards[0].stat().st_size
    before = shards[0].stat().st_mtime_ns

    done = run_cli(*args, timeout=120)  # without the limit: continues from the staging folder
    assert done.returncode == 0, done.stderr
    assert "prepare: 1 of 2 block(s) reused from the interrupted run" in done.stderr
    assert (out / "a" / "train-00000.tar").stat().st_mtime_ns == before
    assert run_cli("verify", str(out), "--quiet").returncode == 0


def test_a_failed_write_names_the_file(tmp_path):
    def full(tmp: str) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError) as info:
        atomic_write(tmp_path / "x.json", full)
    assert info.value.filename == str(tmp_path / "x.json")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------
# Ctrl-C with tokenizer workers


def children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find the workers")
def test_interrupting_prepare_prints_no_worker_tracebacks(tmp_path):
    raw = tmp_path / "raw"
    (raw / "b").mkdir(parents=True)
    write_jsonl(raw / "a.jsonl", small_docs(20, above=0.0, stem="a"))
    filler = " ".join(WORDS) + "\n"
    for i in range(1200):  # ~24 MB, one block: a few seconds of tokenizing and packing
        (raw / "b" / f"{i:03d}.txt").write_text(f"document {i}\n" + filler * 400)
    cmd = [sys.executable, "-m", "aioli_fast", "prepare", "--out", str(tmp_path / "corpus")]
    cmd += ["--domain", f"a={raw / 'a.jsonl'}", "--domain", f"b={raw / 'b'}", "--workers", "2"]
    cmd += ["--seq-len", "64"]

    def default_sigint() -> None:  # as in a terminal, even when the test runs in a background job
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        start_new_session=True,
        preexec_fn=default_sigint,
    )
    try:
        lines = []
        for line in proc.stderr:  # the first domain is done: the workers are busy with the second
            lines.append(line)
            if line.startswith("prepared a"):
                break
        assert lines and lines[-1].startswith("prepared a"), "".join(lines)
        # Ctrl-C: SIGINT goes to every process of the group, and on a busy machine the workers may well
        # take it before the parent stops them; that order is made certain here
        workers = children(proc.pid)
        assert len(workers) == 2, workers
        for worker in workers:
            os.kill(worker, signal.SIGINT)
        time.sleep(0.5)
        os.kill(proc.pid, signal.SIGINT)
        stdout, rest = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    err = "".join(lines) + rest
    assert proc.returncode == 130, err
    assert "aioli-fast prepare: interrupted" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    deadline = time.monotonic() + 10  # no worker outlives the command
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("a worker process is still running")
    assert not (tmp_path / "corpus" / "manifest.json").exists()
    assert (tmp_path / ".corpus.partial" / "a" / "train-00000.tar").is_file()  # kept for a re-run


# ---------------------------------------------------------------------------------------------------------
# verify checks what training checks


@pytest.fixture
def corpus(tmp_path) -> Path:
    write_jsonl(tmp_path / "d.jsonl", small_docs(40, above=0.0))
    out = tmp_path / "corpus"
    prepare(
        {"d": [str(tmp_path / "d.jsonl")], "e": [str(tmp_path / "d.jsonl")]},
        out,
        seq_len=16,
        val_fraction=0.2,
        test_fraction=0.0,
        shard_sequences=32,
        progress=False,
    )
    return out


def edit_manifest(corpus: Path, edit) -> None:
    path = corpus / "manifest.json"
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw, indent=2))


def first_shard(raw: dict, split: str = "train") -> dict:
    return raw["domains"][0]["splits"][split]["shards"][0]


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda m: m.update(seq_len=32), ["shape (17,); expected uint16/uint32 of shape (33,)"]),
        (lambda m: m.update(vocab_size=200), ["token id 256 >= vocab_size 200", "eos_id 256"]),
        (
            lambda m: first_shard(m).update(sequences=first_shard(m)["sequences"] + 1),
            ["samples but the manifest says", "train split's sequences"],
        ),
    ],
    ids=["seq-len", "vocab-size", "sequence-count"],
)
def test_verify_rejects_a_manifest_that_contradicts_its_shards(corpus, capsys, edit, expected):
    assert main(["verify", str(corpus), "--quiet"]) == 0
    capsys.readouterr()
    edit_manifest(corpus, edit)
    assert main(["verify", str(corpus), "--quiet"]) == 2
    err = capsys.readouterr().err
    for text in expected:
        assert text in err, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("aioli-fast verify: error: ") and "problem" in lines[-1]
    assert "Traceback" not in err


def test_verify_reports_every_problem_of_every_split(corpus, capsys):
    m = load_manifest(corpus)
    missing = m.split_shards("e", "val")[0].path
    missing.unlink()
    flipped = m.split_shards("d", "train")[0].path
    data = bytearray(flipped.read_bytes())
    data[700] ^= 0x01  # inside a sample: still a valid tar and .npy
    flipped.write_bytes(bytes(data))
    assert main(["verify", str(corpus), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"shard not found: {missing}" in err
    assert f"shard {flipped} does not match its sha256" in err
    assert "2 problems" in err.strip().splitlines()[-1]


# ---------------------------------------------------------------------------------------------------------
# permissions of the files written


@pytest.fixture
def umask():
    old = os.umask(0o022)
    try:
        yield lambda mask: os.umask(mask)
    finally:
        os.umask(old)


def test_files_written_follow_the_umask(tmp_path, umask):
    umask(0o027)
    atomic_write_json(tmp_path / "x.json", {"v": 1})
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o640
    umask(0o022)
    write_jsonl(tmp_path / "d.jsonl", small_docs(10, above=0.0))
    prepare(
        {"d": [str(tmp_path / "d.jsonl")]},
        tmp_path / "corpus",
        seq_len=16,
        val_fraction=0,
        test_fraction=0,
        progress=False,
    )
    written = [p for p in (tmp_path / "corpus").rglob("*") if p.is_file()]
    assert len(written) >= 2
    assert {p.name: p.stat().st_mode & 0o777 for p in written} == {p.name: 0o644 for p in written}
