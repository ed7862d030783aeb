"""Mixer benchmarks: the cost of one Aioli round update, and how well each measurement source estimates A.

1. Update time for k domains: the on-device update (G from the sequential drops, A = G·W⁻¹, normalise,
   exponentiated gradient; what ``AioliMixer`` runs once per round) against a host baseline written the
   way the published research code works (numpy, a Python loop over blocks, ``np.linalg.inv`` of W).
2. Estimation error of A on the linear-law simulator (``aioli_fast.harness.sim``), same planted A and the
   same training steps for every source, with the extra tokens each source evaluates per round:
   ``full_val`` (a whole validation split per measurement), ``probe`` (a small fixed probe), ``train``
   (the training batches themselves; zero extra tokens).
3. The cost of the default, ``measurement: round``, for k domains: what each training micro-batch adds
   (k 3 x 3 outer products added to two sums, the exposure and the decay) and the update at a round's
   start (the trend fit and the gated update), on the device.

    python3 benchmarks/bench_mixer.py                 # both tables
    python3 benchmarks/bench_mixer.py --device cuda   # the update timing on a GPU
    python3 benchmarks/bench_mixer.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import numpy as np
import torch

from aioli_fast.harness.sim import LinearLawSimulator, run_mixer
from aioli_fast.mixing import build_mixer, lmo


def device_update(L_nk, order, W_inv, p, A_prev, eta, ema):
    """The per-round update as AioliMixer runs it (EMA variant), on L_nk's device."""
    G = lmo.accumulate_loss_drops(L_nk, order, p.shape[0])
    A = lmo.normalize_mixing_matrix(lmo.solve_mixing_law(G, W_inv))
    A_bar = lmo.ema_matrix(A, A_prev, ema)
    return lmo.ema_proportions(A_bar, eta), A_bar


def host_update(L_nk: np.ndarray, order: list[int], f: float, A_prev: np.ndarray, eta: float, ema: float):
    """Baseline: numpy on the host, a loop over blocks, an explicit inverse (the research-code pattern)."""
    k = L_nk.shape[1]
    G = np.zeros((k, k))
    for n, j in enumerate(order):
        G[:, j] += L_nk[n] - L_nk[n + 1]
    G /= len(order) // k
    W = np.full((k, k), (1 - f) / (k - 1))
    np.fill_diagonal(W, f)
    A = G @ np.linalg.inv(W)
    if A.min() < 0:
        A -= A.min()
    A /= A.sum()
    A_bar = (1 - ema) * A + ema * A_prev
    w = np.exp(eta * A_bar.sum(axis=0))
    return w / w.sum(), A_bar


def _time(fn, repeats: int, sync) -> float:
    for _ in range(3):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_update(ks, device: str, repeats: int) -> list[dict]:
    rows = []
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for k in ks:
        R, f, eta, ema = 2, 0.75, 1.0, 0.1
        gen = torch.Generator().manual_seed(k)
        order = lmo.learn_params_order(k, R, gen)
        L = 4 + torch.rand(R * k + 1, k, generator=gen)
        L_dev, order_dev = L.to(dev), order.to(dev)
        W_inv = lmo.smoothed_one_hot_inverse(k, f, device=dev)
        p = torch.full((k,), 1 / k, device=dev)
        A_prev = torch.zeros(k, k, device=dev)
        args = (L_dev, order_dev, W_inv, p, A_prev, eta, ema)
        ours = _time(lambda args=args: device_update(*args), repeats, sync)
        L_np, order_list, A_np = L.double().numpy(), order.tolist(), np.zeros((k, k))
        host_args = (L_np, order_list, f, A_np, eta, ema)
        base = _time(lambda host_args=host_args: host_update(*host_args), repeats, lambda: None)
        p_dev, _ = device_update(L_dev, order_dev, W_inv, p, A_prev, eta, ema)
        p_host, _ = host_update(L_np, order_list, f, A_np, eta, ema)
        err = float(np.abs(p_dev.double().cpu().numpy() - p_host).max())
        rows.append({"k": k, "device_us": ours * 1e6, "host_numpy_us": base * 1e6, "max_abs_diff_p": err})
    return rows


def bench_round(ks, device: str, repeats: int, steps: int = 400) -> list[dict]:
    """What ``measurement: round`` costs, k domains: ``AioliMixer.observe`` itself (the mixer built with
    the defaults, as a run builds it) timed call by call over a run of ``steps`` steps, ``repeats``
    times. A micro-batch's call adds its per-domain loss sums to the trend statistics; the call at a
    round's start also fits the trends and applies the gated update (one all-reduce under several
    ranks). Calls before the fit starts (the first part of the uniform phase) do nothing and are left
    out, as is the first round's start when its fit is too short to act on (it only marks the round).
    """
    rows = []
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for k in ks:
        gen = torch.Generator().manual_seed(k)
        slope = 0.002 * torch.rand(k, generator=gen)  # each domain's loss falls at its own rate
        per_batch, per_update = [], []
        for _ in range(repeats):
            mixer = build_mixer("aioli", [f"d{i}" for i in range(k)], dev, total_steps=steps, warmup_steps=20)
            first = mixer.fit_start()
            for step in range(steps):
                counts = torch.randint(1, 512, (k,), generator=gen).double()
                losses = 4 - slope * step + 0.05 * torch.randn(k, generator=gen, dtype=torch.float64)
                sums_D, counts_D = (losses * counts).float().to(dev), counts.float().to(dev)
                done = (mixer._round_done, len(mixer._rounds))
                sync()
                start = time.perf_counter()
                mixer.observe(step, sums_D, counts_D)
                sync()
                took = time.perf_counter() - start
                if len(mixer._rounds) != done[1]:  # a round's fit and update ran
                    per_update.append(took)
                elif step >= first and mixer._round_done == done[0]:
                    per_batch.append(took)
        rows.append(
            {
                "k": k,
                "steps": steps,
                "round_steps": mixer.plan.round_steps,
                "observe_us": statistics.median(per_batch) * 1e6,
                "update_us": statistics.median(per_update) * 1e6,
                "micro_batches": len(per_batch),
                "updates": len(per_update),
            }
        )
    return rows


def bench_estimation(seeds: int, k: int = 3) -> list[dict]:
    """Error of the normalised A after one round, per measurement source, averaged over seeds."""
    R, S, U = 4, 4, 60
    batch_tokens, val_tokens, probe_tokens = 8 * 2048, 256 * 2048, 16 * 2048
    setups = [
        ("full_val", {"measurement": "full_val"}, val_tokens),
        ("probe", {"measurement": "probe"}, probe_tokens),
        ("train (measure_steps=1)", {"measurement": "train", "measure_steps": 1}, 0),
        ("train (measure_steps=S)", {"measurement": "train", "measure_steps": S}, 0),
    ]
    rows = []
    for name, options, eval_tokens in setups:
        errors = []
        for seed in range(seeds):
            sim = LinearLawSimulator.random(
                k,
                seed=seed,
                scale=2e-3,
                measure_noise=2.5,  # std of one token's loss, in nats
                tokens_per_step=batch_tokens,
                probe_tokens=eval_tokens or probe_tokens,
            )
            mixer = build_mixer(
                "aioli",
                [f"d{i}" for i in range(k)],
                sweeps=R,
                block_steps=S,
                round_steps=U,
                seed=seed,
                **options,
            )
            run_mixer(mixer, sim, U)
            truth = lmo.normalize_mixing_matrix(sim.A0_kk.float())
            errors.append(float((mixer.last_A_DD - truth).abs().mean()))
        extra = eval_tokens * k * (R * k + 1)
        rows.append(
            {
                "source": name,
                "extra_tokens_per_round": extra,
                "training_tokens_per_round": U * batch_tokens,
                "A_error_mean": statistics.mean(errors),
                "A_error_std": statistics.pstdev(errors),
            }
        )
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--ks", default="2,7,64,512")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument(
        "--threads", type=int, default=1, help="CPU threads for torch (a k x k update is too small to share)"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or "unknown",
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
    }
    print(f"# {env}")
    update = bench_update([int(k) for k in args.ks.split(",")], args.device, args.repeats)
    print("\nAioli round update (median of", args.repeats, "runs)")
    print(f"{'k':>5}  {'ours (device) us':>17}  {'host numpy us':>14}  {'speed-up':>8}  {'max |dp|':>9}")
    for r in update:
        print(
            f"{r['k']:>5}  {r['device_us']:>17.1f}  {r['host_numpy_us']:>14.1f}  "
            f"{r['host_numpy_us'] / r['device_us']:>7.2f}x  {r['max_abs_diff_p']:>9.1e}"
        )
    rounds = bench_round([int(k) for k in args.ks.split(",")], args.device, max(1, args.repeats // 10))
    n_batches, n_updates = rounds[0]["micro_batches"], rounds[0]["updates"]
    print("\nmeasurement: round (the default): AioliMixer.observe per call,")
    print(f"median of {n_batches} micro-batches and {n_updates} updates per k")
    print(f"{'k':>5}  {'per micro-batch us':>18}  {'update us':>10}")
    for r in rounds:
        print(f"{r['k']:>5}  {r['observe_us']:>18.1f}  {r['update_us']:>10.1f}")
    estimation = bench_estimation(args.seeds)
    print(f"\nEstimation of A after one round (k=3, R=4, S=4, simulator, mean over {args.seeds} seeds)")
    print(
        f"{'source':<26}  {'extra tokens/round':>18}  {'train tokens/round':>18}  {'|A - A_true| mean':>18}"
    )
    for r in estimation:
        print(
            f"{r['source']:<26}  {r['extra_tokens_per_round']:>18,}  {r['training_tokens_per_round']:>18,}  "
            f"{r['A_error_mean']:>10.4f} ± {r['A_error_std']:.4f}"
        )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"env": env, "update": update, "round": rounds, "estimation": estimation}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
