"""The GPT decoder: shapes, the in-forward per-domain loss, causality, RoPE, presets, validation, training.

Everything runs on a tiny config on CPU; the 160M preset is only built on the meta device to count its
parameters.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from aioli_fast.model import GPT, PRESETS, GPTConfig, ModelOutput, Rotary, preset_config

TINY = dict(vocab_size=97, max_seq_len=32, d_model=32, n_layers=2, n_heads=4, d_ff=64)


def tiny_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **overrides})).eval()


def batch(b: int = 3, t: int = 16, vocab: int = TINY["vocab_size"], num_domains: int = 3, seed: int = 0):
    """input_ids [B, T], labels [B, T] (next tokens, some ignored), domain_ids [B]."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (b, t + 1), generator=gen)
    input_ids, labels = tokens[:, :-1].clone(), tokens[:, 1:].clone()
    labels[0, :3] = -100
    domain_ids = torch.randint(0, num_domains, (b,), generator=gen)
    return input_ids, labels, domain_ids


def test_output_shapes_and_dtypes() -> None:
    model = tiny_model()
    input_ids, labels, domain_ids = batch()

    logits = model.logits(input_ids)
    out = model(input_ids, labels, domain_ids, num_domains=5)

    assert logits.shape == (3, 16, TINY["vocab_size"]) and logits.dtype == torch.float32
    assert model.hidden_states(input_ids).shape == (3, 16, TINY["d_model"])
    assert isinstance(out, ModelOutput)
    assert out.loss.shape == () and out.loss.dtype == torch.float32
    assert out.loss_sum.shape == (5,) and out.loss_sum.dtype == torch.float32
    assert out.count.shape == (5,) and out.count.dtype == torch.float32
    assert out.count.sum().item() == labels.numel() - 3


def test_loss_matches_cross_entropy_of_logits() -> None:
    model = tiny_model()
    num_domains = 4
    input_ids, labels, domain_ids = batch(b=4, num_domains=num_domains)
    domain_ids = torch.tensor([2, 0, 2, 3])  # domain 1 empty

    with torch.no_grad():
        out = model(input_ids, labels, domain_ids, num_domains)
        logits = model.logits(input_ids)

    expected_loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected_loss, rtol=0, atol=1e-5)

    token_loss_BT = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none", ignore_index=-100)
    valid_BT = labels != -100
    expected_sum = torch.full((num_domains,), float("nan"))
    expected_count = torch.full((num_domains,), float("nan"))
    for d in range(num_domains):
        rows = domain_ids == d
        expected_sum[d] = token_loss_BT[rows].sum()
        expected_count[d] = valid_BT[rows].sum()
    torch.testing.assert_close(out.loss_sum, expected_sum, rtol=1e-5, atol=1e-4)
    assert torch.equal(out.count, expected_count)
    assert out.loss_sum[1].item() == 0.0 and out.count[1].item() == 0.0


def test_domain_ids_per_sequence_and_per_token_agree() -> None:
    model = tiny_model()
    input_ids, labels, domain_ids_B = batch()
    domain_ids_BT = domain_ids_B[:, None].expand(-1, input_ids.shape[1]).contiguous()

    with torch.no_grad():
        per_seq = model(input_ids, labels, domain_ids_B, 3)
        per_tok = model(input_ids, labels, domain_ids_BT, 3)

    for a, b in zip(per_seq, per_tok, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_per_token_domains_split_a_sequence() -> None:
    """[B, T] domain ids let a packed sequence hold several domains."""
    model = tiny_model()
    input_ids, labels, _ = batch(b=2, t=10)
    labels[0, :3] = 5  # no ignored tokens in this test
    domain_ids_BT = torch.zeros(2, 10, dtype=torch.long)
    domain_ids_BT[:, 6:] = 1

    with torch.no_grad():
        out = model(input_ids, labels, domain_ids_BT, 2)
        token_loss_BT = F.cross_entropy(model.logits(input_ids).transpose(1, 2), labels, reduction="none")

    expected = torch.stack([token_loss_BT[:, :6].sum(), token_loss_BT[:, 6:].sum()])
    torch.testing.assert_close(out.loss_sum, expected, rtol=1e-5, atol=1e-4)
    assert out.count.tolist() == [12.0, 8.0]


@pytest.mark.parametrize("t", [0, 7, 14], ids=lambda t: f"t={t}")
def test_causal(t: int) -> None:
    model = tiny_model()
    input_ids, _, _ = batch(b=2, t=16)
    changed = input_ids.clone()
    changed[:, t + 1 :] = (changed[:, t + 1 :] + 1 + torch.arange(16 - t - 1)) % TINY["vocab_size"]

    with torch.no_grad():
        before, after = model.logits(input_ids), model.logits(changed)

    torch.testing.assert_close(after[:, : t + 1], before[:, : t + 1], rtol=0, atol=1e-6)
    assert not torch.allclose(after[:, t + 1 :], before[:, t + 1 :], atol=1e-3), "later logits unchanged"


def _rotary(head_dim: int = 16, rotary_fraction: float = 1.0, max_seq_len: int = 48) -> Rotary:
    cfg = GPTConfig(
        vocab_size=8,
        max_seq_len=max_seq_len,
        d_model=2 * head_dim,
        n_heads=2,
        d_ff=8,
        rotary_fraction=rotary_fraction,
    )
    return Rotary(cfg)


def test_rope_scores_depend_only_on_relative_position() -> None:
    """Rotate the same q (and the same k) at every position: q_m . k_n must depend only on m - n."""
    rotary = _rotary(head_dim=16, max_seq_len=48)
    gen = torch.Generator().manual_seed(0)
    b, h, t, dh = 2, 3, 48, 16
    q = torch.randn(b, h, 1, dh, generator=gen).expand(b, h, t, dh)
    k = torch.randn(b, h, 1, dh, generator=gen).expand(b, h, t, dh)

    rq, rk = rotary(q), rotary(k)
    scores_BHTT = rq @ rk.transpose(-1, -2)

    for offset in range(-(t - 1), t):
        diag = torch.diagonal(scores_BHTT, offset=offset, dim1=-2, dim2=-1)  # [B, H, t - |offset|]
        torch.testing.assert_close(diag, diag[..., :1].expand_as(diag), rtol=1e-5, atol=1e-4)
    # It is a rotation: norms are kept, position 0 is the identity, and other positions do move.
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rq[:, :, 0], q[:, :, 0])
    assert not torch.allclose(rq[:, :, 5], q[:, :, 5])
    # Scores really vary with the offset (a constant would also pass the diagonal check).
    assert scores_BHTT[..., 0, :].std(dim=-1).min() > 1e-3


def test_rope_shifted_positions_give_same_scores() -> None:
    """Random q, k sequences: shifting both by s positions leaves every score unchanged."""
    rotary = _rotary(head_dim=8, max_seq_len=40)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 1, 10, 8, generator=gen)  # [B, H, T, Dh]
    k = torch.randn(2, 1, 10, 8, generator=gen)
    shift = 13

    def scores(x_q, x_k, offset):
        """Scores of q and k placed at absolute positions offset .. offset + 9."""
        pad = torch.zeros(2, 1, offset, 8)
        rq = rotary(torch.cat([pad, x_q], dim=-2))[..., offset:, :]
        rk = rotary(torch.cat([pad, x_k], dim=-2))[..., offset:, :]
        return rq @ rk.transpose(-1, -2)

    torch.testing.assert_close(scores(q, k, shift), scores(q, k, 0), rtol=1e-5, atol=1e-5)


def test_partial_rotary_leaves_tail_dims_untouched() -> None:
    rotary = _rotary(head_dim=32, rotary_fraction=0.25)
    assert rotary.dims == 8
    x = torch.randn(2, 3, 20, 32)

    y = rotary(x)

    assert torch.equal(y[..., 8:], x[..., 8:])
    assert not torch.allclose(y[..., 1:, :8], x[..., 1:, :8])
    torch.testing.assert_close(y[..., :8].norm(dim=-1), x[..., :8].norm(dim=-1))


def test_rotary_dims_are_even() -> None:
    cfg = GPTConfig(**{**TINY, "d_model": 40, "n_heads": 2, "rotary_fraction": 0.25})  # head_dim 20
    assert cfg.rotary_dims == 4


def test_pythia_160m_preset_parameter_count() -> None:
    cfg = preset_config("pythia-160m")
    shape = (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.d_ff, cfg.vocab_size, cfg.rotary_dims)
    assert shape == (768, 12, 12, 3072, 50304, 16)
    with torch.device("meta"):
        model = GPT(cfg)
    assert sum(p.numel() for p in model.parameters()) == 162_322_944
    # The same, analytically: untied embed + lm_head, qkv/proj/up/down with biases, 2 LayerNorms per
    # block, final LayerNorm.
    c, f, v, n = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.n_layers
    per_block = (c * 3 * c + 3 * c) + (c * c + c) + (c * f + f) + (f * c + c) + 2 * 2 * c
    assert 2 * v * c + n * per_block + 2 * c == 162_322_944


@pytest.mark.parametrize("name", sorted(PRESETS), ids=str)
def test_presets_build(name: str) -> None:
    cfg = preset_config(name)
    assert dataclasses.asdict(cfg)["d_model"] == PRESETS[name]["d_model"]


def test_preset_overrides() -> None:
    cfg = preset_config("tiny", vocab_size=512, max_seq_len=None)
    assert cfg.vocab_size == 512
    assert cfg.max_seq_len == PRESETS["tiny"]["max_seq_len"]


BAD_CONFIGS = {
    "d_model-not-divisible": (dict(d_model=30, n_heads=4), "divisible"),
    "n_layers-zero": (dict(n_layers=0), "n_layers must be a positive integer"),
    "vocab-float": (dict(vocab_size=97.0), "vocab_size must be a positive integer"),
    "rotary-fraction-zero": (dict(rotary_fraction=0.0), "rotary_fraction"),
    "rotary-fraction-above-1": (dict(rotary_fraction=1.5), "rotary_fraction"),
    "rotary-too-few-dims": (dict(rotary_fraction=0.1), "rotary_fraction"),
}


@pytest.mark.parametrize("bad", list(BAD_CONFIGS), ids=list(BAD_CONFIGS))
def test_config_validation(bad: str) -> None:
    override, message = BAD_CONFIGS[bad]
    with pytest.raises(ValueError, match=message):
        GPTConfig(**{**TINY, **override})


def test_unknown_preset() -> None:
    with pytest.raises(ValueError, match="unknown model preset 'nope'"):
        preset_config("nope")


def test_forward_input_validation() -> None:
    model = tiny_model()
    input_ids, labels, domain_ids = batch(b=2, t=8)
    too_long = torch.zeros(1, TINY["max_seq_len"] + 1, dtype=torch.long)

    with pytest.raises(ValueError, match="exceeds model.max_seq_len=32"):
        model.logits(too_long)
    with pytest.raises(ValueError, match="exceeds model.max_seq_len=32"):
        model(too_long, too_long, torch.zeros(1, dtype=torch.long), 1)
    with pytest.raises(ValueError, match=r"input_ids must be \[B, T\]"):
        model.logits(input_ids[0])
    with pytest.raises(ValueError, match="labels must have shape"):
        model(input_ids, labels[:, :-1], domain_ids, 3)
    with pytest.raises(ValueError, match="domain_ids must have shape"):
        model(input_ids, labels, domain_ids[:1], 3)


def test_max_seq_len_is_accepted() -> None:
    model = tiny_model()
    out = model.logits(torch.zeros(1, TINY["max_seq_len"], dtype=torch.long))
    assert out.shape == (1, TINY["max_seq_len"], TINY["vocab_size"])


def test_gradients_reach_every_parameter() -> None:
    model = tiny_model().train()
    input_ids, labels, domain_ids = batch()

    out = model(input_ids, labels, domain_ids, 3)
    (out.loss + 0.1 * out.loss_sum.sum()).backward()

    for name, p in model.named_parameters():
        assert p.grad is not None, f"no gradient reached {name}"
        assert torch.isfinite(p.grad).all(), f"non-finite gradient in {name}"
        assert p.grad.abs().sum() > 0, f"zero gradient in {name}"


def test_init_follows_config() -> None:
    model = tiny_model(init_std=0.02)
    assert torch.equal(model.blocks[0].ln_attn.weight, torch.ones(TINY["d_model"]))
    assert torch.equal(model.blocks[0].attn.qkv.bias, torch.zeros(3 * TINY["d_model"]))
    assert 0.015 < model.embed.weight.std().item() < 0.025
    assert model.blocks[0].mlp.down.weight.std().item() < model.blocks[0].mlp.up.weight.std().item()


def test_training_on_a_fixed_batch_lowers_the_loss() -> None:
    model = tiny_model(seed=0).train()
    input_ids, labels, domain_ids = batch(b=4, t=16, seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []

    for _ in range(30):
        optimizer.zero_grad(set_to_none=True)
        out = model(input_ids, labels, domain_ids, 3)
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())

    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0], losses


def test_config_is_a_dataclass_with_plain_dict() -> None:
    cfg = GPTConfig(**TINY)
    assert GPTConfig(**dataclasses.asdict(cfg)) == cfg
    assert dataclasses.is_dataclass(cfg)


def test_meta_device_build_then_reset_equals_a_direct_build():
    cfg = preset_config("tiny", rotary_fraction=0.5)
    with torch.device("meta"):
        lazy = GPT(cfg)
    lazy = lazy.to_empty(device="cpu")
    lazy.reset_parameters()
    direct = GPT(cfg)
    for a, b in zip(lazy.blocks, direct.blocks):
        assert torch.equal(a.attn.rotary.cos_TR, b.attn.rotary.cos_TR)
        assert torch.equal(a.attn.rotary.sin_TR, b.attn.rotary.sin_TR)
