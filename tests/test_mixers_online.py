"""The step-interval online mixers: ODM, DoReMi, Skill-it and DoGE.

Update timing (``update_every``), each method's update against a loop written from its paper's formula,
domains absent from a window, the validation of the reference / skills-graph files, DoReMi's time
average, ODM's exploration floor, DoGE's gradient alignment on a tiny model, and exact state round trips.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as Fn
from mixing_helpers import assert_states_equal, save_load

from aioli_fast.errors import ConfigError
from aioli_fast.mixing import build_mixer
from aioli_fast.mixing.doge import gradient_alignment
from aioli_fast.mixing.odm import exploration_rate
from aioli_fast.mixing.skillit import load_skills_graph, skills_graph_from_losses

D3 = ["a", "b", "c"]
GRAPH = [[1.0, 0.0, 0.0], [0.6, 0.5, 0.0], [0.6, 0.0, 0.5]]


@pytest.fixture
def reference(tmp_path):
    path = tmp_path / "reference.json"
    path.write_text(json.dumps({"a": 2.0, "b": 3.0, "c": 1.0}))
    return str(path)


@pytest.fixture
def graph(tmp_path):
    path = tmp_path / "graph.json"
    path.write_text(json.dumps(GRAPH))
    return str(path)


def make(method, reference=None, graph=None, **options):
    if method == "doremi":
        options.setdefault("reference", reference)
    if method == "skillit":
        options.setdefault("skills_graph", graph)
    return build_mixer(method, D3, **options)


def batch(gen, absent=()):
    """Random per-domain loss sums and counts; domains in ``absent`` have no tokens."""
    counts = torch.randint(10, 100, (3,), generator=gen).float()
    losses = 1.0 + 4.0 * torch.rand(3, generator=gen)
    for d in absent:
        counts[d] = 0.0
    return losses * counts, counts


def step_loop(mixer, steps, gen, *, absent_at=lambda step: (), skip=lambda step: False, scores=None):
    """Drive ``mixer`` as the loop does; returns the proportions object of every step."""
    out = []
    for step in range(steps):
        if mixer.measurement_due(step):
            mixer.observe_measurement(step, *batch(gen))
        p = mixer.proportions(step)
        out.append(p)
        if getattr(mixer, "needs_gradients", False) and mixer.alignment_due(step):
            mixer.observe_alignment(step, scores(step) if scores else torch.rand(3, generator=gen) - 0.5)
        if not skip(step):
            mixer.observe(step, *batch(gen, absent_at(step)))
    return out


# ---- update timing ---------------------------------------------------------------------------------

METHODS = ["odm", "doremi", "skillit", "skillit-probe", "doge"]


def make_named(name, reference, graph, **options):
    if name == "skillit-probe":
        return make("skillit", graph=graph, measurement="probe", **options)
    return make(name, reference=reference, graph=graph, **options)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("every", [1, 3], ids=["every1", "every3"])
def test_proportions_change_only_on_update_steps(method, every, reference, graph):
    mixer = make_named(method, reference, graph, update_every=every)
    returned = step_loop(mixer, 13, torch.Generator().manual_seed(0))
    changed = [step for step in range(1, 13) if returned[step] is not returned[step - 1]]
    assert changed == [s for s in range(1, 13) if s % every == 0]
    assert mixer.num_updates == len(changed)
    assert all(torch.isfinite(p).all() and p.sum().item() == pytest.approx(1.0, abs=1e-5) for p in returned)


@pytest.mark.parametrize("method", ["odm", "doremi", "skillit"])
def test_no_update_without_observations_in_the_window(method, reference, graph):
    mixer = make(method, reference=reference, graph=graph, update_every=3)
    # nothing observed during steps 3..5: no update at step 6, the window of 6..8 updates at 9
    returned = step_loop(mixer, 10, torch.Generator().manual_seed(1), skip=lambda step: 3 <= step <= 5)
    changed = [step for step in range(1, 10) if returned[step] is not returned[step - 1]]
    assert changed == [3, 9] and mixer.num_updates == 2


def test_repeated_proportions_calls_within_a_step_update_once(reference):
    mixer = make("doremi", reference=reference, update_every=2)
    gen = torch.Generator().manual_seed(0)
    mixer.observe(0, *batch(gen))
    mixer.observe(1, *batch(gen))
    first = mixer.proportions(2)
    assert mixer.proportions(2) is first and mixer.num_updates == 1


# ---- each update against its formula ---------------------------------------------------------------


def window_losses(stats):
    sums = sum(s for s, _ in stats)
    counts = sum(c for _, c in stats)
    return [s / c if c > 0 else math.nan for s, c in zip(sums.tolist(), counts.tolist())]


def feed_windows(mixer, windows, every):
    """Feed each window's micro-batch stats in its steps and return the proportions after each update."""
    out = []
    for w, stats in enumerate(windows):
        for s, c in stats:
            mixer.observe(w * every, s, c)
        out.append(mixer.proportions((w + 1) * every).clone())
    return out


def random_windows(seed, n=8, absent=None):
    gen = torch.Generator().manual_seed(seed)
    return [[batch(gen, absent(w) if absent else ()) for _ in range(2)] for w in range(n)]


def test_odm_matches_exp3_loop_with_absent_domains():
    alpha = 0.9
    windows = random_windows(0, n=12, absent=lambda w: (2,) if w % 3 == 1 else ())
    mixer = make("odm", update_every=2, smoothing=alpha)
    got = feed_windows(mixer, windows, 2)
    k, reward, pi = 3, [0.0] * 3, [1 / 3] * 3
    for t, stats in enumerate(windows):
        L = window_losses(stats)
        for i in range(k):
            if not math.isnan(L[i]):
                reward[i] = alpha * reward[i] + (1 - alpha) * L[i] / pi[i]
        eps_prev = min(1 / k, math.sqrt(math.log(k) / (k * t))) if t > 0 else 1 / k
        eps = min(1 / k, math.sqrt(math.log(k) / (k * (t + 1))))
        z = [math.exp(eps_prev * r) for r in reward]
        pi = [(1 - k * eps) * v / sum(z) + eps for v in z]
        torch.testing.assert_close(got[t], torch.tensor(pi), atol=1e-5, rtol=1e-5)
    assert mixer.state_dict()["reward"][2].item() == pytest.approx(reward[2], rel=1e-5)


def test_odm_exploration_floor():
    mixer = make("odm", update_every=1, smoothing=0.5)
    for step in range(200):
        mixer.observe(step, torch.tensor([500.0, 1.0, 0.1]), torch.ones(3))  # domain a dominates
        p = mixer.proportions(step + 1)
        eps = exploration_rate(3, mixer.num_updates)
        assert p.min().item() >= eps - 1e-6
    assert p.argmax().item() == 0 and p[0].item() > 0.5
    assert exploration_rate(3, 0) == pytest.approx(1 / 3) and exploration_rate(3, 200) == pytest.approx(
        math.sqrt(math.log(3) / 600)
    )
    assert exploration_rate(2, 1) == 0.5  # capped at 1/k


def test_odm_absent_domain_keeps_its_reward():
    mixer = make("odm", update_every=1)
    mixer.observe(0, torch.tensor([2.0, 3.0, 4.0]), torch.ones(3))
    mixer.proportions(1)
    before = mixer.state_dict()["reward"].clone()
    mixer.observe(1, torch.tensor([2.0, 3.0, 0.0]), torch.tensor([1.0, 1.0, 0.0]))
    mixer.proportions(2)
    after = mixer.state_dict()["reward"]
    assert after[2] == before[2] and after[0] != before[0]


def test_doremi_matches_its_formula_and_time_average(reference):
    eta, c = 0.5, 0.1
    ref = [2.0, 3.0, 1.0]
    windows = random_windows(1, n=6, absent=lambda w: (1,) if w == 2 else ())
    mixer = make("doremi", reference=reference, update_every=3, eta=eta, smoothing=c)
    assert mixer.summary() == {"average_proportions": pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})}
    got = feed_windows(mixer, windows, 3)
    alpha, history = [1 / 3] * 3, []
    for w, stats in enumerate(windows):
        L = window_losses(stats)
        lam = [0.0 if math.isnan(L[i]) else max(L[i] - ref[i], 0.0) for i in range(3)]
        alpha = [a * math.exp(eta * x) for a, x in zip(alpha, lam)]
        alpha = [a / sum(alpha) for a in alpha]
        p = [(1 - c) * a + c / 3 for a in alpha]
        history.append(p)
        torch.testing.assert_close(got[w], torch.tensor(p), atol=1e-5, rtol=1e-5)
    average = [sum(col) / len(history) for col in zip(*history)]
    torch.testing.assert_close(mixer.average_proportions(), torch.tensor(average), atol=1e-5, rtol=1e-5)
    summary = mixer.summary()["average_proportions"]
    assert list(summary) == D3 and [summary[d] for d in D3] == pytest.approx(average, abs=1e-5)


def test_doremi_reference_from_a_checkpoint_is_averaged_per_window(tmp_path, reference):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model.pt").write_bytes(b"")
    live = make("doremi", reference=str(tmp_path / "run"), update_every=2)
    fixed = make("doremi", reference=reference, update_every=2)
    assert live.needs_reference_model and not fixed.needs_reference_model
    gen = torch.Generator().manual_seed(2)
    for step in range(8):
        s, c = batch(gen)
        for mixer in (live, fixed):
            mixer.observe(step, s, c)
        # the reference model sees the same batch: per-domain losses 2, 3, 1 (as in reference.json)
        live.observe_reference(step, torch.tensor([2.0, 3.0, 1.0]) * c, c)
        assert torch.equal(live.proportions(step + 1), fixed.proportions(step + 1))
    assert live.num_updates == 4


def test_skillit_matches_its_formula_with_absent_domains(graph):
    eta = 0.3
    windows = random_windows(2, n=5, absent=lambda w: (0,) if w == 1 else ())
    mixer = make("skillit", graph=graph, update_every=4, eta=eta)
    got = feed_windows(mixer, windows, 4)
    p = [1 / 3] * 3
    for w, stats in enumerate(windows):
        L = [0.0 if math.isnan(v) else v for v in window_losses(stats)]  # absent: no pull
        pull = [sum(L[i] * GRAPH[i][j] for i in range(3)) for j in range(3)]
        z = [pj * math.exp(eta * g) for pj, g in zip(p, pull)]
        p = [v / sum(z) for v in z]
        torch.testing.assert_close(got[w], torch.tensor(p), atol=1e-5, rtol=1e-5)


def test_skillit_probe_mode_uses_the_measurement(graph):
    mixer = make("skillit", graph=graph, update_every=2, measurement="probe", eta=1.0)
    assert [s for s in range(7) if mixer.measurement_due(s)] == [2, 4, 6]
    with pytest.raises(ConfigError, match="no loss measurement is due at step 3"):
        mixer.observe_measurement(3, torch.ones(3), torch.ones(3))
    mixer.observe(0, torch.full((3,), 1e6), torch.ones(3))  # training losses are not its signal
    mixer.observe_measurement(2, torch.tensor([2.0, 0.0, 0.0]), torch.tensor([1.0, 0.0, 0.0]))
    p = mixer.proportions(2)
    # only domain a measured (loss 2): pull = 2 * GRAPH[0] = [2, 0, 0]
    z = torch.tensor([math.exp(2.0), 1.0, 1.0])
    torch.testing.assert_close(p, z / z.sum())
    assert not mixer.measurement_due(2)  # the update of step 2 is done


def test_doge_update_uses_the_rank_averaged_scores():
    mixer = make("doge", update_every=2, eta=2.0)
    assert [s for s in range(6) if mixer.alignment_due(s)] == [1, 3, 5]
    mixer.observe_alignment(1, torch.tensor([0.5, -0.5, 0.0]))
    p = mixer.proportions(2)
    expected = torch.softmax(torch.tensor([1.0, -1.0, 0.0]), 0)
    torch.testing.assert_close(p, expected)
    mixer.observe_alignment(3, torch.tensor([math.nan, 0.2, 0.0]))  # a NaN score counts as 0
    p = mixer.proportions(4)
    torch.testing.assert_close(p, torch.softmax(torch.log(expected) + torch.tensor([0.0, 0.4, 0.0]), 0))


@pytest.mark.parametrize("method", ["odm", "doremi", "skillit", "doge"])
def test_min_proportion_floor(method, reference, graph):
    floor = 0.05
    mixer = make(method, reference=reference, graph=graph, update_every=1, min_proportion=floor)
    for step in range(60):
        p = mixer.proportions(step)
        assert p.min().item() >= floor - 1e-6
        if method == "doge":
            mixer.observe_alignment(step, torch.tensor([1.0, -1.0, -1.0]))
        else:
            mixer.observe(step, torch.tensor([40.0, 0.0, 0.0]), torch.tensor([1.0, 1.0, 1.0]))
    assert p.max().item() > 0.5
    if method != "odm":  # ODM's own exploration rate (about 0.1 here) stays above the floor
        assert p.min().item() == pytest.approx(floor, abs=0.02)  # the floor binds


# ---- configuration errors --------------------------------------------------------------------------


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "mixing.reference: cannot read"),
        ("{not json", "mixing.reference: cannot read"),
        ("[2.0, 3.0, 1.0]", "must hold a mapping domain -> loss"),
        ('{"a": 2.0, "b": 3.0}', "has no loss for domain(s) ['c']"),
        ('{"a": 2.0, "b": 3.0, "c": NaN}', "must give a finite number per domain"),
        ('{"a": 2.0, "b": 3.0, "c": Infinity}', "must give a finite number per domain"),
        ('{"a": 2.0, "b": "3", "c": 1.0}', "must give a finite number per domain"),
    ],
    ids=["missing-file", "bad-json", "not-a-mapping", "missing-domain", "nan", "inf", "string"],
)
def test_bad_reference_file(tmp_path, content, message):
    path = str(tmp_path / "absent.json") if content is None else write(tmp_path, "ref.json", content)
    with pytest.raises(ConfigError) as info:
        make("doremi", reference=path)
    assert message in str(info.value)


def test_doremi_needs_a_reference(tmp_path):
    with pytest.raises(ConfigError, match="mixing.method 'doremi' needs mixing.reference"):
        make("doremi")
    with pytest.raises(ConfigError, match="mixing.reference: no checkpoint at"):
        make("doremi", reference=str(tmp_path / "no-such-run"))
    model = tmp_path / "model.pt"
    model.write_bytes(b"")
    assert make("doremi", reference=str(model)).needs_reference_model


def test_reference_file_may_name_extra_domains(tmp_path):
    path = write(tmp_path, "ref.json", '{"a": 2, "b": 3.5, "c": 1, "z": 9}')
    mixer = make("doremi", reference=path)
    assert mixer.reference_D.tolist() == [2.0, 3.5, 1.0]


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "mixing.skills_graph: cannot read"),
        ("[[1, 0], [0, 1]]", "must be a 3x3 list of lists or a mapping of mappings"),
        ("[[1, 0, 0], [0, 1, 0], [0, 1]]", "must be a 3x3 list of lists"),
        ('{"a": {"z": 1.0}}', "names unknown domain(s) ['z']"),
        ('{"a": [1, 0, 0]}', "or has a non-mapping row"),
        ("[[1, 0, 0], [0, -1, 0], [0, 0, 1]]", "must hold finite non-negative numbers"),
        ("[[1, 0, 0], [0, NaN, 0], [0, 0, 1]]", "must hold finite non-negative numbers"),
        ('[[1, 0, 0], [0, "x", 0], [0, 0, 1]]', "must hold finite non-negative numbers"),
        ("3.0", "must be a 3x3 list of lists"),
    ],
    ids=[
        "missing-file",
        "wrong-size",
        "ragged",
        "unknown-domain",
        "non-mapping-row",
        "negative",
        "nan",
        "string",
        "scalar",
    ],  # fmt: skip
)
def test_bad_skills_graph(tmp_path, content, message):
    path = str(tmp_path / "absent.json") if content is None else write(tmp_path, "g.json", content)
    with pytest.raises(ConfigError) as info:
        make("skillit", graph=path)
    assert message in str(info.value)


def test_skills_graph_mapping_form_fills_zeros(tmp_path):
    path = write(tmp_path, "g.json", '{"b": {"a": 0.5, "b": 1}, "c": {"c": 2}}')
    assert load_skills_graph(path, D3) == [[0.0, 0.0, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 2.0]]
    mixer = make("skillit", graph=path)
    assert mixer.S_DD.tolist() == [[0.0, 0.0, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 2.0]]


def test_skills_graph_from_single_domain_runs():
    before = torch.tensor([4.0, 2.0])
    after = torch.tensor([[3.0, 1.9], [4.1, 1.0]])  # row j: losses after training on j alone
    S = skills_graph_from_losses(before, after)
    # S[i, j] = max(0, (before_i - after_ji) / before_i); columns scaled so the largest sums to 1
    raw = torch.tensor([[0.25, 0.0], [0.05, 0.5]])
    torch.testing.assert_close(S, raw / 0.5)
    assert torch.equal(skills_graph_from_losses(before, before.expand(2, 2)), torch.zeros(2, 2))


@pytest.mark.parametrize(
    "method, options, message",
    [
        ("skillit", dict(), "mixing.method 'skillit' needs mixing.skills_graph"),
        ("skillit", dict(measurement="val"), "mixing.measurement must be one of train, probe, full_val"),
        ("odm", dict(smoothing=1.0), "mixing.smoothing must be in [0, 1), got 1.0"),
        ("odm", dict(eta=1.0), "mixing.method 'odm' does not use mixing.eta"),
        ("odm", dict(update_every=0), "mixing.update_every must be >= 1, got 0"),
        ("doremi", dict(eta=-1.0), "mixing.eta must be >= 0, got -1.0"),
        ("doremi", dict(smoothing=1.5), "mixing.smoothing must be in [0, 1], got 1.5"),
        ("doge", dict(min_proportion=0.5), "mixing.min_proportion must be in [0, 1/k], got 0.5"),
        ("doge", dict(reference="x.json"), "mixing.method 'doge' does not use mixing.reference"),
    ],
    ids=[
        "skillit-no-graph",
        "skillit-bad-measurement",
        "odm-smoothing",
        "odm-eta",
        "odm-every",
        "doremi-eta",
        "doremi-smoothing",
        "doge-floor",
        "doge-reference",
    ],  # fmt: skip
)
def test_bad_options(method, options, message, reference, graph):
    if method == "doremi":
        options = {"reference": reference, **options}
    if method == "skillit" and options:
        options = {"skills_graph": graph, **options}
    with pytest.raises(ConfigError) as info:
        build_mixer(method, D3, **options)
    assert message in str(info.value)


# ---- DoGE gradient alignment -----------------------------------------------------------------------


def per_domain_losses(model, x, y, domain, k=3):
    ce = Fn.cross_entropy(model(x), y, reduction="none")
    sums = torch.zeros(k).index_add(0, domain, ce)
    counts = torch.bincount(domain, minlength=k).float()
    return sums / counts.clamp_min(1)


def test_gradient_alignment_matches_independent_cosines():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    model[0].bias.requires_grad_(False)  # frozen parameters are left out of the cosines
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    domain = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 0, 1, 0, 1])  # domain 2 absent from the batch
    xv, yv = torch.randn(6, 4), torch.randint(0, 3, (6,))
    params = [p for p in model.parameters() if p.requires_grad]

    def flat_grad(loss):
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads)])

    g_val = flat_grad(Fn.cross_entropy(model(xv), yv))
    expected = []
    for j in range(3):
        g_j = flat_grad(per_domain_losses(model, x, y, domain)[j])
        expected.append(0.0 if g_j.norm() == 0 else Fn.cosine_similarity(g_j, g_val, dim=0).item())

    scores = gradient_alignment(
        list(model.parameters()), per_domain_losses(model, x, y, domain), Fn.cross_entropy(model(xv), yv)
    )
    assert scores.shape == (3,)
    torch.testing.assert_close(scores, torch.tensor(expected), atol=1e-5, rtol=1e-5)
    assert scores[2].item() == 0.0
    assert all(p.grad is None for p in model.parameters())  # nothing accumulated into .grad


def test_gradient_alignment_of_the_validation_loss_with_itself_is_one():
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    train = torch.stack([Fn.cross_entropy(model(x), y), -Fn.cross_entropy(model(x), y)])
    scores = gradient_alignment(list(model.parameters()), train, Fn.cross_entropy(model(x), y))
    torch.testing.assert_close(scores, torch.tensor([1.0, -1.0]), atol=1e-5, rtol=0)


# ---- state round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("N", [4, 7], ids=["at-update", "mid-window"])
def test_state_round_trip_resumes_exactly(method, N, reference, graph):
    total, every = 16, 3

    def run(mixer, start, stop, gen, out):
        for step in range(start, stop):
            if mixer.measurement_due(step):
                mixer.observe_measurement(step, *batch(gen))
            out.append(mixer.proportions(step).clone())
            if mixer.needs_gradients and mixer.alignment_due(step):
                mixer.observe_alignment(step, torch.rand(3, generator=gen) - 0.5)
            mixer.observe(step, *batch(gen, (1,) if step == 5 else ()))
        return out

    whole = make_named(method, reference, graph, update_every=every)
    straight = run(whole, 0, total, torch.Generator().manual_seed(3), [])

    gen = torch.Generator().manual_seed(3)
    first = make_named(method, reference, graph, update_every=every)
    resumed = run(first, 0, N, gen, [])
    fresh = make_named(method, reference, graph, update_every=every)
    fresh.load_state_dict(save_load(first.state_dict()))
    run(fresh, N, total, gen, resumed)

    for step, (a, b) in enumerate(zip(straight, resumed, strict=True)):
        assert torch.equal(a, b), step
    assert_states_equal(whole.state_dict(), fresh.state_dict())
    assert fresh.num_updates == total // every and len({tuple(p.tolist()) for p in straight}) > 2
    if method == "doremi":
        assert torch.equal(whole.average_proportions(), fresh.average_proportions())


# ---- numerical safety ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["odm", "doremi", "skillit"])
def test_nan_and_inf_losses_never_give_nan_proportions(method, reference, graph):
    mixer = make(method, reference=reference, graph=graph, update_every=2)
    gen = torch.Generator().manual_seed(4)
    for step in range(40):
        s, c = batch(gen)
        if step % 5 == 0:
            s[step % 3] = math.nan
        if step % 7 == 0:
            s[(step + 1) % 3] = math.inf
        mixer.observe(step, s, c)
        p = mixer.proportions(step + 1)
        assert torch.isfinite(p).all() and p.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert mixer.num_updates == 20
    if method == "doremi":
        assert torch.isfinite(mixer.average_proportions()).all()


def overflow_then_normal(mixer, windows=5):
    """One window whose (finite) loss overflows the update, then ordinary windows."""
    mixer.observe(0, torch.tensor([3.0e38, 2.0, 2.0]), torch.ones(3))
    mixer.proportions(1)
    assert mixer.metrics()["skipped_updates"].item() == 1  # the overflowing update itself is skipped
    p_before = mixer.proportions(1)
    for step in range(1, 1 + windows):
        mixer.observe(step, torch.tensor([5.0, 2.0, 1.0]), torch.ones(3))
        mixer.proportions(step + 1)
    return p_before


def test_skillit_recovers_after_an_overflowing_update(graph):
    mixer = make("skillit", graph=graph, update_every=1, eta=10.0)
    p_before = overflow_then_normal(mixer)
    assert mixer.metrics()["skipped_updates"].item() == 1
    assert not torch.equal(mixer.proportions(6), p_before)


def test_odm_recovers_after_an_overflowing_update():
    mixer = make("odm", update_every=1)
    p_before = overflow_then_normal(mixer)
    assert torch.isfinite(mixer.state_dict()["reward"]).all()  # got [inf, ., .]
    assert mixer.metrics()["skipped_updates"].item() == 1  # got 6: frozen for the rest of the run
    assert not torch.equal(mixer.proportions(6), p_before)


def test_doremi_recovers_after_an_overflowing_update(reference):
    mixer = make("doremi", reference=reference, update_every=1, eta=2.0)
    p_before = overflow_then_normal(mixer)
    assert torch.isfinite(mixer.state_dict()["log_weights"]).all()  # got [nan, nan, nan]
    assert mixer.metrics()["skipped_updates"].item() == 1  # got 6
    assert not torch.equal(mixer.proportions(6), p_before)
    assert torch.isfinite(mixer.average_proportions()).all()  # got NaN


# ---- the checkpoint format --------------------------------------------------------------------------

WINDOWS = {
    "odm": ["window"],
    "doremi": ["window", "reference_window"],
    "skillit-probe": ["window", "measured"],
    "aioli": ["window"],
}


@pytest.mark.parametrize("method", list(WINDOWS))
def test_per_domain_windows_are_stored_as_plain_2_by_D_tensors(method, reference, graph):
    """Mixers hold their windows as ``DomainSums``; a state dict holds the ``[2, D]`` tensor as before,
    so checkpoints written before the type existed load, and a loaded window keeps adding up."""
    if method == "aioli":
        mixer = build_mixer("aioli", D3, measurement="train", round_steps=12, sweeps=1, block_steps=2)
    else:
        mixer = make_named(method, reference, graph, update_every=5)
    gen = torch.Generator().manual_seed(3)
    step_loop(mixer, 7, gen)
    mixer.observe(7, *batch(gen))
    state = save_load(mixer.state_dict())  # weights_only: plain tensors only
    for key in WINDOWS[method]:
        assert type(state[key]) is torch.Tensor and state[key].shape == (2, 3), key
    again = (
        build_mixer(mixer.name, D3, **mixer.options)
        if method == "aioli"
        else make_named(method, reference, graph, update_every=5)
    )
    again.load_state_dict(state)
    assert_states_equal(again.state_dict(), mixer.state_dict())
    more = batch(gen)
    for m in (mixer, again):
        m.observe(8, *more)
    assert_states_equal(again.state_dict(), mixer.state_dict())


# ---- resume on another number of processes -----------------------------------------------------------


@pytest.mark.parametrize("method", [*METHODS, "aioli", "aioli-round"])
def test_merged_states_keep_the_window_totals_of_the_ranks_that_wrote_them(method, reference, graph):
    """Two ranks' states merged for one and for three processes: the per-rank sums (RANK_SUMS) add up
    to the same total over the new ranks, on rank 0; every other key is rank 0's (the same on all)."""
    gen = torch.Generator().manual_seed(3)
    ranks = [
        make_named(method, reference, graph, measurement="train", round_steps=8, sweeps=1, block_steps=2)
        if method == "aioli"
        else build_mixer("aioli", D3)  # the default measurement: the fit's sums are per rank
        if method == "aioli-round"
        else make_named(method, reference, graph, update_every=50)
        for _ in range(2)
    ]
    for mixer in ranks:  # each rank's own observations: windows still open (no update before step 50)
        step_loop(mixer, 3, gen)
    states = [m.state_dict() for m in ranks]
    assert ranks[0].RANK_SUMS and all(k in states[0] for k in ranks[0].RANK_SUMS)
    for world in (1, 3):
        merged = [ranks[0].merge_states(states, r) for r in range(world)]
        for key in states[0]:
            total = sum(m[key] for m in merged) if key in ranks[0].RANK_SUMS else merged[0][key]
            want = states[0][key] + states[1][key] if key in ranks[0].RANK_SUMS else states[0][key]
            if isinstance(want, torch.Tensor):
                torch.testing.assert_close(total, want, rtol=0, atol=0, equal_nan=True, msg=key)
            else:
                assert total == want, key
        for r, state in enumerate(merged):
            fresh = make_named(method, reference, graph) if not method.startswith("aioli") else None
            if fresh is not None:
                fresh.load_state_dict(state)  # a valid state of the mixer
            if r:
                assert all(float(state[k].abs().sum()) == 0 for k in ranks[0].RANK_SUMS)
    if method.startswith("skillit"):
        assert "measured" not in ranks[0].RANK_SUMS  # already reduced over the ranks: never summed
    if method == "aioli-round":  # the ranks' fits held observations, so the totals compared are not zeros
        assert float(states[0]["fit"].abs().sum()) > 0 and float(states[1]["fit_observations"].sum()) > 0


def test_a_merged_loss_window_counts_steps_as_the_new_processes_would():
    from aioli_fast.train.stats import LossWindow

    old = [LossWindow(3) for _ in range(2)]
    for r, window in enumerate(old):  # 4 steps on each of 2 ranks, each rank's own tokens
        window.sums.add(torch.tensor([1.0, 2.0, 3.0]) * (r + 1), torch.tensor([10.0, 20.0, 30.0]))
        for _ in range(4):
            window.add_step(torch.tensor(2.0 + r))
    for world in (1, 4):
        new = LossWindow(3)
        merged = [new.merged([w.buffer for w in old], r, world) for r in range(world)]
        total = LossWindow(3)
        total.load_(sum(merged))
        t = total.totals()
        assert t.loss_sum == [3.0, 6.0, 9.0] and t.count == [20.0, 40.0, 60.0]  # every token once
        assert t.steps == 4 * world and t.finite_steps == 4 * world  # each step counted by every process
        assert t.loss == pytest.approx(2.5)  # the mean over the old ranks' step losses
        assert all(float(m.abs().sum()) == 0 for m in merged[1:])
