"""The familial GPT on megatron-core: a trunk (megatron's TransformerBlock for this pipeline stage) and, per
exit, a branch block + RMSNorm + output layer on the stage that holds the exit's layer.

An exit p branches off the trunk state that enters trunk layer p (depth p+1 with its own block). Its loss is
computed where it lives and enters backward through `AttachLoss` on the hidden state that flows on, so the
standard megatron schedules run unchanged (the trick megatron uses for MoE aux losses). The last exit is the
trunk's last layer, its final norm and output layer, whose loss the schedule takes as usual (a DaE stage's
forward stops at its trained exit and hands the schedule that loss instead).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from ruyi_core.errors import RuyiError
from ruyi_core.megatron.attention import uses_sdpa, with_sdpa
from ruyi_core.megatron.linear import TorchColumnLinear, _plain, with_torch_linears
from ruyi_core.megatron.norm import RMSNorm, with_rms_norms
from ruyi_core.megatron.swiglu import with_swiglu
from ruyi_core.megatron.xent import linear_cross_entropy


@dataclass(frozen=True)
class FamilyShape:
    """What megatron's TransformerConfig does not hold: the exits, vocabulary and rope."""

    exit_points: tuple[int, ...]
    vocab_size: int
    max_seq_length: int
    rope_theta: float
    base_arch: str = "qwen3"
    expansions: tuple[tuple[int, int], ...] = ()  # DaE: (exit point, blocks appended after its branch block)


def transformer_impl(wanted: str = "auto") -> str:
    """The layers' implementation: Transformer Engine's on GPUs, megatron's local layers on the CPU (`auto`), or as
    the spec's train.transformer_impl says. Transformer Engine that is asked for but cannot be used is an error, so
    a GPU pool never trains on the slower local layers unnoticed."""
    cuda = torch.cuda.is_available()
    impl = ("transformer_engine" if cuda else "local") if wanted == "auto" else wanted
    if impl == "transformer_engine":
        if not cuda:
            raise RuyiError("train.transformer_impl: transformer_engine needs CUDA GPUs; on the CPU use auto or local")
        try:
            # megatron's own TE module imports without TE (HAVE_TE False) and fails later: import TE itself
            import transformer_engine.pytorch  # noqa: F401
        except Exception as e:  # a broken install raises more than ImportError (missing symbols, CUDA mismatch)
            raise RuyiError(f"Transformer Engine cannot be used on this GPU machine ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else 'no message'}): install transformer-engine[pytorch] "
                            "matching this CUDA (the ruyi-trainer image has it), or set train.transformer_impl: local "
                            "to train with megatron's local layers") from None
    return impl


def transformer_config(hf_cfg, tp: int = 1, pp: int = 1, bf16: bool = False, recompute: bool = False,
                       sequence_parallel: bool = False, impl: str = "auto", **overrides) -> TransformerConfig:
    """megatron's config for an HF Qwen3/Qwen2 family config (fp32 on the CPU, bf16 on GPUs); `impl` is the
    layers' implementation (transformer_impl)."""
    qwen3 = getattr(hf_cfg, "base_arch", "qwen3") == "qwen3"
    dtype = torch.bfloat16 if bf16 else torch.float32
    kw = dict(
        num_layers=hf_cfg.num_hidden_layers, hidden_size=hf_cfg.hidden_size,
        num_attention_heads=hf_cfg.num_attention_heads, num_query_groups=hf_cfg.num_key_value_heads,
        kv_channels=hf_cfg.head_dim, ffn_hidden_size=hf_cfg.intermediate_size, normalization="RMSNorm",
        layernorm_epsilon=hf_cfg.rms_norm_eps, gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, add_qkv_bias=not qwen3, qk_layernorm=qwen3, hidden_dropout=0.0,
        attention_dropout=0.0, init_method_std=hf_cfg.initializer_range,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, sequence_parallel=sequence_parallel,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=bf16, use_cpu_initialization=not torch.cuda.is_available(),
        apply_rope_fusion=False, bias_activation_fusion=False, masked_softmax_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False, bias_dropout_fusion=False,
        # Without CUDA the MLP runs our SwiGLU module (see layer_spec and swiglu.py); the flag routes it there.
        use_te_activation_func=not torch.cuda.is_available(),
        transformer_impl=transformer_impl(impl),
    )
    if recompute in (True, "full"):  # every block keeps only its input (FamilyGPT._block)
        kw.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif recompute == "selective":  # megatron recomputes core attention inside each block
        kw.update(recompute_granularity="selective")
    kw.update(overrides)
    return TransformerConfig(**kw)


def layer_spec(config: TransformerConfig):
    """Transformer Engine's spec where config.transformer_impl says so (GPUs); otherwise megatron's local spec with
    SDPA as its core attention (megatron's unfused DotProductAttention materialises the [b*heads, s, s] scores),
    the block's norms inside its linears as in TE's spec (megatron/linear.py) and, on the CPU, SwiGLU as its MLP
    activation."""
    if config.transformer_impl == "transformer_engine":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)
    spec = with_rms_norms(with_sdpa(get_gpt_layer_local_spec(qk_layernorm=config.qk_layernorm,
                                                             normalization="RMSNorm")))
    swiglu = config.use_te_activation_func
    spec = with_torch_linears(spec, gate_up=swiglu)
    return with_swiglu(spec) if swiglu else spec


class AttachLoss(torch.autograd.Function):
    """Identity on `hidden`; in backward, also sends gradient `scale` into `loss` (an exit's loss computed
    on this pipeline stage), so it trains through the schedule's ordinary backward pass."""

    @staticmethod
    def forward(ctx, hidden, loss, scale: float):
        ctx.save_for_backward(loss)
        ctx.scale = scale
        return hidden

    @staticmethod
    def backward(ctx, grad):
        (loss,) = ctx.saved_tensors
        return grad, torch.full_like(loss, ctx.scale), None


def norm_class(config: TransformerConfig):
    """The block-level RMSNorm: Transformer Engine's with its layers (the TE layer spec fuses its layer norms into
    the linears, so the head cannot borrow one from the spec), norm.RMSNorm otherwise."""
    if config.transformer_impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    return RMSNorm


class ExitHead(MegatronModule):
    """Norm + vocab-parallel output layer + masked token-mean cross-entropy."""

    def __init__(self, config: TransformerConfig, vocab_size: int):
        super().__init__(config=config)
        self.norm = build_module(norm_class(config), config=config, hidden_size=config.hidden_size,
                                 eps=config.layernorm_epsilon)
        # The CPU takes torch's linear autograd, as the blocks do there (megatron/linear.py).
        linear = tensor_parallel.ColumnParallelLinear if torch.cuda.is_available() else TorchColumnLinear
        self.output_layer = linear(
            config.hidden_size, vocab_size, config=config, init_method=config.init_method, bias=False,
            gather_output=False, skip_bias_add=False)

    def logits(self, hidden):  # [s, b, h] -> [s, b, V/tp]
        out, _ = self.output_layer(self.norm(hidden))
        return out

    def loss(self, hidden, labels, loss_mask):
        """Mean cross-entropy over the masked tokens; labels and mask are [b, s]."""
        if isinstance(self.output_layer, TorchColumnLinear) and _plain(self.output_layer):  # the CPU, one rank
            return linear_cross_entropy(self.norm(hidden), self.output_layer.weight, labels.t(), loss_mask.t())
        logits, labels = self.logits(hidden).float(), labels.t().contiguous()
        if ps.get_tensor_model_parallel_world_size() == 1:  # one fused log-softmax, not the vocab-parallel passes
            per_token = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
        else:
            per_token = tensor_parallel.vocab_parallel_cross_entropy(logits, labels)
        mask = loss_mask.t().float()
        return (per_token * mask).sum() / mask.sum().clamp(min=1)


class Branch(MegatronModule):
    """Exit k's own decoder block (a sibling of trunk layer p_k), any DaE blocks after it, and its head."""

    def __init__(self, config: TransformerConfig, spec, exit_point: int, vocab_size: int, pp_rank: int,
                 added: int = 0):
        super().__init__(config=config)
        # TransformerLayer adds the stage's layer offset itself; its global number is p + 1.
        offset = get_transformer_layer_offset(config, None, pp_rank)
        self.layer = build_module(spec, config=config, layer_number=exit_point + 1 - offset)
        self.extra = torch.nn.ModuleList(build_module(spec, config=config, layer_number=exit_point + 2 + j - offset)
                                         for j in range(added))
        self.head = ExitHead(config, vocab_size)

    def forward(self, h, attention_mask, rope):
        out, _ = self.layer(hidden_states=h, attention_mask=attention_mask, rotary_pos_emb=rope)
        for block in self.extra:
            out, _ = block(hidden_states=out, attention_mask=attention_mask, rotary_pos_emb=rope)
        return out


class FamilyGPT(MegatronModule):
    def __init__(self, config: TransformerConfig, shape: FamilyShape, pre_process: bool = True,
                 post_process: bool = True):
        super().__init__(config=config)
        from megatron.core.enums import ModelType

        self.model_type = ModelType.encoder_or_decoder  # what megatron's schedules ask of a model
        self.share_embeddings_and_output_weights = False  # one head per exit, none tied to the embedding
        self.shape, self.pre_process, self.post_process = shape, pre_process, post_process
        spec = layer_spec(config)
        # True: causal attention needs no explicit mask (pass None); Transformer Engine's path gets one.
        self.implicit_causal = uses_sdpa(spec)
        if pre_process:
            self.embedding = LanguageModelEmbedding(config, shape.vocab_size, shape.max_seq_length,
                                                    position_embedding_type="none")
        self.rotary_pos_emb = RotaryEmbedding(config.kv_channels, rotary_percent=1.0,
                                              rotary_base=shape.rope_theta,
                                              use_cpu_initialization=config.use_cpu_initialization)
        self.decoder = TransformerBlock(config, spec, post_layer_norm=False, pre_process=pre_process,
                                        post_process=False)
        pp_rank = ps.get_pipeline_model_parallel_rank()
        self.first_layer = get_transformer_layer_offset(config, None, pp_rank)
        local = range(self.first_layer, self.first_layer + len(self.decoder.layers))
        # Exits whose branch lives here, keyed by their index k among the family's exits.
        self.local_exits = {k: p for k, p in enumerate(shape.exit_points[:-1]) if p in local}
        added = dict(shape.expansions)
        self.branches = torch.nn.ModuleList(
            Branch(config, spec, p, shape.vocab_size, pp_rank, added.get(p, 0)) for p in self.local_exits.values())
        if post_process:
            self.final = ExitHead(config, shape.vocab_size)
        self.input_tensor = None
        self.stop_after = None  # train_only: the exit whose loss ends a training forward

    def set_input_tensor(self, input_tensor):
        """Pipeline schedules hand a non-first stage its input here."""
        self.input_tensor = input_tensor[0] if isinstance(input_tensor, (list, tuple)) else input_tensor

    def train_only(self, exit_point: int) -> None:
        """DaE: freeze everything but exit p's own parameters (names.own_prefixes: its added blocks and output
        layer, or unexpanded, its block, norm and output layer), on the stage that has them."""
        from ruyi_core.family.names import own_prefixes

        train = tuple(own_prefixes(self.shape, exit_point, "megatron"))
        for prm in self.parameters():
            prm.requires_grad = False
        # An early exit's slots all live in its branch; branches are numbered per stage, the map's names by exit.
        for k, b in zip(self.local_exits, self.branches):
            for name, prm in b.named_parameters(prefix=f"branches.{k}"):
                prm.requires_grad = name.startswith(train)
        # Nothing after a trained early exit gets a gradient: on a single pipeline stage, training stops there
        # (the end tier's DaE runs its 5 blocks, not the whole family's 14).
        k = self.shape.exit_points.index(exit_point)
        if self.pre_process and self.post_process and k in self.local_exits:
            self.stop_after = k

    def exits_here(self) -> list[int]:
        """Exit indices whose loss this stage computes."""
        last = [len(self.shape.exit_points) - 1] if self.post_process else []
        return list(self.local_exits) + last

    def forward(self, input_ids, position_ids, attention_mask, labels=None, loss_mask=None,
                exit_weights: list[float] | None = None, loss_scale: float = 1.0, logits_out: dict | None = None):
        """Training (`labels` given): returns (out, {exit index: detached loss} for the exits on this stage),
        out being the hidden state (non-last stage) or the weighted last-exit loss (last stage; after
        `train_only`, the trained exit's weighted loss, nothing after it computed); every branch
        loss is attached with weight * loss_scale. Otherwise returns the hidden state.
        Evaluation (`logits_out` given): fills {exit index: [b, s, V/tp] logits}."""
        h = self.embedding(input_ids, position_ids) if self.pre_process else self.input_tensor
        # A later pipeline stage sees s/TP tokens per rank under sequence parallelism; rope spans all s.
        seq = h.shape[0] * (ps.get_tensor_model_parallel_world_size() if self.config.sequence_parallel else 1)
        rope = self.rotary_pos_emb(input_ids.shape[1] if self.pre_process else seq)
        exit_losses = {}
        branch_at = {p: (k, b) for (k, p), b in zip(self.local_exits.items(), self.branches)}
        for i, layer in enumerate(self.decoder.layers):
            if (self.first_layer + i) in branch_at:
                k, branch = branch_at[self.first_layer + i]
                out = self._block(branch, h, attention_mask, rope)
                if logits_out is not None:
                    logits_out[k] = branch.head.logits(out).transpose(0, 1)
                if labels is not None:
                    loss = branch.head.loss(out, labels, loss_mask)
                    exit_losses[k] = loss.detach()
                    if k == self.stop_after:
                        return loss * (exit_weights[k] if exit_weights is not None else 1.0), exit_losses
                    if exit_weights is not None and torch.is_grad_enabled():
                        h = AttachLoss.apply(h, loss, exit_weights[k] * loss_scale)
            h = self._block(lambda x, m, r, f=layer: f(hidden_states=x, attention_mask=m, rotary_pos_emb=r)[0],
                            h, attention_mask, rope)
        if not self.post_process:
            return h if labels is None else (h, exit_losses)
        k = len(self.shape.exit_points) - 1
        if logits_out is not None:
            logits_out[k] = self.final.logits(h).transpose(0, 1)
        if labels is None:
            return h
        loss = self.final.loss(h, labels, loss_mask)
        exit_losses[k] = loss.detach()
        return loss * (exit_weights[k] if exit_weights is not None else 1.0), exit_losses

    def _block(self, fn, h, attention_mask, rope):
        """One block (a trunk layer or a branch); with full recompute, only its input is kept for the backward
        and it runs again there (we walk the layers ourselves, so TransformerBlock's own recompute never runs)."""
        if self.config.recompute_granularity == "full" and self.training and torch.is_grad_enabled():
            return tensor_parallel.checkpoint(fn, False, h, attention_mask, rope)
        return fn(h, attention_mask, rope)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """Branches' checkpoint keys use their global exit index, so any pipeline layout maps to the same keys;
        the dict keys stay the module paths, so the loaded dict fits `load_state_dict(strict=True)`."""
        from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding

        sd = {}
        for name, child in self.named_children():
            if name == "branches":
                for i, (k, b) in enumerate(zip(self.local_exits, self.branches)):
                    branch_sd = b.sharded_state_dict(f"{prefix}branches.{i}.", sharded_offsets, metadata)
                    replace_prefix_for_sharding(branch_sd, f"{prefix}branches.{i}.", f"{prefix}branches.{k}.")
                    sd.update(branch_sd)
            elif hasattr(child, "sharded_state_dict"):
                sd.update(child.sharded_state_dict(f"{prefix}{name}.", sharded_offsets, metadata))
        return sd


def causal_mask(seq_len: int, device=None) -> torch.Tensor:
    """Explicit causal mask (True = masked), [1, 1, s, s]: the CPU path has no implicit one."""
    return torch.triu(torch.ones(1, 1, seq_len, seq_len, dtype=torch.bool, device=device), diagonal=1)


def build_model(hf_cfg, tp: int = 1, pp: int = 1, seq_length: int = 256, bf16: bool = False,
                recompute: bool = False, sequence_parallel: bool = False, impl: str = "auto") -> FamilyGPT:
    """This rank's part of the family (parallel state must be initialised); `impl`: transformer_impl's argument."""
    cfg = transformer_config(hf_cfg, tp, pp, bf16, recompute, sequence_parallel, impl)
    params = hf_cfg.rope_parameters or {}
    if params.get("rope_type", "default") != "default":
        raise RuyiError(f"megatron training supports plain RoPE only; this family's rope_type is "
                        f"{params['rope_type']!r} (its tiers export and evaluate with it, but cannot be trained here)")
    rope = params.get("rope_theta", 10000.0)
    shape = FamilyShape(tuple(hf_cfg.early_exit_points), hf_cfg.vocab_size,
                        max(seq_length, hf_cfg.max_position_embeddings), rope, hf_cfg.base_arch,
                        tuple((int(p), n) for p, n in (hf_cfg.expansions or {}).items()))
    return FamilyGPT(cfg, shape, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())
