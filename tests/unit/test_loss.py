"""The chunked training loss against transformers' own: the same loss and the same gradients, chunk by chunk,
with a padded vocabulary, ignored labels, gradient accumulation's divisor and bf16 autocast."""

from __future__ import annotations

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


def test_the_fp8_head_emulated_on_the_cpu_trains_the_tied_weight_and_saves_a_plain_gpt2(small_chunks, tmp_path):
    """train.fp8_lm_head's path, with torchao emulating the FP8 matmuls: the loss near the reference's (FP8 rounds
    the logits), gradients reaching the embedding it shares, and the trimmed model saved as a plain GPT-2.

    torchao is not in the dev install: once installed, transformers imports it with every Trainer and it logs
    notices about its GPU libraries on each train run. With `pip install torchao` this runs on the CPU."""
    pytest.importorskip("torchao", reason="train.fp8_lm_head's torchao: pip install torchao to run this on the CPU")
    from tasks.training.model import fp8_head

    reference, padded = model_pair(384, through_head=True)
    fp8_head(padded, "cpu", emulate=True)
    assert type(padded.lm_head).__name__ == "Float8Linear" and padded.lm_head.weight is padded.transformer.wte.weight
    ids, labels = batch()
    expected, _ = loss_and_grads(reference, ids, labels)
    got, grads = loss_and_grads(padded, ids, labels)
    assert got != expected and got == pytest.approx(expected, rel=2e-2)
    assert grads["transformer.wte.weight"][:VOCAB].abs().sum() > 0
    padded.resize_token_embeddings(VOCAB)  # as the train stage saves it
    padded.save_pretrained(tmp_path)
    saved = GPT2LMHeadModel.from_pretrained(tmp_path)
    assert type(saved.lm_head) is torch.nn.Linear and saved.lm_head.weight.shape == (VOCAB, 32)
    torch.testing.assert_close(saved.transformer.wte.weight, padded.transformer.wte.weight)
