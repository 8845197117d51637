"""The chunked training loss against transformers' own: the same loss and the same gradients, chunk by chunk,
with a padded vocabulary, ignored labels, gradient accumulation's divisor and bf16 autocast."""

from __future__ import annotations

import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from tasks.training import loss as chunked

VOCAB = 300  # the tokenizer's size; the padded models have 384 rows


def model_pair(rows: int, through_head: bool = False) -> tuple[GPT2LMHeadModel, GPT2LMHeadModel]:
    """A reference model with VOCAB rows and the same model with `rows` rows (the extra ones random), the
    second computing its loss chunk by chunk (through_head: from its lm_head's whole logits, as with FP8)."""
    torch.manual_seed(0)
    config = dict(n_layer=2, n_head=2, n_embd=32, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    reference = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, **config))
    padded = GPT2LMHeadModel(GPT2Config(vocab_size=rows, **config))
    state = reference.state_dict()
    with torch.no_grad():
        for name, tensor in padded.state_dict().items():
            tensor[: len(state[name])].copy_(state[name])  # the vocabulary's rows are the first dimension
    chunked.use_training_loss(padded, VOCAB, through_head=through_head)
    return reference, padded


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """4 x 48 tokens (192: two chunks of 128 and 64 below) with some labels ignored."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (4, 48), generator=generator)
    labels = ids.clone()
    labels[0, :10] = chunked.IGNORE_INDEX
    labels[3, 30:] = chunked.IGNORE_INDEX
    return ids, labels


def loss_and_grads(model, ids, labels, **kwargs) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=labels, **kwargs).loss
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(chunked, "CHUNK_LOGITS", 128 * 384)  # 128 tokens a chunk: the batch takes two
    assert chunked.chunk_tokens(384) == 128


@pytest.mark.parametrize("rows", [VOCAB, 384], ids=["unpadded", "padded to 384"])
@pytest.mark.parametrize("items", [None, 150], ids=["mean", "sum over num_items_in_batch"])
@pytest.mark.parametrize("through_head", [False, True], ids=["chunked", "through the lm_head"])
def test_the_chunked_loss_and_its_gradients_are_transformers_own(small_chunks, rows, items, through_head):
    reference, padded = model_pair(rows, through_head)
    ids, labels = batch()
    kwargs = {} if items is None else {"num_items_in_batch": torch.tensor(items)}
    expected, expected_grads = loss_and_grads(reference, ids, labels, **kwargs)
    got, grads = loss_and_grads(padded, ids, labels, **kwargs)
    assert got == pytest.approx(expected, rel=1e-5)
    for name, grad in expected_grads.items():
        rows_of = grads[name][: grad.shape[0]]
        torch.testing.assert_close(rows_of, grad, rtol=1e-4, atol=1e-6, msg=name)
        if rows_of.shape != grads[name].shape:  # the padding rows learn nothing
            assert grads[name][grad.shape[0] :].abs().max() == 0


def test_bf16_autocast_matches_the_reference_loss_to_1e_3(small_chunks):
    reference, padded = model_pair(384)
    ids, labels = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, expected_grads = loss_and_grads(reference, ids, labels)
        got, grads = loss_and_grads(padded, ids, labels)
    assert got == pytest.approx(expected, rel=1e-3)
    assert grads["transformer.wte.weight"].dtype == torch.float32  # master weights keep fp32 gradients
    ours, theirs = grads["transformer.wte.weight"][:VOCAB].flatten(), expected_grads["transformer.wte.weight"].flatten()
    assert torch.nn.functional.cosine_similarity(ours, theirs, 0) > 0.99


def test_a_frozen_output_weight_gets_no_gradient_buffer_and_the_layers_below_theirs(small_chunks):
    """LoRA freezes the token embeddings, which the output layer shares: the loss keeps no fp32 gradient of that
    weight (vocabulary x width), and the gradients of everything below it are as before."""
    reference, padded = model_pair(384)
    ids, labels = batch()
    _, expected = loss_and_grads(reference, ids, labels)
    head = padded.transformer.wte.weight
    assert padded(input_ids=ids, labels=labels).loss.grad_fn.saved_tensors[1].shape == head.shape
    head.requires_grad_(False)
    loss = padded(input_ids=ids, labels=labels).loss
    assert loss.grad_fn.saved_tensors[1] is None
    loss.backward()
    assert head.grad is None
    for name, parameter in padded.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(parameter.grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_without_labels_the_model_is_unchanged():
    reference, padded = model_pair(VOCAB)
    ids, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(padded(input_ids=ids).logits, reference(input_ids=ids).logits)
        assert padded(input_ids=ids, labels=ids).logits is None  # the full logits are never made


def test_evaluation_without_gradients_keeps_no_gradient_buffers(small_chunks):
    _, padded = model_pair(384)
    ids, labels = batch()
    with torch.no_grad():
        loss = padded(input_ids=ids, labels=labels).loss
    assert loss.grad_fn is None and torch.isfinite(loss)


def test_the_gpu_kernels_on_the_cpu_fall_back_or_refuse_in_one_line(capsys):
    """cut-cross-entropy's kernel (Triton) gives way to the chunked loss on the CPU; FP8 cannot run there at all."""
    from tasks.plumbing.errors import PipelineError
    from tasks.training.model import fp8_head

    assert chunked.resolve_kernel("cut_cross_entropy", "cpu") == "chunked"
    assert (
        capsys.readouterr().err
        == "note: train.loss_kernel: cut_cross_entropy runs on CUDA; on the cpu the chunked loss is used\n"
    )
    assert chunked.resolve_kernel("chunked", "cuda") == "chunked"
    with pytest.raises(
        PipelineError,
        match=r"^train\.fp8_lm_head: FP8 needs a GPU of compute capability 8\.9 .*"
        r"this run has no CUDA GPU; set it to false$",
    ):
        fp8_head(model_pair(VOCAB)[1], "cpu")


def test_cut_cross_entropy_on_the_cpu_trains_with_the_chunked_loss(capsys):
    """train.loss_kernel: cut_cross_entropy on the CPU, through for_training as the train stage calls it: its
    Triton kernel cannot run there, so the model trains with the chunked loss: transformers' loss and gradients."""
    import copy

    from tasks.training.model import for_training

    reference, _ = model_pair(VOCAB)
    model = copy.deepcopy(reference)
    for_training(model, "cpu", loss_kernel="cut_cross_entropy")
    assert "on the cpu the chunked loss is used" in capsys.readouterr().err
    ids, labels = batch()
    expected, expected_grads = loss_and_grads(reference, ids, labels)
    got, grads = loss_and_grads(model, ids, labels)
    assert got == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(grads["transformer.wte.weight"][:VOCAB], expected_grads["transformer.wte.weight"])


def test_the_gpu_kernels_refuse_in_one_line_where_their_package_is_missing(monkeypatch):
    """cut-cross-entropy on CUDA and the FP8 head (emulated: no CPU has FP8) without their packages (the kernels
    extra; not in the dev install): one line saying what to install or to set, before the model is changed."""
    from tasks.plumbing.errors import PipelineError
    from tasks.training.model import fp8_head

    for package in ("cut_cross_entropy", "torchao", "torchao.float8"):
        monkeypatch.setitem(sys.modules, package, None)  # absent, wherever this runs
    with pytest.raises(PipelineError) as refused:
        chunked.resolve_kernel("cut_cross_entropy", "cuda")
    assert str(refused.value) == (
        "train.loss_kernel: cut_cross_entropy is not installed: pip install 'gpt2-pipeline[kernels]', "
        "or set it to chunked"
    )
    model = model_pair(VOCAB)[1]
    with pytest.raises(PipelineError) as refused:
        fp8_head(model, "cpu", emulate=True)
    assert str(refused.value) == (
        "train.fp8_lm_head: torchao is not installed: pip install 'gpt2-pipeline[kernels]', or set it to false"
    )
    assert type(model.lm_head) is torch.nn.Linear
