"""Throughput of the mixture stream from local shards, with proportions that change every 50 steps.

Builds a synthetic corpus (random token ids, vocabulary 50304 stored as uint16, seq_len 2048) with the
package's own shard writer and manifest format, then for 7 and 64 domains, 0/1/2 DataLoader workers and
both assignment rules times ``--steps`` batches of ``--batch-size`` sequences, calling
``set_proportions`` with new random proportions every ``--change-every`` steps, and prints tokens/s
(input tokens, per process). The first ``--warmup`` batches (worker start-up, first shard reads) are not
timed. Correctness: every benchmarked run is also checked to yield the same batches as the in-process
reader (``--check``, on by default, on the first 20 batches).

    python3 benchmarks/bench_loader.py [--steps 300] [--batch-size 32] [--workers 0,1,2] [--domains 7,64]
    python3 benchmarks/bench_loader.py --remote     # also from S3: a local moto server, cold and warm cache

``--remote`` starts moto's S3 server in a subprocess (the ``[dev]`` extra), uploads each corpus to it and
times, beside the local folder in the same run, the stream reading ``s3://`` through a fresh cache
(cold: every shard downloaded, sha256-checked, while training waits or the prefetch runs) and through
the cache the cold run filled (warm). Every remote run is first checked to yield the local batches.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from aioli_fast.data.shards import FORMAT_VERSION, MANIFEST_NAME, load_manifest, write_shard
from aioli_fast.data.stream import ASSIGNMENT_RULES, MixtureStream

SEQ_LEN = 2048
VOCAB = 50304


def build_corpus(root: Path, num_domains: int, shards: int, per_shard: int) -> Path:
    """A corpus of ``num_domains`` domains of random uint16 tokens, in the format ``prepare`` writes."""
    rng = np.random.default_rng(0)
    entries = []
    for d in range(num_domains):
        name = f"d{d:02d}"
        (root / name).mkdir(parents=True)
        shard_list = []
        for i in range(shards):
            samples = rng.integers(0, VOCAB, size=(per_shard, SEQ_LEN + 1), dtype=np.uint16)
            rel = f"{name}/train-{i:05d}.tar"
            keys = [f"{name}-train-{i * per_shard + j:09d}" for j in range(per_shard)]
            sha, size = write_shard(root / rel, keys, samples)
            shard_list.append({"path": rel, "sequences": per_shard, "sha256": sha, "bytes": size})
        n = shards * per_shard
        split = {"documents": n, "tokens": n * SEQ_LEN + 1, "sequences": n, "dropped_tokens": 0}
        entries.append(
            {"name": name, "inputs": [], "documents": n, "splits": {"train": {**split, "shards": shard_list}}}
        )
    manifest = {
        "format_version": FORMAT_VERSION,
        "created_by": "bench_loader",
        "seq_len": SEQ_LEN,
        "sample_len": SEQ_LEN + 1,
        "dtype": "uint16",
        "vocab_size": VOCAB,
        "eos_id": 0,
        "tokenizer": {"kind": "synthetic", "vocab_size": VOCAB, "eos_id": 0},
        "split": {"unit": "document", "seed": 0, "val_fraction": 0.0, "test_fraction": 0.0},
        "domains": entries,
    }
    (root / MANIFEST_NAME).write_text(json.dumps(manifest))
    return root


def run(manifest, num_domains: int, workers: int, rule: str, args) -> dict:
    domains = list(manifest.domains)
    rng = np.random.default_rng(1)
    stream = MixtureStream(
        manifest, domains, args.batch_size, np.ones(num_domains), seed=0, assignment=rule, num_workers=workers
    )
    tokens, start = 0, None
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            start = time.perf_counter()
        if step % args.change_every == 0:
            stream.set_proportions(rng.dirichlet(np.ones(num_domains)), step=step)
        batch = next(stream)
        if step >= args.warmup:
            tokens += batch.num_tokens
    elapsed = time.perf_counter() - start
    discarded = stream.metrics()["discarded_batches"]
    stream.close()
    return {
        "tokens_per_s": tokens / elapsed,
        "ms_per_batch": 1e3 * elapsed / args.steps,
        "discarded": discarded,
    }


def start_s3() -> subprocess.Popen:
    """moto's S3 server on a free local port; sets the environment s3fs reads (endpoint, credentials)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(300):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.1)
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
    )
    return proc


def upload(root: Path, url: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem()
    bucket = url.split("://", 1)[1].split("/", 1)[0]
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    fs.put(str(root), url.split("://", 1)[1], recursive=True)


def check_same_batches(manifest, num_domains: int, workers: int, rule: str, args, reference=None) -> None:
    def batches(w: int, m=manifest) -> list:
        rng = np.random.default_rng(2)
        s = MixtureStream(m, list(m.domains), 4, np.ones(num_domains), assignment=rule, num_workers=w)
        out = []
        for step in range(20):
            if step % 7 == 0:
                s.set_proportions(rng.dirichlet(np.ones(num_domains)), step=step)
            out.append(next(s))
        s.close()
        return out

    want = batches(0, reference if reference is not None else manifest)
    for a, b in zip(want, batches(workers)):
        if not (torch.equal(a.input_ids, b.input_ids) and torch.equal(a.domain_ids, b.domain_ids)):
            sys.exit(
                f"FAILED: {num_domains} domains, {workers} workers, {rule}: batches differ from the local "
                "reader with workers=0"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--change-every", type=int, default=50)
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--domains", default="7,64")
    parser.add_argument("--rules", default=",".join(ASSIGNMENT_RULES))
    parser.add_argument("--no-check", dest="check", action="store_false")
    parser.add_argument(
        "--dir", default=None, help="where to build the corpora (default: a temporary folder)"
    )
    parser.add_argument("--remote", action="store_true", help="also read from a local S3 server (moto)")
    args = parser.parse_args()
    server = start_s3() if args.remote else None

    print(
        f"# bench_loader {datetime.datetime.now().isoformat(timespec='seconds')}  "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, "
        f"torch {torch.__version__}, numpy {np.__version__}"
    )
    print(
        f"# seq_len {SEQ_LEN}, batch {args.batch_size} x {SEQ_LEN} tokens, {args.steps} timed steps, "
        f"new proportions every {args.change_every} steps, uint16 shards on local disk"
    )
    print("| domains | workers | rule | source | tokens/s | ms/batch | stale batches dropped |")
    print("|---:|---:|---|---|---:|---:|---:|")
    try:
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            for num_domains in (int(x) for x in args.domains.split(",")):
                # enough data that no domain wraps during a run at the largest proportion
                shards, per_shard = (8, 128) if num_domains <= 16 else (2, 128)
                root = build_corpus(Path(tmp) / f"c{num_domains}", num_domains, shards, per_shard)
                manifest = load_manifest(root)
                url = f"s3://bench/c{num_domains}"
                if args.remote:
                    upload(root, url)
                for workers in (int(x) for x in args.workers.split(",")):
                    for rule in args.rules.split(","):
                        # (source, its cache folder): the cold run fills the cache the warm one reads
                        cache = Path(tmp) / f"cache-{num_domains}-{workers}-{rule}"
                        sources = [("local", None)]
                        if args.remote:
                            sources += [("s3 cold cache", cache), ("s3 warm cache", cache)]
                        for source, cache_dir in sources:
                            m = manifest if cache_dir is None else load_manifest(url, cache_dir=cache_dir)
                            if args.check and (workers or cache_dir is not None):
                                check = (
                                    m if cache_dir is None else load_manifest(url, cache_dir=Path(tmp) / "c")
                                )
                                check_same_batches(check, num_domains, workers, rule, args, manifest)
                            r = run(m, num_domains, workers, rule, args)
                            print(
                                f"| {num_domains} | {workers} | {rule} | {source} | "
                                f"{r['tokens_per_s'] / 1e6:.1f} M | {r['ms_per_batch']:.2f} | "
                                f"{r['discarded']} |",
                                flush=True,
                            )
    finally:
        if server is not None:
            server.terminate()


if __name__ == "__main__":
    main()
