"""keras_moe.upcycling.kerashub's upcycle and upcycle_causal_lm (also
`keras_moe.kerashub.upcycle` and `upcycle_causal_lm`): dense KerasHub backbones
and CausalLMs into their MoE family (Mistral and Llama -> Mixtral, Qwen3 ->
Qwen3-MoE), exact at initialisation on every backend; the options (layers,
router, noise, Qwen3's q/k norm epsilon); save/reload; generation with a
converted preprocessor; sparsify on the result; clear errors for what cannot
be upcycled."""

import io

import keras
import numpy as np
import pytest

from tests.conftest import skip_or_fail
from tests.conftest import to_numpy

try:
    import keras_hub

    from keras_moe.upcycling.kerashub import upcycle
    from keras_moe.upcycling.kerashub_causal_lm import upcycle_causal_lm
except ImportError as error:
    keras_hub = None
    IMPORT_ERROR = error

VOCAB = 64
TOKENS = {
    "token_ids": np.random.default_rng(0).integers(0, VOCAB, (2, 10)).astype("int32"),
    "padding_mask": np.array([[1] * 10, [1] * 7 + [0] * 3], "int32"),
}
SMALL = dict(num_layers=2, num_query_heads=4, num_key_value_heads=2, hidden_dim=16)


@pytest.fixture(autouse=True)
def _needs_keras_hub():
    if keras_hub is None:
        skip_or_fail(f"keras_hub is not importable ({IMPORT_ERROR})")


def dense_backbone(family, vocabulary_size=VOCAB, **kwargs):
    """A tiny dense backbone with non-trivial norm scales (so norms matter)."""
    models = keras_hub.models
    kwargs = {**SMALL, **kwargs}
    if family == "mistral":
        # A window shorter than the input: the sliding window is carried over.
        backbone = models.MistralBackbone(
            vocabulary_size=vocabulary_size,
            intermediate_dim=32,
            sliding_window=4,
            **kwargs,
        )
    elif family == "llama":
        backbone = models.LlamaBackbone(
            vocabulary_size=vocabulary_size,
            intermediate_dim=32,
            tie_word_embeddings=True,
            **kwargs,
        )
    else:
        backbone = models.Qwen3Backbone(
            vocabulary_size=vocabulary_size,
            intermediate_dim=32,
            head_dim=4,
            sliding_window_size=4,
            **kwargs,
        )
    rng = np.random.default_rng(1)
    for variable in backbone.weights:
        if variable.path.endswith("scale"):
            variable.assign(rng.uniform(0.5, 1.5, variable.shape).astype("float32"))
    return backbone


def relative_error(actual, expected):
    actual, expected = to_numpy(actual), to_numpy(expected)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def expert_kernels(backbone, layer=0):
    """(gate, up, down) expert kernels of one MoE decoder layer, as NumPy."""
    decoder = backbone.transformer_layers[layer]
    block = getattr(decoder, "_sparse_moe_block", None)
    bank = (decoder.mlp if block is None else block).expert_bank
    down = to_numpy(bank._expert_feedforward_output_dense)
    if hasattr(bank, "_expert_feedforward_intermediate_dense"):
        gate = to_numpy(bank._expert_feedforward_gate_dense)
        up = to_numpy(bank._expert_feedforward_intermediate_dense)
    else:
        gate, up = np.split(to_numpy(bank._expert_feedforward_gate_dense), 2, axis=-1)
    return gate, up, down


PAIRS = [
    ("mistral", "MixtralBackbone"),
    ("llama", "MixtralBackbone"),
    ("qwen3", "Qwen3MoeBackbone"),
]


@pytest.mark.parametrize("family, target", PAIRS)
def test_upcycled_backbone_computes_the_dense_one(family, target):
    dense = dense_backbone(family)
    moe = upcycle(dense, n_experts=4, top_k=2)
    assert type(moe).__name__ == target
    assert (moe.num_experts, moe.top_k) == (4, 2)
    assert moe.dtype_policy.name == dense.dtype_policy.name
    assert relative_error(moe(TOKENS), dense(TOKENS)) <= 1e-5
    gate, up, down = expert_kernels(moe, layer=1)
    source = dense.transformer_layers[1]
    for experts, dense_layer in [
        (gate, source._feedforward_gate_dense),
        (up, source._feedforward_intermediate_dense),
        (down, source._feedforward_output_dense),
    ]:
        for expert in experts:
            np.testing.assert_array_equal(expert, to_numpy(dense_layer.kernel))


def test_llama_tied_embeddings_become_mixtral_output_projection():
    dense = dense_backbone("llama")
    moe = upcycle(dense, n_experts=2, top_k=1)
    embeddings = to_numpy(dense.token_embedding.embeddings)
    np.testing.assert_array_equal(to_numpy(moe.token_embedding.embeddings), embeddings)
    reverse = to_numpy(moe.token_embedding.reverse_embeddings)
    np.testing.assert_array_equal(reverse, embeddings.T)
    assert moe.sliding_window is None
    logits = moe.token_embedding(moe(TOKENS), reverse=True)
    dense_logits = dense.token_embedding(dense(TOKENS), reverse=True)
    assert relative_error(logits, dense_logits) <= 1e-5


@pytest.mark.parametrize("cls", ["LlamaBackbone", "Llama3Backbone"])
def test_llama_rope_position_scaling_factor_upcycles_exactly(cls):
    # KerasHub's Llama rotary embedding ignores the factor; Mixtral's would
    # divide its frequencies by it (2e-3 relative off here with it kept).
    dense = getattr(keras_hub.models, cls)(
        vocabulary_size=VOCAB,
        intermediate_dim=32,
        rope_position_scaling_factor=4.0,
        **SMALL,
    )
    moe = upcycle(dense, n_experts=2, top_k=1)
    assert relative_error(moe(TOKENS), dense(TOKENS)) <= 1e-5


@pytest.mark.parametrize(
    "moe_layers, sparse", [("every_other", [False, True]), ([0], [True, False])]
)
def test_qwen3_mixes_dense_and_moe_layers_exactly(moe_layers, sparse):
    dense = dense_backbone("qwen3")
    moe = upcycle(dense, n_experts=4, moe_layers=moe_layers)
    assert [layer.is_sparse_mlp for layer in moe.transformer_layers] == sparse
    assert relative_error(moe(TOKENS), dense(TOKENS)) <= 1e-5


def test_qwen3_qk_norm_epsilon_target_is_close_but_not_exact():
    # Why "rescale" is the default: KerasHub's Qwen3 and Qwen3-MoE attention
    # normalise queries and keys with different epsilons.
    dense = dense_backbone("qwen3")
    moe = upcycle(dense, n_experts=2, qk_norm_epsilon="target")
    error = relative_error(moe(TOKENS), dense(TOKENS))
    assert 1e-5 < error < 1e-2


def test_router_initializer_noise_and_seed():
    dense = dense_backbone("mistral")
    zeros = upcycle(dense, n_experts=4, router_initializer="zeros")
    router = zeros.transformer_layers[0]._sparse_moe_block
    np.testing.assert_array_equal(
        to_numpy(router._sparse_feedforward_gate_dense.kernel), 0.0
    )
    assert relative_error(zeros(TOKENS), dense(TOKENS)) <= 1e-5

    noisy = upcycle(dense, n_experts=4, expert_noise=0.05, seed=7)
    again = upcycle(dense, n_experts=4, expert_noise=0.05, seed=7)
    gate, _, _ = expert_kernels(noisy)
    np.testing.assert_array_equal(gate, expert_kernels(again)[0])
    assert not np.allclose(gate[0], gate[1])
    assert relative_error(noisy(TOKENS), dense(TOKENS)) > 1e-4


def router_kernels(backbone):
    kernels = []
    for decoder in backbone.transformer_layers:
        block = getattr(decoder, "_sparse_moe_block", None) or decoder.mlp
        kernels.append(to_numpy(block._sparse_feedforward_gate_dense.kernel))
    return kernels


@pytest.mark.parametrize(
    "family, router_initializer, seed",
    [
        ("mistral", "glorot_uniform", None),
        ("qwen3", "glorot_uniform", None),
        ("mistral", "glorot_uniform", 7),
        ("mistral", lambda: keras.initializers.RandomNormal(seed=5), None),
    ],
)
def test_router_initializer_draws_each_layer_its_own_kernel(
    family, router_initializer, seed
):
    dense = dense_backbone(family)
    runs = []
    for _ in range(2):
        keras.utils.set_random_seed(11)
        initializer = (
            router_initializer() if callable(router_initializer) else router_initializer
        )
        runs.append(
            router_kernels(
                upcycle(dense, n_experts=4, router_initializer=initializer, seed=seed)
            )
        )
    first, second = runs
    assert len(first) == 2
    assert np.abs(first[0] - first[1]).min() > 0  # no layer shares a value
    # Reproducible: by `seed`, the initializer's own seed, or Keras's global one.
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def test_load_balance_weight_reaches_the_target():
    moe = upcycle(dense_backbone("qwen3"), n_experts=2, load_balance_weight=0.5)
    assert moe.router_aux_loss_coefficient == 0.5
    moe = upcycle(dense_backbone("llama"), n_experts=2, load_balance_weight=0.5)
    assert moe.router_aux_loss_coef == 0.5


def test_upcycled_backbone_saves_and_reloads(tmp_path):
    moe = upcycle(dense_backbone("qwen3"), n_experts=4, moe_layers=[1], seed=0)
    expected = to_numpy(moe(TOKENS))
    path = tmp_path / "moe.keras"
    moe.save(path)
    reloaded = keras.saving.load_model(path)
    assert type(reloaded).__name__ == "Qwen3MoeBackbone"
    assert reloaded.mlp_only_layers == [0]
    np.testing.assert_allclose(to_numpy(reloaded(TOKENS)), expected, rtol=1e-6)


def sentencepiece_tokenizer(cls):
    try:
        import sentencepiece
    except ImportError as error:
        skip_or_fail(f"sentencepiece is not importable ({error})")
    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(
            ["the quick brown fox jumps", "the lazy dog sleeps", "a fox and a dog"]
        ),
        model_writer=proto,
        vocab_size=14,
        model_type="WORD",
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        pad_piece="<pad>",
        unk_piece="<unk>",
        bos_piece="<s>",
        eos_piece="</s>",
    )
    return cls(proto=proto.getvalue())


def byte_pair_tokenizer(cls):
    vocabulary = ["<|endoftext|>", "<|im_end|>", "Ġ", "a", "i", "r", "p", "l", "n"]
    vocabulary += ["e", "t", "o", "ai", "air", "Ġair", "pl", "pla", "ne", "plane"]
    vocabulary += ["Ġa", "Ġat", "po", "rt", "port"]
    merges = ["a i", "ai r", "Ġ air", "p l", "pl a", "n e", "pla ne", "Ġ a", "Ġa t"]
    merges += ["p o", "r t", "po rt"]
    return cls(
        vocabulary={token: i for i, token in enumerate(vocabulary)}, merges=merges
    )


def dense_causal_lm(family):
    models = keras_hub.models
    if family == "mistral":
        tokenizer = sentencepiece_tokenizer(models.MistralTokenizer)
        preprocessor = models.MistralCausalLMPreprocessor(tokenizer, sequence_length=8)
        task, prompt = models.MistralCausalLM, "the quick"
    else:
        tokenizer = byte_pair_tokenizer(models.Qwen3Tokenizer)
        preprocessor = models.Qwen3CausalLMPreprocessor(tokenizer, sequence_length=8)
        task, prompt = models.Qwen3CausalLM, " airplane at"
    backbone = dense_backbone(family, vocabulary_size=tokenizer.vocabulary_size())
    return task(backbone=backbone, preprocessor=preprocessor), prompt


@pytest.mark.parametrize(
    "family, target", [("mistral", "MixtralCausalLM"), ("qwen3", "Qwen3MoeCausalLM")]
)
def test_causal_lm_upcycles_with_its_preprocessor_saves_and_generates(
    family, target, tmp_path
):
    dense, prompt = dense_causal_lm(family)
    moe = upcycle_causal_lm(dense, n_experts=4, top_k=2)
    assert type(moe).__name__ == target
    assert type(moe.preprocessor).__name__ == target + "Preprocessor"
    assert moe.preprocessor.sequence_length == dense.preprocessor.sequence_length
    tokens = moe.preprocessor.tokenizer(prompt)
    np.testing.assert_array_equal(
        to_numpy(tokens), to_numpy(dense.preprocessor.tokenizer(prompt))
    )
    moe.save_to_preset(str(tmp_path / "preset"))
    reloaded = keras_hub.models.CausalLM.from_preset(str(tmp_path / "preset"))
    assert type(reloaded).__name__ == target
    x, _, _ = dense.preprocessor([prompt])
    # The prompt's positions: at padding whose whole sliding window is padding,
    # KerasHub's Mistral (fused attention) and Mixtral layers differ on some
    # backends; nothing reads those positions (losses and generation mask them).
    real = to_numpy(x["padding_mask"]).astype(bool)
    expected = to_numpy(dense(x))[real]
    assert relative_error(to_numpy(moe(x))[real], expected) <= 1e-5
    assert relative_error(to_numpy(reloaded(x))[real], expected) <= 1e-5
    dense.compile(sampler="greedy")
    reloaded.compile(sampler="greedy")
    assert reloaded.generate(prompt, max_length=8) == dense.generate(
        prompt, max_length=8
    )


def test_causal_lm_without_preprocessor_has_none():
    dense = keras_hub.models.LlamaCausalLM(dense_backbone("llama"), preprocessor=None)
    moe = upcycle_causal_lm(dense, n_experts=3, top_k=2)
    assert type(moe).__name__ == "MixtralCausalLM" and moe.preprocessor is None
    assert relative_error(moe(TOKENS), dense(TOKENS)) <= 1e-5


def test_sparsify_runs_the_upcycled_model_sparse_and_exact():
    from keras_moe.kerashub import sparsify

    dense = dense_backbone("mistral")
    moe = upcycle(dense, n_experts=4, top_k=2)
    assert sparsify(moe) is moe
    block = moe.transformer_layers[0]._sparse_moe_block
    assert type(block).__name__ == "SparseMixtralSparseMoeBlock"
    assert relative_error(moe(TOKENS), dense(TOKENS)) <= 1e-5


def _mistral_with_head_dim():
    return keras_hub.models.MistralBackbone(
        vocabulary_size=VOCAB, intermediate_dim=32, head_dim=8, **SMALL
    )


def _llama31():
    return keras_hub.models.LlamaBackbone(
        vocabulary_size=VOCAB,
        intermediate_dim=32,
        rope_frequency_adjustment_factor=8.0,
        rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0,
        rope_pretraining_sequence_length=64,
        **SMALL,
    )


def _mixtral():
    return keras_hub.models.MixtralBackbone(
        vocabulary_size=VOCAB, intermediate_dim=32, num_experts=2, **SMALL
    )


def _not_a_backbone():
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])


BAD_BACKBONES = [
    (_mixtral, {}, ValueError, "MixtralBackbone \\(already a mixture of experts\\)"),
    (_not_a_backbone, {}, ValueError, "Received: backbone of type Sequential"),
    (_mistral_with_head_dim, {}, ValueError, "`head_dim`.*head_dim=8"),
    (_llama31, {}, ValueError, "RoPE frequency scaling.*rope_low_freq_factor=1.0"),
    (
        lambda: dense_backbone("mistral"),
        {"moe_layers": "every_other"},
        ValueError,
        "`moe_layers` must be 'all'.*MistralBackbone.*cannot mix",
    ),
    (
        lambda: dense_backbone("qwen3"),
        {"moe_layers": [0, 2]},
        ValueError,
        "`moe_layers`.*from 0 to 1",
    ),
    (lambda: dense_backbone("qwen3"), {"moe_layers": "odd"}, ValueError, "moe_layers"),
    (
        lambda: dense_backbone("qwen3", num_layers=1),
        {"moe_layers": "every_other"},
        ValueError,
        "`moe_layers` must select at least one.*moe_layers='every_other', num_layers=1",
    ),
    (
        lambda: dense_backbone("qwen3"),
        {"moe_layers": []},
        ValueError,
        "`moe_layers` must hold at least one",
    ),
    (lambda: dense_backbone("qwen3"), {"moe_layers": 1}, TypeError, "moe_layers"),
    (lambda: dense_backbone("llama"), {"n_experts": 0}, ValueError, "`n_experts`"),
    (lambda: dense_backbone("llama"), {"top_k": 5}, ValueError, "`top_k`.*top_k=5"),
    (
        lambda: dense_backbone("llama"),
        {"expert_noise": -0.1},
        ValueError,
        "`expert_noise`",
    ),
    (
        lambda: dense_backbone("llama"),
        {"qk_norm_epsilon": "source"},
        ValueError,
        "`qk_norm_epsilon`",
    ),
    (
        lambda: keras_hub.models.LlamaCausalLM(
            dense_backbone("llama"), preprocessor=None
        ),
        {},
        TypeError,
        "upcycle_causal_lm",
    ),
]


@pytest.mark.parametrize("make, kwargs, error, message", BAD_BACKBONES)
def test_what_cannot_be_upcycled_is_refused_clearly(make, kwargs, error, message):
    kwargs = {"n_experts": 4, **kwargs}
    with pytest.raises(error, match=message):
        upcycle(make(), **kwargs)


def test_upcycle_causal_lm_refuses_a_backbone_and_other_tasks():
    with pytest.raises(TypeError, match="`causal_lm` must be a KerasHub `CausalLM`"):
        upcycle_causal_lm(dense_backbone("llama"), n_experts=2)
    mixtral = keras_hub.models.MixtralCausalLM(_mixtral(), preprocessor=None)
    with pytest.raises(ValueError, match="Received: causal_lm of type MixtralCausalLM"):
        upcycle_causal_lm(mixtral, n_experts=2)


def test_kerashub_exports_the_upcycling_functions():
    """`keras_moe.kerashub.upcycle` and `upcycle_causal_lm`, the documented
    names, are the functions of `keras_moe.upcycling`."""
    import keras_moe.kerashub

    assert keras_moe.kerashub.upcycle is upcycle
    assert keras_moe.kerashub.upcycle_causal_lm is upcycle_causal_lm
