"""AioliMixer: the LearnParams schedule, the measurement sources, the round update and its timing,
restricted mode, option validation, exact resume, and numerical safety.

Setting used throughout unless said otherwise: k = 3 domains, R = 2 sweeps, S = 3 steps per block,
f = 0.5, so LearnParams takes R·k·S = 18 steps of each round.
"""

from __future__ import annotations

import math

import pytest
import torch
from mixing_helpers import assert_states_equal, drive, expected_A, planted_sim, save_load

from aioli_fast.errors import ConfigError
from aioli_fast.mixing import build_mixer as build_any_mixer
from aioli_fast.mixing import lmo
from aioli_fast.mixing.aioli import AioliMixer


def build_mixer(method, domains, *args, **options):
    """The mixer with Aioli's probe measurements unless a test names another: these tests are of
    LearnParams (the default measurement, ``round``, is tested in test_aioli_round.py)."""
    if method == "aioli":
        options.setdefault("measurement", "probe")
    return build_any_mixer(method, domains, *args, **options)


DOMAINS = ["a", "b", "c"]
K, R, S, F = 3, 2, 3, 0.5
LEARN = R * K * S  # 18
# the paper's procedure: whole batches on the block mixtures, no uniform phase
BASE = dict(
    sweeps=R,
    block_steps=S,
    one_hot_factor=F,
    round_steps=24,
    eta=1.0,
    learn_fraction=1.0,
    prior_steps=0,
    max_learn_share=1.0,
)


def make(**options) -> AioliMixer:
    kwargs = {**BASE, **options}
    proportions = kwargs.pop("proportions", None)
    mixer = build_mixer("aioli", DOMAINS, proportions=proportions, **kwargs)
    assert isinstance(mixer, AioliMixer)
    return mixer


def W_row(j: int) -> list[float]:
    return [F if i == j else (1 - F) / (K - 1) for i in range(K)]


# ---- the schedule ----------------------------------------------------------------------------------


@pytest.mark.parametrize("measurement", ["probe", "full_val", "train"])
@pytest.mark.parametrize("P", [0, 5], ids=["unrestricted", "prior5"])
def test_schedule_returns_the_smoothed_one_hot_row_of_each_block(measurement, P):
    U = 24
    mixer = make(measurement=measurement, prior_steps=P, round_steps=U)
    p0 = mixer.proportions(P + LEARN)  # an exploit step of round 0 (P=0: step 0 is a block)
    blocks: dict[tuple[int, int], torch.Tensor] = {}
    for step in range(P + 3 * U):
        p = mixer.proportions(step)
        assert p.dtype == torch.float32 and p.shape == (K,)
        host = mixer.host_values(step)
        if step < P or (step - P) % U >= LEARN:
            # prior phase and exploit phase: no update happened (nothing observed), the same object
            assert p is p0 and host is None
            torch.testing.assert_close(p, torch.full((K,), 1 / K))
            continue
        r, offset = divmod(step - P, U)
        order = mixer.order(r)
        j = order[offset // S]
        torch.testing.assert_close(p, torch.tensor(W_row(j)), atol=0, rtol=0)
        assert host == pytest.approx(W_row(j), abs=1e-15)
        assert host == pytest.approx(p.tolist(), abs=1e-7)  # host values agree with the device values
        assert mixer.host_proportions(step) == host
        key = (r, offset // S)
        if key in blocks:
            assert p is blocks[key]  # the same tensor object for every step of a block
        blocks[key] = p
    # all rounds' blocks; blocks on different domains are different objects
    assert len(blocks) == 3 * R * K
    for (r, n), p in blocks.items():
        for (r2, n2), q in blocks.items():
            if mixer.order(r)[n] != mixer.order(r2)[n2]:
                assert p is not q


def test_order_is_R_permutations_drawn_from_seed_and_round():
    a, b, c = make(seed=0), make(seed=0), make(seed=1)
    orders = [a.order(r) for r in range(6)]
    for order in orders:
        assert len(order) == R * K
        for sweep in range(R):
            assert sorted(order[sweep * K : (sweep + 1) * K]) == list(range(K))
    # deterministic in (seed, round), also when asked out of order (after another round)
    assert [b.order(r) for r in reversed(range(6))][::-1] == orders
    assert a.order(2) == orders[2]
    # rounds and seeds draw different orders
    assert len({tuple(o) for o in orders}) > 1
    assert [c.order(r) for r in range(6)] != orders


@pytest.mark.parametrize("measurement", ["probe", "full_val", "train"])
@pytest.mark.parametrize("P", [0, 5], ids=["unrestricted", "prior5"])
def test_measurement_due_before_the_first_block_and_after_every_block(measurement, P):
    U = 24
    mixer = make(measurement=measurement, prior_steps=P, round_steps=U)
    due = [step for step in range(P + 3 * U) if mixer.measurement_due(step)]
    if measurement == "train":
        assert due == []
    else:
        assert due == [P + r * U + n * S for r in range(3) for n in range(R * K + 1)]


def test_observe_measurement_when_none_is_due_or_in_train_mode_raises():
    mixer = make(measurement="probe")
    with pytest.raises(ConfigError, match="no loss measurement is due at step 1"):
        mixer.observe_measurement(1, torch.ones(K), torch.ones(K))
    with pytest.raises(ConfigError, match="no loss measurement is due at step 19"):
        mixer.observe_measurement(19, torch.ones(K), torch.ones(K))  # LEARN + 1: past the last boundary
    train = make(measurement="train")
    with pytest.raises(ConfigError, match="mixing.measurement is 'train'"):
        train.observe_measurement(0, torch.ones(K), torch.ones(K))


# ---- train-mode windows ----------------------------------------------------------------------------


@pytest.mark.parametrize("m", [1, 2, 3], ids=["m1", "m2", "m3"])
def test_train_mode_measures_the_first_measure_steps_of_each_block(m):
    U, P = 24, 2
    mixer = make(measurement="train", measure_steps=m, round_steps=U, prior_steps=P)
    gen = torch.Generator().manual_seed(m)
    expected = [[0.0] * K for _ in range(R * K + 1)]
    weight = [[0.0] * K for _ in range(R * K + 1)]
    for step in range(P + LEARN + m):
        mixer.proportions(step)
        for _ in range(2):  # two micro-batches per step
            counts = torch.randint(1, 50, (K,), generator=gen).float()
            losses = torch.rand(K, generator=gen) + step
            mixer.observe(step, losses * counts, counts)
            if step < P:
                continue
            n, into = divmod(step - P, S)
            if into < m:
                for i in range(K):
                    expected[n][i] += (losses[i] * counts[i]).item()
                    weight[n][i] += counts[i].item()
        if step >= P and (step - P) % S < m:
            n, into = divmod(step - P, S)
            assert mixer.state_dict()["window_end"] == P + n * S + m  # the window is open until then
    mixer.proportions(P + LEARN + m)  # closes the last window and applies the update
    assert mixer.state_dict()["window_end"] is None
    L = mixer.state_dict()["losses"]
    for n in range(R * K + 1):
        torch.testing.assert_close(
            L[n], torch.tensor([expected[n][i] / weight[n][i] for i in range(K)]), rtol=1e-5, atol=1e-5
        )
    assert mixer.state_dict()["round_done"] == 0


def test_train_mode_ignores_steps_outside_the_windows():
    mixer = make(measurement="train", measure_steps=1, round_steps=24)
    for step in range(24):
        mixer.proportions(step)
        measured = step % S == 0 and step <= LEARN
        value = 4.0 - 0.01 * step if measured else 1e6  # a huge loss that must not be seen
        mixer.observe(step, torch.full((K,), value), torch.ones(K))
    L = mixer.state_dict()["losses"]
    assert L.max().item() < 5
    torch.testing.assert_close(L[:, 0], torch.tensor([4.0 - 0.01 * S * n for n in range(R * K + 1)]))


# ---- update timing ---------------------------------------------------------------------------------


def changes_by_call(mixer, sim, steps):
    """(step, call) at which the saved proportions changed, calling the mixer as the loop does."""
    changes = []
    current = mixer.state_dict()["proportions"]

    def check(step, call):
        nonlocal current
        now = mixer.state_dict()["proportions"]
        if not torch.equal(now, current):
            changes.append((step, call))
            current = now

    for step in range(steps):
        if mixer.measurement_due(step):
            mixer.observe_measurement(step, *sim.probe_stats())
            check(step, "observe_measurement")
        p = mixer.proportions(step)
        check(step, "proportions")
        mixer.observe(step, *sim.train_batch_stats(p))
        check(step, "observe")
        sim.train_step(p)
    return changes


@pytest.mark.parametrize("update", ["ema", "cumulative"])
@pytest.mark.parametrize("measurement", ["probe", "full_val"])
@pytest.mark.parametrize("P", [0, 7], ids=["unrestricted", "prior7"])
def test_eval_modes_update_at_the_closing_measurement(measurement, update, P):
    U = 24
    mixer = make(measurement=measurement, update=update, round_steps=U, prior_steps=P)
    changes = changes_by_call(mixer, planted_sim(K), P + 3 * U)
    assert changes == [(P + r * U + LEARN, "observe_measurement") for r in range(3)]


@pytest.mark.parametrize("m", [1, 2], ids=["m1", "m2"])
@pytest.mark.parametrize("P", [0, 7], ids=["unrestricted", "prior7"])
def test_train_mode_updates_measure_steps_after_learn_params(m, P):
    U = 24
    mixer = make(measurement="train", measure_steps=m, round_steps=U, prior_steps=P)
    sim = planted_sim(K)
    changes = changes_by_call(mixer, sim, P + 3 * U)
    assert changes == [(P + r * U + LEARN + m, "proportions") for r in range(3)]


def test_exploit_tensor_is_new_each_round_and_never_modified_in_place():
    U = 24
    mixer = make(measurement="probe", update="cumulative", round_steps=U)
    sim = planted_sim(K)
    returned = []
    for step in range(3 * U):
        if mixer.measurement_due(step):
            mixer.observe_measurement(step, *sim.probe_stats())
        p = mixer.proportions(step)
        returned.append((step, p, p.clone()))
        sim.train_step(p)
    for step, p, snapshot in returned:
        assert torch.equal(p, snapshot), step  # nothing returned was changed afterwards
    exploit = {}
    for step, p, _ in returned:
        if step % U >= LEARN:
            exploit.setdefault(step // U, set()).add(id(p))
    assert all(len(ids) == 1 for ids in exploit.values())
    assert len(set().union(*exploit.values())) == 3
    # the exploit steps of round 0 (before the update) trained on the new p, not on uniform
    p_round0 = returned[LEARN][1]
    assert not torch.equal(p_round0, torch.full((K,), 1 / K))
    assert p_round0[0] == p_round0.max()  # domain 0 helps every domain in the planted A


# ---- the round update against an independent computation ------------------------------------------


def run_with_given_measurements(mixer, L_rounds, count=64.0):
    """Feed probe measurements L_rounds[r][n] ([k] losses; NaN = domain absent) and return the
    float32 losses the mixer saw (after sum / count), with the proportions of each round's exploit."""
    seen, exploit = [], []
    P, U = mixer.plan.uniform_steps, mixer.plan.round_steps
    for r, L_nk in enumerate(L_rounds):
        seen.append([])
        for step in range(P + r * U, P + (r + 1) * U):
            if mixer.measurement_due(step):
                n = (step - P - r * U) // S
                L = torch.tensor(L_nk[n], dtype=torch.float32)
                counts = torch.where(torch.isnan(L), torch.zeros(K), torch.full((K,), count))
                sums = torch.where(torch.isnan(L), torch.zeros(K), L * counts)
                mixer.observe_measurement(step, sums, counts)
                seen[-1].append(lmo.losses_from_sums(sums, counts).tolist())
            p = mixer.proportions(step)
        exploit.append(p)
    return seen, exploit


def planted_losses(seed, rounds=3, A=None):
    """Loss measurements from the linear law with a random A and a little noise."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.rand(K, K, generator=gen, dtype=torch.float64) * 0.01 if A is None else A
    W = torch.tensor([W_row(j) for j in range(K)], dtype=torch.float64)
    L = torch.tensor([4.0, 4.5, 5.0], dtype=torch.float64)
    out = []
    for r in range(rounds):
        order = lmo.learn_params_order(K, R, torch.Generator().manual_seed(r * 1_000_003))  # seed=0
        rows = [L.tolist()]
        for j in order.tolist():
            L = L - S * A @ W[j] + 1e-4 * torch.randn(K, generator=gen, dtype=torch.float64)
            rows.append(L.tolist())
        out.append(rows)
    return out


@pytest.mark.parametrize("diagonal", [False, True], ids=["full", "diagonal"])
def test_round_A_matches_an_independent_solve(diagonal):
    mixer = make(measurement="probe", update="cumulative", diagonal=diagonal)
    L_rounds = planted_losses(seed=1)
    seen, _ = run_with_given_measurements(mixer, L_rounds[:1])
    expected = expected_A(seen[0], mixer.order(0), K, F, diagonal=diagonal)
    torch.testing.assert_close(mixer.last_A_DD.double(), expected, atol=1e-4, rtol=1e-3)
    assert mixer.last_A_DD.sum().item() == pytest.approx(1.0, abs=1e-5)
    if diagonal:
        assert torch.count_nonzero(mixer.last_A_DD - torch.diag(torch.diagonal(mixer.last_A_DD))) == 0


def test_cumulative_update_compounds_from_the_previous_proportions():
    mixer = make(measurement="probe", update="cumulative", eta=2.0)
    p = torch.full((K,), 1 / K)
    for r, rows in enumerate(planted_losses(seed=2, rounds=3)):
        seen, exploit = run_with_given_measurements_from(mixer, r, rows)
        A = expected_A(seen, mixer.order(r), K, F)
        p = torch.softmax(torch.log(p.double()) + 2.0 * A.sum(0), dim=0).float()
        torch.testing.assert_close(exploit, p, atol=2e-5, rtol=1e-4)


def test_ema_update_restarts_from_uniform_with_the_smoothed_A():
    e, eta = 0.5, 2.0
    mixer = make(measurement="probe", update="ema", ema=e, eta=eta)
    A_bar = None
    for r, rows in enumerate(planted_losses(seed=3, rounds=3)):
        seen, exploit = run_with_given_measurements_from(mixer, r, rows)
        A = expected_A(seen, mixer.order(r), K, F)
        A_bar = A if A_bar is None else (1 - e) * A + e * A_bar
        p = torch.softmax(eta * A_bar.sum(0), dim=0)
        torch.testing.assert_close(exploit.double(), p, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(mixer.state_dict()["A_bar"].double(), A_bar, atol=1e-5, rtol=1e-4)
        assert (exploit.max() / exploit.min()).item() <= math.exp(eta) * (1 + 1e-6)


def run_with_given_measurements_from(mixer, r, rows, count=64.0):
    """Round ``r`` only (see :func:`run_with_given_measurements`); returns (seen losses, exploit p)."""
    P, U = mixer.plan.uniform_steps, mixer.plan.round_steps
    seen = []
    for step in range(P + r * U, P + (r + 1) * U):
        if mixer.measurement_due(step):
            L = torch.tensor(rows[(step - P - r * U) // S], dtype=torch.float32)
            counts = torch.where(torch.isnan(L), torch.zeros(K), torch.full((K,), count))
            sums = torch.where(torch.isnan(L), torch.zeros(K), L * counts)
            mixer.observe_measurement(step, sums, counts)
            seen.append(lmo.losses_from_sums(sums, counts).tolist())
        p = mixer.proportions(step)
    return seen, p


# ---- restricted mode and the floor -----------------------------------------------------------------


@pytest.mark.parametrize("update", ["ema", "cumulative"])
def test_restricted_mode_trains_on_the_prior_first(update):
    P, U, prior = 11, 24, {"a": 0.6, "b": 0.3, "c": 0.1}
    mixer = make(measurement="probe", update=update, prior_steps=P, round_steps=U, proportions=prior)
    sim = planted_sim(K)
    record = drive(mixer, sim, 0, P + U)
    for step in range(P):
        torch.testing.assert_close(record[step], torch.tensor([0.6, 0.3, 0.1]))
        assert mixer.host_values(step) is None
    assert not mixer.measurement_due(P - 1) and mixer.measurement_due(P)
    torch.testing.assert_close(record[P], torch.tensor(W_row(mixer.order(0)[0])))
    A = mixer.last_A_DD
    if update == "cumulative":  # the first round starts from uniform, as the reference implementation
        expected = lmo.exponentiated_gradient(torch.full((3,), 1 / 3), A, 1.0)
    else:  # EMA restarts from uniform: the prior does not carry over
        expected = lmo.ema_proportions(A, 1.0)
    torch.testing.assert_close(record[P + LEARN], expected)


def test_restricted_mode_ignores_training_losses_of_the_prior_phase():
    P = 6
    mixer = make(measurement="train", prior_steps=P)
    for step in range(P):
        mixer.proportions(step)
        mixer.observe(step, torch.full((K,), 1e6), torch.ones(K))
    assert mixer.state_dict()["window_end"] is None
    assert torch.equal(mixer.state_dict()["window"], torch.zeros(2, K))


def test_min_proportion_floor_applies_to_prior_and_updates():
    floor, prior = 0.1, {"a": 0.9, "b": 0.1, "c": 0.0}
    mixer = make(measurement="probe", update="cumulative", eta=20.0, prior_steps=3, proportions=prior,
                 min_proportion=floor)  # fmt: skip
    record = drive(mixer, planted_sim(K, scale=0.05), 0, 3 + 3 * 24)
    torch.testing.assert_close(record[0], (1 - K * floor) * torch.tensor([0.9, 0.1, 0.0]) + floor)
    exploit = [record[3 + r * 24 + LEARN] for r in range(3)]
    for p in exploit:
        assert p.min().item() >= floor - 1e-6
        assert p.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert exploit[-1][0].item() > 0.7  # a large eta drives towards domain 0, down to the floor elsewhere


# ---- option validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(round_steps=18), "mixing.round_steps=18 leaves no steps to train on the learned proportions"),
        (dict(round_steps=18), "2 x 3 x 3 = 18 steps; use round_steps >= 19"),
        (
            dict(round_steps=20, measurement="train", measure_steps=2),
            "plus measure_steps=2; use round_steps >= 21",
        ),
        (dict(update="EMA"), "mixing.update must be 'ema', 'cumulative', 'gated' or 'auto', got 'EMA'"),
        (
            dict(measurement="val"),
            "mixing.measurement must be one of train, probe, full_val, round; got 'val'",
        ),
        (dict(foo=1), "mixing.method 'aioli' does not use mixing.foo (it takes: mixing.eta"),
        (dict(min_proportion=0.34), "mixing.min_proportion must be in [0, 1/k = 0.3333], got 0.34"),
        (dict(min_proportion=-0.01), "mixing.min_proportion must be in [0, 1/k = 0.3333], got -0.01"),
        (dict(measure_steps=0), "mixing.measure_steps must be in [1, block_steps=3], got 0"),
        (dict(measure_steps=4), "mixing.measure_steps must be in [1, block_steps=3], got 4"),
        (dict(one_hot_factor=1 / 3), "is (almost) 1/k for k=3 domains"),
        (dict(sweeps=0), "mixing.sweeps must be >= 1, got 0"),
        (dict(block_steps=0), "mixing.block_steps must be >= 1, got 0"),
        (dict(eta=-1.0), "mixing.eta must be >= 0, got -1.0"),
        (dict(ema=1.5), "mixing.ema must be in [0, 1], got 1.5"),
        (dict(prior_steps=-1), "mixing.prior_steps must be >= 0, got -1"),
    ],
    ids=[
        "round-too-short",
        "round-too-short-says-minimum",
        "round-too-short-train",
        "bad-update",
        "bad-measurement",
        "unknown-option",
        "floor-above-1-over-k",
        "floor-negative",
        "measure-steps-zero",
        "measure-steps-above-block",
        "one-over-k",
        "no-sweeps",
        "no-block-steps",
        "negative-eta",
        "ema-above-one",
        "negative-prior",
    ],
)
def test_bad_options_raise_config_error(options, message):
    with pytest.raises(ConfigError) as info:
        make(**options)
    assert message in str(info.value)


def test_shortest_round_is_accepted():
    make(round_steps=19)  # probe: LearnParams + 1 exploit step
    make(round_steps=21, measurement="train", measure_steps=2)  # + the closing window + 1 step on the new p
    make(min_proportion=1 / 3)


def test_one_domain_is_rejected():
    with pytest.raises(ConfigError, match="mixing.method 'aioli' needs at least 2 domains"):
        build_mixer("aioli", ["a"])


def test_none_options_mean_the_paper_defaults():
    mixer = build_mixer("aioli", ["a", "b"], eta=None, round_steps=None, learn_fraction=1.0)
    plan = mixer.plan
    assert (plan.round_steps, plan.sweeps, plan.block_steps) == (250, 4, 4)
    assert (mixer.eta, mixer.one_hot_factor, mixer.ema) == (0.2, 0.625, 0.1)
    assert mixer.use_ema and mixer.measurement == "probe"


# ---- exact resume ----------------------------------------------------------------------------------

U_RESUME = 24
RESUME_CASES = {
    # name: (options, checkpoint step N: the state is saved after step N - 1)
    "probe-ema-mid-learn-params": (dict(measurement="probe"), U_RESUME + 7),
    "probe-ema-at-a-boundary": (dict(measurement="probe"), U_RESUME + 2 * S),
    "fullval-diagonal-mid-learn-params": (dict(measurement="full_val", diagonal=True), 2 * U_RESUME + 10),
    "train-mid-window": (dict(measurement="train", measure_steps=2), U_RESUME + 2 * S + 1),
    "train-closing-window": (dict(measurement="train", measure_steps=2), U_RESUME + LEARN + 1),
    "train-cumulative-mid-learn": (dict(measurement="train", update="cumulative"), U_RESUME + 8),
    "probe-exploit": (dict(measurement="probe"), 2 * U_RESUME - 2),
    "train-exploit": (dict(measurement="train", measure_steps=2), 2 * U_RESUME - 1),
    "restricted-prior-phase": (dict(measurement="probe", update="cumulative", prior_steps=5), 3),
    "restricted-floor-exploit": (
        dict(measurement="train", prior_steps=5, min_proportion=0.05, update="cumulative"),
        5 + U_RESUME + LEARN + 3,
    ),
    # partial blocks around the round's p (the defaults' design): mid-LearnParams of round 1, whose block
    # mixtures are rebuilt from the loaded proportions
    "partial-mirrored-mid-learn": (
        dict(measurement="probe", learn_fraction=0.25, block_order="mirrored"),
        U_RESUME + 7,
    ),
    "partial-train-mid-window": (
        dict(measurement="train", measure_steps=2, learn_fraction=0.5, block_order="mirrored"),
        U_RESUME + 2 * S + 1,
    ),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_is_exact(case):
    options, N = RESUME_CASES[case]
    total = 3 * U_RESUME + options.get("prior_steps", 0)
    options = {**options, "round_steps": U_RESUME, "seed": 7}
    sim_kw = dict(measure_noise=2.0, noise=1e-4, seed=3)

    whole = make(**options)
    straight = drive(whole, planted_sim(K, **sim_kw), 0, total, [], micro=2)

    sim = planted_sim(K, **sim_kw)
    first = make(**options)
    resumed = drive(first, sim, 0, N, [], micro=2)
    state = save_load(first.state_dict())
    fresh = make(**{**options, "seed": 7})
    fresh.load_state_dict(state)
    drive(fresh, sim, N, total, resumed, micro=2)

    assert len(resumed) == len(straight) == total
    for step, (a, b) in enumerate(zip(straight, resumed)):
        assert torch.equal(a, b), f"step {step}: {a.tolist()} != {b.tolist()}"
    assert_states_equal(whole.state_dict(), fresh.state_dict())
    # the run did update (so that the comparison means something)
    assert fresh.state_dict()["round_done"] == 2
    assert len({tuple(p.tolist()) for p in straight}) > K + 1


def test_state_dict_is_a_copy_and_load_does_not_alias():
    mixer = make(measurement="probe")
    drive(mixer, planted_sim(K), 0, 30)
    state = mixer.state_dict()
    before = mixer.state_dict()
    for value in state.values():
        if isinstance(value, torch.Tensor) and value.dtype.is_floating_point:
            value.fill_(123.0)
    assert_states_equal(mixer.state_dict(), before)
    other = make(measurement="probe")
    state = mixer.state_dict()
    other.load_state_dict(state)
    state["proportions"].fill_(0.0)
    assert_states_equal(other.state_dict(), before)


def test_load_state_dict_rejects_another_method_or_shape():
    state = make(measurement="probe").state_dict()
    with pytest.raises(ConfigError, match="mixer state is from mixing.method 'aioli', this run uses 'odm'"):
        build_mixer("odm", DOMAINS).load_state_dict(state)
    two = build_mixer("aioli", ["a", "b"], round_steps=40)
    with pytest.raises(ConfigError, match=r"mixer state is for domains \['a', 'b', 'c'\]"):
        two.load_state_dict(state)
    with pytest.raises(ConfigError, match="mixer state 'losses' has shape"):
        make(measurement="probe", sweeps=1, round_steps=24).load_state_dict(state)
    with pytest.raises(ConfigError, match=r"mixer state lacks \['A_bar'\]"):
        make().load_state_dict({k: v for k, v in state.items() if k != "A_bar"})


# ---- numerical safety ------------------------------------------------------------------------------


@pytest.mark.parametrize("update", ["ema", "cumulative"])
@pytest.mark.parametrize("measurement", ["probe", "train"])
def test_nan_and_inf_losses_never_give_nan_proportions(measurement, update):
    mixer = make(measurement=measurement, update=update, measure_steps=1)
    sim = planted_sim(K)
    gen = torch.Generator().manual_seed(0)
    missing = 0
    for step in range(4 * 24):
        if mixer.measurement_due(step):
            sums, counts = sim.probe_stats()
            bad = torch.rand(K, generator=gen) < 0.3
            kind = step % 3
            if kind == 0:
                sums = torch.where(bad, torch.full_like(sums, math.nan), sums)
            elif kind == 1:
                sums = torch.where(bad, torch.full_like(sums, math.inf), sums)
            else:
                counts = torch.where(bad, torch.zeros_like(counts), counts)
            missing += int(bad.sum())
            mixer.observe_measurement(step, sums, counts)
        p = mixer.proportions(step)
        assert torch.isfinite(p).all() and p.sum().item() == pytest.approx(1.0, abs=1e-5)
        sums, counts = sim.train_batch_stats(p)
        if measurement == "train" and (step % 24) % S == 0 and step % 24 <= LEARN:
            bad = torch.rand(K, generator=gen) < 0.3
            sums = torch.where(bad, torch.full_like(sums, math.nan if step % 2 else -math.inf), sums)
            counts = torch.where(bad, counts, counts.clamp_min(1))  # no accidental empty domain
            missing += int(bad.sum())
        mixer.observe(step, sums, counts)
        sim.train_step(p)
    assert mixer.metrics()["missing_measurements"].item() == missing > 0
    assert mixer.state_dict()["round_done"] == 3
    assert torch.isfinite(mixer.last_A_DD).all()


def test_a_round_without_any_measurement_leaves_cumulative_proportions_unchanged():
    mixer = make(measurement="probe", update="cumulative")
    nan_rows = [[[math.nan] * K for _ in range(R * K + 1)]]
    good = planted_losses(seed=5, rounds=1)
    _, exploit0 = run_with_given_measurements(mixer, good)
    p0 = exploit0[0].clone()
    seen, exploit1 = run_with_given_measurements_from(mixer, 1, nan_rows[0])
    assert torch.equal(exploit1, p0)
    assert mixer.metrics()["missing_measurements"].item() == (R * K + 1) * K
    assert torch.isfinite(mixer.last_A_DD).all()


def test_domain_absent_from_measurements_is_left_out_of_its_drops():
    mixer = make(measurement="probe", update="cumulative")
    rows = planted_losses(seed=6, rounds=1)[0]
    for n in (1, 2, 5):
        rows[n][2] = math.nan  # domain c absent from three measurements
    rows[3] = [math.nan] * K  # and one measurement without any domain
    seen, exploit = run_with_given_measurements_from(mixer, 0, rows)
    expected = expected_A(seen, mixer.order(0), K, F)
    torch.testing.assert_close(mixer.last_A_DD.double(), expected, atol=1e-4, rtol=1e-3)
    assert mixer.metrics()["missing_measurements"].item() == 3 + K
    assert torch.isfinite(exploit).all()


def test_domain_never_measured_gets_no_evidence():
    mixer = make(measurement="train")
    sim = planted_sim(K)
    for step in range(24):
        p = mixer.proportions(step)
        sums, counts = sim.train_batch_stats(p)
        counts[2] = 0.0  # domain c never appears in a training batch
        sums[2] = 0.0
        mixer.observe(step, sums, counts)
        sim.train_step(p)
    p = mixer.proportions(24)
    assert torch.isfinite(p).all()
    assert mixer.metrics()["missing_measurements"].item() == R * K + 1
    # row c of G is 0, so row c of A before the normalisation's shift is 0: after it, row c is constant
    row_c = mixer.last_A_DD[2]
    assert torch.allclose(row_c, row_c[0].expand(K))


@pytest.mark.parametrize("update", ["ema", "cumulative"])
def test_an_overflowing_round_is_skipped_and_counted(update):
    mixer = make(measurement="probe", update=update, eta=1.0)
    good = planted_losses(seed=7, rounds=1)[0]
    run_with_given_measurements_from(mixer, 0, good)
    before = mixer.state_dict()
    rows = planted_losses(seed=8, rounds=1)[0]
    rows[0][0] = 3.0e38  # a finite loss (sum over count=1 token) whose drop overflows A = G·W⁻¹:
    rows[0][1] = 3.0e38  # G[:, order[0]] ≈ 1.5e38 and W⁻¹ has 3 on its diagonal (k=3, f=0.5)
    seen, _ = run_with_given_measurements_from(mixer, 1, rows, count=1.0)
    assert seen[0][0] == pytest.approx(3.0e38) and mixer.metrics()["missing_measurements"].item() == 0
    G = lmo.accumulate_loss_drops(torch.tensor(seen), torch.tensor(mixer.order(1)), K)
    assert torch.isfinite(G).all() and not torch.isfinite(lmo.solve_mixing_law(G, mixer.W_inv_DD)).all()
    assert mixer.metrics()["skipped_updates"].item() == 1
    torch.testing.assert_close(mixer.state_dict()["proportions"], before["proportions"])
    torch.testing.assert_close(mixer.state_dict()["A_bar"], before["A_bar"])
    torch.testing.assert_close(mixer.last_A_DD, before["last_A"])


@pytest.mark.parametrize("update", ["ema", "cumulative"])
def test_an_overflow_to_plus_and_minus_inf_is_skipped_and_counted(update):
    # k = 2, f = 0.625: W⁻¹ = [[2.5, -1.5], [-1.5, 2.5]]; one sweep of one-step blocks, so G is the drop
    mixer = build_mixer(
        "aioli", ["a", "b"], measurement="probe", update=update, sweeps=1, block_steps=1, round_steps=4
    )

    def round_(r, rows, count):
        for step in range(4 * r, 4 * r + 4):
            if mixer.measurement_due(step):
                L = torch.tensor(rows[step - 4 * r], dtype=torch.float32)
                mixer.observe_measurement(step, L * count, torch.full((2,), count))
            mixer.proportions(step)

    round_(0, [[4.0, 4.0], [3.9, 3.95], [3.85, 3.8]], 64.0)
    before = mixer.state_dict()
    assert not torch.equal(before["last_A"], torch.zeros(2, 2))
    # round 1: domain a's first measurement is 3e38 (finite): G[a, order[0]] ≈ 3e38 and
    # A[a, :] = G[a, :] @ W⁻¹ = [+inf, -inf] in some order
    round_(1, [[3.0e38, 4.0], [1.0, 3.9], [0.9, 3.8]], 1.0)
    assert mixer.metrics()["missing_measurements"].item() == 0
    # normalize_mixing_matrix maps an A holding -inf to zeros: the guard must look before normalising
    assert mixer.metrics()["skipped_updates"].item() == 1
    torch.testing.assert_close(mixer.last_A_DD, before["last_A"])
    torch.testing.assert_close(mixer.state_dict()["A_bar"], before["A_bar"])
    torch.testing.assert_close(mixer.state_dict()["proportions"], before["proportions"])


def test_train_measurements_warn_when_domains_will_be_missing():
    names = [f"d{i}" for i in range(7)]
    paper = dict(learn_fraction=1.0, max_learn_share=1.0)
    seven = build_mixer("aioli", names, measurement="train", one_hot_factor=0.75, **paper)
    message = seven.train_measurement_warning(8)  # the paper's 7-domain setting: 0.33 sequences each
    assert message is not None and "about 0.33 sequences" in message and "measurement=probe" in message
    assert seven.train_measurement_warning(512) is None
    # a quarter of each batch on the block mixture: 8 x (0.75 / 7 + 0.25 x 0.25 / 6) = 0.94 sequences
    partial = build_mixer("aioli", names, measurement="train", learn_fraction=0.25)
    assert "about 0.94 sequences" in partial.train_measurement_warning(8)
    two = build_mixer("aioli", ["a", "b"], measurement="train", one_hot_factor=0.625)
    assert two.train_measurement_warning(8) is None  # 3 sequences of the other domain
    assert build_mixer("aioli", ["a", "b"], measurement="probe").train_measurement_warning(1) is None


def test_cumulative_restricted_mode_recovers_a_domain_the_prior_left_out():
    mixer = build_mixer(
        "aioli",
        ["a", "b"],
        measurement="probe",
        update="cumulative",
        proportions={"a": 1.0, "b": 0.0},
        prior_steps=2,
        sweeps=1,
        block_steps=1,
        round_steps=4,
        eta=1.0,
    )
    sim = planted_sim(2)
    record = drive(mixer, sim, 0, 2 + 4 + 4)
    assert record[0].tolist() == [1.0, 0.0]  # the prior phase
    assert record[2 + 4 + 3][1] > 0.05  # the learned proportions start from uniform, not the prior
