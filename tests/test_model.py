"""Model math against Hugging Face's LlamaForCausalLM (Qwen3ForCausalLM with qk_norm), loss padding,
initialisation."""

import pytest
import torch

from model_checks import chunked_loss, graph_breaks
from pretrain import parallel
from pretrain.model.args import ExecutionArgs, LlamaArgs
from pretrain.model.execution import apply_execution
from pretrain.model.hf import merge_qkv, split_qkv
from pretrain.model.llama import Llama
from pretrain.model.weights import load_full_state_dict
from reference import cross_entropy, from_hf, to_hf

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tp_group():
    context = parallel.initialize(tp=1, pp=1, backend="gloo")
    yield context.tp_group
    parallel.shutdown()


def hf_model(args: LlamaArgs) -> "transformers.PreTrainedModel":
    """LlamaForCausalLM, or Qwen3ForCausalLM with qk_norm, of random weights (norms included)."""
    config = (transformers.Qwen3Config if args.qk_norm else transformers.LlamaConfig)(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, intermediate_size=args.ffn_hidden_size,
        num_hidden_layers=args.num_layers, num_attention_heads=args.num_heads, num_key_value_heads=args.num_kv_heads,
        head_dim=args.head_dim, rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta,
        max_position_embeddings=args.seq_len, tie_word_embeddings=args.tie_embeddings, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = (transformers.Qwen3ForCausalLM if args.qk_norm else transformers.LlamaForCausalLM)(config)
    with torch.no_grad():
        for param in model.parameters():  # HF initialises norms to 1: randomise them so eps/weight placement shows
            param.normal_(0.0, 0.2)
    return model.eval()


@pytest.mark.parametrize("args", [
    LlamaArgs(vocab_size=300, hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=2, ffn_hidden_size=96,
              seq_len=32, rope_theta=50000.0, norm_eps=1e-6),
    LlamaArgs(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4, ffn_hidden_size=96,
              seq_len=32, tie_embeddings=True),
    LlamaArgs(vocab_size=300, hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=2, ffn_hidden_size=96,
              seq_len=32, norm_eps=1e-6, qk_norm=True),
], ids=["gqa-untied-theta5e4", "mha-tied", "qk-norm-qwen3"])
def test_logits_and_loss_equal_hugging_face(args, tp_group):
    reference = hf_model(args)
    ours = Llama(args, tp_group).eval()
    load_full_state_dict(ours, from_hf(dict(reference.state_dict()), args), tp_rank=0, tp=1)
    tokens = torch.randint(0, args.vocab_size, (3, args.seq_len), generator=torch.Generator().manual_seed(1))
    labels = torch.roll(tokens, -1, dims=1)
    with torch.no_grad():
        logits = ours(tokens)
        expected = reference(tokens).logits
    assert logits.shape[-1] == 384  # padded vocabulary
    difference = (logits[..., :300] - expected).abs().max().item()
    print(f"max |logit difference| against {type(reference).__name__}: {difference:.3g}")
    assert difference < 1e-5
    expected_loss = torch.nn.functional.cross_entropy(expected.reshape(-1, args.vocab_size), labels.reshape(-1))
    assert abs(cross_entropy(logits, labels, args.vocab_size).item() - expected_loss.item()) < 1e-5


def test_qkv_regrouping_round_trip_and_head_order():
    args = LlamaArgs(hidden_size=16, num_heads=4, num_kv_heads=2)
    q, k, v = (torch.randn(n * 4, 16) for n in (4, 2, 2))
    fused = merge_qkv(q, k, v, args)
    # group 0 = query heads 0 and 1, then key 0, then value 0
    assert torch.equal(fused[:8], q[:8]) and torch.equal(fused[8:12], k[:4]) and torch.equal(fused[12:16], v[:4])
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, args), (q, k, v)))


@pytest.mark.parametrize("qk_norm", [False, True])
def test_hf_name_table_round_trip(qk_norm, tp_group):
    args = LlamaArgs(vocab_size=300, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=48,
                     qk_norm=qk_norm)
    model = Llama(args, tp_group)
    model.init_weights(seed=3)
    ours = {name: p.detach()[:300] if name.endswith(("embedding.weight", "output.weight")) else p.detach()
            for name, p in model.named_parameters()}
    hf = to_hf(ours, args)
    assert set(hf) == set(hf_model(args).state_dict())
    assert all(torch.equal(hf_back, ours[name]) for name, hf_back in from_hf(hf, args).items())


def test_padding_rows_never_enter_the_loss(tp_group):
    logits = torch.randn(2, 5, 8, requires_grad=True)
    labels = torch.randint(0, 6, (2, 5))
    loss = cross_entropy(logits, labels, vocab_size=6)
    expected = torch.nn.functional.cross_entropy(logits[..., :6].reshape(-1, 6), labels.reshape(-1))
    assert abs(loss.item() - expected.item()) < 1e-6
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[..., 6:].abs().max() == 0


def test_ignore_index_excluded_from_mean(tp_group):
    logits = torch.randn(1, 4, 8)
    labels = torch.tensor([[1, 2, -100, -100]])
    expected = torch.nn.functional.cross_entropy(logits[0, :2], labels[0, :2])
    assert abs(cross_entropy(logits, labels, 8).item() - expected.item()) < 1e-6


def test_init_is_seeded_per_parameter_and_norms_start_at_one(tp_group):
    args = LlamaArgs(vocab_size=300, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=48)
    first, second = Llama(args, tp_group), Llama(args, tp_group)
    first.init_weights(seed=5)
    second.init_weights(seed=5)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))
    second.init_weights(seed=6)
    assert not torch.equal(first.embedding.weight, second.embedding.weight)
    assert torch.equal(first.layers[0].attention_norm.weight, torch.ones(32))
    std = first.layers[1].mlp.down_proj.weight.std().item()
    assert 0.02 / 2 / 1.5 < std < 0.02 / 2 * 1.5  # output projections scaled by 1/sqrt(2 x layers)


def test_activation_checkpointing_gives_the_same_gradients(tp_group):
    args = LlamaArgs(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=48)
    grads = []
    for recompute in (False, True):
        model = Llama(args, tp_group)
        apply_execution(model, ExecutionArgs(activation_checkpointing=recompute), compile_blocks=False)
        model.init_weights(seed=1)
        tokens = torch.arange(32).reshape(2, 16) % 128
        cross_entropy(model(tokens), torch.roll(tokens, -1, 1), 128).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


@pytest.fixture(scope="module")
def tp1_model_checks(tp_group) -> list[dict]:
    return [{"graph_breaks": graph_breaks(tp_group), "chunked_loss": chunked_loss(tp_group)}]


@pytest.fixture
def checks(tp, request) -> list[dict]:
    """model_checks.py's figures at TP size `tp`, per rank: TP1 in this process, TP2 from the
    shared 2-process launch."""
    return request.getfixturevalue(f"tp{tp}_model_checks")


TP_SIZES = [1, pytest.param(2, marks=pytest.mark.multiprocess)]


@pytest.mark.parametrize("tp", TP_SIZES)
def test_a_compiled_block_is_one_graph_without_breaks(tp, checks):
    """Forward and backward, with and without document masking and activation checkpointing, every rank."""
    for rank in checks:
        assert rank["graph_breaks"] and all(case == {"breaks": 0, "graphs": 1} for case in rank["graph_breaks"].values())


@pytest.mark.parametrize("tp", TP_SIZES)
@pytest.mark.parametrize("tied", ["untied", "tied"])
def test_chunked_head_and_loss_equal_the_logits_loss(tp, tied, checks):
    """Loss and every gradient of forward(labels=...) against cross_entropy(forward()), with chunks
    that do not divide the tokens and ignored labels."""
    for rank in checks:
        figures = rank["chunked_loss"][tied]
        assert figures["loss_difference"] < 1e-6 and figures["grad_difference"] < 1e-6


def saved_bytes(compute) -> int:
    """Bytes of the tensors autograd saves for backward while `compute()` runs."""
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        compute()
    return total


def test_chunked_head_and_loss_save_8x_fewer_bytes_for_backward(tp_group):
    """At seq 2048 x micro-batch 8 x vocab 32000 (hidden 256): today's head + loss kept the fp32
    probabilities of every token for backward; the chunked one keeps two gradients."""
    from pretrain.model.llama import megatron_layer_config, output_projection
    from pretrain.model.loss import linear_cross_entropy

    args = LlamaArgs(vocab_size=32000, hidden_size=256)
    head = output_projection(args, megatron_layer_config(1), tp_group, tied=False)
    torch.nn.init.normal_(head.weight, std=0.02)
    hidden = torch.randn(8, 2048, 256, requires_grad=True)
    labels = torch.randint(0, 32000, (8, 2048))
    logits_path = saved_bytes(lambda: cross_entropy(head(hidden)[0], labels, 32000))
    chunked_path = saved_bytes(lambda: linear_cross_entropy(hidden, labels, head.weight, 32000, tp_group,
                                                            ExecutionArgs.loss_chunk_tokens))
    print(f"saved for backward: logits path {logits_path / 2**20:.1f} MiB, chunked {chunked_path / 2**20:.1f} MiB "
          f"({logits_path / chunked_path:.1f}x fewer)")
    assert logits_path >= 8 * 2048 * 32000 * 4  # the fp32 probabilities alone
    assert chunked_path * 8 <= logits_path
