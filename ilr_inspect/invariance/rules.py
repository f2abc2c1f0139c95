"""Name rules: scale-invariant units from state-dict names and shapes alone (the heuristic tier).

The table below is data: each family has patterns that recognise it, producer→normalizer pairings, residual
stream writers and heads. Every unit found here is labelled ``name-rule`` with a confidence; the graph and
functional tiers override it wherever a graph or a model is available.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .unit import Unit, unit_name

Shapes = Mapping[str, tuple[int, ...]]

# Family table. ``detect``: all must match some tensor name. ``writers``: residual-stream writers of pre-LN
# transformers (one joint unit, approximately SI, theory.md §12.5.9). ``tied``: a head that shares the token
# embedding makes the stream readable un-normalized, so the joint unit is not SI.
FAMILIES: dict[str, dict[str, list[str]]] = {
    "hf-bert": {
        "detect": [r"(^|\.)embeddings\.word_embeddings\.weight$", r"attention\.self\.query\.weight$"],
        "joint_si": [r"(^|\.)embeddings\.(word|position|token_type)_embeddings\.weight$"],
        "post_ln": [r"attention\.output\.dense\.(weight|bias)$", r"(?<!attention\.)output\.dense\.(weight|bias)$"],
    },
    "hf-gpt2": {
        "detect": [r"(^|\.)wte\.weight$", r"(^|\.)h\.\d+\.attn\.c_attn\.weight$"],
        "writers": [r"(^|\.)wte\.weight$", r"(^|\.)wpe\.weight$", r"\.attn\.c_proj\.(weight|bias)$",
                    r"\.mlp\.c_proj\.(weight|bias)$"],
        "tied": [r"(^|\.)wte\.weight$"],
        "head": [r"(^|\.)lm_head\.weight$"],
    },
    "timm-vit": {
        "detect": [r"(^|\.)patch_embed\.proj\.weight$", r"(^|\.)blocks\.\d+\.attn\.qkv\.weight$"],
        "writers": [r"(^|\.)patch_embed\.proj\.(weight|bias)$", r"(^|\.)pos_embed$", r"(^|\.)cls_token$",
                    r"\.attn\.proj\.(weight|bias)$", r"\.mlp\.fc2\.(weight|bias)$"],
        "head": [r"(^|\.)head\.(weight|bias)$"],
    },
    "hf-vit": {
        "detect": [r"embeddings\.patch_embeddings\.projection\.weight$", r"attention\.attention\.query\.weight$"],
        "writers": [r"embeddings\.patch_embeddings\.projection\.(weight|bias)$", r"embeddings\.position_embeddings$",
                    r"embeddings\.cls_token$", r"attention\.output\.dense\.(weight|bias)$",
                    r"layer\.\d+\.output\.dense\.(weight|bias)$"],
        "head": [r"(^|\.)classifier\.(weight|bias)$"],
    },
}

HEAD_PATTERNS = [r"(^|\.)(fc|classifier|head|linear|lm_head|logits|out|output_layer)(\.\d+)?\.(weight|bias)$"]
NORM_LEAVES = ("running_var",)


@dataclass(frozen=True)
class _Conv:
    name: str
    prefix: str  # module path without the leaf ("layer1.0.")
    index: str  # trailing digits of the conv module ("1" for conv1)
    out_ch: int
    in_ch: int


def _norm_modules(shapes: Shapes, kinds: Mapping[str, str]) -> dict[str, int]:
    """BatchNorm-like modules (they carry running statistics) → channels."""
    out: dict[str, int] = {}
    for name, shp in shapes.items():
        if name.endswith(".running_var") and len(shp) == 1:
            out[name[: -len(".running_var")]] = shp[0]
    return out


def _any(patterns: Sequence[str], name: str) -> bool:
    return any(re.search(p, name) for p in patterns)


def _family(names: Sequence[str]) -> str | None:
    for fam, spec in FAMILIES.items():
        if all(any(re.search(p, n) for n in names) for p in spec["detect"]):
            return fam
    return None


def _transformer_units(fam: str, params: Sequence[str]) -> list[Unit]:
    spec = FAMILIES[fam]
    units: list[Unit] = []
    if fam == "hf-bert":
        emb = tuple(n for n in params if _any(spec["joint_si"], n))
        if emb:
            units.append(Unit(unit_name(list(emb)), emb, "joint", True, "name-rule",
                              "BERT: the summed word/position/token-type embeddings feed one LayerNorm",
                              normalizer="embeddings.LayerNorm", confidence=0.8))
        taken = set(emb)
        for n in params:
            if n in taken:
                continue
            why = ("post-LN block: LN(x + F(x)) does not rescale x, so F's output matrix is not SI"
                   if _any(spec["post_ln"], n) else "BERT: not followed only by a normalizer")
            units.append(Unit(unit_name([n]), (n,), "tensor", False, "name-rule", why, confidence=0.6,
                              role="not-invariant"))
        return units
    writers = tuple(n for n in params if _any(spec["writers"], n))
    head = [n for n in params if _any(spec.get("head", []), n)]
    tied = bool(spec.get("tied")) and not head
    if writers:
        if tied:
            units.append(Unit(unit_name(list(writers)), writers, "joint", False, "name-rule",
                              "residual-stream writers, but the output head is tied to the token embedding "
                              "(no lm_head tensor), so the stream is read un-normalized", confidence=0.5,
                              role="not-invariant"))
        else:
            units.append(Unit(unit_name(list(writers)), writers, "joint", True, "name-rule",
                              "pre-LN transformer: all residual-stream writers, read only through LayerNorms "
                              "(approximately SI; theory.md §12.5.9)", normalizer="LayerNorm", confidence=0.4))
    taken = set(writers)
    for n in params:
        if n in taken:
            continue
        units.append(Unit(unit_name([n]), (n,), "tensor", False, "name-rule",
                          "head" if n in head else "attention/MLP input or normalizer parameter: not SI alone",
                          confidence=0.5, role="not-invariant"))
    return units


def _convs(shapes: Shapes, params: Sequence[str]) -> list[_Conv]:
    out: list[_Conv] = []
    for n in params:
        shp = shapes[n]
        if not n.endswith(".weight") or len(shp) < 2:
            continue
        mod = n[: -len(".weight")]
        m = re.match(r"^(.*?)([A-Za-z_]*?)(\d*)$", mod)
        prefix = mod.rsplit(".", 1)[0] + "." if "." in mod else ""
        index = m.group(3) if m else ""
        out.append(_Conv(n, prefix, index, shp[0], shp[1] if len(shp) > 1 else 0))
    return out


def _cnn_units(shapes: Shapes, kinds: Mapping[str, str], params: Sequence[str]) -> list[Unit]:
    norms = _norm_modules(shapes, kinds)
    order = list(shapes)
    convs = _convs(shapes, params)
    decided: dict[str, Unit] = {}
    writers: list[str] = []

    def bn_of(mod: str) -> list[str]:
        """Candidate normalizers of a producer module, by the naming conventions of the family table."""
        leaf = mod.rsplit(".", 1)[-1]
        pre = mod[: len(mod) - len(leaf)]
        cands: list[str] = []
        m = re.match(r"^([A-Za-z_]*?)(\d+)$", leaf)
        if m:
            base, idx = m.group(1), int(m.group(2))
            bn_base = base.replace("conv", "bn").replace("fc", "bn") if base else base
            if base == "":  # Sequential: features.3 -> features.4 (VGG-BN, downsample.0 -> downsample.1)
                cands.append(f"{pre}{idx + 1}")
            else:
                cands.append(f"{pre}{bn_base}{idx}")
        else:
            cands.append(f"{pre}{leaf.replace('conv', 'bn')}")
        return cands

    # Pre-activation blocks: bnK normalizes convK's *input* (size = in_ch, differs from out_ch somewhere).
    pre_votes = post_votes = 0
    for c in convs:
        mod = c.name[: -len(".weight")]
        for b in bn_of(mod):
            if b in norms and c.in_ch != c.out_ch:
                if norms[b] == c.in_ch:
                    pre_votes += 1
                elif norms[b] == c.out_ch:
                    post_votes += 1
    preact = pre_votes > post_votes
    has_conv = any(len(shapes[c.name]) >= 3 for c in convs)
    for c in convs:
        mod = c.name[: -len(".weight")]
        leaf = mod.rsplit(".", 1)[-1]
        m = re.match(r"^([A-Za-z_]*?)(\d+)$", leaf)
        nxt: str | None = None
        if preact and m and m.group(1):
            nxt = f"{mod[: len(mod) - len(leaf)]}{m.group(1).replace('conv', 'bn')}{int(m.group(2)) + 1}"
        partner = next((b for b in bn_of(mod) if b in norms), None)
        if preact:
            if nxt and nxt in norms and norms[nxt] == c.out_ch:
                decided[c.name] = Unit(unit_name([c.name]), (c.name,), "channel", True, "name-rule",
                                       f"pre-activation block: feeds {nxt} directly (per-channel BatchNorm)",
                                       normalizer=nxt, confidence=0.7)
            elif _any(HEAD_PATTERNS, c.name) and len(shapes[c.name]) == 2:
                decided[c.name] = Unit(unit_name([c.name]), (c.name,), "tensor", False, "name-rule",
                                       "classifier head: its output is the logits", confidence=0.8,
                                       role="not-invariant")
            else:
                writers.append(c.name)
            continue
        if partner is not None and norms[partner] == c.out_ch:
            decided[c.name] = Unit(unit_name([c.name]), (c.name,), "channel", True, "name-rule",
                                   f"followed by per-channel BatchNorm {partner} (naming convention)",
                                   normalizer=partner, confidence=0.8)
            bias = c.name[: -len("weight")] + "bias"
            if bias in shapes:
                decided[bias] = Unit(unit_name([bias]), (bias,), "tensor", False, "name-rule",
                                     f"bias right before BatchNorm {partner}: the mean subtraction removes it "
                                     "(zero gradient, no effect; only weight decay moves it)",
                                     normalizer=partner, confidence=0.8, role="no-effect")
        elif _any(HEAD_PATTERNS, c.name) or c is convs[-1] or (len(shapes[c.name]) == 2 and has_conv):
            decided[c.name] = Unit(unit_name([c.name]), (c.name,), "tensor", False, "name-rule",
                                   "classifier linear (no BatchNorm after it; theory.md §12.5.3, §12.5.8)",
                                   confidence=0.7, role="not-invariant")
        else:
            decided[c.name] = Unit(unit_name([c.name]), (c.name,), "tensor", True, "name-rule",
                                   "no rule matched; Kosson et al. default (a matrix with weight decay is "
                                   "treated as rotational)", confidence=0.3)
    for wt in _stream_groups(sorted(writers, key=order.index)):
        decided[wt[0]] = Unit(unit_name(list(wt)), wt, "joint", True, "name-rule",
                              "pre-activation ResNet: these convs write one residual stream, read only through "
                              "BatchNorms; each alone is NOT SI, together they are (theory.md §12.5.7). Assumes the "
                              "projection shortcut reads the normalized activation (common PreActBlock code), "
                              "which makes each stage with a projection its own stream", normalizer="bn1 of the "
                              "next blocks", confidence=0.5)
    taken = {m for u in decided.values() for m in u.members}
    units = list(decided.values())
    for n in params:
        if n in taken:
            continue
        mod = n.rsplit(".", 1)[0]
        if mod in norms:
            why = "normalizer affine parameter: not SI on its own"
        elif _any(HEAD_PATTERNS, n):
            why = "classifier head parameter"
        else:
            why = "no rule makes it scale-invariant"
        units.append(Unit(unit_name([n]), (n,), "tensor", False, "name-rule", why, confidence=0.5,
                          role="not-invariant"))
    return units


def _stream_groups(writers: list[str]) -> list[tuple[str, ...]]:
    """Split residual writers into streams: a new stream starts at a stage that has a projection shortcut."""
    def stage(name: str) -> str | None:
        m = re.match(r"^(.*?layers?\.?\d+)\.", name)
        return m.group(1) if m else None

    projected = {stage(w) for w in writers if re.search(r"(shortcut|downsample|proj)\.\d+\.weight$", w)}
    groups: list[list[str]] = []
    current: str | None = None
    for w in writers:
        st = stage(w)
        if not groups or (st != current and st in projected and st is not None):
            groups.append([])
        if st is not None:
            current = st
        groups[-1].append(w)
    return [tuple(g) for g in groups]


def name_rule_units(shapes: Shapes, kinds: Mapping[str, str] | None = None) -> list[Unit]:
    """Decide every parameter tensor from names and shapes alone (labelled heuristic)."""
    kinds = kinds or {}
    params = [n for n in shapes if kinds.get(n, "parameter") == "parameter" and not n.endswith(NORM_LEAVES)
              and not n.endswith(("running_mean", "num_batches_tracked"))]
    fam = _family(list(shapes))
    if fam is not None:
        return _transformer_units(fam, params)
    return _cnn_units(shapes, kinds, params)
