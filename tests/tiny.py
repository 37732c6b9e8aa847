"""Tiny random models and a byte-level tokenizer for fast tests (no downloads)."""

from __future__ import annotations

import torch


def byte_tokenizer(add_bos: bool = False):
    """A byte-level BPE tokenizer with no merges: 256 byte tokens + <s>, </s>, <pad>.

    ``add_bos``: put ``<s>`` before every text, as Llama-2 and Gemma tokenizers do.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for sp in ("<s>", "</s>", "<pad>"):
        vocab[sp] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    if add_bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                          special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


PADDED_TEXTS = ("short text here", "a much longer piece of text for the batch", "mid size one")


def right_padded(tok, texts=PADDED_TEXTS) -> tuple[list[list[int]], dict]:
    """``texts`` tokenized, and one right-padded batch of them with its attention mask."""
    seqs = [tok(s)["input_ids"] for s in texts]
    L = max(map(len, seqs))
    ids = torch.full((len(seqs), L), tok.pad_token_id)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return seqs, {"input_ids": ids, "attention_mask": mask}


def tiny_llama(seed: int = 0, vocab: int = 259, layers: int = 2, hidden: int = 64, inter: int = 96):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, bos_token_id=256, eos_token_id=257, pad_token_id=258,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    # random init is small (std 0.02); widen it so quantization errors matter in logits
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return model


TEXT = (
    "Quantization maps each weight to a small set of levels. The error it leaves behind is "
    "not random: it has structure that a low-rank matrix can capture, and the inputs of a layer "
    "are far from isotropic, so the error that matters is the one seen through the activations. "
) * 40


def tiny_bert_dir(path, seed: int = 0):
    """Save a tiny random BERT encoder and the byte tokenizer to ``path``; returns the path."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=259, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=96, max_position_embeddings=128, pad_token_id=258)
    torch.manual_seed(seed)
    BertModel(cfg).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def direct_output_gradients(model, batch, targets) -> dict:
    """``{layer: ∂L/∂y}`` (batch, seq, out) of one batch by ``torch.autograd.grad`` on the captured
    outputs, ``L`` the summed next-token losses of its windows: the reference for qera.sensitivity."""
    outs = {}
    hs = [m.register_forward_hook(lambda mod, a, o, n=n: outs.__setitem__(n, o)) for n, m in targets.items()]
    try:
        emb = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_()
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        logits = model(inputs_embeds=emb, attention_mask=batch["attention_mask"]).logits
    finally:
        for h in hs:
            h.remove()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")
    return dict(zip(targets, torch.autograd.grad(loss, [outs[n] for n in targets])))
