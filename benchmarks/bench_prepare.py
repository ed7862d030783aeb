"""Throughput and memory of ``aioli-fast prepare`` against the bare tokenizer, at several input sizes.

The input is real text from this machine: the Python standard library's source, cut at line breaks into
documents of at most 4 KB and repeated (with the repetition number in each document, so documents stay
distinct) into one JSON-lines file per size. For each size, each tokenizer (the byte tokenizer and a
BPE ``tokenizer.json`` trained here with the ``tokenizers`` package on the first MB) and each number of
workers, ``aioli-fast prepare`` runs as a new process; the table shows

- wall seconds, MB of text per second and per CPU-second (the process tree's user + system time);
- peak RSS of the whole process tree (sampled every 20 ms with psutil);
- the bare tokenizer on the same text in the same run: ``str.encode`` for bytes, ``Tokenizer.encode_batch``
  in batches of 256 documents for BPE (in this process, one thread unless the tokenizer uses more).

    OMP_NUM_THREADS=1 python3 benchmarks/bench_prepare.py --sizes 20,60,200 --json out.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
MB = 1 << 20


def stdlib_documents(limit_bytes: int = 64 * MB) -> list[str]:
    """Pieces of at most 4 KB of the standard library's Python files, cut at line breaks."""
    docs, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        piece: list[str] = []
        size = 0
        for line in text.splitlines(keepends=True):
            if size + len(line) > 4096 and piece:
                docs.append("".join(piece))
                total += size
                piece, size = [], 0
            piece.append(line)
            size += len(line)
        if piece:
            docs.append("".join(piece))
            total += size
        if total >= limit_bytes:
            break
    return docs


def write_input(path: Path, docs: list[str], megabytes: int) -> int:
    """One JSON-lines file of about ``megabytes`` of text; returns the text's size in bytes."""
    text_bytes, copy = 0, 0
    with path.open("w", encoding="utf-8") as f:
        while text_bytes < megabytes * MB:
            for doc in docs:
                text = f"# copy {copy}\n{doc}"
                f.write(json.dumps({"text": text}) + "\n")
                text_bytes += len(text.encode("utf-8"))
                if text_bytes >= megabytes * MB:
                    break
            copy += 1
    return text_bytes


def train_bpe(docs: list[str], path: Path, vocab: int = 16384) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"])
    sample, size = [], 0
    for doc in docs:
        sample.append(doc)
        size += len(doc)
        if size > MB:
            break
    tok.train_from_iterator(sample, trainer)
    tok.save(str(path))


def run_prepare(inp: Path, out: Path, tokenizer: str, workers: int) -> dict:
    """One ``aioli-fast prepare`` process: wall, CPU seconds of the tree and its peak RSS."""
    cmd = [sys.executable, "-m", "aioli_fast", "prepare", "--domain", f"d={inp}", "--out", str(out)]
    cmd += ["--seq-len", "2048", "--tokenizer", tokenizer, "--workers", str(workers), "--quiet"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.02)
    wall = time.perf_counter() - start
    err = proc.stderr.read()
    if proc.returncode != 0:
        raise SystemExit(f"prepare failed: {err}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_mb": peak / MB}


def bare(inp: Path, tokenizer: str) -> dict:
    """The tokenizer alone on the same documents (read from the same file), in this process."""
    texts = [json.loads(line)["text"] for line in inp.open(encoding="utf-8")]
    start, cpu0 = time.perf_counter(), time.process_time()
    if tokenizer == "byte":
        for t in texts:
            t.encode("utf-8")
    else:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(tokenizer)
        for i in range(0, len(texts), 256):
            tok.encode_batch(texts[i : i + 256], add_special_tokens=False)
    return {"wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="20,60,200", help="input sizes in MB (default 20,60,200)")
    parser.add_argument("--workers", default="1,2", help="worker counts (default 1,2)")
    parser.add_argument("--tokenizers", default="byte,bpe", help="byte and/or bpe")
    parser.add_argument("--dir", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    workers = [int(w) for w in args.workers.split(",")]
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="bench-prepare-"))
    scratch.mkdir(parents=True, exist_ok=True)
    docs = stdlib_documents()
    tokenizers = {}
    for name in args.tokenizers.split(","):
        if name == "bpe":
            path = scratch / "bpe.json"
            train_bpe(docs, path)
            tokenizers["bpe"] = str(path)
        else:
            tokenizers["byte"] = "byte"
    rows = []
    for size in sizes:
        inp = scratch / f"input-{size}mb.jsonl"
        text_mb = write_input(inp, docs, size) / MB
        for name, spec in tokenizers.items():
            base = bare(inp, spec)
            for w in workers:
                out = scratch / f"corpus-{size}-{name}-{w}"
                r = run_prepare(inp, out, spec, w)
                subprocess.run(["rm", "-rf", str(out)], check=True)
                row = {
                    "size_mb": round(text_mb, 1),
                    "tokenizer": name,
                    "workers": w,
                    **{k: round(v, 2) for k, v in r.items()},
                    "mb_per_s": round(text_mb / r["wall_s"], 2),
                    "mb_per_cpu_s": round(text_mb / r["cpu_s"], 2),
                    "bare_s": round(base["wall_s"], 2),
                    "bare_mb_per_s": round(text_mb / base["wall_s"], 2),
                    "vs_bare": round(r["wall_s"] / base["wall_s"], 2),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
        inp.unlink()
    header = (
        "| MB | tokenizer | workers | wall s | MB/s | MB/CPU-s | peak RSS MB | bare s | bare MB/s | x bare |"
    )
    print("\n" + header + "\n|" + "---|" * 10)
    for r in rows:
        cells = [r["size_mb"], r["tokenizer"], r["workers"], r["wall_s"], r["mb_per_s"], r["mb_per_cpu_s"]]
        cells += [f"{r['peak_rss_mb']:.0f}", r["bare_s"], r["bare_mb_per_s"], r["vs_bare"]]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    if args.json:
        import tokenizers as tk

        env = {
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
            "date": datetime.date.today().isoformat(),
            "tokenizers": tk.__version__,
            "command": " ".join(sys.argv),
        }
        Path(args.json).write_text(json.dumps({"env": env, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
