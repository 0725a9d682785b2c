"""The SigLIP, NegCLIP, UniCL and FSC-CLIP losses against direct loop implementations written here.

Each reference walks rows and columns with Python loops over scalar tensors (nothing vectorised is shared with the
code under test), so autograd through it gives independent gradients too. Everything runs in float64.
"""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import SigLipLoss

from cliptune.config import LossConfig
from cliptune.data.datasets import caption_groups
from cliptune.losses import clip_loss
from cliptune.losses.fsc import (
    FOCAL_GAMMA,
    LABEL_SMOOTHING,
    W_GLOBAL,
    W_LOCAL,
    focal_smoothed_ce,
    fsc_loss,
    global_hn_loss,
    local_hn_loss,
    token_similarity,
)
from cliptune.losses.gather import gathered_clip_loss
from cliptune.losses.negclip import negclip_loss
from cliptune.losses.objective import Dense, Extras, Objective
from cliptune.losses.siglip import siglip_loss
from cliptune.losses.unicl import unicl_loss

B, D, N, P, L = 5, 4, 3, 4, 5
CLIP_TEMPERATURE = math.log(1 / 0.07)


# ----- references: loops over scalars -----


def _scale(log_scale: torch.Tensor) -> torch.Tensor:
    """exp(log_scale) capped at 100, with no gradient once capped."""
    return log_scale.exp() if log_scale.item() < math.log(100) else log_scale * 0 + 100.0


def _log_softmax_at(scores: list, k: int) -> torch.Tensor:
    return scores[k] - torch.log(sum(torch.exp(s) for s in scores))


def ref_siglip_parts(img, txt, log_scale, bias):
    """The loss's share of the matching pairs and that of the others."""
    t, parts = log_scale.exp(), {"positive_pairs": 0.0, "negative_pairs": 0.0}
    for i in range(len(img)):
        for j in range(len(txt)):
            z = 1.0 if i == j else -1.0
            term = torch.log1p(torch.exp(-z * (t * torch.dot(img[i], txt[j]) + bias)))
            key = "positive_pairs" if i == j else "negative_pairs"
            parts[key] = parts[key] + term / len(img)
    return parts


def ref_siglip(img, txt, log_scale, bias):
    return sum(ref_siglip_parts(img, txt, log_scale, bias).values())


def ref_negclip_directions(img, txt, log_scale, neg=None, mask=None):
    s, rows, i2t, t2i = _scale(log_scale), len(img), 0.0, 0.0
    valid_negatives = [neg[b, k] for b in range(rows) for k in range(N) if mask[b, k]] if neg is not None else []
    for i in range(rows):
        scores = [s * torch.dot(img[i], txt[j]) for j in range(rows)]
        scores += [s * torch.dot(img[i], t) for t in valid_negatives]
        i2t = i2t - _log_softmax_at(scores, i)
        t2i = t2i - _log_softmax_at([s * torch.dot(txt[i], img[j]) for j in range(rows)], i)
    return {"image_to_text": i2t / rows, "text_to_image": t2i / rows}


def ref_negclip(img, txt, log_scale, neg=None, mask=None):
    return sum(ref_negclip_directions(img, txt, log_scale, neg, mask).values()) / 2


def ref_unicl_directions(img, txt, log_scale, labels):
    s, rows, i2t_total, t2i_total = _scale(log_scale), len(img), 0.0, 0.0
    for i in range(rows):
        group = [j for j in range(rows) if labels[j] == labels[i]]
        i2t = [s * torch.dot(img[i], txt[j]) for j in range(rows)]
        t2i = [s * torch.dot(txt[i], img[j]) for j in range(rows)]
        for j in group:
            i2t_total = i2t_total - _log_softmax_at(i2t, j) / len(group)
            t2i_total = t2i_total - _log_softmax_at(t2i, j) / len(group)
    return {"image_to_text": i2t_total / rows, "text_to_image": t2i_total / rows}


def ref_unicl(img, txt, log_scale, labels):
    return sum(ref_unicl_directions(img, txt, log_scale, labels).values()) / 2


def ref_focal(rows: list, gamma: float, eps: float):
    """rows: per row, the list of its valid logits, the positive first."""
    total, count = 0.0, 0
    for scores in rows:
        if len(scores) == 1:
            continue
        count += 1
        k_valid = len(scores)
        for k in range(k_valid):
            log_p = _log_softmax_at(scores, k)
            target = 1 - eps + eps / k_valid if k == 0 else eps / k_valid
            total = total - target * (1 - torch.exp(log_p)) ** gamma * log_p
    return total / count if count else torch.tensor(0.0, dtype=torch.float64)


def ref_global_hn(img, txt, neg, mask, log_scale, gamma=FOCAL_GAMMA, eps=LABEL_SMOOTHING):
    s = _scale(log_scale)
    rows = []
    for i in range(len(img)):
        rows.append(
            [s * torch.dot(img[i], txt[i])] + [s * torch.dot(img[i], neg[i, k]) for k in range(N) if mask[i, k]]
        )
    return ref_focal(rows, gamma, eps)


def ref_token_similarity(patches, tokens, token_mask, log_scale):
    """S(I, T) for one image (P, D) and one text (L, D)."""
    s, scores = _scale(log_scale), []
    for t in range(len(tokens)):
        if not token_mask[t]:
            continue
        a = [torch.dot(tokens[t], patches[p]).item() for p in range(len(patches))]  # .item(): no gradient
        low, high = min(a), max(a)
        w = [(x - low) / (high - low) for x in a] if high > low else [1.0] * len(a)
        w = [x / sum(w) for x in w]
        v = sum(w[p] * patches[p] for p in range(len(patches)))
        v = v / torch.sqrt(torch.dot(v, v))
        scores.append(s * torch.dot(v, tokens[t] / torch.sqrt(torch.dot(tokens[t], tokens[t]))))
    return torch.log(sum(torch.exp(x) for x in scores))


def ref_local_hn(
    patch, text, text_mask, neg_tok, neg_tok_mask, mask, log_scale, gamma=FOCAL_GAMMA, eps=LABEL_SMOOTHING
):
    rows = []
    for i in range(len(patch)):
        row = [ref_token_similarity(patch[i], text[i], text_mask[i], log_scale)]
        row += [
            ref_token_similarity(patch[i], neg_tok[i, k], neg_tok_mask[i, k], log_scale) for k in range(N) if mask[i, k]
        ]
        rows.append(row)
    return ref_focal(rows, gamma, eps)


# ----- data and comparison -----


def _batch(seed: int = 0, rows: int = B) -> dict[str, torch.Tensor]:
    """A float64 batch; features un-normalised (the loss calls normalise them), row 0 has no valid negative."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    mask = torch.rand(rows, N, generator=g) < 0.6
    mask[0] = False
    mask[1:, 0] = True
    text_mask = torch.ones(rows, L, dtype=torch.bool)
    text_mask[:, 0] = False  # start token
    text_mask[1::2, -2:] = False  # padding
    neg_token_mask = torch.rand(rows, N, L, generator=g) < 0.7
    neg_token_mask[..., 1] = True
    return {
        "img": randn(rows, D),
        "txt": randn(rows, D),
        "neg": randn(rows, N, D),
        "mask": mask,
        "labels": torch.tensor([0, 1, 0, 2, 1, 3, 2][:rows]),
        "patch": randn(rows, P, D),
        "text_tok": randn(rows, L, D),
        "text_mask": text_mask,
        "neg_tok": randn(rows, N, L, D),
        "neg_tok_mask": neg_token_mask,
        "scale": torch.tensor(CLIP_TEMPERATURE, dtype=torch.float64),
        "bias": torch.tensor(-2.0, dtype=torch.float64),
    }


def _normalised(x: dict) -> dict:
    return {**x, **{k: F.normalize(x[k], dim=-1) for k in ("img", "txt", "neg")}}


def _value_and_grads(fn, batch: dict, keys: tuple[str, ...], normalise: bool = True) -> tuple[torch.Tensor, dict]:
    leaves = {k: v.clone().requires_grad_() if k in keys else v for k, v in batch.items()}
    value = fn(_normalised(leaves) if normalise else leaves)
    grads = torch.autograd.grad(value, [leaves[k] for k in keys], allow_unused=True)
    return value.detach(), dict(zip(keys, grads))


def _assert_same(got, expected, atol: float = 1e-10) -> None:
    torch.testing.assert_close(got[0], expected[0], atol=atol, rtol=0)
    for key in expected[1]:
        e = expected[1][key]
        e = torch.zeros_like(got[1][key]) if e is None else e
        torch.testing.assert_close(got[1][key], e, atol=atol, rtol=0, msg=key)


FEATURES = ("img", "txt", "scale")
TOKENS = ("patch", "text_tok", "neg_tok", "scale")

# ----- SigLIP -----


def test_siglip_matches_the_loop():
    keys = (*FEATURES, "bias")
    got = _value_and_grads(lambda x: siglip_loss(x["img"], x["txt"], x["scale"], x["bias"]), _batch(), keys)
    expected = _value_and_grads(lambda x: ref_siglip(x["img"], x["txt"], x["scale"], x["bias"]), _batch(), keys)
    _assert_same(got, expected)


@pytest.mark.parametrize(("log_scale", "bias"), [(math.log(10), -10.0), (5.0, 1.5)])  # 5.0: exp > 100, not clamped
def test_siglip_matches_open_clip(log_scale, bias):
    batch = {
        **_batch(seed=3),
        "scale": torch.tensor(log_scale, dtype=torch.float64),
        "bias": torch.tensor(bias, dtype=torch.float64),
    }
    keys = (*FEATURES, "bias")
    got = _value_and_grads(lambda x: siglip_loss(x["img"], x["txt"], x["scale"], x["bias"]), batch, keys)
    expected = _value_and_grads(lambda x: SigLipLoss()(x["img"], x["txt"], x["scale"].exp(), x["bias"]), batch, keys)
    _assert_same(got, expected)


# ----- NegCLIP -----


def _negclip(x):
    return negclip_loss(x["img"], x["txt"], x["scale"], x["neg"], x["mask"])


@pytest.mark.parametrize("log_scale", [CLIP_TEMPERATURE, 5.0])  # 5.0: above the clamp
def test_negclip_matches_the_loop(log_scale):
    batch = {**_batch(), "scale": torch.tensor(log_scale, dtype=torch.float64)}
    keys = (*FEATURES, "neg")
    got = _value_and_grads(_negclip, batch, keys)
    expected = _value_and_grads(lambda x: ref_negclip(x["img"], x["txt"], x["scale"], x["neg"], x["mask"]), batch, keys)
    _assert_same(got, expected)
    if log_scale > math.log(100):
        assert got[1]["scale"] == 0


def test_negclip_without_a_valid_negative_is_the_clip_loss():
    batch = {**_batch(), "mask": torch.zeros(B, N, dtype=torch.bool)}
    got = _value_and_grads(_negclip, batch, FEATURES)
    expected = _value_and_grads(lambda x: clip_loss(x["img"], x["txt"], x["scale"]), batch, FEATURES)
    _assert_same(got, expected, atol=1e-12)


def _with_masked_negatives(batch: dict, fill: float | None, key: str = "neg") -> dict:
    """`batch` with the values of every masked negative replaced (random when fill is None)."""
    values = batch[key].clone()
    missing = ~batch["mask"]
    replacement = torch.randn_like(values) * 1e3 if fill is None else torch.full_like(values, fill)
    values[missing] = replacement[missing]
    return {**batch, key: values}


def _zero_vectors_kept(batch: dict) -> dict:
    """What FSC-CLIP feeds: the missing negatives as zero vectors that do take part."""
    neg = batch["neg"].clone()
    neg[~batch["mask"]] = 0.0
    return {**batch, "neg": neg, "mask": torch.ones_like(batch["mask"])}


@pytest.mark.parametrize("fill", [None, 1e6, float("nan")])
@pytest.mark.parametrize("loss", ["negclip", "global_hn", "fsc"])
def test_a_masked_negative_changes_nothing_and_is_not_a_zero_vector(loss, fill):
    fn = {"negclip": _negclip, "global_hn": lambda x: _global_hn(x), "fsc": lambda x: _fsc(x, tokens=False)}[loss]
    batch = _normalised(_batch(seed=1))  # normalised here: F.normalize of a NaN row would poison its own gradient
    keys = (*FEATURES, "neg")
    reference = _value_and_grads(fn, batch, keys, normalise=False)
    changed = _value_and_grads(fn, _with_masked_negatives(batch, fill), keys, normalise=False)
    _assert_same(changed, reference, atol=1e-12)  # includes the masked negatives' gradient: 0
    zero_vectors = _value_and_grads(fn, _zero_vectors_kept(batch), keys, normalise=False)
    assert abs(zero_vectors[0] - reference[0]) > 1e-6  # a zero vector adds exp(0) to every softmax: small, not 0


# ----- UniCL -----


def test_unicl_matches_the_loop():
    batch = _batch()
    got = _value_and_grads(lambda x: unicl_loss(x["img"], x["txt"], x["scale"], x["labels"]), batch, FEATURES)
    expected = _value_and_grads(lambda x: ref_unicl(x["img"], x["txt"], x["scale"], x["labels"]), batch, FEATURES)
    _assert_same(got, expected)
    distinct = _value_and_grads(lambda x: clip_loss(x["img"], x["txt"], x["scale"]), batch, FEATURES)
    assert abs(got[0] - distinct[0]) > 1e-3  # the duplicated labels do matter


def test_unicl_with_distinct_labels_is_the_clip_loss():
    batch = {**_batch(), "labels": torch.tensor([7, 3, 9, 0, 1])}
    got = _value_and_grads(lambda x: unicl_loss(x["img"], x["txt"], x["scale"], x["labels"]), batch, FEATURES)
    expected = _value_and_grads(lambda x: clip_loss(x["img"], x["txt"], x["scale"]), batch, FEATURES)
    _assert_same(got, expected, atol=1e-12)


def test_caption_groups_match_identical_captions_only():
    ids = caption_groups(["A dog.", "  a   DOG. ", "a dog", "a cat", "A dog."])
    assert ids.dtype == torch.long and ids.shape == (5,)
    assert ids[0] == ids[1] == ids[4]
    assert len({ids[0].item(), ids[2].item(), ids[3].item()}) == 3
    # a hash of the text, not a position: the same caption has the same id in any batch (on any rank)
    assert caption_groups(["a cat", "x"])[0] == ids[3]


# ----- FSC-CLIP -----


@pytest.mark.parametrize(("gamma", "eps"), [(2.0, 0.02), (0.0, 0.0), (0.5, 0.3)])
def test_focal_smoothed_ce_matches_the_loop(gamma, eps):
    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(6, 4, generator=g, dtype=torch.float64) * 3).requires_grad_()
    valid = torch.rand(6, 4, generator=g) < 0.5
    valid[:, 0] = True
    valid[0, 1:] = False
    valid[1, 1] = True
    got = focal_smoothed_ce(logits, valid, gamma, eps)
    rows = [[logits[i, k] for k in range(4) if valid[i, k]] for i in range(6)]
    expected = ref_focal(rows, gamma, eps)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    got_grad = torch.autograd.grad(got, logits)[0]
    expected_grad = torch.autograd.grad(expected, logits)[0]
    torch.testing.assert_close(got_grad, expected_grad, atol=1e-12, rtol=0)
    if gamma == 0 and eps == 0:  # plain cross-entropy over the valid columns of the rows with a negative
        plain = [F.cross_entropy(logits[i, valid[i]][None], torch.tensor([0])) for i in range(6) if valid[i, 1:].any()]
        torch.testing.assert_close(got, sum(plain) / len(plain), atol=1e-12, rtol=0)


def test_focal_smoothed_ce_without_a_negative_is_zero_and_keeps_the_graph():
    logits = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    valid = torch.zeros(3, 4, dtype=torch.bool)
    valid[:, 0] = True
    loss = focal_smoothed_ce(logits, valid)
    assert loss.item() == 0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def _global_hn(x):
    return global_hn_loss(x["img"], x["txt"], x["neg"], x["mask"], x["scale"])


def _local_hn(x):
    return local_hn_loss(
        x["patch"], x["text_tok"], x["text_mask"], x["neg_tok"], x["neg_tok_mask"], x["mask"], x["scale"]
    )


def _fsc(x, tokens: bool = True):
    if not tokens:
        return fsc_loss(x["img"], x["txt"], x["scale"], x["neg"], x["mask"])
    return fsc_loss(
        x["img"],
        x["txt"],
        x["scale"],
        x["neg"],
        x["mask"],
        x["patch"],
        x["text_tok"],
        x["text_mask"],
        x["neg_tok"],
        x["neg_tok_mask"],
    )


def test_global_hn_matches_the_loop():
    keys = (*FEATURES, "neg")
    got = _value_and_grads(_global_hn, _batch(), keys)
    expected = _value_and_grads(
        lambda x: ref_global_hn(x["img"], x["txt"], x["neg"], x["mask"], x["scale"]), _batch(), keys
    )
    _assert_same(got, expected)


def test_token_similarity_matches_the_loop_and_survives_flat_attention():
    batch = _batch()
    batch["patch"][2] = batch["patch"][2, :1]  # image 2: every patch the same, so max == min for each token
    keys = ("patch", "text_tok", "scale")

    def ours(x):
        return token_similarity(x["patch"], x["text_tok"], x["text_mask"], x["scale"]).sum()

    def loop(x):
        return sum(
            ref_token_similarity(x["patch"][i], x["text_tok"][i], x["text_mask"][i], x["scale"]) for i in range(B)
        )

    got, expected = _value_and_grads(ours, batch, keys), _value_and_grads(loop, batch, keys)
    _assert_same(got, expected)
    assert all(torch.isfinite(g).all() for g in got[1].values())


def test_local_hn_matches_the_loop():
    got = _value_and_grads(_local_hn, _batch(), TOKENS)
    expected = _value_and_grads(
        lambda x: ref_local_hn(
            x["patch"], x["text_tok"], x["text_mask"], x["neg_tok"], x["neg_tok_mask"], x["mask"], x["scale"]
        ),
        _batch(),
        TOKENS,
    )
    _assert_same(got, expected)


def test_local_hn_never_scores_a_masked_negative():
    batch = _batch(seed=2)
    reference = _value_and_grads(_local_hn, batch, TOKENS)
    garbage = _with_masked_negatives(batch, float("nan"), key="neg_tok")
    garbage["neg_tok_mask"] = batch["neg_tok_mask"] & batch["mask"][..., None]  # even with no token left
    _assert_same(_value_and_grads(_local_hn, garbage, TOKENS), reference, atol=1e-12)
    zeros = _with_masked_negatives(batch, 0.0, key="neg_tok")
    zeros["mask"] = torch.ones_like(batch["mask"])
    assert abs(_value_and_grads(_local_hn, zeros, TOKENS)[0] - reference[0]) > 1e-3


@pytest.mark.parametrize("tokens", [True, False])
def test_fsc_loss_matches_the_loop(tokens):
    keys = (*FEATURES, "neg", "patch", "text_tok", "neg_tok") if tokens else (*FEATURES, "neg")

    def loop(x):
        total = ref_negclip(x["img"], x["txt"], x["scale"], x["neg"], x["mask"])
        total = total + W_GLOBAL * ref_global_hn(x["img"], x["txt"], x["neg"], x["mask"], x["scale"])
        if tokens:
            total = total + W_LOCAL * ref_local_hn(
                x["patch"], x["text_tok"], x["text_mask"], x["neg_tok"], x["neg_tok_mask"], x["mask"], x["scale"]
            )
        return total

    got = _value_and_grads(lambda x: _fsc(x, tokens), _batch(), keys)
    _assert_same(got, _value_and_grads(loop, _batch(), keys))


def test_fsc_loss_without_a_valid_negative_is_the_clip_loss():
    batch = {**_batch(), "mask": torch.zeros(B, N, dtype=torch.bool)}
    got = _value_and_grads(_fsc, batch, (*FEATURES, "patch"))
    expected = _value_and_grads(lambda x: clip_loss(x["img"], x["txt"], x["scale"]), batch, (*FEATURES, "patch"))
    _assert_same(got, expected, atol=1e-12)


# ----- dtypes and errors -----

ALL_LOSSES = {
    "siglip": lambda x: siglip_loss(x["img"], x["txt"], x["scale"], x["bias"]),
    "negclip": _negclip,
    "unicl": lambda x: unicl_loss(x["img"], x["txt"], x["scale"], x["labels"]),
    "fsc": _fsc,
}


@pytest.mark.parametrize("name", list(ALL_LOSSES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float32_and_bf16_inputs_give_a_float32_loss(name, dtype):
    batch = _normalised(_batch())
    expected = ALL_LOSSES[name](batch)
    low = {k: v.to(dtype) if v.is_floating_point() and k not in ("scale", "bias") else v for k, v in batch.items()}
    low["scale"], low["bias"] = batch["scale"].float(), batch["bias"].float()
    got = ALL_LOSSES[name](low)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, atol=0.05 if dtype == torch.bfloat16 else 1e-5, rtol=0.02)


def test_mistakes_are_named():
    x = _normalised(_batch())
    with pytest.raises(ValueError, match="same number of rows"):
        siglip_loss(x["img"], x["txt"][:3], x["scale"], x["bias"])
    with pytest.raises(ValueError, match="negative_mask must be a bool"):
        negclip_loss(x["img"], x["txt"], x["scale"], x["neg"], x["mask"].long())
    with pytest.raises(ValueError, match="negative_features must have shape"):
        negclip_loss(x["img"], x["txt"], x["scale"], x["neg"][:, :, :2], x["mask"])
    with pytest.raises(ValueError, match="labels must be an int64"):
        unicl_loss(x["img"], x["txt"], x["scale"], x["labels"].float())
    with pytest.raises(ValueError, match="or none of them"):
        fsc_loss(x["img"], x["txt"], x["scale"], x["neg"], x["mask"], patch_tokens=x["patch"])
    with pytest.raises(ValueError, match="valid\\[:, 0\\]"):
        focal_smoothed_ce(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool))


# ----- the parts each objective logs -----

PARTS = {  # objective -> (its loss function, the loop reference of the parts it logs)
    "clip": (
        lambda x: gathered_clip_loss(x["img"], x["txt"], x["scale"]),
        lambda x: ref_negclip_directions(x["img"], x["txt"], x["scale"]),
    ),
    "siglip": (
        lambda x: siglip_loss(x["img"], x["txt"], x["scale"], x["bias"]),
        lambda x: ref_siglip_parts(x["img"], x["txt"], x["scale"], x["bias"]),
    ),
    "negclip": (_negclip, lambda x: ref_negclip_directions(x["img"], x["txt"], x["scale"], x["neg"], x["mask"])),
    "unicl": (
        lambda x: unicl_loss(x["img"], x["txt"], x["scale"], x["labels"]),
        lambda x: ref_unicl_directions(x["img"], x["txt"], x["scale"], x["labels"]),
    ),
    "fsc": (lambda x: _fsc(x, tokens=False), lambda x: ref_fsc_parts(x, tokens=False)),
}


def ref_fsc_parts(x: dict, tokens: bool) -> dict[str, torch.Tensor]:
    """FSC-CLIP's logged terms by the loops: NegCLIP's two directions and their mean, the hard-negative losses."""
    directions = ref_negclip_directions(x["img"], x["txt"], x["scale"], x["neg"], x["mask"])
    parts = {f"negclip/{key}": value for key, value in directions.items()}
    parts["negclip"] = ref_negclip(x["img"], x["txt"], x["scale"], x["neg"], x["mask"])
    parts["global_hn"] = ref_global_hn(x["img"], x["txt"], x["neg"], x["mask"], x["scale"])
    if tokens:
        token_inputs = (x["patch"], x["text_tok"], x["text_mask"], x["neg_tok"], x["neg_tok_mask"])
        parts["local_hn"] = ref_local_hn(*token_inputs, x["mask"], x["scale"])
    return parts


@pytest.mark.parametrize("name", list(PARTS))
def test_the_objective_logs_each_part_of_its_loss_and_leaves_the_loss_alone(name):
    """Objective.record_terms: `loss/PART` equals the loop's part, and the loss is the loss function's, bit for bit."""
    x = _normalised(_batch())
    model = SimpleNamespace(logit_scale=x["scale"], logit_bias=None)
    objective = Objective(LossConfig(name=name, siglip_bias_init=-2.0), model)
    text = torch.cat([x["txt"], x["neg"].flatten(0, 1)]) if name in ("negclip", "fsc") else x["txt"]
    loss = objective(model, x["img"], text, Extras(group=x["labels"], negative_mask=x["mask"]))
    loss_fn, reference = PARTS[name]
    # The objective reads the temperature and its own bias in float32 (-2.0 exactly), as training does.
    assert torch.equal(loss, loss_fn({**x, "scale": x["scale"].float(), "bias": torch.tensor(-2.0)}))
    parts = {key.removeprefix("loss/"): v for key, v in objective.logged.items() if key.startswith("loss/")}
    expected = reference(x)
    assert parts.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(parts[key], value, atol=0, rtol=1e-6, msg=key)  # float32 temperature
        assert not parts[key].requires_grad


def test_fsc_logs_its_negclip_directions_and_its_terms_sum_to_the_loss():
    """With the local term (Objective.dense, as training calls it): the logged NegCLIP directions and hard-negative
    terms equal the loops', their mean is `loss/negclip`, and mean + 0.5 global + 0.2 local is the loss."""
    x = _normalised(_batch())
    model = SimpleNamespace(logit_scale=x["scale"], logit_bias=None)
    objective = Objective(LossConfig(name="fsc"), model)
    dense = Dense(
        image=x["img"],
        patches=x["patch"],
        text=torch.cat([x["txt"], x["neg"].flatten(0, 1)]),
        tokens=torch.cat([x["text_tok"], x["neg_tok"].flatten(0, 1)]),
        token_mask=torch.cat([x["text_mask"], x["neg_tok_mask"].flatten(0, 1)]),
    )
    loss = objective.dense(model, dense, Extras(negative_mask=x["mask"]))
    parts = {key.removeprefix("loss/"): v for key, v in objective.logged.items() if key.startswith("loss/")}
    expected = ref_fsc_parts(x, tokens=True)
    assert parts.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(parts[key], value, atol=0, rtol=1e-6, msg=key)  # float32 temperature
    negclip = (parts["negclip/image_to_text"] + parts["negclip/text_to_image"]) / 2
    torch.testing.assert_close(negclip, parts["negclip"], atol=1e-12, rtol=0)
    total = negclip + W_GLOBAL * parts["global_hn"] + W_LOCAL * parts["local_hn"]
    torch.testing.assert_close(loss.detach(), total, atol=1e-12, rtol=0)
    reference = expected["negclip"] + W_GLOBAL * expected["global_hn"] + W_LOCAL * expected["local_hn"]
    torch.testing.assert_close(loss.detach(), reference, atol=0, rtol=1e-6)
