"""The mixer registry and the fixed mixers (``stratified``, ``static``).

Checks the proportions each mixer starts from (values, dtype, device, order), every configuration error
and its message, the registry's contract (one name, one class; custom mixers are found), and the state
round trip that a resumed run relies on.
"""

from __future__ import annotations

import math

import pytest
import torch

from aioli_fast.errors import ConfigError
from aioli_fast.mixing import MIXERS, Mixer, build_mixer, register_mixer
from aioli_fast.mixing.static import StaticMixer, StratifiedMixer

DOMAINS = ["a", "b"]


def test_builtin_mixers_are_registered_under_their_names():
    assert MIXERS["stratified"] is StratifiedMixer and StratifiedMixer.name == "stratified"
    assert MIXERS["static"] is StaticMixer and StaticMixer.name == "static"


@pytest.mark.parametrize("num_domains", [1, 3, 7], ids=["D1", "D3", "D7"])
@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"), "meta"], ids=["str", "device", "meta"])
def test_stratified_is_uniform_fp32_on_the_requested_device(num_domains, device):
    domains = [f"d{i}" for i in range(num_domains)]
    mixer = build_mixer("stratified", domains, device=device)
    assert isinstance(mixer, StratifiedMixer)
    assert mixer.domains == domains and mixer.num_domains == num_domains
    p_D = mixer.proportions(0)
    assert p_D.shape == (num_domains,) and p_D.dtype == torch.float32
    assert p_D.device == torch.device(device)
    if p_D.device.type != "meta":  # meta tensors have no values
        torch.testing.assert_close(p_D, torch.full((num_domains,), 1.0 / num_domains))
        assert float(p_D.sum()) == pytest.approx(1.0, abs=1e-6)


def test_stratified_default_device_is_cpu():
    assert build_mixer("stratified", DOMAINS).proportions(0).device == torch.device("cpu")


@pytest.mark.gpu
def test_fixed_mixers_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    for mixer in (
        build_mixer("stratified", DOMAINS, device="cuda"),
        build_mixer("static", DOMAINS, device="cuda", proportions={"a": 3, "b": 1}),
    ):
        p_D = mixer.proportions(0)
        assert p_D.is_cuda and p_D.dtype == torch.float32
        assert float(p_D.sum()) == pytest.approx(1.0, abs=1e-6)


def test_static_normalises_the_weights():
    mixer = build_mixer("static", DOMAINS, proportions={"a": 3, "b": 1})
    assert isinstance(mixer, StaticMixer)
    p_D = mixer.proportions(0)
    assert p_D.dtype == torch.float32 and p_D.device == torch.device("cpu")
    assert p_D.tolist() == pytest.approx([0.75, 0.25])


def test_static_follows_the_domain_order_not_the_mapping_order():
    weights = {"c": 1.0, "a": 2.0, "b": 5.0}  # a mapping in another order than the domains
    mixer = build_mixer("static", ["a", "b", "c"], proportions=weights)
    assert mixer.proportions(0).tolist() == pytest.approx([0.25, 0.625, 0.125])
    mixer = build_mixer("static", ["c", "b", "a"], proportions=weights)
    assert mixer.proportions(0).tolist() == pytest.approx([0.125, 0.625, 0.25])


def test_static_allows_zero_weights_and_ints():
    mixer = build_mixer("static", ["a", "b", "c"], proportions={"a": 0, "b": 2, "c": 0.0})
    assert mixer.proportions(0).tolist() == [0.0, 1.0, 0.0]


def test_static_on_the_meta_device():
    p_D = build_mixer("static", DOMAINS, device="meta", proportions={"a": 1, "b": 1}).proportions(0)
    assert p_D.device.type == "meta" and p_D.shape == (2,) and p_D.dtype == torch.float32


@pytest.mark.parametrize(
    "method, proportions, message",
    [
        ("statc", None, "unknown mixing.method 'statc'; did you mean 'static'?"),
        ("stratifed", None, "unknown mixing.method 'stratifed'; did you mean 'stratified'?"),
        ("static", None, "mixing.method 'static' needs mixing.proportions (domain -> weight)"),
        ("static", {}, "mixing.method 'static' needs mixing.proportions"),
        ("static", {"a": 1, "b": 1, "c": 1}, "mixing.proportions names unknown domain(s) ['c']"),
        ("static", {"a": 1}, "mixing.proportions gives no weight for domain(s) ['b']"),
        ("static", {"a": 1, "b": -0.5}, "mixing.proportions must be finite, >= 0 and not all 0"),
        ("static", {"a": 1, "b": math.nan}, "mixing.proportions must be finite, >= 0 and not all 0"),
        ("static", {"a": 1, "b": math.inf}, "mixing.proportions must be finite, >= 0 and not all 0"),
        ("static", {"a": 0, "b": 0.0}, "mixing.proportions must be finite, >= 0 and not all 0"),
        ("stratified", {"a": 1, "b": 1}, "mixing.method 'stratified' takes no mixing.proportions"),
    ],
    ids=[
        "unknown-near-static",
        "unknown-near-stratified",
        "static-without-proportions",
        "static-empty-proportions",
        "static-unknown-domain",
        "static-missing-domain",
        "static-negative",
        "static-nan",
        "static-inf",
        "static-all-zero",
        "stratified-with-proportions",
    ],
)
def test_bad_mixer_config_raises_config_error(method, proportions, message):
    with pytest.raises(ConfigError) as info:
        build_mixer(method, DOMAINS, proportions=proportions)
    assert message in str(info.value)


def test_unknown_method_lists_the_available_ones_without_a_far_fetched_suggestion():
    with pytest.raises(ConfigError) as info:
        build_mixer("zzzzzz", DOMAINS)
    text = str(info.value)
    assert "did you mean" not in text
    assert f"(available: {', '.join(sorted(MIXERS))})" in text
    assert "static" in text and "stratified" in text


def test_a_mixer_needs_domains():
    with pytest.raises(ConfigError, match="at least one domain"):
        build_mixer("stratified", [])


def test_register_mixer_rejects_a_duplicate_name():
    class Impostor(Mixer):
        pass

    with pytest.raises(ValueError, match="mixer 'static' is registered twice"):
        register_mixer("static")(Impostor)
    assert MIXERS["static"] is StaticMixer  # the first registration stands
    assert Impostor.name == "base"  # and the rejected class was not renamed


@pytest.fixture
def custom_mixer_name():
    name = "test-alternating"
    assert name not in MIXERS
    yield name
    MIXERS.pop(name, None)


def test_a_registered_custom_mixer_is_built_by_name(custom_mixer_name):
    @register_mixer(custom_mixer_name)
    class Alternating(Mixer):
        """All weight on domain ``step % D``; counts the micro-batches it observes."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.observed = 0

        def proportions(self, step):
            p_D = torch.zeros(self.num_domains, device=self.device)
            p_D[step % self.num_domains] = 1.0
            return p_D

        def observe(self, step, loss_sum_D, count_D):
            self.observed += 1

    assert Alternating.name == custom_mixer_name and MIXERS[custom_mixer_name] is Alternating
    mixer = build_mixer(custom_mixer_name, ["x", "y", "z"])
    assert isinstance(mixer, Alternating)
    assert mixer.proportions(4).tolist() == [0.0, 1.0, 0.0]
    mixer.observe(4, torch.ones(3), torch.ones(3))
    assert mixer.observed == 1
    # the base class' initial_proportions still applies: a method without proportions rejects them
    with pytest.raises(ConfigError, match=f"mixing.method '{custom_mixer_name}' takes no mixing.proportions"):
        build_mixer(custom_mixer_name, ["x", "y"], proportions={"x": 1, "y": 1})


def test_state_dict_round_trip_restores_the_proportions():
    source = build_mixer("static", DOMAINS, proportions={"a": 3, "b": 1})
    state = source.state_dict()
    assert set(state) == {"method", "domains", "proportions"}
    fresh = build_mixer("static", DOMAINS, proportions={"a": 1, "b": 1})
    assert fresh.proportions(0).tolist() == [0.5, 0.5]
    fresh.load_state_dict(state)
    p_D = fresh.proportions(0)
    assert p_D.tolist() == pytest.approx([0.75, 0.25])
    assert p_D.dtype == torch.float32 and p_D.device == torch.device("cpu")

    stratified = build_mixer("stratified", DOMAINS)
    with pytest.raises(
        ConfigError, match="mixer state is from mixing.method 'static', this run uses 'stratified'"
    ):
        stratified.load_state_dict(state)
    assert stratified.proportions(0).tolist() == [0.5, 0.5]
    with pytest.raises(ConfigError, match=r"mixer state is for domains \['b', 'a'\]"):
        fresh.load_state_dict({**state, "domains": ["b", "a"]})


def test_state_dict_is_a_copy():
    mixer = build_mixer("static", DOMAINS, proportions={"a": 3, "b": 1})
    mixer.state_dict()["proportions"].zero_()
    assert mixer.proportions(0).tolist() == pytest.approx([0.75, 0.25])


def test_load_state_dict_converts_dtype_and_device():
    mixer = build_mixer("stratified", DOMAINS, device="meta")
    mixer.load_state_dict({"proportions": torch.tensor([0.25, 0.75], dtype=torch.float64)})
    p_D = mixer.proportions(0)
    assert p_D.device.type == "meta" and p_D.dtype == torch.float32


def test_load_state_dict_does_not_alias_the_given_tensor():
    state = {"proportions": torch.tensor([0.25, 0.75])}
    mixer = build_mixer("stratified", DOMAINS)
    mixer.load_state_dict(state)
    state["proportions"].fill_(0.5)
    assert mixer.proportions(0).tolist() == [0.25, 0.75]


@pytest.mark.parametrize("size", [1, 3], ids=["fewer", "more"])
def test_load_state_dict_with_another_number_of_domains_raises(size):
    mixer = build_mixer("stratified", DOMAINS)
    with pytest.raises(ConfigError) as info:
        mixer.load_state_dict({"proportions": torch.full((size,), 1.0 / size)})
    assert str(info.value) == (
        f"mixer state 'proportions' has shape ({size},), this run expects (2,) (2 domains)"
    )
    assert mixer.proportions(0).tolist() == [0.5, 0.5]  # unchanged


@pytest.mark.parametrize(
    "method, proportions",
    [("stratified", None), ("static", {"a": 0.2, "b": 0.3, "c": 0.5})],
    ids=["stratified", "static"],
)
def test_observe_leaves_fixed_proportions_unchanged(method, proportions):
    mixer = build_mixer(method, ["a", "b", "c"], proportions=proportions)
    before = mixer.proportions(0).clone()
    gen = torch.Generator().manual_seed(0)
    for step in range(5):
        for _ in range(2):  # two micro-batches per step
            count_D = torch.randint(0, 50, (3,), generator=gen).float()
            loss_sum_D = torch.rand(3, generator=gen) * 10 * count_D
            mixer.observe(step, loss_sum_D, count_D)
        assert torch.equal(mixer.proportions(step), before)
    assert torch.equal(mixer.proportions(10_000), before)
    assert torch.equal(mixer.state_dict()["proportions"], before)
