"""The shared loop: ``MixingDriver`` (the mixer around a step), ``MixingOptions`` (what every loop is told)
and ``DomainSums`` (per-domain sums and counts), on a real prepared corpus."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import prepare_alphabet_corpus

from aioli_fast.config import RunConfig
from aioli_fast.data import load_manifest
from aioli_fast.driver import MixingDriver
from aioli_fast.errors import AioliError, ConfigError
from aioli_fast.mixing import DomainSums, build_mixer
from aioli_fast.model import GPT, preset_config
from aioli_fast.options import MixingOptions

ALPHABETS = {"a": "abc", "b": "def", "c": "ghi"}
LEARN = dict(learn_fraction=1.0, max_learn_share=1.0, round_steps=8, sweeps=1, block_steps=2, prior_steps=2)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return prepare_alphabet_corpus(tmp_path_factory.mktemp("driver"), ALPHABETS, 12, val_fraction=0.3)


def test_options_have_one_set_of_defaults_and_name_a_wrong_keyword():
    cfg = RunConfig()
    assert cfg.data.assignment == MixingOptions.assignment == "categorical"
    assert cfg.mixing.probe_sequences == MixingOptions.probe_sequences == 16
    assert (cfg.data.num_workers, cfg.data.prefetch_factor) == (MixingOptions.num_workers, 2)
    given = MixingOptions.from_keywords({"seed": 3, "mixer_options": None}, "X", seed=1, num_workers=2)
    assert (given.seed, given.num_workers, given.mixer_options, given.mixer) == (3, 2, {}, "aioli")
    with pytest.raises(
        ConfigError, match="X got an unexpected keyword 'probe_sequence'; did you mean 'probe_sequences'"
    ):
        MixingOptions.from_keywords({"probe_sequence": 4}, "X")


def test_domain_sums_add_reduce_and_unpack():
    sums = DomainSums.zeros(3)
    sums.add(torch.tensor([2.0, 0.0, 9.0]), torch.tensor([1, 0, 3]))
    sums.add(torch.tensor([4.0, 0.0, 0.0]), torch.tensor([1, 0, 0]))
    loss_sum, count = sums.reduced()  # alone: a copy
    assert loss_sum.tolist() == [6.0, 0.0, 9.0] and count.tolist() == [2.0, 0.0, 3.0]
    losses = sums.losses()
    assert losses[0].item() == 3.0 and torch.isnan(losses[1]) and losses[2].item() == 3.0
    assert sums.buffer.shape == (2, 3) and sums.zero_().buffer.abs().sum() == 0
    with pytest.raises(ValueError, match=r"\[2, D\]"):
        DomainSums(torch.zeros(3))


def _driver(corpus, **mixer_options):
    manifest = load_manifest(corpus)
    mixer = build_mixer("aioli", list(manifest.domains), **mixer_options)
    options = MixingOptions(seed=5, probe_sequences=2)
    return MixingDriver.for_corpus(manifest, mixer, options, step_rows=12)


def test_the_driver_hands_the_stream_learnparams_blocks_and_measures_when_due(corpus):
    driver = _driver(corpus, measurement="probe", **LEARN)
    manifest = load_manifest(corpus)
    model = GPT(preset_config("tiny", vocab_size=320, max_seq_len=manifest.seq_len))
    counts = []
    for step in range(10):
        batch = driver.draw(step, model)
        counts.append(np.bincount(batch.domain_ids.numpy(), minlength=3).tolist())
        driver.observe(step, torch.ones(3), torch.full((3,), 10.0))
    # prior 2 steps, then blocks of 2 steps on each domain: exact counts of its smoothed one-hot mixture
    # (one_hot_factor 0.5 for 3 domains: 6 of 12 sequences, 3 of each other domain)
    assert driver.mixer.one_hot_factor == 0.5
    for n, d in enumerate(driver.mixer.order(0)):
        for step in (2 + 2 * n, 3 + 2 * n):
            assert counts[step] == [6 if i == d else 3 for i in range(3)], (step, counts)
    assert driver.scheduled_until == 2 + 6
    # a measurement before the first block and after each block: 4, each one probe forward
    assert driver.measurements == 4
    assert driver.take_window().count.tolist() == [100.0] * 3 and driver.window.count.sum() == 0
    with pytest.raises(AioliError, match="the mixture stream is at step 10 but training at step 3"):
        driver.draw(3, model)
    driver.close()


def test_driver_state_resumes_the_same_batches(corpus):
    first = _driver(corpus, measurement="train", **LEARN)
    for step in range(5):
        first.draw(step)
        first.observe(step, torch.ones(3), torch.full((3,), 10.0))
    state = first.state_dict()
    ahead = [first.draw(step).domain_ids.tolist() for step in range(5, 9)]
    second = _driver(corpus, measurement="train", **LEARN)
    second.load_state_dict(state)
    assert [second.draw(step).domain_ids.tolist() for step in range(5, 9)] == ahead
    first.close()
    second.close()


def test_a_driver_without_a_stream_or_a_measurement_says_so(corpus):
    mixer = build_mixer("aioli", ["a", "b"], measurement="probe", **LEARN)
    alone = MixingDriver(mixer, None)
    with pytest.raises(AioliError, match="no stream to draw from"):
        alone.draw(0)
    with pytest.raises(AioliError, match="asks for a 'probe' measurement at step 2, but this loop gave"):
        for step in range(3):
            alone.before_step(step)


def test_the_probe_lives_on_the_device_in_training_micro_batches(corpus):
    from aioli_fast.evaluation import Measurement

    manifest = load_manifest(corpus)
    model = GPT(preset_config("tiny", vocab_size=320, max_seq_len=manifest.seq_len))
    common = dict(probe_sequences=3, batch_size=8, max_sequences=None, device=torch.device("cpu"))
    whole = Measurement("probe", manifest, list(ALPHABETS), "val", **common)
    micro = Measurement("probe", manifest, list(ALPHABETS), "val", micro_rows=2, **common)
    assert [len(ids) for _, ids in whole.batches()] == [9]
    assert [len(ids) for _, ids in micro.batches()] == [2, 2, 2, 2, 1]  # 3 domains x 3 sequences
    assert all(isinstance(t, torch.Tensor) for batch in micro.batches() for t in batch)
    a, b = whole(model), micro(model)
    torch.testing.assert_close(a.buffer, b.buffer, rtol=1e-5, atol=1e-5)
    assert b.count.tolist() == [3 * (manifest.seq_len)] * 3
    # the driver gives the probe its micro-batch size
    mixer = build_mixer("aioli", list(manifest.domains), measurement="probe", **LEARN)
    options = MixingOptions(probe_sequences=3)
    driver = MixingDriver.for_corpus(manifest, mixer, options, step_rows=12, micro_rows=4)
    assert [len(ids) for _, ids in driver.measure.batches()] == [4, 4, 1]
    driver.close()
