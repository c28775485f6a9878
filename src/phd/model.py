"""The PHD-Transformer: a plain Llama / OLMo2 decoder whose input is every token repeated K times.

Training-time forward (spec section 5): the K copies of each token are laid out as [T originals | (K-1)*T
hidden tokens, position-major]; every layer runs on all K*T tokens with the PHD attention rule; the LM head
runs on copy K only. With K = 1 this is exactly the vanilla transformer. The naive repeat-K baseline uses the
interleaved order and plain causal attention.

Inference (prefill, decode_step, the cache) lives in `phd.inference`; it runs the same `Block.forward` with an
attention that writes the cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import LayoutAttention, resolve_backend
from .checks import check_token_ids, warn_past_max_len
from .config import PHDConfig
from .errors import InputError
from .masks import AttentionLayout, rope_position

Attend = Callable[[Tensor, Tensor, Tensor], Tensor]  # q [B, H, Q, D], k, v [B, Hkv, N, D] -> [B, H, Q, D]
Rows = int | Tensor | None  # the rows of a layer whose output is used (see pick_rows)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)


def rope_tables(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin [N, head_dim] for integer positions (the half-rotation convention of Llama / HF)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, H, N, D]; cos/sin [N, D] or [B, 1, N, D]."""
    half = x.shape[-1] // 2
    x32 = x.float()
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: PHDConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        kv_dim = cfg.n_kv_heads * cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.wk = nn.Linear(cfg.d_model, kv_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, kv_dim, bias=False)
        self.wo = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        # OLMo2 QK-norm: RMSNorm over the whole query / key projection, before splitting into heads.
        self.q_norm = RMSNorm(cfg.d_model, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(kv_dim, cfg.norm_eps) if cfg.qk_norm else None

    def project_q(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x [B, N, d] -> q [B, H, N, D] (inference computes queries only for the tokens whose output is used)."""
        b, n, _ = x.shape
        q = self.wq(x)
        if self.q_norm is not None:
            q = self.q_norm(q)
        return apply_rope(q.view(b, n, self.n_heads, self.head_dim).transpose(1, 2), cos, sin)

    def project_kv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, N, d] -> k, v [B, Hkv, N, D] (what the KV cache keeps)."""
        b, n, _ = x.shape
        k, v = self.wk(x), self.wv(x)
        if self.k_norm is not None:
            k = self.k_norm(k)
        k = k.view(b, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(k, cos, sin), v

    def output(self, o: Tensor) -> Tensor:
        """o [B, H, N, D] -> [B, N, d]."""
        b, _, n, _ = o.shape
        return self.wo(o.transpose(1, 2).reshape(b, n, -1))


class SwiGLU(nn.Module):
    def __init__(self, cfg: PHDConfig) -> None:
        super().__init__()
        self.w_gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.w_up = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.w_down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


def pick_rows(x: Tensor, rows: Rows) -> Tensor:
    """Rows (dim -2) of x [..., N, D]: all (None), the last n (int), or index [B, Q] per batch row; a shared
    [N, D] table (RoPE) becomes [B, 1, Q, D]."""
    if rows is None:
        return x
    if isinstance(rows, int):
        return x.narrow(-2, x.shape[-2] - rows, rows)
    if x.dim() == 2:
        return x[rows][:, None]
    index = rows.view(rows.shape[0], *[1] * (x.dim() - 3), rows.shape[1], 1)
    return x.gather(-2, index.expand(*x.shape[:-2], rows.shape[1], x.shape[-1]))


class Block(nn.Module):
    """One transformer layer. `forward` is the only code that applies a layer's norms, projections, attention and
    MLP: training, prefill and decode all call it, each with its own attention. Pre-norm (Llama):
    x + f(norm(x)). Post-norm (OLMo2): x + norm(f(x))."""

    def __init__(self, cfg: PHDConfig) -> None:
        super().__init__()
        self.post_norm = cfg.norm == "post"
        self.attn = Attention(cfg)
        self.mlp = SwiGLU(cfg)
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attend: Attend, rows: Rows = None) -> Tensor:
        """x [B, N, d] -> [B, Q, d]. K/V of all N rows go to `attend(q, k, v)`: the backend over the training
        layout, or an inference callable that writes the cache and attends with its mask. Queries, residuals and
        the MLP run only for `rows`, those whose output is used (see pick_rows). x may be one row [B, 1, d]
        standing for N identical ones (decode's K copies): cos / sin then give the N positions."""
        a = x if self.post_norm else self.attn_norm(x)
        k, v = self.attn.project_kv(a, cos, sin)
        x, a, cos, sin = (pick_rows(t, rows) for t in (x, a, cos, sin))
        o = self.attn.output(attend(self.attn.project_q(a, cos, sin), k, v))
        h = x + (self.attn_norm(o) if self.post_norm else o)
        return h + (self.mlp_norm(self.mlp(h)) if self.post_norm else self.mlp(self.mlp_norm(h)))


@dataclass
class CausalLMOutput:
    logits: Tensor
    loss: Tensor | None = None


class PHDTransformer(nn.Module):
    def __init__(self, config: PHDConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # Activation checkpointing: checkpoint_fn(block, *args) recomputes a block in the backward pass (set by
        # `phd train` and by transformers' gradient_checkpointing_enable); None runs blocks plainly.
        self.checkpoint_fn: Callable[..., Tensor] | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) for matrices, output projections scaled by 1/sqrt(2 * layers); norms at 1."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w_down.weight")):
                nn.init.normal_(p, std=std / (2 * self.config.n_layers) ** 0.5)
            else:
                nn.init.normal_(p, std=std)

    # ----- token layout -----
    def layout(self, seq_len: int) -> AttentionLayout:
        c = self.config
        return AttentionLayout(seq_len, c.repeat_k, c.window, c.chunk, c.naive)

    def rope_at(self, pos: Tensor, copy: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin of tokens (pos, copy) (spec section 4): [N, D] for positions [N], [B, 1, N, D] for [B, N]."""
        cos, sin = self.rope(rope_position(pos, copy, self.config.repeat_k, self.config.positions))
        return (cos[:, None], sin[:, None]) if pos.dim() == 2 else (cos, sin)

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        return rope_tables(positions, self.config.head_dim, self.config.rope_theta)

    # ----- forward -----
    def hidden_states(self, input_ids: Tensor, backend: str | None = None,
                      attention: Callable[[int], Attend] | None = None, eager: bool = False) -> Tensor:
        """Final-layer hidden states of all K*T tokens (layout order), before the final norm.

        attention(i): layer i's attention; default the training backend (inference passes one that also fills
        its cache). eager: run each block's plain `forward`, outside a compiled graph and module hooks (the
        training diagnostics' probe)."""
        layout = self.layout(input_ids.shape[1])
        if attention is None:
            # Resolved once, outside the (possibly compiled) blocks: `auto` on CUDA probes flex once, eagerly.
            needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
            name = resolve_backend(backend or self.config.attn_backend, input_ids.device, needs_grad)
            shared = LayoutAttention(layout, name)
            attention = lambda i: shared  # every layer attends alike
        cos, sin = self.rope_at(*layout.index(input_ids.device))
        h = layout.expand(self.embed(input_ids))
        checkpoint = self.checkpoint_fn if torch.is_grad_enabled() else None
        for i, block in enumerate(self.layers):
            attend = attention(i)
            if eager:
                h = block.forward(h, cos, sin, attend)
            else:
                h = block(h, cos, sin, attend) if checkpoint is None else checkpoint(block, h, cos, sin, attend)
        return h

    def final_states(self, input_ids: Tensor, backend: str | None = None) -> Tensor:
        """Hidden states [B, T, d] of the final copies after the final norm: what the LM head reads (a base
        model's last hidden state). A sequence longer than max_seq_len runs, with a LengthWarning (checks.py)."""
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise InputError(f"input_ids must be [batch, seq_len] with seq_len >= 1, got {tuple(input_ids.shape)}")
        warn_past_max_len(self.config.max_seq_len, input_ids.shape[1])
        check_token_ids(input_ids, self.config.vocab_size, "input_ids")
        h = self.layout(input_ids.shape[1]).final_copies(self.hidden_states(input_ids, backend))
        return self.norm(h)

    def forward(
        self, input_ids: Tensor, targets: Tensor | None = None, backend: str | None = None,
        ignore_index: int = -100,
    ) -> CausalLMOutput:
        """Logits [B, T, vocab] of the final copies; the mean next-token loss when targets [B, T] are given."""
        logits = self.lm_head(self.final_states(input_ids, backend))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index
            )
        return CausalLMOutput(logits=logits, loss=loss)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ----- inference (phd.inference; the cache is passed in explicitly) -----
    def new_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None):
        """An empty PHDCache for `batch_size` rows of up to `max_len` tokens (default: config.max_seq_len)."""
        from .inference import PHDCache

        return PHDCache.for_model(self, batch_size, max_len, dtype)

    def prefill(self, input_ids: Tensor, cache, lengths: Tensor | None = None,
                attention_mask: Tensor | None = None, mode: str = "bounded") -> Tensor:
        """Fill `cache` with the prompts; logits [B, vocab] for the token after each prompt."""
        from .inference import prefill

        return prefill(self, input_ids, cache, lengths=lengths, attention_mask=attention_mask, mode=mode)

    def decode_step(self, token_ids: Tensor, cache) -> Tensor:
        """Append one token per row ([B] ids) to `cache`; logits [B, vocab] for the token after it."""
        from .inference import decode_step

        return decode_step(self, token_ids, cache)
