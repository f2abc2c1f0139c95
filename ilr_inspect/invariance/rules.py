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
# transformers (one joint unit, approximately SI, docs/theory.md §2). ``tied``: a head that shares the token
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
                              "(approximately SI; docs/theory.md §2)", normalizer="LayerNorm", confidence=0.4))
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


def _ln_partner(mod: str, out_ch: int, lns: Mapping[str, int], sorted_storage: bool, order: Sequence[str]
                ) -> str | None:
    """The LayerNorm-like module a producer feeds, from structure visible in the names: the next index of a
    Sequential (``head.0`` → ``head.1``), the same index (``fc1`` → ``ln1``), or a shared name token in the same
    parent (``in_proj`` → ``ln_in``). Storage order counts only when the file did not sort its keys."""
    parent, _, leaf = mod.rpartition(".")
    sibs = {m: c for m, c in lns.items() if m.rpartition(".")[0] == parent and c == out_ch}
    if not sibs:
        return None
    if leaf.isdigit():
        nxt = f"{parent}.{int(leaf) + 1}" if parent else str(int(leaf) + 1)
        return nxt if nxt in sibs else None
    idx = _index(leaf)
    hits = [m for m in sibs if idx is not None and _index(m.rpartition(".")[2]) == idx]
    if not hits:
        hits = [m for m in sibs if _tokens(leaf) & _tokens(m.rpartition(".")[2])]
    if len(hits) == 1:
        mine = f"{mod}.weight"
        if not sorted_storage and mine in order and f"{hits[0]}.weight" in order \
                and order.index(f"{hits[0]}.weight") < order.index(mine):
            return None  # registered before the producer: it normalizes the block's input (pre-LN), not this output
        return hits[0]
    return None


def _cnn_units(shapes: Shapes, kinds: Mapping[str, str], params: Sequence[str],
               originals: Mapping[str, str] | None = None, rotational_default: bool = False) -> list[Unit]:
    norms = _norm_modules(shapes, kinds)
    lns = _ln_modules(shapes, params, norms, originals or {})
    sorted_storage = list(shapes) == sorted(shapes)
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
        ln = _ln_partner(mod, c.out_ch, lns, sorted_storage, order) if len(shapes[c.name]) >= 2 else None
        if ln is not None and (partner is None or norms[partner] != c.out_ch):
            bias = c.name[: -len("weight")] + "bias"
            members = (c.name, bias) if bias in shapes else (c.name,)
            how = ("next index in a Sequential" if mod.rpartition(".")[2].isdigit()
                   else "same index or shared name in the same parent")
            decided[c.name] = Unit(unit_name(list(members)), members, "joint" if len(members) > 1 else "tensor",
                                   True, "name-rule", f"feeds LayerNorm-like {ln} (naming: {how}; "
                                   "assumes no residual add in between); a bias before a LayerNorm is scaled with "
                                   "the weight, so the unit is both", normalizer=ln, confidence=0.6)
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
                                   "classifier linear (no BatchNorm after it; docs/theory.md §2)",
                                   confidence=0.7, role="not-invariant")
        elif rotational_default:
            decided[c.name] = Unit(unit_name([c.name]), (c.name,), "tensor", True, "name-rule",
                                   "OPT-IN training heuristic (Kosson et al.; rotational_default=True): a matrix with "
                                   "weight decay is treated as rotational; nothing shows it feeds a normalizer",
                                   confidence=0.2)
        else:
            decided[c.name] = Unit(unit_name([c.name]), (c.name,), "tensor", False, "name-rule",
                                   "undetermined: no name shows that it feeds a normalizer (pass --model with "
                                   "--probe, --graph FILE, a config.json / .keras beside the checkpoints, or "
                                   "--units FILE to decide)", confidence=0.3, role="undetermined")
    for wt in _stream_groups(sorted(writers, key=order.index)):
        decided[wt[0]] = Unit(unit_name(list(wt)), wt, "joint", True, "name-rule",
                              "pre-activation ResNet: these convs write one residual stream, read only through "
                              "BatchNorms; each alone is NOT SI, together they are (docs/theory.md §2). Assumes the "
                              "projection shortcut reads the normalized activation (common PreActBlock code), "
                              "which makes each stage with a projection its own stream", normalizer="bn1 of the "
                              "next blocks", confidence=0.5)
    if not preact:
        _bn_chains(shapes, convs, norms, decided)
    taken = {m for u in decided.values() for m in u.members}
    units = list(decided.values())
    for n in params:
        if n in taken:
            continue
        mod = n.rsplit(".", 1)[0]
        if mod in norms or mod in lns:
            why = "normalizer affine parameter: not SI on its own"
        elif _any(HEAD_PATTERNS, n):
            why = "classifier head parameter"
        else:
            why = "no rule makes it scale-invariant"
        units.append(Unit(unit_name([n]), (n,), "tensor", False, "name-rule", why, confidence=0.5,
                          role="not-invariant"))
    return units


def _bn_chains(shapes: Shapes, convs: Sequence[_Conv], norms: Mapping[str, int], decided: dict[str, Unit]) -> None:
    """A BatchNorm's (γ, β) are jointly SI when its output reaches, through the block's activation, only the next
    producer, which itself feeds a BatchNorm: conv1→bn1→conv2→bn2 in one parent (docs/theory.md §2)."""
    by_mod = {c.name[: -len(".weight")]: c for c in convs}
    for c in convs:
        u = decided.get(c.name)
        if u is None or not u.scale_invariant or u.normalizer not in norms:
            continue
        bn = str(u.normalizer)
        mod = c.name[: -len(".weight")]
        parent, _, leaf = mod.rpartition(".")
        m = re.match(r"^([A-Za-z_]*?)(\d+)$", leaf)
        if not m:
            continue
        base, idx = m.group(1), int(m.group(2))
        if base:
            nxt = f"{parent}.{base}{idx + 1}" if parent else f"{base}{idx + 1}"
        else:  # Sequential: the next producer within three positions (norm, activation, pooling between)
            cands = [f"{parent}.{k}" if parent else str(k) for k in range(idx + 2, idx + 5)]
            nxt = next((k for k in cands if k in by_mod), "")
        q = by_mod.get(nxt)
        if q is None or q.in_ch != norms[bn]:
            continue
        qu = decided.get(q.name)
        if qu is None or not qu.scale_invariant or qu.normalizer not in norms:
            continue
        pair = tuple(p for p in (f"{bn}.weight", f"{bn}.bias") if p in shapes)
        if pair and not any(p in decided for p in pair):
            decided[pair[0]] = Unit(unit_name(list(pair)), pair, "joint" if len(pair) > 1 else "tensor", True,
                                    "name-rule", f"BatchNorm affine pair read only by {nxt}, which feeds "
                                    f"BatchNorm {qu.normalizer} (naming: consecutive indices in one parent; assumes "
                                    "a positively homogeneous activation such as ReLU in between)",
                                    normalizer=qu.normalizer, confidence=0.5)


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


# Framework vocabularies (docs/formats.md): Keras and Flax spell the torch leaves differently and use ``/`` paths.
_LEAF_ALIASES = {"kernel": "weight", "gamma": "weight", "scale": "weight", "beta": "bias", "embeddings": "weight",
                 "embedding": "weight", "moving_variance": "running_var", "moving_mean": "running_mean",
                 "var": "running_var", "mean": "running_mean"}
_COLLECTIONS = ("params", "batch_stats", "variables", "trainable_variables")
_NORMISH = re.compile(r"(^|_)(bn|ln|gn|norm|layernorm|layer_norm|batchnorm|batch_norm|groupnorm|rmsnorm|rms_norm)"
                      r"(\d*)$|norm\d*$|^(ln|bn|gn)_?\w*$", re.IGNORECASE)


def canonical_names(shapes: Shapes, kinds: Mapping[str, str] | None = None
                    ) -> tuple[dict[str, tuple[int, ...]], dict[str, str], dict[str, str]]:
    """Torch-style spelling of every name (``params/conv0/kernel`` → ``conv0.weight``, HWIO kernels → OIHW
    shapes), so one rule table serves every framework. Returns (shapes, kinds, canonical → original)."""
    kinds = kinds or {}
    out_shapes: dict[str, tuple[int, ...]] = {}
    out_kinds: dict[str, str] = {}
    back: dict[str, str] = {}
    foreign = any("/" in n for n in shapes) or any(n.rsplit(".", 1)[-1] in ("kernel", "gamma", "beta", "scale")
                                                     for n in shapes)
    for name, shp in shapes.items():
        canon, shape = name, tuple(shp)
        if foreign:
            parts = [p for p in re.split(r"[/.]", name) if p]
            if len(parts) > 1 and parts[0] in _COLLECTIONS:
                parts = parts[1:]
            leaf = parts[-1] if parts else name
            if leaf == "kernel" and len(shape) >= 2:  # HWIO / (in, out) → (out, in, *spatial)
                shape = (shape[-1], shape[-2], *shape[:-2])
            parts[-1] = _LEAF_ALIASES.get(leaf, leaf)
            canon = ".".join(parts)
        if canon in back:  # two names collide after translation: keep everything as written
            return ({n: tuple(s) for n, s in shapes.items()}, {n: kinds.get(n, "parameter") for n in shapes},
                    {n: n for n in shapes})
        back[canon] = name
        out_shapes[canon] = shape
        leaf = canon.rsplit(".", 1)[-1]
        out_kinds[canon] = "buffer" if leaf in ("running_var", "running_mean") else kinds.get(name, "parameter")
    return out_shapes, out_kinds, back


def _ln_modules(shapes: Shapes, params: Sequence[str], bn: Mapping[str, int], originals: Mapping[str, str]
                ) -> dict[str, int]:
    """LayerNorm-like modules (no running statistics): a 1-D ``weight`` whose module is named like a normalizer,
    or whose framework calls it ``gamma``/``scale`` (Keras/Flax normalizers) → feature size."""
    out: dict[str, int] = {}
    for n in params:
        if not n.endswith(".weight") or len(shapes[n]) != 1:
            continue
        mod = n[: -len(".weight")]
        if mod in bn:
            continue
        leaf = mod.rsplit(".", 1)[-1]
        orig_leaf = re.split(r"[/.]", originals.get(n, n))[-1]
        bias = shapes.get(f"{mod}.bias")
        if _NORMISH.search(leaf) or orig_leaf in ("gamma", "scale") or bias == shapes[n]:  # 1-D weight + bias: a norm
            out[mod] = shapes[n][0]
    return out


def _tokens(leaf: str) -> set[str]:
    return {t for t in re.split(r"[_\d]+", leaf.lower()) if t} - {"ln", "bn", "norm", "layernorm", "proj", "fc",
                                                                  "dense", "linear", "conv", "layer"}


def _index(leaf: str) -> str | None:
    m = re.search(r"(\d+)$", leaf)
    return m.group(1) if m else None


def name_rule_units(shapes: Shapes, kinds: Mapping[str, str] | None = None, *,
                    rotational_default: bool = False) -> list[Unit]:
    """Decide every parameter tensor from names and shapes alone (labelled heuristic).

    Names from every framework the tool reads are translated to one spelling first (:func:`canonical_names`).
    ``rotational_default``: opt in to the Kosson et al. training heuristic (every matrix with weight decay is
    treated as rotational) for tensors no rule decides; by default they are ``undetermined``.
    """
    cshapes, ckinds, back = canonical_names(shapes, kinds)
    params = [n for n in cshapes if ckinds.get(n, "parameter") == "parameter" and not n.endswith(NORM_LEAVES)
              and not n.endswith(("running_mean", "num_batches_tracked"))]
    fam = _family(list(cshapes))
    if fam is not None:
        found = _transformer_units(fam, params)
    else:
        found = _cnn_units(cshapes, ckinds, params, back, rotational_default)
    if all(k == v for k, v in back.items()):
        return found
    out = []
    for u in found:
        members = tuple(back.get(m, m) for m in u.members)
        out.append(u.with_(members=members, name=unit_name(list(members))))
    return out
