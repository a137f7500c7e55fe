"""The Transformer baseline: one pass == its equations; chunked prefill with the KV cache == step by step."""
import pytest
import torch

from model import MemMambaConfig, MemMambaLM, TransformerConfig, TransformerLM, transformer


def make():
    torch.manual_seed(0)
    return TransformerLM(TransformerConfig(d_model=32, n_layer=2, n_head=4, vocab_size=50)).eval()


def test_chunked_and_step_forms_equal_one_pass():
    model = make()
    ids = torch.randint(0, 50, (2, 30))
    with torch.no_grad():
        full, cache = model(ids)
        state, parts = None, []
        for a, b in [(0, 7), (7, 8), (8, 30)]:
            logits, state = model(ids[:, a:b], state)
            parts.append(logits)
        steps, s = [], model.allocate_state(2)
        for t in range(30):
            logits, s = model.step(ids[:, t], s)
            steps.append(logits)
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.stack(steps, 1), full, rtol=1e-5, atol=1e-5)
    assert cache.position == state.position == 30 and cache.layers[0][0].shape[1] == 30


def test_a_chunk_over_a_long_cache_attends_in_query_blocks_of_bounded_scores(monkeypatch):
    """Off CUDA the mask and the scores of a chunk's attention are materialised: a chunk of 4,096 queries over a
    400k-token cache would hold 4096 x 400k scores per head. Its queries go in blocks of at most
    ATTENTION_SCORES scores, with the outputs of one pass."""
    model = make()
    ids = torch.randint(0, 50, (2, 30))
    with torch.no_grad():
        full, _ = model(ids)
        _, cache = model(ids[:, :18])
        # 5 queries over 30 keys, 2 sequences x 4 heads
        monkeypatch.setattr(transformer, "ATTENTION_SCORES", 2 * 4 * 30 * 5)
        calls = []
        sdpa = transformer.F.scaled_dot_product_attention
        monkeypatch.setattr(transformer.F, "scaled_dot_product_attention",
                            lambda q, k, v, **kw: calls.append((q.shape[2], k.shape[2])) or sdpa(q, k, v, **kw))
        rest, _ = model(ids[:, 18:], cache)
    assert calls == [(5, 30), (5, 30), (2, 30)] * 2   # 12 queries per layer, 2 layers
    torch.testing.assert_close(rest, full[:, 18:], rtol=1e-5, atol=1e-5)


def test_a_cache_of_another_dtype_continues_the_sequence():
    """As MemMamba's state does: an fp32 cache continued by the model in bf16 (model.to(torch.bfloat16) after a
    prefill) used to stop the attention over mixed dtypes."""
    model = make()
    ids = torch.randint(0, 50, (2, 30))
    with torch.no_grad():
        full, _ = model(ids)
        _, cache = model(ids[:, :20])
        model.to(torch.bfloat16)
        logits, cache = model(ids[:, 20:29], cache)
        last, _ = model.step(ids[:, 29], cache)
    torch.testing.assert_close(logits.float(), full[:, 20:29], rtol=0.02, atol=0.02)
    torch.testing.assert_close(last.float(), full[:, 29], rtol=0.02, atol=0.02)


def test_causality():
    model = make()
    ids = torch.randint(0, 50, (1, 20))
    changed = ids.clone()
    changed[0, 12] = (changed[0, 12] + 1) % 50
    with torch.no_grad():
        a, b = model(ids)[0], model(changed)[0]
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 12], b[:, 12])


def test_one_pass_equals_the_reference_written_from_the_equations():
    from tests.reference import transformer_lm_reference
    model = make()
    ids = torch.randint(0, 50, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, _ = model(ids)
        reference = transformer_lm_reference(model, ids)
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("call, error, message", [
    (lambda m, ids, cache: m(ids[:, :0]), ValueError, r"input_ids has no tokens \(shape \[2, 0\]\)"),
    (lambda m, ids, cache: m(ids[0]), ValueError, r"input_ids must have shape \[batch, tokens\], got shape \[30\]"),
    (lambda m, ids, cache: m(ids.float()), TypeError, r"input_ids must be a tensor of token ids"),
    (lambda m, ids, cache: m.step(ids[:, :1], cache), ValueError, r"token must have shape \[batch\]"),
    (lambda m, ids, cache: m(ids[:1], cache), ValueError, "the state holds 2 sequences and the input 1"),
    # a cache of more layers used to be read in part, as if it were this model's
    (lambda m, ids, cache: TransformerLM(TransformerConfig(d_model=32, n_layer=1, n_head=4, vocab_size=50))(ids, cache),
     ValueError, "the state has 2 layers and the model 1"),
    (lambda m, ids, cache: TransformerLM(TransformerConfig(d_model=32, n_layer=2, n_head=2, vocab_size=50))(ids, cache),
     ValueError, "keys of 4 heads of width 8 where this model's config makes 2 of width 16"),
    (lambda m, ids, cache: m(ids, (cache.layers, cache.position)), TypeError, "state must be the KVCache"),
    (lambda m, ids, cache: m(ids[:0]), ValueError, r"input_ids holds no sequences \(shape \[0, 30\]\)"),
    (lambda m, ids, cache: m.step(ids[:0, 0], None), ValueError, r"token holds no sequences"),
], ids=["empty", "1d", "float", "step-2d", "batch", "more-layers", "heads", "not-a-cache", "no-rows", "step-no-rows"])
def test_malformed_inputs_and_foreign_caches_are_refused_with_the_reason(call, error, message):
    model = make()
    ids = torch.randint(0, 50, (2, 30))
    with torch.no_grad():
        _, cache = model(ids[:, :4])
        with pytest.raises(error, match=message):
            call(model, ids, cache)


@pytest.mark.parametrize("make_model", [make, lambda: MemMambaLM(MemMambaConfig(d_model=32, n_layer=2, vocab_size=50))],
                         ids=["transformer", "memmamba"])
def test_hidden_states_takes_final_state_by_keyword_in_both_models(make_model):
    """hidden_states(ids, None, False) meant final_state=False to the Transformer and sp=False to MemMamba, which
    failed inside on a bool's missing start_position; both now take the options by keyword only."""
    model = make_model()
    ids = torch.randint(0, 50, (2, 30))
    with torch.no_grad():
        hidden, state = model.hidden_states(ids, final_state=False)
        torch.testing.assert_close(model.lm_head(hidden), model(ids)[0], rtol=0, atol=0)
        assert state is None
        with pytest.raises(TypeError, match="positional argument"):
            model.hidden_states(ids, None, False)
