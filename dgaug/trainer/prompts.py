"""CoOp prompt learning: learnable context tokens in front of class names in a frozen CLIP text tower."""

from __future__ import annotations

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool

# What open_clip.CLIP.encode_text reads; a model lacking any of them (CustomTextCLIP, whose text
# tower is `model.text`, possibly a Hugging Face model) has no text transformer of its own to edit.
_TEXT_TOWER = (
    "token_embedding",
    "positional_embedding",
    "transformer",
    "attn_mask",
    "ln_final",
    "text_projection",
    "text_pool_type",
)
_PLACEHOLDER = "X"
CTX_INIT_STD = 0.02


class PromptLearner(torch.nn.Module):
    """CoOp: n_ctx learnable context vectors shared by all classes, before each class name.

    Class c's prompt is ``"X X ... X {classname}."`` (n_ctx placeholders) tokenized by `tokenizer`;
    its token embeddings at positions 1..n_ctx (after the start token) are replaced by `ctx`, and
    the rest of the text tower runs exactly as `model.encode_text` does.

    init: a string of exactly n_ctx words (each one token), whose token embeddings `ctx` starts
    from (so the initial class embeddings are those of ``f"{init} {classname}."``), or None for
    ctx ~ N(0, 0.02^2) drawn from a generator seeded with `seed`.

    The CLIP model is frozen and held outside the module tree: `parameters()` and `state_dict()`
    hold `ctx` alone, and `.to()` on the learner moves `ctx` but not the model; forward runs on the
    model's device (where `ctx` is created).
    """

    def __init__(
        self,
        model: open_clip.CLIP,
        tokenizer,
        classnames: list[str],
        *,
        n_ctx: int = 4,
        init: str | None = "a photo of a",
        seed: int = 0,
    ):
        super().__init__()
        missing = [a for a in _TEXT_TOWER if not hasattr(model, a)]
        if missing:
            raise ValueError(
                f"coop needs an open_clip CLIP with its own text transformer; "
                f"{type(model).__name__} has no {', '.join(missing)} (a CustomTextCLIP, e.g. one "
                "with a Hugging Face text model, cannot take learnt context tokens)"
            )
        if not classnames:
            raise ValueError("coop needs at least one class name")
        if n_ctx < 1:
            raise ValueError(f"n_ctx must be >= 1, got {n_ctx}")
        context_length = int(model.positional_embedding.shape[0])
        if n_ctx + 2 > context_length:
            raise ValueError(f"n_ctx {n_ctx} does not fit the context length {context_length}")

        model.requires_grad_(False)
        # A plain attribute, not a submodule: its weights stay out of parameters() and state_dict().
        object.__setattr__(self, "_clip", model)
        self.n_ctx = n_ctx
        self.classnames = list(classnames)
        device = model.positional_embedding.device

        probe = tokenizer([_PLACEHOLDER])
        sot, x_id = int(probe[0, 0]), int(probe[0, 1])
        prompt = " ".join([_PLACEHOLDER] * n_ctx)
        tokens = tokenizer([f"{prompt} {name}." for name in self.classnames]).to(device)
        if not (
            bool((tokens[:, 0] == sot).all()) and bool((tokens[:, 1 : 1 + n_ctx] == x_id).all())
        ):
            raise ValueError(
                "coop needs a tokenizer that writes a start token and then one token per "
                f"placeholder word {_PLACEHOLDER!r}; this one does not"
            )
        with torch.no_grad():
            embedded = model.token_embedding(tokens)  # [C, L, width], the embedding's dtype
        # Non-persistent: rebuilt from the model and class names, never saved with the context.
        self.register_buffer("tokenized_prompts", tokens, persistent=False)
        self.register_buffer("token_prefix", embedded[:, :1].clone(), persistent=False)
        self.register_buffer("token_suffix", embedded[:, 1 + n_ctx :].clone(), persistent=False)

        width = int(embedded.shape[-1])
        if init is not None:
            words = init.split()
            if len(words) != n_ctx:
                raise ValueError(
                    f"init {init!r} has {len(words)} words, but n_ctx is {n_ctx}: give exactly "
                    "n_ctx words, or init=None for a random start"
                )
            init_text = " ".join(words)
            # With one more placeholder after it, init must end at position n_ctx: one token a word.
            check = tokenizer([f"{init_text} {_PLACEHOLDER}"])[0]
            if int(check[0]) != sot or int(check[1 + n_ctx]) != x_id:
                raise ValueError(
                    f"init {init!r} does not tokenize to exactly {n_ctx} tokens; choose words "
                    "that are single tokens, or init=None"
                )
            init_tokens = tokenizer([init_text]).to(device)
            with torch.no_grad():
                ctx = model.token_embedding(init_tokens)[0, 1 : 1 + n_ctx].float().clone()
        else:
            generator = torch.Generator().manual_seed(seed)
            ctx = torch.randn(n_ctx, width, generator=generator) * CTX_INIT_STD
            ctx = ctx.to(device)
        self.ctx = torch.nn.Parameter(ctx)

    @property
    def clip_model(self) -> open_clip.CLIP:
        """The frozen CLIP whose text tower the context runs through."""
        return self._clip

    def forward(self) -> torch.Tensor:
        """[C, embed_dim] unit-norm class text embeddings, differentiable w.r.t. `ctx` only."""
        return self.encode(self.ctx.unsqueeze(0))[0]

    def encode(self, ctx: torch.Tensor) -> torch.Tensor:
        """[B, C, embed_dim] unit-norm class text embeddings for B context sets ctx [B, n_ctx, w].

        CoCoOp gives every image its own context set; CoOp's one set is B = 1. The B * C prompts
        run through the text tower as one batch.
        """
        model = self._clip
        device = model.positional_embedding.device
        cast_dtype = model.transformer.get_cast_dtype()
        prefix = self.token_prefix.to(device)
        suffix = self.token_suffix.to(device)
        n_sets, n_cls = ctx.shape[0], prefix.shape[0]
        text = self.tokenized_prompts.to(device).repeat(n_sets, 1)
        ctx = ctx.to(device=device, dtype=prefix.dtype).unsqueeze(1)
        ctx = ctx.expand(-1, n_cls, -1, -1)

        # From here on, open_clip.CLIP.encode_text with the token embeddings replaced.
        x = torch.cat(
            [
                prefix.expand(n_sets, -1, -1, -1),
                ctx,
                suffix.expand(n_sets, -1, -1, -1),
            ],
            dim=2,
        ).flatten(0, 1)
        x = x.to(cast_dtype) + model.positional_embedding.to(cast_dtype)
        x = model.transformer(x, attn_mask=model.attn_mask)
        x = model.ln_final(x)
        x = text_global_pool(
            x, text, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None)
        )
        if model.text_projection is not None:
            if isinstance(model.text_projection, torch.nn.Linear):
                x = model.text_projection(x)
            else:
                x = x @ model.text_projection
        return F.normalize(x, dim=-1).unflatten(0, (n_sets, n_cls))

    @torch.no_grad()
    def class_embeddings(self) -> torch.Tensor:
        """forward() without a graph, as float32: [C, embed_dim] unit vectors."""
        return F.normalize(self.forward().float(), dim=-1)
