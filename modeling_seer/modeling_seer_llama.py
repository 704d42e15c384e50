"""SeerLlamaForCausalLM: Llama with a per-layer AttnGate and block-sparse attention.

Modes (``config.seer_mode``, dispatched in :meth:`SeerLlamaAttention.forward` only):

- ``dense``: the stock Llama attention path (same logits as ``LlamaForCausalLM``);
- ``distill``: prefill attention from :func:`attn_with_pooling`; the gate's KL loss against
  the pooled map is returned as ``outputs.gate_loss`` (the LM loss is unchanged);
- ``sparse``: gate -> block mask -> :func:`block_sparse_attn` at prefill. Decode steps and
  chunked prefill (queries shorter than keys) attend densely to the KV cache.

This file is copied flat into saved folders. In the package it imports the kernels from
``seer_attn.kernels``; the remote-code writer (``remote_bundle.py``) rewrites those imports
to flat sibling modules and copies the kernel files next to it.
"""
import json
import os
import re
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import LlamaForCausalLM, LlamaModel
from transformers.models.llama.modeling_llama import (LlamaAttention, LlamaDecoderLayer, LlamaMLP,
                                                      LlamaPreTrainedModel, LlamaRMSNorm, LlamaRotaryEmbedding,
                                                      apply_rotary_pos_emb, eager_attention_forward)
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from seer_attn.kernels.block_sparse_attn import attn_with_pooling, block_sparse_attn

from .configuration_seer_llama import SeerLlamaConfig
from .gate import (AttnGate, causal_density, gate_distill_loss, meanpool_scores, oracle_scores,
                   select_blocks_for, streaming_scores)
from .remote_bundle import write_remote_code

GATES_FILE = "seer_gates.safetensors"
_FILE_SUFFIXES = (".safetensors", ".gguf", ".json", ".bin", ".pt", ".pth", ".model", ".txt")
_HUB_PART = r"[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?"
_HUB_ID = re.compile(rf"(?:{_HUB_PART}/)?{_HUB_PART}")


def resolve_source(source):
    """Decide whether ``source`` (a str or path) is a local file/folder or a Hub repo id;
    returns ``(path_or_id, is_local)``.

    A string is a local path when it exists, starts with ``/``, ``./``, ``../`` or ``~``,
    its first component is an existing folder, it has more than one ``/`` or it ends with
    a file suffix (``.safetensors``, ``.gguf``, ``.json``, ...); a missing one raises
    ``FileNotFoundError("no such file or folder: PATH")`` at once. Anything else must look
    like a Hub id (``name`` or ``namespace/name``) to be sent to the Hub."""
    text = os.fspath(source)
    path = os.path.expanduser(text)
    if os.path.exists(path):
        return path, True
    first = text.split("/")[0]
    if text.startswith(("/", "./", "../", "~")) or text.count("/") > 1 or (first != text and os.path.isdir(first)) \
            or text.lower().endswith(_FILE_SUFFIXES) or not _HUB_ID.fullmatch(text) or "--" in text or ".." in text:
        raise FileNotFoundError(f"no such file or folder: {text}")
    return text, False


def hub_offline():
    """Offline mode as the environment says now (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``;
    huggingface_hub reads them only when imported)."""
    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return flag.strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_call(repo_id, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, a download from the Hub repo ``repo_id`` (``hf_hub_download``,
    ``from_pretrained``), cache-only in offline mode; a failure raises one OSError naming
    the repo and the reason."""
    offline = hub_offline()
    if offline:
        kwargs["local_files_only"] = True
    try:
        return fn(*args, **kwargs)
    except OSError as err:
        reason = "offline mode (HF_HUB_OFFLINE is set) and not in the local cache" if offline else \
            (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise OSError(f"{repo_id!r} is no local file or folder and could not be loaded from the Hugging Face "
                      f"Hub: {reason}") from None


@dataclass
class SeerForwardContext:
    """Per-forward state shared by all layers (created by the model, passed as a kwarg).

    ``seq_bounds``: int32 ``[B, 2]`` real-token (start, end) per row, or None without
    padding; ``valid``: bool ``[B, T]`` or None; ``gate_rope``: ``(cos, sin)`` ``[B, NB, G]``.
    Layers append their gate losses (distill) and block densities ``[B, HQ]`` (sparse).
    """

    seq_bounds: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    gate_rope: tuple | None = None
    gate_losses: list = field(default_factory=list)
    densities: list = field(default_factory=list)
    masks: list | None = None  # set to [] to record every layer's block mask
    forced_masks: list | None = None  # per-layer block masks to use instead of the selector


def _padding_bounds(attention_mask, T):
    """From a 2D 0/1 mask, (valid [B, T], bounds [B, 2]) or (None, None) without padding."""
    if attention_mask is None or attention_mask.dim() != 2 or attention_mask.shape[1] != T:
        return None, None
    valid = attention_mask.bool()
    if bool(valid.all()):
        return None, None
    pos = torch.arange(T, device=valid.device)
    start = torch.where(valid, pos, T).amin(-1)
    end = torch.where(valid, pos + 1, 0).amax(-1)
    count = valid.sum(-1)
    holes = (count != (end - start).clamp_min(0)) & (count > 0)
    if bool(holes.any()):
        rows = holes.nonzero().flatten().tolist()
        raise ValueError(f"attention_mask rows {rows} are not one contiguous run of ones; sparse/distill attention "
                         "supports left or right padding only")
    start = torch.where(count > 0, start, 0)
    end = torch.where(count > 0, end, 0)
    return valid, torch.stack([start, end], dim=-1).to(torch.int32)


class SeerLlamaAttention(LlamaAttention):
    """LlamaAttention plus an :class:`AttnGate`; see the module docstring for the modes."""

    def __init__(self, config: SeerLlamaConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.attn_gate = AttnGate(
            config.num_attention_heads, config.num_key_value_heads, self.head_dim,
            hidden_size=config.seer_gate_hidden_size, block_size=config.seer_block_size,
            q_pooling=config.seer_q_pooling, k_pooling=config.seer_k_pooling, use_rope=config.seer_gate_rope)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                cache=None, seer_ctx: SeerForwardContext | None = None, **kwargs):
        cache = past_key_values if past_key_values is not None else cache
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q_pre = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        k_pre = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q_pre, k_pre, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)

        mode = self.config.seer_mode
        attn_weights = None
        if mode != "dense" and q.shape[2] == k.shape[2]:  # prefill: the gate and the kernels
            if seer_ctx is None:
                raise ValueError("SeerLlamaAttention in seer_mode "
                                 f"{mode!r} needs the seer_ctx built by SeerLlamaModel.forward")
            attn_output = self._seer_attention(mode, q, k, v, q_pre, k_pre, seer_ctx)
        else:
            interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                              eager_attention_forward)
            attn_output, attn_weights = interface(
                self, q, k, v, attention_mask, dropout=0.0 if not self.training else self.attention_dropout,
                scaling=self.scaling, **kwargs)
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights

    def _seer_attention(self, mode, q, k, v, q_pre, k_pre, ctx):
        cfg = self.config
        if not q.dtype == k.dtype == v.dtype:  # e.g. autocast: RoPE in fp32, v in bf16
            q, k = q.to(v.dtype), k.to(v.dtype)
        if mode == "distill":
            # Detached inputs: the gate learns to predict the model's attention; its loss must
            # never move the base weights (they stay frozen in post-training either way).
            scores = self.attn_gate(q_pre.detach(), k_pre.detach(), rope=ctx.gate_rope, valid=ctx.valid)
            pool_op = "max" if cfg.seer_distill_target == "max" else "sum"
            out, pooled = attn_with_pooling(q, k, v, True, self.scaling, cfg.seer_block_size,
                                            seq_bounds=ctx.seq_bounds, pool_op=pool_op)
            ctx.gate_losses.append(gate_distill_loss(scores, pooled))
            return out.transpose(1, 2)
        if ctx.forced_masks is not None:
            mask = ctx.forced_masks[self.layer_idx]
        else:
            with torch.no_grad():
                scores = self.block_scores(q, k, v, q_pre, k_pre, ctx)
                mask = select_blocks_for(scores, cfg)
        out = block_sparse_attn(q, k, v, mask, True, self.scaling, cfg.seer_block_size, seq_bounds=ctx.seq_bounds)
        ctx.densities.append(causal_density(mask))
        if ctx.masks is not None:
            ctx.masks.append(mask)
        return out.transpose(1, 2)

    def block_scores(self, q, k, v, q_pre, k_pre, ctx):
        """Block logits ``[B, HQ, NB, NB]`` from ``config.seer_selector`` (the gate or a baseline)."""
        sel, bs = self.config.seer_selector, self.config.seer_block_size
        if sel == "gate":
            return self.attn_gate(q_pre, k_pre, rope=ctx.gate_rope, valid=ctx.valid)
        if sel == "streaming":
            return streaming_scores(q.shape[0], q.shape[1], (q.shape[2] + bs - 1) // bs, q.device)
        if sel == "meanpool":
            return meanpool_scores(q, k, bs, ctx.valid)
        _, pooled = attn_with_pooling(q, k, v, True, self.scaling, bs, seq_bounds=ctx.seq_bounds,
                                      pool_op="max" if sel == "oracle_max" else "sum")
        return oracle_scores(pooled)


class SeerLlamaDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: SeerLlamaConfig, layer_idx: int):
        # Same submodules as LlamaDecoderLayer, with SeerLlamaAttention (built once, not replaced).
        nn.Module.__init__(self)
        self.hidden_size = config.hidden_size
        self.self_attn = SeerLlamaAttention(config=config, layer_idx=layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class SeerLlamaPreTrainedModel(LlamaPreTrainedModel):
    config_class = SeerLlamaConfig
    config: SeerLlamaConfig
    _no_split_modules = ["SeerLlamaDecoderLayer"]
    _keep_in_fp32_modules = ["attn_gate"]
    _can_compile_fullgraph = False
    _can_record_outputs = {"hidden_states": SeerLlamaDecoderLayer, "attentions": SeerLlamaAttention}

    def _init_weights(self, module):
        if isinstance(module, AttnGate):
            module.reset_parameters()
        else:
            super()._init_weights(module)


class SeerLlamaModel(SeerLlamaPreTrainedModel, LlamaModel):
    def __init__(self, config: SeerLlamaConfig):
        SeerLlamaPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([SeerLlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        gate_cfg = config.__class__.from_dict(config.to_dict())
        gate_cfg.head_dim = config.seer_gate_hidden_size  # RoPE table sized for the gate width
        self.gate_rotary_emb = LlamaRotaryEmbedding(config=gate_cfg)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                seer_ctx: SeerForwardContext | None = None, **kwargs):
        if self.config.seer_mode != "dense":
            seer_ctx = seer_ctx if seer_ctx is not None else SeerForwardContext()
            ref = input_ids if input_ids is not None else inputs_embeds
            self._prepare_context(seer_ctx, attention_mask, position_ids, ref.shape[1], ref.device)
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               inputs_embeds=inputs_embeds, seer_ctx=seer_ctx, **kwargs)

    def _prepare_context(self, ctx, attention_mask, position_ids, T, device):
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"seer_mode {self.config.seer_mode!r} takes a 2D padding attention_mask [B, T]; "
                             f"got a {attention_mask.dim()}D mask")
        ctx.valid, ctx.seq_bounds = _padding_bounds(attention_mask, T)
        bs = self.config.seer_block_size
        NB = (T + bs - 1) // bs
        pos = position_ids if position_ids is not None else torch.arange(T, device=device)[None]
        pos = pos[:, -T:] if pos.shape[-1] >= T else torch.arange(T, device=device)[None]
        # each block sits at the position of its first real token (0: a block of padding only)
        real = ctx.valid if ctx.valid is not None else torch.ones(1, T, dtype=torch.bool, device=device)
        rows, pad = max(pos.shape[0], real.shape[0]), NB * bs - T
        real = nn.functional.pad(real.expand(rows, -1), (0, pad), value=False).view(rows, NB, bs)
        pos = nn.functional.pad(pos.expand(rows, -1), (0, pad)).view(rows, NB, bs)
        first = real.to(torch.uint8).argmax(-1, keepdim=True)  # argmax returns the first maximum
        block_pos = pos.gather(-1, first).squeeze(-1).masked_fill(~real.any(-1), 0)
        ctx.gate_rope = self.gate_rotary_emb(torch.empty(0, device=device, dtype=torch.float32), block_pos)


@dataclass
class SeerCausalLMOutputWithPast(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus ``gate_loss``: in distill mode, the per-layer gate KL
    losses summed and scaled by ``config.seer_distill_loss_scale`` (None otherwise)."""

    gate_loss: torch.FloatTensor | None = None


class SeerLlamaForCausalLM(SeerLlamaPreTrainedModel, LlamaForCausalLM):
    """Llama causal LM with SeerAttention gates. After a sparse prefill,
    :meth:`seer_density` returns the kept share of causal blocks per layer and head."""

    def __init__(self, config: SeerLlamaConfig):
        SeerLlamaPreTrainedModel.__init__(self, config)
        self.model = SeerLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._last_density = None
        self.post_init()

    def forward(self, *args, seer_ctx: SeerForwardContext | None = None, **kwargs):
        """Llama's forward; in distill mode the output also carries ``gate_loss``: the
        per-layer KL losses summed and scaled by ``config.seer_distill_loss_scale``."""
        ctx = seer_ctx if seer_ctx is not None else SeerForwardContext()
        out = super().forward(*args, seer_ctx=ctx, **kwargs)
        if ctx.gate_losses:
            loss = torch.stack([l.float() for l in ctx.gate_losses]).sum() * self.config.seer_distill_loss_scale
            if isinstance(out, tuple):
                out = out + (loss,)
            else:  # a real output class: DDP/FSDP flatten and rebuild outputs by their fields
                out = SeerCausalLMOutputWithPast(**out, gate_loss=loss)
        if ctx.densities:
            self._last_density = torch.stack(ctx.densities).detach()  # [L, B, HQ]
        return out

    # -- modes and statistics ------------------------------------------------------------

    def set_seer_mode(self, mode: str, **seer_overrides):
        """Switch the mode (and any runtime ``seer_*`` option, e.g. ``seer_threshold=1e-3``).

        Structural options (gate width, poolings, gate RoPE, block size) are fixed by the
        built gates: changing one raises ValueError (convert the base model again instead)."""
        new = {"seer_mode": mode, **seer_overrides}
        unknown = [k for k in new if not k.startswith("seer_")]
        if unknown:
            raise ValueError(f"unknown seer options {unknown}: every option is named seer_*")
        new = self.config.runtime_overrides(new)
        missing = object()
        old = {k: getattr(self.config, k, missing) for k in new}
        for k, val in new.items():
            setattr(self.config, k, val)
        try:
            self.config.validate_seer()
        except ValueError:
            for k, val in old.items():
                if val is missing:
                    delattr(self.config, k)
                else:
                    setattr(self.config, k, val)
            raise
        return self

    def seer_density(self):
        """Kept share of causal blocks of the last sparse prefill: float ``[layers, batch, heads]``
        (None before any sparse prefill)."""
        return self._last_density

    # -- gates only ------------------------------------------------------------------------

    def gate_state_dict(self):
        return {k: v for k, v in self.state_dict().items() if ".attn_gate." in k}

    def _gate_metadata(self):
        c = self.config
        return {"num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
                "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim,
                **{k: getattr(c, k) for k in ("seer_block_size", "seer_gate_hidden_size", "seer_q_pooling",
                                              "seer_k_pooling", "seer_gate_rope")}}

    def save_gates(self, path, dtype=None):
        """Write the gate tensors only (a few MB) to ``path`` (a folder or a .safetensors file).

        ``dtype``: a floating torch dtype to store them in (e.g. ``torch.bfloat16`` halves the
        file); default: as trained (float32). :meth:`load_gates` casts back to the model's."""
        from safetensors.torch import save_file
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype={dtype!r} is invalid: expected a floating torch dtype such as torch.bfloat16")
        if not str(path).endswith(".safetensors"):
            os.makedirs(path, exist_ok=True)
            path = os.path.join(path, GATES_FILE)
        tensors = {k: v.detach().to(dtype or v.dtype).contiguous().cpu() for k, v in self.gate_state_dict().items()}
        save_file(tensors, str(path), metadata={"seer": json.dumps(self._gate_metadata())})
        return str(path)

    def load_gates(self, path, **hub_kwargs):
        """Load gates written by :meth:`save_gates` (local folder/file or Hub repo id).

        Raises ValueError when the gates were trained for another shape (layers, heads,
        head_dim, gate width, poolings) or a tensor is not floating point or not finite."""
        from safetensors import safe_open
        path, local = resolve_source(path)
        if not local:
            from huggingface_hub import hf_hub_download
            path = hub_call(path, hf_hub_download, path, GATES_FILE, **hub_kwargs)
        elif os.path.isdir(path):
            path = os.path.join(path, GATES_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no gate file at {path}")
        with safe_open(path, framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("seer", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        mine = self._gate_metadata()
        diffs = {k: (meta.get(k), v) for k, v in mine.items() if meta.get(k) != v}
        if diffs:
            raise ValueError("gates do not match this model: "
                             + ", ".join(f"{k}: gates {a!r} vs model {b!r}" for k, (a, b) in diffs.items()))
        own = self.gate_state_dict()
        if set(tensors) != set(own):
            raise ValueError(f"gate file keys differ from the model's: missing {sorted(set(own) - set(tensors))[:4]}, "
                             f"unexpected {sorted(set(tensors) - set(own))[:4]}")
        for k, t in tensors.items():
            if tuple(t.shape) != tuple(own[k].shape):
                raise ValueError(f"gate tensor {k} has shape {tuple(t.shape)}, model expects {tuple(own[k].shape)}")
            if not t.dtype.is_floating_point:
                raise ValueError(f"gate tensor {k} has dtype {t.dtype}, expected a floating dtype")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"gate tensor {k} holds {int((~torch.isfinite(t)).sum())} NaN/inf values")
        self.load_state_dict(tensors, strict=False)
        return self

    # -- saving --------------------------------------------------------------------------

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save weights and config plus a flat remote-code bundle (config, model, gate and
        kernel modules), so ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``
        works where this package is not installed."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            write_remote_code(save_directory)


SeerLlamaConfig.register_for_auto_class()
SeerLlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")
