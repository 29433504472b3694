"""Modules with the parameter names of the libraries they replace, so state dicts load both ways."""
from vitfast.nn.layer_norm import LayerNorm
from vitfast.nn.patch_embed import PatchEmbed
from vitfast.nn.patch_merging import PatchMerging
from vitfast.nn.window_attention import ShiftedWindowAttention, ShiftedWindowAttentionV2, WindowAttention

__all__ = ["LayerNorm", "PatchEmbed", "PatchMerging", "ShiftedWindowAttention", "ShiftedWindowAttentionV2",
           "WindowAttention"]


def _refuse_script(module) -> None:
    raise NotImplementedError(
        f"torch.jit.script cannot compile vitfast.nn.{type(module).__name__} (its forward calls vitfast's Python ops "
        f"and backend choice): torch.jit.trace and torch.compile take it; or script the module it replaces")


for _cls in (LayerNorm, PatchEmbed, PatchMerging, ShiftedWindowAttention, WindowAttention):
    _cls.__prepare_scriptable__ = _refuse_script  # (torch.jit.script calls it first; it failed in TorchScript)
