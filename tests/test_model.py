"""MemMamba's parallel, chunked and token-by-token forms compute one function (fp32, CPU)."""
import dataclasses
import random

import pytest
import torch

from model import MemMambaConfig, MemMambaLM, build_model
from model.config import SIZES

# Small windows and a high tau1 so that some windows make no note, a small pool so that
# notes get evicted, and cross-layer attention on every second layer.
TEST_CONFIG = MemMambaConfig(d_model=32, n_layer=4, vocab_size=97, d_state=4, summary_dim=8, pool_size=3,
                             note_window=4, tau1=0.55, tau2=0.45, attn_dim=16, attn_heads=2,
                             cross_layer_every=2, cross_layer_span=2)
SPLITS = [[41], [5, 1, 11, 13, 11], [4, 4, 33], [1] * 6 + [35], [3, 38]]


def make_model(seed=0, **overrides) -> MemMambaLM:
    torch.manual_seed(seed)
    return MemMambaLM(dataclasses.replace(TEST_CONFIG, **overrides)).eval()


def tokens(batch=3, T=41, seed=1, vocab=97):
    return torch.randint(0, vocab, (batch, T), generator=torch.Generator().manual_seed(seed))


def chunked(model, ids, sizes):
    state, outs = None, []
    start = 0
    for size in sizes:
        logits, state = model(ids[:, start:start + size], state)
        outs.append(logits)
        start += size
    return torch.cat(outs, 1), state


def assert_states_equal(a, b):
    assert a.position == b.position
    for la, lb in zip(a.layers, b.layers):
        torch.testing.assert_close(la.mixer.conv, lb.mixer.conv, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(la.mixer.ssm, lb.mixer.ssm, rtol=1e-5, atol=1e-5)
        if la.notes is not None:
            assert torch.equal(la.notes.window, lb.notes.window)
            torch.testing.assert_close(la.notes.notes, lb.notes.notes, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(la.notes.importance, lb.notes.importance, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(la.notes.open_acc, lb.notes.open_acc, rtol=1e-5, atol=1e-5)
            assert torch.equal(la.notes.open_count, lb.notes.open_count)
            torch.testing.assert_close(la.notes.open_importance, lb.notes.open_importance, rtol=1e-5, atol=1e-5)


POLICIES = [dict(pool_policy="fifo"), dict(pool_policy="priority"), dict(pooling="mean"),
            dict(fusion="gated"), dict(fusion="residual"), dict(notes=False)]


@pytest.mark.parametrize("overrides", POLICIES, ids=lambda o: "-".join(map(str, o.values())))
@pytest.mark.parametrize("sizes", SPLITS, ids=lambda s: "+".join(map(str, s)))
def test_forward_equals_chunked_forward(overrides, sizes):
    model = make_model(**overrides)
    ids = tokens()
    with torch.no_grad():
        full, state = model(ids)
        parts, parts_state = chunked(model, ids, sizes)
    torch.testing.assert_close(parts, full, rtol=1e-5, atol=1e-5)
    assert_states_equal(parts_state, state)


@pytest.mark.parametrize("overrides", POLICIES[:3], ids=lambda o: "-".join(map(str, o.values())))
def test_forward_equals_step_by_step(overrides):
    model = make_model(**overrides)
    ids = tokens()
    with torch.no_grad():
        full, state = model(ids)
        step_state, outs = model.allocate_state(ids.shape[0]), []
        for t in range(ids.shape[1]):
            logits, step_state = model.step(ids[:, t], step_state)
            outs.append(logits)
    torch.testing.assert_close(torch.stack(outs, 1), full, rtol=1e-5, atol=1e-5)
    assert_states_equal(step_state, state)


@pytest.mark.parametrize("window", [1, 2, 3, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_priority_ties_go_to_the_newer_note_in_every_form(window, seed):
    """At layer 0 a token's importance depends on its id alone, so windows whose most important token is the same
    id tie. The whole, chunked and streaming forms compute that importance through products of different shapes,
    whose last bits differ; the newer note must win the tie in all of them."""
    model = make_model(seed, pool_policy="priority", note_window=window, pool_size=1, tau1=0.3)
    ids = tokens(vocab=3, seed=seed + 10)                    # three token ids: ties in every row
    with torch.no_grad():
        full, state = model(ids)
        for sizes in ([1, 40], [5, 1, 11, 13, 11]):
            parts, parts_state = chunked(model, ids, sizes)
            torch.testing.assert_close(parts, full, rtol=1e-5, atol=1e-5)
            assert_states_equal(parts_state, state)
        prefix, prefix_state = chunked(model, ids[:, :20], [7, 13])
        torch.testing.assert_close(prefix, full[:, :20], rtol=1e-5, atol=1e-5)
        outs = []
        for t in range(20, ids.shape[1]):
            logits, prefix_state = model.step(ids[:, t], prefix_state)
            outs.append(logits)
    torch.testing.assert_close(torch.stack(outs, 1), full[:, 20:], rtol=1e-5, atol=1e-5)
    assert_states_equal(prefix_state, state)


@pytest.mark.parametrize("overrides", POLICIES[1:3] + POLICIES[-1:], ids=lambda o: "-".join(map(str, o.values())))
def test_bf16_autocast_keeps_the_ssm_state_in_fp32_and_the_forms_agree(overrides):
    """What a GPU runs with train.precision bf16, under the CPU's autocast: logits near fp32's, the forms agreeing to
    bf16's precision, and the SSM state that crosses chunks in fp32."""
    model = make_model(**overrides)
    ids = tokens()
    with torch.no_grad():
        fp32, _ = model(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            full, state = model(ids)
            parts, parts_state = chunked(model, ids, SPLITS[1])
            step_state, steps = model.allocate_state(ids.shape[0]), []
            for t in range(ids.shape[1]):
                logits, step_state = model.step(ids[:, t], step_state)
                steps.append(logits)
    assert full.dtype == torch.bfloat16
    for logits in (full, parts, torch.stack(steps, 1)):
        torch.testing.assert_close(logits.float(), fp32, rtol=0.02, atol=0.02)
    for layer_states in zip(state.layers, parts_state.layers, step_state.layers):
        assert all(layer.mixer.ssm.dtype == torch.float32 for layer in layer_states)


@pytest.mark.parametrize("overrides", POLICIES[1:3] + POLICIES[-1:], ids=lambda o: "-".join(map(str, o.values())))
def test_a_bf16_model_keeps_the_ssm_state_in_fp32_in_every_form(overrides):
    """Weights in bf16 (as DeepSpeed's bf16 mode holds them), not autocast: the SSM state that crosses chunks and
    tokens is still fp32, allocated, carried by a forward and carried by a step; logits near fp32's."""
    ids = tokens()
    with torch.no_grad():
        fp32, _ = make_model(**overrides)(ids)
        model = make_model(**overrides).to(torch.bfloat16)
        allocated = model.allocate_state(ids.shape[0])
        full, state = model(ids)
        parts, parts_state = chunked(model, ids, SPLITS[1])
        step_state, steps = allocated, []
        for t in range(ids.shape[1]):
            logits, step_state = model.step(ids[:, t], step_state)
            steps.append(logits)
    for logits in (full, parts, torch.stack(steps, 1)):
        torch.testing.assert_close(logits.float(), fp32, rtol=0.02, atol=0.02)
    for layer_states in zip(allocated.layers, state.layers, parts_state.layers, step_state.layers):
        assert all(layer.mixer.ssm.dtype == torch.float32 for layer in layer_states)


def test_thresholds_are_active_in_the_equivalence_tests():
    """Some windows make no note, some notes are evicted, some tokens skip the attention."""
    model = make_model()
    ids = tokens()
    layer = model.layers[0]
    with torch.no_grad():
        u = layer.norm(model.embedding(ids))
        gates, note, *_ = layer._memory_inputs(u)
        view, _ = layer.notes(gates[..., 0], note, None, 0)
        gate = gates[..., 1]
    complete_windows = ids.shape[1] // TEST_CONFIG.note_window
    seen = torch.zeros(view.notes.shape[:2]).scatter_add(1, view.members.flatten(1), view.valid.flatten(1).float())
    made = (seen > 0).sum(-1)                              # FIFO: every made note is in a pool once
    assert (made < complete_windows).any()                 # a window without any kept token
    assert (made > TEST_CONFIG.pool_size).any()            # evictions happened
    assert (view.valid.sum(-1) == TEST_CONFIG.pool_size).any()
    assert ((gate > TEST_CONFIG.tau2).any() and (gate <= TEST_CONFIG.tau2).any())


@pytest.mark.parametrize("overrides", POLICIES[:2], ids=lambda o: o["pool_policy"])
def test_causality(overrides):
    model = make_model(**overrides)
    ids = tokens(batch=1)
    with torch.no_grad():
        before, _ = model(ids)
        for t in (0, 13, 27, 40):
            changed = ids.clone()
            changed[0, t] = (changed[0, t] + 1) % TEST_CONFIG.vocab_size
            after, _ = model(changed)
            torch.testing.assert_close(after[:, :t], before[:, :t], rtol=0, atol=1e-6)
            assert not torch.allclose(after[:, t], before[:, t])


def test_batch_items_are_independent():
    model = make_model(pool_policy="priority")
    ids = tokens(batch=4)
    with torch.no_grad():
        batched, _ = model(ids)
        for b in range(4):
            alone, _ = model(ids[b:b + 1])
            torch.testing.assert_close(alone[0], batched[b], rtol=1e-5, atol=1e-5)


def test_notes_off_is_plain_mamba():
    from tests.reference import mamba_lm_reference
    model = make_model(notes=False)
    assert not any("memory" in n or "attention" in n for n, _ in model.named_parameters())
    state_dict = {("backbone." + k if not k.startswith("lm_head") else k): v
                  for k, v in model.state_dict().items()}
    ids = tokens()
    with torch.no_grad():
        ours, _ = model(ids)
        ref = mamba_lm_reference(state_dict, ids, TEST_CONFIG.n_layer)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def reference_weights(model: MemMambaLM) -> dict:
    """The model's weights as memmamba_lm_reference reads them."""
    weights = {"embedding": model.embedding.weight, "norm_f": model.norm_f.weight, "lm_head": model.lm_head.weight,
               "layers": []}
    for layer in model.layers:
        mixer = dict(layer.mixer.named_parameters())
        # memory_in's rows: the gates' logits (I_token, I_state, the two fusion gates if gated), N^l, the queries
        gates, note, *queries = layer.memory_in.weight.split(layer.memory_split)
        w = {"norm": layer.norm.weight, "mixer": mixer, "note": note,
             "importance": (gates[0], layer.gate_bias[0]), "state_gate": (gates[1], layer.gate_bias[1])}
        for name, q in zip(("token", "layer"), queries):
            attention = getattr(layer, f"{name}_attention")
            k, v = attention.kv_proj.weight.chunk(2)
            w[name] = {"q": q, "k": k, "v": v, "out": attention.out_proj.weight}
        if layer.fusion == "weighted":
            w["fusion_weight"] = layer.fusion_weight
        elif layer.fusion == "gated":
            w["fusion_gate"] = (gates[2:], layer.gate_bias[2:])
        weights["layers"].append(w)
    return weights


# norm_eps 1e-2: larger than the mean square of the embeddings (std 0.02), so a norm that ignored it would show
@pytest.mark.parametrize("overrides", POLICIES[:5] + [dict(norm_eps=1e-2)],
                         ids=lambda o: "-".join(map(str, o.values())))
def test_forward_equals_the_reference_written_from_the_design(overrides):
    from tests.reference import memmamba_lm_reference
    model = make_model(**overrides)
    ids = tokens()
    with torch.no_grad():
        ours, _ = model(ids)
        ref = memmamba_lm_reference(reference_weights(model), model.config, ids)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides", [dict(), dict(fusion="gated", pool_policy="priority"), dict(pooling="mean")],
                         ids=["weighted-fifo", "gated-priority", "mean"])
def test_gradients_equal_those_of_the_reference_written_from_the_design(overrides):
    """Gradients flow through I_token (it scales the note), the notes, and I_state where it is active; the
    thresholds pass none. The reference is plain autograd through the design's equations."""
    from tests.reference import memmamba_lm_reference
    model = make_model(**overrides).train()
    ids = tokens(batch=2, T=21)
    w = torch.linspace(-1, 1, 21 * TEST_CONFIG.vocab_size).view(1, 21, -1).sin()   # weighs every logit differently
    grads = []
    for run in (lambda: model(ids)[0], lambda: memmamba_lm_reference(reference_weights(model), model.config, ids)):
        model.zero_grad()
        (run() * w).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, ref in grads[1].items():
        torch.testing.assert_close(grads[0][name], ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item(), msg=name)


def plain_mamba_with_the_same_backbone(model: MemMambaLM) -> MemMambaLM:
    plain = make_model(notes=False)
    backbone = {k: v for k, v in model.state_dict().items() if k in plain.state_dict()}
    assert backbone.keys() == plain.state_dict().keys()
    plain.load_state_dict(backbone)
    return plain


@pytest.mark.parametrize("gate", ["importance", "state_gate"])
def test_a_gate_exactly_at_its_threshold_does_not_pass(gate):
    """A token is kept if I_token > tau1 and reads its pool if I_state > tau2, strictly. With that gate's logits
    zeroed every token's gate is sigmoid(0) = 0.5 exactly, and with the threshold at 0.5 no token passes: no
    note is taken (so nothing is read at any layer), or no token reads its pool. Cross-layer attention is off
    in the second case, so either way every layer is its plain Mamba mixer."""
    row = {"importance": 0, "state_gate": 1}[gate]
    thresholds = dict(tau1=0.5) if gate == "importance" else dict(tau1=0.3, tau2=0.5, cross_layer_every=5)
    model = make_model(**thresholds)
    with torch.no_grad():
        for layer in model.layers:
            layer.memory_in.weight[row] = 0.0
            layer.gate_bias[row] = 0.0
    plain = plain_mamba_with_the_same_backbone(model)
    ids = tokens(T=21)
    with torch.no_grad():
        expected, _ = plain(ids)
        full, _ = model(ids)
        state, steps = None, []
        for t in range(ids.shape[1]):
            logits, state = model.step(ids[:, t], state)
            steps.append(logits)
    torch.testing.assert_close(full, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.stack(steps, 1), expected, rtol=1e-5, atol=1e-5)


def random_config(rng: random.Random) -> MemMambaConfig:
    """A small MemMamba with every setting drawn at random, edge values included: windows of one token, pools of
    one note, every token kept (tau1=0), every token reading (tau2=0), cross-layer spans longer than the model."""
    heads = rng.choice([1, 2, 4])
    return MemMambaConfig(
        d_model=rng.choice([8, 16, 24]), n_layer=rng.randint(1, 5), vocab_size=31, d_state=rng.choice([1, 2, 4]),
        d_conv=rng.choice([2, 3, 4]), expand=rng.choice([1, 2]), summary_dim=rng.choice([1, 3, 8]),
        pool_size=rng.randint(1, 6), note_window=rng.randint(1, 9), tau1=rng.choice([0.0, 0.3, 0.5, 0.6]),
        tau2=rng.choice([0.0, 0.4, 0.5, 0.6]), pool_policy=rng.choice(["fifo", "priority"]),
        pooling=rng.choice(["max", "mean"]), cross_layer_every=rng.randint(1, 4), cross_layer_span=rng.randint(1, 5),
        fusion=rng.choice(["weighted", "gated", "residual"]), attn_dim=heads * rng.choice([2, 4]), attn_heads=heads)


def random_split(rng: random.Random, T: int) -> list[int]:
    sizes = []
    while T:
        sizes.append(rng.randint(1, T))
        T -= sizes[-1]
    return sizes


@pytest.mark.parametrize("seed", range(40))
def test_random_models_agree_in_every_form(seed):
    """Whole; in chunks cut at random; streamed token by token after a chunked prefix; the design's reference."""
    from tests.reference import memmamba_lm_reference
    rng = random.Random(seed)
    config = random_config(rng)
    batch, T = rng.randint(1, 3), rng.randint(1, 40)
    torch.manual_seed(seed)
    model = MemMambaLM(config).eval()
    ids = tokens(batch, T, seed, vocab=config.vocab_size)
    prefix = rng.randint(0, T - 1)
    with torch.no_grad():
        full, state = model(ids)
        parts, parts_state = chunked(model, ids, random_split(rng, T))
        step_state = chunked(model, ids[:, :prefix], random_split(rng, prefix))[1] if prefix else \
            model.allocate_state(batch)
        steps = []
        for t in range(prefix, T):
            logits, step_state = model.step(ids[:, t], step_state)
            steps.append(logits)
        reference = memmamba_lm_reference(reference_weights(model), config, ids)
    torch.testing.assert_close(parts, full, rtol=1e-5, atol=1e-5)
    assert_states_equal(parts_state, state)
    torch.testing.assert_close(torch.stack(steps, 1), full[:, prefix:], rtol=1e-5, atol=1e-5)
    assert_states_equal(step_state, state)
    torch.testing.assert_close(full, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fusion", ["weighted", "gated", "residual"])
def test_gradients_reach_every_memory_parameter(fusion):
    model = make_model(fusion=fusion).train()
    logits, _ = model(tokens())
    logits.logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("batch", [1, 3])
def test_channels_first_projection_is_a_linear_layer_with_time_contiguous(batch):
    """The mixer's projections give what nn.Linear gives, in the layout the conv and scan kernels read."""
    from model.mixer import ChannelsFirstLinear

    torch.manual_seed(0)
    layer = ChannelsFirstLinear(5, 7, bias=True)
    reference = torch.nn.Linear(5, 7)
    reference.load_state_dict(layer.state_dict())
    u = torch.randn(batch, 11, 5, requires_grad=True)
    out = layer(u.transpose(1, 2))
    assert out.shape == (batch, 7, 11) and out.stride(-1) == 1
    expected = reference(u).transpose(1, 2)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, [u, layer.weight, layer.bias], grad)
    theirs = torch.autograd.grad(expected, [u, reference.weight, reference.bias], grad)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = tokens()
    grads = []
    for checkpointing in (False, True):
        model = make_model().train()
        model.gradient_checkpointing = checkpointing
        logits, _ = model(ids)
        logits.logsumexp(-1).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("arch", ["memmamba", "transformer"])
@pytest.mark.parametrize("size", ["tiny", "130m", "200m"])
def test_named_sizes_have_the_parameter_count_their_name_says(arch, size):
    with torch.device("meta"):
        model = build_model({"arch": arch, "size": size})
    count = sum(p.numel() for p in model.parameters())
    if size == "tiny":
        assert count < 1_000_000
    else:
        expected = int(size.removesuffix("m")) * 1_000_000
        assert abs(count - expected) <= 0.1 * expected, f"{count / 1e6:.1f}M"


def test_tiny_memmamba_and_transformer_are_matched_in_size():
    counts = [sum(p.numel() for p in build_model({"arch": a, "size": "tiny"}).parameters())
              for a in ("memmamba", "transformer")]
    assert abs(counts[0] - counts[1]) < 0.15 * counts[0]


def test_sizes_table_names_every_arch():
    assert set(SIZES) == {"memmamba", "transformer"}


def test_generate_greedy_is_the_argmax_of_the_forward_pass():
    model = make_model()
    prompt = tokens(batch=2, T=9)
    out = model.generate(prompt, 6, greedy=True)
    assert out.shape == (2, 15) and torch.equal(out[:, :9], prompt)
    with torch.no_grad():
        logits, _ = model(out[:, :-1])
    assert torch.equal(logits[:, 8:].argmax(-1), out[:, 9:])


def test_generation_draws_only_ids_below_vocab_size():
    """A tokenizer smaller than the model's vocabulary: ids it lacks are never drawn."""
    model = make_model()
    prompt = tokens(batch=2, T=9)
    out = model.generate(prompt, 6, greedy=True, vocab_size=10)
    with torch.no_grad():
        logits, _ = model(out[:, :-1])
    assert torch.equal(logits[:, 8:, :10].argmax(-1), out[:, 9:])
    assert not torch.equal(logits[:, 8:].argmax(-1), out[:, 9:])      # the whole vocabulary would differ
    sampled = model.generate(prompt, 50, temperature=2.0, vocab_size=10, generator=torch.Generator().manual_seed(0))
    assert (sampled[:, 9:] < 10).all()


def test_top_k_sampling_stays_in_the_top_k():
    from model.generation import sample
    logits = torch.randn(4, 50)
    g = torch.Generator().manual_seed(0)
    top3 = torch.topk(logits, 3).indices
    for _ in range(20):
        token = sample(logits, temperature=1.5, top_k=3, generator=g)
        assert (top3 == token[:, None]).any(1).all()
    assert torch.equal(sample(logits, top_k=1, generator=g), logits.argmax(-1))


def test_sampling_draws_from_softmax_of_logits_over_temperature_down_to_tiny_temperatures():
    from model.generation import sample
    logits = torch.randn(4, 50) * 10
    for temperature in (0.7, 2.0):
        expected = torch.multinomial(torch.softmax(logits / temperature, -1), 1,
                                     generator=torch.Generator().manual_seed(0))[:, 0]
        assert torch.equal(sample(logits, temperature, generator=torch.Generator().manual_seed(0)), expected)
    assert torch.equal(sample(logits, temperature=1e-40), logits.argmax(-1))   # logits / 1e-40 overflow


def test_chunked_prefill_equals_one_pass():
    model = make_model()
    ids = tokens(T=40)
    with torch.no_grad():
        full, _ = model(ids)
        last, state = model.prefill(ids, chunk_len=7)
        kept, _ = model.prefill(ids, chunk_len=7, keep_logits=lambda s, e: slice(None))
    torch.testing.assert_close(last, full[:, -1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kept, full, rtol=1e-5, atol=1e-5)
    assert state.position == 40
    with pytest.raises(ValueError, match="at least one token"):
        model.prefill(ids[:, :0])


def test_prefill_from_a_state_continues_the_sequence():
    """A prompt prefilled in two calls, the second given the first's state (a conversation's next turn)."""
    model = make_model()
    ids = tokens(T=40)
    with torch.no_grad():
        full, _ = model(ids)
        _, state = model.prefill(ids[:, :18], chunk_len=7)
        kept, state = model.prefill(ids[:, 18:], state, chunk_len=7, keep_logits=lambda s, e: slice(None))
    torch.testing.assert_close(kept, full[:, 18:], rtol=1e-5, atol=1e-5)
    assert state.position == 40


def test_generating_no_tokens_returns_the_prompt():
    model = make_model()
    prompt = tokens(T=5)
    assert torch.equal(model.generate(prompt, 0), prompt)


@pytest.mark.parametrize("call, error, message", [
    (lambda m, ids: m(ids[:, :0]), ValueError, r"input_ids has no tokens \(shape \[3, 0\]\)"),
    (lambda m, ids: m(ids[0]), ValueError, r"input_ids must have shape \[batch, tokens\], got shape \[41\]"),
    (lambda m, ids: m(ids.float()), TypeError, r"input_ids must be a tensor of token ids \(torch.long or torch"),
    (lambda m, ids: m.step(ids[:, :1], None), ValueError, r"token must have shape \[batch\], got shape \[3, 1\]"),
    (lambda m, ids: m.step(ids[:, 0].float(), None), TypeError, "token must be a tensor of token ids"),
    (lambda m, ids: m.generate(ids[0], 2), ValueError, r"input_ids must have shape \[batch, tokens\]"),
    # a batch of no sequences failed in a reshape inside the notes, or in generate's check of the ids' range
    (lambda m, ids: m(ids[:0]), ValueError, r"input_ids holds no sequences \(shape \[0, 41\]\)"),
    (lambda m, ids: m.step(ids[:0, 0], None), ValueError, r"token holds no sequences \(shape \[0\]\)"),
    (lambda m, ids: m.generate(ids[:0], 2), ValueError, r"input_ids holds no sequences"),
], ids=["empty", "1d", "float", "step-2d", "step-float", "generate-1d", "no-rows", "step-no-rows", "generate-no-rows"])
def test_malformed_token_ids_are_refused_with_the_reason(call, error, message):
    with pytest.raises(error, match=message), torch.no_grad():
        call(make_model(), tokens())


def test_int32_ids_give_what_long_ids_give():
    model = make_model()
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(ids.int())[0], model(ids)[0], rtol=0, atol=0)
        state = model.allocate_state(ids.shape[0])
        torch.testing.assert_close(model.step(ids[:, 0].int(), state)[0], model.step(ids[:, 0], state)[0],
                                   rtol=0, atol=0)


@pytest.mark.parametrize("make_state, message", [
    (lambda: make_model()(tokens(batch=2, T=5))[1], "the state holds 2 sequences and the input 3"),
    # a state of fewer layers used to run the model's first layers only, without an error
    (lambda: make_model(n_layer=2)(tokens(T=5))[1], "the state has 2 layers and the model 4"),
    (lambda: make_model(n_layer=6)(tokens(T=5))[1], "the state has 6 layers and the model 4"),
    (lambda: make_model(pool_size=5)(tokens(T=5))[1],
     r"notes \[B, pool_size, summary_dim\] of shape \[3, 5, 8\] where this model's config makes \[3, 3, 8\]"),
    (lambda: make_model(d_model=16)(tokens(T=5))[1], r"conv \[B, d_inner, d_conv - 1\] of shape \[3, 32, 3\]"),
    (lambda: make_model(notes=False)(tokens(T=5))[1], "a model with notes off and this model has them on"),
    (lambda: make_model().allocate_state(1), "the state holds 1 sequences and the input 3"),
    (lambda: (None, 5)[1], "state must be the ModelState a MemMambaLM returns"),
    (lambda: make_model()(tokens(T=5))[1].map(lambda t: t.to(torch.bfloat16)),
     "the state's note window indices are torch.bfloat16, not torch.long"),
], ids=["batch", "fewer-layers", "more-layers", "pool-size", "d-model", "notes-off", "allocated-batch", "not-a-state",
        "cast-whole"])
@pytest.mark.parametrize("form", ["forward", "step"])
def test_a_state_from_another_batch_model_or_config_is_refused(make_state, message, form):
    model = make_model()
    ids = tokens(T=5)
    with torch.no_grad():
        state = make_state()
        with pytest.raises((ValueError, TypeError), match=message):
            model(ids, state) if form == "forward" else model.step(ids[:, 0], state)


@pytest.mark.parametrize("overrides", POLICIES[1:3] + POLICIES[-1:], ids=lambda o: "-".join(map(str, o.values())))
def test_a_selected_state_continues_the_sequences_it_holds(overrides):
    """state.select (beam search, dropping finished rows) keeps every field of the chosen rows, open window and
    position included: continuing from it gives what those rows alone give. 13 tokens leave a window open."""
    model = make_model(**overrides)
    ids = tokens(batch=3, T=21)
    rows = [2, 0]
    with torch.no_grad():
        alone, _ = model(ids[rows])
        _, state = model(ids[:, :13])
        chosen = state.select(rows)
        assert chosen.position == 13
        continued, chosen = model(ids[rows, 13:20], chosen)
        last, _ = model.step(ids[rows, 20], chosen)
    torch.testing.assert_close(continued, alone[:, 13:20], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, alone[:, 20], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["memmamba", "transformer"])
def test_a_state_selects_rows_by_a_bool_mask_and_refuses_no_rows(arch):
    model = build_model({"arch": arch, "size": "tiny", "n_layer": 2})
    with torch.no_grad():
        _, state = model(tokens(batch=3, T=13))

    def tensors(state):
        found = []
        state.map(lambda t: found.append(t) or t)
        return found

    by_mask, by_rows = state.select(torch.tensor([True, False, True])), state.select([0, 2])
    assert all(torch.equal(a, b) for a, b in zip(tensors(by_mask), tensors(by_rows), strict=True))
    for nothing in ([], torch.zeros(3, dtype=torch.bool)):
        with pytest.raises(ValueError, match="select takes row indices or a bool mask over the batch, and at least "
                                             "one row"):
            state.select(nothing)


def test_a_detached_state_continues_exactly_and_cuts_backpropagation_to_the_chunk_before():
    """state.map(Tensor.detach) between chunks (truncated backpropagation): every tensor of the state detached,
    the same values and position."""
    model = make_model().train()
    ids = tokens(T=21)
    with torch.no_grad():
        full, _ = model(ids)
    _, state = model(ids[:, :13])
    detached = state.map(torch.Tensor.detach)

    def tensors(state):
        return [t for layer in state.layers for part in (layer.mixer, layer.notes) for t in vars(part).values()]
    assert any(t.requires_grad for t in tensors(state))
    assert len(tensors(detached)) == 8 * len(model.layers) and not any(t.requires_grad for t in tensors(detached))
    assert detached.position == 13
    second, _ = model(ids[:, 13:], detached)
    torch.testing.assert_close(second, full[:, 13:], rtol=1e-5, atol=1e-5)


def test_step_without_a_state_starts_a_sequence():
    model = make_model()
    ids = tokens()
    with torch.no_grad():
        full, _ = model(ids[:, :2])
        first, state = model.step(ids[:, 0], None)
        second, state = model.step(ids[:, 1], state)
    torch.testing.assert_close(torch.stack([first, second], 1), full, rtol=1e-5, atol=1e-5)
    assert state.position == 2


def test_top_k_zero_or_past_the_vocabulary_samples_from_the_whole_vocabulary():
    """As training/generate.py's --top-k 0: no top-k cut, not an error; nor is a top_k larger than the vocabulary."""
    from model.generation import sample
    logits = torch.randn(4, 50)
    draws = [sample(logits, top_k=k, generator=torch.Generator().manual_seed(0)) for k in (0, None, 51, 1000)]
    assert all(torch.equal(draw, draws[0]) for draw in draws)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.5), r"temperature must be 0 \(greedy\) or positive, got -0.5"),
    (dict(temperature=float("nan")), "temperature must be 0"),
    (dict(top_k=-1), "top_k must be None or 0 .* or a positive number of ids, got -1"),
    (dict(max_new_tokens=-1), "max_new_tokens must be 0 or more, got -1"),
    (dict(vocab_size=0), r"vocab_size must be None \(the model's whole vocabulary\) or positive, got 0"),
    (dict(chunk_len=0), "chunk_len must be a positive number of tokens, got 0"),
], ids=["negative-temperature", "nan-temperature", "negative-top-k", "negative-max-new-tokens", "vocab-size-0",
        "chunk-len-0"])
def test_bad_generation_arguments_are_refused_with_the_reason(kwargs, message):
    kwargs = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        make_model().generate(tokens(T=5), **kwargs)


@pytest.mark.parametrize("bad_id, message", [(97, r"got ids from \d+ to 97"), (-1, r"got ids from -1 to \d+")])
def test_a_prompt_outside_the_vocabulary_is_refused_before_the_embedding(bad_id, message):
    """On a GPU the embedding's out-of-range index is a device-side assert, which ends the process's use of the GPU."""
    ids = tokens(T=5)
    ids[1, 2] = bad_id
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 97\) \(the model's vocab_size\), " + message):
        make_model().generate(ids, 3)
