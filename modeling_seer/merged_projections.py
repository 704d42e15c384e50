"""Each layer's q/k/v projections as one GEMM, and the MLP's gate/up as one, for inference
(:meth:`~.seer_layer.SeerCausalLMMixin.seer_merge_projections`, docs/design.md §2).

At a decode step the projections are matrix-vector products bound by reading their weights;
cuBLAS reads the small k and v matrices of an 8B-shaped layer at about half the rate of the
large ones (H100, session 40: 1.4 against 2.6-2.8 TB/s) and finishes several of them with an
extra split-K reduction launch. One GEMM over the concatenated weights reads them at the
large rate in one launch (session 41, H100, 16 layers at 4 x 128k: 0.23 ms less per token).

The concatenation is made once and the stock parameters become views of it (no second copy
of the weights; the state dict, ``save_pretrained``, ``load_state_dict`` and loading into the
parameters in place are unchanged). The merged path is taken only while that still holds: plain
``nn.Linear`` projections (not PEFT- or quantisation-wrapped), each weight still the view made
here. The model checks this on the host at each forward (:func:`still_merged`); anything else
(``.to()``, new parameters) undoes the merge with a warning, and the stock projections run. A
forward that needs the projections' gradients (grad mode on and one of them requiring grad)
runs them unmerged too (the concatenation is not a parameter). Numerics: the same products in
one GEMM, equal up to the GEMM's summation order (cuBLAS may pick another kernel for the wider
matrix).

Copied flat into saved model folders (remote code): imports only torch.
"""
import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")


class Merged:
    """One group of projections as one GEMM: ``weight`` ``[sum(sizes), in]``, ``bias`` (or
    None) and the output ``sizes``; ``owners`` the modules whose parameters are views of it."""

    def __init__(self, modules):
        self.owners = list(modules)
        ws = [m.weight for m in self.owners]
        biased = self.owners[0].bias is not None  # all or none (_check_group)
        with torch.no_grad():
            self.weight = torch.cat([w.detach() for w in ws])
            self.bias = torch.cat([m.bias.detach() for m in self.owners]) if biased else None
        self.sizes = tuple(w.shape[0] for w in ws)
        o = 0
        for m, n in zip(self.owners, self.sizes):
            m.weight.data = self.weight[o:o + n]
            if self.bias is not None:
                m.bias.data = self.bias[o:o + n]
            o += n
        self.ptrs = self._ptrs()
        #: whether a projection of the group requires grad (then grad-mode forwards run them unmerged)
        self.trainable = self._trainable()

    def _trainable(self):
        return any(p.requires_grad for m in self.owners for p in m.parameters(recurse=False))

    def _ptrs(self):
        params = (lambda m: (m.weight, m.bias)) if self.bias is not None else (lambda m: (m.weight,))
        return [p.data_ptr() for m in self.owners for p in params(m)]

    def current(self):
        """Whether every owner is still a plain ``nn.Linear`` whose parameters are the views made
        here (and :attr:`trainable` brought up to date)."""
        if any(type(m) is not nn.Linear for m in self.owners) or self._ptrs() != self.ptrs:
            return False
        self.trainable = self._trainable()
        return True

    def active(self):
        """Whether this forward runs the one GEMM (not when it needs the projections' gradients)."""
        return not (self.trainable and torch.is_grad_enabled())

    def __call__(self, x):
        return F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)


def _check_group(where, modules, names):
    for name, m in zip(names, modules):
        if type(m) is not nn.Linear:
            raise ValueError(f"seer_merge_projections: {where}.{name} is a {type(m).__name__}, not a plain nn.Linear "
                             "(wrapped by PEFT or quantised: run it unmerged)")
        if hasattr(m, "_hf_hook") or m.weight.device.type == "meta":
            raise ValueError(f"seer_merge_projections: {where}.{name} is dispatched by accelerate (device_map with "
                             "offloading, or hooks that move its weights): run it unmerged")
    if len({m.bias is None for m in modules}) > 1:
        raise ValueError(f"seer_merge_projections: in {where} some of {list(names)} have a bias and some do not")
    if len({(m.weight.dtype, m.weight.device, m.in_features) for m in modules}) > 1:
        raise ValueError(f"seer_merge_projections: {where}'s {list(names)} differ in dtype, device or input width")


def merge(layers, enable=True):
    """Merge (or with ``enable=False`` unmerge) each decoder layer's q/k/v projections, and the
    MLP's gate/up where the MLP is ``down(act(gate(x)) * up(x))``. An earlier merge is undone
    first; every layer is checked before any is merged. Returns the number of groups merged."""
    for layer in layers:
        layer.self_attn.__dict__.pop("_seer_qkv", None)
        layer.mlp.__dict__.pop("_seer_gate_up", None)
    if not enable:
        return 0
    plan = []
    for i, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        qkv = [getattr(attn, n) for n in QKV]
        _check_group(f"model.layers.{i}.self_attn", qkv, QKV)
        gu = None
        if all(hasattr(mlp, n) for n in GATE_UP + ("down_proj", "act_fn")):
            gu = [getattr(mlp, n) for n in GATE_UP]
            _check_group(f"model.layers.{i}.mlp", gu, GATE_UP)
        plan.append((attn, qkv, mlp, gu))
    n = 0
    for attn, qkv, mlp, gu in plan:
        attn.__dict__["_seer_qkv"] = Merged(qkv)
        n += 1
        if gu is not None:
            mlp.__dict__["_seer_gate_up"] = Merged(gu)
            n += 1
    return n


def still_merged(layers):
    """Host check at a forward (skipped while torch.compile traces): undo the merge of the
    decoder ``layers``, with a warning, where a merged group no longer holds (:meth:`Merged.current`)."""
    if torch.compiler.is_compiling() or not len(layers):
        return
    if "_seer_qkv" not in layers[0].self_attn.__dict__:
        return
    for layer in layers:
        groups = [g for g in (layer.self_attn.__dict__.get("_seer_qkv"), layer.mlp.__dict__.get("_seer_gate_up"))
                  if g is not None]
        if not all(g.current() for g in groups):
            merge(layers, enable=False)
            logger.warning("seer_merge_projections: the projections changed since the merge (moved, cast, wrapped or "
                           "replaced); running them unmerged (call seer_merge_projections() again)")
            return


def qkv(attn, hidden_states):
    """``(q, k, v)`` projections ``[..., heads * D]`` of ``attn``: one GEMM when merged."""
    merged = getattr(attn, "_seer_qkv", None)
    if merged is not None and merged.active():
        return merged(hidden_states)
    return attn.q_proj(hidden_states), attn.k_proj(hidden_states), attn.v_proj(hidden_states)


def mlp_forward(mlp, x):
    """``mlp(x)``; with gate/up merged, ``down(act(gate(x)) * up(x))`` with one GEMM for gate and up."""
    merged = getattr(mlp, "_seer_gate_up", None)
    if merged is None or not merged.active():
        return mlp(x)
    g, u = merged(x)
    return mlp.down_proj(mlp.act_fn(g) * u)
