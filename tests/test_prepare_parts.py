"""Preparation at scale: blocks, parts on several processes, resumption after SIGKILL, bounded memory.

- a corpus prepared as 4 parts by 4 concurrent processes and combined equals the one-process corpus
  byte for byte (shards and manifest);
- the part comes from the launchers' environment variables (Slurm arrays, torchrun, mpirun);
- combining refuses missing parts and parts prepared with other settings, in one line;
- the byte ranges of a large JSON-lines file read every line exactly once;
- a SIGKILL part-way through a domain, then the same command, gives the uninterrupted corpus;
- peak memory does not grow with the size of a domain.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import run_cli

from aioli_fast.data.blocks import Block, block_documents, plan_blocks
from aioli_fast.data.prepare import _load_state, part_from_environment, prepare
from aioli_fast.errors import AioliError

ROOT = Path(__file__).resolve().parents[1]
# fixed text, so that the corpora (and which documents the content hash puts in val and test) do not
# change when the package's own files do
_SYLLABLES = ["ka", "lo", "mi", "ne", "tu", "ra", "si", "po", "de", "fu", "ga", "hi"]
WORDS = [a + b + c for a in _SYLLABLES for b in _SYLLABLES[::-1] for c in ("", "n", "s")]
_SOURCE = "".join(
    f"def {WORDS[i % 432]}_{i}(x, y={i % 7}):\n    return {WORDS[(i * 7) % 432]}(x) + y * {i % 13}\n\n"
    for i in range(400)
)


def write_raw(root: Path, documents: int = 1500, files: int = 40) -> dict[str, list[str]]:
    """Two domains: one JSON-lines file of ``documents`` documents, and ``files`` text files."""
    (root / "web").mkdir(parents=True)
    (root / "code").mkdir()
    with (root / "web" / "pages.jsonl").open("w", encoding="utf-8") as f:
        for i in range(documents):
            start = (i * 37) % len(WORDS)
            words = WORDS[start : start + 20 + (i * 13) % 150]
            f.write(json.dumps({"text": f"page {i}: " + " ".join(words)}) + "\n")
    source = _SOURCE
    for i in range(files):
        (root / "code" / f"m{i:03d}.py").write_text(source[: 2000 + 400 * i], encoding="utf-8")
    return {"web": [str(root / "web")], "code": [str(root / "code")]}


KW = dict(seq_len=32, shard_sequences=64, block_bytes=40_000, progress=False, workers=1)
ARGS = ["--seq-len", "32", "--shard-sequences", "64", "--block-mb", str(40_000 / 2**20), "--workers", "1"]


def corpus_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _cli_args(domains: dict[str, list[str]], out: Path) -> list[str]:
    args = ["prepare", "--out", str(out), "--quiet", *ARGS]
    for name, paths in domains.items():
        args += ["--domain", f"{name}={paths[0]}"]
    return args


def test_four_parts_on_four_processes_equal_the_one_process_corpus(tmp_path):
    domains = write_raw(tmp_path / "raw")
    single = prepare(domains, tmp_path / "single", **KW)
    blocks = sum(len(plan_blocks(n, [p for p in Path(d[0]).iterdir()], 40_000)) for n, d in domains.items())
    assert blocks >= 8  # every part has blocks of both domains
    cmd = [sys.executable, "-m", "aioli_fast", *_cli_args(domains, tmp_path / "parts")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([*cmd, "--part", f"{i}/4"], env=env, stderr=subprocess.PIPE, text=True)
        for i in range(4)
    ]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], errors
    assert corpus_files(tmp_path / "parts") == corpus_files(tmp_path / "single")
    assert run_cli("verify", str(tmp_path / "parts"), "--quiet").returncode == 0  # several blocks a domain
    manifest = json.loads((tmp_path / "parts" / "manifest.json").read_text())
    assert manifest == single
    assert not (tmp_path / ".parts.partial").exists()


def test_the_part_comes_from_the_launchers_environment():
    assert part_from_environment({}) is None
    slurm = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "8", "SLURM_ARRAY_TASK_MIN": "1"}
    assert part_from_environment(slurm) == (2, 8, "a Slurm job array")  # --array=1-8
    stepped = {
        **slurm,
        "SLURM_ARRAY_TASK_ID": "5",
        "SLURM_ARRAY_TASK_STEP": "2",
        "SLURM_ARRAY_TASK_COUNT": "4",
    }
    assert part_from_environment(stepped) == (2, 4, "a Slurm job array")  # --array=1-7:2
    assert part_from_environment({"RANK": "1", "WORLD_SIZE": "2"}) == (1, 2, "torchrun")
    assert (
        part_from_environment({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4"})[2]
        == "mpirun (Open MPI)"
    )
    with pytest.raises(AioliError, match="does not name one of 2 parts"):
        part_from_environment({"RANK": "2", "WORLD_SIZE": "2"})


def test_the_command_takes_its_part_from_the_launcher_and_the_function_does_not(tmp_path, monkeypatch):
    domains = write_raw(tmp_path / "raw", documents=400, files=10)
    args = _cli_args(domains, tmp_path / "corpus")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": "1", "WORLD_SIZE": "2"}
    args.remove("--quiet")
    result = subprocess.run(
        [sys.executable, "-m", "aioli_fast", *args], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "prepare: part 1/2 (from torchrun's environment): blocks 1, 3, ... of the corpus" in result.stderr
    assert (
        "waiting for part(s) 0 of 2" in result.stderr and not (tmp_path / "corpus" / "manifest.json").exists()
    )
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    manifest = prepare(domains, tmp_path / "whole", **KW)  # a library call prepares the whole corpus
    assert manifest is not None and (tmp_path / "whole" / "manifest.json").is_file()


def test_combining_refuses_missing_and_mismatched_parts(tmp_path):
    domains = write_raw(tmp_path / "raw", documents=400, files=10)
    out = tmp_path / "corpus"
    assert prepare(domains, out, **KW, part=(0, 2)) is None  # part 1 has not run
    result = run_cli("combine", str(out))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "aioli-fast combine: error: part(s) 1 of 2 are not finished: run them (--part I/2), then combine"
    )
    args = _cli_args(domains, out)
    args[args.index("--seq-len") + 1] = "48"  # another setting than part 0's
    result = run_cli(*args, "--part", "1/2")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    staging = tmp_path / ".corpus.partial"
    assert result.stderr.strip() == (
        "aioli-fast prepare: error: part 0 of 2 (.prepare-state-part00000-of-00002.json) was prepared with "
        f"other settings (seq_len): run every part with the same command, or remove {staging} to start over"
    )
    assert not (out / "manifest.json").exists()
    # the same folder prepared again in one part: the abandoned parts' states are dropped
    manifest = prepare(domains, out, **KW)
    assert manifest == prepare(domains, tmp_path / "single", **KW)
    assert not (tmp_path / ".corpus.partial").exists()
    listed = {sh["path"] for d in manifest["domains"] for sp in d["splits"].values() for sh in sp["shards"]}
    assert {str(p.relative_to(out)) for p in out.rglob("*.tar")} == listed  # nothing of the parts left
    with pytest.raises(AioliError, match="part must look like I/N"):
        prepare(domains, out, **KW, part="half")
    with pytest.raises(AioliError, match="part 2/2: N must be at least 1 and I in 0..N-1"):
        prepare(domains, out, **KW, part=(2, 2))


@pytest.mark.parametrize("block_bytes", [1, 97, 1000, 4096, 10**9])
def test_the_byte_ranges_of_a_json_lines_file_read_every_line_once(tmp_path, block_bytes):
    path = tmp_path / "d.jsonl"
    texts = [f"doc {i} " + "x" * (i % 50) for i in range(300)]
    lines = [json.dumps({"text": t}) for t in texts]
    lines.insert(5, "")  # blank lines are skipped
    path.write_text("\ufeff" + "\n".join(lines) + "\n", encoding="utf-8")  # with a byte-order mark
    blocks = plan_blocks("d", [path], block_bytes)
    assert all(isinstance(b, Block) for b in blocks)
    assert len(blocks) == (1 if block_bytes == 10**9 else -(-path.stat().st_size // block_bytes))
    read = [text for b in blocks for text, _ in block_documents(b, "text")]
    assert read == texts


def _state_blocks(staging: Path) -> int:
    return len(_load_state(staging / ".prepare-state.json").get("blocks", {}))


def test_a_sigkill_mid_domain_then_the_same_command_gives_the_uninterrupted_corpus(tmp_path):
    domains = write_raw(tmp_path / "raw", documents=4000, files=40)
    reference = tmp_path / "reference"
    prepare(domains, reference, **{**KW, "block_bytes": 20_000})
    out = tmp_path / "corpus"
    args = _cli_args(domains, out)
    args[args.index("--block-mb") + 1] = str(20_000 / 2**20)
    cmd = [sys.executable, "-m", "aioli_fast", *args]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})
    staging = tmp_path / ".corpus.partial"
    deadline = time.monotonic() + 120
    while _state_blocks(staging) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "prepare finished before it could be killed: give it more input"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() or not (out / "manifest.json").exists()
    done = _state_blocks(staging)
    assert done >= 3
    result = run_cli(*[a for a in args if a != "--quiet"])
    assert result.returncode == 0, result.stderr
    assert f"prepare: {done} of" in result.stderr  # the finished blocks were reused
    assert corpus_files(out) == corpus_files(reference)


PEAK_RSS = """
import resource, sys
from aioli_fast.data.prepare import prepare
prepare({"web": [sys.argv[1]]}, sys.argv[2], seq_len=128, block_bytes=1 << 20, workers=1, progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _peak_rss_kb(tmp_path: Path, megabytes: int) -> int:
    raw = tmp_path / f"raw{megabytes}"
    raw.mkdir()
    text = " ".join(WORDS[:300])
    with (raw / "pages.jsonl").open("w", encoding="utf-8") as f:
        size, i = 0, 0
        while size < megabytes * 2**20:
            line = json.dumps({"text": f"page {i}: {text}"}) + "\n"  # distinct documents
            f.write(line)
            size, i = size + len(line), i + 1
    out = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, str(raw), str(tmp_path / f"corpus{megabytes}")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip())


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_domain(tmp_path):
    small, large = _peak_rss_kb(tmp_path, 4), _peak_rss_kb(tmp_path, 24)
    # a whole-domain pass held ~30 bytes per token: 20 MB more of text would add ~600 MB
    assert large < 1.2 * small and large - small < 100_000, (small, large)


def test_a_part_that_does_not_belong_changes_nothing(tmp_path):
    """Another number of parts, the --domain flags in another order, or other inputs: refused before the
    part touches the staging folder, so the parts already there stay (they used to be deleted, or to end
    in a KeyError at combine)."""
    domains = write_raw(tmp_path / "raw", documents=400, files=10)
    out = tmp_path / "corpus"
    staging = tmp_path / ".corpus.partial"
    assert prepare(domains, out, **KW, part=(0, 2)) is None
    before = corpus_files(staging)
    with pytest.raises(AioliError, match=r"holds part 0 of 2 .*, prepared as 2 parts; this part is of 3"):
        prepare(domains, out, **KW, part=(1, 3))
    reordered = {"code": domains["code"], "web": domains["web"]}
    with pytest.raises(AioliError, match="has the domains in the order web, code, this part code, web"):
        prepare(reordered, out, **KW, part=(1, 2))
    (tmp_path / "raw" / "code" / "extra.py").write_text("print('another input')\n")
    with pytest.raises(AioliError, match=r"was prepared from other inputs for domain\(s\) code"):
        prepare(domains, out, **KW, part=(1, 2))
    assert corpus_files(staging) == before  # part 0's state and shards untouched
    (tmp_path / "raw" / "code" / "extra.py").unlink()
    prepare(domains, out, **KW, part=(1, 2))  # the right part completes the corpus
    assert (
        prepare(domains, tmp_path / "single", **KW)["domains"]
        == json.loads((out / "manifest.json").read_text())["domains"]
    )


def test_combines_racing_the_last_part_end_in_one_corpus_and_one_line_each(tmp_path):
    """The last part's own combine and hand-run ones at the same time: one writes the corpus, every
    other one exits 0 (combined already) or 2 with one line, and nothing stray is left in the corpus."""
    domains = write_raw(tmp_path / "raw", documents=400, files=10)
    out = tmp_path / "corpus"
    assert prepare(domains, out, **KW, part=(0, 2)) is None
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    last = subprocess.Popen(
        [sys.executable, "-m", "aioli_fast", *_cli_args(domains, out)[0:], "--part", "1/2"],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    combines = []
    while last.poll() is None or len(combines) < 6:
        cmd = [sys.executable, "-m", "aioli_fast", "combine", str(out), "--quiet"]
        combines.append(
            subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        )
        time.sleep(0.05)
    results = [(p.wait(timeout=300), p.stderr.read()) for p in [last, *combines]]
    for code, err in results:
        assert "Traceback" not in err, err
        assert code == 0 or (code == 2 and len(err.strip().splitlines()) == 1), err
    assert (out / "manifest.json").exists(), results
    assert json.loads((out / "manifest.json").read_text()) == prepare(domains, tmp_path / "single", **KW)
    assert not list(out.rglob("*.tmp")) and not list(tmp_path.glob("*.lock")), list(out.rglob("*.tmp"))


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc to find the pool's workers")
def test_the_pool_workers_of_a_killed_prepare_end_quietly(tmp_path):
    """kill -9 of `prepare --workers 2`: its pool workers end with it, without a BrokenPipeError
    traceback each; the same command then gives the uninterrupted corpus (as with one worker)."""
    domains = write_raw(tmp_path / "raw", documents=4000, files=40)
    out = tmp_path / "corpus"
    args = _cli_args(domains, out)
    args[args.index("--block-mb") + 1] = str(20_000 / 2**20)
    args[args.index("--workers") + 1] = "2"
    cmd = [sys.executable, "-m", "aioli_fast", *args]
    proc = subprocess.Popen(
        cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    deadline = time.monotonic() + 120
    while (
        _state_blocks(tmp_path / ".corpus.partial") < 2
        and proc.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.005)
    workers = _children(proc.pid)
    assert proc.poll() is None and len(workers) >= 2, "prepare finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{w}").exists() for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(Path(f"/proc/{w}").exists() for w in workers), "the pool's workers outlived prepare"
    err = proc.stderr.read()  # the workers' stderr is this pipe too: it closes when the last one ends
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    reference = tmp_path / "reference"
    assert corpus_files(out) == corpus_files(
        prepare(domains, reference, **{**KW, "block_bytes": 20_000}) and reference
    )
