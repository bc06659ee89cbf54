"""The model side: ``PrunableViT`` (``backbone``, the one owner of timm internals), packed attention (``packed``), token
operations (``tokens``, ``merging``), FLOPs (``flops``), resampling (``resample``), the registered timm names
(``registry``) and checkpoints in timm's layout (``checkpoint``)."""
