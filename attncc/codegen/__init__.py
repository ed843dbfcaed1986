"""Codegen: variant spec + shapes -> Triton source -> cached kernels.

Nothing is generated yet: every op runs on the torch path (``attncc.runtime.dispatch``). The Triton kernel
generators and the on-disk kernel cache are the next milestone; nothing here imports ``attncc.passes``.
"""
