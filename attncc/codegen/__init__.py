"""Codegen: variant spec + shapes -> specialized Triton source -> cached kernels.

One module per kernel family, each generating source that holds only the code paths its site needs:

* ``softmax``: the online-softmax (FlashAttention-2 style) forward that visits only the key blocks a query
  block needs: dense, causal, local bands with sinks and globals, and block layouts with element predicates
  and token maps (what ``block_sparse``, ``topk`` and ``neighborhood`` lower to);
* ``block_sparse``, ``topk``, ``neighborhood``: the layouts (and, for top-k, the block selection kernels) of
  those variants;
* ``linear``: chunked linear attention (causal and bidirectional, fused feature maps, window hybrid).

``writer`` helps generators write source; ``source`` turns generated text into kernels through the on-disk
cache (``cache``); ``autotune`` picks launch configs per kernel and sequence-length bucket.
Nothing here imports ``attncc.passes``.
"""
