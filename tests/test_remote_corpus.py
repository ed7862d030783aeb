"""Corpora on object storage, against real servers in subprocesses: moto's S3 server (through s3fs, over
HTTP) and a plain HTTP file server with faults (tests/fault_http_server.py).

- training from ``s3://`` with a bounded cache gives the local-folder run's losses and proportions bit
  for bit, keeps the cache within its bound, and resumes exactly (also with DataLoader workers);
- a missing object, a corrupted object, a missing manifest, a 403, a connection dropped mid-shard (retried)
  and a full cache disk each end in one clear line;
- ``prepare --out s3://...`` writes a corpus (manifest last) that trains like a local one, also from parts
  on machines without a shared disk.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import prepare_three_domains

from aioli_fast.config import config_from_dict
from aioli_fast.data import load_manifest
from aioli_fast.errors import DataError, ShardMissingError
from aioli_fast.train import train

pytest.importorskip("s3fs")
pytest.importorskip("moto")
pytest.importorskip("aiohttp")

HERE = Path(__file__).resolve().parent
BUCKET = "corpora"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"no server on port {port} after {timeout} s")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server in a subprocess; yields the environment a client needs to reach it."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(port, proc)
        env = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        }
        yield env
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def s3_env(s3, monkeypatch):
    for key, value in s3.items():
        monkeypatch.setenv(key, value)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    return fs


@pytest.fixture(scope="module")
def local_corpus(tmp_path_factory):
    return prepare_three_domains(tmp_path_factory.mktemp("remote")) / "corpus"


def _upload(fs, local: Path, name: str) -> str:
    fs.put(str(local), f"{BUCKET}/{name}", recursive=True)
    return f"s3://{BUCKET}/{name}"


def _config(path: str, out: Path, name: str, **data) -> dict:
    return {
        "data": {"path": path, **data},
        "model": {"preset": "tiny"},
        "mixing": {
            "method": "aioli",
            "measurement": "probe",
            "probe_sequences": 2,
            "round_steps": 6,
            "sweeps": 1,
            "block_steps": 1,
        },
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {
            "steps": 12,
            "batch_size": 6,
            "micro_batch_size": 3,
            "log_every": 1,
            "out_dir": str(out),
            "name": name,
            "progress": False,
        },
        "checkpoint": {"every": 6},
        "eval": {"batch_size": 8, "max_sequences": 6},
    }


def _records(run_dir: Path) -> dict[int, tuple]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {
        r["step"]: (r["loss"], r["proportions"], r["domain_loss"])
        for r in map(json.loads, lines)
        if "loss" in r
    }


def _cache_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_training_from_s3_equals_the_local_run_within_the_cache_bound_and_resumes_exactly(
    s3_env, local_corpus, tmp_path
):
    url = _upload(s3_env, local_corpus, "train-test")
    shard = max(p.stat().st_size for p in local_corpus.rglob("*.tar"))
    cache = tmp_path / "cache"
    bound_gb = 4 * shard / 2**30  # a few shards: far less than the corpus, so eviction runs
    remote = dict(cache_dir=str(cache), cache_gb=bound_gb)
    local_run = train(config_from_dict(_config(str(local_corpus), tmp_path / "runs", "local"))).run_dir
    remote_run = train(config_from_dict(_config(url, tmp_path / "runs", "remote", **remote))).run_dir
    assert _records(remote_run) == _records(local_run)
    assert 0 < _cache_bytes(cache) <= 4 * shard
    total = sum(p.stat().st_size for p in local_corpus.rglob("*.tar"))
    assert total > 4 * shard  # the bound was real

    checkpoint = remote_run / "checkpoints" / "step_00000006"
    cfg = _config(url, tmp_path / "runs", "resumed", num_workers=1, **remote)
    cfg["checkpoint"] = {"every": 6, "resume": str(checkpoint)}
    resumed = train(config_from_dict(cfg)).run_dir
    full = _records(remote_run)
    again = _records(resumed)
    assert sorted(again) == list(range(7, 13))
    assert all(again[step] == full[step] for step in again)


def test_remote_faults_end_in_one_clear_line(s3_env, local_corpus, tmp_path):
    url = _upload(s3_env, local_corpus, "faults")
    cache = dict(cache_dir=str(tmp_path / "cache"), cache_gb=1.0)
    with pytest.raises(DataError, match=r"no corpus manifest at s3://corpora/nowhere/manifest.json: no such"):
        load_manifest(f"s3://{BUCKET}/nowhere", **cache)

    manifest = load_manifest(url, **cache)
    first = manifest.split_shards("ab", "train")[0]
    # a corrupted object of the same size: refused by its sha256, named
    data = bytearray(s3_env.cat_file(f"{BUCKET}/faults/{first.rel}"))
    data[600] ^= 0xFF
    s3_env.pipe_file(f"{BUCKET}/faults/{first.rel}", bytes(data))
    with pytest.raises(DataError, match=rf"{url}/{first.rel}: sha256 .* differs from the manifest's"):
        manifest.read(first)
    assert not manifest.store.local(
        first.rel, first.sha256
    ).exists()  # nothing half-checked kept in the cache

    # a missing object: the start-up check names it
    s3_env.rm(f"{BUCKET}/faults/{manifest.split_shards('cd', 'val')[0].rel}")
    with pytest.raises(ShardMissingError, match=r"shard not found: s3://corpora/faults/cd/val-00000.tar"):
        manifest.check_files(["ab", "cd"], ["train", "val"])

    # a shard larger than the whole cache
    small = load_manifest(url, cache_dir=str(tmp_path / "small"), cache_gb=1e-6)
    with pytest.raises(DataError, match=r"more than the whole cache \(data.cache_gb"):
        small.read(small.split_shards("xyz", "train")[0])


@pytest.fixture
def http_server(local_corpus, tmp_path):
    """Starts tests/fault_http_server.py over the corpus' parent folder: yields (start(**faults) -> URL)."""
    procs = []

    def start(*args: str) -> tuple[str, Path]:
        log = tmp_path / f"requests-{len(procs)}.log"
        proc = subprocess.Popen(
            [
                sys.executable,
                str(HERE / "fault_http_server.py"),
                str(local_corpus.parent),
                "--log",
                str(log),
                *args,
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        port = int(proc.stdout.readline())
        _wait_for(port, proc)
        return f"http://127.0.0.1:{port}/{local_corpus.name}", log

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=10)


def test_http_reads_retry_a_connection_dropped_mid_shard(http_server, tmp_path):
    url, log = http_server("--drop", "2")
    manifest = load_manifest(url, cache_dir=str(tmp_path / "cache"), cache_gb=1.0)
    shard = manifest.split_shards("ab", "train")[0]
    manifest.store.backoff_s = 0.01
    keys, tokens = manifest.read(shard)
    assert tokens.shape == (shard.sequences, manifest.sample_len)
    gets = log.read_text().splitlines().count(f"/corpus/{shard.rel}")
    assert gets == 3  # two dropped halfway, the third whole

    url, _ = http_server("--drop", "100")
    manifest = load_manifest(url, cache_dir=str(tmp_path / "cache2"), cache_gb=1.0)
    manifest.store.backoff_s = 0.01
    with pytest.raises(DataError, match=r"/corpus/ab/train-00000.tar: failed 5 times"):
        manifest.read(manifest.split_shards("ab", "train")[0])


def test_http_refusal_and_a_full_cache_disk(http_server, tmp_path):
    url, _ = http_server("--forbid", "/corpus/cd/")
    manifest = load_manifest(url, cache_dir=str(tmp_path / "cache"), cache_gb=1.0)
    with pytest.raises(DataError, match=r"cd/train-00000.tar: access denied \(HTTP 403\)"):
        manifest.read(manifest.split_shards("cd", "train")[0])

    # a cache disk that cannot take the shard: the file-size limit of a real process (EFBIG)
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        "from aioli_fast.data import load_manifest\n"
        "from aioli_fast.errors import DataError\n"
        f"m = load_manifest({url!r}, cache_dir={str(tmp_path / 'full')!r}, cache_gb=1.0)\n"
        "try:\n"
        "    m.read(m.split_shards('ab', 'train')[0])\n"
        "except DataError as exc:\n"
        "    print(exc); sys.exit(3)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "cannot write the local cache (File too large)" in proc.stdout
    assert len(proc.stdout.strip().splitlines()) == 1


def test_verify_checks_a_remote_corpus(http_server, tmp_path):
    url, _ = http_server()
    env = {**os.environ, "AIOLI_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "aioli_fast", "verify", url, "--quiet"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not any((tmp_path / "cache").rglob("*.tar"))  # verify's downloads are not left in the cache


def _write_texts(root: Path) -> dict[str, list[str]]:
    import numpy as np

    rng = np.random.default_rng(0)
    domains = {}
    for name, alphabet in {"ab": "ab", "cd": "cdc", "xyz": "xyz"}.items():
        folder = root / "raw" / name
        folder.mkdir(parents=True)
        for i in range(40):
            (folder / f"{i:03d}.txt").write_text(
                "".join(rng.choice(list(alphabet), size=int(rng.integers(10, 60))))
            )
        domains[name] = [str(folder)]
    return domains


def test_prepare_writes_to_s3_manifest_last_also_from_parts_without_a_shared_disk(
    s3_env, tmp_path, monkeypatch
):
    from aioli_fast.data.prepare import combine, prepare

    domains = _write_texts(tmp_path)
    common = dict(
        seq_len=16, val_fraction=0.2, test_fraction=0.1, shard_sequences=8, progress=False, block_bytes=256
    )
    local = prepare(domains, tmp_path / "local", **common)
    url = f"s3://{BUCKET}/prepared"
    monkeypatch.setenv("AIOLI_CACHE_DIR", str(tmp_path / "machine-a"))
    remote = prepare(domains, url, **common)
    assert remote["domains"] == local["domains"]
    assert s3_env.cat_file(f"{BUCKET}/prepared/manifest.json")
    with pytest.raises(Exception, match="already holds a prepared corpus"):
        prepare(domains, url, **common)

    # three parts, each on its own "machine" (its own cache and staging folder): no shared disk
    parts_url = f"s3://{BUCKET}/from-parts"
    results = []
    for i in range(3):
        monkeypatch.setenv("AIOLI_CACHE_DIR", str(tmp_path / f"machine-{i}"))
        results.append(prepare(domains, parts_url, part=(i, 3), **common))
        if i < 2:  # no manifest before the last part: a reader never sees half a corpus
            assert results[-1] is None and not s3_env.exists(f"{BUCKET}/from-parts/manifest.json")
    assert results[-1]["domains"] == local["domains"]
    assert not s3_env.exists(f"{BUCKET}/from-parts/.aioli-parts")
    assert combine(parts_url, progress=False)["domains"] == local["domains"]  # already combined: the same
    manifest = load_manifest(parts_url, cache_dir=str(tmp_path / "read"), cache_gb=1.0)
    for domain in manifest.domains:
        for shard in manifest.split_shards(domain, "train"):
            manifest.read(shard)  # every shard there, with its sha256


def test_the_adapters_mix_a_remote_corpus_as_a_local_one(http_server, local_corpus, tmp_path, monkeypatch):
    from aioli_fast.integrations.common import OnlineMixing

    url, _ = http_server()
    monkeypatch.setenv("AIOLI_CACHE_DIR", str(tmp_path / "cache"))
    batches = []
    for corpus in (str(local_corpus), url):
        mixing = OnlineMixing(corpus, step_rows=6, device="cpu", mixer="stratified", seed=3)
        batches.append([mixing.draw(step, lambda ids: None).input_ids.clone() for step in range(4)])
        mixing.close()
    assert all(a.equal(b) for a, b in zip(*batches))


def test_a_corpus_prepared_again_under_the_same_url_never_reads_the_old_cache(s3_env, tmp_path, monkeypatch):
    from aioli_fast.data.prepare import prepare

    domains = _write_texts(tmp_path)
    common = dict(seq_len=16, val_fraction=0.2, test_fraction=0.1, shard_sequences=8, progress=False)
    url = f"s3://{BUCKET}/again"
    monkeypatch.setenv("AIOLI_CACHE_DIR", str(tmp_path / "writer"))
    prepare(domains, url, **common)
    cache = dict(cache_dir=str(tmp_path / "reader"), cache_gb=1.0)
    old = load_manifest(url, **cache)
    shard = old.split_shards("ab", "train")[0]
    _, old_tokens = old.read(shard)  # cached now
    prepare(domains, url, seed=1, overwrite=True, **common)  # other documents in each shard, same names
    new = load_manifest(url, **cache)
    renewed = new.split_shards("ab", "train")[0]
    assert renewed.rel == shard.rel and renewed.sha256 != shard.sha256
    _, new_tokens = new.read(renewed)
    local = prepare(domains, tmp_path / "local-again", seed=1, **common)
    assert local["domains"][0]["splits"]["train"]["shards"][0]["sha256"] == renewed.sha256
    assert not (new_tokens.shape == old_tokens.shape and (new_tokens == old_tokens).all())


def test_parts_on_one_machine_keep_their_own_staging(s3_env, tmp_path, monkeypatch):
    from aioli_fast.data.prepare import prepare

    domains = _write_texts(tmp_path)
    common = dict(
        seq_len=16, val_fraction=0.2, test_fraction=0.1, shard_sequences=8, progress=False, block_bytes=256
    )
    monkeypatch.setenv("AIOLI_CACHE_DIR", str(tmp_path / "one-machine"))
    url = f"s3://{BUCKET}/same-machine"
    results = [prepare(domains, url, part=(i, 2), **common) for i in range(2)]
    assert results[0] is None and results[1] is not None
    assert not any((tmp_path / "one-machine").glob("prepare-*"))  # each part cleaned only its own folder
