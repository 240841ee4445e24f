"""Differentiable architecture search: DARTS, P-DARTS, LFM-DARTS, LFM-PDARTS, and evaluation.

    from lfm.nas import SearchConfig, run_search, run_evaluate, EvalConfig
    result = run_search(bundle, SearchConfig(method="lfm-darts"))
    result.genotype.save("genotype.json"); plot_genotype(result.genotype, "genotype.png")
    metrics = run_evaluate(bundle, result.genotype, EvalConfig())

References: Liu et al., DARTS (ICLR 2019); Chen et al., P-DARTS (ICCV 2019); Zhang et al.,
Learning From Mistakes (IEEE TAI 2025).
"""

from lfm.nas.evalnet import NetworkCIFAR, NetworkImageNet, count_params, cutout, drop_path
from lfm.nas.evaluate import EVAL_PRESETS, EvalConfig, run_evaluate
from lfm.nas.genotypes import (
    DARTS_V1,
    DARTS_V2,
    GENOTYPES,
    PDARTS,
    Genotype,
    derive_genotype,
    plot_genotype,
)
from lfm.nas.hypergrad import darts_alpha_grad, lfm_nas_grad, lfm_nas_grad_shared
from lfm.nas.ops import OPS, PRIMITIVES
from lfm.nas.search import (
    SEARCH_PRESETS,
    SEARCHERS,
    SearchConfig,
    SearchResult,
    config_from_preset,
    drop_ops,
    run_search,
)
from lfm.nas.supernet import Supernet

__all__ = [
    "DARTS_V1",
    "DARTS_V2",
    "EVAL_PRESETS",
    "GENOTYPES",
    "OPS",
    "PDARTS",
    "PRIMITIVES",
    "SEARCHERS",
    "SEARCH_PRESETS",
    "EvalConfig",
    "Genotype",
    "NetworkCIFAR",
    "NetworkImageNet",
    "SearchConfig",
    "SearchResult",
    "Supernet",
    "config_from_preset",
    "count_params",
    "cutout",
    "darts_alpha_grad",
    "derive_genotype",
    "drop_ops",
    "drop_path",
    "lfm_nas_grad",
    "lfm_nas_grad_shared",
    "plot_genotype",
    "run_evaluate",
    "run_search",
]
