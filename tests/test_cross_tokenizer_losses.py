"""Cross-tokenizer losses (kd_core/losses/cross_tokenizer.py): span log-probs, ULD, span-aligned KL, DSKD.

Each function is checked against a float64 reference written out here from its definition (loops
over spans and positions, dictionaries keyed by token strings, explicit matrix math), values and
gradients, for float32 and bfloat16 inputs with per-dtype tolerances. Properties: the top-k ULD
equals the exact ULD when k = V_T; ULD ignores which token is which; the span KL is ≥ 0 and 0 on
identical distributions over a shared one-to-one vocabulary; zero spans or an all-masked batch give
0 and zero gradients, never NaN; a float64 cumulative sum keeps long rows exact; DSKD's gradient
routing is as documented and 200 Adam steps lower its loss.
Run: PYTHONPATH=$PWD .venv/bin/python -m pytest tests/test_cross_tokenizer_losses.py -q
"""

from __future__ import annotations

import math

import pytest
import torch

from kd_core.losses.cross_tokenizer import (
    AlignedSpans,
    DualSpaceDistillation,
    span_kl_loss,
    span_kl_per_span,
    span_logprobs,
    uld_loss,
    uld_per_span,
    uld_topk_loss,
    uld_topk_per_span,
)

# Values are computed in float32 from the given dtype; bf16 gradients are rounded to bf16 (8 bits).
TOLERANCES = {torch.float32: dict(value=1e-5, rtol=1e-5, atol=1e-6), torch.bfloat16: dict(value=1e-2, rtol=1e-2, atol=3e-3)}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


@pytest.fixture(autouse=True)
def one_thread():
    """Every tensor here is tiny: intra-op threads only add synchronisation (on a loaded 2-core
    machine the 200-step optimisation took 24 s with the default threads, 2 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gradient_tolerance(dtype):
    return dict(rtol=TOLERANCES[dtype]["rtol"], atol=TOLERANCES[dtype]["atol"])


def generator(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- AlignedSpans
def test_aligned_spans_length_device_and_shape_check():
    spans = AlignedSpans(*(torch.arange(3) for _ in range(5)))
    assert len(spans) == 3 and len(spans.to("cpu")) == 3
    assert torch.equal(spans.to("cpu").student_end, torch.arange(3))
    with pytest.raises(ValueError, match="1-D of one length"):
        AlignedSpans(torch.arange(3), torch.arange(3), torch.arange(2), torch.arange(3), torch.arange(3))


# ---------------------------------------------------------------- span log-probabilities
def random_spans(batch, length, count, seed):
    g = generator(seed)
    rows = torch.randint(0, batch, (count,), generator=g)
    start = torch.randint(0, length - 1, (count,), generator=g)
    width = torch.randint(1, 5, (count,), generator=g)
    return rows, start, torch.minimum(start + width, torch.tensor(length))


@DTYPES
def test_span_logprobs_match_a_loop_over_tokens(dtype):
    token_logprobs = (-torch.rand(3, 47, generator=generator(0)) * 6).to(dtype).requires_grad_()
    rows, start, end = random_spans(3, 47, 30, seed=1)
    weights = torch.rand(30, generator=generator(2), dtype=torch.float64)
    value = span_logprobs(token_logprobs, rows, start, end)
    (gradient,) = torch.autograd.grad((value.double() * weights).sum(), token_logprobs)

    reference_input = token_logprobs.detach().double().requires_grad_()
    expected = torch.stack([sum(reference_input[r, i] for i in range(s, e)) for r, s, e in zip(rows.tolist(), start.tolist(), end.tolist())])
    (expected_gradient,) = torch.autograd.grad((expected * weights).sum(), reference_input)
    assert value.dtype == torch.float32 and value.shape == (30,)
    torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(gradient.double(), expected_gradient, **gradient_tolerance(dtype))


def test_span_logprobs_stay_exact_on_a_long_row():
    """A float32 running sum over 4000 tokens of ~−8 reaches −32000, where float32 steps by 0.004."""
    token_logprobs = -8 - torch.rand(1, 4000, generator=generator(3))
    start = torch.tensor([3990, 3998])
    value = span_logprobs(token_logprobs, torch.zeros(2, dtype=torch.long), start, start + 1)
    torch.testing.assert_close(value, token_logprobs[0, start], rtol=0, atol=1e-5)


def test_span_logprobs_ignore_minus_infinity_before_a_span_and_accept_no_spans():
    token_logprobs = torch.tensor([[-math.inf, -1.0, -2.0, -math.inf]], requires_grad=True)
    value = span_logprobs(token_logprobs, torch.tensor([0]), torch.tensor([1]), torch.tensor([3]))
    assert value.item() == pytest.approx(-3.0)
    empty = torch.zeros(0, dtype=torch.long)
    none = span_logprobs(token_logprobs, empty, empty, empty)
    assert none.shape == (0,)
    none.sum().backward()
    assert token_logprobs.grad.abs().max() == 0


# ---------------------------------------------------------------- ULD
def reference_uld(student_logprobs, teacher_logprobs):
    """Σ |sorted p_S − sorted q_T| with lists sorted by value, the shorter padded with zeros."""
    values = []
    for student_row, teacher_row in zip(student_logprobs.exp(), teacher_logprobs.exp()):
        student = sorted(student_row.unbind(), key=lambda p: -p.item())
        teacher = sorted(teacher_row.unbind(), key=lambda p: -p.item())
        zero = student_row.new_zeros(())
        width = max(len(student), len(teacher))
        student += [zero] * (width - len(student))
        teacher += [zero] * (width - len(teacher))
        values.append(sum((a - b).abs() for a, b in zip(student, teacher)))
    return torch.stack(values)


def reference_uld_topk(student_logprobs, teacher_topk_logprobs):
    values = []
    for student_row, teacher_row in zip(student_logprobs.exp(), teacher_topk_logprobs.exp()):
        k = len(teacher_row)
        student = sorted(student_row.unbind(), key=lambda p: -p.item())[:k]
        teacher = sorted(teacher_row.unbind(), key=lambda p: -p.item())
        student += [student_row.new_zeros(())] * (k - len(student))
        head = sum((a - b).abs() for a, b in zip(student, teacher))
        values.append(head + ((1 - sum(student)) - (1 - sum(teacher))).abs())
    return torch.stack(values)


def logprob_rows(count, width, seed, scale=2.0, dtype=torch.float32):
    return torch.log_softmax(torch.randn(count, width, generator=generator(seed)) * scale, -1).to(dtype)


@DTYPES
@pytest.mark.parametrize("student_size,teacher_size", [(13, 9), (9, 13)])
def test_uld_matches_reference(student_size, teacher_size, dtype):
    student = logprob_rows(5, student_size, seed=4, dtype=dtype).requires_grad_()
    teacher = logprob_rows(5, teacher_size, seed=5, dtype=dtype)
    value = uld_per_span(student, teacher)
    (gradient,) = torch.autograd.grad(value.sum(), student)

    student64 = student.detach().double().requires_grad_()
    expected = reference_uld(student64, teacher.double())
    (expected_gradient,) = torch.autograd.grad(expected.sum(), student64)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value.double(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(gradient.double(), expected_gradient, **gradient_tolerance(dtype))
    torch.testing.assert_close(uld_loss(student, teacher).double(), expected.mean(), rtol=0, atol=1e-5)


@DTYPES
def test_uld_topk_matches_reference(dtype):
    student = logprob_rows(6, 17, seed=6, dtype=dtype).requires_grad_()
    teacher_topk = logprob_rows(6, 11, seed=7).topk(4, -1).values.to(dtype)
    teacher_topk = teacher_topk[:, torch.randperm(4, generator=generator(8))]  # any order
    value = uld_topk_per_span(student, teacher_topk)
    (gradient,) = torch.autograd.grad(value.sum(), student)

    student64 = student.detach().double().requires_grad_()
    expected = reference_uld_topk(student64, teacher_topk.double())
    (expected_gradient,) = torch.autograd.grad(expected.sum(), student64)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value.double(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(gradient.double(), expected_gradient, **gradient_tolerance(dtype))
    torch.testing.assert_close(uld_topk_loss(student, teacher_topk).double(), expected.mean(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("student_size,teacher_size", [(13, 9), (9, 13), (9, 9)])
def test_uld_topk_with_every_teacher_entry_equals_the_exact_uld(student_size, teacher_size):
    """k = V_T: the teacher's tail is 0 and the student's tail is the sum of the entries the exact
    form compares with the teacher's zero padding (or 0 when V_S ≤ V_T)."""
    student = logprob_rows(7, student_size, seed=9)
    teacher = logprob_rows(7, teacher_size, seed=10)
    torch.testing.assert_close(uld_topk_per_span(student, teacher), uld_per_span(student, teacher), rtol=0, atol=2e-6)
    assert uld_topk_per_span(student, teacher.topk(3, -1).values).sub(uld_per_span(student, teacher)).abs().max() > 1e-3


def test_uld_pinned_value_permutation_invariance_and_zero():
    student = torch.tensor([[0.2, 0.5, 0.3]]).log()
    teacher = torch.tensor([[0.4, 0.6]]).log()
    assert uld_per_span(student, teacher).item() == pytest.approx(0.1 + 0.1 + 0.2, abs=1e-6)
    shuffled = logprob_rows(4, 10, seed=11)
    other = logprob_rows(4, 12, seed=12)
    torch.testing.assert_close(uld_per_span(shuffled[:, torch.randperm(10, generator=generator(13))], other), uld_per_span(shuffled, other))
    assert uld_per_span(other, other.flip(-1)).abs().max() < 1e-6


def test_uld_of_no_spans_is_zero_with_zero_gradient():
    student = torch.zeros(0, 5, requires_grad=True)
    loss = uld_loss(student, torch.zeros(0, 7)) + uld_topk_loss(student, torch.zeros(0, 3))
    loss.backward()
    assert loss.item() == 0.0 and student.grad.shape == (0, 5)


# ---------------------------------------------------------------- span-aligned KL
# "▁" marks a word start and is dropped by normalisation, so "▁a" and "a" are one shared string.
TEACHER_VOCAB = ["<s>", "a", "b", "ab", "c", "x", "▁a"]
STUDENT_VOCAB = ["<s>", "a", "b", "c", "bc", "y", "z", "▁c"]
# "aabbcabc" with a leading <s>: teacher a|ab|b c|ab c, student a|a b|bc|a bc: spans 1:1, 1:2, 2:1, 2:2
TEACHER_TEXT = ["<s>", "a", "ab", "b", "c", "ab", "c"]
STUDENT_TEXT = ["<s>", "a", "a", "b", "bc", "a", "bc"]
TEACHER_SPANS = [(1, 1), (2, 2), (3, 4), (5, 6)]  # first and last token index of each span
STUDENT_SPANS = [(1, 1), (2, 3), (4, 4), (5, 6)]


def normalise(token):
    return token.replace("▁", "")


def shared_tables(student_vocab, teacher_vocab):
    shared = sorted({normalise(t) for t in student_vocab} & {normalise(t) for t in teacher_vocab})
    index = {string: i for i, string in enumerate(shared)}

    def table(vocab):
        return torch.tensor([index.get(normalise(token), -1) for token in vocab])

    return table(student_vocab), table(teacher_vocab)


def aligned_batch(rows=2):
    """The spans of the text above, repeated in `rows` batch rows, as predicting positions."""
    def positions(spans):
        start = torch.tensor([first - 1 for first, _ in spans] * rows)
        return start, torch.tensor([last for _, last in spans] * rows)

    teacher_start, teacher_end = positions(TEACHER_SPANS)
    student_start, student_end = positions(STUDENT_SPANS)
    span_rows = torch.arange(rows).repeat_interleave(len(TEACHER_SPANS))
    return AlignedSpans(span_rows, teacher_start, teacher_end, student_start, student_end)


def ids(vocab, text, rows):
    return torch.tensor([vocab.index(token) for token in text]).expand(rows, -1)


def module_span_kl(student_logits, teacher_logits, top_k, uld_weight, spans):
    """What a trainer does: token log-probs → span log-probs, first predicting position's distributions."""
    rows = student_logits.shape[0]
    student_ids, teacher_ids = ids(STUDENT_VOCAB, STUDENT_TEXT, rows), ids(TEACHER_VOCAB, TEACHER_TEXT, rows)
    student_logprobs = torch.log_softmax(student_logits, -1)  # in the input dtype: bf16 stays bf16
    teacher_logprobs = torch.log_softmax(teacher_logits, -1)
    student_tokens = student_logprobs[:, :-1].gather(-1, student_ids[:, 1:, None]).squeeze(-1)
    teacher_tokens = teacher_logprobs[:, :-1].gather(-1, teacher_ids[:, 1:, None]).squeeze(-1)
    teacher_first_position = teacher_logprobs[spans.rows, spans.teacher_start]
    if top_k is None:
        given_logprobs = teacher_first_position
        given_ids = torch.arange(len(TEACHER_VOCAB)).expand(len(spans), -1)
    else:
        given_logprobs, given_ids = teacher_first_position.topk(top_k, -1)
    student_shared, teacher_shared = shared_tables(STUDENT_VOCAB, TEACHER_VOCAB)
    return span_kl_per_span(
        student_logprobs[spans.rows, spans.student_start],
        given_ids,
        given_logprobs,
        student_shared,
        teacher_shared,
        span_logprobs(student_tokens, spans.rows, spans.student_start, spans.student_end),
        span_logprobs(teacher_tokens, spans.rows, spans.teacher_start, spans.teacher_end),
        student_ids[spans.rows, spans.student_start + 1],
        teacher_ids[spans.rows, spans.teacher_start + 1],
        uld_weight=uld_weight,
    )


def reference_span_kl(student_logits, teacher_logits, top_k, uld_weight):
    """Float64, span by span, probabilities kept in dictionaries keyed by normalised strings."""
    shared = {normalise(t) for t in STUDENT_VOCAB} & {normalise(t) for t in TEACHER_VOCAB}
    values = []
    for row in range(student_logits.shape[0]):
        student_logprobs = torch.log_softmax(student_logits[row], -1)
        teacher_logprobs = torch.log_softmax(teacher_logits[row], -1)
        for (t_first, t_last), (s_first, s_last) in zip(TEACHER_SPANS, STUDENT_SPANS):
            teacher_span = sum(teacher_logprobs[i - 1, TEACHER_VOCAB.index(TEACHER_TEXT[i])] for i in range(t_first, t_last + 1))
            student_span = sum(student_logprobs[i - 1, STUDENT_VOCAB.index(STUDENT_TEXT[i])] for i in range(s_first, s_last + 1))
            teacher_probs = teacher_logprobs[t_first - 1].exp()
            student_probs = student_logprobs[s_first - 1].exp()
            given = sorted(range(len(TEACHER_VOCAB)), key=lambda i: -teacher_probs[i].item())[: top_k or len(TEACHER_VOCAB)]
            excluded = {normalise(TEACHER_TEXT[t_first]), normalise(STUDENT_TEXT[s_first])}
            teacher_mass, student_mass = {}, {}
            for i in given:
                if normalise(TEACHER_VOCAB[i]) in shared:
                    teacher_mass[normalise(TEACHER_VOCAB[i])] = teacher_mass.get(normalise(TEACHER_VOCAB[i]), 0) + teacher_probs[i]
            for i, token in enumerate(STUDENT_VOCAB):
                if normalise(token) in shared:
                    student_mass[normalise(token)] = student_mass.get(normalise(token), 0) + student_probs[i]
            compared = sorted(shared - excluded)
            teacher_outcomes = [teacher_span.exp()] + [teacher_mass.get(s, teacher_probs.new_zeros(())) for s in compared]
            student_outcomes = [student_span.exp()] + [student_mass[s] for s in compared]
            teacher_outcomes.append((1 - sum(teacher_outcomes)).clamp_min(1e-30))
            student_outcomes.append((1 - sum(student_outcomes)).clamp_min(1e-30))
            kl = sum(p * (p.log() - q.log()) for p, q in zip(teacher_outcomes, student_outcomes) if p > 0)

            teacher_unmatched = sorted((teacher_probs[i] for i in given if normalise(TEACHER_VOCAB[i]) not in shared), key=lambda p: -p.item())
            student_unmatched = sorted((student_probs[i] for i, t in enumerate(STUDENT_VOCAB) if normalise(t) not in shared), key=lambda p: -p.item())
            student_unmatched = student_unmatched[: len(given)]
            zero = student_probs.new_zeros(())
            width = max(len(given), len(student_unmatched))
            teacher_unmatched += [zero] * (width - len(teacher_unmatched))
            student_unmatched += [zero] * (width - len(student_unmatched))
            values.append(kl + uld_weight * sum((a - b).abs() for a, b in zip(student_unmatched, teacher_unmatched)))
    return torch.stack(values)


def span_kl_inputs(dtype, seed, rows=2):
    g = generator(seed)
    student = (torch.randn(rows, len(STUDENT_TEXT), len(STUDENT_VOCAB), generator=g) * 1.5).to(dtype).requires_grad_()
    teacher = (torch.randn(rows, len(TEACHER_TEXT), len(TEACHER_VOCAB), generator=g) * 1.5).to(dtype)
    return student, teacher


@DTYPES
@pytest.mark.parametrize("top_k", [None, 2], ids=["full", "top2"])  # top 2: the student's 3 unmatched ids are truncated
@pytest.mark.parametrize("uld_weight", [1.0, 0.0])
def test_span_kl_matches_string_level_reference(top_k, uld_weight, dtype):
    student, teacher = span_kl_inputs(dtype, seed=20)
    weights = torch.rand(8, generator=generator(21), dtype=torch.float64)
    value = module_span_kl(student, teacher, top_k, uld_weight, aligned_batch())
    (gradient,) = torch.autograd.grad((value.double() * weights).sum(), student)

    student64 = student.detach().double().requires_grad_()
    expected = reference_span_kl(student64, teacher.double(), top_k, uld_weight)
    (expected_gradient,) = torch.autograd.grad((expected * weights).sum(), student64)
    tolerance = TOLERANCES[dtype]
    assert value.dtype == torch.float32 and value.shape == (8,)
    torch.testing.assert_close(value.double(), expected, rtol=0, atol=tolerance["value"])
    torch.testing.assert_close(gradient.double(), expected_gradient, **gradient_tolerance(dtype))
    assert gradient.double().abs().max() > 1e-2  # the gradient is not trivially zero


def test_span_kl_loss_is_the_mean_and_the_unmatched_uld_adds_on():
    student, teacher = span_kl_inputs(torch.float32, seed=22)
    spans = aligned_batch()
    with_uld, without = module_span_kl(student, teacher, None, 1.0, spans), module_span_kl(student, teacher, None, 0.0, spans)
    assert (with_uld - without).min() > 1e-4  # the text's unmatched tokens carry mass on both sides
    student_shared, teacher_shared = shared_tables(STUDENT_VOCAB, TEACHER_VOCAB)
    arguments = (
        torch.log_softmax(student[0, :2], -1),
        torch.arange(7).expand(2, -1),
        torch.log_softmax(teacher[0, :2], -1),
        student_shared,
        teacher_shared,
        torch.tensor([-1.0, -2.0]),
        torch.tensor([-1.5, -2.5]),
        torch.tensor([1, 2]),
        torch.tensor([1, 3]),
    )
    torch.testing.assert_close(span_kl_loss(*arguments, uld_weight=0.5), span_kl_per_span(*arguments, uld_weight=0.5).mean())


@pytest.mark.parametrize("seed", range(5))
def test_span_kl_is_nonnegative(seed):
    student, teacher = span_kl_inputs(torch.float32, seed=30 + seed, rows=3)
    for top_k in (None, 2, 5):
        assert module_span_kl(student, teacher, top_k, 1.0, aligned_batch(rows=3)).min() > -1e-6


def test_span_kl_is_zero_on_identical_distributions_over_a_one_to_one_vocabulary():
    shared = torch.arange(5)  # e.g. ["<s>", "a", "b", "c", "d"] on both sides
    token_ids = torch.tensor([0, 1, 3, 2, 4, 1])
    start, end, rows = torch.tensor([0, 1, 2]), torch.tensor([1, 3, 5]), torch.zeros(3, dtype=torch.long)
    first = token_ids[start + 1]

    def per_span(student_logits, teacher_logits):
        def side(logits):
            logprobs = torch.log_softmax(logits, -1)
            tokens = logprobs[:-1].gather(-1, token_ids[1:, None]).T
            return logprobs[start], span_logprobs(tokens, rows, start, end)

        (student, student_span), (teacher, teacher_span) = side(student_logits), side(teacher_logits)
        return span_kl_per_span(student, torch.arange(5).expand(3, -1), teacher, shared, shared, student_span, teacher_span, first, first)

    logits = torch.randn(6, 5, generator=generator(40)) * 2
    assert per_span(logits, logits.clone()).abs().max() < 1e-6
    assert per_span(torch.randn(6, 5, generator=generator(41)) * 2, logits).min() > 1e-3


def test_span_kl_stays_finite_when_a_student_probability_underflows():
    """A shared string the teacher gives mass to, at probability exp(−200) = 0 in float32 for the
    student: the floor 10⁻³⁰ inside the log gives a large finite term and a finite gradient."""
    student_shared, teacher_shared = shared_tables(STUDENT_VOCAB, TEACHER_VOCAB)
    student_logits = torch.zeros(1, len(STUDENT_VOCAB))
    student_logits[0, [STUDENT_VOCAB.index("c"), STUDENT_VOCAB.index("▁c")]] = -200.0
    student_logits.requires_grad_()
    teacher_logprobs = torch.log_softmax(torch.zeros(1, len(TEACHER_VOCAB)), -1)
    a, b = torch.tensor([STUDENT_VOCAB.index("a")]), torch.tensor([TEACHER_VOCAB.index("b")])
    value = span_kl_loss(
        torch.log_softmax(student_logits, -1), torch.arange(7)[None], teacher_logprobs, student_shared, teacher_shared,
        torch.tensor([-3.0]), torch.tensor([-3.0]), a, b,
    )
    value.backward()
    assert 9 < value.item() < 1e3 and torch.isfinite(student_logits.grad).all()


def test_span_kl_of_no_spans_is_zero_with_zero_gradient():
    student_shared, teacher_shared = shared_tables(STUDENT_VOCAB, TEACHER_VOCAB)
    student = torch.zeros(0, len(STUDENT_VOCAB), requires_grad=True)
    empty, nothing = torch.zeros(0, dtype=torch.long), torch.zeros(0)
    loss = span_kl_loss(
        student, torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3), student_shared, teacher_shared, nothing, nothing, empty, empty
    )
    loss.backward()
    assert loss.item() == 0.0 and not torch.isnan(loss) and student.grad.shape == (0, len(STUDENT_VOCAB))


# ---------------------------------------------------------------- DSKD
SIZES = dict(student_hidden_size=8, teacher_hidden_size=12, student_embedding_size=6, teacher_embedding_size=5)
B, LS, LT, VS, VT = 3, 7, 6, 11, 13


def dskd_inputs(seed, dtype=torch.float32):
    g = generator(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    student_mask = torch.rand(B, LS, generator=g) > 0.25
    teacher_mask = torch.rand(B, LT, generator=g) > 0.25
    teacher_mask[2] = False  # a row with no valid teacher position: its student positions do not count
    return dict(
        student_hidden=randn(B, LS, 8).requires_grad_(),
        student_embeddings_in=randn(B, LS, 6).requires_grad_(),
        student_embeddings_next=randn(B, LS, 6),
        student_mask=student_mask,
        student_logits=randn(B, LS, VS).requires_grad_(),
        student_next_ids=torch.where(student_mask, torch.randint(0, VS, (B, LS), generator=g), -100),
        teacher_hidden=randn(B, LT, 12),
        teacher_embeddings_in=randn(B, LT, 5),
        teacher_embeddings_next=randn(B, LT, 5),
        teacher_mask=teacher_mask,
        teacher_logits=randn(B, LT, VT) * 2,
    )


def heads(seed):
    g = generator(seed)
    return torch.randn(VS, 8, generator=g).requires_grad_(), torch.randn(VT, 12, generator=g)


def reference_dskd(weights, student_head, teacher_head, inputs, temperature):
    """Float64: explicit attention weights exp(s_j) / Σ_valid exp(s_j), position by position."""
    w = {name: value.double() for name, value in weights.items()}
    x = {name: (value.double() if value.is_floating_point() else value) for name, value in inputs.items()}
    student_head, teacher_head = student_head.double(), teacher_head.double()
    size = w["query.weight"].shape[0]

    def kl(p_logits, q_logits):
        p = torch.softmax(p_logits / temperature, -1)
        return (p * (p.log() - torch.log_softmax(q_logits / temperature, -1))).sum()

    student_terms, teacher_terms, ce_terms = [], [], []
    for b in range(B):
        queries = torch.cat([x["student_embeddings_in"][b], x["student_embeddings_next"][b]], -1) @ w["query.weight"].T
        keys = torch.cat([x["teacher_embeddings_in"][b], x["teacher_embeddings_next"][b]], -1) @ w["key.weight"].T
        values_in_student = x["teacher_hidden"][b] @ w["teacher_to_student.weight"].T
        values_in_teacher = x["student_hidden"][b] @ w["student_to_teacher.weight"].T
        valid_teacher = [j for j in range(LT) if x["teacher_mask"][b, j]]
        valid_student = [i for i in range(LS) if x["student_mask"][b, i]]
        if not valid_teacher or not valid_student:
            continue
        for i in valid_student:
            scores = torch.stack([queries[i] @ keys[j] for j in valid_teacher]) / math.sqrt(size)
            attention = scores.exp() / scores.exp().sum()
            hidden = sum(a * values_in_student[j] for a, j in zip(attention, valid_teacher))
            projected = hidden @ student_head.T
            student_terms.append(kl(projected.detach(), x["student_logits"][b, i]))
            ce_terms.append(-torch.log_softmax(projected, -1)[x["student_next_ids"][b, i]])
        for j in valid_teacher:
            scores = torch.stack([keys[j] @ queries[i] for i in valid_student]) / math.sqrt(size)
            attention = scores.exp() / scores.exp().sum()
            hidden = sum(a * values_in_teacher[i] for a, i in zip(attention, valid_student))
            teacher_terms.append(kl(x["teacher_logits"][b, j], hidden @ teacher_head.T))
    terms = {
        "student_space": torch.stack(student_terms).mean(),
        "teacher_space": torch.stack(teacher_terms).mean(),
        "projector_ce": torch.stack(ce_terms).mean(),
    }
    terms["loss"] = sum(terms.values())
    return terms


def run_dskd(module, inputs, student_head, teacher_head, temperature):
    return module(
        student_head=lambda h: h.float() @ student_head.T,
        teacher_head=lambda h: h.float() @ teacher_head.T,
        temperature=temperature,
        **inputs,
    )


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_dskd_matches_explicit_reference(temperature):
    torch.manual_seed(50)
    module = DualSpaceDistillation(**SIZES)
    inputs = dskd_inputs(seed=51)
    student_head, teacher_head = heads(seed=52)
    terms = run_dskd(module, inputs, student_head, teacher_head, temperature)

    parameters = dict(module.named_parameters())
    reference_weights = {name: value.detach().double().requires_grad_() for name, value in parameters.items()}
    reference_inputs = {name: (value.detach().double().requires_grad_() if value.requires_grad else value) for name, value in inputs.items()}
    reference_head = student_head.detach().double().requires_grad_()
    expected = reference_dskd(reference_weights, reference_head, teacher_head, reference_inputs, temperature)

    for name in ("student_space", "teacher_space", "projector_ce", "loss"):
        assert terms[name].dtype == torch.float32 and terms[name].shape == ()
        torch.testing.assert_close(terms[name].double(), expected[name], rtol=1e-5, atol=1e-5)
    ours = [*parameters.values(), student_head, inputs["student_hidden"], inputs["student_logits"], inputs["student_embeddings_in"]]
    theirs = [*reference_weights.values(), reference_head, *(reference_inputs[n] for n in ("student_hidden", "student_logits", "student_embeddings_in"))]
    for ours_gradient, expected_gradient in zip(torch.autograd.grad(terms["loss"], ours), torch.autograd.grad(expected["loss"], theirs)):
        torch.testing.assert_close(ours_gradient.double(), expected_gradient, rtol=1e-4, atol=1e-5)


def test_dskd_all_masked_gives_zero_terms_and_zero_gradients():
    module = DualSpaceDistillation(**SIZES)
    inputs = dskd_inputs(seed=53)
    inputs["student_mask"] = torch.zeros(B, LS, dtype=torch.bool)
    inputs["teacher_mask"] = torch.zeros(B, LT, dtype=torch.bool)
    student_head, teacher_head = heads(seed=54)
    terms = run_dskd(module, inputs, student_head, teacher_head, 1.0)
    assert all(value.item() == 0.0 for value in terms.values())
    leaves = [*module.parameters(), student_head, inputs["student_hidden"], inputs["student_logits"]]
    for gradient in torch.autograd.grad(terms["loss"], leaves, allow_unused=True):
        assert gradient is None or (torch.isfinite(gradient).all() and gradient.abs().max() == 0)


def test_dskd_bf16_inputs_give_float32_terms():
    module = DualSpaceDistillation(**SIZES)
    inputs = dskd_inputs(seed=55, dtype=torch.bfloat16)
    student_head, teacher_head = heads(seed=56)
    terms = run_dskd(module, inputs, student_head, teacher_head, 1.0)
    reference = run_dskd(module, {k: (v.float() if v.is_floating_point() else v) for k, v in inputs.items()}, student_head, teacher_head, 1.0)
    for name, value in terms.items():
        assert value.dtype == torch.float32 and torch.isfinite(value)
        torch.testing.assert_close(value, reference[name], rtol=1e-5, atol=1e-5)  # the same bf16 values, computed in float32
    terms["loss"].backward()
    assert inputs["student_hidden"].grad.dtype == torch.bfloat16 and torch.isfinite(inputs["student_hidden"].grad).all()


def test_dskd_gradients_are_routed_as_documented():
    """student_space reaches only the student's logits; projector_ce only the projections on the
    teacher-to-student path and the student head; teacher_space not the student's logits."""
    module = DualSpaceDistillation(**SIZES)
    inputs = dskd_inputs(seed=57)
    student_head, teacher_head = heads(seed=58)
    terms = run_dskd(module, inputs, student_head, teacher_head, 1.0)
    leaves = {**dict(module.named_parameters()), "head": student_head, "hidden": inputs["student_hidden"], "logits": inputs["student_logits"]}

    def reached(term):
        gradients = torch.autograd.grad(terms[term], list(leaves.values()), retain_graph=True, allow_unused=True)
        return {name for name, g in zip(leaves, gradients) if g is not None and g.abs().max() > 0}

    assert reached("student_space") == {"logits"}
    assert reached("projector_ce") == {"query.weight", "key.weight", "teacher_to_student.weight", "head"}
    assert reached("teacher_space") == {"query.weight", "key.weight", "student_to_teacher.weight", "hidden"}


def test_dskd_short_optimisation_lowers_the_loss():
    torch.manual_seed(59)
    module = DualSpaceDistillation(**SIZES)
    inputs = dskd_inputs(seed=60)
    inputs["teacher_mask"][2, :3] = True
    hidden = torch.nn.Parameter(inputs.pop("student_hidden").detach())
    student_head = torch.nn.Parameter(heads(seed=61)[0].detach())
    teacher_head = heads(seed=62)[1]
    inputs.pop("student_logits")
    optimizer = torch.optim.Adam([hidden, student_head, *module.parameters()], lr=1e-2)
    losses = []
    for _ in range(200):
        terms = module(
            student_hidden=hidden,
            student_logits=hidden @ student_head.T,
            student_head=lambda h: h @ student_head.detach().T,  # the projector's CE leaves the head alone
            teacher_head=lambda h: h @ teacher_head.T,
            **inputs,
        )
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        losses.append(terms["loss"].item())
    assert losses[-1] < 0.5 * losses[0], losses[::20]
