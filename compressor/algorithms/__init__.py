"""The compression algorithms as pure math over tensors: no model loading, no files, no model forwards (a measure
that needs one is a callable the caller passes in). The passes (compressor/passes/) wire them to blocks.

- gptq: column-by-column quantization against a layer's Hessian (dense-and-sparse and fixed-mask variants);
- prune: magnitude masks, sparsity levels, the allocations (uniform, global, OWL, DP), the curves' loop, additivity;
- evopress: level spaces, level-switch mutation, the (1 + lambda) evolution, the DP baseline;
- lowrank: utilized subspaces, factorisation, the SVD baselines;
- pqi: the post-quantization integral and the Taylor estimates over a gradient callable, global top-k;
- requant: outlier masks, the outlier objective, restoring weights into a sparse residual;
- allocate: the one DP knapsack (one option per layer, least summed error under a budget).
"""
